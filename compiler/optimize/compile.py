"""`flowc compile`: from a checked spec to the best plan the optimizer can prove.

Percentiles under queueing are not linear, so the search has three steps:
1. candidates: per deployment, every instance shape it allows (GPU type, TP, the smallest PP
   that fits, scheduler settings) in each role it allows (colocated; prefill and decode with
   disaggregation), and each candidate's capacity under the SLO: the goodput of one instance,
   measured with the simulator (`_capacity`). With `allow offload`, pp = 1 shapes whose HBM
   cannot hold the weights and the longest request are candidates too: compiler/optimize/offload.py
   places part of the weights in host memory (`_offload_candidates`), and the instance's step
   time carries the streaming overhead (`cost.StreamedCost`);
2. placement: CP-SAT chooses how many instances of each candidate run and on which GPUs
   (compiler/optimize/placement.py), for each deployment's objective;
3. check: the chosen configuration is simulated end to end at the workload's rate and its
   goodput measured again; the plan records those predictions, the alternatives and why
   each lost, and the constraints that bind.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable, Optional

from flowc import __version__

from flowc.compiler.optimize.arena import pack, step_buffers
from flowc.compiler.model.shapes import Shape, instance_shapes
from flowc.compiler.model.cost import CostModel, Parallelism, StreamedCost
from flowc.compiler.diagnostics import Diagnostic, FlowError
from flowc.compiler.model.memory import kv_bytes_per_token, memory_budget
from flowc.compiler.optimize.offload import OffloadInfeasible, OffloadPlan, plan_offload
from flowc.compiler.optimize.placement import Candidate, Demand, PlacementInfeasible, PlacementTimeout, solve_placement
from flowc.compiler.plan import (
    Alternative, DeploymentPlan, Instance, InstanceGroup, MemoryMap, Percentiles, Plan, Predicted, Scheduler,
    SolverStatus,
)
from flowc.compiler.model.simulator import InstanceConfig, simulate
from flowc.compiler.model.goodput import goodput_search
from flowc.compiler.spec import SLO, Deployment, Link, Spec
from flowc.compiler.verify.verifier import verify_plan
from flowc.compiler.model.workload import Requests, base_rate, sample_requests

CAPACITY_REQUESTS = 400  # requests per instance and simulation when measuring a candidate's capacity
POOL_GPUS = 8  # capacity is measured on a pool of about this many GPUs: replicas share load like a real fleet
CHECK_REQUESTS = 1000  # requests when checking the chosen configuration end to end
# Token budgets tried when a spec leaves max_batched_tokens open: vLLM's default with chunked
# prefill (8192) and the smaller budget vLLM uses for latency-bound serving (2048), which bounds
# how long a prefill chunk stalls the decodes batched with it.
DEFAULT_BATCHED_TOKENS = (2048, 8192)
DEFAULT_MAX_SEQS = 256  # vLLM's default max_num_seqs
DEFAULT_BLOCK_SIZE = 16  # vLLM's default KV block size
DISAGG_PARTNERS = 4  # prefill instances per decode instance when measuring a decode pool
RATIO_TOLERANCE = 0.01
RECHECK_ROUNDS = 4  # place -> simulate end to end -> derate -> place again
DERATE_FLOOR = 0.2  # at most divide a capacity by five per round
LOW_LOAD_SCALE = 0.01  # arrivals 100x sparser than the workload's: latency without queueing
OFFLOAD_KV_REQUESTS = 8  # an offloaded instance keeps KV for this many longest requests in HBM ...
OFFLOAD_KV_SHARE = 0.5  # ... but at most this share of the HBM left for weights and KV (never below one)
OFFLOAD_SLACK = 1 << 20  # bytes the offload LP's HBM budget is kept under (solver tolerance), counted in reserve

# on_progress(what, done, total): called before each step of a compile (total None: not known yet).
# The CLI passes flowc.progress's bar; the compiler never imports rich or flowc for it.
Progress = Callable[[str, int, Optional[int]], None]


def _quiet(what: str, done: int, total: Optional[int]) -> None:
    pass


@dataclass(frozen=True)
class _Measured:
    candidate: Candidate
    shape: Shape
    scheduler: Scheduler
    cost: CostModel
    offload: Optional[OffloadPlan] = None  # the weights' placement, when part of them is in host memory
    offload_step_s: float = 0.0
    kv_tokens: Optional[int] = None  # KV tokens the instance holds (None: the budget's)

    def step_cost(self):
        return StreamedCost(self.cost, self.offload_step_s) if self.offload is not None else self.cost

    @property
    def kv_capacity_tokens(self) -> int:
        return self.kv_tokens if self.kv_tokens is not None else self.shape.budget.kv_tokens


def _link_of(spec: Spec, d: Deployment, gpu: str) -> Link:
    return next(group.link for group in spec.clusters[d.cluster].nodes if group.gpu == gpu)


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


def _slo_part(slo: SLO, metrics: set[str]) -> SLO:
    """The SLO limited to some metrics: prefill instances answer for TTFT, decode for TPOT."""
    return slo.model_copy(update={"targets": [t for t in slo.targets if t.metric in metrics]})


def _capacity(instance: InstanceConfig, partner: InstanceConfig | None, role: str, workload, slo: SLO,
              seed: int, pool: int) -> float:
    """Requests/s one instance of `role` sustains under the SLO, measured on `pool` replicas
    behind a router (one instance alone has a worse tail than the same instance in a fleet, so
    per-GPU figures of shapes of different sizes compare only at equal GPU counts). A prefill
    (decode) pool is measured beside enough decode (prefill) instances not to be the
    bottleneck, against the TTFT (TPOT and end-to-end) part of the SLO."""
    if role == "colocated":
        instances, part = [instance] * pool, slo
    elif role == "prefill":  # a decode instance serves many prefill instances' output: a few suffice
        instances, part = [instance] * pool + [partner] * max(1, pool // 2), _slo_part(slo, {"ttft"})
    else:
        instances, part = [partner] * DISAGG_PARTNERS * pool + [instance] * pool, _slo_part(slo, {"tpot", "e2e"})
    if not part.targets:
        part = slo
    requests = sample_requests(workload, CAPACITY_REQUESTS * pool, seed=seed)
    search = goodput_search(instances, lambda scale: requests.scaled(scale), part, seed=seed)
    return search.goodput / pool


def _best_reachable(instance: InstanceConfig, requests: Requests, slo: SLO) -> str:
    """What one instance reaches with requests arriving far apart: the floor of each limit."""
    result = simulate(requests.scaled(LOW_LOAD_SCALE), [instance])
    parts = []
    for t in slo.targets:
        p = t.percentile if t.percentile is not None else 50.0
        parts.append(f"{t.metric} p{p:g} {result.percentile(t.metric, p) * 1e3:,.0f} ms at best, limit {t.limit * 1e3:,.0f} ms")
    return "; ".join(parts)


def _offload_shapes(spec: Spec, d: Deployment, longest: int) -> list[Shape]:
    """pp = 1 shapes whose HBM does not hold the weights and the longest request: with
    `allow offload` they are candidates with part of the weights in host memory."""
    if not d.allow_offload:
        return []
    return sorted((shape for shape in instance_shapes(spec, d)
                   if shape.pp == 1 and (not shape.budget.fits or shape.budget.kv_tokens < longest)),
                  key=lambda s: (s.gpu, s.tp))


def _offload_kv_tokens(budget, longest: int) -> int:
    """K, the KV tokens an offloaded instance keeps in HBM (whole blocks): OFFLOAD_KV_REQUESTS
    longest requests, capped at OFFLOAD_KV_SHARE of the HBM left for weights and KV (every byte
    of KV is a byte of weights streamed each step), never below one longest request."""
    room = budget.usable - budget.activations - budget.reserve
    cap = int(room * OFFLOAD_KV_SHARE) // max(budget.kv_bytes_per_token, 1)
    k = max(longest, min(OFFLOAD_KV_REQUESTS * longest, cap))
    return -(-k // budget.block_size) * budget.block_size


def _plan_offload(spec: Spec, d: Deployment, shape: Shape, cost: CostModel, budget, max_batched_tokens: int,
                  longest: int, max_seqs: int):
    """(offload plan, KV tokens, seconds added per iteration) of one pp = 1 shape; raises
    OffloadInfeasible. The node group's host memory is split evenly over its GPUs."""
    group = next(g for g in spec.clusters[d.cluster].nodes if g.gpu == shape.gpu)
    host = (group.host_memory or 0) // group.gpus_per_node * shape.tp
    k = _offload_kv_tokens(budget, longest)
    plan = plan_offload(d.model, spec.gpus[shape.gpu], group.host_link, host, tp=shape.tp, pp=1,
                        max_batched_tokens=max_batched_tokens, kv_tokens_needed=k,
                        cost=cost, max_seqs=max_seqs, block_size=budget.block_size,
                        activation_bytes=budget.activations + OFFLOAD_SLACK)
    seqs = max(1, min(max_seqs, k))  # the decode step the LP planned (offload.plan_offload)
    base = cost.step_time(seqs, 0, seqs, max(k, seqs))
    return plan, k, max(0.0, plan.step_time_decode - base)


def _scheduler_knobs(d: Deployment, tokens: list[int]):
    """(token budget, max sequences, block size, chunk size) combinations the deployment allows;
    knobs it leaves open take the engine defaults (budgets of DEFAULT_BATCHED_TOKENS, 256
    sequences, blocks of 16, chunks as large as the budget)."""
    for budget in tokens:
        for max_seqs in d.search.get("max_seqs") or [DEFAULT_MAX_SEQS]:
            for block in d.search.get("block_size") or [DEFAULT_BLOCK_SIZE]:
                for chunk in d.search.get("chunk_size") or [budget]:
                    if chunk <= budget:
                        yield budget, max_seqs, block, chunk


def _default_ep(model, tp: int) -> list[int]:
    """Expert parallelism a spec leaves open: experts split across the TP ranks (each rank runs
    whole experts) or every expert's FFN split over them (ep 1), when the experts divide evenly."""
    if model.moe is None or tp == 1 or model.moe.experts % tp:
        return [1]
    return [1, tp]


def _candidates(spec: Spec, d: Deployment, requests: Requests, seed: int, on_progress: Progress = _quiet
                ) -> tuple[list[_Measured], list[Alternative], list[str]]:
    """Measured candidates, rejected alternatives, and why offloaded shapes could not be placed."""
    slo = spec.slos[d.slo]
    longest = int((requests.prompt + requests.output).max())
    roles = ["colocated"] + (["prefill", "decode"] if d.allow_disaggregation else [])
    tokens = d.search.get("max_batched_tokens") or list(DEFAULT_BATCHED_TOKENS)
    measured, rejected, infeasible = [], [], []
    mean_prompt = float(requests.prompt.mean())
    shapes = [(shape, False) for shape in _shapes(spec, d, longest)] + \
        [(shape, True) for shape in _offload_shapes(spec, d, longest)]
    for done, (shape, offloaded) in enumerate(shapes):
        on_progress(f"measuring `{d.name}` on {shape.gpu} tp {shape.tp} x pp {shape.pp}", done, len(shapes))
        gpu = spec.gpus[shape.gpu]
        link = _link_of(spec, d, shape.gpu)
        for ep in d.search.get("ep") or _default_ep(d.model, shape.tp):
            if ep > shape.tp:
                continue
            cost = CostModel(d.model, gpu, link, parallelism=Parallelism(tp=shape.tp, pp=shape.pp, ep=ep),
                             inter_link=spec.clusters[d.cluster].network)
            for budget_tokens, max_seqs, block_size, chunk in _scheduler_knobs(d, tokens):
                budget = memory_budget(d.model, gpu.memory, tp=shape.tp, pp=shape.pp,
                                       max_batched_tokens=budget_tokens, max_seqs=max_seqs, block_size=block_size,
                                       vendor=gpu.vendor)
                offload, kv_tokens, overhead = None, budget.kv_tokens, 0.0
                if offloaded:
                    try:
                        offload, kv_tokens, overhead = _plan_offload(spec, d, shape, cost, budget, budget_tokens,
                                                                     longest, max_seqs)
                    except OffloadInfeasible as error:
                        infeasible.append(f"{shape.gpu} tp {shape.tp}, {budget_tokens} batched tokens: {error}")
                        continue
                elif budget.kv_tokens < longest:
                    continue
                scheduler = Scheduler(max_batched_tokens=budget_tokens, chunked_prefill=True, chunk_size=chunk,
                                      max_seqs=max_seqs, block_size=budget.block_size)
                step = StreamedCost(cost, overhead) if offload is not None else cost
                configs = {role: InstanceConfig(cost=step, pp=shape.pp, kv_capacity_tokens=kv_tokens,
                                                block_size=budget.block_size, max_batched_tokens=budget_tokens,
                                                max_seqs=max_seqs, chunk_size=chunk, role=role) for role in roles}
                for role in roles:
                    partner = configs.get({"prefill": "decode", "decode": "prefill"}.get(role, ""))
                    pool = max(1, POOL_GPUS // shape.gpus)
                    capacity = _capacity(configs[role], partner, role, spec.workloads[d.workload], slo, seed, pool)
                    summary = f"{shape.gpu} tp {shape.tp} x pp {shape.pp}" + (f" ep {ep}" if ep > 1 else "") + \
                        f", {budget_tokens} batched tokens" + (f" in chunks of {chunk}" if chunk < budget_tokens else "") + \
                        f", {role}" + (
                            f", {offload.offloaded_bytes / 2**30:.1f} GiB offloaded" if offload is not None else "")
                    if capacity <= 0:
                        reach = _best_reachable(configs["colocated"], requests, slo)
                        rejected.append(Alternative(summary=summary, reason=f"misses the SLO even at the lowest load ({reach})"))
                        continue
                    key = f"{d.name}/{shape.gpu}/tp{shape.tp}/pp{shape.pp}/ep{ep}/mbt{budget_tokens}/" \
                        f"seqs{max_seqs}/block{block_size}/chunk{chunk}/{role}" + (
                        "/offload" if offload is not None else "")
                    candidate = Candidate(deployment=d.name, key=key, gpu=shape.gpu, tp=shape.tp, pp=shape.pp,
                                          role=role, capacity_rps=float(capacity),
                                          kv_bytes_per_request=kv_bytes_per_token(d.model) * mean_prompt)
                    shape_budget = Shape(shape.gpu, shape.tp, shape.pp, budget)
                    measured.append(_Measured(candidate, shape_budget, scheduler, cost, offload=offload,
                                              offload_step_s=overhead,
                                              kv_tokens=kv_tokens if offload is not None else None))
    return measured, rejected, infeasible


def _percentiles(result, metric: str) -> Percentiles:
    return Percentiles(**{f"p{p}": result.percentile(metric, p) * 1e3 for p in (50, 90, 99)})


def _memory_map(model, m: _Measured) -> MemoryMap:
    """The GPU's budget from the memory model, with every activation buffer of a step placed in
    the arena it reserves (packed to the live-bytes peak, which the budget already counts)."""
    b = m.shape.budget
    categories = b.by_category()
    layout = pack(step_buffers(model, m.candidate.tp, m.scheduler.max_batched_tokens, m.scheduler.max_seqs))
    if layout.size > b.activations:  # the packing missed its bound: the budget would under-reserve
        raise RuntimeError(f"activation arena of {layout.size} B exceeds the {b.activations} B the budget reserves")
    if m.offload is not None:
        # weights on the GPU: the memory model's less what host memory holds; KV: the K tokens
        # the offload LP kept in HBM; reserve: the runtime's plus the streaming buffer and slack
        o = m.offload
        weights = b.weights - o.offloaded.get("weights", 0) - o.offloaded.get("experts", 0)
        kv_blocks = m.kv_capacity_tokens // b.block_size
        kv_cache = kv_blocks * b.kv_bytes_per_token * b.block_size
        reserve = b.reserve + o.staging_bytes + OFFLOAD_SLACK
        return MemoryMap(capacity=b.capacity, weights=weights, kv_cache=kv_cache, kv_blocks=kv_blocks,
                         activations=b.activations, reserve=reserve,
                         free=b.capacity - weights - kv_cache - b.activations - reserve,
                         offloaded=dict(o.offloaded), offload_step_s=m.offload_step_s, arena_offsets=layout.offsets)
    return MemoryMap(capacity=b.capacity, weights=b.weights, kv_cache=categories["kv_cache"], kv_blocks=b.kv_blocks,
                     activations=b.activations, reserve=b.reserve, free=categories["free"],
                     arena_offsets=layout.offsets)


def _no_candidate(d: Deployment, rejected: list[Alternative]) -> FlowError:
    notes = tuple(f"{a.summary}: {a.reason}" for a in rejected[:6])
    return FlowError([Diagnostic(
        "F0510", f"no instance of {d.model.name} meets the SLO of deployment `{d.name}` at any load",
        help="relax the SLO, allow more GPUs per instance (tp, pp), or quantize the model",
        notes=notes)])


def _infeasible(error: PlacementInfeasible) -> FlowError:
    """F0511 with the nearest relaxations: the load these GPUs can serve, the GPUs the load needs."""
    name = error.deployment
    load, reachable, needed = error.load_rps[name], error.max_goodput_rps.get(name), error.gpus_needed.get(name)
    notes = [f"the load is {load:g} req/s"]
    if reachable is not None:
        notes.append(f"the GPUs available to it serve at most {reachable:.2f} req/s under the SLO")
    if needed is not None:
        notes.append(f"serving {load:g} req/s under the SLO needs {needed} GPUs of its types")
    return FlowError([Diagnostic("F0511", f"deployment `{name}` cannot serve its load of {load:g} req/s under its SLO",
                                 help="lower the load, relax the SLO, or give the deployment more GPUs",
                                 notes=tuple(notes))])


def compile_spec(spec: Spec, *, time_limit_s: float = 10.0, seed: int = 0,
                 on_progress: Progress = _quiet) -> Plan:
    """Compile every deployment of a checked spec into one plan; `on_progress` hears of each
    candidate shape measured and each placement round."""
    start = time.perf_counter()
    measured: dict[str, _Measured] = {}
    rejected: dict[str, list[Alternative]] = {}
    requests: dict[str, Requests] = {}
    for d in spec.deployments.values():
        requests[d.name] = sample_requests(spec.workloads[d.workload], CAPACITY_REQUESTS, seed=seed)
        found, rejected[d.name], infeasible = _candidates(spec, d, requests[d.name], seed, on_progress)
        if not found and not any(shape.budget.fits for shape in instance_shapes(spec, d)) and not rejected[d.name]:
            # only reachable with `allow offload` (the checker's F0503 covers the rest): offloading
            # to host memory could not place the weights of any pp = 1 shape either
            raise FlowError([Diagnostic(
                "F0503", f"{d.model.name} does not fit in the GPU memory of any instance deployment `{d.name}` "
                f"allows, even with weights offloaded to host memory",
                help="allow larger tp or pp, quantize the weights, or declare more `host_memory` for the nodes "
                     "(flowc offloads weights of single-stage instances only)",
                notes=tuple(infeasible[:6]))])
        if not found:
            raise _no_candidate(d, rejected[d.name])
        measured.update({m.candidate.key: m for m in found})

    by_cluster: dict[str, list[Deployment]] = {}
    for d in spec.deployments.values():
        by_cluster.setdefault(d.cluster, []).append(d)
    plans, statuses = [], []
    for cluster_name, deployments in by_cluster.items():
        placement, cluster_plans = _place_and_check(spec, cluster_name, deployments, measured, rejected, time_limit_s,
                                                    seed, on_progress)
        statuses.append(placement)
        plans.extend(cluster_plans)
    solver = SolverStatus(status="optimal" if all(p.status == "optimal" for p in statuses) else "feasible",
                          objective=sum(p.objective for p in statuses), bound=sum(p.bound for p in statuses),
                          gap=max(p.gap for p in statuses), wall_s=sum(p.wall_s for p in statuses))
    plan = Plan(flowc_version=__version__, spec_files=list(spec.files), deployments=plans, solver=solver,
                compile_s=time.perf_counter() - start)
    problems = [p for p in verify_plan(plan, spec) if p.severity == "error"]
    if problems:  # the optimizer and the verifier disagree: a bug, never the user's spec
        raise RuntimeError("the plan verifier rejected the optimizer's plan: "
                           + "; ".join(f"{p.code} {p.message}" for p in problems))
    return plan


def _place_and_check(spec: Spec, cluster_name: str, deployments: list[Deployment], measured: dict[str, _Measured],
                     rejected: dict[str, list[Alternative]], time_limit_s: float, seed: int,
                     on_progress: Progress = _quiet):
    """Place, then simulate the placement end to end. A deployment that misses its SLO at its
    load as a whole (the fleet behaves worse than its candidates measured apart, e.g. a
    disaggregated pair under bursts) gets its candidates' capacities derated by what the whole
    achieved, and the cluster is placed again, up to RECHECK_ROUNDS times."""
    measured = dict(measured)
    for round_ in range(RECHECK_ROUNDS):
        # RECHECK_ROUNDS is an upper bound: most clusters are placed and checked in one round
        on_progress(f"placing and checking `{cluster_name}` (round {round_ + 1})", round_, RECHECK_ROUNDS)
        demands = [Demand(deployment=d.name, objective=d.objective,
                          load_rps=base_rate(spec.workloads[d.workload]), max_gpus=d.max_gpus) for d in deployments]
        names = {d.name for d in deployments}
        candidates = [m.candidate for m in measured.values() if m.candidate.deployment in names]
        try:
            # 1% off the exact goodput/GPU ratio: balancing prefill against decode exactly can
            # take a large mix of instances that serves twice the load (placement.py, ratio_tolerance)
            placement = solve_placement(spec.clusters[cluster_name], spec.gpus, demands, candidates,
                                        time_limit_s=time_limit_s, ratio_tolerance=RATIO_TOLERANCE)
        except PlacementInfeasible as error:
            raise _infeasible(error) from None
        except PlacementTimeout:
            raise FlowError([Diagnostic(
                "F0511", f"no placement for the deployments on `{cluster_name}` was found within {time_limit_s:g} s",
                help="raise the solver's time limit (`flowc compile --time-limit 60`) or narrow the search space")]) from None
        plans = [_deployment_plan(spec, d, placement, measured, rejected[d.name], seed) for d in deployments]
        short = [(d, p) for d, p in zip(deployments, plans)
                 if not p.predicted.meets_slo or p.predicted.goodput_rps < base_rate(spec.workloads[d.workload])]
        if not short:
            return placement, plans
        for d, p in short:
            # What the fleet achieved against what its candidates promised together.
            promised = placement.deployments[d.name].goodput_rps
            factor = min(0.95, max(DERATE_FLOOR, 0.95 * p.predicted.goodput_rps / promised))
            # Derate every candidate of the deployment: the fleet effect is not the chosen
            # shapes' alone, and derating only those would make the solver swap shapes instead.
            for key, m in measured.items():
                if m.candidate.deployment == d.name:
                    measured[key] = replace(m, candidate=replace(m.candidate,
                                                                 capacity_rps=m.candidate.capacity_rps * factor))
    d, p = short[0]
    load = base_rate(spec.workloads[d.workload])
    raise FlowError([Diagnostic(
        "F0511", f"deployment `{d.name}` cannot serve its load of {load:g} req/s under its SLO",
        help="lower the load, relax the SLO, or give the deployment more GPUs",
        notes=(f"the best configuration found, {p.gpus} GPUs, serves {p.predicted.goodput_rps:.2f} req/s under the "
               f"SLO when simulated end to end",))])


def _deployment_plan(spec: Spec, d: Deployment, placement, measured: dict[str, _Measured],
                     rejected: list[Alternative], seed: int) -> DeploymentPlan:
    chosen = placement.instances(d.name)
    groups, configs = [], []
    for key in dict.fromkeys(p.candidate_key for p in chosen):
        m = measured[key]
        c = m.candidate
        instances = [Instance(gpus=p.gpus) for p in chosen if p.candidate_key == key]
        groups.append(InstanceGroup(role=c.role, gpu=c.gpu, vendor=spec.gpus[c.gpu].vendor, tp=c.tp, pp=c.pp, ep=m.cost.parallelism.ep,
                                    instances=instances, scheduler=m.scheduler, memory=_memory_map(d.model, m),
                                    capacity_rps=c.capacity_rps))
        config = InstanceConfig(cost=m.step_cost(), pp=c.pp, kv_capacity_tokens=m.kv_capacity_tokens,
                                block_size=m.scheduler.block_size, max_batched_tokens=m.scheduler.max_batched_tokens,
                                max_seqs=m.scheduler.max_seqs, chunk_size=m.scheduler.chunk_size, role=c.role)
        configs.extend([config] * len(instances))
    workload, slo = spec.workloads[d.workload], spec.slos[d.slo]
    requests = sample_requests(workload, max(CHECK_REQUESTS, CAPACITY_REQUESTS * len(configs)), seed=seed)
    result = simulate(requests, configs, router="least_work")
    rate = base_rate(workload)
    # Start the bisection at the workload's rate when the plan meets the SLO there, so a coarse
    # step cannot report a goodput below the load the plan was just shown to carry.
    search = goodput_search(configs, lambda scale: requests.scaled(scale), slo, seed=seed,
                            lo=rate if result.meets(slo) else 0.0)
    gpus = sum(g.replicas * g.gpus_per_instance for g in groups)
    predicted = Predicted(ttft_ms=_percentiles(result, "ttft"), tpot_ms=_percentiles(result, "tpot"),
                          e2e_ms=_percentiles(result, "e2e"), output_tokens_per_s=result.output_throughput,
                          goodput_rps=search.goodput, goodput_rps_per_gpu=search.goodput / gpus,
                          attainment=result.attainment(slo)["joint"]["share"], meets_slo=result.meets(slo),
                          requests=len(requests))
    used = {p.candidate_key for p in chosen}
    best_ratio = max((g.capacity_rps / g.gpus_per_instance for g in groups), default=0.0)
    alternatives = [
        Alternative(summary=_summary(m), objective_value=m.candidate.capacity_rps / m.candidate.gpus,
                    reason=_why_not(m, best_ratio))
        for key, m in measured.items() if m.candidate.deployment == d.name and key not in used
    ] + rejected
    return DeploymentPlan(
        name=d.name, cluster=d.cluster, model=d.model.name, weights=d.model.weights, kv=d.model.kv,
        model_spec=d.model.model_copy(update={"location": None}),
        mode="disaggregated" if any(g.role != "colocated" for g in groups) else "colocated",
        objective=d.objective, groups=groups, predicted=predicted, alternatives=alternatives,
        binding=[b for b in placement.binding if f"deployment {d.name}" in b or "deployment " not in b])


def _summary(m: _Measured) -> str:
    c, s = m.candidate, m.scheduler
    chunks = f" in chunks of {s.chunk_size}" if s.chunk_size < s.max_batched_tokens else ""
    ep = f" ep {m.cost.parallelism.ep}" if m.cost.parallelism.ep > 1 else ""
    return (f"{c.gpu} tp {c.tp} x pp {c.pp}{ep}, {s.max_batched_tokens} batched tokens{chunks}, {s.max_seqs} sequences, "
            f"blocks of {s.block_size}, {c.role}") + (
        f", {m.offload.offloaded_bytes / 2**30:.1f} GiB offloaded" if m.offload is not None else "")


def _why_not(m: _Measured, best_ratio: float) -> str:
    ratio = m.candidate.capacity_rps / m.candidate.gpus
    if ratio < best_ratio:
        return f"serves fewer requests per GPU under the SLO than the chosen {best_ratio:.3f}"
    return "not needed by the optimal placement (GPU count, domains or the other deployments' needs)"
