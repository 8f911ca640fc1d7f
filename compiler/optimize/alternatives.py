"""Why each measured candidate the placement left out lost, in the deployment's own objective.

Every alternative is scored the way the objective scores the plan, on what the candidate alone
would need for the deployment's load (a prefill or decode candidate beside the best partner of
the other role):
- max goodput_per_gpu (and max throughput, whose batch takes every GPU it may): req/s per GPU,
  against the chosen instances of the same role, or against the plan as a whole when the plan
  has none of that role;
- min gpus: the GPUs the load needs, against the plan's;
- min cost: usd per hour for the load, against the plan's.
An alternative that scores no worse lost to the placement (link domains, GPU counts, the other
deployments), and says so.
"""

from __future__ import annotations

import math
from typing import Optional

from flowc.compiler.model.topology import gpu_prices
from flowc.compiler.optimize.candidates import Measured
from flowc.compiler.optimize.placement import Candidate
from flowc.compiler.plan import Alternative, InstanceGroup
from flowc.compiler.spec import Deployment, Spec
from flowc.compiler.units import format_rps

PARTNER = {"prefill": "decode", "decode": "prefill"}


def alternatives(spec: Spec, d: Deployment, load: float, unused: list[Measured], candidates: list[Candidate],
                 groups: list[InstanceGroup], plan_gpus: int, plan_cost: Optional[float]) -> list[Alternative]:
    """The unused candidates, each with its objective value and the reason that decided it;
    `candidates` are all the deployment's (partners are drawn from them)."""
    price = gpu_prices(spec.clusters[d.cluster], spec.gpus)
    out = []
    for m in unused:
        c = m.candidate
        partner = _best_partner(c, candidates)
        if c.role != "colocated" and partner is None:
            out.append(Alternative(summary=m.summary, reason=f"no {PARTNER[c.role]} candidate to pair it with"))
            continue
        if d.objective in ("max_goodput_per_gpu", "max_throughput"):
            # a batch takes every GPU it may: its throughput is its per-GPU rate times them
            measured = "when saturated" if d.objective == "max_throughput" else "under the SLO"
            out.append(_per_gpu(m, partner, groups, plan_gpus, measured))
        else:
            out.append(_for_load(m, partner, load, plan_gpus, plan_cost, price, d.objective))
    return out


def _gpus_per_rps(c: Candidate) -> float:
    return c.gpus / c.capacity_rps


def _best_partner(c: Candidate, candidates: list[Candidate]) -> Optional[Candidate]:
    """The candidate of the other role that costs the fewest GPUs per req/s."""
    if c.role == "colocated":
        return None
    others = [x for x in candidates if x.role == PARTNER[c.role] and x.gpu == c.gpu and x.capacity_rps > 0]
    return min(others, key=_gpus_per_rps, default=None)


def _per_gpu(m: Measured, partner: Optional[Candidate], groups: list[InstanceGroup], plan_gpus: int,
             measured: str) -> Alternative:
    c = m.candidate
    # a prefill/decode pair balanced to one load: the GPUs per req/s of the two roles add up
    ratio = 1.0 / (_gpus_per_rps(c) + (_gpus_per_rps(partner) if partner else 0.0))
    same_role = [g for g in groups if g.role == c.role]
    pair = ""
    if same_role:
        best = max(g.capacity_rps / g.gpus_per_instance for g in same_role)
        reference = f"the chosen {c.role} instances' {format_rps(best, 4)}"
        value = c.capacity_rps / c.gpus
    else:
        pair = f" (paired with {partner.gpu} tp {partner.tp} {partner.role})" if partner else ""
        best = sum(g.capacity_rps * g.replicas for g in groups if g.role == "colocated")
        if any(g.role != "colocated" for g in groups):
            best = min(sum(g.capacity_rps * g.replicas for g in groups if g.role == role)
                       for role in ("prefill", "decode"))
        best /= max(plan_gpus, 1)
        reference = f"the chosen plan's {format_rps(best, 4)}"
        value = ratio
    if value < best * (1 - 1e-9):
        return Alternative(summary=m.summary, objective_value=value,
                           reason=f"serves {format_rps(value, 4)} per GPU {measured}{pair}, fewer than {reference}")
    return Alternative(summary=m.summary, objective_value=value,
                       reason=f"serves {format_rps(value, 4)} per GPU{pair}, as many as {reference}, but the placement "
                              "did not need it (GPU counts, link domains or the other deployments)")


def _for_load(m: Measured, partner: Optional[Candidate], load: float, plan_gpus: int, plan_cost: Optional[float],
              price: dict[str, Optional[float]], objective: str) -> Alternative:
    c = m.candidate
    parts = [c] + ([partner] if partner else [])
    instances = [max(1, math.ceil(load / x.capacity_rps - 1e-9)) for x in parts]
    gpus = sum(n * x.gpus for n, x in zip(instances, parts))
    counts = " + ".join(f"{n} x {x.role}" for n, x in zip(instances, parts)) if partner else f"{instances[0]} instances"
    if objective == "min_gpus":
        if gpus > plan_gpus:
            reason = f"needs {gpus} GPUs ({counts}) for the load of {format_rps(load)}; the plan uses {plan_gpus}"
        else:
            reason = (f"needs {gpus} GPUs ({counts}) for the load, no more than the plan's {plan_gpus}, but the "
                      "placement did not need it (link domains, the other deployments, or the end-to-end check)")
        return Alternative(summary=m.summary, objective_value=float(gpus), reason=reason)
    unit_prices = [price.get(x.gpu) for x in parts]
    if plan_cost is None or any(p is None for p in unit_prices):
        return Alternative(summary=m.summary, reason=f"needs {gpus} GPUs ({counts}) for the load; no price to compare")
    cost = sum(n * x.gpus * p for n, x, p in zip(instances, parts, unit_prices))
    if cost > plan_cost * (1 + 1e-9):
        reason = f"costs {cost:,.2f} usd/h ({counts}) for the load of {format_rps(load)}; the plan {plan_cost:,.2f}"
    else:
        reason = (f"costs {cost:,.2f} usd/h ({counts}) for the load, no more than the plan's {plan_cost:,.2f}, but "
                  "the placement did not need it (link domains, the other deployments, or the end-to-end check)")
    return Alternative(summary=m.summary, objective_value=cost, reason=reason)

