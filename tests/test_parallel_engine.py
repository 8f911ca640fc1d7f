"""Parallel instances in the runtime. Pipeline stages over processes (gloo), alone and with TP
inside each stage, give the greedy tokens of the one-process engine and of Hugging Face
transformers, from hand-made plans and from plans `flowc compile` made. A worker that dies or
hangs fails the requests in flight with a clear error, and the engine stops cleanly."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
from runtime_models import hf_greedy, sample_prompts, tiny_spec

import flowc.cli
from flowc.compiler.optimize.instance_plan import instance_plan
from flowc.runtime.engine import Engine, EngineError, Request, load_plan
from flowc.runtime.runner import rank_grid
from flowc.runtime.sequence import SamplingParams

pytest.importorskip("transformers")

MAX_TOKENS = [7, 5, 9, 6]


def _generate(plan, weights=None, **kwargs) -> list[list[int]]:
    prompts = sample_prompts(plan.deployments[0].model_spec.vocab, n=len(MAX_TOKENS))
    requests = [Request(p, SamplingParams(max_tokens=n)) for p, n in zip(prompts, MAX_TOKENS)]
    with Engine.from_plan(plan, weights, share_cores=True, **kwargs) as engine:
        return [o.output_token_ids for o in engine.generate(requests)]


def test_rank_grid_puts_tp_ranks_of_a_stage_side_by_side():
    assert [rank_grid(r, 2) for r in range(4)] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [rank_grid(r, 1) for r in range(3)] == [(0, 0), (1, 0), (2, 0)]


def test_micro_batches_split_a_step_into_whole_sequences():
    from flowc.runtime.runner import micro_batches

    # three sequences of 4, 5 and 1 tokens; the first and the last sample
    step = {"input_ids": list(range(10, 20)), "positions": [0, 1, 2, 3, 7, 8, 9, 10, 11, 5],
            "slot_mapping": list(range(30, 40)), "block_tables": [[0], [1, 2], [3]], "seq_lens": [4, 12, 6],
            "query_start_loc": [0, 4, 9, 10], "logits_indices": [3, 9]}
    assert micro_batches(step, 1) == [step]
    first, second = micro_batches(step, 2)
    assert first == {"input_ids": [10, 11, 12, 13], "positions": [0, 1, 2, 3], "slot_mapping": [30, 31, 32, 33],
                     "block_tables": [[0]], "seq_lens": [4], "query_start_loc": [0, 4], "logits_indices": [3]}
    assert second == {"input_ids": list(range(14, 20)), "positions": [7, 8, 9, 10, 11, 5],
                      "slot_mapping": list(range(34, 40)), "block_tables": [[1, 2], [3]], "seq_lens": [12, 6],
                      "query_start_loc": [0, 5, 6], "logits_indices": [5]}
    # cuts at the sequence boundaries nearest to equal token shares: none empty, at most one per sequence
    parts = micro_batches(step, 8)
    assert [p["seq_lens"] for p in parts] == [[4], [12, 6]]
    assert [p["seq_lens"] for p in micro_batches({**step, "query_start_loc": [0, 3, 6, 9]}, 3)] == [[4], [12], [6]]
    assert sum((p["input_ids"] for p in parts), []) == step["input_ids"]


@pytest.mark.parametrize("variant, shapes", [("llama", [(1, 2, 1), (2, 2, 1)]), ("qwen2", [(1, 2, 1)]),
                                             ("mixtral", [(1, 2, 1), (2, 1, 2)])])
def test_parallel_instances_match_one_process_and_transformers(saved, variant, shapes):
    """(tp, pp, ep): pipeline stages, TP inside them, and experts spread whole over TP ranks."""
    path = saved(variant)
    spec = tiny_spec(variant)
    # a 32-token budget in chunks of 16: prompts are prefilled in pieces across steps
    settings = dict(max_batched_tokens=32, chunk_size=16, max_seqs=4)
    expected = hf_greedy(path, sample_prompts(spec.vocab, n=len(MAX_TOKENS)), MAX_TOKENS)
    assert _generate(instance_plan(spec, **settings), path) == expected
    for tp, pp, ep in shapes:
        assert _generate(instance_plan(spec, tp=tp, pp=pp, ep=ep, **settings), path) == expected, (tp, pp, ep)


SPEC = """use std.cpu_local
use std.models

model tiny-moe {{
  architecture mixtral
  layers 2
  hidden 64
  heads 4
  kv_heads 2
  head_dim 16
  ffn 128
  vocab 256
  max_context 512 tok
  weights fp32
  kv fp32
  tied_embeddings false
  moe {{
    experts 4
    top_k 2
    expert_ffn 64
  }}
}}

cluster box {{
  node x 1 {{
    gpu cpu-local x {gpus}
  }}
}}

workload chat {{
  arrival poisson 1 req/s
  prompt uniform(16 tok, 64 tok)
  output uniform(8 tok, 16 tok)
}}

slo relaxed {{
  ttft p90 <= 5 s
  tpot p90 <= 1 s
}}

deploy tiny {{
  model {model}
  on box
  serve chat under relaxed
  tp in [{tp}]
  pp in [{pp}]
  ep in [{ep}]
  max_batched_tokens in [512 tok]
  max_seqs in [32]
}}
"""


@pytest.mark.parametrize("model, tp, pp, ep", [("tiny-llama { weights fp32; kv fp32 }", 1, 2, 1),
                                                ("tiny-llama { weights fp32; kv fp32 }", 2, 2, 1),
                                                ("tiny-moe", 2, 1, 2)])
def test_compiled_parallel_plans_run_token_identical(tmp_path, model, tp, pp, ep):
    spec = tmp_path / "parallel.flow"
    spec.write_text(SPEC.format(model=model, gpus=tp * pp, tp=tp, pp=pp, ep=ep))
    assert flowc.cli.main(["compile", str(spec), "-o", str(tmp_path / "plan.json")]) == 0
    plan = load_plan(tmp_path / "plan.json")
    group = plan.deployments[0].groups[0]
    assert (group.tp, group.pp, group.ep) == (tp, pp, ep)
    one_process = instance_plan(plan.deployments[0].model_spec, max_batched_tokens=512, max_seqs=32)
    assert _generate(plan, seed=4) == _generate(one_process, seed=4)


def test_more_ranks_than_cores_are_refused_unless_they_may_share(monkeypatch):
    import torch

    from flowc.runtime import engine

    monkeypatch.setattr(engine.os, "sched_getaffinity", lambda pid: {0})
    plan = instance_plan(tiny_spec("llama"), pp=2)
    with pytest.raises(EngineError, match=r"tp 1 x pp 2, one process per rank, 2 of them here, and this machine has "
                       "1 CPU cores"):
        Engine.from_plan(plan)
    group = plan.deployments[0].groups[0]
    assert engine._host_problem(group, torch.device("cpu"), share_cores=True) is None


@pytest.mark.parametrize("variant", ["llama", "qwen2", "mixtral"])
def test_a_stage_holds_its_layers_and_the_plans_weights(variant):
    """Each stage builds its own layers, the first the embedding, the last the norm and LM head;
    the fuller stage holds what the plan's memory map gives a GPU (geometry.weight_bytes_per_rank)."""
    import torch

    from flowc.compiler.model.geometry import weight_bytes_per_rank
    from flowc.runtime.config import ModelConfig
    from flowc.runtime.kernels import get_ops
    from flowc.runtime.model import CausalLM
    from flowc.runtime.parallel import Parallel

    spec = tiny_spec(variant)
    config = ModelConfig.from_spec(spec)
    stages = [CausalLM(config, get_ops("torch", "cpu"), Parallel(pp_rank=s, pp_size=2), torch.float32)
              for s in range(2)]
    assert [len(stage.layers) for stage in stages] == [config.layers // 2] * 2
    assert stages[0].embed is not None and stages[0].lm_head is None and stages[0].norm is None
    assert stages[1].embed is None and stages[1].lm_head is not None and stages[1].norm is not None
    held = max(sum(p.numel() * p.element_size() for p in stage.parameters()) for stage in stages)
    assert held == pytest.approx(weight_bytes_per_rank(spec, 1, 2), rel=0.01)


def _start(timeout_s: float = 120.0):
    """A pp 2 engine (two processes) with four long requests in flight after one step."""
    engine = Engine.from_plan(instance_plan(tiny_spec("llama"), pp=2), share_cores=True, timeout_s=timeout_s)
    outputs = [engine.add_request(Request(p, SamplingParams(max_tokens=100, ignore_eos=True)))
               for p in sample_prompts(engine.config.vocab, n=4)]
    events = engine.poll()
    assert engine.has_work() and all(o.finish_reason is None for o in outputs)
    return engine, outputs, events


def _drain(engine, events, limit_s: float) -> list:
    start = time.monotonic()
    while engine.has_work():
        events += engine.poll()
        assert time.monotonic() - start < limit_s, "the engine did not give up on its failed worker"
    return events


def _check_failed(engine, outputs, events, reason: str) -> None:
    finals = [e for e in events if e.finish_reason is not None]
    assert sorted(e.request_id for e in finals) == sorted(o.request_id for o in outputs)  # one each
    assert all(e.finish_reason == "abort" and e.token_id is None and reason in e.error for e in finals)
    assert all(o.finish_reason == "abort" and reason in o.error for o in outputs)
    with pytest.raises(EngineError, match=re.escape("the engine stopped: " + reason)):
        engine.add_request(Request([1, 2, 3]))
    start = time.monotonic()
    engine.close()  # the workers left are killed, not waited for
    assert time.monotonic() - start < 15
    assert not any(p.is_alive() for p in engine.runner.workers.processes)


def test_a_worker_that_dies_fails_the_requests_in_flight():
    engine, outputs, events = _start()
    try:
        worker = engine.runner.workers.processes[0]
        worker.kill()
        worker.join()
        events = _drain(engine, events, limit_s=30)
        _check_failed(engine, outputs, events, "rank 1 of the instance exited (exit code -9)")
    finally:
        engine.close()


def test_a_worker_that_hangs_fails_the_requests_after_the_timeout():
    engine, outputs, events = _start(timeout_s=3)
    try:
        os.kill(engine.runner.workers.processes[0].pid, signal.SIGSTOP)
        events = _drain(engine, events, limit_s=30)
        _check_failed(engine, outputs, events, "a rank of the instance stopped answering")
    finally:
        engine.close()


def _ep_worker(parallel, path, steps):
    from dataclasses import replace

    from runtime_models import run_steps

    return run_steps(replace(parallel, ep_size=2), path, steps)


def test_expert_parallel_ranks_hold_whole_experts_and_match_one_rank(saved):
    """ep 2 over tp 2 on the tiny Mixtral: each rank holds half the experts whole (not a slice of
    every expert), and the logits are the one-rank model's."""
    import torch
    from runtime_models import run_steps

    from flowc.runtime.config import ModelConfig
    from flowc.runtime.parallel import Parallel, launch

    path = saved("mixtral")
    config = ModelConfig.from_spec(tiny_spec("mixtral"))
    layouts = [Parallel(tp_rank=r, tp_size=2, ep_size=2).layout(config) for r in range(2)]
    half = config.experts // 2
    assert [lay.experts for lay in layouts] == [range(0, half), range(half, config.experts)]
    assert [lay.ffn for lay in layouts] == [range(config.expert_ffn)] * 2
    a, b = [int(t) for t in torch.randint(0, config.vocab, (21,))], [5, 9, 11, 2, 7, 1, 3]
    steps = [{0: a[:12], 1: b[:5]}, {0: a[12:20], 1: [b[5]]}, {0: [a[20]], 1: [b[6]]}]
    single = run_steps(Parallel(), path, steps)
    for rank in launch(_ep_worker, 2, path, steps):
        for (got, _), (want, _) in zip(rank, single):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
