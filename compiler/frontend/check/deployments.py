"""Deployment blocks: `deploy` with its model (and per-deployment overrides), cluster, workload
and SLO, the objective, the search knobs' values and the `allow`/`forbid` switches."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flowc.compiler import units
from flowc.compiler.diagnostics import Label, did_you_mean
from flowc.compiler.frontend import ast
from flowc.compiler.frontend.check.vocabulary import DTYPES, SCHEMAS, TOKEN_KNOBS, expr_text
from flowc.compiler.spec import ENGINES, MAX_KNOB, SEARCH_KNOBS, Deployment, Model, Workload

if TYPE_CHECKING:  # core imports this module to dispatch to it: the checker is only an annotation here
    from flowc.compiler.frontend.check.core import Block, Checker


def build_deploy(c: Checker, decl: ast.Decl) -> Deployment | None:
    b = c.block(decl.body, "deploy", decl.name)
    model = _deploy_model(c, b)
    cluster = c.one_value(b, "on", "deploy", lambda e: c.ref(e, "cluster"), True, "deployment")
    workload = slo = None
    serve = c.required(b, "serve", "deploy", "deployment")
    if serve is not None:
        a = serve.args
        if len(a) != 3 or not (isinstance(a[1], ast.Name) and a[1].text == "under"):
            c.error("F0305", "malformed `serve`", serve.span, "expected `serve WORKLOAD under SLO`",
                    f"write `{SCHEMAS['deploy']['serve']}`")
        else:
            workload, slo = c.ref(a[0], "workload"), c.ref(a[2], "slo")
    objective = _objective(c, b.one("objective"))
    search = {knob: _search_values(c, b.one(knob)) for knob in SEARCH_KNOBS if b.one(knob)}
    max_gpus = c.one_value(b, "max_gpus", "deploy", lambda e: c.count(e, "max_gpus"))
    switches = _switches(c, b)
    engine = c.one_value(b, "engine", "deploy", lambda e: c.word(e, ENGINES, "engine")) if b.one("engine") else ""
    if None in (model, cluster, workload, slo, objective, switches, engine) or None in search.values():
        return None
    if not _objective_fits_workload(c, b, objective, workload, switches):
        return None
    return Deployment(name=decl.name.text, model=model, cluster=cluster.name, workload=workload.name,
                      slo=slo.name, objective=objective, search=search, max_gpus=max_gpus,
                      allow_disaggregation=switches["disaggregation"], allow_offload=switches["offload"],
                      engine=engine or None, doc=decl.doc, location=c.location(decl))


def _deploy_model(c: Checker, b: Block) -> Model | None:
    stmt = c.required(b, "model", "deploy", "deployment")
    if stmt is None:
        return None
    args = c.args(stmt, "deploy", 1)
    model = c.ref(args[0], "model") if args else None
    if stmt.body is None or model is None:
        return model
    o = c.block(stmt.body, "override", stmt.key)
    changes = {
        "weights": c.one_value(o, "weights", "override", lambda e: c.word(e, DTYPES, "dtype")),
        "kv": c.one_value(o, "kv", "override", lambda e: c.word(e, DTYPES, "dtype")),
        "max_context": c.one_value(o, "max_context", "override",
                                   lambda e: c.count(e, "max_context", 1, units.TOKENS)),
    }
    return model.model_copy(update={k: v for k, v in changes.items() if v is not None})


def _objective(c: Checker, stmt: ast.Statement | None) -> str | None:
    if stmt is None:
        return "max_goodput_per_gpu"
    choices = {("max", "goodput_per_gpu"): "max_goodput_per_gpu", ("min", "gpus"): "min_gpus",
               ("min", "cost"): "min_cost", ("max", "throughput"): "max_throughput"}
    words = tuple(a.text if isinstance(a, ast.Name) else "?" for a in stmt.args)
    if words in choices:
        return choices[words]
    written = " ".join(expr_text(a) for a in stmt.args)
    best = did_you_mean(written, [" ".join(choice) for choice in choices])
    c.error("F0306", f"unknown objective `{written}`", stmt.span, "not an objective",
            f"did you mean `objective {best}`?" if best else
            "objectives are `max goodput_per_gpu`, `min gpus`, `min cost` and `max throughput`")
    return None


def _objective_fits_workload(c: Checker, b: Block, objective: str, workload: Workload, switches: dict) -> bool:
    """An offline batch (`arrival batch`) has no arrival rate to serve: its objective is the most
    throughput; every other objective serves a rate. Disaggregation trades throughput for
    latency under a rate, so a batch job does not take it."""
    batch = workload.is_batch
    at = b.one("objective") or b.one("serve")
    if batch and objective != "max_throughput":
        c.error("F0411", f"workload `{workload.name}` is a batch, which has no arrival rate to serve",
                at.span, f"`{objective.replace('_', ' ', 1)}` serves a rate",
                "write `objective max throughput`: finish the batch as fast as the GPUs allow")
        return False
    if not batch and objective == "max_throughput":
        c.error("F0411", f"`objective max throughput` needs a batch workload; `{workload.name}` arrives at a rate",
                at.span, "an offline objective for an online workload",
                f"give workload `{workload.name}` `arrival batch` and `requests N`, or choose "
                "`objective max goodput_per_gpu`")
        return False
    if batch and switches["disaggregation"]:
        allow = next(s for s in b.all("allow") if "disaggregation" in " ".join(map(expr_text, s.args)))
        c.error("F0411", "a batch job does not take disaggregation", allow.span,
                "prefill/decode disaggregation trades throughput for latency under a rate",
                "remove `disaggregation` from `allow`")
        return False
    return True


def _search_values(c: Checker, stmt: ast.Statement) -> list[int] | None:
    knob = stmt.key.text
    dim = units.TOKENS if knob in TOKEN_KNOBS else units.NUMBER
    args = stmt.args
    if len(args) == 1:
        value = c.count(args[0], knob, 1, dim, MAX_KNOB)
        return None if value is None else [value]
    if len(args) == 2 and isinstance(args[0], ast.Name) and args[0].text == "in" and isinstance(args[1], ast.ListExpr):
        if not args[1].items:
            c.error("F0405", f"`{knob}` has no values to choose from", args[1].span, "empty list",
                    f"write `{SCHEMAS['deploy'][knob]}`")
            return None
        values = [c.count(item, knob, 1, dim, MAX_KNOB) for item in args[1].items]
        if None in values:
            return None
        for index, value in enumerate(values):
            if value in values[:index]:
                c.error("F0405", f"`{knob}` lists {value} twice", args[1].items[index].span, "repeated",
                        "list each value once")
                return None
        return values
    c.error("F0305", f"malformed `{knob}`", stmt.span, "expected a value or `in [...]`",
            f"write `{knob} 8` or `{SCHEMAS['deploy'][knob]}`")
    return None


def _switches(c: Checker, b: Block) -> dict[str, bool] | None:
    state: dict[str, tuple[bool, ast.Expr]] = {}
    ok = True
    for key in ("allow", "forbid"):
        for stmt in b.all(key):
            items = stmt.args[0].items if len(stmt.args) == 1 and isinstance(stmt.args[0], ast.TupleExpr) else stmt.args
            if not items:
                c.args(stmt, "deploy", 1)
                ok = False
            for item in items:
                feature = c.word(item, ("disaggregation", "offload"), "feature")
                if feature is None:
                    ok = False
                    continue
                if feature in state and state[feature][0] != (key == "allow"):
                    c.error("F0405", f"`{feature}` is both allowed and forbidden", item.span, "contradiction",
                            "keep one of `allow` and `forbid`",
                            related=[Label(state[feature][1].span, "set here")])
                    ok = False
                state[feature] = (key == "allow", item)
    if not ok:
        return None
    return {feature: state.get(feature, (False, None))[0] for feature in ("disaggregation", "offload")}
