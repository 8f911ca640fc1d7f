"""The engine end to end: greedy outputs token for token equal to Hugging Face transformers'
`generate` on tiny random-weight models, with continuous batching, chunked prefill and
preemption all happening; per-request validation; streaming; the plan's KV pool and arena."""

from __future__ import annotations

import pytest
import torch
from runtime_models import hf_greedy, sample_prompts, save_tiny_model, tiny_spec

from flowc.compiler.model.geometry import kv_bytes_per_token_per_rank
from flowc.compiler.optimize.instance_plan import instance_plan
from flowc.runtime.engine import Engine, EngineError, Request
from flowc.runtime.sequence import SamplingParams
from flowc.runtime.workspace import Workspace

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cache = {}

    def get(variant: str):
        if variant not in cache:
            cache[variant] = save_tiny_model(variant, tmp_path_factory.mktemp(variant))
        return cache[variant]
    return get


@pytest.mark.parametrize("variant", ["llama", "qwen2", "mixtral"])
def test_greedy_matches_transformers(saved, variant):
    path = saved(variant)
    spec = tiny_spec(variant)
    # A 32-token budget in chunks of 16 splits every long prompt; 4 sequences at once and 8
    # blocks of 16 tokens (the longest request needs 6) force queueing and preemption.
    plan = instance_plan(spec, max_batched_tokens=32, chunk_size=16, max_seqs=4, block_size=16, kv_blocks=8)
    prompts = sample_prompts(spec.vocab)
    max_tokens = [20, 12, 16, 20, 9, 24, 14, 18]
    with Engine.from_plan(plan, path) as engine:
        outputs = engine.generate([Request(p, SamplingParams(max_tokens=n)) for p, n in zip(prompts, max_tokens)])
    expected = hf_greedy(path, prompts, max_tokens)
    assert [o.output_token_ids for o in outputs] == expected
    assert all(o.error is None for o in outputs)
    assert sum(o.num_preemptions for o in outputs) > 0, "the pool was meant to force preemption"


def test_prefix_cache_hits_keep_outputs(saved):
    path = saved("llama")
    spec = tiny_spec("llama")
    plan = instance_plan(spec, max_batched_tokens=64, max_seqs=4, kv_blocks=32)
    shared = sample_prompts(spec.vocab, seed=1)[3][:48]  # three full blocks in common
    prompts = [shared + [5, 6], shared + [7], shared]
    with Engine.from_plan(plan, path) as engine:
        first = engine.generate([Request(prompts[0], SamplingParams(max_tokens=6))])
        later = engine.generate([Request(p, SamplingParams(max_tokens=6)) for p in prompts[1:]])
    assert later[0].num_cached_tokens == 48 and later[1].num_cached_tokens == 32  # never the whole prompt
    assert [o.output_token_ids for o in first + later] == hf_greedy(path, prompts, [6, 6, 6])


def test_stream_yields_each_token_in_order(saved):
    spec = tiny_spec("llama")
    plan = instance_plan(spec, max_batched_tokens=32, chunk_size=16)
    requests = [Request(p, SamplingParams(max_tokens=5), request_id=f"r{i}")
                for i, p in enumerate(sample_prompts(spec.vocab, n=3))]
    with Engine.from_plan(plan, saved("llama")) as engine:
        events = list(engine.stream(requests))
        outputs = {o.request_id: o.output_token_ids for o in engine.outputs.values()}
    for request_id, tokens in outputs.items():
        mine = [e for e in events if e.request_id == request_id]
        assert [e.token_id for e in mine] == tokens
        assert [e.index for e in mine] == list(range(len(tokens)))
        assert [e.finish_reason for e in mine] == [None] * (len(tokens) - 1) + ["length"]


def test_bad_requests_get_their_own_errors_and_do_not_disturb_others(saved):
    spec = tiny_spec("llama")
    plan = instance_plan(spec, max_batched_tokens=32, chunk_size=16, kv_blocks=10)
    good = sample_prompts(spec.vocab, n=3)
    bad = [
        (Request([], SamplingParams()), "the prompt is empty"),
        (Request([1] * 250, SamplingParams(max_tokens=10)), "exceeds the model's context of 256"),
        (Request([1, 2], SamplingParams(temperature=-1.0)), "temperature"),
        (Request([1, 999], SamplingParams()), "not a token id of this model"),
        (Request([1, 2], SamplingParams(max_tokens=0)), "max_tokens"),
        (Request([1, 2], SamplingParams(top_p=1.5)), "top_p"),
        (Request([3] * 200, SamplingParams(max_tokens=50)), "KV blocks"),
    ]
    with Engine.from_plan(plan, saved("llama")) as engine:
        alone = engine.generate([Request(p, SamplingParams(max_tokens=8)) for p in good])
        mixed = engine.generate([r for r, _ in bad] + [Request(p, SamplingParams(max_tokens=8)) for p in good])
    for output, (_, message) in zip(mixed, bad):
        assert output.error is not None and message in output.error, output.error
        assert output.output_token_ids == []
    assert [o.output_token_ids for o in mixed[len(bad):]] == [o.output_token_ids for o in alone]


def test_a_duplicate_request_id_is_that_request_s_error(saved):
    plan = instance_plan(tiny_spec("llama"))
    with Engine.from_plan(plan, saved("llama")) as engine:
        first, second = engine.generate([Request([1, 2, 3], SamplingParams(max_tokens=4), request_id="a"),
                                         Request([4, 5], SamplingParams(max_tokens=4), request_id="a")])
    assert first.request_id == "a" and len(first.output_token_ids) == 4 and first.error is None
    assert second.request_id.startswith("a (duplicate") and "duplicate request id 'a'" in second.error


def test_seeded_sampling_does_not_depend_on_the_batch(saved):
    spec = tiny_spec("llama")
    plan = instance_plan(spec, max_batched_tokens=64)
    params = SamplingParams(max_tokens=12, temperature=0.9, top_k=20, top_p=0.9, seed=1234)
    prompt = sample_prompts(spec.vocab)[2]
    with Engine.from_plan(plan, saved("llama")) as engine:
        alone = engine.generate([Request(prompt, params)])[0].output_token_ids
        others = [Request(p, SamplingParams(max_tokens=12, temperature=1.0))
                  for p in sample_prompts(spec.vocab, seed=5)]
        batched = engine.generate(others[:3] + [Request(prompt, params)] + others[3:])[3].output_token_ids
        greedy = engine.generate([Request(prompt, SamplingParams(max_tokens=12))])[0].output_token_ids
    assert alone == batched
    assert alone != greedy  # the sampler really sampled


def test_kv_pool_and_workspace_follow_the_plan(saved):
    spec = tiny_spec("llama")
    plan = instance_plan(spec, max_batched_tokens=48, max_seqs=6, block_size=16, kv_blocks=37)
    group = plan.deployments[0].groups[0]
    with Engine.from_plan(plan, saved("llama")) as engine:
        state = engine.runner.state
        assert state.kv.nbytes == group.memory.kv_cache == 37 * 16 * kv_bytes_per_token_per_rank(spec, 1)
        assert state.kv.k(0).shape == (37, 16, spec.kv_heads, spec.head_dim)
        assert isinstance(state.workspace, Workspace)
        # fp32 activations take twice the arena the plan sized for bf16 (see workspace.py)
        assert state.workspace.nbytes <= 2 * group.memory.activations
        assert engine.block_manager.num_blocks == 37


def test_triton_backend_matches_the_torch_reference(saved):
    pytest.importorskip("triton")
    spec = tiny_spec("llama")
    # Triton runs on a GPU, or interpreted on the CPU where there is none (tests/conftest.py)
    vendor = "nvidia" if torch.cuda.is_available() else "cpu"
    plan = instance_plan(spec, vendor=vendor, max_batched_tokens=32, chunk_size=16)
    requests = [Request(p, SamplingParams(max_tokens=3)) for p in sample_prompts(spec.vocab, n=3)]
    outputs = {}
    for backend in ("torch", "triton"):
        with Engine.from_plan(plan, saved("llama"), backend=backend) as engine:
            outputs[backend] = [o.output_token_ids for o in engine.generate(requests)]
    assert outputs["triton"] == outputs["torch"]


def test_tensor_parallel_engine_matches_tp1(saved):
    spec = tiny_spec("llama")
    requests = [Request(p, SamplingParams(max_tokens=6)) for p in sample_prompts(spec.vocab, n=4)]
    outputs = {}
    for tp in (1, 2):
        plan = instance_plan(spec, tp=tp, max_batched_tokens=32, chunk_size=16)
        with Engine.from_plan(plan, saved("llama")) as engine:
            outputs[tp] = [o.output_token_ids for o in engine.generate(requests)]
    assert outputs[2] == outputs[1]


def test_the_start_up_warm_up_leaves_the_pool_untouched():
    plan = instance_plan(tiny_spec("llama"), max_batched_tokens=64, max_seqs=8, kv_blocks=16)
    with Engine.from_plan(plan) as engine:
        bm = engine.block_manager
        assert bm.num_free == 16 and bm.num_cached == 0 and bm.num_used == 0
        assert engine.outputs == {}


def test_replayed_latencies_count_from_the_scheduled_arrivals():
    # the second request arrives while the first one's prefill may still run: its TTFT counts
    # from its arrival, not from when the engine got around to taking it
    plan = instance_plan(tiny_spec("llama"), max_batched_tokens=64, max_seqs=8, kv_blocks=16)
    requests = [Request([1, 2, 3] * 10, SamplingParams(max_tokens=4), request_id=str(i), arrival_time=0.002 * i)
                for i in range(3)]
    with Engine.from_plan(plan) as engine:
        outputs = engine.generate(requests, replay=True, time_scale=2.0)
    starts = [o.arrival_time for o in outputs]
    assert starts[1] - starts[0] == pytest.approx(0.004, abs=1e-9)
    assert starts[2] - starts[0] == pytest.approx(0.008, abs=1e-9)
    assert all(o.first_token_time > o.arrival_time for o in outputs)
    direct = Request([4, 5, 6], SamplingParams(max_tokens=2))
    with Engine.from_plan(plan) as engine:
        seq = engine.add_request(direct, arrival_time=engine.now() - 1.0)  # it waited a second elsewhere
        while engine.scheduler.has_work():
            engine.step()
        assert seq.first_token_time - seq.arrival_time >= 1.0


def test_random_weights_run_without_a_directory():
    spec = tiny_spec("llama")
    plan = instance_plan(spec)
    with Engine.from_plan(plan, seed=3) as a, Engine.from_plan(plan, seed=3) as b:
        request = [Request([1, 2, 3], SamplingParams(max_tokens=5))]
        assert a.generate(request)[0].output_token_ids == b.generate(request)[0].output_token_ids


def test_plans_the_runtime_cannot_run_are_refused(saved, tmp_path):
    spec = tiny_spec("llama")
    with pytest.raises(EngineError, match="disaggregated"):
        Engine.from_plan(instance_plan(spec, role="prefill"))
    expert_parallel = instance_plan(tiny_spec("mixtral"), tp=2)
    group = expert_parallel.deployments[0].groups[0]
    expert_parallel.deployments[0].groups[0] = group.model_copy(update={"ep": 2})
    with pytest.raises(EngineError, match="ep in \\[1\\]"):
        Engine.from_plan(expert_parallel)
    if not torch.cuda.is_available():
        with pytest.raises(EngineError, match="no such device"):
            Engine.from_plan(instance_plan(spec, vendor="nvidia"))
    with pytest.raises(EngineError, match="not the plan's model"):
        Engine.from_plan(instance_plan(tiny_spec("qwen2")), saved("llama"))
    old = instance_plan(spec).model_dump()
    old["deployments"][0]["model_spec"] = None
    (tmp_path / "old.json").write_text(__import__("json").dumps(old))
    with pytest.raises(EngineError, match="does not carry the model"):
        Engine.from_plan(tmp_path / "old.json")
    with pytest.raises(EngineError, match="cannot read plan"):
        Engine.from_plan(tmp_path / "missing.json")
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(EngineError, match="not a flowc plan"):
        Engine.from_plan(tmp_path / "junk.json")
