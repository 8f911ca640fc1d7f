"""Reading a plan file and the spec it was compiled from, for the commands that take a plan
(`flowc verify`, `viz`, `export`, `run`): each prints why it cannot and returns the exit code."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

EXIT_INVALID = 1


def read_plan(path: str, out):
    """The plan in `path`, or the exit code after printing why it cannot be read: 2 for a
    missing or unreadable file, 1 for a file that is not a plan (F0520)."""
    from flowc.compiler.plan_io import load_plan_file

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


def read_spec(plan, plan_path: str, against: Optional[str], out, *, why: str = "", allow_outside: bool = False):
    """The checked spec of `plan` (`--against`, else the plan's spec file: see
    `compiler.plan_io.plan_spec_path`), or the exit code after printing why there is none: 2
    for a missing or unreadable file, 1 for a spec with errors (its diagnostics). `why` says
    what the command needs the spec for; `allow_outside` lets the spec read files outside its
    directory tree (--allow-outside)."""
    from flowc.api import check_sources
    from flowc.compiler.diagnostics import FlowError
    from flowc.compiler.plan_io import plan_spec_path

    path, refused = plan_spec_path(plan, Path(plan_path), against)
    need = f"; {why}" if why else ""
    if refused is not None:
        return out.usage_error(f"{refused} (`{path}`){need}", "give the spec with `--against SPEC.flow`")
    if path is None:
        return out.usage_error(f"`{plan_path}` names no spec file{need}", "give the spec with `--against SPEC.flow`")
    if not path.is_file():
        state = "is a directory" if path.is_dir() else "does not exist"
        return out.usage_error(f"the spec `{path}` {state}{need}", "give the spec with `--against SPEC.flow`")
    try:
        return check_sources(path, allow_outside=allow_outside)
    except FlowError as error:
        out.diagnostics(error.diagnostics, error.sources)
        return EXIT_INVALID
    except (OSError, UnicodeDecodeError) as error:
        return out.usage_error(f"cannot read `{path}`: {getattr(error, 'strerror', None) or error}")
