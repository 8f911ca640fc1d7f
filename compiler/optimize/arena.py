"""The activation arena: every transient buffer of one engine step at a fixed offset in one
preallocated workspace, so the runtime never calls an allocator inside a step.

The buffers and their lifetimes come from the step graph (`model/step_graph.py`, which also
holds the lower bound); this module lays them out, which is dynamic storage allocation (DSA):
each buffer is a rectangle in the time x offset plane, its x extent fixed by its lifetime, its
y extent (the offset) chosen; rectangles must not overlap and the arena size is the highest
top. DSA is NP-hard; the peak of live bytes is a lower bound that is not always achievable.
`greedy` is the classic greedy-by-size best-fit (TFLite's GreedyBySize, Pisarchyk and Lee,
"Efficient Memory Management for Deep Neural Net Inference", 2020); `pack` is a CP-SAT model
with NoOverlap2D warm-started from it, so it is never worse.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

from flowc.compiler.model.step_graph import ALIGNMENT, Buffer, aligned_units, lower_bound, step_buffers
from flowc.compiler.plan import Scheduler
from flowc.compiler.spec import Model


@dataclass(frozen=True)
class ArenaLayout:
    """Where each buffer sits (byte offsets, multiples of `alignment`) and its size, the arena
    size and how it compares with the lower bound and the greedy layout. `status`: CP-SAT's
    status name ("OPTIMAL", "FEASIBLE"), or "OPTIMAL" without a solve when greedy already meets
    the bound."""

    offsets: dict[str, int]
    sizes: dict[str, int]
    size: int
    lower_bound: int
    greedy_size: int
    status: str
    alignment: int = ALIGNMENT
    solve_time_s: float = 0.0
    solver: str = field(default="cp-sat", compare=False)

    @property
    def ratio(self) -> float:
        """Arena size over the lower bound (1.0: provably optimal)."""
        return self.size / self.lower_bound if self.lower_bound else 1.0


# ------------------------------------------------------------------------------------ packing


def _greedy_units(buffers: list[Buffer], units: list[int]) -> list[int]:
    """Greedy by size, best fit: largest first (ties: longer lifetime, earlier start, name);
    each goes into the smallest gap between the placed buffers alive with it that holds it,
    else on top of them."""
    order = sorted(range(len(buffers)), key=lambda i: (-units[i], -(buffers[i].end - buffers[i].start),
                                                       buffers[i].start, buffers[i].name))
    offsets = [0] * len(buffers)
    placed: list[int] = []
    for i in order:
        b = buffers[i]
        busy = sorted((offsets[j], offsets[j] + units[j]) for j in placed
                      if units[j] > 0 and b.alive_with(buffers[j]))
        best, best_gap, top = None, None, 0
        for lo, hi in busy:
            gap = lo - top
            if gap >= units[i] and (best_gap is None or gap < best_gap):
                best, best_gap = top, gap
            top = max(top, hi)
        offsets[i] = best if best is not None else top
        placed.append(i)
    return offsets


def greedy(buffers: list[Buffer], alignment: int = ALIGNMENT) -> tuple[dict[str, int], int]:
    """The baseline layout: (byte offsets by name, arena size in bytes)."""
    units = [aligned_units(b.size_bytes, alignment) for b in buffers]
    offs = _greedy_units(buffers, units)
    size = max((o + u for o, u in zip(offs, units)), default=0)
    return {b.name: o * alignment for b, o in zip(buffers, offs)}, size * alignment


def pack(buffers: list[Buffer], time_limit_s: float = 5.0, alignment: int = ALIGNMENT,
         workers: Optional[int] = None) -> ArenaLayout:
    """Minimize the arena: CP-SAT over offsets (in `alignment` units) with NoOverlap2D of the
    (lifetime x [offset, offset + size)) rectangles, the arena at least every buffer's top,
    bounded below by the peak of live bytes and above by the greedy layout, which is also the
    solver's hint (so the answer is never worse than greedy). Greedy meeting the lower bound
    is optimal and skips the solve."""
    sizes = {b.name: b.size_bytes for b in buffers}
    if len(sizes) != len(buffers):
        raise ValueError("buffer names must be unique")
    units = [aligned_units(b.size_bytes, alignment) for b in buffers]
    g_offs = _greedy_units(buffers, units)
    g_size = max((o + u for o, u in zip(g_offs, units)), default=0)
    lb = aligned_units(lower_bound(buffers, alignment), alignment)
    greedy_layout = {b.name: o * alignment for b, o in zip(buffers, g_offs)}
    if g_size <= lb:
        return ArenaLayout(greedy_layout, sizes, g_size * alignment, lb * alignment, g_size * alignment, "OPTIMAL",
                           alignment, 0.0, "greedy")

    from ortools.sat.python import cp_model

    model = cp_model.CpModel()
    arena = model.new_int_var(lb, g_size, "arena")
    xs, ys, ys_vars = [], [], []
    for i, b in enumerate(buffers):
        if units[i] == 0:
            ys_vars.append(None)
            continue
        y = model.new_int_var(0, g_size - units[i], f"y{i}")
        ys_vars.append(y)
        xs.append(model.new_fixed_size_interval_var(b.start, b.end - b.start, f"x{i}"))
        ys.append(model.new_fixed_size_interval_var(y, units[i], f"yi{i}"))
        model.add(y + units[i] <= arena)
        model.add_hint(y, g_offs[i])
    model.add_no_overlap_2d(xs, ys)
    model.add_hint(arena, g_size)
    model.minimize(arena)

    solver = cp_model.CpSolver()
    # A plan records these offsets, so they must not depend on the machine that compiled it: one
    # worker, stopped by deterministic time (a parallel portfolio returns a different optimum per
    # core count). One worker proves every stdlib step graph optimal within 0.8 s; the wall-clock
    # cap only guards a machine far slower than that.
    solver.parameters.num_workers = workers or 1
    solver.parameters.max_deterministic_time = time_limit_s
    solver.parameters.max_time_in_seconds = 4 * time_limit_s
    # By default CP-SAT installs a C handler for SIGINT that ends the search as if out of time (a
    # wrong result, silently) and stays installed after the solve, where a Ctrl-C exits the
    # process without Python's cleanup: leave Ctrl-C to Python, a KeyboardInterrupt after the solve.
    solver.parameters.catch_sigint_signal = False
    t0 = time.perf_counter()
    status = solver.solve(model)
    elapsed = time.perf_counter() - t0
    name = solver.status_name(status)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE) or solver.value(arena) >= g_size:
        # no better layout found in time: keep greedy (optimal when the solver proved it)
        return ArenaLayout(greedy_layout, sizes, g_size * alignment, lb * alignment, g_size * alignment,
                           "OPTIMAL" if status == cp_model.OPTIMAL else "FEASIBLE", alignment, elapsed, "greedy")
    offsets = {b.name: (solver.value(y) if y is not None else 0) * alignment for b, y in zip(buffers, ys_vars)}
    return ArenaLayout(offsets, sizes, solver.value(arena) * alignment, lb * alignment, g_size * alignment, name,
                       alignment, elapsed)


def pack_step(model: Model, tp: int, scheduler: Scheduler, ep: int = 1) -> ArenaLayout:
    """The packed arena of one engine step of `model` on a TP rank at `scheduler`'s token budget
    and sequence cap: what a plan's memory map records and the runtime lays its buffers out by."""
    return pack(step_buffers(model, tp, scheduler.max_batched_tokens, scheduler.max_seqs, ep))
