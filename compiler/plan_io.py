"""Reading a plan file, and finding the spec it was compiled from: the one home of both for
`flowc verify`, `viz`, `export` and `run`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from pydantic import ValidationError

from flowc.compiler.diagnostics import Diagnostic
from flowc.compiler.plan import SUPPORTED_MAJOR, Plan, parse_format_version

MAX_NOTES = 10


def load_plan_file(path: Path) -> tuple[Optional[Plan], list[Diagnostic]]:
    """The plan in a JSON file, or F0520 diagnostics saying why it is not one (never a
    traceback). OSError and UnicodeDecodeError propagate: the caller reports unreadable files."""
    text = path.read_text(encoding="utf-8")
    name = path.name
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        return None, [Diagnostic("F0520", f"`{name}` is not valid JSON: {error.msg} at line {error.lineno} column "
                                 f"{error.colno}", help="give a plan written by `flowc`")]
    if isinstance(data, dict) and isinstance(data.get("format_version"), str):
        version = data["format_version"]
        if parse_format_version(version) is None:
            return None, [Diagnostic("F0520", f"plan format_version `{version}` is not supported (this flowc reads "
                                     f"{SUPPORTED_MAJOR}.x)", help="compile the plan again with this flowc, or "
                                     "verify it with the flowc that wrote it", notes=("at format_version",))]
    try:
        return Plan.model_validate(data), []
    except ValidationError as error:
        problems = error.errors()
        notes = tuple(f"at {_json_path(p['loc'])}: {p['msg']}" for p in problems[:MAX_NOTES])
        if len(problems) > MAX_NOTES:
            notes += (f"and {len(problems) - MAX_NOTES} more",)
        return None, [Diagnostic("F0520", f"`{name}` is not a flowc plan ({len(problems)} problem"
                                 f"{'s' if len(problems) != 1 else ''})", help="give a plan written by `flowc`",
                                 notes=notes)]


def _json_path(loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(the document)"


def plan_spec_path(plan: Plan, plan_path: Path, against: Optional[str | Path] = None) -> Optional[Path]:
    """The spec to check a plan against: `against` when given, else the plan's `spec_files[0]`:
    next to the plan when it is there (a plan moved with its spec), else as written, relative
    to the working directory (a plan that recorded the path the spec was compiled under).
    None when neither is known."""
    if against is not None:
        return Path(against)
    if not plan.spec_files:
        return None
    path = Path(plan.spec_files[0])
    if not path.is_absolute() and (plan_path.parent / path).is_file():
        return plan_path.parent / path
    return path
