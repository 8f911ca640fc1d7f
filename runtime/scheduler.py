"""Continuous batching: which sequences compute how many tokens in the next step.

The one rule: a sequence gets tokens until its computed tokens catch up with its known tokens
(prompt + outputs), within the step's token budget (`max_batched_tokens`) and at most
`chunk_size` tokens per sequence per step. A sequence samples in a step exactly when that step
brings its computed tokens up to its known tokens. Prefill, chunked prefill, decode, mixed
prefill/decode batches and recompute after preemption are all this rule.

Order, FCFS by arrival: running sequences first, then waiting ones admitted (through the
block manager, reusing cached prefix blocks) while the budget, `max_seqs` and the free blocks
allow; admission stops at the first that does not fit (no skipping), and not at a partial
chunk, so several sequences may be partially prefilled at once. Invariant: running sequences
all arrived before waiting ones, so both stay in arrival order by appending. Every running
sequence gets its whole share of a step (one decode token, or its next chunk) except perhaps
the latest arrival: each was admitted into budget that the earlier ones left over, and one
that got its whole share never asks for more later. So the planner's simulator
(compiler/model/simulator.py), which serves the decodes first, builds the same steps when
prefix caching is off (tests/test_scheduler_differential.py).

Preemption (recompute): when a running sequence cannot get its blocks, the most recently
arrived running sequence is preempted (blocks freed, num_computed_tokens = 0, outputs kept as
known tokens, back to the front of the waiting queue), then the next, until the blocks fit or
the sequence is itself the latest arrival left. Then a decoding sequence (`seq.decoding`: it
sampled since it was last admitted) is preempted too, but a prefill chunk waits: the sequence
keeps its blocks and its progress, gets no tokens in this step, and nothing is admitted behind
it (preempting it would only redo its prefill later; the older sequences holding the blocks
it needs either finish or, needing blocks themselves, preempt it). A step with a preemption
admits nothing new, so the preempted do not bounce straight back.

Without chunked prefill, a waiting sequence is admitted only if all its remaining tokens fit
the remaining budget (chunk_size is ignored). The one exception is a preempted sequence whose
prompt + outputs now exceed max_batched_tokens: it is recomputed in pieces, each what is left
of a step's budget, like a chunked prefill.

Requests that can never run are finished by `schedule` itself with finish_reason "abort" and
a message for the user in `seq.error`, and handed to the engine by `take_aborted()` (call it
after every step; `has_work()` stays true until they are taken): a sequence whose known tokens
need more KV blocks than the whole pool (a prompt too long for the cache, or a generation that
outgrew it), and, without chunked prefill, a prompt longer than max_batched_tokens.

Disaggregated serving (disagg.py) parks sequences outside both queues, holding blocks and
getting no tokens: on a prefill instance, a sequence with `handoff` set is PREFILLED after its
first token (`take_prefilled`) until its KV has moved and `release` frees its blocks; on a
decode instance, `receive` reserves the blocks of a prefilled sequence (RECEIVING) and
`arrived` makes it a running, decoding sequence once its KV is in them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Optional

from .block_manager import BlockManager
from .sequence import RequestError, Sequence, SequenceStatus


@dataclass(frozen=True)
class ScheduledSeq:
    """One sequence's work in a step: compute its known tokens [start, start + num_tokens)
    (start = num_computed_tokens before the step); sample the next token iff `samples`."""

    seq: Sequence
    start: int
    num_tokens: int
    samples: bool


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_batched_tokens: int, max_seqs: int, chunk_size: int,
                 chunked_prefill: bool = True):
        if min(max_batched_tokens, max_seqs, chunk_size) < 1:
            raise ValueError(f"max_batched_tokens, max_seqs and chunk_size must be >= 1, "
                             f"got {max_batched_tokens}, {max_seqs}, {chunk_size}")
        self.block_manager = block_manager
        self.max_batched_tokens = max_batched_tokens
        self.max_seqs = max_seqs
        self.chunk_size = chunk_size
        self.chunked_prefill = chunked_prefill
        self.running: list[Sequence] = []
        self.waiting: deque[Sequence] = deque()
        self._by_id: dict[str, Sequence] = {}
        self._aborted: list[Sequence] = []  # finished by schedule(), until take_aborted()
        self._parked: dict[str, Sequence] = {}  # PREFILLED or RECEIVING (see the module docstring)
        self._prefilled: list[Sequence] = []  # parked by postprocess(), until take_prefilled()
        self.num_preemptions = 0  # since the start, over every request

    def add(self, seq: Sequence) -> None:
        """Queue a new request (status WAITING, holding no blocks) behind every earlier one."""
        if seq.request_id in self._by_id:
            raise RequestError(f"request id {seq.request_id!r} is already in flight")
        if seq.status is not SequenceStatus.WAITING or seq.block_ids:
            raise ValueError(f"sequence {seq.request_id!r} is not a new request")
        self._by_id[seq.request_id] = seq
        self.waiting.append(seq)

    def abort(self, request_id: str) -> Optional[Sequence]:
        """Finish a request in flight with finish_reason "abort", releasing its blocks; returns
        it, or None if no such request is in flight."""
        seq = self._by_id.pop(request_id, None)
        if seq is None:
            return None
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.block_manager.free(seq)
        elif self._parked.pop(request_id, None) is not None:
            self.block_manager.free(seq)
            if seq in self._prefilled:
                self._prefilled.remove(seq)
        else:
            self.waiting.remove(seq)
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, "abort"
        return seq

    def has_work(self) -> bool:
        """Whether a request is waiting, running, parked, or aborted by schedule() and not yet taken."""
        return bool(self.running or self.waiting or self._aborted or self._parked)

    def take_aborted(self) -> list[Sequence]:
        """The sequences schedule() aborted (never fitting; see seq.error) since the last call."""
        aborted, self._aborted = self._aborted, []
        return aborted

    def schedule(self) -> list[ScheduledSeq]:
        """Decide the next step (see the module docstring); grows the block tables to hold the
        slots the step writes."""
        bm = self.block_manager
        scheduled: list[ScheduledSeq] = []
        budget = self.max_batched_tokens
        preempted = stalled = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if self._never_fits(seq):  # it outgrew the pool: preempting others would not help
                self.running.pop(i)
                bm.free(seq)
                continue
            num = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if self.chunked_prefill:
                num = min(num, self.chunk_size)
            # Victims come from the tail, which is not scheduled yet (or is seq itself).
            while not bm.can_grow(seq, num):
                if self.running[-1] is seq and not seq.decoding:
                    stalled = True  # a prefill chunk waits rather than preempt itself
                    break
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if stalled or seq.status is SequenceStatus.WAITING:
                break
            bm.grow(seq, num)
            scheduled.append(self._scheduled(seq, num))
            budget -= num
            i += 1
        if preempted or stalled:
            return scheduled
        while self.waiting and budget > 0 and len(self.running) < self.max_seqs:
            seq = self.waiting[0]
            if self._never_fits(seq):
                self.waiting.popleft()
                continue
            remaining = seq.num_tokens - bm.admit(seq)
            if self.chunked_prefill:
                num = min(remaining, self.chunk_size, budget)
            elif remaining <= budget or remaining > self.max_batched_tokens:
                num = min(remaining, budget)  # the latter: an oversized recompute, see the docstring
            else:
                num = 0
            if num == 0 or not bm.can_grow(seq, num):
                bm.free(seq)  # undo the admission: its prefix blocks go back to the cache
                seq.num_computed_tokens = seq.num_cached_tokens = 0
                break
            bm.grow(seq, num)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(self._scheduled(seq, num))
            budget -= num
        return scheduled

    def _scheduled(self, seq: Sequence, num: int) -> ScheduledSeq:
        start = seq.num_computed_tokens
        return ScheduledSeq(seq, start, num, samples=start + num == seq.num_tokens)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.decoding = False
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def unservable(self, num_tokens: int, prompt_only: bool) -> Optional[str]:
        """Why a sequence of num_tokens known tokens (a prompt alone, if prompt_only) can never
        be scheduled, for its user; None when it can. The engine refuses such requests on
        submission; `schedule` aborts a sequence that grows into one."""
        bm = self.block_manager
        needed = bm.blocks_for(num_tokens)
        if needed > bm.num_blocks:
            return (f"{num_tokens} tokens need {needed} KV-cache blocks of {bm.block_size} tokens "
                    f"but the cache has only {bm.num_blocks}")
        if prompt_only and not self.chunked_prefill and num_tokens > self.max_batched_tokens:
            return (f"the prompt has {num_tokens} tokens, more than max_batched_tokens "
                    f"({self.max_batched_tokens}), and chunked prefill is off")
        return None

    def _never_fits(self, seq: Sequence) -> bool:
        """Finish (abort) seq if it can never be scheduled; say whether it was."""
        error = self.unservable(seq.num_tokens, prompt_only=not seq.output_token_ids)
        if error is None:
            return False
        del self._by_id[seq.request_id]
        seq.status, seq.finish_reason, seq.error = SequenceStatus.FINISHED, "abort", error
        self._aborted.append(seq)
        return True

    def postprocess(self, scheduled: list[ScheduledSeq], sampled: list[int], now: float) -> list[Sequence]:
        """Apply a step's results: `sampled` holds one token per ScheduledSeq with samples=True,
        in order. Advances computed tokens, appends outputs (timed at `now`), finishes sequences
        on a stop token ("stop"; the token is kept) or at max_tokens ("length"), commits full
        blocks to the prefix cache and frees finished sequences' blocks. Returns the sequences
        this step finished."""
        num_samples = sum(s.samples for s in scheduled)
        if len(sampled) != num_samples:
            raise ValueError(f"got {len(sampled)} sampled tokens for {num_samples} sampling sequences")
        finished: list[Sequence] = []
        tokens = iter(sampled)
        for s in scheduled:
            seq = s.seq
            token = next(tokens) if s.samples else None
            if seq.is_finished:  # aborted while the step ran
                continue
            seq.num_computed_tokens = s.start + s.num_tokens
            self.block_manager.commit(seq)
            if token is None:
                continue
            seq.output_token_ids.append(token)
            seq.token_times.append(now)
            seq.decoding = True
            if seq.first_token_time is None:
                seq.first_token_time = now
            params = seq.params
            if token in params.stop_token_ids or (not params.ignore_eos and token in seq.eos_token_ids):
                seq.finish_reason = "stop"
            elif len(seq.output_token_ids) >= params.max_tokens:
                seq.finish_reason = "length"
            elif seq.handoff:  # a decode instance computes the rest; the blocks stay until its KV moved
                seq.status = SequenceStatus.PREFILLED
                self._parked[seq.request_id] = seq
                self._prefilled.append(seq)
                continue
            else:
                continue
            seq.status = SequenceStatus.FINISHED
            self.block_manager.free(seq)
            del self._by_id[seq.request_id]
            finished.append(seq)
        if finished or self._prefilled:
            self.running = [seq for seq in self.running if seq.status is SequenceStatus.RUNNING]
        return finished

    # ------------------------------------------------------------ disaggregated serving

    def take_prefilled(self) -> list[Sequence]:
        """The `handoff` sequences that sampled their first token (now PREFILLED, holding their
        blocks) since the last call, in the order they did."""
        prefilled, self._prefilled = self._prefilled, []
        return prefilled

    def release(self, request_id: str) -> Sequence:
        """A PREFILLED sequence leaves: its KV moved (or the request was aborted). Its blocks are
        freed (full ones stay in the prefix cache)."""
        seq = self._parked.pop(request_id)
        if seq.status is not SequenceStatus.PREFILLED:
            raise ValueError(f"sequence {request_id!r} is {seq.status.value}, not prefilled")
        del self._by_id[request_id]
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        return seq

    def parked(self, request_id: str, status: SequenceStatus) -> bool:
        """Whether `request_id` is parked here as `status`: PREFILLED (its KV not acknowledged
        yet) or RECEIVING (its KV awaited)."""
        seq = self._parked.get(request_id)
        return seq is not None and seq.status is status

    def can_receive(self, num_tokens: int) -> bool:
        """Whether `receive` finds room now for a sequence whose KV holds `num_tokens` tokens: a
        sequence slot, their blocks, and no preempted sequence waiting (those go first)."""
        if self.waiting or len(self.running) + len(self._parked) >= self.max_seqs:
            return False
        return self.block_manager.can_hold(num_tokens)

    def receive(self, seq: Sequence) -> None:
        """Park a prefilled sequence (new here: holding no blocks, its first token sampled
        elsewhere) as RECEIVING with blocks reserved for the KV of all its known tokens but the
        newest; call `can_receive` first."""
        if seq.request_id in self._by_id:
            raise RequestError(f"request id {seq.request_id!r} is already in flight")
        if seq.block_ids or not seq.output_token_ids:
            raise ValueError(f"sequence {seq.request_id!r} is not a prefilled request")
        seq.num_computed_tokens = 0
        self.block_manager.grow(seq, seq.num_tokens - 1)
        seq.status = SequenceStatus.RECEIVING
        self._by_id[seq.request_id] = seq
        self._parked[seq.request_id] = seq

    def arrived(self, request_id: str) -> Sequence:
        """The KV of a RECEIVING sequence is in its blocks: it runs, decoding, from the next step."""
        seq = self._parked.pop(request_id)
        if seq.status is not SequenceStatus.RECEIVING:
            raise ValueError(f"sequence {request_id!r} is {seq.status.value}, not receiving")
        seq.num_computed_tokens = seq.num_tokens - 1
        self.block_manager.commit(seq)
        seq.status, seq.decoding = SequenceStatus.RUNNING, True
        # it arrived at this instance now: behind every running sequence, as admissions are
        self.running.append(seq)
        return seq
