"""`flowc export PLAN --target vllm|sglang`: launch scripts for a serving engine from a plan.

One bash script per engine instance (DEPLOYMENT/gGROUP-ROLE-INSTANCE.sh; one per node,
`-nodeK.sh`, for an instance that spans nodes), a prefill/decode router script per
disaggregated deployment (DEPLOYMENT/router.sh) and, with --k8s, a Kubernetes manifest
(kubernetes.yaml): a Deployment per instance placed on the node labelled flowc.dev/node="<node
index>", a LeaderWorkerSet per multi-node instance, and for SGLang's router a Service per
instance and the router's Deployment. Written under `-o DIR`, else printed on stdout between
`==> PATH <==` lines; --json prints a JSON list of {path, content}. The mapping lives in
compiler/render/export.py, the engines' flag lists in compiler/render/engines/.

A plan may come from anyone: export.py quotes every value it writes and names files from slugs,
and `-o` writes nothing unless every file lands inside DIR once the symbolic links already there
are followed (a link to elsewhere is refused, exit 2).

Exit codes: 0 ok, 1 not a plan or a plan the engine version cannot run (every reason is named;
--allow-degrade turns the droppable ones into `# DEGRADED` comments and warnings), 2 usage or
I/O (an unknown --version lists the known ones).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from flowc.compiler.diagnostics import escape_control

EXIT_OK, EXIT_INVALID = 0, 1


def add_arguments(parser) -> None:
    parser.add_argument("plan", metavar="PLAN", help="a plan written by `flowc compile -o PLAN.json`")
    # compiler/render/export.py's TARGETS, not imported here: every command builds this parser
    parser.add_argument("--target", required=True, choices=("vllm", "sglang"), help="the serving engine")
    parser.add_argument("--version", dest="engine_version", metavar="X",
                        help="the engine's version (default: the newest flowc knows)")
    parser.add_argument("--k8s", action="store_true", help="also write a Kubernetes manifest (kubernetes.yaml)")
    parser.add_argument("-o", "--output", metavar="DIR", help="write the files under DIR (default: print them)")
    parser.add_argument("--model-path", action="append", default=[], metavar="[MODEL=]PATH",
                        help="the checkpoint (directory or Hugging Face repo id) to serve for MODEL, or for the "
                             "plan's only model (default: the repo the standard library names)")
    parser.add_argument("--allow-degrade", action="store_true",
                        help="drop what the engine cannot run as planned, with a comment in the script, "
                             "instead of refusing")


def cmd_export(args, out) -> int:
    from flowc.compiler.render.export import ExportError, UnknownVersion, export_plan
    from flowc.plan_io import read_plan

    plan = read_plan(args.plan, out)
    if isinstance(plan, int):
        return plan
    model_paths = _model_paths(args.model_path, {d.model for d in plan.deployments})
    if isinstance(model_paths, str):
        return out.usage_error(model_paths, "give `--model-path PATH` for a plan of one model, else "
                               "`--model-path MODEL=PATH` for each model")
    try:
        export = export_plan(plan, target=args.target, version=args.engine_version, k8s=args.k8s,
                             model_paths=model_paths, allow_degrade=args.allow_degrade, plan_name=args.plan)
    except UnknownVersion as error:
        known = ", ".join(f"{v} (default)" if k == 0 else v for k, v in enumerate(error.known))
        return out.usage_error(str(error), f"known {args.target} versions: {known}")
    except ExportError as error:
        return _refuse(error.problems, out)
    for warning in export.warnings:
        print(f"warning: {escape_control(warning)}", file=sys.stderr)
    failed = emit_files(export.files, args.output, out)
    return EXIT_OK if failed is None else failed


def emit_files(files: list[tuple[str, str]], output: str | None, out) -> int | None:
    """Write `files` under `output` (`write_files`), or print them; then --json's list or a line
    saying what was written. The usage error's exit code when a file would leave `output`."""
    if output:
        failed = write_files(files, Path(output))
        if failed is not None:
            return out.usage_error(*failed)
    if out.json:
        print(json.dumps([{"path": path, "content": content} for path, content in files], indent=2))
    elif output:
        print(f"wrote {len(files)} files under {escape_control(output)}")
    else:
        sys.stdout.write("\n".join(f"==> {path} <==\n{content}" for path, content in files))
    return None


def _model_paths(given: list[str], models: set[str]) -> dict[str, str] | str:
    """{model: path} from `MODEL=PATH` and `PATH` (key "*": the plan's only model), or the
    usage error's message."""
    paths = {}
    served = ", ".join(sorted(models))
    for entry in given:
        model, sep, path = entry.partition("=")
        if sep and model not in models:
            return f"`--model-path {entry}`: the plan has no model `{model}` (it serves {served})"
        if not sep and len(models) > 1:
            return f"`--model-path {entry}` names no model, and the plan serves several ({served})"
        paths[model if sep else "*"] = path if sep else entry
    return paths


def write_files(files: list[tuple[str, str]], root: Path) -> tuple[str, str | None] | None:
    """Write the files under `root` (scripts executable), or none of them when one would land
    outside it; the error's message and help on failure."""
    shown = escape_control(str(root))
    try:
        inside = root.resolve()
        for path, _ in files:
            # resolve() follows the links already there: a link inside DIR must not lead out of it
            landing = (root / path).resolve()
            if Path(path).is_absolute() or not landing.is_relative_to(inside):
                return (f"`{escape_control(path)}` would be written at `{escape_control(str(landing))}`, outside "
                        f"`{shown}`; nothing was written",
                        f"remove the symbolic link under `{shown}` that leads out of it, or give another -o DIR")
        for path, content in files:
            target = root / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content, encoding="utf-8")
            if path.endswith(".sh"):
                target.chmod(0o755)
    except RuntimeError:  # resolve() on a loop of symbolic links (OSError from Python 3.13)
        return f"cannot write under `{shown}`: a loop of symbolic links", "remove the loop, or give another -o DIR"
    except OSError as error:
        return f"cannot write under `{shown}`: {escape_control(error.strerror or str(error))}", None
    return None


def _refuse(problems, out) -> int:
    """Every refused problem, shaped like a diagnostic (no code: they are about the engine)."""
    def note(p) -> str:
        return "--allow-degrade drops it with a comment in the script" if p.degradable else ""

    if out.json:
        document = {"format_version": "1.0", "valid": False, "error_count": len(problems), "warning_count": 0,
                    "diagnostics": [{"severity": "error", "code": None, "summary": p.message,
                                     "detail": p.help, "notes": [note(p)] if note(p) else []} for p in problems]}
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
        return EXIT_INVALID
    for p in problems:
        sys.stderr.write(f"error: {escape_control(p.message)}\n" + (f"  = note: {note(p)}\n" if note(p) else "")
                         + f"  = help: {p.help}\n")
    return EXIT_INVALID
