"""`flowc.autotune`: search the knobs of one deployment for the configuration that best serves
an objective, one compile (or one measured run) per configuration.

    result = flowc.autotune("chat.flow", space={"tp": [2, 4, 8], "max_seqs": [64, 256]}, budget=16)
    result.best.config, result.pareto, result.to_json()

Contracts:

- A configuration (`Trial.config`) gives one value to each knob of the space: `tp`, `pp`, `ep`,
  `max_batched_tokens`, `chunk_size`, `block_size`, `max_seqs` (whole numbers), `weights`,
  `kv` (dtypes), `disaggregation` (allowed or forbidden: allowed lets the compiler choose
  prefill/decode instances, it does not force them), `router` ("round_robin",
  "least_work"). Knobs outside the space stay as the spec declares them, and what the spec
  leaves open the compiler still chooses. The default space is what the spec leaves open: its
  `search` lists of more than one value, and `disaggregation` when it is allowed.
- A trial pins the deployment to its configuration in the spec's syntax tree (`tp 4`,
  `model m { weights fp8 }`, `forbid disaggregation`) and checks the spec again, so a value
  the model cannot take is the checker's diagnostic (F0401 for a tp that does not split the
  heads, F0503 for weights that no longer fit, ...); then the real optimizer compiles it, with
  only the deployments that share its cluster. A checker or planner diagnostic makes a failed
  trial, never an exception. A Spec object is re-read from its files (it must match them).
- Evaluators. "simulate": the plan's predictions (the simulator behind the compiler's
  least_work router); with a `router` knob every trial is re-simulated from its plan behind
  its router (`model/instance.simulate_plan_deployment`) on as many requests as the plan's
  predictions, with the same goodput search. "measure": the plan's colocated instance runs on
  this machine's device with the flowc runtime, replaying `measure_requests` requests of the
  workload at their arrival times; latencies are measured, and goodput per GPU is the replay's
  request throughput per GPU of the instance when the run meets the SLO, else 0 (one run at
  the workload's rate, not a rate search). A spec whose GPUs this machine does not have is an
  error before any trial; plans the runtime refuses (fp8, pp > 1, ...) are failed trials.
- Objective, larger is better: "max_goodput_per_gpu", "min_gpus", "min_cost",
  "min_ttft_p90", "min_tpot_p90" (the negated metric), or a callable(Metrics) -> float;
  default the deployment's own objective.
- Ranking: trials that meet the SLO by objective value, then compiled trials that miss it,
  then failed ones; ties go to the higher goodput per GPU, then to the space's order. `best`
  is the first trial that meets the SLO. `pareto`: the trials meeting the SLO that no other
  such trial dominates on goodput per GPU (max), p90 TTFT (min) and p90 TPOT (min).
- Search. Configurations are ordered as the space lists knobs and values. When they fit the
  budget, all are evaluated. Otherwise coordinate descent: start from the spec's own value of
  each knob (or the middle of its list), evaluate every value of one knob with the others
  fixed, move to the best, go on with the next knob; when a full pass over the knobs moves
  nothing (a local optimum), restart from a random configuration not yet evaluated (seeded),
  until the budget is spent. A line search is one batch (evaluated in parallel).
  The budget counts configurations, from the cache or not.
- Cache: one JSON file per trial in `cache_dir` (default `$XDG_CACHE_HOME/flowc/autotune`,
  else `~/.cache/flowc/autotune`), named by a hash of everything that can change its result:
  - the code that evaluates it, by content: every .py, .flow, .json and .lark file of
    `flowc.compiler`, `flowc.stdlib` (calibration.json included) and `flowc.grammar`, and
    `flowc/autotune.py`; for "measure" also `flowc.runtime` and `flowc/replay.py` (hashed once
    per process, about 30 ms; the flowc version is in the key too, but an edited tree or a
    rebuild under the same version never reuses results);
  - the Python version and the versions of the libraries under that code (ortools, numpy;
    for "measure" torch and triton);
  - the evaluator and its settings: the seed, the router, the compile's CP-SAT time limit
    (`COMPILE_TIME_LIMIT_S`); for "measure" the host, its CUDA devices and the request count;
  - what the trial depends on in the spec: the pinned deployments of the cluster with their
    model, the cluster, its GPU types, the workloads with their trace files' contents, the
    SLOs, as checked (locations and doc comments left out); for a configuration the checker
    rejects, the spec's text.
  The objective is not in the key: a trial's metrics are kept, and scored on reading.
  Written to a temporary file and renamed, so an interrupted run never leaves half an entry;
  an entry that does not read back is evaluated again.
- `cancel` (a threading.Event) is checked between trials, Ctrl-C (KeyboardInterrupt) stops
  the search too; either way the trials done so far are returned with `cancelled=True`.
- `parallel=N` evaluates a batch in N spawned worker processes (they ignore Ctrl-C: the
  parent stops them after their current trial); "measure" always runs one trial at a time.
  Spawned workers import the calling script, so a script needs `if __name__ == "__main__":`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import itertools
import json
import math
import os
import platform
import random
import sys
import threading
import time
import types
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Callable, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from flowc import __version__
from flowc.api import looks_like_path
from flowc.compiler.diagnostics import FlowError, did_you_mean
from flowc.compiler.frontend import ast
from flowc.compiler.frontend.check import TOKEN_KNOBS, check
from flowc.compiler.frontend.imports import Program, load_program
from flowc.compiler.plan import DeploymentPlan, InstanceGroup, Plan
from flowc.compiler.source import SourceFile
from flowc.compiler.spec import DTYPE_BYTES, Deployment, Spec

__all__ = ["autotune", "AutotuneResult", "AutotuneError", "Trial", "Metrics", "Problem", "KNOBS", "OBJECTIVES",
           "default_space", "default_cache_dir", "describe"]

INT_KNOBS = ("tp", "pp", "ep", "max_batched_tokens", "chunk_size", "block_size", "max_seqs")
KNOBS = INT_KNOBS + ("weights", "kv", "disaggregation", "router")
ROUTERS = ("round_robin", "least_work")
OBJECTIVES = ("max_goodput_per_gpu", "min_gpus", "min_cost", "min_ttft_p90", "min_tpot_p90", "max_throughput")
EVALUATORS = ("simulate", "measure")
CACHE_FORMAT = 1
COMPILE_TIME_LIMIT_S = 10.0  # CP-SAT's limit per trial compile (compile_spec's default), part of every key

Value = Union[bool, int, str]  # bool first: pydantic keeps True a bool, not 1
Progress = Callable[[str, int, Optional[int]], None]


class AutotuneError(ValueError):
    """A space, objective or setting autotune cannot use; `help` says what to write instead."""

    def __init__(self, message: str, help: Optional[str] = None):
        super().__init__(message + (f" ({help})" if help else ""))
        self.message, self.help = message, help


# ------------------------------------------------------------------------------------ results

class _Model(BaseModel):
    # Latencies of requests never served are infinite: keep them as JSON's Infinity, as plans do.
    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="constants")


class Metrics(_Model):
    """What a trial achieved (simulated or measured); latencies in milliseconds."""

    goodput_rps_per_gpu: float
    ttft_p90_ms: float
    tpot_p90_ms: float
    gpus: int
    meets_slo: bool
    goodput_rps: float
    cost_per_hour: Optional[float] = Field(None, description="usd/h of the GPUs used; None without prices")
    mode: str = Field(description="colocated or disaggregated")
    summary: str = Field(description="the instances the compiler chose")
    measured: bool = False


class Problem(_Model):
    """Why a trial failed: a checker or planner diagnostic, or the runtime's refusal (no code)."""

    code: Optional[str] = None
    message: str
    help: Optional[str] = None
    notes: list[str] = Field(default_factory=list)


class _Outcome(_Model):
    """What the cache keeps of a trial: everything that does not depend on the objective."""

    status: Literal["ok", "failed"]
    metrics: Optional[Metrics] = None
    problems: list[Problem] = Field(default_factory=list)
    plan: Optional[Plan] = None


class Trial(_Outcome):
    """One configuration and what it achieved; `plan` is its compiled plan (None when the
    checker refused the configuration)."""

    config: dict[str, Value]
    objective_value: Optional[float] = Field(None, description="larger is better; None for a failed trial")
    pareto: bool = False
    cached: bool = False
    key: str = Field(description="the cache entry's name")

    @property
    def meets_slo(self) -> bool:
        return self.metrics is not None and self.metrics.meets_slo


class AutotuneResult(_Model):
    """What `autotune` returns; `to_json()` is the document `flowc autotune -o` writes."""

    format_version: str = "1.0"
    flowc_version: str = __version__
    spec_files: list[str]
    deployment: str
    space: dict[str, list[Value]]
    objective: str = Field(description="its name, or `custom` for a callable")
    evaluator: str
    seed: int
    budget: int
    strategy: Literal["exhaustive", "coordinate descent"]
    trials: list[Trial] = Field(description="ranked, best first")
    evaluations: int = Field(description="trials evaluated by this call")
    cached: int = Field(description="trials read from the cache")
    cancelled: bool
    elapsed_s: float

    @property
    def best(self) -> Optional[Trial]:
        return next((t for t in self.trials if t.meets_slo), None)

    @property
    def pareto(self) -> list[Trial]:
        return [t for t in self.trials if t.pareto]

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    def to_dict(self) -> dict:
        """The JSON document as Python objects (what `render_report(autotune=...)` takes)."""
        return json.loads(self.to_json())

    @classmethod
    def from_json(cls, text: str) -> "AutotuneResult":
        return cls.model_validate_json(text)


# -------------------------------------------------------------------------------- the space

def _check_space(space: dict) -> dict[str, list[Value]]:
    """The space as given, validated; every mistake is an AutotuneError naming the fix."""
    if not isinstance(space, dict):
        raise AutotuneError(f"the space must be a dict of knob -> list of values, not {type(space).__name__}")
    checked = {}
    for knob, values in space.items():
        if knob not in KNOBS:
            best = did_you_mean(str(knob), KNOBS)
            raise AutotuneError(f"unknown knob `{knob}` in the space",
                                f"did you mean `{best}`?" if best else "knobs are " + ", ".join(KNOBS))
        if not isinstance(values, (list, tuple)):
            raise AutotuneError(f"`{knob}` must map to a list of values, not {values!r}",
                                f"write {knob}=[{values!r}]")
        if not values:
            raise AutotuneError(f"`{knob}` has no values to try", "give at least one value, or leave the knob out")
        for value in values:
            _check_value(knob, value)
        repeated = next((v for i, v in enumerate(values) if v in values[:i]), None)
        if repeated is not None:
            raise AutotuneError(f"`{knob}` lists {repeated!r} twice", "list each value once")
        checked[knob] = list(values)
    return checked


def _check_value(knob: str, value) -> None:
    if knob in INT_KNOBS:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise AutotuneError(f"`{knob}` values are whole numbers of at least 1, not {value!r}")
    elif knob in ("weights", "kv"):
        if value not in DTYPE_BYTES:
            best = did_you_mean(str(value), DTYPE_BYTES)
            raise AutotuneError(f"`{knob}` {value!r} is not a dtype",
                                f"did you mean `{best}`?" if best else "dtypes are " + ", ".join(DTYPE_BYTES))
    elif knob == "disaggregation":
        if not isinstance(value, bool):
            raise AutotuneError(f"`disaggregation` values are True or False, not {value!r}")
    elif value not in ROUTERS:
        raise AutotuneError(f"`router` {value!r} is not a router", "routers are " + ", ".join(ROUTERS))


def default_space(d: Deployment) -> dict[str, list[Value]]:
    """What the deployment leaves open: its search lists of several values, and disaggregation
    when it is allowed (dtypes stay as declared)."""
    space: dict[str, list[Value]] = {k: list(v) for k, v in d.search.items() if k in INT_KNOBS and len(v) > 1}
    if d.allow_disaggregation:
        space["disaggregation"] = [False, True]
    return space


def _declared(d: Deployment, knob: str) -> Optional[Value]:
    """The deployment's own value of a knob, when it has exactly one."""
    if knob in INT_KNOBS:
        values = d.search.get(knob, [])
        return values[0] if len(values) == 1 else None
    return {"weights": d.model.weights, "kv": d.model.kv, "disaggregation": d.allow_disaggregation,
            "router": "least_work"}[knob]


def value_text(value: Value) -> str:
    return ("on" if value else "off") if isinstance(value, bool) else str(value)


def describe(config: dict[str, Value]) -> str:
    """`tp 4, weights fp8, disaggregation off`; `as declared` for the empty configuration."""
    return ", ".join(f"{k} {value_text(v)}" for k, v in config.items()) or "as declared"


# ------------------------------------------------------------------------- pinning a trial

def _source(spec) -> tuple[Program, Spec]:
    """The program (syntax trees: a trial is checked again from them) and its checked spec."""
    if isinstance(spec, Spec):
        files = [Path(f) for f in spec.files]
        if not files or not all(f.is_file() for f in files):
            raise AutotuneError("autotune checks each configuration from the spec's source, and this Spec's files "
                                f"({', '.join(spec.files) or 'none'}) cannot be read",
                                "pass the spec's path or text instead of the loaded Spec")
        program = load_program(files, None)
        if check(program)[0] != spec:
            raise AutotuneError("this Spec differs from its files (changed after loading?)",
                                "pass the spec's path or text")
        return program, spec
    if isinstance(spec, os.PathLike) or looks_like_path(spec):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        program = load_program([path], None)
    else:
        program = load_program([], SourceFile("<spec>", spec))
    return program, check(program)[0]


def _pin(program: Program, name: str, config: dict[str, Value]) -> Program:
    modules = [replace(m, items=tuple(_pin_deploy(i, config) if isinstance(i, ast.Decl) and i.kind.text == "deploy"
                                      and i.name.text == name else i for i in m.items))
               for m in program.modules]
    return Program(modules=modules, sources=program.sources, imports=program.imports, roots=program.roots)


def _pin_deploy(decl: ast.Decl, config: dict[str, Value]) -> ast.Decl:
    """The deploy block with the configuration written into it, as a user would: `tp 4`,
    `model m { weights fp8 }`, `allow|forbid disaggregation`. The new statements point at the
    deployment's name, which is where a diagnostic about them shows."""
    at = decl.name.span
    statements = []
    for stmt in decl.body.statements:
        key = stmt.key.text
        if key in INT_KNOBS and key in config:
            continue
        if key == "model" and ("weights" in config or "kv" in config):
            stmt = _pin_model(stmt, config, at)
        elif key in ("allow", "forbid") and "disaggregation" in config:
            stmt = _without(stmt, "disaggregation")
            if stmt is None:
                continue
        statements.append(stmt)
    for knob in INT_KNOBS:
        if knob in config:
            number = ast.Number(str(config[knob]), at)
            value = ast.Quantity(number, "tok", at, at) if knob in TOKEN_KNOBS else number
            statements.append(ast.Statement(ast.Name(knob, at), (value,), None, at))
    if "disaggregation" in config:
        switch = "allow" if config["disaggregation"] else "forbid"
        statements.append(ast.Statement(ast.Name(switch, at), (ast.Name("disaggregation", at),), None, at))
    return replace(decl, body=replace(decl.body, statements=tuple(statements)))


def _pin_model(stmt: ast.Statement, config: dict[str, Value], at) -> ast.Statement:
    kept = tuple(s for s in (stmt.body.statements if stmt.body else ()) if s.key.text not in config)
    pinned = tuple(ast.Statement(ast.Name(k, at), (ast.Name(str(config[k]), at),), None, at)
                   for k in ("weights", "kv") if k in config)
    body = ast.Body(kept + pinned, at, at) if stmt.body is None else replace(stmt.body, statements=kept + pinned)
    return replace(stmt, body=body)


def _without(stmt: ast.Statement, feature: str) -> Optional[ast.Statement]:
    """An `allow`/`forbid` statement without `feature` (None when nothing else is left)."""
    items = stmt.args[0].items if len(stmt.args) == 1 and isinstance(stmt.args[0], ast.TupleExpr) else stmt.args
    kept = tuple(i for i in items if not (isinstance(i, ast.Name) and i.text == feature))
    if not kept:
        return None
    return replace(stmt, args=kept if len(kept) == 1 else (ast.TupleExpr(kept, stmt.span),))


def _problems(error: FlowError) -> list[Problem]:
    return [Problem(code=d.code, message=d.message, help=d.help, notes=list(d.notes)) for d in error.diagnostics]


# ------------------------------------------------------------------------------ cache keys

def _plain(value):
    """A dumped IR without `location` and `doc`: moving a file or editing a comment keeps the key."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if k not in ("location", "doc")}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _file_hash(path: Path) -> Optional[str]:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _trial_material(spec: Spec, d: Deployment) -> dict:
    """What a pinned trial depends on: its cluster's deployments, models, GPUs, workloads, SLOs."""
    cluster = spec.clusters[d.cluster]
    mates = sorted((x for x in spec.deployments.values() if x.cluster == d.cluster), key=lambda x: x.name)
    workloads = {x.workload: spec.workloads[x.workload] for x in mates}
    traces = {t for w in workloads.values() for t in (w.arrival.trace, w.prompt.trace, w.output.trace) if t}
    return {"deployment": d.name,
            "deployments": [_plain(x.model_dump(mode="json")) for x in mates],
            "cluster": _plain(cluster.model_dump(mode="json")),
            "gpus": {g.gpu: _plain(spec.gpus[g.gpu].model_dump(mode="json")) for g in cluster.nodes},
            "workloads": {n: _plain(w.model_dump(mode="json")) for n, w in sorted(workloads.items())},
            "slos": {x.slo: _plain(spec.slos[x.slo].model_dump(mode="json")) for x in mates},
            "traces": {t: _file_hash(Path(t)) for t in sorted(traces)}}


# The modules whose code computes a trial's result, per evaluator: the compiler (with the
# standard library, its calibration and the grammar), this module's evaluators and, for
# "measure", the runtime. Data files count as code: calibration.json changes predictions.
_SIMULATE_CODE = ("flowc.compiler", "flowc.stdlib", "flowc.grammar", "flowc.autotune")
_CODE = {"simulate": _SIMULATE_CODE, "measure": _SIMULATE_CODE + ("flowc.runtime", "flowc.replay")}
_CODE_SUFFIXES = (".py", ".flow", ".json", ".lark")
# The libraries under that code whose versions can move a result (solver, random streams, kernels).
_LIBRARIES = {"simulate": ("ortools", "numpy"), "measure": ("ortools", "numpy", "torch", "triton")}


def _settings(evaluator: str, seed: int, measure_requests: int) -> dict:
    """What every trial's key holds besides the trial itself: the code that evaluates it, the
    library versions under that code, the evaluator and all its settings."""
    settings = {"flowc": __version__, "code": _code_hash(evaluator), "python": platform.python_version(),
                "libraries": _library_versions(evaluator), "evaluator": evaluator, "seed": seed,
                "compile_time_limit_s": COMPILE_TIME_LIMIT_S}
    if evaluator == "measure":  # measured timings belong to this machine, its devices, this many requests
        settings.update(host=platform.node(), devices=_devices(), requests=measure_requests)
    return settings


@functools.lru_cache(maxsize=None)
def _code_hash(evaluator: str) -> str:
    """A hash of the evaluator's code (`_CODE`) as installed, computed once per process: an
    edited tree or another build never reuses results, whatever its version says."""
    return _files_hash(_code_files(_CODE[evaluator]))


def _code_files(modules: tuple[str, ...]) -> list[tuple[str, Path]]:
    """(name, path) of each module's source and data files, packages recursively, without
    caches and hidden folders; the name is the module's plus the path inside it."""
    files = []
    for module in modules:
        spec = importlib.util.find_spec(module)
        if spec.submodule_search_locations is None:
            files.append((module, Path(spec.origin)))
            continue
        for root in map(Path, spec.submodule_search_locations):
            files += [(f"{module}/{path.relative_to(root).as_posix()}", path) for path in root.rglob("*")
                      if path.suffix in _CODE_SUFFIXES and path.is_file()
                      and not any(part.startswith((".", "__pycache__")) for part in path.relative_to(root).parts)]
    return sorted(files)


def _files_hash(files: list[tuple[str, Path]]) -> str:
    """sha256 over each file's name and content, in order: a renamed, added, removed or edited
    file changes it, a moved checkout does not."""
    digest = hashlib.sha256()
    for name, path in files:
        content = path.read_bytes()
        digest.update(f"{name}\0{len(content)}\0".encode())
        digest.update(content)
    return digest.hexdigest()


def _library_versions(evaluator: str) -> dict[str, Optional[str]]:
    versions: dict[str, Optional[str]] = {}
    for name in _LIBRARIES[evaluator]:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _devices() -> list[str]:
    """The CUDA devices "measure" may run on (none: the CPU, which `host` names)."""
    import torch

    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() \
        else []


def _key(material: dict) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:40]


def default_cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"  # XDG: relative paths are invalid
    return base / "flowc" / "autotune"


class _Cache:
    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def get(self, key: str) -> Optional[_Outcome]:
        try:
            data = json.loads((self.folder / f"{key}.json").read_text(encoding="utf-8"))
            if data["format"] != CACHE_FORMAT or data["key"] != key:
                return None
            return _Outcome.model_validate(data["outcome"])
        except (OSError, ValueError, KeyError, TypeError):  # missing or corrupt: evaluate again
            return None

    def put(self, key: str, outcome: _Outcome) -> None:
        entry = {"format": CACHE_FORMAT, "key": key, "outcome": json.loads(outcome.model_dump_json())}
        temporary = self.folder / f".{key}.{os.getpid()}.{threading.get_ident()}.tmp"
        temporary.write_text(json.dumps(entry), encoding="utf-8")
        os.replace(temporary, self.folder / f"{key}.json")  # atomic: readers see all of it or nothing


# ------------------------------------------------------------------- evaluating (workers too)

@dataclass(frozen=True)
class _Job:
    """One compile: a pinned spec, and the routers to evaluate its plan behind (None: as compiled)."""

    spec: Spec
    deployment: str
    evaluator: str
    seed: int
    routers: tuple[Optional[str], ...]
    measure_requests: int


def _run_job(job: _Job) -> list[_Outcome]:
    """One outcome per router of the job. Runs in worker processes: module level, picklable."""
    from flowc.compiler.optimize.compile import compile_spec

    try:
        plan = compile_spec(job.spec, seed=job.seed, time_limit_s=COMPILE_TIME_LIMIT_S)
    except FlowError as error:
        return [_Outcome(status="failed", problems=_problems(error))] * len(job.routers)
    dp = next(p for p in plan.deployments if p.name == job.deployment)
    if job.evaluator == "measure":
        return [_measure(job, plan, dp)]
    return [_Outcome(status="ok", plan=plan, metrics=_simulated(job.spec, dp, router, job.seed))
            for router in job.routers]


def _cost(spec: Spec, cluster: str, instances) -> Optional[float]:
    """usd/h of the instances' GPUs: the node group's price per GPU, else the GPU's own."""
    from flowc.compiler.model.topology import cluster_nodes, gpu_price

    nodes = cluster_nodes(spec.clusters[cluster])
    total = 0.0
    for ref in (ref for instance in instances for ref in instance.gpus):
        group = nodes[ref.node]
        price = gpu_price(group, spec.gpus[group.gpu])
        if price is None:
            return None
        total += price
    return total


def _group_summary(g: InstanceGroup, replicas: int) -> str:
    s = g.scheduler
    chunks = f" (chunks {s.chunk_size})" if s.chunk_size < s.max_batched_tokens else ""
    return (f"{replicas} x {g.role} {g.gpu} tp {g.tp} pp {g.pp}" + (f" ep {g.ep}" if g.ep > 1 else "")
            + f", {s.max_batched_tokens} tok{chunks}, {s.max_seqs} seqs, blocks {s.block_size}")


def _simulated(spec: Spec, dp: DeploymentPlan, router: Optional[str], seed: int) -> Metrics:
    """The plan's predictions, or (with a router) the plan re-simulated behind it the way the
    compiler measured it: as many requests, goodput bisected from the workload's rate when met."""
    p = dp.predicted
    shared = {"gpus": dp.gpus, "cost_per_hour": _cost(spec, dp.cluster, [i for g in dp.groups for i in g.instances]),
              "mode": dp.mode, "summary": "; ".join(_group_summary(g, g.replicas) for g in dp.groups)}
    if router is None:
        return Metrics(goodput_rps_per_gpu=p.goodput_rps_per_gpu, ttft_p90_ms=p.ttft_ms.p90, tpot_p90_ms=p.tpot_ms.p90,
                       meets_slo=p.meets_slo, goodput_rps=p.goodput_rps, **shared)
    from flowc.compiler.model.goodput import goodput_search
    from flowc.compiler.model.instance import plan_instances
    from flowc.compiler.model.simulator import simulate
    from flowc.compiler.model.workload import base_rate, sample_requests

    d = spec.deployments[dp.name]
    workload, slo = spec.workloads[d.workload], spec.slos[d.slo]
    instances = plan_instances(spec, dp)
    requests = sample_requests(workload, p.requests, seed=seed)
    result = simulate(requests, instances, router=router)
    if workload.is_batch:  # a batch's goodput: its throughput when it meets the SLO (as compile says)
        goodput = result.request_throughput if result.meets(slo) else 0.0
    else:  # the same requests and rates as the plan's goodput (model/goodput.py)
        goodput = goodput_search(instances, workload, slo, seed=seed, n=p.requests, router=router,
                                 lo=base_rate(workload) if result.meets(slo) else 0.0).goodput
    return Metrics(goodput_rps_per_gpu=goodput / dp.gpus, ttft_p90_ms=result.percentile("ttft", 90) * 1e3,
                   tpot_p90_ms=result.percentile("tpot", 90) * 1e3, meets_slo=result.meets(slo),
                   goodput_rps=goodput, **shared)


def _measure(job: _Job, plan: Plan, dp: DeploymentPlan) -> _Outcome:
    """Run the plan's colocated instance on this machine and judge the replay against the SLO
    with the simulator's own rules (a SimResult built from the measured times)."""
    import numpy as np

    from flowc.compiler.model.results import SimResult
    from flowc.replay import replay_requests
    from flowc.runtime.engine import Engine, EngineError

    spec, d = job.spec, job.spec.deployments[dp.name]
    try:
        engine = Engine.from_plan(plan, deployment=dp.name, seed=job.seed)
    except (EngineError, ValueError) as error:  # a plan the runtime cannot run here: fp8, pp > 1, ...
        return _Outcome(status="failed", plan=plan, problems=[Problem(message=str(error))])
    with engine:
        requests, _ = replay_requests(spec.workloads[d.workload], job.measure_requests, engine.config.vocab, job.seed,
                                      engine.config.max_context)
        outputs = engine.generate(requests, replay=True)
    served = np.array([o.error is None and o.finish_time is not None for o in outputs])
    arrival = np.array([o.arrival_time for o in outputs])
    first = np.array([o.first_token_time if o.first_token_time is not None else math.inf for o in outputs])
    finish = np.array([o.finish_time if o.finish_time is not None else math.inf for o in outputs])
    count = np.array([len(o.output_token_ids) for o in outputs])
    e2e = np.where(served, finish - arrival, math.inf)
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = np.where(count > 1, (finish - first) / np.maximum(count - 1, 1), np.nan)
    result = SimResult(ttft=np.where(served, first - arrival, math.inf), tpot=np.where(served, tpot, math.inf),
                       e2e=e2e, finished=served, rejected=~served, arrival=arrival,
                       finish=np.where(served, finish, np.nan),
                       output=count, instance=np.zeros(len(outputs), dtype=np.int64),
                       decode_instance=np.full(len(outputs), -1, dtype=np.int64), preemptions=0, iterations=0,
                       tokens_generated=int(count.sum()))
    slo = spec.slos[d.slo]
    group = engine.group
    gpus = group.tp * group.pp
    meets = result.meets(slo)
    goodput = result.request_throughput if meets else 0.0
    metrics = Metrics(goodput_rps_per_gpu=goodput / gpus, ttft_p90_ms=result.percentile("ttft", 90) * 1e3,
                      tpot_p90_ms=result.percentile("tpot", 90) * 1e3, gpus=gpus, meets_slo=meets, goodput_rps=goodput,
                      cost_per_hour=_cost(spec, dp.cluster, group.instances[:1]), mode="colocated",
                      summary=_group_summary(group, 1), measured=True)
    return _Outcome(status="ok", plan=plan, metrics=metrics)


def _ignore_interrupts() -> None:
    """Workers leave Ctrl-C to the parent, which stops them between trials."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _check_local_device(spec: Spec, d: Deployment) -> None:
    """'measure' runs plans here: the cluster's GPUs must be this machine's CPU or CUDA GPUs."""
    try:
        import torch
    except ImportError as error:
        raise AutotuneError(f"evaluator 'measure' needs the flowc runtime ({error})",
                            'install it with `pip install "flowc[runtime]"`') from None
    vendors = {spec.gpus[g.gpu].vendor for g in spec.clusters[d.cluster].nodes}
    if vendors <= {"cpu"} or (vendors == {"nvidia"} and torch.cuda.is_available()):
        return
    gpus = ", ".join(sorted({f"{g.gpu} ({spec.gpus[g.gpu].vendor})" for g in spec.clusters[d.cluster].nodes}))
    raise AutotuneError(f"evaluator 'measure' runs each plan on this machine, and deployment `{d.name}` runs on "
                        f"{gpus}, which this machine does not have" + ("" if torch.cuda.is_available()
                                                                        else " (torch sees no CUDA device)"),
                        "use evaluator 'simulate', or autotune a spec for `cpu-local` (see examples/tiny-cpu.flow)")


# ------------------------------------------------------------------------------- the search

def _objective(objective, d: Deployment, spec: Spec) -> tuple[str, Callable[[Metrics], float]]:
    if callable(objective):
        return "custom", objective
    name = objective or d.objective
    if name not in OBJECTIVES:
        best = did_you_mean(str(name), OBJECTIVES)
        raise AutotuneError(f"unknown objective `{name}`", f"did you mean `{best}`?" if best else
                            "objectives are " + ", ".join(OBJECTIVES) + ", or a function of the trial's Metrics")
    if name == "min_cost" and any(g.price is None and spec.gpus[g.gpu].price is None
                                  for g in spec.clusters[d.cluster].nodes):
        raise AutotuneError(f"objective min_cost needs prices, and cluster `{d.cluster}` has none",
                            "add `price 98 usd/h` to each node group, or choose another objective")
    return name, {"max_goodput_per_gpu": lambda m: m.goodput_rps_per_gpu, "min_gpus": lambda m: -m.gpus,
                  "min_cost": lambda m: -m.cost_per_hour, "min_ttft_p90": lambda m: -m.ttft_p90_ms,
                  "min_tpot_p90": lambda m: -m.tpot_p90_ms,
                  "max_throughput": lambda m: m.goodput_rps}[name]  # a batch's goodput is its throughput


class _Stop(Exception):
    """The search was cancelled (Event or Ctrl-C)."""


class _Tuner:
    def __init__(self, program: Program, d: Deployment, space: dict, score, evaluator: str, seed: int,
                 parallel: int, cache: _Cache, cancel, on_progress, budget: int, measure_requests: int):
        self.program, self.d, self.space, self.score = program, d, space, score
        self.evaluator, self.seed, self.parallel, self.cache, self.cancel = evaluator, seed, parallel, cache, cancel
        self.on_progress, self.budget, self.measure_requests = on_progress, budget, measure_requests
        self.configs = [dict(zip(space, values)) for values in itertools.product(*space.values())]
        self.order = {self._id(c): i for i, c in enumerate(self.configs)}
        self.total = min(budget, len(self.configs))
        self.trials: dict[tuple, Trial] = {}
        self.evaluations = self.cached = 0
        self.pool = None
        self.settings = _settings(evaluator, seed, measure_requests)

    @staticmethod
    def _id(config: dict) -> tuple:
        return tuple(config.values())

    # ---------------------------------------------------------------- evaluating a batch

    def evaluate(self, configs: list[dict]) -> None:
        """Evaluate the configurations not yet done, as many as the budget allows."""
        todo = [c for c in dict.fromkeys(map(self._id, configs)) if c not in self.trials]
        todo = todo[:self.budget - len(self.trials)]
        jobs: dict[str, tuple[_Job, list[tuple[tuple, str]]]] = {}  # one compile per pinned spec
        for ident in todo:
            if self.cancel.is_set():
                raise _Stop
            config = dict(zip(self.space, ident))
            pinned, material = self._pinned(config)
            key = _key({**self.settings, "router": config.get("router"), **material})
            outcome = self.cache.get(key)
            if outcome is not None:
                self._record(ident, key, outcome, fresh=False)
                continue
            if isinstance(pinned, list):  # the checker refused the configuration
                self._finish([(ident, key)], [_Outcome(status="failed", problems=pinned)])
                continue
            spec_key = _key(material)
            if spec_key not in jobs:
                jobs[spec_key] = (_Job(pinned, self.d.name, self.evaluator, self.seed, (), self.measure_requests), [])
            job, members = jobs[spec_key]
            jobs[spec_key] = (replace(job, routers=job.routers + (config.get("router"),)), members + [(ident, key)])
        self._run(list(jobs.values()))

    def _pinned(self, config: dict) -> tuple[Union[Spec, list[Problem]], dict]:
        """(the spec checked with the configuration pinned, restricted to its cluster; or the
        checker's problems) and what its cache key is made of."""
        try:
            spec = check(_pin(self.program, self.d.name, config))[0]
        except FlowError as error:
            sources = {n: s.text for n, s in self.program.sources.items() if not n.startswith("<std>")}
            return _problems(error), {"config": config, "sources": sources, "deployment": self.d.name}
        d = spec.deployments[self.d.name]
        spec = spec.model_copy(update={"deployments": {n: x for n, x in spec.deployments.items()
                                                       if x.cluster == d.cluster}})
        return spec, _trial_material(spec, d)

    def _run(self, jobs: list[tuple[_Job, list]]) -> None:
        if self.parallel == 1 or len(jobs) < 2:
            for job, members in jobs:
                if self.cancel.is_set():
                    raise _Stop
                self._finish(members, _run_job(job))
            return
        from concurrent.futures import FIRST_COMPLETED, wait

        pool = self._pool()
        pending = {pool.submit(_run_job, job): members for job, members in jobs}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    self._finish(pending.pop(future), future.result())
                if self.cancel.is_set():
                    raise _Stop
        finally:
            for future in pending:
                future.cancel()
            if pending:  # stopped: let running trials end (their results are kept), start no more
                self.pool.shutdown(wait=True, cancel_futures=True)
                self.pool = None
                for future, members in pending.items():
                    if future.done() and not future.cancelled() and future.exception() is None:
                        self._finish(members, future.result())

    def _pool(self):
        if self.pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(self.parallel, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_ignore_interrupts)
        return self.pool

    def _finish(self, members: list[tuple[tuple, str]], outcomes: list[_Outcome]) -> None:
        for (ident, key), outcome in zip(members, outcomes):
            self.cache.put(key, outcome)
            self._record(ident, key, outcome, fresh=True)

    def _record(self, ident: tuple, key: str, outcome: _Outcome, *, fresh: bool) -> None:
        value = None
        if outcome.metrics is not None:
            value = float(self.score(outcome.metrics))
        self.trials[ident] = Trial(config=dict(zip(self.space, ident)), objective_value=value, cached=not fresh,
                                   key=key, **dict(outcome))
        if fresh:
            self.evaluations += 1
        else:
            self.cached += 1
        self.on_progress(describe(self.trials[ident].config), len(self.trials), self.total)

    # ---------------------------------------------------------------- ranking and search

    def rank(self, ident: tuple) -> tuple:
        """Larger is better: meets the SLO > compiled > failed, then value, goodput, space order."""
        t = self.trials[ident]
        if t.metrics is None:
            return (0, -math.inf, -math.inf, -self.order[ident])
        value = t.objective_value if t.objective_value is not None and not math.isnan(t.objective_value) else -math.inf
        return (2 if t.meets_slo else 1, value, t.metrics.goodput_rps_per_gpu, -self.order[ident])

    @property
    def strategy(self) -> str:
        return "exhaustive" if len(self.configs) <= self.budget else "coordinate descent"

    def search(self) -> None:
        if self.strategy == "exhaustive":
            self.evaluate(self.configs)
            return
        rng = random.Random(self.seed)
        point = {k: _declared(self.d, k) if _declared(self.d, k) in v else v[len(v) // 2]
                 for k, v in self.space.items()}
        self.evaluate([point])
        while len(self.trials) < self.budget:
            self._descend(point)
            fresh = [c for c in self.configs if self._id(c) not in self.trials]
            if not fresh or len(self.trials) >= self.budget:
                return
            point = rng.choice(fresh)  # a local optimum: restart elsewhere
            self.evaluate([point])

    def _descend(self, point: dict) -> None:
        """Line searches, knob after knob, moving to the best of each line, until a full pass
        moves nothing. Moves are strict improvements of `rank`, so this ends."""
        moved = True
        while moved and len(self.trials) < self.budget:
            moved = False
            for knob, values in self.space.items():
                line = [{**point, knob: v} for v in values]
                self.evaluate(line)
                best = max((c for c in line if self._id(c) in self.trials), key=lambda c: self.rank(self._id(c)))
                if self.rank(self._id(best)) > self.rank(self._id(point)):
                    point, moved = best, True

    def ranked(self) -> list[Trial]:
        ids = sorted(self.trials, key=self.rank, reverse=True)
        frontier = _pareto([self.trials[i] for i in ids])
        return [self.trials[i].model_copy(update={"pareto": n in frontier}) for n, i in enumerate(ids)]


def _pareto(trials: list[Trial]) -> set[int]:
    """Indices of the trials that meet the SLO and that no other such trial dominates."""
    def vector(t: Trial) -> tuple[float, float, float]:
        m = t.metrics
        return (m.goodput_rps_per_gpu, -m.ttft_p90_ms, -m.tpot_p90_ms)  # all three: larger is better

    feasible = [(i, vector(t)) for i, t in enumerate(trials) if t.meets_slo]
    return {i for i, v in feasible
            if not any(all(a >= b for a, b in zip(w, v)) and w != v for _, w in feasible)}


def _quiet(what: str, done: int, total: Optional[int]) -> None:
    pass


def autotune(spec, space: Optional[dict] = None, objective: Union[str, Callable[[Metrics], float], None] = None,
             budget: int = 32, evaluator: str = "simulate", parallel: int = 1, deployment: Optional[str] = None,
             cache_dir: Union[str, os.PathLike, None] = None, cancel: Optional[threading.Event] = None,
             on_progress: Optional[Progress] = None, seed: int = 0, measure_requests: int = 16) -> AutotuneResult:
    """Search `space` (knob -> values; default: what the deployment leaves open) for the best
    configuration of `deployment` (required when the spec has several) under `objective`,
    evaluating at most `budget` configurations; see the module docstring for every contract.

    Raises FlowError when the spec itself is invalid, AutotuneError (a ValueError) for a space,
    objective or setting it cannot use; a configuration that fails is a failed trial."""
    start = time.perf_counter()
    program, checked = _source(spec)
    d = _deployment(checked, deployment)
    space = default_space(d) if space is None else _check_space(space)
    name, score = _objective(objective, d, checked)
    for value, what in ((budget, "budget"), (parallel, "parallel"), (measure_requests, "measure_requests")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise AutotuneError(f"{what} must be a whole number of at least 1, not {value!r}")
    if evaluator not in EVALUATORS:
        raise AutotuneError(f"unknown evaluator `{evaluator}`", "evaluators are simulate and measure")
    if evaluator == "measure":
        if "router" in space:
            raise AutotuneError("evaluator 'measure' runs one instance, which has no router",
                                "leave `router` out of the space, or use evaluator 'simulate'")
        _check_local_device(checked, d)
        parallel = 1  # one device: trials would disturb each other's timings
    tuner = _Tuner(program, d, space, score, evaluator, seed, parallel,
                   _Cache(Path(cache_dir) if cache_dir is not None else default_cache_dir()),
                   cancel if cancel is not None else threading.Event(), on_progress or _quiet, budget,
                   measure_requests)
    tuner.on_progress(f"autotuning `{d.name}`", 0, tuner.total)
    cancelled = False
    try:
        tuner.search()
    except (_Stop, KeyboardInterrupt):
        cancelled = True
    finally:
        if tuner.pool is not None:
            tuner.pool.shutdown(wait=True, cancel_futures=True)
    return AutotuneResult(spec_files=list(checked.files), deployment=d.name, space=space, objective=name,
                          evaluator=evaluator, seed=seed, budget=budget, strategy=tuner.strategy, trials=tuner.ranked(),
                          evaluations=tuner.evaluations, cached=tuner.cached, cancelled=cancelled,
                          elapsed_s=time.perf_counter() - start)


def _deployment(spec: Spec, name: Optional[str]) -> Deployment:
    names = list(spec.deployments)
    if name is None:
        if len(names) != 1:
            raise AutotuneError(f"the spec has {len(names)} deployments ({', '.join(names)})",
                                "choose one with deployment=NAME")
        return spec.deployments[names[0]]
    if name not in spec.deployments:
        best = did_you_mean(name, names)
        raise AutotuneError(f"the spec has no deployment `{name}`",
                            f"did you mean `{best}`?" if best else "it has " + ", ".join(names))
    return spec.deployments[name]


class _CallableModule(types.ModuleType):
    """`flowc.autotune(...)` calls the function even once `flowc.autotune` is this module:
    importing a submodule sets the package attribute of the same name to the module."""

    def __call__(self, *args, **kwargs) -> AutotuneResult:
        return autotune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
