"""flowc: declare models, SLOs and hardware in .flow files; compile them to deployment plans."""

from __future__ import annotations

__version__ = "0.1.0"

from flowc.api import load  # noqa: E402
from flowc.compiler.diagnostics import Diagnostic, FlowError  # noqa: E402

__all__ = ["load", "FlowError", "Diagnostic", "__version__"]
