"""`flowc.estimate`: predict one fixed configuration (no search) with the cost model, the
memory model and the simulator.

With `batch` the prediction is a closed-loop run at that concurrency; with `rate` an open-loop
Poisson run; with neither, offline maximum throughput (every request queued at t = 0).
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, Field

from flowc.compiler.diagnostics import Diagnostic, FlowError
from flowc.compiler.model.instance import Role, instance_config
from flowc.compiler.model.memory import memory_budget
from flowc.compiler.model.parallelism import problems
from flowc.compiler.model.simulator import simulate
from flowc.compiler.model.workload import fixed_requests
from flowc.compiler.plan import Scheduler
from flowc.compiler.spec import GPU, Link, Model
from flowc.compiler.units import format_gib

# Requests simulated per estimate: enough for stable percentiles, few enough to stay fast.
OPEN_LOOP_REQUESTS = 400
CLOSED_LOOP_ROUNDS = 4
OFFLINE_REQUESTS_MAX = 2048


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


def _fail(code: str, message: str, help: str | None = None, notes: tuple[str, ...] = ()) -> FlowError:
    return FlowError([Diagnostic(code, message, help=help, notes=notes)])


def estimate(m: Model, g: GPU, link: Link, *, tp: int = 1, pp: int = 1, ep: int = 1, replicas: int = 1,
             input_len: int, output_len: int, batch: Optional[int] = None, rate: Optional[float] = None,
             disaggregated: Optional[tuple[int, int]] = None, scheduler: Scheduler = Scheduler(),
             seed: int = 0) -> Estimate:
    """Predict one configuration of model `m` (its weight and KV dtypes as given) on `g`, an
    instance's GPUs joined by `link`. Raises FlowError (never a traceback) for a parallelism the
    model cannot take or a configuration that does not fit in memory.

    `disaggregated=(p, d)` runs p prefill and d decode instances instead of `replicas`
    colocated ones. `flowc.estimate` resolves standard library names and calls this."""
    for name, value in (("tp", tp), ("pp", pp), ("ep", ep)):
        if not isinstance(value, int) or value < 1:
            raise _fail("F0307", f"{name} must be a whole number of at least 1, not {value!r}")
    found = problems(m, tp, pp, ep)
    if found:
        raise FlowError([Diagnostic(p.code, p.message, help=p.help) for p in found])
    if batch is not None and rate is not None:
        raise ValueError("give `batch` (closed loop) or `rate` (open loop), not both")
    if input_len < 1 or output_len < 1:
        raise _fail("F0307", "input_len and output_len must be at least 1 token")
    block_size = scheduler.block_size
    budget = memory_budget(m, g.memory, tp=tp, pp=pp, scheduler=scheduler, vendor=g.vendor)
    if not budget.fits:
        raise _fail("F0503", f"{m.name} at {m.weights} does not fit on {tp * pp} x {g.name} (tp {tp}, pp {pp})",
                    "use a larger tp or pp, or quantize the weights",
                    (f"per GPU: weights {format_gib(budget.weights, 1)} + activations "
                     f"{format_gib(budget.activations, 1)} + reserve {format_gib(budget.reserve, 1)} > "
                     f"{format_gib(budget.usable, 1)} usable",))
    blocks_per_request = -(-(input_len + output_len) // block_size)
    concurrent = min(scheduler.max_seqs, budget.kv_blocks // blocks_per_request)
    if concurrent < 1:
        raise _fail("F0504", f"one request of {input_len + output_len} tokens needs {blocks_per_request} KV blocks; "
                    f"the instance holds {budget.kv_blocks}", "use a larger tp or pp, or `kv_dtype='fp8'`")
    if batch is not None and batch > concurrent:
        raise _fail("F0504", f"a batch of {batch} sequences of {input_len + output_len} tokens does not fit in the "
                    f"KV cache: at most {concurrent} fit at once",
                    f"use batch <= {concurrent}, a larger tp or pp, or `kv_dtype='fp8'`",
                    (f"KV cache: {budget.kv_tokens:,} tokens per instance "
                     f"({format_gib(budget.kv, 1)} per GPU / {budget.kv_bytes_per_token:,} B per token)",))

    def config(role: Role):
        return instance_config(m, g, link, kv_capacity_tokens=budget.kv_tokens, tp=tp, pp=pp, ep=ep,
                               scheduler=scheduler, role=role)

    if disaggregated:
        prefill, decode = disaggregated
        instances = [config("prefill")] * prefill + [config("decode")] * decode
    else:
        instances = [config("colocated")] * replicas

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
        model=m.name, gpu=g.name, tp=tp, pp=pp, ep=ep, replicas=len(instances), disaggregated=disaggregated,
        gpus=gpus, mode=mode, input_len=input_len, output_len=output_len,
        ttft_ms=stats("ttft"), tpot_ms=stats("tpot"), e2e_ms=stats("e2e"),
        output_tokens_per_s=result.output_throughput, output_tokens_per_s_per_gpu=result.output_throughput / gpus,
        requests_per_s=result.request_throughput, kv_capacity_tokens=budget.kv_tokens,
        max_concurrent_seqs=concurrent, memory_per_gpu=budget.by_category(),
        requests_simulated=int(result.finished.sum()), preemptions=result.preemptions,
        calibrated=instances[0].cost.calibrated, calibration_source=instances[0].cost.calibration_source,
    )
