"""`flowc viz PLAN`: draw a plan.

  --format html     (default) a self-contained HTML report, written to `-o FILE` (required):
                    the cluster, memory maps, latency CDFs and goodput from simulations, the
                    alternatives, the binding constraints and the spec (compiler/render/html.py);
                    `--autotune RESULTS.json` (from `flowc autotune -o`) adds the Pareto frontier
  --format dot      Graphviz DOT, on stdout or to `-o FILE`
  --format mermaid  a Mermaid flowchart, on stdout or to `-o FILE`
  --format tree     the plan as a tree in the terminal (or plain text to `-o FILE`)

Every format but `tree` needs the plan's spec (`--against SPEC`, default the plan's
spec_files[0]) and checks the plan against it first: a plan whose structure does not match
the spec is refused (exit 1); other findings of the verifier are drawn in the report.
Exit codes: 0 ok, 1 not a plan or a plan that does not match its spec, 2 usage or I/O.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

from flowc.compiler.diagnostics import escape_control

FORMATS = ("html", "dot", "mermaid", "tree")
EXIT_OK, EXIT_INVALID = 0, 1
# The verifier's codes after which a plan cannot be drawn against its spec: unknown names
# (F0520), GPUs outside the cluster (F0521), instances of the wrong size (F0523).
STRUCTURAL = ("F0520", "F0521", "F0523")


def add_arguments(parser) -> None:
    parser.add_argument("plan", metavar="PLAN", help="a plan written by `flowc compile -o PLAN.json`")
    parser.add_argument("--format", choices=FORMATS, default="html", help="what to draw (default: html)")
    parser.add_argument("-o", "--output", metavar="FILE",
                        help="where to write it (required for html; dot, mermaid and tree print on stdout)")
    parser.add_argument("--against", metavar="SPEC", help="the plan's spec (default: the plan's spec_files[0])")
    parser.add_argument("--requests", type=int, metavar="N",
                        help="requests per simulation in the HTML report (default: as many as the plan's predictions)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the report's simulated workload (default 0)")
    parser.add_argument("--autotune", metavar="RESULTS.json",
                        help="add the trials and Pareto frontier of `flowc autotune -o RESULTS.json` (html only)")


def cmd_viz(args, out) -> int:
    from flowc.plan_io import read_plan

    plan_path = Path(args.plan)
    for name, what in ((args.against, "a .flow file"),
                       (args.autotune, "a `flowc autotune -o` result (.json)")):
        if name is not None and not Path(name).is_file():
            state = "is a directory" if Path(name).is_dir() else "does not exist"
            return out.usage_error(f"`{name}` {state}", f"give the path of {what}")
    if args.format == "html" and not args.output:
        return out.usage_error("the HTML report is a file: give `-o FILE.html`",
                               "or print the plan in the terminal with `--format tree`")
    if args.autotune and args.format != "html":
        return out.usage_error("--autotune adds a chart to the HTML report", "leave out --format, or --autotune")
    if args.requests is not None and args.requests < 1:
        return out.usage_error(f"--requests must be at least 1 (got {args.requests})")
    plan = read_plan(args.plan, out)
    if isinstance(plan, int):
        return plan
    if args.format == "tree":
        return _tree(plan, args, out)
    loaded = _checked_spec(plan, plan_path, args, out)
    if isinstance(loaded, int):
        return loaded
    spec, sources, findings = loaded
    if args.format == "html":
        return _html(plan, spec, sources, findings, args, out)
    from flowc.compiler.render import diagram as render

    draw = render.to_dot if args.format == "dot" else render.to_mermaid
    return _write_text(draw(plan, spec), args, out)


def _checked_spec(plan, plan_path: Path, args, out):
    """(spec, sources, verifier findings) or the exit code, after printing why."""
    from flowc.compiler.verify import verify_plan
    from flowc.plan_io import read_spec

    checked = read_spec(plan, str(plan_path), args.against, out, why="drawing the plan needs its spec",
                        allow_outside=args.allow_outside)
    if isinstance(checked, int):
        return checked
    findings = [d for d in verify_plan(plan, checked.spec) if d.severity == "error"]
    if any(d.code in STRUCTURAL for d in findings):
        out.diagnostics(findings, checked.sources)
        if not out.json:
            print(f"error: `{escape_control(str(plan_path))}` does not match its spec", file=sys.stderr)
        return EXIT_INVALID
    sources = {name: source.text for name, source in checked.sources.items()}
    return checked.spec, sources, findings


def _autotune_document(path: str, out):
    """The autotune result at `path` as a JSON document, or the exit code after saying why not."""
    from pydantic import ValidationError

    from flowc.autotune import AutotuneResult

    try:
        return AutotuneResult.from_json(Path(path).read_text(encoding="utf-8")).to_dict()
    except (OSError, UnicodeDecodeError) as error:
        return out.usage_error(f"cannot read `{path}`: {getattr(error, 'strerror', None) or error}")
    except ValidationError:
        return out.usage_error(f"`{path}` is not a flowc autotune result",
                               "write one with `flowc autotune SPEC -o FILE`")


def _html(plan, spec, sources, findings, args, out) -> int:
    try:
        from flowc.compiler.render.html import render_report
    except ModuleNotFoundError as error:
        if not (error.name or "").startswith("matplotlib"):
            raise
        return out.usage_error("the HTML report needs matplotlib", 'install it with `pip install "flowc[viz]"`')
    from flowc.progress import progress

    autotune = _autotune_document(args.autotune, out) if args.autotune else None
    if isinstance(autotune, int):
        return autotune
    with progress("simulating", enabled=not out.json, color=out.color) as bar:
        document = render_report(plan, spec, requests=args.requests, seed=args.seed, sources=sources,
                                 diagnostics=findings, on_progress=bar, autotune=autotune)
    if (failed := out.write_file(args.output, document)) is not None:
        return failed
    if out.json:
        print(json.dumps({"format": "html", "output": args.output,
                          "verifier": [{"code": d.code, "message": d.message} for d in findings]}, indent=2))
        return EXIT_OK
    for d in findings:
        print(f"warning: the plan does not verify: {d.code} {escape_control(d.message)} (listed in the report)",
              file=sys.stderr)
    print(f"wrote {escape_control(args.output)}")
    return EXIT_OK


def _tree(plan, args, out) -> int:
    from rich.console import Console

    from flowc.compiler.render.diagram import plan_tree

    tree = plan_tree(plan)
    if not args.output and not out.json:
        from flowc.console import make_console

        make_console(color=out.color).print(tree)
        return EXIT_OK
    buffer = io.StringIO()
    Console(file=buffer, no_color=True, highlight=False, width=120).print(tree)
    return _write_text(buffer.getvalue(), args, out)


def _write_text(text: str, args, out) -> int:
    """DOT, Mermaid or tree text to -o FILE, or on stdout (inside the JSON document with --json)."""
    if args.output and (failed := out.write_file(args.output, text)) is not None:
        return failed
    if out.json:
        document = {"format": args.format, "output": args.output}
        if not args.output:
            document["text"] = text
        print(json.dumps(document, indent=2))
    elif args.output:
        print(f"wrote {escape_control(args.output)}")
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return EXIT_OK
