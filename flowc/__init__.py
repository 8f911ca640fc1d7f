"""flowc: declare models, SLOs and hardware in .flow files; compile them to deployment plans.

The API's functions load on first use, so `import flowc.runtime` (which imports this package
first) pulls in neither the parser nor the optimizer.
"""

from __future__ import annotations

import importlib

from flowc.compiler.diagnostics import Diagnostic, FlowError
from flowc.compiler.version import FLOWC_VERSION as __version__

_API = ("load", "check_sources", "compile", "estimate", "simulate")


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module("flowc.api"), name)
    if name == "autotune":  # the module, callable as the function (see flowc/autotune.py)
        return importlib.import_module("flowc.autotune")
    raise AttributeError(f"module 'flowc' has no attribute {name!r}")


__all__ = ["load", "compile", "estimate", "simulate", "autotune", "FlowError", "Diagnostic", "__version__"]
