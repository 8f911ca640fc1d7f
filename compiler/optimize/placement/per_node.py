"""The per-node placement layer (the fallback when configurations are too many or the pooled TP
sizes are not a chain): node-bound TP groups per (node, domain, candidate), pooled slots per
(node, domain, TP size), instance counts per node without a network, and the KV rows."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flowc.compiler.optimize.placement.model import Model

KV_UNITS = 1_000_000  # the largest KV quantity (bandwidth or load) maps to this many units


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


class PerNodeLayer:
    """Node-bound TP groups y and pooled slots q per (node, domain), stage counts x of the pooled
    candidates per group, and the KV rows."""

    name = "per-node"
    # the per-node model is symmetric in identical nodes: the LP with symmetry (orbitopes)
    # closes bounds that the default portfolio of 2 workers does not reach
    extra_subsolvers = ("max_lp_sym",)

    def __init__(self, mdl: Model):
        p, m = mdl.p, mdl.m
        no_cross = not p.network
        self.y: dict[tuple[int, int, int], object] = {}  # (node, domain index, cand) -> TP groups
        self.q: dict[tuple[int, int, int], object] = {}  # (node, domain index, tp) -> slots of pooled stages
        self.s: dict[tuple[int, int], object] = {}  # (node, cand) -> stages (linear expr)
        self.s_ub: dict[tuple[int, int], int] = {}
        w: dict[tuple[int, int], object] = {}  # (node, cand) -> instances (no network)
        self.x: dict[tuple[int, int], object] = {}  # (cand, group) -> stages of pooled candidates
        pooled_slots: dict[tuple[int, int], list] = defaultdict(list)  # (group, tp) -> q vars
        for v in p.relevant_nodes():
            cs = [c for c in mdl.cands if c.c.gpu == v.gpu]
            bound = [c for c in cs if p.node_bound(c)]
            tps = sorted({c.tp for c in cs if not p.node_bound(c)}, reverse=True)
            per_c = defaultdict(list)
            for j, (_, size) in enumerate(v.domains):
                load = []
                for c in bound:
                    if c.tp <= size:
                        y = mdl.int_var(0, size // c.tp, f"y[{v.index},{j},{c.c.key}]")
                        self.y[(v.index, j, c.idx)] = y
                        per_c[c.idx].append(y)
                        load.append(c.tp * y)
                for t in tps:
                    if t <= size:
                        q = mdl.int_var(0, size // t, f"q[{v.index},{j},{t}]")
                        self.q[(v.index, j, t)] = q
                        pooled_slots[(v.group, t)].append(q)
                        load.append(t * q)
                if load:
                    m.add(sum(load) <= size)
            for c in bound:
                if per_c[c.idx]:
                    s = sum(per_c[c.idx])
                    self.s[(v.index, c.idx)] = s
                    self.s_ub[(v.index, c.idx)] = ub = sum(mdl.upper(y) for y in per_c[c.idx])
                    mdl.cost_expr[c.dep].append((s, mdl.price(v.price, c.tp), ub))
                    if no_cross:
                        w[(v.index, c.idx)] = wv = mdl.int_var(0, v.gpus // c.gpus, f"w[{v.index},{c.c.key}]")
                        m.add(s == c.pp * wv)
        stages_of = defaultdict(list)
        for g in p.groups:
            per_tp = defaultdict(list)
            for c in mdl.cands:
                if c.c.gpu == g.gpu and not p.node_bound(c) and pooled_slots.get((g.index, c.tp)):
                    x = mdl.int_var(0, sum(v.gpus for v in g.nodes) // c.tp, f"x[{c.c.key},{g.index}]")
                    self.x[(c.idx, g.index)] = x
                    stages_of[c.idx].append(x)
                    per_tp[c.tp].append(x)
                    mdl.cost_expr[c.dep].append((x, mdl.price(g.price, c.tp), mdl.upper(x)))
            for t, xs in per_tp.items():
                m.add(sum(xs) <= sum(pooled_slots[(g.index, t)]))
        for c in mdl.cands:
            if not p.node_bound(c):
                xs = stages_of.get(c.idx, [])
                m.add(sum(xs) == c.pp * mdl.n[c.idx]) if xs else m.add(mdl.n[c.idx] == 0)
            elif no_cross:
                ws = [wv for (_, ci), wv in w.items() if ci == c.idx]
                m.add(mdl.n[c.idx] == sum(ws)) if ws else m.add(mdl.n[c.idx] == 0)
            else:
                ss = [s for (_, ci), s in self.s.items() if ci == c.idx]
                m.add(sum(ss) == c.pp * mdl.n[c.idx]) if ss else m.add(mdl.n[c.idx] == 0)
        self._kv_rows(mdl)

    def _kv_rows(self, mdl: Model) -> None:
        """Per node and direction: sum over deployments of min(kv * load, sum of stage terms) <= NIC,
        for deployments not on a single node. Where kv * load exceeds the NIC the min is dropped
        (a larger term is infeasible either way), which keeps the rows linear."""
        p, m = mdl.p, mdl.m
        deps = [d for d in p.kv_deps if d in mdl.active]
        if not deps:
            return
        biggest = max([v.nic for v in p.nodes] + [p.kv_out[d] for d in deps] + [p.kv_in[d] for d in deps])
        unit = biggest / KV_UNITS if biggest > 0 else 1.0
        rows: dict[tuple[int, str], list] = defaultdict(list)
        items: dict[tuple[int, str], list] = defaultdict(list)  # (coefficient, GPUs) of each row's stages
        exact: dict[tuple[int, str], bool] = defaultdict(lambda: True)  # rows without a min
        for d in deps:
            load = p.demands[d].load_rps
            cs = [c for c in mdl.cands if c.dep == d]
            single = None
            if mdl.fits_one_node(d):
                single = mdl.bool_var(f"single[{d}]")
                hosts = []
            for v in p.relevant_nodes():
                here = [(c, self.s[(v.index, c.idx)]) for c in cs if (v.index, c.idx) in self.s]
                if not here:
                    continue
                if single is not None:
                    h = mdl.bool_var(f"host[{v.index},{d}]")
                    hosts.append(h)
                    for _, s in here:
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
                        e = mdl.int_var(0, raw_ub, f"kv[{v.index},{d},{direction}]")
                        if single is None:
                            m.add(e == raw)
                        else:
                            m.add(e >= raw - raw_ub * single)
                    else:
                        exact[(v.index, direction)] = False
                        t = mdl.int_var(0, cap_u, f"kvmin[{v.index},{d},{direction}]")
                        rawv = mdl.int_var(0, raw_ub, f"kvraw[{v.index},{d},{direction}]")
                        m.add(rawv == raw)
                        m.add_min_equality(t, [rawv, cap_u])
                        e = mdl.int_var(0, cap_u, f"kv[{v.index},{d},{direction}]")
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
