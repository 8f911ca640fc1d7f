"""The plan verifier (compiler/verify/): sound plans verify clean, and each corruption of one
gives exactly its code.

Plans are built by hand here (`build_plan`, playing the optimizer): memory maps from
`memory_budget`, predictions from the cost model and simulator run the way the plan contract
says (seed 0, least_work router), goodput from `goodput_search`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Optional

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

import flowc
from flowc.cli import _Output
from flowc.compiler.model.cost import CostModel, Parallelism
from flowc.compiler.model.goodput import goodput_search
from flowc.compiler.model.memory import memory_budget
from flowc.compiler.model.simulator import InstanceConfig, simulate
from flowc.compiler.model.topology import cluster_shape
from flowc.compiler.model.workload import sample_requests
from flowc.compiler.optimize.arena import pack_step
from flowc.compiler.plan import (
    DeploymentPlan,
    GpuRef,
    Instance,
    InstanceGroup,
    MemoryMap,
    Percentiles,
    Plan,
    Predicted,
    Scheduler,
    SolverStatus,
)
from flowc.compiler.plan_io import load_plan_file
from flowc.compiler.spec import Spec
from flowc.compiler.verify import verify_plan
from flowc.verify_cmd import cmd_verify

GiB = 1 << 30

SPEC_TEXT = """\
use std.gpus
use std.models

link slow {{
  kind ethernet
  bandwidth 250 MB/s
}}

cluster box {{
  node x {nodes} {{
    gpu h100-sxm x {gpus}
    link_domain {domain}
    host_memory 512 GiB
  }}
{network}}}

workload chat {{
  arrival poisson {rate} req/s
  prompt uniform(200 tok, 600 tok)
  output uniform(20 tok, 80 tok)
  requests 200 req
}}

slo fast {{
  ttft p90 <= 2 s
  tpot p90 <= 200 ms
}}

deploy chat {{
  model llama-3.1-8b
  on box
  serve chat under fast
  max_batched_tokens in [512 tok, 2048 tok, 8192 tok]
  max_seqs in [64, 256]
  block_size in [16 tok, 32 tok]
  {allow}
}}
"""


@lru_cache(maxsize=None)
def make_spec(nodes: int = 1, gpus: int = 4, domain: Optional[int] = None, network: str = "ib-ndr x 8",
              rate: float = 4, allow: str = "allow disaggregation") -> Spec:
    text = SPEC_TEXT.format(nodes=nodes, gpus=gpus, domain=domain or gpus, rate=rate, allow=allow,
                            network=f"  network {network}\n" if nodes > 1 else "")
    return flowc.load(text)


def without_network(spec: Spec) -> Spec:
    """The spec with the network removed (the checker would refuse it as text: F0310)."""
    cluster = spec.clusters["box"].model_copy(update={"network": None})
    return spec.model_copy(update={"clusters": {"box": cluster}})


@dataclass
class Group:
    role: str
    tp: int
    pp: int
    instances: list[list[tuple[int, int]]]
    max_batched_tokens: int = 8192
    max_seqs: int = 256
    block_size: int = 16
    chunked: bool = True
    ep: int = 1


def _nodes(spec: Spec):
    return [group for group in spec.clusters["box"].nodes for _ in range(group.count)]


def _scheduler(g: Group) -> Scheduler:
    return Scheduler(max_batched_tokens=g.max_batched_tokens, chunked_prefill=g.chunked, max_seqs=g.max_seqs,
                     block_size=g.block_size)


def _instance_configs(spec: Spec, groups: list[Group], budgets, blocks: list[int]) -> list[InstanceConfig]:
    d = spec.deployments["chat"]
    cluster = spec.clusters["box"]
    nodes = _nodes(spec)
    decode_nodes = [{n for n, _ in inst} for g in groups if g.role == "decode" for inst in g.instances]
    configs = []
    for g, _, kv_blocks in zip(groups, budgets, blocks):
        for inst in g.instances:
            on = {n for n, _ in inst}
            remote = len(on) > 1 or (g.role == "prefill" and any(q != on for q in decode_nodes))
            cost = CostModel(d.model, spec.gpus["h100-sxm"], nodes[inst[0][0]].link,
                             parallelism=Parallelism(tp=g.tp, pp=g.pp, ep=g.ep),
                             inter_link=cluster.network if remote else None)
            # the engine's ways of scheduling (model/engines.py), as the plan's engine runs them
            configs.append(InstanceConfig(cost=cost, pp=g.pp, kv_capacity_tokens=kv_blocks * g.block_size,
                                          scheduler=_scheduler(g), role=g.role,
                                          mixed_prefill=cost.engine.mixed_prefill,
                                          request_latency=cost.request_time))
    return configs


def build_plan(spec: Spec, groups: list[Group], mode: Optional[str] = None, kv_blocks: Optional[int] = None) -> Plan:
    """A correct plan of deployment `chat` with these groups, as the optimizer should write it;
    with `kv_blocks`, each instance keeps at most that many KV blocks (fewer than fit is sound)."""
    d = spec.deployments["chat"]
    gpu = spec.gpus["h100-sxm"]
    budgets = [memory_budget(d.model, gpu.memory, tp=g.tp, pp=g.pp, scheduler=_scheduler(g)) for g in groups]
    blocks = [b.kv_blocks if kv_blocks is None else min(kv_blocks, b.kv_blocks) for b in budgets]
    configs = _instance_configs(spec, groups, budgets, blocks)
    workload, slo = spec.workloads[d.workload], spec.slos[d.slo]
    result = simulate(sample_requests(workload, seed=0), configs, router="least_work")
    # lo = the workload's rate: a plan that meets the SLO there claims at least that goodput
    rate = goodput_search(configs, workload, slo, seed=0, lo=workload.arrival.rate).goodput
    n_gpus = sum(g.tp * g.pp * len(g.instances) for g in groups)

    def pct(metric: str) -> Percentiles:
        return Percentiles(**{f"p{p}": result.percentile(metric, p) * 1e3 for p in (50, 90, 99)})

    plan_groups = []
    for g, b, n_blocks in zip(groups, budgets, blocks):
        layout = pack_step(d.model, g.tp, _scheduler(g))
        cats = b.by_category()
        if n_blocks < b.kv_blocks:
            cats["kv_cache"] = n_blocks * b.kv_bytes_per_token * g.block_size
            cats["free"] = gpu.memory - cats["weights"] - cats["kv_cache"] - cats["activations"] - cats["reserve"]
        plan_groups.append(InstanceGroup(
            role=g.role, gpu="h100-sxm", tp=g.tp, pp=g.pp, ep=g.ep,
            instances=[Instance(gpus=[GpuRef(node=n, index=i) for n, i in inst]) for inst in g.instances],
            scheduler=Scheduler(max_batched_tokens=g.max_batched_tokens,
                                chunked_prefill=g.chunked, chunk_size=g.max_batched_tokens,
                                max_seqs=g.max_seqs, block_size=g.block_size),
            memory=MemoryMap(capacity=gpu.memory, weights=cats["weights"], kv_cache=cats["kv_cache"],
                             kv_blocks=n_blocks, activations=cats["activations"], reserve=cats["reserve"],
                             free=cats["free"], arena_offsets=layout.offsets, arena_sizes=layout.sizes),
            capacity_rps=float(rate) / max(1, len(g.instances))))
    predicted = Predicted(ttft_ms=pct("ttft"), tpot_ms=pct("tpot"), e2e_ms=pct("e2e"),
                          output_tokens_per_s=result.output_throughput, goodput_rps=float(rate),
                          goodput_rps_per_gpu=float(rate) / n_gpus, attainment=result.attainment(slo)["joint"]["share"],
                          meets_slo=result.meets(slo))
    deployment = DeploymentPlan(name="chat", cluster="box", model=d.model.name, weights=d.model.weights, kv=d.model.kv,
                                model_spec=d.model.model_copy(update={"location": None}),
                                mode=mode or ("disaggregated" if groups[0].role != "colocated" else "colocated"),
                                objective=d.objective, groups=plan_groups, predicted=predicted)
    return Plan(flowc_version=flowc.__version__, spec_files=["main.flow"],
                clusters={"box": cluster_shape(spec.clusters["box"])}, deployments=[deployment],
                solver=SolverStatus(status="optimal", objective=float(rate), bound=float(rate), gap=0.0))


def edit(plan: Plan, change) -> Plan:
    """A copy of the plan with `change(document)` applied to its JSON document (dicts and lists)."""
    document = json.loads(plan.model_dump_json())
    change(document)
    return Plan.model_validate(document)


def codes(plan: Plan, spec: Spec) -> list[str]:
    return [d.code for d in verify_plan(plan, spec)]


# ---------------------------------------------------------------------------------- the base case

TWO_TP2 = [Group("colocated", 2, 1, [[(0, 0), (0, 1)], [(0, 2), (0, 3)]])]


@pytest.fixture(scope="module")
def spec() -> Spec:
    return make_spec()


@pytest.fixture(scope="module")
def plan(spec) -> Plan:
    return build_plan(spec, TWO_TP2)


def test_correct_plan_verifies_clean(plan, spec):
    assert verify_plan(plan, spec) == []
    assert plan.deployments[0].predicted.meets_slo


def test_correct_plan_roundtrips_through_json(plan, spec):
    assert verify_plan(Plan.model_validate_json(plan.model_dump_json()), spec) == []


def _memory(document, **changes):
    document["deployments"][0]["groups"][0]["memory"].update(changes)


def _set_gpu(instance: int, rank: int, node: int, index: int):
    def change(document):
        document["deployments"][0]["groups"][0]["instances"][instance]["gpus"][rank] = {"node": node, "index": index}
    return change


def test_gpu_out_of_range(plan, spec):
    found = verify_plan(edit(plan, _set_gpu(1, 1, 0, 7)), spec)
    assert [d.code for d in found] == ["F0521"]
    assert "n0g7" in found[0].message
    assert found[0].span is None
    assert "at deployments[0].groups[0].instances[1].gpus[1]" in found[0].notes
    assert found[0].help


def test_node_out_of_range(plan, spec):
    assert codes(edit(plan, _set_gpu(0, 0, 3, 0)), spec) == ["F0521"]


def test_gpu_shared(plan, spec):
    found = verify_plan(edit(plan, _set_gpu(1, 0, 0, 1)), spec)
    assert [d.code for d in found] == ["F0522"]
    assert "n0g1" in found[0].message


def test_gpu_shared_across_deployments():
    spec = make_spec(gpus=8, allow="")
    two = spec.model_copy(update={"deployments": {
        "chat": spec.deployments["chat"],
        "chat2": spec.deployments["chat"].model_copy(update={"name": "chat2"})}})
    plan = build_plan(spec, TWO_TP2)
    second = plan.deployments[0].model_copy(update={"name": "chat2"})
    both = plan.model_copy(update={"deployments": [plan.deployments[0], second]})
    assert codes(both, two) == ["F0522", "F0522", "F0522", "F0522"]
    moved = edit(both, lambda doc: [inst["gpus"].__setitem__(r, {"node": 0, "index": inst["gpus"][r]["index"] + 4})
                                    for inst in doc["deployments"][1]["groups"][0]["instances"] for r in range(2)])
    assert codes(moved, two) == []


def test_same_gpu_index_on_two_clusters_is_not_shared():
    spec = make_spec(allow="")
    box2 = spec.clusters["box"].model_copy(update={"name": "box2"})
    chat2 = spec.deployments["chat"].model_copy(update={"name": "chat2", "cluster": "box2"})
    two = spec.model_copy(update={"clusters": {**spec.clusters, "box2": box2},
                                  "deployments": {"chat": spec.deployments["chat"], "chat2": chat2}})
    plan = build_plan(spec, TWO_TP2)
    second = plan.deployments[0].model_copy(update={"name": "chat2", "cluster": "box2"})
    assert codes(plan.model_copy(update={"deployments": [plan.deployments[0], second]}), two) == []


def test_tp_group_across_link_domains():
    spec = make_spec(domain=2)
    plan = build_plan(spec, TWO_TP2)
    assert codes(plan, spec) == []
    crossed = edit(plan, lambda doc: doc["deployments"][0]["groups"][0].update(instances=[
        {"gpus": [{"node": 0, "index": 1}, {"node": 0, "index": 2}]},
        {"gpus": [{"node": 0, "index": 0}, {"node": 0, "index": 3}]}]))
    found = verify_plan(crossed, spec)
    assert [d.code for d in found] == ["F0523", "F0523"]
    assert "link domains 0, 1" in found[0].message


def test_stages_across_nodes_without_network():
    spec = without_network(make_spec(nodes=2, gpus=2))
    one_node = build_plan(spec, [Group("colocated", 1, 2, [[(0, 0), (0, 1)]])])
    assert codes(one_node, spec) == []
    split = edit(one_node, lambda doc: doc["deployments"][0]["groups"][0]["instances"][0]["gpus"].__setitem__(
        1, {"node": 1, "index": 0}))
    found = verify_plan(split, spec)
    assert [d.code for d in found] == ["F0523"]
    assert "no network" in found[0].message
    # with a network the same placement is sound
    assert codes(build_plan(make_spec(nodes=2, gpus=2), [Group("colocated", 1, 2, [[(0, 0), (1, 0)]])]),
                 make_spec(nodes=2, gpus=2)) == []


def test_instance_gpu_count_and_divisibility(plan, spec):
    assert codes(edit(plan, lambda doc: doc["deployments"][0]["groups"][0]["instances"][0]["gpus"].pop()), spec) \
        == ["F0523"]
    three = edit(plan, lambda doc: doc["deployments"][0]["groups"][0].update(
        tp=3, instances=[{"gpus": [{"node": 0, "index": i} for i in range(3)]}]))
    assert set(codes(three, spec)) == {"F0523"}
    assert codes(edit(plan, lambda doc: doc["deployments"][0]["groups"][0].update(ep=2)), spec) == ["F0523"]


def test_weights_understated(plan, spec):
    mm = plan.deployments[0].groups[0].memory
    found = verify_plan(edit(plan, lambda doc: _memory(doc, weights=mm.weights - GiB, free=mm.free + GiB)), spec)
    assert [d.code for d in found] == ["F0524"]
    assert "weights" in found[0].message


def test_kv_blocks_overstated(plan, spec):
    mm = plan.deployments[0].groups[0].memory
    found = codes(edit(plan, lambda doc: _memory(doc, kv_blocks=mm.kv_blocks + 1000)), spec)
    assert found and set(found) == {"F0524"}


def test_memory_map_must_add_up(plan, spec):
    mm = plan.deployments[0].groups[0].memory
    assert codes(edit(plan, lambda doc: _memory(doc, free=mm.free + 1)), spec) == ["F0524"]
    assert codes(edit(plan, lambda doc: _memory(doc, reserve=mm.reserve - GiB, free=mm.free + GiB)), spec) == ["F0524"]
    assert codes(edit(plan, lambda doc: _memory(doc, capacity=mm.capacity * 2, free=mm.free + mm.capacity)), spec) \
        == ["F0524"]


def test_offload_without_allow(plan, spec):
    found = verify_plan(edit(plan, lambda doc: _memory(doc, offloaded={"kv": GiB})), spec)
    assert [d.code for d in found] == ["F0524"]
    assert "allow offload" in found[0].message


def test_offload_allowed_must_fit_host_memory():
    spec = make_spec(allow="allow offload")
    plan = build_plan(spec, TWO_TP2)
    assert codes(edit(plan, lambda doc: _memory(doc, offloaded={"kv": 100 * GiB})), spec) == []
    assert codes(edit(plan, lambda doc: _memory(doc, offloaded={"kv": 200 * GiB})), spec) == ["F0524"]
    # offloaded weights leave room on the GPU: weights on the GPU + offloaded = the model's
    # (categories of compiler/optimize/offload.py: "weights", "experts", "kv")
    mm = plan.deployments[0].groups[0].memory
    assert codes(edit(plan, lambda doc: _memory(doc, weights=mm.weights - GiB, free=mm.free + GiB,
                                                offloaded={"weights": GiB})), spec) == []
    assert codes(edit(plan, lambda doc: _memory(doc, weights=mm.weights - GiB, free=mm.free + GiB,
                                                offloaded={"weights": GiB // 2})), spec) == ["F0524"]


def test_disaggregated_kv_traffic_beyond_slow_network():
    groups = [Group("prefill", 1, 1, [[(0, 0)], [(0, 1)]]), Group("decode", 1, 1, [[(1, 0)], [(1, 1)]])]
    fast = make_spec(nodes=2, gpus=2, rate=8)
    assert codes(build_plan(fast, groups), fast) == []
    slow = make_spec(nodes=2, gpus=2, rate=8, network="slow x 1")
    found = verify_plan(build_plan(slow, groups), slow)
    assert [d.code for d in found] == ["F0525", "F0525"]  # out of n0, into n1
    assert "GB/s" in found[0].message and "n0" in found[0].message
    # on one node the same traffic goes over NVLink
    local = [Group("prefill", 1, 1, [[(0, 0)]]), Group("decode", 1, 1, [[(0, 1)]])]
    assert codes(build_plan(slow, local), slow) == []


def test_disaggregation_needs_allow():
    spec = make_spec(allow="")
    plan = build_plan(spec, [Group("prefill", 1, 1, [[(0, 0)]]), Group("decode", 1, 1, [[(0, 1)]])])
    assert codes(plan, spec) == ["F0520"]


def test_predicted_ttft_3x_off(plan, spec):
    p50 = plan.deployments[0].predicted.ttft_ms.p50
    found = verify_plan(edit(plan, lambda doc: doc["deployments"][0]["predicted"]["ttft_ms"].update(p50=p50 * 3)),
                        spec)
    assert [d.code for d in found] == ["F0526"]
    assert "TTFT" in found[0].message


def test_predictions_within_tolerance_pass(plan, spec):
    p50 = plan.deployments[0].predicted.tpot_ms.p50
    assert codes(edit(plan, lambda doc: doc["deployments"][0]["predicted"]["tpot_ms"].update(p50=p50 * 1.1)),
                 spec) == []
    assert codes(edit(plan, lambda doc: doc["deployments"][0]["predicted"]["tpot_ms"].update(p50=p50 * 1.3)),
                 spec) == ["F0526"]


def test_the_chunked_prefill_flag_is_what_gets_simulated(spec):
    small = [Group("colocated", 2, 1, TWO_TP2[0].instances, max_batched_tokens=512, chunked=chunked)
             for chunked in (True, False)]
    chunked, unchunked = (build_plan(spec, [g]) for g in small)
    # prompts of up to 600 tokens: without chunking some never fit a 512-token budget
    assert chunked.deployments[0].predicted.meets_slo and not unchunked.deployments[0].predicted.meets_slo
    assert codes(chunked, spec) == [] and codes(unchunked, spec) == []
    flipped = edit(chunked, lambda doc: doc["deployments"][0]["groups"][0]["scheduler"].update(chunked_prefill=False))
    assert codes(flipped, spec) == ["F0526"]


def test_meets_slo_flipped(plan, spec):
    found = codes(edit(plan, lambda doc: doc["deployments"][0]["predicted"].update(meets_slo=False)), spec)
    assert found == ["F0526"]


def test_goodput_below_the_load():
    spec = make_spec()
    plan = build_plan(spec, TWO_TP2)
    assert codes(edit(plan, lambda doc: doc["deployments"][0]["predicted"].update(goodput_rps=2.0,
                                                                                  goodput_rps_per_gpu=0.5)),
                 spec) == ["F0526"]
    # an overstated goodput fails the spot check at 85% of it
    g = plan.deployments[0].predicted.goodput_rps * 10
    assert codes(edit(plan, lambda doc: doc["deployments"][0]["predicted"].update(goodput_rps=g,
                                                                                  goodput_rps_per_gpu=g / 4)),
                 spec) == ["F0526"]


def test_unknown_model(plan, spec):
    found = verify_plan(edit(plan, lambda doc: doc["deployments"][0].update(model="llama-3.1-70b")), spec)
    assert [d.code for d in found] == ["F0520"]
    assert "llama-3.1-70b" in found[0].message


def test_other_spec_mismatches(plan, spec):
    assert codes(edit(plan, lambda doc: doc["deployments"][0].update(name="chatt")), spec) == ["F0520", "F0520"]
    assert codes(edit(plan, lambda doc: doc["deployments"][0].update(cluster="lab")), spec) == ["F0520"]
    assert codes(edit(plan, lambda doc: doc["deployments"][0].update(kv="fp8")), spec) == ["F0520"]
    assert codes(edit(plan, lambda doc: doc["deployments"][0]["groups"][0].update(gpu="h200-sxm")), spec) \
        == ["F0521"] * 4
    assert codes(edit(plan, lambda doc: doc["deployments"][0]["groups"][0].update(gpu="h100-sxmm")), spec) == ["F0520"]


def test_format_version(plan, spec):
    found = verify_plan(plan.model_copy(update={"format_version": "2.0"}), spec)
    assert [d.code for d in found] == ["F0520"]
    assert "2.0" in found[0].message
    assert verify_plan(plan.model_copy(update={"format_version": "1.7"}), spec) == []


def test_search_knobs_and_max_gpus():
    spec = make_spec(allow="tp 1\n  max_gpus 2")
    plan = build_plan(spec, TWO_TP2)
    assert codes(plan, spec) == ["F0520", "F0520"]  # tp 2 not allowed, 4 GPUs > max_gpus 2


def test_nonsense_values_raise_nothing(plan, spec):
    def zero(doc):
        g = doc["deployments"][0]["groups"][0]
        g.update(tp=0, pp=0)
        g["scheduler"].update(block_size=0, max_seqs=-1)
        g["memory"].update(weights=-5)
    assert set(codes(edit(plan, zero), spec)) <= {"F0520", "F0523"}
    assert codes(edit(plan, lambda doc: doc["deployments"][0].update(groups=[])), spec) == ["F0520"]
    assert codes(plan.model_copy(update={"deployments": []}), spec) == ["F0520"]


# ---------------------------------------------------------------------------------- files and the CLI entry

def _write(tmp_path: Path, plan: Plan, spec_text: str) -> Path:
    (tmp_path / "main.flow").write_text(spec_text, encoding="utf-8")
    path = tmp_path / "plan.json"
    path.write_text(plan.model_dump_json(indent=2), encoding="utf-8")
    return path


SPEC_DEFAULT = SPEC_TEXT.format(nodes=1, gpus=4, domain=4, rate=4, allow="allow disaggregation", network="")


def _cli(plan_path, against=None, json_out=False):
    args = argparse.Namespace(command="verify", plan=str(plan_path), against=against, json=json_out, no_color=True,
                              allow_outside=False)
    return cmd_verify(args, _Output(args))


def test_verify_finds_the_spec_in_spec_files(tmp_path, plan, capsys):
    path = _write(tmp_path, plan, SPEC_DEFAULT)
    assert _cli(path) == 0
    assert _cli(path, str(tmp_path / "main.flow")) == 0


def test_verify_finds_the_spec_path_as_compiled(tmp_path, plan, monkeypatch, capsys):
    """A plan that recorded the spec's path relative to where it was compiled still finds it."""
    (tmp_path / "plans").mkdir()
    _write(tmp_path, plan.model_copy(update={"spec_files": ["main.flow"]}), SPEC_DEFAULT)
    (tmp_path / "plans" / "plan.json").write_text(plan.model_dump_json(), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert _cli("plans/plan.json") == 0


def test_a_file_that_is_not_a_plan_is_f0520(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text("{not json", encoding="utf-8")
    assert [d.code for d in load_plan_file(path)[1]] == ["F0520"]
    path.write_text(json.dumps({"format_version": "1.0", "deployments": 3}), encoding="utf-8")
    plan, found = load_plan_file(path)
    assert plan is None and [d.code for d in found] == ["F0520"] and found[0].notes
    path.write_text(json.dumps({"format_version": "3.1"}), encoding="utf-8")
    assert "3.1" in load_plan_file(path)[1][0].message


def test_cmd_verify_exit_codes(tmp_path, plan, capsys):
    path = _write(tmp_path, plan, SPEC_DEFAULT)
    assert _cli(path, str(tmp_path / "main.flow")) == 0
    assert "ok" in capsys.readouterr().out
    # a sound document, but not an H100's memory: the spec says so, not the plan (F0524, not F0520)
    memory = plan.deployments[0].groups[0].memory
    bad = edit(plan, lambda doc: _memory(doc, capacity=memory.capacity + GiB, free=memory.free + GiB))
    (tmp_path / "bad.json").write_text(bad.model_dump_json(), encoding="utf-8")
    assert _cli(tmp_path / "bad.json") == 1
    err = capsys.readouterr().err
    assert "error[F0524]" in err and "1 error" in err
    assert _cli(tmp_path / "bad.json", json_out=True) == 1
    document = json.loads(capsys.readouterr().out)
    assert document["valid"] is False and document["diagnostics"][0]["code"] == "F0524"
    assert _cli(tmp_path / "missing.json") == 2
    assert _cli(path, str(tmp_path / "missing.flow")) == 2
    nameless = plan.model_copy(update={"spec_files": []})
    (tmp_path / "nameless.json").write_text(nameless.model_dump_json(), encoding="utf-8")
    assert _cli(tmp_path / "nameless.json") == 2
    (tmp_path / "broken.flow").write_text("cluster {", encoding="utf-8")
    assert _cli(path, str(tmp_path / "broken.flow")) == 1  # the spec's own diagnostics


def test_verifier_is_independent_of_the_optimizer():
    for path in (Path(__file__).resolve().parents[1] / "compiler" / "verify").glob("*.py"):
        assert "compiler.optimize" not in path.read_text(encoding="utf-8"), path


# ---------------------------------------------------------------------------------- property test

@dataclass
class Layout:
    spec: Spec
    groups: list[Group] = field(default_factory=list)


@st.composite
def layouts(draw) -> Layout:
    nodes = draw(st.sampled_from([1, 2]))
    gpus = draw(st.sampled_from([2, 4, 8]))
    domain = draw(st.sampled_from([d for d in (1, 2, 4, 8) if d <= gpus and gpus % d == 0]))
    spec = make_spec(nodes=nodes, gpus=gpus, domain=domain, rate=draw(st.sampled_from([2, 4])))
    free = [(n, i) for n in range(nodes) for i in range(gpus)]
    disaggregated = draw(st.booleans())
    roles = ["prefill", "decode"] if disaggregated else ["colocated"]
    groups = []
    for role in roles:
        tp = draw(st.sampled_from([t for t in (1, 2, 4) if t <= domain]))
        pp = draw(st.sampled_from([1, 2]))
        per_role = len(free) // (len(roles) - len(groups))
        count = draw(st.integers(1, max(1, per_role // (tp * pp))))
        instances = []
        for _ in range(count):
            instance = []
            for _stage in range(pp):
                # a TP group: tp free GPUs of one domain of one node (stages may land on other nodes)
                for n in draw(st.permutations(range(nodes))):
                    options = [[(n, i) for i in range(start, start + tp)]
                               for base in range(0, gpus, domain) for start in range(base, base + domain - tp + 1, tp)]
                    options = [o for o in options if all(ref in free for ref in o)]
                    if options:
                        chosen = options[0]
                        break
                else:
                    chosen = None
                if chosen is None:
                    break
                instance.extend(chosen)
                for ref in chosen:
                    free.remove(ref)
            if len(instance) == tp * pp:
                instances.append(instance)
            else:
                free.extend(instance)
        if not instances:
            return draw(layouts())
        groups.append(Group(role, tp, pp, instances,
                            max_batched_tokens=draw(st.sampled_from([2048, 8192])),
                            max_seqs=draw(st.sampled_from([64, 256])),
                            block_size=draw(st.sampled_from([16, 32])), chunked=draw(st.booleans())))
    return Layout(spec, groups)


def _corruptions(plan: Plan, spec: Spec):
    """(name, expected code, document change) for single corruptions that apply to this plan."""
    g0 = plan.deployments[0].groups[0]
    mm = g0.memory
    cluster = spec.clusters["box"]
    nodes = sum(group.count for group in cluster.nodes)
    per_node = cluster.nodes[0].gpus_per_node
    first = g0.instances[0].gpus[0]
    all_gpus = [ref for g in plan.deployments[0].groups for inst in g.instances for ref in inst.gpus]
    group0 = lambda doc: doc["deployments"][0]["groups"][0]  # noqa: E731  (a one-line accessor for the edits below)
    out = [
        ("node out of range", "F0521",
         lambda doc: group0(doc)["instances"][0]["gpus"].__setitem__(0, {"node": nodes, "index": first.index})),
        ("index out of range", "F0521",
         lambda doc: group0(doc)["instances"][0]["gpus"].__setitem__(0, {"node": first.node, "index": per_node})),
        ("weights understated", "F0524",
         lambda doc: group0(doc)["memory"].update(weights=mm.weights - GiB, free=mm.free + GiB)),
        ("kv blocks overstated", "F0524", lambda doc: group0(doc)["memory"].update(kv_blocks=mm.kv_blocks * 2 + 10)),
        ("offload not allowed", "F0524", lambda doc: group0(doc)["memory"].update(offloaded={"kv": GiB})),
        ("ttft off", "F0526", lambda doc: doc["deployments"][0]["predicted"]["ttft_ms"].update(
            p50=plan.deployments[0].predicted.ttft_ms.p50 * 3 + 10)),
        ("meets_slo flipped", "F0526", lambda doc: doc["deployments"][0]["predicted"].update(meets_slo=False)),
        ("unknown model", "F0520", lambda doc: doc["deployments"][0].update(model="no-such-model")),
        ("format version", "F0520", lambda doc: doc.update(format_version="2.0")),
        ("pp does not divide layers", "F0523", lambda doc: group0(doc).update(pp=g0.pp * 3)),
    ]
    if len(all_gpus) > 1:
        other = next(ref for ref in all_gpus if ref != first)
        out.append(("gpu shared", "F0522", lambda doc: group0(doc)["instances"][0]["gpus"].__setitem__(
            0, {"node": other.node, "index": other.index})))
    return out


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts(), st.data())
def test_random_plans_verify_clean_and_corruptions_are_caught(layout, data):
    plan = build_plan(layout.spec, layout.groups)
    note(plan.model_dump_json(indent=1))
    assert codes(plan, layout.spec) == []
    name, expected, change = data.draw(st.sampled_from(_corruptions(plan, layout.spec)))
    note(name)
    found = codes(edit(plan, change), layout.spec)
    assert found and set(found) == {expected}, (name, found)


# ---------------------------------------------------------------------------------- the error catalog's plans

def _catalog_spec_text(**changes) -> str:
    values = dict(nodes=1, gpus=4, domain=4, rate=4, allow="allow disaggregation", network="")
    values.update(changes)
    return SPEC_TEXT.format(**values)


CATALOG_KV_BLOCKS = 2048  # fewer than fit, so the static plans survive refinements of the memory model


def catalog_plans() -> dict[str, tuple[str, Plan]]:
    """The F052x fixtures of tests/error_catalog: code -> (main.flow, plan.json). Instances keep
    `CATALOG_KV_BLOCKS` blocks, fewer than fit, and the F0526 fixture's mistake is a claim, not a
    simulated number, so the goldens survive refinements of the memory and cost models."""
    group0 = lambda doc: doc["deployments"][0]["groups"][0]  # noqa: E731  (a one-line accessor for the edits below)
    out = {}
    text = _catalog_spec_text()
    base = build_plan(flowc.load(text), TWO_TP2, kv_blocks=CATALOG_KV_BLOCKS)
    mm = base.deployments[0].groups[0].memory
    out["F0520"] = text, edit(base, lambda doc: doc["deployments"][0].update(model="llama-3.1-70b"))
    out["F0521"] = text, edit(base, lambda doc: group0(doc)["instances"][1]["gpus"].__setitem__(
        1, {"node": 0, "index": 7}))
    out["F0522"] = text, edit(base, lambda doc: group0(doc)["instances"][1]["gpus"].__setitem__(
        0, {"node": 0, "index": 1}))
    out["F0524"] = text, edit(base, lambda doc: group0(doc)["memory"].update(weights=mm.weights - GiB,
                                                                             free=mm.free + GiB))
    out["F0526"] = text, edit(base, lambda doc: doc["deployments"][0]["predicted"].update(goodput_rps=2.0,
                                                                                          goodput_rps_per_gpu=0.5))
    text = _catalog_spec_text(domain=2)
    one = build_plan(flowc.load(text), [Group("colocated", 2, 1, [[(0, 0), (0, 1)]])], kv_blocks=CATALOG_KV_BLOCKS)
    out["F0523"] = text, edit(one, lambda doc: group0(doc)["instances"][0].update(
        gpus=[{"node": 0, "index": 1}, {"node": 0, "index": 2}]))
    text = _catalog_spec_text(nodes=2, gpus=2, domain=2, rate=8, network="  network slow x 1\n")
    groups = [Group("prefill", 1, 1, [[(0, 0)], [(0, 1)]]), Group("decode", 1, 1, [[(1, 0)], [(1, 1)]])]
    out["F0525"] = text, build_plan(flowc.load(text), groups, kv_blocks=CATALOG_KV_BLOCKS)
    return out


def write_catalog_plans(catalog: Path = Path(__file__).resolve().parent / "error_catalog") -> None:
    """Write the F052x fixtures' main.flow and plan.json; then regenerate the goldens with
    FLOWC_UPDATE_GOLDEN=1 python -m pytest tests/test_error_catalog.py -k plan_fixture."""
    for code, (text, plan) in catalog_plans().items():
        folder = catalog / code
        folder.mkdir(exist_ok=True)
        (folder / "main.flow").write_text(text, encoding="utf-8")
        (folder / "plan.json").write_text(plan.model_dump_json(indent=2) + "\n", encoding="utf-8")


def test_catalog_plans_have_one_mistake_each():
    for code, (text, plan) in catalog_plans().items():
        assert {d.code for d in verify_plan(plan, flowc.load(text))} == {code}, code


def test_fewer_kv_blocks_than_fit_is_sound(spec):
    assert codes(build_plan(spec, TWO_TP2, kv_blocks=CATALOG_KV_BLOCKS), spec) == []


if __name__ == "__main__":  # python tests/test_verify.py: rewrite the catalog's plan fixtures
    write_catalog_plans()
