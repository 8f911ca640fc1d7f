"""flowc: declare models, SLOs and hardware in .flow files; compile them to deployment plans."""

from __future__ import annotations

__version__ = "0.1.0"

from flowc.api import compile, load, simulate  # noqa: E402,A004
from flowc.compiler.diagnostics import Diagnostic, FlowError  # noqa: E402


def __getattr__(name: str):
    # `estimate` pulls in the cost model and simulator (and numpy): load it on first use only.
    if name == "estimate":
        from flowc.compiler.model.estimate import estimate

        return estimate
    if name == "autotune":  # the module, callable as the function (see flowc/autotune.py)
        import importlib

        return importlib.import_module("flowc.autotune")
    raise AttributeError(f"module 'flowc' has no attribute {name!r}")


__all__ = ["load", "compile", "estimate", "simulate", "autotune", "FlowError", "Diagnostic", "__version__"]
