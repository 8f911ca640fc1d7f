"""The baselines a plan is compared with, measured end to end the way the plan is.

- vLLM-style: colocated replicas of the smallest instance that fits, at the engine's default
  scheduler settings (`model/search.baseline_scheduler`), as `vllm serve` is usually run;
- DistServe-style (with `allow disaggregation`): the prefill and the decode instance that each
  serve the most requests per GPU, in the mix that balances their capacities.

Each is sized like the plan: on the plan's GPU count for `max goodput_per_gpu`, with the fewest
instances that sustain the load for `min gpus` and `min cost`. Its goodput comes from
`model/goodput.py` over the same requests as the plan's, so `flowc compile` can promise that
the plan it emits is never worse, on its own simulator, than a baseline it reports: when one is
better, the compiler places that baseline instead (`optimize/compile.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from flowc.compiler.model.goodput import goodput_search, steady_throughput, sustains
from flowc.compiler.model.instance import ROUTER
from flowc.compiler.model.search import baseline_scheduler
from flowc.compiler.model.simulator import simulate
from flowc.compiler.model.workload import Requests, base_rate, sample_requests
from flowc.compiler.optimize.candidates import CAPACITY_REQUESTS, Measured
from flowc.compiler.spec import Deployment, Spec, Workload

CHECK_REQUESTS = 1000  # at least this many requests when checking a fleet end to end
MAX_SIZING_STEPS = 8  # instances added one at a time while a baseline misses the load


@dataclass(frozen=True)
class Fleet:
    """A baseline: how many instances of which measured candidates, and what they achieve."""

    name: str
    members: tuple[tuple[Measured, int], ...]  # (candidate, instances)
    goodput_rps: float
    sustains_load: bool

    @property
    def gpus(self) -> int:
        return sum(m.candidate.gpus * n for m, n in self.members)

    @property
    def instances(self) -> int:
        return sum(n for _, n in self.members)

    @property
    def summary(self) -> str:
        return " + ".join(f"{n} x {m.candidate.gpu} tp {m.candidate.tp} x pp {m.candidate.pp} {m.candidate.role}"
                          for m, n in self.members)

    def cost(self, price: dict[str, Optional[float]]) -> Optional[float]:
        prices = [price.get(m.candidate.gpu) for m, _ in self.members]
        if any(p is None for p in prices):
            return None
        return sum(m.candidate.gpus * n * p for (m, n), p in zip(self.members, prices))


def baseline_fleets(spec: Spec, d: Deployment, measured: list[Measured], plan_gpus: int, seed: int) -> list[Fleet]:
    """The deployment's baselines among its measured candidates, sized and measured."""
    out = []
    vllm = _vllm_style(d, measured)
    if vllm is not None:
        out.append(_sized(spec, d, "vLLM-style", [vllm], plan_gpus, seed))
    pair = _distserve_style(measured)
    if pair is not None:
        out.append(_sized(spec, d, "DistServe-style", list(pair), plan_gpus, seed))
    return out


def _vllm_style(d: Deployment, measured: list[Measured]) -> Optional[Measured]:
    colocated = [m for m in measured if m.candidate.role == "colocated" and m.offload is None]
    if not colocated:
        return None
    default = baseline_scheduler(d)
    return min(colocated, key=lambda m: (m.candidate.gpus, m.scheduler != default, m.ep, -m.candidate.capacity_rps))


def _distserve_style(measured: list[Measured]) -> Optional[tuple[Measured, Measured]]:
    def best(role: str) -> Optional[Measured]:
        return max((m for m in measured if m.candidate.role == role),
                   key=lambda m: m.candidate.capacity_rps / m.candidate.gpus, default=None)

    prefill, decode = best("prefill"), best("decode")
    return (prefill, decode) if prefill is not None and decode is not None else None


def _counts_for(members: list[Measured], rate: float) -> list[int]:
    """Instances of each member whose capacities carry `rate` (at least one each)."""
    return [max(1, math.ceil(rate / m.candidate.capacity_rps - 1e-9)) for m in members]


def _counts_within(members: list[Measured], gpus: int) -> list[int]:
    """The most balanced goodput in `gpus` GPUs: one instance of each, then one more of the
    member whose capacity is shortest, while it fits (at least one of each)."""
    counts = [1] * len(members)
    while True:
        short = min(range(len(members)), key=lambda i: counts[i] * members[i].candidate.capacity_rps)
        used = sum(c * m.candidate.gpus for c, m in zip(counts, members))
        if used + members[short].candidate.gpus > gpus:
            return counts
        counts[short] += 1


def _sized(spec: Spec, d: Deployment, name: str, members: list[Measured], plan_gpus: int, seed: int) -> Fleet:
    workload, slo = spec.workloads[d.workload], spec.slos[d.slo]
    load = base_rate(workload)
    if d.objective == "max_goodput_per_gpu":
        return _measure(name, members, _counts_within(members, plan_gpus), workload, slo, load, seed)
    counts = _counts_for(members, load)
    fleet = _measure(name, members, counts, workload, slo, load, seed)
    for _ in range(MAX_SIZING_STEPS):  # capacities measured apart can overstate a fleet: grow it
        if fleet.sustains_load:
            break
        short = min(range(len(members)), key=lambda i: counts[i] * members[i].candidate.capacity_rps)
        counts[short] += 1
        fleet = _measure(name, members, counts, workload, slo, load, seed)
    return fleet


def _measure(name: str, members: list[Measured], counts: list[int], workload, slo, load: float, seed: int) -> Fleet:
    configs = [m.config for m, n in zip(members, counts) for _ in range(n)]
    n = fleet_requests(workload, len(configs))
    requests: Requests = sample_requests(workload, n, seed=seed)
    at_load = simulate(requests, configs, router=ROUTER)
    capacity = steady_throughput(simulate(requests.all_at_once(), configs, router=ROUTER))
    met = sustains(at_load, slo, load, capacity)
    # the capacity just measured bounds the search (it would otherwise probe it again)
    goodput = goodput_search(configs, workload, slo, seed=seed, n=n, lo=load if met else 0.0, hi=capacity).goodput
    return Fleet(name, tuple(zip(members, counts)), goodput, met and goodput >= load)


def fleet_requests(workload: Workload, instances: int) -> Optional[int]:
    """Requests simulated to measure a fleet of this many instances: the plan's predictions and
    its baselines are measured on the same count (`optimize/compile.py`). A workload that says
    how many (`requests`, `duration`, or a batch) is taken at its word: None."""
    if workload.requests is not None or workload.duration is not None or workload.is_batch:
        return None
    return max(CHECK_REQUESTS, CAPACITY_REQUESTS * instances)
