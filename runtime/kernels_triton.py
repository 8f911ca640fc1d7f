"""The Triton kernels: the same seven ops, signatures and layouts as `kernels_torch.py` (the
definition they are tested against).

Every kernel loads, casts to fp32 at once, computes in fp32 and casts when it stores, so the
same code runs on the GPU and under the Triton interpreter (TRITON_INTERPRET=1, CPU tests).
Where the reference rounds an intermediate to the input dtype (rms_norm's normalized value,
silu before the gate product), the kernel rounds at the same point, so 16-bit results match
the reference to the last bit or one ulp.

- `rms_norm`, `silu_and_mul`, `moe_topk`: one program per row (silu_and_mul also tiles the
  columns); `moe_topk` softmaxes the padded row and picks the top k by k rounds of argmax.
- `rotary`, `store_kv`: one program per token, covering all its heads as a [heads, dim] tile.
- `paged_attention`: flash attention over the paged cache. A program owns one sequence, one
  KV head and a tile of BLOCK_Q of the sequence's new tokens: its BLOCK_M = BLOCK_Q * GROUP_PAD
  rows are (token, query head of that KV head's group) pairs, so each K/V block is loaded once
  per group and a decode row still fills a tensor-core tile (GQA). It walks the sequence's
  blocks through the block table with an online softmax in fp32, `tl.dot` for QK^T and PV,
  the causal mask from positions (row i of sequence b sits at seq_lens[b] - q_len_b + i) and the
  sliding window. Prefill, chunked prefill and decode rows are one code path. The (sequence,
  tile) pairs are enumerated without a host sync: sequence b's tiles start at grid index
  query_start_loc[b] // BLOCK_Q + b (a bound of T // BLOCK_Q + B tiles in all), each program
  finds its sequence by binary search and exits when its tile starts past the sequence's q_len.
- `moe_grouped_mm`: one launch for all the experts a rank holds, without a host sync. A program
  owns a BLOCK_M x BLOCK_N tile of one expert's rows; expert i's row tiles follow those of
  experts 0 .. i - 1 in the grid, which is sized by a bound (sum over experts of
  cdiv(rows, BLOCK_M) < cdiv(R, BLOCK_M) + held), so each program walks the device `offsets` to
  find its expert and exits when its tile lies past the last one.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .kernels import tile_problem
from .triton_shim import require_triton

require_triton()

from .triton_shim import tl, triton  # noqa: E402  (only after the clear error above)

__all__ = ["rms_norm", "rotary", "store_kv", "paged_attention", "silu_and_mul", "moe_topk", "moe_grouped_mm"]

_LOG2E = math.log2(math.e)


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _check_dot_dim(name: str, value: int) -> None:
    problem = tile_problem(name, value)
    if problem:
        raise ValueError(f"paged_attention: {problem}")


def _warps(block: int) -> int:
    return min(16, max(4, block // 256))


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, res_ptr, out_ptr, stride_x, stride_r, stride_o, hidden, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        # residual += x in the residual's dtype, then normalize that sum (as the reference)
        x = x + tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        x = x.to(res_ptr.dtype.element_ty)
        tl.store(res_ptr + row * stride_r + cols, x, mask=mask)
        x = x.to(tl.float32)
        norm_ty = res_ptr.dtype.element_ty
    else:
        norm_ty = x_ptr.dtype.element_ty
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / hidden + eps)
    # the reference rounds the normalized value to the input dtype before the weight product
    normed = (x * rstd).to(norm_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None,
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    hidden = x.shape[-1]
    src = residual if residual is not None else x
    if out is None:
        out = torch.empty(x.shape, dtype=torch.result_type(weight, src), device=x.device)
    x2 = x.reshape(-1, hidden)
    res2 = residual.view(-1, hidden) if residual is not None else x2  # in place: must be a view
    out2 = out.view(-1, hidden)
    block = _pow2(hidden)
    _rms_norm_kernel[(x2.shape[0],)](
        x2, weight, res2, out2, x2.stride(0), res2.stride(0), out2.stride(0), hidden, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=_warps(block))
    return out


@triton.jit
def _rotate_heads(ptr, stride_h, num_heads, cos, sin, HALF: tl.constexpr, HEADS_PAD: tl.constexpr,
                  HALF_PAD: tl.constexpr):
    heads = tl.arange(0, HEADS_PAD)[:, None]
    cols = tl.arange(0, HALF_PAD)[None, :]
    mask = (heads < num_heads) & (cols < HALF)
    first = ptr + heads * stride_h + cols
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(first, (x1 * cos - x2 * sin).to(ptr.dtype.element_ty), mask=mask)
    tl.store(first + HALF, (x2 * cos + x1 * sin).to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, positions_ptr, cos_sin_ptr, stride_qt, stride_qh, stride_kt, stride_kh,
                   stride_cs, num_q_heads, num_kv_heads, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
                   Q_HEADS_PAD: tl.constexpr, KV_HEADS_PAD: tl.constexpr):
    token = tl.program_id(0)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    cols = tl.arange(0, HALF_PAD)
    row = cos_sin_ptr + pos * stride_cs + cols
    cos = tl.load(row, mask=cols < HALF, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(row + HALF, mask=cols < HALF, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(q_ptr + token * stride_qt, stride_qh, num_q_heads, cos, sin, HALF, Q_HEADS_PAD, HALF_PAD)
    _rotate_heads(k_ptr + token * stride_kt, stride_kh, num_kv_heads, cos, sin, HALF, KV_HEADS_PAD, HALF_PAD)


def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> None:
    # the head dim is addressed with unit stride (HALF offsets), as the reference's halves
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and cos_sin.stride(-1) == 1, "rotary: head dim must be contiguous"
    half = q.shape[-1] // 2
    _rotary_kernel[(q.shape[0],)](
        q, k, positions, cos_sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin.stride(0),
        q.shape[1], k.shape[1], HALF=half, HALF_PAD=_pow2(half), Q_HEADS_PAD=_pow2(q.shape[1]),
        KV_HEADS_PAD=_pow2(k.shape[1]))


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, block_size, num_heads,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
                     HEAD_DIM: tl.constexpr, HEADS_PAD: tl.constexpr, DIM_PAD: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block = slot // block_size
    offset = slot % block_size
    heads = tl.arange(0, HEADS_PAD)[:, None]
    cols = tl.arange(0, DIM_PAD)[None, :]
    mask = (heads < num_heads) & (cols < HEAD_DIM)
    k = tl.load(k_ptr + token * stride_kt + heads * stride_kh + cols, mask=mask).to(tl.float32)
    v = tl.load(v_ptr + token * stride_vt + heads * stride_vh + cols, mask=mask).to(tl.float32)
    k_dst = k_cache_ptr + block * stride_kcb + offset * stride_kcs + heads * stride_kch + cols
    v_dst = v_cache_ptr + block * stride_vcb + offset * stride_vcs + heads * stride_vch + cols
    tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    assert all(t.stride(-1) == 1 for t in (k, v, k_cache, v_cache)), "store_kv: head dim must be contiguous"
    num_heads, head_dim = k.shape[1], k.shape[2]
    _store_kv_kernel[(k.shape[0],)](
        k, v, k_cache, v_cache, slot_mapping, k_cache.shape[1], num_heads,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        HEAD_DIM=head_dim, HEADS_PAD=_pow2(num_heads), DIM_PAD=_pow2(head_dim))


@triton.jit
def _sequence_of_tile(query_start_loc_ptr, num_seqs, tile, BLOCK_Q: tl.constexpr):
    # the last sequence b whose first tile, query_start_loc[b] // BLOCK_Q + b, is <= tile
    lo = tile * 0
    hi = lo + num_seqs
    while hi - lo > 1:
        mid = (lo + hi) // 2
        starts_before = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid <= tile
        lo = tl.where(starts_before, mid, lo)
        hi = tl.where(starts_before, hi, mid)
    return lo


# the batch's sequence count and block-table width change every step: specializing on them
# (== 1, divisible by 16) would compile new variants while serving
@triton.jit(do_not_specialize=["num_seqs", "stride_bt"])
def _paged_attention_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
        num_seqs, qk_scale, window,
        stride_qt, stride_qh, stride_ot, stride_oh,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, SLIDING: tl.constexpr, DOT_PRECISION: tl.constexpr):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _sequence_of_tile(query_start_loc_ptr, num_seqs, tile, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_tile = tile - (q_start // BLOCK_Q + seq)
    if q_tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len  # position of the sequence's first new token

    rows = tl.arange(0, BLOCK_M)
    token = q_tile * BLOCK_Q + rows // GROUP_PAD
    head = kv_head * GROUP + rows % GROUP_PAD
    row_ok = (token < q_len) & (rows % GROUP_PAD < GROUP)
    # padding rows take the tile's last real position, so every row sees a key (no 0/0)
    q_pos = context + tl.minimum(token, q_len - 1)
    dims = tl.arange(0, HEAD_DIM)
    q_rows = (q_start + token).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None], other=0.0).to(tl.float32)

    # keys the tile can see: up to its last row, and from its first row's window on
    kv_end = context + tl.minimum(q_len, (q_tile + 1) * BLOCK_Q)
    kv_begin = 0
    if SLIDING:
        kv_begin = tl.maximum(context + q_tile * BLOCK_Q - window + 1, 0)
    # a finite floor keeps rows whose keys are all masked in a block (sliding window) NaN-free
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    slots = tl.arange(0, BLOCK_SIZE)
    for j in range(kv_begin // BLOCK_SIZE, tl.cdiv(kv_end, BLOCK_SIZE)):
        block = tl.load(block_tables_ptr + seq * stride_bt + j).to(tl.int64)
        key_pos = j * BLOCK_SIZE + slots
        # slots past the tile's keys (a partly filled last block) may hold garbage, even NaN
        key_ok = key_pos < kv_end
        k = tl.load(k_cache_ptr + block * stride_kb + kv_head * stride_kh + slots[None, :] * stride_ks
                    + dims[:, None], mask=key_ok[None, :], other=0.0).to(tl.float32)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        visible = key_pos[None, :] <= q_pos[:, None]
        if SLIDING:
            visible = visible & (key_pos[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        v = tl.load(v_cache_ptr + block * stride_vb + kv_head * stride_vh + slots[:, None] * stride_vs
                    + dims[None, :], mask=key_ok[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(out_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float,
                    sliding_window: Optional[int] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    num_tokens, heads, head_dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    _check_dot_dim("head_dim", head_dim)
    _check_dot_dim("block_size", block_size)
    if heads % kv_heads:
        raise ValueError(f"paged_attention: {heads} query heads are not a multiple of {kv_heads} KV heads")
    if out is None:
        out = torch.empty_like(q)
    assert all(t.stride(-1) == 1 for t in (q, k_cache, v_cache, out)), "paged_attention: head dim must be contiguous"
    num_seqs = seq_lens.shape[0]
    group = heads // kv_heads
    group_pad = _pow2(group)
    # decode-only batches (T <= B) take the smallest legal tile, prefill rows a wider one; these
    # sizes and warps keep the fp32 tiles in registers on sm_90 (no spills up to head_dim 256)
    block_m = max(16 if num_tokens <= num_seqs or head_dim > 128 else 64, group_pad)
    block_q = block_m // group_pad
    grid = (num_tokens // block_q + num_seqs, kv_heads)
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc,
        num_seqs, scale * _LOG2E, sliding_window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q, BLOCK_M=block_m, HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, SLIDING=sliding_window is not None,
        # 16-bit inputs are exact in tf32; fp32 inputs keep full precision
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=8 if block_m >= 64 else 4)
    return out


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, width, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    a = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(x_ptr + row * stride_x + width + cols, mask=mask, other=0.0).to(tl.float32)
    # the reference rounds silu(a) to the input dtype before the product
    gate = (a / (1.0 + tl.exp(-a))).to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (gate * b).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    width = x.shape[-1] // 2
    if out is None:
        out = torch.empty(x.shape[:-1] + (width,), dtype=x.dtype, device=x.device)
    x2 = x.reshape(-1, 2 * width)
    out2 = out.view(-1, width)
    block = min(_pow2(width), 1024)
    _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(width, block))](
        x2, out2, x2.stride(0), out2.stride(0), width, BLOCK=block)
    return out


@triton.jit
def _moe_topk_kernel(logits_ptr, weights_ptr, ids_ptr, stride_l, num_experts,
                     TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr, EXPERTS_PAD: tl.constexpr,
                     K_PAD: tl.constexpr):
    row = tl.program_id(0)
    experts = tl.arange(0, EXPERTS_PAD)
    valid = experts < num_experts
    logits = tl.load(logits_ptr + row * stride_l + experts, mask=valid, other=float("-inf")).to(tl.float32)
    e = tl.exp(logits - tl.max(logits, axis=0))
    # probabilities are >= 0, so -1 marks padding and experts already taken
    probs = tl.where(valid, e / tl.sum(e, axis=0), -1.0)
    ks = tl.arange(0, K_PAD)
    weights = tl.zeros([K_PAD], tl.float32)
    ids = tl.zeros([K_PAD], tl.int32)
    for i in tl.static_range(TOP_K):
        best = tl.max(probs, axis=0)
        best_id = tl.min(tl.where(probs == best, experts, EXPERTS_PAD), axis=0)  # ties: lowest id
        weights = tl.where(ks == i, best, weights)
        ids = tl.where(ks == i, best_id, ids)
        probs = tl.where(experts == best_id, -1.0, probs)
    if RENORMALIZE:
        weights = weights / tl.sum(weights, axis=0)
    tl.store(weights_ptr + row * TOP_K + ks, weights, mask=ks < TOP_K)
    tl.store(ids_ptr + row * TOP_K + ks, ids, mask=ks < TOP_K)


def moe_topk(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    num_tokens, num_experts = router_logits.shape
    assert 0 < top_k <= num_experts, f"moe_topk: top_k {top_k} out of 1..{num_experts}"
    assert router_logits.stride(-1) == 1, "moe_topk: the expert dim must be contiguous"
    weights = torch.empty((num_tokens, top_k), dtype=torch.float32, device=router_logits.device)
    ids = torch.empty((num_tokens, top_k), dtype=torch.int32, device=router_logits.device)
    _moe_topk_kernel[(num_tokens,)](
        router_logits, weights, ids, router_logits.stride(0), num_experts,
        TOP_K=top_k, RENORMALIZE=renormalize, EXPERTS_PAD=_pow2(num_experts), K_PAD=_pow2(top_k))
    return weights, ids


@triton.jit
def _moe_grouped_mm_kernel(x_ptr, w_ptr, offsets_ptr, out_ptr, first_expert, held, N, K,
                           stride_x, stride_we, stride_wn, stride_o,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           DOT_PRECISION: tl.constexpr):
    tile = tl.program_id(0)
    # the held expert whose row tiles contain `tile`, and where that tile's rows start and end
    expert = tile * 0 - 1
    row_start = tile * 0
    row_end = tile * 0
    tiles_before = tile * 0
    for i in range(held):
        lo = tl.load(offsets_ptr + first_expert + i)
        hi = tl.load(offsets_ptr + first_expert + i + 1)
        tiles = tl.cdiv(hi - lo, BLOCK_M)
        here = (tile >= tiles_before) & (tile < tiles_before + tiles)
        expert = tl.where(here, i, expert)
        row_start = tl.where(here, lo + (tile - tiles_before) * BLOCK_M, row_start)
        row_end = tl.where(here, hi, row_end)
        tiles_before += tiles
    if expert < 0:
        return

    rows = row_start + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    rows = rows.to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    x_tile = x_ptr + rows[:, None] * stride_x + ks[None, :]
    # the weight is [N, K]: its [BLOCK_K, BLOCK_N] tile is the transpose the product needs
    w_tile = w_ptr + expert.to(tl.int64) * stride_we + cols[None, :] * stride_wn + ks[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k in range(0, K, BLOCK_K):
        k_ok = k + ks < K
        a = tl.load(x_tile + k, mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        b = tl.load(w_tile + k, mask=k_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def moe_grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, first_expert: int,
                   out: torch.Tensor) -> torch.Tensor:
    num_rows, k = x.shape
    held, n = weight.shape[0], weight.shape[1]
    assert all(t.stride(-1) == 1 for t in (x, weight, out)), "moe_grouped_mm: the last dim must be contiguous"
    # decode-sized batches (under 16 rows per expert on average) take the smallest legal tile,
    # prefill a wider one: two specializations, which the engine's warm-up (a long prefill and
    # decodes) compiles
    block_m = 16 if num_rows < 16 * (offsets.shape[0] - 1) else 64
    block_n, block_k = max(16, min(64, _pow2(n))), max(16, min(64, _pow2(k)))
    grid = (triton.cdiv(num_rows, block_m) + held, triton.cdiv(n, block_n))
    _moe_grouped_mm_kernel[grid](
        x, weight, offsets, out, first_expert, held, n, k,
        x.stride(0), weight.stride(0), weight.stride(1), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        # 16-bit inputs are exact in tf32; fp32 inputs keep full precision, as torch.mm
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32")
    return out
