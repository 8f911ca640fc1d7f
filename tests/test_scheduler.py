"""The scheduler: the token budget, max_seqs and chunk_size, chunked prefill sampling only on
the last chunk, mixed prefill/decode steps, chunked_prefill=False, preemption order and resume,
a prefill chunk waiting for blocks, stop conditions, aborts and requests that can never fit."""

from __future__ import annotations

import pytest

from flowc.runtime.block_manager import BlockManager
from flowc.runtime.scheduler import ScheduledSeq, Scheduler
from flowc.runtime.sequence import RequestError, SamplingParams, Sequence, SequenceStatus

EOS = 99


def make(rid: str, prompt_len: int, max_tokens: int = 16, first_token: int = 1, **params) -> Sequence:
    prompt = list(range(first_token, first_token + prompt_len))
    return Sequence(rid, prompt, SamplingParams(max_tokens=max_tokens, **params), eos_token_ids=(EOS,))


def scheduler(num_blocks=64, block_size=4, max_batched_tokens=64, max_seqs=8, chunk_size=64, chunked_prefill=True,
              prefix_caching=True) -> Scheduler:
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=prefix_caching)
    return Scheduler(bm, max_batched_tokens, max_seqs, chunk_size, chunked_prefill)


def step(sched: Scheduler, token: int = 7, now: float = 0.0) -> tuple[list[tuple[str, int, int, bool]], list[Sequence]]:
    """One engine step with every sampled token = token; returns the plan as tuples and the
    finished sequences."""
    batch = sched.schedule()
    finished = sched.postprocess(batch, [token] * sum(s.samples for s in batch), now)
    sched.block_manager.check(sched.running)
    return [(s.seq.request_id, s.start, s.num_tokens, s.samples) for s in batch], finished


def test_token_budget_max_seqs_and_chunk_size():
    sched = scheduler(max_batched_tokens=20, max_seqs=3, chunk_size=8)
    for i in range(5):
        sched.add(make(f"r{i}", 10, first_token=100 * i))
    plan, _ = step(sched)
    assert plan == [("r0", 0, 8, False), ("r1", 0, 8, False), ("r2", 0, 4, False)]
    plan, _ = step(sched)
    assert plan == [("r0", 8, 2, True), ("r1", 8, 2, True), ("r2", 4, 6, True)]  # max_seqs: no r3
    plan, _ = step(sched)
    assert plan == [("r0", 10, 1, True), ("r1", 10, 1, True), ("r2", 10, 1, True)]
    assert [s.request_id for s in sched.waiting] == ["r3", "r4"]


def test_long_prompt_is_chunked_and_samples_only_on_its_last_chunk():
    sched = scheduler(max_batched_tokens=8, chunk_size=8)
    seq = make("long", 21, max_tokens=2)
    sched.add(seq)
    plans = [step(sched, token=5)[0] for _ in range(4)]
    assert plans == [[("long", 0, 8, False)], [("long", 8, 8, False)], [("long", 16, 5, True)], [("long", 21, 1, True)]]
    assert seq.output_token_ids == [5, 5] and seq.finish_reason == "length" and not sched.has_work()


def test_decode_rows_mix_with_a_prefill_chunk():
    sched = scheduler(max_batched_tokens=10, chunk_size=16)
    for i in range(2):
        sched.add(make(f"d{i}", 3, first_token=10 * i))
    assert step(sched)[0] == [("d0", 0, 3, True), ("d1", 0, 3, True)]
    sched.add(make("p", 20, first_token=50))
    plan, _ = step(sched)
    assert plan == [("d0", 3, 1, True), ("d1", 3, 1, True), ("p", 0, 8, False)]
    plan, _ = step(sched)
    assert plan == [("d0", 4, 1, True), ("d1", 4, 1, True), ("p", 8, 8, False)]
    plan, _ = step(sched)
    assert plan == [("d0", 5, 1, True), ("d1", 5, 1, True), ("p", 16, 4, True)]


def test_without_chunked_prefill_a_prompt_waits_for_room_for_all_of_it():
    sched = scheduler(max_batched_tokens=16, chunk_size=4, chunked_prefill=False)
    sched.add(make("a", 10))
    sched.add(make("b", 7, first_token=50))
    plan, _ = step(sched)
    assert plan == [("a", 0, 10, True)]  # chunk_size ignored; b (7) does not fit the 6 left
    plan, _ = step(sched)
    assert plan == [("a", 10, 1, True), ("b", 0, 7, True)]


def test_without_chunked_prefill_a_prompt_longer_than_the_budget_is_aborted():
    sched = scheduler(max_batched_tokens=16, chunked_prefill=False)
    sched.add(big := make("big", 17))
    sched.add(make("ok", 5))
    plan, finished = step(sched)
    assert plan == [("ok", 0, 5, True)] and finished == []
    assert sched.take_aborted() == [big] and sched.take_aborted() == []
    assert big.finish_reason == "abort" and "max_batched_tokens" in big.error


def test_a_request_that_can_never_fit_the_cache_is_aborted_not_deadlocked():
    sched = scheduler(num_blocks=4, block_size=4)
    sched.add(huge := make("huge", 17))  # 5 blocks > 4
    sched.add(make("ok", 5))
    plan, _ = step(sched)
    assert plan == [("ok", 0, 5, True)]
    assert sched.take_aborted() == [huge] and huge.is_finished and huge.finish_reason == "abort"
    assert "17 tokens need 5 KV-cache blocks" in huge.error and huge.block_ids == []


def test_a_request_that_outgrows_the_cache_is_aborted_without_preempting_others():
    sched = scheduler(num_blocks=4, block_size=4)
    sched.add(grows := make("grows", 8, ignore_eos=True, max_tokens=100))
    for _ in range(8):
        step(sched)  # prompt, then 8 decodes: 16 known tokens, 15 computed: 4 blocks, full
    assert grows.num_tokens == 16 and len(grows.block_ids) == 4
    plan, _ = step(sched)  # position 15 fits; the 17th known token will not
    assert plan == [("grows", 15, 1, True)]
    plan, finished = step(sched)
    assert plan == [] and finished == [] and sched.has_work()  # until the engine takes it
    assert sched.take_aborted() == [grows] and not sched.has_work()
    assert grows.num_preemptions == 0
    assert grows.error == "17 tokens need 5 KV-cache blocks of 4 tokens but the cache has only 4"
    assert sched.block_manager.num_used == 0 and grows.block_ids == []


def test_preemption_takes_the_latest_arrival_and_it_resumes_by_recompute():
    # 6 blocks of 4; three 8-token prompts take 2 blocks each; the first decode needs a 3rd.
    sched = scheduler(num_blocks=6, block_size=4, prefix_caching=False)
    a, b, c = (make(n, 8, first_token=10 * i, max_tokens=5) for i, n in enumerate("abc"))
    for seq in (a, b, c):
        sched.add(seq)
    assert step(sched, token=1)[0] == [("a", 0, 8, True), ("b", 0, 8, True), ("c", 0, 8, True)]
    plan, _ = step(sched, token=2)
    assert plan == [("a", 8, 1, True), ("b", 8, 1, True)]  # c preempted so a could grow
    assert c.status is SequenceStatus.WAITING and c.num_preemptions == 1 and c.num_computed_tokens == 0
    assert c.output_token_ids == [1] and list(sched.waiting) == [c] and c.block_ids == []
    assert a.num_preemptions == b.num_preemptions == 0
    # c waits while a and b hold 3 blocks each; when they finish it recomputes prompt + output.
    plans = [step(sched, token=3)[0] for _ in range(4)]
    assert plans[:3] == [[("a", p, 1, True), ("b", p, 1, True)] for p in (9, 10, 11)]
    assert a.finish_reason == b.finish_reason == "length"
    assert plans[3] == [("c", 0, 9, True)] and c.output_token_ids == [1, 3]
    assert step(sched, token=4)[0] == [("c", 9, 1, True)]
    assert c.output_token_ids == [1, 3, 4]


def test_preemption_goes_latest_first_until_the_blocks_fit():
    sched = scheduler(num_blocks=5, block_size=4, prefix_caching=False)
    seqs = [make(n, 4, first_token=10 * i) for i, n in enumerate("abcd")]
    for seq in seqs:
        sched.add(seq)
    step(sched)  # 4 blocks: each prompt fills one; every decode needs one more (1 free)
    plan, _ = step(sched)
    assert plan == [("a", 4, 1, True), ("b", 4, 1, True)]
    assert [s.request_id for s in sched.waiting] == ["c", "d"]  # d preempted first, then c; c in front
    assert [s.num_preemptions for s in seqs] == [0, 0, 1, 1]


def test_a_sequence_that_cannot_grow_may_preempt_itself():
    sched = scheduler(num_blocks=4, block_size=4, prefix_caching=False)
    a, b = make("a", 4, max_tokens=2), make("b", 8, first_token=20, max_tokens=2)
    sched.add(a)
    sched.add(b)
    assert step(sched)[0] == [("a", 0, 4, True), ("b", 0, 8, True)]  # 3 blocks, 1 free
    plan, _ = step(sched)  # a takes the free block; b, the latest arrival, preempts itself
    assert plan == [("a", 4, 1, True)]
    assert b.num_preemptions == 1 and list(sched.waiting) == [b] and a.finish_reason == "length"
    assert step(sched)[0] == [("b", 0, 9, True)]
    assert b.finish_reason == "length" and b.num_computed_tokens == 9


def test_a_prefill_chunk_that_cannot_grow_waits_keeping_its_blocks():
    sched = scheduler(num_blocks=6, block_size=4, chunk_size=4, prefix_caching=False)
    a, b, c = (make(n, length, first_token=ord(n)) for n, length in (("a", 4), ("b", 4), ("c", 12)))
    for seq in (a, b, c):
        sched.add(seq)
    assert step(sched)[0] == [("a", 0, 4, True), ("b", 0, 4, True), ("c", 0, 4, False)]
    assert step(sched)[0] == [("a", 4, 1, True), ("b", 4, 1, True), ("c", 4, 4, False)]  # pool full
    # c's next chunk needs a block and c is the latest arrival: rather than preempt itself (and
    # redo its 8 tokens later) it waits, keeping its blocks, while a and b decode
    for p in (5, 6, 7):
        assert step(sched)[0] == [("a", p, 1, True), ("b", p, 1, True)]
        assert c.num_computed_tokens == 8 and len(c.block_ids) == 2 and c.num_preemptions == 0
    assert sched.block_manager.num_free == 0
    # a decode that needs a block still preempts the latest arrival
    assert step(sched)[0] == [("a", 8, 1, True), ("b", 8, 1, True)]
    assert c.num_preemptions == 1 and c.block_ids == [] and list(sched.waiting) == [c]


def test_a_step_with_a_preemption_admits_nothing():
    sched = scheduler(num_blocks=5, block_size=4, prefix_caching=False)
    for n, length in (("a", 4), ("b", 4), ("c", 8)):
        sched.add(make(n, length, first_token=ord(n)))
    assert step(sched)[0] == [("a", 0, 4, True), ("b", 0, 4, True), ("c", 0, 8, True)]  # 1 block free
    sched.add(d := make("d", 1, first_token=90))
    # a takes the free block, b preempts c and takes one of its 2: d's 1 block is free, but d
    # must not be admitted in the step that preempted c (nor jump ahead of it afterwards)
    assert step(sched)[0] == [("a", 4, 1, True), ("b", 4, 1, True)]
    assert sched.block_manager.num_free == 1 and list(sched.waiting) == [sched._by_id["c"], d]
    assert step(sched)[0] == [("a", 5, 1, True), ("b", 5, 1, True)]  # c (9 tokens) does not fit


def test_preempted_sequence_reuses_what_is_left_of_its_cached_prefix():
    sched = scheduler(num_blocks=7, block_size=4)
    a, b, c = (make(n, 8, first_token=10 * i, max_tokens=3) for i, n in enumerate("abc"))
    for seq in (a, b, c):
        sched.add(seq)
    step(sched)  # 6 blocks used, 1 free
    plan, _ = step(sched)  # a takes the free block; b preempts c and evicts c's tail block
    assert plan == [("a", 8, 1, True), ("b", 8, 1, True)]
    assert c.num_preemptions == 1 and sched.block_manager.num_cached == 1
    assert step(sched)[0] == [("a", 9, 1, True), ("b", 9, 1, True)]  # c's admission must wait
    assert step(sched)[0] == [("c", 4, 5, True)]  # the head block came back from the cache
    assert c.num_cached_tokens == 4 and c.output_token_ids == [7, 7]


def test_stop_tokens_eos_and_ignore_eos():
    sched = scheduler()
    s1 = make("stop", 3, stop_token_ids=(42,))
    s2 = make("eos", 3, first_token=20)
    s3 = make("ignore", 3, first_token=40, ignore_eos=True, max_tokens=2)
    for seq in (s1, s2, s3):
        sched.add(seq)
    batch = sched.schedule()
    finished = sched.postprocess(batch, [42, EOS, EOS], now=1.5)
    assert finished == [s1, s2] and s1.finish_reason == s2.finish_reason == "stop"
    assert s1.output_token_ids == [42] and s2.output_token_ids == [EOS]
    assert s1.first_token_time == 1.5 and s1.token_times == [1.5]
    assert s3.output_token_ids == [EOS] and not s3.is_finished
    batch = sched.schedule()
    assert sched.postprocess(batch, [EOS], now=2.0) == [s3] and s3.finish_reason == "length"
    assert s3.token_times == [1.5, 2.0] and s3.first_token_time == 1.5
    assert sched.block_manager.num_used == 0 and not sched.has_work()


def test_abort_waiting_running_and_during_a_step():
    sched = scheduler(max_batched_tokens=8, chunk_size=8)
    for n in "abc":
        sched.add(make(n, 6, first_token=ord(n)))
    batch = sched.schedule()
    assert [s.seq.request_id for s in batch] == ["a", "b"]
    assert sched.abort("c").finish_reason == "abort"  # waiting
    aborted_mid_step = sched.abort("b")  # running, and in the step being computed
    assert aborted_mid_step.block_ids == [] and sched.abort("b") is None
    assert sched.postprocess(batch, [5], now=0.0) == []
    assert [s.request_id for s in sched.running] == ["a"] and not sched.waiting
    assert aborted_mid_step.num_computed_tokens == 0 and aborted_mid_step.output_token_ids == []
    sched.block_manager.check(sched.running)


def test_aborting_a_preempted_request_leaves_the_others_schedule_alone():
    def run(abort: bool) -> list:
        # as in test_preemption_takes_the_latest_arrival_and_it_resumes_by_recompute: c is preempted
        sched = scheduler(num_blocks=6, block_size=4, prefix_caching=False)
        for i, n in enumerate("abc"):
            sched.add(make(n, 8, first_token=10 * i, max_tokens=5))
        plans = [step(sched)[0] for _ in range(2)]
        c = sched._by_id["c"]
        assert c.num_preemptions == 1 and c.output_token_ids == [7] and list(sched.waiting) == [c]
        if abort:
            assert sched.abort("c") is c and c.finish_reason == "abort" and not sched.waiting
            assert sched.abort("c") is None
        while sched.has_work():
            plans.append(step(sched)[0])
        assert sched.block_manager.num_used == 0
        return plans

    kept, aborted = run(abort=False)[2:], run(abort=True)[2:]  # the steps after the abort
    without_c = [[s for s in plan if s[0] != "c"] for plan in kept]
    assert aborted == [plan for plan in without_c if plan] == [[("a", p, 1, True), ("b", p, 1, True)]
                                                              for p in (9, 10, 11)]
    assert len(kept) == 7  # without the abort, c's recompute and its last three decodes follow


def test_postprocess_checks_the_number_of_sampled_tokens():
    sched = scheduler()
    sched.add(make("a", 3))
    batch = sched.schedule()
    with pytest.raises(ValueError):
        sched.postprocess(batch, [], now=0.0)


def test_duplicate_request_ids_are_rejected():
    sched = scheduler()
    sched.add(make("a", 3))
    with pytest.raises(RequestError, match="already in flight"):
        sched.add(make("a", 3))


def test_scheduled_seq_is_frozen():
    s = ScheduledSeq(make("a", 1), 0, 1, True)
    with pytest.raises(AttributeError):
        s.start = 1


@pytest.mark.parametrize("params, message", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=10**400), "temperature"),  # beyond any float: used to raise OverflowError
    (dict(top_p=10**400), "top_p"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(seed=1.5), "seed"),
    (dict(seed=-1), "seed"),
    (dict(stop_token_ids=(3, 100)), r"stop_token_ids\[1\] = 100"),
    (dict(stop_token_ids=(-1,)), r"stop_token_ids\[0\]"),
])
def test_sampling_params_validation(params, message):
    with pytest.raises(RequestError, match=message):
        SamplingParams(**params).validate(vocab_size=100)


def test_sampling_params_defaults_are_greedy_and_valid():
    params = SamplingParams(stop_token_ids=[1, 2])
    params.validate(vocab_size=100)
    assert params.temperature == 0.0 and params.stop_token_ids == (1, 2)
