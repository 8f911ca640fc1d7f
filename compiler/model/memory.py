"""The memory budget of one GPU of an instance: the one formula the checker, the optimizer,
`flowc.estimate`, the verifier and the runtime size the KV cache with.
"""

from __future__ import annotations

from dataclasses import dataclass

from flowc.compiler.diagnostics import Diagnostic
from flowc.compiler.model.geometry import kv_bytes_per_token_per_rank, weight_bytes_per_rank
from flowc.compiler.model.step_graph import lower_bound, step_buffers
from flowc.compiler.plan import Scheduler
from flowc.compiler.spec import Model
from flowc.compiler.units import format_gib

GPU_MEMORY_UTILIZATION = 0.9  # share of device memory an engine takes (vLLM's default)
# Runtime reserve per GPU: assumptions, not measurements. CUDA context and allocator slack
# (~1 GiB), NCCL buffers when the instance spans GPUs, CUDA-graph memory pools.
CONTEXT_RESERVE = 1 << 30
NCCL_RESERVE = 256 << 20
GRAPH_RESERVE = 512 << 20
# A CPU device has no CUDA context, graphs or NCCL: its reserve is the engine process itself
# (Python, torch, kernel temporaries): flowc's engine peaks near 0.3 GiB beside its KV pool on
# the tiny model (`/usr/bin/time -v flowc run`), rounded up.
CPU_RESERVE = 512 << 20


def activation_peak_bytes(m: Model, tp: int, max_batched_tokens: int, max_seqs: int, ep: int = 1) -> int:
    """Peak transient memory of one iteration at the token budget on one TP rank: the peak of
    live bytes of the step graph, which the arena packing (optimize/arena.py) reaches."""
    return lower_bound(step_buffers(m, tp, max_batched_tokens, max_seqs, ep))


def runtime_reserve_bytes(gpus_per_instance: int, vendor: str = "nvidia") -> int:
    if vendor == "cpu":
        return CPU_RESERVE
    return CONTEXT_RESERVE + GRAPH_RESERVE + (NCCL_RESERVE if gpus_per_instance > 1 else 0)


@dataclass(frozen=True)
class MemoryBudget:
    """How one GPU of an instance spends its memory, in bytes, and the instance's KV capacity."""

    capacity: int
    usable: int
    weights: int
    activations: int
    reserve: int
    kv: int  # bytes left for the KV cache on this GPU (negative: does not fit)
    kv_bytes_per_token: int  # on this GPU
    block_size: int
    kv_blocks: int  # of the instance: every GPU holds its share of each block
    kv_tokens: int

    @property
    def fits(self) -> bool:
        return self.kv_blocks > 0

    def by_category(self) -> dict[str, int]:
        free = self.capacity - self.weights - self.activations - self.reserve - max(self.kv, 0)
        return {"weights": self.weights, "kv_cache": max(self.kv, 0), "activations": self.activations,
                "reserve": self.reserve, "free": free}


def unfit_diagnostic(budget: MemoryBudget, m: Model, gpu: str, tp: int, pp: int, help: str) -> Diagnostic:
    """F0503 for a budget that leaves no room for KV (`not budget.fits`), with the figures."""
    return Diagnostic("F0503", f"{m.name} at {m.weights} does not fit on {tp * pp} x {gpu} (tp {tp}, pp {pp})",
                      help=help, notes=(f"per GPU: weights {format_gib(budget.weights, 1)} + activations "
                                        f"{format_gib(budget.activations, 1)} + reserve "
                                        f"{format_gib(budget.reserve, 1)} > {format_gib(budget.usable, 1)} usable",))


def memory_budget(m: Model, gpu_memory: int, *, tp: int = 1, pp: int = 1, ep: int = 1,
                  scheduler: Scheduler = Scheduler(), utilization: float = GPU_MEMORY_UTILIZATION,
                  vendor: str = "nvidia") -> MemoryBudget:
    """The one budget formula: the planner, the verifier and the runtime all size KV with it.
    KV gets what is left of `utilization` x memory after weights, activations and reserve."""
    usable = int(gpu_memory * utilization)
    weights = weight_bytes_per_rank(m, tp, pp)
    activations = activation_peak_bytes(m, tp, scheduler.max_batched_tokens, scheduler.max_seqs, ep)
    reserve = runtime_reserve_bytes(tp * pp, vendor)
    kv = usable - weights - activations - reserve
    per_token = kv_bytes_per_token_per_rank(m, tp, pp)
    block_size = scheduler.block_size
    blocks = max(0, kv // (per_token * block_size))
    return MemoryBudget(capacity=gpu_memory, usable=usable, weights=weights, activations=activations,
                        reserve=reserve, kv=kv, kv_bytes_per_token=per_token, block_size=block_size,
                        kv_blocks=blocks, kv_tokens=blocks * block_size)
