"""Offloaded weights in the runtime: a plan whose memory map keeps part of the weights in host
memory (the optimizer's offload LP placed them) runs token for token as the same plan with every
weight on the device and as Hugging Face transformers; the parameters the runtime keeps in host
memory are really outside the device's, and the device holds what the plan says. On CPU here;
on a CUDA machine the same tests run there when the plan is retargeted (`_on_device`)."""

from __future__ import annotations

import pytest
import torch
from flow_samples import OFFLOAD_SPEC
from runtime_models import hf_greedy, sample_prompts, tiny_spec

import flowc.cli
from flowc.compiler.model.geometry import kv_bytes_per_token_per_rank, weight_bytes_per_rank
from flowc.compiler.model.memory import GPU_MEMORY_UTILIZATION, memory_budget
from flowc.compiler.optimize.candidates import OFFLOAD_SLACK
from flowc.compiler.optimize.instance_plan import instance_plan
from flowc.compiler.optimize.offload import OffloadInfeasible, plan_offload
from flowc.compiler.plan import Scheduler
from flowc.compiler.plan_io import plan_problems
from flowc.compiler.spec import Model
from flowc.runtime.engine import Engine, EngineError, Request, load_plan
from flowc.runtime.sequence import SamplingParams
from flowc.stdlib_listing import stdlib_spec

pytest.importorskip("transformers")

SETTINGS = dict(max_batched_tokens=32, chunk_size=16, max_seqs=4, block_size=16, kv_blocks=8)
MAX_TOKENS = [9, 6, 8, 7]
CUDA = torch.cuda.is_available()


def _with_memory(plan, **update):
    group = plan.deployments[0].groups[0]
    group = group.model_copy(update={"memory": group.memory.model_copy(update=update)})
    return plan.model_copy(update={"deployments": [plan.deployments[0].model_copy(update={"groups": [group]})]})


def _on_device(plan):
    """The plan on this machine's accelerator when it has one (vendor nvidia: the runtime picks CUDA)."""
    if not CUDA:
        return plan
    group = plan.deployments[0].groups[0].model_copy(update={"vendor": "nvidia"})
    return plan.model_copy(update={"deployments": [plan.deployments[0].model_copy(update={"groups": [group]})]})


def offloaded_plan(variant: str, hbm_share: float, tp: int = 1):
    """(the plan with every weight on the device, the same plan with the placement the offload LP
    finds when the GPU's weight budget holds `hbm_share` of the rank's weights, the LP's plan):
    the memory map written as compile writes it (optimize/compile.py)."""
    spec, std = tiny_spec(variant), stdlib_spec()
    gpu = std.gpus["cpu-local"]
    base = instance_plan(spec, tp=tp, **SETTINGS)
    weights = weight_bytes_per_rank(spec, tp)
    budget = memory_budget(spec, gpu.memory, tp=tp, vendor=gpu.vendor)
    kv_tokens = SETTINGS["kv_blocks"] * SETTINGS["block_size"]
    # a GPU whose usable memory leaves the weights `hbm_share` of their bytes
    need = budget.reserve + budget.activations + kv_tokens * budget.kv_bytes_per_token + hbm_share * weights
    small = gpu.model_copy(update={"memory": int(need * gpu.memory / budget.usable) + 1})
    link = std.links[gpu.host_link]
    lp = plan_offload(spec, small, link, 1 << 30, tp=tp, scheduler=base.deployments[0].groups[0].scheduler,
                      kv_tokens_needed=kv_tokens, intra_link=link,
                      activation_bytes=budget.activations)
    assert lp.status == "OPTIMAL" and lp.offloaded_bytes > 0
    mm = base.deployments[0].groups[0].memory
    extra = lp.staging_bytes + OFFLOAD_SLACK  # the streaming buffer, and the LP's slack (compile leaves it free)
    host = lp.offloaded["weights"] + lp.offloaded["experts"]
    plan = _with_memory(base, weights=weights - host, offloaded=dict(lp.offloaded), reserve=mm.reserve + extra,
                        capacity=mm.capacity - host + extra)
    assert plan_problems(plan) == []
    return _on_device(base), _on_device(plan), lp


def _generate(plan, path, **kwargs):
    prompts = sample_prompts(plan.deployments[0].model_spec.vocab, n=len(MAX_TOKENS))
    requests = [Request(p, SamplingParams(max_tokens=n)) for p, n in zip(prompts, MAX_TOKENS)]
    with Engine.from_plan(plan, path, **kwargs) as engine:
        tokens = [o.output_token_ids for o in engine.generate(requests)]
        state = getattr(engine.runner, "state", None)
        placement = state.offloaded if state is not None else None
        return tokens, placement, state


def _storage(t: torch.Tensor) -> tuple[int, int]:
    return t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()


def _inside(t: torch.Tensor, buffer: torch.Tensor) -> bool:
    start, end = buffer.data_ptr(), buffer.data_ptr() + buffer.numel() * buffer.element_size()
    return start <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= end


@pytest.mark.parametrize("variant, hbm_share", [("llama", 0.8), ("qwen2", 0.9)])
def test_offloaded_plan_gives_the_tokens_of_the_resident_one_and_transformers(saved, variant, hbm_share):
    path = saved(variant)
    resident, offloaded, lp = offloaded_plan(variant, hbm_share)
    expected = hf_greedy(path, sample_prompts(tiny_spec(variant).vocab, n=len(MAX_TOKENS)), MAX_TOKENS)
    assert _generate(resident, path)[0] == expected
    tokens, placement, state = _generate(offloaded, path)
    assert tokens == expected
    assert placement is not None and placement.host, "the plan was meant to offload"
    _check_placement(state, offloaded)
    # the LP's double buffer, give or take the runtime's whole-matrix granularity
    assert placement.staging_bytes <= lp.staging_bytes + 2 * max(placement.sizes.values())


def _check_placement(state, plan) -> None:
    """Host parameters outside the device's set, streamed ones inside the staging slots, the
    device's bytes the plan's `weights` within a matrix, host + device = geometry's bytes."""
    placement, model = state.offloaded, state.model
    group, spec = plan.deployments[0].groups[0], plan.deployments[0].model_spec
    mm = group.memory
    staging = placement.staging
    params = dict(model.named_parameters())
    streamed = {n for n, p in params.items() if _inside(p, staging)}
    assert streamed <= placement.host
    for name in placement.host:
        host = model.host_embed if name == "embed" and name not in streamed else None
        if name in streamed:  # its host copy, kept by the streamer
            host = next(h for pairs in placement.copies for v, h in pairs if v.data_ptr() == params[name].data_ptr())
        assert host is not None and host.device.type == "cpu"
        assert host.is_pinned() == (staging.device.type == "cuda")
        assert not _inside(host, staging) and _storage(host) != _storage(staging)
    for name, p in params.items():
        if name not in placement.host:
            assert p.device == staging.device and not _inside(p, staging)
            assert all(_storage(p) != _storage(h) for pairs in placement.copies for _, h in pairs)
    # bytes: geometry's weights per rank split between device and host as the plan says
    matrix = max(placement.sizes.values())
    assert placement.resident_bytes + placement.host_bytes == pytest.approx(
        weight_bytes_per_rank(spec, group.tp, group.pp), abs=spec.hidden * 4)  # vocabulary padding rows
    assert abs(placement.resident_bytes - mm.weights) <= matrix
    assert placement.host_bytes == pytest.approx(sum(mm.offloaded.values()), abs=matrix)
    # two slots, each the largest streamed unit's bytes, within the streaming buffer and the slack the plan
    # leaves (compile keeps the offload LP's slack free: the slots may exceed the LP's buffer by a matrix or so)
    largest = max(sum(-(-v.numel() * v.element_size() // 256) * 256 for v, _ in pairs) for pairs in placement.copies)
    assert placement.staging_bytes == 2 * largest
    assert placement.resident_bytes + placement.staging_bytes <= mm.weights + mm.reserve + mm.free


def test_offloaded_experts_stream_too(saved):
    """Mixtral with routed experts in host memory (the category the optimizer offloads first)."""
    path = saved("mixtral")
    base = _on_device(instance_plan(tiny_spec("mixtral"), **SETTINGS))
    spec = tiny_spec("mixtral")
    weights = weight_bytes_per_rank(spec)
    one_layer_experts = 4 * 3 * spec.hidden * spec.ffn * 4  # fp32: one layer's gate_up and down
    offloaded = {"weights": spec.vocab * spec.hidden * 4, "experts": one_layer_experts, "kv": 0}
    mm = base.deployments[0].groups[0].memory
    extra = one_layer_experts + OFFLOAD_SLACK  # the slots hold half a layer's experts each, about
    plan = _with_memory(base, weights=weights - sum(offloaded.values()), offloaded=offloaded,
                        reserve=mm.reserve + extra, capacity=mm.capacity - sum(offloaded.values()) + extra)
    assert plan_problems(plan) == []
    expected = hf_greedy(path, sample_prompts(spec.vocab, n=len(MAX_TOKENS)), MAX_TOKENS)
    tokens, placement, state = _generate(plan, path)
    assert tokens == expected
    assert any(n.endswith("mlp.gate_up") or n.endswith("mlp.down") for n in placement.host)
    _check_placement(state, plan)


def test_tp2_offloaded_plan_matches_one_process(saved):
    if CUDA and torch.cuda.device_count() < 2:
        pytest.skip("tp 2 on CUDA needs two devices")
    path = saved("llama")
    try:
        resident, offloaded, _ = offloaded_plan("llama", 0.8, tp=2)
    except OffloadInfeasible:
        pytest.skip("the LP finds no placement for this tiny rank")
    expected = _generate(resident, path, share_cores=True)[0]
    assert _generate(offloaded, path, share_cores=True)[0] == expected


def test_kv_in_host_memory_is_refused():
    base = instance_plan(tiny_spec("llama"), **SETTINGS)
    plan = _with_memory(base, offloaded={"weights": 0, "experts": 0, "kv": 4096})
    with pytest.raises(EngineError, match=r"keeps kv in host memory, which the flowc runtime does not stream"):
        Engine.from_plan(plan)


def test_a_plan_flowc_compile_offloads_runs_token_identical(tmp_path):
    """`flowc compile` offloads when the spec's GPU holds the activations, the runtime reserve,
    the KV of the requests the optimizer keeps (candidates.OFFLOAD_KV_REQUESTS; the LP's 1 MiB
    slack) and only ~70% of the weights; the plan runs as the same model all on the device."""
    model = Model(name="small-llama", architecture="llama", layers=2, hidden=256, heads=4, kv_heads=2, head_dim=64,
                  ffn=512, vocab=1024, max_context=512, weights="fp32", kv="fp32")
    budget = memory_budget(model, 1 << 30, scheduler=Scheduler(max_batched_tokens=64, max_seqs=8), vendor="cpu")
    usable = (budget.reserve + budget.activations + OFFLOAD_SLACK + 128 * kv_bytes_per_token_per_rank(model)
              + 0.7 * weight_bytes_per_rank(model))
    spec = tmp_path / "offload.flow"
    spec.write_text(OFFLOAD_SPEC.format(memory=int(usable / GPU_MEMORY_UTILIZATION) + 1))
    assert flowc.cli.main(["compile", str(spec), "-o", str(tmp_path / "plan.json")]) == 0
    plan = _on_device(load_plan(tmp_path / "plan.json"))
    mm = plan.deployments[0].groups[0].memory
    assert mm.offloaded["weights"] > 0, "the spec was meant to force offload"
    resident = _on_device(instance_plan(plan.deployments[0].model_spec, max_batched_tokens=64, max_seqs=8))
    tokens, _, state = _generate(plan, None, seed=3)
    assert tokens == _generate(resident, None, seed=3)[0]
    _check_placement(state, plan)
