"""A discrete-event simulator of LLM serving: continuous batching, paged KV, preemption,
chunked prefill, pipeline parallelism, prefill/decode disaggregation and replicas.

Every plan is judged by it, so it must be fast: 100k requests in well under two seconds.
The time of an iteration comes from a `StepCost` (the cost model); this module knows nothing
else about the hardware.

The scheduler (one rule, like vLLM v1)
--------------------------------------
For one colocated engine (pp 1) the same decisions, step for step, as the runtime's scheduler
(runtime/scheduler.py) with prefix caching off; tests/test_scheduler_differential.py checks
it. Each iteration of an engine:
1. every running (admitted) sequence gets its tokens: a decoding one (it produced a token
   since it was last admitted) its next token, a partially prefilled one its next chunk (the
   rest of its tokens, at most `chunk_size` and the budget left). Several sequences can be
   partially prefilled at once. All of them fit the token budget `max_batched_tokens`, except
   that the most recently admitted one may get less than its chunk: each was admitted into
   budget that the earlier ones left over, and a sequence that got its whole share never asks
   for more later (a chunk is followed by a chunk no larger, or a decode). So the decodes are
   served first here, in O(1), and the runtime serves its sequences in arrival order: the same
   batch. When a sequence needs KV blocks and too few are free, the most recently admitted
   running sequence (= the latest arrival: running sequences all arrived before waiting ones)
   is preempted by recompute (its blocks are freed, it goes back to the head of the waiting
   queue and later prefills prompt + the tokens it generated so far; a decode served first
   gives its token back), then the next most recent, until the blocks fit or the sequence is
   itself the most recent left: then a decode is preempted too, but a prefill chunk waits (the
   sequence keeps its blocks and progress, gets no tokens in this iteration, and nothing is
   admitted behind it; the older sequences holding the blocks it needs either finish or,
   needing blocks themselves, preempt it). vLLM v1 preempts it instead and counts on its
   prefix cache to find the blocks again; with no prefix cache here, that would redo the whole
   prefill, over and over under KV pressure.
2. unless the iteration preempted a sequence, the budget left admits waiting sequences in
   FCFS order, each with its first chunk, while fewer than `max_seqs` run and the KV blocks
   for the chunk are free; admission stops at the first that does not fit (no skipping).
   With `scheduler_steps` k > 1 (an engine that decides k iterations at once) admissions
   happen only in iterations whose index is a multiple of k while any sequence decodes.
   Without chunked prefill a sequence is admitted only if all its tokens fit the budget left
   (chunk_size is ignored), except a recompute longer than `max_batched_tokens`: it is
   prefilled in pieces, each the budget left, like a chunked prefill.
   An engine that keeps prefills apart (`mixed_prefill=False`: SGLang's default, vLLM 0.6's)
   runs steps 1b and 2 alone first while sequences decode: when they give tokens, the iteration
   prefills only and the decodes wait for the next one; when not, it decodes only.
3. the iteration takes `cost.step_time(...)`, plus `cost.wake_time` when the engine had
   nothing to do before it (it waited for an arrival); the iteration that completes a prefill
   produces the first token (TTFT); each decode iteration one more token.

KV accounting. A sequence whose KV holds `c` tokens uses ceil(c/B) blocks; a prefill of
prompt P produces token 1 with c = P, and the decode that produces token k+1 writes position
P+k-1, so a request's peak is P + output - 1 tokens. A request whose peak can never fit in the
instance's blocks (`kv_capacity_tokens // block_size`) is rejected at arrival, as is, without
chunked prefill, a prompt longer than `max_batched_tokens`. There is no prefix cache: requests
with a common prefix share no blocks, and a recompute prefills all its tokens again (the
runtime's block manager can reuse cached blocks in both cases, and then runs ahead of this).

Tracing: `simulate(..., on_step=f)` calls f with a `StepRecord` (the iteration's decodes,
prefill chunks, preemptions, finishes, free blocks) at the end of every iteration.

Why it is fast: O(1) per iteration
----------------------------------
Decoding sequences are not visited each iteration. An engine keeps aggregates: the number of
decoding sequences, the sum of their contexts (which grows by that number each iteration), a
heap of finishes keyed by the engine's iteration index at which each sequence will have
produced all its tokens, and, per block-phase, how many sequences will cross a block boundary
at a given iteration (all decoding sequences advance in lockstep, so a sequence with context
c0 at iteration d0 needs a new block at iteration d exactly when (c0 - d0 + d) % B == 0: a
histogram over (c0 - d0) % B answers "how many new blocks now" in O(1)). KV blocks are counts,
not objects. Only rare events touch a single sequence: admission, a prefill chunk, finish,
preemption. Stale heap and stack entries are skipped lazily.

Pipeline parallelism (the model, kept simple)
---------------------------------------------
An instance with pp stages runs pp virtual engines (like vLLM's virtual engines), each with
its own queues and its own `max_batched_tokens` per micro-batch, sharing the instance's KV
block pool and its `max_seqs`. A micro-batch of one virtual engine takes
pp x step_time + (pp-1) x pp_hop_time(tokens) from start to end (step_time is one stage's
time, stages are taken as balanced), and the first stage accepts a new micro-batch only
every step_time (of the micro-batch before), so up to pp micro-batches are in flight; a
virtual engine decides its micro-batch when its previous one ends, even if the first stage
takes it a little later. An arrival goes to the instance's virtual engine with the least
outstanding work. A virtual engine that needs blocks preempts its own most recent sequences;
when partial prefills on several idle virtual engines wait for the blocks each other holds,
the most recent one is preempted (see `_Engine._unstick`).

Disaggregation
--------------
`role="prefill"` instances only prefill: the iteration that completes a prompt produces the
first token (TTFT); then the router picks a decode instance and the KV moves there in
`kv_transfer_time(prompt)` (transfers do not contend with each other); the prefill instance
keeps the blocks until the transfer ends. The decode instance admits the request, FCFS with
its recomputes, when it has room (blocks for the prompt and a free sequence slot) and decodes
the rest; one preempted there is recomputed there.

Routers: `round_robin` over the instances that accept arrivals (colocated or prefill), and
over decode instances for transfers; `least_work` picks the instance with the fewest
outstanding tokens (prefill tokens left + decode tokens left, kept as a running total).

Closed loop: `closed_loop_concurrency=N` starts N requests at t=0 and starts the next one
whenever one finishes or is rejected, ignoring `requests.arrival`.

Events at the same instant are handled together (iteration ends, KV transfers, arrivals)
before any engine starts its next iteration; an arrival during an iteration waits for its end.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from dataclasses import dataclass
from typing import Callable, Literal, Protocol, Sequence

import numpy as np

from flowc.compiler.model.results import SimResult
from flowc.compiler.model.workload import Requests
from flowc.compiler.plan import Scheduler


class StepCost(Protocol):
    @property
    def wake_time(self) -> float:
        """Extra seconds of the first iteration after an instance idled (a device and an engine loop
        that waited for work start slower: clocks, caches, a sleeping thread)."""
        ...

    def step_time(self, tokens: int, prefill_attn_pairs: int, decode_seqs: int, decode_kv_tokens: int) -> float:
        """Seconds for ONE pipeline stage to run one engine iteration. tokens: prefill-chunk tokens
        plus one per decoding sequence; prefill_attn_pairs: sum over prefill chunks of their
        (query, key) pairs, as `prefill_pairs` counts them; decode_seqs, decode_kv_tokens: count
        and total context (keys attended, the new token included) of the decoding sequences."""
        ...

    def prefill_pairs(self, new_tokens: int, past_tokens: int) -> int:
        """Causal (query, key) pairs of a prefill chunk of `new_tokens` after `past_tokens`
        cached ones, under the model's attention pattern (e.g. a sliding window)."""
        ...

    def pp_hop_time(self, tokens: int) -> float:
        """Activation hop between two pipeline stages for a micro-batch of `tokens` tokens."""
        ...

    def kv_transfer_time(self, tokens: int) -> float:
        """Moving one request's KV of `tokens` tokens from a prefill to a decode instance."""
        ...


@dataclass(frozen=True, kw_only=True)
class InstanceConfig:
    """One instance as the simulator sees it: its step cost, pipeline depth, KV pool (tokens,
    whole blocks of `scheduler.block_size`), batching settings and role."""

    cost: StepCost
    kv_capacity_tokens: int
    scheduler: Scheduler = Scheduler()
    pp: int = 1
    role: Literal["colocated", "prefill", "decode"] = "colocated"
    # iterations an engine decides at once (vLLM 0.6's --num-scheduler-steps): while sequences
    # decode, waiting ones are admitted only every `scheduler_steps` iterations
    scheduler_steps: int = 1
    # whether prefill chunks share an iteration with the decodes (vLLM's chunked prefill,
    # TensorRT-LLM's inflight batching); False: an iteration with prefill work prefills only and
    # the decodes wait for the next (SGLang without --enable-mixed-chunk, vLLM 0.6's default)
    mixed_prefill: bool = True
    # seconds a request spends outside the engine loop (receiving, tokenizing, streaming back):
    # added to its first token and its end, not to the engine's iterations
    request_latency: float = 0.0

    def __post_init__(self):
        s = self.scheduler
        if min(self.pp, s.block_size, s.max_batched_tokens, s.max_seqs, s.chunk_size, self.scheduler_steps) < 1:
            raise ValueError("pp, block_size, max_batched_tokens, max_seqs, chunk_size and scheduler_steps must be "
                             "at least 1")
        if self.kv_capacity_tokens < 0:
            raise ValueError("kv_capacity_tokens cannot be negative")
        if self.role not in ("colocated", "prefill", "decode"):
            raise ValueError(f"unknown role {self.role!r}")

    @property
    def kv_blocks(self) -> int:
        return self.kv_capacity_tokens // self.scheduler.block_size


@dataclass(frozen=True)
class StepRecord:
    """One engine iteration, as `simulate(..., on_step=...)` reports it at the iteration's end
    (for tests and traces; recording walks the engine's sequences, so it is not for speed).

    `start`: when the engine decided the iteration (with pp > 1 the first stage may take it
    later); `end`: when it ended. `decodes`: the requests that computed one decode token in it,
    sorted. `prefills`: the prefill chunks (request, tokens), in the order they were given
    budget. `preempted`: the requests preempted by recompute since the engine's previous
    iteration ended (while deciding this one; with pp > 1 also by `_Engine._unstick`), sorted.
    `finished`: the requests that produced their last token in it, sorted. `free_blocks`: the
    instance's free KV blocks once the iteration had its blocks."""

    instance: int
    engine: int
    start: float
    end: float
    decodes: tuple[int, ...]
    prefills: tuple[tuple[int, int], ...]
    preempted: tuple[int, ...]
    finished: tuple[int, ...]
    free_blocks: int


# Request states.
_WAITING, _PREFILL, _DECODE, _TRANSFER, _KV_READY, _DONE, _REJECTED = range(7)
_INF = math.inf


class _Instance:
    """One instance: a KV block pool shared by its pp virtual engines."""

    __slots__ = ("index", "cfg", "free", "held", "n_run", "stage_free", "engines")

    def __init__(self, index: int, cfg: InstanceConfig):
        self.index = index
        self.cfg = cfg
        self.free = cfg.kv_blocks
        self.held = 0  # blocks held by requests whose KV is being transferred out
        self.n_run = 0  # admitted sequences (prefilling or decoding), for max_seqs
        self.stage_free = 0.0  # when the first pipeline stage can take the next micro-batch
        self.engines: list[_Engine] = []

    def work(self) -> int:
        return sum(e.work for e in self.engines)


class _Engine:
    """One scheduler (a virtual engine when pp > 1). See the module docstring."""

    __slots__ = ("sim", "inst", "cfg", "B", "budget", "chunk", "max_seqs", "chunked", "role", "pp", "steps",
                 "separate", "paused", "step_time", "pair_count", "hop",
                 "d", "n_dec", "kv_sum", "cnt", "fin_heap", "stack", "waiting", "prefilling", "completing",
                 "work", "busy", "idle", "wake", "tokens_out", "preemptions", "iterations", "pending_tokens",
                 "index", "rec", "rec_start", "rec_decodes", "rec_chunks", "rec_preempted", "rec_finished", "rec_free")

    def __init__(self, sim: "_Sim", inst: _Instance, index: int = 0):
        cfg = inst.cfg
        self.sim, self.inst, self.cfg = sim, inst, cfg
        s = cfg.scheduler
        self.B, self.budget, self.max_seqs = s.block_size, s.max_batched_tokens, s.max_seqs
        self.chunk = min(s.chunk_size, s.max_batched_tokens)
        self.chunked, self.role, self.pp, self.steps = s.chunked_prefill, cfg.role, cfg.pp, cfg.scheduler_steps
        self.separate = not cfg.mixed_prefill and cfg.role == "colocated"
        self.paused = False  # the running iteration prefills only, the decodes wait for the next
        self.step_time, self.hop = cfg.cost.step_time, cfg.cost.pp_hop_time
        self.pair_count = cfg.cost.prefill_pairs
        self.d = 0  # index of the next iteration
        self.n_dec = 0  # decoding sequences
        self.kv_sum = 0  # sum of the decoding sequences' contexts before the next iteration
        self.cnt = [0] * self.B  # decoding sequences per block phase (c0 - d0) % B
        self.fin_heap: list[tuple[int, int]] = []  # (iteration of the last token, request)
        self.stack: list[tuple[int, int]] = []  # (admission id, request), admission order
        self.waiting: deque[int] = deque()  # not admitted (new, preempted, KV transferred), FCFS
        self.prefilling: list[int] = []  # admitted, partially prefilled, in admission order
        self.completing: list[int] = []  # prefills that complete in the running iteration
        self.work = 0  # outstanding tokens (prefill + decode) of the requests routed here
        self.busy = False
        self.idle = True  # no iteration ran since the engine last found nothing to do
        self.wake = cfg.cost.wake_time
        self.tokens_out = 0  # output tokens produced
        self.preemptions = 0
        self.iterations = 0
        self.pending_tokens = 0  # tokens of the running iteration
        self.index = index  # the virtual engine's index in its instance
        # on_step recording (None: off, and the rec_* fields stay unused)
        self.rec = sim.on_step
        self.rec_start = 0.0
        self.rec_decodes: tuple[int, ...] = ()
        self.rec_chunks: list[tuple[int, int]] = []
        self.rec_preempted: list[int] = []
        self.rec_finished: list[int] = []
        self.rec_free = 0

    # ---------------------------------------------------------------- one iteration

    def start(self, now: float, prefill_first: bool = True) -> float | None:
        """Schedule and start the next iteration at `now`; its end time, or None when idle. An
        engine that keeps prefills apart (`separate`) tries a prefill-only iteration first."""
        B = self.B
        inst = self.inst
        d = self.d
        n_dec = self.n_dec
        preempted = False
        # an engine that does not mix prefills into decode iterations tries a prefill-only one first
        paused = self.paused = bool(prefill_first and self.separate and n_dec and (self.prefilling or self.waiting))
        # 1a. decodes: blocks for the sequences crossing a block boundary now
        if n_dec and not paused:
            need = self.cnt[-d % B]
            if need > inst.free:
                need = self._preempt(need)
                preempted = True
                n_dec = self.n_dec
            inst.free -= need
        tokens = 0
        pairs = 0
        prefilling = self.prefilling
        waiting = self.waiting
        if prefilling or (waiting and not preempted):
            sim = self.sim
            state, pre_done, pre_total = sim.state, sim.pre_done, sim.pre_total
            pair_count = self.pair_count
            budget = self.budget
            left = budget if paused else budget - n_dec
            cap = self.chunk if self.chunked else budget  # unchunked, only a long recompute is partial
            stop = False
            # 1b. the next chunk of each partially prefilled sequence, in admission order
            i = 0
            while i < len(prefilling) and left > 0:
                rid = prefilling[i]
                done = pre_done[rid]
                rest = pre_total[rid] - done
                chunk = rest if rest < left else left
                if chunk > cap:
                    chunk = cap
                blocks = (done + chunk + B - 1) // B - (done + B - 1) // B
                if blocks > inst.free:
                    count = self.preemptions
                    blocks = self._preempt(blocks, rid)
                    preempted = preempted or self.preemptions != count
                    if blocks < 0:  # it waits, and nothing is admitted behind it
                        stop = True
                        break
                    # a preempted decode gives its token back
                    left = budget - tokens if paused else budget - self.n_dec - tokens
                inst.free -= blocks
                pre_done[rid] = done + chunk
                if self.rec is not None:
                    self.rec_chunks.append((rid, chunk))
                tokens += chunk
                pairs += pair_count(chunk, done)
                left -= chunk
                if chunk == rest:
                    prefilling.pop(i)
                    self.completing.append(rid)
                else:
                    i += 1
            n_dec = self.n_dec
            # 2. admissions, FCFS, unless the iteration preempted a sequence or is inside a block
            # of scheduler steps
            if not (preempted or stop or (n_dec and d % self.steps)):
                while waiting and left > 0 and inst.n_run < self.max_seqs:
                    rid = waiting[0]
                    if state[rid] == _KV_READY:  # transferred KV: admit straight into decoding
                        p = sim.prompt[rid]
                        blocks = p // B + 1  # the prompt's KV and the position this iteration writes
                        if blocks > inst.free:
                            break
                        inst.free -= blocks
                        waiting.popleft()
                        self._admit(rid)
                        self._start_decode(rid, d, p)
                        n_dec += 1
                        left -= 1
                        continue
                    rest = pre_total[rid]  # nothing computed yet
                    if self.chunked:
                        chunk = min(rest, left, cap)
                    elif rest <= left:
                        chunk = rest
                    elif rest > budget:  # a recompute longer than the budget: in pieces
                        chunk = left
                    else:
                        break
                    blocks = (chunk + B - 1) // B
                    if blocks > inst.free:
                        break
                    inst.free -= blocks
                    waiting.popleft()
                    self._admit(rid)
                    pre_done[rid] = chunk
                    if self.rec is not None:
                        self.rec_chunks.append((rid, chunk))
                    tokens += chunk
                    pairs += pair_count(chunk, 0)
                    left -= chunk
                    if chunk == rest:
                        self.completing.append(rid)
                    else:
                        prefilling.append(rid)
        if paused and tokens == 0:  # nothing to prefill after all: a decode iteration
            return self.start(now, prefill_first=False)
        n_dec = 0 if paused else n_dec
        tokens += n_dec
        if tokens == 0:
            self.busy = False
            self.idle = True
            if prefilling and self.pp > 1:
                self._unstick(now)
            return None
        dt = self.step_time(tokens, pairs, n_dec, self.kv_sum + n_dec)
        if self.idle:
            dt += self.wake
            self.idle = False
        self.busy = True
        self.pending_tokens = tokens
        if self.rec is not None:
            self._record_start(now)
        if self.pp == 1:
            return now + dt
        begin = now if now > inst.stage_free else inst.stage_free
        inst.stage_free = begin + dt
        return begin + self.pp * dt + (self.pp - 1) * self.hop(tokens)

    def finish(self, now: float) -> None:
        """End the running iteration at `now`: tokens out, finishes, prefill completions."""
        sim = self.sim
        d = self.d
        self.busy = False
        self.iterations += 1
        self.work -= self.pending_tokens
        if self.paused:  # a prefill-only iteration: the decodes did not advance, nor does `d`
            self.tokens_out += len(self.completing)
            completing, self.completing = self.completing, []
            for rid in completing:
                self._prefill_done(rid, now, d - 1)  # decodes from iteration d on
            if self.rec is not None:
                self._record_end(now)
            return
        n_dec = self.n_dec
        self.tokens_out += n_dec + len(self.completing)
        self.kv_sum += n_dec
        heap = self.fin_heap
        if heap and heap[0][0] <= d:
            state, c0s, d0s, fkey = sim.state, sim.c0, sim.d0, sim.fkey
            B = self.B
            cnt = self.cnt
            inst = self.inst
            while heap and heap[0][0] <= d:
                key, rid = heapq.heappop(heap)
                if state[rid] != _DECODE or fkey[rid] != key:
                    continue  # stale: preempted since
                c = c0s[rid] + d - d0s[rid] + 1  # context after this iteration
                cnt[(c0s[rid] - d0s[rid]) % B] -= 1
                self.n_dec -= 1
                inst.n_run -= 1
                self.kv_sum -= c
                inst.free += (c + B - 1) // B
                sim.finish_request(rid, now)
                if self.rec is not None:
                    self.rec_finished.append(rid)
        if self.completing:
            completing = self.completing
            self.completing = []
            for rid in completing:
                self._prefill_done(rid, now, d)
        self.d = d + 1
        if self.rec is not None:
            self._record_end(now)

    def _record_start(self, now: float) -> None:
        sim = self.sim
        state, adm = sim.state, sim.adm
        self.rec_start = now
        self.rec_decodes = () if self.paused else tuple(sorted(rid for a, rid in self.stack
                                                               if adm[rid] == a and state[rid] == _DECODE))
        self.rec_free = self.inst.free

    def _record_end(self, now: float) -> None:
        self.rec(StepRecord(instance=self.inst.index, engine=self.index, start=self.rec_start, end=now,
                            decodes=self.rec_decodes, prefills=tuple(self.rec_chunks),
                            preempted=tuple(sorted(self.rec_preempted)), finished=tuple(sorted(self.rec_finished)),
                            free_blocks=self.rec_free))
        self.rec_chunks, self.rec_preempted, self.rec_finished = [], [], []

    # ---------------------------------------------------------------- rare events

    def _admit(self, rid: int) -> None:
        sim = self.sim
        sim.state[rid] = _PREFILL
        sim.adm_counter += 1
        sim.adm[rid] = sim.adm_counter
        self.stack.append((sim.adm_counter, rid))
        self.inst.n_run += 1

    def _start_decode(self, rid: int, d0: int, c0: int) -> None:
        """rid decodes from iteration d0 on with c0 tokens of KV; it has sim.gen[rid] tokens."""
        sim = self.sim
        sim.state[rid] = _DECODE
        sim.c0[rid] = c0
        sim.d0[rid] = d0
        key = d0 + sim.output[rid] - sim.gen[rid] - 1
        sim.fkey[rid] = key
        heapq.heappush(self.fin_heap, (key, rid))
        self.cnt[(c0 - d0) % self.B] += 1
        self.n_dec += 1
        self.kv_sum += c0

    def _prefill_done(self, rid: int, now: float, d: int) -> None:
        sim = self.sim
        total = sim.pre_total[rid]
        gen = total - sim.prompt[rid] + 1
        sim.gen[rid] = gen
        if sim.first_token[rid] < 0:
            sim.first_token[rid] = now
        if gen >= sim.output[rid]:
            self.inst.n_run -= 1
            self.inst.free += (total + self.B - 1) // self.B
            sim.finish_request(rid, now)
            if self.rec is not None:
                self.rec_finished.append(rid)
        elif self.role == "prefill":
            self.inst.n_run -= 1
            sim.state[rid] = _TRANSFER
            sim.start_transfer(rid, self, now, (total + self.B - 1) // self.B)
        else:
            self._start_decode(rid, d + 1, total)

    def _unstick(self, now: float) -> None:
        """pp > 1: virtual engines share the block pool, so partial prefills on several of them
        can each hold blocks the others wait for. When every virtual engine is idle (nothing in
        flight, no decoders) and no KV transfer will return blocks, preempt the most recently
        admitted partial prefill and restart the engine of the oldest one at once, before the
        others (which are restarted next): the oldest always progresses. (An idle virtual engine
        holds at most one partial prefill: one that cannot grow preempts its engine's later ones.)"""
        inst, sim = self.inst, self.sim
        if inst.held or not all(e.idle for e in inst.engines):  # one that just finished restarts first
            return
        adm = sim.adm
        partials = sorted((adm[e.prefilling[0]], e) for e in inst.engines if e.prefilling)
        if len(partials) < 2:
            return  # one partial alone always fits: nothing else holds blocks
        owner = partials[-1][1]
        assert len(owner.prefilling) == 1
        victim = owner.prefilling.pop()
        done = sim.pre_done[victim]
        inst.free += (done + owner.B - 1) // owner.B
        owner.work += done
        sim.pre_done[victim] = 0
        sim.state[victim] = _WAITING
        owner.waiting.appendleft(victim)
        inst.n_run -= 1
        owner.preemptions += 1
        if owner.rec is not None:
            owner.rec_preempted.append(victim)
        sim.launch(partials[0][1], now)
        sim.touched.extend(e for e in inst.engines if not e.busy)

    def _preempt(self, need: int, owner: int = -1) -> int:
        """Preempt the most recently admitted sequences until `need` more blocks are free; returns
        the blocks still needed. For the decodes (owner -1), `need` counts one block per decoding
        sequence crossing a block boundary, so a preempted one needs none (the last decoder left
        always fits, alone or preempted). For the next chunk of the partial prefill `owner`, the
        decodes already hold this iteration's blocks; returns -1 when owner becomes the most
        recent sequence left: it waits, keeping its blocks."""
        sim = self.sim
        state, adm, c0s, d0s = sim.state, sim.adm, sim.c0, sim.d0
        B = self.B
        d = self.d
        inst = self.inst
        stack = self.stack
        decodes_hold_blocks = owner >= 0
        while need > inst.free:
            adm_id, rid = stack[-1]
            st = state[rid]
            if adm[rid] != adm_id or (st != _DECODE and st != _PREFILL):
                stack.pop()
                continue  # stale entry
            if rid == owner:
                return -1  # it waits, keeping its blocks
            stack.pop()
            if st == _DECODE:
                c = c0s[rid] + d - d0s[rid]
                gen = sim.gen[rid] + d - d0s[rid]
                sim.gen[rid] = gen
                self.cnt[(c0s[rid] - d0s[rid]) % B] -= 1
                self.n_dec -= 1
                self.kv_sum -= c
                if decodes_hold_blocks:
                    inst.free += c // B + 1  # its KV and the position this iteration would write
                else:
                    inst.free += (c + B - 1) // B
                    if c % B == 0:
                        need -= 1
                sim.pre_total[rid] = sim.prompt[rid] + gen
                self.work += sim.prompt[rid] + gen - 1
            else:  # partially prefilled: the latest of them (victims are the latest admitted)
                assert self.prefilling[-1] == rid
                self.prefilling.pop()
                done = sim.pre_done[rid]
                inst.free += (done + B - 1) // B
                self.work += done
            sim.pre_done[rid] = 0
            state[rid] = _WAITING
            inst.n_run -= 1
            self.preemptions += 1
            self.waiting.appendleft(rid)  # popped latest first: the oldest victim ends at the head
            if self.rec is not None:
                self.rec_preempted.append(rid)
        return need


class _Sim:
    """Global state: per-request lists (indexed by request id), instances, events."""

    def __init__(self, requests: Requests, configs: Sequence[InstanceConfig], router: str,
                 closed_loop_concurrency: int | None, on_step: Callable[[StepRecord], None] | None = None):
        if not configs:
            raise ValueError("simulate needs at least one instance")
        if router not in ("round_robin", "least_work"):
            raise ValueError(f"unknown router {router!r}")
        n = len(requests)
        self.n = n
        self.router = router
        self.on_step = on_step
        self.prompt = requests.prompt.tolist()
        self.output = requests.output.tolist()
        self.closed = closed_loop_concurrency
        if closed_loop_concurrency is not None:
            if closed_loop_concurrency < 1:
                raise ValueError("closed_loop_concurrency must be at least 1")
            k = min(n, closed_loop_concurrency)
            self.arrival = [0.0] * k + [_INF] * (n - k)
            self.filled = k
        else:
            self.arrival = requests.arrival.tolist()
            self.filled = n
        self.state = [_WAITING] * n
        self.gen = [0] * n
        self.pre_done = [0] * n
        self.pre_total = list(self.prompt)
        self.c0 = [0] * n
        self.d0 = [0] * n
        self.fkey = [0] * n
        self.adm = [0] * n
        self.adm_counter = 0
        self.first_token = [-1.0] * n
        self.finish_time = [-1.0] * n
        self.served_by = [-1] * n
        self.decoded_by = [-1] * n
        self.held = [0] * n  # blocks a prefill instance keeps during the transfer
        self.done = 0
        self.transfers: list[tuple[float, int, int, _Engine, _Engine]] = []
        self.xfer_seq = 0
        self.instances = [_Instance(i, cfg) for i, cfg in enumerate(configs)]
        for inst in self.instances:
            inst.engines = [_Engine(self, inst, k) for k in range(inst.cfg.pp)]
        self.front = [i for i in self.instances if i.cfg.role != "decode"]
        self.back = [i for i in self.instances if i.cfg.role == "decode"]
        has_prefill = any(i.cfg.role == "prefill" for i in self.instances)
        if not self.front:
            raise ValueError("no instance accepts arrivals: add a colocated or prefill instance")
        if has_prefill and not self.back:
            raise ValueError("prefill instances need at least one decode instance")
        self.back_tokens = min((i.cfg.kv_blocks * i.cfg.scheduler.block_size for i in self.back), default=0)
        self.rr_front = 0
        self.rr_back = 0
        self.heap: list[tuple[float, int, _Engine]] = []
        self.touched: list[_Engine] = []
        self.counter = itertools.count()  # tie-breaker of the event heap

    # ---------------------------------------------------------------- routing

    def _pick(self, candidates: list[_Instance], rr_attr: str) -> _Instance:
        if len(candidates) == 1:
            return candidates[0]
        if self.router == "round_robin":
            i = getattr(self, rr_attr)
            setattr(self, rr_attr, i + 1)
            return candidates[i % len(candidates)]
        return min(candidates, key=_Instance.work)

    @staticmethod
    def _engine_of(inst: _Instance) -> _Engine:
        engines = inst.engines
        return engines[0] if len(engines) == 1 else min(engines, key=lambda e: e.work)

    def route_arrival(self, rid: int) -> _Engine | None:
        inst = self._pick(self.front, "rr_front")
        cfg = inst.cfg
        p, o = self.prompt[rid], self.output[rid]
        s = cfg.scheduler
        peak = p if cfg.role == "prefill" else p + o - 1  # it fits in whole blocks
        fits = peak <= cfg.kv_blocks * s.block_size and (s.chunked_prefill or p <= s.max_batched_tokens)
        if fits and cfg.role == "prefill" and o > 1:
            fits = p + o - 1 <= self.back_tokens  # it must fit whichever decode instance it goes to
        self.served_by[rid] = inst.index
        if not fits:
            self.state[rid] = _REJECTED
            self.done += 1
            return None
        engine = self._engine_of(inst)
        engine.work += p if cfg.role == "prefill" else p + o - 1
        engine.waiting.append(rid)
        return engine

    def start_transfer(self, rid: int, source: _Engine, now: float, blocks: int) -> None:
        inst = self._pick(self.back, "rr_back")
        engine = self._engine_of(inst)
        engine.work += self.output[rid] - 1
        self.decoded_by[rid] = inst.index
        self.held[rid] = blocks
        source.inst.held += blocks
        t = now + source.cfg.cost.kv_transfer_time(self.prompt[rid])
        self.xfer_seq += 1
        heapq.heappush(self.transfers, (t, self.xfer_seq, rid, source, engine))

    def launch(self, engine: _Engine, now: float) -> None:
        """Start `engine`'s next iteration at `now` and schedule its end."""
        end = engine.start(now)
        if end is not None:
            heapq.heappush(self.heap, (end, next(self.counter), engine))

    def finish_request(self, rid: int, now: float) -> None:
        self.state[rid] = _DONE
        self.finish_time[rid] = now
        self.done += 1

    # ---------------------------------------------------------------- the event loop

    def run(self) -> None:
        """Process events in time order. All events at one instant are handled together
        (iteration ends, then KV transfers, then arrivals) before any engine starts its next
        iteration, so requests arriving at the same time share an iteration. Fast path: an
        engine whose next iteration ends before any other event runs ahead without the heap."""
        heap = self.heap
        transfers = self.transfers
        arrival = self.arrival
        n = self.n
        closed = self.closed
        nxt = 0
        counter = self.counter
        push, pop = heapq.heappush, heapq.heappop
        while True:
            t = heap[0][0] if heap else _INF
            tx = transfers[0][0] if transfers else _INF
            ta = arrival[nxt] if nxt < n else _INF
            if t < tx and t < ta:
                engine = pop(heap)[2]
                if engine.pp == 1 and (not heap or heap[0][0] > t):
                    other = heap[0][0] if heap else _INF  # other engines do not change meanwhile
                    touched = None
                    while True:
                        engine.finish(t)
                        if closed is not None:
                            self._refill(t)
                        limit = other
                        if transfers and transfers[0][0] < limit:
                            limit = transfers[0][0]
                        if nxt < n and arrival[nxt] < limit:
                            limit = arrival[nxt]
                        if limit <= t:  # something else happens now: the general path
                            touched = [engine]
                            break
                        end = engine.start(t)
                        if end is None:
                            break
                        if end >= limit:
                            push(heap, (end, next(counter), engine))
                            break
                        t = end
                    if touched is None:
                        continue
                else:
                    engine.finish(t)
                    touched = [engine]
                    if engine.pp > 1:
                        touched.extend(engine.inst.engines)
            else:
                if tx < t:
                    t = tx
                if ta < t:
                    t = ta
                if t == _INF:
                    break
                touched = []
            self.touched = touched  # engines to start at t; _unstick adds to it
            while heap and heap[0][0] <= t:
                engine = pop(heap)[2]
                engine.finish(t)
                touched.append(engine)
                if engine.pp > 1:
                    touched.extend(engine.inst.engines)
            while transfers and transfers[0][0] <= t:
                _, _, rid, source, target = pop(transfers)
                source.inst.free += self.held[rid]
                source.inst.held -= self.held[rid]
                self.held[rid] = 0
                touched.extend(source.inst.engines)
                self.state[rid] = _KV_READY
                target.waiting.append(rid)
                touched.append(target)
            if closed is not None:
                self._refill(t)
            while nxt < n and arrival[nxt] <= t:
                engine = self.route_arrival(nxt)
                nxt += 1
                if engine is not None:
                    touched.append(engine)
                elif closed is not None:
                    self._refill(t)
            for engine in touched:
                if not engine.busy:
                    end = engine.start(t)
                    if end is not None:
                        push(heap, (end, next(counter), engine))

    def _refill(self, t: float) -> None:
        """Closed loop: one new arrival at `t` for each request done."""
        target = min(self.n, self.closed + self.done)
        while self.filled < target:
            self.arrival[self.filled] = t
            self.filled += 1

    def result(self) -> SimResult:
        arrival = np.array(self.arrival, dtype=np.float64)
        first = np.array(self.first_token, dtype=np.float64)
        finish = np.array(self.finish_time, dtype=np.float64)
        output = np.array(self.output, dtype=np.int64)
        state = np.array(self.state)
        finished = state == _DONE
        rejected = state == _REJECTED
        served = np.array(self.served_by, dtype=np.int64)
        latency = np.array([inst.cfg.request_latency for inst in self.instances])[np.maximum(served, 0)]
        first, finish = first + latency, finish + latency
        ttft = np.where(first >= latency, first - arrival, _INF)
        e2e = np.where(finished, finish - arrival, _INF)
        with np.errstate(invalid="ignore", divide="ignore"):
            tpot = np.where(output > 1, (e2e - ttft) / np.maximum(output - 1, 1), np.nan)
        tpot = np.where(finished | (output <= 1), tpot, _INF)
        engines = [e for inst in self.instances for e in inst.engines]
        return SimResult(
            ttft=ttft, tpot=tpot, e2e=e2e, finished=finished, rejected=rejected, arrival=arrival,
            finish=np.where(finished, finish, np.nan), output=output,
            instance=served,
            decode_instance=np.array(self.decoded_by, dtype=np.int64),
            preemptions=sum(e.preemptions for e in engines), iterations=sum(e.iterations for e in engines),
            tokens_generated=sum(e.tokens_out for e in engines),
            kv_blocks_in_use=[inst.cfg.kv_blocks - inst.free for inst in self.instances],
        )


def simulate(requests: Requests, instances: Sequence[InstanceConfig], *,
             router: Literal["round_robin", "least_work"] = "round_robin",
             closed_loop_concurrency: int | None = None,
             on_step: Callable[[StepRecord], None] | None = None) -> SimResult:
    """Simulate serving `requests` on `instances` (see the module docstring for the model).
    `on_step`, if given, is called with a `StepRecord` at the end of every engine iteration."""
    sim = _Sim(requests, instances, router, closed_loop_concurrency, on_step)
    sim.run()
    stuck = sum(1 for st in sim.state if st != _DONE and st != _REJECTED)
    if stuck:  # a scheduler bug, never a property of the input: fail loudly rather than report it
        raise RuntimeError(f"simulator: {stuck} requests neither finished nor rejected (please report)")
    return sim.result()
