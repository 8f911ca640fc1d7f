"""The engine end to end: greedy outputs token for token equal to Hugging Face transformers'
`generate` on tiny random-weight models, with continuous batching, chunked prefill and
preemption all happening; per-request validation; streaming; the plan's KV pool and arena."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from runtime_models import hf_greedy, sample_prompts, tiny_spec

from flowc.compiler.model.geometry import kv_bytes_per_token_per_rank
from flowc.compiler.optimize.instance_plan import instance_plan
from flowc.runtime.engine import Engine, EngineError, Request, TokenEvent
from flowc.runtime.sequence import RequestError, SamplingParams
from flowc.runtime.workspace import Workspace

pytest.importorskip("transformers")


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
        outputs = {o.request_id: o.output_token_ids for o in engine.generate(requests)}
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
        (Request([3] * 200, SamplingParams(max_tokens=50)), "249 tokens need 16 KV-cache blocks"),
        # malformed fields: each used to escape as a TypeError with the earlier requests queued
        (Request(5), "prompt_token_ids must be a list of token ids, got int"),
        (Request([1, 2.0]), "prompt token 1 is 2.0, not a token id"),
        (Request([True]), "prompt token 0 is True, not a token id"),
        (Request([1], {"max_tokens": 2}), "params must be a SamplingParams, got dict"),
        (Request([1], request_id=7), "request_id must be a string or None, got 7"),
        (Request([1], arrival_time=math.nan), "arrival_time must be a finite number"),
        (Request([1], arrival_time=10**400), "arrival_time must be a finite number"),
    ]
    with Engine.from_plan(plan, saved("llama")) as engine:
        alone = engine.generate([Request(p, SamplingParams(max_tokens=8)) for p in good])
        mixed = engine.generate([r for r, _ in bad] + [Request(p, SamplingParams(max_tokens=8)) for p in good])
        for request, message in bad:  # add_request raises, and queues nothing
            with pytest.raises(RequestError, match=re.escape(message)):
                engine.add_request(request)
            assert not engine.has_work()
    for output, (request, message) in zip(mixed, bad):
        assert output.error is not None and message in output.error, output.error
        assert output.output_token_ids == [] and output.request_id == (request.request_id or output.request_id)
    assert [o.output_token_ids for o in mixed[len(bad):]] == [o.output_token_ids for o in alone]


def test_an_item_that_is_not_a_request_queues_nothing():
    with Engine.from_plan(instance_plan(tiny_spec("llama"))) as engine:
        with pytest.raises(TypeError, match="request 1 is a str, not a flowc.runtime.Request"):
            engine.generate([Request([1, 2, 3]), "hello"])
        assert not engine.has_work() and engine.block_manager.num_used == 0
        # the refused call left nothing behind to break this one (it used to fail with KeyError)
        [output] = engine.generate([Request([1, 2, 3], SamplingParams(max_tokens=3))])
    assert len(output.output_token_ids) == 3 and output.finish_reason == "length"


def test_generated_request_ids_never_take_a_given_one():
    with Engine.from_plan(instance_plan(tiny_spec("llama"))) as engine:
        unnamed, named = engine.generate([Request([1, 2], SamplingParams(max_tokens=2)),
                                          Request([3, 4], SamplingParams(max_tokens=2), request_id="0")])
    assert unnamed.error is None and named.error is None  # "0" used to be given to both
    assert named.request_id == "0" and unnamed.request_id != "0"


def test_replayed_outputs_come_in_the_order_given():
    requests = [Request([1, 2, 3], SamplingParams(max_tokens=2), request_id="late", arrival_time=0.01),
                Request([4, 5, 6], SamplingParams(max_tokens=2), request_id="early", arrival_time=0.0)]
    with Engine.from_plan(instance_plan(tiny_spec("llama"))) as engine:
        outputs = engine.generate(requests, replay=True)
    assert [o.request_id for o in outputs] == ["late", "early"]
    assert outputs[0].arrival_time > outputs[1].arrival_time


def _events_until_idle(engine: Engine) -> list[TokenEvent]:
    events = []
    while engine.has_work():
        events += engine.poll()
        engine.block_manager.check(engine.scheduler.running)
    return events


def test_abort_a_waiting_a_running_and_a_preempted_request(saved):
    spec = tiny_spec("llama")
    # as in test_greedy_matches_transformers, with 6 blocks (the longest request's need): decodes get preempted
    plan = instance_plan(spec, max_batched_tokens=32, chunk_size=16, max_seqs=4, block_size=16, kv_blocks=6)
    requests = [Request(p, SamplingParams(max_tokens=n), request_id=f"r{i}")
                for i, (p, n) in enumerate(zip(sample_prompts(spec.vocab), [20, 12, 16, 20, 9, 24, 14, 18]))]
    with Engine.from_plan(plan, saved("llama")) as engine:
        expected = {o.request_id: o.output_token_ids for o in engine.generate(requests)}
    with Engine.from_plan(plan, saved("llama")) as engine:
        outputs = {r.request_id: engine.add_request(r) for r in requests}
        sched = engine.scheduler
        aborted = {"waiting": sched.waiting[-1]}
        assert engine.abort("r7") is outputs["r7"]  # it never ran
        events: list[TokenEvent] = []
        while engine.has_work():
            events += engine.poll()
            preempted = [s for s in sched.waiting if s.num_preemptions and s.output_token_ids]  # a decode's
            if "preempted" not in aborted and preempted:
                aborted["preempted"] = preempted[0]
            elif "preempted" in aborted and "running" not in aborted and sched.running[0].output_token_ids:
                aborted["running"] = sched.running[0]
            else:
                continue
            seq = list(aborted.values())[-1]  # the one just chosen
            tokens = list(seq.output_token_ids)
            output = engine.abort(seq.request_id)
            assert output is outputs[seq.request_id] and output.finish_reason == "abort" and output.error is None
            assert output.output_token_ids == tokens and seq.block_ids == []
            engine.block_manager.check(sched.running)  # its blocks are free, nobody else's touched
            assert engine.abort(seq.request_id) is None  # not in flight any more
    assert set(aborted) == {"waiting", "running", "preempted"}
    assert aborted["preempted"].output_token_ids, "the preempted request had sampled before"
    for where, seq in aborted.items():
        mine = [e for e in events if e.request_id == seq.request_id]
        n = len(seq.output_token_ids)
        assert mine[-1] == TokenEvent(seq.request_id, None, n, "abort"), where  # one final event, the last
        assert [e.token_id for e in mine[:-1]] == seq.output_token_ids == expected[seq.request_id][:n]
    survivors = {i: o.output_token_ids for i, o in outputs.items() if o.finish_reason != "abort"}
    assert len(survivors) == 5 and survivors == {i: expected[i] for i in survivors}
    bm = engine.block_manager
    assert bm.num_used == 0 and bm.num_free + bm.num_cached == bm.num_blocks


def test_abort_inside_a_stream_yields_the_final_event():
    requests = [Request([1 + i, 2, 3], SamplingParams(max_tokens=5), request_id=f"r{i}") for i in range(3)]
    with Engine.from_plan(instance_plan(tiny_spec("llama"))) as engine:
        events = []
        for event in engine.stream(requests):
            events.append(event)
            if event.request_id == "r1" and event.index == 1:
                assert engine.abort("r1").finish_reason == "abort"
        assert engine.block_manager.num_used == 0
    r1 = [e for e in events if e.request_id == "r1"]
    assert [(e.index, e.finish_reason) for e in r1] == [(0, None), (1, None), (2, "abort")]
    assert r1[-1].token_id is None
    for other in ("r0", "r2"):
        assert [e.finish_reason for e in events if e.request_id == other] == [None] * 4 + ["length"]


def test_closing_a_stream_early_aborts_its_requests():
    plan = instance_plan(tiny_spec("llama"))
    requests = [Request([1, 2, 3], SamplingParams(max_tokens=6), request_id="a"),
                Request([4, 5, 6, 7], SamplingParams(max_tokens=6), request_id="b")]
    with Engine.from_plan(plan) as engine:
        stream = engine.stream(requests)
        next(stream)
        stream.close()
        assert not engine.has_work() and engine.block_manager.num_used == 0
        # the same ids run again at once (they used to stay queued, and this call failed with KeyError)
        outputs = engine.generate(requests)
    assert [(o.request_id, len(o.output_token_ids), o.error) for o in outputs] == [("a", 6, None), ("b", 6, None)]


def test_closing_a_stream_keeps_the_events_of_other_requests():
    plan = instance_plan(tiny_spec("llama"))
    requests = [Request([1, 2, 3], SamplingParams(max_tokens=6), request_id="a"),
                Request([4, 5, 6], SamplingParams(max_tokens=6), request_id="b")]
    with Engine.from_plan(plan) as engine:
        stream = engine.stream(requests)
        assert next(stream).request_id == "a"  # the first step: a, b
        outside = engine.add_request(Request(list(range(10, 27)), SamplingParams(max_tokens=6), request_id="outside"))
        assert (next(stream).request_id, next(stream).request_id) == ("b", "a")  # the second step: a, b, outside
        stream.close()  # before the second step's events for b and outside were yielded
        events = _events_until_idle(engine)
    mine = [e for e in events if e.request_id == "outside"]
    assert [e.index for e in mine] == list(range(6))  # its first token's event used to be lost
    assert [e.token_id for e in mine] == outside.output_token_ids and outside.finish_reason == "length"
    assert {e.request_id for e in events} == {"outside"}  # nothing more of the closed stream's requests


def test_a_duplicate_request_id_is_that_request_s_error(saved):
    plan = instance_plan(tiny_spec("llama"))
    with Engine.from_plan(plan, saved("llama")) as engine:
        first, second = engine.generate([Request([1, 2, 3], SamplingParams(max_tokens=4), request_id="a"),
                                         Request([4, 5], SamplingParams(max_tokens=4), request_id="a")])
    assert first.request_id == "a" and len(first.output_token_ids) == 4 and first.error is None
    assert second.request_id == "a" and "duplicate request id 'a'" in second.error  # the id as given
    assert second.output_token_ids == [] and second.finish_reason is None


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


def test_a_top_k_beyond_the_vocabulary_keeps_it_all():
    prompt = [5, 6, 7]
    with Engine.from_plan(instance_plan(tiny_spec("llama"))) as engine:
        whole, huge = (engine.generate([Request(prompt, SamplingParams(max_tokens=6, temperature=1.0, seed=7,
                                                                       top_k=top_k))])[0]
                       for top_k in (128, 2**70))  # 2**70 used to overflow the sampler's int64 tensor
    assert huge.error is None and huge.output_token_ids == whole.output_token_ids


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
        assert not engine.has_work()


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
        output = engine.add_request(direct, arrival_time=engine.now() - 1.0)  # it waited a second elsewhere
        while engine.has_work():
            engine.poll()
        assert output.first_token_time - output.arrival_time >= 1.0


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
    if not torch.cuda.is_available():
        with pytest.raises(EngineError, match="no such device"):
            Engine.from_plan(instance_plan(spec, vendor="nvidia"))
    with pytest.raises(EngineError, match="not the plan's model"):
        Engine.from_plan(instance_plan(tiny_spec("qwen2")), saved("llama"))
    old = instance_plan(spec).model_dump()
    old["deployments"][0]["model_spec"] = None
    (tmp_path / "stripped.json").write_text(json.dumps(old))
    with pytest.raises(EngineError, match="does not carry its model"):  # a 1.6 plan must
        Engine.from_plan(tmp_path / "stripped.json")
    old["format_version"] = "1.2"
    del old["clusters"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    with pytest.raises(EngineError, match="does not carry the model"):  # a 1.2 plan may not, and cannot run
        Engine.from_plan(tmp_path / "old.json")
    with pytest.raises(EngineError, match="cannot read plan"):
        Engine.from_plan(tmp_path / "missing.json")
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(EngineError, match="not a flowc plan"):
        Engine.from_plan(tmp_path / "junk.json")


def test_the_triton_backend_on_a_cpu_device_is_refused_before_anything_starts(saved, monkeypatch):
    """A cpu-local plan runs on the CPU even on a GPU machine: Triton there needs its interpreter."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    plan = instance_plan(tiny_spec("llama"), max_batched_tokens=32, max_seqs=4, kv_blocks=8)
    with pytest.raises(EngineError, match="the triton kernel backend needs a CUDA GPU, and this runs on cpu"):
        Engine.from_plan(plan, saved("llama"), backend="triton")
