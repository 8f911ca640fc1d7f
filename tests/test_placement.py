"""Placement (compiler/optimize/placement/) against a plain-Python brute force, validity of every
placement, infeasibility reports, the KV rule and scale.

The brute force below knows nothing of the CP-SAT model: it enumerates every way to fill every
link domain of every node with TP groups, keeps the fillings that form whole instances and obey
the rules of the package docstring, and takes the lexicographic optimum over the deployments
(each deployment's objective, then its tie-break) by exact comparison.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import time
from fractions import Fraction

import pytest

from flowc.compiler import spec
from flowc.compiler.optimize.placement import Candidate, Demand, PlacementInfeasible, aggregated, solve_placement
from flowc.compiler.optimize.placement import model as placement_model

NVLINK = spec.Link(name="nvlink", kind="nvlink", bandwidth=450e9)
PCIE = spec.Link(name="pcie", kind="pcie", bandwidth=64e9)
GPUS = {
    "h100": spec.GPU(name="h100", vendor="nvidia", memory=80 * 2**30, memory_bandwidth=3.35e12, flops={"bf16": 989e12},
                     interconnect="nvlink", host_link="pcie", price=2.5),
    "a100": spec.GPU(name="a100", vendor="nvidia", memory=80 * 2**30, memory_bandwidth=2.0e12, flops={"bf16": 312e12},
                     interconnect="nvlink", host_link="pcie", price=1.5),
}


def group(count=1, gpus=8, domain=8, gpu="h100", price=None) -> spec.NodeGroup:
    return spec.NodeGroup(count=count, gpu=gpu, gpus_per_node=gpus, link=NVLINK, link_domain=domain, host_link=PCIE,
                          price=price)


def cluster(*groups: spec.NodeGroup, network: float | None = 50e9, nics: int = 1) -> spec.Cluster:
    net = None if network is None else spec.Link(name="net", kind="infiniband", bandwidth=network)
    return spec.Cluster(name="c", nodes=list(groups), network=net, network_nics=nics)


def cand(dep, tp, pp, cap, role="colocated", gpu="h100", kv=0.0, tag="") -> Candidate:
    return Candidate(dep, f"{dep}/{gpu}/tp{tp}/pp{pp}/{role}{tag}", gpu, tp, pp, role, cap, kv)


# ----------------------------------------------------------------------------------------------
# the brute force


def _nodes(c: spec.Cluster):
    out = []
    for g in c.nodes:
        price = g.price / g.gpus_per_node if g.price is not None else GPUS[g.gpu].price
        dom = min(g.link_domain, g.gpus_per_node)
        domains = [min(dom, g.gpus_per_node - s) for s in range(0, g.gpus_per_node, dom)]
        for _ in range(g.count):
            out.append({"gpu": g.gpu, "domains": domains, "price": Fraction(round(price * 10000), 10000)})
    return out


def _fillings(items: list[tuple[int, int]], room: int):
    """Count vectors (aligned with items) of TP groups whose sizes sum to <= room."""
    if not items:
        yield ()
        return
    (_, size), rest = items[0], items[1:]
    for k in range(room // size + 1):
        for tail in _fillings(rest, room - k * size):
            yield (k,) + tail


def _node_vectors(node, cands):
    vecs = {tuple(0 for _ in cands)}
    for size in node["domains"]:
        fits = [(i, c.tp) for i, c in enumerate(cands) if c.gpu == node["gpu"] and c.tp <= size]
        options = []
        for f in _fillings(fits, size):
            v = [0] * len(cands)
            for (i, _), k in zip(fits, f):
                v[i] = k
            options.append(v)
        vecs = {tuple(a + b for a, b in zip(vec, o)) for vec in vecs for o in options}
    return sorted(vecs)


def _milli(x: float) -> int:
    return round(x * 1000)


def _load(x: float) -> int:
    return math.ceil(x * 1000 - 1e-6)


class Brute:
    def __init__(self, c: spec.Cluster, demands: list[Demand], cands: list[Candidate]):
        self.c, self.demands, self.cands = c, demands, cands
        self.nodes = _nodes(c)
        self.vectors = [_node_vectors(n, cands) for n in self.nodes]
        self.nic = c.network.bandwidth * c.network_nics if c.network else 0.0

    def size(self) -> int:
        return math.prod(len(v) for v in self.vectors)

    def evaluate(self, combo, active: list[str], loaded: set[str]):
        """Per active deployment (K, G in milli-req/s, cost) or None when the combination breaks a rule."""
        cs = self.cands
        total = [sum(v[i] for v in combo) for i in range(len(cs))]
        for i, c in enumerate(cs):
            if total[i] and c.deployment not in active:
                return None
            if self.c.network is None:
                if any(v[i] % c.pp for v in combo):
                    return None
            elif total[i] % c.pp:
                return None
        out = {}
        for d in self.demands:
            if d.deployment not in active:
                continue
            mine = [i for i, c in enumerate(cs) if c.deployment == d.deployment]
            n = {i: total[i] // cs[i].pp for i in mine}
            if d.replicas is not None and sum(n.values()) not in d.replicas:
                return None
            col = sum(_milli(cs[i].capacity_rps) * n[i] for i in mine if cs[i].role == "colocated")
            pre = sum(_milli(cs[i].capacity_rps) * n[i] for i in mine if cs[i].role == "prefill")
            dec = sum(_milli(cs[i].capacity_rps) * n[i] for i in mine if cs[i].role == "decode")
            disagg = any(n[i] for i in mine if cs[i].role != "colocated")
            if disagg and any(n[i] for i in mine if cs[i].role == "colocated"):
                return None  # one mode per deployment
            g = min(pre, dec) if disagg else col
            k = sum(n[i] * cs[i].gpus for i in mine)
            cost = sum(v[i] * cs[i].tp * node["price"] for v, node in zip(combo, self.nodes) for i in mine)
            if d.max_gpus is not None and k > d.max_gpus:
                return None
            if d.deployment in loaded and g < _load(d.load_rps):
                return None
            if d.deployment in loaded and d.objective == "max_goodput_per_gpu" and k == 0:
                return None
            out[d.deployment] = (k, g, cost)
        # KV: a disaggregated deployment on more than one node sends every prefill stage's KV out
        # of its node and receives every decode stage's KV, each capped by kv * load
        for role in ("prefill", "decode"):
            per_node = [0.0] * len(combo)
            for d in self.demands:
                if d.deployment not in active:
                    continue
                pd = [i for i, c in enumerate(cs) if c.deployment == d.deployment and c.role != "colocated"]
                kv = max((cs[i].kv_bytes_per_request for i in pd), default=0.0)
                if kv == 0 or sum(1 for v in combo if any(v[i] for i in pd)) <= 1:
                    continue
                for j, v in enumerate(combo):
                    a = sum(v[i] * cs[i].kv_bytes_per_request * min(cs[i].capacity_rps, d.load_rps) / cs[i].pp
                            for i in pd if cs[i].role == role)
                    per_node[j] += min(kv * d.load_rps, a)
            if any(x > self.nic * (1 + 1e-9) + 1e-9 for x in per_node):
                return None
        return out

    def combos(self):
        return itertools.product(*self.vectors)

    @staticmethod
    def key(d: Demand, k: int, g: int, cost: Fraction):
        if d.objective == "min_gpus":
            return (k, -g)
        if d.objective == "min_cost":
            return (cost, -g)
        return (-Fraction(g, k), k)

    def optimum(self):
        names = [d.deployment for d in self.demands]
        best, best_key = None, None
        for combo in self.combos():
            r = self.evaluate(combo, names, set(names))
            if r is None:
                continue
            key = tuple(x for d in self.demands for x in self.key(d, *r[d.deployment]))
            if best_key is None or key < best_key:
                best, best_key = r, key
        return best

    def max_goodput(self, name: str, before: list[str]) -> int:
        best = -1
        for combo in self.combos():
            r = self.evaluate(combo, before + [name], set(before))
            if r is not None:
                best = max(best, r[name][1])
        return best


def brute_gpus_needed(d: Demand, cands: list[Candidate]) -> int | None:
    """Fewest GPUs whose instances serve the load, nodes unlimited (counting only), at an allowed
    replica count when one serves the load, else at any count."""
    cs = [c for c in cands if c.deployment == d.deployment and c.capacity_rps > 0]
    load = _load(d.load_rps)
    for replicas in ([d.replicas, None] if d.replicas is not None else [None]):
        best = None
        for mode in ("colocated", "disaggregated"):
            mine = [c for c in cs if (c.role == "colocated") == (mode == "colocated")]
            if not mine:
                continue
            ranges = [range(0, (max(replicas) if replicas else -(-load // _milli(c.capacity_rps))) + 1) for c in mine]
            for n in itertools.product(*ranges):
                if replicas is not None and sum(n) not in replicas:
                    continue
                caps = {r: sum(k * _milli(c.capacity_rps) for k, c in zip(n, mine) if c.role == r)
                        for r in ("colocated", "prefill", "decode")}
                g = caps["colocated"] if mode == "colocated" else min(caps["prefill"], caps["decode"])
                k = sum(k * c.gpus for k, c in zip(n, mine))
                if g >= load and (d.objective != "max_goodput_per_gpu" or k > 0) and (best is None or k < best):
                    best = k
        if best is not None:
            return best
    return None


# ----------------------------------------------------------------------------------------------
# an independent validity check


def check_valid(c: spec.Cluster, demands: list[Demand], cands: list[Candidate], placement) -> None:
    nodes = _nodes(c)
    by_key = {x.key: x for x in cands}
    seen = set()
    for d in demands:
        dp = placement.deployments[d.deployment]
        col = pre = dec = 0.0
        gpus = 0
        for inst in dp.instances:
            x = by_key[inst.candidate_key]
            assert x.deployment == d.deployment
            assert len(inst.gpus) == x.tp * x.pp
            for g in inst.gpus:
                assert 0 <= g.node < len(nodes) and 0 <= g.index < sum(nodes[g.node]["domains"])
                assert (g.node, g.index) not in seen, f"GPU {g} used twice"
                seen.add((g.node, g.index))
                assert nodes[g.node]["gpu"] == x.gpu
            for s in range(x.pp):
                stage = inst.gpus[s * x.tp:(s + 1) * x.tp]
                assert len({g.node for g in stage}) == 1, "a TP group spans nodes"
                dom = min(group_of(c, stage[0].node).link_domain, group_of(c, stage[0].node).gpus_per_node)
                assert len({g.index // dom for g in stage}) == 1, "a TP group leaves its link domain"
            if c.network is None:
                assert len({g.node for g in inst.gpus}) == 1, "stages cross nodes without a network"
            gpus += len(inst.gpus)
            if x.role == "colocated":
                col += x.capacity_rps
            elif x.role == "prefill":
                pre += x.capacity_rps
            else:
                dec += x.capacity_rps
        assert not (col and (pre or dec)), "a deployment mixes modes"
        goodput = min(pre, dec) if (pre or dec) else col
        assert dp.gpus == gpus
        assert abs(dp.goodput_rps - goodput) < 1e-9
        assert goodput >= d.load_rps - 1e-6, f"{d.deployment} serves {goodput} < {d.load_rps}"
        if d.max_gpus is not None:
            assert gpus <= d.max_gpus
        if d.replicas is not None:
            assert len(dp.instances) in d.replicas


def group_of(c: spec.Cluster, node: int) -> spec.NodeGroup:
    for g in c.nodes:
        if node < g.count:
            return g
        node -= g.count
    raise IndexError(node)


# ----------------------------------------------------------------------------------------------
# random small instances


OBJECTIVES = ("min_gpus", "min_cost", "max_goodput_per_gpu")


def random_instance(rng: random.Random):
    per = rng.choice([4, 8])
    domain = rng.choice([2, 4] if per == 4 else [4, 8])
    network = rng.choice([None, 2e9, 50e9])
    if rng.random() < 0.25:  # two node groups: other prices, sometimes another GPU type
        other = rng.choice(["h100", "a100"])
        groups = [group(1, per, domain, "h100", price=rng.choice([None, 20.0])),
                  group(1, per, domain, other, price=rng.choice([None, 12.0]))]
    else:
        groups = [group(rng.choice([1, 2]), per, domain, "h100", price=rng.choice([None, 16.0]))]
    c = cluster(*groups, network=network)
    types = sorted({g.gpu for g in groups})
    deps = ["a", "b"][:rng.choice([1, 1, 2])]
    cands, demands = [], []
    budget = 5 if len(deps) == 1 else 3
    for name in deps:
        disagg = rng.random() < 0.3
        k = rng.randint(2, budget)
        seen = set()
        for j in range(k):
            tp = rng.choice([t for t in (1, 2, 4) if t <= domain])
            pp = rng.choice([1, 1, 2])
            role = rng.choice(["prefill", "decode"]) if disagg else "colocated"
            if disagg and j < 2:
                role = ("prefill", "decode")[j]
            gpu = rng.choice(types)
            key = (tp, pp, role, gpu)
            tag = f"/v{j}" if key in seen else ""
            seen.add(key)
            cands.append(cand(name, tp, pp, rng.randint(500, 6000) / 1000, role, gpu,
                              kv=rng.choice([0.0, 1e8, 1e9]) if disagg else 0.0, tag=tag))
        mine = [x for x in cands if x.deployment == name]
        best = max(x.capacity_rps / x.gpus for x in mine)
        total = sum(g.count * g.gpus_per_node for g in groups)
        load = round(rng.uniform(0.1, 0.7) * best * total / len(deps), 3)
        max_gpus = rng.choice([None, None, rng.randint(2, total)])
        demands.append(Demand(name, rng.choice(OBJECTIVES), load, max_gpus))
    return c, demands, cands


def random_kv_instance(rng: random.Random):
    """Mostly disaggregated deployments on 2-4 small nodes with networks near the KV traffic."""
    nodes, per = rng.choice([2, 3, 4]), rng.choice([2, 4])
    domain = rng.choice([d for d in (1, 2, 4) if d <= per])
    c = cluster(group(nodes, per, domain, price=rng.choice([None, 8.0])),
                network=rng.choice([None, 3e8, 6e8, 1e9, 2e9]), nics=rng.choice([1, 2]))
    deps = ["a", "b"][:rng.choice([1, 2])]
    cands, demands = [], []
    for name in deps:
        disagg = rng.random() < 0.8
        for j in range(rng.randint(2, 4 if len(deps) == 1 else 3)):
            tp, pp = rng.choice([t for t in (1, 2) if t <= domain]), rng.choice([1, 1, 2])
            if disagg:
                role = ("prefill", "decode")[j] if j < 2 else rng.choice(["prefill", "decode", "colocated"])
            else:
                role = "colocated"
            cands.append(cand(name, tp, pp, rng.randint(300, 3000) / 1000, role,
                              kv=rng.choice([1e8, 3e8, 1e9]) if disagg else 0.0, tag=f"/v{j}"))
        total = nodes * per
        demands.append(Demand(name, rng.choice(OBJECTIVES), round(rng.uniform(0.1, 1.0) * total / len(deps) / 2, 3),
                              rng.choice([None, None, rng.randint(2, total)])))
    return c, demands, cands


def expected_values(b: Brute, demands: list[Demand], best) -> dict[str, tuple]:
    out = {}
    for d in demands:
        k, g, cost = best[d.deployment]
        if d.objective == "min_gpus":
            out[d.deployment] = (k, g / 1000)
        elif d.objective == "min_cost":
            out[d.deployment] = (float(cost), g / 1000)
        else:
            out[d.deployment] = (g / k / 1000, k)
    return out


def check_against_brute(c, demands, cands, b: Brute, layer=None) -> str:
    placement_model._LAYER = layer
    try:
        best = b.optimum()
        if best is None:
            with pytest.raises(PlacementInfeasible) as info:
                solve_placement(c, GPUS, demands, cands, time_limit_s=10)
            e = info.value
            names = [d.deployment for d in demands]
            alone = {n: b.max_goodput(n, []) for n in names}
            failing = [d.deployment for d in demands if alone[d.deployment] < _load(d.load_rps)]
            if failing:
                expected = {n: max(alone[n], 0) / 1000 for n in failing}
            else:
                for k, d in enumerate(demands):
                    g = b.max_goodput(d.deployment, names[:k])
                    if g < _load(d.load_rps):
                        expected = {d.deployment: max(g, 0) / 1000}
                        break
            assert e.deployment == next(iter(expected))
            assert e.max_goodput_rps == pytest.approx(expected, abs=1e-9)
            for n in expected:
                assert e.gpus_needed[n] == brute_gpus_needed(next(d for d in demands if d.deployment == n), cands)
            return "infeasible"
        r = solve_placement(c, GPUS, demands, cands, time_limit_s=10)
        assert r.status == "optimal" and r.gap == 0
        check_valid(c, demands, cands, r)
        want = expected_values(b, demands, best)
        for d in demands:
            dp = r.deployments[d.deployment]
            primary, tie = want[d.deployment]
            assert dp.objective_value == pytest.approx(primary, rel=1e-9), (d, dp)
            if d.objective == "min_gpus":
                assert dp.gpus == primary and dp.goodput_rps == pytest.approx(tie, abs=1e-9)
            elif d.objective == "min_cost":
                assert dp.cost_per_hour == pytest.approx(primary, rel=1e-9)
                assert dp.goodput_rps == pytest.approx(tie, abs=1e-9)
            else:
                assert dp.gpus == tie and dp.goodput_rps / dp.gpus == pytest.approx(primary, rel=1e-9)
        return r.model
    finally:
        placement_model._LAYER = None


def without_count(rng: random.Random, k: int) -> tuple[int, ...] | None:
    """Allowed instance counts that exclude k (or no restriction)."""
    return rng.choice([None, (k + 1,), tuple(sorted({max(k - 1, 0), k + 2})), (k + 1, k + 3)])


@pytest.mark.parametrize("restrict", [False, True], ids=["any-count", "replicas"])
@pytest.mark.parametrize("generator, count", [(random_instance, 80), (random_kv_instance, 40)])
def test_brute_force_random_instances(generator, count, restrict):
    rng = random.Random(20240611)
    seen = {"aggregated": 0, "configs": 0, "per-node": 0, "infeasible": 0}
    done = 0
    while done < count:
        c, demands, cands = generator(rng)
        b = Brute(c, demands, cands)
        if b.size() > 4000:
            continue
        if restrict:  # replicas that exclude the instance counts of the plan without them
            try:
                free = solve_placement(c, GPUS, demands, cands, time_limit_s=10)
            except PlacementInfeasible:
                continue
            demands = [dataclasses.replace(d, replicas=without_count(rng, len(free.instances(d.deployment))))
                       for d in demands]
            b = Brute(c, demands, cands)
        done += 1
        kind = check_against_brute(c, demands, cands, b)
        seen[kind] += 1
        if kind in ("configs", "per-node"):  # both node layers must agree with the brute force
            other = "per-node" if kind == "configs" else "configs"
            try:
                seen[check_against_brute(c, demands, cands, b, layer=other)] += 1
            except ValueError:  # the configuration layer does not apply here
                pass
    assert seen["aggregated"] and seen["infeasible"] and (seen["configs"] or seen["per-node"]), seen


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_brute_force_two_deployments_compete(objective):
    # 2 nodes x 4 GPUs in domains of 2: the first deployment takes what suits it, the second the rest
    c = cluster(group(2, 4, 2, price=10.0))
    cands = [cand("a", 2, 1, 2.1), cand("a", 1, 1, 0.9), cand("a", 2, 2, 4.6),
             cand("b", 2, 1, 3.0), cand("b", 1, 1, 1.2)]
    demands = [Demand("a", objective, 4.0), Demand("b", "min_gpus", 3.5)]
    assert check_against_brute(c, demands, cands, Brute(c, demands, cands)) == "aggregated"


def test_domain_patterns_and_per_domain_fallback(monkeypatch):
    # TP sizes 3 and 2 do not divide each other: domain patterns; then the per-domain fallback
    c = cluster(group(1, 8, 8), group(1, 6, 6))
    cands = [cand("a", 3, 1, 3.3), cand("a", 2, 1, 2.0), cand("a", 3, 2, 6.9), cand("b", 2, 1, 2.5),
             cand("b", 1, 1, 1.1)]
    for objective in OBJECTIVES:
        demands = [Demand("a", objective, 7.5), Demand("b", "min_gpus", 3.0)]
        b = Brute(c, demands, cands)
        check_against_brute(c, demands, cands, b)
        monkeypatch.setattr(aggregated, "PATTERN_LIMIT", 1)
        check_against_brute(c, demands, cands, b)
        monkeypatch.setattr(aggregated, "PATTERN_LIMIT", 2000)


@pytest.mark.parametrize("tolerance", [0.0, 0.02, 0.1])
def test_ratio_tolerance_against_brute_force(tolerance):
    # balancing prefill (3.0) and decode (1.1) exactly takes many instances; a tolerance stops early
    c = cluster(group(2, 8, 8), network=50e9)
    cands = [cand("a", 1, 1, 3.0, "prefill", kv=1e6), cand("a", 1, 1, 1.1, "decode", kv=1e6),
             cand("a", 2, 1, 2.3, "decode", kv=1e6)]
    demands = [Demand("a", "max_goodput_per_gpu", 2.0)]
    b = Brute(c, demands, cands)
    feasible = [r["a"] for r in (b.evaluate(x, ["a"], {"a"}) for x in b.combos()) if r is not None]
    best = max(Fraction(g, k) for k, g, _ in feasible)
    ok = [(k, g) for k, g, _ in feasible if Fraction(g, k) >= best * (1 - Fraction(tolerance).limit_denominator(10000))]
    k_min = min(k for k, _ in ok)
    g_max = max(g for k, g in ok if k == k_min)
    r = solve_placement(c, GPUS, demands, cands, ratio_tolerance=tolerance)
    dp = r.deployments["a"]
    check_valid(c, demands, cands, r)
    assert (dp.gpus, _milli(dp.goodput_rps)) == (k_min, g_max)
    assert dp.bound == pytest.approx(float(best) / 1000) and r.status == "optimal"
    assert dp.gap == pytest.approx(1 - g_max / k_min / float(best), abs=1e-12)
    if tolerance == 0.1:
        assert dp.gpus < 8


# ----------------------------------------------------------------------------------------------
# infeasibility


def test_infeasible_load_reports_max_goodput_and_gpus_needed():
    c = cluster(group(1, 8, 8))
    cands = [cand("a", 2, 1, 2.5), cand("a", 4, 1, 5.5), cand("a", 8, 1, 10.0)]
    with pytest.raises(PlacementInfeasible) as info:
        solve_placement(c, GPUS, [Demand("a", "min_gpus", 20.0)], cands)
    e = info.value
    assert e.deployment == "a"
    assert e.max_goodput_rps == {"a": pytest.approx(11.0)}  # two tp4 instances
    assert e.gpus_needed == {"a": 16}  # 2 x tp4 + 1 x tp8 = 21 req/s, or 4 x tp4 = 22 req/s
    assert e.load_rps == {"a": 20.0}
    assert "20 req/s" in e.message and "16 GPUs" in e.message


def test_infeasible_under_max_gpus_names_it():
    c = cluster(group(2, 8, 8))
    cands = [cand("a", 4, 1, 5.5)]
    with pytest.raises(PlacementInfeasible) as info:
        solve_placement(c, GPUS, [Demand("a", "max_goodput_per_gpu", 12.0, max_gpus=8)], cands)
    assert info.value.max_goodput_rps == {"a": pytest.approx(11.0)}
    assert info.value.gpus_needed == {"a": 12}
    assert "max_gpus 8" in info.value.message


def test_infeasible_together_blames_the_later_deployment():
    c = cluster(group(1, 8, 8))
    cands = [cand("a", 4, 1, 5.0), cand("b", 2, 1, 2.0)]
    demands = [Demand("a", "min_gpus", 9.0), Demand("b", "min_gpus", 3.0)]  # a needs 8 GPUs, b 4
    with pytest.raises(PlacementInfeasible) as info:
        solve_placement(c, GPUS, demands, cands)
    e = info.value
    assert e.deployment == "b" and e.max_goodput_rps == {"b": 0.0} and e.gpus_needed == {"b": 4}
    assert "next to a" in e.message


def test_candidate_that_fits_nowhere():
    c = cluster(group(1, 8, 4))
    cands = [cand("a", 8, 1, 50.0)]  # tp 8 cannot sit in a domain of 4
    with pytest.raises(PlacementInfeasible) as info:
        solve_placement(c, GPUS, [Demand("a", "min_gpus", 1.0)], cands)
    assert info.value.max_goodput_rps == {"a": 0.0} and info.value.gpus_needed == {"a": None}


# ----------------------------------------------------------------------------------------------
# replicas: the instance counts a deployment allows, all roles together


def test_replicas_change_the_optimum():
    # load 7 on 8 GPUs: any count takes tp4 + tp2 (6 GPUs, 8 req/s, 2 instances)
    c = cluster(group(1, 8, 8))
    cands = [cand("a", 2, 1, 2.5), cand("a", 4, 1, 5.5), cand("a", 8, 1, 10.0)]
    expected = {  # replicas: GPUs, goodput, instances, binding
        None: (6, 8.0, 2, None),
        (1,): (8, 10.0, 1, "replicas 1 of deployment a"),  # one tp8
        (3,): (6, 7.5, 3, "replicas 3 of deployment a"),  # three tp2
        (1, 3): (6, 7.5, 3, "replicas in [1, 3] of deployment a"),
        (2, 4): (6, 8.0, 2, None),
    }
    for replicas, (gpus, goodput, count, binding) in expected.items():
        demands = [Demand("a", "min_gpus", 7.0, replicas=replicas)]
        r = solve_placement(c, GPUS, demands, cands)
        check_valid(c, demands, cands, r)
        dp = r.deployments["a"]
        assert (dp.gpus, dp.goodput_rps, len(dp.instances)) == (gpus, pytest.approx(goodput), count), replicas
        assert [b for b in r.binding if b.startswith("replicas")] == ([binding] if binding else [])
        assert check_against_brute(c, demands, cands, Brute(c, demands, cands)) == "aggregated"


def test_replicas_count_prefill_and_decode_together():
    c = cluster(group(1, 8, 8))
    cands = [cand("a", 1, 1, 3.0, "prefill"), cand("a", 1, 1, 1.0, "decode"), cand("a", 2, 1, 2.4, "decode")]
    r = solve_placement(c, GPUS, [Demand("a", "min_gpus", 2.0)], cands)
    assert sorted(i.candidate_key for i in r.deployments["a"].instances) == [
        "a/h100/tp1/pp1/prefill", "a/h100/tp2/pp1/decode"]  # 3 GPUs, 2.4 req/s
    r = solve_placement(c, GPUS, [Demand("a", "min_gpus", 2.0, replicas=(3,))], cands)
    dp = r.deployments["a"]
    assert sorted(i.candidate_key for i in dp.instances) == [
        "a/h100/tp1/pp1/decode", "a/h100/tp1/pp1/decode", "a/h100/tp1/pp1/prefill"]
    assert (dp.gpus, dp.goodput_rps, dp.prefill_rps, dp.decode_rps) == (3, 2.0, 3.0, 2.0)
    with pytest.raises(PlacementInfeasible) as info:  # one instance cannot be both prefill and decode
        solve_placement(c, GPUS, [Demand("a", "min_gpus", 2.0, replicas=(1,))], cands)
    assert info.value.max_goodput_rps == {"a": 0.0} and info.value.gpus_needed == {"a": 3}


def test_replicas_infeasible_reports_max_goodput_and_gpus_needed():
    c = cluster(group(1, 8, 8))
    cands = [cand("a", 2, 1, 2.5), cand("a", 4, 1, 5.5), cand("a", 8, 1, 10.0)]
    assert solve_placement(c, GPUS, [Demand("a", "min_gpus", 10.5)], cands).deployments["a"].gpus == 8  # 2 x tp4
    with pytest.raises(PlacementInfeasible) as info:
        solve_placement(c, GPUS, [Demand("a", "min_gpus", 10.5, replicas=(1,))], cands)
    e = info.value
    assert e.deployment == "a"
    assert e.max_goodput_rps == {"a": pytest.approx(10.0)}  # one tp8
    assert e.gpus_needed == {"a": 8}  # no single instance serves 10.5 req/s: 2 x tp4, beyond replicas
    assert e.message == ("deployment a cannot serve 10.5 req/s: at most 10 req/s on the cluster's 8 h100 GPUs with "
                         "replicas 1; serving its load takes 8 GPUs, with more instances than its replicas 1 allows")
    # six instances do not fit 8 GPUs; given nodes, six tp2 (12 GPUs) serve 12 req/s (any count: tp8 + tp2, 10)
    with pytest.raises(PlacementInfeasible) as info:
        solve_placement(c, GPUS, [Demand("a", "min_gpus", 12.0, replicas=(6,))], cands)
    e = info.value
    assert e.max_goodput_rps == {"a": 0.0} and e.gpus_needed == {"a": 12}
    assert "no allowed instance count can be placed" in e.message and "more instances" not in e.message


@pytest.mark.parametrize("layer", ["configs", "per-node"])
def test_replicas_keep_local_configurations_of_other_counts(layer):
    # KV only fits inside a node: 4 instances need 2 tp1 prefill + 2 tp1 decode on one node, a
    # local configuration worse in goodput than tp2 + tp2 on the same GPUs (kept for its count)
    c = cluster(group(2, 4, 4), network=1e8)
    cands = [cand("d", 1, 1, 1.0, "prefill", kv=1e9), cand("d", 2, 1, 2.5, "prefill", kv=1e9),
             cand("d", 1, 1, 1.0, "decode", kv=1e9), cand("d", 2, 1, 2.5, "decode", kv=1e9)]
    demands = [Demand("d", "min_gpus", 1.5, replicas=(4,))]
    assert check_against_brute(c, demands, cands, Brute(c, demands, cands), layer) == layer
    placement_model._LAYER = layer
    try:
        dp = solve_placement(c, GPUS, demands, cands).deployments["d"]
    finally:
        placement_model._LAYER = None
    assert (dp.gpus, dp.goodput_rps, len(dp.instances)) == (4, 2.0, 4)
    assert len({g.node for i in dp.instances for g in i.gpus}) == 1


def test_invalid_replicas():
    c = cluster(group(1, 8, 8))
    for replicas in ((), (-1, 2)):
        with pytest.raises(ValueError, match="replicas"):
            solve_placement(c, GPUS, [Demand("a", "min_gpus", 1.0, replicas=replicas)], [cand("a", 1, 1, 1.0)])


# ----------------------------------------------------------------------------------------------
# the KV rule, pipelines without a network


def kv_case(network: float | None):
    c = cluster(group(2, 4, 4), network=network)
    cands = [cand("chat", 4, 1, 10.0, "prefill", kv=1e9), cand("chat", 4, 1, 10.0, "decode", kv=1e9),
             cand("chat", 2, 1, 4.0, "prefill", kv=1e9), cand("chat", 2, 1, 4.0, "decode", kv=1e9)]
    return c, [Demand("chat", "max_goodput_per_gpu", 4.0)], cands


@pytest.mark.parametrize("layer", [None, "per-node", "configs"])
def test_slow_network_keeps_prefill_and_decode_on_one_node(layer):
    c, demands, cands = kv_case(network=1e9)  # 4 GB/s of KV at the load, 1 GB/s per node
    placement_model._LAYER = layer
    try:
        r = solve_placement(c, GPUS, demands, cands)
    finally:
        placement_model._LAYER = None
    check_valid(c, demands, cands, r)
    insts = r.deployments["chat"].instances
    assert sorted(i.candidate_key.split("/")[2] for i in insts) == ["tp2", "tp2"]
    assert len({g.node for i in insts for g in i.gpus}) == 1
    assert r.deployments["chat"].objective_value == pytest.approx(1.0)
    assert any("cannot carry the KV traffic of deployment chat" in b for b in r.binding)
    assert check_against_brute(c, demands, cands, Brute(c, demands, cands), layer) in ("configs", "per-node")


def test_fast_network_lets_them_spread():
    c, demands, cands = kv_case(network=50e9)
    r = solve_placement(c, GPUS, demands, cands)
    check_valid(c, demands, cands, r)
    insts = r.deployments["chat"].instances
    assert sorted(i.candidate_key.split("/")[3] for i in insts) == ["pp1", "pp1"]
    assert {i.candidate_key.split("/")[2] for i in insts} == {"tp4"}
    assert {i.gpus[0].node for i in insts} == {0, 1}
    assert r.deployments["chat"].objective_value == pytest.approx(1.25)
    assert r.deployments["chat"].mode == "disaggregated"


def test_no_network_disaggregated_lives_on_one_node_or_fails():
    c, demands, cands = kv_case(network=None)
    r = solve_placement(c, GPUS, demands, cands)
    assert len({g.node for i in r.deployments["chat"].instances for g in i.gpus}) == 1
    with pytest.raises(PlacementInfeasible):
        solve_placement(c, GPUS, [Demand("chat", "min_gpus", 8.0)], cands)  # needs both nodes


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_kv_limit_per_node_against_brute_force(objective):
    # 3 nodes x 2 GPUs, 0.7 GB/s per node and direction: 1.75 req/s of prefill (or decode) per node
    c = cluster(group(3, 2, 2, price=6.0), network=7e8)
    cands = [cand("d", 1, 1, 1.0, "prefill", kv=4e8), cand("d", 1, 1, 1.5, "prefill", kv=4e8, tag="/big"),
             cand("d", 1, 1, 0.6, "decode", kv=4e8), cand("d", 2, 1, 1.3, "decode", kv=4e8)]
    demands = [Demand("d", objective, 2.2)]
    b = Brute(c, demands, cands)
    for layer in ("configs", "per-node"):
        assert check_against_brute(c, demands, cands, b, layer) == layer


def kv_per_node(r, demands, cands) -> list[float]:
    """Bytes/s out of and into each node under the documented rule (for deployments on > 1 node)."""
    by_key = {x.key: x for x in cands}
    loads = {d.deployment: d.load_rps for d in demands}
    traffic = {}
    for name, dp in r.deployments.items():
        nodes = {g.node for i in dp.instances if by_key[i.candidate_key].role != "colocated" for g in i.gpus}
        if len(nodes) <= 1:
            continue
        for inst in dp.instances:
            x = by_key[inst.candidate_key]
            if x.role == "colocated":
                continue
            for s in range(x.pp):
                key = (inst.gpus[s * x.tp].node, x.role)
                traffic[key] = traffic.get(key, 0.0) + x.kv_bytes_per_request * min(x.capacity_rps, loads[name]) / x.pp
    return list(traffic.values())


def test_pipeline_stays_in_its_node_without_a_network():
    cands = [cand("a", 2, 2, 5.0), cand("a", 2, 4, 12.0)]
    demands = [Demand("a", "max_goodput_per_gpu", 4.0)]
    c = cluster(group(2, 4, 2), network=None)
    r = solve_placement(c, GPUS, demands, cands)  # tp2 x pp4 would need both nodes
    check_valid(c, demands, cands, r)
    assert [i.candidate_key for i in r.deployments["a"].instances] == ["a/h100/tp2/pp2/colocated"]
    c2 = cluster(group(2, 4, 2))
    r2 = solve_placement(c2, GPUS, demands, cands)
    check_valid(c2, demands, cands, r2)
    (inst,) = r2.deployments["a"].instances
    assert inst.candidate_key == "a/h100/tp2/pp4/colocated" and {g.node for g in inst.gpus} == {0, 1}


# ----------------------------------------------------------------------------------------------
# costs, binding constraints, inputs


def test_min_cost_prefers_the_cheaper_group():
    c = cluster(group(1, 8, 8, price=80.0), group(1, 8, 8, price=40.0))  # 10 vs 5 usd per GPU-hour
    cands = [cand("a", 2, 1, 3.0)]
    r = solve_placement(c, GPUS, [Demand("a", "min_cost", 5.0)], cands)
    insts = r.deployments["a"].instances
    assert {g.node for i in insts for g in i.gpus} == {1}
    assert r.deployments["a"].cost_per_hour == pytest.approx(20.0)
    assert r.deployments["a"].objective_value == pytest.approx(20.0)


def test_gpu_price_when_nodes_have_none_and_heterogeneous_types():
    c = cluster(group(1, 4, 4, gpu="h100"), group(1, 4, 4, gpu="a100"))
    cands = [cand("a", 2, 1, 3.0, gpu="h100"), cand("a", 2, 1, 2.0, gpu="a100")]
    r = solve_placement(c, GPUS, [Demand("a", "min_cost", 5.0)], cands)
    # 2 x h100 tp2 = 10 usd/h; 1 h100 + 1 a100 = 5 + 3 = 8 usd/h; 3 x a100 needs 6 of 4 GPUs
    assert r.deployments["a"].cost_per_hour == pytest.approx(8.0)
    for inst in r.deployments["a"].instances:
        assert all(g.node == (0 if "h100" in inst.candidate_key else 1) for g in inst.gpus)


def test_binding_reports_full_cluster_and_max_gpus():
    c = cluster(group(2, 8, 8))
    cands = [cand("a", 4, 1, 6.0), cand("b", 4, 1, 5.0)]
    r = solve_placement(c, GPUS, [Demand("a", "max_goodput_per_gpu", 10.0, max_gpus=8),
                                  Demand("b", "max_goodput_per_gpu", 10.0)], cands)
    assert "all 16 h100 GPUs are used" in r.binding
    assert "max_gpus 8 of deployment a" in r.binding


def test_invalid_inputs():
    c = cluster(group(1, 8, 8))
    with pytest.raises(ValueError):
        solve_placement(c, GPUS, [Demand("a", "min_gpus", 1.0)], [cand("a", 1, 1, 1.0), cand("a", 1, 1, 2.0)])
    with pytest.raises(ValueError):
        solve_placement(c, GPUS, [Demand("a", "min_gpus", 1.0)], [cand("z", 1, 1, 1.0)])
    c2 = spec.Cluster(name="c", nodes=[spec.NodeGroup(count=1, gpu="x", gpus_per_node=8, link=NVLINK, link_domain=8,
                                                      host_link=PCIE)])
    gx = {"x": GPUS["h100"].model_copy(update={"name": "x", "price": None})}
    with pytest.raises(ValueError, match="no price"):
        solve_placement(c2, gx, [Demand("a", "min_cost", 1.0)], [cand("a", 1, 1, 1.0, gpu="x")])


def test_zero_load_min_gpus_places_nothing():
    c = cluster(group(1, 8, 8))
    r = solve_placement(c, GPUS, [Demand("a", "min_gpus", 0.0)], [cand("a", 1, 1, 1.0)])
    assert r.deployments["a"].instances == [] and r.deployments["a"].gpus == 0


# ----------------------------------------------------------------------------------------------
# scale: identical nodes must not blow up the search


def two_deployments(rng: random.Random, disagg: bool = False) -> list[Candidate]:
    out = []
    if disagg:
        for role, base in (("prefill", 5.0), ("decode", 2.2)):
            for tp in (1, 2, 4, 8):
                for v in range(2 if tp in (1, 8) else 3):
                    out.append(cand("chat", tp, 1, round(base * tp ** 0.9 * rng.uniform(0.8, 1.2), 3), role, kv=1.6e8,
                                    tag=f"/v{v}"))
    else:
        for tp in (2, 4, 8):
            for pp in (1, 2):
                for v in range(3):
                    out.append(cand("chat", tp, pp, round(1.6 * (tp * pp) ** 0.92 * rng.uniform(0.8, 1.2), 3),
                                    tag=f"/v{v}"))
    for tp in (1, 2, 4, 8):
        for v in range(5):
            out.append(cand("code", tp, 1, round(9.0 * tp ** 0.85 * rng.uniform(0.8, 1.2), 3), tag=f"/v{v}"))
    return out


@pytest.mark.parametrize("nodes", [16, 64])
def test_many_identical_nodes_solve_fast(nodes):
    c = cluster(group(nodes, 8, 8, price=98.32), network=50e9, nics=8)
    cands = two_deployments(random.Random(nodes))
    demands = [Demand("chat", "max_goodput_per_gpu", 0.45 * nodes * 8 * 1.4),
               Demand("code", "min_gpus", 0.25 * nodes * 8 * 8.5)]
    t0 = time.perf_counter()
    r = solve_placement(c, GPUS, demands, cands, time_limit_s=30)
    assert time.perf_counter() - t0 < 5
    assert r.status == "optimal" and r.model == "aggregated"
    check_valid(c, demands, cands, r)


def test_many_nodes_with_a_binding_kv_network_solve_fast():
    c = cluster(group(64, 8, 8), network=1e9)
    cands = two_deployments(random.Random(3), disagg=True)
    demands = [Demand("chat", "max_goodput_per_gpu", 300.0), Demand("code", "min_gpus", 1000.0)]
    t0 = time.perf_counter()
    r = solve_placement(c, GPUS, demands, cands, time_limit_s=30)
    assert time.perf_counter() - t0 < 5
    assert r.status == "optimal" and r.model == "configs"
    check_valid(c, demands, cands, r)
    traffic = kv_per_node(r, demands, cands)
    assert traffic and max(traffic) <= 1e9 * (1 + 1e-9)


def test_512_gpus_per_node_fallback_layer_returns_a_valid_plan():
    # the fallback layer on the configuration layer's instance: same optimum, or a valid plan
    # with a gap when its weaker LP runs out of time
    c = cluster(group(64, 8, 8), network=1e9)
    cands = two_deployments(random.Random(3), disagg=True)
    demands = [Demand("chat", "max_goodput_per_gpu", 300.0), Demand("code", "min_gpus", 1000.0)]
    exact = solve_placement(c, GPUS, demands, cands, time_limit_s=30)
    placement_model._LAYER = "per-node"
    try:
        r = solve_placement(c, GPUS, demands, cands, time_limit_s=5)
    finally:
        placement_model._LAYER = None
    assert r.model == "per-node"
    check_valid(c, demands, cands, r)
    assert max(kv_per_node(r, demands, cands)) <= 1e9 * (1 + 1e-9)
    if r.status == "optimal":
        for name in ("chat", "code"):
            assert r.deployments[name].objective_value == pytest.approx(exact.deployments[name].objective_value)
    else:
        assert r.deployments["chat"].bound >= exact.deployments["chat"].objective_value - 1e-9
