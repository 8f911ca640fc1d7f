"""flowc.estimate and flowc.simulate: one configuration and whole specs, end to end."""

from __future__ import annotations

from pathlib import Path

import pytest

import flowc
from flowc.cli import main
from flowc.compiler.frontend.library import stdlib_spec
from flowc.compiler.model.cost import CostModel, Parallelism
from flowc.compiler.model.memory import memory_budget

GiB = 2**30
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def std():
    return stdlib_spec()


def test_estimate_reports_memory_and_capacity_from_the_memory_model(std):
    e = flowc.estimate("llama-3.1-70b", "h100-sxm", tp=4, input_len=1024, output_len=256, batch=8)
    budget = memory_budget(std.models["llama-3.1-70b"], 80 * GiB, tp=4)
    assert e.kv_capacity_tokens == budget.kv_tokens
    assert e.memory_per_gpu == budget.by_category()
    assert sum(e.memory_per_gpu.values()) == 80 * GiB
    # 1280 tokens = 80 blocks of 16 per sequence; the 256-sequence cap binds first.
    assert e.max_concurrent_seqs == min(256, budget.kv_blocks // 80)
    assert e.gpus == 4 and e.mode == "closed_loop"
    assert e.output_tokens_per_s_per_gpu == pytest.approx(e.output_tokens_per_s / 4)
    assert e.requests_simulated > 0 and e.preemptions == 0


def test_batch_one_tpot_is_the_cost_models_decode_step(std):
    """With one sequence in flight every output token is one decode step of that sequence."""
    m, g = std.models["llama-3.1-8b"], std.gpus["h100-sxm"]
    e = flowc.estimate(m, g, input_len=512, output_len=64, batch=1)
    cost = CostModel(m, g, std.links[g.interconnect], parallelism=Parallelism())
    steps = [cost.step_time(1, 0, 1, 512 + i + 1) for i in range(1, 64)]
    assert e.tpot_ms.mean == pytest.approx(sum(steps) / len(steps) * 1e3, rel=0.02)
    prefill = cost.step_time(512, 512 * 513 // 2, 0, 0)
    # the first token also waits for the engine's time outside its loop (model/engines.py)
    assert e.ttft_ms.p50 == pytest.approx((prefill + cost.request_time) * 1e3, rel=0.05)


def test_more_load_means_more_latency_and_offline_means_most_throughput():
    common = dict(tp=1, input_len=512, output_len=128)
    light = flowc.estimate("llama-3.1-8b", "h100-sxm", rate=1.0, **common)
    heavy = flowc.estimate("llama-3.1-8b", "h100-sxm", rate=40.0, **common)
    offline = flowc.estimate("llama-3.1-8b", "h100-sxm", **common)
    assert heavy.tpot_ms.p50 > light.tpot_ms.p50
    assert offline.output_tokens_per_s > heavy.output_tokens_per_s > light.output_tokens_per_s
    assert offline.mode == "offline" and light.mode == "open_loop"


def test_replicas_and_disaggregation_count_gpus():
    two = flowc.estimate("llama-3.1-8b", "h100-sxm", replicas=2, input_len=256, output_len=64, rate=4.0)
    split = flowc.estimate("llama-3.1-8b", "h100-sxm", input_len=256, output_len=64, rate=4.0, disaggregated=(1, 2))
    assert two.gpus == 2 and split.gpus == 3 and split.disaggregated == (1, 2)


@pytest.mark.parametrize("kwargs, code, words", [
    (dict(model="llama-3.1-70", gpu="h100-sxm"), "F0201", "llama-3.1-70b"),
    (dict(model="llama-3.1-8b", gpu="h100"), "F0201", "h100-sxm"),
    (dict(model="llama-3.1-70b", gpu="h100-sxm", tp=3), "F0401", "1, 2, 4, 8"),
    (dict(model="llama-3.1-70b", gpu="h100-sxm", pp=3), "F0402", "80 layers"),
    (dict(model="llama-3.1-8b", gpu="h100-sxm", ep=2), "F0403", "dense"),
    (dict(model="llama-3.1-405b", gpu="h100-sxm", tp=1), "F0503", "usable"),
    (dict(model="llama-3.1-70b", gpu="h100-sxm", tp=2, batch=200), "F0504", "at most"),
    # more than the engine runs at once, though the KV cache holds them: the cap, not the memory
    (dict(model="llama-3.1-8b", gpu="h100-sxm", dtype="fp8", kv_dtype="fp8", batch=300, max_seqs=256), "F0307",
     "batch 300 is more than max_seqs 256"),
    (dict(model="llama-3.1-8b", gpu="h100-sxm", dtype="fp9"), "F0306", "fp8"),
])
def test_bad_configurations_are_diagnostics(kwargs, code, words):
    kwargs = {"input_len": 1024, "output_len": 256, **kwargs}
    with pytest.raises(flowc.FlowError) as caught:
        flowc.estimate(kwargs.pop("model"), kwargs.pop("gpu"), **kwargs)
    assert caught.value.codes == [code]
    assert words in str(caught.value)


@pytest.mark.parametrize("kwargs, code, words", [
    (dict(batch=0), "F0307", "batch must be a whole number of at least 1, not 0"),
    (dict(batch=-3), "F0307", "batch must be a whole number of at least 1, not -3"),
    (dict(rate=0.0), "F0307", "rate must be a positive, finite number of requests/s, not 0.0"),
    (dict(rate=-1.0), "F0307", "not -1.0"),
    (dict(rate=float("nan")), "F0307", "not nan"),
    (dict(rate=float("inf")), "F0307", "not inf"),
    (dict(replicas=0), "F0307", "replicas must be a whole number of at least 1, not 0"),
    (dict(replicas=257), "F0307", "estimate simulates at most 256 instances, not 257"),
    (dict(disaggregated=(0, 1)), "F0307", "at least 1 prefill and 1 decode instance, not (0, 1)"),
    (dict(disaggregated=(200, 57)), "F0307", "at most 256 instances, not 257"),
    (dict(tp=-1), "F0307", "tp must be a whole number of at least 1, not -1"),
    (dict(input_len=0), "F0307", "input_len must be a whole number of at least 1, not 0"),
    (dict(input_len=-5), "F0307", "not -5"),
    (dict(output_len=0), "F0307", "output_len must be a whole number of at least 1, not 0"),
    (dict(max_seqs=0), "F0307", "max_seqs must be a whole number of at least 1, not 0"),
    (dict(link_domain=0), "F0307", "link_domain must be a whole number of at least 1, not 0"),
    (dict(batch=2, rate=1.0), "F0405", "give batch (a closed loop) or rate (open-loop arrivals), not both"),
    (dict(replicas=2, disaggregated=(1, 1)), "F0405", "give replicas (colocated instances) or disaggregated"),
    (dict(tp=16), "F0404", "tp 16 is larger than one link domain of h100-sxm over nvlink4 (8 GPUs)"),
    (dict(input_len=131_000, output_len=73), "F0410",
     "a request of 131073 tokens (input_len + output_len) is longer than llama-3.1-8b's context of 131072 tokens"),
])
def test_arguments_out_of_range_are_diagnostics(kwargs, code, words):
    """Regression: each of these ended in an internal error (or ran) instead of a diagnostic."""
    kwargs = {"input_len": 100, "output_len": 10, **kwargs}
    with pytest.raises(flowc.FlowError) as caught:
        flowc.estimate("llama-3.1-8b", "h100-sxm", **kwargs)
    assert caught.value.codes == [code]
    assert words in str(caught.value)


def test_every_argument_out_of_range_is_reported_at_once():
    with pytest.raises(flowc.FlowError) as caught:
        flowc.estimate("llama-3.1-8b", "h100-sxm", tp=0, input_len=0, output_len=10, batch=0)
    assert caught.value.codes == ["F0307"] * 3


def test_a_larger_link_domain_lets_tp_grow():
    e = flowc.estimate("llama-3.1-8b", "h100-sxm", tp=16, link_domain=16, input_len=100, output_len=10)
    assert e.tp == 16 and e.gpus == 16


def test_weights_and_kv_default_to_the_models_own_dtypes(std):
    """Regression: the default dtype bf16 replaced DeepSeek-V3's declared fp8 weights, and it did
    not fit on 8 x H200."""
    m = std.models["deepseek-v3"]
    assert (m.weights, m.kv) == ("fp8", "bf16")
    e = flowc.estimate("deepseek-v3", "h200-sxm", tp=8, input_len=100, output_len=10, batch=1)
    assert e.memory_per_gpu == memory_budget(m, std.gpus["h200-sxm"].memory, tp=8).by_category()
    with pytest.raises(flowc.FlowError) as caught:  # bf16 given on purpose still does not fit
        flowc.estimate("deepseek-v3", "h200-sxm", tp=8, dtype="bf16", input_len=100, output_len=10, batch=1)
    assert caught.value.codes == ["F0503"] and "deepseek-v3 at bf16" in str(caught.value)


@pytest.mark.parametrize("flags, code", [
    (["--batch", "0"], "F0307"), (["--rate", "0"], "F0307"), (["--rate", "-1"], "F0307"),
    (["--rate", "nan"], "F0307"), (["--replicas", "0"], "F0307"), (["--disaggregated", "0", "1"], "F0307"),
    (["--pp", "0"], "F0307"), (["--ep", "-2"], "F0307"), (["--output-len", "0"], "F0307"),
    (["--tp", "16"], "F0404"), (["--input-len", "200000"], "F0410"),
    (["--replicas", "2", "--disaggregated", "1", "1"], "F0405"),
])
def test_cli_estimate_arguments_out_of_range(capsys, flags, code):
    argv = ["estimate", "llama-3.1-8b", "h100-sxm", "--input-len", "100", "--output-len", "10", *flags]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"error[{code}]" in err and "internal error" not in err


def test_cli_estimate_json_and_errors(capsys):
    assert main(["estimate", "llama-3.1-8b", "h100-sxm", "--input-len", "256", "--output-len", "32", "--batch", "4",
                 "--json"]) == 0
    document = capsys.readouterr().out
    assert '"kv_capacity_tokens"' in document and '"tpot_ms"' in document
    assert main(["estimate", "llama-3.1-70b", "h100-sxm", "--tp", "3", "--input-len", "8", "--output-len", "8"]) == 1
    err = capsys.readouterr().err
    assert "error[F0401]" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as caught:  # --batch and --rate exclude each other: a usage error
        main(["estimate", "llama-3.1-8b", "h100-sxm", "--input-len", "8", "--output-len", "8", "--batch", "1",
              "--rate", "2"])
    assert caught.value.code == 2


def test_simulate_keeps_the_scheduler_settings_a_spec_pins():
    """Regression: the baseline simulated 8192 batched tokens and 256 sequences though
    tiny-cpu pins 512 and 32 (the defaults were restated in every signature)."""
    from flowc.compiler.model.memory import memory_budget

    spec = flowc.load(EXAMPLES / "tiny-cpu.flow")
    report = flowc.simulate(spec)["tiny"]
    s = report.scheduler
    assert (s.max_batched_tokens, s.max_seqs, s.chunk_size, s.block_size) == (512, 32, 512, 16)
    d = spec.deployments["tiny"]
    budget = memory_budget(d.model, spec.gpus["cpu-local"].memory, scheduler=s, vendor="cpu")
    assert report.kv_capacity_tokens == budget.kv_tokens


def test_simulate_a_whole_spec(capsys):
    reports = flowc.simulate(EXAMPLES / "shared-cluster.flow")
    assert set(reports) == {"small", "large"}
    small = reports["small"]
    assert small.gpus <= 2 and small.finished == small.requests == 1000
    assert ([t.metric for t in small.targets]
            == [t.metric for t in flowc.load(EXAMPLES / "shared-cluster.flow").slos["chat"].targets])
    assert 0 <= small.joint_attainment <= 1
    assert main(["simulate", str(EXAMPLES / "chat-70b.flow")]) == 0
    assert "deploy chatbot" in capsys.readouterr().out


def test_the_engines_own_batch_cap_is_the_default():
    # 400 sequences of 640 tokens fit an H100's fp8 KV cache; vLLM runs 256 at once by default,
    # TensorRT-LLM up to 2048, SGLang as many as the cache holds
    kw = dict(dtype="fp8", kv_dtype="fp8", input_len=128, output_len=512, batch=400)
    with pytest.raises(flowc.FlowError, match="batch 400 is more than max_seqs 256"):
        flowc.estimate("llama-3.1-8b", "h100-sxm", engine="vllm", **kw)
    for engine in ("trtllm", "sglang"):
        e = flowc.estimate("llama-3.1-8b", "h100-sxm", engine=engine, **kw)
        assert e.engine == engine and e.max_concurrent_seqs >= 400 and e.output_tokens_per_s > 0
    capped = flowc.estimate("llama-3.1-8b", "h100-sxm", engine="trtllm", max_seqs=256, **{**kw, "batch": 256})
    assert capped.max_concurrent_seqs == 256
