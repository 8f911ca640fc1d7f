"""The paged KV cache: one preallocated pool holding every layer's keys and values.

Layout (the one `kernels_torch` documents): layer l's keys are `k(l)` of shape
[num_blocks, block_size, kv_heads, head_dim], values `v(l)` alike; a token's slot is
`block * block_size + offset`. `layers` and `kv_heads` are this rank's: the layers of its
pipeline stage (indexed from 0) and its KV heads (`RankLayout.kv_heads`).
"""

from __future__ import annotations

import torch

__all__ = ["KVCache"]


class KVCache:
    def __init__(self, layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.layers, self.num_blocks, self.block_size = layers, num_blocks, block_size
        # Zeroed, not empty: a kernel that reads a whole block and masks the unused slots
        # must not meet NaN garbage (0 * NaN is NaN).
        self.pool = torch.zeros((2, layers, num_blocks, block_size, kv_heads, head_dim), dtype=dtype, device=device)

    def k(self, layer: int) -> torch.Tensor:
        return self.pool[0, layer]

    def v(self, layer: int) -> torch.Tensor:
        return self.pool[1, layer]

    @property
    def nbytes(self) -> int:
        return self.pool.numel() * self.pool.element_size()
