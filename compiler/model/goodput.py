"""Goodput: the highest arrival rate whose simulation meets an SLO (a bisection over a rate
scale), and the steady-state throughput of a saturated run.

This module is the one definition every figure a user reads comes from (the compile output, the
plan's predictions, the report's attainment table, F0511's capacity): a rate *sustains* an SLO
when its simulation meets the SLO and the rate is within the capacity (`sustains`). Above the
capacity queues grow without bound, so a finite run that happens to pass there is not trusted.
Rates are scaled from the workload's nominal rate (`base_rate`), over the same sampled requests
(`n` requests, `seed`), so two callers with the same n and seed simulate the same runs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Union

import numpy as np

from flowc.compiler import spec
from flowc.compiler.model.results import SimResult
from flowc.compiler.model.simulator import simulate
from flowc.compiler.model.workload import Requests, base_rate, sample_requests

WorkloadLike = Union[spec.Workload, Callable[[float], Requests]]

TOLERANCE = 0.02  # the bisection stops when its bracket is this share of the capacity wide
CONFIRM_SCALE = 1.25  # after a bisection, this multiple of its result is tried too ...
CONFIRM_ROUNDS = 3  # ... and the search resumes above it when it passes (at most this often)


def sustains(result: SimResult, slo: spec.SLO, rate: float, capacity: float) -> bool:
    """Whether `rate` sustains `slo`: its simulation `result` meets it and the rate is within the
    capacity (steady_throughput of a saturated run)."""
    return rate <= capacity * (1 + 1e-9) and result.meets(slo)


@dataclass(frozen=True)
class GoodputSearch:
    """The result of a goodput search: the goodput (req/s), the rates simulated with whether
    each met the SLO, and the capacity probe (req/s) when `hi` was not given."""

    goodput: float
    trials: list[tuple[float, bool]]
    capacity: float | None = None

    @property
    def simulations(self) -> int:
        return len(self.trials) + (self.capacity is not None)


def goodput(make_instances, workload: WorkloadLike, slo: spec.SLO, *, lo: float = 0.0, hi: float | None = None,
            tol: float | None = None, seed: int = 0, n: int | None = None,
            router: Literal["round_robin", "least_work"] = "least_work") -> float:
    """The highest arrival rate (req/s) whose simulation meets `slo`; see `goodput_search`."""
    return goodput_search(make_instances, workload, slo, lo=lo, hi=hi, tol=tol, seed=seed, n=n, router=router).goodput


def goodput_search(make_instances, workload: WorkloadLike, slo: spec.SLO, *, lo: float = 0.0,
                   hi: float | None = None, tol: float | None = None, seed: int = 0, n: int | None = None,
                   router: Literal["round_robin", "least_work"] = "least_work") -> GoodputSearch:
    """Bisection over a rate scale; bounds, tolerance and result in req/s.

    make_instances: a list of InstanceConfig, or a callable () -> list.
    workload: a spec.Workload, sampled once with `seed` (`n` requests, default as in
    `sample_requests`) and replayed at every rate scale: the same requests, closer together;
    or a callable rate_scale -> Requests (e.g. `lambda s: sample_requests(w, rate_scale=s)`).
    A rate is scale x the base rate: the workload's nominal rate, or for a callable the mean
    arrival rate of its requests at scale 1.

    Bounds: `lo` (default 0) is assumed to pass; when lo > 0 it is simulated first and 0 is
    returned if it fails. `hi` defaults to the capacity: the steady-state request throughput
    of the same requests all arriving at t=0 (completions between the 10th and the 90th
    percentile, so neither the ramp-up nor the drain counts; one simulation). Above the
    capacity queues grow without bound, so a finite run that passes there is not trusted: when
    `hi` passes it is returned as is (the goodput is capped at `hi`). Otherwise bisection until
    the bracket [pass, fail] is at most `tol` wide (default TOLERANCE of hi), returning its lower
    end; then CONFIRM_SCALE x that end is tried, and the search goes on above it if it passes.
    Simulations: [1 capacity probe] + [1 for lo > 0] + 1 for hi + ceil(log2((hi - lo) / tol))
    + 1 confirmation: 9 with the defaults.
    """
    instances = list(make_instances() if callable(make_instances) else make_instances)
    requests_at: Callable[[float], Requests]
    if isinstance(workload, spec.Workload):
        rate0 = base_rate(workload)
        base = sample_requests(workload, n, seed=seed)

        requests_at = base.scaled
    else:
        requests_at = workload
        rate0 = requests_at(1.0).rate
    if not (0 < rate0 < math.inf):
        raise ValueError("the workload's requests need a finite, positive arrival rate")
    trials: list[tuple[float, bool]] = []

    def ok(rate: float) -> bool:
        met = simulate(requests_at(rate / rate0), instances, router=router).meets(slo)
        trials.append((rate, met))
        return met

    capacity = None
    if hi is None:
        probe = requests_at(1.0)
        saturated = simulate(probe.all_at_once(), instances, router=router)
        capacity = hi = steady_throughput(saturated)
        if not hi > 0:
            return GoodputSearch(0.0, trials, capacity)
    if tol is None:
        tol = TOLERANCE * hi
    if lo > 0 and not ok(lo):
        return GoodputSearch(0.0, trials, capacity)
    if hi <= lo:  # the probe underestimates a rate already shown to pass
        return GoodputSearch(lo, trials, capacity)
    ceiling = hi
    for _ in range(CONFIRM_ROUNDS + 1):
        lo = _bisect(ok, lo, hi, tol)
        # A queueing simulation over finite samples is not exactly monotone in the rate: try the
        # point above the result that the report's sweep shows, and search on from there if it
        # passes, so no rate the report shows as sustained lies above the goodput by that much.
        confirm = lo * CONFIRM_SCALE
        if lo <= 0 or confirm > ceiling or not ok(confirm):
            break
        lo, hi = confirm, ceiling
    return GoodputSearch(lo, trials, capacity)


def _bisect(ok: Callable[[float], bool], lo: float, hi: float, tol: float) -> float:
    """The lower end of a [pass, fail] bracket at most `tol` wide; `hi` itself when it passes."""
    if ok(hi):
        return hi
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo


def steady_throughput(result: SimResult) -> float:
    """Requests/s between the 10th and the 90th percentile of completion times."""
    finish = np.sort(result.finish[result.finished])
    if len(finish) < 10:
        return result.request_throughput
    i, j = len(finish) // 10, len(finish) - 1 - len(finish) // 10
    span = finish[j] - finish[i]
    return (j - i) / span if span > 0 else result.request_throughput
