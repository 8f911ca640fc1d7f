"""An instance as the simulator runs it, built in one place: the cost model of its GPU, link and
parallelism (plus the streaming overhead of offloaded weights), its KV pool, its scheduler and
its role. The optimizer builds them from the shapes it measures, `flowc.estimate` and
`flowc.simulate` from the configuration they predict, and the verifier, the HTML report,
`flowc autotune` and `flowc run --replay` from a plan's groups (`plan_instances`).
"""

from __future__ import annotations

import functools
from typing import Literal, Optional

from flowc.compiler.model.cost import CostModel, Parallelism, StreamedCost
from flowc.compiler.model.simulator import InstanceConfig, StepCost, simulate
from flowc.compiler.model.topology import cluster_nodes
from flowc.compiler.plan import DeploymentPlan, InstanceGroup, Scheduler
from flowc.compiler.spec import GPU, Link, Model, Spec

Role = Literal["colocated", "prefill", "decode"]
Router = Literal["round_robin", "least_work"]
# Plans are judged behind the router flowc.simulate and the goodput searches use.
ROUTER: Router = "least_work"


@functools.lru_cache(maxsize=256)
def _cost_model(model_json: str, gpu_json: str, link_json: str, parallelism: Parallelism,
                inter_link_json: Optional[str], engine: Optional[str]) -> CostModel:
    return CostModel(Model.model_validate_json(model_json), GPU.model_validate_json(gpu_json),
                     Link.model_validate_json(link_json), parallelism=parallelism,
                     inter_link=Link.model_validate_json(inter_link_json) if inter_link_json else None, engine=engine)


def cost_model(model: Model, gpu: GPU, link: Link, parallelism: Parallelism = Parallelism(),
               inter_link: Optional[Link] = None, engine: Optional[str] = None) -> CostModel:
    """The cost model of one pipeline stage on `engine` (None: the default engine), shared by
    every instance of the same configuration (its step times are cached as they are asked for)."""
    return _cost_model(model.model_dump_json(), gpu.model_dump_json(), link.model_dump_json(), parallelism,
                       inter_link.model_dump_json() if inter_link is not None else None, engine)


def instance_config(model: Model, gpu: GPU, link: Link, *, kv_capacity_tokens: int, tp: int = 1, pp: int = 1,
                    ep: int = 1, scheduler: Scheduler = Scheduler(), role: Role = "colocated",
                    inter_link: Optional[Link] = None, offload_step_s: float = 0.0,
                    engine: Optional[str] = None) -> InstanceConfig:
    """One instance of `model` on tp x pp `gpu`s joined by `link` (`inter_link`: the network its
    pipeline hops and KV transfers cross, if any), holding `kv_capacity_tokens` of KV, run by
    `engine` (model/engines.py; None: the default). Offloaded weights add `offload_step_s` to
    every step (`cost.StreamedCost`)."""
    cost = cost_model(model, gpu, link, Parallelism(tp=tp, pp=pp, ep=ep), inter_link, engine)
    step: StepCost = StreamedCost(cost, offload_step_s) if offload_step_s > 0 else cost
    return InstanceConfig(cost=step, kv_capacity_tokens=kv_capacity_tokens, scheduler=scheduler, pp=pp, role=role,
                          mixed_prefill=cost.engine.mixed_prefill, request_latency=cost.request_time)


def group_config(spec: Spec, dp: DeploymentPlan, g: InstanceGroup, *, link: Link,
                 inter_link: Optional[Link] = None) -> InstanceConfig:
    """An instance of a plan's group: the plan's KV pool (its blocks of `block_size` tokens),
    scheduler, role and offload overhead."""
    model = spec.deployments[dp.name].model
    return instance_config(model, spec.gpus[g.gpu], link,
                           kv_capacity_tokens=g.memory.kv_blocks * g.scheduler.block_size,
                           tp=g.tp, pp=g.pp, ep=g.ep, scheduler=g.scheduler, role=g.role, inter_link=inter_link,
                           offload_step_s=g.memory.offload_step_s, engine=dp.engine)


def plan_instances(spec: Spec, dp: DeploymentPlan) -> list[InstanceConfig]:
    """Every instance of a deployment's plan as placed. An instance's link is its first node's;
    it crosses the cluster's network (`inter_link`) when its stages span nodes, or when it is a
    prefill instance and a decode instance is not on its (single) node."""
    cluster = spec.clusters[spec.deployments[dp.name].cluster]
    nodes = cluster_nodes(cluster)
    decode_nodes = [{ref.node for ref in inst.gpus} for g in dp.groups if g.role == "decode" for inst in g.instances]
    instances = []
    for g in dp.groups:
        for inst in g.instances:
            on = {ref.node for ref in inst.gpus}
            remote = len(on) > 1 or (g.role == "prefill" and any(q != on for q in decode_nodes))
            instances.append(group_config(spec, dp, g, link=nodes[inst.gpus[0].node].link,
                                          inter_link=cluster.network if remote else None))
    return instances


def simulate_plan_deployment(spec: Spec, dp: DeploymentPlan, requests, *, router: Router = ROUTER):
    """Simulate `requests` on every instance of the deployment's plan behind `router`: what the
    verifier checks the plan's predictions against, and what the report draws."""
    return simulate(requests, plan_instances(spec, dp), router=router)


def simulate_plan_instance(spec: Spec, dp: DeploymentPlan, group_index: int, requests):
    """Simulate `requests` on ONE instance of the plan's group `group_index`, on its own (no
    network): what the plan predicts for a replay on that instance (`flowc run --replay`)."""
    g = dp.groups[group_index]
    node = cluster_nodes(spec.clusters[spec.deployments[dp.name].cluster])[g.instances[0].gpus[0].node]
    return simulate(requests, [group_config(spec, dp, g, link=node.link)])
