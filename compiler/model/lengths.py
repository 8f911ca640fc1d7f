"""The longest request a workload can send: what the checker's capacity checks, the optimizer's
candidate shapes and the verifier size KV caches for. Reads no more than the spec and its
trace files (no numpy), so `flowc check` can use it."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from flowc.compiler.model.traces import read_trace
from flowc.compiler.spec import Lengths, Workload


def length_bound(lengths: Lengths, column: Literal["prompt", "output"]) -> Optional[int]:
    """The largest length `lengths` can produce; None when unbounded. Trace lengths without a
    `max` are bounded by the trace's largest (`column` says which of its columns)."""
    if lengths.kind == "trace" and lengths.max is None and lengths.trace is not None:
        return max(getattr(read_trace(Path(lengths.trace)), column))
    return lengths.upper_bound


def longest_request(workload: Workload, role: str = "colocated") -> Optional[int]:
    """The most tokens one request holds in an instance of `role`: prompt + output, or the
    prompt alone in a prefill instance. None when a length is unbounded."""
    prompt = length_bound(workload.prompt, "prompt")
    if role == "prefill":
        return prompt
    output = length_bound(workload.output, "output")
    return None if prompt is None or output is None else prompt + output
