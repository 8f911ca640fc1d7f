"""Reading a plan file for the commands that take one (`flowc viz`, `flowc export`)."""

from __future__ import annotations

from pathlib import Path

EXIT_INVALID = 1


def read_plan(path: str, out):
    """The plan in `path`, or the exit code after printing why it cannot be read: 2 for a
    missing or unreadable file, 1 for a file that is not a plan (F0520)."""
    from flowc.compiler.verify.verifier import load_plan_file

    plan_path = Path(path)
    if not plan_path.is_file():
        state = "is a directory" if plan_path.is_dir() else "does not exist"
        return out.usage_error(f"`{path}` {state}", "give a plan written by `flowc compile -o PLAN.json`")
    try:
        plan, problems = load_plan_file(plan_path)
    except (OSError, UnicodeDecodeError) as error:
        return out.usage_error(f"cannot read `{path}`: {getattr(error, 'strerror', None) or error}")
    if plan is None:
        out.diagnostics(problems, {})
        return EXIT_INVALID
    return plan
