"""The memory model: parameter counts against published totals, KV-cache and weight bytes."""

from __future__ import annotations

import pytest
from reference_models import DERIVED_PARAMS, PUBLISHED_PARAMS

import flowc
from flowc.compiler.model.geometry import (
    kv_bytes_per_token,
    kv_bytes_per_token_per_rank,
    param_counts,
    weight_bytes,
    weight_bytes_per_rank,
)
from flowc.compiler.model.memory import activation_peak_bytes, memory_budget, runtime_reserve_bytes
from flowc.stdlib_listing import stdlib_spec

# Totals the formulas reproduce exactly: every published safetensors count, the exact
# DeepSeek-V3 count from config.json, and the HF GPTJForCausalLM count (see reference_models).
EXACT = {name: count for name, (count, source) in PUBLISHED_PARAMS.items() if "safetensors total" in source}
EXACT.update({
    "mixtral-8x22b": PUBLISHED_PARAMS["mixtral-8x22b"][0],
    "deepseek-v3": 671_026_419_200,
    "gpt-j-6b": 6_050_882_784,
    "tiny-llama": DERIVED_PARAMS["tiny-llama"][0],
})


@pytest.fixture(scope="module")
def models():
    return stdlib_spec().models


def test_every_reference_model_is_in_the_stdlib(models):
    assert set(PUBLISHED_PARAMS) | set(DERIVED_PARAMS) <= set(models)


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_param_count_within_half_a_percent_of_the_published_total(models, name):
    published, _ = PUBLISHED_PARAMS[name]
    total = param_counts(models[name]).total
    assert abs(total - published) / published < 0.005, f"{name}: {total:,} vs published {published:,}"


@pytest.mark.parametrize("name", sorted(EXACT))
def test_param_count_exact(models, name):
    assert param_counts(models[name]).total == EXACT[name]


def test_gptj_and_deepseek_differences_from_the_published_figures(models):
    # gpt-j-6b: the model card counts 2,498,560 more than the HF module; deepseek-v3: 671B is rounded.
    assert PUBLISHED_PARAMS["gpt-j-6b"][0] - param_counts(models["gpt-j-6b"]).total == 2_498_560
    assert param_counts(models["deepseek-v3"]).total - PUBLISHED_PARAMS["deepseek-v3"][0] == 26_419_200


def test_llama_3_1_70b_breakdown(models):
    m = models["llama-3.1-70b"]
    counts = param_counts(m)
    attention = 80 * (8192 * 64 * 128 + 2 * 8192 * 8 * 128 + 64 * 128 * 8192)
    mlp = 80 * 3 * 8192 * 28672
    assert counts.attention == attention == 12_079_595_520
    assert counts.mlp == mlp == 56_371_445_760
    assert counts.experts == counts.router == 0
    assert counts.embedding == counts.lm_head == 128256 * 8192
    assert counts.norms == 80 * 2 * 8192 + 8192
    assert counts.total == 70_553_706_496
    assert counts.active(m) == counts.total


def test_moe_active_parameters(models):
    m = models["mixtral-8x7b"]
    counts = param_counts(m)
    assert counts.experts == 32 * 8 * 3 * 4096 * 14336
    assert counts.router == 32 * 4096 * 8
    assert counts.active(m) == counts.total - counts.experts + counts.experts * 2 // 8
    deepseek = models["deepseek-v3"]
    d = param_counts(deepseek)
    assert d.router == 58 * (7168 * 256 + 256)
    assert 36e9 < d.active(deepseek) < 38e9  # "37B active"


def test_kv_bytes_per_token(models):
    assert kv_bytes_per_token(models["llama-3.1-70b"]) == 80 * 2 * 8 * 128 * 2 == 327_680
    assert kv_bytes_per_token(models["llama-3.1-8b"]) == 32 * 2 * 8 * 128 * 2 == 131_072
    assert kv_bytes_per_token(models["llama-2-7b"]) == 32 * 2 * 32 * 128 * 2 == 524_288
    # MLA caches the compressed latent plus the decoupled RoPE key, once per layer.
    assert kv_bytes_per_token(models["deepseek-v3"]) == 61 * (512 + 64) * 2 == 70_272
    assert kv_bytes_per_token(models["tiny-llama"]) == 2 * 2 * 2 * 16 * 2 == 256


def test_kv_bytes_follow_the_kv_dtype(models):
    m = models["llama-3.1-70b"]
    assert kv_bytes_per_token(m.model_copy(update={"kv": "fp8"})) == 163_840
    assert kv_bytes_per_token(m.model_copy(update={"kv": "fp32"})) == 655_360


def test_weight_bytes(models):
    m = models["llama-3.1-70b"]
    counts = param_counts(m)
    linear = 12_079_595_520 + 56_371_445_760
    other = 2 * 128256 * 8192 + 80 * 2 * 8192 + 8192
    assert counts.linear == linear
    assert weight_bytes(m) == 2 * (linear + other) == 141_107_412_992
    # fp8: linear layers 1 byte per parameter, embeddings, lm_head and norms stay at 2 bytes.
    assert weight_bytes(m.model_copy(update={"weights": "fp8"})) == linear + 2 * other == 72_656_371_712
    assert weight_bytes(m.model_copy(update={"weights": "int4"})) == linear // 2 + 2 * other
    assert weight_bytes(m.model_copy(update={"weights": "fp32"})) == 4 * (linear + other)


def test_deepseek_ships_fp8_weights(models):
    m = models["deepseek-v3"]
    counts = param_counts(m)
    assert m.weights == "fp8"
    assert weight_bytes(m) == counts.linear + 2 * (counts.total - counts.linear) == 672_987_229_184


def test_deployment_override_changes_the_memory_figures():
    spec = flowc.load("""\
use std.gpus
use std.models
cluster c {
  node x 1 { gpu h100-sxm x 8 }
}
workload w {
  arrival poisson 1 req/s
  prompt 100 tok
  output 100 tok
}
slo s { ttft p90 <= 1 s }
deploy d {
  model llama-3.1-70b { weights fp8; kv fp8 }
  on c
  serve w under s
}
""")
    model = spec.deployments["d"].model
    assert weight_bytes(model) == 72_656_371_712
    assert kv_bytes_per_token(model) == 163_840
    assert weight_bytes(spec.models["llama-3.1-70b"]) == 141_107_412_992


# ---------------------------------------------------------------------------------- per GPU


GiB = 2**30


def test_weights_per_rank_llama_70b_tp4_by_hand(models):
    m = models["llama-3.1-70b"]
    linear = 80 * (8192 * 64 * 128 + 2 * 8192 * 8 * 128 + 64 * 128 * 8192) + 80 * 3 * 8192 * 28672
    norms = 80 * 2 * 8192 + 8192
    vocab = 2 * 128256 * 8192
    assert weight_bytes_per_rank(m, tp=4) == linear // 4 * 2 + norms * 2 + vocab // 4 * 2 == 35_278_831_616


def test_kv_heads_replicate_beyond_tp_equal_kv_heads(models):
    m = models["llama-3.1-70b"]  # 8 KV heads: at tp 16 every rank still holds one whole head
    assert kv_bytes_per_token_per_rank(m, tp=8) == 80 * 2 * 1 * 128 * 2 == 40_960
    assert kv_bytes_per_token_per_rank(m, tp=16) == 40_960
    extra_kv_proj = 80 * 2 * 8192 * 128 * (1 - 8 / 16)  # replicated half-heads of K and V projections
    norm_bytes = (80 * 2 * 8192 + 8192) * 2  # replicated on every rank: halving tp 8 halved them
    assert weight_bytes_per_rank(m, tp=16) - int(weight_bytes_per_rank(m, tp=8) / 2) == pytest.approx(
        extra_kv_proj * 2 + norm_bytes / 2, abs=8)


def test_mla_latent_is_not_split_by_tp(models):
    m = models["deepseek-v3"]
    assert kv_bytes_per_token_per_rank(m, tp=1) == kv_bytes_per_token_per_rank(m, tp=8) == 61 * (512 + 64) * 2


def test_pipeline_stages_split_layers_and_vocabulary(models):
    m = models["llama-3.1-8b"]
    assert kv_bytes_per_token_per_rank(m, pp=2) == 16 * 2 * 8 * 128 * 2
    counts = param_counts(m)
    per_stage = (counts.linear / 2 + counts.norms / 2 + counts.embedding) * 2  # embedding == lm_head size
    assert weight_bytes_per_rank(m, pp=2) == int(per_stage)


def test_activation_peak_is_the_step_graphs_live_peak(models):
    from flowc.compiler.model.step_graph import lower_bound, step_buffers

    m = models["llama-3.1-8b"]
    peak = activation_peak_bytes(m, 1, 8192, 256)
    assert peak == lower_bound(step_buffers(m, 1, 8192, 256))
    # at least the residual stream, one normalized copy and the fp32 logits of the sampled rows
    assert peak >= 8192 * 2 * 4096 * 2 + 256 * 128256 * 4
    moe = models["mixtral-8x7b"]  # top-2 routing doubles the per-assignment tensors
    assert activation_peak_bytes(moe, 1, 8192, 256) > activation_peak_bytes(models["llama-3.1-8b"], 1, 8192, 256)


def test_budget_llama_8b_on_h100(models):
    m = models["llama-3.1-8b"]
    budget = memory_budget(m, 80 * GiB)
    assert budget.usable == int(80 * GiB * 0.9)
    assert budget.reserve == runtime_reserve_bytes(1) == GiB + 512 * 2**20
    kv = budget.usable - budget.weights - budget.activations - budget.reserve
    assert budget.kv == kv
    assert budget.kv_blocks == kv // (131_072 * 16)
    assert budget.kv_tokens == budget.kv_blocks * 16
    categories = budget.by_category()
    assert sum(categories.values()) == 80 * GiB
    assert categories["weights"] == weight_bytes(m)  # one GPU holds everything at tp 1


def test_budget_that_does_not_fit(models):
    budget = memory_budget(models["llama-3.1-70b"], 80 * GiB, tp=1)
    assert not budget.fits and budget.kv < 0 and budget.kv_tokens == 0
