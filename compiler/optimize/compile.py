"""`flowc compile`: from a checked spec to the best plan the optimizer can prove.

Percentiles under queueing are not linear, so the search has three steps:
1. candidates (`optimize/candidates.py`): per deployment, every instance type its search space
   allows, each with its capacity under the SLO, measured with the simulator;
2. placement (`optimize/placement/`): CP-SAT chooses how many instances of each candidate run
   and on which GPUs, for each deployment's objective;
3. check (here): the chosen configuration is simulated end to end at the workload's rate and
   its goodput measured again; a deployment that misses its load gets its candidates derated
   and the cluster is placed again. The plan records those predictions, the alternatives and
   why each lost, and the constraints that bind; the verifier re-checks it before it is
   returned.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from typing import Optional

from flowc.compiler.diagnostics import Diagnostic, FlowError
from flowc.compiler.model.engines import engine_profile
from flowc.compiler.model.goodput import TOLERANCE as GOODPUT_TOLERANCE
from flowc.compiler.model.goodput import goodput_search
from flowc.compiler.model.instance import ROUTER
from flowc.compiler.model.intervals import factors as interval_factors
from flowc.compiler.model.intervals import pessimistic
from flowc.compiler.model.search import replica_choices
from flowc.compiler.model.serving import require_deployments
from flowc.compiler.model.shapes import instance_shapes
from flowc.compiler.model.simulator import simulate
from flowc.compiler.model.topology import cluster_shape, gpu_prices
from flowc.compiler.model.workload import Requests, base_rate, sample_requests
from flowc.compiler.optimize.alternatives import alternatives
from flowc.compiler.optimize.arena import pack_step
from flowc.compiler.optimize.baselines import Fleet, baseline_fleets, fleet_requests
from flowc.compiler.optimize.candidates import CAPACITY_REQUESTS, Measured, Progress, measure, quiet
from flowc.compiler.optimize.placement import Demand, PlacementInfeasible, PlacementTimeout, solve_placement
from flowc.compiler.plan import (
    Alternative,
    Baseline,
    DeploymentPlan,
    Instance,
    InstanceGroup,
    MemoryMap,
    Percentiles,
    Plan,
    Predicted,
    SolverStatus,
)
from flowc.compiler.spec import Deployment, Spec
from flowc.compiler.units import format_duration
from flowc.compiler.verify import verify_plan
from flowc.compiler.version import FLOWC_VERSION

RATIO_TOLERANCE = 0.01
RECHECK_ROUNDS = 4  # place -> simulate end to end -> derate -> place again
UPRATE_ROUNDS = 2  # infeasible -> the largest fleet carries the load end to end -> credit -> place again
DERATE_FLOOR = 0.2  # at most divide a capacity by five per round


def _percentiles(result, metric: str) -> Percentiles:
    """In ms; a metric no request has (TPOT when every output is one token) is 0, as vLLM's
    benchmarks report it, since a plan holds numbers."""
    values = {f"p{p}": result.percentile(metric, p) * 1e3 for p in (50, 90, 99)}
    return Percentiles(**{k: 0.0 if math.isnan(v) else v for k, v in values.items()})


def _memory_map(model, m: Measured) -> MemoryMap:
    """The GPU's budget from the memory model, with every activation buffer of a step placed in
    the arena it reserves (packed to the live-bytes peak, which the budget already counts)."""
    b = m.shape.budget
    categories = b.by_category()
    layout = pack_step(model, m.candidate.tp, m.scheduler, m.ep)
    if layout.size > b.activations:  # the packing missed its bound: the budget would under-reserve
        raise RuntimeError(f"activation arena of {layout.size} B exceeds the {b.activations} B the budget reserves")
    if m.offload is not None:
        # weights on the GPU: the memory model's less what host memory holds; KV: the K tokens
        # the offload LP kept in HBM; reserve: the runtime's plus the streaming buffer. The LP's
        # slack stays free: the LP may overshoot its budget by its tolerance (a byte or more)
        o = m.offload
        weights = b.weights - o.offloaded.get("weights", 0) - o.offloaded.get("experts", 0)
        kv_blocks = m.config.kv_capacity_tokens // b.block_size
        kv_cache = kv_blocks * b.kv_bytes_per_token * b.block_size
        reserve = b.reserve + o.staging_bytes
        return MemoryMap(capacity=b.capacity, weights=weights, kv_cache=kv_cache, kv_blocks=kv_blocks,
                         activations=b.activations, reserve=reserve,
                         free=b.capacity - weights - kv_cache - b.activations - reserve,
                         offloaded=dict(o.offloaded), offload_step_s=m.offload_step_s, arena_offsets=layout.offsets,
                         arena_sizes=layout.sizes)
    return MemoryMap(capacity=b.capacity, weights=b.weights, kv_cache=categories["kv_cache"], kv_blocks=b.kv_blocks,
                     activations=b.activations, reserve=b.reserve, free=categories["free"],
                     arena_offsets=layout.offsets, arena_sizes=layout.sizes)


NO_CANDIDATE_NOTES = 6  # F0510 lists this many of the shapes closest to meeting the SLO


def _no_candidate(spec: Spec, d: Deployment, rejected: list[Alternative]) -> FlowError:
    """F0510 with the shapes closest to meeting the SLO (`measure` sorts them), and a help that
    names only what could change the answer: a larger tp where the search held one back."""
    notes = [f"{a.summary}: {a.reason}" for a in rejected[:NO_CANDIDATE_NOTES]]
    if len(rejected) > NO_CANDIDATE_NOTES:
        notes.append(f"{len(rejected) - NO_CANDIDATE_NOTES} more shapes, each further from the SLO")
    searched = max((s.tp for s in instance_shapes(spec, d)), default=0)
    unrestricted = d.model_copy(update={"search": {k: v for k, v in d.search.items() if k != "tp"}})
    larger = sorted({s.tp for s in instance_shapes(spec, unrestricted) if s.tp > searched})
    if larger:
        help = (f"allow larger tp (`tp in [..., {', '.join(map(str, larger))}]`): a wider instance steps faster; "
                "or relax the SLO, or quantize the weights")
    else:
        help = ("relax the SLO: even the closest shape above misses it with no queueing at all, and no wider "
                "instance fits a link domain of this cluster; or quantize the weights, or use faster GPUs")
    return FlowError([Diagnostic(
        "F0510", f"no instance of {d.model.name} meets the SLO of deployment `{d.name}` at any load",
        help=help, notes=tuple(notes))])


def _infeasible(error: PlacementInfeasible, spec: Spec, reach: Optional[Reach]) -> FlowError:
    """F0511 with the nearest relaxations: the load these GPUs can serve (measured end to end
    when the deployment has its cluster to itself), the GPUs the load needs (and whether the
    deployment's `replicas` allows that many instances)."""
    name = error.deployment
    load, reachable, needed = error.load_rps[name], error.max_goodput_rps.get(name), error.gpus_needed.get(name)
    allowed = replica_choices(spec.deployments[name])
    notes = [f"the load is {load:g} req/s"]
    counts = f" with {_count_text(allowed)}" if allowed else ""
    if reach is not None:
        gpus = f"{reach.gpus} GPU" + ("s" if reach.gpus != 1 else "")
        notes.append(f"the GPUs available to it serve at most {reach.goodput_rps:.2f} req/s under the SLO, measured "
                     f"end to end on its largest fleet ({gpus}, {reach.requests} requests, seed {reach.seed}, "
                     f"to within {GOODPUT_TOLERANCE:.0%}){counts}")
    elif reachable is not None:
        notes.append(f"the GPUs available to it serve at most {reachable:.2f} req/s under the SLO (its instances' "
                     f"capacities, next to the other deployments){counts}")
    if needed is not None:
        notes.append(f"serving {load:g} req/s under the SLO needs {needed} GPUs of its types"
                     + (f", in more instances than `replicas` allows ({_count_text(allowed)})"
                        if name in error.beyond_replicas else ""))
    help = "lower the load, relax the SLO, or give the deployment more GPUs"
    if name in error.beyond_replicas:
        help = "allow more instances (`replicas`), lower the load, or relax the SLO"
    return FlowError([Diagnostic("F0511", f"deployment `{name}` cannot serve its load of {load:g} req/s under its SLO",
                                 help=help, notes=tuple(notes))])


def _count_text(values: tuple[int, ...]) -> str:
    return " or ".join(map(str, sorted(values))) + (" instance" if values == (1,) else " instances")


def compile_spec(spec: Spec, *, time_limit_s: float = 10.0, seed: int = 0,
                 on_progress: Progress = quiet) -> Plan:
    """Compile every deployment of a checked spec into one plan; `on_progress` hears of each
    candidate shape measured and each placement round."""
    require_deployments(spec, "compile")
    measured: dict[str, Measured] = {}
    rejected: dict[str, list[Alternative]] = {}
    requests: dict[str, Requests] = {}
    for d in spec.deployments.values():
        requests[d.name] = sample_requests(spec.workloads[d.workload], CAPACITY_REQUESTS, seed=seed)
        found, rejected[d.name], infeasible = measure(spec, d, requests[d.name], seed, on_progress)
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
            raise _no_candidate(spec, d, rejected[d.name])
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
                          gap=max(p.gap for p in statuses))
    plan = Plan(flowc_version=FLOWC_VERSION, spec_files=list(spec.files),
                clusters={name: cluster_shape(spec.clusters[name]) for name in by_cluster}, deployments=plans,
                solver=solver)
    problems = [p for p in verify_plan(plan, spec) if p.severity == "error"]
    if problems:  # the optimizer and the verifier disagree: a bug, never the user's spec
        raise RuntimeError("the plan verifier rejected the optimizer's plan: "
                           + "; ".join(f"{p.code} {p.message}" for p in problems))
    return plan


def _place_and_check(spec: Spec, cluster_name: str, deployments: list[Deployment], measured: dict[str, Measured],
                     rejected: dict[str, list[Alternative]], time_limit_s: float, seed: int,
                     on_progress: Progress = quiet):
    """Place, then simulate the placement end to end, and place again while that teaches
    something:
    - a deployment that misses its SLO at its load as a whole (the fleet behaves worse than its
      candidates measured apart, e.g. a disaggregated pair under bursts) gets its candidates'
      capacities derated by what the whole achieved (at most RECHECK_ROUNDS times);
    - a deployment a baseline beats end to end is held to that baseline (a batch: to the
      candidate whose fleet finishes first), once; if that cannot be placed beside the other
      deployments, it goes back to the free choice;
    - a deployment that cannot be placed, whose largest fleet measured end to end carries its
      load after all, gets its capacities credited (at most UPRATE_ROUNDS times)."""
    measured = dict(measured)
    pins: dict[str, Pin] = {}
    blocked: set[str] = set()  # deployments whose pin could not be placed beside the others
    reported: dict[str, list[Fleet]] = {}
    derated = uprated = 0
    for attempt in itertools.count(1):
        on_progress(f"placing and checking `{cluster_name}` (round {attempt})", attempt - 1, None)
        demands = [Demand(deployment=d.name, objective=d.objective, load_rps=base_rate(spec.workloads[d.workload]),
                          max_gpus=d.max_gpus, replicas=pins[d.name].replicas if d.name in pins else replica_choices(d))
                   for d in deployments]
        names = {d.name for d in deployments}
        candidates = [m.candidate for m in measured.values() if m.candidate.deployment in names
                      and (m.candidate.deployment not in pins or m.candidate.key in pins[m.candidate.deployment].keys)]
        try:
            # 1% off the exact goodput/GPU ratio: balancing prefill against decode exactly can
            # take a large mix of instances that serves twice the load (placement.py, ratio_tolerance)
            placement = solve_placement(spec.clusters[cluster_name], spec.gpus, demands, candidates,
                                        time_limit_s=time_limit_s, ratio_tolerance=RATIO_TOLERANCE)
        except PlacementInfeasible as error:
            if pins:  # what won end to end does not fit beside the rest: back to the free choice
                blocked.update(pins)
                pins = {}
                continue
            reach = _reach(spec, error.deployment, measured, time_limit_s, seed) if len(deployments) == 1 else None
            if reach is not None and reach.goodput_rps >= error.load_rps[error.deployment] and uprated < UPRATE_ROUNDS:
                # the largest fleet carries the load end to end, though its instances measured
                # apart promised less (a larger fleet pools its load better): credit them
                uprated += 1
                _scale_capacities(measured, error.deployment, reach.goodput_rps / reach.promised_rps)
                continue
            raise _infeasible(error, spec, reach) from None
        except PlacementTimeout:
            raise FlowError([Diagnostic(
                "F0511", f"no placement for the deployments on `{cluster_name}` was found within {time_limit_s:g} s",
                help="raise the solver's time limit (`flowc compile --time-limit 60`) "
                     "or narrow the search space")]) from None
        plans = [_deployment_plan(spec, d, placement, measured, rejected[d.name], seed) for d in deployments]
        short = [(d, p) for d, p in zip(deployments, plans)
                 if not p.predicted.meets_slo or p.predicted.goodput_rps < base_rate(spec.workloads[d.workload])]
        if not short:
            better = _better_fleets(spec, deployments, plans, placement, measured, pins.keys() | blocked, reported,
                                    seed)
            if better:  # place again, held to what did better end to end
                pins.update(better)
                continue
            return placement, [p.model_copy(update={"baselines": _reported(reported.get(p.name, []),
                                                                           p.name in blocked)}) for p in plans]
        late = [(d, p) for d, p in short if spec.workloads[d.workload].is_batch]
        if late:  # a batch already has every GPU it may take: derating cannot help
            raise _batch_too_slow(spec, *late[0])
        if derated == RECHECK_ROUNDS:
            break
        derated += 1
        for d, p in short:
            # What the fleet achieved against what its candidates promised together.
            promised = placement.deployments[d.name].goodput_rps
            _scale_capacities(measured, d.name, min(0.95, max(DERATE_FLOOR, 0.95 * p.predicted.goodput_rps / promised)))
    d, p = short[0]
    load = base_rate(spec.workloads[d.workload])
    raise FlowError([Diagnostic(
        "F0511", f"deployment `{d.name}` cannot serve its load of {load:g} req/s under its SLO",
        help="lower the load, relax the SLO, or give the deployment more GPUs",
        notes=(f"the best configuration found, {p.gpus} GPUs, serves {p.predicted.goodput_rps:.2f} req/s under the "
               f"SLO when simulated end to end",))])


def _scale_capacities(measured: dict[str, Measured], deployment: str, factor: float) -> None:
    """Scale every candidate of the deployment: the fleet effect is not the chosen shapes' alone,
    and scaling only those would make the solver swap shapes instead."""
    for key, m in measured.items():
        if m.candidate.deployment == deployment:
            measured[key] = replace(m, candidate=replace(m.candidate, capacity_rps=m.candidate.capacity_rps * factor))


@dataclass(frozen=True)
class Reach:
    """The largest fleet a deployment can place, measured end to end."""

    goodput_rps: float
    promised_rps: float  # what its instances' capacities add up to
    gpus: int
    requests: int
    seed: int


def _reach(spec: Spec, name: str, measured: dict[str, Measured], time_limit_s: float, seed: int) -> Optional[Reach]:
    """Place the deployment for the most throughput (its limits kept, no load), and measure that
    fleet's goodput with the plan's own definition (`model/goodput.py`); None if nothing places."""
    d = spec.deployments[name]
    demand = Demand(deployment=name, objective="max_throughput", load_rps=0.0, max_gpus=d.max_gpus,
                    replicas=replica_choices(d))
    candidates = [m.candidate for m in measured.values() if m.candidate.deployment == name]
    try:
        placement = solve_placement(spec.clusters[d.cluster], spec.gpus, [demand], candidates,
                                    time_limit_s=time_limit_s)
    except (PlacementInfeasible, PlacementTimeout):
        return None
    configs = [measured[p.candidate_key].config for p in placement.instances(name)]
    promised = placement.deployments[name].goodput_rps
    if not configs or promised <= 0:
        return None
    workload = spec.workloads[d.workload]
    n = fleet_requests(workload, len(configs))
    goodput = goodput_search(configs, workload, spec.slos[d.slo], seed=seed, n=n).goodput
    simulated = len(sample_requests(workload, n, seed=seed))
    return Reach(goodput, promised, placement.deployments[name].gpus, simulated, seed)


@dataclass(frozen=True)
class Pin:
    """A deployment held to some candidates and, optionally, instance counts."""

    keys: frozenset[str]
    replicas: Optional[tuple[int, ...]] = None


def _better_fleets(spec: Spec, deployments: list[Deployment], plans: list[DeploymentPlan], placement,
                   measured: dict[str, Measured], settled, reported: dict[str, list[Fleet]],
                   seed: int) -> dict[str, Pin]:
    """Deployments a fleet beats end to end, in their own objective, each with the pin that
    places that fleet: a batch's fastest candidate fleet; an online deployment's baseline
    (measured once, against the first plan that met the load; `reported` keeps them)."""
    better = {}
    for d, p in zip(deployments, plans):
        if d.name in settled:
            continue
        if spec.workloads[d.workload].is_batch:
            key = _fastest_fleet(spec, d, p, measured, seed)
            if key is not None:
                better[d.name] = Pin(frozenset({key}))
            continue
        if d.name in reported:
            continue
        mine = [m for m in measured.values() if m.candidate.deployment == d.name]
        reported[d.name] = baseline_fleets(spec, d, mine, p.gpus, seed)
        cost = placement.deployments[d.name].cost_per_hour
        prices = gpu_prices(spec.clusters[d.cluster], spec.gpus)
        winner = _best_beating(d, p, cost, reported[d.name], prices)
        if winner is not None:
            better[d.name] = Pin(frozenset(m.candidate.key for m, _ in winner.members), (winner.instances,))
    return better


def _best_beating(d: Deployment, p: DeploymentPlan, plan_cost: Optional[float], fleets: list[Fleet],
                  prices: dict[str, Optional[float]]) -> Optional[Fleet]:
    """The baseline that does best in the deployment's objective, if it beats the plan and
    keeps the deployment's own limits (`max_gpus`, `replicas`)."""
    allowed = replica_choices(d)
    eligible = [f for f in fleets if f.sustains_load and (d.max_gpus is None or f.gpus <= d.max_gpus)
                and (not allowed or f.instances in allowed)]

    def score(f: Fleet) -> Optional[float]:  # higher is better
        if d.objective == "max_goodput_per_gpu":
            return f.goodput_rps / f.gpus
        if d.objective == "min_gpus":
            return -f.gpus
        cost = f.cost(prices)
        return None if cost is None else -cost

    plan_score = {"max_goodput_per_gpu": p.predicted.goodput_rps_per_gpu, "min_gpus": -p.gpus,
                  "min_cost": None if plan_cost is None else -plan_cost}[d.objective]
    scored = [(s, f) for f in eligible if (s := score(f)) is not None]
    if plan_score is None or not scored:
        return None
    s, f = max(scored, key=lambda pair: pair[0])
    return f if s > plan_score + 1e-9 * max(1.0, abs(plan_score)) else None  # strictly better, not a tie


def _reported(fleets: list[Fleet], blocked: bool) -> list[Baseline]:
    note = "; it does not fit beside the cluster's other deployments" if blocked else ""
    return [Baseline(name=f.name, summary=f.summary, gpus=f.gpus, goodput_rps=f.goodput_rps,
                     sustains_load=f.sustains_load, note=note or None) for f in fleets]


def _fastest_fleet(spec: Spec, d: Deployment, p: DeploymentPlan, measured: dict[str, Measured],
                   seed: int) -> Optional[str]:
    """A batch: the colocated candidate whose fleet on the plan's GPUs finishes the job sooner
    than the plan, end to end, or None. Candidates are ranked by their saturated throughput,
    which leaves out the job's drain: the last long requests on a few sequences, where a wider
    instance is faster (measured: 2,000 requests of Llama-3.1-8B on 8 H100s finish in 24.7 s on
    4 x tp 2, in 26.1 s on 8 x tp 1, though tp 1 has the higher throughput per GPU)."""
    workload = spec.workloads[d.workload]
    if not workload.is_batch or p.predicted.makespan_s is None or len({g.gpu for g in p.groups}) != 1:
        return None
    gpu, requests = p.groups[0].gpu, sample_requests(workload, seed=seed)
    best, best_time = None, p.predicted.makespan_s
    for key, m in measured.items():
        c = m.candidate
        if c.deployment != d.name or c.role != "colocated" or c.gpu != gpu or p.gpus // c.gpus == 0:
            continue
        makespan = simulate(requests, [m.config] * (p.gpus // c.gpus), router=ROUTER).makespan
        if makespan < best_time * (1 - 1e-9):
            best, best_time = key, makespan
    return best


def _batch_too_slow(spec: Spec, d: Deployment, p: DeploymentPlan) -> FlowError:
    slo = spec.slos[d.slo]
    limits = ", ".join(f"{t.metric}{f' p{t.percentile:g}' if t.percentile is not None else ''} <= "
                       f"{format_duration(t.limit)}" for t in slo.targets)
    return FlowError([Diagnostic(
        "F0511", f"the batch of deployment `{d.name}` does not finish within slo `{d.slo}` ({limits})",
        help="relax the SLO, give the deployment more GPUs (`max_gpus`, a larger cluster), or split the batch",
        notes=(f"on its best configuration, {p.gpus} GPUs, the {p.predicted.requests} requests take "
               f"{format_duration(p.predicted.makespan_s or 0.0)}; e2e p90 "
               f"{format_duration(p.predicted.e2e_ms.p90 / 1e3)}, attainment {p.predicted.attainment:.1%}",))])


def _deployment_plan(spec: Spec, d: Deployment, placement, measured: dict[str, Measured],
                     rejected: list[Alternative], seed: int) -> DeploymentPlan:
    chosen = placement.instances(d.name)
    groups, configs = [], []
    for key in dict.fromkeys(p.candidate_key for p in chosen):
        m = measured[key]
        c = m.candidate
        instances = [Instance(gpus=p.gpus) for p in chosen if p.candidate_key == key]
        groups.append(InstanceGroup(role=c.role, gpu=c.gpu, vendor=spec.gpus[c.gpu].vendor, tp=c.tp, pp=c.pp,
                                    ep=m.ep, instances=instances, scheduler=m.scheduler,
                                    memory=_memory_map(d.model, m), capacity_rps=c.capacity_rps))
        configs.extend([m.config] * len(instances))
    workload, slo = spec.workloads[d.workload], spec.slos[d.slo]
    batch = workload.is_batch
    # a batch is simulated as the job it is (its `requests`, all queued at the start)
    n = fleet_requests(workload, len(configs))
    requests = sample_requests(workload, n, seed=seed)
    result = simulate(requests, configs, router=ROUTER)
    rate = base_rate(workload)
    if batch:
        goodput = result.request_throughput if result.meets(slo) else 0.0
    else:
        # Start the bisection at the workload's rate when the plan meets the SLO there, so a coarse
        # step cannot report a goodput below the load the plan was just shown to carry.
        goodput = goodput_search(configs, workload, slo, seed=seed, n=n, lo=rate if result.meets(slo) else 0.0).goodput
    gpus = sum(g.replicas * g.gpus_per_instance for g in groups)
    interval = interval_factors()
    predicted = Predicted(ttft_ms=_percentiles(result, "ttft"), tpot_ms=_percentiles(result, "tpot"),
                          e2e_ms=_percentiles(result, "e2e"), output_tokens_per_s=result.output_throughput,
                          goodput_rps=goodput, goodput_rps_per_gpu=goodput / gpus,
                          attainment=result.attainment(slo)["joint"]["share"], meets_slo=result.meets(slo),
                          requests=len(requests), makespan_s=result.makespan if batch else None,
                          interval=interval, meets_slo_pessimistic=pessimistic(result, interval).meets(slo))
    used = {p.candidate_key for p in chosen}
    mine = [m for m in measured.values() if m.candidate.deployment == d.name]
    lost = alternatives(spec, d, rate, [m for m in mine if m.candidate.key not in used], [m.candidate for m in mine],
                        groups, gpus, placement.deployments[d.name].cost_per_hour) + rejected
    return DeploymentPlan(
        name=d.name, cluster=d.cluster, model=d.model.name, weights=d.model.weights, kv=d.model.kv,
        model_spec=d.model.model_copy(update={"location": None}),
        mode="disaggregated" if any(g.role != "colocated" for g in groups) else "colocated",
        objective=d.objective, engine=engine_profile(d.engine).name, groups=groups, predicted=predicted,
        alternatives=lost,
        binding=[b for b in placement.binding if f"deployment {d.name}" in b or "deployment " not in b])
