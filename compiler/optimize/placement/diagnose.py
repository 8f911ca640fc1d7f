"""Infeasibility: which deployment cannot be served, the largest load it could be served at, and
the GPUs its load needs given enough nodes."""

from __future__ import annotations

import time
from typing import Optional

from ortools.sat.python import cp_model

from flowc.compiler.optimize.placement.binding import replicas_text
from flowc.compiler.optimize.placement.model import Model
from flowc.compiler.optimize.placement.problem import RPS_SCALE, Problem, scale_load, scale_rps
from flowc.compiler.optimize.placement.types import Candidate, PlacementInfeasible
from flowc.compiler.units import format_gbps


def gpus_needed(p: Problem, name: str, oversized: list[Candidate], time_s: float, workers: int,
                replicas: Optional[tuple[int, ...]]) -> Optional[int]:
    """Fewest GPUs serving the load when nodes are not scarce: counting only (TP groups always
    find a domain on a fresh node); ignores the cluster's size, max_gpus and the KV rows. With
    `replicas`, the instance count is one of them; None when no count (allowed) serves the load."""
    d = p.demands[name]
    load = scale_load(d.load_rps)
    cs = [(c.c, c.cap) for c in p.by_dep[name]] + [(c, scale_rps(c.capacity_rps)) for c in oversized
                                                      if c.deployment == name]
    cs = [(c, cap) for c, cap in cs if cap > 0]
    if not cs:
        return None if load > 0 or (replicas is not None and 0 not in replicas) else 0
    m = cp_model.CpModel()
    # more instances of a candidate than its share of the load are only needed to reach a replica count
    n = [m.new_int_var(0, max(replicas) if replicas is not None else (-(-load // cap) if load else 1), f"n{i}")
         for i, (c, cap) in enumerate(cs)]
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
    if replicas is not None:
        m.add_linear_expression_in_domain(cp_model.LinearExpr.sum(n),
                                          cp_model.Domain.from_values(sorted(set(replicas))))
    m.minimize(sum(c.gpus * n[i] for i, (c, _) in enumerate(cs)))
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(0.5, time_s)
    solver.parameters.num_workers = max(1, workers)
    solver.parameters.catch_sigint_signal = False  # Ctrl-C is Python's (see compiler/optimize/arena.py)
    status = solver.solve(m)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None
    return int(solver.objective_value)


def diagnose(p: Problem, oversized: list[Candidate], deadline: float, workers: int) -> PlacementInfeasible:
    loads = {n: p.demands[n].load_rps for n in p.order}
    maxg: dict[str, float] = {}
    reasons: dict[str, str] = {}
    failing: list[str] = []

    def best(active: list[str], locked: set[str], name: str) -> tuple[float, Optional[dict], Model]:
        need = {name} if p.demands[name].objective == "max_goodput_per_gpu" else set()
        mdl = Model(p, active, locked, need_instance=need)
        r = mdl.solve("max", mdl.G[name], max(0.5, deadline - time.perf_counter()), workers, None)
        if r.vals is None:
            return -1.0, None, mdl
        return r.vals[mdl.G[name].index] / RPS_SCALE, r.vals, mdl

    def why(name: str, vals: Optional[dict], mdl: Model, others: list[str]) -> str:
        d = p.demands[name]
        types = sorted({c.c.gpu for c in p.by_dep[name]})
        if not p.by_dep[name]:
            return "no candidate instance fits the cluster"
        if vals is None:
            if d.replicas is not None:
                return f"with {replicas_text(d.replicas)} (no allowed instance count can be placed)"
            return "no instance can be placed"
        k = vals[mdl.K[name].index]
        if d.max_gpus is not None and d.max_gpus - k < min(c.gpus for c in p.by_dep[name]):
            return f"within max_gpus {d.max_gpus}"
        parts = [f"on the cluster's {sum(p.type_gpus[t] for t in types)} {'/'.join(types)} GPUs"]
        if d.replicas is not None:
            parts.append(f"with {replicas_text(d.replicas)}")
        if others:
            parts.append(f"next to {', '.join(others)}")
        if name in p.kv_deps and p.kv_out[name] > p.groups[0].nic:
            if p.network:
                parts.append(f"with the network carrying {format_gbps(p.groups[0].nic)} of KV traffic per node and "
                             f"direction (the load needs {format_gbps(p.kv_out[name])})")
            else:
                parts.append("with prefill and decode on one node (no network carries KV traffic between nodes)")
        return " ".join(parts)

    for name in p.order:
        g, vals, mdl = best([name], set(), name)
        if g < 0 or scale_rps(g) < scale_load(loads[name]):
            failing.append(name)
            maxg[name] = max(g, 0.0)
            reasons[name] = why(name, vals, mdl, [])
    if not failing:
        for k, name in enumerate(p.order):
            g, vals, mdl = best(p.order[:k + 1], set(p.order[:k]), name)
            if g < 0 or scale_rps(g) < scale_load(loads[name]):
                failing.append(name)
                maxg[name] = max(g, 0.0)
                reasons[name] = why(name, vals, mdl, p.order[:k])
                break
    if not failing:
        failing = [p.order[0]]
        maxg[p.order[0]] = 0.0
        reasons[p.order[0]] = "(no single deployment could be blamed within the time limit)"
    needed: dict[str, Optional[int]] = {}
    beyond: set[str] = set()  # their load takes more instances than their replicas allow
    for n in failing:
        time_s = min(2.0, max(0.5, deadline - time.perf_counter()))
        replicas = p.demands[n].replicas
        needed[n] = gpus_needed(p, n, oversized, time_s, workers, replicas)
        if needed[n] is None and replicas is not None:
            # no allowed count serves the load even on enough nodes: report the GPUs it takes
            # without the restriction (adding instances never lowers goodput, so it needs more)
            needed[n] = gpus_needed(p, n, oversized, time_s, workers, None)
            if needed[n] is not None:
                beyond.add(n)
    lines = []
    for n in failing:
        line = f"deployment {n} cannot serve {loads[n]:g} req/s: at most {maxg[n]:.4g} req/s {reasons[n]}"
        if n in beyond:
            line += (f"; serving its load takes {needed[n]} GPUs, with more instances than its "
                     f"{replicas_text(p.demands[n].replicas)} allows")
        elif needed[n] is not None:
            line += f"; serving its load takes {needed[n]} GPUs"
        else:
            line += "; no candidate instance serves its load"
        lines.append(line)
    return PlacementInfeasible(failing[0], "; ".join(lines), maxg, needed, loads, frozenset(beyond))
