"""Fuzz the front end: `flowc check` and `flowc fmt` must answer every input with diagnostics.

    python tools/fuzz_frontend.py --inputs 100000 --seed 1 --save fuzz-failures

Three generators make the inputs: `grammar` (random specs from the language's productions and
vocabulary), `mutation` (byte-level mutations of examples/*.flow and stdlib/*.flow) and
`extreme` (deep nesting, huge argument lists, strings and numbers, long lines, many
declarations, inputs at and just past each front-end limit). Each input is written to a file and
goes through what the two commands run, in process: `check_sources` on the file with its
diagnostics rendered as text and JSON, and `format_source` on the file's text.

A failure is any of: an exception other than FlowError escaping (the CLI's exit 3; an OSError
would be its exit 2, wrongly blaming the spec file), fmt output that fmt changes again, fmt
dropping a comment, fmt rejecting text that parses, or formatted text that checks differently
from the original (another Spec IR, or other error codes). Failing inputs are saved to --save
with a note of what failed. Exit status: 0 without failures, 1 with.
"""

from __future__ import annotations

import argparse
import collections
import random
import resource
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from flowc.api import check_sources
from flowc.compiler.diagnostics import FlowError, render_text, to_json
from flowc.compiler.frontend import parser
from flowc.compiler.frontend.check.vocabulary import KINDS, SCHEMAS
from flowc.compiler.frontend.fmt import format_module
from flowc.compiler.source import SourceFile
from flowc.compiler.units import UNITS

REPO = Path(__file__).resolve().parents[1]
GENERATORS = ("grammar", "mutation", "extreme")
WEIGHTS = (9, 9, 2)  # extremes are few in kind and large: fewer of them
SPEC_NAME = "spec.flow"


# ---------------------------------------------------------------------------------- running one input

@dataclass
class Outcome:
    check_exit: int  # what `flowc check` would exit with: 0, 1 or 3 (an exception escaped)
    fmt_exit: int  # what `flowc fmt` would exit with: 0, 1, 2 (not UTF-8) or 3
    failure: str | None = None  # what went wrong, with the traceback


def _without_locations(data):
    if isinstance(data, dict):
        return {k: _without_locations(v) for k, v in data.items() if k != "location"}
    if isinstance(data, list):
        return [_without_locations(v) for v in data]
    return data


def _check(path: Path) -> tuple[int, dict | None, list[str]]:
    """`flowc check` in process: (exit code, the Spec IR without locations, error codes).
    Exceptions other than FlowError propagate: they are the failures."""
    try:
        checked = check_sources(path)
    except FlowError as error:
        render_text(error.diagnostics, error.sources)
        to_json(error.diagnostics, error.sources)
        return 1, None, sorted(error.codes)
    render_text(checked.warnings, checked.sources)
    to_json(checked.warnings, checked.sources)
    return 0, _without_locations(checked.spec.model_dump()), []


def run_input(data: bytes, workdir: Path) -> Outcome:
    """Check and format one input as `flowc check` and `flowc fmt` would, in `workdir`."""
    path = workdir / SPEC_NAME
    path.write_bytes(data)
    try:
        check_exit, spec, codes = _check(path)
    except Exception:  # any exception is what we are looking for
        return Outcome(3, 3, "check raised\n" + traceback.format_exc())
    try:
        text = path.read_text(encoding="utf-8")  # as `flowc fmt` reads it, newlines translated
    except UnicodeDecodeError:
        return Outcome(check_exit, 2)  # `flowc fmt` cannot read it: a usage error, not a crash
    try:
        return Outcome(check_exit, *_fmt_failure(text, path, check_exit, spec, codes))
    except Exception:  # likewise
        return Outcome(check_exit, 3, "fmt raised\n" + traceback.format_exc())


def _fmt_failure(text: str, path: Path, check_exit: int, spec, codes) -> tuple[int, str | None]:
    """(fmt's exit code, what failed or None) for text that `flowc check` answered with check_exit."""
    source = SourceFile(SPEC_NAME, text)
    try:
        module = parser.parse(source)
    except FlowError as error:
        if check_exit == 0:
            return 1, f"fmt rejects a spec that checks clean: {error.codes}"
        return 1, None
    formatted = format_module(source, module)
    formatted_source = SourceFile(SPEC_NAME, formatted)
    formatted_module = parser.parse(formatted_source)
    if format_module(formatted_source, formatted_module) != formatted:
        return 0, "fmt is not idempotent"
    if sorted(c.text for c in formatted_module.comments) != sorted(c.text for c in module.comments):
        return 0, "fmt changed the comments"
    if formatted == text:
        return 0, None
    path.write_text(formatted, encoding="utf-8")
    after_exit, after_spec, after_codes = _check(path)
    if (after_exit, after_spec, after_codes) != (check_exit, spec, codes):
        return 0, (f"fmt changes the meaning: check exit {check_exit} -> {after_exit}, "
                   f"codes {codes} -> {after_codes}, same spec: {after_spec == spec}\n--- formatted:\n{formatted}")
    return 0, None


def make_workdir() -> Path:
    """A directory for the input, with a module and a trace that inputs may refer to."""
    workdir = Path(tempfile.mkdtemp(prefix="flowc-fuzz-"))
    (workdir / "common.flow").write_text("use std.links\ngpu shared-gpu {\n  memory 80 GiB\n}\n", encoding="utf-8")
    shutil.copytree(REPO / "examples" / "traces", workdir / "traces")
    return workdir


# ---------------------------------------------------------------------------------- grammar-aware inputs

WORDS = ("x", "in", "under", "max", "min", "p90", "p99.9", "true", "false", "bf16", "fp8", "nvidia", "llama",
         "poisson", "gamma", "trace", "goodput_per_gpu", "gpus", "cost", "disaggregation", "offload",
         "h100-sxm", "llama-3.1-8b", "llama-3.1-70b", "nvlink4", "pcie5", "ib-ndr", "chat", "median", "sigma",
         "mean", "std", "step", "layer", "gated", "e5", "E1x", "_k")
FUNCTIONS = ("lognormal", "normal", "uniform", "fixed", "empirical", "f")
NUMBERS = ("0", "1", "2", "8", "16", "80", "989", "0.6", ".5", "1_000", "1e3", "1.5e-3", "1E+2", "007", "131072",
           "1e100", "1e101", "1e-101", "3.35")
UNIT_NAMES = tuple(UNITS) + ("G", "Gbps", "foo")
STRINGS = ('""', '"traces/azure_code_sample.csv"', '"common.flow"', '"missing.flow"', '"a b"', '"x\\"y"',
           '"#not a comment"', '"{[(;"', '"../outside.flow"', '"traces"')
COMMENTS = ("#", "# c", "## doc", "### h", "#x { y }", '# "q"', "#\t tab", "# trailing   ")
SPACES = (" ", " ", " ", "  ", "\t", "\x0c")
STD_MODULES = ("std.gpus", "std.links", "std.models", "std.slos", "std.cpu_local", "std.nope", "gpus")


class GrammarGen:
    """Random text from the grammar's productions, with the checker's real vocabulary most of the
    time so that inputs get past name resolution into the block builders and constraints."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def pick(self, options):
        return self.rng.choice(options)

    def sp(self) -> str:
        return self.pick(SPACES)

    def atom(self, depth: int) -> str:
        kind = self.rng.randrange(9 if depth < 3 else 5)
        if kind == 0:
            return self.pick(NUMBERS)
        if kind in (1, 2):
            return self.pick(NUMBERS) + self.pick(("", " ", " ", "  ")) + self.pick(UNIT_NAMES)
        if kind == 3:
            return self.pick(WORDS)
        if kind == 4:
            return self.pick(STRINGS)
        if kind == 5:
            items = [self.expr(depth + 1) for _ in range(self.rng.randrange(4))]
            sep = "," + self.pick((" ", "", "\n  ", " # in a list\n"))
            return "[" + sep.join(items) + self.pick(("", "", ",")) * bool(items) + "]"
        if kind in (6, 7):
            args = [(self.pick(WORDS) + " " if self.rng.random() < 0.5 else "") + self.expr(depth + 1)
                    for _ in range(self.rng.randrange(4))]
            return self.pick(FUNCTIONS) + "(" + ("," + self.pick((" ", "", "\n"))).join(args) + ")"
        return "(" + self.expr(depth + 1) + ")"

    def expr(self, depth: int = 0) -> str:
        text = self.atom(depth)
        while self.rng.random() < 0.25:
            text += self.sp() + self.pick("+-*/") + self.sp() + self.atom(depth)
        return text

    def argument(self) -> str:
        roll = self.rng.random()
        if roll < 0.1:
            return self.pick(("<=", ">=", "==", "<", ">"))
        if roll < 0.2:
            return ", ".join(self.expr() for _ in range(self.rng.randrange(2, 4)))
        return self.expr()

    def statement(self, schema: str, depth: int) -> str:
        vocabulary = SCHEMAS.get(schema, {})
        if vocabulary and self.rng.random() < 0.5:  # a real statement, sometimes with a changed value
            text = self.pick(tuple(vocabulary.values()))
            if self.rng.random() < 0.3:
                words = text.split(" ")
                words[self.rng.randrange(1, len(words)) if len(words) > 1 else 0] = self.argument()
                text = " ".join(words)
            return text
        key = self.pick(tuple(vocabulary)) if vocabulary and self.rng.random() < 0.8 else self.pick(WORDS)
        args: list[str] = []
        for _ in range(self.rng.randrange(4)):
            arg = self.argument()
            if args and args[-1][-1].isdigit() and (arg[0].isalpha() or arg[0] in "_%"):
                continue  # `5 abc` would lex as the quantity `5 abc`
            args.append(arg)
        text = " ".join([key, *args])
        if depth < 2 and self.rng.random() < 0.15:
            nested = {"node": "node", "moe": "moe", "mla": "mla", "model": "override"}.get(key, key)
            text += " " + self.body(nested, depth + 1)
        return text

    def separator(self) -> str:
        return "".join(self.pick((";", " ;", "\n", "\n", "\n\n", "  " + self.pick(COMMENTS) + "\n"))
                       for _ in range(self.rng.randrange(1, 3)))

    def body(self, schema: str, depth: int) -> str:
        statements = [self.statement(schema, depth) for _ in range(self.rng.randrange(6))]
        if not statements:
            return "{}"
        inner = "".join(s + self.separator() for s in statements)
        return "{" + self.pick((" ", "\n", "\n  ", "  # opening\n")) + inner + "}"

    def declaration(self) -> str:
        kind = self.pick(KINDS) if self.rng.random() < 0.9 else self.pick(WORDS)
        name = self.pick(("g", "c", "m", "w", "s", "d", "lab", "chat", "llama-3.1-8b", "h100-sxm"))
        doc = "## " + self.pick(WORDS) + "\n" if self.rng.random() < 0.2 else ""
        return doc + f"{kind}{self.sp()}{name}{self.sp()}" + self.body(kind, 0)

    def spec(self) -> str:
        items = [f"use {self.pick(STD_MODULES + STRINGS)}" for _ in range(self.rng.randrange(3))]
        items += [self.declaration() for _ in range(self.rng.randrange(1, 7))]
        return "".join(item + self.separator() for item in items)


# ---------------------------------------------------------------------------------- byte mutations

def corpus() -> list[bytes]:
    files = sorted((REPO / "examples").glob("*.flow")) + sorted((REPO / "stdlib").glob("*.flow"))
    return [path.read_bytes() for path in files]


INSERTS = (b"\x00", b"\t", b"\r", b"\x0b", b"\x0c", b"\x7f", b"\xff", b"\xc3", "\u00b5".encode(), "\u2028".encode(),
           "\U0001f600".encode(), "\u0661".encode(), b"{", b"}", b"[", b"]", b"(", b")", b"f(", b'"', b"#", b";",
           b",", b"+", b"\n", b"##", b"use ", b"e", b"_", b".", b"9" * 40, b"\\")


def mutate(rng: random.Random, texts: list[bytes]) -> bytes:
    data = bytearray(rng.choice(texts))
    for _ in range(rng.randrange(1, 5)):
        at = rng.randrange(len(data) + 1)
        op = rng.randrange(8)
        if op == 0 and data:  # flip a bit
            at = min(at, len(data) - 1)
            data[at] ^= 1 << rng.randrange(8)
        elif op == 1:  # insert a random byte
            data[at:at] = bytes([rng.randrange(256)])
        elif op == 2:  # delete a range
            del data[at:at + rng.randrange(1, 40)]
        elif op == 3:  # splice in a piece of another file
            other = rng.choice(texts)
            start = rng.randrange(len(other))
            data[at:at] = other[start:start + rng.randrange(1, 200)]
        elif op == 4:  # duplicate lines
            lines = bytes(data).split(b"\n")
            i = rng.randrange(len(lines))
            data = bytearray(b"\n".join(lines[:i + 1] + lines[i:i + rng.randrange(1, 4)] + lines[i + 1:]))
        elif op == 5:  # insert unicode, control characters, NUL or syntax
            data[at:at] = rng.choice(INSERTS)
        elif op == 6:  # truncate
            del data[at:]
        else:  # swap two lines
            lines = bytes(data).split(b"\n")
            i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
            data = bytearray(b"\n".join(lines))
    return bytes(data)


# ---------------------------------------------------------------------------------- structural extremes

def _in_workload(expr: str) -> str:
    return f"workload w {{\n  arrival poisson 1 req/s\n  prompt {expr}\n  output 10 tok\n}}\n"


def _size(rng: random.Random, limit: int, far: int) -> int:
    """Just below, at or just past a limit; sometimes far past it (such inputs are large, so rarely)."""
    return far if rng.random() < 0.1 else rng.choice((limit - 1, limit, limit + 1))


def extreme(rng: random.Random) -> bytes:
    """An input at or past a limit of the front end, or far past it."""
    depth = _size(rng, parser.MAX_DEPTH, 10_000)
    items = _size(rng, parser.MAX_ITEMS, 100_000)
    chars = rng.choice((300, _size(rng, parser.MAX_TOKEN_CHARS, 100_000)))
    kind = rng.randrange(16)
    if kind == 0:  # nested lists, groups, calls, sums, products, bodies
        return _in_workload("[" * depth + "1" + "]" * depth).encode()
    if kind == 1:
        return _in_workload("(" * depth + "1 tok" + ")" * depth).encode()
    if kind == 2:
        return _in_workload("f(" * depth + ")" * depth).encode()
    if kind == 3:
        return _in_workload(" + ".join(["1 tok"] * depth)).encode()
    if kind == 4:
        return _in_workload(" * ".join(["2"] * depth) + " tok").encode()
    if kind == 5:
        return ("cluster c {" + " node x 1 {" * depth + "}" * depth + " }\n").encode()
    if kind == 6:  # long argument lists of calls, lists, tuples and statements
        return _in_workload("uniform(" + ", ".join(["1 tok"] * items) + ")").encode()
    if kind == 7:
        text = "deploy d {\n  tp in [" + ", ".join(str(i + 1) for i in range(items)) + "]\n}\n"
        return text.encode()
    if kind == 8:
        return ("deploy d {\n  allow " + ", ".join(["offload"] * items) + "\n}\n").encode()
    if kind == 9:  # huge strings and names, where the checker takes them as file and module names
        value = rng.choice(("a" * chars, "a/" * (chars // 2), "\\\"" * (chars // 2), "a\0b"))
        template = rng.choice(('use "{}"\n', "use std.{}\n", "workload w {{\n  arrival trace \"{}\"\n}}\n",
                               "cluster c {{\n  node x 1 {{ gpu {} x 1 }}\n}}\n"))
        return template.format(value).encode()
    if kind == 10:  # huge and tiny numbers
        number = rng.choice(("1e400", "1e-400", "1e99999999999", "9" * chars, "0." + "0" * chars + "1",
                             "1" + "_0" * (chars // 2), "1e" + "9" * chars))
        return f"use std.models\nmodel m {{\n  layers {number}\n  hidden {number} tok\n}}\n".encode()
    if kind == 11:  # very long lines: a comment, a statement
        return (_in_workload("10 tok") + "#" + "x" * _size(rng, chars, 1_000_000) + "\n").encode()
    if kind == 12:  # a statement with very many arguments
        return ("gpu g {\n  memory" + " 1" * items + "\n}\n").encode()
    if kind == 13:  # many declarations, many errors (rarely many: a full parse of them is slow)
        count = 10_000 if rng.random() < 0.05 else rng.choice((100, 1_000))
        decl = rng.choice(("gpu g{} {{ memory 80 GiB }}\n", "gpuu g{} {{}}\n", "use std.nope{}\n",
                           'use "missing{}.flow"\n', "model m{} {{ layers 1e400 }}\n"))
        return "".join(decl.format(i) for i in range(count)).encode()
    if kind == 14:  # a file just past the size limit
        line = "# " + "x" * 77 + "\n"
        return (line * (parser.MAX_SOURCE_CHARS // len(line) + 1)).encode()
    return b"\n" * _size(rng, 100_000, 1_000_000)  # many empty lines


# ---------------------------------------------------------------------------------- the run

@dataclass
class Report:
    tried: collections.Counter = field(default_factory=collections.Counter)  # by generator
    exits: collections.Counter = field(default_factory=collections.Counter)  # (command, exit code)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (generator, what failed)
    seconds: float = 0.0
    slowest: tuple[float, str] = (0.0, "")  # (seconds, generator)

    @property
    def rate(self) -> float:
        return sum(self.tried.values()) / self.seconds if self.seconds else 0.0


def generate(rng: random.Random, kind: str, texts: list[bytes]) -> bytes:
    if kind == "grammar":
        return GrammarGen(rng).spec().encode()
    if kind == "mutation":
        return mutate(rng, texts)
    return extreme(rng)


def fuzz(inputs: int, seed: int, save: Path | None = None, kinds: tuple[str, ...] = GENERATORS,
         on_progress=None) -> Report:
    """Run `inputs` generated inputs; input i uses random.Random(f"{seed}:{i}"), so a run is
    reproducible and one input can be regenerated alone."""
    texts, report, workdir = corpus(), Report(), make_workdir()
    weights = [WEIGHTS[GENERATORS.index(k)] for k in kinds]
    start = time.perf_counter()
    try:
        for index in range(inputs):
            rng = random.Random(f"{seed}:{index}")
            kind = rng.choices(kinds, weights)[0]
            data = generate(rng, kind, texts)
            began = time.perf_counter()
            outcome = run_input(data, workdir)
            took = time.perf_counter() - began
            report.slowest = max(report.slowest, (took, f"{kind} input {index}"))
            report.tried[kind] += 1
            report.exits["check", outcome.check_exit] += 1
            report.exits["fmt", outcome.fmt_exit] += 1
            if outcome.failure:
                report.failures.append((f"{kind} input {index}", outcome.failure))
                if save:
                    _save(save, f"{kind}-{index}", data, outcome.failure)
            report.seconds = time.perf_counter() - start
            if on_progress:
                on_progress(index + 1, report)
    finally:
        report.seconds = time.perf_counter() - start
        shutil.rmtree(workdir, ignore_errors=True)
    return report


def _save(directory: Path, name: str, data: bytes, failure: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.flow").write_bytes(data)
    (directory / f"{name}.txt").write_text(failure, encoding="utf-8")


def summary(report: Report) -> str:
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    lines = [f"inputs tried: {sum(report.tried.values())} "
             f"({', '.join(f'{kind} {report.tried[kind]}' for kind in GENERATORS if kind in report.tried)})"]
    for command in ("check", "fmt"):
        codes = sorted((code, n) for (cmd, code), n in report.exits.items() if cmd == command)
        lines.append(f"flowc {command} exit codes: " + ", ".join(f"{code}: {n}" for code, n in codes))
    lines.append(f"failures: {len(report.failures)}")
    lines.extend(f"  {where}: {what.splitlines()[0]}" for where, what in report.failures[:20])
    lines.append(f"inputs/s: {report.rate:.1f} ({report.seconds:.1f} s); slowest input {report.slowest[0]:.2f} s "
                 f"({report.slowest[1]})")
    lines.append(f"peak RSS: {peak_mib:.0f} MiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--inputs", type=int, default=1000, help="how many inputs to try (default 1000)")
    cli.add_argument("--seed", type=int, default=0)
    cli.add_argument("--kinds", default=",".join(GENERATORS), help="generators to use, comma-separated")
    cli.add_argument("--save", type=Path, metavar="DIR", help="write each failing input and its failure here")
    args = cli.parse_args(argv)
    kinds = tuple(args.kinds.split(","))
    if not set(kinds) <= set(GENERATORS):
        cli.error(f"--kinds takes {', '.join(GENERATORS)}")

    def progress(done: int, report: Report) -> None:
        if done % 1000 == 0:
            print(f"  {done} inputs, {len(report.failures)} failures, {report.rate:.0f}/s", file=sys.stderr)

    report = fuzz(args.inputs, args.seed, args.save, kinds, on_progress=progress)
    print(summary(report))
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
