"""The aggregated placement layer: per (candidate, node group) stage counts x_cg, and per class of
equal-size link domains of a group one capacity row (TP sizes in a divisibility chain), counts
of domains per maximal pattern, or beyond PATTERN_LIMIT patterns per-domain counts."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from flowc.compiler.optimize.placement.model import Model

PATTERN_LIMIT = 2000  # domain patterns per class before falling back to per-domain counts


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
class DomainClass:
    group: int
    size: int
    domains: list[tuple[int, int, int]]  # (node, start, size)
    sizes: list[int]  # TP sizes that may go here, descending
    kind: str  # "div" | "pat" | "dom"
    slots: dict[int, object] = field(default_factory=dict)  # tp -> var/expr of slot count
    patterns: list[tuple[int, ...]] = field(default_factory=list)  # kind "pat", counts aligned with sizes
    pattern_vars: list = field(default_factory=list)
    domain_vars: list[dict[int, object]] = field(default_factory=list)  # kind "dom": per domain tp -> var


def _domain_class(mdl: Model, group: int, size: int, domains: list, sizes: list[int]) -> DomainClass:
    """The slot counts per TP size of one class of equal-size domains of a group."""
    m, count = mdl.m, len(domains)
    if _chain_divisible(sizes, size):
        cls = DomainClass(group, size, domains, sizes, "div")
        for t in sizes:
            cls.slots[t] = mdl.int_var(0, count * (size // t), f"slots[{group},{size},{t}]")
        m.add(sum(t * cls.slots[t] for t in sizes) <= count * size)
        return cls
    patterns = _maximal_patterns(sizes, size, PATTERN_LIMIT)
    if patterns is not None:
        cls = DomainClass(group, size, domains, sizes, "pat", patterns=patterns)
        cls.pattern_vars = [mdl.int_var(0, count, f"z[{group},{size},{i}]") for i in range(len(patterns))]
        m.add(sum(cls.pattern_vars) == count)
        for i, t in enumerate(sizes):
            cls.slots[t] = sum(z * pat[i] for z, pat in zip(cls.pattern_vars, patterns) if pat[i])
        return cls
    cls = DomainClass(group, size, domains, sizes, "dom")
    loads = []
    for j in range(count):
        vs = {t: mdl.int_var(0, size // t, f"y[{group},{size},{j},{t}]") for t in sizes}
        m.add(sum(t * v for t, v in vs.items()) <= size)
        cls.domain_vars.append(vs)
        loads.append(sum(t * v for t, v in vs.items()))
    for a, b in zip(loads, loads[1:]):
        m.add(a >= b)
    for t in sizes:
        cls.slots[t] = sum(vs[t] for vs in cls.domain_vars)
    return cls


class AggregatedLayer:
    """Stage counts x per (candidate, group) and the slots of each domain class."""

    name = "aggregated"
    extra_subsolvers = ()

    def __init__(self, mdl: Model):
        p, m = mdl.p, mdl.m
        self.x: dict[tuple[int, int], object] = {}  # (cand, group) -> stages
        self.classes: list[DomainClass] = []
        stages_of = defaultdict(list)
        for g in p.groups:
            cs = [c for c in mdl.cands if c.c.gpu == g.gpu]
            if not cs:
                continue
            classes = g.classes()
            group_gpus = sum(v.gpus for v in g.nodes)
            per_tp = defaultdict(list)
            for c in cs:
                if c.tp > max(classes):
                    continue
                x = mdl.int_var(0, group_gpus // c.tp, f"x[{c.c.key},{g.index}]")
                self.x[(c.idx, g.index)] = x
                stages_of[c.idx].append(x)
                per_tp[c.tp].append(x)
                mdl.cost_expr[c.dep].append((x, mdl.price(g.price, c.tp), mdl.upper(x)))
            if not per_tp:
                continue
            slots = defaultdict(list)
            for size, domains in classes.items():
                sizes = sorted((t for t in per_tp if t <= size), reverse=True)
                if not sizes:
                    continue
                cls = _domain_class(mdl, g.index, size, domains, sizes)
                self.classes.append(cls)
                for t, s in cls.slots.items():
                    slots[t].append(s)
            for t, xs in per_tp.items():
                m.add(sum(xs) <= sum(slots[t]))
        for c in mdl.cands:
            xs = stages_of.get(c.idx, [])
            m.add(sum(xs) == c.pp * mdl.n[c.idx]) if xs else m.add(mdl.n[c.idx] == 0)
