"""The `flowc` command line: a thin layer over the Python API.

Exit codes: 0 ok, 1 invalid or infeasible input, 2 usage or I/O error, 3 internal error.
Diagnostics go to stderr (stdout carries the JSON document with --json); color only on a TTY,
never with NO_COLOR or --no-color.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import sys
import time
from pathlib import Path

from flowc import __version__
from flowc.compiler.diagnostics import escape_control  # user text (file names, values) for the terminal

EXIT_OK, EXIT_INVALID, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse exits 2 on usage errors, as we want; keep its text short
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"error: {escape_control(message)}\n")  # the message quotes the bad argument


def _allow_outside(parser: argparse.ArgumentParser) -> None:
    # --allow-outside-imports is the name from before traces were confined too; it stays an alias
    parser.add_argument("--allow-outside", "--allow-outside-imports", dest="allow_outside", action="store_true",
                        help="let the spec read files outside its directory tree (`use` and `trace` paths: "
                             "`../`, absolute, symbolic links out)")


def _build_parser() -> argparse.ArgumentParser:
    from flowc.compiler.spec import ENGINES

    # The global flags are accepted before and after the command; on the commands they default
    # to SUPPRESS so that `flowc --json check` is not undone by the command's own default.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="machine-readable output on stdout")
    common.add_argument("--no-color", action="store_true", default=argparse.SUPPRESS,
                        help="no ANSI colors (also: NO_COLOR=1)")
    parser = _Parser(prog="flowc", description="Compile .flow deployment specs into plans.", parents=[common])
    parser.add_argument("--version", action="version", version=f"flowc {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    check = commands.add_parser("check", parents=[common], help="check specs and report every mistake")
    check.add_argument("files", nargs="+", metavar="FILE")
    _allow_outside(check)

    fmt = commands.add_parser("fmt", parents=[common], help="format specs canonically, in place")
    fmt.add_argument("files", nargs="+", metavar="FILE")
    fmt.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file is not formatted")
    fmt.add_argument("--diff", action="store_true", help="change nothing; print what would change")

    explain = commands.add_parser("explain", parents=[common], help="explain a diagnostic code, e.g. F0302")
    explain.add_argument("code")

    estimate = commands.add_parser("estimate", parents=[common], help="predict one configuration (no search)")
    estimate.add_argument("model", help="a standard library model, e.g. llama-3.1-70b")
    estimate.add_argument("gpu", help="a standard library GPU, e.g. h100-sxm")
    for flag in ("tp", "pp", "ep"):
        estimate.add_argument(f"--{flag}", type=int, default=1)
    estimate.add_argument("--replicas", type=int, help="colocated instances (default 1)")
    estimate.add_argument("--link-domain", type=int, metavar="GPUS",
                          help="GPUs one fast link joins, the most tp may take (default 8: one board)")
    estimate.add_argument("--dtype", default=None, help="weight dtype (bf16, fp8, int4, ...; default: the model's)")
    estimate.add_argument("--kv-dtype", default=None, help="KV-cache dtype (default: the model's)")
    estimate.add_argument("--engine", choices=ENGINES, help="the engine predicted for (default: vllm)")
    estimate.add_argument("--input-len", type=int, required=True, metavar="TOKENS")
    estimate.add_argument("--output-len", type=int, required=True, metavar="TOKENS")
    load = estimate.add_mutually_exclusive_group()
    load.add_argument("--batch", type=int, help="closed loop at this concurrency")
    load.add_argument("--rate", type=float, help="open-loop Poisson arrivals, requests/s")
    estimate.add_argument("--disaggregated", type=int, nargs=2, metavar=("PREFILL", "DECODE"),
                          help="prefill and decode instances instead of colocated replicas")

    compile_ = commands.add_parser("compile", parents=[common], help="compile a spec into a plan")
    compile_.add_argument("file", metavar="FILE")
    compile_.add_argument("-o", "--output", metavar="PLAN.json", help="write the plan as JSON")
    compile_.add_argument("--explain", action="store_true", help="also print the alternatives and why each lost")
    compile_.add_argument("--time-limit", type=float, default=10.0, metavar="SECONDS", help="CP-SAT time limit")
    _allow_outside(compile_)

    simulate = commands.add_parser("simulate", parents=[common], help="simulate every deployment of a spec")
    simulate.add_argument("file", metavar="FILE")
    simulate.add_argument("--goodput", action="store_true", help="also search the highest rate that meets the SLO")
    _allow_outside(simulate)

    verify = commands.add_parser("verify", parents=[common], help="check a plan against its spec")
    verify.add_argument("plan", metavar="PLAN", help="a plan written by `flowc compile -o PLAN.json`")
    verify.add_argument("--against", metavar="SPEC",
                        help="the spec to check against (default: the plan's spec_files[0])")
    _allow_outside(verify)

    from flowc import autotune_cmd, calibrate, export_cmd, launch_cmd, run_cmd, viz_cmd

    run = commands.add_parser("run", parents=[common], help="execute a plan with the flowc runtime")
    run_cmd.add_arguments(run)
    _allow_outside(run)  # the spec of --replay
    viz = commands.add_parser("viz", parents=[common], help="draw a plan: HTML report, Graphviz DOT, Mermaid or a tree")
    viz_cmd.add_arguments(viz)
    _allow_outside(viz)
    export_cmd.add_arguments(commands.add_parser("export", parents=[common],
                                                 help="launch scripts for vLLM or SGLang from a plan"))
    launch_cmd.add_arguments(commands.add_parser("launch", parents=[common],
                                                 help="torchrun scripts, one per node, that run a plan on the "
                                                      "flowc runtime"))
    calibrate.add_arguments(commands.add_parser("calibrate", parents=[common],
                                                help="measure this machine's device into a hardware profile"))
    autotune_cmd.add_arguments(commands.add_parser("autotune", parents=[common],
                                                   help="search a deployment's knobs for its best configuration"))

    commands.add_parser("schema", parents=[common], help="print the JSON Schema of the spec IR")
    commands.add_parser("stdlib", parents=[common], help="list the standard library's GPUs and models")
    return parser


class _Output:
    def __init__(self, args: argparse.Namespace):
        self.json = args.json
        self.color = not args.no_color and not os.environ.get("NO_COLOR") and sys.stderr.isatty()

    def diagnostics(self, diagnostics, sources) -> None:
        from flowc.compiler.diagnostics import render_json, render_text

        if self.json:
            sys.stdout.write(render_json(diagnostics, sources))
        elif diagnostics:
            sys.stderr.write(render_text(diagnostics, sources, color=self.color))

    def write_file(self, path: str, text: str) -> int | None:
        """Write `text` to `path`; the exit code of a usage error when that fails, else None."""
        try:
            Path(path).write_text(text, encoding="utf-8")
        except OSError as error:
            return self.usage_error(f"cannot write `{path}`: {error.strerror or error}")
        return None

    def usage_error(self, message: str, help: str | None = None) -> int:
        if self.json:
            document = {"format_version": "1.0", "valid": False, "error_count": 1, "warning_count": 0,
                        "diagnostics": [{"severity": "error", "code": None, "summary": message, "detail": help or ""}]}
            sys.stdout.write(json.dumps(document, indent=2) + "\n")
        else:
            # the messages echo file names and values
            sys.stderr.write(f"error: {escape_control(message)}\n"
                             + (f"  = help: {escape_control(help)}\n" if help else ""))
        return EXIT_USAGE


def _missing_files(files: list[str], out: _Output) -> int | None:
    for name in files:
        if not Path(name).is_file():
            what = "is a directory" if Path(name).is_dir() else "does not exist"
            return out.usage_error(f"`{name}` {what}", "give the path of a .flow file")
    return None


def _cmd_check(args, out: _Output) -> int:
    from flowc.api import check_sources
    from flowc.compiler.diagnostics import FlowError

    missing = _missing_files(args.files, out)
    if missing is not None:
        return missing
    found, sources, failed = [], {}, 0
    for name in args.files:
        try:
            checked = check_sources(Path(name), allow_outside=args.allow_outside)
            found.extend(checked.warnings)
            sources.update(checked.sources)
        except FlowError as error:
            failed += 1
            found.extend(error.diagnostics)
            sources.update(error.sources)
            continue
        except OSError as error:
            return out.usage_error(f"cannot read `{name}`: {error.strerror or error}")
    out.diagnostics(found, sources)
    if not out.json:
        verdict = f"{failed} of {len(args.files)} failed" if failed else "ok"
        print(f"checked {len(args.files)} file{'s' if len(args.files) != 1 else ''}: {verdict}",
              file=sys.stderr if failed else sys.stdout)
    return EXIT_INVALID if failed else EXIT_OK


def _cmd_fmt(args, out: _Output) -> int:
    from flowc.compiler.diagnostics import FlowError, to_json
    from flowc.compiler.frontend.fmt import format_source
    from flowc.compiler.frontend.parser import MAX_SOURCE_CHARS
    from flowc.compiler.source import SourceFile

    missing = _missing_files(args.files, out)
    if missing is not None:
        return missing
    errors, sources, changed, diffs = [], {}, [], []
    for name in args.files:
        try:
            with open(name, encoding="utf-8") as file:  # one character past the limit is enough to refuse it
                text = file.read(MAX_SOURCE_CHARS + 1)
        except (OSError, UnicodeDecodeError) as error:
            return out.usage_error(f"cannot read `{name}`: {error}")
        try:
            formatted = format_source(SourceFile(name, text))
        except FlowError as error:
            errors.extend(error.diagnostics)
            sources.update(error.sources)
            continue
        if formatted == text:
            continue
        changed.append(name)
        diffs.append("".join(difflib.unified_diff(
            text.splitlines(keepends=True), formatted.splitlines(keepends=True), f"a/{name}", f"b/{name}")))
        if not (args.check or args.diff):
            Path(name).write_text(formatted, encoding="utf-8")
    dry_run = args.check or args.diff
    if out.json:
        document = to_json(errors, sources)
        document["changed" if not dry_run else "unformatted"] = changed
        if args.diff:
            document["diff"] = "".join(diffs)
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
    else:
        out.diagnostics(errors, sources)
        if args.diff:
            sys.stdout.write("".join(diffs))
        for name in changed:
            print(f"{'would reformat' if dry_run else 'formatted'} {escape_control(name)}", file=sys.stderr)
    return EXIT_INVALID if errors or (dry_run and changed) else EXIT_OK


def _cmd_explain(args, out: _Output) -> int:
    from flowc.compiler.diagnostics import did_you_mean, explanation, known_codes

    code = args.code.upper()
    text = explanation(code)
    if text is None:
        best = did_you_mean(code, known_codes())
        return out.usage_error(f"no diagnostic code `{args.code}`",
                               f"did you mean `{best}`?" if best else "codes look like F0302 or W0201")
    if out.json:
        print(json.dumps({"code": code, "explanation": text}, indent=2))
    else:
        sys.stdout.write(text)
    return EXIT_OK


def _cmd_estimate(args, out: _Output) -> int:
    from flowc.api import estimate
    from flowc.compiler.diagnostics import FlowError

    try:
        result = estimate(args.model, args.gpu, tp=args.tp, pp=args.pp, ep=args.ep, replicas=args.replicas,
                          link_domain=args.link_domain, dtype=args.dtype, kv_dtype=args.kv_dtype,
                          input_len=args.input_len, output_len=args.output_len, batch=args.batch, rate=args.rate,
                          disaggregated=tuple(args.disaggregated) if args.disaggregated else None,
                          engine=args.engine)
    except FlowError as error:
        out.diagnostics(error.diagnostics, error.sources)
        return EXIT_INVALID
    if out.json:
        print(result.model_dump_json(indent=2))
        return EXIT_OK
    from flowc.reports import print_estimate

    print_estimate(result)
    return EXIT_OK


def _on_checked_spec(path: str, out: _Output, work, allow_outside: bool):
    """Check the spec at `path`, then run `work(spec)`. Returns (spec, result) or the exit code
    after printing the diagnostics of either step."""
    from flowc.api import check_sources
    from flowc.compiler.diagnostics import FlowError

    missing = _missing_files([path], out)
    if missing is not None:
        return missing
    try:
        spec = check_sources(Path(path), allow_outside=allow_outside).spec
        return spec, work(spec)
    except FlowError as error:
        out.diagnostics(error.diagnostics, error.sources)
        return EXIT_INVALID


def _cmd_compile(args, out: _Output) -> int:
    from flowc.api import compile as compile_checked
    from flowc.progress import progress

    if not (args.time_limit > 0 and math.isfinite(args.time_limit)):
        return out.usage_error(f"--time-limit must be a positive number of seconds (got {args.time_limit})")
    start = time.perf_counter()  # the plan keeps no timings: it is the same on every compile
    with progress("compiling", enabled=not out.json, color=out.color) as bar:
        done = _on_checked_spec(args.file, out,
                                lambda spec: compile_checked(spec, time_limit_s=args.time_limit, on_progress=bar),
                                args.allow_outside)
    if isinstance(done, int):
        return done
    spec, plan = done
    document = plan.model_dump_json(indent=2)
    if args.output and (failed := out.write_file(args.output, document + "\n")) is not None:
        return failed
    if out.json:
        print(document)
        return EXIT_OK
    from flowc.reports import print_plan

    print_plan(plan, spec, explain=args.explain, compile_s=time.perf_counter() - start)
    if args.output:
        print(f"wrote {escape_control(args.output)}")
    return EXIT_OK


def _cmd_simulate(args, out: _Output) -> int:
    from flowc.compiler.model.serving import simulate_spec
    from flowc.progress import progress

    with progress("simulating", enabled=not out.json, color=out.color) as bar:
        done = _on_checked_spec(args.file, out,
                                lambda spec: simulate_spec(spec, with_goodput=args.goodput, on_progress=bar),
                                args.allow_outside)
    if isinstance(done, int):
        return done
    _, reports = done
    if out.json:
        print(json.dumps({name: report.model_dump() for name, report in reports.items()}, indent=2))
        return EXIT_OK
    from flowc.reports import print_simulation

    print_simulation(reports)
    return EXIT_OK


def _cmd_schema(args, out: _Output) -> int:
    from flowc.compiler.spec import Spec

    print(json.dumps(Spec.model_json_schema(), indent=2))
    return EXIT_OK


def _cmd_stdlib(args, out: _Output) -> int:
    from flowc.stdlib_listing import stdlib_listing

    stdlib_listing(as_json=out.json, color=not args.no_color and not os.environ.get("NO_COLOR"))
    return EXIT_OK


COMMANDS = {"check": _cmd_check, "fmt": _cmd_fmt, "explain": _cmd_explain, "estimate": _cmd_estimate,
            "compile": _cmd_compile, "simulate": _cmd_simulate, "schema": _cmd_schema, "stdlib": _cmd_stdlib}
# Commands whose code lives in its own module, imported only when the command runs: name -> module
# holding `cmd_NAME(args, out)`.
LAZY_COMMANDS = {"verify": "flowc.verify_cmd", "run": "flowc.run_cmd", "viz": "flowc.viz_cmd",
                 "export": "flowc.export_cmd", "launch": "flowc.launch_cmd", "calibrate": "flowc.calibrate",
                 "autotune": "flowc.autotune_cmd"}


def _command(name: str):
    if name in COMMANDS:
        return COMMANDS[name]
    import importlib

    return getattr(importlib.import_module(LAZY_COMMANDS[name]), f"cmd_{name}")


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    args.json, args.no_color = getattr(args, "json", False), getattr(args, "no_color", False)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    out = _Output(args)
    try:
        return _command(args.command)(args, out)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK
    except Exception as error:  # a bug in flowc, never the user's fault
        if os.environ.get("FLOWC_DEBUG"):
            raise
        sys.stderr.write(f"internal error: {type(error).__name__}: {escape_control(str(error))}\n"
                         f"  = note: this is a bug in flowc {__version__}, not in your spec; "
                         "please report it with the command you ran\n"
                         "  = help: rerun with FLOWC_DEBUG=1 for the full traceback\n")
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
