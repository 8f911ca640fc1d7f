"""The runtime's model against transformers: tiny random-weight checkpoints (tests/runtime_models.py)
loaded by runtime/weights.py and run through the paged cache, compared with transformers'
own forward on the full sequences (fp32, so to ~1e-4)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from runtime_models import (
    LLAMA3_ROPE,
    VARIANTS,
    PagedBatch,
    hf_logits,
    load_hf_model,
    run_steps,
    save_tiny_model,
    tiny_spec,
)

from flowc.compiler.model.step_graph import step_buffers
from flowc.compiler.optimize.arena import pack
from flowc.compiler.spec import Model, MoE
from flowc.runtime.config import ModelConfig, UnsupportedModel
from flowc.runtime.kernels import get_ops
from flowc.runtime.model import CausalLM
from flowc.runtime.parallel import Parallel, launch
from flowc.runtime.weights import load_config, load_model, load_weights
from flowc.runtime.workspace import HeapWorkspace, Workspace

TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """variant -> (saved directory, transformers' model loaded from it), built once."""
    cache = {}

    def get(variant: str):
        if variant not in cache:
            path = save_tiny_model(variant, tmp_path_factory.mktemp(variant))
            cache[variant] = (path, load_hf_model(path))
        return cache[variant]

    return get


def _tokens(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _expected(hf, steps) -> list[torch.Tensor]:
    """transformers' logits for every token of every step: each sequence is run whole and the
    rows of the positions each step added are picked (causal, so later tokens do not matter)."""
    full = {}
    for tokens in steps:
        for seq, new in tokens.items():
            full.setdefault(seq, []).extend(new)
    logits = {seq: hf_logits(hf, ids) for seq, ids in full.items()}
    done = dict.fromkeys(full, 0)
    out = []
    for tokens in steps:
        rows = []
        for seq, new in tokens.items():
            rows.append(logits[seq][done[seq]:done[seq] + len(new)])
            done[seq] += len(new)
        out.append(torch.cat(rows))
    return out


def _scenario(name: str, vocab: int):
    """Steps of {sequence: new tokens}. Block size 16: sequences cross block boundaries."""
    a, b, c = _tokens(41, vocab, 1), _tokens(20, vocab, 2), _tokens(33, vocab, 3)
    if name == "prefill":  # three ragged prompts in one batch
        return [{0: a[:5], 1: b[:17], 2: c}]
    if name == "decode":  # two prompts, then one token at a time for both
        return [{0: a[:7], 1: b[:14]}] + [{0: [a[7 + i]], 1: [b[14 + i]]} for i in range(5)]
    # chunked prefill of a, mixed with b's prompt and then b's decode
    return [{0: a[:12]}, {0: a[12:30], 1: b[:5]}, {1: [b[5]], 0: a[30:41]}]


@pytest.mark.parametrize("scenario", ["prefill", "decode", "chunked"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(tiny, variant, scenario):
    path, hf = tiny(variant)
    steps = _scenario(scenario, hf.config.vocab_size)
    got = run_steps(Parallel(), path, steps)
    for (logits, _), want in zip(got, _expected(hf, steps)):
        assert logits.shape == want.shape
        torch.testing.assert_close(logits, want, **TOL)


@pytest.mark.parametrize("variant", ["llama", "mixtral"])
def test_bf16_logits_are_close_to_transformers_bf16(tiny, variant):
    """bf16 weights and activations (fp32 logits): the roundings differ from transformers', so
    the bound is loose, but an error in the bf16 path (the lm_head's widening) shows."""
    path, _ = tiny(variant)
    hf = load_hf_model(path, torch.bfloat16)
    model = load_model(path, get_ops("torch"), dtype=torch.bfloat16)
    tokens = _tokens(40, 128, 9)
    logits = model(PagedBatch(8, 16).step({0: tokens}, all_logits=True), model.make_kv_cache(8, 16), HeapWorkspace())
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, hf_logits(hf, tokens), atol=0.2, rtol=0.02)


def _tp_worker(parallel: Parallel, paths: dict[str, Path], steps) -> dict[str, list]:
    return {variant: run_steps(parallel, path, steps) for variant, path in paths.items()}


def test_tensor_parallel_matches_one_rank(tiny):
    """tp 2 over gloo: KV heads split (llama), replicated (llama_mqa: 1 KV head), biases and a
    vocabulary of 131 with a padded shard (qwen2), experts split (mixtral)."""
    variants = ("llama", "llama_mqa", "qwen2", "mixtral")
    paths = {v: tiny(v)[0] for v in variants}
    a, b = _tokens(21, 128, 4), _tokens(7, 128, 5)
    steps = [{0: a[:12], 1: b[:5]}, {0: a[12:20], 1: [b[5]]}, {0: [a[20]], 1: [b[6]]}]
    ranks = launch(_tp_worker, 2, paths, steps)
    for variant in variants:
        vocab = tiny(variant)[1].config.vocab_size
        single = run_steps(Parallel(), paths[variant], steps)
        for step, (want, _) in enumerate(single):
            for rank in ranks:
                torch.testing.assert_close(rank[variant][step][0], want, **TOL)
            shards = torch.cat([rank[variant][step][1] for rank in ranks], dim=1)
            assert shards.shape[1] == 2 * -(-vocab // 2)
            torch.testing.assert_close(shards[:, :vocab], want, **TOL)
            assert torch.isneginf(shards[:, vocab:]).all()


@pytest.mark.parametrize("variant", ["llama", "mixtral"])
def test_arena_workspace_gives_the_heap_logits(tiny, variant):
    """The forward in one arena laid out by the compiler (buffers with disjoint lifetimes share
    bytes) computes what it computes with a fresh allocation per buffer."""
    path, _ = tiny(variant)
    spec, max_tokens, max_seqs = tiny_spec(variant), 40, 4
    buffers = step_buffers(spec, 1, max_tokens, max_seqs)
    layout = pack(buffers, time_limit_s=1.0)
    assert layout.size < sum(b.size_bytes for b in buffers)  # bytes are actually shared
    arena = Workspace(layout.offsets, layout.sizes, torch.float32)
    a, b = _tokens(30, 128, 6), _tokens(9, 128, 7)
    steps = [{0: a[:25], 1: b[:5]}, {0: a[25:], 1: [b[5]]}, {0: [a[29]], 1: [b[6]]}]
    results = []
    for workspace in (arena, HeapWorkspace()):
        model = load_model(path, get_ops("torch"), dtype=torch.float32)
        kv, batch = model.make_kv_cache(32, 16), PagedBatch(32, 16)
        results.append([model(batch.step(t), kv, workspace).clone() for t in steps])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("variant", ["llama", "qwen2"])
def test_pipeline_stages_compose_to_the_whole_model(tiny, variant):
    """Two stages of one layer each (qwen2: tied embeddings, so the last stage loads its own
    copy of the embedding as the LM head)."""
    path, _ = tiny(variant)
    ops, config = get_ops("torch"), load_config(path)
    stages = [CausalLM(config, ops, Parallel(pp_rank=r, pp_size=2), torch.float32) for r in range(2)]
    for stage in stages:
        load_weights(stage, path)
    assert [len(s.layers) for s in stages] == [1, 1]
    assert stages[0].lm_head is None and stages[0].norm is None and stages[1].embed is None
    whole = load_model(path, ops, dtype=torch.float32)
    caches = [s.make_kv_cache(16, 16) for s in stages] + [whole.make_kv_cache(16, 16)]
    batch = PagedBatch(16, 16)
    for tokens in ({0: _tokens(20, 128, 8)}, {0: [3]}):
        inputs = batch.step(tokens, all_logits=True)
        hidden = stages[0](inputs, caches[0], HeapWorkspace())
        got = stages[1](inputs, caches[1], HeapWorkspace(), hidden=hidden)
        torch.testing.assert_close(got, whole(inputs, caches[2], HeapWorkspace()), rtol=1e-6, atol=1e-6)


def test_random_weights_are_deterministic_and_layout_independent():
    config = ModelConfig.from_spec(tiny_spec("mixtral"))
    ops = get_ops("torch")
    full = CausalLM(config, ops, dtype=torch.float32)
    full.init_random(seed=3)
    again = CausalLM(config, ops, dtype=torch.float32)
    again.init_random(seed=3)
    assert all(torch.equal(p, q) for p, q in zip(full.parameters(), again.parameters()))
    other = CausalLM(config, ops, dtype=torch.float32)
    other.init_random(seed=4)
    assert not torch.equal(full.embed, other.embed)
    rank1 = CausalLM(config, ops, Parallel(tp_rank=1, tp_size=2), torch.float32)
    rank1.init_random(seed=3)
    f = config.expert_ffn // 2
    torch.testing.assert_close(rank1.layers[0].mlp.down, full.layers[0].mlp.down[:, :, f:], rtol=0, atol=0)


# ------------------------------------------------------------------------------- config


@pytest.mark.parametrize("rope", [
    {"rope_type": "default", "rope_theta": 500000.0},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
])
def test_cos_sin_cache_is_transformers_rotary(rope):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf_config = LlamaConfig(architectures=["LlamaForCausalLM"], hidden_size=1024, num_attention_heads=8, head_dim=128,
                            max_position_embeddings=131072, rope_parameters=dict(rope))
    positions = torch.tensor([[0, 1, 2, 100, 4095, 8191, 8192, 20000, 131071]])
    cos, sin = LlamaRotaryEmbedding(hf_config)(torch.zeros(1, dtype=torch.float32), positions)
    config = ModelConfig.from_hf(hf_config.to_dict())
    table = config.cos_sin_cache(131072)[positions[0]]
    assert torch.equal(table[:, :64], cos[0, :, :64]) and torch.equal(table[:, 64:], sin[0, :, :64])


def test_from_hf_reads_transformers_4_and_5_rope_fields():
    base = dict(architectures=["LlamaForCausalLM"], num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                intermediate_size=96, vocab_size=128, max_position_embeddings=256)
    v5 = ModelConfig.from_hf({**base, "rope_parameters": LLAMA3_ROPE})
    v4 = ModelConfig.from_hf({**base, "rope_theta": 10000.0, "rope_scaling": {k: v for k, v in LLAMA3_ROPE.items()
                                                                                if k != "rope_theta"}})
    assert v4 == v5 and v5.rope_scaling["rope_type"] == "llama3" and v5.kv_heads == 4 and v5.head_dim == 16
    linear = ModelConfig.from_hf({**base, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert linear.rope_scaling == {"rope_type": "linear", "factor": 2.0} and linear.rope_theta == 10000.0
    mistral = ModelConfig.from_hf({**base, "architectures": ["MistralForCausalLM"], "sliding_window": 4096})
    assert mistral.architecture == "llama" and mistral.sliding_window == 4096
    qwen = ModelConfig.from_hf({**base, "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": False,
                                "sliding_window": 4096, "eos_token_id": [1, 2]})
    assert qwen.attention_bias and qwen.sliding_window is None and qwen.eos_token_ids == (1, 2)


@pytest.mark.parametrize("config, words", [
    ({"architectures": ["GPT2LMHeadModel"]}, ["GPT2LMHeadModel", "LlamaForCausalLM", "MixtralForCausalLM"]),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, ["yarn", "linear", "llama3"]),
    ({"attention_bias": True}, ["attention_bias", "o_proj"]),
    ({"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True, "sliding_window": 8,
      "max_window_layers": 1}, ["max_window_layers"]),
])
def test_from_hf_refuses_what_it_cannot_run(config, words):
    base = dict(architectures=["LlamaForCausalLM"], num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                intermediate_size=96, vocab_size=128, max_position_embeddings=256)
    with pytest.raises(UnsupportedModel) as e:
        ModelConfig.from_hf({**base, **config})
    assert all(w in str(e.value) for w in words)


def test_from_spec_and_mismatches(tiny):
    spec = Model(name="mixtral-8x7b", architecture="mixtral", layers=32, hidden=4096, heads=32, kv_heads=8,
                 head_dim=128, ffn=14336, vocab=32000, max_context=32768,
                 moe=MoE(experts=8, top_k=2, expert_ffn=14336))
    config = ModelConfig.from_spec(spec)
    assert (config.experts, config.top_k, config.expert_ffn, config.rope_theta, config.rms_norm_eps) == \
        (8, 2, 14336, 1e6, 1e-5)
    assert config.mismatches(spec) == []
    with pytest.raises(UnsupportedModel, match="gptj"):
        ModelConfig.from_spec(spec.model_copy(update=dict(architecture="gptj", moe=None)))

    weights = load_config(tiny("mixtral")[0])
    assert weights.mismatches(tiny_spec("mixtral")) == []
    planned = tiny_spec("mixtral").model_copy(update=dict(layers=3, kv_heads=4, max_context=4096))
    assert weights.mismatches(planned) == ["layers: plan 3, weights 2", "kv_heads: plan 4, weights 2",
                                           "max_context: plan 4096, weights support 256"]
