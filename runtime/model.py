"""The decoder-only model, written once for Llama (GQA, scaled RoPE, Mistral's sliding
window), Qwen2 (QKV bias) and Mixtral (top-k routed experts), in plain torch.

The forward follows the step graph of `compiler/optimize/arena.py` op by op and takes every transient
buffer from the workspace by the graph's name (layer buffers under "layer." or, in MoE
models, "moe_layer."), writing into it with `out=`; a buffer is read only while the graph
keeps it alive, so an arena that reuses bytes between buffers with disjoint lifetimes is
safe. Every hot op goes through the `ops` namespace (`kernels.get_ops`).

Weights are stored as transformers stores them ([out, in]), this rank's shard only (see
`parallel.RankLayout`): the Q, K and V projections fused into one `qkv` matrix, gate and up
into `gate_up` (gate rows first), each expert's gate and up into `gate_up[e]`.
`weights.load_weights` fills them from a checkpoint, `weights.random_weights` at random.
With offloaded weights (`offload.py`), a layer's or the LM head's streamed parameters are views
of a staging slot that `streamer` fills around the unit, and an embedding table in host memory
(`host_embed`) is gathered there.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from .config import ModelConfig
from .kv_cache import KVCache
from .parallel import Parallel, RankLayout

if TYPE_CHECKING:
    from .offload import OffloadedWeights
    from .workspace import HeapWorkspace, Workspace

__all__ = ["StepInputs", "CausalLM"]


@dataclass
class StepInputs:
    """One step's batch (layouts in `kernels_torch`): T new tokens of B sequences, the rows
    of S of them whose next-token logits are wanted."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64, -1: do not cache
    block_tables: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32, cached prefix + new tokens
    query_start_loc: torch.Tensor  # [B + 1] int32
    logits_indices: torch.Tensor  # [S] int64, rows of the T tokens


@dataclass
class _Step:
    """What every layer of one forward reads besides its input."""

    inputs: StepInputs
    kv: KVCache
    workspace: Workspace | HeapWorkspace
    cos_sin: torch.Tensor


def _weight(*shape: int, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


def _disjoint(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two contiguous tensors share no byte."""
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 + a.nbytes <= b0 or b0 + b.nbytes <= a0


class _Module(nn.Module):
    """A part of the model: its config, rank layout, ops, collectives and buffer prefix."""

    def __init__(self, config: ModelConfig, layout: RankLayout, ops: SimpleNamespace, parallel: Parallel,
                 prefix: str, dtype: torch.dtype):
        super().__init__()
        self.config, self.layout, self.ops, self.parallel = config, layout, ops, parallel
        self.prefix, self.dtype = prefix, dtype

    def buffer(self, step: _Step, name: str, *shape: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return step.workspace.buffer(self.prefix + name, shape, dtype or self.dtype)


class Attention(_Module):
    """GQA self-attention over the paged cache: qkv (+ bias), rotary, cache write, attention,
    o_proj (row-parallel: all-reduced)."""

    def __init__(self, *args, device: torch.device):
        super().__init__(*args)
        c, lay = self.config, self.layout
        self.q_size, self.kv_size = len(lay.heads) * c.head_dim, len(lay.kv_heads) * c.head_dim
        width = self.q_size + 2 * self.kv_size
        self.qkv = _weight(width, c.hidden, dtype=self.dtype, device=device)
        self.qkv_bias = _weight(width, dtype=self.dtype, device=device) if c.attention_bias else None
        self.o = _weight(c.hidden, self.q_size, dtype=self.dtype, device=device)
        self.scale = c.head_dim ** -0.5  # as transformers computes it

    def forward(self, x: torch.Tensor, step: _Step, layer: int) -> torch.Tensor:
        T, d, inputs = x.shape[0], self.config.head_dim, step.inputs
        qkv = self.buffer(step, "qkv", T, self.qkv.shape[0])
        if self.qkv_bias is None:
            torch.mm(x, self.qkv.t(), out=qkv)
        else:
            torch.addmm(self.qkv_bias, x, self.qkv.t(), out=qkv)
        q = qkv[:, :self.q_size].view(T, -1, d)
        k = qkv[:, self.q_size:self.q_size + self.kv_size].view(T, -1, d)
        v = qkv[:, self.q_size + self.kv_size:].view(T, -1, d)
        self.ops.rotary(q, k, inputs.positions, step.cos_sin)
        k_cache, v_cache = step.kv.k(layer), step.kv.v(layer)
        self.ops.store_kv(k, v, k_cache, v_cache, inputs.slot_mapping)
        out = self.buffer(step, "attn_out", T, self.q_size)
        self.ops.paged_attention(q, k_cache, v_cache, inputs.block_tables, inputs.seq_lens, inputs.query_start_loc,
                                 self.scale, self.config.sliding_window, out=out.view(T, -1, d))
        proj = self.buffer(step, "attn_proj", T, self.config.hidden)
        torch.mm(out, self.o.t(), out=proj)
        return self.parallel.all_reduce(proj)


class MLP(_Module):
    """Gated MLP: gate_up (column-parallel), silu_and_mul, down (row-parallel: all-reduced)."""

    def __init__(self, *args, device: torch.device):
        super().__init__(*args)
        c, f = self.config, len(self.layout.ffn)
        self.gate_up = _weight(2 * f, c.hidden, dtype=self.dtype, device=device)
        self.down = _weight(c.hidden, f, dtype=self.dtype, device=device)

    def forward(self, x: torch.Tensor, step: _Step) -> torch.Tensor:
        T, f = x.shape[0], self.down.shape[1]
        gate_up = self.buffer(step, "gate_up", T, 2 * f)
        torch.mm(x, self.gate_up.t(), out=gate_up)
        act = self.buffer(step, "act", T, f)
        self.ops.silu_and_mul(gate_up, out=act)
        out = self.buffer(step, "mlp_out", T, self.config.hidden)
        torch.mm(act, self.down.t(), out=out)
        return self.parallel.all_reduce(out)


class MoE(_Module):
    """Top-k routed experts. The router is replicated; every rank holds a slice of expert_ffn of
    each of its experts (all of them at ep 1, E / ep with ep > 1), so the combined output is a
    partial sum, all-reduced. Tokens are permuted so that each expert's rows are contiguous,
    then one grouped GEMM (`moe_grouped_mm`) runs all of this rank's experts, reading their row
    offsets on the device: the layer makes no host sync."""

    def __init__(self, *args, device: torch.device):
        super().__init__(*args)
        c, f, held = self.config, len(self.layout.ffn), len(self.layout.experts)
        self.router = _weight(c.experts, c.hidden, dtype=self.dtype, device=device)  # every rank routes every token
        self.gate_up = _weight(held, 2 * f, c.hidden, dtype=self.dtype, device=device)
        self.down = _weight(held, c.hidden, f, dtype=self.dtype, device=device)

    def forward(self, x: torch.Tensor, step: _Step) -> torch.Tensor:
        c, T = self.config, x.shape[0]
        E, k, f = c.experts, c.top_k, self.down.shape[2]
        logits = self.buffer(step, "router_logits", T, E)
        torch.mm(x, self.router.t(), out=logits)
        weights, ids = self.ops.moe_topk(logits, k, c.renormalize_topk)
        # moe_topk has no out=: copy into the graph's buffers, which the later ops read.
        topk_weights = self.buffer(step, "topk_weights", T, k, dtype=torch.float32)
        topk_weights.copy_(weights)
        topk_ids = self.buffer(step, "topk_ids", T, k, dtype=torch.int32)
        topk_ids.copy_(ids)

        # permute: (token, choice) pairs sorted by expert; pair p is token p // k.
        flat_ids = topk_ids.view(-1)
        order = self.buffer(step, "permute_index", T * k, dtype=torch.int32)
        order.copy_(torch.argsort(flat_ids, stable=True))
        # expert e's rows start at the first sorted id >= e (not bincount, which syncs on CUDA)
        offsets = self.buffer(step, "expert_offsets", E + 1, dtype=torch.int32)
        experts = torch.arange(E + 1, dtype=torch.int32, device=x.device)
        torch.searchsorted(flat_ids[order], experts, out_int32=True, out=offsets)
        tokens = order // k
        permuted = self.buffer(step, "permuted", T * k, c.hidden)
        torch.index_select(x, 0, tokens, out=permuted)

        # The GEMMs write the rows of this rank's experts only: the other rows hold garbage (even
        # NaN) through silu_and_mul until the mask below zeroes them; their experts' ranks add
        # them in the all-reduce.
        held = self.layout.experts
        gate_up = self.buffer(step, "expert_gate_up", T * k, 2 * f)
        self.ops.moe_grouped_mm(permuted, self.gate_up, offsets, held.start, gate_up)
        act = self.buffer(step, "expert_act", T * k, f)
        self.ops.silu_and_mul(gate_up, out=act)
        expert_out = self.buffer(step, "expert_out", T * k, c.hidden)
        self.ops.moe_grouped_mm(act, self.down, offsets, held.start, expert_out)
        if len(held) < E:
            # sorted by expert, this rank's rows are one run, [offsets[first], offsets[last + 1])
            rows = torch.arange(T * k, device=x.device)
            mine = (rows >= offsets[held.start]) & (rows < offsets[held.stop])
            expert_out.masked_fill_(~mine.unsqueeze(1), 0)  # not a product: 0 * NaN is NaN

        # combine: weight each row in place (expert_out dies here), sum rows into their tokens.
        expert_out.mul_(topk_weights.view(-1)[order].unsqueeze(1))
        out = self.buffer(step, "mlp_out", T, c.hidden)
        out.zero_().index_add_(0, tokens, expert_out)
        return self.parallel.all_reduce(out)


class DecoderLayer(_Module):
    """Pre-norm block: residual += attn(norm(residual)); residual += mlp(norm(residual))."""

    def __init__(self, *args, device: torch.device):
        super().__init__(*args)
        hidden = self.config.hidden
        self.input_norm = _weight(hidden, dtype=self.dtype, device=device)
        self.post_attention_norm = _weight(hidden, dtype=self.dtype, device=device)
        self.attn = Attention(*args, device=device)
        self.mlp = (MoE if self.config.is_moe else MLP)(*args, device=device)

    def forward(self, residual: torch.Tensor, step: _Step, layer: int) -> None:
        """Advance the residual stream [T, H] in place through this layer."""
        eps, T, hidden = self.config.rms_norm_eps, residual.shape[0], self.config.hidden
        attn_in = self.buffer(step, "attn_in", T, hidden)
        self.ops.rms_norm(residual, self.input_norm, eps, out=attn_in)
        attn_proj = self.attn(attn_in, step, layer)
        mlp_in = self.buffer(step, "mlp_in", T, hidden)
        # The graph's residual_add_attn and post_attention_norm in one fused call, unless the
        # arena put attn_proj and mlp_in (disjoint lifetimes) on shared bytes: a fused kernel
        # would then overwrite rows of attn_proj it has yet to read.
        if _disjoint(attn_proj, mlp_in):
            self.ops.rms_norm(attn_proj, self.post_attention_norm, eps, residual=residual, out=mlp_in)
        else:
            residual.add_(attn_proj)
            self.ops.rms_norm(residual, self.post_attention_norm, eps, out=mlp_in)
        residual.add_(self.mlp(mlp_in, step))


class CausalLM(_Module):
    """This rank's part of the model: all of it at tp = pp = 1; otherwise its TP shard of the
    layers of its pipeline stage (`Parallel.layout`). The first stage embeds, the last one
    normalizes and produces logits."""

    def __init__(self, config: ModelConfig, ops: SimpleNamespace, parallel: Parallel = Parallel(),
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu"):
        device = torch.device(device)
        layout = parallel.layout(config)
        super().__init__(config, layout, ops, parallel, "", dtype)
        prefix = "moe_layer." if config.is_moe else "layer."
        args = (config, layout, ops, parallel, prefix, dtype)
        self.layers = nn.ModuleList(DecoderLayer(*args, device=device) for _ in layout.layers)
        vp, hidden = layout.vocab_padded, config.hidden
        # Padding rows (the last rank's tail of the vocabulary) stay zero.
        self.embed = nn.Parameter(torch.zeros(vp, hidden, dtype=dtype, device=device),
                                  requires_grad=False) if layout.first_stage else None
        self.norm = _weight(hidden, dtype=dtype, device=device) if layout.last_stage else None
        # The LM head: the embedding itself when tied and held here, else a matrix of its own
        # (a tied model's last pipeline stage loads a copy of the embedding into it).
        self.lm_head = None
        if layout.last_stage:
            shared = config.tied_embeddings and self.embed is not None
            self.lm_head = self.embed if shared else \
                nn.Parameter(torch.zeros(vp, hidden, dtype=dtype, device=device), requires_grad=False)
        self.device = device
        self.register_buffer("cos_sin", config.cos_sin_cache(config.max_context, device), persistent=False)
        # Offloaded weights (offload.OffloadedWeights): the embedding table in host memory, and
        # what fills each unit's streamed parameters before it runs.
        self.host_embed: Optional[torch.Tensor] = None
        self.streamer: Optional[OffloadedWeights] = None

    def init_random(self, seed: int = 0, std: float = 0.02) -> None:
        """Deterministic random weights (`weights.random_weights`): the same model for a seed
        whatever the TP / PP layout."""
        from .weights import random_weights  # weights.py maps checkpoint names onto this module

        random_weights(self, seed, std)

    def make_kv_cache(self, num_blocks: int, block_size: int, dtype: Optional[torch.dtype] = None) -> KVCache:
        """A cache for this rank's layers and KV heads (the model's dtype unless given)."""
        return KVCache(len(self.layers), num_blocks, block_size, len(self.layout.kv_heads), self.config.head_dim,
                       dtype or self.dtype, self.device)

    @torch.no_grad()
    def forward(self, inputs: StepInputs, kv: KVCache, workspace: Workspace | HeapWorkspace,
                hidden: Optional[torch.Tensor] = None,
                gather_logits: bool = True) -> torch.Tensor:
        """One step. First stage: embeds `inputs.input_ids`; later stages take `hidden` [T, H],
        the previous stage's residual stream (updated in place, so receive it into the
        workspace's "residual" buffer). Last stage: fp32 logits [S, vocab] of the rows
        `inputs.logits_indices`, gathered over the TP ranks; with gather_logits=False, this
        rank's shard [S, vocab_padded] (padding columns -inf). Other stages return the residual
        stream. Results may be workspace views, valid until the next step."""
        T = inputs.input_ids.shape[0]
        step = _Step(inputs, kv, workspace, self.cos_sin)
        if self.layout.first_stage:
            hidden = self.buffer(step, "residual", T, self.config.hidden)
            self._embed(inputs.input_ids, hidden)
        elif hidden is None:
            raise ValueError(f"pipeline stage {self.parallel.pp_rank} needs the previous stage's hidden states")
        for i, layer in enumerate(self.layers):
            with self._streamed(i):
                layer(hidden, step, i)
        if not self.layout.last_stage:
            return hidden
        with self._streamed(len(self.layers)):  # the LM head
            return self._logits(hidden, step, gather_logits)

    def _streamed(self, unit: int) -> AbstractContextManager:
        """Around a layer (its index) or the LM head (the number of layers): its streamed
        parameters are on the device inside."""
        return nullcontext() if self.streamer is None else self.streamer.unit(unit)

    def _embed(self, ids: torch.Tensor, out: torch.Tensor) -> None:
        """Vocab-parallel lookup: each rank fills the rows of the ids it owns, zeros the
        others, and the all-reduce assembles the full rows."""
        if self.parallel.tp_size == 1:
            self._gather(ids, out)
            return
        vocab = self.layout.vocab
        local = ids - vocab.start
        mine = (local >= 0) & (local < len(vocab))
        self._gather(local.clamp_(0, self.layout.vocab_padded - 1), out)
        out.masked_fill_(~mine.unsqueeze(1), 0)
        self.parallel.all_reduce(out)

    def _gather(self, rows: torch.Tensor, out: torch.Tensor) -> None:
        """out = the embedding's `rows`; a table in host memory is gathered there, so that only
        the step's rows cross the link."""
        if self.host_embed is None:
            torch.index_select(self.embed, 0, rows, out=out)
        else:
            out.copy_(torch.index_select(self.host_embed, 0, rows.cpu()))

    def _logits(self, residual: torch.Tensor, step: _Step, gather: bool) -> torch.Tensor:
        T, hidden, rows = residual.shape[0], self.config.hidden, step.inputs.logits_indices
        final = self.buffer(step, "final_hidden", T, hidden)
        self.ops.rms_norm(residual, self.norm, self.config.rms_norm_eps, out=final)
        sample = self.buffer(step, "sample_hidden", rows.shape[0], hidden)
        torch.index_select(final, 0, rows, out=sample)
        logits = self.buffer(step, "logits", rows.shape[0], self.layout.vocab_padded, dtype=torch.float32)
        # The product in the activation dtype (as transformers' lm_head), widened to fp32.
        if self.dtype == torch.float32:
            torch.mm(sample, self.lm_head.t(), out=logits)
        else:
            logits.copy_(torch.mm(sample, self.lm_head.t()))
        logits[:, len(self.layout.vocab):] = float("-inf")
        if not gather:
            return logits
        return self.parallel.all_gather(logits, dim=1)[:, :self.config.vocab]
