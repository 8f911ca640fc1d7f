"""What a simulation measured: per-request latencies, totals, and SLO attainment."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

from flowc.compiler import spec


@dataclass(frozen=True)
class SimResult:
    """Per-request metrics (seconds) and totals. A request never served has ttft/e2e/tpot inf
    (it counts as missing every limit); tpot is nan for one-token outputs (it has no TPOT and
    is left out of TPOT statistics)."""

    ttft: np.ndarray
    tpot: np.ndarray
    e2e: np.ndarray
    finished: np.ndarray  # bool
    rejected: np.ndarray  # bool: could never fit the instance's KV cache (or token budget)
    arrival: np.ndarray  # effective arrival times (closed loop: when each request was started)
    finish: np.ndarray  # finish times, nan if not finished
    output: np.ndarray
    instance: np.ndarray  # the instance each request was routed to at arrival
    decode_instance: np.ndarray  # disaggregated: the decode instance, else -1
    preemptions: int
    iterations: int
    tokens_generated: int
    kv_blocks_in_use: list[int] = field(default_factory=list)  # per instance, at the end

    def __len__(self) -> int:
        return len(self.ttft)

    @property
    def makespan(self) -> float:
        """From the first arrival to the last finish."""
        if not self.finished.any():
            return 0.0
        return float(np.nanmax(self.finish) - self.arrival.min())

    @property
    def output_throughput(self) -> float:
        """Output tokens of finished requests per second of makespan."""
        span = self.makespan
        return float(self.output[self.finished].sum()) / span if span > 0 else 0.0

    @property
    def request_throughput(self) -> float:
        span = self.makespan
        return float(self.finished.sum()) / span if span > 0 else 0.0

    def scaled(self, *, ttft: float = 1.0, tpot: float = 1.0, e2e: float = 1.0) -> "SimResult":
        """The same run with every request's latencies multiplied by the metric's factor (what
        the SLO check sees at one end of a prediction interval: model/intervals.py)."""
        return dataclasses.replace(self, ttft=self.ttft * ttft, tpot=self.tpot * tpot, e2e=self.e2e * e2e)

    def _values(self, metric: str) -> np.ndarray:
        values = {"ttft": self.ttft, "tpot": self.tpot, "e2e": self.e2e}[metric]
        return values[~np.isnan(values)]

    def mean(self, metric: str) -> float:
        """Mean of `metric` over the requests that have it (inf if one was never served)."""
        values = self._values(metric)
        return float(values.mean()) if len(values) else float("nan")

    def percentile(self, metric: str, p: float) -> float:
        """The p-th percentile of `metric` ("ttft", "tpot", "e2e"), as the smallest value that
        at least p% of the requests do not exceed (numpy's inverted_cdf): so pNN <= limit
        exactly when at least NN% of the requests meet the limit. Unserved requests count as inf;
        one-token outputs have no TPOT and are left out of TPOT."""
        values = self._values(metric)
        if len(values) == 0:
            return float("nan")
        return float(np.percentile(values, p, method="inverted_cdf"))

    def attainment(self, slo: spec.SLO) -> dict:
        """How the requests fare against `slo`.

        report[metric] ("ttft", "tpot", "e2e", for each metric the SLO names): "share" of the
        requests meeting every limit on that metric, "met" (all its targets met), and "targets":
        one dict per target with "percentile", "limit", "value" (the percentile's value, or the
        maximum for a target without percentile), "share" and "met"; the first target's
        "percentile", "limit" and "value" are repeated at the metric's level.
        report["joint"]: "share" of the requests meeting every limit of the SLO, "met" (share >=
        slo.attainment, True without attainment).
        A target with a percentile is met when its percentile value is <= the limit; a target
        without one when the joint share reaches `slo.attainment` (without attainment: when
        every request meets it). Requests without a TPOT (one output token) meet TPOT limits."""
        n = len(self)
        joint = np.ones(n, dtype=bool)
        report: dict = {}
        for target in slo.targets:
            values = {"ttft": self.ttft, "tpot": self.tpot, "e2e": self.e2e}[target.metric]
            ok = np.isnan(values) | (values <= target.limit)
            joint &= ok
            share = float(ok.mean()) if n else 1.0
            if target.percentile is not None:
                value = self.percentile(target.metric, target.percentile)
                met = bool(math.isnan(value) or value <= target.limit)
            else:
                counted = values[~np.isnan(values)]
                value = float(counted.max()) if len(counted) else float("nan")
                met = None  # decided below, from the joint share
            entry = {"percentile": target.percentile, "limit": target.limit, "value": value, "share": share,
                     "met": met, "_ok": ok}
            metric = report.setdefault(target.metric, {"targets": []})
            metric["targets"].append(entry)
        joint_share = float(joint.mean()) if n else 1.0
        for metric in report.values():
            for entry in metric["targets"]:
                if entry["met"] is None:
                    entry["met"] = (joint_share >= slo.attainment if slo.attainment is not None
                                    else entry["share"] >= 1.0)
            all_ok = np.logical_and.reduce([entry.pop("_ok") for entry in metric["targets"]])
            first = metric["targets"][0]
            metric.update(percentile=first["percentile"], limit=first["limit"], value=first["value"],
                          share=float(all_ok.mean()) if n else 1.0, met=all(e["met"] for e in metric["targets"]))
        report["joint"] = {"share": joint_share,
                           "met": slo.attainment is None or joint_share >= slo.attainment}
        return report

    def meets(self, slo: spec.SLO) -> bool:
        """Every percentile target met; and the joint share >= slo.attainment when given (without
        attainment, targets without a percentile must hold for every request)."""
        report = self.attainment(slo)
        return report["joint"]["met"] and all(report[t.metric]["met"] for t in slo.targets)
