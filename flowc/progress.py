"""Progress bars on stderr for long compiles and simulations, and silence everywhere else.

`with progress("simulating", total=12, enabled=not out.json) as bar:` yields a bar with
`advance()`; it draws (with rich, transient: gone when done) only when stderr is a terminal,
TERM is not `dumb` and `enabled` is true, so pipes, CI logs and --json output stay exactly as
they were. Color follows `color` (pass the command's `out.color`: NO_COLOR and --no-color turn
color off, not the bar).

The bar is also the callback the compiler takes, `on_progress(what, done, total)`, so
`compiler/` reports progress without importing rich or flowc.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator, Optional


class _Silent:
    def advance(self, steps: int = 1) -> None:
        pass

    def __call__(self, what: str, done: int, total: Optional[int]) -> None:
        pass


class _Bar:
    def __init__(self, bar, task):
        self._bar, self._task = bar, task

    def advance(self, steps: int = 1) -> None:
        self._bar.advance(self._task, steps)

    def __call__(self, what: str, done: int, total: Optional[int]) -> None:
        """The compiler's callback: `done` of `total` steps (None: unknown), now doing `what`."""
        self._bar.update(self._task, description=what, completed=done, total=total)


def shows_progress(enabled: bool = True) -> bool:
    """Whether a bar would be drawn: only for a person watching a terminal."""
    return enabled and sys.stderr.isatty() and os.environ.get("TERM") != "dumb"


@contextmanager
def progress(description: str, total: Optional[int] = None, *, enabled: bool = True,
             color: bool = True) -> Iterator[_Bar | _Silent]:
    """A progress bar of `total` steps (None: an indeterminate one) on stderr; see the module
    docstring for when it is drawn."""
    if not shows_progress(enabled):
        yield _Silent()
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True, no_color=not color)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        yield _Bar(bar, bar.add_task(description, total=total))
