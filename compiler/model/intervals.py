"""Prediction intervals: how far a measured figure falls from flowc's prediction.

The end-to-end development set (`benchmarks/e2e_check.py --fit --write`) gives, per metric, the
spread of log(measured / predicted) over published serving runs; a Student-t prediction interval
of it bounds a nominal 80% interval, stored as multiplicative factors in `stdlib/engines.json`
("intervals", with the number of records and the coverage measured leaving each record out).
A figure p is then expected within [p x low, p x high]. Latencies scale by their metric's
factors; throughputs and rates by the throughput factors.

The SLO check takes the pessimistic end (`pessimistic`): every request's TTFT, TPOT and
end-to-end latency scaled by its metric's `high` factor. A plan that meets its SLO as predicted
but not at that end meets it only at the optimistic end of its interval, and says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Mapping

from flowc.compiler.model.results import SimResult

METRICS = ("ttft", "tpot", "e2e", "throughput")
NOMINAL = 0.8  # the share of measurements an interval is meant to hold


@dataclass(frozen=True)
class Interval:
    """A metric's interval as factors of the prediction: measured / predicted lies in [low, high]
    for NOMINAL of measurements (a Student-t prediction interval over `records` records of the
    development set); `coverage`: the share it held leaving each record out in turn."""

    metric: str
    low: float
    high: float
    records: int
    coverage: float


@cache
def intervals() -> dict[str, Interval]:
    """The interval of every metric in METRICS ([1, 1] for one the development set lacks)."""
    data = json.loads(resources.files("flowc.stdlib").joinpath("engines.json").read_text(encoding="utf-8"))
    stored = data.get("intervals", {})
    return {m: Interval(m, **stored[m]) if m in stored else Interval(m, 1.0, 1.0, 0, 0.0) for m in METRICS}


def factors() -> dict[str, tuple[float, float]]:
    """{metric: (low, high)}: what a plan records (`Predicted.interval`)."""
    return {m: (i.low, i.high) for m, i in intervals().items()}


def pessimistic(result: SimResult, interval: Mapping[str, tuple[float, float]]) -> SimResult:
    """`result` with every latency at the slow end of its `interval` (`factors()`, or what a plan
    recorded)."""
    high = {m: interval.get(m, (1.0, 1.0))[1] for m in ("ttft", "tpot", "e2e")}
    return result.scaled(**high)
