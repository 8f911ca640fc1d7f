"""The public Python API. `flowc.load` is the front door: a path or spec text in, a checked
spec out, or a FlowError carrying every diagnostic."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from flowc.compiler.diagnostics import Diagnostic, FlowError, suggestion_help
from flowc.compiler.frontend.check import check
from flowc.compiler.frontend.imports import load_program
from flowc.compiler.source import SourceFile
from flowc.compiler.spec import GPU, Link, Model, Spec


def looks_like_path(source: str | os.PathLike) -> bool:
    if isinstance(source, os.PathLike):
        return True
    return "\n" not in source and "{" not in source and source.strip().endswith(".flow")


@dataclass(frozen=True)
class Checked:
    """A checked spec with its warnings and the text of every file they may point into."""

    spec: Spec
    warnings: list[Diagnostic]
    sources: dict[str, SourceFile]


def check_sources(sources: list[str | os.PathLike] | str | os.PathLike, *, allow_outside: bool = False,
                  name: str = "<spec>") -> Checked:
    """Like `load`, and also return the warnings. Several paths are checked as one spec."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    paths = [Path(s) for s in sources if looks_like_path(s)]
    texts = [s for s in sources if not looks_like_path(s)]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
    if len(texts) > 1:
        raise ValueError("give at most one spec as text")
    text = SourceFile(name, texts[0]) if texts else None
    program = load_program(paths, text, allow_outside=allow_outside)
    spec, warnings = check(program)
    return Checked(spec, warnings, program.sources)


def load(source: str | os.PathLike, *, allow_outside: bool = False) -> Spec:
    """Load and check a spec from a path (`"chat.flow"`, a Path) or from spec text.

    Files the spec names (`use`, `trace`) must lie in the spec's directory tree (the working
    directory for spec text), symbolic links resolved; `allow_outside=True` lifts that (F0207).
    Raises FlowError with the diagnostics when the spec is invalid, FileNotFoundError when a
    path does not exist."""
    return check_sources(source, allow_outside=allow_outside).spec


def simulate(spec_or_plan: Spec | str | os.PathLike, workload=None, *, goodput: bool = False, seed: int = 0):
    """Simulate every deployment of a spec (a Spec, a path or spec text); returns a report per
    deployment. `workload` (a workload name or object) replaces each deployment's own."""
    from flowc.compiler.model.serving import simulate_spec

    spec = spec_or_plan if isinstance(spec_or_plan, Spec) else load(spec_or_plan)
    return simulate_spec(spec, workload=workload, with_goodput=goodput, seed=seed)


def estimate(model: str | Model, gpu: str | GPU, *, tp: int = 1, pp: int = 1, ep: int = 1,
             replicas: Optional[int] = None, dtype: Optional[str] = None, kv_dtype: Optional[str] = None,
             input_len: int, output_len: int, batch: Optional[int] = None, rate: Optional[float] = None,
             disaggregated: Optional[tuple[int, int]] = None, max_batched_tokens: Optional[int] = None,
             max_seqs: Optional[int] = None, block_size: Optional[int] = None, link: Optional[Link] = None,
             link_domain: Optional[int] = None, seed: int = 0, engine: Optional[str] = None):
    """Predict one configuration (no search): a standard library model and GPU by name (or spec
    objects), weights in `dtype` and KV in `kv_dtype` (default: the model's own). With `batch`
    a closed loop at that concurrency, with `rate` Poisson arrivals, with neither offline
    throughput; `replicas` colocated instances (default 1) or `disaggregated=(prefill, decode)`
    instances. Scheduler settings left out take the defaults: `max_seqs` the engine's own batch
    cap (`engines.default_max_seqs`: vLLM 256, TensorRT-LLM 2048, SGLang none), the others
    `plan.Scheduler`'s; `link`
    joins an instance's GPUs (default: the GPU's own interconnect), `link_domain` of them at
    most (default: an 8-GPU board). `engine` (vllm, sglang, trtllm or flowc; default: the
    standard library's, vllm) picks the kernels and the engine overheads predicted. Raises
    FlowError for an unknown name, an argument out of range, a parallelism the model cannot
    take or a configuration that does not fit."""
    from flowc.compiler.frontend.library import stdlib_spec
    from flowc.compiler.model.engines import ENGINES, default_max_seqs
    from flowc.compiler.model.estimate import DEFAULT_LINK_DOMAIN
    from flowc.compiler.model.estimate import estimate as estimate_config
    from flowc.compiler.plan import Scheduler
    from flowc.compiler.spec import DTYPE_BYTES

    stdlib = stdlib_spec()
    m = _stdlib_object(model, stdlib.models, "model")
    g = _stdlib_object(gpu, stdlib.gpus, "GPU")
    dtypes = {"weights": dtype or m.weights, "kv": kv_dtype or m.kv}
    for (name, value), given in zip(dtypes.items(), ("dtype", "kv_dtype")):
        if value not in DTYPE_BYTES:
            raise FlowError([Diagnostic("F0306", f"unknown {given} `{value}` for the {name}",
                                        help=suggestion_help(value, DTYPE_BYTES, "dtypes"))])
    m = m.model_copy(update=dtypes)
    # the engine's own batch cap unless one is given: what a benchmark of it at its defaults runs
    unknown = engine is not None and engine not in ENGINES  # (estimate says so: F0306)
    given = {"max_batched_tokens": max_batched_tokens, "block_size": block_size,
             "max_seqs": max_seqs if max_seqs is not None or unknown else default_max_seqs(engine)}
    scheduler = Scheduler(**{knob: value for knob, value in given.items() if value is not None})
    return estimate_config(m, g, link or stdlib.links[g.interconnect], tp=tp, pp=pp, ep=ep, replicas=replicas,
                           link_domain=DEFAULT_LINK_DOMAIN if link_domain is None else link_domain,
                           input_len=input_len, output_len=output_len, batch=batch, rate=rate,
                           disaggregated=disaggregated, scheduler=scheduler, seed=seed, engine=engine)


def _stdlib_object(name_or_object, table: dict, kind: str):
    if not isinstance(name_or_object, str):
        return name_or_object
    if name_or_object in table:
        return table[name_or_object]
    raise FlowError([Diagnostic("F0201", f"unknown {kind} `{name_or_object}`",
                                help=suggestion_help(name_or_object, table, f"standard library {kind}s"))])


def compile(spec_or_path: Spec | str | os.PathLike, *, time_limit_s: float = 10.0, seed: int = 0,
            on_progress=None):
    """Compile a spec (a Spec, a path or spec text) into a Plan; raises FlowError when the
    spec is invalid, deploys nothing (F0512) or no plan can serve it. `on_progress(what, done,
    total)` hears of the compiler's progress."""
    from flowc.compiler.optimize.compile import compile_spec

    spec = spec_or_path if isinstance(spec_or_path, Spec) else load(spec_or_path)
    progress = {} if on_progress is None else {"on_progress": on_progress}
    return compile_spec(spec, time_limit_s=time_limit_s, seed=seed, **progress)


__all__ = ["load", "check_sources", "compile", "estimate", "simulate", "Checked", "FlowError"]
