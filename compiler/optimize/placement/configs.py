"""The configuration layer (Gilmore-Gomory style): every filling of one node with node-bound TP
groups is enumerated (up to CONFIG_LIMIT per group), z_gQ counts the nodes of group g using
configuration Q, and the pooled candidates take the room the configurations leave."""

from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from flowc.compiler.optimize.placement.model import Model

CONFIG_LIMIT = 4000  # node configurations per group before falling back to the per-node layer


@dataclass(frozen=True)
class Config:
    """What one node of a group holds of the node-bound candidates: TP groups per domain."""

    domains: tuple[tuple[tuple[int, int], ...], ...]  # per domain: ((candidate index, TP groups), ...)
    stages: tuple[tuple[int, int], ...]  # (candidate index, stages on the node)
    residual: tuple[int, ...]  # free GPUs per domain
    local: frozenset  # deployments whose KV stays on this node (they live on this node only)
    present: frozenset  # KV deployments with stages here


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


def _node_kv_ok(mdl: Model, stages: dict[int, int], local: frozenset, nic: float) -> bool:
    """The documented KV rule for one node holding `stages` (floats, exact)."""
    p = mdl.p
    for role, caps in (("prefill", p.kv_out), ("decode", p.kv_in)):
        total = 0.0
        for d in p.kv_deps:
            if d in local or d not in mdl.active:
                continue
            load = p.demands[d].load_rps
            a = sum(k * c.c.kv_bytes_per_request * min(c.c.capacity_rps, load) / c.pp
                    for c, k in ((p.cands[ci], k) for ci, k in stages.items()) if c.dep == d and c.role == role)
            total += min(caps[d], a)
        if total > nic * (1 + 1e-9) + 1e-9:
            return False
    return True


def enumerate_configs(mdl: Model) -> Optional[dict[int, list[Config]]]:
    """Every configuration of node-bound stages one node of each group can hold (domain packing,
    whole instances without a network, the node's KV rule), or None when there are more than
    CONFIG_LIMIT or the pooled TP sizes of a group do not form a divisibility chain (the pooled
    rows of ConfigsLayer are exact only then)."""
    p = mdl.p
    single_capable = frozenset(d for d in p.kv_deps if d in mdl.active and mdl.fits_one_node(d))
    out: dict[int, list[Config]] = {}
    for g in p.groups:
        cs = [c for c in mdl.cands if c.c.gpu == g.gpu]
        if not cs:
            continue
        pooled = sorted({c.tp for c in cs if not p.node_bound(c)})
        if any(b % a for a, b in zip(pooled, pooled[1:])):
            return None
        bound = [c for c in cs if p.node_bound(c)]
        node = g.nodes[0]
        per_size: dict[int, list[tuple[tuple[int, int], ...]]] = {}
        for size in sorted({s for _, s in node.domains}):
            ms = _multisets([(c.idx, c.tp) for c in bound if c.tp <= size], size, 50 * CONFIG_LIMIT)
            if ms is None:
                return None
            per_size[size] = ms
        configs: list[Config] = []
        local_best: dict[tuple, list[tuple[tuple[int, ...], Config]]] = {}
        domains = node.domains
        tried = 0

        def rec(j: int, prev: int, chosen: list[int]) -> bool:
            nonlocal tried
            if j == len(domains):
                tried += 1
                if tried > 50 * CONFIG_LIMIT:
                    return False
                _add_config(mdl, configs, local_best, [per_size[domains[i][1]][k] for i, k in enumerate(chosen)],
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


def _add_config(mdl: Model, configs: list[Config], local_best: dict, per_domain: list[tuple[tuple[int, int], ...]],
                domains, nic: float, single_capable: frozenset) -> None:
    """Add the variants of one node filling: with every KV deployment's traffic counted, or
    with some deployments kept local (the whole deployment on this node, its KV free). Of
    the local variants that differ only in the local deployments' stages, keep those whose
    goodputs min(prefill, decode) are Pareto-best for the same GPUs (and the same instance
    count where replicas restricts it): the others are worse for every objective and tie-break."""
    p = mdl.p
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
            if _node_kv_ok(mdl, stages, local, nic):
                kept.append(local)
    for local in kept:
        q = Config(tuple(per_domain), tuple(sorted(stages.items())), residual, local, present)
        if not local:
            configs.append(q)
            continue
        deps = sorted(local)
        # a local deployment's instances are all on this node: with allowed replica counts, two
        # variants with other counts do not compare
        counts = tuple(sum(k // p.cands[ci].pp for ci, k in q.stages if p.cands[ci].dep == d)
                       for d in deps if p.demands[d].replicas is not None)
        signature = (tuple(deps), tuple((ci, k) for ci, k in q.stages if p.cands[ci].dep not in local), residual,
                     tuple(sum(p.cands[ci].tp * k for ci, k in q.stages if p.cands[ci].dep == d) for d in deps),
                     counts)
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


class ConfigsLayer:
    """Nodes per configuration z per group, and stage counts x of the pooled candidates."""

    name = "configs"
    extra_subsolvers = ()

    def __init__(self, mdl: Model, configs: dict[int, list[Config]]):
        p, m = mdl.p, mdl.m
        self.configs = configs
        self.z: dict[int, list] = {}  # group -> nodes per configuration
        self.x: dict[tuple[int, int], object] = {}  # (cand, group) -> stages of pooled candidates
        stage_terms = defaultdict(list)
        local_terms = defaultdict(list)
        spread_terms = defaultdict(list)
        pooled_stages = defaultdict(list)
        for gi, cl in configs.items():
            g = p.groups[gi]
            count = len(g.nodes)
            zs = self.z[gi] = [mdl.int_var(0, count, f"z[{gi},{i}]") for i in range(len(cl))]
            m.add(sum(zs) == count)
            for z, q in zip(zs, cl):
                per_dep = defaultdict(int)
                priced = g.price is not None
                for ci, k in q.stages:
                    c = p.cands[ci]
                    stage_terms[ci].append(k * z)
                    if priced:
                        per_dep[c.dep] += k * mdl.price(g.price, c.tp)
                    else:
                        per_dep[c.dep] = None
                for d, price in per_dep.items():
                    if d in mdl.cost_expr:
                        mdl.cost_expr[d].append((z, price, count))
                for d in q.local:
                    local_terms[d].append(z)
                for d in q.present - q.local:
                    spread_terms[d].append(z)
            pooled = [c for c in mdl.cands if c.c.gpu == g.gpu and not p.node_bound(c)]
            tps = sorted({c.tp for c in pooled})
            for c in pooled:
                x = mdl.int_var(0, sum(v.gpus for v in g.nodes) // c.tp, f"x[{c.c.key},{gi}]")
                self.x[(c.idx, gi)] = x
                pooled_stages[c.idx].append(x)
                mdl.cost_expr[c.dep].append((x, mdl.price(g.price, c.tp), mdl.upper(x)))
            for s in tps:  # divisible sizes: one row per size threshold is exact (see the package docstring)
                room = [(z, sum(s * (r // s) for r in q.residual)) for z, q in zip(zs, cl)]
                m.add(sum(c.tp * self.x[(c.idx, gi)] for c in pooled if c.tp >= s)
                      <= sum(k * z for z, k in room if k))
        for c in mdl.cands:
            terms = pooled_stages.get(c.idx) if not p.node_bound(c) else stage_terms.get(c.idx)
            m.add(sum(terms) == c.pp * mdl.n[c.idx]) if terms else m.add(mdl.n[c.idx] == 0)
        total_nodes = len(p.nodes)
        for d in sorted(set(local_terms)):  # at most one node holds d locally, and then no other node
            single = mdl.bool_var(f"single[{d}]")
            m.add(sum(local_terms[d]) <= single)
            if spread_terms.get(d):
                m.add(sum(spread_terms[d]) <= total_nodes * (1 - single))
