"""The public Python API. `flowc.load` is the front door: a path or spec text in, a checked
spec out, or a FlowError carrying every diagnostic."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from flowc.compiler.frontend.checker import check
from flowc.compiler.diagnostics import Diagnostic, FlowError
from flowc.compiler.frontend.imports import load_program
from flowc.compiler.source import SourceFile
from flowc.compiler.spec import Spec


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

    Raises FlowError with the diagnostics when the spec is invalid, FileNotFoundError when a
    path does not exist."""
    return check_sources(source, allow_outside=allow_outside).spec


def simulate(spec_or_plan: Spec | str | os.PathLike, workload=None, *, goodput: bool = False, seed: int = 0):
    """Simulate every deployment of a spec (a Spec, a path or spec text); returns a report per
    deployment. `workload` (a workload name or object) replaces each deployment's own."""
    from flowc.compiler.model.serving import simulate_spec

    spec = spec_or_plan if isinstance(spec_or_plan, Spec) else load(spec_or_plan)
    return simulate_spec(spec, workload=workload, with_goodput=goodput, seed=seed)


def compile(spec_or_path: Spec | str | os.PathLike, *, time_limit_s: float = 10.0, seed: int = 0):  # noqa: A001
    """Compile a spec (a Spec, a path or spec text) into a Plan; raises FlowError when the
    spec is invalid or no plan can serve it."""
    from flowc.compiler.optimize.compile import compile_spec

    spec = spec_or_path if isinstance(spec_or_path, Spec) else load(spec_or_path)
    return compile_spec(spec, time_limit_s=time_limit_s, seed=seed)


__all__ = ["load", "check_sources", "compile", "simulate", "Checked", "FlowError"]
