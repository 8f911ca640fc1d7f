"""The lexicographic solve: each deployment's objective in priority order, then its tie-break,
each result locked before the next; max_goodput_per_gpu by Dinkelbach's method."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

from ortools.sat.python import cp_model

from flowc.compiler.optimize.placement.model import Model, ModelInfeasible
from flowc.compiler.optimize.placement.problem import COST_SCALE, RPS_SCALE, scale_load
from flowc.compiler.optimize.placement.types import PlacementError, PlacementTimeout

TOLERANCE_STEPS = 10_000  # ratio_tolerance resolution: 1e-4
COEFFICIENT_LIMIT = 2**61  # CP-SAT's linear expressions must stay inside int64, with room to spare


def _fit(a: int, b: int, scale: int, g_max: int, k_max: int) -> tuple[int, int]:
    """A ratio a'/b' <= a/b whose products scale*b'*G and scale*a'*K fit int64 for every G and
    K: on a large cluster (65,536 GPUs) the exact coefficients overflow."""
    factor = max(1, -(-scale * max(b * g_max, a * k_max) // COEFFICIENT_LIMIT))
    if factor == 1:
        return a, b
    return a // factor, -(-b // factor)


@dataclass
class Outcome:
    value: float  # in user units
    bound: float
    optimal: bool


class Lex:
    """Runs the lexicographic phases. Time: each deployment gets an equal share of what is left
    (its primary objective up to 80% of the share, the tie-break the rest; unused time passes
    on); the very first solution may use the whole time limit."""

    def __init__(self, model: Model, deadline: float, workers: int, ratio_tolerance: float = 0.0):
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
                raise ModelInfeasible()
            raise PlacementError("internal error: locking an objective made the placement infeasible")
        if r.status == cp_model.MODEL_INVALID:
            raise PlacementError(f"internal error: invalid CP-SAT model ({self.model.m.validate()})")
        if r.vals is not None:
            self.cur = r.vals
        elif self.cur is None:
            raise PlacementTimeout("no feasible placement found within the time limit; raise time_limit_s")
        return r.status == cp_model.OPTIMAL, evaluate(self.cur), r.bound

    def run(self) -> dict[str, Outcome]:
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
                out[name] = Outcome(v / scale, bound / scale, opt and opt2)
            elif d.objective == "max_throughput":  # an offline batch: the most req/s, then the fewest GPUs
                opt, g, b = self.phase("max", G, lambda s: s[G.index], primary_until)
                m.add(G >= g)
                opt2, k, _ = self.phase("min", K, lambda s: s[K.index], until)
                m.add(K <= k)
                bound = g if opt else max(g, b if b is not None else g)
                out[name] = Outcome(g / RPS_SCALE, bound / RPS_SCALE, opt and opt2)
            else:
                out[name] = self._ratio(name, K, G, primary_until, until)
        return out

    def _ratio(self, name: str, K, G, primary_until: float, until: float) -> Outcome:
        """Dinkelbach: a/b is the best ratio found; maximize b*G - a*K until the optimum is 0."""
        mdl, m = self.model, self.model.m
        cands = [c for c in mdl.cands if c.dep == name]
        trivial = max((c.cap / c.gpus for c in cands), default=0.0)  # no ratio beats the best instance's
        kmin = min((c.gpus for c in cands), default=1)
        if trivial > 0:
            kmin = max(kmin, math.ceil(scale_load(mdl.p.demands[name].load_rps) / trivial - 1e-9))
        if self.cur is None:
            self.phase(None, None, lambda s: 0, primary_until)
        a, b = self.cur[G.index], self.cur[K.index]
        optimal, upper = False, trivial
        g_max, k_max = mdl.ub[G.index], mdl.ub[K.index]
        for _ in range(100):
            a, b = _fit(a, b, 1, g_max, k_max)
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
        a, b = _fit(a, b, TOLERANCE_STEPS, g_max, k_max)
        m.add(TOLERANCE_STEPS * b * G >= (TOLERANCE_STEPS - slack) * a * K)
        opt2, k, _ = self.phase("min", K, lambda s: s[K.index], until)
        m.add(K <= k)
        if slack:  # the best ratio at those GPUs
            opt3, g, _ = self.phase("max", G, lambda s: s[G.index], until)
            m.add(G >= g)
            opt2 = opt2 and opt3
        value = self.cur[G.index] / self.cur[K.index]
        return Outcome(value / RPS_SCALE, max(upper, value) / RPS_SCALE, optimal and opt2)
