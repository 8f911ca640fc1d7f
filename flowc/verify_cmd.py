"""`flowc verify PLAN [--against SPEC]`: re-check a plan against its spec from first principles
(`compiler/verify/`). Exit 0: the plan is sound; 1: it is not, or the spec is invalid; 2: a
file is missing or unreadable, or no spec is known."""

from __future__ import annotations

import sys

from flowc.compiler.diagnostics import escape_control
from flowc.plan_io import read_plan, read_spec


def cmd_verify(args, out) -> int:
    from flowc.compiler.verify import verify_plan

    plan = read_plan(args.plan, out)
    if isinstance(plan, int):
        return plan
    checked = read_spec(plan, args.plan, args.against, out, allow_outside=args.allow_outside)
    if isinstance(checked, int):
        return checked
    diagnostics = verify_plan(plan, checked.spec)
    out.diagnostics(diagnostics, checked.sources)
    errors = sum(1 for d in diagnostics if d.severity == "error")
    if not out.json:
        what = escape_control(args.plan + (f" against {args.against}" if args.against else ""))
        if errors:
            print(f"verified {what}: {errors} error{'s' if errors != 1 else ''}", file=sys.stderr)
        else:
            print(f"verified {what}: ok")
    return 1 if errors else 0
