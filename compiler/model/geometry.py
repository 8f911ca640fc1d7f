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
        kv = (m.hidden * (a.kv_lora_rank + a.qk_rope_head_dim)
              + a.kv_lora_rank * m.heads * (a.qk_nope_head_dim + a.v_head_dim))
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
    return kv_bytes_per_token_per_rank(m)


# ---------------------------------------------------------------------------------- per rank

ACTIVATION_BYTES = 2  # activations in bf16
LOGIT_BYTES = 4  # logits in fp32


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def kv_heads_per_rank(m: Model, tp: int) -> int:
    """KV heads a TP rank holds: a share of them, or one replicated head when tp > kv_heads."""
    return max(1, _ceil_div(m.kv_heads, tp))


@dataclass(frozen=True)
class RankShape:
    """One TP rank's share of every layer of a tp-way instance (ep-way for routed experts): the
    shapes the cost model times, the step graph sizes its buffers by and the memory arithmetic
    counts. Heads, FFN columns and the vocabulary split over tp (model/parallelism.py says
    which degrees split them evenly); KV heads split, or one is replicated per rank when
    tp > kv_heads; MLA's latent projections and cache are replicated on every rank.

    Routed experts: G = max(tp, ep) ranks hold them, experts / ep whole experts per group of
    G / ep ranks, each expert's FFN split G / ep ways (ep 1: every expert split over tp)."""

    heads: int
    kv_heads: int
    ffn: int  # dense MLP columns
    shared_ffn: int  # the shared experts' columns
    expert_ffn: int  # columns of one routed expert on a rank
    experts: float  # routed experts per group of ranks
    expert_ranks: int  # G: the ranks that hold the routed experts
    vocab: int  # vocabulary rows, padded: ceil(vocab / tp)
    # attention projections of one layer, by op name: (output features, input features)
    projections: dict[str, tuple[int, int]]
    kv_width: int  # KV-cache elements per token and layer

    @property
    def q_width(self) -> int:
        """Query features of one layer's attention (heads x the q/k head width)."""
        return self.projections["o_proj"][1]


def rank_shape(m: Model, tp: int = 1, ep: int = 1) -> RankShape:
    h, hidden = m.heads // tp, m.hidden
    if m.mla is not None:
        a = m.mla
        qk, latent = a.qk_nope_head_dim + a.qk_rope_head_dim, a.kv_lora_rank + a.qk_rope_head_dim
        if a.q_lora_rank:  # q_a and kv_a fused, replicated on every rank; q_b split by heads
            projections = {"qkv_a_proj": (a.q_lora_rank + latent, hidden), "q_b_proj": (h * qk, a.q_lora_rank)}
        else:
            projections = {"q_proj": (h * qk, hidden), "kv_a_proj": (latent, hidden)}
        projections["kv_b_proj"] = (h * (a.qk_nope_head_dim + a.v_head_dim), a.kv_lora_rank)
        projections["o_proj"] = (hidden, h * a.v_head_dim)
        kv, kv_width = kv_heads_per_rank(m, tp), latent
    else:
        kv, d = kv_heads_per_rank(m, tp), m.head_dim
        projections = {"qkv_proj": ((h + 2 * kv) * d, hidden), "o_proj": (hidden, h * d)}
        kv_width = 2 * kv * d
    e = m.moe
    groups = max(tp, ep)
    return RankShape(heads=h, kv_heads=kv, ffn=m.ffn // tp,
                     shared_ffn=e.shared_experts * e.expert_ffn // tp if e is not None else 0,
                     expert_ffn=e.expert_ffn * ep // groups if e is not None else 0,
                     experts=e.experts / ep if e is not None else 0.0, expert_ranks=groups,
                     vocab=_ceil_div(m.vocab, tp), projections=projections, kv_width=kv_width)


def _kv_replication(m: Model, tp: int) -> float:
    """Parameters of one layer's K and V projections a rank holds beyond its 1/tp share: each
    keeps kv_heads_per_rank heads, not kv_heads / tp (none for MLA, whose latent is replicated
    as a whole and counted with it)."""
    if m.mla is not None:
        return 0.0
    return 2 * m.hidden * m.head_dim * (kv_heads_per_rank(m, tp) - m.kv_heads / tp)


def weight_bytes_per_rank(m: Model, tp: int = 1, pp: int = 1) -> int:
    """Weights on the fullest GPU of a TP x PP instance. Linear layers and the vocabulary are
    split over TP (KV projections replicate when tp > kv_heads); layers are split evenly over
    PP, the first stage holding the embedding and the last the LM head. Experts split over the
    TP group whatever the EP degree (EP moves whole experts instead of slicing each)."""
    counts = param_counts(m)
    linear_bytes = DTYPE_BYTES[m.weights]
    other_bytes = max(linear_bytes, 2.0)
    layer_linear = (counts.linear / tp + m.layers * _kv_replication(m, tp)) / pp
    layer_other = (counts.router + counts.norms) / pp
    vocab = (counts.embedding + counts.lm_head) / tp if pp == 1 else max(counts.embedding, counts.lm_head) / tp
    return int(layer_linear * linear_bytes + (layer_other + vocab) * other_bytes)


def layer_weight_bytes(m: Model, tp: int = 1) -> tuple[float, float, float]:
    """(non-expert bytes of a dense layer, of an MoE layer, routed-expert bytes of an MoE
    layer) on one TP rank, counted as `weight_bytes_per_rank` counts them: what the offload
    planner places layer by layer."""
    lin = DTYPE_BYTES[m.weights]
    other = max(lin, 2.0)
    attn, attn_norms = _attention_params(m)
    base = (attn / tp + _kv_replication(m, tp)) * lin + (2 * m.hidden + attn_norms) * other
    dense = base + _mlp_params(m, m.ffn) / tp * lin
    if m.moe is None:
        return dense, dense, 0.0
    e = m.moe
    router = m.hidden * e.experts + (e.experts if m.architecture == "deepseek_v3" else 0)
    moe = base + e.shared_experts * _mlp_params(m, e.expert_ffn) / tp * lin + router * other
    experts = e.experts * _mlp_params(m, e.expert_ffn) / tp * lin
    return dense, moe, experts


def kv_bytes_per_token_per_rank(m: Model, tp: int = 1, pp: int = 1) -> int:
    """KV-cache bytes one GPU stores per token: its layers, its share of KV heads. MLA's
    compressed latent is not split by heads, so every TP rank keeps it whole."""
    return int(_ceil_div(m.layers, pp) * rank_shape(m, tp).kv_width * DTYPE_BYTES[m.kv])
