"""The cost model: how long one engine iteration takes on one pipeline stage of a TP group.

`CostModel(model, gpu, link, parallelism)` builds a model's iteration from the operators of
`model/operators.py` (timed rooflines fitted on measured kernels) over the per-rank shapes of
`geometry.rank_shape`, and adds the GPU's engine overheads; this is what the simulator calls.
`StreamedCost` adds the time offloaded weights take to stream in. Importing this module is
cheap (no numpy); the calibration file is read on first use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from flowc.compiler import spec
from flowc.compiler.model.engines import engine_profile
from flowc.compiler.model.geometry import ACTIVATION_BYTES, kv_bytes_per_token, rank_shape
from flowc.compiler.model.operators import (
    GENERIC_DECODE,
    GENERIC_PREFILL,
    causal_pairs,
    decode_body,
    operators,
    prefill_body,
)
from flowc.compiler.spec import DTYPE_BYTES

__all__ = ["CostModel", "StreamedCost", "Parallelism", "FAMILIES"]

# Breakdown families, in the order `CostModel.breakdown` reports them.
FAMILIES = ("gemm", "moe", "attention_prefill", "attention_decode", "elementwise", "embedding", "lm_head",
            "tp_allreduce", "ep_alltoall", "overhead")


# ----------------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class Parallelism:
    tp: int = 1
    pp: int = 1
    ep: int = 1


# Token grid for step_time: exact nodes up to _EXACT, then _PER_OCTAVE log-spaced nodes per
# doubling up to _TOP tokens, linear interpolation in between (< 0.1% off the exact sum).
_EXACT = 64
_PER_OCTAVE = 16
_TOP = 1 << 22


class CostModel:
    """Seconds of one engine iteration on one pipeline stage of a TP group (what the simulator asks).

    Work split and conventions (per GPU of the stage, i.e. per TP rank):
    * Layers, embedding and LM head are all split evenly over the pp stages: a stage is charged
      layers/pp layers (dense and MoE layers in the model's proportion) plus 1/pp of the
      embedding and LM head. Summed over stages this is the model's iteration exactly (request
      latency is right); the real last stage is slower by (1 - 1/pp) of the LM head.
    * TP: heads, FFN columns and vocabulary split over tp; KV heads split, or one replicated
      per rank when tp > kv_heads (geometry.rank_shape, as the step graph and memory count);
      MLA's latent projections and cache are replicated. Two all-reduces of the hidden state
      per layer (after attention and after the MLP/MoE), one after the vocab-parallel
      embedding, and a gather of the logits.
    * MoE (G = max(tp, ep) GPUs hold the experts: E/ep whole experts per group of G/ep ranks,
      each expert's FFN split G/ep ways). With ep <= tp the tokens are already on every rank
      (TP attention): each rank runs its experts on the tokens routed to them and the layer's
      all-reduce combines them, no all-to-all (vLLM/SGLang EP without attention DP). With
      ep > tp the stage is one of ep/tp attention data-parallel groups, all with this step's
      load: tokens are dispatched to and combined from their experts by two all-to-alls per
      layer over `intra_link`. Routing is balanced; the expected number of experts hit by T
      tokens is E (1 - (1 - top_k/E)^T), and only their weights are read.
    * MLA (DeepSeek): prefill attention in the decompressed form (MHA over h heads, q/k width
      qk_nope + qk_rope, v width v_head_dim; the latents of the new tokens are expanded by the
      kv_b projection); decode in the absorbed form over the cached latent of width
      kv_lora + qk_rope: 2 h (kv_lora + qk_rope + kv_lora) FLOPs per (head, key) for scores and
      the latent-weighted sum, and (kv_lora + qk_rope) x kv bytes read per key. The absorbed
      W_UK / W_UV products cost what the kv_b projection does (2 h kv_lora (nope + v) FLOPs per
      token), so every token is charged the kv_b GEMM. Past-context latents re-expanded by
      later prefill chunks are not counted.
    * LM head: logits only for `decode_seqs + (1 if prefill_attn_pairs else 0)` rows (the
      decodes and, approximately, one finishing prefill); the final norm runs on all tokens.
    * prefill_attn_pairs is the causal count: a chunk of q new tokens after c cached ones has
      q c + q (q + 1) / 2 pairs (`prefill_pairs` computes it, with the sliding window).
      decode_kv_tokens counts keys read, new token included, each capped at the sliding window
      (`decode_keys`).
    * Attention runs one kernel per layer for the whole batch: its floor is charged once per
      layer, prefill and decode bodies add up.
    * TP/EP collectives use `intra_link`; pipeline hops and KV transfers use `inter_link` when
      given, else `intra_link`.
    """

    def __init__(self, model: spec.Model, gpu: spec.GPU, intra_link: spec.Link, *,
                 parallelism: Parallelism = Parallelism(), inter_link: Optional[spec.Link] = None,
                 engine: Optional[str] = None):
        self.model, self.gpu, self.intra_link, self.inter_link = model, gpu, intra_link, inter_link
        self.parallelism = p = parallelism
        if min(p.tp, p.pp, p.ep) < 1:
            raise ValueError(f"parallelism degrees must be >= 1, got {p}")
        self.engine = profile = engine_profile(engine)
        self.ops = ops = operators(gpu, profile.kernels)
        self.calibrated = ops.calibrated
        self.calibration_source = ops.calibration_source
        m = model
        tp = p.tp
        self._hop_link = inter_link or intra_link

        # ---- shapes per rank (geometry.rank_shape: what the step graph and memory count too)
        self.rank = r = rank_shape(m, tp, p.ep)
        self._wmode = ops.gemm_mode(m.weights, block_scaled=m.architecture == "deepseek_v3")
        self._bf16 = ops.gemm_mode("bf16")
        kvb = DTYPE_BYTES[m.kv]
        self._layer_share = m.layers / p.pp
        # engine time beyond the kernels: per step and layer, per sequence, per token (of the step,
        # and in every layer); the GPU's own (measured by `flowc calibrate`), else the engine's
        o = gpu.overheads or profile.overheads
        self._overhead = (o.get("step", 0.0) + o.get("layer", 0.0) * self._layer_share, o.get("sequence", 0.0),
                          o.get("token", 0.0) + o.get("layer_token", 0.0) * self._layer_share)
        self.wake_time = o.get("wake", 0.0)
        self.request_time = o.get("request", 0.0)
        if m.moe is not None:
            self._moe_share = (m.layers - m.moe.dense_layers) / p.pp
            self._dense_share = m.moe.dense_layers / p.pp
        else:
            self._moe_share, self._dense_share = 0.0, self._layer_share

        # projections of every layer: (n, k) at the weight dtype; m = tokens
        self._proj = list(r.projections.values())
        hr = r.heads
        self._kv_write_per_token = r.kv_width * kvb
        if m.mla is not None:
            a = m.mla
            qk = a.qk_nope_head_dim + a.qk_rope_head_dim
            # attention counts: prefill decompressed (MHA over h heads), decode absorbed over the latent
            self._pf_dims = (hr, hr, qk, a.v_head_dim)  # heads, kv heads, dqk, dv
            latent = r.kv_width
            self._dec_flops_per_key = 2.0 * hr * (latent + a.kv_lora_rank)
            self._dec_bytes_per_key = latent * kvb
            self._dec_bytes_per_seq = 4.0 * hr * latent  # q and o in latent space, bf16
            self._dec_units_per_seq = 1.0
            self._rope_width = (hr + 1) * a.qk_rope_head_dim
            self._extra_norm_width = (a.q_lora_rank or 0) + a.kv_lora_rank
        else:
            d = m.head_dim
            self._pf_dims = (hr, r.kv_heads, d, d)
            self._dec_flops_per_key = 4.0 * hr * d
            self._dec_bytes_per_key = r.kv_width * kvb
            self._dec_bytes_per_seq = 4.0 * hr * d
            self._dec_units_per_seq = float(r.kv_heads)
            self._rope_width = (hr + r.kv_heads) * d
            self._extra_norm_width = 0
        self._kv_bytes = kvb
        self._attn_peak = ops.attn_peak(m.kv)
        self._pf_curve = ops.fit("attention_prefill", m.kv, GENERIC_PREFILL)
        self._dec_curve = ops.fit("attention_decode", m.kv, GENERIC_DECODE)

        # caches
        self._tok_cache: dict[int, float] = {}
        self._lm_cache: dict[int, float] = {}
        self._nodes: dict[int, dict[str, float]] = {}

    # ------------------------------------------------------------------ token-dependent work

    def _token_ops(self, T: float) -> list[tuple[str, float, float, float]]:
        """(family, seconds, FLOPs, bytes) of everything in the stage whose cost depends only on
        the step's token count T: projections, MLPs and MoE, elementwise kernels, the embedding,
        the final norm and the TP/EP collectives; layer shares already applied."""
        m, ops, p = self.model, self.ops, self.parallelism
        out: list[tuple[str, float, float, float]] = []
        if T <= 0:
            return out
        ab = ACTIVATION_BYTES
        wm = self._wmode

        def gemm(family: str, share: float, n: float, k: float, mode=wm, rows: float = T, groups: float = 1.0):
            if share <= 0 or rows <= 0:
                return
            f, b = ops.gemm_counts(mode, rows, n, k, groups)
            out.append((family, share * ops.gemm_mode_time(mode, rows, n, k, groups), share * f, share * b))

        def ew(family: str, share: float, nbytes: float, op: str):
            if share > 0 and nbytes > 0:
                out.append((family, share * ops.elementwise_time(nbytes, op), 0.0, share * nbytes))

        L = self._layer_share
        for n, k in self._proj:
            gemm("gemm", L, n, k)
        # dense MLPs
        r = self.rank
        ffn_r = r.ffn
        if m.mlp == "gated":
            gemm("gemm", self._dense_share, 2 * ffn_r, m.hidden)
            act_bytes = 3 * ffn_r * ab
        else:
            gemm("gemm", self._dense_share, ffn_r, m.hidden)
            act_bytes = 2 * ffn_r * ab
        gemm("gemm", self._dense_share, m.hidden, ffn_r)
        ew("elementwise", self._dense_share, T * act_bytes, "act")
        # MoE layers
        if m.moe is not None and self._moe_share > 0:
            e, S = m.moe, self._moe_share
            gemm("moe", S, e.experts, m.hidden, mode=self._bf16)  # router, replicated, 16-bit
            group_tokens = T * r.expert_ranks / p.tp
            active = r.experts * (1.0 - (1.0 - e.top_k / e.experts) ** group_tokens)
            rows = group_tokens * e.top_k / p.ep  # assignments landing on this rank's experts
            fr = r.expert_ffn
            gemm("moe", S, 2 * fr, m.hidden, rows=rows, groups=active)
            gemm("moe", S, m.hidden, fr, rows=rows, groups=active)
            ew("elementwise", S, rows * 3 * fr * ab, "act")
            if e.shared_experts:
                sf = r.shared_ffn
                gemm("moe", S, 2 * sf, m.hidden)
                gemm("moe", S, m.hidden, sf)
                ew("elementwise", S, T * 3 * sf * ab, "act")
            if p.ep > p.tp:
                buf = T * e.top_k * m.hidden * ab / p.tp
                t = 2 * ops.alltoall_time(buf, p.ep, self.intra_link)
                out.append(("ep_alltoall", S * t, 0.0, 0.0))
        # elementwise of every layer: fused add+norm(s), rope, KV-cache write, MLA's latent norms
        norms = 1 if m.architecture == "gptj" else 2
        ew("elementwise", L * norms, T * 4 * m.hidden * ab, "norm")
        ew("elementwise", L, T * 2 * self._rope_width * ab, "rope")
        ew("elementwise", L, T * self._kv_write_per_token, "add")
        if self._extra_norm_width:
            ew("elementwise", L, T * 2 * self._extra_norm_width * ab, "norm")
        # TP all-reduces: two per layer
        if p.tp > 1:
            t = ops.allreduce_time(T * m.hidden * ab, p.tp, self.intra_link)
            out.append(("tp_allreduce", 2 * L * t, 0.0, 0.0))
        # embedding (vocab-parallel gather + all-reduce) and final norm, 1/pp of them
        share = 1.0 / p.pp
        ew("embedding", share, T * 2 * m.hidden * ab, "emb")
        if p.tp > 1:
            out.append(("embedding", share * ops.allreduce_time(T * m.hidden * ab, p.tp, self.intra_link), 0.0, 0.0))
        ew("elementwise", share, T * 4 * m.hidden * ab, "norm")
        return out

    def _lm_ops(self, rows: float) -> list[tuple[str, float, float, float]]:
        """LM head (16-bit, vocab split over TP) and the logits gather, 1/pp of them."""
        if rows <= 0:
            return []
        m, ops, p = self.model, self.ops, self.parallelism
        share = 1.0 / p.pp
        n = self.rank.vocab
        f, b = ops.gemm_counts(self._bf16, rows, n, m.hidden)
        out = [("lm_head", share * ops.gemm_mode_time(self._bf16, rows, n, m.hidden), share * f, share * b)]
        if p.tp > 1:
            out.append(("lm_head", share * ops.allgather_time(rows * m.vocab * ACTIVATION_BYTES, p.tp,
                                                              self.intra_link), 0.0, 0.0))
        return out

    def _node(self, i: int) -> dict[str, float]:
        """Per-family seconds at grid node i (lazily computed)."""
        node = self._nodes.get(i)
        if node is None:
            node = dict.fromkeys(FAMILIES, 0.0)
            for family, t, _, _ in self._token_ops(self._node_tokens(i)):
                node[family] += t
            node["_total"] = sum(node[f] for f in FAMILIES)
            self._nodes[i] = node
        return node

    @staticmethod
    def _node_tokens(i: int) -> float:
        return float(i) if i <= _EXACT else _EXACT * 2.0 ** ((i - _EXACT) / _PER_OCTAVE)

    def _token_families(self, tokens: int) -> dict[str, float]:
        if tokens <= _EXACT:
            return self._node(tokens)
        if tokens >= _TOP:
            out = dict.fromkeys(FAMILIES, 0.0)
            for family, t, _, _ in self._token_ops(tokens):
                out[family] += t
            out["_total"] = sum(out[f] for f in FAMILIES)
            return out
        x = _EXACT + _PER_OCTAVE * math.log2(tokens / _EXACT)
        i = int(x)
        lo, hi = self._node(i), self._node(i + 1)
        t0, t1 = self._node_tokens(i), self._node_tokens(i + 1)
        w = (tokens - t0) / (t1 - t0)
        return {f: lo[f] + w * (hi[f] - lo[f]) for f in lo}

    def _tok_time(self, tokens: int) -> float:
        t = self._token_families(tokens)["_total"]
        self._tok_cache[tokens] = t
        return t

    def _lm_time(self, rows: int) -> float:
        t = sum(x[1] for x in self._lm_ops(rows))
        self._lm_cache[rows] = t
        return t

    # ----------------------------------------------------------------------------- attention

    def _attention(self, prefill_tokens: int, pairs: int, seqs: int, kv_tokens: int) -> tuple[float, float]:
        """(prefill seconds, decode seconds) of the stage's attention; the kernel floor is charged
        once per layer, to decode when there is any, else to prefill."""
        pf = dec = 0.0
        if pairs > 0:
            heads, kvh, dqk, dv = self._pf_dims
            pf = prefill_body(self._pf_curve, prefill_tokens, pairs, heads, kvh, dqk, dv, self._kv_bytes,
                              self._attn_peak, self.ops.bw)
        if seqs > 0:
            dec = decode_body(self._dec_curve, seqs * self._dec_units_per_seq, self._dec_flops_per_key * kv_tokens,
                              self._dec_bytes_per_key * kv_tokens + self._dec_bytes_per_seq * seqs,
                              self._attn_peak, self.ops.bw) + self._dec_curve["t0"]
        elif pairs > 0:
            pf += self._pf_curve["t0"]
        L = self._layer_share
        return L * pf, L * dec

    # ---------------------------------------------------------------------------- public API

    def step_time(self, tokens: int, prefill_attn_pairs: int, decode_seqs: int, decode_kv_tokens: int) -> float:
        """Seconds for ONE pipeline stage (see the class docstring for the split) to run one engine
        iteration on its TP group. tokens: all tokens of the step (prefill chunks + one per
        decoding sequence); prefill_attn_pairs: causal (query, key) pairs of the prefill chunks;
        decode_seqs, decode_kv_tokens: decoding sequences and the keys they read in all.
        O(1): token-only work comes from a lazily filled grid, attention is a closed form."""
        if tokens <= 0:
            return 0.0
        t = self._tok_cache.get(tokens)
        if t is None:
            t = self._tok_time(tokens)
        rows = decode_seqs + 1 if prefill_attn_pairs else decode_seqs
        if rows:
            lm = self._lm_cache.get(rows)
            t += lm if lm is not None else self._lm_time(rows)
        # attention, inlined from _attention for speed
        a = 0.0
        if prefill_attn_pairs > 0:
            c = self._pf_curve
            q = tokens - decode_seqs
            if q < 1:
                q = 1
            heads, kvh, dqk, dv = self._pf_dims
            a = prefill_body(c, q, prefill_attn_pairs, heads, kvh, dqk, dv, self._kv_bytes, self._attn_peak,
                             self.ops.bw)
            if not decode_seqs:
                a += c["t0"]
        if decode_seqs > 0:
            c = self._dec_curve
            a += c["t0"] + decode_body(c, decode_seqs * self._dec_units_per_seq,
                                       self._dec_flops_per_key * decode_kv_tokens,
                                       self._dec_bytes_per_key * decode_kv_tokens
                                       + self._dec_bytes_per_seq * decode_seqs, self._attn_peak, self.ops.bw)
        o_step, o_seq, o_tok = self._overhead
        return t + a * self._layer_share + o_step + o_seq * rows + o_tok * tokens

    def breakdown(self, tokens: int, prefill_attn_pairs: int, decode_seqs: int,
                  decode_kv_tokens: int) -> dict[str, float]:
        """Seconds per operator family (FAMILIES) for the same step; sums to step_time."""
        out = dict.fromkeys(FAMILIES, 0.0)
        if tokens <= 0:
            return out
        fam = self._token_families(tokens)
        for f in FAMILIES:
            out[f] += fam[f]
        rows = decode_seqs + 1 if prefill_attn_pairs else decode_seqs
        for family, t, _, _ in self._lm_ops(rows):
            out[family] += t
        pf, dec = self._attention(max(tokens - decode_seqs, 1), prefill_attn_pairs, decode_seqs, decode_kv_tokens)
        out["attention_prefill"] += pf
        out["attention_decode"] += dec
        o_step, o_seq, o_tok = self._overhead
        out["overhead"] = o_step + o_seq * rows + o_tok * tokens
        return out

    def _counts(self, tokens, prefill_attn_pairs, decode_seqs, decode_kv_tokens) -> tuple[float, float]:
        ops = self._token_ops(tokens) + self._lm_ops(decode_seqs + 1 if prefill_attn_pairs else decode_seqs)
        flops = sum(x[2] for x in ops)
        nbytes = sum(x[3] for x in ops)
        L = self._layer_share
        if prefill_attn_pairs > 0:
            heads, kvh, dqk, dv = self._pf_dims
            q = max(tokens - decode_seqs, 1)
            flops += L * 2.0 * heads * (dqk + dv) * prefill_attn_pairs
            nbytes += L * q * (2.0 * heads * (dqk + dv) + kvh * (dqk + dv) * self._kv_bytes)
        if decode_seqs > 0:
            flops += L * self._dec_flops_per_key * decode_kv_tokens
            nbytes += L * (self._dec_bytes_per_key * decode_kv_tokens + self._dec_bytes_per_seq * decode_seqs)
        return flops, nbytes

    def step_flops(self, tokens: int, prefill_attn_pairs: int, decode_seqs: int, decode_kv_tokens: int) -> float:
        """Matrix FLOPs one GPU of the stage executes in the step: GEMMs (2mnk; MoE experts at
        their routed rows) and attention (2 h (dqk + dv) per prefill pair, 4 h d per decode key,
        MLA absorbed: 2 h (2 kv_lora + rope) per key). Elementwise FLOPs are not counted;
        attention padding (`tile`) is not a FLOP."""
        return self._counts(tokens, prefill_attn_pairs, decode_seqs, decode_kv_tokens)[0]

    def step_bytes(self, tokens: int, prefill_attn_pairs: int, decode_seqs: int, decode_kv_tokens: int) -> float:
        """HBM bytes one GPU of the stage moves in the step, as the model counts them: weights of
        every GEMM read once (MoE: experts hit only), GEMM activations in and out, KV read by
        decode, Q/O/new K/V of prefill, and the elementwise kernels' reads and writes."""
        return self._counts(tokens, prefill_attn_pairs, decode_seqs, decode_kv_tokens)[1]

    def pp_hop_time(self, tokens: int) -> float:
        """Activation send between two pipeline stages: tokens x hidden x 2 bytes, every TP rank
        sending its copy in parallel over `inter_link` (else `intra_link`)."""
        if tokens <= 0 or self.parallelism.pp <= 1:
            return 0.0
        return self.ops.sendrecv_time(tokens * self.model.hidden * ACTIVATION_BYTES, self._hop_link)

    def kv_bytes_per_gpu(self, tokens: int) -> float:
        """KV-cache bytes of `tokens` tokens that one GPU of the instance sends in a transfer: the
        model's KV (geometry.kv_bytes_per_token) split over the tp x pp GPUs, which send in
        parallel (replicated KV heads and MLA's replicated latent are sent once)."""
        p = self.parallelism
        return tokens * kv_bytes_per_token(self.model) / (p.tp * p.pp)

    def kv_transfer_time(self, tokens: int, link: Optional[spec.Link] = None) -> float:
        """Moving `tokens` tokens of KV cache between instances (prefill -> decode): every GPU sends
        its share in parallel over `link` (default: inter_link, else intra_link)."""
        if tokens <= 0:
            return 0.0
        return self.ops.sendrecv_time(self.kv_bytes_per_gpu(tokens), link or self._hop_link)

    def host_transfer_time(self, nbytes: float, host_link: spec.Link) -> float:
        """Copy of `nbytes` between this GPU and host memory (KV offload) over `host_link`
        (the stdlib GPU names it: `spec.links[gpu.host_link]`)."""
        return self.ops.host_transfer_time(nbytes, host_link)

    def prefill_pairs(self, new_tokens: int, past_tokens: int = 0) -> int:
        """The causal pair count of one prefill chunk for this model (sliding window applied)."""
        return causal_pairs(new_tokens, past_tokens, self.model.sliding_window)

    def decode_keys(self, context: int) -> int:
        """Keys one decoding sequence reads with `context` tokens cached (new token included)."""
        w = self.model.sliding_window
        return min(context, w) if w else context


@dataclass(frozen=True)
class StreamedCost:
    """A step cost plus the seconds that streaming offloaded weights from host memory adds to
    every iteration (the offload LP's overhead, recorded in a plan as MemoryMap.offload_step_s).
    The overhead is constant per iteration: the streamed bytes do not depend on the batch, and
    a larger batch hides a little more of the transfer, so prefill-heavy iterations are charged
    slightly more than they take. Everything else is the base cost model's."""

    base: "CostModel"
    overhead: float

    def step_time(self, tokens: int, prefill_attn_pairs: int, decode_seqs: int, decode_kv_tokens: int) -> float:
        return self.base.step_time(tokens, prefill_attn_pairs, decode_seqs, decode_kv_tokens) + self.overhead

    def prefill_pairs(self, new_tokens: int, past_tokens: int) -> int:
        return self.base.prefill_pairs(new_tokens, past_tokens)

    @property
    def wake_time(self) -> float:
        return self.base.wake_time

    @property
    def request_time(self) -> float:
        return self.base.request_time

    def pp_hop_time(self, tokens: int) -> float:
        return self.base.pp_hop_time(tokens)

    def kv_transfer_time(self, tokens: int) -> float:
        return self.base.kv_transfer_time(tokens)
