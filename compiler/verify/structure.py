"""Structure: the plan matches its spec (F0520), every GPU it names exists (F0521) and is used
once (F0522), and every instance's parallelism and placement are possible (F0523)."""

from __future__ import annotations

from flowc.compiler.diagnostics import suggestion_help
from flowc.compiler.model.engines import engine_profile
from flowc.compiler.model.parallelism import problems
from flowc.compiler.model.search import knob_choices
from flowc.compiler.model.topology import cluster_nodes, cluster_shape
from flowc.compiler.verify.context import DeploymentCheck, Verifier


def check_spec_match(v: Verifier, dep: DeploymentCheck) -> None:
    spec, dp, i = v.spec, dep.plan, dep.index
    at = f"deployments[{i}]"
    if dp.name not in spec.deployments:
        v.error("F0520", f"deployment `{dp.name}` is not in the spec",
                suggestion_help(dp.name, spec.deployments, "the spec's deployments"),
                at=f"{at}.name", dep=dep, structural=True)
        return
    d = spec.deployments[dp.name]
    if dp.cluster != d.cluster or dp.cluster not in spec.clusters:
        known = dp.cluster in spec.clusters
        v.error("F0520", f"deployment `{dp.name}`: the plan places it on cluster `{dp.cluster}`, "
                f"the spec on `{d.cluster}`" + ("" if known else f" (no cluster `{dp.cluster}` in the spec)"),
                "compile the plan again from this spec", at=f"{at}.cluster", dep=dep, structural=True)
        return
    if dp.model != d.model.name:
        known = dp.model in spec.models
        v.error("F0520", f"deployment `{dp.name}`: the plan serves model `{dp.model}`, the spec deploys "
                f"`{d.model.name}`" + ("" if known else f" (no model `{dp.model}` in the spec)"),
                "compile the plan again from this spec", at=f"{at}.model", dep=dep, structural=True)
        return
    for what, planned, wanted in (("weights", dp.weights, d.model.weights), ("kv", dp.kv, d.model.kv)):
        if planned != wanted:
            v.error("F0520", f"deployment `{dp.name}`: the plan keeps {what} in {planned}, the spec's "
                    f"deployment in {wanted}", "compile the plan again from this spec",
                    at=f"{at}.{what}", dep=dep, structural=True)
    if dp.model_spec is not None and dp.model_spec != d.model.model_copy(update={"location": None}):
        v.error("F0520", f"deployment `{dp.name}`: the plan's copy of model `{dp.model}` differs from the "
                "spec's", "compile the plan again from this spec", at=f"{at}.model_spec", dep=dep,
                structural=True)
    engine = engine_profile(d.engine).name
    if dp.engine != engine:
        v.error("F0520", f"deployment `{dp.name}`: the plan's predictions are for {dp.engine}, the spec deploys on "
                f"{engine}", "compile the plan again from this spec", at=f"{at}.engine", dep=dep, structural=True)
    recorded = v.plan.clusters.get(dp.cluster)
    if recorded is not None and recorded != cluster_shape(spec.clusters[d.cluster]):
        v.error("F0520", f"deployment `{dp.name}`: the plan's copy of cluster `{dp.cluster}` differs from the spec's",
                "compile the plan again from this spec", at=f"clusters.{dp.cluster}", dep=dep, structural=True)
    if not dep.ok:
        return
    dep.spec, dep.cluster = d, spec.clusters[d.cluster]
    # mode and roles
    if not dp.groups:
        v.error("F0520", f"deployment `{dp.name}` has no instance groups", "compile the plan again",
                at=f"{at}.groups", dep=dep, structural=True)
        return
    roles = [g.role for g in dp.groups]
    if dp.mode == "colocated" and any(r != "colocated" for r in roles):
        v.error("F0520", f"deployment `{dp.name}` is colocated but has prefill or decode groups",
                "a colocated deployment has only `colocated` groups", at=f"{at}.groups", dep=dep,
                structural=True)
    if dp.mode == "disaggregated":
        if not d.allow_disaggregation:
            v.error("F0520", f"deployment `{dp.name}` is disaggregated, but its spec does not "
                    "`allow disaggregation`", "add `allow disaggregation` to the deployment, or plan it "
                    "colocated", at=f"{at}.mode", dep=dep)
        if "colocated" in roles or "prefill" not in roles or "decode" not in roles:
            v.error("F0520", f"deployment `{dp.name}` is disaggregated but does not have prefill and "
                    "decode groups only", "a disaggregated deployment has `prefill` and `decode` groups",
                    at=f"{at}.groups", dep=dep, structural=True)
    for j, g in enumerate(dp.groups):
        gat = f"{at}.groups[{j}]"
        ok = True
        if not g.instances:
            v.error("F0520", f"deployment `{dp.name}`, group {j}: no instances",
                    "drop the group or give it instances", at=f"{gat}.instances", dep=dep, structural=True)
            ok = False
        if g.gpu not in v.spec.gpus:
            v.error("F0520", f"deployment `{dp.name}`, group {j}: unknown GPU type `{g.gpu}`",
                    suggestion_help(g.gpu, v.spec.gpus, "GPU types"), at=f"{gat}.gpu", dep=dep,
                    structural=True)
            ok = False
        elif g.vendor != v.spec.gpus[g.gpu].vendor:
            v.error("F0520", f"deployment `{dp.name}`, group {j}: the plan says {g.gpu} is a {g.vendor} device, "
                    f"the spec says {v.spec.gpus[g.gpu].vendor}", "compile the plan again from this spec",
                    at=f"{gat}.vendor", dep=dep, structural=True)
            ok = False
        s = g.scheduler
        bad = [k for k in ("max_batched_tokens", "chunk_size", "max_seqs", "block_size") if getattr(s, k) < 1]
        if bad:
            v.error("F0520", f"deployment `{dp.name}`, group {j}: scheduler " + ", ".join(
                       f"{k} {getattr(s, k)}" for k in bad) + " (must be at least 1)",
                    "compile the plan again", at=f"{gat}.scheduler", dep=dep, structural=True)
            ok = False
        elif s.chunk_size > s.max_batched_tokens:
            v.error("F0520", f"deployment `{dp.name}`, group {j}: chunk_size {s.chunk_size} is above "
                    f"max_batched_tokens {s.max_batched_tokens}",
                    "a prefill chunk fits the token budget: chunk_size <= max_batched_tokens",
                    at=f"{gat}.scheduler.chunk_size", dep=dep, structural=True)
            ok = False
        dep.groups_ok[j] = ok
        # the deployment's own search space, flowc's defaults where the spec leaves a knob open
        values = {"tp": g.tp, "pp": g.pp, "ep": g.ep, "max_batched_tokens": s.max_batched_tokens,
                  "max_seqs": s.max_seqs, "block_size": s.block_size}
        choices = knob_choices(d, g.tp)
        if s.chunked_prefill and d.search.get("chunk_size"):
            values["chunk_size"], choices["chunk_size"] = s.chunk_size, d.search["chunk_size"]
        for knob, value in values.items():
            allowed = choices[knob]
            if knob in ("tp", "pp", "ep") and not d.search.get(knob):
                continue  # any the model can take: F0523 below
            if value not in allowed:
                source = "the spec allows" if d.search.get(knob) else "flowc tries where the spec leaves it open"
                v.error("F0520", f"deployment `{dp.name}`, group {j}: {knob} {value} is not one {source} "
                        f"({', '.join(map(str, allowed))})", "compile the plan again from this spec",
                        at=gat, dep=dep)
    allowed = d.search.get("replicas")
    if allowed and dp.replicas not in allowed:
        v.error("F0520", f"deployment `{dp.name}` runs {dp.replicas} instances, its spec allows replicas "
                f"{', '.join(map(str, allowed))}", "compile the plan again from this spec", at=f"{at}.groups", dep=dep)
    if d.max_gpus is not None and dp.gpus > d.max_gpus:
        v.error("F0520", f"deployment `{dp.name}` uses {dp.gpus} GPUs, its spec allows max_gpus {d.max_gpus}",
                "compile the plan again from this spec", at=at, dep=dep)


def check_structure(v: Verifier, dep: DeploymentCheck) -> None:
    dp, d, cluster = dep.plan, dep.spec, dep.cluster
    m = d.model
    nodes = cluster_nodes(cluster)
    for j, g in enumerate(dp.groups):
        gat = f"deployments[{dep.index}].groups[{j}]"
        where = f"deployment `{dp.name}`, group {j}"
        ok = True
        # F0521: every GPU inside the cluster, of the group's type
        for k, inst in enumerate(g.instances):
            for r, ref in enumerate(inst.gpus):
                at = f"{gat}.instances[{k}].gpus[{r}]"
                if not 0 <= ref.node < len(nodes):
                    v.error("F0521", f"{where}: GPU {ref} is outside cluster `{cluster.name}` (nodes 0 to "
                            f"{len(nodes) - 1})", "use a node of the cluster; node groups count in "
                            "declaration order, `node x 2` is nodes n0 and n1", at=at, dep=dep,
                            structural=True)
                    ok = False
                    continue
                node = nodes[ref.node]
                if not 0 <= ref.index < node.gpus_per_node:
                    v.error("F0521", f"{where}: GPU {ref} is outside node n{ref.node} ({node.gpus_per_node} "
                            f"GPUs: g0 to g{node.gpus_per_node - 1})", "use a GPU the node has",
                            at=at, dep=dep, structural=True)
                    ok = False
                elif node.gpu != g.gpu:
                    v.error("F0521", f"{where}: GPU {ref} is a {node.gpu}, the group runs on {g.gpu}",
                            f"place the group on {g.gpu} GPUs, or set its gpu to {node.gpu}", at=at,
                            dep=dep, structural=True)
                    ok = False
        # F0523: the parallelism the model can take (model/parallelism.py, as the checker and optimizer)
        found = problems(m, g.tp, g.pp, g.ep)
        for problem in found:
            v.error("F0523", f"{where}: {problem.message}", problem.help, at=f"{gat}.{problem.knob}", dep=dep,
                    structural=True)
        if min(g.tp, g.pp, g.ep) < 1:  # instance sizes mean nothing below 1
            dep.groups_ok[j] = False
            continue
        ok = ok and not found
        for k, inst in enumerate(g.instances):
            iat = f"{gat}.instances[{k}]"
            if len(inst.gpus) != g.tp * g.pp:
                v.error("F0523", f"{where}, instance {k}: {len(inst.gpus)} GPUs, tp {g.tp} x pp {g.pp} needs "
                        f"{g.tp * g.pp}", "give each instance tp x pp GPUs", at=iat, dep=dep, structural=True)
                ok = False
                continue
            if any(not 0 <= ref.node < len(nodes) or not 0 <= ref.index < nodes[ref.node].gpus_per_node
                   for ref in inst.gpus):
                continue  # reported as F0521
            stage_nodes = []
            for stage in range(g.pp):
                tpg = inst.gpus[stage * g.tp:(stage + 1) * g.tp]
                on = sorted({ref.node for ref in tpg})
                stage_nodes.append(on[0])
                if len(on) > 1:
                    v.error("F0523", f"{where}, instance {k}: the TP group of stage {stage} "
                            f"({', '.join(map(str, tpg))}) spans nodes " + ", ".join(f"n{n}" for n in on),
                            "keep each TP group inside one node; split across nodes with pp", at=iat,
                            dep=dep, structural=True)
                    ok = False
                    continue
                domain = nodes[on[0]].link_domain
                domains = sorted({ref.index // domain for ref in tpg})
                if len(domains) > 1:
                    v.error("F0523", f"{where}, instance {k}: the TP group of stage {stage} "
                            f"({', '.join(map(str, tpg))}) spans link domains {', '.join(map(str, domains))} "
                            f"of node n{on[0]} (link_domain {domain})",
                            f"keep each TP group inside one domain of {domain} "
                            "GPUs (indices that agree on index // link_domain)", at=iat, dep=dep, structural=True)
                    ok = False
            if cluster.network is None and len(set(stage_nodes)) > 1:
                v.error("F0523", f"{where}, instance {k}: pipeline stages on nodes "
                        + ", ".join(f"n{n}" for n in dict.fromkeys(stage_nodes))
                        + f", but cluster `{cluster.name}` has no network",
                        "keep the instance on one node, or declare a `network` for the cluster", at=iat,
                        dep=dep, structural=True)
                ok = False
        dep.groups_ok[j] = dep.groups_ok.get(j, True) and ok
    dep.checked = True


def check_shared_gpus(v: Verifier, deps: list[DeploymentCheck]) -> None:
    users: dict[tuple[str, int, int], tuple[str, str]] = {}
    for dep in deps:
        if dep.cluster is None:
            continue
        for j, g in enumerate(dep.plan.groups):
            for k, inst in enumerate(g.instances):
                for r, ref in enumerate(inst.gpus):
                    key = (dep.cluster.name, ref.node, ref.index)
                    who = f"`{dep.plan.name}` group {j} instance {k}"
                    at = f"deployments[{dep.index}].groups[{j}].instances[{k}].gpus[{r}]"
                    if key in users:
                        first_who, first_at = users[key]
                        v.error("F0522", f"GPU {ref} is used twice: by {first_who} and by {who}",
                                "give every instance its own GPUs", notes=(f"first use at {first_at}",),
                                at=at, dep=dep)
                    else:
                        users[key] = (who, at)
