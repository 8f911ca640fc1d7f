"""Checks across objects, once every declaration is built: a deployment's knobs against its
model and cluster (F0401-F0405, F0409), its workload's longest request against the model's
context (F0410), the weights against the cluster's memory (F0501, F0502) and against each
allowed instance (F0503, F0504); and the W0201 warning for definitions no deployment uses."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flowc.compiler.diagnostics import Diagnostic
from flowc.compiler.frontend import ast
from flowc.compiler.frontend.check.vocabulary import KIND_NAMES
from flowc.compiler.model.geometry import param_counts, weight_bytes
from flowc.compiler.model.lengths import length_bound, longest_request
from flowc.compiler.model.memory import GPU_MEMORY_UTILIZATION
from flowc.compiler.model.parallelism import Problem, domain_problem, problems, valid_ep
from flowc.compiler.model.search import tp_choices
from flowc.compiler.model.shapes import instance_shapes
from flowc.compiler.spec import DTYPE_BYTES, Deployment, Spec
from flowc.compiler.units import format_gib

if TYPE_CHECKING:  # core imports this module to dispatch to it: the checker is only an annotation here
    from flowc.compiler.frontend.check.core import Checker


def _deploy_stmt(c: Checker, deployment: Deployment, key: str) -> ast.Statement | None:
    decl, _ = c.decls["deploy"][deployment.name]
    return next((s for s in decl.body.statements if s.key.text == key), None)


def _knob_span(c: Checker, deployment: Deployment, knob: str, value: int):
    stmt = _deploy_stmt(c, deployment, knob)
    arg = stmt.args[-1]
    items = arg.items if isinstance(arg, ast.ListExpr) else [arg]
    values = deployment.search[knob]
    return items[values.index(value)].span


def check_deployment(c: Checker, spec: Spec, d: Deployment) -> None:
    cluster = spec.clusters[d.cluster]
    _check_parallelism(c, d)
    largest_domain = max(group.link_domain for group in cluster.nodes)
    for tp in d.search.get("tp", []):
        problem = domain_problem(tp, largest_domain, f"any link domain of cluster `{cluster.name}`")
        if problem is not None:
            c.error(problem.code, problem.message, _knob_span(c, d, "tp", tp), problem.label, problem.help)
    limit = min(d.max_gpus or cluster.total_gpus, cluster.total_gpus)
    smallest_tp = min(tp_choices(d), default=1)
    for pp in d.search.get("pp", []):
        if smallest_tp * pp > limit:  # no instance with this many stages fits (shapes.instance_shapes)
            c.error("F0405", f"pp {pp} needs at least {smallest_tp * pp} GPUs per instance; deployment `{d.name}` "
                    f"may use {limit}", _knob_span(c, d, "pp", pp), "more stages than GPUs",
                    f"use pp <= {limit // smallest_tp}" + (" or raise `max_gpus`" if d.max_gpus else ""))
    if d.max_gpus is not None and d.max_gpus > cluster.total_gpus:
        stmt = _deploy_stmt(c, d, "max_gpus")
        c.error("F0405", f"max_gpus {d.max_gpus} is more than cluster `{cluster.name}` has ({cluster.total_gpus})",
                stmt.args[0].span, "too many", f"use at most {cluster.total_gpus}")
    if d.objective == "min_cost":
        priced = all(group.price is not None or spec.gpus[group.gpu].price is not None for group in cluster.nodes)
        if not priced:
            stmt = _deploy_stmt(c, d, "objective")
            c.error("F0409", f"objective `min cost` needs prices, and cluster `{cluster.name}` has none",
                    stmt.span, "no price to minimize", "add `price 98 usd/h` to each node group of the cluster")
    _check_context(c, spec, d)


def _check_parallelism(c: Checker, d: Deployment) -> None:
    """F0401-F0403: every listed tp, pp and ep must be possible for the model (the rule of
    model/parallelism.py); an ep must be possible with at least one tp the deployment allows."""
    m = d.model
    for knob in ("tp", "pp"):
        for value in d.search.get(knob, []):
            for problem in problems(m, **{knob: value}):
                c.error(problem.code, problem.message, _knob_span(c, d, knob, value), problem.label, problem.help)
    tps = tp_choices(d)
    for ep in d.search.get("ep", []):
        found = [problems(m, tp=tp, ep=ep) for tp in tps or [1]]
        if all(found):
            problem = found[-1][0] if len(tps) <= 1 or m.moe is None else Problem(
                "ep", f"ep {ep} cannot split {m.name}'s {m.moe.experts} experts over any allowed tp "
                f"({', '.join(map(str, tps))}): it must divide the experts and tp",
                "expert parallel degrees with these tp: " + ", ".join(
                    str(e) for e in sorted({e for tp in tps for e in valid_ep(m, tp)})))
            c.error(problem.code, problem.message, _knob_span(c, d, "ep", ep), problem.label, problem.help)


def _check_context(c: Checker, spec: Spec, d: Deployment) -> None:
    workload = spec.workloads[d.workload]
    longest = (length_bound(workload.prompt, "prompt"), length_bound(workload.output, "output"))
    if None in longest or sum(longest) <= d.model.max_context:
        return
    stmt = _deploy_stmt(c, d, "serve")
    c.error("F0410", f"workload `{workload.name}` needs up to {sum(longest)} tokens of context, "
            f"{d.model.name} holds {d.model.max_context}", stmt.args[0].span, "requests too long",
            "cap the lengths with `max`, e.g. `prompt ... max 8192 tok`, or pick a longer-context model",
            notes=(f"longest prompt {longest[0]} tok + longest output {longest[1]} tok = {sum(longest)} tok",))


def check_capacity(c: Checker, spec: Spec) -> None:
    """F05xx: deployments whose weights cannot fit even using every GPU (and host) of the cluster."""
    by_cluster: dict[str, list[Deployment]] = {}
    for d in spec.deployments.values():
        by_cluster.setdefault(d.cluster, []).append(d)
    for cluster_name, deployments in by_cluster.items():
        cluster = spec.clusters[cluster_name]
        hbm = sum(g.count * g.gpus_per_node * spec.gpus[g.gpu].memory for g in cluster.nodes)
        host = sum(g.count * (g.host_memory or 0) for g in cluster.nodes)
        hbm_note = " + ".join(f"{g.count * g.gpus_per_node} x {g.gpu} {format_gib(spec.gpus[g.gpu].memory, 1)}"
                              for g in cluster.nodes) + f" = {format_gib(hbm, 1)}"
        fits_alone = True
        for d in deployments:
            need = weight_bytes(d.model)
            room = hbm + (host if d.allow_offload else 0)
            if need <= room:
                continue
            fits_alone = False
            counts = param_counts(d.model)
            stmt = _deploy_stmt(c, d, "model")
            smaller = [t for t in ("fp8", "int4") if DTYPE_BYTES[t] < DTYPE_BYTES[d.model.weights]
                       and weight_bytes(d.model.model_copy(update={"weights": t})) <= room]
            offload_fits = not d.allow_offload and need <= hbm + host
            fixes = [f"`weights {smaller[0]}`" if smaller else None, "`allow offload`" if offload_fits else None,
                     "more or larger GPUs"]
            c.error("F0501", f"{d.model.name} cannot fit in cluster `{cluster.name}` at any parallelism",
                    stmt.args[0].span, f"needs {format_gib(need, 1)} of weights",
                    "try " + ", ".join(f for f in fixes if f),
                    notes=(f"weights: {counts.total / 1e9:.2f} B parameters at {d.model.weights} = "
                           f"{format_gib(need, 1)}",
                           f"GPU memory: {hbm_note}"
                           + (f"; host memory {format_gib(host, 1)}" if d.allow_offload else "")))
        for d in deployments:
            if weight_bytes(d.model) <= hbm and not d.allow_offload:
                _check_instances(c, spec, d)
        if fits_alone and len(deployments) > 1:
            need = sum(weight_bytes(d.model) for d in deployments)
            room = hbm + (host if all(d.allow_offload for d in deployments) else 0)
            if need > room:
                first = deployments[0]
                stmt = _deploy_stmt(c, first, "on")
                c.error("F0502", f"the {len(deployments)} deployments on `{cluster.name}` cannot all fit",
                        stmt.args[0].span, f"together they need {format_gib(need, 1)} of weights",
                        "move a deployment to another cluster, quantize, or add nodes",
                        notes=tuple(f"{d.name}: {d.model.name} at {d.model.weights} = "
                                    f"{format_gib(weight_bytes(d.model), 1)}" for d in deployments)
                        + (f"GPU memory: {hbm_note}",))


def _check_instances(c: Checker, spec: Spec, d: Deployment) -> None:
    """F0503: no allowed instance shape holds the weights; F0504: none holds the KV of the
    longest request."""
    shapes = instance_shapes(spec, d)
    if not shapes:
        return
    stmt = _deploy_stmt(c, d, "model")
    fitting = [shape for shape in shapes if shape.budget.fits]
    if not fitting:
        best = max(shapes, key=lambda shape: shape.budget.kv)
        b = best.budget
        c.error("F0503", f"{d.model.name} does not fit on any instance the deployment allows",
                stmt.args[0].span, "too large per GPU",
                "allow a larger tp or pp (e.g. `tp in [2, 4, 8]`), quantize the weights, or `allow offload`",
                notes=(f"the roomiest allowed instance, tp {best.tp} x pp {best.pp} on {best.gpu}: weights "
                       f"{format_gib(b.weights, 1)} + activations {format_gib(b.activations, 1)} + reserve "
                       f"{format_gib(b.reserve, 1)} > {format_gib(b.usable, 1)} usable "
                       f"({GPU_MEMORY_UTILIZATION:.0%} of {format_gib(b.capacity, 1)})",))
        return
    longest = longest_request(spec.workloads[d.workload])
    best = max(fitting, key=lambda shape: shape.budget.kv_tokens)
    b = best.budget
    if longest is not None and longest > b.kv_tokens:
        c.error("F0504", f"a request of up to {longest} tokens cannot fit in the KV cache of any allowed instance",
                stmt.args[0].span, "KV cache too small",
                "allow a larger tp or pp, use `kv fp8`, or cap the request lengths with `max`",
                notes=(f"the largest KV cache, tp {best.tp} x pp {best.pp} on {best.gpu}: {format_gib(b.kv, 1)} per GPU"
                       f" / {b.kv_bytes_per_token:,} B per token = {b.kv_tokens:,} tokens",))


def warn_unused(c: Checker) -> None:
    """W0201: a definition in a spec given on the command line that no deployment uses."""
    roots = set(c.program.roots)
    has_deploy = {file for _, (_, file) in c.decls["deploy"].items()}
    for kind in ("cluster", "model", "workload", "slo"):
        for name, (decl, file) in c.decls[kind].items():
            if file in roots and file in has_deploy and (kind, name) not in c.used:
                c.warnings.append(Diagnostic("W0201", f"{KIND_NAMES[kind]} `{name}` is never used",
                                             decl.name.span, "defined here",
                                             "remove it, or reference it from a `deploy` block"))
