"""Reading a plan file, and finding the spec it was compiled from: the one home of both for
`flowc verify`, `viz`, `export` and `run`."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Optional

from pydantic import ValidationError

from flowc.compiler.diagnostics import Diagnostic, first_control_character
from flowc.compiler.model.geometry import kv_bytes_per_token_per_rank, weight_bytes_per_rank
from flowc.compiler.model.parallelism import problems as parallelism_problems
from flowc.compiler.model.step_graph import layout_problems
from flowc.compiler.plan import (
    SUPPORTED_MAJOR,
    DeploymentPlan,
    InstanceGroup,
    MemoryMap,
    NodeGroupShape,
    Plan,
    parse_format_version,
)
from flowc.compiler.spec import MAX_CLUSTER_GPUS, MAX_COUNT, MAX_KNOB, MAX_REQUESTS, NAME_PATTERN, Model

MAX_NOTES = 10
MAX_BYTES = 2**60  # of any size in a memory map: far above any device, within every integer a command computes
_NAME = re.compile(NAME_PATTERN)


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
    problems = _not_numbers(data) or plan_problems(plan)
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


def plan_problems(plan: Plan) -> list[tuple[str, str]]:
    """The one validation of a plan document, as (JSON path, why) pairs; empty when every command
    can rely on it. It needs no spec: the plan's own records (its clusters' node groups, the model
    it carries, its memory maps) must agree with each other, and every value stay in the ranges a
    compiler writes. `load_plan_file` applies it to every file, the engine to every Plan object;
    the verifier then checks the plan against its spec."""
    if parse_format_version(plan.format_version) is None:
        return [("format_version", f"`{plan.format_version}` is not a version this flowc reads ({SUPPORTED_MAJOR}.x)")]
    found = _text_problems(plan)
    if not plan.deployments:  # flowc compiles no spec without a deploy block (F0512)
        found.append(("deployments", "the plan has no deployment"))
    for d, dep in enumerate(plan.deployments):
        at = f"deployments[{d}]"
        nodes = _nodes(plan, dep.cluster)
        if nodes is None and plan.has("clusters"):
            found.append((f"{at}.cluster", f"cluster `{dep.cluster}` is not among the plan's clusters"))
        if dep.model_spec is None and plan.has("model_spec"):
            found.append((f"{at}.model_spec", "the plan does not carry its model"))
        found += _model_problems(f"{at}.model_spec", dep)
        for g, group in enumerate(dep.groups):
            gat = f"{at}.groups[{g}]"
            found += _group_problems(gat, group)
            found += _placement_problems(gat, dep.cluster, group, nodes)
            found += _memory_problems(f"{gat}.memory", group.memory)
            if not found and dep.model_spec is not None:  # the model's arithmetic needs sane values
                found += _against_model(gat, plan, dep.model_spec, group)
        requests = dep.predicted.requests
        if requests is not None and not 1 <= requests <= MAX_REQUESTS:  # commands re-simulate that many
            found.append((f"{at}.predicted.requests", f"{requests} is not a request count from 1 to "
                          f"{MAX_REQUESTS:,}"))
    return found


def _text_problems(plan: Plan) -> list[tuple[str, str]]:
    """Names that are not spec names, and control characters in any other text: flowc writes
    neither, and both reach terminals, scripts and manifests. The spec files' names are the
    user's own paths, any a file system allows; every command quotes or escapes them."""
    found = [(path, f"{text!r} contains a control character") for path, text in plan.texts()
             if not path.startswith("spec_files") and first_control_character(text)]
    names = [(f"clusters.{name}", name) for name in plan.clusters]
    for d, dep in enumerate(plan.deployments):
        names += [(f"deployments[{d}].{key}", getattr(dep, key)) for key in ("name", "cluster", "model")]
        names += [(f"deployments[{d}].groups[{g}].gpu", group.gpu) for g, group in enumerate(dep.groups)]
    found += [(path, f"{name!r} is not a name a spec can give") for path, name in names
              if not _NAME.fullmatch(name) and not first_control_character(name)]
    return found


def _nodes(plan: Plan, cluster: str) -> Optional[list[NodeGroupShape]]:
    """The node group of every node of `cluster` in plan order, when the plan records it."""
    groups = plan.clusters.get(cluster)
    return None if groups is None else [group for group in groups for _ in range(min(group.count, MAX_CLUSTER_GPUS))]


def _group_problems(at: str, group: InstanceGroup) -> list[tuple[str, str]]:
    s = group.scheduler
    knobs = {"tp": group.tp, "pp": group.pp, "ep": group.ep,
             **{f"scheduler.{k}": v for k, v in s.model_dump().items() if not isinstance(v, bool)}}
    found = _outside(at, knobs, 1, MAX_KNOB)
    if not group.instances:
        found.append((f"{at}.instances", "no instances"))
    if s.chunk_size > s.max_batched_tokens >= 1:
        found.append((f"{at}.scheduler.chunk_size", f"{s.chunk_size} is above max_batched_tokens "
                      f"{s.max_batched_tokens}"))
    if not (group.capacity_rps >= 0 and math.isfinite(group.capacity_rps)):
        found.append((f"{at}.capacity_rps", f"{group.capacity_rps} is not a rate"))
    return found


def _placement_problems(at: str, cluster: str, group: InstanceGroup,
                        nodes: Optional[list[NodeGroupShape]]) -> list[tuple[str, str]]:
    """Each instance has tp x pp GPUs of the cluster, of the group's type. (A GPU used twice is the
    verifier's F0522: no command of one plan breaks on it.)"""
    found = []
    for i, instance in enumerate(group.instances):
        iat = f"{at}.instances[{i}]"
        if 1 <= group.tp <= MAX_KNOB and 1 <= group.pp <= MAX_KNOB and len(instance.gpus) != group.tp * group.pp:
            found.append((f"{iat}.gpus", f"{len(instance.gpus)} GPUs for tp {group.tp} x pp {group.pp}"))
        for k, gpu in enumerate(instance.gpus):
            gat = f"{iat}.gpus[{k}]"
            if nodes is None:  # a plan before 1.6: the largest cluster a spec can declare
                inside = 0 <= gpu.node < MAX_CLUSTER_GPUS and 0 <= gpu.index < MAX_COUNT
                where = "any cluster a spec can declare"
            else:
                inside = 0 <= gpu.node < len(nodes) and 0 <= gpu.index < nodes[gpu.node].gpus
                where = f"cluster `{cluster}` (nodes 0 to {len(nodes) - 1}" + (
                    f"; node {gpu.node}: GPUs 0 to {nodes[gpu.node].gpus - 1})" if 0 <= gpu.node < len(nodes) else ")")
            if not inside:
                found.append((gat, f"GPU {gpu} is outside {where}"))
                continue
            if nodes is not None and nodes[gpu.node].gpu != group.gpu:
                found.append((gat, f"GPU {gpu} is a {nodes[gpu.node].gpu}, the group runs on {group.gpu}"))
    return found


def _memory_problems(at: str, memory: MemoryMap) -> list[tuple[str, str]]:
    sizes = {k: getattr(memory, k) for k in ("capacity", "weights", "kv_cache", "kv_blocks", "activations", "reserve",
                                             "free")}
    found = _outside(at, sizes, 0, MAX_BYTES) + _outside(at, {f"offloaded.{k}": v for k, v in memory.offloaded.items()},
                                                          0, MAX_BYTES)
    found += _outside(f"{at}.arena_offsets", memory.arena_offsets, 0, MAX_BYTES)
    found += _outside(f"{at}.arena_sizes", memory.arena_sizes, 0, MAX_BYTES)
    if not (0 <= memory.offload_step_s < math.inf):
        found.append((f"{at}.offload_step_s", f"{memory.offload_step_s} is not a duration"))
    total = memory.weights + memory.kv_cache + memory.activations + memory.reserve + memory.free
    if not found and total != memory.capacity:
        found.append((at, f"weights + kv_cache + activations + reserve + free = {total:,} B, not the capacity "
                      f"{memory.capacity:,} B"))
    return found


def _model_problems(at: str, dep: DeploymentPlan) -> list[tuple[str, str]]:
    """The model the plan carries: the dtypes the deployment names, sizes a spec can give."""
    m = dep.model_spec
    if m is None:
        return []
    found = [(f"{at}.{key}", f"{getattr(m, key)}, the deployment keeps {key} in {getattr(dep, key)}")
             for key in ("weights", "kv") if getattr(m, key) != getattr(dep, key)]
    if m.name != dep.model:
        found.append((f"{at}.name", f"`{m.name}`, the deployment serves `{dep.model}`"))
    found += _outside(at, {k: getattr(m, k) for k in ("layers", "heads", "kv_heads")}, 1, MAX_COUNT)
    found += _outside(at, {k: getattr(m, k) for k in ("hidden", "head_dim", "ffn", "vocab", "max_context")}, 1,
                      MAX_KNOB)
    if m.sliding_window is not None:
        found += _outside(at, {"sliding_window": m.sliding_window}, 1, MAX_KNOB)
    if m.moe is not None:
        moe = m.moe.model_dump()
        found += _outside(f"{at}.moe", {k: moe[k] for k in ("experts", "top_k")}, 1, MAX_COUNT)
        found += _outside(f"{at}.moe", {"expert_ffn": moe["expert_ffn"]}, 1, MAX_KNOB)
        found += _outside(f"{at}.moe", {k: moe[k] for k in ("shared_experts", "dense_layers")}, 0, MAX_COUNT)
    if m.mla is not None:
        found += _outside(f"{at}.mla", {k: v for k, v in m.mla.model_dump().items() if v is not None}, 1, MAX_KNOB)
    return found


def _against_model(at: str, plan: Plan, m: Model, group: InstanceGroup) -> list[tuple[str, str]]:
    """What the group's memory map says against the model the plan carries: a rank's weights
    (those on the GPU and those offloaded), room for its KV blocks, an arena that holds a step."""
    found = [(f"{at}.{p.knob}", p.message) for p in parallelism_problems(m, group.tp, group.pp, group.ep)]
    if found:
        return found
    mm, s = group.memory, group.scheduler
    weights = weight_bytes_per_rank(m, group.tp, group.pp)
    kept = mm.weights + mm.offloaded.get("weights", 0) + mm.offloaded.get("experts", 0)
    if kept != weights:
        found.append((f"{at}.memory.weights", f"{kept:,} B of weights per GPU (with those offloaded); model "
                      f"`{m.name}` at tp {group.tp} x pp {group.pp} has {weights:,} B"))
    block = s.block_size * kv_bytes_per_token_per_rank(m, group.tp, group.pp)
    if mm.kv_cache < mm.kv_blocks * block:
        found.append((f"{at}.memory.kv_cache", f"{mm.kv_cache:,} B cannot hold {mm.kv_blocks:,} blocks of {block:,} B"))
    if mm.arena_offsets or mm.arena_sizes or plan.has("arena_sizes"):
        found += [(f"{at}.memory.arena_offsets", why) for why in layout_problems(
            m, group.tp, s.max_batched_tokens, s.max_seqs, mm.arena_offsets, mm.arena_sizes, mm.activations,
            group.ep)]
    return found


def _outside(at: str, values: dict[str, int], low: int, high: int) -> list[tuple[str, str]]:
    return [(f"{at}.{key}", f"{value} is not from {low} to {high:,}") for key, value in values.items()
            if not low <= value <= high]


def _json_path(loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(the document)"


def plan_spec_path(plan: Plan, plan_path: Path, against: Optional[str | Path] = None
                   ) -> tuple[Optional[Path], Optional[str]]:
    """(the spec to check a plan against, why a spec the plan names is refused). `against` when
    given (the user's own choice); else the plan's `spec_files[0]`: next to the plan when it is
    there (a plan moved with its spec), else as written, relative to the working directory (a
    plan that recorded the path the spec was compiled under). A plan is untrusted, so the file
    it names must be a `.flow` file inside the plan's directory tree or the working directory's
    (symlinks resolved): a plan naming `/etc/passwd` would otherwise have it printed as parse
    errors. (None, None) when no spec is known."""
    if against is not None:
        return Path(against), None
    if not plan.spec_files:
        return None, None
    path = Path(plan.spec_files[0])
    if not path.is_absolute() and (plan_path.parent / path).is_file():
        path = plan_path.parent / path
    if path.suffix != ".flow":
        return path, "the plan names a spec that is not a .flow file"
    resolved = path.resolve()
    roots = (plan_path.parent.resolve(), Path.cwd().resolve())
    if not any(resolved.is_relative_to(root) for root in roots):
        return path, "the plan names a spec outside the plan's directory and the working directory"
    return path, None
