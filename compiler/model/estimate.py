"""`flowc.estimate`: predict one fixed configuration (no search) with the cost model, the
memory model and the simulator.

With `batch` the prediction is a closed-loop run at that concurrency; with `rate` an open-loop
Poisson run; with neither, offline maximum throughput (every request queued at t = 0).
"""

from __future__ import annotations

import math
from typing import Literal, Optional

from pydantic import BaseModel, Field

from flowc.compiler.diagnostics import Diagnostic, FlowError, suggestion_help
from flowc.compiler.model.engines import ENGINES, engine_profile
from flowc.compiler.model.instance import Role, instance_config
from flowc.compiler.model.intervals import factors as interval_factors
from flowc.compiler.model.memory import memory_budget, unfit_diagnostic
from flowc.compiler.model.parallelism import domain_problem, problems
from flowc.compiler.model.simulator import simulate
from flowc.compiler.model.workload import fixed_requests
from flowc.compiler.plan import Scheduler
from flowc.compiler.spec import DTYPE_BYTES, GPU, Link, Model
from flowc.compiler.units import format_gib

# Requests simulated per estimate: enough for stable percentiles, few enough to stay fast.
OPEN_LOOP_REQUESTS = 400
CLOSED_LOOP_ROUNDS = 4
OFFLINE_REQUESTS_MAX = 2048
# The simulation's time and memory grow with the instances (a closed loop simulates `batch`
# sequences of each): more than this is refused rather than left running for minutes.
MAX_INSTANCES = 256
# GPUs per link domain when the caller gives none: one 8-GPU board (HGX, OAM), how every
# standard library GPU with a fast link ships.
DEFAULT_LINK_DOMAIN = 8


Mode = Literal["closed_loop", "open_loop", "offline"]


class LatencyStats(BaseModel):
    """Milliseconds."""

    mean: float
    p50: float
    p90: float
    p99: float


class Estimate(BaseModel):
    model: str
    gpu: str
    engine: str = Field(description="the engine predicted for (model/engines.py)")
    tp: int
    pp: int
    ep: int
    replicas: int
    disaggregated: Optional[tuple[int, int]] = Field(None, description="prefill and decode instances")
    gpus: int
    mode: Mode
    input_len: int
    output_len: int
    ttft_ms: LatencyStats
    tpot_ms: LatencyStats
    e2e_ms: LatencyStats
    output_tokens_per_s: float
    output_tokens_per_s_per_gpu: float
    requests_per_s: float
    kv_capacity_tokens: int = Field(description="per instance")
    max_concurrent_seqs: int = Field(description="per instance: sequences of input_len + output_len that fit at once")
    memory_per_gpu: dict[str, int] = Field(description="bytes per category on one GPU")
    requests_simulated: int
    preemptions: int
    calibrated: bool
    calibration_source: str
    interval: dict[str, tuple[float, float]] = Field(
        default_factory=dict, description="metric -> (low, high): the 80% prediction interval as factors of the "
        "figures (model/intervals.py)")


def _fail(code: str, message: str, help: str | None = None, notes: tuple[str, ...] = ()) -> FlowError:
    return FlowError([Diagnostic(code, message, help=help, notes=notes)])


def _is_whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _range_errors(counts: dict[str, object], rate: Optional[float],
                  disaggregated: Optional[tuple[int, int]]) -> list[Diagnostic]:
    """F0307 for every argument outside its range: counts (degrees, instances, lengths, batch,
    scheduler settings) are whole numbers of at least 1, a rate is a positive finite number,
    and disaggregation needs a prefill and a decode instance."""
    found = [Diagnostic("F0307", f"{name} must be a whole number of at least 1, not {value!r}")
             for name, value in counts.items() if value is not None and not _is_whole(value)]
    if rate is not None and not (isinstance(rate, (int, float)) and not isinstance(rate, bool)
                                 and math.isfinite(rate) and rate > 0):
        found.append(Diagnostic("F0307", f"rate must be a positive, finite number of requests/s, not {rate!r}",
                                help="for the most the instances can serve, leave out the rate (offline throughput)"))
    if disaggregated is not None and not (len(disaggregated) == 2 and all(map(_is_whole, disaggregated))):
        found.append(Diagnostic("F0307", "disaggregated takes whole numbers of at least 1 prefill and 1 decode "
                                f"instance, not {tuple(disaggregated)!r}",
                                help="prefill instances take the arrivals, decode instances finish them"))
    return found


def _conflicts(batch: Optional[int], rate: Optional[float], replicas: Optional[int],
               disaggregated: Optional[tuple[int, int]]) -> list[Diagnostic]:
    """F0405 for arguments that exclude each other."""
    found = []
    if batch is not None and rate is not None:
        found.append(Diagnostic("F0405", "give batch (a closed loop) or rate (open-loop arrivals), not both"))
    if replicas is not None and disaggregated is not None:
        found.append(Diagnostic("F0405", "give replicas (colocated instances) or disaggregated (prefill and decode "
                                "instances), not both"))
    return found


def _instance_count_errors(replicas: Optional[int], disaggregated: Optional[tuple[int, int]]) -> list[Diagnostic]:
    instances = sum(disaggregated) if disaggregated else (replicas or 1)
    if instances <= MAX_INSTANCES:
        return []
    return [Diagnostic("F0307", f"estimate simulates at most {MAX_INSTANCES} instances, not {instances}",
                       help="estimate fewer instances (colocated instances behind one router scale about "
                            "linearly), or simulate a spec's deployment with `flowc simulate`")]


def _fit_errors(m: Model, g: GPU, link: Link, *, tp: int, pp: int, ep: int, link_domain: int,
                tokens: int) -> list[Diagnostic]:
    """A parallelism the model cannot take (F0401-F0403), tp beyond a link domain (F0404),
    requests of `tokens` longer than the model's context (F0410)."""
    found = [Diagnostic(p.code, p.message, help=p.help) for p in problems(m, tp, pp, ep)]
    wide = domain_problem(tp, link_domain, f"one link domain of {g.name} over {link.name}")
    if wide is not None:
        default = " (the default: one 8-GPU board)" if link_domain == DEFAULT_LINK_DOMAIN else ""
        found.append(Diagnostic(wide.code, wide.message, help=wide.help, notes=(
            f"a link domain holds {link_domain} GPUs{default}; for a larger NVLink domain give "
            "link_domain (`--link-domain N`)",)))
    if tokens > m.max_context:
        found.append(Diagnostic("F0410", f"a request of {tokens} tokens (input_len + output_len) is longer than "
                                f"{m.name}'s context of {m.max_context} tokens",
                                help=f"keep input_len + output_len within {m.max_context} tokens"))
    return found


def estimate(m: Model, g: GPU, link: Link, *, tp: int = 1, pp: int = 1, ep: int = 1, replicas: Optional[int] = None,
             link_domain: int = DEFAULT_LINK_DOMAIN, input_len: int, output_len: int, batch: Optional[int] = None,
             rate: Optional[float] = None, disaggregated: Optional[tuple[int, int]] = None,
             scheduler: Scheduler = Scheduler(), seed: int = 0, engine: Optional[str] = None) -> Estimate:
    """Predict one configuration of model `m` (its weight and KV dtypes as given) on `g`, an
    instance's GPUs joined by `link`, `link_domain` of them in one domain. Raises FlowError
    (never a traceback) for an argument out of range, a parallelism the model cannot take or a
    configuration that does not fit in memory.

    `replicas` colocated instances (default 1), or `disaggregated=(p, d)`: p prefill and d
    decode instances, run by `engine` (its kernels and overheads; None: the default engine).
    `flowc.estimate` resolves standard library names and calls this."""
    counts = {"tp": tp, "pp": pp, "ep": ep, "replicas": replicas, "link_domain": link_domain,
              "input_len": input_len, "output_len": output_len, "batch": batch,
              **scheduler.model_dump(include={"max_batched_tokens", "chunk_size", "max_seqs", "block_size"})}
    found = _range_errors(counts, rate, disaggregated) + _conflicts(batch, rate, replicas, disaggregated)
    if engine is not None and engine not in ENGINES:
        found.append(Diagnostic("F0306", f"unknown engine `{engine}`",
                                help=suggestion_help(engine, ENGINES, "engines")))
    if not found:
        found = _instance_count_errors(replicas, disaggregated) or _fit_errors(
            m, g, link, tp=tp, pp=pp, ep=ep, link_domain=link_domain, tokens=input_len + output_len)
    if found:
        raise FlowError(found)
    block_size = scheduler.block_size
    budget = memory_budget(m, g.memory, tp=tp, pp=pp, ep=ep, scheduler=scheduler, vendor=g.vendor)
    if not budget.fits:
        raise FlowError([unfit_diagnostic(budget, m, g.name, tp, pp, "use a larger tp or pp, or quantize the weights")])
    blocks_per_request = -(-(input_len + output_len) // block_size)
    in_kv = budget.kv_blocks // blocks_per_request
    concurrent = min(scheduler.max_seqs, in_kv)
    smaller_kv = "a larger tp or pp" + (", or `kv_dtype='fp8'`" if DTYPE_BYTES[m.kv] > 1 else "")
    if concurrent < 1:
        raise _fail("F0504", f"one request of {input_len + output_len} tokens needs {blocks_per_request} KV blocks; "
                    f"the instance holds {budget.kv_blocks}", f"use {smaller_kv}")
    if batch is not None and batch > in_kv:
        raise _fail("F0504", f"a batch of {batch} sequences of {input_len + output_len} tokens does not fit in the "
                    f"KV cache: at most {in_kv} fit at once", f"use batch <= {in_kv}, {smaller_kv}",
                    (f"KV cache: {budget.kv_tokens:,} tokens per instance "
                     f"({format_gib(budget.kv, 1)} per GPU / {budget.kv_bytes_per_token:,} B per token)",))
    if batch is not None and batch > concurrent:
        raise _fail("F0307", f"batch {batch} is more than max_seqs {scheduler.max_seqs}, the sequences the "
                    "scheduler runs at once", f"use batch <= {concurrent}, or max_seqs >= {batch}",
                    (f"the KV cache holds {in_kv} such sequences",))

    def config(role: Role):
        return instance_config(m, g, link, kv_capacity_tokens=budget.kv_tokens, tp=tp, pp=pp, ep=ep,
                               scheduler=scheduler, role=role, engine=engine)

    if disaggregated:
        prefill, decode = disaggregated
        instances = [config("prefill")] * prefill + [config("decode")] * decode
    else:
        instances = [config("colocated")] * (replicas or 1)

    mode: Mode
    if batch is not None:
        mode, n = "closed_loop", max(batch * CLOSED_LOOP_ROUNDS * len(instances), 32)
        requests = fixed_requests(n, input_len, output_len)
        result = simulate(requests, instances, router="least_work", closed_loop_concurrency=batch * len(instances))
    elif rate is not None:
        mode = "open_loop"
        requests = fixed_requests(OPEN_LOOP_REQUESTS, input_len, output_len, rate=rate, seed=seed)
        result = simulate(requests, instances, router="least_work")
    else:
        mode, n = "offline", min(OFFLINE_REQUESTS_MAX, max(2 * concurrent * len(instances), 32))
        result = simulate(fixed_requests(n, input_len, output_len), instances, router="least_work")

    gpus = tp * pp * len(instances)

    def stats(metric: str) -> LatencyStats:
        return LatencyStats(mean=result.mean(metric) * 1e3,
                            **{f"p{p}": result.percentile(metric, p) * 1e3 for p in (50, 90, 99)})

    return Estimate(
        model=m.name, gpu=g.name, engine=engine_profile(engine).name, tp=tp, pp=pp, ep=ep, replicas=len(instances),
        disaggregated=disaggregated,
        gpus=gpus, mode=mode, input_len=input_len, output_len=output_len,
        ttft_ms=stats("ttft"), tpot_ms=stats("tpot"), e2e_ms=stats("e2e"),
        output_tokens_per_s=result.output_throughput, output_tokens_per_s_per_gpu=result.output_throughput / gpus,
        requests_per_s=result.request_throughput, kv_capacity_tokens=budget.kv_tokens,
        max_concurrent_seqs=concurrent, memory_per_gpu=budget.by_category(),
        requests_simulated=int(result.finished.sum()), preemptions=result.preemptions,
        calibrated=instances[0].cost.calibrated, calibration_source=instances[0].cost.calibration_source,
        interval=interval_factors(),
    )
