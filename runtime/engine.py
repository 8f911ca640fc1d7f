"""The engine: runs one instance of a compiled plan, exactly as the plan says.

`Engine.from_plan(plan, weights=None)` reads the deployment's model (`model_spec`), its
colocated instance group (TP degree, scheduler settings, memory map) and builds:
  * the model (`model.CausalLM`) with weights from a local Hugging Face directory, or random
    ones (seeded) for tests and demos;
  * the paged KV pool with the plan's block size, block count and KV dtype, and an activation
    workspace laid out by the plan's arena (`workspace.Workspace`);
  * the block manager, the scheduler with the plan's token budget, chunk size and max
    sequences, and the sampler.

A step is: schedule -> prepare inputs -> run the model -> sample -> postprocess. The API
(docs/runtime.md): `generate` and `stream` run a batch; a server loop calls `add_request`,
`poll` (one step, its events) and `abort` itself. Requests are validated before anything is
queued; a bad request gets its own error (RequestError, or an error event in a batch) and never
disturbs the others. A request ends with exactly one final event: its last token with
finish_reason "stop" or "length", or, aborted, an event without a token and finish_reason
"abort". The engine is not thread-safe: one loop drives it.
Tensor and pipeline parallelism run one process per rank over torch.distributed (`runner.py`);
this process is rank 0 and drives the others.
"""

from __future__ import annotations

import itertools
import os
import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Container, Iterable, Iterator, Optional
from typing import Sequence as Seq

import torch

from flowc.compiler.plan import DeploymentPlan, InstanceGroup, Plan
from flowc.compiler.plan_io import load_plan_file, plan_problems
from flowc.compiler.units import format_gib

from .block_manager import BlockManager
from .config import ModelConfig
from .kernels import backend_problem, resolve_backend, tile_problem
from .offload import offload_problem
from .runner import Launcher, RankFailure, RunnerSpec, make_runner, serve_rank, torchrun_rank
from .sampler import Sampler
from .scheduler import ScheduledSeq, Scheduler
from .sequence import RequestError, SamplingParams, Sequence, finite_float, is_token_id
from .weights import load_config

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class EngineError(ValueError):
    """The plan or the weights cannot run here; the message says why and what to do."""


@dataclass
class Request:
    """One generation request. `arrival_time` (seconds after the start) is used by `replay`."""

    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: Optional[str] = None
    arrival_time: float = 0.0


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    finish_reason: Optional[str]  # "stop" | "length" | "abort"; None for a rejected request
    error: Optional[str] = None  # why the request was rejected or aborted
    arrival_time: float = 0.0
    first_token_time: Optional[float] = None
    finish_time: Optional[float] = None
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    instances: tuple[str, ...] = ()  # disaggregated: the instances that served it, `prefill K` then `decode K`

    @property
    def ttft_s(self) -> Optional[float]:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def tpot_s(self) -> Optional[float]:
        """Mean time per output token after the first."""
        if self.first_token_time is None or self.finish_time is None or len(self.output_token_ids) < 2:
            return None
        return (self.finish_time - self.first_token_time) / (len(self.output_token_ids) - 1)


@dataclass(frozen=True)
class TokenEvent:
    """One streamed token (or a rejection: token_id None and `error` set)."""

    request_id: str
    token_id: Optional[int]
    index: int
    finish_reason: Optional[str] = None
    error: Optional[str] = None


def _final_event(output: RequestOutput) -> TokenEvent:
    """The last event of a request that ends without a token (aborted)."""
    return TokenEvent(output.request_id, None, len(output.output_token_ids), output.finish_reason, output.error)


def _arrival(request: Request) -> Optional[float]:
    """A request's arrival_time in seconds; None when it is not a finite number >= 0."""
    seconds = finite_float(request.arrival_time)
    return seconds if seconds is not None and seconds >= 0 else None


def _replay_time(request: Request) -> float:
    """When a replay submits `request` (unscaled); at once for an invalid arrival (it is rejected)."""
    return _arrival(request) or 0.0


def load_plan(plan: Plan | str | Path) -> Plan:
    """A plan that passes the one validation every command applies (`plan_io.plan_problems`),
    from a Plan object or a file; EngineError otherwise."""
    if isinstance(plan, Plan):
        found = plan_problems(plan)
        if found:
            raise EngineError(f"the plan cannot run: at {found[0][0]}: {found[0][1]}"
                              + (f" (and {len(found) - 1} more problems)" if len(found) > 1 else ""))
        return plan
    path = Path(plan)
    try:
        loaded, problems = load_plan_file(path)
    except (OSError, UnicodeDecodeError) as e:
        raise EngineError(f"cannot read plan {path}: {getattr(e, 'strerror', None) or e}") from None
    if loaded is None:
        first = problems[0]
        raise EngineError(f"{path} is not a plan this flowc runs: {first.message}"
                          + (f", {first.notes[0]}" if first.notes else "")
                          + f" (run `flowc verify {path}` for details)")
    return loaded


def _deployment(plan: Plan, name: Optional[str]) -> DeploymentPlan:
    names = [d.name for d in plan.deployments]
    if name is None:
        if len(names) != 1:
            raise EngineError(f"the plan has {len(names)} deployments ({', '.join(names)}); choose one with "
                              "`--deployment NAME`")
        return plan.deployments[0]
    for d in plan.deployments:
        if d.name == name:
            return d
    raise EngineError(f"the plan has no deployment `{name}` (it has {', '.join(names)})")


def _colocated_group(dp: DeploymentPlan) -> InstanceGroup:
    for g in dp.groups:
        if g.role == "colocated":
            return g
    raise EngineError(f"deployment `{dp.name}` is disaggregated (prefill and decode instances); `Engine` runs "
                      "one colocated instance: run it with `flowc.runtime.open_plan` (or "
                      "`DisaggregatedEngine.from_plan`), or compile without `allow disaggregation`")


def _device_for(group: InstanceGroup) -> torch.device:
    if group.vendor == "cpu":
        return torch.device("cpu")
    if group.vendor != "nvidia" or not torch.cuda.is_available():
        raise EngineError(f"the plan runs on {group.vendor} {group.gpu} GPUs and this machine has no such device "
                          "(torch sees no CUDA device): compile the spec for `cpu-local` to run here")
    return torch.device("cuda")


def _tile_problem(backend: str, device: torch.device, model, group: InstanceGroup) -> Optional[tuple[str, str]]:
    """(message, help) when the Triton attention cannot tile the plan's head_dim or block size."""
    if resolve_backend(backend, str(device)) != "triton":
        return None
    problem = tile_problem("head_dim", model.head_dim) or tile_problem("block_size", group.scheduler.block_size)
    if problem is None:
        return None
    return (f"the Triton kernels cannot run this plan: {problem}",
            "compile with `block_size in [16 tok]` (or another power of two), or run with `--backend torch`")


def _host_problem(group: InstanceGroup, device: torch.device, share_cores: bool = False,
                  launcher: Launcher = "spawn") -> Optional[tuple[str, str]]:
    """(message, help) when this machine cannot start its ranks of the instance: one process per
    rank (all tp x pp of them, or under torchrun this node's: LOCAL_WORLD_SIZE), each on a device
    of its own (a CPU core, or a GPU; with `share_cores`, CPU ranks may share cores) with the
    memory its memory map takes."""
    if device.type == "cpu":
        devices = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        memory, what = _host_memory(), f"{devices} CPU cores"
    else:
        devices = torch.cuda.device_count()
        memory, what = torch.cuda.get_device_properties(0).total_memory * devices, f"{devices} CUDA devices"
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if launcher == "torchrun" else group.tp * group.pp
    if ranks > devices and not (share_cores and device.type == "cpu"):
        return (f"the instance runs tp {group.tp} x pp {group.pp}, one process per rank, {ranks} of them here, and "
                f"this machine has {what}",
                "compile the spec for this machine's devices (`gpu cpu-local x N` counts CPU cores)")
    m = group.memory
    need = ranks * (m.weights + m.kv_cache + m.activations)
    if memory is not None and need > memory:
        return (f"the instance takes {format_gib(need)} (weights, KV cache and activations of {ranks} ranks), "
                f"and this machine has {format_gib(memory)}", "compile the spec for this machine's memory")
    return None


def run_rank(plan: Plan | str | Path, weights: str | Path | None = None, *, deployment: Optional[str] = None,
             dtype: Optional[str] = None, backend: str = "auto", seed: int = 0, timeout_s: float = 120.0) -> None:
    """This process is a rank > 0 of an instance torchrun started (`flowc launch`): build its
    shard of `plan`'s colocated instance (`Engine.from_plan`'s arguments, the same on every rank)
    and run the steps rank 0 sends until rank 0 closes its engine."""
    p = load_plan(plan)
    dp = _deployment(p, deployment)
    group = _colocated_group(dp)
    serve_rank(Engine.runner_spec(p, dp, group, weights, dtype=dtype, backend=backend, seed=seed,
                                  timeout_s=timeout_s, launcher="torchrun"))


def _host_memory() -> Optional[int]:
    """Bytes of RAM the OS reports; None when it does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _dtype(name: str, what: str) -> torch.dtype:
    if name not in DTYPES:
        raise EngineError(f"the plan keeps {what} in {name}; the flowc runtime runs {', '.join(DTYPES)} only")
    return DTYPES[name]


class ServingAPI(ABC):
    """The request API an engine serves (docs/runtime.md): batches (`generate`, `stream`, with
    replay), a server loop's `add_request` and `abort`, ids, final events and the context
    manager. One home for `Engine` (one instance) and `disagg.DisaggregatedEngine` (prefill and
    decode instances), which provide `_validate`, `_queue`, `_abort`, `poll`, `has_work`, `now`
    and `close`, and hold `_live` (outputs in flight by id), `_events` (final events for the next
    poll) and `_ids` (a counter)."""

    _live: dict[str, RequestOutput]
    _events: list[TokenEvent]
    _ids: Iterator[int]

    @abstractmethod
    def _validate(self, request: Request) -> None:
        """RequestError unless `request` can run here."""

    @abstractmethod
    def _queue(self, request: Request, request_id: str, arrival_time: float) -> RequestOutput:
        """Queue a validated request under `request_id`; its output."""

    @abstractmethod
    def _abort(self, request_id: str) -> Optional[RequestOutput]:
        """Stop a request in flight, its blocks freed; its output, or None."""

    @abstractmethod
    def poll(self) -> list[TokenEvent]:
        """Run one step and return the events since the last call."""

    @abstractmethod
    def has_work(self) -> bool:
        """Whether a request is in flight or a final event is still to be given."""

    @abstractmethod
    def now(self) -> float:
        """Seconds on the engine clock."""

    @abstractmethod
    def close(self) -> None:
        """Stop the engine's processes."""

    def add_request(self, request: Request, arrival_time: Optional[float] = None) -> RequestOutput:
        """Validate `request` and queue it; RequestError (and nothing queued) when it is invalid
        or its id is in flight. Its latencies count from `arrival_time` (engine clock, `now()`),
        by default now. Returns its output, complete once its final event is out; `poll`
        (or a running `stream`) runs it."""
        self._validate(request)
        request_id = request.request_id if request.request_id is not None else self._new_id()
        return self._queue(request, request_id, self.now() if arrival_time is None else arrival_time)

    def abort(self, request_id: str) -> Optional[RequestOutput]:
        """Stop a request in flight (waiting, running or preempted): its blocks are freed at
        once, its output finishes with finish_reason "abort", and the next `poll` (or the
        running `stream`) gives its final event. Returns its output, or None when no request
        with this id is in flight (it finished already, or never came)."""
        output = self._abort(request_id)
        if output is not None:
            self._events.append(_final_event(output))
        return output

    def stream(self, requests: Iterable[Request], *, replay: bool = False, time_scale: float = 1.0
               ) -> Iterator[TokenEvent]:
        """Run `requests` and yield each event (`poll`) until the engine has no work, the
        events of requests added with `add_request` meanwhile included. Each invalid request
        yields one event with `error` set (token_id None) and never runs; the rest run as if
        it were not there. Request ids must be unique among the requests and those in flight.
        With `replay`, each request is submitted at `arrival_time * time_scale` seconds after
        the start. Closing the generator early aborts the requests it submitted that are
        still in flight (without events: nobody is listening). TypeError at once, nothing
        queued, for an item that is not a Request."""
        batch = list(requests)
        errors = self._check_batch(batch, time_scale)
        return self._serve(batch, errors, [], replay, time_scale)

    def generate(self, requests: Seq[Request], *, replay: bool = False, time_scale: float = 1.0
                 ) -> list[RequestOutput]:
        """Run `requests` to completion (as `stream`); one output per request, in the order
        given. An invalid request's output has `error` set and no tokens."""
        batch = list(requests)
        errors = self._check_batch(batch, time_scale)
        outputs: list[RequestOutput] = []
        for _ in self._serve(batch, errors, outputs, replay, time_scale):
            pass
        return outputs

    def _serve(self, requests: list[Request], errors: list[Optional[str]], outputs: list[RequestOutput],
               replay: bool, time_scale: float) -> Iterator[TokenEvent]:
        """`stream`'s loop; fills `outputs` with one output per request, in the order given."""
        taken = {r.request_id for r in requests if isinstance(r.request_id, str)}
        start = self.now()

        def due(i: int) -> float:  # when a replay submits request i, on the engine clock
            return start + _replay_time(requests[i]) * time_scale

        pending = deque(sorted(range(len(requests)), key=due) if replay else range(len(requests)))
        slots: list[Optional[RequestOutput]] = [None] * len(requests)
        events: deque[TokenEvent] = deque()  # the current step's, not yielded yet
        try:
            while pending or self.has_work():
                while pending and (not replay or self.now() >= due(pending[0])):
                    i = pending.popleft()
                    # a replayed request's latency counts from its arrival, also when a running step
                    # kept it waiting to be submitted (as a server's queue would)
                    slots[i], event = self._submit(requests[i], errors[i], taken, due(i) if replay else self.now())
                    if event is not None:
                        yield event
                if self.has_work():
                    events.extend(self.poll())
                    while events:
                        yield events.popleft()
                elif pending:  # idle until the next arrival
                    time.sleep(max(0.0, due(pending[0]) - self.now()))
        finally:
            self._leave([o for o in slots if o is not None], events)
            outputs.extend(o for o in slots if o is not None)

    def _leave(self, mine: list[RequestOutput], undelivered: deque[TokenEvent]) -> None:
        """A stream ends (perhaps closed early, or failed): abort its requests still in flight,
        which must not outlive it, and keep the undelivered events of other requests for the
        next poll."""
        ids = {o.request_id for o in mine}
        for output in mine:
            if self._live.get(output.request_id) is output:
                self._abort(output.request_id)
        self._events[:0] = [e for e in undelivered if e.request_id not in ids]

    def _check_batch(self, requests: list[Request], time_scale: float) -> list[Optional[str]]:
        """Each request's error (None when valid); a duplicate id's second use is an error.
        TypeError for an item that is not a Request, ValueError for a bad time_scale."""
        if finite_float(time_scale) is None or time_scale <= 0:
            raise ValueError(f"time_scale must be a finite number > 0, got {time_scale!r}")
        for i, request in enumerate(requests):
            if not isinstance(request, Request):
                raise TypeError(f"request {i} is a {type(request).__name__}, not a flowc.runtime.Request")
        errors: list[Optional[str]] = []
        seen: set[str] = set()
        for request in requests:
            try:
                self._validate(request)
            except RequestError as e:
                errors.append(str(e))
                continue
            if request.request_id in seen:
                errors.append(f"duplicate request id {request.request_id!r}: an earlier request has it")
            else:
                errors.append(None)
            if request.request_id is not None:
                seen.add(request.request_id)
        return errors

    def _submit(self, request: Request, error: Optional[str], taken: set[str], arrival_time: float
                ) -> tuple[RequestOutput, Optional[TokenEvent]]:
        """Queue one request of a batch, or reject it: its output, and its error event if rejected."""
        # a rejected request keeps the id it came with, even one that is not a string
        request_id = request.request_id if request.request_id is not None else self._new_id(taken)
        if error is None:
            try:
                return self._queue(request, request_id, arrival_time), None
            except RequestError as e:  # its id came in flight since the batch was checked
                error = str(e)
        prompt = request.prompt_token_ids
        output = RequestOutput(request_id, list(prompt) if isinstance(prompt, (list, tuple)) else [], [], None,
                               error=error, arrival_time=arrival_time)
        return output, TokenEvent(request_id, None, 0, None, error)

    def _new_id(self, taken: Container[str] = ()) -> str:
        """A request id for a request that has none: not in flight, and not in `taken`."""
        while True:
            request_id = str(next(self._ids))
            if request_id not in self._live and request_id not in taken:
                return request_id

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Engine(ServingAPI):
    """Continuous-batching engine for one instance of a plan (see the module docstring)."""

    def __init__(self, plan: Plan, dp: DeploymentPlan, group: InstanceGroup, spec: RunnerSpec):
        self.config, self.plan_document, self.plan, self.group = spec.config, plan, dp, group
        self.failure: Optional[str] = None  # why a worker failed: the engine then serves nothing
        s = group.scheduler
        self.runner = make_runner(spec)
        self.block_manager = BlockManager(group.memory.kv_blocks, s.block_size)
        self.scheduler = Scheduler(self.block_manager, max_batched_tokens=s.max_batched_tokens, max_seqs=s.max_seqs,
                                   chunk_size=s.chunk_size, chunked_prefill=s.chunked_prefill)
        self.sampler = Sampler()
        self._ids = itertools.count()
        self._live: dict[str, RequestOutput] = {}  # the requests in flight, by id
        self._events: list[TokenEvent] = []  # final events of aborted requests, for the next poll
        self._warm_up()
        self._clock_start = time.perf_counter()

    def _warm_up(self) -> None:
        """Run the model on dummy steps before the first request, as a server does at start-up,
        so no request pays the one-time costs: Triton compiling each kernel specialization
        (prefill and decode tiles, one sequence and many), allocator growth, thread-pool start.
        The steps write KV slots of blocks nobody holds yet; nothing is sampled or cached."""
        s, blocks = self.group.scheduler, self.block_manager.num_blocks
        bs = s.block_size
        prompt = min(s.max_batched_tokens, self.config.max_context, blocks * bs)
        batch = min(s.max_seqs, blocks, s.max_batched_tokens)
        # (sequences, new tokens each): a long prefill, a batched one, decodes of one and many
        for n, length in dict.fromkeys([(1, prompt), (2, 2), (1, 1), (batch, 1)]):
            width = -(-length // bs)
            if n * width > blocks or n * length > s.max_batched_tokens or n > s.max_seqs:
                continue
            tables = [list(range(i * width, (i + 1) * width)) for i in range(n)]
            self.runner.run({"input_ids": [0] * (n * length), "positions": list(range(length)) * n,
                             "slot_mapping": [t[p // bs] * bs + p % bs for t in tables for p in range(length)],
                             "block_tables": tables, "seq_lens": [length] * n,
                             "query_start_loc": [i * length for i in range(n + 1)],
                             "logits_indices": [(i + 1) * length - 1 for i in range(n)]})

    @classmethod
    def from_plan(cls, plan: Plan | str | Path, weights: str | Path | None = None, *, deployment: Optional[str] = None,
                  dtype: Optional[str] = None, backend: str = "auto", seed: int = 0,
                  share_cores: bool = False, timeout_s: float = 120.0, launcher: Launcher = "spawn") -> "Engine":
        """The engine for `plan`'s colocated instance. `weights`: a local Hugging Face model
        directory (config.json + safetensors) whose shapes must match the plan's model; None
        draws random weights from `seed`. `dtype` ("fp32", "bf16", "fp16") overrides the plan's
        weight, activation and KV dtype, for exact comparisons; block counts stay the plan's.
        `share_cores`: a CPU plan may run more ranks (tp x pp processes) than this machine has
        cores, slower but with the same results (tests and demos on small machines). A worker
        process that dies, or does not answer a step for `timeout_s`, fails the requests in
        flight (final events with `error` saying which rank) and stops the engine. `launcher`
        "torchrun": torchrun started every rank (`flowc launch`); this process is rank 0, the
        others run `run_rank`."""
        p = load_plan(plan)
        dp = _deployment(p, deployment)
        return cls.for_group(p, dp, _colocated_group(dp), weights, dtype=dtype, backend=backend, seed=seed,
                             share_cores=share_cores, timeout_s=timeout_s, launcher=launcher)

    @classmethod
    def for_group(cls, p: Plan, dp: DeploymentPlan, group: InstanceGroup, weights: str | Path | None = None, *,
                  dtype: Optional[str] = None, backend: str = "auto", seed: int = 0,
                  share_cores: bool = False, timeout_s: float = 120.0, launcher: Launcher = "spawn") -> "Engine":
        """The engine for one instance of `group`, a group of deployment `dp` of the loaded plan
        `p` (`from_plan`'s other arguments); `from_plan` and the disaggregated engine (disagg.py)
        build every engine here, so every instance passes the same checks."""
        return cls(p, dp, group, cls.runner_spec(p, dp, group, weights, dtype=dtype, backend=backend, seed=seed,
                                                 share_cores=share_cores, timeout_s=timeout_s, launcher=launcher))

    @staticmethod
    def runner_spec(p: Plan, dp: DeploymentPlan, group: InstanceGroup, weights: str | Path | None = None, *,
                    dtype: Optional[str] = None, backend: str = "auto", seed: int = 0, share_cores: bool = False,
                    timeout_s: float = 120.0, launcher: Launcher = "spawn") -> RunnerSpec:
        """What every rank of an instance of `group` builds (`for_group`'s arguments), after the
        checks that refuse what cannot run here: EngineError before any process starts."""
        if dp.model_spec is None:
            raise EngineError(f"plan format {p.format_version} does not carry the model; compile the spec again "
                              "with this flowc")
        offload = offload_problem(group.memory.offloaded, group.pp)
        if offload is not None:
            raise EngineError(f"deployment `{dp.name}` {offload}")
        config = ModelConfig.from_spec(dp.model_spec)
        weights_dir = None
        if weights is not None:
            weights_dir = Path(weights)
            config = _hf_config(weights_dir, dp)
        device = _device_for(group)
        problem = (backend_problem(backend, str(device)) or _tile_problem(backend, device, dp.model_spec, group)
                   or _host_problem(group, device, share_cores, launcher))
        if problem is not None:  # before any worker starts: a plan for cpu-local on a GPU machine
            raise EngineError(f"{problem[0]}; {problem[1]}")
        if dtype is not None and dtype not in DTYPES:
            raise EngineError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
        w_dtype = DTYPES[dtype] if dtype else _dtype(dp.weights, "weights")
        kv_dtype = DTYPES[dtype] if dtype else _dtype(dp.kv, "the KV cache")
        s = group.scheduler
        spec = RunnerSpec(config=config, tp=group.tp, pp=group.pp, ep=group.ep, weights=weights_dir, dtype=w_dtype,
                          kv_dtype=kv_dtype, device=str(device), backend=backend, seed=seed,
                          num_blocks=group.memory.kv_blocks, block_size=s.block_size,
                          arena_offsets=dict(group.memory.arena_offsets), arena_sizes=dict(group.memory.arena_sizes),
                          timeout_s=timeout_s, launcher=launcher, offloaded=dict(group.memory.offloaded))
        if launcher == "torchrun":
            try:
                torchrun_rank(spec)
            except RuntimeError as error:  # not started by torchrun, or with another world size
                raise EngineError(str(error)) from None
        return spec

    # ------------------------------------------------------------------ requests

    def _validate(self, request: Request) -> None:
        """Raise RequestError saying what is wrong with `request` for this engine; whatever its
        fields hold, nothing else is raised (but EngineError once a worker failure stopped the engine)."""
        if self.failure is not None:
            raise EngineError(self.failure)
        prompt, params, c = request.prompt_token_ids, request.params, self.config
        if request.request_id is not None and not isinstance(request.request_id, str):
            raise RequestError(f"request_id must be a string or None, got {request.request_id!r}")
        if _arrival(request) is None:
            raise RequestError(f"arrival_time must be a finite number of seconds >= 0, got {request.arrival_time!r}")
        if not isinstance(params, SamplingParams):
            raise RequestError(f"params must be a SamplingParams, got {type(params).__name__}")
        if not isinstance(prompt, (list, tuple)):
            raise RequestError(f"prompt_token_ids must be a list of token ids, got {type(prompt).__name__}")
        if not prompt:
            raise RequestError("the prompt is empty: give at least one token")
        for i, token in enumerate(prompt):
            if not is_token_id(token, c.vocab):
                raise RequestError(f"prompt token {i} is {token!r}, not a token id of this model "
                                   f"(an int from 0 to {c.vocab - 1})")
        params.validate(c.vocab)
        if len(prompt) + params.max_tokens > c.max_context:
            raise RequestError(f"prompt of {len(prompt)} tokens + max_tokens {params.max_tokens} exceeds the "
                               f"model's context of {c.max_context} tokens; shorten the prompt or lower max_tokens")
        # the last sampled token is never fed back: the cache holds at most prompt + max_tokens - 1
        peak = len(prompt) + params.max_tokens - 1
        problem = (self.scheduler.unservable(peak, prompt_only=False)
                   or self.scheduler.unservable(len(prompt), prompt_only=True))
        if problem:
            raise RequestError(f"prompt of {len(prompt)} tokens + max_tokens {params.max_tokens} cannot run on this "
                               f"instance: {problem}; shorten the prompt or lower max_tokens")

    def _queue(self, request: Request, request_id: str, arrival_time: float, handoff: bool = False
               ) -> RequestOutput:
        """Queue a validated request under `request_id` (RequestError if that id is in flight);
        `handoff`: a prefill instance's request, which stops after its first token (disagg.py)."""
        if request_id in self._live:
            raise RequestError(f"duplicate request id {request_id!r}: a request with this id is in flight")
        seq = Sequence(request_id=request_id, prompt_token_ids=list(request.prompt_token_ids), params=request.params,
                       eos_token_ids=self.config.eos_token_ids, arrival_time=arrival_time, handoff=handoff)
        self.scheduler.add(seq)
        output = RequestOutput(request_id, seq.prompt_token_ids, seq.output_token_ids, None, arrival_time=arrival_time)
        self._live[request_id] = output
        return output

    def now(self) -> float:
        return time.perf_counter() - self._clock_start

    def set_clock(self, start: float) -> None:
        """Count from `start` (a perf_counter reading): instances serving together share a clock."""
        self._clock_start = start

    # ------------------------------------------------------------------ stepping

    def step(self) -> tuple[list[ScheduledSeq], list[Sequence]]:
        """One iteration: the sequences it ran and those that finished (`poll` records them
        and makes their events; call that unless you keep the books yourself)."""
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return [], []
        logits = self.runner.run(self._inputs(scheduled))
        sampling = [s.seq for s in scheduled if s.samples]
        sampled = self.sampler.sample(logits, sampling) if sampling else []
        finished = self.scheduler.postprocess(scheduled, sampled, self.now())
        return scheduled, finished

    def _inputs(self, scheduled: list[ScheduledSeq]) -> dict[str, list]:
        """The step's inputs as plain lists (the runner copies them into its workspace)."""
        bm = self.block_manager
        ids, positions, slots, tables, seq_lens, starts, rows = [], [], [], [], [], [0], []
        for s in scheduled:
            tokens = s.seq.token_ids
            span = range(s.start, s.start + s.num_tokens)
            ids.extend(tokens[p] for p in span)
            positions.extend(span)
            slots.extend(bm.slot(s.seq, p) for p in span)
            tables.append(list(s.seq.block_ids))
            seq_lens.append(s.start + s.num_tokens)
            starts.append(starts[-1] + s.num_tokens)
            if s.samples:
                rows.append(starts[-1] - 1)
        return {"input_ids": ids, "positions": positions, "slot_mapping": slots, "block_tables": tables,
                "seq_lens": seq_lens, "query_start_loc": starts, "logits_indices": rows}

    # ------------------------------------------------------------------ the API

    def _abort(self, request_id: str) -> Optional[RequestOutput]:
        seq = self.scheduler.abort(request_id)
        if seq is None:
            return None
        return self._record(seq)

    def has_work(self) -> bool:
        """Whether a request is in flight or a final event is still to be given."""
        return self.scheduler.has_work() or bool(self._events)

    def poll(self) -> list[TokenEvent]:
        """Run one step (if a request is in flight) and return the events since the last call:
        final events of aborted requests, then each token the step sampled, in batch order
        (a request's last token carries its finish_reason), then final events of requests the
        scheduler gave up on (`error` says why)."""
        events, self._events = self._events, []
        if not self.scheduler.has_work():
            return events
        try:
            scheduled, finished = self.step()
        except RankFailure as failure:
            return events + self._fail(str(failure))
        done = {id(seq) for seq in finished}
        for s in scheduled:
            if s.samples:
                seq = s.seq
                reason = seq.finish_reason if id(seq) in done else None
                events.append(TokenEvent(seq.request_id, seq.output_token_ids[-1], len(seq.output_token_ids) - 1,
                                         reason))
        for seq in finished:
            self._record(seq)
        events.extend(_final_event(self._record(seq)) for seq in self.scheduler.take_aborted())
        return events

    def _fail(self, reason: str) -> list[TokenEvent]:
        """A worker failed: every request in flight ends with an "abort" final event whose error
        says why, the workers left are stopped, and the engine takes no more requests."""
        self.failure = f"the engine stopped: {reason}"
        events = [_final_event(self._record(seq)) for seq in self.scheduler.take_aborted()]
        for request_id in list(self._live):
            seq = self.scheduler.abort(request_id)
            if seq is not None:
                seq.error = self.failure
                events.append(_final_event(self._record(seq)))
        self.runner.close()
        return events

    def _record(self, seq: Sequence) -> RequestOutput:
        """Fill in the output of a request that finished (or was aborted); it leaves the engine."""
        out = self._live.pop(seq.request_id)
        out.output_token_ids = list(seq.output_token_ids)
        out.finish_reason = seq.finish_reason
        out.first_token_time = seq.first_token_time
        out.finish_time = seq.token_times[-1] if seq.token_times else None
        out.num_cached_tokens = seq.num_cached_tokens
        out.num_preemptions = seq.num_preemptions
        out.error = seq.error
        return out

    # ------------------------------------------------------------------ disaggregated serving (disagg.py)

    def hand_off(self, request_id: str) -> RequestOutput:
        """A prefill instance's PREFILLED request moves on: its output leaves this engine (the
        decode instance records it); the sequence stays parked, holding its blocks, until
        `scheduler.release` after its KV moved."""
        return self._live.pop(request_id)

    def take_over(self, prefilled: Sequence, output: RequestOutput) -> Sequence:
        """A decode instance takes a prefilled request (`scheduler.can_receive` first): its own
        sequence, RECEIVING with blocks reserved for the prompt's KV, carrying the first token,
        timings, preemptions and sampling generator; it records `output` when it ends."""
        # the same output list and generator: `output` keeps showing the tokens as they come, and
        # a seeded request samples on as if it had never moved
        seq = Sequence(request_id=prefilled.request_id, prompt_token_ids=prefilled.prompt_token_ids,
                       params=prefilled.params, eos_token_ids=prefilled.eos_token_ids,
                       arrival_time=prefilled.arrival_time, output_token_ids=prefilled.output_token_ids,
                       num_cached_tokens=prefilled.num_cached_tokens, first_token_time=prefilled.first_token_time,
                       token_times=list(prefilled.token_times), num_preemptions=prefilled.num_preemptions,
                       generator=prefilled.generator)
        self.scheduler.receive(seq)
        self._live[seq.request_id] = output
        return seq

    def close(self):
        self.runner.close()

def _hf_config(weights: Path, dp: DeploymentPlan) -> ModelConfig:
    """The model config of a local HF directory, refused when it is not the plan's model."""
    config = load_config(weights)
    differences = config.mismatches(dp.model_spec)
    if differences:
        raise EngineError(f"the weights in {weights} are not the plan's model `{dp.model}`: "
                          + "; ".join(differences) + "; compile a plan for this model or give its weights")
    return config
