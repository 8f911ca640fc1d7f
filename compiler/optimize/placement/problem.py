"""The placement problem's data: nodes and node groups with their link domains, the placeable
candidates with scaled capacities, and which deployments have KV traffic that might cross nodes."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

from flowc.compiler import spec
from flowc.compiler.diagnostics import Diagnostic, FlowError
from flowc.compiler.optimize.placement.types import Candidate, Demand

RPS_SCALE = 1000  # capacities and loads in milli-requests/s
# The most GPUs of one cluster placed: the problem lists every node and link domain, so a typo
# such as `gpu h100-sxm x 1e12` would otherwise exhaust memory before CP-SAT starts.
COST_SCALE = 10_000  # prices in 1e-4 usd/h


@dataclass(frozen=True)
class Node:
    index: int
    group: int
    gpu: str
    gpus: int
    domains: tuple[tuple[int, int], ...]  # (first GPU index, size)
    nic: float  # bytes/s per direction, 0 without a network
    price: Optional[float]  # usd per GPU-hour


@dataclass
class Group:
    index: int
    gpu: str
    nodes: list[Node]
    price: Optional[float]
    nic: float

    def classes(self) -> dict[int, list[tuple[int, int, int]]]:
        """domain size -> [(node, start, size)] over the group's nodes, in node order."""
        out: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
        for node in self.nodes:
            for start, size in node.domains:
                out[size].append((node.index, start, size))
        return dict(sorted(out.items(), reverse=True))


@dataclass(frozen=True)
class Cand:
    c: Candidate
    idx: int
    dep: str
    cap: int  # scaled capacity

    @property
    def tp(self) -> int:
        return self.c.tp

    @property
    def pp(self) -> int:
        return self.c.pp

    @property
    def gpus(self) -> int:
        return self.c.gpus

    @property
    def role(self) -> str:
        return self.c.role


def _domains(gpus_per_node: int, link_domain: int) -> tuple[tuple[int, int], ...]:
    size = max(1, min(link_domain, gpus_per_node))
    return tuple((s, min(size, gpus_per_node - s)) for s in range(0, gpus_per_node, size))


def scale_rps(x: float) -> int:
    return int(round(x * RPS_SCALE))


def scale_load(x: float) -> int:
    return max(0, math.ceil(x * RPS_SCALE - 1e-6))


class Problem:
    def __init__(self, cluster: spec.Cluster, gpus: dict[str, spec.GPU], demands: list[Demand],
                 candidates: list[Candidate]):
        if cluster.total_gpus > spec.MAX_CLUSTER_GPUS:
            raise FlowError([Diagnostic("F0307", f"cluster `{cluster.name}` has {cluster.total_gpus:,} GPUs; flowc "
                                        f"places at most {spec.MAX_CLUSTER_GPUS:,}",
                                        help="declare the nodes you deploy on (`node x N`, `gpu NAME x N`)")])
        self.cluster = cluster
        names = [d.deployment for d in demands]
        if len(set(names)) != len(names):
            raise ValueError("a deployment appears twice in demands")
        for d in demands:
            if d.replicas is not None and (not d.replicas or any(not isinstance(r, int) or r < 0
                                                                  for r in d.replicas)):
                raise ValueError(f"deployment {d.deployment}: replicas must be a non-empty set of integers >= 0")
        self.demands = {d.deployment: d for d in demands}
        self.order = names
        keys = [c.key for c in candidates]
        if len(set(keys)) != len(keys):
            raise ValueError("candidate keys must be unique")
        nic = (cluster.network.bandwidth * cluster.network_nics) if cluster.network else 0.0
        self.network = cluster.network is not None
        self.nodes: list[Node] = []
        self.groups: list[Group] = []
        for gi, ng in enumerate(cluster.nodes):
            price = ng.price / ng.gpus_per_node if ng.price is not None else (
                gpus[ng.gpu].price if ng.gpu in gpus else None)
            group = Group(gi, ng.gpu, [], price, nic)
            for _ in range(ng.count):
                node = Node(len(self.nodes), gi, ng.gpu, ng.gpus_per_node, _domains(ng.gpus_per_node, ng.link_domain),
                            nic, price)
                self.nodes.append(node)
                group.nodes.append(node)
            self.groups.append(group)
        self.type_gpus: dict[str, int] = defaultdict(int)
        self.type_nodes: dict[str, int] = defaultdict(int)
        max_domain: dict[str, int] = defaultdict(int)
        for node in self.nodes:
            self.type_gpus[node.gpu] += node.gpus
            self.type_nodes[node.gpu] += 1
            max_domain[node.gpu] = max(max_domain[node.gpu], max(s for _, s in node.domains))
        self.max_domain = dict(max_domain)
        self.cands: list[Cand] = []
        self.unplaceable: list[Candidate] = []
        for c in candidates:
            if c.deployment not in self.demands:
                raise ValueError(f"candidate {c.key} belongs to deployment {c.deployment!r}, which has no demand")
            if c.tp < 1 or c.pp < 1 or c.capacity_rps < 0 or c.kv_bytes_per_request < 0:
                raise ValueError(f"candidate {c.key}: tp and pp must be >= 1, capacity and KV bytes >= 0")
            d = self.demands[c.deployment]
            if (c.tp > max_domain.get(c.gpu, 0) or c.gpus > self.type_gpus.get(c.gpu, 0)
                    or (d.max_gpus is not None and c.gpus > d.max_gpus)):
                self.unplaceable.append(c)
                continue
            self.cands.append(Cand(c, len(self.cands), c.deployment, scale_rps(c.capacity_rps)))
        self.by_dep: dict[str, list[Cand]] = {n: [c for c in self.cands if c.dep == n] for n in names}
        for n in names:
            if self.demands[n].objective == "min_cost":
                for c in self.by_dep[n]:
                    if any(g.price is None for g in self.groups if g.gpu == c.c.gpu):
                        raise ValueError(f"objective min_cost of {n}: GPU type {c.c.gpu} has no price")
        self.used_types = sorted({c.c.gpu for c in self.cands})
        # KV: deployments whose prefill->decode traffic might cross nodes
        self.kv_out: dict[str, float] = {}  # bytes/s cap of KV leaving all nodes for d (kv * load)
        self.kv_in: dict[str, float] = {}
        for n in names:
            load = self.demands[n].load_rps
            pre = [c.c.kv_bytes_per_request for c in self.by_dep[n] if c.role == "prefill"]
            dec = [c.c.kv_bytes_per_request for c in self.by_dep[n] if c.role == "decode"]
            if pre and dec and max(pre + dec) > 0:
                types = {c.c.gpu for c in self.by_dep[n]}
                if sum(self.type_nodes[t] for t in types) > 1:
                    kv = max(pre + dec)
                    self.kv_out[n] = kv * max(load, 0.0)
                    self.kv_in[n] = kv * max(load, 0.0)
        self.kv_deps = list(self.kv_out)
        self.per_node = self._needs_per_node()

    def _needs_per_node(self) -> bool:
        # a pipelined candidate that could span nodes without a network
        if not self.network:
            for c in self.cands:
                if c.pp > 1 and self.type_nodes[c.c.gpu] > 1:
                    return True
        # a KV constraint that could bind on some node
        for g in self.groups:
            out = sum(self.kv_out[n] for n in self.kv_deps if any(c.c.gpu == g.gpu for c in self.by_dep[n]))
            if out > 0 and out > g.nic * (1 - 1e-9):
                return True
        return False

    def relevant_nodes(self) -> list[Node]:
        return [v for v in self.nodes if v.gpu in self.used_types]

    def node_bound(self, c: Cand) -> bool:
        """Candidates whose node matters: prefill/decode of a deployment with KV rows, and without a
        network the pipelined ones (all their stages on one node). Others are pooled per group."""
        return (c.dep in self.kv_deps and c.role != "colocated") or (not self.network and c.pp > 1)
