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

import time
from dataclasses import replace

from flowc.compiler.diagnostics import Diagnostic, FlowError
from flowc.compiler.model.goodput import goodput_search
from flowc.compiler.model.instance import ROUTER
from flowc.compiler.model.search import replica_choices
from flowc.compiler.model.shapes import instance_shapes
from flowc.compiler.model.simulator import simulate
from flowc.compiler.model.workload import Requests, base_rate, sample_requests
from flowc.compiler.optimize.arena import pack_step
from flowc.compiler.optimize.candidates import CAPACITY_REQUESTS, OFFLOAD_SLACK, Measured, Progress, measure, quiet
from flowc.compiler.optimize.placement import Demand, PlacementInfeasible, PlacementTimeout, solve_placement
from flowc.compiler.plan import (
    Alternative,
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
from flowc.compiler.verify import verify_plan
from flowc.compiler.version import FLOWC_VERSION

CHECK_REQUESTS = 1000  # requests when checking the chosen configuration end to end
RATIO_TOLERANCE = 0.01
RECHECK_ROUNDS = 4  # place -> simulate end to end -> derate -> place again
DERATE_FLOOR = 0.2  # at most divide a capacity by five per round


def _percentiles(result, metric: str) -> Percentiles:
    return Percentiles(**{f"p{p}": result.percentile(metric, p) * 1e3 for p in (50, 90, 99)})


def _memory_map(model, m: Measured) -> MemoryMap:
    """The GPU's budget from the memory model, with every activation buffer of a step placed in
    the arena it reserves (packed to the live-bytes peak, which the budget already counts)."""
    b = m.shape.budget
    categories = b.by_category()
    layout = pack_step(model, m.candidate.tp, m.scheduler)
    if layout.size > b.activations:  # the packing missed its bound: the budget would under-reserve
        raise RuntimeError(f"activation arena of {layout.size} B exceeds the {b.activations} B the budget reserves")
    if m.offload is not None:
        # weights on the GPU: the memory model's less what host memory holds; KV: the K tokens
        # the offload LP kept in HBM; reserve: the runtime's plus the streaming buffer and slack
        o = m.offload
        weights = b.weights - o.offloaded.get("weights", 0) - o.offloaded.get("experts", 0)
        kv_blocks = m.config.kv_capacity_tokens // b.block_size
        kv_cache = kv_blocks * b.kv_bytes_per_token * b.block_size
        reserve = b.reserve + o.staging_bytes + OFFLOAD_SLACK
        return MemoryMap(capacity=b.capacity, weights=weights, kv_cache=kv_cache, kv_blocks=kv_blocks,
                         activations=b.activations, reserve=reserve,
                         free=b.capacity - weights - kv_cache - b.activations - reserve,
                         offloaded=dict(o.offloaded), offload_step_s=m.offload_step_s, arena_offsets=layout.offsets,
                         arena_sizes=layout.sizes)
    return MemoryMap(capacity=b.capacity, weights=b.weights, kv_cache=categories["kv_cache"], kv_blocks=b.kv_blocks,
                     activations=b.activations, reserve=b.reserve, free=categories["free"],
                     arena_offsets=layout.offsets, arena_sizes=layout.sizes)


def _no_candidate(d: Deployment, rejected: list[Alternative]) -> FlowError:
    notes = tuple(f"{a.summary}: {a.reason}" for a in rejected[:6])
    return FlowError([Diagnostic(
        "F0510", f"no instance of {d.model.name} meets the SLO of deployment `{d.name}` at any load",
        help="relax the SLO, allow more GPUs per instance (tp, pp), or quantize the model",
        notes=notes)])


def _infeasible(error: PlacementInfeasible, spec: Spec) -> FlowError:
    """F0511 with the nearest relaxations: the load these GPUs can serve, the GPUs the load needs
    (and whether the deployment's `replicas` allows that many instances)."""
    name = error.deployment
    load, reachable, needed = error.load_rps[name], error.max_goodput_rps.get(name), error.gpus_needed.get(name)
    allowed = replica_choices(spec.deployments[name])
    notes = [f"the load is {load:g} req/s"]
    if reachable is not None:
        notes.append(f"the GPUs available to it serve at most {reachable:.2f} req/s under the SLO"
                     + (f" with {_count_text(allowed)}" if allowed else ""))
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
    start = time.perf_counter()
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
    plan = Plan(flowc_version=FLOWC_VERSION, spec_files=list(spec.files), deployments=plans, solver=solver,
                compile_s=time.perf_counter() - start)
    problems = [p for p in verify_plan(plan, spec) if p.severity == "error"]
    if problems:  # the optimizer and the verifier disagree: a bug, never the user's spec
        raise RuntimeError("the plan verifier rejected the optimizer's plan: "
                           + "; ".join(f"{p.code} {p.message}" for p in problems))
    return plan


def _place_and_check(spec: Spec, cluster_name: str, deployments: list[Deployment], measured: dict[str, Measured],
                     rejected: dict[str, list[Alternative]], time_limit_s: float, seed: int,
                     on_progress: Progress = quiet):
    """Place, then simulate the placement end to end. A deployment that misses its SLO at its
    load as a whole (the fleet behaves worse than its candidates measured apart, e.g. a
    disaggregated pair under bursts) gets its candidates' capacities derated by what the whole
    achieved, and the cluster is placed again, up to RECHECK_ROUNDS times."""
    measured = dict(measured)
    for round_ in range(RECHECK_ROUNDS):
        # RECHECK_ROUNDS is an upper bound: most clusters are placed and checked in one round
        on_progress(f"placing and checking `{cluster_name}` (round {round_ + 1})", round_, RECHECK_ROUNDS)
        demands = [Demand(deployment=d.name, objective=d.objective, load_rps=base_rate(spec.workloads[d.workload]),
                          max_gpus=d.max_gpus, replicas=replica_choices(d)) for d in deployments]
        names = {d.name for d in deployments}
        candidates = [m.candidate for m in measured.values() if m.candidate.deployment in names]
        try:
            # 1% off the exact goodput/GPU ratio: balancing prefill against decode exactly can
            # take a large mix of instances that serves twice the load (placement.py, ratio_tolerance)
            placement = solve_placement(spec.clusters[cluster_name], spec.gpus, demands, candidates,
                                        time_limit_s=time_limit_s, ratio_tolerance=RATIO_TOLERANCE)
        except PlacementInfeasible as error:
            raise _infeasible(error, spec) from None
        except PlacementTimeout:
            raise FlowError([Diagnostic(
                "F0511", f"no placement for the deployments on `{cluster_name}` was found within {time_limit_s:g} s",
                help="raise the solver's time limit (`flowc compile --time-limit 60`) "
                     "or narrow the search space")]) from None
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
    requests = sample_requests(workload, max(CHECK_REQUESTS, CAPACITY_REQUESTS * len(configs)), seed=seed)
    result = simulate(requests, configs, router=ROUTER)
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
        Alternative(summary=m.summary, objective_value=m.candidate.capacity_rps / m.candidate.gpus,
                    reason=_why_not(m, best_ratio))
        for key, m in measured.items() if m.candidate.deployment == d.name and key not in used
    ] + rejected
    return DeploymentPlan(
        name=d.name, cluster=d.cluster, model=d.model.name, weights=d.model.weights, kv=d.model.kv,
        model_spec=d.model.model_copy(update={"location": None}),
        mode="disaggregated" if any(g.role != "colocated" for g in groups) else "colocated",
        objective=d.objective, groups=groups, predicted=predicted, alternatives=alternatives,
        binding=[b for b in placement.binding if f"deployment {d.name}" in b or "deployment " not in b])


def _why_not(m: Measured, best_ratio: float) -> str:
    ratio = m.candidate.capacity_rps / m.candidate.gpus
    if ratio < best_ratio:
        return f"serves fewer requests per GPU under the SLO than the chosen {best_ratio:.3f}"
    return "not needed by the optimal placement (GPU count, domains or the other deployments' needs)"
