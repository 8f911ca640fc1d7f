"""Soak the runtime engine: many requests, under load and faults, every invariant checked.

A tiny random-weight Llama (2 layers, hidden 64, vocabulary 128, context 256, fp32, torch
kernels on the CPU) runs a plan whose KV pool holds 12 blocks of 16 tokens, while a request
takes up to 12: preemption is routine. Requests come in waves of 1 to 12 while the engine
runs (a wave every 1 to 6 steps), most through `Engine.add_request`, one wave in 10 through
`Engine.stream`, which the soak abandons (closes) after a random number of events. Mixed in:

  * valid requests of random lengths (a quarter share one of three 32-token prefixes, for the
    prefix cache), greedy, seeded sampling or unseeded sampling, some with stop tokens, and
    some reusing the id of a request that finished;
  * invalid requests (one in ten), one per mistake `Request` can carry: an empty prompt,
    token ids outside the vocabulary or not ints, a prompt that is not a list, max_tokens 0
    or below, prompt + max_tokens beyond the context or the KV pool, bad temperature / top_p /
    top_k / seed / stop_token_ids, params that are not SamplingParams, a request id that is
    not a string or is in flight, a NaN arrival time;
  * aborts (`Engine.abort`) of waiting, running and preempted requests, and of finished ones.

Checked as it runs: each event's index follows the request's last; a request ends with exactly
one final event (nothing after it); "length" means max_tokens tokens, "stop" a stop token
last; only cancelled requests end with "abort"; an invalid request gets RequestError (through
add_request) or an error event (through a stream) with the message for its mistake, and never
runs; an aborted request's blocks are freed at once; the block pool's invariants hold after
every step (`BlockManager.check`: ref counts equal the running sequences' references, every
block in one state); a stream closed early leaves none of its requests in flight, and the
events of the other requests go on. Every greedy request that was preempted (of those given
to add_request, whose outputs say so) is run again alone on a second engine with the same weights
and must give the same tokens: exactly, or up to a near-tie (the first differing token's top
two logits within NEAR_TIE of each other, where the two batches' rounding may pick either).
At the end: every request accounted for, nothing in flight, the pool whole (nothing used,
free + cached = all blocks, ref counts zero), no Sequence object left alive, and the resident
memory after the run within RSS_DRIFT_MIB of what it was after the first tenth. The soak stops
early after MAX_FAILURES failures, or when STALLED_POLLS steps in a row give no event (a hang).

Run: python benchmarks/soak_engine.py --requests 10000 --seed 0   (exit status 1 on a failure)
`soak()` is also what tests/test_engine_soak.py runs (a short soak by default, 10,000 with -m slow).
"""

from __future__ import annotations

import argparse
import gc
import math
import random
import resource
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from flowc.compiler.optimize.instance_plan import instance_plan
from flowc.compiler.spec import Model
from flowc.runtime import Engine, Request, RequestError, RequestOutput, SamplingParams, TokenEvent
from flowc.runtime.sampler import Sampler
from flowc.runtime.sequence import Sequence

MODEL = Model(name="soak-tiny", architecture="llama", layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=96,
              vocab=128, max_context=256, weights="fp32", kv="fp32")
SETTINGS = dict(max_batched_tokens=64, chunk_size=32, max_seqs=8, block_size=16, kv_blocks=12)
POOL_TOKENS = SETTINGS["kv_blocks"] * SETTINGS["block_size"]
# The same request's logits in two batches differ by float rounding (at most 3e-7 measured on
# this model); a greedy pick may then differ only where the top two logits are this close.
NEAR_TIE = 1e-4
RSS_DRIFT_MIB = 32  # allowed growth of the resident set from the first tenth of the run to its end
MAX_FAILURES = 50  # failures kept verbatim (all are counted)
CANCEL_PER_STEP = 0.025  # the chance of an abort after each step
STREAM_WAVES = 0.1  # the share of waves submitted through a stream (abandoned early)
STALLED_POLLS = 1000  # this many polls in a row without an event while requests are in flight: a hang


@dataclass
class Tracked:
    """A submitted request the soak expects events for."""

    request: Request
    output: Optional[RequestOutput]  # None when a stream submitted it
    expect_error: Optional[str] = None  # the message fragment of an invalid request's error
    tokens: list[int] = field(default_factory=list)
    cancelled: bool = False


@dataclass
class SoakReport:
    requests: int = 0
    valid: int = 0
    invalid: int = 0
    cancelled: dict[str, int] = field(default_factory=dict)  # by where the request was
    completed: int = 0  # valid, not cancelled, ended with "length" or "stop"
    stopped: int = 0  # of those, by a stop token
    preemptions: int = 0
    preempted_requests: int = 0
    alone_checked: int = 0
    near_ties: int = 0
    tokens: int = 0
    wall_s: float = 0.0
    engine_s: float = 0.0  # wall time less the reference runs
    rss_warm_mib: float = 0.0
    rss_end_mib: float = 0.0
    rss_peak_mib: float = 0.0
    pool: str = ""
    failures: list[str] = field(default_factory=list)
    num_failures: int = 0

    @property
    def ok(self) -> bool:
        return self.num_failures == 0

    def fail(self, message: str) -> None:
        self.num_failures += 1
        if len(self.failures) < MAX_FAILURES:
            self.failures.append(message)

    def lines(self) -> list[str]:
        cancelled = ", ".join(f"{n} {where}" for where, n in sorted(self.cancelled.items()))
        drift = self.rss_end_mib - self.rss_warm_mib
        return [
            f"requests     {self.requests}: {self.valid} valid, {self.invalid} invalid, "
            f"{sum(self.cancelled.values())} cancelled ({cancelled or 'none'})",
            f"completions  {self.completed} ({self.stopped} on a stop token)",
            f"preemptions  {self.preemptions}, of {self.preempted_requests} requests; {self.alone_checked} greedy ones "
            f"rerun alone, {self.near_ties} differing only at a near-tie",
            f"throughput   {self.tokens} tokens in {self.engine_s:.1f} s: {self.tokens / max(self.engine_s, 1e-9):.0f} "
            f"tokens/s (checks included; reference runs excluded)",
            f"wall time    {self.wall_s:.1f} s",
            f"memory       peak RSS {self.rss_peak_mib:.1f} MiB; RSS {self.rss_warm_mib:.1f} MiB after a tenth, "
            f"{self.rss_end_mib:.1f} MiB at the end (drift {drift:+.1f} MiB, bound {RSS_DRIFT_MIB} MiB)",
            f"block pool   {self.pool}",
            f"failures     {self.num_failures}",
            *(f"  - {f}" for f in self.failures),
        ]


class MarginSampler(Sampler):
    """The reference engine's sampler: also keeps each pick's margin (top logit minus the
    second), by output index; the reference runs one request at a time."""

    def __init__(self) -> None:
        self.margins: dict[int, float] = {}

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        top = logits.topk(2, dim=-1).values.tolist()
        for seq, (first, second) in zip(seqs, top):
            self.margins[len(seq.output_token_ids)] = first - second
        return super().sample(logits, seqs)


def rss_mib() -> float:
    """The resident set now (Linux /proc), else the peak."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return peak_rss_mib()


def peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


class Workload:
    """Random requests, valid and invalid, from one seed."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.prefixes = [[rng.randrange(MODEL.vocab) for _ in range(32)] for _ in range(3)]

    def tokens(self, n: int) -> list[int]:
        return [self.rng.randrange(MODEL.vocab) for _ in range(n)]

    def valid(self, request_id: Optional[str]) -> Request:
        rng = self.rng
        length = rng.choice([rng.randint(1, 32)] * 6 + [rng.randint(33, 100)] * 3 + [rng.randint(101, 150)])
        prompt = self.tokens(length)
        if rng.random() < 0.25:
            prompt = rng.choice(self.prefixes) + prompt
        # fits the context and the pool (whose last token is never cached: + 1)
        room = min(MODEL.max_context - len(prompt), POOL_TOKENS + 1 - len(prompt))
        max_tokens = rng.randint(1, min(60, room))
        stop = tuple(self.tokens(rng.randint(1, 3))) if rng.random() < 0.2 else ()
        kind = rng.random()
        if kind < 0.7:
            params = SamplingParams(max_tokens=max_tokens, stop_token_ids=stop)
        else:
            seed = rng.randrange(2**32) if kind < 0.9 else None
            params = SamplingParams(max_tokens=max_tokens, temperature=rng.uniform(0.5, 1.5),
                                    top_k=rng.choice([0, rng.randint(1, 50)]), top_p=rng.uniform(0.5, 1.0),
                                    seed=seed, stop_token_ids=stop)
        return Request(prompt, params, request_id=request_id)

    def invalid(self, request_id: str, in_flight: Optional[str]) -> tuple[Request, str]:
        """A request with one mistake, and a fragment of the error it must get. `in_flight`: an
        id in flight, for a duplicate (None: no duplicate)."""
        rng, vocab, ok = self.rng, MODEL.vocab, SamplingParams(max_tokens=4)
        prompt = self.tokens(rng.randint(1, 20))
        cases: list[tuple[Any, ...]] = [
            ([], ok, "the prompt is empty"),
            (prompt + [vocab + rng.randrange(1000)], ok, "not a token id of this model"),
            ([-1 - rng.randrange(5)] + prompt, ok, "not a token id of this model"),
            (prompt + [1.0], ok, "not a token id of this model"),
            (prompt + [True], ok, "not a token id of this model"),
            (rng.randrange(vocab), ok, "prompt_token_ids must be a list"),
            (prompt, SamplingParams(max_tokens=-rng.randrange(3)), "max_tokens must be an integer >= 1"),
            (prompt, SamplingParams(max_tokens=MODEL.max_context), "exceeds the model's context"),
            (self.tokens(150), SamplingParams(max_tokens=60), "KV-cache blocks"),
            (prompt, SamplingParams(temperature=-rng.uniform(0.1, 2)), "temperature must be"),
            (prompt, SamplingParams(temperature=math.nan), "temperature must be"),
            (prompt, SamplingParams(top_p=rng.choice([0.0, 1.5])), "top_p must be"),
            (prompt, SamplingParams(top_k=-1), "top_k must be"),
            (prompt, SamplingParams(seed=-1), "seed must be"),
            (prompt, SamplingParams(stop_token_ids=(vocab,)), "stop_token_ids[0]"),
            (prompt, {"max_tokens": 4}, "params must be a SamplingParams"),
            (prompt, ok, "request_id must be a string", 7),
            (prompt, ok, "arrival_time must be", request_id, math.nan),
        ]
        if in_flight is not None:
            cases.append((prompt, ok, "duplicate request id", in_flight))
        prompt, params, message, *extra = rng.choice(cases)
        request_id = extra[0] if extra else request_id
        arrival = extra[1] if len(extra) > 1 else 0.0
        return Request(prompt, params, request_id=request_id, arrival_time=arrival), message


class Soak:
    def __init__(self, num_requests: int, seed: int):
        self.rng = random.Random(seed)
        self.workload = Workload(self.rng)
        self.report = SoakReport()
        self.num_requests = num_requests
        plan = instance_plan(MODEL, **SETTINGS)
        self.engine = Engine.from_plan(plan, seed=seed, backend="torch")
        self.reference = Engine.from_plan(plan, seed=seed, backend="torch")  # the same weights
        self.reference.sampler = MarginSampler()
        self.live: dict[Any, Tracked] = {}  # by request id: submitted, final event not seen yet
        self.finished_ids: deque[str] = deque(maxlen=64)  # for valid reuse of an id
        self.submitted = 0
        self.reference_s = 0.0

    # --------------------------------------------------------------- requests

    def make(self, in_stream: bool) -> tuple[Request, Optional[str]]:
        """The next request and, for an invalid one, its error fragment."""
        n = self.submitted
        self.submitted += 1
        self.report.requests += 1
        if self.rng.random() < 0.1:
            self.report.invalid += 1
            # a stream abandoned early may not submit a duplicate, whose id then names another request
            in_flight = None if in_stream or not self.live else self.rng.choice(list(self.live))
            return self.workload.invalid(f"bad{n}", in_flight)
        self.report.valid += 1
        request_id: Optional[str] = f"r{n}"
        reusable = [i for i in self.finished_ids if i not in self.live]
        if reusable and self.rng.random() < 0.03:
            request_id = self.rng.choice(reusable)
        elif not in_stream and self.rng.random() < 0.05:
            request_id = None  # the engine names it
        return self.workload.valid(request_id), None

    def add_wave(self, size: int) -> None:
        for _ in range(size):
            request, error = self.make(in_stream=False)
            try:
                output = self.engine.add_request(request)
            except RequestError as e:
                if error is None or error not in str(e):
                    self.report.fail(f"add_request({request.request_id!r}) raised {e!r}; expected {error!r}")
                continue
            if error is not None:
                self.report.fail(f"invalid request {request.request_id!r} accepted (expected {error!r})")
            self.live[output.request_id] = Tracked(request, output)

    def stream_wave(self, size: int) -> None:
        """Submit a wave through `stream`, handle a random number of its events, then close it."""
        wave = []
        for _ in range(size):
            request, error = self.make(in_stream=True)
            wave.append(request.request_id)
            self.live[request.request_id] = Tracked(request, None, expect_error=error)
        stream = self.engine.stream([self.live[i].request for i in wave])
        for _, event in zip(range(self.rng.randint(0, 40)), stream):
            self.handle(event)
        in_flight = self.in_flight()
        open_ids = [i for i in wave if i in self.live]
        stream.close()
        after = self.in_flight()
        # the others were never submitted, or finished in the step whose events were cut short
        for request_id in open_ids:
            del self.live[request_id]
            if request_id in after:
                self.report.fail(f"{request_id!r} still in flight after its stream was closed")
            elif request_id in in_flight:
                self.count_cancel("stream closed")
        self.check_pool()

    def in_flight(self) -> set[str]:
        sched = self.engine.scheduler
        return {s.request_id for s in sched.running} | {s.request_id for s in sched.waiting}

    # --------------------------------------------------------------- aborts

    def cancel_one(self) -> None:
        """Abort a waiting, running or preempted request, or (rarely) one not in flight."""
        sched = self.engine.scheduler
        choices = {"running": list(sched.running),
                   "preempted": [s for s in sched.waiting if s.num_preemptions],
                   "waiting": [s for s in sched.waiting if not s.num_preemptions]}
        choices = {where: seqs for where, seqs in choices.items() if seqs}
        if not choices or self.rng.random() < 0.05:
            gone = self.finished_ids[-1] if self.finished_ids else "never-submitted"
            if gone not in self.live and self.engine.abort(gone) is not None:
                self.report.fail(f"abort({gone!r}) of a request not in flight returned an output")
            return
        where = self.rng.choice(sorted(choices))
        seq = self.rng.choice(choices[where])
        tracked = self.live.get(seq.request_id)
        output = self.engine.abort(seq.request_id)
        if tracked is None or output is None or output.finish_reason != "abort":
            self.report.fail(f"abort({seq.request_id!r}) while {where}: {output!r}")
            return
        if seq.block_ids or not seq.is_finished:
            self.report.fail(f"abort({seq.request_id!r}) while {where} left it holding blocks {seq.block_ids}")
        tracked.cancelled = True
        self.count_cancel(where)

    def count_cancel(self, where: str) -> None:
        self.report.cancelled[where] = self.report.cancelled.get(where, 0) + 1

    # --------------------------------------------------------------- events

    def handle(self, event: TokenEvent) -> None:
        tracked = self.live.get(event.request_id)
        if tracked is None:
            self.report.fail(f"event for a request not in flight: {event}")
            return
        if tracked.expect_error is not None or (event.error is not None and event.finish_reason is None):
            self.rejected(tracked, event)
            return
        if event.index != len(tracked.tokens):
            self.report.fail(f"{event.request_id!r}: event index {event.index} after {len(tracked.tokens)} tokens")
        if event.token_id is not None:
            tracked.tokens.append(event.token_id)
            self.report.tokens += 1
        elif event.finish_reason != "abort":
            self.report.fail(f"{event.request_id!r}: an event without a token that is not an abort: {event}")
        if event.finish_reason is not None:
            del self.live[event.request_id]
            self.finished_ids.append(event.request_id)
            self.finish(tracked, event)

    def rejected(self, tracked: Tracked, event: TokenEvent) -> None:
        del self.live[event.request_id]
        expected = tracked.expect_error
        if expected is None or event.error is None or expected not in event.error or event.token_id is not None:
            self.report.fail(f"{event.request_id!r}: rejection {event} (expected {expected!r})")

    def finish(self, tracked: Tracked, event: TokenEvent) -> None:
        params, reason, tokens = tracked.request.params, event.finish_reason, tracked.tokens
        name = event.request_id
        if reason == "abort":
            if not tracked.cancelled or event.error is not None:
                self.report.fail(f"{name!r} aborted though not cancelled: {event.error}")
        elif tracked.cancelled:
            self.report.fail(f"{name!r} was cancelled but finished with {reason!r}")
        elif reason == "length" and len(tokens) != params.max_tokens:
            self.report.fail(f"{name!r}: 'length' after {len(tokens)} tokens, max_tokens {params.max_tokens}")
        elif reason == "stop" and (tokens[-1] not in params.stop_token_ids or len(tokens) > params.max_tokens):
            self.report.fail(f"{name!r}: 'stop' on {tokens[-1]}, stop ids {params.stop_token_ids}")
        elif reason not in ("length", "stop"):
            self.report.fail(f"{name!r}: unknown finish reason {reason!r}")
        else:
            self.report.completed += 1
            self.report.stopped += reason == "stop"
        output = tracked.output
        if output is None:
            return
        if output.output_token_ids != tokens or output.finish_reason != reason:
            self.report.fail(f"{name!r}: output {output.output_token_ids} {output.finish_reason!r} differs from its "
                             f"events {tokens} {reason!r}")
        if output.num_preemptions:
            self.report.preempted_requests += 1
            if reason != "abort" and params.temperature == 0:
                self.check_alone(tracked)

    def check_alone(self, tracked: Tracked) -> None:
        """The request run alone on the reference engine gives the same tokens (up to a near-tie)."""
        start = time.perf_counter()
        sampler = self.reference.sampler
        sampler.margins.clear()
        alone = self.reference.generate([Request(tracked.request.prompt_token_ids, tracked.request.params)])[0]
        self.reference_s += time.perf_counter() - start
        self.report.alone_checked += 1
        if alone.output_token_ids == tracked.tokens:
            return
        k = next((i for i, (a, b) in enumerate(zip(alone.output_token_ids, tracked.tokens)) if a != b), None)
        if k is not None and sampler.margins.get(k, math.inf) < NEAR_TIE:
            self.report.near_ties += 1
            return
        self.report.fail(f"{tracked.output.request_id!r} preempted {tracked.output.num_preemptions}x gave "
                         f"{tracked.tokens}; alone: {alone.output_token_ids}")

    # --------------------------------------------------------------- the run

    def check_pool(self) -> None:
        try:
            self.engine.block_manager.check(self.engine.scheduler.running)
        except AssertionError as e:
            self.report.fail(f"block pool after {self.report.tokens} tokens: {e}")

    def run(self) -> SoakReport:
        report, rng = self.report, self.rng
        start = time.perf_counter()
        until_wave = quiet = 0
        warm_at = max(1, self.num_requests // 10)
        while self.submitted < self.num_requests or self.engine.has_work():
            if report.num_failures >= MAX_FAILURES or quiet >= STALLED_POLLS:
                report.fail(f"stopped after {self.submitted} requests: {report.num_failures} failures, "
                            f"{quiet} polls in a row without an event")
                break
            if self.submitted < self.num_requests and (until_wave <= 0 or not self.engine.has_work()):
                size = min(rng.randint(1, 12), self.num_requests - self.submitted)
                self.stream_wave(size) if rng.random() < STREAM_WAVES else self.add_wave(size)
                until_wave = rng.randint(1, 6)
                if not report.rss_warm_mib and self.submitted >= warm_at:
                    gc.collect()
                    report.rss_warm_mib = rss_mib()
            events = self.engine.poll()
            quiet = 0 if events else quiet + 1
            for event in events:
                self.handle(event)
            self.check_pool()
            until_wave -= 1
            if rng.random() < CANCEL_PER_STEP:
                self.cancel_one()
                self.check_pool()
        report.wall_s = time.perf_counter() - start
        report.engine_s = report.wall_s - self.reference_s
        report.preemptions = self.engine.scheduler.num_preemptions
        self.final_checks()
        return report

    def final_checks(self) -> None:
        report, bm = self.report, self.engine.block_manager
        for request_id, tracked in list(self.live.items())[:MAX_FAILURES]:
            report.fail(f"{request_id!r} never got its final event ({len(tracked.tokens)} tokens)")
        if self.in_flight():
            report.fail(f"requests still in flight at the end: {sorted(self.in_flight())[:10]}")
        try:
            bm.check([])  # with no sequence holding blocks: every ref count is zero
            whole = bm.num_used == 0 and bm.num_free + bm.num_cached == bm.num_blocks
        except AssertionError as e:
            whole = False
            report.fail(f"block pool at the end: {e}")
        report.pool = (f"{'whole' if whole else 'NOT WHOLE'}: {bm.num_free} free + {bm.num_cached} cached "
                       f"(prefix cache) of {bm.num_blocks}, {bm.num_used} used")
        if not whole:
            report.fail(f"block pool at the end: {report.pool}")
        self.live.clear()
        gc.collect()
        alive = sum(type(o) is Sequence for o in gc.get_objects())
        if alive:
            report.fail(f"{alive} Sequence objects still alive at the end")
        report.rss_end_mib, report.rss_peak_mib = rss_mib(), peak_rss_mib()
        if report.rss_end_mib - report.rss_warm_mib > RSS_DRIFT_MIB:
            report.fail(f"RSS grew {report.rss_end_mib - report.rss_warm_mib:.1f} MiB after the first tenth "
                        f"(bound {RSS_DRIFT_MIB} MiB)")

    def close(self) -> None:
        self.engine.close()
        self.reference.close()


def soak(num_requests: int, seed: int = 0) -> SoakReport:
    """Run the soak (see the module docstring) and return its report; `report.ok` when every
    invariant held."""
    torch.manual_seed(seed)  # the unseeded sampling requests draw from torch's global generator
    runner = Soak(num_requests, seed)
    try:
        return runner.run()
    finally:
        runner.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args()
    if args.requests < 1 or args.threads < 1:
        parser.error("--requests and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    report = soak(args.requests, args.seed)
    print(f"soak of the flowc engine: {args.requests} requests, seed {args.seed}, {args.threads} torch thread(s), "
          f"pool of {SETTINGS['kv_blocks']} blocks of {SETTINGS['block_size']} tokens")
    print("\n".join(report.lines()))
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
    main()
