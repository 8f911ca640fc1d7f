"""Model geometry: parameter counts, weight bytes and KV-cache bytes of a model, whole and on
one rank of a tensor x pipeline parallel instance.

One home for this arithmetic: the memory budget, the cost model, the step graph, the offload
planner, the verifier and the runtime read it. Parameter counts follow the Hugging Face
implementations of each architecture and are tested against published totals
(tests/test_memory.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from flowc.compiler.spec import DTYPE_BYTES, Model


@dataclass(frozen=True)
class ParamCounts:
    embedding: int
    lm_head: int
    attention: int  # all layers
    mlp: int  # dense MLPs and shared experts, all layers
    experts: int  # routed experts, all layers
    router: int
    norms: int

    @property
    def linear(self) -> int:
        """Parameters in the big matrices that quantization applies to."""
        return self.attention + self.mlp + self.experts

    @property
    def total(self) -> int:
        return self.embedding + self.lm_head + self.linear + self.router + self.norms

    def active(self, model: Model) -> int:
        """Parameters touched per token (MoE: top-k of the routed experts)."""
        if model.moe is None:
            return self.total
        return self.total - self.experts + self.experts * model.moe.top_k // model.moe.experts


def _attention_params(m: Model) -> tuple[int, int]:
    """(matrix parameters, norm parameters) of one attention block."""
    if m.mla is not None:
        a = m.mla
        qk_dim = a.qk_nope_head_dim + a.qk_rope_head_dim
        if a.q_lora_rank:
            q = m.hidden * a.q_lora_rank + a.q_lora_rank * m.heads * qk_dim
            q_norm = a.q_lora_rank
        else:
            q, q_norm = m.hidden * m.heads * qk_dim, 0
        kv = m.hidden * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank * m.heads * (a.qk_nope_head_dim + a.v_head_dim)
        out = m.heads * a.v_head_dim * m.hidden
        return q + kv + out, q_norm + a.kv_lora_rank
    q = m.hidden * m.heads * m.head_dim
    kv = 2 * m.hidden * m.kv_heads * m.head_dim
    out = m.heads * m.head_dim * m.hidden
    bias = (m.heads + 2 * m.kv_heads) * m.head_dim if m.attention_bias else 0
    qk_norm = 2 * m.head_dim if m.architecture == "qwen3_moe" else 0
    return q + kv + out + bias, qk_norm


def _mlp_params(m: Model, ffn: int) -> int:
    if m.mlp == "plain":  # up and down projections with biases (GPT-J)
        return 2 * m.hidden * ffn + ffn + m.hidden
    return 3 * m.hidden * ffn


def param_counts(m: Model) -> ParamCounts:
    attention, attention_norms = _attention_params(m)
    # GPT-J: one LayerNorm (weight + bias) per layer; others: two RMSNorms (weight only).
    layer_norms = 2 * m.hidden
    final_norm = 2 * m.hidden if m.architecture == "gptj" else m.hidden
    embedding = m.vocab * m.hidden
    lm_head = 0 if m.tied_embeddings else m.vocab * m.hidden + (m.vocab if m.architecture == "gptj" else 0)
    dense_layers = m.layers if m.moe is None else m.moe.dense_layers
    moe_layers = m.layers - dense_layers
    mlp = dense_layers * _mlp_params(m, m.ffn)
    experts = router = 0
    if m.moe is not None:
        e = m.moe
        mlp += moe_layers * e.shared_experts * _mlp_params(m, e.expert_ffn)
        experts = moe_layers * e.experts * _mlp_params(m, e.expert_ffn)
        # DeepSeek-V3's router also keeps a per-expert score-correction bias.
        router = moe_layers * (m.hidden * e.experts + (e.experts if m.architecture == "deepseek_v3" else 0))
    return ParamCounts(
        embedding=embedding,
        lm_head=lm_head,
        attention=m.layers * attention,
        mlp=mlp,
        experts=experts,
        router=router,
        norms=m.layers * (layer_norms + attention_norms) + final_norm,
    )


def weight_bytes(m: Model) -> int:
    """Bytes of all weights at the model's weight dtype. Quantization applies to the linear
    layers; embeddings, norms and the router stay in 16-bit (or the weight dtype, if wider)."""
    counts = param_counts(m)
    linear_bytes = DTYPE_BYTES[m.weights]
    other_bytes = max(linear_bytes, 2.0)
    return int(counts.linear * linear_bytes + (counts.total - counts.linear) * other_bytes)


def kv_bytes_per_token(m: Model) -> int:
    """KV-cache bytes per token across all layers (MLA caches the compressed latent)."""
    if m.mla is not None:
        per_layer = m.mla.kv_lora_rank + m.mla.qk_rope_head_dim
    else:
        per_layer = 2 * m.kv_heads * m.head_dim
    return int(m.layers * per_layer * DTYPE_BYTES[m.kv])


# ---------------------------------------------------------------------------------- per rank

ACTIVATION_BYTES = 2  # activations in bf16
LOGIT_BYTES = 4  # logits in fp32


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def kv_heads_per_rank(m: Model, tp: int) -> int:
    """KV heads a TP rank holds: a share of them, or one replicated head when tp > kv_heads."""
    return max(1, _ceil_div(m.kv_heads, tp))


def weight_bytes_per_rank(m: Model, tp: int = 1, pp: int = 1) -> int:
    """Weights on the fullest GPU of a TP x PP instance. Linear layers and the vocabulary are
    split over TP (KV projections replicate when tp > kv_heads); layers are split evenly over
    PP, the first stage holding the embedding and the last the LM head. Experts split over the
    TP group whatever the EP degree (EP moves whole experts instead of slicing each)."""
    counts = param_counts(m)
    linear_bytes = DTYPE_BYTES[m.weights]
    other_bytes = max(linear_bytes, 2.0)
    kv_proj = 0
    if m.mla is None:
        # K and V projections: each rank keeps kv_heads_per_rank heads, not kv_heads / tp.
        kv_proj = m.layers * 2 * m.hidden * m.head_dim * (kv_heads_per_rank(m, tp) - m.kv_heads / tp)
    layer_linear = (counts.linear / tp + kv_proj) / pp
    layer_other = (counts.router + counts.norms) / pp
    vocab = (counts.embedding + counts.lm_head) / tp if pp == 1 else max(counts.embedding, counts.lm_head) / tp
    return int(layer_linear * linear_bytes + (layer_other + vocab) * other_bytes)


def kv_bytes_per_token_per_rank(m: Model, tp: int = 1, pp: int = 1) -> int:
    """KV-cache bytes one GPU stores per token: its layers, its share of KV heads. MLA's
    compressed latent is not split by heads, so every TP rank keeps it whole."""
    layers = _ceil_div(m.layers, pp)
    if m.mla is not None:
        per_layer = m.mla.kv_lora_rank + m.mla.qk_rope_head_dim
    else:
        per_layer = 2 * kv_heads_per_rank(m, tp) * m.head_dim
    return int(layers * per_layer * DTYPE_BYTES[m.kv])
