"""The activation workspace: one preallocated byte buffer laid out by the plan's arena.

The compiler packs the buffers of one step (`flowc.compiler.optimize.arena.step_buffers`, the step
graph the model code follows) into an arena and records each buffer's offset in the plan's
memory map. `Workspace.buffer(name, shape, dtype)` returns a view at that offset, after
checking that the request fits the size the step graph gave the buffer: a model that drifts
from the graph fails loudly instead of overwriting a live neighbour.

The graph sizes activations for bf16 (`memory.ACTIVATION_BYTES`). A runtime running wider
activations (fp32 on CPU, for exact comparisons) scales every offset and size by the ratio;
scaling a non-overlapping layout keeps it non-overlapping, so the plan's packing stays valid.

`HeapWorkspace` has the same interface and allocates each buffer: for runs without a plan
arena (model tests) and for buffer names the graph does not place.
"""

from __future__ import annotations

import math

import torch

from flowc.compiler.optimize.arena import step_buffers
from flowc.compiler.model.memory import ACTIVATION_BYTES
from flowc.compiler.spec import Model


class HeapWorkspace:
    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)

    def buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=self.device)


class Workspace:
    def __init__(self, model: Model, tp: int, max_batched_tokens: int, max_seqs: int, offsets: dict[str, int],
                 activation_dtype: torch.dtype, device: torch.device | str = "cpu"):
        sizes = {b.name: b.size_bytes for b in step_buffers(model, tp, max_batched_tokens, max_seqs)}
        missing = sorted(set(sizes) - set(offsets))
        if missing:
            raise ValueError(f"the plan's arena does not place {', '.join(missing[:5])}: recompile the plan")
        self.scale = max(1, math.ceil(activation_dtype.itemsize / ACTIVATION_BYTES))
        self.sizes = {name: size * self.scale for name, size in sizes.items()}
        self.offsets = {name: offsets[name] * self.scale for name in sizes}
        total = max(self.offsets[n] + self.sizes[n] for n in sizes)
        self.device = torch.device(device)
        self.memory = torch.empty(total, dtype=torch.uint8, device=self.device)

    @property
    def nbytes(self) -> int:
        return self.memory.numel()

    def buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if name not in self.offsets:
            raise KeyError(f"buffer {name!r} is not in the step graph (compiler/optimize/arena.py)")
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > self.sizes[name]:
            raise ValueError(f"buffer {name!r} needs {nbytes} B but the arena gives it {self.sizes[name]} B")
        start = self.offsets[name]
        return self.memory[start:start + nbytes].view(dtype).view(shape)
