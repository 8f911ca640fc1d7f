"""Engine profiles: the engine is a parameter of every prediction (spec, plan, estimate, export),
and the simulator's scheduler steps."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from step_costs import OneSecondSteps

import flowc
import flowc.cli
from flowc.compiler.frontend.check.vocabulary import OVERHEAD_KINDS
from flowc.compiler.frontend.library import stdlib_spec
from flowc.compiler.model.cost import CostModel, Parallelism
from flowc.compiler.model.engines import ENGINES, default_engine, engine_profile
from flowc.compiler.model.simulator import InstanceConfig, simulate
from flowc.compiler.model.workload import Requests
from flowc.compiler.plan import Plan, Scheduler
from flowc.compiler.verify import verify_plan

REPO = Path(__file__).resolve().parents[1]
# the tiny example without its `engine flowc` line: a deployment that names no engine
TINY = re.sub(r"\n  engine flowc[^\n]*", "", (REPO / "examples" / "tiny-cpu.flow").read_text())


def test_every_engine_has_a_profile_with_its_source():
    data = json.loads(resources.files("flowc.stdlib").joinpath("engines.json").read_text())
    assert set(data["engines"]) == set(ENGINES) and default_engine() == data["default"] == "vllm"
    for name in ENGINES:
        profile = engine_profile(name)
        assert profile.name == name and profile.label and profile.kernels and profile.source
        assert set(profile.overheads) <= set(OVERHEAD_KINDS)
    assert engine_profile(None) is engine_profile("vllm")


def test_scheduler_steps_admit_waiting_requests_only_at_the_start_of_a_block():
    # A (prompt 10, output 20) at t=0, B (prompt 10, output 2) at t=0.5; one second per iteration.
    # One step at a time, B is prefilled in iteration 1 ([1, 2]): TTFT 1.5. With 4 steps decided at
    # once and A decoding, B waits for iteration 4 ([4, 5]): TTFT 4.5.
    requests = Requests(np.array([0.0, 0.5]), np.array([10, 10]), np.array([20, 2]))
    for steps, ttft_b in ((1, 1.5), (4, 4.5)):
        result = simulate(requests, [InstanceConfig(cost=OneSecondSteps(), kv_capacity_tokens=10**5,
                                                    scheduler=Scheduler(), scheduler_steps=steps)])
        np.testing.assert_allclose(result.ttft, [1.0, ttft_b])
    with pytest.raises(ValueError, match="scheduler_steps"):
        InstanceConfig(cost=OneSecondSteps(), kv_capacity_tokens=1, scheduler_steps=0)


def test_the_engine_picks_the_overheads_unless_the_gpu_measured_its_own():
    spec = stdlib_spec()
    model, gpu = spec.models["llama-3.1-8b"], spec.gpus["h100-sxm"]
    link = spec.links[gpu.interconnect]
    for name in ENGINES:
        cost = CostModel(model, gpu, link, parallelism=Parallelism(), engine=name)
        o = engine_profile(name).overheads
        expected = o.get("step", 0.0) + o.get("layer", 0.0) * model.layers + o.get("sequence", 0.0) * 64 \
            + (o.get("token", 0.0) + o.get("layer_token", 0.0) * model.layers) * 64
        assert cost.breakdown(64, 0, 64, 64 * 512)["overhead"] == pytest.approx(expected)
        assert cost.engine.name == name and cost.request_time == o.get("request", 0.0)
    measured = gpu.model_copy(update={"overheads": {"step": 1e-3}})
    cost = CostModel(model, measured, link, engine="sglang")
    assert cost.breakdown(64, 0, 64, 64 * 512)["overhead"] == pytest.approx(1e-3)


def test_request_latency_adds_to_the_first_token_and_the_end_but_takes_no_engine_time():
    requests = Requests(np.array([0.0, 0.5]), np.array([10, 10]), np.array([20, 2]))
    plain = simulate(requests, [InstanceConfig(cost=OneSecondSteps(), kv_capacity_tokens=10**5)])
    slow = simulate(requests, [InstanceConfig(cost=OneSecondSteps(), kv_capacity_tokens=10**5, request_latency=0.25)])
    np.testing.assert_allclose(slow.ttft, plain.ttft + 0.25)
    np.testing.assert_allclose(slow.e2e, plain.e2e + 0.25)
    assert slow.iterations == plain.iterations


def test_prefills_kept_apart_pause_the_decodes():
    # A (prompt 10, output 4) at t=0, B (prompt 10, output 2) at t=1.5; one second per iteration.
    # Mixed: B's prefill joins A's decode in iteration 2 ([2, 3]); A ends at 4 (iterations 1-3 decode).
    # Apart: iteration 2 prefills B alone, A's decodes resume in iteration 3: A ends at 5.
    requests = Requests(np.array([0.0, 1.5]), np.array([10, 10]), np.array([4, 2]))
    for mixed, a_end, b_ttft in ((True, 4.0, 1.5), (False, 5.0, 1.5)):
        result = simulate(requests, [InstanceConfig(cost=OneSecondSteps(), kv_capacity_tokens=10**5,
                                                    mixed_prefill=mixed)])
        assert result.e2e[0] == pytest.approx(a_end) and result.ttft[1] == pytest.approx(b_ttft)


def test_estimate_takes_the_engine():
    result = flowc.estimate("llama-3.1-8b", "h100-sxm", input_len=128, output_len=64, batch=4, engine="trtllm")
    assert result.engine == "trtllm" and "kernels" in result.calibration_source
    assert flowc.estimate("llama-3.1-8b", "h100-sxm", input_len=128, output_len=64, batch=4).engine == "vllm"
    with pytest.raises(flowc.FlowError) as caught:
        flowc.estimate("llama-3.1-8b", "h100-sxm", input_len=128, output_len=64, batch=4, engine="trt")
    assert caught.value.codes == ["F0306"] and "did you mean `trtllm`?" in str(caught.value)


def test_cli_estimate_names_the_engine(capsys):
    assert flowc.cli.main(["estimate", "llama-3.1-8b", "h100-sxm", "--input-len", "64", "--output-len", "16",
                           "--batch", "2", "--engine", "sglang", "--no-color"]) == 0
    assert "on 1 x h100-sxm (SGLang)" in capsys.readouterr().out


def test_a_deployment_names_its_engine():
    spec = flowc.load(TINY.replace("  on laptop\n", "  on laptop\n  engine flowc\n"))
    assert spec.deployments["tiny"].engine == "flowc"
    assert flowc.load(TINY).deployments["tiny"].engine is None  # the standard library's default
    with pytest.raises(flowc.FlowError) as caught:
        flowc.load(TINY.replace("  on laptop\n", "  on laptop\n  engine tgi\n"))
    assert caught.value.codes == ["F0306"] and "unknown engine `tgi`" in str(caught.value)


def test_a_plan_records_its_engine_and_verify_holds_it_to_the_spec():
    text = TINY.replace("  on laptop\n", "  on laptop\n  engine flowc\n")
    plan = flowc.compile(text)
    assert plan.deployments[0].engine == "flowc"
    assert [d.code for d in verify_plan(plan, flowc.load(text)) if d.severity == "error"] == []
    found = [d for d in verify_plan(plan, flowc.load(TINY)) if d.severity == "error"]
    assert found and found[0].code == "F0520"
    assert "the plan's predictions are for flowc, the spec deploys on vllm" in found[0].message


def test_a_plan_before_1_7_is_for_vllm_and_an_unknown_engine_is_not_a_plan():
    document = json.loads(flowc.compile(TINY).model_dump_json())
    del document["deployments"][0]["engine"]
    assert Plan.model_validate(document).deployments[0].engine == "vllm"
    document["deployments"][0]["engine"] = "tgi"
    with pytest.raises(ValueError, match="unknown engine `tgi`"):
        Plan.model_validate(document)
