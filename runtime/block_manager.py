"""The paged KV cache's block accounting, with prefix caching.

Blocks are the ints 0..num_blocks-1. Each is in exactly one state:
  free    no content; handed out first;
  used    referenced by at least one sequence (ref count >= 1);
  cached  ref count 0 but holds a full block of known content, findable by its hash and
          evicted least recently used first when free blocks run out.

Prefix caching. A full block's hash covers its parent's hash and its own token ids, so equal
hashes mean equal whole prefixes, and a block's KV (which depends on every token before it)
can be shared by any sequence whose known tokens start with that prefix. Only full blocks whose
every token is computed are registered. The hash is a 128-bit BLAKE2b digest rather than
Python's hash(): the int-tuple hash is unsalted and can be collided on purpose, which would let
one request attend to another's KV.

The protocol (the scheduler's): `admit` a sequence that holds no blocks (reusing cached
prefix blocks), `can_grow`/`grow` before each step to hold the slots it will write, `commit`
after a step advanced num_computed_tokens, `free` when it finishes or is preempted.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from typing import Iterable, Optional

from .sequence import Sequence


def block_hash(parent: Optional[bytes], token_ids: list[int]) -> bytes:
    """The chained hash of a full block: its parent's hash (None for the first block) and its
    token ids. All blocks of a manager have one size, so a first block's input (tokens only)
    never aliases a later block's (16 bytes of parent, then tokens)."""
    h = hashlib.blake2b(digest_size=16)
    if parent is not None:
        h.update(parent)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class BlockManager:
    """Reference-counted KV blocks with a hash-chained prefix cache (see the module docstring).

    Without prefix caching nothing is ever registered or cached: a block whose ref count
    drops to 0 is free.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_blocks
        self._hash: list[Optional[bytes]] = [None] * num_blocks  # set iff the block is registered
        self._hash_to_block: dict[bytes, int] = {}
        self._free: deque[int] = deque(range(num_blocks))
        self._cached: OrderedDict[int, None] = OrderedDict()  # least recently used first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free) - len(self._cached)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold num_tokens tokens."""
        return -(-num_tokens // self.block_size)

    def admit(self, seq: Sequence) -> int:
        """Start holding blocks for a sequence that holds none: reuse the longest chain of
        registered blocks matching its known tokens' full blocks, but leave at least one token
        to compute so the step yields logits. Sets num_computed_tokens and num_cached_tokens to
        the matched tokens and returns that number."""
        if seq.block_ids:
            raise ValueError(f"sequence {seq.request_id!r} already holds {len(seq.block_ids)} blocks")
        blocks: list[int] = []
        hashes: list[bytes] = []
        if self.enable_prefix_caching:
            tokens = seq.token_ids
            bs = self.block_size
            parent = None
            for i in range((seq.num_tokens - 1) // bs):
                h = block_hash(parent, tokens[i * bs:(i + 1) * bs])
                block = self._hash_to_block.get(h)
                if block is None:
                    break
                blocks.append(block)
                hashes.append(h)
                parent = h
        for block in blocks:
            if self._ref[block] == 0:
                del self._cached[block]  # revived: cached -> used
            self._ref[block] += 1
        seq.block_ids = blocks
        seq.block_hashes = hashes
        seq.num_computed_tokens = seq.num_cached_tokens = len(blocks) * self.block_size
        return seq.num_computed_tokens

    def _num_new_blocks(self, seq: Sequence, num_new_tokens: int) -> int:
        return max(0, self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_ids))

    def can_grow(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Whether seq can hold num_computed_tokens + num_new_tokens tokens (evicting cached
        blocks if need be)."""
        return self._num_new_blocks(seq, num_new_tokens) <= len(self._free) + len(self._cached)

    def can_hold(self, num_tokens: int) -> bool:
        """Whether a sequence holding no blocks could get the blocks of num_tokens tokens now."""
        return self.blocks_for(num_tokens) <= len(self._free) + len(self._cached)

    def grow(self, seq: Sequence, num_new_tokens: int) -> None:
        """Give seq the blocks to hold num_computed_tokens + num_new_tokens tokens: free blocks
        first, then the least recently used cached blocks (forgetting their content)."""
        needed = self._num_new_blocks(seq, num_new_tokens)
        if needed > len(self._free) + len(self._cached):
            raise RuntimeError(f"grow({seq.request_id!r}, {num_new_tokens}) needs {needed} blocks; "
                               f"{len(self._free)} free and {len(self._cached)} cached (call can_grow first)")
        for _ in range(needed):
            if self._free:
                block = self._free.popleft()
            else:
                block, _ = self._cached.popitem(last=False)
                del self._hash_to_block[self._hash[block]]
                self._hash[block] = None
            self._ref[block] = 1
            seq.block_ids.append(block)

    def commit(self, seq: Sequence) -> None:
        """Register the blocks of seq that became full and computed since the last commit. If an
        identical block is already registered, the mapping keeps pointing at it and seq's copy
        stays a plain used block (it becomes free, not cached, when released)."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        first, full = len(seq.block_hashes), seq.num_computed_tokens // bs
        if full <= first:
            return
        tokens = seq.token_ids
        for i in range(first, full):
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            h = block_hash(parent, tokens[i * bs:(i + 1) * bs])
            seq.block_hashes.append(h)
            if h in self._hash_to_block:
                continue
            block = seq.block_ids[i]
            self._hash_to_block[h] = block
            self._hash[block] = h

    def free(self, seq: Sequence) -> None:
        """Drop seq's references, tail first, so that the end of a chain is evicted before its
        start (a chain is only reusable from its start). Leaves num_computed_tokens alone."""
        for block in reversed(seq.block_ids):
            self._ref[block] -= 1
            if self._ref[block]:
                continue
            if self._hash[block] is None:
                self._free.append(block)
            else:
                self._cached[block] = None
        seq.block_ids = []
        seq.block_hashes = []

    def slot(self, seq: Sequence, position: int) -> int:
        """The KV-cache slot of seq's token at position."""
        return seq.block_ids[position // self.block_size] * self.block_size + position % self.block_size

    def check(self, seqs: Optional[Iterable[Sequence]] = None) -> None:
        """Assert the invariants: every block in exactly one state, ref counts, cached blocks
        hashed and free blocks not, the hash table and per-block hashes one-to-one. Given every
        sequence holding blocks, also that the ref counts are exactly their references."""
        free, cached = set(self._free), set(self._cached)
        used = {b for b in range(self.num_blocks) if self._ref[b] > 0}
        assert len(free) == len(self._free), "a block is twice in the free list"
        assert not (free & cached) and not (free & used) and not (cached & used), "a block is in two states"
        assert len(free) + len(cached) + len(used) == self.num_blocks, "a block is in no state"
        assert self.num_used == len(used)
        assert all(self._ref[b] >= 0 for b in range(self.num_blocks)), "negative ref count"
        assert all(self._hash[b] is None for b in free), "a free block has a hash"
        assert all(self._hash[b] is not None for b in cached), "a cached block has no hash"
        hashed = [b for b in range(self.num_blocks) if self._hash[b] is not None]
        assert len(hashed) == len(self._hash_to_block), "hash table and block hashes disagree"
        assert all(self._hash_to_block.get(self._hash[b]) == b for b in hashed), "hash table and block hashes disagree"
        if not self.enable_prefix_caching:
            assert not hashed and not cached, "prefix caching is off but blocks are cached"
        if seqs is None:
            return
        refs = [0] * self.num_blocks
        for seq in seqs:
            for block in seq.block_ids:
                refs[block] += 1
            assert seq.num_computed_tokens <= len(seq.block_ids) * self.block_size, \
                f"{seq.request_id!r} computed tokens beyond its blocks"
        assert refs == self._ref, "ref counts differ from the sequences' references"
