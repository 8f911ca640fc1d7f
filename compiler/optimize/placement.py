"""Placement: how many instances of each candidate to run, and on which GPUs (CP-SAT).

Input: a cluster, the deployments sharing it (`Demand`: objective, load, `max_gpus`) and, per
deployment, candidate instance types (`Candidate`: GPU type, TP, PP, role, the capacity one
instance sustains under the SLO, the KV bytes a request sends from prefill to decode).
Output: a `Placement` with the exact GPUs of every instance, or `PlacementInfeasible`.

Rules
-----
* A GPU hosts at most one instance. A TP group (one pipeline stage) lies inside one link
  domain of one node (`link_domain` consecutive GPU indices; the last block of a node may be
  smaller). Inside a domain every GPU reaches every other (NVSwitch), so a domain only has to
  hold the sum of its groups' sizes.
* The stages of one instance may sit in different domains or nodes; crossing nodes needs
  the cluster's `network`; without one every stage of an instance is on one node.
* The candidate's GPU type is the node group's GPU.
* Goodput of a deployment: the sum of its colocated instances' capacities, or for a
  disaggregated deployment min(prefill sum, decode sum). A deployment is one or the other
  (its plan has one mode): a boolean picks the mode when it has candidates of both kinds.
  Goodput >= load; GPUs <= `max_gpus`.
* KV traffic of a disaggregated deployment d (documented model, conservative, independent of
  how a router pairs requests): a prefill instance of capacity c sends at most
  kv * min(c, load) bytes/s, split evenly over its pp stages, so node v sends at most
  out(v, d) = min(kv * load, sum over prefill stages on v of kv * min(c, load) / pp);
  received traffic in(v, d) likewise from decode stages. If all of d sits on one node nothing
  crosses the network; otherwise every prefill stage's KV counts as leaving its node (even
  when a decode instance shares the node) and, per node and direction,
  sum over d of out(v, d) <= network.bandwidth * network_nics (and the same for in). Without a
  network the bandwidth is 0: a disaggregated deployment with KV traffic then lives on one
  node. Pipeline activations between stages on different nodes are not charged to the network.
* Cost: a GPU costs its node group's price / gpus_per_node when the group has a price, else
  the GPU's own price; only GPUs that host an instance are charged.

Scaling to integers
-------------------
Capacities and loads in 1/RPS_SCALE req/s (milli-req/s): capacities rounded to the nearest
unit, loads rounded up. Prices in 1/COST_SCALE usd/h (rounded to nearest). KV coefficients in
units of max(bandwidth, KV load)/1e6 bytes/s, traffic rounded up and bandwidth down (safe).

Model
-----
One integer n_c per candidate (instances of a candidate are interchangeable: counts, never
per-instance booleans) and, per deployment, K_d (GPUs), G_d (goodput), cost_d. Three
placement layers, all exact for the rules above (checked against brute force in the tests):

* aggregated: used when no KV row can bind (no disaggregated deployment, or the sum of
  kv * load of all of them fits every node's NIC) and stages may cross nodes (a network, or
  no pipelined candidate with more than one node of its type). Per (candidate, node group)
  stage counts x_cg with sum_g x_cg = pp_c * n_c: identical nodes of a group are one pool,
  so they carry no symmetry at all. Per class of equal-size domains of a group: when the TP
  sizes form a divisibility chain dividing the domain size (1, 2, 4, 8 in 8) one capacity row
  is exact (divisible sizes pack perfectly, first fit decreasing); otherwise integer counts
  of domains using each maximal pattern (multiset of TP sizes filling a domain); beyond
  PATTERN_LIMIT patterns, per-domain counts ordered by load.
* configs (node configurations, Gilmore-Gomory style): used otherwise when it fits.
  "Node-bound" candidates are those whose node matters: prefill/decode of a deployment with
  KV rows, and without a network the pipelined ones. Every filling of one node with
  node-bound TP groups that packs into its domains, forms whole instances where it must and
  obeys the node's KV rule is enumerated (per group, up to CONFIG_LIMIT); z_gQ counts the
  nodes of group g using configuration Q. A configuration also exists in "local" variants
  where some deployments live on this node only (KV free; a boolean per deployment allows at
  most one such node and then no other node of it); local variants that are worse in goodput
  for the same GPUs and the same other content are dropped. The other ("pooled") candidates
  take the room the configurations leave: with TP sizes in a divisibility chain, one row per
  size s, sum_{tp >= s} tp * x_cg <= sum_Q z_gQ * sum_domains s * floor(free / s), is exact
  (the room at each size level does not depend on where the larger groups went). Its LP is
  the configuration LP, tight where the per-node model's is weak (bin packing of instances
  under per-node KV limits: 64 nodes near the limit solve in 0.1 s instead of timing out).
* per node (the fallback when configurations are too many or the pooled TP sizes are not a
  chain): node-bound TP groups per (node, domain, candidate), pooled slots per (node, domain,
  TP size), instance counts per node without a network, and linear KV rows per node and
  direction (the min with kv * load is kept only where it can matter) with the one-node
  boolean; a row's right-hand side is lowered to the largest sum its stages can reach. No
  explicit ordering of identical nodes: it hid the symmetry from CP-SAT's own detection,
  which with the "max_lp_sym" subsolver (added to the portfolio) closes bounds the default
  2-worker portfolio does not (measured: 20 s -> 0.04 s on a 64-node instance).

Objectives and several deployments
----------------------------------
Deployments are optimized lexicographically in the order of `demands` (the first has
priority). For each in turn, with the earlier ones' results locked as constraints:

* min_gpus: minimize K_d, then (tie-break) maximize G_d;
* min_cost: minimize cost_d, then maximize G_d;
* max_goodput_per_gpu: maximize G_d / K_d exactly by Dinkelbach's method: from a feasible
  ratio a/b, maximize b*G_d - a*K_d; a positive optimum gives a better ratio, zero proves
  a/b optimal (each step is an integer CP-SAT solve, so the ratio is exact in the scaled
  units; typically 2-3 steps); then (tie-break) minimize K_d at that ratio. The deployment
  needs >= 1 instance. With `ratio_tolerance` t > 0 the tie-break takes the fewest GPUs with
  ratio >= (1 - t) * best, then the most goodput at those GPUs.

Locks: K_d <= k*, G_d >= g*, cost_d <= c*, b*G_d >= a*K_d. Guarantee (when every solve is
OPTIMAL): the result is the lexicographic optimum over (deployment 1 objective, its
tie-break, deployment 2 objective, ...). It is Pareto-optimal, so no deployment can improve
its objective by moving only its own instances while the others keep theirs; a later
deployment's optimum is conditional on the earlier ones being optimal. When the time limit
cuts a solve, the best solution found is locked instead, status is "feasible" and the gap is
reported per deployment (for a ratio: from the last Dinkelbach step's bound,
ratio <= a/b + UB / (b * K_min), K_min >= load / best instance ratio). Time: each deployment
gets an equal share of what is left; the first feasible solution may use all of it.
Placement.objective/bound are the first deployment's; Placement.gap is the largest gap.

Exact GPUs: after solving, counts become GPUs deterministically: patterns or configurations
go to nodes in node order, TP groups are laid out largest first from the domain's first GPU,
an instance's stages stay on one node whenever a node has room for all of them. With
workers > 1 CP-SAT may return a different optimum of equal value from run to run (not seen
in the benchmarks); workers=1 is deterministic.

Binding constraints (`Placement.binding`) are tight constraints, not a sensitivity analysis:
a GPU type fully used, free GPUs that no candidate fits (link domains), max_gpus leaving no
room for another instance, a deployment kept on one node by the KV rule, NICs >= 80% used.

Infeasible: PlacementInfeasible names the first deployment that cannot be served: one that
cannot reach its load alone on the cluster, else the first in priority order that cannot
reach it next to the ones before it (served at their loads); with its largest servable load
(max goodput, solved) and the GPUs its load needs given enough nodes (a knapsack over its
candidates, ignoring the cluster size, max_gpus and KV rows).
"""

from __future__ import annotations

import itertools
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Literal, Optional

from ortools.sat.python import cp_model

from flowc.compiler import spec
from flowc.compiler.plan import GpuRef

RPS_SCALE = 1000  # capacities and loads in milli-requests/s
COST_SCALE = 10_000  # prices in 1e-4 usd/h
PATTERN_LIMIT = 2000  # domain patterns per class before falling back to per-domain counts
CONFIG_LIMIT = 4000  # node configurations per group before falling back to the per-node layer
_LAYER: Optional[str] = None  # tests force a layer ("per-node" or "configs") where both apply
TOLERANCE_STEPS = 10_000  # ratio_tolerance resolution: 1e-4
KV_UNITS = 1_000_000  # the largest KV quantity (bandwidth or load) maps to this many units

Role = Literal["colocated", "prefill", "decode"]
Objective = Literal["max_goodput_per_gpu", "min_gpus", "min_cost"]


@dataclass(frozen=True)
class Candidate:
    deployment: str
    key: str  # unique, e.g. "chatbot/h100-sxm/tp4/pp1/colocated"
    gpu: str  # GPU type; only nodes of this type can host it
    tp: int
    pp: int
    role: Role
    capacity_rps: float  # requests/s one instance sustains under the deployment's SLO
    kv_bytes_per_request: float = 0.0  # prefill -> decode KV traffic per request (disaggregated only)

    @property
    def gpus(self) -> int:
        return self.tp * self.pp


@dataclass(frozen=True)
class Demand:
    deployment: str
    objective: Objective
    load_rps: float  # the workload's arrival rate: the plan must serve at least this
    max_gpus: Optional[int] = None


@dataclass
class PlacedInstance:
    candidate_key: str
    gpus: list[GpuRef]  # gpus[stage * tp + rank]


@dataclass
class DeploymentPlacement:
    deployment: str
    objective: Objective
    mode: Literal["colocated", "disaggregated"]
    instances: list[PlacedInstance]
    goodput_rps: float  # sum of capacities; disaggregated: min(prefill sum, decode sum)
    gpus: int
    cost_per_hour: Optional[float]  # None when a GPU used has no price
    objective_value: float  # GPUs, usd/h or req/s per GPU, as the objective says
    bound: float  # best bound on objective_value (given the earlier deployments' locks)
    gap: float
    optimal: bool
    prefill_rps: float = 0.0
    decode_rps: float = 0.0


@dataclass
class Placement:
    deployments: dict[str, DeploymentPlacement]
    status: Literal["optimal", "feasible"]
    objective: float  # the first (highest-priority) deployment's objective value
    bound: float  # and its bound
    gap: float  # the largest relative gap over all deployments
    wall_s: float
    binding: list[str] = field(default_factory=list)
    model: Literal["aggregated", "configs", "per-node"] = "aggregated"
    solves: int = 0

    def instances(self, deployment: str) -> list[PlacedInstance]:
        return self.deployments[deployment].instances


class PlacementError(Exception):
    pass


class PlacementInfeasible(PlacementError):
    """The loads cannot be served. `max_goodput_rps[d]`: the largest load deployment d could be
    served at (with the deployments before it served); `gpus_needed[d]`: the fewest GPUs of its
    candidates' types that serve its load given enough nodes (ignoring the cluster's size and
    `max_gpus`; None when no candidate can serve it)."""

    def __init__(self, deployment: str, message: str, max_goodput_rps: dict[str, float],
                 gpus_needed: dict[str, Optional[int]], load_rps: dict[str, float]):
        super().__init__(message)
        self.deployment = deployment
        self.message = message
        self.max_goodput_rps = max_goodput_rps
        self.gpus_needed = gpus_needed
        self.load_rps = load_rps


class PlacementTimeout(PlacementError):
    """No feasible placement was found within the time limit (none proven impossible either)."""


# ----------------------------------------------------------------------------------------------
# topology and problem data


@dataclass(frozen=True)
class _Node:
    index: int
    group: int
    gpu: str
    gpus: int
    domains: tuple[tuple[int, int], ...]  # (first GPU index, size)
    nic: float  # bytes/s per direction, 0 without a network
    price: Optional[float]  # usd per GPU-hour


@dataclass
class _Group:
    index: int
    gpu: str
    nodes: list[_Node]
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
class _Cand:
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


def _scale_rps(x: float) -> int:
    return int(round(x * RPS_SCALE))


def _scale_load(x: float) -> int:
    return max(0, math.ceil(x * RPS_SCALE - 1e-6))


class _Problem:
    def __init__(self, cluster: spec.Cluster, gpus: dict[str, spec.GPU], demands: list[Demand],
                 candidates: list[Candidate]):
        self.cluster = cluster
        names = [d.deployment for d in demands]
        if len(set(names)) != len(names):
            raise ValueError("a deployment appears twice in demands")
        self.demands = {d.deployment: d for d in demands}
        self.order = names
        keys = [c.key for c in candidates]
        if len(set(keys)) != len(keys):
            raise ValueError("candidate keys must be unique")
        nic = (cluster.network.bandwidth * cluster.network_nics) if cluster.network else 0.0
        self.network = cluster.network is not None
        self.nodes: list[_Node] = []
        self.groups: list[_Group] = []
        for gi, ng in enumerate(cluster.nodes):
            price = ng.price / ng.gpus_per_node if ng.price is not None else (
                gpus[ng.gpu].price if ng.gpu in gpus else None)
            group = _Group(gi, ng.gpu, [], price, nic)
            for _ in range(ng.count):
                node = _Node(len(self.nodes), gi, ng.gpu, ng.gpus_per_node, _domains(ng.gpus_per_node, ng.link_domain),
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
        self.cands: list[_Cand] = []
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
            self.cands.append(_Cand(c, len(self.cands), c.deployment, _scale_rps(c.capacity_rps)))
        self.by_dep: dict[str, list[_Cand]] = {n: [c for c in self.cands if c.dep == n] for n in names}
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

    def relevant_nodes(self) -> list[_Node]:
        return [v for v in self.nodes if v.gpu in self.used_types]


# ----------------------------------------------------------------------------------------------
# the CP-SAT model


def _max_reachable(items: list[tuple[int, int]], gpus: int, limit: int, max_states: int = 200_000) -> int:
    """The largest sum <= limit of item coefficients over multisets of items (coefficient, GPUs)
    using at most `gpus` GPUs: a KV row's right-hand side can be lowered to it without cutting any
    integer solution (it tightens the LP). Returns `limit` when the state space grows too big."""
    reach: list[set[int]] = [set() for _ in range(gpus + 1)]
    reach[0].add(0)
    states = 1
    for g in range(gpus + 1):
        for total in list(reach[g]):
            for k, size in items:
                if g + size <= gpus and total + k <= limit and total + k not in reach[g + size]:
                    reach[g + size].add(total + k)
                    states += 1
                    if states > max_states:
                        return limit
    return max(max(r) for r in reach if r)


def _multisets(items: list[tuple[int, int]], room: int, limit: int) -> Optional[list[tuple[tuple[int, int], ...]]]:
    """Multisets of (key, size) items whose sizes sum to <= room, as ((key, count), ...); None
    beyond `limit` of them."""
    out: list[tuple[tuple[int, int], ...]] = []

    def rec(i: int, left: int, chosen: list[tuple[int, int]]) -> bool:
        if i == len(items):
            out.append(tuple(chosen))
            return len(out) <= limit
        key, size = items[i]
        for k in range(left // size + 1):
            if k:
                chosen.append((key, k))
            ok = rec(i + 1, left - k * size, chosen)
            if k:
                chosen.pop()
            if not ok:
                return False
        return True

    return out if rec(0, room, []) else None


def _chain_divisible(sizes: list[int], domain: int) -> bool:
    s = sorted(sizes)
    return all(b % a == 0 for a, b in zip(s, s[1:])) and domain % s[-1] == 0


def _maximal_patterns(sizes: list[int], domain: int, limit: int) -> Optional[list[tuple[int, ...]]]:
    """Multisets of `sizes` (counts, same order) summing to <= domain to which no size can be added."""
    sizes = sorted(sizes, reverse=True)
    smallest = min(sizes)
    out: list[tuple[int, ...]] = []

    def rec(i: int, room: int, counts: list[int]) -> bool:
        if i == len(sizes):
            if room < smallest:
                out.append(tuple(counts))
            return len(out) <= limit
        for k in range(room // sizes[i], -1, -1):
            counts.append(k)
            ok = rec(i + 1, room - k * sizes[i], counts)
            counts.pop()
            if not ok:
                return False
        return True

    return out if rec(0, domain, []) else None


@dataclass
class _DomainClass:
    group: int
    size: int
    domains: list[tuple[int, int, int]]  # (node, start, size)
    sizes: list[int]  # TP sizes that may go here, descending
    kind: str  # "div" | "pat" | "dom"
    slots: dict[int, object] = field(default_factory=dict)  # tp -> var/expr of slot count
    patterns: list[tuple[int, ...]] = field(default_factory=list)  # kind "pat", counts aligned with sizes
    pattern_vars: list = field(default_factory=list)
    domain_vars: list[dict[int, object]] = field(default_factory=list)  # kind "dom": per domain tp -> var


@dataclass(frozen=True)
class _Config:
    """What one node of a group holds of the node-bound candidates: TP groups per domain."""

    domains: tuple[tuple[tuple[int, int], ...], ...]  # per domain: ((candidate index, TP groups), ...)
    stages: tuple[tuple[int, int], ...]  # (candidate index, stages on the node)
    residual: tuple[int, ...]  # free GPUs per domain
    local: frozenset  # deployments whose KV stays on this node (they live on this node only)
    present: frozenset  # KV deployments with stages here


class _Model:
    def __init__(self, p: _Problem, active: list[str], enforce_load: set[str], *,
                 need_instance: set[str] = frozenset()):
        self.p = p
        self.active = active
        self.enforce_load = enforce_load
        self.m = cp_model.CpModel()
        self.vars: list = []
        self.ub: dict[int, int] = {}
        self.cands = [c for c in p.cands if c.dep in active]
        m = self.m
        self.n = {}
        for c in self.cands:
            d = p.demands[c.dep]
            ub = p.type_gpus[c.c.gpu] // c.gpus
            if d.max_gpus is not None:
                ub = min(ub, d.max_gpus // c.gpus)
            self.n[c.idx] = self._int(0, ub, f"n[{c.c.key}]")
        self.K, self.G, self.cost, self.P, self.D, self.disagg = {}, {}, {}, {}, {}, {}
        self.cost_expr: dict[str, list] = {d: [] for d in active}
        self.layer = "aggregated"
        if p.per_node:
            configs = None if _LAYER == "per-node" else self._enumerate_configs()
            if configs is not None:
                self.layer = "configs"
                self._configs_layer(configs)
            elif _LAYER == "configs":
                raise ValueError("the configuration layer does not apply")
            else:
                self.layer = "per-node"
                self._per_node_layer()
        else:
            self._aggregated_layer()
        for name in active:
            d = p.demands[name]
            cs = [c for c in self.cands if c.dep == name]
            types = {c.c.gpu for c in cs}
            kmax = sum(p.type_gpus[t] for t in types)
            if d.max_gpus is not None:
                kmax = min(kmax, d.max_gpus)
            self.K[name] = K = self._int(0, kmax, f"K[{name}]")
            m.add(K == sum(c.gpus * self.n[c.idx] for c in cs))
            col = [c for c in cs if c.role == "colocated"]
            pre = [c for c in cs if c.role == "prefill"]
            dec = [c for c in cs if c.role == "decode"]
            gmax = sum(c.cap * self._ub(self.n[c.idx]) for c in cs)
            self.G[name] = G = self._int(0, gmax, f"G[{name}]")
            csum = sum(c.cap * self.n[c.idx] for c in col)
            if pre or dec:
                self.P[name] = P = self._int(0, gmax, f"P[{name}]")
                self.D[name] = D = self._int(0, gmax, f"D[{name}]")
                m.add(P == sum(c.cap * self.n[c.idx] for c in pre))
                m.add(D == sum(c.cap * self.n[c.idx] for c in dec))
                M = self._int(0, gmax, f"M[{name}]")
                m.add_min_equality(M, [P, D])
                m.add(G == csum + M)
                if col:
                    b = self.disagg[name] = self._bool(f"disagg[{name}]")
                    for c in col:
                        m.add(self.n[c.idx] == 0).only_enforce_if(b)
                    for c in pre + dec:
                        m.add(self.n[c.idx] == 0).only_enforce_if(~b)
            else:
                m.add(G == csum)
            if name in enforce_load:
                m.add(G >= _scale_load(d.load_rps))
            if name in need_instance:
                m.add(K >= 1)
            terms = self.cost_expr[name]
            if all(price is not None for _, price, _ in terms):
                cmax = sum(ub * price for _, price, ub in terms)
                self.cost[name] = self._int(0, cmax, f"cost[{name}]")
                m.add(self.cost[name] == sum(v * price for v, price, _ in terms))

    # helpers
    def _int(self, lb: int, ub: int, name: str):
        v = self.m.new_int_var(lb, max(lb, ub), name)
        self.vars.append(v)
        self.ub[v.index] = max(lb, ub)
        return v

    def _bool(self, name: str):
        v = self.m.new_bool_var(name)
        self.vars.append(v)
        self.ub[v.index] = 1
        return v

    def _ub(self, v) -> int:
        return self.ub[v.index]

    @staticmethod
    def _price(price: Optional[float], tp: int) -> Optional[int]:
        return None if price is None else int(round(price * COST_SCALE)) * tp

    # aggregated layer: per (candidate, node group) stage counts, domain classes per group
    def _aggregated_layer(self) -> None:
        p, m = self.p, self.m
        self.x: dict[tuple[int, int], object] = {}
        self.classes: list[_DomainClass] = []
        stages_of = defaultdict(list)
        for g in p.groups:
            cs = [c for c in self.cands if c.c.gpu == g.gpu]
            if not cs:
                continue
            classes = g.classes()
            group_gpus = sum(v.gpus for v in g.nodes)
            per_tp = defaultdict(list)
            for c in cs:
                if c.tp > max(classes):
                    continue
                x = self._int(0, group_gpus // c.tp, f"x[{c.c.key},{g.index}]")
                self.x[(c.idx, g.index)] = x
                stages_of[c.idx].append(x)
                per_tp[c.tp].append(x)
                self.cost_expr[c.dep].append((x, self._price(g.price, c.tp), self._ub(x)))
            if not per_tp:
                continue
            slots = defaultdict(list)
            for size, domains in classes.items():
                sizes = sorted((t for t in per_tp if t <= size), reverse=True)
                if not sizes:
                    continue
                cls = self._domain_class(g.index, size, domains, sizes)
                self.classes.append(cls)
                for t, s in cls.slots.items():
                    slots[t].append(s)
            for t, xs in per_tp.items():
                m.add(sum(xs) <= sum(slots[t]))
        for c in self.cands:
            xs = stages_of.get(c.idx, [])
            m.add(sum(xs) == c.pp * self.n[c.idx]) if xs else m.add(self.n[c.idx] == 0)

    def _domain_class(self, group: int, size: int, domains: list, sizes: list[int]) -> _DomainClass:
        m, count = self.m, len(domains)
        if _chain_divisible(sizes, size):
            cls = _DomainClass(group, size, domains, sizes, "div")
            for t in sizes:
                cls.slots[t] = self._int(0, count * (size // t), f"slots[{group},{size},{t}]")
            m.add(sum(t * cls.slots[t] for t in sizes) <= count * size)
            return cls
        patterns = _maximal_patterns(sizes, size, PATTERN_LIMIT)
        if patterns is not None:
            cls = _DomainClass(group, size, domains, sizes, "pat", patterns=patterns)
            cls.pattern_vars = [self._int(0, count, f"z[{group},{size},{i}]") for i in range(len(patterns))]
            m.add(sum(cls.pattern_vars) == count)
            for i, t in enumerate(sizes):
                cls.slots[t] = sum(z * pat[i] for z, pat in zip(cls.pattern_vars, patterns) if pat[i])
            return cls
        cls = _DomainClass(group, size, domains, sizes, "dom")
        loads = []
        for j in range(count):
            vs = {t: self._int(0, size // t, f"y[{group},{size},{j},{t}]") for t in sizes}
            m.add(sum(t * v for t, v in vs.items()) <= size)
            cls.domain_vars.append(vs)
            loads.append(sum(t * v for t, v in vs.items()))
        for a, b in zip(loads, loads[1:]):
            m.add(a >= b)
        for t in sizes:
            cls.slots[t] = sum(vs[t] for vs in cls.domain_vars)
        return cls

    # configuration layer: per group, how many nodes hold each configuration of node-bound stages
    def _node_kv_ok(self, stages: dict[int, int], local: frozenset, nic: float) -> bool:
        """The documented KV rule for one node holding `stages` (floats, exact)."""
        p = self.p
        for role, caps in (("prefill", p.kv_out), ("decode", p.kv_in)):
            total = 0.0
            for d in p.kv_deps:
                if d in local or d not in self.active:
                    continue
                load = p.demands[d].load_rps
                a = sum(k * c.c.kv_bytes_per_request * min(c.c.capacity_rps, load) / c.pp
                        for c, k in ((p.cands[ci], k) for ci, k in stages.items()) if c.dep == d and c.role == role)
                total += min(caps[d], a)
            if total > nic * (1 + 1e-9) + 1e-9:
                return False
        return True

    def _enumerate_configs(self) -> Optional[dict[int, list[_Config]]]:
        """Every configuration of node-bound stages one node of each group can hold (domain
        packing, whole instances without a network, the node's KV rule), or None when there are
        more than CONFIG_LIMIT or the pooled TP sizes of a group do not form a divisibility chain
        (the pooled rows below are exact only then)."""
        p = self.p
        single_capable = frozenset(d for d in p.kv_deps if d in self.active and self._fits_one_node(d))
        out: dict[int, list[_Config]] = {}
        for g in p.groups:
            cs = [c for c in self.cands if c.c.gpu == g.gpu]
            if not cs:
                continue
            pooled = sorted({c.tp for c in cs if not self._node_bound(c)})
            if any(b % a for a, b in zip(pooled, pooled[1:])):
                return None
            bound = [c for c in cs if self._node_bound(c)]
            node = g.nodes[0]
            per_size: dict[int, list[tuple[tuple[int, int], ...]]] = {}
            for size in sorted({s for _, s in node.domains}):
                ms = _multisets([(c.idx, c.tp) for c in bound if c.tp <= size], size, 50 * CONFIG_LIMIT)
                if ms is None:
                    return None
                per_size[size] = ms
            configs: list[_Config] = []
            local_best: dict[tuple, list[tuple[tuple[int, ...], _Config]]] = {}
            domains = node.domains
            tried = 0

            def rec(j: int, prev: int, chosen: list[int]) -> bool:
                nonlocal tried
                if j == len(domains):
                    tried += 1
                    if tried > 50 * CONFIG_LIMIT:
                        return False
                    self._add_config(configs, local_best, [per_size[domains[i][1]][k] for i, k in enumerate(chosen)],
                                     domains, node.nic, single_capable)
                    return len(configs) <= CONFIG_LIMIT
                size = domains[j][1]
                first = prev if j > 0 and domains[j - 1][1] == size else 0
                for k in range(first, len(per_size[size])):
                    chosen.append(k)
                    ok = rec(j + 1, k, chosen)
                    chosen.pop()
                    if not ok:
                        return False
                return True

            if not rec(0, 0, []):
                return None
            configs += [q for kept in local_best.values() for _, q in kept]
            if len(configs) > CONFIG_LIMIT:
                return None
            out[g.index] = configs
        return out

    def _add_config(self, configs: list[_Config], local_best: dict, per_domain: list[tuple[tuple[int, int], ...]],
                    domains, nic: float, single_capable: frozenset) -> None:
        """Add the variants of one node filling: with every KV deployment's traffic counted, or
        with some deployments kept local (the whole deployment on this node, its KV free). Of
        the local variants that differ only in the local deployments' stages, keep those whose
        goodputs min(prefill, decode) are Pareto-best for the same GPUs: the others are worse
        for every objective and tie-break."""
        p = self.p
        stages: dict[int, int] = defaultdict(int)
        for ms in per_domain:
            for ci, k in ms:
                stages[ci] += k
        if not p.network and any(k % p.cands[ci].pp for ci, k in stages.items()):
            return  # without a network an instance's stages share a node
        residual = tuple(size - sum(p.cands[ci].tp * k for ci, k in ms) for (_, size), ms in zip(domains, per_domain))
        present = frozenset(p.cands[ci].dep for ci in stages if p.cands[ci].dep in p.kv_deps)
        kept: list[frozenset] = []
        options = sorted(present & single_capable)
        for r in range(len(options) + 1):
            for local in map(frozenset, itertools.combinations(options, r)):
                if any(k <= local for k in kept):
                    continue
                if any(k % p.cands[ci].pp for ci, k in stages.items() if p.cands[ci].dep in local):
                    continue  # a local deployment's instances are whole on this node
                if self._node_kv_ok(stages, local, nic):
                    kept.append(local)
        for local in kept:
            q = _Config(tuple(per_domain), tuple(sorted(stages.items())), residual, local, present)
            if not local:
                configs.append(q)
                continue
            deps = sorted(local)
            signature = (tuple(deps), tuple((ci, k) for ci, k in q.stages if p.cands[ci].dep not in local), residual,
                         tuple(sum(p.cands[ci].tp * k for ci, k in q.stages if p.cands[ci].dep == d) for d in deps))
            values, mixed = [], False
            for d in deps:
                caps = {"colocated": 0, "prefill": 0, "decode": 0}
                roles = {p.cands[ci].role for ci, _ in q.stages if p.cands[ci].dep == d}
                mixed = mixed or ("colocated" in roles and len(roles) > 1)
                for ci, k in q.stages:
                    c = p.cands[ci]
                    if c.dep == d:
                        caps[c.role] += c.cap * (k // c.pp)
                values.append(caps["colocated"] if roles == {"colocated"} else min(caps["prefill"], caps["decode"]))
            if mixed:
                continue  # mixes a deployment's modes: never feasible
            values = tuple(values)
            front = local_best.setdefault(signature, [])
            if any(all(a >= b for a, b in zip(other, values)) for other, _ in front):
                continue
            front[:] = [(o, x) for o, x in front if not all(a <= b for a, b in zip(o, values))] + [(values, q)]

    def _configs_layer(self, configs: dict[int, list[_Config]]) -> None:
        p, m = self.p, self.m
        self.configs = configs
        self.z: dict[int, list] = {}
        self.x = {}
        stage_terms = defaultdict(list)
        local_terms = defaultdict(list)
        spread_terms = defaultdict(list)
        pooled_stages = defaultdict(list)
        for gi, cl in configs.items():
            g = p.groups[gi]
            count = len(g.nodes)
            zs = self.z[gi] = [self._int(0, count, f"z[{gi},{i}]") for i in range(len(cl))]
            m.add(sum(zs) == count)
            for z, q in zip(zs, cl):
                per_dep = defaultdict(int)
                priced = g.price is not None
                for ci, k in q.stages:
                    c = p.cands[ci]
                    stage_terms[ci].append(k * z)
                    if priced:
                        per_dep[c.dep] += k * self._price(g.price, c.tp)
                    else:
                        per_dep[c.dep] = None
                for d, price in per_dep.items():
                    if d in self.cost_expr:
                        self.cost_expr[d].append((z, price, count))
                for d in q.local:
                    local_terms[d].append(z)
                for d in q.present - q.local:
                    spread_terms[d].append(z)
            pooled = [c for c in self.cands if c.c.gpu == g.gpu and not self._node_bound(c)]
            tps = sorted({c.tp for c in pooled})
            for c in pooled:
                x = self._int(0, sum(v.gpus for v in g.nodes) // c.tp, f"x[{c.c.key},{gi}]")
                self.x[(c.idx, gi)] = x
                pooled_stages[c.idx].append(x)
                self.cost_expr[c.dep].append((x, self._price(g.price, c.tp), self._ub(x)))
            for s in tps:  # divisible sizes: one row per size threshold is exact (see _configs)
                room = [(z, sum(s * (r // s) for r in q.residual)) for z, q in zip(zs, cl)]
                m.add(sum(c.tp * self.x[(c.idx, gi)] for c in pooled if c.tp >= s)
                      <= sum(k * z for z, k in room if k))
        for c in self.cands:
            terms = pooled_stages.get(c.idx) if not self._node_bound(c) else stage_terms.get(c.idx)
            m.add(sum(terms) == c.pp * self.n[c.idx]) if terms else m.add(self.n[c.idx] == 0)
        self.single = {}
        total_nodes = len(p.nodes)
        for d in sorted(set(local_terms)):
            single = self.single[d] = self._bool(f"single[{d}]")
            m.add(sum(local_terms[d]) <= single)
            if spread_terms.get(d):
                m.add(sum(spread_terms[d]) <= total_nodes * (1 - single))

    # per-node layer: TP groups per domain, stages per node, KV rows
    def _node_bound(self, c: _Cand) -> bool:
        """Candidates whose node matters: prefill/decode of a deployment with KV rows, and without a
        network the pipelined ones (all their stages on one node). Others are pooled per group."""
        return (c.dep in self.p.kv_deps and c.role != "colocated") or (not self.p.network and c.pp > 1)

    def _per_node_layer(self) -> None:
        p, m = self.p, self.m
        self.no_cross = not p.network
        self.y: dict[tuple[int, int, int], object] = {}  # (node, domain index, cand) -> TP groups
        self.q: dict[tuple[int, int, int], object] = {}  # (node, domain index, tp) -> slots of pooled stages
        self.s: dict[tuple[int, int], object] = {}  # (node, cand) -> stages (linear expr)
        self.s_ub: dict[tuple[int, int], int] = {}
        self.w: dict[tuple[int, int], object] = {}  # (node, cand) -> instances (no network)
        self.x = {}  # (cand, group) -> stages of pooled candidates
        pooled_slots: dict[tuple[int, int], list] = defaultdict(list)  # (group, tp) -> q vars
        for v in p.relevant_nodes():
            cs = [c for c in self.cands if c.c.gpu == v.gpu]
            bound = [c for c in cs if self._node_bound(c)]
            tps = sorted({c.tp for c in cs if not self._node_bound(c)}, reverse=True)
            per_c = defaultdict(list)
            for j, (_, size) in enumerate(v.domains):
                load = []
                for c in bound:
                    if c.tp <= size:
                        y = self._int(0, size // c.tp, f"y[{v.index},{j},{c.c.key}]")
                        self.y[(v.index, j, c.idx)] = y
                        per_c[c.idx].append(y)
                        load.append(c.tp * y)
                for t in tps:
                    if t <= size:
                        q = self._int(0, size // t, f"q[{v.index},{j},{t}]")
                        self.q[(v.index, j, t)] = q
                        pooled_slots[(v.group, t)].append(q)
                        load.append(t * q)
                if load:
                    m.add(sum(load) <= size)
            for c in bound:
                if per_c[c.idx]:
                    s = sum(per_c[c.idx])
                    self.s[(v.index, c.idx)] = s
                    self.s_ub[(v.index, c.idx)] = ub = sum(self._ub(y) for y in per_c[c.idx])
                    self.cost_expr[c.dep].append((s, self._price(v.price, c.tp), ub))
                    if self.no_cross:
                        w = self._int(0, v.gpus // c.gpus, f"w[{v.index},{c.c.key}]")
                        self.w[(v.index, c.idx)] = w
                        m.add(s == c.pp * w)
        stages_of = defaultdict(list)
        for g in p.groups:
            per_tp = defaultdict(list)
            for c in self.cands:
                if c.c.gpu == g.gpu and not self._node_bound(c) and pooled_slots.get((g.index, c.tp)):
                    x = self._int(0, sum(v.gpus for v in g.nodes) // c.tp, f"x[{c.c.key},{g.index}]")
                    self.x[(c.idx, g.index)] = x
                    stages_of[c.idx].append(x)
                    per_tp[c.tp].append(x)
                    self.cost_expr[c.dep].append((x, self._price(g.price, c.tp), self._ub(x)))
            for t, xs in per_tp.items():
                m.add(sum(xs) <= sum(pooled_slots[(g.index, t)]))
        for c in self.cands:
            if not self._node_bound(c):
                xs = stages_of.get(c.idx, [])
                m.add(sum(xs) == c.pp * self.n[c.idx]) if xs else m.add(self.n[c.idx] == 0)
            elif self.no_cross:
                ws = [w for (v, ci), w in self.w.items() if ci == c.idx]
                m.add(self.n[c.idx] == sum(ws)) if ws else m.add(self.n[c.idx] == 0)
            else:
                ss = [s for (v, ci), s in self.s.items() if ci == c.idx]
                m.add(sum(ss) == c.pp * self.n[c.idx]) if ss else m.add(self.n[c.idx] == 0)
        self._kv_rows()

    def _kv_rows(self) -> None:
        """Per node and direction: sum over deployments of min(kv * load, sum of stage terms) <= NIC,
        for deployments not on a single node. Where kv * load exceeds the NIC the min is dropped
        (a larger term is infeasible either way), which keeps the rows linear."""
        p, m = self.p, self.m
        deps = [d for d in p.kv_deps if d in self.active]
        self.single: dict[str, object] = {}
        if not deps:
            return
        biggest = max([v.nic for v in p.nodes] + [p.kv_out[d] for d in deps] + [p.kv_in[d] for d in deps])
        unit = biggest / KV_UNITS if biggest > 0 else 1.0
        rows: dict[tuple[int, str], list] = defaultdict(list)
        items: dict[tuple[int, str], list] = defaultdict(list)  # (coefficient, GPUs) of each row's stages
        exact: dict[tuple[int, str], bool] = defaultdict(lambda: True)  # rows without a min
        for d in deps:
            load = p.demands[d].load_rps
            cs = [c for c in self.cands if c.dep == d]
            single = None
            if self._fits_one_node(d):
                single = self.single[d] = self._bool(f"single[{d}]")
                hosts = []
            for v in p.relevant_nodes():
                here = [(c, self.s[(v.index, c.idx)]) for c in cs if (v.index, c.idx) in self.s]
                if not here:
                    continue
                if single is not None:
                    h = self._bool(f"host[{v.index},{d}]")
                    hosts.append(h)
                    for c, s in here:
                        m.add(s == 0).only_enforce_if(~h)
                nic = math.floor(v.nic / unit + 1e-9)
                for direction, role, cap in (("out", "prefill", p.kv_out[d]), ("in", "decode", p.kv_in[d])):
                    terms = [(c.tp, s, math.ceil(c.c.kv_bytes_per_request * min(c.c.capacity_rps, load) / c.pp / unit
                                                 - 1e-9), self.s_ub[(v.index, c.idx)])
                             for c, s in here if c.role == role]
                    terms = [t for t in terms if t[2] > 0]
                    if not terms:
                        continue
                    cap_u = math.ceil(cap / unit - 1e-9)
                    raw = sum(k * s for _, s, k, _ in terms)
                    raw_ub = sum(k * ub for _, _, k, ub in terms)
                    items[(v.index, direction)] += [(k, tp) for tp, _, k, _ in terms]
                    if cap_u > nic or raw_ub <= cap_u:  # the min is raw wherever it matters
                        e = self._int(0, raw_ub, f"kv[{v.index},{d},{direction}]")
                        if single is None:
                            m.add(e == raw)
                        else:
                            m.add(e >= raw - raw_ub * single)
                    else:
                        exact[(v.index, direction)] = False
                        t = self._int(0, cap_u, f"kvmin[{v.index},{d},{direction}]")
                        rawv = self._int(0, raw_ub, f"kvraw[{v.index},{d},{direction}]")
                        m.add(rawv == raw)
                        m.add_min_equality(t, [rawv, cap_u])
                        e = self._int(0, cap_u, f"kv[{v.index},{d},{direction}]")
                        if single is None:
                            m.add(e == t)
                        else:
                            m.add(e >= t - cap_u * single)
                    rows[(v.index, direction)].append(e)
            if single is not None:
                m.add(sum(hosts) <= 1).only_enforce_if(single)
        for key, es in rows.items():
            rhs = math.floor(p.nodes[key[0]].nic / unit + 1e-9)
            if exact[key]:
                rhs = _max_reachable(items[key], p.nodes[key[0]].gpus, rhs)
            m.add(sum(es) <= rhs)

    def _fits_one_node(self, d: str) -> bool:
        """Whether deployment d could possibly serve its load from a single node (an upper bound
        from the best capacity per GPU of each role); if not, its KV always crosses nodes."""
        p = self.p
        if d not in self.enforce_load:
            return True  # (diagnosis: any goodput counts)
        load = _scale_load(p.demands[d].load_rps)
        cs = [c for c in self.cands if c.dep == d]
        for v in p.relevant_nodes():
            best = {}
            for role in ("colocated", "prefill", "decode"):
                rs = [c.cap / c.gpus for c in cs if c.role == role and c.c.gpu == v.gpu]
                best[role] = max(rs, default=0.0) * v.gpus
            if max(best["colocated"], min(best["prefill"], best["decode"])) >= load:
                return True
        return False

    # solving
    def solve(self, sense: Optional[str], expr, time_s: float, workers: int, hint: Optional[dict]) -> "_Result":
        m = self.m
        if sense is None:
            m.clear_objective()
        elif sense == "min":
            m.minimize(expr)
        else:
            m.maximize(expr)
        m.clear_hints()
        if hint:
            for v in self.vars:
                m.add_hint(v, hint[v.index])
        solver = cp_model.CpSolver()
        solver.parameters.max_time_in_seconds = max(0.01, time_s)
        solver.parameters.num_workers = max(1, workers)
        solver.parameters.catch_sigint_signal = False  # Ctrl-C is Python's (see compiler/optimize/arena.py)
        if self.layer == "per-node":
            # the per-node model is symmetric in identical nodes: the LP with symmetry
            # (orbitopes) closes bounds that the default portfolio of 2 workers does not reach
            solver.parameters.extra_subsolvers.append("max_lp_sym")
        status = solver.solve(m)
        vals = None
        if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            vals = {v.index: int(solver.value(v)) for v in self.vars}
        obj = solver.objective_value if sense is not None and vals is not None else None
        bound = solver.best_objective_bound if sense is not None else None
        return _Result(status, vals, obj, bound)


@dataclass
class _Result:
    status: int
    vals: Optional[dict[int, int]]
    obj: Optional[float]
    bound: Optional[float]


class _Infeasible(Exception):
    pass


# ----------------------------------------------------------------------------------------------
# lexicographic optimization


@dataclass
class _Outcome:
    value: float  # in user units
    bound: float
    optimal: bool


class _Lex:
    """Runs the lexicographic phases. Time: each deployment gets an equal share of what is left
    (its primary objective up to 80% of the share, the tie-break the rest; unused time passes
    on); the very first solution may use the whole time limit."""

    def __init__(self, model: _Model, deadline: float, workers: int, ratio_tolerance: float = 0.0):
        self.model, self.deadline, self.workers = model, deadline, workers
        self.ratio_tolerance = ratio_tolerance
        self.cur: Optional[dict[int, int]] = None
        self.solves = 0

    def phase(self, sense: Optional[str], expr, evaluate, until: float) -> tuple[bool, int, Optional[float]]:
        if self.cur is None:
            until = self.deadline
        remaining = min(until, self.deadline) - time.perf_counter()
        if self.cur is not None and remaining <= 0.005:
            return False, evaluate(self.cur), None
        r = self.model.solve(sense, expr, remaining, self.workers, self.cur)
        self.solves += 1
        if r.status == cp_model.INFEASIBLE:
            if self.cur is None:
                raise _Infeasible()
            raise PlacementError("internal error: locking an objective made the placement infeasible")
        if r.status == cp_model.MODEL_INVALID:
            raise PlacementError(f"internal error: invalid CP-SAT model ({self.model.m.validate()})")
        if r.vals is not None:
            self.cur = r.vals
        elif self.cur is None:
            raise PlacementTimeout("no feasible placement found within the time limit; raise time_limit_s")
        return r.status == cp_model.OPTIMAL, evaluate(self.cur), r.bound

    def run(self) -> dict[str, _Outcome]:
        p, mdl, m = self.model.p, self.model, self.model.m
        out = {}
        for i, name in enumerate(p.order):
            now = time.perf_counter()
            share = max(0.0, self.deadline - now) / (len(p.order) - i)
            primary_until, until = now + 0.8 * share, now + share
            d = p.demands[name]
            K, G = mdl.K[name], mdl.G[name]
            if d.objective in ("min_gpus", "min_cost"):
                target = K if d.objective == "min_gpus" else mdl.cost[name]
                opt, v, b = self.phase("min", target, lambda s: s[target.index], primary_until)
                m.add(target <= v)
                opt2, g, _ = self.phase("max", G, lambda s: s[G.index], until)
                m.add(G >= g)
                scale = 1 if d.objective == "min_gpus" else COST_SCALE
                bound = v if opt else max(0.0, b if b is not None else 0.0)
                out[name] = _Outcome(v / scale, bound / scale, opt and opt2)
            else:
                out[name] = self._ratio(name, K, G, primary_until, until)
        return out

    def _ratio(self, name: str, K, G, primary_until: float, until: float) -> _Outcome:
        """Dinkelbach: a/b is the best ratio found; maximize b*G - a*K until the optimum is 0."""
        mdl, m = self.model, self.model.m
        cands = [c for c in mdl.cands if c.dep == name]
        trivial = max((c.cap / c.gpus for c in cands), default=0.0)  # no ratio beats the best instance's
        kmin = min((c.gpus for c in cands), default=1)
        if trivial > 0:
            kmin = max(kmin, math.ceil(_scale_load(mdl.p.demands[name].load_rps) / trivial - 1e-9))
        if self.cur is None:
            self.phase(None, None, lambda s: 0, primary_until)
        a, b = self.cur[G.index], self.cur[K.index]
        optimal, upper = False, trivial
        for _ in range(100):
            opt, val, bnd = self.phase("max", b * G - a * K, lambda s: b * s[G.index] - a * s[K.index], primary_until)
            g1, k1 = self.cur[G.index], self.cur[K.index]
            if opt and g1 * b <= a * k1:
                optimal, upper = True, a / b
                break
            if not opt:
                # every solution has b*G - a*K <= bnd, so G/K <= a/b + bnd / (b*K) with K >= kmin
                if bnd is not None:
                    upper = min(trivial, a / b + max(bnd, 0.0) / (b * max(kmin, 1)))
                if g1 * b > a * k1:
                    a, b = g1, k1
                break
            a, b = g1, k1
        # lock the ratio (within the tolerance, in steps of 1e-4) and take the fewest GPUs at it
        slack = min(TOLERANCE_STEPS, max(0, round(self.ratio_tolerance * TOLERANCE_STEPS)))
        m.add(TOLERANCE_STEPS * b * G >= (TOLERANCE_STEPS - slack) * a * K)
        opt2, k, _ = self.phase("min", K, lambda s: s[K.index], until)
        m.add(K <= k)
        if slack:  # the best ratio at those GPUs
            opt3, g, _ = self.phase("max", G, lambda s: s[G.index], until)
            m.add(G >= g)
            opt2 = opt2 and opt3
        value = self.cur[G.index] / self.cur[K.index]
        return _Outcome(value / RPS_SCALE, max(upper, value) / RPS_SCALE, optimal and opt2)


# ----------------------------------------------------------------------------------------------
# from counts to GPUs


def _carve(node: int, start: int, items: list[tuple[int, object]]) -> list[tuple[object, list[GpuRef]]]:
    """Lay TP groups (size, tag) out in one domain: largest first, consecutive indices."""
    out, offset = [], start
    for size, tag in sorted(items, key=lambda it: -it[0]):
        out.append((tag, [GpuRef(node=node, index=offset + i) for i in range(size)]))
        offset += size
    return out


class _Materializer:
    def __init__(self, model: _Model, vals: dict[int, int]):
        self.model, self.vals, self.p = model, vals, model.p

    def v(self, var) -> int:
        return self.vals[var.index]

    def instances(self) -> dict[int, list[list[GpuRef]]]:
        layers = {"per-node": self._per_node, "configs": self._configs, "aggregated": self._aggregated}
        return layers[self.model.layer]()

    def _aggregated(self) -> dict[int, list[list[GpuRef]]]:
        mdl, p = self.model, self.p
        positions: dict[tuple[int, int], list[tuple[int, list[GpuRef]]]] = defaultdict(list)
        for g in p.groups:
            need = defaultdict(int)
            for c in mdl.cands:
                if (c.idx, g.index) in mdl.x:
                    need[c.tp] += self.v(mdl.x[(c.idx, g.index)])
            for cls in (k for k in mdl.classes if k.group == g.index):
                take = {}
                for t in cls.sizes:
                    take[t] = min(self._slots(cls, t), need[t])
                    need[t] -= take[t]
                for (node, start, _), items in zip(cls.domains, self._fill(cls, take)):
                    for t, gpus in _carve(node, start, [(t, t) for t in items]):
                        positions[(g.index, t)].append((node, gpus))
            if any(need.values()):
                raise PlacementError("internal error: stage counts exceed the domain slots")
        result: dict[int, list[list[GpuRef]]] = defaultdict(list)
        self._assign_pooled(positions, result)
        return result

    def _assign_pooled(self, positions: dict[tuple[int, int], list[tuple[int, list[GpuRef]]]],
                       result: dict[int, list[list[GpuRef]]]) -> None:
        """Give pooled candidates' stages the free TP-group positions of their group, keeping each
        instance on one node where a node has enough positions."""
        mdl, p = self.model, self.p
        leftovers: dict[int, list[list[GpuRef]]] = defaultdict(list)
        for (gi, t), pos in sorted(positions.items()):
            by_node: dict[int, list[list[GpuRef]]] = defaultdict(list)
            for node, gpus in pos:
                by_node[node].append(gpus)
            cs = [c for c in mdl.cands if c.tp == t and (c.idx, gi) in mdl.x]
            for c in sorted(cs, key=lambda c: (-c.pp, c.idx)):
                whole, rest = divmod(self.v(mdl.x[(c.idx, gi)]), c.pp)
                for _ in range(whole):
                    home = next((n for n, free in by_node.items() if len(free) >= c.pp), None)
                    if home is not None:
                        taken = [by_node[home].pop(0) for _ in range(c.pp)]
                    else:
                        taken = [self._pop_first(by_node) for _ in range(c.pp)]
                    result[c.idx].append([gpu for stage in taken for gpu in stage])
                for _ in range(rest):
                    leftovers[c.idx].append(self._pop_first(by_node))
        for ci, stages in leftovers.items():
            pp = p.cands[ci].pp
            for i in range(0, len(stages), pp):
                result[ci].append([gpu for stage in stages[i:i + pp] for gpu in stage])

    @staticmethod
    def _pop_first(by_node: dict[int, list]) -> list[GpuRef]:
        for free in by_node.values():
            if free:
                return free.pop(0)
        raise PlacementError("internal error: out of slots")

    def _slots(self, cls: _DomainClass, t: int) -> int:
        if cls.kind == "div":
            return self.v(cls.slots[t])
        if cls.kind == "pat":
            i = cls.sizes.index(t)
            return sum(self.v(z) * pat[i] for z, pat in zip(cls.pattern_vars, cls.patterns))
        return sum(self.v(vs[t]) for vs in cls.domain_vars)

    def _fill(self, cls: _DomainClass, take: dict[int, int]) -> list[list[int]]:
        """TP sizes to carve in each domain of the class."""
        n = len(cls.domains)
        fill: list[list[int]] = [[] for _ in range(n)]
        if cls.kind == "div":  # first fit decreasing: exact for divisible sizes
            free = [cls.size] * n
            for t in cls.sizes:
                for _ in range(take[t]):
                    j = next(j for j in range(n) if free[j] >= t)
                    free[j] -= t
                    fill[j].append(t)
            return fill
        if cls.kind == "pat":
            caps = []
            for z, pat in zip(cls.pattern_vars, cls.patterns):
                caps += [pat] * self.v(z)
            offer = [{t: pat[i] for i, t in enumerate(cls.sizes)} for pat in caps]
        else:
            offer = [{t: self.v(vs[t]) for t in cls.sizes} for vs in cls.domain_vars]
        for t in cls.sizes:
            left = take[t]
            for j in range(n):
                k = min(left, offer[j][t])
                fill[j] += [t] * k
                left -= k
        return fill

    def _per_node(self) -> dict[int, list[list[GpuRef]]]:
        mdl, p = self.model, self.p
        stages: dict[tuple[int, int], list[list[GpuRef]]] = defaultdict(list)
        positions: dict[tuple[int, int], list[tuple[int, list[GpuRef]]]] = defaultdict(list)
        used = defaultdict(int)  # (group, tp) -> pooled stages to place
        for (ci, gi), x in mdl.x.items():
            used[(gi, p.cands[ci].tp)] += self.v(x)
        for v in p.relevant_nodes():
            for j, (start, size) in enumerate(v.domains):
                items = []
                for c in mdl.cands:
                    y = mdl.y.get((v.index, j, c.idx))
                    if y is not None:
                        items += [(c.tp, ("c", c.idx))] * self.v(y)
                for t in range(size, 0, -1):
                    q = mdl.q.get((v.index, j, t))
                    if q is not None:
                        k = min(self.v(q), used[(v.group, t)])
                        used[(v.group, t)] -= k
                        items += [(t, ("q", t))] * k
                items.sort(key=lambda it: (-it[0], it[1]))
                for (kind, tag), gpus in _carve(v.index, start, items):
                    if kind == "c":
                        stages[(v.index, tag)].append(gpus)
                    else:
                        positions[(v.group, tag)].append((v.index, gpus))
        if any(used.values()):
            raise PlacementError("internal error: pooled stages exceed their slots")
        result: dict[int, list[list[GpuRef]]] = defaultdict(list)
        self._assemble_bound(stages, result)
        self._assign_pooled(positions, result)
        return result

    def _assemble_bound(self, stages: dict[tuple[int, int], list[list[GpuRef]]],
                        result: dict[int, list[list[GpuRef]]]) -> None:
        """Node-bound stages into instances: whole instances inside a node first, then the rest
        across nodes (only with a network)."""
        mdl, p = self.model, self.p
        for c in mdl.cands:
            if not mdl._node_bound(c):
                continue
            rest = []
            for v in p.relevant_nodes():
                mine = stages.get((v.index, c.idx), [])
                whole = len(mine) // c.pp
                for i in range(whole):
                    result[c.idx].append([gpu for st in mine[i * c.pp:(i + 1) * c.pp] for gpu in st])
                rest += mine[whole * c.pp:]
            if rest and not p.network:
                raise PlacementError("internal error: stages left over on a node without a network")
            for i in range(0, len(rest), c.pp):
                result[c.idx].append([gpu for st in rest[i:i + c.pp] for gpu in st])

    def _configs(self) -> dict[int, list[list[GpuRef]]]:
        mdl, p = self.model, self.p
        stages: dict[tuple[int, int], list[list[GpuRef]]] = defaultdict(list)
        positions: dict[tuple[int, int], list[tuple[int, list[GpuRef]]]] = defaultdict(list)
        for gi, cl in mdl.configs.items():
            group = p.groups[gi]
            assigned = []
            for z, q in zip(mdl.z[gi], cl):
                assigned += [q] * self.v(z)
            need = defaultdict(int)
            for (ci, g2), x in mdl.x.items():
                if g2 == gi:
                    need[p.cands[ci].tp] += self.v(x)
            slots = []  # [node, start, items, free]
            for node, q in zip(group.nodes, assigned):
                for (start, _), ms, free in zip(node.domains, q.domains, q.residual):
                    items = [(p.cands[ci].tp, ("c", ci)) for ci, k in ms for _ in range(k)]
                    slots.append([node.index, start, items, free])
            for t in sorted(need, reverse=True):  # largest first: exact for divisible sizes
                for slot in slots:
                    k = min(slot[3] // t, need[t])
                    slot[2] += [(t, ("q", t))] * k
                    slot[3] -= k * t
                    need[t] -= k
            if any(need.values()):
                raise PlacementError("internal error: pooled stages exceed the configurations' room")
            for node, start, items, _ in slots:
                items.sort(key=lambda it: (-it[0], it[1]))
                for (kind, tag), gpus in _carve(node, start, items):
                    if kind == "c":
                        stages[(node, tag)].append(gpus)
                    else:
                        positions[(gi, tag)].append((node, gpus))
        result: dict[int, list[list[GpuRef]]] = defaultdict(list)
        self._assemble_bound(stages, result)
        self._assign_pooled(positions, result)
        return result


# ----------------------------------------------------------------------------------------------
# checks, KV traffic, binding constraints


def _check(p: _Problem, placed: dict[int, list[list[GpuRef]]], counts: dict[int, int]) -> None:
    """Cheap invariants of every returned placement (an internal error if one fails)."""
    seen: set[tuple[int, int]] = set()
    for ci, insts in placed.items():
        c = p.cands[ci]
        if len(insts) != counts.get(ci, 0):
            raise PlacementError(f"internal error: {c.c.key} has {len(insts)} instances, the model {counts.get(ci)}")
        for gpus in insts:
            if len(gpus) != c.gpus:
                raise PlacementError(f"internal error: an instance of {c.c.key} has {len(gpus)} GPUs")
            for s in range(c.pp):
                stage = gpus[s * c.tp:(s + 1) * c.tp]
                node = p.nodes[stage[0].node]
                dom = {next(i for i, (st, sz) in enumerate(node.domains) if st <= g.index < st + sz) for g in stage}
                if len({g.node for g in stage}) != 1 or len(dom) != 1 or node.gpu != c.c.gpu:
                    raise PlacementError(f"internal error: a TP group of {c.c.key} leaves its link domain")
            if not p.network and len({g.node for g in gpus}) != 1:
                raise PlacementError(f"internal error: {c.c.key} spans nodes without a network")
            for g in gpus:
                if (g.node, g.index) in seen or not 0 <= g.index < p.nodes[g.node].gpus:
                    raise PlacementError(f"internal error: GPU {g} used twice or outside its node")
                seen.add((g.node, g.index))


def _kv_traffic(p: _Problem, placed: dict[int, list[list[GpuRef]]]) -> tuple[dict, dict, set[str]]:
    """Bytes/s leaving and entering each node under the documented KV model, and the
    disaggregated deployments that sit on one node (no network traffic)."""
    out: dict[int, float] = defaultdict(float)
    inn: dict[int, float] = defaultdict(float)
    single = set()
    for d in p.kv_deps:
        load = p.demands[d].load_rps
        per_node_out: dict[int, float] = defaultdict(float)
        per_node_in: dict[int, float] = defaultdict(float)
        nodes = set()
        for ci, insts in placed.items():
            c = p.cands[ci]
            if c.dep != d:
                continue
            for gpus in insts:
                for s in range(c.pp):
                    node = gpus[s * c.tp].node
                    nodes.add(node)
                    share = c.c.kv_bytes_per_request * min(c.c.capacity_rps, load) / c.pp
                    if c.role == "prefill":
                        per_node_out[node] += share
                    elif c.role == "decode":
                        per_node_in[node] += share
        if len(nodes) <= 1:
            single.add(d)
            continue
        for node, x in per_node_out.items():
            out[node] += min(x, p.kv_out[d])
        for node, x in per_node_in.items():
            inn[node] += min(x, p.kv_in[d])
    return out, inn, single


def _gbps(x: float) -> str:
    return f"{x / 1e9:.3g} GB/s"


def _binding(p: _Problem, placed: dict[int, list[list[GpuRef]]], gpus_of: dict[str, int]) -> list[str]:
    out = []
    used: dict[str, int] = defaultdict(int)
    used_gpus: set[tuple[int, int]] = set()
    for ci, insts in placed.items():
        for gpus in insts:
            used[p.cands[ci].c.gpu] += len(gpus)
            used_gpus.update((g.node, g.index) for g in gpus)
    for t in p.used_types:
        if used[t] == p.type_gpus[t]:
            out.append(f"all {p.type_gpus[t]} {t} GPUs are used")
        else:
            # free GPUs that no candidate of this type can use (TP groups stay inside link domains)
            free_per_domain = []
            for v in p.nodes:
                if v.gpu == t:
                    for st, sz in v.domains:
                        free_per_domain.append(sum((v.index, i) not in used_gpus for i in range(st, st + sz)))
            cs = [c for c in p.cands if c.c.gpu == t]
            free = sum(free_per_domain)
            if cs and free >= min(c.gpus for c in cs) and not any(
                    sum(f // c.tp for f in free_per_domain) >= c.pp for c in cs):
                out.append(f"link domains: the {free} free {t} GPUs are split so that no instance fits "
                           f"(a TP group stays inside one link domain)")
    for name in p.order:
        d = p.demands[name]
        cs = p.by_dep[name]
        if d.max_gpus is not None and cs and d.max_gpus - gpus_of[name] < min(c.gpus for c in cs):
            out.append(f"max_gpus {d.max_gpus} of deployment {name}")
    if p.kv_deps:
        traffic_out, traffic_in, single = _kv_traffic(p, placed)
        nic = p.groups[0].nic
        for name in p.kv_deps:
            if name in single and p.kv_out[name] > nic * (1 - 1e-9) and any(p.cands[ci].dep == name and insts
                                                                          for ci, insts in placed.items()):
                node = next(insts[0][0].node for ci, insts in placed.items() if p.cands[ci].dep == name and insts)
                if not p.network:
                    out.append(f"no network between nodes: the KV traffic of deployment {name} keeps its prefill "
                               f"and decode instances on node {node}")
                else:
                    out.append(f"network bandwidth between nodes ({_gbps(nic)} per node and direction) cannot carry "
                               f"the KV traffic of deployment {name} ({_gbps(p.kv_out[name])}): its prefill and "
                               f"decode instances share node {node}")
        peak = max(list(traffic_out.values()) + list(traffic_in.values()) + [0.0])
        if nic > 0 and peak >= 0.8 * nic:
            for name in p.kv_deps:
                if name not in single and any(p.cands[ci].dep == name and insts for ci, insts in placed.items()):
                    out.append(f"network bandwidth between nodes carries the KV traffic of deployment {name} "
                               f"(the busiest node uses {100 * peak / nic:.0f}% of its {_gbps(nic)} per direction)")
    return out


# ----------------------------------------------------------------------------------------------
# infeasibility


def _gpus_needed(p: _Problem, name: str, oversized: list[Candidate], time_s: float, workers: int) -> Optional[int]:
    """Fewest GPUs serving the load when nodes are not scarce: counting only (TP groups always
    find a domain on a fresh node); ignores the cluster's size, max_gpus and the KV rows."""
    d = p.demands[name]
    load = _scale_load(d.load_rps)
    cs = [(c.c, c.cap) for c in p.by_dep[name]] + [(c, _scale_rps(c.capacity_rps)) for c in oversized
                                                      if c.deployment == name]
    cs = [(c, cap) for c, cap in cs if cap > 0]
    if not cs:
        return None if load > 0 else 0
    m = cp_model.CpModel()
    n = [m.new_int_var(0, -(-load // cap) if load else 1, f"n{i}") for i, (c, cap) in enumerate(cs)]
    col = [i for i, (c, _) in enumerate(cs) if c.role == "colocated"]
    pre = [i for i, (c, _) in enumerate(cs) if c.role == "prefill"]
    dec = [i for i, (c, _) in enumerate(cs) if c.role == "decode"]
    ok = []
    if col:
        ok.append(sum(cs[i][1] * n[i] for i in col) >= load)
    if pre and dec:
        b = m.new_bool_var("disagg")
        m.add(sum(cs[i][1] * n[i] for i in pre) >= load).only_enforce_if(b)
        m.add(sum(cs[i][1] * n[i] for i in dec) >= load).only_enforce_if(b)
        if col:
            m.add(sum(cs[i][1] * n[i] for i in col) >= load).only_enforce_if(~b)
            for i in pre + dec:
                m.add(n[i] == 0).only_enforce_if(~b)
            for i in col:
                m.add(n[i] == 0).only_enforce_if(b)
        else:
            m.add(b == 1)
    elif col:
        m.add(ok[0])
        for i in pre + dec:
            m.add(n[i] == 0)
    else:
        return None if load > 0 else 0
    if d.objective == "max_goodput_per_gpu":
        m.add(sum(n) >= 1)
    m.minimize(sum(c.gpus * n[i] for i, (c, _) in enumerate(cs)))
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(0.5, time_s)
    solver.parameters.num_workers = max(1, workers)
    solver.parameters.catch_sigint_signal = False  # Ctrl-C is Python's (see compiler/optimize/arena.py)
    status = solver.solve(m)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None
    return int(solver.objective_value)


def _diagnose(p: _Problem, oversized: list[Candidate], deadline: float, workers: int) -> PlacementInfeasible:
    loads = {n: p.demands[n].load_rps for n in p.order}
    maxg: dict[str, float] = {}
    reasons: dict[str, str] = {}
    failing: list[str] = []

    def best(active: list[str], locked: set[str], name: str) -> tuple[float, Optional[dict], _Model]:
        need = {name} if p.demands[name].objective == "max_goodput_per_gpu" else set()
        mdl = _Model(p, active, locked, need_instance=need)
        r = mdl.solve("max", mdl.G[name], max(0.5, deadline - time.perf_counter()), workers, None)
        if r.vals is None:
            return -1.0, None, mdl
        return r.vals[mdl.G[name].index] / RPS_SCALE, r.vals, mdl

    def why(name: str, vals: Optional[dict], mdl: _Model, others: list[str]) -> str:
        d = p.demands[name]
        types = sorted({c.c.gpu for c in p.by_dep[name]})
        if not p.by_dep[name]:
            return "no candidate instance fits the cluster"
        if vals is None:
            return "no instance can be placed"
        k = vals[mdl.K[name].index]
        if d.max_gpus is not None and d.max_gpus - k < min(c.gpus for c in p.by_dep[name]):
            return f"within max_gpus {d.max_gpus}"
        parts = [f"on the cluster's {sum(p.type_gpus[t] for t in types)} {'/'.join(types)} GPUs"]
        if others:
            parts.append(f"next to {', '.join(others)}")
        if name in p.kv_deps and p.kv_out[name] > p.groups[0].nic:
            if p.network:
                parts.append(f"with the network carrying {_gbps(p.groups[0].nic)} of KV traffic per node and direction "
                             f"(the load needs {_gbps(p.kv_out[name])})")
            else:
                parts.append("with prefill and decode on one node (no network carries KV traffic between nodes)")
        return " ".join(parts)

    for name in p.order:
        g, vals, mdl = best([name], set(), name)
        if g < 0 or _scale_rps(g) < _scale_load(loads[name]):
            failing.append(name)
            maxg[name] = max(g, 0.0)
            reasons[name] = why(name, vals, mdl, [])
    if not failing:
        for k, name in enumerate(p.order):
            g, vals, mdl = best(p.order[:k + 1], set(p.order[:k]), name)
            if g < 0 or _scale_rps(g) < _scale_load(loads[name]):
                failing.append(name)
                maxg[name] = max(g, 0.0)
                reasons[name] = why(name, vals, mdl, p.order[:k])
                break
    if not failing:
        failing = [p.order[0]]
        maxg[p.order[0]] = 0.0
        reasons[p.order[0]] = "(no single deployment could be blamed within the time limit)"
    needed = {n: _gpus_needed(p, n, oversized, min(2.0, max(0.5, deadline - time.perf_counter())), workers)
              for n in failing}
    lines = []
    for n in failing:
        line = f"deployment {n} cannot serve {loads[n]:g} req/s: at most {maxg[n]:.4g} req/s {reasons[n]}"
        if needed[n] is not None:
            line += f"; serving its load takes {needed[n]} GPUs"
        else:
            line += "; no candidate instance serves its load"
        lines.append(line)
    return PlacementInfeasible(failing[0], "; ".join(lines), maxg, needed, loads)


# ----------------------------------------------------------------------------------------------
# entry point


def solve_placement(cluster: spec.Cluster, gpus: dict[str, spec.GPU], demands: list[Demand],
                    candidates: list[Candidate], *, time_limit_s: float = 10.0, workers: int = 2,
                    ratio_tolerance: float = 0.0) -> Placement:
    """Choose instance counts and exact GPUs for every deployment (see the module docstring).

    `ratio_tolerance` (max_goodput_per_gpu only, default 0 = exact): after the best ratio r* is
    found, take the fewest GPUs whose ratio is >= (1 - ratio_tolerance) * r*. The exact optimum of a
    disaggregated deployment can need a large prefill/decode mix to balance the two sums, far
    above the load; a tolerance of about 1% trades that for a plan sized near the load."""
    t0 = time.perf_counter()
    deadline = t0 + time_limit_s
    p = _Problem(cluster, gpus, demands, candidates)
    type_domain: dict[str, int] = defaultdict(int)
    for v in p.nodes:
        type_domain[v.gpu] = max(type_domain[v.gpu], max(s for _, s in v.domains))
    oversized = [c for c in p.unplaceable if c.tp <= type_domain.get(c.gpu, 0)]
    need = {n for n in p.order if p.demands[n].objective == "max_goodput_per_gpu"}
    model = _Model(p, p.order, set(p.order), need_instance=need)
    lex = _Lex(model, deadline, workers, ratio_tolerance)
    try:
        outcomes = lex.run()
    except _Infeasible:
        raise _diagnose(p, oversized, max(deadline, time.perf_counter() + min(time_limit_s, 10.0)), workers) from None
    vals = lex.cur
    placed = _Materializer(model, vals).instances()
    counts = {c.idx: vals[model.n[c.idx].index] for c in model.cands}
    _check(p, placed, counts)
    deployments = {}
    gpus_of = {}
    for name in p.order:
        d = p.demands[name]
        insts, col, pre, dec, cost, priced = [], 0.0, 0.0, 0.0, 0.0, True
        for c in p.by_dep[name]:
            for gl in placed.get(c.idx, []):
                insts.append(PlacedInstance(c.c.key, gl))
                if c.role == "colocated":
                    col += c.c.capacity_rps
                elif c.role == "prefill":
                    pre += c.c.capacity_rps
                else:
                    dec += c.c.capacity_rps
                for g in gl:
                    price = p.nodes[g.node].price
                    priced = priced and price is not None
                    cost += price or 0.0
        mode = "disaggregated" if pre or dec else "colocated"
        n_gpus = sum(len(i.gpus) for i in insts)
        gpus_of[name] = n_gpus
        o = outcomes[name]
        gap = 0.0 if o.bound == o.value else abs(o.bound - o.value) / max(abs(o.bound), abs(o.value), 1e-12)
        deployments[name] = DeploymentPlacement(
            deployment=name, objective=d.objective, mode=mode, instances=insts,
            goodput_rps=col + (min(pre, dec) if mode == "disaggregated" else 0.0), gpus=n_gpus,
            cost_per_hour=cost if priced else None, objective_value=o.value, bound=o.bound,
            gap=gap, optimal=o.optimal, prefill_rps=pre, decode_rps=dec)
    first = deployments[p.order[0]] if p.order else None
    return Placement(
        deployments=deployments,
        status="optimal" if all(o.optimal for o in outcomes.values()) else "feasible",
        objective=first.objective_value if first else 0.0,
        bound=first.bound if first else 0.0,
        gap=max((x.gap for x in deployments.values()), default=0.0),
        wall_s=time.perf_counter() - t0,
        binding=_binding(p, placed, gpus_of),
        model=model.layer,
        solves=lex.solves,
    )
