"""The CP-SAT model core: instance counts n_c per candidate, and per deployment its GPUs K_d,
goodput G_d, cost_d, mode and allowed replica counts. Where the instances go is a placement layer
(aggregated.py, configs.py, per_node.py), chosen here; every layer ties its variables to n_c."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ortools.sat.python import cp_model

from flowc.compiler.optimize.placement.aggregated import AggregatedLayer
from flowc.compiler.optimize.placement.configs import ConfigsLayer, enumerate_configs
from flowc.compiler.optimize.placement.per_node import PerNodeLayer
from flowc.compiler.optimize.placement.problem import COST_SCALE, Problem, scale_load

_LAYER: Optional[str] = None  # tests force a layer ("per-node" or "configs") where both apply


@dataclass
class Result:
    status: int
    vals: Optional[dict[int, int]]
    obj: Optional[float]
    bound: Optional[float]


class ModelInfeasible(Exception):
    pass


class Model:
    """One CP-SAT model over the `active` deployments: loads enforced for `enforce_load`, at least
    one instance for `need_instance` (the diagnosis solves models with fewer of each)."""

    def __init__(self, p: Problem, active: list[str], enforce_load: set[str], *,
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
            if d.replicas is not None:
                ub = min(ub, max(d.replicas))
            self.n[c.idx] = self.int_var(0, ub, f"n[{c.c.key}]")
        self.K, self.G, self.cost = {}, {}, {}
        self.cost_expr: dict[str, list] = {d: [] for d in active}  # (var, scaled price or None, var's ub)
        self.layer: AggregatedLayer | ConfigsLayer | PerNodeLayer
        if p.per_node:
            configs = None if _LAYER == "per-node" else enumerate_configs(self)
            if configs is not None:
                self.layer = ConfigsLayer(self, configs)
            elif _LAYER == "configs":
                raise ValueError("the configuration layer does not apply")
            else:
                self.layer = PerNodeLayer(self)
        else:
            self.layer = AggregatedLayer(self)
        for name in active:
            d = p.demands[name]
            cs = [c for c in self.cands if c.dep == name]
            types = {c.c.gpu for c in cs}
            kmax = sum(p.type_gpus[t] for t in types)
            if d.max_gpus is not None:
                kmax = min(kmax, d.max_gpus)
            self.K[name] = K = self.int_var(0, kmax, f"K[{name}]")
            m.add(K == sum(c.gpus * self.n[c.idx] for c in cs))
            if d.replicas is not None:  # on the counts, so it holds in every layer
                m.add_linear_expression_in_domain(cp_model.LinearExpr.sum([self.n[c.idx] for c in cs]),
                                                  cp_model.Domain.from_values(sorted(set(d.replicas))))
            col = [c for c in cs if c.role == "colocated"]
            pre = [c for c in cs if c.role == "prefill"]
            dec = [c for c in cs if c.role == "decode"]
            gmax = sum(c.cap * self.upper(self.n[c.idx]) for c in cs)
            self.G[name] = G = self.int_var(0, gmax, f"G[{name}]")
            csum = sum(c.cap * self.n[c.idx] for c in col)
            if pre or dec:
                P = self.int_var(0, gmax, f"P[{name}]")
                D = self.int_var(0, gmax, f"D[{name}]")
                m.add(P == sum(c.cap * self.n[c.idx] for c in pre))
                m.add(D == sum(c.cap * self.n[c.idx] for c in dec))
                M = self.int_var(0, gmax, f"M[{name}]")
                m.add_min_equality(M, [P, D])
                m.add(G == csum + M)
                if col:
                    b = self.bool_var(f"disagg[{name}]")
                    for c in col:
                        m.add(self.n[c.idx] == 0).only_enforce_if(b)
                    for c in pre + dec:
                        m.add(self.n[c.idx] == 0).only_enforce_if(~b)
            else:
                m.add(G == csum)
            if name in enforce_load:
                m.add(G >= scale_load(d.load_rps))
            if name in need_instance:
                m.add(K >= 1)
            terms = self.cost_expr[name]
            if all(price is not None for _, price, _ in terms):
                cmax = sum(ub * price for _, price, ub in terms)
                self.cost[name] = self.int_var(0, cmax, f"cost[{name}]")
                m.add(self.cost[name] == sum(v * price for v, price, _ in terms))

    # helpers for the layers
    def int_var(self, lb: int, ub: int, name: str):
        v = self.m.new_int_var(lb, max(lb, ub), name)
        self.vars.append(v)
        self.ub[v.index] = max(lb, ub)
        return v

    def bool_var(self, name: str):
        v = self.m.new_bool_var(name)
        self.vars.append(v)
        self.ub[v.index] = 1
        return v

    def upper(self, v) -> int:
        return self.ub[v.index]

    @staticmethod
    def price(price: Optional[float], tp: int) -> Optional[int]:
        """Scaled price of a TP group (one stage) at a per-GPU price; None without a price."""
        return None if price is None else int(round(price * COST_SCALE)) * tp

    def fits_one_node(self, d: str) -> bool:
        """Whether deployment d could possibly serve its load from a single node (an upper bound
        from the best capacity per GPU of each role); if not, its KV always crosses nodes."""
        p = self.p
        if d not in self.enforce_load:
            return True  # (diagnosis: any goodput counts)
        load = scale_load(p.demands[d].load_rps)
        cs = [c for c in self.cands if c.dep == d]
        for v in p.relevant_nodes():
            best = {}
            for role in ("colocated", "prefill", "decode"):
                rs = [c.cap / c.gpus for c in cs if c.role == role and c.c.gpu == v.gpu]
                best[role] = max(rs, default=0.0) * v.gpus
            if max(best["colocated"], min(best["prefill"], best["decode"])) >= load:
                return True
        return False

    def solve(self, sense: Optional[str], expr, time_s: float, workers: int, hint: Optional[dict]) -> Result:
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
        solver.parameters.extra_subsolvers.extend(self.layer.extra_subsolvers)
        status = solver.solve(m)
        vals = None
        if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            vals = {v.index: int(solver.value(v)) for v in self.vars}
        obj = solver.objective_value if sense is not None and vals is not None else None
        bound = solver.best_objective_bound if sense is not None else None
        return Result(status, vals, obj, bound)
