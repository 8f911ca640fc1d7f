"""The runtime's scheduler and the planner's simulator make the same decisions.

Two implementations of one continuous-batching rule: `runtime/scheduler.py` (per-sequence
objects over the block manager, what the engine runs) and `compiler/model/simulator.py`
(aggregated decode bookkeeping, O(1) per iteration, what every plan is judged by). Fed the same
trace and settings (token budget, chunk size, max_seqs, block size, KV blocks, chunked prefill
on or off) they must build every step alike: which requests decode, which prefill chunks run
(request, tokens) in which order, which requests are preempted, which finish, and how many KV
blocks are left free once the step has its blocks; hence also every request's first-token and
finish step.

How the two are driven alike:
  * time: the simulator's step cost is a constant 1 s (no wake time, pp 1, one colocated
    instance). The runtime is stepped against a clock: before each step every request with
    arrival <= clock is added; with nothing running or waiting the clock jumps to the next
    arrival; each step advances it by 1 s. That is the simulator's event order: an arrival at
    the instant an iteration ends joins before the next one starts, one during an iteration
    waits for its end.
  * tokens: every sampled token is 0 with `ignore_eos` and `max_tokens` = the request's output
    length (and no stop tokens), so each request produces exactly its output length.
  * prefix caching is OFF on the runtime side (`BlockManager(..., enable_prefix_caching=False)`):
    with it, a recompute after preemption may find its own blocks still cached and skip them,
    which the simulator does not model (it has no prefix cache).
  * requests: only ones that can run (prompt + output - 1 tokens fit the KV blocks and, without
    chunked prefill, the prompt fits the budget): the simulator rejects the others at arrival,
    the engine before queuing them (or the scheduler aborts them), which is not compared here.

Decodes are told apart on the runtime side by the test's own record (a sequence that sampled
since it was last preempted), not by the scheduler's. The runtime side also checks the
invariant that lets the simulator serve decodes first while the runtime walks its running
sequences in arrival order: every running sequence gets its full share of the step (one token,
or its next chunk), except perhaps the most recently arrived one (short of budget, or a prefill
chunk waiting for blocks). Hand-written cases force each rule; a hypothesis property compares
random small traces and settings (a longer run is marked slow).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from step_costs import OneSecondSteps

from flowc.compiler.model.simulator import InstanceConfig, StepRecord, simulate
from flowc.compiler.model.workload import Requests
from flowc.compiler.plan import Scheduler as PlanScheduler
from flowc.runtime.block_manager import BlockManager
from flowc.runtime.scheduler import Scheduler
from flowc.runtime.sequence import SamplingParams, Sequence


@dataclass(frozen=True)
class Settings:
    max_batched_tokens: int
    chunk_size: int
    max_seqs: int
    block_size: int
    num_blocks: int
    chunked_prefill: bool = True


Trace = list[tuple[float, int, int]]  # (arrival, prompt, output), sorted by arrival


class Step(NamedTuple):
    start: float
    decodes: tuple[int, ...]  # sorted request ids
    prefills: tuple[tuple[int, int], ...]  # (request id, tokens), in the order they got budget
    preempted: tuple[int, ...]  # sorted
    finished: tuple[int, ...]  # sorted
    free_blocks: int


class Run(NamedTuple):
    steps: list[Step]
    first_token_step: list[int]  # per request: the step that produced its first token
    finish_step: list[int]
    first_token_time: list[float]
    finish_time: list[float]
    preemptions: int


def run_simulator(trace: Trace, s: Settings) -> Run:
    arrival, prompt, output = (list(x) for x in zip(*trace))
    cfg = InstanceConfig(cost=OneSecondSteps(), kv_capacity_tokens=s.num_blocks * s.block_size,
                         scheduler=PlanScheduler(max_batched_tokens=s.max_batched_tokens, chunk_size=s.chunk_size,
                                                 max_seqs=s.max_seqs, block_size=s.block_size,
                                                 chunked_prefill=s.chunked_prefill))
    records: list[StepRecord] = []
    result = simulate(Requests(np.array(arrival, dtype=float), prompt, output), [cfg], on_step=records.append)
    assert not result.rejected.any() and result.finished.all()
    assert result.kv_blocks_in_use == [0] and result.tokens_generated == sum(output)
    assert result.iterations == len(records)
    assert all(r.end == r.start + 1.0 for r in records)
    steps = [Step(r.start, r.decodes, r.prefills, r.preempted, r.finished, r.free_blocks) for r in records]
    step_at = {r.end: k for k, r in enumerate(records)}  # ends are distinct: one engine, 1 s steps
    first = (result.arrival + result.ttft).tolist()
    finish = result.finish.tolist()
    return Run(steps, [step_at[t] for t in first], [step_at[t] for t in finish], first, finish, result.preemptions)


def run_runtime(trace: Trace, s: Settings) -> Run:
    bm = BlockManager(s.num_blocks, s.block_size, enable_prefix_caching=False)
    sched = Scheduler(bm, s.max_batched_tokens, s.max_seqs, s.chunk_size, s.chunked_prefill)
    seqs = [Sequence(str(i), list(range(1, p + 1)), SamplingParams(max_tokens=o, ignore_eos=True),
                     eos_token_ids=(), arrival_time=a) for i, (a, p, o) in enumerate(trace)]
    cap = min(s.chunk_size, s.max_batched_tokens) if s.chunked_prefill else s.max_batched_tokens
    n = len(seqs)
    decoding = [False] * n  # sampled since it was last admitted: an independent record of decodes
    first_step, finish_step = [-1] * n, [-1] * n
    steps: list[Step] = []
    clock, nxt = 0.0, 0
    while nxt < n or sched.has_work():
        while nxt < n and trace[nxt][0] <= clock:
            sched.add(seqs[nxt])
            nxt += 1
        if not sched.has_work():
            clock = trace[nxt][0]
            continue
        before = [q.num_preemptions for q in seqs]
        batch = sched.schedule()
        assert sched.take_aborted() == []
        assert batch, "an empty step while requests wait: the engine would spin"
        preempted = tuple(i for i in range(n) if seqs[i].num_preemptions > before[i])
        for i in preempted:
            decoding[i] = False
        # every running sequence is in the step with its full share, except perhaps the latest
        # (short of budget, or a prefill chunk waiting for blocks)
        scheduled = {id(x.seq): x for x in batch}
        for k, seq in enumerate(sched.running):
            x = scheduled.get(id(seq))
            if k == len(sched.running) - 1 and (x is not None or not seq.decoding):
                continue
            assert x is not None, f"step {len(steps)}: running {seq.request_id} got no tokens"
            assert x.num_tokens == min(seq.num_tokens - x.start, cap), \
                f"step {len(steps)}: running {seq.request_id} got {x.num_tokens} tokens, short of budget"
        decodes, prefills = [], []
        for x in batch:
            i = int(x.seq.request_id)
            if decoding[i]:
                assert x.num_tokens == 1 and x.samples and x.start == x.seq.num_tokens - 1
                decodes.append(i)
            else:
                prefills.append((i, x.num_tokens))
        free = bm.num_free
        finished = sched.postprocess(batch, [0] * sum(x.samples for x in batch), clock + 1.0)
        bm.check(sched.running)
        for x in batch:
            i = int(x.seq.request_id)
            if x.samples:
                decoding[i] = True
                if first_step[i] < 0:
                    first_step[i] = len(steps)
        for seq in finished:
            finish_step[int(seq.request_id)] = len(steps)
        steps.append(Step(clock, tuple(sorted(decodes)), tuple(prefills), preempted,
                          tuple(sorted(int(q.request_id) for q in finished)), free))
        clock += 1.0
    assert all(q.finish_reason == "length" and len(q.output_token_ids) == o for q, (_, _, o) in zip(seqs, trace))
    assert bm.num_used == 0
    return Run(steps, first_step, finish_step, [q.first_token_time for q in seqs], [q.token_times[-1] for q in seqs],
               sum(q.num_preemptions for q in seqs))


def assert_agree(trace: Trace, s: Settings) -> Run:
    """Run both; assert every step and every request's timings agree. Returns the runtime's run."""
    sim, rt = run_simulator(trace, s), run_runtime(trace, s)
    for k, (a, b) in enumerate(zip(sim.steps, rt.steps)):
        if a != b:
            context = "\n".join(f"  step {j}: simulator {sim.steps[j]}\n          runtime   {rt.steps[j]}"
                                for j in range(max(0, k - 2), min(k + 2, len(sim.steps), len(rt.steps))))
            pytest.fail(f"the schedulers disagree at step {k}\n{s}\ntrace {trace}\n{context}")
    assert len(sim.steps) == len(rt.steps), (len(sim.steps), len(rt.steps))
    assert sim.first_token_step == rt.first_token_step
    assert sim.finish_step == rt.finish_step
    assert sim.first_token_time == rt.first_token_time
    assert sim.finish_time == rt.finish_time
    assert sim.preemptions == rt.preemptions
    return rt


# ------------------------------------------------------------------------------ hand-written cases


def test_several_sequences_prefill_at_once_under_chunk_size():
    # budget 8, chunks of at most 3: three 6-token prompts take 3 + 3 + 2, then 3 + 3 + 2, then 2
    run = assert_agree([(0.0, 6, 1)] * 3, Settings(8, 3, 8, 4, 100))
    assert [step.prefills for step in run.steps] == [((0, 3), (1, 3), (2, 2)), ((0, 3), (1, 3), (2, 2)), ((2, 2),)]


def test_a_younger_sequence_decodes_beside_an_older_partial_prefill():
    # r1 (2 tokens) is admitted after r0's partial chunk and decodes while r0 still prefills
    run = assert_agree([(0.0, 9, 3), (0.0, 2, 3)], Settings(5, 3, 8, 4, 100))
    assert run.steps[1].decodes == (1,) and run.steps[1].prefills == ((0, 3),)


def test_kv_pressure_preempts_the_latest_arrival_which_recomputes():
    # 6 blocks of 4: three 8-token prompts fill them; the first decodes need a third block each
    run = assert_agree([(0.0, 8, 5)] * 3, Settings(64, 64, 8, 4, 6))
    assert run.steps[1].preempted == (2,) and run.steps[1].decodes == (0, 1)
    assert (2, 9) in [c for step in run.steps for c in step.prefills]  # prompt + its 1 output


def test_preemption_goes_latest_first_and_admits_nothing_in_that_step():
    run = assert_agree([(0.0, 4, 3)] * 4 + [(1.0, 1, 1)], Settings(64, 64, 8, 4, 5))
    assert run.steps[1].preempted == (2, 3) and run.steps[1].prefills == ()  # r4 waits too


def test_a_partial_prefill_that_cannot_grow_waits_keeping_its_blocks():
    # blocks of 1 token, 8 blocks: at t=5 r0's decode takes a block, leaving 1; r1's next chunk
    # needs 2 and r1 is the latest arrival: it waits, keeping its 3 blocks (not preempted), and
    # r2 (1 token, which 1 block would hold) is not admitted behind it
    run = assert_agree([(3.0, 2, 3), (3.0, 6, 2), (4.5, 1, 1)], Settings(3, 3, 4, 1, 8))
    assert run.steps[2] == (5.0, (0,), (), (), (0,), 1)
    assert run.steps[3].prefills == ((1, 3),) and run.preemptions == 0


def test_an_older_partial_prefill_preempts_a_younger_decoding_sequence():
    # blocks of 1 token, 8 blocks: r1 decodes beside r0's chunks; when r0's last chunk needs 2
    # blocks and 1 is free, the latest arrival (r1, already given its decode by the simulator's
    # decodes-first pass) is preempted
    run = assert_agree([(0.0, 6, 2), (0.0, 2, 5)], Settings(4, 2, 8, 1, 8))
    assert run.steps[2].preempted == (1,) and run.steps[2].decodes == () and run.steps[2].prefills == ((0, 2),)


def test_running_prefills_go_on_in_a_step_with_a_preemption():
    # chunks of 1 token, 2 blocks of 1: r1 (1-token prompt) decodes next and needs a block, none
    # free; it is the latest arrival and preempts itself, and r0's next chunk still runs (on
    # r1's freed block): a preemption stops admissions only
    run = assert_agree([(2.0, 2, 1), (2.0, 1, 2)], Settings(5, 1, 3, 1, 2))
    assert run.steps[1] == (3.0, (), ((0, 1),), (1,), (0,), 0)


def test_max_seqs_binds():
    run = assert_agree([(0.0, 3, 4)] * 3, Settings(64, 64, 2, 4, 100))
    assert run.steps[0].prefills == ((0, 3), (1, 3)) and run.first_token_step[2] == 4


def test_a_prompt_longer_than_the_budget_is_chunked():
    run = assert_agree([(0.0, 25, 2), (0.5, 3, 2)], Settings(8, 8, 8, 4, 100))
    assert [step.prefills for step in run.steps[:4]] == [((0, 8),), ((0, 8),), ((0, 8),), ((0, 1), (1, 3))]


def test_without_chunked_prefill_a_prompt_waits_to_fit_whole():
    run = assert_agree([(0.0, 6, 2), (0.0, 6, 2)], Settings(10, 4, 8, 4, 100, chunked_prefill=False))
    assert [step.prefills for step in run.steps] == [((0, 6),), ((1, 6),), ()]


def test_without_chunked_prefill_a_recompute_longer_than_the_budget_goes_in_pieces():
    # r1 (9 + 2 generated = 11 tokens > budget 10) is recomputed as 10 + 1 tokens
    run = assert_agree([(2.0, 10, 5), (3.0, 9, 3)], Settings(10, 10, 2, 4, 6, chunked_prefill=False))
    pieces = [c for step in run.steps for c in step.prefills if c[0] == 1]
    assert pieces == [(1, 9), (1, 10), (1, 1)]


def test_partial_blocks_and_block_boundaries_under_pressure():
    # blocks of 4 with prompts that end mid-block: decodes cross boundaries at different steps
    trace = [(0.0, 5, 7), (0.0, 7, 6), (1.0, 2, 9), (1.5, 6, 4), (2.0, 3, 5)]
    run = assert_agree(trace, Settings(16, 5, 4, 4, 7))
    assert run.preemptions > 0


def test_arrivals_at_iteration_ends_mid_iteration_and_after_idling():
    run = assert_agree([(0.0, 4, 3), (1.0, 4, 2), (1.5, 2, 2), (10.0, 3, 1), (10.25, 3, 1)],
                       Settings(16, 16, 8, 4, 100))
    assert run.steps[1].prefills == ((1, 4),) and run.steps[2].prefills == ((2, 2),)
    assert [step.start for step in run.steps][-2:] == [10.0, 11.0]


# ------------------------------------------------------------------------------ random traces


@st.composite
def cases(draw, max_requests: int = 8, max_budget: int = 16, max_blocks: int = 24):
    block = draw(st.sampled_from([1, 2, 3, 4, 8]))
    blocks = draw(st.integers(1, max_blocks))
    budget = draw(st.integers(1, max_budget))
    chunked = draw(st.booleans())
    s = Settings(max_batched_tokens=budget, chunk_size=draw(st.integers(1, budget + 2)),
                 max_seqs=draw(st.integers(1, 6)), block_size=block, num_blocks=blocks, chunked_prefill=chunked)
    capacity = blocks * block
    max_prompt = min(capacity, 40 if chunked else budget)
    n = draw(st.integers(1, max_requests))
    arrivals = sorted(draw(st.lists(st.integers(0, 24), min_size=n, max_size=n)))
    trace = []
    for half_seconds in arrivals:
        prompt = draw(st.integers(1, max_prompt))
        output = draw(st.integers(1, min(capacity - prompt + 1, 12)))
        trace.append((half_seconds / 2, prompt, output))
    return trace, s


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_random_traces_agree(case):
    assert_agree(*case)


@pytest.mark.slow
@settings(max_examples=20000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(max_requests=16, max_budget=32, max_blocks=48))
def test_random_traces_agree_long(case):
    assert_agree(*case)
