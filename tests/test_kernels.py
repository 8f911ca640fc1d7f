"""The Triton kernels against the torch reference (`kernels_torch.py`, their definition).

Without a GPU they run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
which is slow: every shape here is tiny. Odd sizes (hidden 48, 10 experts, 3 query heads per KV
head, partly filled blocks) exercise the masks that pad dimensions to powers of two.
"""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from flowc.runtime import kernels_torch as ref  # noqa: E402  (after the importorskip of torch and triton)
from flowc.runtime import kernels_triton as tri  # noqa: E402  (after the importorskip of torch and triton)
from flowc.runtime import triton_shim  # noqa: E402  (after the importorskip of torch and triton)
from flowc.runtime.kernels import OP_NAMES, get_ops  # noqa: E402  (after the importorskip of torch and triton)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}
# Casts and in-place sums are bit-exact, except that the interpreter (Triton 3.9) truncates
# fp32 -> bf16 where the GPU rounds to nearest even: one bf16 ulp (< 2**-7 relative) apart.
ROUNDED = {torch.float32: dict(atol=0, rtol=0), torch.float16: dict(atol=0, rtol=0),
           torch.bfloat16: dict(atol=0, rtol=2 ** -7)}
BLOCK_SIZE = 16


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE).to(dtype)


def test_get_ops_returns_the_triton_kernels():
    ops = get_ops("triton")
    assert ops.backend == "triton"
    for name in OP_NAMES:
        assert getattr(ops, name) is getattr(tri, name)


def test_require_triton_names_the_install(monkeypatch):
    monkeypatch.setattr(triton_shim, "HAVE_TRITON", False)
    with pytest.raises(ImportError, match="pip install triton"):
        triton_shim.require_triton()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused", [False, True])
def test_rms_norm(dtype, fused):
    hidden = 48
    x = randn(5, 2 * hidden, dtype=dtype)[:, :hidden]  # strided rows
    weight = (1 + 0.1 * randn(hidden)).to(dtype)
    if not fused:
        torch.testing.assert_close(tri.rms_norm(x, weight, 1e-6), ref.rms_norm(x, weight, 1e-6), **TOL[dtype])
        return
    residual = randn(5, hidden, dtype=dtype)
    res_ref, res_tri = residual.clone(), residual.clone()
    out = torch.empty_like(x)
    expected = ref.rms_norm(x, weight, 1e-6, residual=res_ref)
    assert tri.rms_norm(x, weight, 1e-6, residual=res_tri, out=out) is out
    torch.testing.assert_close(res_tri, res_ref, **ROUNDED[dtype])
    torch.testing.assert_close(out, expected, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [32, 24])
def test_rotary(dtype, head_dim):
    tokens, heads, kv_heads, max_pos = 7, 4, 2, 64
    # q and k as views of a fused qkv projection, the layout the model hands over
    qkv = randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
    q = qkv[:, :heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, device=DEVICE).float() / head_dim)
    angles = torch.arange(max_pos, device=DEVICE).float()[:, None] * inv_freq[None, :]
    cos_sin = torch.cat((angles.cos(), angles.sin()), dim=-1)
    positions = torch.randint(0, max_pos, (tokens,), device=DEVICE)
    q_ref, k_ref = q.clone(), k.clone()
    ref.rotary(q_ref, k_ref, positions, cos_sin)
    tri.rotary(q, k, positions, cos_sin)
    torch.testing.assert_close(q, q_ref, **TOL[dtype])
    torch.testing.assert_close(k, k_ref, **TOL[dtype])


@pytest.mark.parametrize("dtype,cache_dtype", [(d, d) for d in DTYPES] + [(torch.float32, torch.bfloat16)])
def test_store_kv_skips_slot_minus_one(dtype, cache_dtype):
    kv_heads, head_dim, num_blocks = 2, 16, 4
    k, v = randn(6, kv_heads, head_dim, dtype=dtype), randn(6, kv_heads, head_dim, dtype=dtype)
    slots = torch.tensor([37, -1, 5, 63, -1, 16], device=DEVICE)
    caches = [randn(num_blocks, BLOCK_SIZE, kv_heads, head_dim, dtype=cache_dtype) for _ in range(2)]
    expected = [c.clone() for c in caches]
    ref.store_kv(k, v, *expected, slots)
    tri.store_kv(k, v, *caches, slots)
    for got, want in zip(caches, expected):
        torch.testing.assert_close(got, want, **ROUNDED[cache_dtype])


def paged_batch(seqs, heads, kv_heads, head_dim, dtype):
    """q and a paged cache for sequences given as (cached prefix, new tokens): shuffled
    physical blocks, table rows padded with -1 (never read), and NaN in every slot the
    sequences do not fill (a kernel that reads one poisons its output)."""
    seq_lens = [ctx + new for ctx, new in seqs]
    n_blocks = [-(-n // BLOCK_SIZE) for n in seq_lens]
    num_blocks = sum(n_blocks) + 3
    physical = torch.randperm(num_blocks).tolist()
    tables = torch.full((len(seqs), max(n_blocks) + 1), -1, dtype=torch.int32)
    caches = [torch.full((num_blocks, BLOCK_SIZE, kv_heads, head_dim), float("nan"), dtype=dtype) for _ in range(2)]
    for b, (seq_len, n) in enumerate(zip(seq_lens, n_blocks)):
        tables[b, :n] = torch.tensor(physical[:n], dtype=torch.int32)
        physical = physical[n:]
        for pos in range(seq_len):
            for cache in caches:
                cache[tables[b, pos // BLOCK_SIZE], pos % BLOCK_SIZE] = torch.randn(kv_heads, head_dim).to(dtype)
    starts = torch.tensor([0] + [new for _, new in seqs], dtype=torch.int32).cumsum(0).to(torch.int32)
    q = randn(int(starts[-1]), heads, head_dim, dtype=dtype)
    return dict(q=q, k_cache=caches[0].to(DEVICE), v_cache=caches[1].to(DEVICE), block_tables=tables.to(DEVICE),
                seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
                query_start_loc=starts.to(DEVICE), scale=head_dim ** -0.5)


# (cached prefix, new tokens): a fresh prefill spanning two blocks, a prefill chunk after a
# cached prefix, decode rows at and across block boundaries, a sequence idle this step
MIXED = [(0, 17), (20, 5), (33, 1), (9, 0), (15, 1)]
DECODE = [(0, 1), (15, 1), (16, 1), (40, 1)]
ATTENTION_CASES = {
    "mixed-mha": dict(seqs=MIXED, heads=4, kv_heads=4, head_dim=32, sliding_window=None),
    "mixed-gqa3-window": dict(seqs=MIXED, heads=6, kv_heads=2, head_dim=16, sliding_window=7),
    "decode-gqa2": dict(seqs=DECODE, heads=4, kv_heads=2, head_dim=16, sliding_window=None),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_paged_attention(dtype, case):
    cfg = ATTENTION_CASES[case]
    batch = paged_batch(cfg["seqs"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"], dtype)
    expected = ref.paged_attention(**batch, sliding_window=cfg["sliding_window"])
    out = torch.empty_like(batch["q"])
    got = tri.paged_attention(**batch, sliding_window=cfg["sliding_window"], out=out)
    assert got is out
    torch.testing.assert_close(got, expected, **TOL[dtype])


@pytest.mark.parametrize("head_dim,block_size,bad", [(24, 16, "head_dim 24"), (16, 8, "block_size 8")])
def test_paged_attention_rejects_illegal_tiles(head_dim, block_size, bad):
    q = randn(1, 2, head_dim)
    cache = randn(1, block_size, 2, head_dim)
    one = torch.ones(1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=f"{bad} is not a legal tl.dot tile"):
        tri.paged_attention(q, cache, cache, torch.zeros(1, 1, dtype=torch.int32, device=DEVICE), one,
                            torch.tensor([0, 1], dtype=torch.int32, device=DEVICE), 1.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [40, 1500])
def test_silu_and_mul(dtype, width):
    x = randn(3, 2 * width, dtype=dtype)
    torch.testing.assert_close(tri.silu_and_mul(x), ref.silu_and_mul(x), **TOL[dtype])
    out = torch.empty(3, width, dtype=dtype, device=DEVICE)
    assert tri.silu_and_mul(x, out=out) is out
    torch.testing.assert_close(out, ref.silu_and_mul(x), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("renormalize", [False, True])
def test_moe_topk(dtype, renormalize):
    tokens, experts, top_k = 6, 10, 3
    # a permutation of distinct values per token: no ties, whatever the dtype
    logits = torch.stack([torch.randperm(experts) for _ in range(tokens)]).float() * 0.37
    logits = logits.to(DEVICE, dtype)
    weights, ids = tri.moe_topk(logits, top_k, renormalize)
    ref_weights, ref_ids = ref.moe_topk(logits, top_k, renormalize)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    torch.testing.assert_close(ids, ref_ids, atol=0, rtol=0)
    torch.testing.assert_close(weights, ref_weights, atol=1e-6, rtol=1e-5)
