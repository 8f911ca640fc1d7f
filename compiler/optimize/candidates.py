"""Step 1 of a compile: every instance type a deployment allows, each measured.

A candidate is an instance shape (GPU type, TP, the smallest PP that fits), an EP degree, a
scheduler setting and a role (colocated; prefill and decode with `allow disaggregation`),
all drawn from the deployment's search space (`model/search.py`). Its capacity is the goodput
of one such instance under the SLO, measured with the simulator on a pool of replicas. With
`allow offload`, pp = 1 shapes whose HBM cannot hold the weights and the longest request are
candidates too: `optimize/offload.py` places part of the weights in host memory and the
instance's every step carries the streaming overhead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

from flowc.compiler.model.cost import CostModel, Parallelism
from flowc.compiler.model.geometry import kv_bytes_per_token
from flowc.compiler.model.goodput import goodput_search, steady_throughput
from flowc.compiler.model.instance import ROUTER, cost_model, instance_config
from flowc.compiler.model.memory import MemoryBudget, memory_budget
from flowc.compiler.model.search import ep_choices, scheduler_choices
from flowc.compiler.model.shapes import Shape, instance_shapes
from flowc.compiler.model.simulator import InstanceConfig, simulate
from flowc.compiler.model.topology import gpu_link
from flowc.compiler.model.workload import Requests, sample_requests
from flowc.compiler.optimize.offload import OffloadInfeasible, OffloadPlan, plan_offload
from flowc.compiler.optimize.placement import Candidate
from flowc.compiler.plan import Alternative, Scheduler
from flowc.compiler.spec import SLO, Deployment, Spec
from flowc.compiler.units import format_gib

CAPACITY_REQUESTS = 400  # requests per instance and simulation when measuring a candidate's capacity
POOL_GPUS = 8  # capacity is measured on a pool of about this many GPUs: replicas share load like a real fleet
DISAGG_PARTNERS = 4  # prefill instances per decode instance when measuring a decode pool
LOW_LOAD_SCALE = 0.01  # arrivals 100x sparser than the workload's: latency without queueing
OFFLOAD_KV_REQUESTS = 8  # an offloaded instance keeps KV for this many longest requests in HBM ...
OFFLOAD_KV_SHARE = 0.5  # ... but at most this share of the HBM left for weights and KV (never below one)
OFFLOAD_SLACK = 1 << 20  # bytes the offload LP's HBM budget is kept under (its tolerance): free in the memory map

# on_progress(what, done, total): called before each step of a compile (total None: not known yet).
# The CLI passes flowc.progress's bar; the compiler never imports rich or flowc for it.
Progress = Callable[[str, int, Optional[int]], None]


def quiet(what: str, done: int, total: Optional[int]) -> None:
    pass


@dataclass(frozen=True)
class Measured:
    """A candidate with everything needed to plan it: its shape and memory budget at its
    scheduler setting, EP degree, the instance the simulator runs, and its offload plan."""

    candidate: Candidate
    shape: Shape
    scheduler: Scheduler
    ep: int
    config: InstanceConfig
    offload: Optional[OffloadPlan] = None  # the weights' placement, when part of them is in host memory
    offload_step_s: float = 0.0

    @property
    def budget(self) -> MemoryBudget:
        return self.shape.budget

    @property
    def summary(self) -> str:
        c, s = self.candidate, self.scheduler
        chunks = f" in chunks of {s.chunk_size}" if s.chunk_size < s.max_batched_tokens else ""
        ep = f" ep {self.ep}" if self.ep > 1 else ""
        offloaded = f", {format_gib(self.offload.offloaded_bytes, 1)} offloaded" if self.offload is not None else ""
        return (f"{c.gpu} tp {c.tp} x pp {c.pp}{ep}, {s.max_batched_tokens} batched tokens{chunks}, "
                f"{s.max_seqs} sequences, blocks of {s.block_size}, {c.role}{offloaded}")


def _shapes(spec: Spec, d: Deployment, longest: int) -> list[Shape]:
    """Fitting shapes that hold the longest request; per (GPU, TP) only the smallest PP that
    fits, since more stages add latency and only help memory."""
    best: dict[tuple[str, int], Shape] = {}
    for shape in instance_shapes(spec, d):
        if not shape.budget.fits or shape.budget.kv_tokens < longest:
            continue
        key = (shape.gpu, shape.tp)
        if key not in best or shape.pp < best[key].pp:
            best[key] = shape
    return sorted(best.values(), key=lambda s: (s.gpu, s.tp))


def _offload_shapes(spec: Spec, d: Deployment, longest: int) -> list[Shape]:
    """pp = 1 shapes whose HBM does not hold the weights and the longest request: with
    `allow offload` they are candidates with part of the weights in host memory."""
    if not d.allow_offload:
        return []
    return sorted((shape for shape in instance_shapes(spec, d)
                   if shape.pp == 1 and (not shape.budget.fits or shape.budget.kv_tokens < longest)),
                  key=lambda s: (s.gpu, s.tp))


def _slo_part(slo: SLO, metrics: set[str]) -> SLO:
    """The SLO limited to some metrics: prefill instances answer for TTFT, decode for TPOT."""
    return slo.model_copy(update={"targets": [t for t in slo.targets if t.metric in metrics]})


def _capacity(instance: InstanceConfig, partner: InstanceConfig | None, workload, slo: SLO, seed: int,
              pool: int) -> float:
    """Requests/s one instance sustains under the SLO (of a batch: completes when saturated),
    measured on `pool` replicas behind a router (one instance alone has a worse tail than the
    same instance in a fleet, so per-GPU figures of shapes of different sizes compare only at
    equal GPU counts). A prefill (decode) pool is measured beside enough decode (prefill)
    instances not to be the bottleneck, against the TTFT (TPOT and end-to-end) part of the SLO."""
    if instance.role == "colocated":
        instances, part = [instance] * pool, slo
    elif instance.role == "prefill":  # a decode instance serves many prefill instances' output: a few suffice
        instances, part = [instance] * pool + [partner] * max(1, pool // 2), _slo_part(slo, {"ttft"})
    else:
        instances, part = [partner] * DISAGG_PARTNERS * pool + [instance] * pool, _slo_part(slo, {"tpot", "e2e"})
    if not part.targets:
        part = slo
    if workload.is_batch:  # no rate to meet an SLO at: the throughput of a saturated pool
        requests = sample_requests(workload, CAPACITY_REQUESTS * pool, seed=seed)
        return steady_throughput(simulate(requests, instances, router=ROUTER)) / pool
    search = goodput_search(instances, workload, part, seed=seed, n=CAPACITY_REQUESTS * pool)
    return search.goodput / pool


def _best_reachable(instance: InstanceConfig, requests: Requests, slo: SLO) -> tuple[str, float]:
    """What one instance reaches with requests arriving far apart, the floor of each limit, and
    how far the worst floor is from its limit (floor / limit: the closest shape has the lowest)."""
    result = simulate(requests.scaled(LOW_LOAD_SCALE), [instance])
    parts, worst = [], 0.0
    for t in slo.targets:
        p = t.percentile if t.percentile is not None else 50.0
        floor = result.percentile(t.metric, p)
        worst = max(worst, floor / t.limit if t.limit > 0 else math.inf)
        parts.append(f"{t.metric} p{p:g} {floor * 1e3:,.0f} ms at best, limit {t.limit * 1e3:,.0f} ms")
    return "; ".join(parts), worst


def _offload_kv_tokens(budget: MemoryBudget, longest: int) -> int:
    """K, the KV tokens an offloaded instance keeps in HBM (whole blocks): OFFLOAD_KV_REQUESTS
    longest requests, capped at OFFLOAD_KV_SHARE of the HBM left for weights and KV (every byte
    of KV is a byte of weights streamed each step), never below one longest request."""
    room = budget.usable - budget.activations - budget.reserve
    cap = int(room * OFFLOAD_KV_SHARE) // max(budget.kv_bytes_per_token, 1)
    k = max(longest, min(OFFLOAD_KV_REQUESTS * longest, cap))
    return -(-k // budget.block_size) * budget.block_size


def _plan_offload(spec: Spec, d: Deployment, shape: Shape, ep: int, budget: MemoryBudget, scheduler: Scheduler,
                  longest: int) -> tuple[OffloadPlan, int, float]:
    """(offload plan, KV tokens, seconds added per iteration) of one pp = 1 shape; raises
    OffloadInfeasible. The node group's host memory is split evenly over its GPUs."""
    group = next(g for g in spec.clusters[d.cluster].nodes if g.gpu == shape.gpu)
    host = (group.host_memory or 0) // group.gpus_per_node * shape.tp
    k = _offload_kv_tokens(budget, longest)
    cost = _cost(spec, d, shape, ep)
    plan = plan_offload(d.model, spec.gpus[shape.gpu], group.host_link, host, tp=shape.tp, pp=1,
                        scheduler=scheduler, kv_tokens_needed=k, cost=cost,
                        activation_bytes=budget.activations + OFFLOAD_SLACK)
    seqs = max(1, min(scheduler.max_seqs, k))  # the decode step the LP planned (offload.plan_offload)
    base = cost.step_time(seqs, 0, seqs, max(k, seqs))
    return plan, k, max(0.0, plan.step_time_decode - base)


def _cost(spec: Spec, d: Deployment, shape: Shape, ep: int) -> CostModel:
    """The cost model of a candidate's pipeline stage (as `measure` builds its instances)."""
    cluster = spec.clusters[d.cluster]
    return cost_model(d.model, spec.gpus[shape.gpu], gpu_link(cluster, shape.gpu),
                      Parallelism(tp=shape.tp, pp=shape.pp, ep=ep), cluster.network, d.engine)


def measure(spec: Spec, d: Deployment, requests: Requests, seed: int, on_progress: Progress = quiet
            ) -> tuple[list[Measured], list[Alternative], list[str]]:
    """The deployment's measured candidates, the alternatives rejected on the way (they miss the
    SLO at any load; the closest to meeting it first), and why shapes that needed offloading
    could not be offloaded."""
    slo, workload = spec.slos[d.slo], spec.workloads[d.workload]
    cluster = spec.clusters[d.cluster]
    longest = int((requests.prompt + requests.output).max())
    roles = ["colocated"] + (["prefill", "decode"] if d.allow_disaggregation else [])
    kv_per_request = kv_bytes_per_token(d.model) * float(requests.prompt.mean())
    measured, rejected, infeasible = [], [], []
    shapes = [(shape, False) for shape in _shapes(spec, d, longest)] + \
        [(shape, True) for shape in _offload_shapes(spec, d, longest)]
    for done, (shape, offloaded) in enumerate(shapes):
        on_progress(f"measuring `{d.name}` on {shape.gpu} tp {shape.tp} x pp {shape.pp}", done, len(shapes))
        gpu = spec.gpus[shape.gpu]
        for ep in ep_choices(d, shape.tp):
            for scheduler in scheduler_choices(d):
                budget = memory_budget(d.model, gpu.memory, tp=shape.tp, pp=shape.pp, ep=ep, scheduler=scheduler,
                                       vendor=gpu.vendor)
                offload, kv_tokens, overhead = None, budget.kv_tokens, 0.0
                if offloaded:
                    try:
                        offload, kv_tokens, overhead = _plan_offload(spec, d, shape, ep, budget, scheduler, longest)
                    except OffloadInfeasible as error:
                        infeasible.append(f"{shape.gpu} tp {shape.tp}, {scheduler.max_batched_tokens} batched "
                                          f"tokens: {error}")
                        continue
                elif budget.kv_tokens < longest:
                    continue
                configs = {role: instance_config(d.model, gpu, gpu_link(cluster, shape.gpu),
                                                 kv_capacity_tokens=kv_tokens, tp=shape.tp, pp=shape.pp, ep=ep,
                                                 scheduler=scheduler, role=role, inter_link=cluster.network,
                                                 offload_step_s=overhead, engine=d.engine)
                           for role in roles}
                sized = Shape(shape.gpu, shape.tp, shape.pp, budget)
                for role in roles:
                    partner = configs.get({"prefill": "decode", "decode": "prefill"}.get(role, ""))
                    capacity = _capacity(configs[role], partner, workload, slo, seed, max(1, POOL_GPUS // shape.gpus))
                    key = (f"{d.name}/{shape.gpu}/tp{shape.tp}/pp{shape.pp}/ep{ep}/mbt{scheduler.max_batched_tokens}/"
                           f"seqs{scheduler.max_seqs}/block{scheduler.block_size}/chunk{scheduler.chunk_size}/{role}"
                           + ("/offload" if offload is not None else ""))
                    candidate = Candidate(deployment=d.name, key=key, gpu=shape.gpu, tp=shape.tp, pp=shape.pp,
                                          role=role, capacity_rps=float(capacity), kv_bytes_per_request=kv_per_request)
                    m = Measured(candidate, sized, scheduler, ep, configs[role], offload, overhead)
                    if capacity <= 0:
                        reach, distance = _best_reachable(configs["colocated"], requests, slo)
                        rejected.append((distance, Alternative(
                            summary=m.summary, reason=f"misses the SLO even at the lowest load ({reach})")))
                        continue
                    measured.append(m)
    rejected.sort(key=lambda pair: pair[0])  # stable: equally close shapes stay in search order
    return measured, [alternative for _, alternative in rejected], infeasible
