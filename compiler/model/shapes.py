"""Instance shapes a deployment may take: which GPU type, TP and PP, and what each one's GPU
memory holds. The checker uses them for early feasibility errors; the simulator's baseline
configuration and the optimizer start from them."""

from __future__ import annotations

from dataclasses import dataclass

from flowc.compiler.model.memory import MemoryBudget, memory_budget
from flowc.compiler.model.parallelism import domain_problem
from flowc.compiler.model.search import pp_choices, roomiest_scheduler, tp_choices
from flowc.compiler.spec import Deployment, Spec


@dataclass(frozen=True)
class Shape:
    gpu: str
    tp: int
    pp: int
    budget: MemoryBudget

    @property
    def gpus(self) -> int:
        return self.tp * self.pp


def instance_shapes(spec: Spec, d: Deployment) -> list[Shape]:
    """Every (GPU, tp, pp) the deployment allows, with its memory budget at the allowed
    scheduler setting that leaves the most room for KV. TP stays inside one link domain."""
    m, cluster = d.model, spec.clusters[d.cluster]
    limit = min(d.max_gpus or cluster.total_gpus, cluster.total_gpus)
    scheduler = roomiest_scheduler(d)
    shapes = []
    for gpu in dict.fromkeys(group.gpu for group in cluster.nodes):
        domain = max(group.link_domain for group in cluster.nodes if group.gpu == gpu)
        for tp in tp_choices(d):
            for pp in pp_choices(d):
                if domain_problem(tp, domain) is None and tp * pp <= limit:
                    budget = memory_budget(m, spec.gpus[gpu].memory, tp=tp, pp=pp, scheduler=scheduler,
                                           vendor=spec.gpus[gpu].vendor)
                    shapes.append(Shape(gpu, tp, pp, budget))
    return shapes
