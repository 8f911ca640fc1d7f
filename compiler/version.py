"""flowc's version, from the installed package's metadata: the one place it is read (plans
record it, `flowc --version` prints it), so the compiler never imports the `flowc` package."""

from __future__ import annotations

from importlib import metadata

try:
    FLOWC_VERSION = metadata.version("flowc")
except metadata.PackageNotFoundError:  # run from a source tree that was never installed
    FLOWC_VERSION = "0+unknown"
