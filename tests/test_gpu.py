"""The engine on a real NVIDIA GPU: plans for `vendor nvidia` run on CUDA with the Triton
kernels compiled for the device (not interpreted). Skipped where torch sees no CUDA device
(CI); run on a GPU machine with `python -m pytest tests/test_gpu.py tests/test_kernels.py`.

The reference is transformers on the CPU in fp32: the GPU engine in fp32 must give the same
greedy tokens, with chunked prefill and preemption happening. In bf16 the two sides round
differently, so the engine's Triton and torch backends are compared with each other on the
GPU, logits to a bf16 tolerance."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from runtime_models import PagedBatch, hf_greedy, hf_logits, load_hf_model, sample_prompts, save_tiny_model, tiny_spec

from flowc.compiler.optimize.instance_plan import instance_plan
from flowc.runtime.engine import Engine, Request
from flowc.runtime.kernels import get_ops
from flowc.runtime.model import StepInputs
from flowc.runtime.sequence import SamplingParams
from flowc.runtime.weights import load_model
from flowc.runtime.workspace import HeapWorkspace

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
pytest.importorskip("transformers")


@pytest.mark.parametrize("variant", ["llama", "qwen2", "mistral", "mixtral"])
def test_gpu_engine_matches_transformers_greedy(tmp_path, variant):
    path = save_tiny_model(variant, tmp_path)
    spec = tiny_spec(variant)
    plan = instance_plan(spec, vendor="nvidia", max_batched_tokens=32, chunk_size=16, max_seqs=4, kv_blocks=8)
    prompts = sample_prompts(spec.vocab)
    max_tokens = [20, 12, 16, 20, 9, 24, 14, 18]
    with Engine.from_plan(plan, path) as engine:
        assert engine.runner.state.device.type == "cuda"
        outputs = engine.generate([Request(p, SamplingParams(max_tokens=n)) for p, n in zip(prompts, max_tokens)])
    assert [o.output_token_ids for o in outputs] == hf_greedy(path, prompts, max_tokens)
    assert sum(o.num_preemptions for o in outputs) > 0, "the pool was meant to force preemption"


def test_gpu_bf16_triton_matches_the_torch_backend(tmp_path):
    path = save_tiny_model("llama", tmp_path)
    prompts = {i: p for i, p in enumerate(sample_prompts(128, n=4))}
    logits = {}
    for backend in ("torch", "triton"):
        model = load_model(path, get_ops(backend), dtype=torch.bfloat16, device="cuda")
        kv = model.make_kv_cache(num_blocks=32, block_size=16)
        inputs = PagedBatch(32, 16).step(prompts, all_logits=True)
        inputs = StepInputs(**{f.name: getattr(inputs, f.name).cuda() for f in dataclasses.fields(inputs)})
        logits[backend] = model(inputs, kv, HeapWorkspace("cuda")).float().cpu()
    hf = load_hf_model(path)
    reference = torch.cat([hf_logits(hf, p) for p in prompts.values()])
    scale = reference.abs().max()
    # bf16 keeps 8 bits of mantissa and the rounding compounds over the layers: each backend's
    # worst logit sits within 8% of the largest and its mean error within 1% (a wrong rotary,
    # mask or cache read is off by the order of the logits themselves)
    for name, got in [("torch", logits["torch"]), ("triton", logits["triton"])]:
        error = (got - reference).abs()
        assert error.max() <= 0.08 * scale and error.mean() <= 0.01 * scale, (name, error.max(), error.mean())
    assert (logits["triton"] - logits["torch"]).abs().max() <= 0.08 * scale


def test_no_kernel_compiles_while_serving():
    """The engine's start-up warm-up compiles every Triton specialization a step can need:
    requests of any mix of lengths and batch sizes afterwards compile nothing."""
    knobs = pytest.importorskip("triton.knobs")
    spec = tiny_spec("llama")
    # block size 32: attention tiles no other engine test compiles (Triton keeps compiled
    # kernels for the whole process)
    plan = instance_plan(spec, vendor="nvidia", max_batched_tokens=64, chunk_size=32, max_seqs=24, block_size=32,
                         kv_blocks=64)
    compiled = []

    def count(*args, **kwargs):
        compiled.append(kwargs.get("repr"))

    knobs.runtime.jit_post_compile_hook = count
    try:
        with Engine.from_plan(plan) as engine:
            compiled.clear()  # what the warm-up compiled
            rng = random.Random(1)
            requests = [Request([rng.randrange(spec.vocab) for _ in range(rng.choice((1, 2, 15, 16, 17, 33, 90)))],
                                SamplingParams(max_tokens=rng.randint(1, 12))) for _ in range(40)]
            outputs = engine.generate(requests)
    finally:
        knobs.runtime.jit_post_compile_hook = None
    assert all(o.error is None for o in outputs)
    assert compiled == []
