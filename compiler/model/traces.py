"""Request traces: CSV files of arrival times with prompt and output lengths.

Two header layouts are read: Azure's public LLM traces (`TIMESTAMP,ContextTokens,
GeneratedTokens`, timestamps as `YYYY-MM-DD HH:MM:SS.fffffff`) and a plain one
(`arrival_time,prompt_tokens,output_tokens`, arrival times in seconds).
"""

from __future__ import annotations

import csv
import functools
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

LAYOUTS = (
    ("TIMESTAMP", "ContextTokens", "GeneratedTokens"),
    ("arrival_time", "prompt_tokens", "output_tokens"),
)


class TraceError(Exception):
    """A trace that cannot be read. The message says which line and field are wrong, never what
    they hold: a trace may be any file, and diagnostics travel further than the files they name."""

    def __init__(self, message: str, line: int | None = None):
        super().__init__(message)
        self.line = line


@dataclass(frozen=True)
class Trace:
    arrivals: tuple[float, ...]  # seconds since the first request
    prompt: tuple[int, ...]
    output: tuple[int, ...]

    @property
    def rate(self) -> float:
        """Mean arrival rate in requests/s."""
        span = self.arrivals[-1] - self.arrivals[0]
        return (len(self.arrivals) - 1) / span if span > 0 else float(len(self.arrivals))


def _timestamp(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    main, _, fraction = text.strip().partition(".")
    moment = datetime.fromisoformat(main)
    if moment.tzinfo is None:  # naive times are read as UTC: local clocks jump at DST changes
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp() + (float("0." + fraction) if fraction else 0.0)


def read_trace(path: Path) -> Trace:
    """Read and validate a trace. Raises TraceError with the line of the first bad row.
    Cached per file version, so an edited trace is read again."""
    try:
        stat = path.stat()
    except OSError as error:
        raise TraceError(f"cannot read the file: {error.strerror}") from None
    return _read_trace(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=16)
def _read_trace(path: Path, mtime_ns: int, size: int) -> Trace:
    try:
        handle = open(path, newline="", encoding="utf-8")
    except OSError as error:
        raise TraceError(f"cannot read the file: {error.strerror}") from None
    with handle:
        rows = csv.reader(handle)
        try:
            header = [h.strip() for h in next(rows)]
        except StopIteration:
            raise TraceError("the file is empty", 1) from None
        except (csv.Error, UnicodeDecodeError) as error:
            raise _not_csv(error, 1) from None
        layout = next((cols for cols in LAYOUTS if set(cols) <= set(header)), None)
        if layout is None:
            expected = " or ".join(",".join(cols) for cols in LAYOUTS)
            raise TraceError(f"the header has no {expected} columns", 1)
        where = [header.index(col) for col in layout]
        arrivals: list[float] = []
        prompt: list[int] = []
        output: list[int] = []
        try:
            for row in rows:
                line = rows.line_num
                if not row:
                    continue
                if len(row) <= max(where):
                    raise TraceError(f"the row has {len(row)} of the header's {len(header)} fields", line)
                try:
                    arrival = _timestamp(row[where[0]])
                except (ValueError, OverflowError):
                    raise TraceError(f"the arrival time ({layout[0]}) is neither a number of seconds nor a date "
                                     "and time", line) from None
                if not math.isfinite(arrival):
                    raise TraceError(f"the arrival time ({layout[0]}) is not a finite number", line)
                p, o = (_count(row[where[i]], f"{what} ({layout[i]})", line) for i, what in
                        ((1, "prompt length"), (2, "output length")))
                if arrivals and arrival < arrivals[-1]:
                    raise TraceError("arrival times must not go backwards", line)
                arrivals.append(arrival)
                prompt.append(p)
                output.append(o)
        except (csv.Error, UnicodeDecodeError) as error:
            raise _not_csv(error, rows.line_num) from None
    if not arrivals:
        raise TraceError("the file has a header but no requests", 2)
    start = arrivals[0]
    return Trace(tuple(a - start for a in arrivals), tuple(prompt), tuple(output))


def _count(text: str, field: str, line: int) -> int:
    """A row's token count, or TraceError naming its field."""
    try:
        count = int(text)
    except ValueError:
        raise TraceError(f"the {field} is not a whole number of tokens", line) from None
    if count < 0:
        raise TraceError(f"the {field} is negative", line)
    return count


def _not_csv(error: csv.Error | UnicodeDecodeError, line: int) -> TraceError:
    # csv's own reasons are fixed texts; a decoding error's would quote the file's bytes, and
    # its line is unknown (the file is decoded ahead of the rows read)
    if isinstance(error, UnicodeDecodeError):
        return TraceError("not UTF-8 text")
    return TraceError(f"not a CSV file: {error}", line)
