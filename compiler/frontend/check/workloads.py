"""Workload blocks: `workload` with its arrival process, prompt and output length distributions
and their bounds, and the trace files that arrivals and lengths can read."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from flowc.compiler import units
from flowc.compiler.diagnostics import did_you_mean, suggestion_help
from flowc.compiler.frontend import ast
from flowc.compiler.frontend.check.vocabulary import SCHEMAS, describe
from flowc.compiler.frontend.imports import display_path, locate, outside_tree
from flowc.compiler.model.traces import TraceError, read_trace
from flowc.compiler.spec import MAX_CV, MAX_RATE, Arrival, Lengths, Workload

if TYPE_CHECKING:  # core imports this module to dispatch to it: the checker is only an annotation here
    from flowc.compiler.frontend.check.core import Block, Checker


def build_workload(c: Checker, decl: ast.Decl) -> Workload | None:
    b = c.block(decl.body, "workload", decl.name)
    arrival_stmt = c.required(b, "arrival", "workload", "workload")
    arrival = _arrival(c, arrival_stmt) if arrival_stmt else None
    prompt = _lengths(c, b, "prompt")
    output = _lengths(c, b, "output")
    requests = c.one_value(b, "requests", "workload", lambda e: c.count(e, "requests", 1, units.REQUESTS))
    duration = c.one_value(b, "duration", "workload", lambda e: c.positive(e, units.TIME, "duration"))
    if b.one("requests") and b.one("duration"):
        c.error("F0311", "give `requests` or `duration`, not both", b.one("duration").key.span,
                "one of the two", "the simulation stops after the first one anyway")
        return None
    if arrival is not None and arrival.kind == "batch" and requests is None:  # before a Workload exists
        c.error("F0305", "a batch workload needs its size", arrival_stmt.span, "how many requests?",
                "add `requests 10000 req`: a batch is a fixed number of requests, all queued at the start")
        return None
    if None in (arrival, prompt, output):
        return None
    return Workload(name=decl.name.text, arrival=arrival, prompt=prompt, output=output, requests=requests,
                    duration=duration, doc=decl.doc, location=c.location(decl))


def _arrival(c: Checker, stmt: ast.Statement) -> Arrival | None:
    usage = ("arrival poisson 12 req/s | arrival gamma 12 req/s cv 2 | arrival constant 5 req/s | "
             "arrival trace \"FILE\" | arrival batch")
    if not stmt.args:
        c.error("F0305", "`arrival` needs a process", stmt.span, "incomplete", f"write `{usage}`")
        return None
    kind = c.word(stmt.args[0], ("poisson", "gamma", "constant", "trace", "batch"), "arrival process")
    rest = stmt.args[1:]
    if kind is None:
        return None
    expected = {"poisson": 1, "constant": 1, "gamma": 3, "trace": 1, "batch": 0}[kind]
    if len(rest) != expected or (kind == "gamma" and not (isinstance(rest[1], ast.Name) and rest[1].text == "cv")):
        c.error("F0305", f"malformed `arrival {kind}`", stmt.span, "unexpected shape", f"write `{usage}`")
        return None
    if kind == "batch":  # an offline job: every request queued at the start, no rate
        return Arrival(kind="batch")
    if kind == "trace":
        trace_path = _trace_file(c, rest[0])
        if trace_path is None:
            return None
        trace = c.traces.get(Path(trace_path))
        return Arrival(kind="trace", trace=trace_path, rate=trace.rate if trace else None)
    rate = c.positive(rest[0], units.REQUEST_RATE, "arrival rate", MAX_RATE)
    cv = None
    if kind == "gamma":
        cv = c.quantity(rest[2], units.NUMBER)
        if cv is not None and cv <= 0:
            c.error("F0307", "cv must be greater than zero", rest[2].span, "zero")
            cv = None
        elif cv is not None and not c.within(rest[2], "cv", cv, MAX_CV):
            cv = None
        if cv is None:
            return None
    if rate is None:
        return None
    return Arrival(kind=kind, rate=rate, cv=None if cv is None else float(cv))


def _trace_file(c: Checker, expr: ast.Expr) -> str | None:
    if not isinstance(expr, ast.String):
        c.expected(expr, "a file name in double quotes", 'write `trace "traces/conv.csv"`')
        return None
    base = Path(c.module).parent if not c.module.startswith("<") else Path.cwd()
    path, problem = locate(base, expr.value)
    if path is None:  # a name no file can have: too long, a loop of links
        c.error("F0208", f"trace file `{expr.value}` not found", expr.span, problem)
        return None
    root = c.program.trees.get(c.module, Path.cwd().resolve())
    if path not in c.traces:  # each file is reported once, however often it is referenced
        outside = outside_tree(path, expr.value, expr.span, root, c.program.allow_outside)
        if outside is not None:
            c.traces[path] = None
            c.error(outside.code, outside.message, outside.span, outside.label, outside.help, outside.notes)
            return None
        if problem:
            c.traces[path] = None
            # names of the folder only inside the tree: a listing of any other reveals the machine
            best = did_you_mean(path.name, _names_in(path.parent) if path.parent.is_relative_to(root) else [])
            c.error("F0208", f"trace file `{expr.value}` not found", expr.span,
                    f"no such file in {display_path(path.parent)}",
                    f'did you mean `"{(Path(expr.value).parent / best).as_posix()}"`?' if best
                    else "paths are relative to the spec file's directory")
            return None
        try:
            c.traces[path] = read_trace(path)
        except TraceError as error:
            c.traces[path] = None
            where = f"line {error.line} of " if error.line else ""
            c.error("F0309", f"malformed trace file `{expr.value}`", expr.span, "cannot be read as a trace",
                    "a trace is CSV with the header TIMESTAMP,ContextTokens,GeneratedTokens "
                    "or arrival_time,prompt_tokens,output_tokens",
                    notes=(f"{where}{path.name}: {error}",))
            return None
    return str(path) if c.traces[path] is not None else None


def _names_in(folder: Path) -> list[str]:
    """The file names of a folder, for did-you-mean; none when it cannot be listed."""
    try:
        return [p.name for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
    except OSError:
        return []


def _lengths(c: Checker, b: Block, key: str) -> Lengths | None:
    stmt = c.required(b, key, "workload", "workload")
    if stmt is None:
        return None
    usage = SCHEMAS["workload"][key]
    if not stmt.args:
        c.args(stmt, "workload", 1)
        return None
    head, rest = stmt.args[0], list(stmt.args[1:])
    fields: dict = {}
    if isinstance(head, ast.Name) and head.text == "trace":
        if not rest:
            c.error("F0305", f"`{key} trace` needs a file", stmt.span, "incomplete",
                    f'write `{key} trace "traces/conv.csv"`')
            return None
        path = _trace_file(c, rest.pop(0))
        if path is None:
            return None
        fields = {"kind": "trace", "trace": path}
    elif isinstance(head, ast.Call):
        fields = _distribution(c, head, key)
    elif isinstance(head, (ast.Quantity, ast.BinOp, ast.Paren, ast.Number)):
        value = c.count(head, f"the {key} length", 1, units.TOKENS)
        fields = {"kind": "fixed", "value": value} if value is not None else None
    else:
        c.expected(head, f"a {key} length distribution", f"write `{usage}`")
        return None
    bounds = _bounds(c, rest, stmt, key)
    if fields is None or bounds is None:
        return None
    fields.update(bounds)
    lengths = Lengths(**fields)
    return lengths if _lengths_consistent(c, lengths, stmt, key) else None


def _distribution(c: Checker, call: ast.Call, key: str) -> dict | None:
    params = {"uniform": ("min", "max"), "normal": ("mean", "std"), "lognormal": ("median", "sigma")}
    name = call.func.text
    if name not in params:
        c.error("F0306", f"unknown length distribution `{name}`", call.func.span, "not a distribution",
                suggestion_help(name, [*params, "trace"], "distributions"))
        return None
    expected = params[name]
    usage = {"uniform": "uniform(128 tok, 2048 tok)", "normal": "normal(mean 1024 tok, std 256 tok)",
             "lognormal": "lognormal(median 1024 tok, sigma 0.6)"}[name]
    if len(call.args) != 2:
        c.error("F0305", f"`{name}` takes {len(expected)} values", call.span, "wrong number of values",
                f"write `{usage}`")
        return None
    values = {}
    for position, arg in enumerate(call.args):
        label = arg.label.text if arg.label else expected[position]
        if label not in expected:
            c.error("F0306", f"`{name}` has no parameter `{label}`", arg.label.span, "unknown parameter",
                    suggestion_help(label, expected, f"`{name}` parameters"))
            return None
        if label in values:
            c.error("F0311", f"`{label}` is given twice", arg.span, "given again")
            return None
        if label == "sigma":
            sigma = c.quantity(arg.value, units.NUMBER)
            if sigma is not None and sigma <= 0:
                c.error("F0307", "sigma must be greater than zero", arg.value.span, "zero")
                return None
            values[label] = sigma
        else:
            values[label] = c.quantity(arg.value, units.TOKENS)
    if any(v is None for v in values.values()):
        return None
    if name == "uniform":
        low, high = values["min"], values["max"]
        if low.denominator != 1 or high.denominator != 1:
            c.error("F0307", "uniform bounds must be whole token counts", call.span, "fractional")
            return None
        return {"kind": "uniform", "low": int(low), "high": int(high)}
    if name == "normal":
        return {"kind": "normal", "mean": float(values["mean"]), "std": float(values["std"])}
    return {"kind": "lognormal", "median": float(values["median"]), "sigma": float(values["sigma"])}


def _bounds(c: Checker, rest: list[ast.Expr], stmt: ast.Statement, key: str) -> dict | None:
    bounds: dict[str, int] = {}
    while rest:
        label = rest.pop(0)
        if not (isinstance(label, ast.Name) and label.text in ("min", "max")):
            c.error("F0305", f"unexpected {describe(label)} after the `{key}` distribution", label.span,
                    "expected `min` or `max`", f"write `{SCHEMAS['workload'][key]}`")
            return None
        if not rest:
            c.error("F0305", f"`{label.text}` needs a length", label.span, "no value follows",
                    f"write `{label.text} 8192 tok`")
            return None
        value = c.count(rest.pop(0), f"the {key} {label.text}", 1, units.TOKENS)
        if value is None:
            return None
        bounds[label.text] = value
    return bounds


def _lengths_consistent(c: Checker, lengths: Lengths, stmt: ast.Statement, key: str) -> bool:
    problem = None
    if lengths.kind == "uniform" and lengths.low > lengths.high:
        problem = f"uniform min {lengths.low} is above max {lengths.high}"
    elif lengths.min is not None and lengths.max is not None and lengths.min > lengths.max:
        problem = f"min {lengths.min} is above max {lengths.max}"
    elif lengths.kind == "lognormal" and lengths.max is not None and lengths.max < lengths.median:
        problem = f"max {lengths.max} is below the median {lengths.median:g}"
    elif lengths.kind == "normal" and lengths.max is not None and lengths.max < lengths.mean:
        problem = f"max {lengths.max} is below the mean {lengths.mean:g}"
    elif lengths.kind == "fixed" and lengths.max is not None and lengths.value > lengths.max:
        problem = f"the fixed length {lengths.value} is above max {lengths.max}"
    if problem:
        c.error("F0407", f"inconsistent `{key}` lengths: {problem}", stmt.span, "cannot be satisfied",
                "fix the bounds so that the distribution has room between them")
        return False
    return True
