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
        # Not zeroed: both kernel implementations mask every slot past a sequence's end (their
        # tests fill caches with NaN), and untouched pages of a large CPU pool stay unallocated.
        self.pool = torch.empty((2, layers, num_blocks, block_size, kv_heads, head_dim), dtype=dtype, device=device)

    def k(self, layer: int) -> torch.Tensor:
        return self.pool[0, layer]

    def v(self, layer: int) -> torch.Tensor:
        return self.pool[1, layer]

    @property
    def nbytes(self) -> int:
        return self.pool.numel() * self.pool.element_size()
