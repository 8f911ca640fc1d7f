"""`flowc.simulate`: run every deployment of a checked spec through the simulator.

Until the optimizer chooses configurations, each deployment runs a baseline: the instance shape
with the fewest GPUs that holds the weights and the longest request, replicated over the
deployment's share of the cluster (its `max_gpus`, or an equal split among the deployments
that share the cluster).
"""

from __future__ import annotations

from typing import Callable, Optional

from pydantic import BaseModel

from flowc.compiler.diagnostics import Diagnostic, FlowError, suggestion_help
from flowc.compiler.model.estimate import LatencyStats
from flowc.compiler.model.goodput import goodput
from flowc.compiler.model.instance import ROUTER, instance_config
from flowc.compiler.model.memory import MemoryBudget, memory_budget
from flowc.compiler.model.results import SimResult
from flowc.compiler.model.search import baseline_scheduler
from flowc.compiler.model.shapes import Shape, instance_shapes
from flowc.compiler.model.simulator import simulate
from flowc.compiler.model.topology import gpu_link
from flowc.compiler.model.workload import sample_requests
from flowc.compiler.plan import Scheduler
from flowc.compiler.spec import Deployment, Spec, Workload


class TargetReport(BaseModel):
    metric: str
    percentile: Optional[float]
    limit_ms: float
    value_ms: Optional[float]  # the percentile's value (None for a bare limit)
    share_meeting: float  # of requests under the limit
    met: bool


class DeploymentReport(BaseModel):
    deployment: str
    model: str
    gpu: str
    tp: int
    pp: int
    replicas: int
    gpus: int
    kv_capacity_tokens: int
    scheduler: Scheduler
    requests: int
    finished: int
    preemptions: int
    ttft_ms: LatencyStats
    tpot_ms: LatencyStats
    e2e_ms: LatencyStats
    output_tokens_per_s: float
    output_tokens_per_s_per_gpu: float
    targets: list[TargetReport]
    joint_attainment: float
    meets_slo: bool
    goodput_req_s: Optional[float] = None
    goodput_req_s_per_gpu: Optional[float] = None
    calibrated: bool
    note: str = "baseline configuration: the smallest instance that fits, replicated over the deployment's GPUs"


def _baseline(spec: Spec, d: Deployment, scheduler: Scheduler, longest: int) -> tuple[Shape, MemoryBudget]:
    """The shape with the fewest GPUs (then the most KV) that holds the longest request at the
    baseline's scheduler settings, and its memory budget at those settings."""
    fitting = []
    for shape in instance_shapes(spec, d):
        gpu = spec.gpus[shape.gpu]
        budget = memory_budget(d.model, gpu.memory, tp=shape.tp, pp=shape.pp, scheduler=scheduler, vendor=gpu.vendor)
        if budget.fits and budget.kv_tokens >= longest:
            fitting.append((shape, budget))
    if not fitting:  # the checker's F0503/F0504 make this unreachable for checked specs
        raise FlowError([Diagnostic("F0503", f"no instance of {d.model.name} fits deployment `{d.name}`")])
    return min(fitting, key=lambda pair: (pair[0].gpus, -pair[1].kv_tokens))


def _gpu_share(spec: Spec, d: Deployment) -> int:
    sharing = [other for other in spec.deployments.values() if other.cluster == d.cluster]
    return d.max_gpus or spec.clusters[d.cluster].total_gpus // len(sharing)


def _stats(result: SimResult, metric: str) -> LatencyStats:
    return LatencyStats(mean=result.mean(metric) * 1e3,
                        **{f"p{p}": result.percentile(metric, p) * 1e3 for p in (50, 90, 99)})


def simulate_deployment(spec: Spec, d: Deployment, *, workload: Workload | None = None, with_goodput: bool = False,
                        seed: int = 0) -> DeploymentReport:
    workload, slo = workload or spec.workloads[d.workload], spec.slos[d.slo]
    requests = sample_requests(workload, seed=seed)
    longest = int((requests.prompt + requests.output).max())
    scheduler = baseline_scheduler(d)
    shape, budget = _baseline(spec, d, scheduler, longest)
    gpu = spec.gpus[shape.gpu]
    instance = instance_config(d.model, gpu, gpu_link(spec.clusters[d.cluster], shape.gpu),
                               kv_capacity_tokens=budget.kv_tokens, tp=shape.tp, pp=shape.pp, scheduler=scheduler,
                               engine=d.engine)
    replicas = max(1, _gpu_share(spec, d) // shape.gpus)
    instances = [instance] * replicas
    result = simulate(requests, instances, router=ROUTER)
    attainment = result.attainment(slo)
    targets = [TargetReport(metric=t.metric, percentile=t.percentile, limit_ms=t.limit * 1e3,
                            value_ms=None if t.percentile is None else result.percentile(t.metric, t.percentile) * 1e3,
                            share_meeting=attainment[t.metric]["share"], met=attainment[t.metric]["met"])
               for t in slo.targets]
    gpus = replicas * shape.gpus
    rate = None
    if with_goodput and workload.is_batch:  # a batch's goodput: its throughput when it meets the SLO
        rate = result.request_throughput if result.meets(slo) else 0.0
    elif with_goodput:  # the same requests and rates as `requests` above (model/goodput.py)
        rate = goodput(instances, workload, slo, seed=seed, router=ROUTER)
    return DeploymentReport(
        deployment=d.name, model=d.model.name, gpu=shape.gpu, tp=shape.tp, pp=shape.pp, replicas=replicas, gpus=gpus,
        kv_capacity_tokens=budget.kv_tokens, requests=len(requests.arrival), scheduler=scheduler,
        finished=int(result.finished.sum()), preemptions=result.preemptions,
        ttft_ms=_stats(result, "ttft"), tpot_ms=_stats(result, "tpot"), e2e_ms=_stats(result, "e2e"),
        output_tokens_per_s=result.output_throughput, output_tokens_per_s_per_gpu=result.output_throughput / gpus,
        targets=targets, joint_attainment=attainment["joint"]["share"], meets_slo=result.meets(slo),
        goodput_req_s=rate, goodput_req_s_per_gpu=None if rate is None else rate / gpus,
        calibrated=instance.cost.calibrated,
    )


def require_deployments(spec: Spec, command: str) -> None:
    """F0512: a plan or a simulation is made of deployments, and the spec has none (a library
    of clusters and models, or an empty file)."""
    if spec.deployments:
        return
    files = ", ".join(f"`{name}`" for name in spec.files) or "the spec"
    tables = {"cluster": spec.clusters, "workload": spec.workloads, "SLO": spec.slos}
    declared = [f"{len(table)} {kind}{'s' if len(table) != 1 else ''}" for kind, table in tables.items() if table]
    notes = (f"it declares {', '.join(declared)}",) if declared else ()
    raise FlowError([Diagnostic("F0512", f"nothing to {command}: {files} declares no `deploy` block",
                                help="add `deploy NAME { model MODEL; on CLUSTER; serve WORKLOAD under SLO }`, "
                                     "or check a library file with `flowc check`", notes=notes)])


def simulate_spec(spec: Spec, *, workload: Workload | str | None = None, with_goodput: bool = False,
                  seed: int = 0, on_progress: Optional[Callable[[str, int, Optional[int]], None]] = None
                  ) -> dict[str, DeploymentReport]:
    """Simulate every deployment, each under its own workload or under `workload` (a name in
    the spec or a Workload); `on_progress(what, done, total)` hears of each deployment."""
    require_deployments(spec, "simulate")
    if isinstance(workload, str):
        if workload not in spec.workloads:
            raise FlowError([Diagnostic("F0201", f"unknown workload `{workload}`",
                                        help=suggestion_help(workload, spec.workloads, "workloads"))])
        workload = spec.workloads[workload]
    reports = {}
    for done, (name, d) in enumerate(spec.deployments.items()):
        if on_progress is not None:
            on_progress(f"simulating `{name}`" + (" and its goodput" if with_goodput else ""), done,
                        len(spec.deployments))
        reports[name] = simulate_deployment(spec, d, workload=workload, with_goodput=with_goodput, seed=seed)
    return reports
