"""`flowc launch PLAN`: torchrun scripts that run a plan's instances on the flowc runtime, one
per node of each instance (compiler/render/launch.py), so an instance spanning nodes runs on a
real cluster; with `--k8s --image IMAGE`, also a Kubernetes manifest (a LeaderWorkerSet per
instance, the plan in a ConfigMap; `--run-args '--replay'` are the pods' `flowc run`
arguments). Written under `-o DIR` (each file inside it, as `flowc export` writes), else
printed between `==> PATH <==` lines; --json prints a JSON list of {path, content}.

Exit codes: 0 ok, 1 not a plan or an instance that cannot be launched (each named, with its
fix; the other instances' scripts are still written), 2 usage or I/O.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

from flowc.compiler.diagnostics import escape_control, first_control_character

EXIT_OK, EXIT_INVALID = 0, 1


def add_arguments(parser) -> None:
    parser.add_argument("plan", metavar="PLAN", help="a plan written by `flowc compile -o PLAN.json`")
    parser.add_argument("-o", "--output", metavar="DIR", help="write the scripts under DIR (default: print them)")
    parser.add_argument("--k8s", action="store_true", help="also write a Kubernetes manifest (kubernetes.yaml)")
    parser.add_argument("--image", metavar="IMAGE", help="the container image with flowc installed (--k8s needs it)")
    parser.add_argument("--run-args", default="", metavar="'ARGS'",
                        help="the arguments of `flowc run` in the manifest's pods, as one shell-quoted string "
                             "(e.g. '--replay --requests 64')")


def cmd_launch(args, out) -> int:
    from flowc.compiler.render.launch import launch_plan
    from flowc.export_cmd import emit_files
    from flowc.plan_io import read_plan

    plan = read_plan(args.plan, out)
    if isinstance(plan, int):
        return plan
    if first_control_character(args.plan):
        return out.usage_error("the plan file's name contains a control character, which a script cannot carry "
                               "safely", "rename the plan file")
    if args.k8s and not args.image:
        return out.usage_error("--k8s needs the container image the pods run", "give --image IMAGE (with flowc "
                               "and its runtime installed)")
    options = {"image": args.image, "mounted": _mounted(plan, Path(args.plan)),
               "run_args": tuple(shlex.split(args.run_args))} if args.k8s else {}
    files, problems = launch_plan(plan, args.plan, **options)
    for p in problems:
        sys.stderr.write(f"error: {escape_control(p.message)}\n  = help: {escape_control(p.help)}\n")
    failed = emit_files(files, args.output, out)
    if failed is not None:
        return failed
    return EXIT_INVALID if problems else EXIT_OK


def _mounted(plan, path: Path) -> dict[str, str]:
    """The files the pods see at /flowc: the plan as plan.json, and each spec file it names that
    lies in the plan's folder, under its own name (what `flowc run --replay` reads beside the
    plan; a plan that names its spec by another path needs `--against /flowc/NAME` in the run's
    arguments)."""
    files = {"plan.json": path.read_text(encoding="utf-8")}
    folder = path.parent.resolve()
    for name in plan.spec_files:
        spec = (path.parent / name).resolve()
        # a ConfigMap key: letters, digits, `-`, `_` and `.`
        if spec.parent == folder and re.fullmatch(r"[-._a-zA-Z0-9]+", spec.name) and spec.is_file() \
                and spec.name != "plan.json":
            files[spec.name] = spec.read_text(encoding="utf-8")
    return files
