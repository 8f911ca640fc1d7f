"""flowc compile end to end: plans for every example pass the independent verifier, serve
their load under the SLO, and infeasible specs are diagnostics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import flowc
from flowc.cli import main
from flowc.compiler.plan import Plan
from flowc.compiler.verify import verify_plan
from flowc.compiler.workload import base_rate

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.flow"))


@pytest.fixture(scope="module", params=EXAMPLES, ids=lambda p: p.stem)
def compiled(request):
    spec = flowc.load(request.param)
    return spec, flowc.compile(spec)


def test_plans_verify_and_serve_the_load(compiled):
    spec, plan = compiled
    assert verify_plan(plan, spec) == []
    assert {d.name for d in plan.deployments} == set(spec.deployments)
    for d in plan.deployments:
        load = base_rate(spec.workloads[spec.deployments[d.name].workload])
        assert d.predicted.meets_slo and d.predicted.goodput_rps >= load
        assert d.predicted.goodput_rps_per_gpu == pytest.approx(d.predicted.goodput_rps / d.gpus)
        limit = spec.deployments[d.name].max_gpus
        assert limit is None or d.gpus <= limit


def test_instances_never_share_a_gpu_and_stay_in_their_domains(compiled):
    spec, plan = compiled
    seen = set()
    for d in plan.deployments:
        cluster = spec.clusters[d.cluster]
        nodes = [group for group in cluster.nodes for _ in range(group.count)]
        for g in d.groups:
            assert g.gpu == nodes[g.instances[0].gpus[0].node].gpu
            for instance in g.instances:
                assert len(instance.gpus) == g.tp * g.pp
                for stage in range(g.pp):
                    group = instance.gpus[stage * g.tp:(stage + 1) * g.tp]
                    node = nodes[group[0].node]
                    assert {ref.node for ref in group} == {group[0].node}
                    assert {ref.index // node.link_domain for ref in group} == {group[0].index // node.link_domain}
                for ref in instance.gpus:
                    assert (ref.node, ref.index) not in seen
                    seen.add((ref.node, ref.index))


def test_memory_maps_come_from_the_memory_model(compiled):
    from flowc.compiler.memory import memory_budget

    spec, plan = compiled
    for d in plan.deployments:
        model = spec.deployments[d.name].model
        for g in d.groups:
            budget = memory_budget(model, spec.gpus[g.gpu].memory, tp=g.tp, pp=g.pp,
                                   max_batched_tokens=g.scheduler.max_batched_tokens, max_seqs=g.scheduler.max_seqs,
                                   block_size=g.scheduler.block_size)
            m = g.memory
            assert (m.weights, m.kv_blocks, m.activations) == (budget.weights, budget.kv_blocks, budget.activations)
            assert m.weights + m.kv_cache + m.activations + m.reserve + m.free == m.capacity
            assert m.arena_offsets and max(m.arena_offsets.values()) < m.activations


def test_cli_compile_writes_a_plan_that_flowc_verify_accepts(tmp_path, capsys):
    out = tmp_path / "plan.json"
    spec = str(EXAMPLES[0])
    assert main(["compile", spec, "-o", str(out), "--explain"]) == 0
    printed = capsys.readouterr().out
    assert "legend:" in printed and "Plan: 1 deployment" in printed and "~ " in printed
    plan = Plan.model_validate_json(out.read_text())
    assert plan.format_version.startswith("1.")
    assert main(["verify", str(out), "--against", spec]) == 0
    document = json.loads(out.read_text())
    document["deployments"][0]["groups"][0]["instances"][0]["gpus"][0]["index"] = 99
    out.write_text(json.dumps(document))
    assert main(["verify", str(out), "--against", spec]) == 1
    assert "F0521" in capsys.readouterr().err


def test_infeasible_specs_are_diagnostics_not_crashes(tmp_path, capsys):
    text = (Path(__file__).resolve().parent / "error_catalog" / "F0511.flow").read_text()
    with pytest.raises(flowc.FlowError) as caught:
        flowc.compile(text)
    assert caught.value.codes == ["F0511"]
    assert "needs" in str(caught.value)
