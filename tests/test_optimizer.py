"""flowc compile end to end: plans for every example pass the independent verifier, serve
their load under the SLO, and infeasible specs are diagnostics."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import flowc
import flowc.compiler.optimize.compile as compile_module
from flowc.cli import main
from flowc.compiler.model.goodput import goodput_search
from flowc.compiler.model.instance import instance_config
from flowc.compiler.model.memory import memory_budget
from flowc.compiler.model.search import baseline_scheduler
from flowc.compiler.model.topology import gpu_link, gpu_prices
from flowc.compiler.model.workload import base_rate
from flowc.compiler.plan import Plan
from flowc.compiler.verify import verify_plan

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
    from flowc.compiler.model.memory import memory_budget

    spec, plan = compiled
    for d in plan.deployments:
        model = spec.deployments[d.name].model
        for g in d.groups:
            budget = memory_budget(model, spec.gpus[g.gpu].memory, tp=g.tp, pp=g.pp, ep=g.ep, scheduler=g.scheduler,
                                   vendor=spec.gpus[g.gpu].vendor)
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
    err = capsys.readouterr().err
    assert "F0520" in err and "GPU n0g99 is outside cluster" in err


def test_infeasible_specs_are_diagnostics_not_crashes(tmp_path, capsys):
    text = (Path(__file__).resolve().parent / "error_catalog" / "F0511.flow").read_text()
    with pytest.raises(flowc.FlowError) as caught:
        flowc.compile(text)
    assert caught.value.codes == ["F0511"]
    assert "needs" in str(caught.value)


def test_explain_judges_each_alternative_in_its_objective_and_against_its_own_role(compiled):
    spec, plan = compiled
    for dp in plan.deployments:
        roles = {g.role for g in dp.groups}
        measured = [a for a in dp.alternatives if "misses the SLO even at the lowest load" not in a.reason]
        for a in measured:
            role = a.summary.rsplit(", ", 1)[-1].split(",")[0]
            if dp.objective == "max_goodput_per_gpu":
                # prefill shapes against the chosen prefill group, never against the decode group's rate
                expected = f"the chosen {role} instances'" if role in roles else "the chosen plan's"
                assert "per GPU" in a.reason and expected in a.reason, a.reason
            elif dp.objective == "min_gpus":
                assert "GPUs" in a.reason and a.objective_value == int(a.objective_value), a.reason
            else:
                assert "usd/h" in a.reason or "no price" in a.reason, a.reason


def test_under_min_gpus_an_alternative_loses_on_its_gpu_count(tmp_path):
    examples = Path(__file__).resolve().parents[1] / "examples"
    shutil.copytree(examples / "traces", tmp_path / "traces")
    spec = tmp_path / "min-gpus.flow"
    text = (examples / "code-assistant-8b.flow").read_text()
    spec.write_text(text.replace("objective min cost", "objective min gpus"))
    plan = flowc.compile(spec)
    (dp,) = plan.deployments
    assert dp.objective == "min_gpus"
    lost = [a for a in dp.alternatives if a.objective_value is not None and a.objective_value > dp.gpus]
    assert lost  # tp 2 instances take more GPUs for this load
    for a in lost:
        assert f"needs {int(a.objective_value)} GPUs" in a.reason and f"the plan uses {dp.gpus}" in a.reason


def test_the_plan_is_never_worse_than_the_baselines_it_reports(compiled):
    spec, plan = compiled
    for dp in plan.deployments:
        d = spec.deployments[dp.name]
        names = [b.name for b in dp.baselines]
        assert names == ["vLLM-style"] + (["DistServe-style"] if d.allow_disaggregation else [])
        prices = gpu_prices(spec.clusters[d.cluster], spec.gpus)
        for b in dp.baselines:
            if not b.sustains_load or (d.max_gpus is not None and b.gpus > d.max_gpus) or b.note:
                continue
            if dp.objective == "max_goodput_per_gpu":
                assert dp.predicted.goodput_rps_per_gpu >= b.goodput_rps / b.gpus * (1 - 1e-9), b
            elif dp.objective == "min_gpus":
                assert dp.gpus <= b.gpus, b
            else:
                plan_cost = sum(prices[g.gpu] * g.replicas * g.gpus_per_instance for g in dp.groups)
                gpu = dp.groups[0].gpu
                assert plan_cost <= b.gpus * prices[gpu] * (1 + 1e-9), b


def test_a_baseline_is_measured_as_the_plan_is():
    # Rebuilt here from the spec alone: the vLLM-style fleet of tiny-cpu is one tp 1 instance at
    # the engine's default scheduler settings (as the spec pins them), measured with the goodput
    # search over the plan's requests; it must read what the plan reports.
    spec = flowc.load(Path(__file__).resolve().parents[1] / "examples" / "tiny-cpu.flow")
    plan = flowc.compile(spec)
    (dp,) = plan.deployments
    (b,) = dp.baselines
    d = spec.deployments[dp.name]
    gpu, cluster = spec.gpus["cpu-local"], spec.clusters[d.cluster]
    scheduler = baseline_scheduler(d)
    budget = memory_budget(d.model, gpu.memory, tp=1, pp=1, scheduler=scheduler, vendor=gpu.vendor)
    config = instance_config(d.model, gpu, gpu_link(cluster, "cpu-local"), kv_capacity_tokens=budget.kv_tokens,
                             tp=1, pp=1, scheduler=scheduler, engine=d.engine)
    search = goodput_search([config], spec.workloads[d.workload], spec.slos[d.slo], seed=0, n=1000,
                            lo=base_rate(spec.workloads[d.workload]))
    assert (b.name, b.gpus, b.summary) == ("vLLM-style", 1, "1 x cpu-local tp 1 x pp 1 colocated")
    assert b.goodput_rps == pytest.approx(search.goodput, rel=1e-9)
    assert dp.predicted.goodput_rps >= b.goodput_rps * (1 - 1e-9)


EIGHT_B_ON_FOUR_GPUS = """
use std.gpus
use std.models

cluster box {
  node x 1 {
    gpu h100-sxm x 4
  }
}

workload chat {
  arrival poisson 20 req/s
  prompt lognormal(median 1024 tok, sigma 0.6) max 8192 tok
  output lognormal(median 256 tok, sigma 0.8) max 2048 tok
}

slo interactive {
  ttft p90 <= 300 ms
  tpot p90 <= 30 ms
}

deploy chat8b {
  model llama-3.1-8b
  on box
  serve chat under interactive
  tp in [1, 2]
}
"""


def test_a_baseline_that_beats_the_capacity_ranked_placement_is_the_plan():
    # At tpot <= 22 ms, ranked by capacities measured apart, one tp 2 instance wins (10.4 req/s
    # per GPU end to end); two tp 1 instances on the same two GPUs, the vLLM-style baseline,
    # serve 11.5 per GPU end to end. The compiler places the baseline instead, and the plan says
    # what it beat. (At the 30 ms of the other tests tp 1 already ranks first.)
    spec = EIGHT_B_ON_FOUR_GPUS.replace("tpot p90 <= 30 ms", "tpot p90 <= 22 ms")
    real, winners = compile_module._best_beating, []
    with mock.patch.object(compile_module, "_best_beating", lambda *a: winners.append(real(*a)) or winners[-1]):
        plan = flowc.compile(spec)
    assert [w is not None for w in winners] == [True]  # the baseline beat the ranked placement
    (dp,) = plan.deployments
    assert [(g.tp, g.replicas, g.role) for g in dp.groups] == [(1, 2, "colocated")]
    (b,) = dp.baselines
    assert b.summary == "2 x h100-sxm tp 1 x pp 1 colocated"
    assert dp.predicted.goodput_rps == pytest.approx(b.goodput_rps, rel=1e-9)
    tp2 = flowc.compile(spec.replace("tp in [1, 2]", "tp in [2]")).deployments[0]
    assert [(g.tp, g.replicas) for g in tp2.groups] == [(2, 1)]
    assert dp.predicted.goodput_rps_per_gpu > tp2.predicted.goodput_rps_per_gpu * 1.05


def test_f0511s_reachable_load_is_what_a_plan_then_serves():
    # F0511 measures the largest fleet end to end, with the goodput definition plans use: a load
    # just under the figure it reports compiles, and the plan serves it (it once said 16 GPUs
    # serve at most 50 req/s while a 10-GPU plan met the SLO at 60).
    with pytest.raises(flowc.FlowError) as caught:
        flowc.compile(EIGHT_B_ON_FOUR_GPUS.replace("poisson 20 req/s", "poisson 200 req/s"))
    (d,) = caught.value.diagnostics
    note = next(n for n in d.notes if "measured end to end on its largest fleet (4 GPUs" in n)
    reachable = float(note.split("serve at most ")[1].split(" req/s")[0])
    load = round(0.95 * reachable, 2)
    plan = flowc.compile(EIGHT_B_ON_FOUR_GPUS.replace("poisson 20 req/s", f"poisson {load} req/s"))
    (dp,) = plan.deployments
    assert dp.gpus <= 4 and dp.predicted.meets_slo and dp.predicted.goodput_rps >= load


def test_a_workloads_request_count_is_what_the_plan_simulates():
    text = (Path(__file__).resolve().parents[1] / "examples" / "tiny-cpu.flow").read_text()
    plan = flowc.compile(text.replace("  arrival poisson 4 req/s\n", "  arrival poisson 4 req/s\n  requests 300 req\n"))
    assert plan.deployments[0].predicted.requests == 300
    assert flowc.compile(text).deployments[0].predicted.requests == 1000  # unsaid: flowc's own count


def test_one_token_outputs_have_no_tpot_and_still_compile():
    # no request has a second token, so there is no TPOT: it was NaN, which the verifier refused
    text = (Path(__file__).resolve().parents[1] / "examples" / "tiny-cpu.flow").read_text()
    plan = flowc.compile(text.replace("output uniform(8 tok, 64 tok)", "output 1 tok"))
    tpot = plan.deployments[0].predicted.tpot_ms
    assert (tpot.p50, tpot.p90, tpot.p99) == (0.0, 0.0, 0.0)
    assert plan.deployments[0].predicted.ttft_ms.p50 > 0


def test_a_65536_gpu_node_places_without_overflowing_the_solver():
    # the ratio lock's coefficients (1e4 x GPUs x capacity) overflowed CP-SAT's int64: exit 3
    text = (Path(__file__).resolve().parents[1] / "examples" / "tiny-cpu.flow").read_text()
    plan = flowc.compile(text.replace("gpu cpu-local x 1", "gpu cpu-local x 65536"))
    assert plan.deployments[0].gpus == 1 and plan.solver.status == "optimal"


def _impossible_slo_spec(search: str) -> str:
    catalog = (Path(__file__).resolve().parent / "error_catalog" / "F0510.flow").read_text()
    return catalog.replace("  tp in [4, 8]\n", search)


def test_f0510_lists_the_closest_shapes_first_and_only_helps_with_what_could_change_the_answer():
    # Eight shapes (two tp x four token budgets); tp 8 is the closest (TTFT 54 ms against a 10 ms
    # limit, tp 4: 74 ms) but was measured last: the first six notes used to be tp 4's, with a help
    # to "allow more GPUs per instance" that tp 8, already allowed, shows cannot help.
    text = _impossible_slo_spec("  tp in [4, 8]\n  max_batched_tokens in [1024 tok, 2048 tok, 4096 tok, 8192 tok]\n")
    with pytest.raises(flowc.FlowError) as caught:
        flowc.compile(text)
    (d,) = caught.value.diagnostics
    assert d.code == "F0510"
    assert all("tp 8 x pp 1" in note for note in d.notes[:4])
    assert d.notes[-1] == "2 more shapes, each further from the SLO"
    assert "larger tp" not in d.help and "relax the SLO" in d.help


def test_f0510_suggests_the_larger_tp_the_search_held_back():
    with pytest.raises(flowc.FlowError) as caught:
        flowc.compile(_impossible_slo_spec("  tp in [4]\n"))
    (d,) = caught.value.diagnostics
    assert d.code == "F0510" and "allow larger tp (`tp in [..., 8]`)" in d.help


# ---------------------------------------------------------------------------------- random specs


RANDOM_SPEC = """
use std.gpus
use std.models

model moe-12 {{
  architecture mixtral
  layers 8
  hidden 2048
  heads 16
  kv_heads 4
  ffn 4096
  vocab 32000
  max_context 4096 tok
  moe {{ experts 12; top_k 2 }}
}}

cluster c {{
  node x {nodes} {{
    gpu {gpu} x {per_node}
  }}
  network ib-ndr x 4
}}

workload w {{
  arrival poisson {rate} req/s
  prompt lognormal(median {prompt} tok, sigma 0.5) max 320 tok
  output lognormal(median {output} tok, sigma 0.5) max 160 tok
}}

slo s {{
  ttft p90 <= {ttft} ms
  tpot p90 <= {tpot} ms
}}

deploy d {{
  model {model}
  on c
  serve w under s
  objective {objective}
  {disagg}
{knobs}}}
"""

KNOB_VALUES = {"tp": [1, 2, 4, 8], "pp": [1, 2], "ep": [1, 2, 3, 4, 6, 8], "replicas": [1, 2, 3, 4]}


@st.composite
def knobs(draw) -> str:
    """Some of tp, pp, ep and replicas narrowed to a few values (possibly ones the model or the
    cluster cannot take: the checker must say so, the optimizer never crash)."""
    lines = []
    for knob, values in KNOB_VALUES.items():
        chosen = draw(st.lists(st.sampled_from(values), max_size=3, unique=True))
        if chosen:
            lines.append(f"  {knob} in [{', '.join(map(str, chosen))}]\n")
    return "".join(lines)


@settings(max_examples=12, deadline=None, phases=[Phase.generate], suppress_health_check=[HealthCheck.too_slow])
@given(nodes=st.integers(1, 2), per_node=st.sampled_from([4, 8]), gpu=st.sampled_from(["h100-sxm", "a100-sxm-80g"]),
       model=st.sampled_from(["llama-3.1-8b", "tiny-llama", "qwen3-30b-a3b", "mixtral-8x7b", "moe-12"]),
       rate=st.sampled_from([1, 5, 40, 400]), prompt=st.sampled_from([64, 256]), output=st.sampled_from([32, 128]),
       ttft=st.sampled_from([20, 300, 2000]), tpot=st.sampled_from([5, 30, 100]),
       objective=st.sampled_from(["min gpus", "max goodput_per_gpu"]),
       disagg=st.sampled_from(["", "allow disaggregation"]), knobs=knobs())
def test_random_specs_compile_to_verified_plans_or_diagnostics(**values):
    try:
        spec = flowc.load(RANDOM_SPEC.format(**values))
    except flowc.FlowError as error:  # knob values the model or the cluster cannot take
        assert error.codes and all(code.startswith(("F04", "F05")) for code in error.codes), error.codes
        return
    try:
        plan = flowc.compile(spec, time_limit_s=5)
    except flowc.FlowError as error:
        assert error.codes and all(code.startswith("F05") for code in error.codes)
        return
    assert verify_plan(plan, spec) == []
    for d in plan.deployments:
        assert d.predicted.meets_slo
        search = spec.deployments[d.name].search
        assert d.replicas in search.get("replicas", [d.replicas])
        for g in d.groups:
            for knob in ("tp", "pp", "ep"):
                assert getattr(g, knob) in search.get(knob, [getattr(g, knob)])


# ------------------------------------------------------------------------------------- offload

OFFLOAD_SPEC = """
use std.gpus
use std.models
use std.slos
cluster one {{ node x 1 {{ gpu h100-sxm x 1; host_memory {host} }} }}
workload w {{ arrival poisson 0.05 req/s; prompt 512 tok; output 64 tok }}
slo slow {{ ttft p90 <= 60 s; tpot p90 <= 5 s }}
deploy d {{ model llama-3.1-70b; on one; serve w under slow{offload} }}
"""


def test_a_model_larger_than_hbm_compiles_with_offloaded_weights():
    from flowc.compiler.model.geometry import weight_bytes_per_rank

    spec = flowc.load(OFFLOAD_SPEC.format(host="1 TiB", offload="; allow offload"))
    plan = flowc.compile(spec)
    assert verify_plan(plan, spec) == []
    (d,) = plan.deployments
    (group,) = d.groups
    mm = group.memory
    model = spec.deployments["d"].model
    offloaded = mm.offloaded["weights"] + mm.offloaded["experts"]
    assert offloaded > 0 and mm.offload_step_s > 0
    assert abs(mm.weights + offloaded - weight_bytes_per_rank(model, 1, 1)) <= 8
    assert mm.weights + mm.kv_cache + mm.activations + mm.reserve + mm.free == mm.capacity
    assert d.predicted.meets_slo
    # physics floor: every decode step streams the offloaded weights over the host link
    link = spec.clusters["one"].nodes[0].host_link
    assert d.predicted.tpot_ms.p50 / 1e3 >= offloaded / link.bandwidth
    # the verifier re-simulates with the streaming overhead: without it the TPOT claim is wrong
    stripped = plan.model_copy(deep=True, update={"deployments": [d.model_copy(update={"groups": [
        group.model_copy(update={"memory": mm.model_copy(update={"offload_step_s": 0.0})})]})]})
    assert "F0526" in [p.code for p in verify_plan(stripped, spec)]


def test_without_offload_or_host_memory_the_model_does_not_fit(capsys, tmp_path):
    source = tmp_path / "no_offload.flow"
    source.write_text(OFFLOAD_SPEC.format(host="1 TiB", offload=""))
    assert main(["check", str(source)]) == 1
    assert "F0501" in capsys.readouterr().err
    # the checker counts HBM + host memory; the offload LP also needs room for activations,
    # the reserve, KV and the streaming buffer, so the compiler reports what even offload cannot fit
    with pytest.raises(flowc.FlowError) as caught:
        flowc.compile(OFFLOAD_SPEC.format(host="60 GiB", offload="; allow offload"))
    assert caught.value.codes == ["F0503"]
    assert "even with weights offloaded" in str(caught.value)


def test_scheduler_knobs_come_from_the_spec_search_space():
    text = (EXAMPLES[0]).read_text().replace(
        "  tp in [2, 4, 8]", "  tp in [2, 4, 8]\n  max_seqs in [64, 128]\n  block_size 32 tok\n  chunk_size 2048 tok")
    spec = flowc.load(text)
    plan = flowc.compile(spec)
    assert verify_plan(plan, spec) == []
    for group in plan.deployments[0].groups:
        s = group.scheduler
        assert s.max_seqs in (64, 128) and s.block_size == 32 and s.chunk_size == 2048


# ------------------------------------------------------------------------------------ replicas

REPLICAS_SPEC = """
use std.gpus
use std.models
use std.slos
cluster shared { node x 1 { gpu a100-sxm-80g x 8 } }
workload light {
  arrival poisson 20 req/s
  prompt normal(mean 512 tok, std 128 tok) max 2048 tok
  output 128 tok
}
deploy small {
  model qwen2.5-7b
  on shared
  serve light under chat
  objective min gpus
  max_gpus 2
  %s
}
"""


def test_replicas_pins_the_number_of_instances():
    """Regression: the optimizer ignored `replicas`; when it chose another count, the verifier
    rejected its plan and compile ended in an internal error."""
    free = flowc.compile(REPLICAS_SPEC % "")
    assert free.deployments[0].replicas == 2  # two tp 1 instances serve the load on the fewest GPUs
    spec = flowc.load(REPLICAS_SPEC % "replicas 1")
    plan = flowc.compile(spec)
    (d,) = plan.deployments
    assert d.replicas == 1 and [(g.tp, g.replicas) for g in d.groups] == [(2, 1)]
    assert verify_plan(plan, spec) == [] and d.predicted.meets_slo
    with pytest.raises(flowc.FlowError) as caught:  # three instances do not fit max_gpus 2
        flowc.compile(REPLICAS_SPEC % "replicas 3")
    assert caught.value.codes == ["F0511"]
    assert "with 3 instances" in str(caught.value)


def test_a_baseline_that_only_ties_the_plan_is_not_placed_instead():
    from types import SimpleNamespace

    from flowc.compiler.optimize.baselines import Fleet
    from flowc.compiler.optimize.compile import _best_beating

    d = SimpleNamespace(objective="min_gpus", max_gpus=None, search={})
    plan = SimpleNamespace(gpus=8, predicted=SimpleNamespace(goodput_rps_per_gpu=1.0))
    one_gpu = SimpleNamespace(candidate=SimpleNamespace(gpus=1, gpu="h100-sxm"))
    assert _best_beating(d, plan, None, [Fleet("vLLM-style", ((one_gpu, 8),), 10.0, True)], {}) is None
    fewer = Fleet("vLLM-style", ((one_gpu, 7),), 10.0, True)
    assert _best_beating(d, plan, None, [fewer], {}) is fewer
