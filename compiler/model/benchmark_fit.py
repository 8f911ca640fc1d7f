"""Fit a GPU's engine overheads to measured serving runs (`flowc calibrate --from-benchmark`).

Each run (model/benchmarks.py) is replayed in the simulator on one instance of the model on
tp x pp of the GPU, as the engine ran it: the engine's kernels and scheduling (model/engines.py:
its default cap on running sequences, whether it mixes prefills into decode iterations), a KV
pool from the memory budget (`memory.memory_budget`, the default scheduler), and the run's
requests:
- its lengths (each successful request's, else the means of its totals), at most
  `max_requests` of them (2,000 by default) in the file's order;
- its load: a rate with no concurrency cap is open-loop arrivals at that rate (Poisson, or gamma
  inter-arrival times of shape `burstiness`, from a fixed seed); a rate with a cap the client
  hit (Little's law on the measured throughput and latency: the requests in flight reached 80%
  of the cap) and "inf" with a cap are a closed loop at the cap; "inf" without a cap is every
  request at once (then, with more requests than were simulated, TTFT and E2E, which grow with
  the queue, are not compared).

Fitted (the GPU `overhead` kinds of model/operators.py, which replace the engine profile's for
that GPU, model/cost.py): `step` a and `sequence` b, the engine's time per iteration beyond the
kernels (a + b x sequences in it), and `request` r, each request's time outside the engine loop
(it adds to TTFT and E2E only; when no run measured TTFT or E2E, the engine's own is kept).
(a, b, r) >= 0 minimize the mean over runs and metrics of |log(predicted / measured)| for the
measured median TTFT, median TPOT (the median ITL where a run has no TPOT: the simulator's
tokens of one request come at even steps) and output throughput. The search is deterministic
and bounded: for each (a, b) simulated, r is chosen exactly without simulating again (it shifts
every first token and finish by r); (a, b) come from a log grid (`STEP_GRID` x
`SEQUENCE_GRID`) refined by scipy's Nelder-Mead in (a / 1 ms, b / 10 us), where the score's valleys
are straight lines (a TPOT of about kernels + a + b x batch stays along a + batch x b =
constant); the result is rounded to 3 significant digits, as the profile writes it, and scored
again. The engine's `wake` overhead is kept. Not fitted: the kernels (stdlib/calibration.json),
the per-layer and per-token terms (the fitted step holds the per-layer time of this model's
depth), the scheduler settings, prefix caching (the simulator has none), and what a run's
lengths do not show (a ShareGPT run without per-request lengths is replayed at its mean lengths).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Sequence

import numpy as np

from flowc.compiler.diagnostics import Diagnostic, FlowError
from flowc.compiler.model.benchmarks import BenchmarkRun
from flowc.compiler.model.engines import default_max_seqs, engine_profile
from flowc.compiler.model.instance import instance_config
from flowc.compiler.model.memory import MemoryBudget, memory_budget, unfit_diagnostic
from flowc.compiler.model.parallelism import problems
from flowc.compiler.model.simulator import InstanceConfig, simulate
from flowc.compiler.model.workload import Requests, fixed_requests
from flowc.compiler.plan import Scheduler
from flowc.compiler.spec import GPU, Link, Model

MAX_REQUESTS = 2000
SEED = 0
STEP_GRID = (0.0, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2)  # seconds per iteration
SEQUENCE_GRID = (0.0, 1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4)  # seconds per sequence of an iteration
SCALES = (1e-3, 1e-5)  # the refinement's units of the step and sequence overheads (seconds)
TOLERANCE = 1e-3  # in those units: the refinement stops when its points are within 1 us and 10 ns
MAX_EVALUATIONS = 300  # (a, b) points simulated, the grid's 70 included
CLIENT_BOUND = 0.8  # a rate run whose requests in flight reach this share of its cap is a closed loop
MISS = 10.0  # |log error| of a prediction that is not a positive finite number
FITTED = ("ttft", "tpot", "throughput")  # the metrics of the score (ITL stands in for a missing TPOT)
SHOWN = ("ttft", "tpot", "itl", "e2e", "throughput")


@dataclass(frozen=True)
class Prediction:
    """One run as the simulator predicts it. `predicted` holds every metric of `compared` (the
    measured ones that the simulation can be compared with); `fitted` those in the score."""

    run: BenchmarkRun
    mode: str  # "open loop", "closed loop", "offline"
    requests: int  # simulated
    predicted: dict[str, float] = field(default_factory=dict)
    compared: tuple[str, ...] = ()
    fitted: tuple[str, ...] = ()
    makespan: float = 0.0  # seconds from the first arrival to the last finish

    def error(self, metric: str) -> float:
        """predicted / measured - 1."""
        return self.predicted[metric] / self.run.measured()[metric] - 1

    def log_errors(self) -> list[float]:
        return [_log_error(self.predicted[m], self.run.measured()[m]) for m in self.fitted]

    def with_request_latency(self, r: float) -> Prediction:
        """The same run with every request spending `r` more seconds outside the engine loop:
        its first token and its finish come r later (what the simulator does with it)."""
        if r == 0:
            return self
        shifted = dict(self.predicted)
        for metric in ("ttft", "e2e"):
            if metric in shifted:
                shifted[metric] += r
        if "throughput" in shifted and self.makespan > 0:
            shifted["throughput"] *= self.makespan / (self.makespan + r)
        return replace(self, predicted=shifted, makespan=self.makespan + r)


@dataclass(frozen=True)
class BenchmarkFit:
    gpu: GPU  # the fitted GPU: the given one renamed, with the fitted overheads (and the engine's wake)
    engine: str
    overheads: dict[str, float]  # every overhead of the fitted GPU, rounded as the profile writes them
    fitted: tuple[str, ...]  # the kinds fitted ("step", "sequence", and "request" when a run measured TTFT)
    before_overheads: dict[str, float]  # what the predictions used before: the GPU's own, else the engine's
    before: tuple[Prediction, ...]
    after: tuple[Prediction, ...]
    score_before: float  # mean |log(predicted / measured)| over the fitted metrics of every run
    score_after: float
    evaluations: int  # (step, sequence) points simulated
    calibration_source: str  # the fitted GPU's kernels (model/operators.py)
    calibrated_as: Optional[str]  # the calibrated GPU whose kernel curves the fitted GPU's predictions use
    base_calibrated_as: Optional[str]  # those the given GPU's use


def _log_error(predicted: float, measured: float) -> float:
    if not (math.isfinite(predicted) and predicted > 0):
        return MISS
    return min(MISS, abs(math.log(predicted / measured)))


def score(predictions: Sequence[Prediction]) -> float:
    """Mean |log(predicted / measured)| over every fitted metric of every run."""
    terms = [e for p in predictions for e in p.log_errors()]
    return sum(terms) / len(terms) if terms else 0.0


@dataclass(frozen=True)
class Replay:
    """A run's simulated workload, fixed before the search."""

    run: BenchmarkRun
    requests: Requests
    concurrency: Optional[int]
    mode: str
    compared: tuple[str, ...]
    fitted: tuple[str, ...]


def _client_bound(run: BenchmarkRun) -> bool:
    """Whether a run with a rate and a concurrency cap kept about `cap` requests in flight
    (Little's law: throughput x latency), so that the cap, not the rate, set its load."""
    assert run.concurrency is not None
    throughput = run.request_throughput or run.completed / run.duration
    latency = run.e2e
    per_token = run.tpot or run.itl
    if latency is None and run.ttft is not None and per_token is not None:
        latency = run.ttft + per_token * max(0.0, run.mean_output - 1)
    return latency is not None and throughput * latency >= CLIENT_BOUND * run.concurrency


def _arrivals(run: BenchmarkRun, n: int) -> np.ndarray:
    assert run.rate is not None
    if run.burstiness == 1:
        return fixed_requests(n, 1, 1, rate=run.rate, seed=SEED).arrival
    rng = np.random.default_rng(SEED)
    gaps = rng.gamma(run.burstiness, 1.0 / (run.rate * run.burstiness), n - 1)
    return np.concatenate(([0.0], np.cumsum(gaps)))


def replay(run: BenchmarkRun, max_requests: int = MAX_REQUESTS) -> Replay:
    """The requests and load that stand for `run` in the simulator (see the module docstring)."""
    available = len(run.prompt_lens) if run.per_request else run.completed
    n = max(1, min(available, max_requests))
    if run.per_request:
        prompt, output = np.array(run.prompt_lens[:n]), np.array(run.output_lens[:n])
    else:
        prompt, output = np.full(n, run.prompt_lens[0]), np.full(n, run.output_lens[0])
    measured = run.measured()
    compared = [m for m in SHOWN if m in measured]
    if run.rate is not None and not (run.concurrency is not None and _client_bound(run)):
        mode, concurrency, arrival = "open loop", None, _arrivals(run, n)
    else:
        concurrency = run.concurrency
        mode = "closed loop" if concurrency is not None and concurrency < n else "offline"
        arrival = np.zeros(n)
        if mode == "offline" and n < run.completed:  # a shorter queue: its waits are not the run's
            compared = [m for m in compared if m not in ("ttft", "e2e")]
    fitted = [m for m in FITTED if m in compared]
    if "tpot" not in compared and "itl" in compared:
        fitted.append("itl")
    return Replay(run, Requests(arrival, prompt, output), concurrency, mode, tuple(compared), tuple(fitted))


def predict(r: Replay, instance: InstanceConfig) -> Prediction:
    """The simulator's figures for a replayed run on `instance`."""
    result = simulate(r.requests, [instance], closed_loop_concurrency=r.concurrency)
    tpot = result.percentile("tpot", 50)
    values = {"ttft": result.percentile("ttft", 50), "tpot": tpot, "itl": tpot, "e2e": result.percentile("e2e", 50),
              "throughput": result.output_throughput}
    return Prediction(r.run, r.mode, len(r.requests), {m: values[m] for m in r.compared}, r.compared, r.fitted,
                      result.makespan)


def engine_scheduler(engine: str) -> Scheduler:
    """The scheduler a benchmark of `engine` at its defaults ran: the engine's own cap on running
    sequences (none: the KV cache bounds them), the plan's defaults otherwise."""
    return Scheduler(max_seqs=default_max_seqs(engine))


def check_configuration(runs: Sequence[BenchmarkRun], model: Model, gpu: GPU, *, tp: int, pp: int,
                        block_size: int = Scheduler().block_size) -> MemoryBudget:
    """The instance's memory budget (at the default scheduler); FlowError when the model cannot
    take tp and pp (F0401-F0403), its weights do not fit (F0503) or a run's longest request does
    not fit its KV cache (F0504)."""
    found = [Diagnostic(p.code, p.message, help=p.help) for p in problems(model, tp, pp, 1)]
    if found:
        raise FlowError(found)
    budget = memory_budget(model, gpu.memory, tp=tp, pp=pp, vendor=gpu.vendor)
    if not budget.fits:
        raise FlowError([unfit_diagnostic(budget, model, gpu.name, tp, pp,
                                          "give the --tp and --pp the benchmarked server ran with, and the "
                                          "weights' --dtype")])
    longest = max((p + o for run in runs for p, o in zip(run.prompt_lens, run.output_lens)), default=0)
    blocks = -(-longest // block_size)
    if blocks > budget.kv_blocks:
        raise FlowError([Diagnostic(
            "F0504", f"a measured request of {longest} tokens needs {blocks} KV blocks; {tp * pp} x {gpu.name} "
            f"(tp {tp}, pp {pp}) holds {budget.kv_blocks}",
            help="give the --tp, --pp, --dtype and --kv-dtype the benchmarked server ran with")])
    return budget


def best_request_latency(predictions: Sequence[Prediction]) -> float:
    """The r >= 0 that minimizes the score of `predictions` shifted by r: one of the shifts that
    make a measured TTFT exact, or 0 (the score between those points is the sum of one-sided
    log terms, which such a point bounds)."""
    points = {0.0} | {p.run.measured()["ttft"] - p.predicted["ttft"] for p in predictions
                      if "ttft" in p.fitted and math.isfinite(p.predicted["ttft"])}
    candidates = sorted(r for r in points if r >= 0)
    return min(candidates, key=lambda r: (score([p.with_request_latency(r) for p in predictions]), r))


def _quiet(what: str, done: int, total: Optional[int]) -> None:
    pass


def fit_benchmarks(runs: Sequence[BenchmarkRun], model: Model, gpu: GPU, link: Link, *, engine: str, tp: int = 1,
                   pp: int = 1, name: Optional[str] = None, max_requests: int = MAX_REQUESTS,
                   on_progress: Callable[[str, int, Optional[int]], None] = _quiet) -> BenchmarkFit:
    """Fit `overhead step`, `sequence` and `request` of `gpu` (renamed `name`) so that the
    simulator predicts `runs`, measured with `engine` on `model` over tp x pp of `gpu` joined by
    `link`. Raises FlowError for a configuration that cannot serve the runs
    (`check_configuration`), ValueError for no runs. `on_progress(what, done, total)` hears of
    each point simulated (the total is the bound, MAX_EVALUATIONS)."""
    if not runs:
        raise ValueError("no benchmark runs to fit")
    budget = check_configuration(runs, model, gpu, tp=tp, pp=pp)
    scheduler = engine_scheduler(engine)
    replays = [replay(run, max_requests) for run in runs]
    profile = engine_profile(engine)
    kept = {k: v for k, v in profile.overheads.items() if k == "wake"}
    fit_request = any("ttft" in r.fitted for r in replays)
    if not fit_request and "request" in profile.overheads:
        kept["request"] = profile.overheads["request"]
    renamed = gpu.model_copy(update={"name": name or gpu.name})

    def instance(g: GPU) -> InstanceConfig:
        return instance_config(model, g, link, kv_capacity_tokens=budget.kv_tokens, tp=tp, pp=pp,
                               scheduler=scheduler, engine=engine)

    def with_overheads(a: float, b: float, r: float = 0.0) -> GPU:
        fitted = {"step": a, "sequence": b, **({"request": r} if fit_request else {})}
        return renamed.model_copy(update={"overheads": {**fitted, **kept}})

    cache: dict[tuple[float, float], tuple[float, float]] = {}  # (a, b) -> (score, best r)

    def simulated(a: float, b: float) -> tuple[Prediction, ...]:
        config = instance(with_overheads(a, b))  # request latency 0: chosen below, without simulating
        return tuple(predict(r, config) for r in replays)

    def evaluate(a: float, b: float) -> float:
        if (a, b) not in cache:
            predictions = simulated(a, b)
            r = best_request_latency(predictions) if fit_request else 0.0
            cache[(a, b)] = (score([p.with_request_latency(r) for p in predictions]), r)
            on_progress("fitting overheads", len(cache), MAX_EVALUATIONS)
        return cache[(a, b)][0]

    best = min(((a, b) for a in STEP_GRID for b in SEQUENCE_GRID), key=lambda p: (evaluate(*p), p))
    a, b = _refine(evaluate, best, MAX_EVALUATIONS - len(cache))
    evaluate(a, b)
    a, b, r = _round(a), _round(b), _round(cache[(a, b)][1])
    fitted_gpu = with_overheads(a, b, r)
    after_instance = instance(fitted_gpu)
    after = tuple(predict(rp, after_instance) for rp in replays)
    before_instance = instance(gpu)
    before = tuple(predict(rp, before_instance) for rp in replays)
    return BenchmarkFit(
        gpu=fitted_gpu, engine=engine, overheads=dict(fitted_gpu.overheads),
        fitted=("step", "sequence") + (("request",) if fit_request else ()),
        before_overheads=dict(gpu.overheads or profile.overheads), before=before, after=after,
        score_before=score(before), score_after=score(after), evaluations=len(cache),
        calibration_source=after_instance.cost.calibration_source,
        calibrated_as=_calibrated_as(after_instance), base_calibrated_as=_calibrated_as(before_instance))


def _calibrated_as(instance: InstanceConfig) -> Optional[str]:
    ops = getattr(instance.cost, "ops", None)
    return getattr(ops, "base_name", None)


def _refine(evaluate: Callable[[float, float], float], start: tuple[float, float], budget: int) -> tuple[float, float]:
    """scipy's Nelder-Mead from `start` in (step / SCALES[0], sequence / SCALES[1]), both kept
    >= 0, within `budget` evaluations and TOLERANCE; the best point seen."""
    from scipy.optimize import minimize  # only the fit needs it

    def f(x) -> float:
        return evaluate(max(0.0, x[0]) * SCALES[0], max(0.0, x[1]) * SCALES[1])

    x0 = [start[0] / SCALES[0], start[1] / SCALES[1]]
    simplex = [x0, [x0[0] + max(0.5 * x0[0], 0.2), x0[1]], [x0[0], x0[1] + max(0.5 * x0[1], 0.5)]]
    found = minimize(f, x0, method="Nelder-Mead", bounds=[(0.0, None), (0.0, None)],
                     options={"initial_simplex": simplex, "xatol": TOLERANCE, "fatol": 0.0,
                              "maxfev": max(budget, 1)})
    return max(0.0, float(found.x[0])) * SCALES[0], max(0.0, float(found.x[1])) * SCALES[1]


def _round(x: float) -> float:
    """3 significant digits, as the profile writes it."""
    return float(f"{x:.3g}")
