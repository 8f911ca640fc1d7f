"""Binding constraints (`Placement.binding`): the constraints a placement makes tight, not a
sensitivity analysis; and the KV traffic per node under the documented model."""

from __future__ import annotations

from collections import defaultdict

from flowc.compiler.optimize.placement.problem import Problem
from flowc.compiler.plan import GpuRef
from flowc.compiler.units import format_gbps


def _kv_traffic(p: Problem, placed: dict[int, list[list[GpuRef]]]) -> tuple[dict, dict, set[str]]:
    """Bytes/s leaving and entering each node under the documented KV model, and the
    disaggregated deployments that sit on one node (no network traffic)."""
    out: dict[int, float] = defaultdict(float)
    inn: dict[int, float] = defaultdict(float)
    single = set()
    for d in p.kv_deps:
        load = p.demands[d].load_rps
        per_node_out: dict[int, float] = defaultdict(float)
        per_node_in: dict[int, float] = defaultdict(float)
        nodes = set()
        for ci, insts in placed.items():
            c = p.cands[ci]
            if c.dep != d:
                continue
            for gpus in insts:
                for s in range(c.pp):
                    node = gpus[s * c.tp].node
                    nodes.add(node)
                    share = c.c.kv_bytes_per_request * min(c.c.capacity_rps, load) / c.pp
                    if c.role == "prefill":
                        per_node_out[node] += share
                    elif c.role == "decode":
                        per_node_in[node] += share
        if len(nodes) <= 1:
            single.add(d)
            continue
        for node, x in per_node_out.items():
            out[node] += min(x, p.kv_out[d])
        for node, x in per_node_in.items():
            inn[node] += min(x, p.kv_in[d])
    return out, inn, single


def replicas_text(replicas: tuple[int, ...]) -> str:
    """As a .flow spec writes it: "replicas 2" or "replicas in [2, 4]"."""
    values = sorted(set(replicas))
    return f"replicas {values[0]}" if len(values) == 1 else f"replicas in [{', '.join(map(str, values))}]"


def binding(p: Problem, placed: dict[int, list[list[GpuRef]]], gpus_of: dict[str, int]) -> list[str]:
    """A GPU type fully used, free GPUs that no candidate fits (link domains), max_gpus leaving no
    room for another instance, a deployment at the most instances its replicas allow, a deployment
    kept on one node by the KV rule, NICs >= 80% used."""
    out = []
    used: dict[str, int] = defaultdict(int)
    used_gpus: set[tuple[int, int]] = set()
    for ci, insts in placed.items():
        for gpus in insts:
            used[p.cands[ci].c.gpu] += len(gpus)
            used_gpus.update((g.node, g.index) for g in gpus)
    for t in p.used_types:
        if used[t] == p.type_gpus[t]:
            out.append(f"all {p.type_gpus[t]} {t} GPUs are used")
        else:
            # free GPUs that no candidate of this type can use (TP groups stay inside link domains)
            free_per_domain = []
            for v in p.nodes:
                if v.gpu == t:
                    for st, sz in v.domains:
                        free_per_domain.append(sum((v.index, i) not in used_gpus for i in range(st, st + sz)))
            cs = [c for c in p.cands if c.c.gpu == t]
            free = sum(free_per_domain)
            if cs and free >= min(c.gpus for c in cs) and not any(
                    sum(f // c.tp for f in free_per_domain) >= c.pp for c in cs):
                out.append(f"link domains: the {free} free {t} GPUs are split so that no instance fits "
                           f"(a TP group stays inside one link domain)")
    for name in p.order:
        d = p.demands[name]
        cs = p.by_dep[name]
        if d.max_gpus is not None and cs and d.max_gpus - gpus_of[name] < min(c.gpus for c in cs):
            out.append(f"max_gpus {d.max_gpus} of deployment {name}")
        count = sum(len(insts) for ci, insts in placed.items() if p.cands[ci].dep == name)
        if d.replicas is not None and count == max(d.replicas):
            out.append(f"{replicas_text(d.replicas)} of deployment {name}")
    if p.kv_deps:
        traffic_out, traffic_in, single = _kv_traffic(p, placed)
        nic = p.groups[0].nic
        for name in p.kv_deps:
            if name in single and p.kv_out[name] > nic * (1 - 1e-9) and any(p.cands[ci].dep == name and insts
                                                                          for ci, insts in placed.items()):
                node = next(insts[0][0].node for ci, insts in placed.items() if p.cands[ci].dep == name and insts)
                if not p.network:
                    out.append(f"no network between nodes: the KV traffic of deployment {name} keeps its prefill "
                               f"and decode instances on node {node}")
                else:
                    out.append(f"network bandwidth between nodes ({format_gbps(nic)} per node and direction) "
                               f"cannot carry the KV traffic of deployment {name} ({format_gbps(p.kv_out[name])}): "
                               f"its prefill and decode instances share node {node}")
        peak = max(list(traffic_out.values()) + list(traffic_in.values()) + [0.0])
        if nic > 0 and peak >= 0.8 * nic:
            for name in p.kv_deps:
                if name not in single and any(p.cands[ci].dep == name and insts for ci, insts in placed.items()):
                    out.append(f"network bandwidth between nodes carries the KV traffic of deployment {name} "
                               f"(the busiest node uses {100 * peak / nic:.0f}% of its {format_gbps(nic)} per "
                               "direction)")
    return out
