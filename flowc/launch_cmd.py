"""`flowc launch PLAN`: torchrun scripts that run a plan's instances on the flowc runtime, one
per node of each instance (compiler/render/launch.py), so an instance spanning nodes runs on a
real cluster. Written under `-o DIR` (each file inside it, as `flowc export` writes), else
printed between `==> PATH <==` lines; --json prints a JSON list of {path, content}.

Exit codes: 0 ok, 1 not a plan or an instance that cannot be launched (each named, with its
fix; the other instances' scripts are still written), 2 usage or I/O.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from flowc.compiler.diagnostics import escape_control, first_control_character

EXIT_OK, EXIT_INVALID = 0, 1


def add_arguments(parser) -> None:
    parser.add_argument("plan", metavar="PLAN", help="a plan written by `flowc compile -o PLAN.json`")
    parser.add_argument("-o", "--output", metavar="DIR", help="write the scripts under DIR (default: print them)")


def cmd_launch(args, out) -> int:
    from flowc.compiler.render.launch import launch_plan
    from flowc.export_cmd import write_files
    from flowc.plan_io import read_plan

    plan = read_plan(args.plan, out)
    if isinstance(plan, int):
        return plan
    if first_control_character(args.plan):
        return out.usage_error("the plan file's name contains a control character, which a script cannot carry "
                               "safely", "rename the plan file")
    files, problems = launch_plan(plan, args.plan)
    for p in problems:
        sys.stderr.write(f"error: {escape_control(p.message)}\n  = help: {escape_control(p.help)}\n")
    if args.output:
        failed = write_files(files, Path(args.output))
        if failed is not None:
            return out.usage_error(*failed)
    if out.json:
        print(json.dumps([{"path": path, "content": content} for path, content in files], indent=2))
    elif args.output:
        print(f"wrote {len(files)} scripts under {escape_control(args.output)}")
    else:
        sys.stdout.write("\n".join(f"==> {path} <==\n{content}" for path, content in files))
    return EXIT_INVALID if problems else EXIT_OK
