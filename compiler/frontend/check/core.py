"""The checker's core: the driver that runs the phases, diagnostics, name resolution with
did-you-mean, reading a block's statements against its vocabulary, and the value readers
(numbers and quantities with units, counts, words) that every block builder uses."""

from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterable

from flowc.compiler import units
from flowc.compiler.diagnostics import Diagnostic, FlowError, Label, did_you_mean, suggestion_help
from flowc.compiler.frontend import ast
from flowc.compiler.frontend.check import constraints, deployments, hardware, models, slos, workloads
from flowc.compiler.frontend.check.vocabulary import (
    KIND_NAMES,
    KINDS,
    METRIC_ALIASES,
    REPEATABLE,
    SCHEMAS,
    describe,
    expr_text,
    with_article,
)
from flowc.compiler.frontend.imports import Program
from flowc.compiler.frontend.parser import MAX_ERRORS, capped
from flowc.compiler.model.traces import Trace
from flowc.compiler.spec import Location, Spec
from flowc.compiler.units import Dim, Value

MAX_EXPONENT = 100
MIN_MAGNITUDE, MAX_MAGNITUDE = Fraction(1, 10**MAX_EXPONENT), Fraction(10**MAX_EXPONENT)

# Each kind's builder reads a declaration's block and returns its IR (None after an error).
BUILDERS = {
    "link": hardware.build_link, "gpu": hardware.build_gpu, "cluster": hardware.build_cluster,
    "model": models.build_model, "workload": workloads.build_workload, "slo": slos.build_slo,
    "deploy": deployments.build_deploy,
}


class _TooManyErrors(Exception):
    """Raised when the check has found MAX_ERRORS errors: the rest would only cost time."""


class Block:
    """A body's statements grouped by key, after reporting unknown and repeated keys."""

    def __init__(self, statements: dict[str, list[ast.Statement]], owner: ast.Name, rejected: set[str]):
        self.statements = statements
        self.owner = owner
        self.rejected = rejected  # keys already reported (misspelt or malformed): not also "missing"

    def one(self, key: str) -> ast.Statement | None:
        found = self.statements.get(key)
        return found[0] if found else None

    def all(self, key: str) -> list[ast.Statement]:
        return self.statements.get(key, [])


class Checker:
    """One check of a program: the declarations by kind, what is built and used so far, and the
    diagnostics collected. The builders of each kind of block read through its methods."""

    def __init__(self, program: Program):
        self.program = program
        self.errors: list[Diagnostic] = []
        self.warnings: list[Diagnostic] = []
        self.decls: dict[str, dict[str, tuple[ast.Decl, str]]] = {kind: {} for kind in KINDS}
        self.built: dict[tuple[str, str], object] = {}
        self.used: set[tuple[str, str]] = set()
        self.module = ""  # the module being checked, for visibility and relative paths
        self.traces: dict[Path, Trace | None] = {}
        self.missing: dict[tuple, list[str]] = {}  # (owner span, what) -> examples of missing keys

    # ------------------------------------------------------------------------------ driver

    def run(self) -> Spec:
        try:
            return self._phases()
        except _TooManyErrors:
            raise FlowError(capped(self._in_source_order()), self.program.sources) from None

    def _phases(self) -> Spec:
        for module in self.program.modules:
            self._collect(module)
        self._stop_if_errors()
        spec = Spec(files=list(self.program.roots))
        order = ("link", "gpu", "model", "cluster", "workload", "slo", "deploy")
        tables = {"link": spec.links, "gpu": spec.gpus, "model": spec.models, "cluster": spec.clusters,
                  "workload": spec.workloads, "slo": spec.slos, "deploy": spec.deployments}
        for kind in order:
            for name in self.decls[kind]:
                built = self.build(kind, name)
                if built is not None:
                    tables[kind][name] = built
        self._stop_if_errors()
        for deployment in spec.deployments.values():
            constraints.check_deployment(self, spec, deployment)
        self._stop_if_errors()
        constraints.check_capacity(self, spec)
        self._stop_if_errors()
        constraints.warn_unused(self)
        return spec

    def _stop_if_errors(self) -> None:
        self._report_missing()
        if self.errors:
            raise FlowError(capped(self._in_source_order()), self.program.sources)

    def _in_source_order(self) -> list[Diagnostic]:
        return sorted(self.errors, key=lambda d: (d.span.file, d.span.start) if d.span else ("", 0))

    def error(self, code: str, message: str, span, label: str = "", help: str | None = None,
              notes: Iterable[str] = (), related: Iterable[Label] = ()) -> None:
        self.errors.append(Diagnostic(code, message, span, label, help, tuple(notes), tuple(related)))
        if len(self.errors) >= MAX_ERRORS:
            raise _TooManyErrors

    # ------------------------------------------------------------------------------ names

    def _collect(self, module: ast.Module) -> None:
        for decl in module.decls:
            kind = decl.kind.text
            if kind not in KINDS:
                self.error("F0203", f"unknown kind of declaration `{kind}`", decl.kind.span, "not a declaration",
                           suggestion_help(kind, KINDS, "declarations"))
                continue
            table = self.decls[kind]
            name = decl.name.text
            if name in table:
                first, _ = table[name]
                self.error("F0202", f"{KIND_NAMES[kind]} `{name}` is defined twice", decl.name.span,
                           "defined again here", "rename one of them",
                           related=[Label(first.name.span, "first defined here")])
                continue
            table[name] = (decl, module.file)

    def build(self, kind: str, name: str):
        key = (kind, name)
        if key not in self.built:
            decl, module = self.decls[kind][name]
            self.built[key] = None  # guards against reference loops
            previous, self.module = self.module, module
            try:
                self.built[key] = BUILDERS[kind](self, decl)
            finally:
                self.module = previous
        return self.built[key]

    def ref(self, expr: ast.Expr, kind: str):
        """Resolve a name of the given kind and return its IR (None after an error)."""
        if not isinstance(expr, ast.Name):
            self.expected(expr, f"the name of a {KIND_NAMES[kind]}")
            return None
        name = expr.text
        visible = self.program.visible(self.module)
        entry = self.decls[kind].get(name)
        if entry is not None:
            decl, module = entry
            if module not in visible:
                hint = f"use {_module_ref(module)}"
                self.error("F0201", f"{KIND_NAMES[kind]} `{name}` is not imported here", expr.span,
                           f"defined in {module}", f"add `{hint}` at the top of this file")
                return None
            self.used.add((kind, name))
            return self.build(kind, name)
        for other in KINDS:
            if other != kind and name in self.decls[other]:
                self.error("F0210", f"`{name}` is a {KIND_NAMES[other]}, not a {KIND_NAMES[kind]}", expr.span,
                           f"expected a {KIND_NAMES[kind]}", self._name_help(name, kind, visible))
                return None
        self.error("F0201", f"unknown {KIND_NAMES[kind]} `{name}`", expr.span, "not defined",
                   self._name_help(name, kind, visible))
        return None

    def _name_help(self, name: str, kind: str, visible: set[str]) -> str:
        local = [n for n, (_, m) in self.decls[kind].items() if m in visible]
        best = did_you_mean(name, local)
        if best:
            return f"did you mean `{best}`?"
        from flowc.compiler.frontend.imports import std_source

        hidden = did_you_mean(name, self.decls[kind])
        if hidden:
            return f"did you mean `{hidden}` (add `use {_module_ref(self.decls[kind][hidden][1])}`)?"
        module = {"gpu": "gpus", "link": "links", "model": "models", "slo": "slos"}.get(kind)
        if module and f"<std>/{module}.flow" not in visible and std_source(module) is not None:
            return f"the standard library's {KIND_NAMES[kind]}s need `use std.{module}`"
        if not local:
            return f"no {KIND_NAMES[kind]} is defined or imported here; declare one with `{kind} NAME {{ ... }}`"
        return suggestion_help(name, local, f"known {KIND_NAMES[kind]}s")

    # ------------------------------------------------------------------------------ blocks

    def block(self, body: ast.Body | None, schema: str, owner: ast.Name) -> Block:
        grouped: dict[str, list[ast.Statement]] = {}
        rejected: set[str] = set()
        vocabulary = SCHEMAS[schema]
        for stmt in body.statements if body else ():
            key = stmt.key.text
            if key not in vocabulary:
                self._unknown_attribute(stmt, schema)
                rejected.add(did_you_mean(key, vocabulary) or key)
                continue
            if key in grouped and (schema, key) not in REPEATABLE:
                self.error("F0311", f"`{key}` is given twice", stmt.key.span, "given again here",
                           "keep one of them", related=[Label(grouped[key][0].key.span, "first given here")])
                continue
            if stmt.body is not None and key not in ("node", "moe", "mla", "model"):
                self.error("F0305", f"`{key}` takes no block", stmt.body.open, "unexpected block",
                           f"write `{vocabulary[key]}`")
                rejected.add(key)
                continue
            grouped.setdefault(key, []).append(stmt)
        return Block(grouped, owner, rejected)

    def _unknown_attribute(self, stmt: ast.Statement, schema: str) -> None:
        key = stmt.key.text
        if schema == "slo":
            alias = METRIC_ALIASES.get(key)
            self.error("F0209", f"unknown SLO metric `{key}`", stmt.key.span, "not a metric",
                       f"did you mean `{alias}`?" if alias else suggestion_help(key, SCHEMAS["slo"], "SLO metrics"))
            return
        where = "deployment model" if schema == "override" else schema
        self.error("F0204", f"unknown attribute `{key}` in a {where} block", stmt.key.span,
                   f"not a {where} attribute", suggestion_help(key, SCHEMAS[schema], f"{where} attributes"))

    def required(self, block: Block, key: str, schema: str, what: str) -> ast.Statement | None:
        stmt = block.one(key)
        if stmt is None and key not in block.rejected:
            self.missing.setdefault((block.owner.span, what), []).append(SCHEMAS[schema][key])
        return stmt

    def _report_missing(self) -> None:
        """One F0310 per block, naming everything it lacks."""
        for (span, what), examples in self.missing.items():
            keys = [example.split()[0] for example in examples]
            listed = ", ".join(f"`{k}`" for k in keys)
            self.errors.append(Diagnostic("F0310", f"{what} `{self._text_at(span)}` has no {listed}", span,
                                          f"missing {listed}", "add " + "; ".join(f"`{e}`" for e in examples)))
        self.missing.clear()

    def _text_at(self, span) -> str:
        return self.program.sources[span.file].text[span.start:span.end]

    def args(self, stmt: ast.Statement, schema: str, count: int | tuple[int, ...]) -> tuple[ast.Expr, ...] | None:
        counts = (count,) if isinstance(count, int) else count
        if len(stmt.args) in counts:
            return stmt.args
        span = stmt.args[max(counts)].span.to(stmt.args[-1].span) if len(stmt.args) > max(counts) else stmt.span
        found = "nothing" if not stmt.args else f"{len(stmt.args)} values"
        self.error("F0305", f"`{stmt.key.text}` takes {_plural(counts)}, found {found}", span,
                   "unexpected" if len(stmt.args) > max(counts) else "incomplete",
                   f"write `{SCHEMAS[schema][stmt.key.text]}`")
        return None

    # ------------------------------------------------------------------------------ values

    def value(self, expr: ast.Expr) -> Value | None:
        if isinstance(expr, ast.Number):
            return Value(expr.value) if self._sane_exponent(expr) else None
        if isinstance(expr, ast.Quantity):
            unit = units.UNITS.get(expr.unit)
            if unit is None:
                self.error("F0301", f"unknown unit `{expr.unit}`", expr.unit_span, "not a unit",
                           units.unit_suggestion(expr.unit))
                return None
            if not self._sane_exponent(expr.number):
                return None
            return Value(expr.number.value * unit.scale, unit.dim)
        if isinstance(expr, ast.Paren):
            return self.value(expr.expr)
        if isinstance(expr, ast.BinOp):
            left, right = self.value(expr.left), self.value(expr.right)
            if left is None or right is None:
                return None
            if expr.op in "+-":
                if left.dim != right.dim:
                    self.error("F0303", f"cannot {'add' if expr.op == '+' else 'subtract'} {right.dim.name} "
                               f"{'to' if expr.op == '+' else 'from'} {left.dim.name}", expr.span, "mismatched units",
                               "both sides of `+` and `-` need the same dimension")
                    return None
                total = left.magnitude + right.magnitude if expr.op == "+" else left.magnitude - right.magnitude
                return Value(total, left.dim)
            if expr.op == "*":
                return Value(left.magnitude * right.magnitude, left.dim * right.dim)
            if right.magnitude == 0:
                self.error("F0312", "division by zero", expr.right.span, "this is zero")
                return None
            return Value(left.magnitude / right.magnitude, left.dim / right.dim)
        self.expected(expr, "a value")
        return None

    def _sane_exponent(self, number: ast.Number) -> bool:
        """Exact values expand their exponent: `1e100000000` would take minutes, so refuse it."""
        exponent = re.search(r"[eE]([+-]?\d+)$", number.text)
        if exponent and abs(int(exponent.group(1))) > MAX_EXPONENT:
            self.error("F0307", f"`{number.text}` is out of range", number.span, "exponent too large",
                       f"write a number between 1e-{MAX_EXPONENT} and 1e{MAX_EXPONENT}")
            return False
        return True

    def expected(self, expr: ast.Expr, what: str, help: str | None = None) -> None:
        self.error("F0304", f"expected {what}, found {describe(expr)}", expr.span, f"this is {describe(expr)}", help)

    def quantity(self, expr: ast.Expr, dim: Dim) -> Fraction | None:
        value = self.value(expr)
        if value is None:
            return None
        if value.dim != dim:
            example = units.DIM_EXAMPLES.get(dim, "")
            if value.dim == units.NUMBER and isinstance(expr, ast.Number):
                self.error("F0302", f"`{expr.text}` needs a unit", expr.span, f"expected {dim.name}",
                           f"write it with a unit, such as `{example}`")
            else:
                self.error("F0302", f"expected {dim.name}, found {value.dim.name}", expr.span,
                           f"this is {value.dim.name}", f"write {dim.name.split(' (')[0]} such as `{example}`")
            return None
        if value.magnitude < 0:
            self.error("F0307", f"`{expr_text(expr)}` is negative", expr.span, "must not be negative")
            return None
        if value.magnitude and not MIN_MAGNITUDE <= value.magnitude <= MAX_MAGNITUDE:
            # The IR stores floats: keep every value representable, and nonzero ones nonzero.
            self.error("F0307", f"`{expr_text(expr)}` is out of range", expr.span, "too large or too small",
                       f"values must lie between 1e-{MAX_EXPONENT} and 1e{MAX_EXPONENT} in base units "
                       "(bytes, seconds, tokens, ...)")
            return None
        return value.magnitude

    def count(self, expr: ast.Expr, what: str, minimum: int = 1, dim: Dim = units.NUMBER,
              maximum: int | None = None) -> int | None:
        if dim == units.NUMBER and isinstance(expr, ast.Quantity):
            self.error("F0302", f"{what} is a plain number, found a quantity", expr.span, "remove the unit",
                       f"write `{expr.number.text}`")
            return None
        magnitude = self.quantity(expr, dim)
        if magnitude is None:
            return None
        if magnitude.denominator != 1:
            self.error("F0307", f"{what} must be a whole number", expr.span, f"{float(magnitude):g} is not whole")
            return None
        if magnitude < minimum:
            self.error("F0307", f"{what} must be at least {minimum}", expr.span, f"{int(magnitude)} is too small")
            return None
        if not self.within(expr, what, magnitude, maximum):
            return None
        return int(magnitude)

    def positive(self, expr: ast.Expr, dim: Dim, what: str, maximum: float | None = None) -> float | None:
        magnitude = self.quantity(expr, dim)
        if magnitude is None:
            return None
        if magnitude <= 0:
            self.error("F0307", f"{what} must be greater than zero", expr.span, "zero")
            return None
        if not self.within(expr, what, magnitude, maximum):
            return None
        return float(magnitude)

    def within(self, expr: ast.Expr, what: str, magnitude, maximum) -> bool:
        """Whether a value is at most `maximum` (in base units): the largest a position takes,
        far above any real deployment and below what the solvers' 64-bit integers hold."""
        if maximum is None or magnitude <= maximum:
            return True
        self.error("F0307", f"{what} is beyond the largest flowc takes", expr.span, f"at most {maximum:,g}",
                   f"use a value up to {maximum:,g}")
        return False

    def keyed(self, b, key: str, choices: Iterable[str], what: str, read) -> dict[str, float]:
        """A gpu's repeatable `KEY WORD VALUE` lines (`flops bf16 989 TFLOP/s`) as {word: value},
        each word at most once."""
        values: dict[str, float] = {}
        for stmt in b.all(key):
            args = self.args(stmt, "gpu", 2)
            if not args:
                continue
            word, value = self.word(args[0], choices, what), read(args[1])
            if word in values:
                self.error("F0311", f"`{key} {word}` is given twice", args[0].span, "given again here")
            elif word and value is not None:
                values[word] = float(value)
        return values

    def word(self, expr: ast.Expr, choices: Iterable[str], what: str) -> str | None:
        choices = tuple(choices)
        if not isinstance(expr, ast.Name):
            self.expected(expr, what, "one of: " + ", ".join(f"`{c}`" for c in choices))
            return None
        if expr.text not in choices:
            self.error("F0306", f"unknown {what} `{expr.text}`", expr.span, f"not {with_article(what)}",
                       suggestion_help(expr.text, choices, f"{what}s"))
            return None
        return expr.text

    def boolean(self, expr: ast.Expr) -> bool | None:
        choice = self.word(expr, ("true", "false"), "boolean")
        return None if choice is None else choice == "true"

    def one_value(self, block: Block, key: str, schema: str, read: Callable[[ast.Expr], object],
                  required: bool = False, what: str = ""):
        stmt = self.required(block, key, schema, what) if required else block.one(key)
        if stmt is None:
            return None
        args = self.args(stmt, schema, 1)
        return read(args[0]) if args else None

    def location(self, decl: ast.Decl) -> Location:
        """Where a declaration is, for the IR object built from it."""
        return Location(file=decl.name.span.file, line=decl.name.span.line, col=decl.name.span.col)


def _plural(counts: tuple[int, ...]) -> str:
    words = " or ".join(str(c) for c in counts)
    return f"{words} value" + ("" if counts == (1,) else "s")


def _module_ref(module: str) -> str:
    if module.startswith("<std>/"):
        return "std." + module[len("<std>/"):-len(".flow")]
    return f'"{module}"'
