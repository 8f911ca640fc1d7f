"""From counts to exact GPUs, deterministically: patterns or configurations go to nodes in node
order, TP groups are laid out largest first from a domain's first GPU, and an instance's stages
stay on one node whenever a node has room for all of them. `check` verifies the result."""

from __future__ import annotations

from collections import defaultdict

from flowc.compiler.optimize.placement.aggregated import DomainClass
from flowc.compiler.optimize.placement.model import Model
from flowc.compiler.optimize.placement.problem import Problem
from flowc.compiler.optimize.placement.types import PlacementError
from flowc.compiler.plan import GpuRef


def _carve(node: int, start: int, items: list[tuple[int, object]]) -> list[tuple[object, list[GpuRef]]]:
    """Lay TP groups (size, tag) out in one domain: largest first, consecutive indices."""
    out, offset = [], start
    for size, tag in sorted(items, key=lambda it: -it[0]):
        out.append((tag, [GpuRef(node=node, index=offset + i) for i in range(size)]))
        offset += size
    return out


class Materializer:
    def __init__(self, model: Model, vals: dict[int, int]):
        self.model, self.layer, self.vals, self.p = model, model.layer, vals, model.p

    def v(self, var) -> int:
        return self.vals[var.index]

    def instances(self) -> dict[int, list[list[GpuRef]]]:
        layers = {"per-node": self._per_node, "configs": self._configs, "aggregated": self._aggregated}
        return layers[self.layer.name]()

    def _aggregated(self) -> dict[int, list[list[GpuRef]]]:
        mdl, layer, p = self.model, self.layer, self.p
        positions: dict[tuple[int, int], list[tuple[int, list[GpuRef]]]] = defaultdict(list)
        for g in p.groups:
            need = defaultdict(int)
            for c in mdl.cands:
                if (c.idx, g.index) in layer.x:
                    need[c.tp] += self.v(layer.x[(c.idx, g.index)])
            for cls in (k for k in layer.classes if k.group == g.index):
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
        mdl, layer, p = self.model, self.layer, self.p
        leftovers: dict[int, list[list[GpuRef]]] = defaultdict(list)
        for (gi, t), pos in sorted(positions.items()):
            by_node: dict[int, list[list[GpuRef]]] = defaultdict(list)
            for node, gpus in pos:
                by_node[node].append(gpus)
            cs = [c for c in mdl.cands if c.tp == t and (c.idx, gi) in layer.x]
            for c in sorted(cs, key=lambda c: (-c.pp, c.idx)):
                whole, rest = divmod(self.v(layer.x[(c.idx, gi)]), c.pp)
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

    def _slots(self, cls: DomainClass, t: int) -> int:
        if cls.kind == "div":
            return self.v(cls.slots[t])
        if cls.kind == "pat":
            i = cls.sizes.index(t)
            return sum(self.v(z) * pat[i] for z, pat in zip(cls.pattern_vars, cls.patterns))
        return sum(self.v(vs[t]) for vs in cls.domain_vars)

    def _fill(self, cls: DomainClass, take: dict[int, int]) -> list[list[int]]:
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
        mdl, layer, p = self.model, self.layer, self.p
        stages: dict[tuple[int, int], list[list[GpuRef]]] = defaultdict(list)
        positions: dict[tuple[int, int], list[tuple[int, list[GpuRef]]]] = defaultdict(list)
        used = defaultdict(int)  # (group, tp) -> pooled stages to place
        for (ci, gi), x in layer.x.items():
            used[(gi, p.cands[ci].tp)] += self.v(x)
        for v in p.relevant_nodes():
            for j, (start, size) in enumerate(v.domains):
                items = []
                for c in mdl.cands:
                    y = layer.y.get((v.index, j, c.idx))
                    if y is not None:
                        items += [(c.tp, ("c", c.idx))] * self.v(y)
                for t in range(size, 0, -1):
                    q = layer.q.get((v.index, j, t))
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
            if not p.node_bound(c):
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
        layer, p = self.layer, self.p
        stages: dict[tuple[int, int], list[list[GpuRef]]] = defaultdict(list)
        positions: dict[tuple[int, int], list[tuple[int, list[GpuRef]]]] = defaultdict(list)
        for gi, cl in layer.configs.items():
            group = p.groups[gi]
            assigned = []
            for z, q in zip(layer.z[gi], cl):
                assigned += [q] * self.v(z)
            need = defaultdict(int)
            for (ci, g2), x in layer.x.items():
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


def check(p: Problem, placed: dict[int, list[list[GpuRef]]], counts: dict[int, int]) -> None:
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
