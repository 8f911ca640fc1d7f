"""The rich console every command prints with."""

from __future__ import annotations

import sys

from rich.console import Console


def make_console(color: bool = True) -> Console:
    """A console as wide as the terminal, or wide enough for every column when piped."""
    return Console(no_color=not color, highlight=False, width=None if sys.stdout.isatty() else 140)
