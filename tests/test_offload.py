"""Offload tier assignment: the LP on hand-solved units, and plans for stdlib models (what fits
stays, capacities hold, the host link bounds the step, infeasible inputs raise)."""

from __future__ import annotations

import pytest
from flow_samples import OFFLOAD_SPEC

from flowc.compiler.model.cost import CostModel, Parallelism
from flowc.compiler.model.geometry import weight_bytes_per_rank
from flowc.compiler.model.memory import memory_budget
from flowc.compiler.model.operators import HOST_TRANSFER_EFFICIENCY
from flowc.compiler.optimize.offload import OffloadInfeasible, Unit, _variant, plan_offload, solve_offload, stage_units
from flowc.compiler.plan import Scheduler
from flowc.stdlib_listing import stdlib_spec

GB, MS = 1e9, 1e-3
TiB = 1 << 40


@pytest.fixture(scope="module")
def std():
    return stdlib_spec()


@pytest.fixture(scope="module")
def h100(std):
    gpu = std.gpus["h100-sxm"]
    return gpu, std.links[gpu.host_link], std.links[gpu.interconnect]


def approx(x, rel=1e-6, abs=1e-9):
    return pytest.approx(x, rel=rel, abs=abs)


# --------------------------------------------------------------------------- the LP by hand


def test_identical_layers_offload_the_same_share():
    # 4 layers of 10 GB, 30 GB of HBM, 1 GB/ms. With o GB streamed per layer and a double
    # buffer of 2 o: 4 (10 - o) + 2 o <= 30 -> o = 5 GB, 5 ms of transfer per layer (> 1 ms
    # of compute): 20 ms per step, half of every layer in HBM.
    units = [Unit(f"l{i}", 10 * GB, compute_decode=1 * MS, compute_prefill=1 * MS, layer=i) for i in range(4)]
    sol = solve_offload(units, hbm_budget=30 * GB, host_capacity=100 * GB, bandwidth=1e12)
    assert sol.f == [approx(0.5)] * 4
    assert sol.s == approx(5 * GB, rel=1e-6)


def test_compute_bound_layers_hide_the_transfer():
    # same layers with 10 ms of compute: streaming 5 GB (5 ms) is hidden, nothing more is offloaded
    units = [Unit(f"l{i}", 10 * GB, compute_decode=10 * MS, layer=i) for i in range(4)]
    sol = solve_offload(units, hbm_budget=30 * GB, host_capacity=100 * GB, bandwidth=1e12)
    assert sol.f == [approx(0.5)] * 4


def test_the_slack_of_compute_bound_layers_fills_first():
    # unstaged units (no streaming buffer), 1 GB/ms: two heavy layers (6 ms) and two light
    # ones (1 ms), 10 GB each, 25 GB of HBM: 15 GB must go. The heavy layers hide 6 GB each
    # and the light ones 1 GB each (14 GB for free); the last GB costs 1 ms: 6+6+1+1+1 = 15 ms.
    compute = [6, 6, 1, 1]
    units = [Unit(f"l{i}", 10 * GB, compute_decode=c * MS, staged=False, layer=i) for i, c in enumerate(compute)]
    sol = solve_offload(units, hbm_budget=25 * GB, host_capacity=100 * GB, bandwidth=1e12)
    off = [(1 - f) * 10 for f in sol.f]
    assert sum(off) == approx(15)
    assert off[0] >= 6 - 1e-6 and off[1] >= 6 - 1e-6 and off[2] >= 1 - 1e-6 and off[3] >= 1 - 1e-6
    step = sum(max(c, o) for c, o in zip(compute, off))
    assert step == approx(15)


def test_experts_go_before_other_weights():
    # the identical-layer case with each layer 4 GB of attention and 6 GB of routed experts:
    # 5 GB per layer streams either way, and at equal cost the experts leave first
    units = [Unit(f"l{i}", 4 * GB, expert_bytes=6 * GB, compute_decode=1 * MS, layer=i) for i in range(4)]
    sol = solve_offload(units, hbm_budget=30 * GB, host_capacity=100 * GB, bandwidth=1e12)
    assert sol.f == [approx(1.0)] * 4
    assert sol.e == [approx(1 / 6)] * 4


def test_two_units_cannot_save_memory_by_streaming():
    # with two identical units, streaming o from each frees 2 o and the double buffer costs 2 o
    units = [Unit(f"l{i}", 10 * GB, compute_decode=1 * MS, layer=i) for i in range(2)]
    with pytest.raises(OffloadInfeasible, match="streaming buffer"):
        solve_offload(units, hbm_budget=19 * GB, host_capacity=100 * GB, bandwidth=1e12)


def test_host_capacity_binds():
    # 8 layers of 10 GB in 70 GB: 8 (10 - o) + 2 o <= 70 -> o = 10/6 GB, 13.3 GB in host memory
    units = [Unit(f"l{i}", 10 * GB, compute_decode=1 * MS, layer=i) for i in range(8)]
    sol = solve_offload(units, hbm_budget=70 * GB, host_capacity=14 * GB, bandwidth=1e12)
    assert sum((1 - f) * 10 for f in sol.f) == approx(80 / 6)
    with pytest.raises(OffloadInfeasible):
        solve_offload(units, hbm_budget=70 * GB, host_capacity=13 * GB, bandwidth=1e12)
    # shared by two GPUs that offload alike, 14 GB is not enough either
    with pytest.raises(OffloadInfeasible):
        solve_offload(units, hbm_budget=70 * GB, host_capacity=14 * GB, bandwidth=1e12, gpus=2)


# ------------------------------------------------------------------------------ real models


@pytest.mark.parametrize("name,tp", [("llama-3.1-8b", 1), ("llama-3.1-70b", 4), ("mixtral-8x7b", 2),
                                     ("deepseek-v3", 8), ("gpt-j-6b", 1), ("qwen3-30b-a3b", 1)])
def test_units_add_up_to_the_memory_and_cost_models(std, h100, name, tp):
    gpu, _, link = h100
    m = std.models[name]
    par = Parallelism(tp=tp)
    costs = {"base": CostModel(_variant(m, 0, 0), gpu, link, parallelism=par),
             "dense": CostModel(_variant(m, 1, 1), gpu, link, parallelism=par)}
    if m.moe is not None:
        costs["moe"] = CostModel(_variant(m, 1, 0), gpu, link, parallelism=par)
    units, pinned = stage_units(m, costs, tp=tp, pp=1, decode_seqs=32, kv_tokens=32 * 1000, prefill_tokens=2048)
    assert sum(u.bytes for u in units) + pinned == approx(weight_bytes_per_rank(m, tp, 1), rel=1e-9, abs=2)
    full = CostModel(m, gpu, link, parallelism=par)
    assert sum(u.compute_decode for u in units) == approx(full.step_time(32, 0, 32, 32000), rel=1e-9)
    assert sum(u.compute_prefill for u in units) == approx(full.step_time(2048, 2048 * 2049 // 2, 0, 0), rel=1e-9)


def test_nothing_is_offloaded_when_everything_fits(std, h100):
    gpu, host, link = h100
    m = std.models["llama-3.1-8b"]
    plan = plan_offload(m, gpu, host, TiB, tp=1, pp=1, scheduler=Scheduler(max_batched_tokens=2048),
                        kv_tokens_needed=32 * 1024)
    assert plan.status == "fits" and plan.offloaded_bytes == 0 and plan.staging_bytes == 0
    assert plan.hbm_fraction == [1.0] * 32 and plan.transfer_bytes_decode == 0
    full = CostModel(m, gpu, link)
    assert plan.step_time_decode == approx(full.step_time(256, 0, 256, 32 * 1024), rel=1e-9)


def test_a_tp4_plan_through_a_cost_model(std, h100):
    gpu, host, link = h100
    m = std.models["llama-3.1-70b"]
    cost = CostModel(m, gpu, link, parallelism=Parallelism(tp=4))
    plan = plan_offload(m, gpu, host, TiB, tp=4, pp=1, scheduler=Scheduler(max_batched_tokens=2048),
                        kv_tokens_needed=8192, cost=cost)
    assert plan.status == "fits"
    with pytest.raises(ValueError, match="tp 4"):
        plan_offload(m, gpu, host, TiB, tp=2, scheduler=Scheduler(max_batched_tokens=2048), kv_tokens_needed=8192,
                     cost=cost)


@pytest.fixture(scope="module")
def llama70_on_one_h100(std, h100):
    gpu, host, _ = h100
    m = std.models["llama-3.1-70b"]
    return plan_offload(m, gpu, host, 2 * TiB, tp=1, pp=1, scheduler=Scheduler(max_batched_tokens=2048),
                        kv_tokens_needed=16 * 1024)


def test_llama_70b_on_one_h100_is_bound_by_the_host_link(std, h100, llama70_on_one_h100):
    _, host, _ = h100
    plan = llama70_on_one_h100
    assert plan.status == "OPTIMAL"
    assert plan.offloaded["weights"] > 60 * GB and plan.offloaded["experts"] == 0 == plan.offloaded["kv"]
    # the decode step cannot beat the link: every offloaded byte but the host-gathered
    # embedding's crosses it each step, at most at the link's bandwidth
    assert plan.step_time_decode >= plan.offloaded_bytes / host.bandwidth
    assert plan.step_time_decode >= plan.transfer_bytes_decode / (HOST_TRANSFER_EFFICIENCY * host.bandwidth)
    assert plan.step_time_decode < 1.1 * plan.transfer_bytes_decode / (HOST_TRANSFER_EFFICIENCY * host.bandwidth)
    # identical layers: the same share of each stays in HBM
    assert max(plan.hbm_fraction) - min(plan.hbm_fraction) < 1e-6
    assert plan.head_hbm_fraction["embedding"] == 0.0  # rows gathered on the host: almost free


def test_llama_70b_plan_respects_both_capacities(std, h100, llama70_on_one_h100):
    gpu, _, _ = h100
    m, plan = std.models["llama-3.1-70b"], llama70_on_one_h100
    budget = memory_budget(m, gpu.memory, tp=1, scheduler=Scheduler(max_batched_tokens=2048))
    kv = 16 * 1024 * budget.kv_bytes_per_token
    resident = weight_bytes_per_rank(m) - plan.offloaded_bytes
    assert resident + kv + plan.staging_bytes <= plan.hbm_budget * (1 + 1e-9)
    assert plan.hbm_budget == budget.usable - budget.activations - budget.reserve
    assert plan.hbm_budget - (resident + kv + plan.staging_bytes) < 0.01 * GB  # HBM is the binding constraint
    # a host just big enough works; a smaller one is refused
    need = plan.offloaded_bytes
    tight = plan_offload(m, gpu, h100[1], int(need * 1.001), tp=1, scheduler=Scheduler(max_batched_tokens=2048),
                         kv_tokens_needed=16 * 1024)
    assert tight.offloaded_bytes <= need * 1.001
    with pytest.raises(OffloadInfeasible, match="short"):
        plan_offload(m, gpu, h100[1], int(need * 0.9), tp=1, scheduler=Scheduler(max_batched_tokens=2048),
                     kv_tokens_needed=16 * 1024)


def test_weights_beyond_hbm_and_host_raise_a_clear_error(std, h100):
    gpu, host, _ = h100
    m = std.models["llama-3.1-405b"]
    with pytest.raises(OffloadInfeasible, match=r"llama-3.1-405b needs .* GiB of weights per GPU .* GiB short"):
        plan_offload(m, gpu, host, 100 * 2**30, tp=1, scheduler=Scheduler(max_batched_tokens=2048),
                     kv_tokens_needed=1024)


def test_kv_that_does_not_fit_raises_unless_kv_may_move(std, h100):
    gpu, host, _ = h100
    m = std.models["llama-3.1-8b"]
    kv_tokens = 1 << 20  # 128 GiB of KV
    with pytest.raises(OffloadInfeasible, match="KV cache"):
        plan_offload(m, gpu, host, TiB, tp=1, scheduler=Scheduler(max_batched_tokens=2048),
                     kv_tokens_needed=kv_tokens)
    plan = plan_offload(m, gpu, host, TiB, tp=1, scheduler=Scheduler(max_batched_tokens=2048),
                        kv_tokens_needed=kv_tokens, allow_kv_offload=True)
    assert plan.offloaded["kv"] > 50 * GB
    assert plan.step_time_decode >= plan.transfer_bytes_decode / (HOST_TRANSFER_EFFICIENCY * host.bandwidth)


def test_moe_offloads_routed_experts_first(std, h100):
    gpu, host, _ = h100
    m = std.models["mixtral-8x7b"]  # 93 GB of weights on one 80 GB GPU
    plan = plan_offload(m, gpu, host, TiB, tp=1, scheduler=Scheduler(max_batched_tokens=2048), kv_tokens_needed=8192)
    assert plan.offloaded["experts"] > 15 * GB
    # attention stays in every layer; the embedding (gathered on the host) and the LM head
    # leave: the LM head streams no more than a layer does, so it costs no extra buffer
    assert plan.dense_hbm_fraction == [1.0] * 32
    assert plan.head_hbm_fraction == {"embedding": 0.0, "lm_head": 0.0}
    assert plan.offloaded["weights"] == 2 * 32000 * 4096 * 2
    assert all(0 < k <= 8 for k in plan.experts_offloaded)
    assert max(plan.expert_hbm_fraction) - min(plan.expert_hbm_fraction) < 1e-6


def test_prefill_weight_trades_decode_for_prefill(std, h100):
    gpu, host, _ = h100
    m = std.models["llama-3.1-70b"]
    args = dict(tp=1, scheduler=Scheduler(max_batched_tokens=8192), kv_tokens_needed=16 * 1024)
    decode_only = plan_offload(m, gpu, host, 2 * TiB, **args)
    both = plan_offload(m, gpu, host, 2 * TiB, prefill_weight=1.0, **args)

    def blend(p):
        return p.step_time_decode + p.step_time_prefill

    assert blend(both) <= blend(decode_only) * (1 + 1e-6)
    assert both.step_time_decode >= decode_only.step_time_decode * (1 - 1e-6)


def test_the_embedding_can_be_pinned(std, h100, llama70_on_one_h100):
    gpu, host, _ = h100
    m = std.models["llama-3.1-70b"]
    plan = plan_offload(m, gpu, host, 2 * TiB, tp=1, scheduler=Scheduler(max_batched_tokens=2048),
                        kv_tokens_needed=16 * 1024, embedding_on_host=False)
    assert plan.head_hbm_fraction["embedding"] == 1.0
    # its 2.1 GB now displace layer weights, which stream: the decode step gets slower
    assert plan.offloaded_bytes == pytest.approx(llama70_on_one_h100.offloaded_bytes, rel=0.01)
    assert plan.step_time_decode > llama70_on_one_h100.step_time_decode * 1.02


def test_an_offload_plan_at_its_budget_passes_the_verifier(tmp_path, capsys):
    """The LP fills HBM to its budget and may overshoot it by its tolerance (here a byte, and
    the rounding of the streaming buffer): the memory map keeps the slack free, so the plan is
    within the usable memory. This GPU size once ended in an internal error (F0524 from the
    verifier on the optimizer's own plan)."""
    from flowc.cli import main
    from flowc.compiler.model.memory import memory_budget as budget_of
    from flowc.compiler.plan import Plan

    (tmp_path / "tight.flow").write_text(OFFLOAD_SPEC.format(memory=604298866))
    assert main(["compile", str(tmp_path / "tight.flow"), "-o", str(tmp_path / "plan.json")]) == 0
    capsys.readouterr()
    group = Plan.model_validate_json((tmp_path / "plan.json").read_text()).deployments[0].groups[0]
    m = group.memory
    assert m.offloaded["weights"] > 0
    usable = budget_of(Plan.model_validate_json((tmp_path / "plan.json").read_text()).deployments[0].model_spec,
                       m.capacity, scheduler=group.scheduler, vendor="cpu").usable
    assert m.weights + m.kv_cache + m.activations + m.reserve <= usable
    assert main(["verify", str(tmp_path / "plan.json")]) == 0
