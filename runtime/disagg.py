"""Disaggregated serving: prefill instances compute prompts, decode instances the rest.

`DisaggregatedEngine.from_plan(plan)` (or `open_plan`, which picks the engine a plan needs)
builds one instance per instance of the deployment's prefill and decode groups and serves
requests through the same API as `Engine` (docs/runtime.md). A request:

  1. goes to a prefill instance (round robin), which computes its prompt and samples its first
     token (its TTFT), then parks it, holding its KV blocks (PREFILLED);
  2. when a decode instance has room (a sequence slot and the blocks of the prompt, and no
     preempted sequence of its own waiting), that instance reserves the blocks (RECEIVING) and
     the prompt's KV (every layer, whole blocks) moves through the `KVTransport`. A request for
     which no decode instance has room waits, first come first served, and its prefill
     instance keeps its blocks: nothing is dropped;
  3. the decode instance writes the KV into its blocks and acknowledges; the request runs
     there from its next step, decoding (preempted there, it is recomputed there);
  4. on the acknowledgement, the prefill instance frees its blocks (full ones stay in its
     prefix cache).

A request that finishes with its first token (max_tokens 1, or a stop token) never moves.
Aborting a request frees its blocks wherever it is, on both sides while its KV moves.

Before any transfer the KV layouts must agree (`check_layouts`): the model, the layers and KV
heads each pool holds, head_dim, the KV dtype and the block size (the block counts may differ).

By default every instance runs in this process (tp = pp = 1 only: an instance of more ranks
runs them in processes of its own): a `poll` steps each in turn and the KV moves between pools
in memory (`InProcessTransport`). With `processes=True` each runs in a process of its own
(runtime/instance_process.py), of any tp and pp: a `poll` steps them all at once, the KV moves
worker to worker over `TorchDistributedTransport` (gathered from and scattered to an
instance's ranks), and an instance whose process fails ends only its own requests.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from flowc.compiler.plan import DeploymentPlan, Plan

from .engine import (
    Engine,
    EngineError,
    Request,
    RequestOutput,
    ServingAPI,
    TokenEvent,
    _deployment,
    _device_for,
    _final_event,
    load_plan,
)
from .instance_process import RemoteInstance, WorkerSpec, close_all
from .kv_transport import (
    InProcessTransport,
    KVLayout,
    KVTransfer,
    KVTransport,
    check_layouts,
    kv_layout,
    receive_kv,
    send_kv,
    settle_kv,
)
from .parallel import free_port
from .replicas import ReplicatedEngine
from .runner import RankFailure
from .sequence import RequestError, Sequence

Instance = Union[Engine, RemoteInstance]  # an instance in this process, or in a process of its own


def _layout(instance: Instance) -> KVLayout:
    if isinstance(instance, RemoteInstance):
        assert instance.layout is not None  # connected
        return instance.layout
    return kv_layout(instance)

# ------------------------------------------------------------------------------------ engine


def _disaggregated(dp: DeploymentPlan) -> bool:
    return any(g.role != "colocated" for g in dp.groups)


def open_plan(plan: Plan | str | Path, weights: str | Path | None = None, *, deployment: Optional[str] = None,
              processes: bool = False, **options) -> "ServingAPI":
    """The engine that runs `plan`'s deployment: a `DisaggregatedEngine` for prefill and decode
    instances (`processes`: each in a process of its own), a `ReplicatedEngine` for several
    colocated instances of tp = pp = 1, else an `Engine` for its (first) colocated instance
    (`Engine.from_plan`'s arguments)."""
    p = load_plan(plan)
    dp = _deployment(p, deployment)
    if _disaggregated(dp):
        return DisaggregatedEngine.from_plan(p, weights, deployment=dp.name, processes=processes, **options)
    if processes:
        raise EngineError(f"deployment `{dp.name}` is colocated; processes of their own are for the prefill and "
                          "decode instances of a disaggregated plan (a colocated instance of tp or pp above 1 "
                          "runs one process per rank already)")
    if len(dp.instance_labels()) > 1 and all(g.tp * g.pp == 1 for g in dp.groups) and not options.get("launcher"):
        return ReplicatedEngine.from_plan(p, weights, deployment=dp.name, **options)
    return Engine.from_plan(p, weights, deployment=dp.name, **options)


@dataclass
class _Route:
    """Where a request in flight is: its prefill instance, then its decode instance."""

    prefill: Instance
    decode: Optional[Instance] = None
    kv_arrived: bool = False  # its KV is in the decode instance's blocks


class DisaggregatedEngine(ServingAPI):
    """Prefill and decode instances of one plan behind one `Engine` API (module docstring).

    `prefill` and `decode` hold the instances: engines in this process, whose KV `transport`
    moves, or `RemoteInstance`s, each in a process of its own, whose KV moves between them over
    torch.distributed. Not thread-safe: one loop drives it, and a `poll` steps every instance once.
    """

    def __init__(self, plan: Plan, dp: DeploymentPlan, prefill: list[Instance], decode: list[Instance],
                 transport: Optional[KVTransport] = None):
        if not prefill or not decode:
            raise EngineError(f"deployment `{dp.name}` needs prefill and decode instances, and has "
                              f"{len(prefill)} and {len(decode)}")
        self.plan_document, self.plan = plan, dp
        self.prefill, self.decode = prefill, decode
        self.config = prefill[0].config
        self.transport = transport if transport is not None else InProcessTransport()
        self.layouts = [_layout(e) for e in prefill], [_layout(e) for e in decode]
        for i, producer in enumerate(self.layouts[0]):
            for j, consumer in enumerate(self.layouts[1]):
                check_layouts(producer, consumer, f"prefill instance {i} and decode instance {j}")
        self._ids = itertools.count()
        self._live: dict[str, RequestOutput] = {}
        self._events: list[TokenEvent] = []
        self._routes: dict[str, _Route] = {}
        self._handoffs: deque[tuple[int, Sequence]] = deque()  # (prefill instance, PREFILLED), oldest first
        self._unacked: dict[str, int] = {}  # request id -> the prefill instance holding its blocks
        self._next_prefill = self._next_decode = 0
        self._down: dict[int, str] = {}  # id() of an instance whose process failed -> why
        # KV moved so far, and the seconds spent exporting, sending and importing it
        # (benchmarks/bench_distributed.py)
        self.kv_transfers, self.kv_bytes, self.kv_seconds = 0, 0, 0.0
        self._clock_start = time.perf_counter()
        for engine in prefill + decode:  # one clock: a request's times come from two instances
            engine.set_clock(self._clock_start)

    @classmethod
    def from_plan(cls, plan: Plan | str | Path, weights: str | Path | None = None, *,
                  deployment: Optional[str] = None, dtype: Optional[str] = None, backend: str = "auto",
                  seed: int = 0, transport: Optional[KVTransport] = None, processes: bool = False,
                  share_cores: bool = False, timeout_s: float = 120.0) -> "DisaggregatedEngine":
        """The engines of every instance of `plan`'s prefill and decode groups (`Engine.from_plan`'s
        arguments; random weights are the same on every instance), joined by `transport`
        (default: `InProcessTransport`). `processes`: each instance in a process of its own
        (runtime/instance_process.py), the KV moving between them over torch.distributed, which
        also runs instances of tp or pp above 1; an instance process that dies or does not
        answer for `timeout_s` ends its own requests, and the others serve on."""
        p = load_plan(plan)
        dp = _deployment(p, deployment)
        if not _disaggregated(dp):
            raise EngineError(f"deployment `{dp.name}` is colocated: run it with `Engine.from_plan` (or `open_plan`)")
        roles = {g.role for g in dp.groups}
        if roles != {"prefill", "decode"}:
            raise EngineError(f"deployment `{dp.name}` has {', '.join(sorted(roles))} instances; disaggregated "
                              "serving runs prefill and decode instances only")
        for g in dp.groups:
            if g.tp * g.pp > 1 and not processes:
                raise EngineError(f"deployment `{dp.name}` runs {g.role} instances of tp {g.tp} x pp {g.pp}, whose "
                                  "ranks run in processes of their own: run each instance in a process of its own "
                                  "(`processes=True`, `flowc run --processes`)")
        options = dict(dtype=dtype, backend=backend, seed=seed, share_cores=share_cores, timeout_s=timeout_s)
        engines: dict[str, list[Instance]] = {"prefill": [], "decode": []}
        try:
            if processes:
                engines = _start_processes(p, dp, weights, options, timeout_s)
            else:
                for g in dp.groups:
                    for _ in g.instances:
                        engines[g.role].append(Engine.for_group(p, dp, g, weights, **options))
            return cls(p, dp, engines["prefill"], engines["decode"], transport)
        except BaseException:
            _close(engines["prefill"] + engines["decode"])
            raise

    # ------------------------------------------------------------------ requests

    def _validate(self, request: Request) -> None:
        """RequestError unless `request` can run on every instance the router may pick: all of
        it on a decode instance (Engine's checks), its prompt on a prefill instance. EngineError
        once every prefill or every decode instance is down."""
        for role, instances in (("prefill", self.prefill), ("decode", self.decode)):
            if not self._up(instances):
                down = "; ".join(self._down.values())
                raise EngineError(f"the engine stopped: every {role} instance is down ({down})")
        for engine in self._up(self.decode):
            engine._validate(request)
        prompt = request.prompt_token_ids
        for engine in self._up(self.prefill):
            problem = engine.scheduler.unservable(len(prompt), prompt_only=True)
            if problem:
                raise RequestError(f"a prompt of {len(prompt)} tokens cannot run on the prefill instances: "
                                   f"{problem}; shorten the prompt")

    def _queue(self, request: Request, request_id: str, arrival_time: float) -> RequestOutput:
        # a prefill instance still holding the id's blocks (unacknowledged) would refuse it
        if request_id in self._live or request_id in self._unacked:
            raise RequestError(f"duplicate request id {request_id!r}: a request with this id is in flight")
        k = self._next_prefill % len(self.prefill)
        while id(self.prefill[k]) in self._down:  # _validate left one up
            k = (k + 1) % len(self.prefill)
        engine = self.prefill[k]
        self._next_prefill = k + 1
        output = engine._queue(request, request_id, arrival_time, handoff=True)
        output.instances = (f"prefill {k}",)
        self._live[request_id] = output
        self._routes[request_id] = _Route(engine)
        return output

    def _abort(self, request_id: str) -> Optional[RequestOutput]:
        output = self._live.pop(request_id, None)
        if output is None:
            return None
        route = self._routes.pop(request_id)
        self._handoffs = deque(h for h in self._handoffs if h[1].request_id != request_id)
        # waiting, running or PREFILLED on its prefill instance, or RECEIVING or running on its decode one
        holder = route.prefill if route.decode is None else route.decode
        if self._is_up(holder):
            holder._abort(request_id)
        producer = self._unacked.pop(request_id, None)
        if producer is not None:  # its KV was on its way: both sides let go
            self.transport.cancel(request_id)
            if self._is_up(self.prefill[producer]):
                self.prefill[producer].scheduler.release(request_id)
        return output

    def now(self) -> float:
        return time.perf_counter() - self._clock_start

    # ------------------------------------------------------------------ faults

    def _is_up(self, instance: Instance) -> bool:
        return id(instance) not in self._down

    def _up(self, instances: list[Instance]) -> list[Instance]:
        return [e for e in instances if self._is_up(e)]

    def _label(self, instance: Instance) -> str:
        role = "prefill" if any(e is instance for e in self.prefill) else "decode"
        return f"{role} {next(k for k, e in enumerate(getattr(self, role)) if e is instance)}"

    def _safely(self, instance: Instance, call, *args):
        """`call(*args)`, or None when `instance`'s process died or hung on it (`_instance_down`)."""
        try:
            return call(*args)
        except RankFailure as failure:
            self._instance_down(instance, failure)
            return None

    def _instance_down(self, instance: Instance, failure: RankFailure) -> None:
        """An instance's process died or stopped answering: it serves nothing more, and the
        others keep serving. Its requests end at the next `_end_requests_of_failed` (not here:
        other instances may owe an answer to a step started meanwhile)."""
        self._down[id(instance)] = f"instance {self._label(instance)} failed: {failure}"
        if isinstance(instance, RemoteInstance):
            instance.kill()

    def _end_requests_of_failed(self) -> None:
        """Every request that a failed instance holds, or whose KV it has not delivered yet, ends
        with an abort whose error says why (final events at the next poll)."""
        if not self._down:  # every poll calls this: nothing to scan while every instance is up
            return
        for request_id, route in list(self._routes.items()):
            holder = route.decode or route.prefill
            producer = self._unacked.get(request_id)
            owed_by = self.prefill[producer] if producer is not None else None
            if owed_by is not None and not self._is_up(owed_by) and route.kv_arrived:
                del self._unacked[request_id]  # the decode side has it: nothing is owed any more
                owed_by = None
            failed = [e for e in (holder, owed_by) if e is not None and not self._is_up(e)]
            if failed:
                output = self._abort(request_id)
                assert output is not None  # in flight
                output.finish_reason = "abort"
                output.error = f"the engine stopped serving it: {self._down[id(failed[0])]}"
                self._events.append(_final_event(output))

    # ------------------------------------------------------------------ stepping

    @property
    def num_waiting_for_decode(self) -> int:
        """Prefilled requests waiting for room on a decode instance (their prefill instances hold their KV)."""
        return len(self._handoffs)

    def has_work(self) -> bool:
        """Whether a request is in flight (on an instance, or its KV on its way) or a final event
        is still to be given."""
        return bool(self._events) or any(e.has_work() for e in self._up(self.prefill + self.decode))

    def poll(self) -> list[TokenEvent]:
        """One step of every prefill instance, the KV moves that can start and end, then one step
        of every decode instance; the events since the last call (as `Engine.poll`, instance by
        instance: a request's first token comes from its prefill instance). Instances in
        processes of their own all step at once, and the moves follow their steps. An instance
        whose process fails ends the requests it held (`_instance_down`)."""
        events, self._events = self._events, []
        remote = [e for e in self._up(self.prefill + self.decode) if isinstance(e, RemoteInstance)]
        for engine in remote:
            self._safely(engine, engine.start_poll)
        for i, engine in enumerate(self.prefill):
            stepped = self._safely(engine, engine.poll) if self._is_up(engine) else None
            if stepped is not None:
                events += stepped
                self._handoffs.extend((i, seq) for seq in engine.scheduler.take_prefilled())
        if remote:  # their steps are done before the moves ask the decode instances anything
            events += self._poll_decode()
        self._end_requests_of_failed()
        self._send()
        self._receive()
        self._settle()
        if not remote:
            events += self._poll_decode()
        self._end_requests_of_failed()
        events += self._events  # requests an instance failure ended meanwhile
        self._events = []
        for event in events:  # a request leaves when its output is complete
            output = self._live.get(event.request_id)
            if event.finish_reason is not None and output is not None and output.finish_reason is not None:
                del self._live[event.request_id]
                del self._routes[event.request_id]
        return events

    def _poll_decode(self) -> list[TokenEvent]:
        events: list[TokenEvent] = []
        for engine in self._up(self.decode):
            events += self._safely(engine, engine.poll) or []
        return events

    def _send(self) -> None:
        """Start moving the KV of prefilled requests, first come first served, each to the next
        decode instance (round robin) with room; the first that finds none waits, and so do
        those behind it."""
        while self._handoffs:
            i, seq = self._handoffs[0]
            tokens = seq.num_tokens - 1  # the prompt: the first token's KV is the decode's first step
            for k in range(len(self.decode)):
                j = (self._next_decode + k) % len(self.decode)
                consumer = self.decode[j]
                if self._is_up(consumer) and self._safely(consumer, consumer.scheduler.can_receive, tokens):
                    break
            else:
                return
            self._handoffs.popleft()
            self._next_decode = j + 1
            producer, request_id = self.prefill[i], seq.request_id
            output = self._safely(producer, producer.hand_off, request_id)
            if output is None:  # its prefill instance failed, and with it the request
                continue
            output.instances += (f"decode {j}",)
            # from here on the request is the decode instance's, and its KV owed by the prefill one
            self._routes[request_id].decode = consumer
            self._unacked[request_id] = i
            received = self._safely(consumer, consumer.take_over, seq, output)
            if received is None:
                continue
            src = seq.block_ids[:len(received.block_ids)]
            transfer = KVTransfer(request_id, i, j, tuple(src), tuple(received.block_ids), tokens, self.layouts[0][i])
            start = time.perf_counter()
            sent = (self._safely(producer, producer.send_kv, transfer) if isinstance(producer, RemoteInstance)
                    else send_kv(producer, self.transport, transfer))
            self.kv_seconds += time.perf_counter() - start
            self.kv_transfers += sent is not None
            self.kv_bytes += sent or 0

    def _receive(self) -> None:
        """Each decode instance writes the KV that arrived into the blocks it reserved, and
        acknowledges (kv_transport.receive_kv)."""
        for j, engine in enumerate(self.decode):
            if not self._is_up(engine):
                continue
            start = time.perf_counter()
            arrived = (self._safely(engine, engine.receive_kv, j) if isinstance(engine, RemoteInstance)
                       else receive_kv(engine, self.transport, j))
            self.kv_seconds += time.perf_counter() - start
            for transfer in arrived or []:
                if transfer.request_id in self._routes:
                    self._routes[transfer.request_id].kv_arrived = True

    def _settle(self) -> None:
        """The prefill instances free the blocks of acknowledged transfers (kv_transport.settle_kv)."""
        for i, engine in enumerate(self.prefill):
            if not self._is_up(engine):
                continue
            settled = (self._safely(engine, engine.settle_kv, i) if isinstance(engine, RemoteInstance)
                       else settle_kv(engine, self.transport, i))
            for transfer in settled or []:
                self._unacked.pop(transfer.request_id, None)

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        _close(self.prefill + self.decode)
        self.transport.close()


def _close(instances: list[Instance]) -> None:
    """Close every instance; those in processes of their own together (`close_all`)."""
    close_all([e for e in instances if isinstance(e, RemoteInstance)])
    for engine in instances:
        engine.close()


def _start_processes(p: Plan, dp: DeploymentPlan, weights: str | Path | None, options: dict,
                     timeout_s: float) -> dict[str, list[Instance]]:
    """Every instance of `dp` in a process of its own: ranks 0.. the prefill instances, then the
    decode ones, all started before any is waited for (they meet in one process group)."""
    order = [(gi, g) for role in ("prefill", "decode") for gi, g in enumerate(dp.groups) if g.role == role
             for _ in g.instances]
    roles = [g.role for _, g in order]
    producers = {i: rank for i, rank in enumerate(r for r, role in enumerate(roles) if role == "prefill")}
    consumers = {i: rank for i, rank in enumerate(r for r, role in enumerate(roles) if role == "decode")}
    port = free_port()
    started: dict[str, list[Instance]] = {"prefill": [], "decode": []}
    try:
        for rank, (gi, g) in enumerate(order):
            spec = WorkerSpec(plan=p, deployment=dp.name, group=gi, weights=Path(weights) if weights else None,
                              options=options, rank=rank, world=len(order), port=port, producers=producers,
                              consumers=consumers, device=str(_device_for(g)), timeout_s=timeout_s)
            started[g.role].append(RemoteInstance(spec))
        for instance in started["prefill"] + started["decode"]:
            assert isinstance(instance, RemoteInstance)
            instance.connect()
        return started
    except BaseException:
        close_all([i for i in started["prefill"] + started["decode"] if isinstance(i, RemoteInstance)])
        raise
