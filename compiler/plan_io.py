"""Reading a plan file, and finding the spec it was compiled from: the one home of both for
`flowc verify`, `viz`, `export` and `run`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from pydantic import ValidationError

from flowc.compiler.diagnostics import Diagnostic
from flowc.compiler.plan import SUPPORTED_MAJOR, Plan, parse_format_version
from flowc.compiler.spec import MAX_REQUESTS

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
        plan = Plan.model_validate(data)
    except ValidationError as error:
        return None, [_not_a_plan(name, [(_json_path(p["loc"]), p["msg"]) for p in error.errors()])]
    problems = _not_numbers(data) or _out_of_range(plan)
    if problems:
        return None, [_not_a_plan(name, problems)]
    return plan, []


def _not_a_plan(name: str, problems: list[tuple[str, str]]) -> Diagnostic:
    """F0520 for a document that is not a plan, one note per problem (JSON path: why)."""
    notes = tuple(f"at {path}: {why}" for path, why in problems[:MAX_NOTES])
    if len(problems) > MAX_NOTES:
        notes += (f"and {len(problems) - MAX_NOTES} more",)
    return Diagnostic("F0520", f"`{name}` is not a flowc plan ({len(problems)} problem"
                      f"{'s' if len(problems) != 1 else ''})", help="give a plan written by `flowc`", notes=notes)


def _not_numbers(data, loc: tuple = ()) -> list[tuple[str, str]]:
    """NaN anywhere in the document: flowc never writes one (an infinite percentile is
    Infinity), and no check downstream can compare it."""
    if isinstance(data, float) and math.isnan(data):
        return [(_json_path(loc), "NaN is not a number")]
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    return [problem for key, value in items for problem in _not_numbers(value, (*loc, key))]


def _out_of_range(plan: Plan) -> list[tuple[str, str]]:
    """Values of a well-typed plan that no compiler writes and no command can use: counts below
    1, negative sizes or GPU indices, instances of the wrong GPU count, activation buffers
    outside the arena. (The verifier checks the plan against its spec; this is the document
    alone, so that every command can rely on it.)"""
    found = []
    for d, dep in enumerate(plan.deployments):
        for g, group in enumerate(dep.groups):
            at = f"deployments[{d}].groups[{g}]"
            found += _below(at, {"tp": group.tp, "pp": group.pp, "ep": group.ep, "instances": len(group.instances),
                                 **{f"scheduler.{k}": v for k, v in group.scheduler.model_dump().items()
                                    if not isinstance(v, bool)}}, 1)
            found += _instance_problems(at, group)
            found += _memory_problems(f"{at}.memory", group.memory)
            if not (group.capacity_rps >= 0 and math.isfinite(group.capacity_rps)):
                found.append((f"{at}.capacity_rps", f"{group.capacity_rps} is not a rate"))
        requests = dep.predicted.requests
        if requests is not None and not 1 <= requests <= MAX_REQUESTS:  # commands re-simulate that many
            found.append((f"deployments[{d}].predicted.requests", f"{requests} is not a request count from 1 to "
                          f"{MAX_REQUESTS:,}"))
    return found


def _below(at: str, values: dict[str, int], minimum: int) -> list[tuple[str, str]]:
    return [(f"{at}.{key}", f"{value} is below {minimum}") for key, value in values.items() if value < minimum]


def _instance_problems(at: str, group) -> list[tuple[str, str]]:
    found = []
    for i, instance in enumerate(group.instances):
        if group.tp >= 1 and group.pp >= 1 and len(instance.gpus) != group.tp * group.pp:
            found.append((f"{at}.instances[{i}].gpus", f"{len(instance.gpus)} GPUs for tp {group.tp} x pp {group.pp}"))
        for k, gpu in enumerate(instance.gpus):
            found += _below(f"{at}.instances[{i}].gpus[{k}]", {"node": gpu.node, "index": gpu.index}, 0)
    return found


def _memory_problems(at: str, memory) -> list[tuple[str, str]]:
    sizes = {k: getattr(memory, k) for k in ("capacity", "weights", "kv_cache", "kv_blocks", "activations", "reserve")}
    found = _below(at, sizes, 0) + _below(at, {f"offloaded.{k}": v for k, v in memory.offloaded.items()}, 0)
    if not (memory.offload_step_s >= 0 and math.isfinite(memory.offload_step_s)):
        found.append((f"{at}.offload_step_s", f"{memory.offload_step_s} is not a duration"))
    for name, offset in memory.arena_offsets.items():
        end = offset + memory.arena_sizes.get(name, 0)
        if offset < 0 or memory.arena_sizes.get(name, 0) < 0 or end > memory.activations:
            found.append((f"{at}.arena_offsets.{name}", f"bytes {offset} to {end} are not inside the arena of "
                          f"{memory.activations} bytes"))
    return found


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
