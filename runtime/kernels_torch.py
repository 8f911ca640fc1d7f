"""The torch reference of every hot op: the definition the Triton kernels are tested against,
and the fast path on CPU.

Shapes and layouts (shared with `kernels_triton.py`; see `kernels.py` for the interface):
  T tokens in the step, B sequences, h query heads, kv KV heads, d head_dim, H hidden.
  KV cache of one layer: `k_cache`, `v_cache` of shape [num_blocks, block_size, kv, d].
  A slot is `block * block_size + offset`; slot -1 means "no slot" (the token is skipped).
  `query_start_loc` [B + 1] int32: sequence b's new tokens are rows
  query_start_loc[b]:query_start_loc[b + 1] of q. `seq_lens` [B] int32: tokens of sequence b
  in the cache after this step (its cached prefix plus its new tokens), so its new tokens sit
  at positions seq_lens[b] - q_len .. seq_lens[b] - 1. `block_tables` [B, max_blocks] int32.
  MoE: R = T * top_k (token, expert) rows sorted by expert, E experts; `offsets` [E + 1] int32:
  expert e's rows are offsets[e]:offsets[e + 1].
Reductions (norms, softmax, attention) run in fp32 whatever the input dtype; results are cast
back to the input dtype, as Hugging Face transformers does.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["rms_norm", "rotary", "store_kv", "paged_attention", "silu_and_mul", "moe_topk", "moe_grouped_mm"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None,
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out = rms_norm(x (+ residual)) * weight. With `residual`, first residual += x in place
    (the fused add of the residual stream), then normalize the sum."""
    if residual is not None:
        residual.add_(x)
        x = residual
    x32 = x.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    if out is None:
        return weight * normed
    return torch.mul(weight, normed, out=out)


def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> None:
    """Rotate q [T, h, d] and k [T, kv, d] in place by their positions, neox style (the two
    halves of each head are the pair, as Llama and Qwen2 in transformers). `cos_sin`
    [max_positions, d] fp32 holds cos in its first d/2 columns and sin in the last d/2."""
    half = q.shape[-1] // 2
    cs = cos_sin[positions]
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    for x in (q, k):
        x1, x2 = x[..., :half].float(), x[..., half:].float()
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        x.copy_(rotated.to(x.dtype))


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write k, v [T, kv, d] into the paged caches at `slot_mapping` [T] (int64; -1 skips)."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    block_size = k_cache.shape[1]
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = k[keep].to(k_cache.dtype)
    v_cache[blocks, offsets] = v[keep].to(v_cache.dtype)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float,
                    sliding_window: Optional[int] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal attention of q [T, h, d] over each sequence's paged cache (which already holds
    this step's keys and values). One definition for prefill, decode and mixed batches.
    Sequences with one new token (decodes) are computed together, the others one by one."""
    if out is None:
        out = torch.empty_like(q)
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    q_lens = [starts[b + 1] - starts[b] for b in range(len(lens))]
    decodes = [b for b, n in enumerate(q_lens) if n == 1]
    if decodes:
        _attend_decodes(q, k_cache, v_cache, block_tables, [starts[b] for b in decodes], [lens[b] for b in decodes],
                        decodes, scale, sliding_window, out)
    for b, n in enumerate(q_lens):
        if n > 1:
            _attend_one(q, k_cache, v_cache, block_tables[b], starts[b], n, lens[b], scale, sliding_window, out)
    return out


def _grouped(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[..., h, d] -> [..., kv, h / kv, d]: the query heads that share each KV head (GQA)."""
    return x.reshape(*x.shape[:-2], kv_heads, x.shape[-2] // kv_heads, x.shape[-1])


def _attend_one(q, k_cache, v_cache, table, start: int, q_len: int, seq_len: int, scale: float,
                sliding_window: Optional[int], out: torch.Tensor) -> None:
    kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    blocks = table[:-(-seq_len // block_size)].long()
    keys = k_cache[blocks].flatten(0, 1)[:seq_len].float()  # [s, kv, d]
    values = v_cache[blocks].flatten(0, 1)[:seq_len].float()
    query_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)[:, None]
    key_pos = torch.arange(seq_len, device=q.device)[None, :]
    visible = key_pos <= query_pos
    if sliding_window is not None:
        visible &= key_pos > query_pos - sliding_window
    scores = torch.einsum("qkgd,skd->kgqs", _grouped(q[start:start + q_len].float(), kv_heads), keys) * scale
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    result = torch.einsum("kgqs,skd->qkgd", probs, values)
    out[start:start + q_len] = result.flatten(1, 2).to(out.dtype)


def _attend_decodes(q, k_cache, v_cache, block_tables, rows: list[int], seq_lens: list[int], seqs: list[int],
                    scale: float, sliding_window: Optional[int], out: torch.Tensor) -> None:
    """Decode rows at once: every sequence's cache gathered up to the longest, the tail masked."""
    kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    longest = max(seq_lens)
    tables = block_tables[seqs, :-(-longest // block_size)].long()  # rows past a sequence's blocks: masked below
    keys = k_cache[tables].flatten(1, 2).float()  # [D, t, kv, d]
    values = v_cache[tables].flatten(1, 2).float()
    lens = torch.tensor(seq_lens, device=q.device)[:, None]
    key_pos = torch.arange(keys.shape[1], device=q.device)[None, :]
    visible = key_pos < lens
    if sliding_window is not None:
        visible &= key_pos > lens - 1 - sliding_window
    # slots past a sequence's end may hold anything, even NaN: their scores are masked to -inf
    # below, but their values must be zeroed too (a zero probability times NaN is NaN)
    values = values.masked_fill(~visible[:, :, None, None], 0.0)
    index = torch.tensor(rows, device=q.device)
    scores = torch.einsum("bkgd,btkd->bkgt", _grouped(q[index].float(), kv_heads), keys) * scale
    probs = torch.softmax(scores.masked_fill(~visible[:, None, None, :], float("-inf")), dim=-1)
    result = torch.einsum("bkgt,btkd->bkgd", probs, values)
    out[index] = result.flatten(1, 2).to(out.dtype)


def silu_and_mul(x: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [T, 2F] -> silu(x[:, :F]) * x[:, F:] as [T, F] (the gated MLP's activation)."""
    half = x.shape[-1] // 2
    if out is None:
        return F.silu(x[..., :half]) * x[..., half:]
    return torch.mul(F.silu(x[..., :half]), x[..., half:], out=out)


def moe_topk(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the experts in fp32, then the top-k: weights [T, k] fp32, ids [T, k] int32.
    `renormalize` rescales the k weights to sum to 1 (Mixtral; Qwen-MoE's norm_topk_prob)."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


def moe_grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, first_expert: int,
                   out: torch.Tensor) -> torch.Tensor:
    """The experts' GEMMs in one call: x [R, K] sorted by expert, `weight` [held, N, K] the
    experts first_expert .. first_expert + held - 1 ([out, in], as transformers stores them).
    out[offsets[e]:offsets[e + 1]] = x[same rows] @ weight[e - first_expert].T for each held
    expert; the rows of other experts are left as they are. Reads the offsets on the host."""
    bounds = offsets.tolist()
    for i in range(weight.shape[0]):
        lo, hi = bounds[first_expert + i], bounds[first_expert + i + 1]
        if hi > lo:
            torch.mm(x[lo:hi], weight[i].t(), out=out[lo:hi])
    return out
