"""Diagnostics: what flowc tells a user about a mistake, in rustc's layout or as JSON.

Codes are stable and grouped by phase: F01xx syntax, F02xx names and imports, F03xx types and
units, F04xx constraints, F05xx planning and infeasibility, F06xx calibration inputs (serving-
benchmark files), Wxxxx warnings. Every code has an explanation in `errors/CODE.md` (shown by
`flowc explain CODE`) and a fixture in the error catalog under tests/error_catalog.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from importlib import resources
from typing import Iterable, Mapping, Optional

from flowc.compiler.source import SourceFile, Span


@dataclass(frozen=True)
class Label:
    span: Span
    message: str = ""


@dataclass(frozen=True)
class Diagnostic:
    code: str
    message: str
    span: Span | None = None
    label: str = ""
    help: str | None = None
    notes: tuple[str, ...] = ()
    related: tuple[Label, ...] = ()

    @property
    def severity(self) -> str:
        return "warning" if self.code.startswith("W") else "error"


class FlowError(Exception):
    """Raised by the API when a spec is invalid; carries every diagnostic of the failing phase."""

    def __init__(self, diagnostics: Iterable[Diagnostic], sources: Mapping[str, SourceFile] | None = None):
        self.diagnostics = list(diagnostics)
        self.sources = dict(sources or {})
        super().__init__(render_text(self.diagnostics, self.sources, color=False))

    @property
    def codes(self) -> list[str]:
        return [d.code for d in self.diagnostics]


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """The closest candidate to a misspelt word, or None."""
    choices = list(choices)
    lowered = {c.lower(): c for c in choices}
    if word.lower() in lowered:
        return lowered[word.lower()]
    matches = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return matches[0] if matches else None


def suggestion_help(word: str, choices: Iterable[str], what: str) -> str:
    choices = sorted(set(choices))
    best = did_you_mean(word, choices)
    if best:
        return f"did you mean `{best}`?"
    shown = ", ".join(f"`{c}`" for c in choices[:12])
    more = f" (and {len(choices) - 12} more)" if len(choices) > 12 else ""
    return f"{what} are: {shown}{more}" if choices else f"there are no {what}"


# ---------------------------------------------------------------------------------- rendering

TAB_WIDTH = 4
_COLORS = {"error": "\x1b[1;31m", "warning": "\x1b[1;33m", "blue": "\x1b[1;34m", "bold": "\x1b[1m", "reset": "\x1b[0m"}

# Characters a terminal acts on rather than shows: C0 controls, DEL, C1 controls, and the bidi
# embeddings, overrides and isolates that reorder what follows them ("Trojan Source").
_ESCAPES = {
    **{c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))},
    **{ord("\t"): "\\t", ord("\n"): "\\n", ord("\r"): "\\r"},
    **{c: f"\\u{c:04x}" for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))},
}


def escape_control(text: str) -> str:
    """`text` safe to print on a terminal: every control character as a visible escape (`\\x1b`,
    `\\n`, `\\u202e`). User text (file names, source lines, values echoed in messages) could
    otherwise move the cursor, rewrite what was printed or reorder it."""
    return text.translate(_ESCAPES)


def first_control_character(text: str) -> Optional[str]:
    """The first character of `text` that `escape_control` escapes (a terminal or a shell acts on
    it rather than shows it), or None."""
    return next((c for c in text if ord(c) in _ESCAPES), None)


def render_text(diagnostics: Iterable[Diagnostic], sources: Mapping[str, SourceFile], *, color: bool = False) -> str:
    return "\n".join(_render_one(d, sources, color) for d in diagnostics)


SHOWN_COLUMNS = 160  # of a long source line, the columns around the span that a diagnostic shows


def _window(code: str, start: int, width: int) -> tuple[str, int, int]:
    """A long line cut to SHOWN_COLUMNS around the span (with `...` where it was cut), and the
    span's start and width in the cut line."""
    if len(code) <= SHOWN_COLUMNS:
        return code, start, width
    lo = max(0, min(start - SHOWN_COLUMNS // 3, len(code) - SHOWN_COLUMNS))
    hi = lo + SHOWN_COLUMNS
    cut = ("..." if lo else "") + code[lo:hi] + ("..." if hi < len(code) else "")
    shift = 3 if lo else 0
    return cut, start - lo + shift, max(1, min(width, hi - start))


def _shown(raw: str) -> str:
    """A source line as printed: tabs expanded, so that carets sit under the characters they
    mark, and control characters escaped, which widens the line by each escape."""
    return escape_control(raw.expandtabs(TAB_WIDTH))


def _render_one(d: Diagnostic, sources: Mapping[str, SourceFile], color: bool) -> str:
    def paint(text: str, style: str) -> str:
        return f"{_COLORS[style]}{text}{_COLORS['reset']}" if color else text

    safe = escape_control
    lines = [paint(f"{d.severity}[{d.code}]", d.severity) + paint(f": {safe(d.message)}", "bold")]
    spans = ([Label(d.span, d.label)] if d.span else []) + list(d.related)
    width = max((len(str(label.span.line)) for label in spans), default=1)
    gutter = " " * width
    for index, label in enumerate(spans):
        span = label.span
        arrow = "-->" if index == 0 else ":::"
        lines.append(f"{gutter}{paint(arrow, 'blue')} {safe(span.file)}:{span.line}:{span.col}")
        source = sources.get(span.file)
        if source is None:
            continue
        raw = source.line_text(span.line)
        stop = span.end_col - 1 if span.end_line == span.line else len(raw)
        # Columns in the printed line: a prefix's printed width is where the span starts.
        code = _shown(raw)
        start = len(_shown(raw[: span.col - 1]))
        span_width = len(_shown(raw[:stop])) - start
        code, start, span_width = _window(code, start, span_width)
        marker = ("^" if index == 0 else "-") * max(1, span_width)
        underline = " " * start + marker + (f" {safe(label.message)}" if label.message else "")
        lines.append(f"{gutter} {paint('|', 'blue')}")
        lines.append(f"{paint(str(span.line).rjust(width), 'blue')} {paint('|', 'blue')} {code}")
        lines.append(f"{gutter} {paint('|', 'blue')} {paint(underline, d.severity if index == 0 else 'blue')}")
    if d.help or d.notes:
        if spans:
            lines.append(f"{gutter} {paint('|', 'blue')}")
        lines.extend(f"{gutter} {paint('=', 'blue')} note: {safe(note)}" for note in d.notes)
        if d.help:
            lines.append(f"{gutter} {paint('=', 'blue')} help: {safe(d.help)}")
    return "\n".join(lines) + "\n"


def to_json(diagnostics: Iterable[Diagnostic], sources: Mapping[str, SourceFile]) -> dict:
    """A document shaped like `terraform validate -json`."""
    items = []
    for d in diagnostics:
        item: dict = {"severity": d.severity, "code": d.code, "summary": d.message, "detail": d.help or ""}
        if d.notes:
            item["notes"] = list(d.notes)
        if d.span:
            s = d.span
            item["range"] = {
                "filename": s.file,
                "start": {"line": s.line, "column": s.col, "byte": s.start},
                "end": {"line": s.end_line, "column": s.end_col, "byte": s.end},
            }
            source = sources.get(s.file)
            if source is not None:
                code = source.line_text(s.line)
                stop = s.end_col - 1 if s.end_line == s.line else len(code)
                item["snippet"] = {
                    "code": code,
                    "start_line": s.line,
                    "highlight_start_offset": s.col - 1,
                    "highlight_end_offset": stop,
                    "label": d.label,
                }
        if d.related:
            item["related"] = [
                {"filename": r.span.file, "line": r.span.line, "column": r.span.col, "message": r.message}
                for r in d.related
            ]
        items.append(item)
    errors = sum(1 for d in items if d["severity"] == "error")
    return {
        "format_version": "1.0",
        "valid": errors == 0,
        "error_count": errors,
        "warning_count": len(items) - errors,
        "diagnostics": items,
    }


def render_json(diagnostics: Iterable[Diagnostic], sources: Mapping[str, SourceFile]) -> str:
    return json.dumps(to_json(diagnostics, sources), indent=2) + "\n"


# ---------------------------------------------------------------------------------- catalog

def _errors_dir():
    return resources.files(__package__).joinpath("errors")


def known_codes() -> list[str]:
    return sorted(p.name[:-3] for p in _errors_dir().iterdir() if p.name.endswith(".md"))


def explanation(code: str) -> str | None:
    path = _errors_dir().joinpath(f"{code.upper()}.md")
    return path.read_text(encoding="utf-8") if path.is_file() else None
