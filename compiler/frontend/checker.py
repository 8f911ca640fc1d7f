"""Resolution and type checking: from the AST of every loaded module to the spec IR.

The checker reads each declaration's statements against the block's vocabulary, evaluates
quantities with their units, resolves references by kind, and then checks the constraints
that tie objects together (TP must divide heads, the weights must fit somewhere, ...).
Diagnostics are collected, not raised one at a time: a phase reports all of its errors.
"""

from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterable

from flowc.compiler.frontend import ast

from flowc.compiler import units
from flowc.compiler.diagnostics import Diagnostic, FlowError, Label, did_you_mean, suggestion_help
from flowc.compiler.frontend.imports import Program, display_path
from flowc.compiler.model.shapes import divisors as _divisors, instance_shapes, valid_tp
from flowc.compiler.model.memory import GPU_MEMORY_UTILIZATION, param_counts, weight_bytes
from flowc.compiler.spec import (
    DTYPE_BYTES, GPU, MLA, SEARCH_KNOBS, SLO, Arrival, Cluster, Deployment, Lengths, Link, Location,
    MoE, Model, NodeGroup, SLOTarget, Spec, Workload,
)
from flowc.compiler.model.traces import Trace, TraceError, read_trace
from flowc.compiler.units import Dim, Value, format_value

MAX_EXPONENT = 100
MIN_MAGNITUDE, MAX_MAGNITUDE = Fraction(1, 10**MAX_EXPONENT), Fraction(10**MAX_EXPONENT)
KINDS = ("link", "gpu", "cluster", "model", "workload", "slo", "deploy")
KIND_NAMES = {"link": "link", "gpu": "gpu", "cluster": "cluster", "model": "model", "workload": "workload",
              "slo": "slo", "deploy": "deployment"}
DTYPES = tuple(DTYPE_BYTES)
LINK_KINDS = ("nvlink", "xgmi", "pcie", "infiniband", "ethernet", "memory")
GPU_LINK_KINDS = ("nvlink", "xgmi", "pcie", "memory")
NETWORK_KINDS = ("infiniband", "ethernet")
ARCHITECTURES = ("llama", "qwen2", "mixtral", "qwen3_moe", "deepseek_v3", "gptj")
SLO_METRICS = ("ttft", "tpot", "e2e")
TOKEN_KNOBS = ("max_batched_tokens", "chunk_size", "block_size")
METRIC_ALIASES = {"itl": "tpot", "latency": "e2e", "e2el": "e2e", "ttlt": "e2e", "tbt": "tpot"}

# The vocabulary of each block: attribute -> how to write it (shown in help lines).
SCHEMAS: dict[str, dict[str, str]] = {
    "link": {"kind": "kind nvlink", "bandwidth": "bandwidth 450 GB/s", "latency": "latency 2 us"},
    "gpu": {
        "vendor": "vendor nvidia", "memory": "memory 80 GiB", "memory_bandwidth": "memory_bandwidth 3.35 TB/s",
        "flops": "flops bf16 989 TFLOP/s", "interconnect": "interconnect nvlink4", "host_link": "host_link pcie5",
        "price": "price 2.5 usd/h", "overhead": "overhead step 0.3 ms",
    },
    "cluster": {"node": "node x 2 { gpu h100-sxm x 8 }", "network": "network ib-ndr x 8"},
    "node": {
        "gpu": "gpu h100-sxm x 8", "link": "link nvlink4", "link_domain": "link_domain 8",
        "host_memory": "host_memory 2 TiB", "host_link": "host_link pcie5", "price": "price 98 usd/h",
    },
    "model": {
        "architecture": "architecture llama", "layers": "layers 32", "hidden": "hidden 4096", "heads": "heads 32",
        "kv_heads": "kv_heads 8", "head_dim": "head_dim 128", "ffn": "ffn 14336", "vocab": "vocab 128256",
        "max_context": "max_context 131072 tok", "weights": "weights bf16", "kv": "kv bf16",
        "tied_embeddings": "tied_embeddings false", "attention_bias": "attention_bias false", "mlp": "mlp gated",
        "sliding_window": "sliding_window 4096 tok", "moe": "moe { experts 8; top_k 2 }",
        "mla": "mla { kv_lora_rank 512; qk_nope_head_dim 128; qk_rope_head_dim 64; v_head_dim 128 }",
    },
    "moe": {"experts": "experts 8", "top_k": "top_k 2", "expert_ffn": "expert_ffn 14336",
            "shared_experts": "shared_experts 1", "dense_layers": "dense_layers 3"},
    "mla": {"q_lora_rank": "q_lora_rank 1536", "kv_lora_rank": "kv_lora_rank 512",
            "qk_nope_head_dim": "qk_nope_head_dim 128", "qk_rope_head_dim": "qk_rope_head_dim 64",
            "v_head_dim": "v_head_dim 128"},
    "workload": {
        "arrival": "arrival poisson 12 req/s", "prompt": "prompt lognormal(median 1024 tok, sigma 0.6) max 8192 tok",
        "output": "output lognormal(median 256 tok, sigma 0.8) max 2048 tok", "requests": "requests 2000 req",
        "duration": "duration 10 min",
    },
    "slo": {"ttft": "ttft p90 <= 500 ms", "tpot": "tpot p90 <= 50 ms", "e2e": "e2e p99 <= 20 s",
            "attainment": "attainment >= 90 %"},
    "deploy": {
        "model": "model llama-3.1-70b", "on": "on my-cluster", "serve": "serve my-workload under my-slo",
        "objective": "objective max goodput_per_gpu", "max_gpus": "max_gpus 16",
        "allow": "allow disaggregation, offload", "forbid": "forbid offload",
        **{knob: f"{knob} in [2048 tok, 8192 tok]" if knob in TOKEN_KNOBS else f"{knob} in [1, 2, 4]"
           for knob in SEARCH_KNOBS},
    },
    "override": {"weights": "weights fp8", "kv": "kv fp8", "max_context": "max_context 32768 tok"},
}
OVERHEAD_KINDS = ("step", "layer", "sequence", "token", "layer_token", "wake")
REPEATABLE = {("gpu", "flops"), ("gpu", "overhead"), ("cluster", "node"), ("deploy", "allow"), ("deploy", "forbid")}


def _a(noun: str) -> str:
    """`noun` with its indefinite article (by spelling, which serves flowc's words: "a unit")."""
    return ("an " if noun[0] in "aeio" else "a ") + noun


def _describe(expr: ast.Expr) -> str:
    return {
        ast.Name: "a name", ast.Number: "a number", ast.Quantity: "a quantity", ast.String: "a string",
        ast.Operator: "a comparison", ast.ListExpr: "a list", ast.TupleExpr: "several values",
        ast.Call: "a call", ast.BinOp: "an expression", ast.Paren: "an expression",
    }[type(expr)]


class _Block:
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
        for module in self.program.modules:
            self._collect(module)
        self._stop_if_errors()
        spec = Spec(files=list(self.program.roots))
        order = ("link", "gpu", "model", "cluster", "workload", "slo", "deploy")
        tables = {"link": spec.links, "gpu": spec.gpus, "model": spec.models, "cluster": spec.clusters,
                  "workload": spec.workloads, "slo": spec.slos, "deploy": spec.deployments}
        for kind in order:
            for name in self.decls[kind]:
                built = self._build(kind, name)
                if built is not None:
                    tables[kind][name] = built
        self._stop_if_errors()
        for deployment in spec.deployments.values():
            self._check_deployment(spec, deployment)
        self._stop_if_errors()
        self._check_capacity(spec)
        self._stop_if_errors()
        self._warn_unused()
        return spec

    def _stop_if_errors(self) -> None:
        self._report_missing()
        if self.errors:
            self.errors.sort(key=lambda d: (d.span.file, d.span.start) if d.span else ("", 0))
            raise FlowError(self.errors, self.program.sources)

    def error(self, code: str, message: str, span, label: str = "", help: str | None = None,
              notes: Iterable[str] = (), related: Iterable[Label] = ()) -> None:
        self.errors.append(Diagnostic(code, message, span, label, help, tuple(notes), tuple(related)))

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

    def _build(self, kind: str, name: str):
        key = (kind, name)
        if key not in self.built:
            decl, module = self.decls[kind][name]
            self.built[key] = None  # guards against reference loops
            previous, self.module = self.module, module
            try:
                self.built[key] = getattr(self, f"_build_{kind}")(decl)
            finally:
                self.module = previous
        return self.built[key]

    def ref(self, expr: ast.Expr, kind: str):
        """Resolve a name of the given kind and return its IR (None after an error)."""
        if not isinstance(expr, ast.Name):
            self._expected(expr, f"the name of a {KIND_NAMES[kind]}")
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
            return self._build(kind, name)
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

    def block(self, body: ast.Body | None, schema: str, owner: ast.Name) -> _Block:
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
        return _Block(grouped, owner, rejected)

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

    def required(self, block: _Block, key: str, schema: str, what: str) -> ast.Statement | None:
        stmt = block.one(key)
        if stmt is None and key not in block.rejected:
            self.missing.setdefault((block.owner.span, what), []).append(SCHEMAS[schema][key])
        return stmt

    def _report_missing(self) -> None:
        """One F0310 per block, naming everything it lacks."""
        for (span, what), examples in self.missing.items():
            keys = [example.split()[0] for example in examples]
            listed = ", ".join(f"`{k}`" for k in keys)
            self.error("F0310", f"{what} `{self._text_at(span)}` has no {listed}", span,
                       f"missing {listed}", "add " + "; ".join(f"`{e}`" for e in examples))
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
        self._expected(expr, "a value")
        return None

    def _sane_exponent(self, number: ast.Number) -> bool:
        """Exact values expand their exponent: `1e100000000` would take minutes, so refuse it."""
        exponent = re.search(r"[eE]([+-]?\d+)$", number.text)
        if exponent and abs(int(exponent.group(1))) > MAX_EXPONENT:
            self.error("F0307", f"`{number.text}` is out of range", number.span, "exponent too large",
                       f"write a number between 1e-{MAX_EXPONENT} and 1e{MAX_EXPONENT}")
            return False
        return True

    def _expected(self, expr: ast.Expr, what: str, help: str | None = None) -> None:
        self.error("F0304", f"expected {what}, found {_describe(expr)}", expr.span, f"this is {_describe(expr)}", help)

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
            self.error("F0307", f"`{_text(expr)}` is negative", expr.span, "must not be negative")
            return None
        if value.magnitude and not MIN_MAGNITUDE <= value.magnitude <= MAX_MAGNITUDE:
            # The IR stores floats: keep every value representable, and nonzero ones nonzero.
            self.error("F0307", f"`{_text(expr)}` is out of range", expr.span, "too large or too small",
                       f"values must lie between 1e-{MAX_EXPONENT} and 1e{MAX_EXPONENT} in base units "
                       "(bytes, seconds, tokens, ...)")
            return None
        return value.magnitude

    def count(self, expr: ast.Expr, what: str, minimum: int = 1, dim: Dim = units.NUMBER) -> int | None:
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
        return int(magnitude)

    def positive(self, expr: ast.Expr, dim: Dim, what: str) -> float | None:
        magnitude = self.quantity(expr, dim)
        if magnitude is None:
            return None
        if magnitude <= 0:
            self.error("F0307", f"{what} must be greater than zero", expr.span, "zero")
            return None
        return float(magnitude)

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
            self._expected(expr, what, "one of: " + ", ".join(f"`{c}`" for c in choices))
            return None
        if expr.text not in choices:
            self.error("F0306", f"unknown {what} `{expr.text}`", expr.span, f"not {_a(what)}",
                       suggestion_help(expr.text, choices, f"{what}s"))
            return None
        return expr.text

    def boolean(self, expr: ast.Expr) -> bool | None:
        choice = self.word(expr, ("true", "false"), "boolean")
        return None if choice is None else choice == "true"

    def one_value(self, block: _Block, key: str, schema: str, read: Callable[[ast.Expr], object],
                  required: bool = False, what: str = ""):
        stmt = self.required(block, key, schema, what) if required else block.one(key)
        if stmt is None:
            return None
        args = self.args(stmt, schema, 1)
        return read(args[0]) if args else None

    # ------------------------------------------------------------------------------ links, gpus

    def _location(self, decl: ast.Decl) -> Location:
        return Location(file=decl.name.span.file, line=decl.name.span.line, col=decl.name.span.col)

    def _build_link(self, decl: ast.Decl) -> Link | None:
        b = self.block(decl.body, "link", decl.name)
        kind = self.one_value(b, "kind", "link", lambda e: self.word(e, LINK_KINDS, "link kind"), True, "link")
        bandwidth = self.one_value(b, "bandwidth", "link", lambda e: self.positive(e, units.BANDWIDTH, "bandwidth"),
                                   True, "link")
        latency = self.one_value(b, "latency", "link", lambda e: self.quantity(e, units.TIME))
        if kind is None or bandwidth is None:
            return None
        return Link(name=decl.name.text, kind=kind, bandwidth=bandwidth,
                    latency=None if latency is None else float(latency), doc=decl.doc, location=self._location(decl))

    def _build_gpu(self, decl: ast.Decl) -> GPU | None:
        b = self.block(decl.body, "gpu", decl.name)
        r = lambda key, read, required=True: self.one_value(b, key, "gpu", read, required, "gpu")  # noqa: E731
        vendor = r("vendor", lambda e: self.word(e, ("nvidia", "amd", "cpu"), "vendor"))
        memory = r("memory", lambda e: self.count(e, "memory", 1, units.BYTES))
        bandwidth = r("memory_bandwidth", lambda e: self.positive(e, units.BANDWIDTH, "memory bandwidth"))
        interconnect = r("interconnect", lambda e: self.ref(e, "link"))
        host_link = r("host_link", lambda e: self.ref(e, "link"))
        price = r("price", lambda e: self.quantity(e, units.PRICE), False)
        flops = self.keyed(b, "flops", DTYPES, "dtype",
                           lambda e: self.positive(e, units.COMPUTE, "peak compute"))
        if not b.all("flops"):
            self.required(b, "flops", "gpu", "gpu")
        overheads = self.keyed(b, "overhead", OVERHEAD_KINDS, "overhead", lambda e: self.quantity(e, units.TIME))
        if None in (vendor, memory, bandwidth, interconnect, host_link) or not flops:
            return None
        return GPU(name=decl.name.text, vendor=vendor, memory=memory, memory_bandwidth=bandwidth, flops=flops,
                   interconnect=interconnect.name, host_link=host_link.name, overheads=overheads,
                   price=None if price is None else float(price * 3600), doc=decl.doc, location=self._location(decl))

    def _link_arg(self, stmt: ast.Statement, schema: str, kinds: tuple[str, ...], what: str) -> Link | None:
        """`link nvlink4` (a named link) or `link nvlink 450 GB/s` (kind and bandwidth)."""
        args = stmt.args
        if len(args) >= 2 and isinstance(args[1], (ast.Quantity, ast.BinOp, ast.Paren, ast.Number)):
            kind = self.word(args[0], kinds, f"{what} kind")
            bandwidth = self.positive(args[1], units.BANDWIDTH, "bandwidth")
            if kind is None or bandwidth is None:
                return None
            return Link(name=f"{kind}-{format_value(Value(Fraction(bandwidth), units.BANDWIDTH)).replace(' ', '')}",
                        kind=kind, bandwidth=bandwidth)
        if not args:
            self.args(stmt, schema, 1)
            return None
        link = self.ref(args[0], "link")
        if link is not None and link.kind not in kinds:
            self.error("F0306", f"`{link.name}` is {_a(link.kind)} link, which cannot serve as {what}", args[0].span,
                       f"{link.kind} link", f"{what} takes a link of kind " + " or ".join(f"`{k}`" for k in kinds))
            return None
        return link

    def _times(self, args: tuple[ast.Expr, ...], what: str) -> tuple[tuple[ast.Expr, ...], int | None]:
        """Split a trailing `x N` off the arguments."""
        if len(args) >= 2 and isinstance(args[-2], ast.Name) and args[-2].text == "x":
            return args[:-2], self.count(args[-1], what)
        return args, 1

    # ------------------------------------------------------------------------------ clusters

    def _build_cluster(self, decl: ast.Decl) -> Cluster | None:
        b = self.block(decl.body, "cluster", decl.name)
        nodes = [self._node(stmt) for stmt in b.all("node")]
        if not b.all("node"):
            self.required(b, "node", "cluster", "cluster")
        network, nics = None, 1
        stmt = b.one("network")
        if stmt is not None:
            rest, nics = self._times(stmt.args, "the number of NICs per node")
            network = self._link_arg(ast.Statement(stmt.key, rest, None, stmt.span), "cluster", NETWORK_KINDS, "a network")
        if any(n is None for n in nodes) or nics is None or not nodes or (stmt is not None and network is None):
            return None
        if sum(n.count for n in nodes) > 1 and network is None:
            self.error("F0310", f"cluster `{decl.name.text}` has several nodes but no `network`", decl.name.span,
                       "nodes cannot reach each other", "add `network ib-ndr x 8` (from std.links)")
            return None
        return Cluster(name=decl.name.text, nodes=nodes, network=network, network_nics=nics, doc=decl.doc,
                       location=self._location(decl))

    def _node(self, stmt: ast.Statement) -> NodeGroup | None:
        args, count = self._times(stmt.args, "the number of nodes")
        name = None
        if len(args) > 1 or (args and not isinstance(args[0], ast.Name)):
            self.error("F0305", "a node group is `node x N { ... }` or `node NAME x N { ... }`", stmt.span,
                       "malformed node", f"write `{SCHEMAS['cluster']['node']}`")
            return None
        if args:
            name = args[0].text
        if stmt.body is None:
            self.error("F0305", "`node` needs a block with its GPUs", stmt.span, "no block",
                       f"write `{SCHEMAS['cluster']['node']}`")
            return None
        b = self.block(stmt.body, "node", stmt.key)
        gpu_stmt = self.required(b, "gpu", "node", "node")
        gpu, per_node = None, None
        if gpu_stmt is not None:
            rest, per_node = self._times(gpu_stmt.args, "the number of GPUs per node")
            if len(rest) != 1:
                self.args(ast.Statement(gpu_stmt.key, rest, None, gpu_stmt.span), "node", 1)
            else:
                gpu = self.ref(rest[0], "gpu")
        link = host_link = None
        if b.one("link"):
            link = self._link_arg(b.one("link"), "node", GPU_LINK_KINDS, "a link between GPUs")
        elif gpu is not None:
            link = self._build("link", gpu.interconnect)
        if b.one("host_link"):
            host_link = self._link_arg(b.one("host_link"), "node", LINK_KINDS, "a host link")
        elif gpu is not None:
            host_link = self._build("link", gpu.host_link)
        domain = self.one_value(b, "link_domain", "node", lambda e: self.count(e, "link_domain"))
        host_memory = self.one_value(b, "host_memory", "node", lambda e: self.count(e, "host memory", 1, units.BYTES))
        price = self.one_value(b, "price", "node", lambda e: self.quantity(e, units.PRICE))
        if gpu is None or per_node is None or count is None or link is None or host_link is None:
            return None
        if domain is not None and per_node % domain:
            self.error("F0408", f"link_domain {domain} does not divide the node's {per_node} GPUs",
                       b.one("link_domain").args[0].span, "uneven domains",
                       "use one of: " + ", ".join(str(d) for d in _divisors(per_node)))
            return None
        return NodeGroup(name=name, count=count, gpu=gpu.name, gpus_per_node=per_node, link=link,
                         link_domain=domain or per_node, host_memory=host_memory, host_link=host_link,
                         price=None if price is None else float(price * 3600))

    # ------------------------------------------------------------------------------ models

    def _build_model(self, decl: ast.Decl) -> Model | None:
        b = self.block(decl.body, "model", decl.name)
        r = lambda key, read, required=False: self.one_value(b, key, "model", read, required, "model")  # noqa: E731
        fields = {
            "architecture": r("architecture", lambda e: self.word(e, ARCHITECTURES, "architecture"), True),
            **{key: r(key, lambda e, key=key: self.count(e, key), True) for key in ("layers", "hidden", "heads", "ffn", "vocab")},
            "max_context": r("max_context", lambda e: self.count(e, "max_context", 1, units.TOKENS), True),
        }
        optional = {
            "kv_heads": r("kv_heads", lambda e: self.count(e, "kv_heads")),
            "head_dim": r("head_dim", lambda e: self.count(e, "head_dim")),
            "weights": r("weights", lambda e: self.word(e, DTYPES, "dtype")),
            "kv": r("kv", lambda e: self.word(e, DTYPES, "dtype")),
            "tied_embeddings": r("tied_embeddings", self.boolean),
            "attention_bias": r("attention_bias", self.boolean),
            "mlp": r("mlp", lambda e: self.word(e, ("gated", "plain"), "MLP kind")),
            "sliding_window": r("sliding_window", lambda e: self.count(e, "sliding_window", 1, units.TOKENS)),
        }
        moe = self._moe(b.one("moe"), fields.get("ffn"))
        mla = self._mla(b.one("mla"))
        if None in fields.values() or moe is False or mla is False:
            return None
        fields.update({k: v for k, v in optional.items() if v is not None})
        fields.setdefault("kv_heads", fields["heads"])
        if "head_dim" not in fields:
            if mla:
                fields["head_dim"] = mla.qk_nope_head_dim + mla.qk_rope_head_dim
            elif fields["hidden"] % fields["heads"]:
                self.error("F0310", f"model `{decl.name.text}` needs a `head_dim`", decl.name.span,
                           f"hidden {fields['hidden']} is not a multiple of heads {fields['heads']}",
                           f"add `head_dim {fields['hidden'] // fields['heads']}` or the model's own value")
                return None
            else:
                fields["head_dim"] = fields["hidden"] // fields["heads"]
        if not self._model_consistent(decl, b, fields, moe):
            return None
        return Model(name=decl.name.text, moe=moe or None, mla=mla or None, doc=decl.doc,
                     location=self._location(decl), **fields)

    def _model_consistent(self, decl: ast.Decl, b: _Block, f: dict, moe: MoE | None) -> bool:
        if f["heads"] % f["kv_heads"]:
            self.error("F0406", f"heads ({f['heads']}) is not a multiple of kv_heads ({f['kv_heads']})",
                       b.one("kv_heads").args[0].span, "inconsistent", "grouped-query attention shares each KV head "
                       "among a whole number of query heads")
            return False
        if moe and moe.top_k > moe.experts:
            self.error("F0406", f"top_k ({moe.top_k}) is larger than the number of experts ({moe.experts})",
                       b.one("moe").key.span, "inconsistent", "each token picks top_k of the experts")
            return False
        if moe and moe.dense_layers >= f["layers"]:
            self.error("F0406", f"dense_layers ({moe.dense_layers}) leaves no MoE layer of {f['layers']}",
                       b.one("moe").key.span, "inconsistent", "dense_layers counts the leading dense layers only")
            return False
        return True

    def _nested(self, stmt: ast.Statement, name: str) -> _Block | None:
        """The body of `moe { ... }` or `mla { ... }`; None after reporting another shape."""
        if stmt.body is None or stmt.args:
            self.error("F0305", f"`{name}` takes a block", stmt.span, f"expected `{name} {{ ... }}`",
                       f"write `{SCHEMAS['model'][name]}`")
            return None
        return self.block(stmt.body, name, stmt.key)

    def _moe(self, stmt: ast.Statement | None, ffn: int | None):
        """The MoE settings, None without a `moe` block, False after an error."""
        if stmt is None:
            return None
        b = self._nested(stmt, "moe")
        if b is None:
            return False
        r = lambda key, required=False, minimum=1: self.one_value(  # noqa: E731
            b, key, "moe", lambda e: self.count(e, key, minimum), required, "moe")
        experts, top_k = r("experts", True), r("top_k", True)
        expert_ffn, shared, dense = r("expert_ffn"), r("shared_experts", minimum=0), r("dense_layers", minimum=0)
        if experts is None or top_k is None or (expert_ffn or ffn) is None:
            return False
        return MoE(experts=experts, top_k=top_k, expert_ffn=expert_ffn or ffn, shared_experts=shared or 0,
                   dense_layers=dense or 0)

    def _mla(self, stmt: ast.Statement | None):
        """The MLA settings, None without an `mla` block, False after an error."""
        if stmt is None:
            return None
        b = self._nested(stmt, "mla")
        if b is None:
            return False
        values = {key: self.one_value(b, key, "mla", lambda e, key=key: self.count(e, key), key != "q_lora_rank", "mla")
                  for key in SCHEMAS["mla"]}
        if any(v is None for k, v in values.items() if k != "q_lora_rank"):
            return False
        return MLA(**values)

    # ------------------------------------------------------------------------------ workloads

    def _build_workload(self, decl: ast.Decl) -> Workload | None:
        b = self.block(decl.body, "workload", decl.name)
        arrival_stmt = self.required(b, "arrival", "workload", "workload")
        arrival = self._arrival(arrival_stmt) if arrival_stmt else None
        prompt = self._lengths(b, "prompt")
        output = self._lengths(b, "output")
        requests = self.one_value(b, "requests", "workload", lambda e: self.count(e, "requests", 1, units.REQUESTS))
        duration = self.one_value(b, "duration", "workload", lambda e: self.positive(e, units.TIME, "duration"))
        if b.one("requests") and b.one("duration"):
            self.error("F0311", "give `requests` or `duration`, not both", b.one("duration").key.span,
                       "one of the two", "the simulation stops after the first one anyway")
            return None
        if None in (arrival, prompt, output):
            return None
        return Workload(name=decl.name.text, arrival=arrival, prompt=prompt, output=output, requests=requests,
                        duration=duration, doc=decl.doc, location=self._location(decl))

    def _arrival(self, stmt: ast.Statement) -> Arrival | None:
        usage = "arrival poisson 12 req/s | arrival gamma 12 req/s cv 2 | arrival constant 5 req/s | arrival trace \"FILE\""
        if not stmt.args:
            self.error("F0305", "`arrival` needs a process", stmt.span, "incomplete", f"write `{usage}`")
            return None
        kind = self.word(stmt.args[0], ("poisson", "gamma", "constant", "trace"), "arrival process")
        rest = stmt.args[1:]
        if kind is None:
            return None
        expected = {"poisson": 1, "constant": 1, "gamma": 3, "trace": 1}[kind]
        if len(rest) != expected or (kind == "gamma" and not (isinstance(rest[1], ast.Name) and rest[1].text == "cv")):
            self.error("F0305", f"malformed `arrival {kind}`", stmt.span, "unexpected shape", f"write `{usage}`")
            return None
        if kind == "trace":
            trace_path = self.trace_file(rest[0])
            if trace_path is None:
                return None
            trace = self.traces.get(Path(trace_path))
            return Arrival(kind="trace", trace=trace_path, rate=trace.rate if trace else None)
        rate = self.positive(rest[0], units.REQUEST_RATE, "arrival rate")
        cv = None
        if kind == "gamma":
            cv = self.quantity(rest[2], units.NUMBER)
            if cv is not None and cv <= 0:
                self.error("F0307", "cv must be greater than zero", rest[2].span, "zero")
                cv = None
            if cv is None:
                return None
        if rate is None:
            return None
        return Arrival(kind=kind, rate=rate, cv=None if cv is None else float(cv))

    def trace_file(self, expr: ast.Expr) -> str | None:
        if not isinstance(expr, ast.String):
            self._expected(expr, "a file name in double quotes", 'write `trace "traces/conv.csv"`')
            return None
        base = Path(self.module).parent if not self.module.startswith("<") else Path.cwd()
        path = (base / expr.value).resolve()
        if path not in self.traces:
            if not path.is_file():
                self.traces[path] = None  # reported once, however often it is referenced
                near = [p.name for p in path.parent.iterdir() if p.is_file()] if path.parent.is_dir() else []
                best = did_you_mean(path.name, near)
                self.error("F0208", f"trace file `{expr.value}` not found", expr.span,
                           f"no such file in {display_path(path.parent)}",
                           f'did you mean `"{(Path(expr.value).parent / best).as_posix()}"`?' if best
                           else "paths are relative to the spec file's directory")
                return None
            try:
                self.traces[path] = read_trace(path)
            except TraceError as error:
                self.traces[path] = None
                where = f"line {error.line} of " if error.line else ""
                self.error("F0309", f"malformed trace file `{expr.value}`", expr.span, "cannot be read as a trace",
                           "a trace is CSV with the header TIMESTAMP,ContextTokens,GeneratedTokens "
                           "or arrival_time,prompt_tokens,output_tokens",
                           notes=(f"{where}{path.name}: {error}",))
                return None
        return str(path) if self.traces[path] is not None else None

    def _lengths(self, b: _Block, key: str) -> Lengths | None:
        stmt = self.required(b, key, "workload", "workload")
        if stmt is None:
            return None
        usage = SCHEMAS["workload"][key]
        if not stmt.args:
            self.args(stmt, "workload", 1)
            return None
        head, rest = stmt.args[0], list(stmt.args[1:])
        fields: dict = {}
        if isinstance(head, ast.Name) and head.text == "trace":
            if not rest:
                self.error("F0305", f"`{key} trace` needs a file", stmt.span, "incomplete", f'write `{key} trace "traces/conv.csv"`')
                return None
            path = self.trace_file(rest.pop(0))
            if path is None:
                return None
            fields = {"kind": "trace", "trace": path}
        elif isinstance(head, ast.Call):
            fields = self._distribution(head, key)
        elif isinstance(head, (ast.Quantity, ast.BinOp, ast.Paren, ast.Number)):
            value = self.count(head, f"the {key} length", 1, units.TOKENS)
            fields = {"kind": "fixed", "value": value} if value is not None else None
        else:
            self._expected(head, f"a {key} length distribution", f"write `{usage}`")
            return None
        bounds = self._bounds(rest, stmt, key)
        if fields is None or bounds is None:
            return None
        fields.update(bounds)
        lengths = Lengths(**fields)
        return lengths if self._lengths_consistent(lengths, stmt, key) else None

    def _distribution(self, call: ast.Call, key: str) -> dict | None:
        params = {"uniform": ("min", "max"), "normal": ("mean", "std"), "lognormal": ("median", "sigma")}
        name = call.func.text
        if name not in params:
            self.error("F0306", f"unknown length distribution `{name}`", call.func.span, "not a distribution",
                       suggestion_help(name, [*params, "trace"], "distributions"))
            return None
        expected = params[name]
        usage = {"uniform": "uniform(128 tok, 2048 tok)", "normal": "normal(mean 1024 tok, std 256 tok)",
                 "lognormal": "lognormal(median 1024 tok, sigma 0.6)"}[name]
        if len(call.args) != 2:
            self.error("F0305", f"`{name}` takes {len(expected)} values", call.span, "wrong number of values",
                       f"write `{usage}`")
            return None
        values = {}
        for position, arg in enumerate(call.args):
            label = arg.label.text if arg.label else expected[position]
            if label not in expected:
                self.error("F0306", f"`{name}` has no parameter `{label}`", arg.label.span, "unknown parameter",
                           suggestion_help(label, expected, f"`{name}` parameters"))
                return None
            if label in values:
                self.error("F0311", f"`{label}` is given twice", arg.span, "given again")
                return None
            if label == "sigma":
                sigma = self.quantity(arg.value, units.NUMBER)
                if sigma is not None and sigma <= 0:
                    self.error("F0307", "sigma must be greater than zero", arg.value.span, "zero")
                    return None
                values[label] = sigma
            else:
                values[label] = self.quantity(arg.value, units.TOKENS)
        if any(v is None for v in values.values()):
            return None
        if name == "uniform":
            low, high = values["min"], values["max"]
            if low.denominator != 1 or high.denominator != 1:
                self.error("F0307", "uniform bounds must be whole token counts", call.span, "fractional")
                return None
            return {"kind": "uniform", "low": int(low), "high": int(high)}
        if name == "normal":
            return {"kind": "normal", "mean": float(values["mean"]), "std": float(values["std"])}
        return {"kind": "lognormal", "median": float(values["median"]), "sigma": float(values["sigma"])}

    def _bounds(self, rest: list[ast.Expr], stmt: ast.Statement, key: str) -> dict | None:
        bounds: dict[str, int] = {}
        while rest:
            label = rest.pop(0)
            if not (isinstance(label, ast.Name) and label.text in ("min", "max")):
                self.error("F0305", f"unexpected {_describe(label)} after the `{key}` distribution", label.span,
                           "expected `min` or `max`", f"write `{SCHEMAS['workload'][key]}`")
                return None
            if not rest:
                self.error("F0305", f"`{label.text}` needs a length", label.span, "no value follows",
                           f"write `{label.text} 8192 tok`")
                return None
            value = self.count(rest.pop(0), f"the {key} {label.text}", 1, units.TOKENS)
            if value is None:
                return None
            bounds[label.text] = value
        return bounds

    def _lengths_consistent(self, lengths: Lengths, stmt: ast.Statement, key: str) -> bool:
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
            self.error("F0407", f"inconsistent `{key}` lengths: {problem}", stmt.span, "cannot be satisfied",
                       "fix the bounds so that the distribution has room between them")
            return False
        return True

    # ------------------------------------------------------------------------------ slos

    def _build_slo(self, decl: ast.Decl) -> SLO | None:
        b = self.block(decl.body, "slo", decl.name)
        targets = []
        for metric in SLO_METRICS:
            stmt = b.one(metric)
            if stmt is not None:
                targets.append(self._slo_target(stmt))
        attainment = None
        stmt = b.one("attainment")
        if stmt is not None:
            attainment = self._attainment(stmt)
            if attainment is None:
                return None
        if any(t is None for t in targets):
            return None
        if not targets:
            self.error("F0310", f"slo `{decl.name.text}` sets no limit", decl.name.span, "empty SLO",
                       "add a limit such as `ttft p90 <= 500 ms`")
            return None
        bare = [t for t in targets if t.percentile is None]
        if bare and attainment is None:
            self.error("F0405", f"`{bare[0].metric}` has no percentile and the SLO has no attainment",
                       b.one(bare[0].metric).span, "share of requests unknown",
                       f"write `{bare[0].metric} p90 <= ...` or add `attainment >= 90 %`")
            return None
        return SLO(name=decl.name.text, targets=targets, attainment=attainment, doc=decl.doc,
                   location=self._location(decl))

    def _slo_target(self, stmt: ast.Statement) -> SLOTarget | None:
        usage = SCHEMAS["slo"][stmt.key.text]
        args = list(stmt.args)
        percentile = None
        if args and isinstance(args[0], ast.Name):
            percentile = self._percentile(args.pop(0))
            if percentile is None:
                return None
        if len(args) != 2 or not isinstance(args[0], ast.Operator):
            self.error("F0305", f"malformed `{stmt.key.text}` limit", stmt.span, "expected `METRIC [pNN] <= LIMIT`",
                       f"write `{usage}`")
            return None
        if args[0].op not in ("<=", "<"):
            self.error("F0305", f"a latency limit is an upper bound, not `{args[0].op}`", args[0].span, "wrong comparison",
                       f"write `{usage}`")
            return None
        limit = self.positive(args[1], units.TIME, "a latency limit")
        if limit is None:
            return None
        return SLOTarget(metric=stmt.key.text, percentile=percentile, limit=limit)

    def _percentile(self, name: ast.Name) -> float | None:
        match = re.fullmatch(r"p(\d+(?:\.\d+)?)", name.text)
        if not match:
            self.error("F0305", f"expected a percentile such as `p90`, found `{name.text}`", name.span,
                       "not a percentile", "percentiles are written `p50`, `p90`, `p99`, `p99.9`")
            return None
        value = float(match.group(1))
        if not 0 < value <= 100:
            self.error("F0308", f"percentile {match.group(1)} is outside (0, 100]", name.span, "out of range",
                       "use a percentile above 0 and at most 100, such as `p99`")
            return None
        return value

    def _attainment(self, stmt: ast.Statement) -> float | None:
        if len(stmt.args) != 2 or not isinstance(stmt.args[0], ast.Operator):
            self.error("F0305", "malformed `attainment`", stmt.span, "expected `attainment >= PERCENT`",
                       "write `attainment >= 90 %`")
            return None
        op, expr = stmt.args
        if op.op not in (">=", ">"):
            self.error("F0305", f"attainment is a lower bound, not `{op.op}`", op.span, "wrong comparison",
                       "write `attainment >= 90 %`")
            return None
        if not (isinstance(expr, ast.Quantity) and expr.unit == "%"):
            self.error("F0302", "attainment is a percentage", expr.span, "expected a percentage",
                       "write it with `%`, such as `attainment >= 90 %`")
            return None
        share = self.quantity(expr, units.NUMBER)
        if share is None:
            return None
        if not 0 < share <= 1:
            self.error("F0307", f"attainment {expr.number.text} % is outside (0, 100] %", expr.span, "out of range")
            return None
        return float(share)

    # ------------------------------------------------------------------------------ deployments

    def _build_deploy(self, decl: ast.Decl) -> Deployment | None:
        b = self.block(decl.body, "deploy", decl.name)
        model = self._deploy_model(b)
        cluster = self.one_value(b, "on", "deploy", lambda e: self.ref(e, "cluster"), True, "deployment")
        workload = slo = None
        serve = self.required(b, "serve", "deploy", "deployment")
        if serve is not None:
            a = serve.args
            if len(a) != 3 or not (isinstance(a[1], ast.Name) and a[1].text == "under"):
                self.error("F0305", "malformed `serve`", serve.span, "expected `serve WORKLOAD under SLO`",
                           f"write `{SCHEMAS['deploy']['serve']}`")
            else:
                workload, slo = self.ref(a[0], "workload"), self.ref(a[2], "slo")
        objective = self._objective(b.one("objective"))
        search = {knob: self._search_values(b.one(knob)) for knob in SEARCH_KNOBS if b.one(knob)}
        max_gpus = self.one_value(b, "max_gpus", "deploy", lambda e: self.count(e, "max_gpus"))
        switches = self._switches(b)
        if None in (model, cluster, workload, slo, objective, switches) or None in search.values():
            return None
        return Deployment(name=decl.name.text, model=model, cluster=cluster.name, workload=workload.name,
                          slo=slo.name, objective=objective, search=search, max_gpus=max_gpus,
                          allow_disaggregation=switches["disaggregation"], allow_offload=switches["offload"],
                          doc=decl.doc, location=self._location(decl))

    def _deploy_model(self, b: _Block) -> Model | None:
        stmt = self.required(b, "model", "deploy", "deployment")
        if stmt is None:
            return None
        args = self.args(stmt, "deploy", 1)
        model = self.ref(args[0], "model") if args else None
        if stmt.body is None or model is None:
            return model
        o = self.block(stmt.body, "override", stmt.key)
        changes = {
            "weights": self.one_value(o, "weights", "override", lambda e: self.word(e, DTYPES, "dtype")),
            "kv": self.one_value(o, "kv", "override", lambda e: self.word(e, DTYPES, "dtype")),
            "max_context": self.one_value(o, "max_context", "override",
                                          lambda e: self.count(e, "max_context", 1, units.TOKENS)),
        }
        return model.model_copy(update={k: v for k, v in changes.items() if v is not None})

    def _objective(self, stmt: ast.Statement | None) -> str | None:
        if stmt is None:
            return "max_goodput_per_gpu"
        choices = {("max", "goodput_per_gpu"): "max_goodput_per_gpu", ("min", "gpus"): "min_gpus",
                   ("min", "cost"): "min_cost"}
        words = tuple(a.text if isinstance(a, ast.Name) else "?" for a in stmt.args)
        if words in choices:
            return choices[words]
        written = " ".join(_text(a) for a in stmt.args)
        best = did_you_mean(written, [" ".join(c) for c in choices])
        self.error("F0306", f"unknown objective `{written}`", stmt.span, "not an objective",
                   f"did you mean `objective {best}`?" if best else
                   "objectives are `max goodput_per_gpu`, `min gpus` and `min cost`")
        return None

    def _search_values(self, stmt: ast.Statement) -> list[int] | None:
        knob = stmt.key.text
        dim = units.TOKENS if knob in TOKEN_KNOBS else units.NUMBER
        args = stmt.args
        if len(args) == 1:
            value = self.count(args[0], knob, 1, dim)
            return None if value is None else [value]
        if len(args) == 2 and isinstance(args[0], ast.Name) and args[0].text == "in" and isinstance(args[1], ast.ListExpr):
            if not args[1].items:
                self.error("F0405", f"`{knob}` has no values to choose from", args[1].span, "empty list",
                           f"write `{SCHEMAS['deploy'][knob]}`")
                return None
            values = [self.count(item, knob, 1, dim) for item in args[1].items]
            if None in values:
                return None
            for index, value in enumerate(values):
                if value in values[:index]:
                    self.error("F0405", f"`{knob}` lists {value} twice", args[1].items[index].span, "repeated",
                               "list each value once")
                    return None
            return values
        self.error("F0305", f"malformed `{knob}`", stmt.span, "expected a value or `in [...]`",
                   f"write `{knob} 8` or `{SCHEMAS['deploy'][knob]}`")
        return None

    def _switches(self, b: _Block) -> dict[str, bool] | None:
        state: dict[str, tuple[bool, ast.Expr]] = {}
        ok = True
        for key in ("allow", "forbid"):
            for stmt in b.all(key):
                items = stmt.args[0].items if len(stmt.args) == 1 and isinstance(stmt.args[0], ast.TupleExpr) else stmt.args
                if not items:
                    self.args(stmt, "deploy", 1)
                    ok = False
                for item in items:
                    feature = self.word(item, ("disaggregation", "offload"), "feature")
                    if feature is None:
                        ok = False
                        continue
                    if feature in state and state[feature][0] != (key == "allow"):
                        self.error("F0405", f"`{feature}` is both allowed and forbidden", item.span, "contradiction",
                                   "keep one of `allow` and `forbid`",
                                   related=[Label(state[feature][1].span, "set here")])
                        ok = False
                    state[feature] = (key == "allow", item)
        if not ok:
            return None
        return {feature: state.get(feature, (False, None))[0] for feature in ("disaggregation", "offload")}

    # ------------------------------------------------------------------------------ constraints

    def _deploy_stmt(self, deployment: Deployment, key: str) -> ast.Statement | None:
        decl, _ = self.decls["deploy"][deployment.name]
        return next((s for s in decl.body.statements if s.key.text == key), None)

    def _knob_span(self, deployment: Deployment, knob: str, value: int):
        stmt = self._deploy_stmt(deployment, knob)
        arg = stmt.args[-1]
        items = arg.items if isinstance(arg, ast.ListExpr) else [arg]
        values = deployment.search[knob]
        return items[values.index(value)].span

    def _check_deployment(self, spec: Spec, d: Deployment) -> None:
        m, cluster = d.model, spec.clusters[d.cluster]
        for tp in d.search.get("tp", []):
            kv_ok = m.mla is not None or m.kv_heads % tp == 0 or tp % m.kv_heads == 0
            if m.heads % tp or not kv_ok:
                valid = valid_tp(m)
                self.error("F0401", f"tp {tp} cannot split {m.name}'s {m.heads} attention heads "
                           f"({m.kv_heads} KV heads)", self._knob_span(d, "tp", tp), "uneven split",
                           "tensor parallel degrees for this model: " + ", ".join(map(str, valid)))
        for pp in d.search.get("pp", []):
            if m.layers % pp:
                self.error("F0402", f"pp {pp} cannot split {m.name}'s {m.layers} layers evenly",
                           self._knob_span(d, "pp", pp), "uneven split",
                           "pipeline degrees for this model: " + ", ".join(map(str, _divisors(m.layers))))
        for ep in d.search.get("ep", []):
            if m.moe is None and ep > 1:
                self.error("F0403", f"ep {ep} needs a mixture-of-experts model; {m.name} is dense",
                           self._knob_span(d, "ep", ep), "no experts", "remove `ep` or set it to 1")
            elif m.moe is not None and m.moe.experts % ep:
                self.error("F0403", f"ep {ep} cannot split {m.name}'s {m.moe.experts} experts evenly",
                           self._knob_span(d, "ep", ep), "uneven split",
                           "expert parallel degrees for this model: " + ", ".join(map(str, _divisors(m.moe.experts))))
        largest_domain = max(group.link_domain for group in cluster.nodes)
        for tp in d.search.get("tp", []):
            if tp > largest_domain:
                self.error("F0404", f"tp {tp} is larger than any link domain of cluster `{cluster.name}` "
                           f"({largest_domain} GPUs)", self._knob_span(d, "tp", tp), "does not fit a domain",
                           f"tensor parallelism stays inside one domain: use tp <= {largest_domain}, with pp across nodes")
        if d.max_gpus is not None and d.max_gpus > cluster.total_gpus:
            stmt = self._deploy_stmt(d, "max_gpus")
            self.error("F0405", f"max_gpus {d.max_gpus} is more than cluster `{cluster.name}` has ({cluster.total_gpus})",
                       stmt.args[0].span, "too many", f"use at most {cluster.total_gpus}")
        if d.objective == "min_cost":
            priced = all(group.price is not None or spec.gpus[group.gpu].price is not None for group in cluster.nodes)
            if not priced:
                stmt = self._deploy_stmt(d, "objective")
                self.error("F0409", f"objective `min cost` needs prices, and cluster `{cluster.name}` has none",
                           stmt.span, "no price to minimize", "add `price 98 usd/h` to each node group of the cluster")
        self._check_context(spec, d)

    def _length_bounds(self, workload: Workload) -> list[int | None]:
        """The longest prompt and output the workload can produce (None: unbounded)."""
        bounds = []
        for lengths, column in ((workload.prompt, "prompt"), (workload.output, "output")):
            bound = lengths.upper_bound
            if lengths.kind == "trace" and lengths.max is None:
                trace = self.traces.get(Path(lengths.trace))
                bound = max(getattr(trace, column)) if trace is not None else None
            bounds.append(bound)
        return bounds

    def _longest_request(self, workload: Workload) -> int | None:
        bounds = self._length_bounds(workload)
        return None if None in bounds else sum(bounds)

    def _check_context(self, spec: Spec, d: Deployment) -> None:
        workload = spec.workloads[d.workload]
        longest = self._length_bounds(workload)
        if None in longest or sum(longest) <= d.model.max_context:
            return
        stmt = self._deploy_stmt(d, "serve")
        self.error("F0410", f"workload `{workload.name}` needs up to {sum(longest)} tokens of context, "
                   f"{d.model.name} holds {d.model.max_context}", stmt.args[0].span, "requests too long",
                   "cap the lengths with `max`, e.g. `prompt ... max 8192 tok`, or pick a longer-context model",
                   notes=(f"longest prompt {longest[0]} tok + longest output {longest[1]} tok = {sum(longest)} tok",))

    def _check_capacity(self, spec: Spec) -> None:
        """F05xx: deployments whose weights cannot fit even using every GPU (and host) of the cluster."""
        by_cluster: dict[str, list[Deployment]] = {}
        for d in spec.deployments.values():
            by_cluster.setdefault(d.cluster, []).append(d)
        for cluster_name, deployments in by_cluster.items():
            cluster = spec.clusters[cluster_name]
            hbm = sum(g.count * g.gpus_per_node * spec.gpus[g.gpu].memory for g in cluster.nodes)
            host = sum(g.count * (g.host_memory or 0) for g in cluster.nodes)
            hbm_note = " + ".join(f"{g.count * g.gpus_per_node} x {g.gpu} {_bytes(spec.gpus[g.gpu].memory)}"
                                  for g in cluster.nodes) + f" = {_bytes(hbm)}"
            fits_alone = True
            for d in deployments:
                need = weight_bytes(d.model)
                room = hbm + (host if d.allow_offload else 0)
                if need <= room:
                    continue
                fits_alone = False
                counts = param_counts(d.model)
                stmt = self._deploy_stmt(d, "model")
                smaller = [t for t in ("fp8", "int4") if DTYPE_BYTES[t] < DTYPE_BYTES[d.model.weights]
                           and weight_bytes(d.model.model_copy(update={"weights": t})) <= room]
                offload_fits = not d.allow_offload and need <= hbm + host
                fixes = [f"`weights {smaller[0]}`" if smaller else None, "`allow offload`" if offload_fits else None,
                         "more or larger GPUs"]
                self.error("F0501", f"{d.model.name} cannot fit in cluster `{cluster.name}` at any parallelism",
                           stmt.args[0].span, f"needs {_bytes(need)} of weights",
                           "try " + ", ".join(f for f in fixes if f),
                           notes=(f"weights: {counts.total / 1e9:.2f} B parameters at {d.model.weights} = {_bytes(need)}",
                                  f"GPU memory: {hbm_note}"
                                  + (f"; host memory {_bytes(host)}" if d.allow_offload else "")))
            for d in deployments:
                if weight_bytes(d.model) <= hbm and not d.allow_offload:
                    self._check_instances(spec, d)
            if fits_alone and len(deployments) > 1:
                need = sum(weight_bytes(d.model) for d in deployments)
                room = hbm + (host if all(d.allow_offload for d in deployments) else 0)
                if need > room:
                    first = deployments[0]
                    stmt = self._deploy_stmt(first, "on")
                    self.error("F0502", f"the {len(deployments)} deployments on `{cluster.name}` cannot all fit",
                               stmt.args[0].span, f"together they need {_bytes(need)} of weights",
                               "move a deployment to another cluster, quantize, or add nodes",
                               notes=tuple(f"{d.name}: {d.model.name} at {d.model.weights} = {_bytes(weight_bytes(d.model))}"
                                           for d in deployments) + (f"GPU memory: {hbm_note}",))

    def _check_instances(self, spec: Spec, d: Deployment) -> None:
        """F0503: no allowed instance shape holds the weights; F0504: none holds the KV of the
        longest request."""
        shapes = instance_shapes(spec, d)
        if not shapes:
            return
        stmt = self._deploy_stmt(d, "model")
        fitting = [shape for shape in shapes if shape.budget.fits]
        if not fitting:
            best = max(shapes, key=lambda shape: shape.budget.kv)
            b = best.budget
            self.error("F0503", f"{d.model.name} does not fit on any instance the deployment allows",
                       stmt.args[0].span, "too large per GPU",
                       "allow a larger tp or pp (e.g. `tp in [2, 4, 8]`), quantize the weights, or `allow offload`",
                       notes=(f"the roomiest allowed instance, tp {best.tp} x pp {best.pp} on {best.gpu}: weights "
                              f"{_bytes(b.weights)} + activations {_bytes(b.activations)} + reserve {_bytes(b.reserve)}"
                              f" > {_bytes(b.usable)} usable ({GPU_MEMORY_UTILIZATION:.0%} of {_bytes(b.capacity)})",))
            return
        longest = self._longest_request(spec.workloads[d.workload])
        best = max(fitting, key=lambda shape: shape.budget.kv_tokens)
        b = best.budget
        if longest is not None and longest > b.kv_tokens:
            self.error("F0504", f"a request of up to {longest} tokens cannot fit in the KV cache of any allowed instance",
                       stmt.args[0].span, "KV cache too small",
                       "allow a larger tp or pp, use `kv fp8`, or cap the request lengths with `max`",
                       notes=(f"the largest KV cache, tp {best.tp} x pp {best.pp} on {best.gpu}: {_bytes(b.kv)} per GPU"
                              f" / {b.kv_bytes_per_token:,} B per token = {b.kv_tokens:,} tokens",))

    def _warn_unused(self) -> None:
        """W0201: a definition in a spec given on the command line that no deployment uses."""
        roots = set(self.program.roots)
        has_deploy = {file for _, (_, file) in self.decls["deploy"].items()}
        for kind in ("cluster", "model", "workload", "slo"):
            for name, (decl, file) in self.decls[kind].items():
                if file in roots and file in has_deploy and (kind, name) not in self.used:
                    self.warnings.append(Diagnostic("W0201", f"{KIND_NAMES[kind]} `{name}` is never used",
                                                    decl.name.span, "defined here",
                                                    "remove it, or reference it from a `deploy` block"))


def _plural(counts: tuple[int, ...]) -> str:
    words = " or ".join(str(c) for c in counts)
    return f"{words} value" + ("" if counts == (1,) else "s")


def _bytes(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def _text(expr: ast.Expr) -> str:
    from flowc.compiler.frontend.fmt import format_expr

    return format_expr(expr)


def _module_ref(module: str) -> str:
    if module.startswith("<std>/"):
        return "std." + module[len("<std>/"):-len(".flow")]
    return f'"{module}"'


def check(program: Program) -> tuple[Spec, list[Diagnostic]]:
    """Check a loaded program. Returns the spec and its warnings; raises FlowError on errors."""
    checker = Checker(program)
    return checker.run(), checker.warnings
