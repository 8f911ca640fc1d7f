"""Instance shapes a deployment may take: which GPU type, TP and PP, and what each one's GPU
memory holds. The checker uses them for early feasibility errors; the simulator's baseline
configuration and the optimizer start from them."""

from __future__ import annotations

from dataclasses import dataclass

from flowc.compiler.model.memory import MemoryBudget, memory_budget
from flowc.compiler.spec import Deployment, Model, Spec


@dataclass(frozen=True)
class Shape:
    gpu: str
    tp: int
    pp: int
    budget: MemoryBudget

    @property
    def gpus(self) -> int:
        return self.tp * self.pp


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def valid_tp(m: Model) -> list[int]:
    """TP degrees that split the attention heads evenly (KV heads split or replicate whole)."""
    return [t for t in divisors(m.heads) if m.mla or m.kv_heads % t == 0 or t % m.kv_heads == 0]


def instance_shapes(spec: Spec, d: Deployment) -> list[Shape]:
    """Every (GPU, tp, pp) the deployment allows, with its memory budget at the smallest token
    budget allowed (the most room for KV). TP stays inside one link domain."""
    m, cluster = d.model, spec.clusters[d.cluster]
    limit = min(d.max_gpus or cluster.total_gpus, cluster.total_gpus)
    tps = d.search.get("tp") or valid_tp(m)
    pps = d.search.get("pp") or divisors(m.layers)
    tokens = min(d.search.get("max_batched_tokens", [2048]))
    seqs = min(d.search.get("max_seqs", [256]))
    block = min(d.search.get("block_size", [16]))
    shapes = []
    for gpu in dict.fromkeys(group.gpu for group in cluster.nodes):
        domain = max(group.link_domain for group in cluster.nodes if group.gpu == gpu)
        for tp in tps:
            for pp in pps:
                if tp <= domain and tp * pp <= limit:
                    budget = memory_budget(m, spec.gpus[gpu].memory, tp=tp, pp=pp, max_batched_tokens=tokens,
                                           max_seqs=seqs, block_size=block, vendor=spec.gpus[gpu].vendor)
                    shapes.append(Shape(gpu, tp, pp, budget))
    return shapes
