"""The entry point: build the model, solve lexicographically, turn counts into GPUs, report."""

from __future__ import annotations

import time

from flowc.compiler import spec
from flowc.compiler.optimize.placement.binding import binding
from flowc.compiler.optimize.placement.diagnose import diagnose
from flowc.compiler.optimize.placement.materialize import Materializer, check
from flowc.compiler.optimize.placement.model import Model, ModelInfeasible
from flowc.compiler.optimize.placement.objectives import Lex
from flowc.compiler.optimize.placement.problem import Problem
from flowc.compiler.optimize.placement.types import Candidate, Demand, DeploymentPlacement, PlacedInstance, Placement


def solve_placement(cluster: spec.Cluster, gpus: dict[str, spec.GPU], demands: list[Demand],
                    candidates: list[Candidate], *, time_limit_s: float = 10.0, workers: int = 1,
                    ratio_tolerance: float = 0.0) -> Placement:
    """Choose instance counts and exact GPUs for every deployment (see the package docstring).

    `ratio_tolerance` (max_goodput_per_gpu only, default 0 = exact): after the best ratio r* is
    found, take the fewest GPUs whose ratio is >= (1 - ratio_tolerance) * r*. The exact optimum of a
    disaggregated deployment can need a large prefill/decode mix to balance the two sums, far
    above the load; a tolerance of about 1% trades that for a plan sized near the load."""
    t0 = time.perf_counter()
    deadline = t0 + time_limit_s
    p = Problem(cluster, gpus, demands, candidates)
    oversized = [c for c in p.unplaceable if c.tp <= p.max_domain.get(c.gpu, 0)]
    need = {n for n in p.order if p.demands[n].objective in ("max_goodput_per_gpu", "max_throughput")}
    model = Model(p, p.order, set(p.order), need_instance=need)
    lex = Lex(model, deadline, workers, ratio_tolerance)
    try:
        outcomes = lex.run()
    except ModelInfeasible:
        raise diagnose(p, oversized, max(deadline, time.perf_counter() + min(time_limit_s, 10.0)), workers) from None
    vals = lex.cur
    placed = Materializer(model, vals).instances()
    counts = {c.idx: vals[model.n[c.idx].index] for c in model.cands}
    check(p, placed, counts)
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
        binding=binding(p, placed, gpus_of),
        model=model.layer.name,
        solves=lex.solves,
    )
