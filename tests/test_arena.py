"""The activation arena: the step graph, the lower bound, greedy and CP-SAT layouts against
hand-solved and brute-forced instances, and the stdlib models against the memory model."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowc.compiler.model.memory import activation_peak_bytes
from flowc.compiler.model.step_graph import ALIGNMENT, Buffer, live_bytes, lower_bound, overlaps, step_buffers
from flowc.compiler.optimize.arena import greedy, pack
from flowc.stdlib_listing import stdlib_spec


@pytest.fixture(scope="module")
def models():
    return stdlib_spec().models


def B(name, size, start, end):
    return Buffer(name, size, start, end)


def feasible(buffers, height):
    """Brute force: is there an assignment of integer offsets below `height` with no two
    buffers alive together overlapping? (backtracking over every offset of every buffer)"""
    order = sorted(buffers, key=lambda b: (b.start, -b.size_bytes))
    placed: list[tuple[int, Buffer]] = []

    def place(k):
        if k == len(order):
            return True
        b = order[k]
        for y in range(height - b.size_bytes + 1):
            if all(not (o.alive_with(b) and y < oy + o.size_bytes and oy < y + b.size_bytes) for oy, o in placed):
                placed.append((y, b))
                if place(k + 1):
                    return True
                placed.pop()
        return False

    return place(0)


def brute_force_optimum(buffers):
    height = lower_bound(buffers, 1)
    while not feasible(buffers, height):
        height += 1
    return height


def check_layout(buffers, layout):
    assert overlaps(buffers, layout.offsets) == []
    for b in buffers:
        assert layout.offsets[b.name] % layout.alignment == 0
        assert 0 <= layout.offsets[b.name] and layout.offsets[b.name] + b.size_bytes <= layout.size
    assert layout.lower_bound <= layout.size <= layout.greedy_size
    assert layout.greedy_size <= sum(-(-b.size_bytes // layout.alignment) * layout.alignment for b in buffers)


# ------------------------------------------------------------------------ hand-made instances


def test_lower_bound_is_the_peak_of_live_bytes():
    bufs = [B("a", 3, 0, 2), B("b", 2, 1, 3), B("c", 4, 2, 4)]
    assert live_bytes(bufs, 1) == [3, 5, 6, 4]
    assert lower_bound(bufs, 1) == 6
    # aligned: every buffer takes whole 256-byte units
    assert lower_bound([B("a", 1, 0, 1), B("b", 257, 0, 1)]) == 3 * ALIGNMENT


def test_greedy_misses_an_achievable_bound_and_cp_sat_finds_it():
    # B and C, then B and D, then D and A are alive together; the peak is 3. Greedy by size
    # puts the two size-2 buffers at 0 and stacks B and D on top (4); the optimum is C at 0,
    # B at 2, A at 1, D at 0.
    bufs = [B("A", 2, 3, 4), B("B", 1, 0, 3), B("C", 2, 0, 1), B("D", 1, 2, 4)]
    offsets, size = greedy(bufs, alignment=1)
    assert overlaps(bufs, offsets) == [] and size == 4
    layout = pack(bufs, time_limit_s=5, alignment=1)
    check_layout(bufs, layout)
    assert layout.lower_bound == 3 and layout.size == 3 == brute_force_optimum(bufs)
    assert layout.status == "OPTIMAL" and layout.ratio == 1.0


def test_interval_graph_where_the_bound_is_met():
    # a chain: each buffer overlaps its neighbours only; the bound (largest neighbouring pair) is met
    bufs = [B(f"b{i}", size, i, i + 2) for i, size in enumerate([5, 3, 4, 1, 6, 2])]
    layout = pack(bufs, alignment=1)
    check_layout(bufs, layout)
    assert layout.size == layout.lower_bound == 8 == brute_force_optimum(bufs)  # 5 + 3 and 6 + 2


def test_an_instance_where_the_bound_is_not_achievable():
    # Peak 4 everywhere it matters. B is alive with A (size 3) so it sits at an end (say 0).
    # F must also sit at an end (it is alive with H, size 3) but not B's: F = 3. C (alive with B
    # and F from t = 2) is then at 1 or 2, and D (size 2, alive with B at t = 1) forces C = 1.
    # At t = 3, G (size 2) is alive with C at 1 and F at 3: no two adjacent units are free.
    bufs = [B("A", 3, 0, 1), B("D", 2, 1, 2), B("B", 1, 0, 3), B("C", 1, 1, 4), B("G", 2, 3, 4),
            B("F", 1, 2, 5), B("H", 3, 4, 5)]
    assert lower_bound(bufs, 1) == 4
    assert not feasible(bufs, 4) and feasible(bufs, 5)
    layout = pack(bufs, alignment=1)
    check_layout(bufs, layout)
    assert layout.size == 5 and layout.status == "OPTIMAL" and layout.ratio == 5 / 4


def test_a_larger_instance_against_brute_force():
    bufs = [B("A", 2, 0, 1), B("B", 4, 0, 2), B("C", 1, 1, 3), B("D", 1, 1, 4), B("E", 1, 2, 4),
            B("G", 1, 2, 6), B("H", 3, 3, 6), B("I", 2, 4, 6)]
    layout = pack(bufs, alignment=1)
    check_layout(bufs, layout)
    assert layout.lower_bound == 6 and layout.size == brute_force_optimum(bufs) == 7


@st.composite
def small_instances(draw):
    n = draw(st.integers(2, 7))
    bufs = []
    for i in range(n):
        start = draw(st.integers(0, 4))
        bufs.append(B(f"b{i}", draw(st.integers(1, 4)), start, draw(st.integers(start + 1, 6))))
    return bufs


@settings(max_examples=60, deadline=None)
@given(small_instances())
def test_random_small_instances_against_brute_force(bufs):
    layout = pack(bufs, time_limit_s=5, alignment=1)
    check_layout(bufs, layout)
    assert layout.status == "OPTIMAL" and layout.size == brute_force_optimum(bufs)


def test_alignment_rounds_sizes_up_and_offsets_stay_aligned():
    bufs = [B("a", 100, 0, 2), B("b", 300, 1, 3), B("c", 256, 2, 4)]
    layout = pack(bufs)
    check_layout(bufs, layout)
    assert layout.alignment == 256
    assert layout.size == layout.lower_bound == (2 + 1) * 256  # b (2 units) and c (1 unit) at t = 2


def test_buffers_need_distinct_names_and_valid_lifetimes():
    with pytest.raises(ValueError):
        pack([B("a", 1, 0, 1), B("a", 1, 1, 2)])
    with pytest.raises(ValueError):
        B("a", 1, 2, 2)


# ----------------------------------------------------------------------------- the step graph


def test_llama_8b_step_buffers_by_hand(models):
    T, S = 2048, 256
    bufs = {b.name: b for b in step_buffers(models["llama-3.1-8b"], 1, T, S)}
    assert bufs["residual"].size_bytes == T * 4096 * 2
    assert bufs["layer.qkv"].size_bytes == T * (32 + 2 * 8) * 128 * 2
    assert bufs["layer.gate_up"].size_bytes == T * 2 * 14336 * 2
    assert bufs["layer.act"].size_bytes == T * 14336 * 2
    assert bufs["logits"].size_bytes == S * 128256 * 4
    # the residual stream lives from the embedding to the final norm
    assert bufs["residual"].start == 1 and bufs["residual"].end > bufs["layer.mlp_out"].end
    # gate_up is the SiLU's input: both alive at once; the SiLU output and mlp_out too
    assert bufs["layer.gate_up"].alive_with(bufs["layer.act"])
    assert not bufs["layer.gate_up"].alive_with(bufs["layer.mlp_out"])
    # peak: residual + gate_up + act at the SiLU (T (4096 + 28672 + 14336) x 2 bytes) is below
    # the sampling tail at this token budget: probs and the exponential noise, 2 x S x V x 4
    assert lower_bound(list(bufs.values())) >= max(T * (4096 + 3 * 14336) * 2, 2 * S * 128256 * 4)


def test_tensor_parallel_splits_heads_ffn_and_vocab(models):
    one = {b.name: b.size_bytes for b in step_buffers(models["llama-3.1-70b"], 1, 1024, 64)}
    four = {b.name: b.size_bytes for b in step_buffers(models["llama-3.1-70b"], 4, 1024, 64)}
    assert four["layer.gate_up"] * 4 == one["layer.gate_up"]
    assert four["layer.qkv"] == 1024 * (16 + 2 * 2) * 128 * 2
    assert four["logits"] * 4 == one["logits"]
    assert four["residual"] == one["residual"]


def test_moe_and_mla_buffers(models):
    T = 1024
    mix = {b.name: b.size_bytes for b in step_buffers(models["mixtral-8x7b"], 2, T, 64)}
    assert mix["moe_layer.router_logits"] == T * 8 * 2
    assert mix["moe_layer.permuted"] == T * 2 * 4096 * 2
    assert mix["moe_layer.expert_gate_up"] == T * 2 * 2 * 7168 * 2
    ds = {b.name: b.size_bytes for b in step_buffers(models["deepseek-v3"], 8, T, 64)}
    assert ds["moe_layer.qkv_a"] == T * (1536 + 512 + 64) * 2  # q and kv LoRA + k_pe
    assert ds["moe_layer.q_c"] == T * 1536 * 2 and ds["moe_layer.kv_c"] == T * 512 * 2
    assert ds["moe_layer.q_latent"] == 64 * 16 * (512 + 64) * 2
    assert ds["moe_layer.shared_gate_up"] == T * 2 * 2048 // 8 * 2
    assert ds["dense_layer.gate_up"] == T * 2 * 18432 // 8 * 2  # the three dense layers
    assert ds["moe_layer.topk_ids"] == T * 8 * 4


@pytest.mark.parametrize("name", ["tiny-llama", "gpt-j-6b", "qwen2.5-7b", "qwen3-30b-a3b"])
def test_every_architecture_builds_and_packs(models, name):
    bufs = step_buffers(models[name], 1, 256, 32)
    layout = pack(bufs, time_limit_s=2)
    check_layout(bufs, layout)


STDLIB_CASES = [("llama-3.1-8b", 1), ("llama-3.1-70b", 4), ("mixtral-8x7b", 2), ("deepseek-v3", 8)]


@pytest.mark.parametrize("tokens", [2048, 8192])
@pytest.mark.parametrize("name,tp", STDLIB_CASES)
def test_stdlib_models_pack_at_the_lower_bound(models, name, tp, tokens, record_property):
    bufs = step_buffers(models[name], tp, tokens, 256)
    layout = pack(bufs, time_limit_s=5)
    check_layout(bufs, layout)
    record_property("ratio_to_lower_bound", layout.ratio)
    # measured: greedy by size already meets the bound for all eight (the solve is skipped)
    assert layout.size == layout.lower_bound


@pytest.mark.parametrize("tokens", [2048, 8192])
@pytest.mark.parametrize("name,tp", STDLIB_CASES)
def test_memory_model_reserves_exactly_the_packed_arena(models, name, tp, tokens):
    """memory.activation_peak_bytes is the step graph's live peak; the packing reaches it, so
    the budget reserves exactly the arena (before this, a closed-form estimate missed the MoE
    per-assignment tensors: DeepSeek-V3 at TP 8 needed ~4x it)."""
    m = models[name]
    arena = pack(step_buffers(m, tp, tokens, 256), time_limit_s=5).size
    assert arena == activation_peak_bytes(m, tp, tokens, 256)
