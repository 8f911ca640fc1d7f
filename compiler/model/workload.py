"""Request streams for the simulator: sampled from a workload spec, or fixed by hand.

A `Requests` holds three aligned numpy arrays: arrival times in seconds (sorted, the first
request at 0), prompt tokens and output tokens (ints, output >= 1, prompt >= 1).

Sampling is deterministic per seed, and draws arrivals, prompts and outputs from three
independent streams (spawned from one `SeedSequence`), so changing one distribution does not
change the others. `rate_scale` divides every arrival time (it multiplies the rate) and reuses
the same draws, so a sweep over rates sees the same requests, only closer together: this is
what makes the goodput bisection well behaved.

Arrival processes:
- poisson(rate): exponential inter-arrival times of mean 1/rate;
- gamma(rate, cv): gamma inter-arrival times with shape 1/cv^2 and mean 1/rate (cv 1 is
  Poisson; cv > 1 is burstier);
- constant(rate): one request every 1/rate seconds;
- trace: the arrival times of the file. Asking for more requests than the trace has repeats
  it, each copy shifted by the trace's span plus one mean inter-arrival time;
- batch: an offline job, every request queued at t = 0 (no rate: `base_rate` is 0).

Lengths: fixed, uniform(low, high) (integers, both ends included), normal(mean, std),
lognormal(median, sigma), or trace: resampled with replacement from the file's column; when the
arrival process is the same trace file, the trace rows are used as they are, aligned with the
arrival times. Sampled values are rounded to integers, clipped to [min, max] when given, and to
at least 1 token.

How many requests: `n` when given; else `workload.requests`; else, with `duration`, as many as
arrive within it; else every row of an arrival trace; else 1000.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flowc.compiler import spec
from flowc.compiler.diagnostics import Diagnostic, FlowError
from flowc.compiler.model.traces import Trace, read_trace
from flowc.compiler.spec import MAX_REQUESTS

DEFAULT_REQUESTS = 1000


@dataclass(frozen=True)
class Requests:
    arrival: np.ndarray  # float64 seconds, sorted
    prompt: np.ndarray  # int64 tokens, >= 1
    output: np.ndarray  # int64 tokens, >= 1

    def __post_init__(self):
        arrival = np.ascontiguousarray(self.arrival, dtype=np.float64)
        prompt = np.ascontiguousarray(self.prompt, dtype=np.int64)
        output = np.ascontiguousarray(self.output, dtype=np.int64)
        if not (arrival.ndim == prompt.ndim == output.ndim == 1 and len(arrival) == len(prompt) == len(output)):
            raise ValueError("arrival, prompt and output must be 1-D arrays of the same length")
        if len(arrival) and (np.any(np.diff(arrival) < 0) or arrival[0] < 0):
            raise ValueError("arrival times must be sorted and non-negative")
        if len(arrival) and (prompt.min() < 1 or output.min() < 1):
            raise ValueError("prompt and output lengths must be at least 1 token")
        object.__setattr__(self, "arrival", arrival)
        object.__setattr__(self, "prompt", prompt)
        object.__setattr__(self, "output", output)

    def __len__(self) -> int:
        return len(self.arrival)

    @property
    def rate(self) -> float:
        """Mean arrival rate in requests/s (inf when every request arrives at once)."""
        span = float(self.arrival[-1] - self.arrival[0]) if len(self) > 1 else 0.0
        return (len(self) - 1) / span if span > 0 else float("inf")

    def scaled(self, rate_scale: float) -> "Requests":
        """The same requests arriving `rate_scale` times as fast."""
        if rate_scale <= 0:
            raise ValueError("rate_scale must be positive")
        return Requests(self.arrival / rate_scale, self.prompt, self.output)

    def head(self, n: int) -> "Requests":
        return Requests(self.arrival[:n], self.prompt[:n], self.output[:n])

    def all_at_once(self) -> "Requests":
        """The same requests, every one queued at t = 0 (a saturated run measures capacity)."""
        return Requests(np.zeros(len(self)), self.prompt, self.output)


def fixed_requests(n: int, input_len: int, output_len: int, rate: float | None = None, *, seed: int = 0,
                   poisson: bool = True) -> Requests:
    """`n` identical requests. `rate` None: all arrive at t=0; else Poisson arrivals at `rate`
    req/s (deterministic per `seed`), or one every 1/rate s with `poisson=False`."""
    if rate is None:
        arrival = np.zeros(n)
    elif poisson:
        process = spec.Arrival(kind="poisson", rate=rate)
        arrival = _arrivals(process, None, n, np.random.default_rng(np.random.SeedSequence(seed).spawn(3)[0]))
    else:
        arrival = np.arange(n, dtype=np.float64) / rate
    return Requests(arrival, np.full(n, input_len, dtype=np.int64), np.full(n, output_len, dtype=np.int64))


def base_rate(workload: spec.Workload) -> float:
    """The workload's arrival rate in requests/s (for a trace: its mean rate; a batch: 0, it
    has no rate to serve)."""
    if workload.is_batch:
        return 0.0
    if workload.arrival.kind == "trace":
        return _trace(workload.arrival.trace).rate
    return float(workload.arrival.rate)


def sample_requests(workload: spec.Workload, n: int | None = None, *, seed: int = 0,
                    rate_scale: float = 1.0) -> Requests:
    if rate_scale <= 0:
        raise ValueError("rate_scale must be positive")
    arrival_seed, prompt_seed, output_seed = np.random.SeedSequence(seed).spawn(3)
    a = workload.arrival
    trace = _trace(a.trace) if a.kind == "trace" else None
    if n is None and workload.requests is not None:
        n = workload.requests
    if n is None and workload.duration is None:
        n = len(trace.arrivals) if trace is not None else DEFAULT_REQUESTS
    expected = n if n is not None else workload.duration * base_rate(workload) * rate_scale
    if expected > MAX_REQUESTS:
        raise FlowError([Diagnostic("F0307", f"workload `{workload.name}` asks to simulate {expected:.3g} requests; "
                                    f"flowc simulates at most {MAX_REQUESTS:,} in one run",
                                    help="lower `requests` (or `duration`): percentiles settle within a few "
                                         "thousand requests")])
    if n is not None:
        arrival = _arrivals(a, trace, n, np.random.default_rng(arrival_seed)) / rate_scale
    else:  # as many as arrive within the duration: draw in growing batches (same draws as one big batch)
        horizon = workload.duration
        guess = max(16, int(horizon * base_rate(workload) * rate_scale * 1.2) + 16)
        while True:
            arrival = _arrivals(a, trace, guess, np.random.default_rng(arrival_seed)) / rate_scale
            if arrival[-1] >= horizon:
                break
            guess *= 2
        n = int(np.searchsorted(arrival, horizon, side="left"))
        arrival = arrival[:n]
    aligned_rows = np.arange(n) % len(trace.arrivals) if trace is not None else None
    prompt = _lengths(workload.prompt, n, np.random.default_rng(prompt_seed), a, aligned_rows, column="prompt")
    output = _lengths(workload.output, n, np.random.default_rng(output_seed), a, aligned_rows, column="output")
    return Requests(arrival, prompt, output)


def _trace(path: str | None) -> Trace:
    if path is None:
        raise ValueError("a trace distribution needs a file")
    return read_trace(Path(path))


def _arrivals(a: spec.Arrival, trace: Trace | None, n: int, rng: np.random.Generator) -> np.ndarray:
    """n sorted arrival times starting at 0, at the unscaled rate."""
    if n <= 0 or a.kind == "batch":
        return np.zeros(max(n, 0))
    if a.kind == "trace":
        assert trace is not None  # sample_requests reads the trace of a trace arrival
        times = np.asarray(trace.arrivals, dtype=np.float64)
        rows = len(times)
        copies = -(-n // rows)
        gap = (times[-1] - times[0]) / (rows - 1) if rows > 1 and times[-1] > times[0] else 1.0
        period = times[-1] - times[0] + gap
        tiled = (times[None, :] + period * np.arange(copies)[:, None]).ravel()
        return tiled[:n] - tiled[0]
    rate = float(a.rate)
    if a.kind == "constant":
        return np.arange(n, dtype=np.float64) / rate
    if a.kind == "poisson":
        gaps = rng.exponential(1.0 / rate, n - 1)
    elif a.kind == "gamma":
        shape = 1.0 / a.cv ** 2
        gaps = rng.gamma(shape, 1.0 / (shape * rate), n - 1)
    else:
        raise ValueError(f"unknown arrival process {a.kind!r}")
    return np.concatenate(([0.0], np.cumsum(gaps)))


def _lengths(d: spec.Lengths, n: int, rng: np.random.Generator, a: spec.Arrival, aligned_rows: np.ndarray | None,
             column: str) -> np.ndarray:
    if d.kind == "fixed":
        values = np.full(n, d.value, dtype=np.float64)
    elif d.kind == "uniform":
        values = rng.integers(d.low, d.high + 1, n).astype(np.float64)
    elif d.kind == "normal":
        values = rng.normal(d.mean, d.std, n)
    elif d.kind == "lognormal":
        values = d.median * np.exp(d.sigma * rng.standard_normal(n))
    elif d.kind == "trace":
        source = np.asarray(getattr(_trace(d.trace), column), dtype=np.float64)
        same_file = a.kind == "trace" and a.trace is not None and Path(a.trace).resolve() == Path(d.trace).resolve()
        values = source[aligned_rows] if same_file else source[rng.integers(0, len(source), n)]
    else:
        raise ValueError(f"unknown length distribution {d.kind!r}")
    values = np.rint(values)
    if d.min is not None or d.max is not None:
        values = np.clip(values, d.min if d.min is not None else -np.inf, d.max if d.max is not None else np.inf)
    return np.maximum(values, 1).astype(np.int64)
