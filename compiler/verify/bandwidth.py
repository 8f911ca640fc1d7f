"""Bandwidth (F0525): the traffic the plan puts on its links at the workload's rate
(`model/traffic.py`, which the report draws too) within what they carry: KV an instance sends
or receives inside its node within its GPUs' links, and what crosses the network within each
node's NICs, per direction, shared by every deployment of the cluster."""

from __future__ import annotations

from flowc.compiler.model.topology import cluster_nodes
from flowc.compiler.model.traffic import spec_traffic
from flowc.compiler.units import format_gbps
from flowc.compiler.verify.context import DeploymentCheck, Verifier


def check_bandwidth(v: Verifier, deps: list[DeploymentCheck]) -> None:
    # bytes/s leaving and entering each (cluster, node) over the network, with who sends what
    load: dict[str, dict[tuple[str, int], float]] = {"out of": {}, "into": {}}
    senders: dict[tuple[str, int], list[str]] = {}
    kinds: dict[tuple[str, int], set[str]] = {}
    arithmetic: dict[str, list[str]] = {}  # deployment -> how its traffic was computed
    for dep in deps:
        dp, d, cluster = dep.plan, dep.spec, dep.cluster
        if d is None or not all(dep.groups_ok.get(j, False) for j in range(len(dp.groups))):
            continue
        traffic = spec_traffic(v.spec, dp)
        arithmetic[dp.name] = traffic.arithmetic
        local: dict[str, dict[tuple[int, int], float]] = {"sends": {}, "receives": {}}
        for t in traffic.transfers:
            if t.node is not None:  # inside one node: only KV is checked, against each instance's links
                if t.kind == "KV cache":
                    local["sends"][t.src_at] = local["sends"].get(t.src_at, 0.0) + t.bps
                    local["receives"][t.dst_at] = local["receives"].get(t.dst_at, 0.0) + t.bps
                continue
            for direction, end in (("out of", "src"), ("into", "dst")):
                for node, bps in t.node_shares(end).items():
                    key = (cluster.name, node)
                    load[direction][key] = load[direction].get(key, 0.0) + bps
                    kinds.setdefault(key, set()).add(t.kind)
                    if dp.name not in senders.setdefault(key, []):
                        senders[key].append(dp.name)
        nodes = cluster_nodes(cluster)
        for verb, by_instance in local.items():
            for (j, k), bps in by_instance.items():
                inst = dp.groups[j].instances[k]
                link = nodes[inst.gpus[0].node].link
                capacity = len(inst.gpus) * link.bandwidth
                if bps > capacity:
                    v.error("F0525", f"deployment `{dp.name}`, group {j}, instance {k} "
                            f"({', '.join(map(str, inst.gpus))}) {verb} {format_gbps(bps)} of KV cache inside its "
                            f"node, more than its {len(inst.gpus)} x {link.name} links carry ({format_gbps(capacity)})",
                            "add prefill and decode instances, or use `kv fp8`", notes=tuple(traffic.arithmetic),
                            at=f"deployments[{dep.index}].groups[{j}].instances[{k}]", dep=dep)
    for direction, table in load.items():
        for (cluster_name, node), bps in sorted(table.items()):
            cluster = v.spec.clusters[cluster_name]
            network = cluster.network
            capacity = network.bandwidth * cluster.network_nics if network is not None else 0.0
            if bps <= capacity:
                continue
            names = senders[(cluster_name, node)]
            what = (f"the network's {format_gbps(capacity)} ({cluster.network_nics} x {network.name})"
                    if network is not None else "nothing: the cluster has no network")
            what_moves = " and ".join(sorted(kinds[(cluster_name, node)]))
            v.error("F0525", f"node n{node} of cluster `{cluster_name}`: {format_gbps(bps)} of {what_moves} "
                    f"{direction} the node (" + ", ".join(f"`{n}`" for n in names) + f"), more than {what}",
                    "put prefill and decode instances (and pipeline stages) on the same node, use `kv fp8`, "
                    "or a faster network", at="deployments",
                    notes=tuple(line for n in names for line in arithmetic.get(n, [])))
            for dep in deps:
                if dep.plan.name in names:
                    dep.clean = False
