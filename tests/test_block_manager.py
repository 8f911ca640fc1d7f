"""The block manager: admit/grow/commit/free, LRU eviction, chained prefix hits, the
never-whole-sequence cap; then a seeded random drive of the real Scheduler + BlockManager that
checks the invariants and the KV contents every step."""

from __future__ import annotations

import random

import pytest

from flowc.runtime.block_manager import BlockManager
from flowc.runtime.scheduler import Scheduler
from flowc.runtime.sequence import SamplingParams, Sequence, SequenceStatus


def make(rid: str, prompt: list[int], **params) -> Sequence:
    return Sequence(rid, list(prompt), SamplingParams(**params))


def compute(bm: BlockManager, seq: Sequence, num: int | None = None) -> None:
    """Stand in for a step: grow, compute num tokens (default: all known ones), commit."""
    num = seq.num_tokens - seq.num_computed_tokens if num is None else num
    bm.grow(seq, num)
    seq.num_computed_tokens += num
    bm.commit(seq)


def run_and_free(bm: BlockManager, prompt: list[int]) -> Sequence:
    seq = make("done", prompt)
    bm.admit(seq)
    compute(bm, seq)
    bm.free(seq)
    return seq


A, B, C, D = [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]


def test_admit_grow_commit_free_then_prefix_hit():
    bm = BlockManager(8, 4)
    a = make("a", A + B + [20, 21])
    assert bm.admit(a) == 0 and a.block_ids == []
    assert bm.can_grow(a, 10) and not bm.can_grow(a, 33)
    bm.grow(a, 10)
    assert len(a.block_ids) == 3 and (bm.num_free, bm.num_used, bm.num_cached) == (5, 3, 0)
    a.num_computed_tokens = 10
    bm.commit(a)
    assert len(a.block_hashes) == 2  # the third block is not full
    bm.check([a])
    blocks = list(a.block_ids)
    bm.free(a)
    assert a.block_ids == [] and (bm.num_free, bm.num_used, bm.num_cached) == (6, 0, 2)
    bm.check([])

    b = make("b", A + B + [30])
    assert bm.admit(b) == 8
    assert b.block_ids == blocks[:2] and b.num_computed_tokens == b.num_cached_tokens == 8
    assert (bm.num_free, bm.num_used, bm.num_cached) == (6, 2, 0)  # revived: cached -> used
    c = make("c", A + [40])
    assert bm.admit(c) == 4 and c.block_ids == blocks[:1]  # a shared block: ref count 2
    bm.check([b, c])
    bm.free(b)
    assert (bm.num_used, bm.num_cached) == (1, 1)
    bm.check([c])


def test_only_full_computed_blocks_are_registered():
    bm = BlockManager(8, 4)
    a = make("a", A + B + C + [1])
    bm.admit(a)
    compute(bm, a, 6)  # a chunk: block 0 full and computed, block 1 half computed
    assert len(a.block_hashes) == 1
    assert bm.admit(make("b", A + B + C + [2])) == 4
    compute(bm, a, 7)
    assert len(a.block_hashes) == 3
    assert bm.admit(make("c", A + B + C + [2])) == 12


def test_the_match_never_covers_the_whole_sequence():
    bm = BlockManager(8, 4)
    run_and_free(bm, A + B + C)
    assert bm.admit(make("x", A + B + C)) == 8  # (12 - 1) // 4 = 2 blocks: one token left to compute
    assert bm.admit(make("y", A + B)) == 4
    assert bm.admit(make("z", A)) == 0
    assert bm.admit(make("w", A + B + C + [7])) == 12


def test_hashes_chain_the_whole_prefix():
    bm = BlockManager(16, 4)
    run_and_free(bm, A + B + [0])
    assert bm.admit(make("shares-first", A + C + [0])) == 4
    assert bm.admit(make("shares-second-only", C + B + [0])) == 0
    assert bm.admit(make("both", A + B + [0])) == 8


def test_outputs_are_matched_like_prompt_tokens():
    bm = BlockManager(8, 4)
    a = make("a", A + [5, 6])
    bm.admit(a)
    compute(bm, a)
    a.output_token_ids += [7, 8, 9]  # known tokens A + B + [9]
    compute(bm, a)
    bm.free(a)
    assert bm.admit(make("b", A + B + [0])) == 8


def test_lru_eviction_drops_hashes_tail_first():
    bm = BlockManager(4, 2)
    run_and_free(bm, [1, 2, 3, 4, 5])  # blocks 0 and 1 cached, block 2 free
    assert (bm.num_free, bm.num_cached) == (2, 2)
    b = make("b", [9, 9, 9])
    bm.admit(b)
    bm.grow(b, 3)  # the two free blocks: no eviction
    assert bm.num_cached == 2
    c = make("c", [8])
    bm.grow(c, 1)  # evicts a's tail block (freed first, so least recently used)
    assert c.block_ids == [1] and bm.num_cached == 1
    bm.check([b, c])
    assert bm.admit(make("a2", [1, 2, 3, 4, 5])) == 2  # the head block survived, the tail is gone


def test_eviction_is_least_recently_freed_first():
    bm = BlockManager(4, 2)
    run_and_free(bm, [1, 2, 3])  # block 0 cached
    run_and_free(bm, [4, 5, 6])  # block 2 cached
    assert (bm.num_free, bm.num_cached) == (2, 2)
    bm.grow(make("x", [0]), 6)  # 3 blocks: the 2 free ones, then one eviction
    assert bm.num_cached == 1
    assert bm.admit(make("first", [1, 2, 3])) == 0
    assert bm.admit(make("second", [4, 5, 6])) == 2


def test_reviving_a_cached_block_protects_it_from_eviction():
    bm = BlockManager(3, 2)
    run_and_free(bm, [1, 2, 3])  # block 0 cached
    held = make("held", [1, 2, 3])
    assert bm.admit(held) == 2
    assert not bm.can_grow(make("x", [0]), 5)  # 3 blocks: only 2 are free or cached
    bm.check([held])


def test_identical_blocks_registered_once():
    bm = BlockManager(8, 4)
    a, b = make("a", A + B + [0]), make("b", A + B + [0])
    bm.admit(a)
    bm.admit(b)  # both admitted before either computed: no hit
    compute(bm, a)
    compute(bm, b)
    assert len(bm._hash_to_block) == 2 and set(bm._hash_to_block.values()) <= set(a.block_ids)
    bm.check([a, b])
    bm.free(b)  # its copies have no hash: free, not cached
    assert (bm.num_free, bm.num_cached) == (5, 0)
    bm.free(a)
    assert bm.num_cached == 2
    bm.check([])


def test_without_prefix_caching_nothing_is_cached():
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    run_and_free(bm, A + B + [0])
    assert (bm.num_free, bm.num_cached) == (8, 0)
    assert bm.admit(make("b", A + B + [0])) == 0
    bm.check([])


def test_grow_past_the_pool_raises_and_admit_needs_an_empty_table():
    bm = BlockManager(2, 4)
    a = make("a", [1] * 9)
    assert not bm.can_grow(a, 9)
    with pytest.raises(RuntimeError):
        bm.grow(a, 9)
    bm.grow(a, 8)
    with pytest.raises(ValueError):
        bm.admit(a)


def test_slot():
    bm = BlockManager(8, 4)
    seq = make("s", [0] * 8)
    seq.block_ids = [5, 2]
    assert [bm.slot(seq, p) for p in (0, 3, 4, 7)] == [20, 23, 8, 11]


def test_check_catches_corruption():
    bm = BlockManager(4, 2)
    a = make("a", [1, 2, 3])
    bm.admit(a)
    compute(bm, a)
    bm.check([a])
    with pytest.raises(AssertionError):
        bm.check([])  # a's references are not accounted for
    bm._ref[a.block_ids[0]] += 1
    with pytest.raises(AssertionError):
        bm.check([a])
    bm._ref[a.block_ids[0]] -= 1
    bm._free.append(a.block_ids[1])
    with pytest.raises(AssertionError):
        bm.check([a])


# ------------------------------------------------------------------- random drive

VOCAB, EOS, BLOCK = 40, 0, 4


def prefix_keys(seq: Sequence) -> list[int]:
    """What the KV at each position stands for: the whole prefix up to it."""
    keys, key = [], None
    for token in seq.token_ids:
        key = hash((key, token))
        keys.append(key)
    return keys


@pytest.mark.parametrize("chunked_prefill, prefix_caching", [(True, True), (False, True), (True, False)])
def test_random_drive(chunked_prefill, prefix_caching):
    rng = random.Random(7)
    bm = BlockManager(num_blocks=16, block_size=BLOCK, enable_prefix_caching=prefix_caching)
    sched = Scheduler(bm, max_batched_tokens=32, max_seqs=6, chunk_size=12, chunked_prefill=chunked_prefill)
    prefixes = [[rng.randrange(1, VOCAB) for _ in range(n)] for n in (8, 12, 16)]
    seqs: list[Sequence] = []
    aborted: set[str] = set()
    kv: dict[int, int] = {}  # slot -> prefix key of the token whose KV it holds
    hits = steps = 0

    def random_abort():
        live = [s for s in seqs if not s.is_finished]
        if live and rng.random() < 0.02:
            victim = rng.choice(live)
            assert sched.abort(victim.request_id) is victim
            aborted.add(victim.request_id)

    while steps < 3000 or sched.has_work():
        steps += 1
        assert steps < 20_000, "the scheduler stopped making progress"
        if steps < 3000 and rng.random() < 0.35:
            prompt = rng.choice(prefixes)[:rng.choice([4, 8, 16])] + [rng.randrange(1, VOCAB)
                                                                      for _ in range(rng.randrange(1, 9))]
            params = SamplingParams(max_tokens=rng.randrange(1, 17), ignore_eos=rng.random() < 0.3,
                                    stop_token_ids=(rng.randrange(VOCAB),) if rng.random() < 0.3 else ())
            seqs.append(Sequence(f"r{len(seqs)}", prompt, params, eos_token_ids=(EOS,), arrival_time=steps))
            sched.add(seqs[-1])
        random_abort()

        was_waiting = {id(s) for s in sched.waiting}
        batch = sched.schedule()
        assert sum(s.num_tokens for s in batch) <= 32 and len(batch) <= 6
        reads: set[int] = set()
        writes: dict[int, str] = {}
        for s in batch:
            seq = s.seq
            assert seq.status is SequenceStatus.RUNNING and s.start == seq.num_computed_tokens
            assert s.samples == (s.start + s.num_tokens == seq.num_tokens)
            if chunked_prefill:
                assert s.num_tokens <= 12
            if id(seq) in was_waiting and s.start > 0:
                hits += 1
                assert s.start == seq.num_cached_tokens
            keys = prefix_keys(seq)
            for pos in range(s.start + s.num_tokens):
                slot = bm.slot(seq, pos)  # IndexError if the block is not held
                assert slot // BLOCK in seq.block_ids
                if pos < s.start:  # attention reads it: it must hold this prefix's KV
                    assert kv.get(slot) == keys[pos], f"{seq.request_id} reads stale KV at {pos}"
                    reads.add(slot)
                else:
                    assert slot not in writes, f"{seq.request_id} and {writes[slot]} write slot {slot}"
                    writes[slot] = seq.request_id
                    kv[slot] = keys[pos]
        assert not reads & set(writes), "a step overwrites KV that another sequence reads"

        if rng.random() < 0.5:
            random_abort()  # aborted while the step runs
        sampled = [rng.randrange(VOCAB) for s in batch if s.samples]
        for seq in sched.postprocess(batch, sampled, now=float(steps)):
            assert seq.is_finished and seq.block_ids == []
        assert sched.take_aborted() == []  # every request here fits the pool
        bm.check(sched.running)
        for seq in sched.running:
            assert seq.num_computed_tokens <= seq.num_tokens
        for seq in sched.waiting:
            assert seq.num_computed_tokens == 0 and seq.block_ids == []

    preemptions = sum(s.num_preemptions for s in seqs)
    assert len(seqs) > 900 and steps >= 3000
    assert preemptions > 100, preemptions
    assert hits > 500 if prefix_caching else hits == 0, hits
    assert bm.num_used == 0 and bm.num_free + bm.num_cached == bm.num_blocks
    for seq in seqs:
        assert seq.is_finished and seq.error is None
        out = seq.output_token_ids
        assert len(out) <= seq.params.max_tokens
        if seq.request_id in aborted:
            assert seq.finish_reason == "abort"
        elif seq.finish_reason == "stop":
            assert out[-1] in seq.params.stop_token_ids or (out[-1] == EOS and not seq.params.ignore_eos)
        else:
            assert seq.finish_reason == "length" and len(out) == seq.params.max_tokens
            assert not set(out) & set(seq.params.stop_token_ids)
        assert len(seq.token_times) == len(out) and seq.token_times == sorted(seq.token_times)
