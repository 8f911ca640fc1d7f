"""The step graph: every transient buffer of one engine step on one TP rank, with its
lifetime, and what any layout of them needs.

`step_buffers(model, tp, tokens, max_seqs)` builds the graph below; `lower_bound` is the peak
of live bytes (no layout is smaller; the memory model reserves it and optimize/arena.py packs
the buffers to it); `overlaps` says whether a layout puts two live buffers on the same bytes.

Lifetimes are in op-index units, [start, end): a buffer is written by op `start` and last read
by op `end - 1`. An op's inputs and outputs are therefore alive together and never share
bytes, except where the graph says an op works in place.

Alignment: every offset is a multiple of `ALIGNMENT` = 256 bytes (what cudaMalloc guarantees
and what vectorized kernels and cuBLAS/cuDNN expect of their operands). The solvers work in
256-byte units: each buffer takes ceil(size / 256) units, and sizes reported (the arena, the
lower bound, the greedy size) are in bytes, multiples of the alignment. The lower bound is
the peak of live *aligned* sizes, a valid bound for any aligned layout.

The step graph (Llama / Qwen2 / Mixtral / Qwen3-MoE / DeepSeek-V3 / GPT-J, one TP rank;
T = tokens of the step, S = min(max_seqs, T) rows that sample, h = heads / tp, kv = KV heads
per rank, d = head_dim, H = hidden, F = ffn / tp, V = vocab / tp (every width from geometry.rank_shape);
activations bf16 (geometry.ACTIVATION_BYTES), logits and sampling fp32, indices int64 unless
said):

  head   inputs          input_ids [T], positions [T], slot_mapping [T], logits_indices [S]
         embed           residual [T, H]   (vocab-parallel lookup, all-reduce in place)
  layer  input_norm      attn_in [T, H]
  (GQA)  qkv_proj        qkv [T, (h + 2 kv) d]   (bias, Qwen3 q/k-norm in place)
         rotary          in place on q and k inside qkv (no new buffer: vLLM's rotary kernel
                         is in place, and a copy would only add T (h + kv) d bytes)
         kv_cache_write  k, v into the paged cache (the cache is not in the arena)
         attention       attn_out [T, h d]   (one varlen kernel for prefill and decode rows)
  (MLA)  qkv_a_proj      qkv_a [T, q_lora + kv_lora + rope]  (fused q_a and kv_a; without
                         q_lora: q [T, h (nope + rope)] and kv_a [T, kv_lora + rope])
         q_a_norm        q_c [T, q_lora];  kv_a_norm: kv_c [T, kv_lora]
         q_b_proj        q [T, h (nope + rope)]
         rotary          in place on q's rope part and on k_pe inside qkv_a
         kv_cache_write  (kv_c, k_pe) into the latent cache
         kv_b_proj       kv [T, h (nope + v)]         prefill rows, decompressed form
         k_assemble      k [T, h (nope + rope)]       k_nope with k_pe broadcast to heads
         attention       attn_out [T, h v]            prefill rows
         q_absorb        q_latent [S, h (kv_lora + rope)]   decode rows, absorbed form
         attention_dec   o_latent [S, h kv_lora]
         v_up_proj       into attn_out's decode rows
         (prefill buffers are sized for T rows and decode buffers for S rows at once: a step
         has at most T tokens and S decodes, so this covers every mix; it overcounts by at
         most the S decode rows counted twice)
         o_proj          attn_proj [T, H]  (all-reduce in place)
         residual_add    residual += attn_proj (in place; the residual stream is one buffer)
         post_attn_norm  mlp_in [T, H]
  (dense) gate_up_proj   gate_up [T, 2F];  silu_mul: act [T, F];  down_proj: mlp_out [T, H]
         (GPT-J's plain MLP: up [T, F] -> gelu: act [T, F] -> down)
  (MoE)  shared experts  shared_gate_up [T, 2 Fs], shared_act [T, Fs], shared_out [T, H]
                         (DeepSeek; run first, as vLLM does, and held until the combine)
         router          router_logits [T, E]
         topk            topk_weights [T, k] fp32, topk_ids [T, k] int32
         permute         permuted [T k, H], permute_index [T k] int32, expert_offsets [E + 1]
                         int32 (tokens sorted by expert, for grouped GEMMs)
         expert_gate_up  expert_gate_up [T k, 2 Fe];  expert_silu_mul: expert_act [T k, Fe]
         expert_down     expert_out [T k, H]
         combine         mlp_out [T, H] = sum_k w expert_out (+ shared_out; all-reduce in place)
         Experts are split over the TP ranks (Fe = expert_ffn / tp), or with ep > 1 spread whole over
         them (Fe = expert_ffn x ep / tp; a rank's experts may get all T k rows), as
         geometry.rank_shape counts them.
         residual_add    residual += mlp_out
         (GPT-J: one norm feeds attention and the MLP in parallel; attn_proj waits for the
         MLP and both are added to the residual at once)
  tail   final_norm      final_hidden [T, H]
         select_rows     sample_hidden [S, H]   (the last token of each sequence)
         lm_head         logits [S, V] fp32     (temperature applied in place)
         softmax         probs [S, V] fp32      (vocab-parallel: row max and sum all-reduced)
         noise           exp_noise [S, V] fp32  (exponential race: argmax probs / q samples
                         from probs exactly, and shard by shard)
         argmax          shard_best [S] (fp32 value, int64 index)
         gather_best     all_best [tp S]; select: sampled [S] int64; to_host

Buffers that live across layers (the residual stream, positions, slot mapping) are included
once and live from their first write to the end of the layer section. Every other layer
buffer dies inside its layer, so one representative layer of each kind (DeepSeek: a dense
one and an MoE one) stands for all: the layers run one after the other and reuse the same
offsets. Not modelled: kernel-internal workspaces (cuBLAS, flash-attention split-KV scratch,
the MoE block-alignment padding), and logits of prompt tokens (no prompt logprobs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from flowc.compiler.model.geometry import ACTIVATION_BYTES, LOGIT_BYTES, RankShape, rank_shape
from flowc.compiler.spec import Model

ALIGNMENT = 256  # bytes: what cudaMalloc guarantees and vectorized kernels, cuBLAS and cuDNN expect
INDEX_BYTES = 8  # int64 token ids, positions, slot mapping, sampled ids
INT32_BYTES = 4  # top-k ids, permutation


@dataclass(frozen=True)
class Buffer:
    """A transient buffer: `size_bytes`, alive over ops [start, end)."""

    name: str
    size_bytes: int
    start: int
    end: int

    def __post_init__(self):
        if self.size_bytes < 0 or self.end <= self.start:
            raise ValueError(f"buffer {self.name}: size {self.size_bytes}, lifetime [{self.start}, {self.end})")

    def alive_with(self, other: "Buffer") -> bool:
        return self.start < other.end and other.start < self.end


class _Graph:
    """Records ops in order: each op's outputs start at its index, its inputs live through it."""

    def __init__(self):
        self.ops: list[str] = []
        self.size: dict[str, int] = {}
        self.start: dict[str, int] = {}
        self.end: dict[str, int] = {}

    def op(self, name: str, reads: tuple[str, ...] = (), writes: Optional[dict[str, float]] = None) -> int:
        i = len(self.ops)
        self.ops.append(name)
        for b in reads:
            if b not in self.start:
                raise KeyError(f"op {name} reads {b} before it is written")
            self.end[b] = max(self.end[b], i + 1)
        for b, nbytes in (writes or {}).items():
            if b in self.start:
                raise KeyError(f"op {name} writes {b} twice")
            self.size[b] = int(math.ceil(nbytes))
            self.start[b] = i
            self.end[b] = i + 1
        return i

    def extend(self, names: tuple[str, ...], until: int):
        """Keep buffers alive through op `until` (buffers every layer reads)."""
        for b in names:
            self.end[b] = max(self.end[b], until + 1)

    def buffers(self) -> list[Buffer]:
        return [Buffer(b, self.size[b], self.start[b], self.end[b]) for b in self.start if self.size[b] > 0]


def _attention_gqa(g: _Graph, m: Model, r: RankShape, T: int, p: str):
    ab = ACTIVATION_BYTES
    g.op(p + "qkv_proj", (p + "attn_in",), {p + "qkv": T * r.projections["qkv_proj"][0] * ab})
    g.op(p + "rotary", (p + "qkv", "positions"))
    g.op(p + "kv_cache_write", (p + "qkv", "slot_mapping"))
    g.op(p + "attention", (p + "qkv",), {p + "attn_out": T * r.q_width * ab})
    g.op(p + "o_proj", (p + "attn_out",), {p + "attn_proj": T * m.hidden * ab})


def _attention_mla(g: _Graph, m: Model, r: RankShape, T: int, S: int, p: str):
    ab, a, out = ACTIVATION_BYTES, m.mla, {name: n for name, (n, _) in r.projections.items()}
    h, lat, rope = r.heads, a.kv_lora_rank, a.qk_rope_head_dim
    if a.q_lora_rank:
        g.op(p + "qkv_a_proj", (p + "attn_in",), {p + "qkv_a": T * out["qkv_a_proj"] * ab})
        g.op(p + "q_a_norm", (p + "qkv_a",), {p + "q_c": T * a.q_lora_rank * ab})
        g.op(p + "kv_a_norm", (p + "qkv_a",), {p + "kv_c": T * lat * ab})
        g.op(p + "q_b_proj", (p + "q_c",), {p + "q": T * out["q_b_proj"] * ab})
    else:
        g.op(p + "q_proj", (p + "attn_in",), {p + "q": T * out["q_proj"] * ab})
        g.op(p + "kv_a_proj", (p + "attn_in",), {p + "qkv_a": T * out["kv_a_proj"] * ab})
        g.op(p + "kv_a_norm", (p + "qkv_a",), {p + "kv_c": T * lat * ab})
    g.op(p + "rotary", (p + "q", p + "qkv_a", "positions"))
    g.op(p + "kv_cache_write", (p + "kv_c", p + "qkv_a", "slot_mapping"))
    g.op(p + "kv_b_proj", (p + "kv_c",), {p + "kv": T * out["kv_b_proj"] * ab})
    g.op(p + "k_assemble", (p + "kv", p + "qkv_a"), {p + "k": T * h * (a.qk_nope_head_dim + rope) * ab})
    g.op(p + "attention", (p + "q", p + "k", p + "kv"), {p + "attn_out": T * r.q_width * ab})
    g.op(p + "q_absorb", (p + "q",), {p + "q_latent": S * h * (lat + rope) * ab})
    g.op(p + "attention_decode", (p + "q_latent",), {p + "o_latent": S * h * lat * ab})
    g.op(p + "v_up_proj", (p + "o_latent", p + "attn_out"))
    g.op(p + "o_proj", (p + "attn_out",), {p + "attn_proj": T * m.hidden * ab})


def _mlp(g: _Graph, m: Model, ffn_r: int, T: int, p: str, src: str, out: str, gated: bool = True):
    ab = ACTIVATION_BYTES
    if gated:
        g.op(p + "gate_up_proj", (src,), {p + "gate_up": T * 2 * ffn_r * ab})
        g.op(p + "silu_mul", (p + "gate_up",), {p + "act": T * ffn_r * ab})
    else:
        g.op(p + "up_proj", (src,), {p + "gate_up": T * ffn_r * ab})
        g.op(p + "gelu", (p + "gate_up",), {p + "act": T * ffn_r * ab})
    g.op(p + "down_proj", (p + "act",), {out: T * m.hidden * ab})


def _moe(g: _Graph, m: Model, r: RankShape, T: int, p: str):
    ab, e = ACTIVATION_BYTES, m.moe
    src = p + "mlp_in"
    reads_shared: tuple[str, ...] = ()
    if e.shared_experts:
        _mlp(g, m, r.shared_ffn, T, p + "shared_", src, p + "shared_out")
        reads_shared = (p + "shared_out",)
    g.op(p + "router", (src,), {p + "router_logits": T * e.experts * ab})
    g.op(p + "topk", (p + "router_logits",), {p + "topk_weights": T * e.top_k * LOGIT_BYTES,
                                              p + "topk_ids": T * e.top_k * INT32_BYTES})
    rows = T * e.top_k
    g.op(p + "permute", (src, p + "topk_ids"), {p + "permuted": rows * m.hidden * ab,
                                                p + "permute_index": rows * INT32_BYTES,
                                                p + "expert_offsets": (e.experts + 1) * INT32_BYTES})
    fe = r.expert_ffn
    g.op(p + "expert_gate_up", (p + "permuted", p + "expert_offsets"), {p + "expert_gate_up": rows * 2 * fe * ab})
    g.op(p + "expert_silu_mul", (p + "expert_gate_up",), {p + "expert_act": rows * fe * ab})
    g.op(p + "expert_down", (p + "expert_act", p + "expert_offsets"), {p + "expert_out": rows * m.hidden * ab})
    g.op(p + "combine", (p + "expert_out", p + "permute_index", p + "topk_weights") + reads_shared,
         {p + "mlp_out": T * m.hidden * ab})


def _layer(g: _Graph, m: Model, r: RankShape, T: int, S: int, p: str, moe: bool):
    ab = ACTIVATION_BYTES
    g.op(p + "input_norm", ("residual",), {p + "attn_in": T * m.hidden * ab})
    if m.mla is not None:
        _attention_mla(g, m, r, T, S, p)
    else:
        _attention_gqa(g, m, r, T, p)
    if m.architecture == "gptj":  # parallel attention and MLP from one norm
        _mlp(g, m, r.ffn, T, p, p + "attn_in", p + "mlp_out", gated=m.mlp == "gated")
        g.op(p + "residual_add", ("residual", p + "attn_proj", p + "mlp_out"))
        return
    g.op(p + "residual_add_attn", ("residual", p + "attn_proj"))
    g.op(p + "post_attention_norm", ("residual",), {p + "mlp_in": T * m.hidden * ab})
    if moe:
        _moe(g, m, r, T, p)
    else:
        _mlp(g, m, r.ffn, T, p, p + "mlp_in", p + "mlp_out", gated=m.mlp == "gated")
    g.op(p + "residual_add_mlp", ("residual", p + "mlp_out"))


def step_buffers(model: Model, tp: int, tokens: int, max_seqs: int, ep: int = 1) -> list[Buffer]:
    """The transient buffers of one engine step on one TP rank (the graph in the module
    docstring): `tokens` tokens in the step, up to `max_seqs` of them sampling, experts spread
    by `ep`."""
    if tp < 1 or tokens < 1 or max_seqs < 1 or ep < 1:
        raise ValueError(f"tp, tokens, max_seqs and ep must be >= 1 (got {tp}, {tokens}, {max_seqs}, {ep})")
    m, T = model, tokens
    S = min(max_seqs, tokens)
    ab = ACTIVATION_BYTES
    g = _Graph()
    g.op("inputs", (), {"input_ids": T * INDEX_BYTES, "positions": T * INDEX_BYTES,
                        "slot_mapping": T * INDEX_BYTES, "logits_indices": S * INDEX_BYTES})
    g.op("embed", ("input_ids",), {"residual": T * m.hidden * ab})
    if m.moe is None:
        kinds = [("layer.", False)]
    elif m.moe.dense_layers == 0:
        kinds = [("moe_layer.", True)]
    elif m.moe.dense_layers >= m.layers:
        kinds = [("layer.", False)]
    else:
        kinds = [("dense_layer.", False), ("moe_layer.", True)]
    r = rank_shape(m, tp, ep)
    for prefix, moe in kinds:
        _layer(g, m, r, T, S, prefix, moe)
    g.extend(("positions", "slot_mapping"), len(g.ops) - 1)
    V = r.vocab
    g.op("final_norm", ("residual",), {"final_hidden": T * m.hidden * ab})
    g.op("select_rows", ("final_hidden", "logits_indices"), {"sample_hidden": S * m.hidden * ab})
    g.op("lm_head", ("sample_hidden",), {"logits": S * V * LOGIT_BYTES})
    g.op("softmax", ("logits",), {"probs": S * V * LOGIT_BYTES})
    g.op("noise", (), {"exp_noise": S * V * LOGIT_BYTES})
    g.op("argmax", ("probs", "exp_noise"), {"shard_best": S * (LOGIT_BYTES + INDEX_BYTES)})
    g.op("gather_best", ("shard_best",), {"all_best": tp * S * (LOGIT_BYTES + INDEX_BYTES)})
    g.op("select", ("all_best",), {"sampled": S * INDEX_BYTES})
    g.op("to_host", ("sampled",))
    return g.buffers()


# --------------------------------------------------------------------------- bytes alive


def aligned_units(nbytes: int, alignment: int) -> int:
    return -(-nbytes // alignment)


def live_bytes(buffers: list[Buffer], alignment: int = ALIGNMENT) -> list[int]:
    """Aligned bytes alive at each op index 0 .. max end - 1."""
    horizon = max((b.end for b in buffers), default=0)
    live = [0] * (horizon + 1)
    for b in buffers:
        size = aligned_units(b.size_bytes, alignment) * alignment
        live[b.start] += size
        live[b.end] -= size
    out, acc = [], 0
    for t in range(horizon):
        acc += live[t]
        out.append(acc)
    return out


def lower_bound(buffers: list[Buffer], alignment: int = ALIGNMENT) -> int:
    """The peak of live (aligned) bytes over time: no layout can be smaller."""
    return max(live_bytes(buffers, alignment), default=0)


def overlaps(buffers: list[Buffer], offsets: dict[str, int]) -> list[tuple[str, str]]:
    """Pairs of buffers alive at the same time whose byte ranges intersect (empty: valid)."""
    bad = []
    for i, a in enumerate(buffers):
        for b in buffers[i + 1:]:
            if a.size_bytes and b.size_bytes and a.alive_with(b):
                oa, ob = offsets[a.name], offsets[b.name]
                if oa < ob + b.size_bytes and ob < oa + a.size_bytes:
                    bad.append((a.name, b.name))
    return bad


def layout_problems(model: Model, tp: int, tokens: int, max_seqs: int, offsets: dict[str, int],
                    sizes: dict[str, int], arena_bytes: int, ep: int = 1) -> list[str]:
    """Why a stated arena layout (each buffer's offset and size, the arena's bytes) cannot hold
    the step graph of `model` at `tp`, `tokens` and `max_seqs`; empty when it can. The layout's
    own sizes count, with the graph's lifetimes: a buffer the graph needs is missing or too
    small, a name the graph has not, a buffer outside the arena or off the alignment, two
    buffers alive together on the same bytes. The plan loader and the verifier both ask this."""
    buffers = step_buffers(model, tp, tokens, max_seqs, ep)
    needed = {b.name: b.size_bytes for b in buffers}
    found = []
    missing = [name for name in needed if name not in offsets or name not in sizes]
    if missing:
        found.append(f"no offset or size for {', '.join(missing[:5])}" + (" and more" if len(missing) > 5 else ""))
    unknown = sorted((set(offsets) | set(sizes)) - set(needed))
    if unknown:
        found.append(f"buffers the step graph does not have: {', '.join(unknown[:5])}")
    for name, size in needed.items():
        if name in sizes and sizes[name] < size:
            found.append(f"{name} gets {sizes[name]:,} B, the step needs {size:,} B")
    for name, offset in offsets.items():
        size = sizes.get(name, 0)
        if offset < 0 or size < 0 or offset + size > arena_bytes:
            found.append(f"{name} at bytes {offset:,} to {offset + size:,} is not inside the arena of "
                         f"{arena_bytes:,} B")
        elif offset % ALIGNMENT:
            found.append(f"{name} at byte {offset:,} is not aligned to {ALIGNMENT} B")
    if found:
        return found
    stated = [Buffer(b.name, sizes[b.name], b.start, b.end) for b in buffers]
    return [f"{a} and {b} are alive together and share bytes" for a, b in overlaps(stated, offsets)]
