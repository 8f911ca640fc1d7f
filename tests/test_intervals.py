"""Prediction intervals: from the development set's spread, into the plan, the SLO check, the
verifier and the reports."""

from __future__ import annotations

import io
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

import flowc
from flowc.compiler.model.intervals import METRICS, NOMINAL, factors, intervals, pessimistic
from flowc.compiler.model.simulator import simulate
from flowc.compiler.model.workload import fixed_requests
from flowc.compiler.render.text import range_text, slo_verdict
from flowc.compiler.spec import SLO, SLOTarget
from flowc.compiler.verify import verify_plan

REPO = Path(__file__).resolve().parents[1]
TINY = (REPO / "examples" / "tiny-cpu.flow").read_text()
sys.path.insert(0, str(REPO / "benchmarks"))
import e2e_check  # noqa: E402  (a script: its interval arithmetic is tested here)


@pytest.fixture(scope="module")
def compiled():
    return flowc.compile(TINY), flowc.load(TINY)


def test_every_metric_has_a_stored_interval_from_records():
    for metric in METRICS:
        iv = intervals()[metric]
        assert 0 < iv.low < iv.high and iv.records >= 5 and 0 <= iv.coverage <= 1, iv
    assert factors() == {m: (iv.low, iv.high) for m, iv in intervals().items()}


def test_the_interval_holds_its_nominal_share_of_unseen_records():
    # a metric has 5-17 records: a Student-t prediction interval from the others holds about 80%
    # of the one left out; the sample's own 10th-90th percentiles held 62% at 8 records
    rng = np.random.default_rng(0)
    for n in (5, 8, 17):
        coverage = np.mean([e2e_check.loo_coverage(list(rng.normal(0.1, 0.2, n))) for _ in range(400)])
        assert coverage == pytest.approx(NOMINAL, abs=0.03), n
    low, high = e2e_check.interval([math.log(1.1)] * 3 + [math.log(1.1) + 0.1, math.log(1.1) - 0.1])
    assert math.sqrt(low * high) == pytest.approx(1.1)  # centred on the mean residual (log space)
    assert NOMINAL == 0.8


def test_the_pessimistic_end_scales_every_latency(compiled):
    plan, spec = compiled
    cost = flowc.compiler.model.instance.plan_instances(spec, plan.deployments[0])
    result = simulate(fixed_requests(40, 64, 16, rate=2.0, poisson=False), cost)
    slow = pessimistic(result, {"ttft": (0.5, 2.0), "tpot": (0.8, 1.25)})
    assert slow.percentile("ttft", 90) == pytest.approx(2.0 * result.percentile("ttft", 90))
    assert slow.percentile("tpot", 50) == pytest.approx(1.25 * result.percentile("tpot", 50))
    assert slow.percentile("e2e", 50) == pytest.approx(result.percentile("e2e", 50))  # no e2e factor given
    # an SLO between the prediction and its slow end is met only at the optimistic end
    limit = 1.5 * result.percentile("ttft", 90)
    slo = SLO(name="s", targets=[SLOTarget(metric="ttft", percentile=90, limit=limit)])
    assert result.meets(slo) and not slow.meets(slo)


def test_a_plan_carries_its_interval_and_the_pessimistic_verdict(compiled):
    plan, spec = compiled
    p = plan.deployments[0].predicted
    assert p.interval == {m: tuple(v) for m, v in factors().items()}
    assert p.meets_slo_pessimistic is not None
    assert not p.meets_slo_pessimistic or p.meets_slo  # the slow end cannot meet what the prediction misses
    assert [d.code for d in verify_plan(plan, spec) if d.severity == "error"] == []


def test_the_verifier_catches_a_wrong_pessimistic_verdict(compiled):
    plan, spec = compiled
    d = plan.deployments[0]
    flipped = d.predicted.model_copy(update={"meets_slo_pessimistic": not d.predicted.meets_slo_pessimistic})
    bad = plan.model_copy(update={"deployments": [d.model_copy(update={"predicted": flipped})]})
    found = [x for x in verify_plan(bad, spec) if x.severity == "error"]
    assert [x.code for x in found] == ["F0526"]
    assert "at the slow end of its prediction interval" in found[0].message


def test_the_reports_show_the_interval_and_an_optimistic_verdict(compiled):
    plan, spec = compiled
    p = plan.deployments[0].predicted
    assert range_text(100.0, "ttft", {"ttft": (0.8, 1.3)}) == " [80-130]"
    assert range_text(100.0, "ttft", {}) == ""  # a plan before 1.7
    optimistic = p.model_copy(update={"meets_slo": True, "meets_slo_pessimistic": False})
    assert slo_verdict(optimistic) == ("meets the SLO only at the optimistic end of its 80% interval", "yellow")
    assert slo_verdict(p.model_copy(update={"meets_slo": False}))[0] == "misses the SLO"
    from flowc.reports import print_plan

    d = plan.deployments[0]
    shown = plan.model_copy(update={"deployments": [d.model_copy(update={"predicted": optimistic})]})
    out = io.StringIO()
    print_plan(shown, spec, console=Console(file=out, width=200, color_system=None))
    text = out.getvalue()
    low, high = p.interval["ttft"]
    ttft = p.ttft_ms.p90
    assert f"TTFT p90 {ttft:,.0f} ms [{ttft * low:,.0f}-{ttft * high:,.0f}]" in text
    assert "meets the SLO only at the optimistic end of its 80% interval" in text


def test_estimate_prints_its_interval(capsys):
    import flowc.cli

    assert flowc.cli.main(["estimate", "llama-3.1-8b", "h100-sxm", "--input-len", "64", "--output-len", "16",
                           "--batch", "2", "--no-color"]) == 0
    out = capsys.readouterr().out
    assert "80% prediction interval (from published serving runs; docs/predictions.md): TTFT p50" in out
    e = flowc.estimate("llama-3.1-8b", "h100-sxm", input_len=64, output_len=16, batch=2)
    low, high = e.interval["tpot"]
    assert f"TPOT p50 {e.tpot_ms.p50:,.1f} ms [{e.tpot_ms.p50 * low:,.1f}-{e.tpot_ms.p50 * high:,.1f}]" in out
    assert math.isfinite(low) and low < high
