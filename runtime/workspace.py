"""The activation workspace: one preallocated byte buffer laid out by the plan's arena.

The compiler packs the buffers of one step (the step graph the model code follows,
`compiler/model/step_graph.py`) into an arena and records each buffer's offset and size in the
plan's memory map. `Workspace.buffer(name, shape, dtype)` returns a view at that offset, after
checking that the request fits the size the plan gave the buffer: a model that drifts from
the graph fails loudly instead of overwriting a live neighbour. The runtime reads the layout
from the plan alone; it never rebuilds the graph.

The graph sizes activations for bf16 (`geometry.ACTIVATION_BYTES`). A runtime running wider
activations (fp32 on CPU, for exact comparisons) scales every offset and size by the ratio;
scaling a non-overlapping layout keeps it non-overlapping, so the plan's packing stays valid.

`HeapWorkspace` has the same interface and allocates each buffer: for runs without a plan
arena (model tests).
"""

from __future__ import annotations

import math

import torch

from flowc.compiler.model.geometry import ACTIVATION_BYTES


class HeapWorkspace:
    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)

    def buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=self.device)


class Workspace:
    def __init__(self, offsets: dict[str, int], sizes: dict[str, int], activation_dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        if set(offsets) != set(sizes):
            unsized = sorted(set(offsets) ^ set(sizes))
            raise ValueError(f"the plan's arena gives {', '.join(unsized[:5])} an offset or a size but not both: "
                             "recompile the plan")
        self.scale = max(1, math.ceil(activation_dtype.itemsize / ACTIVATION_BYTES))
        self.sizes = {name: size * self.scale for name, size in sizes.items()}
        self.offsets = {name: offset * self.scale for name, offset in offsets.items()}
        total = max((self.offsets[n] + self.sizes[n] for n in sizes), default=0)
        self.device = torch.device(device)
        self.memory = torch.empty(total, dtype=torch.uint8, device=self.device)

    @property
    def nbytes(self) -> int:
        return self.memory.numel()

    def buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if name not in self.offsets:
            raise KeyError(f"buffer {name!r} is not in the plan's arena: recompile the plan with this flowc")
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > self.sizes[name]:
            raise ValueError(f"buffer {name!r} needs {nbytes} B but the arena gives it {self.sizes[name]} B")
        start = self.offsets[name]
        return self.memory[start:start + nbytes].view(dtype).view(shape)
