"""Source text and spans: where every AST node and diagnostic points."""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Span:
    """A range of one source file. Offsets are 0-based, lines and columns 1-based."""

    file: str
    start: int
    end: int
    line: int
    col: int
    end_line: int
    end_col: int

    def to(self, other: Span) -> Span:
        """The span from the start of self to the end of other."""
        return Span(self.file, self.start, other.end, self.line, self.col, other.end_line, other.end_col)


@dataclass(frozen=True)
class SourceFile:
    """One file's text, its display name and its line table."""

    name: str
    text: str

    def __post_init__(self) -> None:
        lengths = (len(line) + 1 for line in self.text.split("\n")[:-1])  # str.split runs in C: fast on big files
        object.__setattr__(self, "_line_starts", list(itertools.accumulate(lengths, initial=0)))

    def position(self, offset: int) -> tuple[int, int]:
        starts = self._line_starts  # type: ignore[attr-defined]
        index = bisect.bisect_right(starts, offset) - 1
        return index + 1, offset - starts[index] + 1

    def span(self, start: int, end: int) -> Span:
        line, col = self.position(start)
        end_line, end_col = self.position(end)
        return Span(self.name, start, end, line, col, end_line, end_col)

    def line_text(self, line: int) -> str:
        starts = self._line_starts  # type: ignore[attr-defined]
        begin = starts[line - 1]
        end = starts[line] - 1 if line < len(starts) else len(self.text)
        return self.text[begin:end].rstrip("\r")

    @property
    def end_span(self) -> Span:
        return self.span(len(self.text), len(self.text))
