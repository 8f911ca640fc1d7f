"""What the HTML report shows, computed once: the deployments simulated at a sweep of arrival
rates (`model/instance.simulate_plan_deployment`, the verifier's simulation), and the plan's
traffic by pair of nodes (`model/traffic.py`, as the verifier's F0525 charges it)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

from flowc.compiler.model.goodput import CONFIRM_SCALE, steady_throughput, sustains
from flowc.compiler.model.instance import simulate_plan_deployment
from flowc.compiler.model.results import SimResult
from flowc.compiler.model.traffic import spec_traffic
from flowc.compiler.model.workload import base_rate, sample_requests
from flowc.compiler.plan import Plan
from flowc.compiler.spec import SLO, Spec
from flowc.compiler.units import format_rps
from flowc.compiler.verify import PREDICTION_SEED

RATE_SCALES = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)  # of the workload's rate


GOODPUT_SCALES = (0.8, 1.0, CONFIRM_SCALE)  # of the plan's goodput: where the SLO breaks (the search tried the last)


Progress = Callable[[str, int, int], None]  # (what, done, total)


@dataclass(frozen=True)
class Runs:
    """The simulations of one deployment: at the workload's rate, over a sweep of rates, and with
    every request queued at once (its capacity, above which no rate is sustained)."""

    slo: SLO
    rate: float
    base: SimResult
    sweep: list[tuple[float, SimResult]]
    capacity: float
    goodput: float

    def sustained(self, rate: float, result: SimResult) -> bool:
        """The goodput's definition (`model/goodput.sustains`); the plan's goodput was shown to
        pass by its search even where the capacity probe reads lower."""
        return sustains(result, self.slo, rate, max(self.capacity, self.goodput))


def sweep_rates(rate: float, goodput: float) -> list[float]:
    """Rates around the workload's (the workload's own among them) and around the plan's
    goodput, leaving out those within 2% of another."""
    rates = [rate * s for s in RATE_SCALES]
    if 0 < goodput < math.inf:
        rates += [r for r in (goodput * s for s in GOODPUT_SCALES) if all(abs(r - k) > 0.02 * k for k in rates)]
    return sorted(rates)


def simulate_all(plan: Plan, spec: Spec, n: Optional[int], seed: int,
                  on_progress: Optional[Progress]) -> dict[str, Runs]:
    # a batch has no arrival rate to sweep: its one run is every request queued at the start
    sweeps = [[] if dp.predicted.makespan_s is not None else
              sweep_rates(base_rate(spec.workloads[spec.deployments[dp.name].workload]), dp.predicted.goodput_rps)
              for dp in plan.deployments]
    total, done = sum(map(len, sweeps)), 0
    runs = {}
    for dp, rates in zip(plan.deployments, sweeps):
        d = spec.deployments[dp.name]
        workload = spec.workloads[d.workload]
        sampled = sample_requests(workload, n if n is not None else dp.predicted.requests, seed=seed)
        rate = base_rate(workload)
        sweep = []
        for r in rates:
            if on_progress is not None:
                on_progress(f"simulating `{dp.name}` at {format_rps(r)}", done, total)
            sweep.append((r, simulate_plan_deployment(spec, dp, sampled.scaled(r / rate))))
            done += 1
        saturated = simulate_plan_deployment(spec, dp, sampled.all_at_once())
        base = next((result for r, result in sweep if r == rate), saturated)
        capacity = steady_throughput(saturated)
        runs[dp.name] = Runs(spec.slos[d.slo], rate, base, sweep, capacity, dp.predicted.goodput_rps)
    if on_progress is not None:
        on_progress("drawing the charts", done, total)
    return runs


@dataclass(frozen=True)
class Flow:
    """Bytes/s a deployment sends from node `src` to node `dst`, inside the node or (`network`)
    over the network: a transfer that crosses the network leaves and enters through the NICs
    even where some of its GPUs share a node."""

    cluster: str
    deployment: str
    kind: str
    src: int
    dst: int
    network: bool
    bps: float


def flows(plan: Plan, spec: Spec) -> list[Flow]:
    """The plan's traffic (`model/traffic.py`, as the verifier's F0525 check charges it) by pair
    of nodes: a transfer that stays on one node is drawn inside it; one that crosses the network
    from each sending node to each receiving node, in proportion to their GPUs."""
    totals: dict[tuple, float] = {}
    for dp in plan.deployments:
        for t in spec_traffic(spec, dp, seed=PREDICTION_SEED).transfers:
            if t.node is not None:
                pairs = {(t.node, t.node): t.bps}
            else:
                dst = t.node_shares("dst")
                pairs = {(a, b): sent * received / t.bps for a, sent in t.node_shares("src").items()
                         for b, received in dst.items()}
            for (a, b), bps in pairs.items():
                key = (dp.cluster, dp.name, t.kind, a, b, t.node is None)
                totals[key] = totals.get(key, 0.0) + bps
    return [Flow(*key, bps) for key, bps in totals.items() if bps > 0]
