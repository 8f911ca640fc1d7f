"""One-line texts of a plan's pieces, shared by the terminal report (`flowc compile`), the plan
tree (`flowc viz --format tree`), `flowc simulate` and `flowc estimate`: an instance's shape, its
scheduler, its memory per GPU, its GPUs, a figure's prediction interval and the SLO verdict."""

from __future__ import annotations

from typing import Mapping, Optional

from flowc.compiler.plan import GpuRef, InstanceGroup, MemoryMap, Predicted, Scheduler
from flowc.compiler.units import format_gib


def shape_text(tp: int, pp: int, ep: int = 1) -> str:
    return f"tp {tp} x pp {pp}" + (f" x ep {ep}" if ep > 1 else "")


def group_shape_text(g: InstanceGroup) -> str:
    return shape_text(g.tp, g.pp, g.ep)


def scheduler_text(s: Scheduler) -> str:
    chunks = f"chunks of {s.chunk_size}" if s.chunked_prefill else "no chunked prefill"
    return f"{s.max_batched_tokens} batched tokens, {chunks}, {s.max_seqs} sequences, blocks of {s.block_size}"


def memory_text(m: MemoryMap) -> str:
    offloaded = sum(m.offloaded.values())
    return (f"weights {format_gib(m.weights, 1)}, KV {format_gib(m.kv_cache, 1)} ({m.kv_blocks:,} blocks), "
            f"activations {format_gib(m.activations)}, reserve {format_gib(m.reserve, 1)}, "
            f"free {format_gib(m.free, 1)} of {format_gib(m.capacity, 1)}"
            + (f", offloaded {format_gib(offloaded, 1)}" if offloaded else ""))


def range_text(value: float, metric: str, interval: Mapping[str, tuple[float, float]], digits: int = 0) -> str:
    """` [170-260]`: the 80% prediction interval of `value`, a figure of `metric`
    (model/intervals.py); empty when the interval is unknown (a plan before 1.7)."""
    low, high = interval.get(metric, (1.0, 1.0))
    if low == high == 1.0:
        return ""
    return f" [{value * low:,.{digits}f}-{value * high:,.{digits}f}]"


def slo_verdict(p: Predicted) -> tuple[str, Optional[str]]:
    """(the verdict on the SLO, its color): met, met only at the optimistic end of the
    prediction interval, or missed."""
    if not p.meets_slo:
        return "misses the SLO", "red"
    if p.meets_slo_pessimistic is False:
        return "meets the SLO only at the optimistic end of its 80% interval", "yellow"
    return "meets the SLO", "green"


def gpu_ranges(refs: list[GpuRef]) -> str:
    """`n0g0-3` for GPUs 0..3 of node 0."""
    by_node: dict[int, list[int]] = {}
    for ref in refs:
        by_node.setdefault(ref.node, []).append(ref.index)
    parts = []
    for node, indices in by_node.items():
        indices.sort()
        runs, first, last = [], indices[0], indices[0]
        for i in indices[1:]:
            if i != last + 1:
                runs.append((first, last))
                first = i
            last = i
        runs.append((first, last))
        parts.append(f"n{node}g" + ",".join(f"{a}-{b}" if a != b else f"{a}" for a, b in runs))
    return " ".join(parts)
