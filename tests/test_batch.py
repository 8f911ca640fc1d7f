"""Offline batches: `arrival batch` with `requests N`, and `objective max throughput`. The plan
takes every GPU it may, and its predictions are the job's: the time it takes and its throughput."""

from __future__ import annotations

import pytest

import flowc
from flowc.compiler.model.instance import simulate_plan_deployment
from flowc.compiler.model.workload import sample_requests
from flowc.compiler.verify import verify_plan

SPEC = """
use std.gpus
use std.models

cluster lab {{
  node x 1 {{
    gpu h100-sxm x 8
  }}
}}

workload nightly {{
  {arrival}
  requests 2000 req
  prompt lognormal(median 1024 tok, sigma 0.6) max 8192 tok
  output lognormal(median 256 tok, sigma 0.8) max 2048 tok
}}

slo by-morning {{
  e2e p99 <= {limit}
}}

deploy summarize {{
  model llama-3.1-8b
  on lab
  serve nightly under by-morning
  {objective}
  {extra}
}}
"""


def spec(arrival="arrival batch", limit="2 h", objective="objective max throughput", extra="tp in [1, 2]") -> str:
    return SPEC.format(arrival=arrival, limit=limit, objective=objective, extra=extra)


def codes(text: str) -> list[str]:
    with pytest.raises(flowc.FlowError) as caught:
        flowc.compile(text)
    return caught.value.codes


@pytest.fixture(scope="module")
def batch():
    s = flowc.load(spec())
    return s, flowc.compile(s)


def test_a_batch_takes_every_gpu_and_predicts_the_jobs_time(batch):
    s, plan = batch
    (dp,) = plan.deployments
    assert dp.objective == "max_throughput" and dp.gpus == 8
    p = dp.predicted
    assert p.requests == 2000
    # re-simulated independently from the plan: every request queued at t = 0
    requests = sample_requests(s.workloads["nightly"], seed=0)
    assert (requests.arrival == 0).all() and len(requests) == 2000
    result = simulate_plan_deployment(s, dp, requests)
    assert p.makespan_s == pytest.approx(result.makespan, rel=1e-9)
    assert p.goodput_rps == pytest.approx(2000 / result.makespan, rel=1e-9)
    assert p.meets_slo and verify_plan(plan, s) == []


def test_the_batch_plan_is_no_slower_than_a_narrower_search(batch):
    _, plan = batch
    wide = flowc.compile(spec(extra="tp in [2]")).deployments[0]
    assert wide.groups[0].tp == 2
    assert plan.deployments[0].predicted.makespan_s <= wide.predicted.makespan_s


def test_a_batch_that_cannot_finish_in_time_is_f0511():
    with pytest.raises(flowc.FlowError) as caught:
        flowc.compile(spec(limit="5 s"))
    (d,) = caught.value.diagnostics
    assert d.code == "F0511" and "does not finish within slo `by-morning`" in d.message
    assert "the 2000 requests take" in d.notes[0]


@pytest.mark.parametrize("arrival, objective, extra, code, words", [
    ("arrival batch", "objective max goodput_per_gpu", "", "F0411", "is a batch"),
    ("arrival poisson 2 req/s", "objective max throughput", "", "F0411", "needs a batch workload"),
    ("arrival batch", "objective max throughput", "allow disaggregation", "F0411", "does not take disaggregation"),
])
def test_objective_and_workload_must_agree(arrival, objective, extra, code, words):
    with pytest.raises(flowc.FlowError) as caught:
        flowc.load(spec(arrival=arrival, objective=objective, extra=extra))
    (d,) = caught.value.diagnostics
    assert d.code == code and words in d.message


def test_a_batch_needs_its_size():
    with pytest.raises(flowc.FlowError) as caught:
        flowc.load(spec().replace("  requests 2000 req\n", ""))
    (d,) = caught.value.diagnostics
    assert d.code == "F0305" and "needs its size" in d.message and "requests 10000 req" in d.help
