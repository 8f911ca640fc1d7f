"""`flowc export`: launch scripts and Kubernetes manifests for vLLM and SGLang from a plan.

The example plans are compiled once and kept in tests/export_goldens/plans/ (compiling them all
takes longer than this whole module); the goldens there pin the output of `flowc export --k8s`
for each plan and engine version. Regenerate both after a change on purpose, then review the diff:

    FLOWC_UPDATE_GOLDEN=1 python -m pytest tests/test_export.py -q

The checks of flags and values parse the scripts on their own (shlex), not with
compiler/render/export.py's parser; the scripts also run in bash, with stub engines that print the
arguments they were given, which must be what that parser (and so the manifest) says. Plans travel
between people, so the last section exports hostile plans: each attack is refused, or quoted and
runs harmlessly.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import flowc.cli
from flowc import export_cmd
from flowc.compiler.model import memory
from flowc.compiler.model.geometry import weight_bytes_per_rank
from flowc.compiler.plan import GpuRef, Plan
from flowc.compiler.render import export as export_module
from flowc.compiler.render.export import (
    TARGETS,
    ExportError,
    TemplateError,
    UnknownVersion,
    check_router,
    check_script,
    hf_repos,
    known_versions,
    load_engine,
    node_shares,
    parse_script,
    shell_quote,
)

ROOT = Path(__file__).resolve().parents[1]
GOLDENS = Path(__file__).resolve().parent / "export_goldens"
PLANS = GOLDENS / "plans"
UPDATE = os.environ.get("FLOWC_UPDATE_GOLDEN") == "1"
EXAMPLES = ("chat-70b", "code-assistant-8b", "moe-h200", "shared-cluster", "tiny-cpu")
GPU_EXAMPLES = EXAMPLES[:-1]
# One instance over two nodes of 4 GPUs (tp 4 x pp 2), compiled from plans/two-node.flow: no
# example spans nodes.
TWO_NODE = "two-node"
# (target, version, extra flags) of each golden: both vLLM versions (0.8.5 degraded: it has no
# connector for the disaggregated plans) and SGLang (degraded: the plans were compiled for vLLM).
RUNS = {"vllm": ("vllm", None, ()), "vllm-0.8.5": ("vllm", "0.8.5", ("--allow-degrade",)),
        "sglang": ("sglang", None, ("--allow-degrade",))}
ENGINE_VERSIONS = [(t, v) for t in TARGETS for v in known_versions(t)]


def _compile_file(path: Path) -> Plan:
    from flowc.api import check_sources
    from flowc.compiler.optimize.compile import compile_spec

    return compile_spec(check_sources(path).spec)


def _compile(example: str) -> Plan:
    return _compile_file(Path("examples") / f"{example}.flow")


@pytest.fixture(scope="module")
def plans() -> dict[str, Plan]:
    if UPDATE:
        cwd = Path.cwd()
        os.chdir(ROOT)  # the plans name their spec as `flowc compile examples/X.flow` does
        try:
            for example in EXAMPLES:
                (PLANS / f"{example}.json").write_text(_compile(example).model_dump_json(indent=2) + "\n",
                                                       encoding="utf-8")
            os.chdir(GOLDENS)  # the plan names its spec as the goldens' command line does
            (PLANS / f"{TWO_NODE}.json").write_text(_compile_file(Path("plans") / f"{TWO_NODE}.flow")
                                                    .model_dump_json(indent=2) + "\n", encoding="utf-8")
        finally:
            os.chdir(cwd)
    return {e: Plan.model_validate_json((PLANS / f"{e}.json").read_text(encoding="utf-8"))
            for e in (*EXAMPLES, TWO_NODE)}


@pytest.fixture(autouse=True)
def _no_color_env(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.delenv("FLOWC_DEBUG", raising=False)


def planned_for(plan: Plan, engine: str) -> Plan:
    """`plan` with every deployment's predictions said to be for `engine`: the stored plans were
    compiled for vLLM (the default engine), and an export to another engine is refused unless the
    plan was made for it (test_a_plan_for_another_engine_is_refused_or_degraded)."""
    return plan.model_copy(update={"deployments": [d.model_copy(update={"engine": engine})
                                                   for d in plan.deployments]})


def export_plan(plan: Plan, target: str, **options):
    """export.export_plan of `plan` as compiled for `target`'s engine."""
    return export_module.export_plan(planned_for(plan, target), target=target, **options)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = flowc.cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def is_engine_script(path: str) -> bool:
    return path.endswith(".sh") and not path.endswith("/router.sh")


def scripts(plan: Plan, target: str, version: str | None = None, **options) -> dict[str, str]:
    """The engines' launch scripts of an export (not the routers')."""
    return {path: text for path, text in export_plan(plan, target=target, version=version, **options).files
            if is_engine_script(path)}


def launch(script: str) -> tuple[dict[str, str], list[str], list[str]]:
    """(exports, command, arguments) of a script, by bash's own quoting rules (shlex)."""
    body = script[script.index("\nargs=(\n") + len("\nargs=(\n"):]
    block, _, rest = body.partition("\n)\n")
    exports = dict(line[len("export "):].split("=", 1) for line in script.splitlines() if line.startswith("export "))
    command = shlex.split(rest.splitlines()[0])
    assert command[0] == "exec" and command[-2:] == ["${args[@]}", "$@"]
    return exports, command[1:-2], shlex.split(block, comments=True)


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def with_group(plan: Plan, deployment: int = 0, group: int = 0, **changes) -> Plan:
    """`plan` with fields of one deployment (key `deployment_fields`) or group changed."""
    d = plan.deployments[deployment]
    d_changes = changes.pop("deployment_fields", {})
    g = d.groups[group].model_copy(update=changes)
    d = d.model_copy(update={**d_changes, "groups": [*d.groups[:group], g, *d.groups[group + 1:]]})
    return plan.model_copy(update={"deployments": [*plan.deployments[:deployment], d,
                                                   *plan.deployments[deployment + 1:]]})


def with_weights(plan: Plan, dtype: str, deployment: int = 0) -> Plan:
    """`plan` with one deployment's weights in `dtype`, its model and memory maps to match (a plan
    file that `flowc export` reads)."""
    d = plan.deployments[deployment]
    model = d.model_spec.model_copy(update={"weights": dtype})
    for j, g in enumerate(d.groups):
        weights = weight_bytes_per_rank(model, g.tp, g.pp)
        m = g.memory.model_copy(update={"weights": weights, "free": g.memory.free + g.memory.weights - weights})
        plan = with_group(plan, deployment, j, memory=m)
    return with_group(plan, deployment, deployment_fields={"weights": dtype, "model_spec": model})


# ---------------------------------------------------------------------------------- goldens

@pytest.mark.parametrize("run_name", RUNS)
@pytest.mark.parametrize("example", [*EXAMPLES, TWO_NODE])
def test_golden(capsys, monkeypatch, plans, example, run_name):
    target, version, extra = RUNS[run_name]
    monkeypatch.chdir(GOLDENS)
    argv = ["export", f"plans/{example}.json", "--target", target, "--k8s", *extra]
    code, out, err = run(capsys, *argv, *(["--version", version] if version else []))
    actual = f"exit {code}\n--- stdout\n{out}--- stderr\n{err}"
    golden = GOLDENS / f"{example}.{run_name}.txt"
    if UPDATE:
        golden.write_text(actual, encoding="utf-8")
    assert actual == golden.read_text(encoding="utf-8")
    # vLLM 0.8.5 starts an engine over nodes only on a Ray cluster
    assert code == (1 if example == "tiny-cpu" or (example, run_name) == (TWO_NODE, "vllm-0.8.5") else 0)


@pytest.mark.slow
def test_stored_plans_are_what_the_examples_compile_to(monkeypatch, plans):
    monkeypatch.chdir(ROOT)
    for example in EXAMPLES:  # byte for byte: plans carry no timings
        stored = (PLANS / f"{example}.json").read_text(encoding="utf-8")
        assert _compile(example).model_dump_json(indent=2) + "\n" == stored, example
    monkeypatch.chdir(GOLDENS)
    compiled = _compile_file(Path("plans") / f"{TWO_NODE}.flow").model_dump_json(indent=2) + "\n"
    assert compiled == (PLANS / f"{TWO_NODE}.json").read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------- flag lists

@pytest.mark.parametrize(("target", "version"), ENGINE_VERSIONS)
def test_flag_lists_name_their_source(target, version):
    path = ROOT / "compiler" / "render" / "engines" / f"{target}-{version}.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["source"].startswith("https://")
    assert data["engine"] == target and data["version"] == version
    assert set(data["choices"]) <= set(data["flags"])
    assert all(f.startswith("--") for f in data["flags"])


def test_versions_newest_first_and_the_default():
    assert known_versions("vllm") == ["0.13.0", "0.8.5"]
    assert load_engine("vllm").version == "0.13.0"
    assert known_versions("sglang") == ["0.5.6"]
    with pytest.raises(UnknownVersion) as info:
        load_engine("vllm", "0.9")
    assert info.value.known == ["0.13.0", "0.8.5"]


def test_a_flag_changed_between_the_vllm_versions():
    """vLLM 0.13 keeps a bf16 KV cache with `bfloat16`; 0.8.5 only with `auto` (the model dtype)."""
    assert "bfloat16" in load_engine("vllm", "0.13.0").choices["--kv-cache-dtype"]
    assert "bfloat16" not in load_engine("vllm", "0.8.5").choices["--kv-cache-dtype"]


@pytest.mark.parametrize(("target", "version"), ENGINE_VERSIONS)
def test_every_flag_of_every_script_is_in_the_versions_list(plans, target, version):
    engine = load_engine(target, version)
    for example in GPU_EXAMPLES:
        for path, script in scripts(plans[example], target, version, allow_degrade=True).items():
            exports, command, args = launch(script)
            assert command == (["vllm"] if target == "vllm" else ["python3", "-m", "sglang.launch_server"])
            flags = [a for a in args if a.startswith("--")]
            assert flags and set(flags) <= engine.flags, (example, path, set(flags) - engine.flags)
            for name, choices in engine.choices.items():
                if name in args:
                    assert flag(args, name) in choices, (example, path, name)
            assert set(exports) - {"CUDA_VISIBLE_DEVICES"} <= engine.env


def test_a_template_flag_outside_the_list_is_an_internal_error(plans):
    engine = load_engine("vllm")
    script = next(s for path, s in scripts(plans["chat-70b"], "vllm").items() if "-decode-" in path)
    with pytest.raises(TemplateError, match="--block-size"):
        check_script(dataclasses.replace(engine, flags=engine.flags - {"--block-size"}), script)
    with pytest.raises(TemplateError, match="--kv-cache-dtype fp8"):
        check_script(dataclasses.replace(engine, choices={**engine.choices, "--kv-cache-dtype": ("auto",)}), script)
    with pytest.raises(TemplateError, match="exports VLLM_NIXL_SIDE_CHANNEL_HOST"):
        check_script(dataclasses.replace(engine, env=frozenset()), script)


def test_hf_repos_come_from_the_stdlib_comments():
    repos = hf_repos()
    assert repos["llama-3.1-70b"] == "meta-llama/Llama-3.1-70B"
    assert repos["deepseek-v3"] == "deepseek-ai/DeepSeek-V3"
    assert "tiny-llama" not in repos  # not a published checkpoint


# ---------------------------------------------------------------------------------- mapping

def vllm_fraction(m) -> str:
    """--gpu-memory-utilization from the memory map: everything but the CUDA context and graphs."""
    used = m.weights + m.kv_cache + m.activations + m.reserve - memory.CONTEXT_RESERVE - memory.GRAPH_RESERVE
    hundredths = int(100 * used // m.capacity)
    return f"{hundredths / 100:.2f}"


def sglang_fraction(m, gpus: int) -> str:
    free_at_start = m.capacity - memory.CONTEXT_RESERVE - (memory.NCCL_RESERVE if gpus > 1 else 0)
    return f"{int(100 * (m.weights + m.kv_cache) // free_at_start) / 100:.2f}"


def test_chat_70b_vllm_values_come_from_the_plan(plans):
    plan = plans["chat-70b"]
    d = plan.deployments[0]
    out = scripts(plan, "vllm")
    assert len(out) == sum(g.replicas for g in d.groups)
    for j, g in enumerate(d.groups):
        for i, instance in enumerate(g.instances):
            exports, _, args = launch(out[f"chatbot/g{j}-{g.role}-{i}.sh"])
            assert exports["CUDA_VISIBLE_DEVICES"] == ",".join(str(ref.index) for ref in instance.gpus)
            assert args[:2] == ["serve", "meta-llama/Llama-3.1-70B"]
            assert flag(args, "--tensor-parallel-size") == str(g.tp)
            assert flag(args, "--pipeline-parallel-size") == str(g.pp)
            assert flag(args, "--max-num-batched-tokens") == str(g.scheduler.max_batched_tokens)
            assert flag(args, "--max-num-seqs") == str(g.scheduler.max_seqs)
            assert flag(args, "--block-size") == str(g.scheduler.block_size)
            assert flag(args, "--gpu-memory-utilization") == vllm_fraction(g.memory)
            assert 0 < float(flag(args, "--gpu-memory-utilization")) <= 1
            assert flag(args, "--quantization") == "fp8" and flag(args, "--kv-cache-dtype") == "fp8"
            assert "--enable-chunked-prefill" in args
            config = json.loads(flag(args, "--kv-transfer-config"))
            assert config == {"kv_connector": "NixlConnector",
                              "kv_role": {"prefill": "kv_producer", "decode": "kv_consumer"}[g.role]}


def test_ports_differ_per_instance_on_a_node(plans):
    out = scripts(plans["chat-70b"], "vllm")
    node0 = [launch(s) for path, s in sorted(out.items()) if "# instance " in s and ": node 0," in s]
    assert sorted(flag(args, "--port") for _, _, args in node0) == [str(8000 + k) for k in range(len(node0))]
    assert len({exports["VLLM_NIXL_SIDE_CHANNEL_PORT"] for exports, _, _ in node0}) == len(node0)


def test_disaggregated_roles(plans):
    plan = plans["code-assistant-8b"]
    roles = {g.role for g in plan.deployments[0].groups}
    assert roles == {"prefill", "decode"}
    for path, script in scripts(plan, "vllm").items():
        exports, _, args = launch(script)
        role = json.loads(flag(args, "--kv-transfer-config"))["kv_role"]
        assert role == ("kv_producer" if "-prefill-" in path else "kv_consumer")
        assert exports["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "localhost"  # one node
    for path, script in scripts(plan, "sglang").items():
        _, _, args = launch(script)
        role = "prefill" if "-prefill-" in path else "decode"
        assert flag(args, "--disaggregation-mode") == role
        assert flag(args, "--disaggregation-transfer-backend") == "mooncake"
        assert ("--disaggregation-bootstrap-port" in args) == (role == "prefill")
        assert "--enable-mixed-chunk" not in args


def test_sglang_values_come_from_the_plan(plans):
    plan = plans["chat-70b"]
    for j, g in enumerate(plan.deployments[0].groups):
        _, _, args = launch(scripts(plan, "sglang")[f"chatbot/g{j}-{g.role}-0.sh"])
        assert args[:2] == ["--model-path", "meta-llama/Llama-3.1-70B"]
        assert flag(args, "--tp-size") == str(g.tp) and flag(args, "--pp-size") == str(g.pp)
        assert flag(args, "--max-running-requests") == str(g.scheduler.max_seqs)
        assert flag(args, "--max-prefill-tokens") == str(g.scheduler.max_batched_tokens)
        assert flag(args, "--chunked-prefill-size") == str(g.scheduler.max_batched_tokens)
        assert flag(args, "--page-size") == str(g.scheduler.block_size)
        assert flag(args, "--mem-fraction-static") == sglang_fraction(g.memory, g.gpus_per_instance)
        assert flag(args, "--kv-cache-dtype") == "fp8_e4m3"


def test_moe_expert_parallel(plans):
    plan = plans["moe-h200"]
    g = plan.deployments[0].groups[0]
    assert g.ep == g.tp == 8
    (vllm_script,) = scripts(plan, "vllm").values()
    exports, _, args = launch(vllm_script)
    assert "--enable-expert-parallel" in args and flag(args, "--quantization") == "fp8"
    assert exports["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7"
    assert flag(args, "--kv-cache-dtype") == "bfloat16"
    (sglang_script,) = scripts(plan, "sglang").values()
    _, _, args = launch(sglang_script)
    assert flag(args, "--ep-size") == "8" and "--enable-mixed-chunk" in args


def test_vllm_0_8_5_keeps_bf16_kv_as_auto(plans):
    for script in scripts(plans["shared-cluster"], "vllm", "0.8.5").values():
        assert flag(launch(script)[2], "--kv-cache-dtype") == "auto"


def test_a_smaller_chunk_maps_to_vllms_threshold_and_not_to_sglang(plans):
    plan = plans["moe-h200"]
    s = plan.deployments[0].groups[0].scheduler
    chunked = with_group(plan, scheduler=s.model_copy(update={"chunk_size": 512}))
    (script,) = scripts(chunked, "vllm").values()
    assert flag(launch(script)[2], "--long-prefill-token-threshold") == "512"
    with pytest.raises(ExportError, match="chunk_size 512"):
        export_plan(chunked, target="sglang")
    (script,) = scripts(chunked, "sglang", allow_degrade=True).values()
    assert "# DEGRADED (--allow-degrade): prefill chunks are bounded by the token budget" in script


def test_two_deployments_two_models(plans):
    out = scripts(plans["shared-cluster"], "vllm")
    models = {launch(s)[2][1] for s in out.values()}
    assert models == {"Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-72B"}
    assert {p.split("/")[0] for p in out} == {"small", "large"}


# ---------------------------------------------------------------------------------- refusals

def test_cpu_plan_is_refused(capsys, plans):
    code, out, err = run(capsys, "export", str(PLANS / "tiny-cpu.json"), "--target", "vllm", "--allow-degrade")
    assert code == 1 and out == ""
    assert "vLLM 0.13.0 runs on GPUs: group 0 (colocated) of deployment `tiny` runs on `cpu-local`, a CPU device" in err
    assert "= help: run CPU plans with `flowc run`" in err


def test_unknown_version_lists_the_known_ones(capsys):
    code, out, err = run(capsys, "export", str(PLANS / "chat-70b.json"), "--target", "vllm", "--version", "0.9")
    assert code == 2
    assert err == "error: no vLLM version `0.9`\n  = help: known vllm versions: 0.13.0 (default), 0.8.5\n"


def test_unsupported_weight_dtype_is_refused_or_degraded(capsys, tmp_path, plans):
    plan = with_weights(plans["shared-cluster"], "int4")
    path = tmp_path / "int4.json"
    path.write_text(plan.model_dump_json(), encoding="utf-8")
    code, out, err = run(capsys, "export", str(path), "--target", "vllm")
    assert code == 1 and out == ""
    assert "error: vLLM 0.13.0 has no flag that quantizes weights to int4" in err
    assert "= note: --allow-degrade drops it with a comment in the script" in err

    code, out, err = run(capsys, "export", str(path), "--target", "vllm", "--allow-degrade", "-o", str(tmp_path / "o"))
    assert code == 0
    assert "warning: vLLM 0.13.0 has no flag that quantizes weights to int4" in err
    script = (tmp_path / "o" / "small" / "g0-colocated-0.sh").read_text(encoding="utf-8")
    assert "# DEGRADED (--allow-degrade): int4 weights not mapped" in script
    assert "--quantization" not in launch(script)[2]

    # SGLang quantizes to int4 itself (torchao, weight-only)
    (script, *_) = scripts(plan, "sglang").values()
    assert flag(launch(script)[2], "--torchao-config") == "int4wo-128"


def test_kv_dtype_outside_the_choices(plans):
    plan = with_group(plans["shared-cluster"], deployment_fields={"kv": "int8"})
    with pytest.raises(ExportError) as info:
        export_plan(plan, target="sglang")
    assert "cannot keep the KV cache in int8" in info.value.problems[0].message
    (script, *_) = scripts(plan, "sglang", allow_degrade=True).values()
    assert flag(launch(script)[2], "--kv-cache-dtype") == "auto"
    assert "# DEGRADED (--allow-degrade): KV cache in the model dtype (`auto`) instead of int8" in script


def test_a_block_size_vllm_lacks_is_refused_not_an_internal_error(plans):
    # found by tools/fuzz_plans.py: `block_size in [7 tok]` compiles, and export ended in exit 3
    plan = plans["shared-cluster"]
    g = plan.deployments[0].groups[0]
    odd = with_group(plan, scheduler=g.scheduler.model_copy(update={"block_size": 7}))
    with pytest.raises(ExportError) as info:
        export_plan(odd, target="vllm", allow_degrade=True)
    (problem,) = info.value.problems
    assert "no KV-cache block of 7 tokens" in problem.message
    assert "--block-size accepts 1, 8, 16, 32, 64, 128, 256" in problem.message
    assert "block_size in [8 tok, 16 tok" in problem.help
    (script, *_) = scripts(odd, "sglang").values()
    assert flag(launch(script)[2], "--page-size") == "7"


def test_a_plan_for_another_engine_is_refused_or_degraded(plans):
    plan = plans["shared-cluster"]  # compiled for vLLM, the default engine
    assert {d.engine for d in plan.deployments} == {"vllm"}
    assert export_module.export_plan(plan, target="vllm").files
    with pytest.raises(ExportError) as info:
        export_module.export_plan(plan, target="sglang")
    problem = info.value.problems[0]
    assert "was planned for vLLM: its predictions come from vLLM's kernels and overheads, not SGLang" in problem.message
    assert problem.help.startswith("write `engine sglang` in deployment")
    files = export_module.export_plan(plan, target="sglang", allow_degrade=True).files
    script = next(text for path, text in files if path.endswith(".sh"))
    assert "# DEGRADED (--allow-degrade): the plan's predicted latency and throughput are vLLM's" in script
    with pytest.raises(ExportError, match="was planned for TensorRT-LLM"):
        export_module.export_plan(planned_for(plan, "trtllm"), target="vllm")


def test_offload_and_scattered_multi_node_instances_are_refused(plans):
    plan = plans["shared-cluster"]
    g = plan.deployments[0].groups[0]
    offloading = with_group(plan, memory=g.memory.model_copy(update={"offloaded": {"weights": 1 << 30}}))
    with pytest.raises(ExportError, match="offloads to host memory"):
        export_plan(offloading, target="vllm")
    assert "offload dropped" in next(iter(scripts(offloading, "vllm", allow_degrade=True).values()))
    # a node starts consecutive ranks: ranks alternating between nodes cannot be launched
    refs = [GpuRef(node=0, index=0), GpuRef(node=1, index=0), GpuRef(node=0, index=1), GpuRef(node=1, index=1)]
    spread = g.instances[0].model_copy(update={"gpus": refs})
    for target in TARGETS:
        with pytest.raises(ExportError, match="spans nodes 0, 1, 0, 1 with its ranks not in equal consecutive runs"):
            export_plan(with_group(plan, tp=4, instances=[spread, *g.instances[1:]]), target=target,
                        allow_degrade=True)


def test_a_memory_fraction_outside_0_1_is_refused(plans):
    plan = plans["moe-h200"]
    m = plan.deployments[0].groups[0].memory
    broken = with_group(plan, memory=m.model_copy(update={"capacity": m.weights // 2}))
    for target in TARGETS:
        with pytest.raises(ExportError, match=r"outside \(0, 1\]"):
            export_plan(broken, target=target, allow_degrade=True)


def test_ep_below_tp_is_not_vllms(plans):
    plan = with_group(plans["moe-h200"], ep=4)
    with pytest.raises(ExportError, match="but group 0 .* has ep 4"):
        export_plan(plan, target="vllm")
    (script,) = scripts(plan, "sglang").values()
    assert flag(launch(script)[2], "--ep-size") == "4"


def test_disaggregation_without_a_connector(capsys, plans):
    with pytest.raises(ExportError) as info:
        export_plan(plans["code-assistant-8b"], target="vllm", version="0.8.5")
    problem = info.value.problems[0]
    assert "vLLM 0.8.5 has no NixlConnector" in problem.message
    assert problem.help == "use --version 0.13.0, or --target sglang"


# ---------------------------------------------------------------------------------- kubernetes

LABEL_VALUE = re.compile(r"(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?)?")
DNS_LABEL = re.compile(r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?")


def manifest(plan: Plan, target: str, version: str | None = None, **options) -> tuple[list[dict], dict[str, str]]:
    """The manifest's documents, and the engines' scripts of the same export."""
    files = dict(export_plan(plan, target=target, version=version, k8s=True, **options).files)
    return list(yaml.safe_load_all(files.pop("kubernetes.yaml"))), {p: s for p, s in files.items()
                                                                    if is_engine_script(p)}


def engine_documents(documents: list[dict]) -> list[dict]:
    return [doc for doc in documents if doc["kind"] in ("Deployment", "LeaderWorkerSet")
            and doc["metadata"]["labels"]["flowc.dev/role"] != "router"]


def check_manifest(plan: Plan, documents: list[dict], files: dict[str, str]) -> None:
    """One Deployment per instance of `plan` (a LeaderWorkerSet when it spans nodes), in plan
    order, with the plan's node, GPU count and the arguments of the instance's script; every name
    and label one Kubernetes takes."""
    instances = [(d, g, inst) for d in plan.deployments for g in d.groups for inst in g.instances]
    names = [doc["metadata"]["name"] for doc in documents]
    assert len(set(names)) == len(names)
    assert all(len(name) <= 63 and DNS_LABEL.fullmatch(name) for name in names), names
    documents = engine_documents(documents)
    assert len(documents) == len(instances)
    scripts_ = iter(files.values())
    placed = [(doc, g, inst, [next(scripts_) for _ in node_shares(inst.gpus)])
              for doc, (_, g, inst) in zip(documents, instances)]
    assert next(scripts_, None) is None
    for doc, g, inst, shares in placed:
        if len(shares) > 1:
            check_leader_worker_set(doc, g, inst, shares)
            continue
        (script,) = shares
        assert doc["apiVersion"] == "apps/v1" and doc["kind"] == "Deployment" and doc["spec"]["replicas"] == 1
        assert len(doc["metadata"]["name"]) <= 63 and DNS_LABEL.fullmatch(doc["metadata"]["name"])
        labels = doc["spec"]["template"]["metadata"]["labels"]
        assert labels == doc["metadata"]["labels"]
        assert all(len(v) <= 63 and LABEL_VALUE.fullmatch(v) for v in labels.values()), labels
        assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items()
        pod = doc["spec"]["template"]["spec"]
        assert pod["nodeSelector"] == {"flowc.dev/node": str(inst.gpus[0].node)}
        (container,) = pod["containers"]
        resource = "amd.com/gpu" if g.vendor == "amd" else "nvidia.com/gpu"
        assert container["resources"]["limits"] == {resource: g.tp * g.pp}
        launch = parse_script(script)
        assert container["command"] == launch.command
        assert container["args"] == [word for _, words in launch.args for word in words]
        assert "CUDA_VISIBLE_DEVICES" not in {e["name"] for e in container.get("env", [])}
        assert pod["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
        assert container["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}]
        port = container["ports"][0]["containerPort"]
        assert container["readinessProbe"] == {"httpGet": {"path": "/health", "port": port}}
        assert str(port) == flag(container["args"], "--port")


def check_leader_worker_set(doc: dict, g, inst, shares: list[str]) -> None:
    """An instance over nodes: one LeaderWorkerSet group of one pod per node; the leader runs node
    rank 0's script, the worker template node rank 1's, with the leader's address and the worker's
    index from LWS where the scripts read FLOWC_MASTER_ADDR and their rank."""
    assert doc["apiVersion"] == "leaderworkerset.x-k8s.io/v1" and doc["kind"] == "LeaderWorkerSet"
    spec = doc["spec"]
    assert spec["replicas"] == 1 and spec["leaderWorkerTemplate"]["size"] == len(shares)
    nodes = [node for node, _ in node_shares(inst.gpus)]
    per_node = g.tp * g.pp // len(nodes)

    def expected(script: str, rank: str | None) -> list[str]:
        words = [w.replace("$FLOWC_MASTER_ADDR", "$(LWS_LEADER_ADDRESS)")
                 for _, ws in parse_script(script).args for w in ws]
        if rank is not None:
            words[words.index("--node-rank") + 1] = rank
        return words

    for key, script, rank, node in (("leaderTemplate", shares[0], None, nodes[0]),
                                    ("workerTemplate", shares[1], "$(LWS_WORKER_INDEX)", nodes[1])):
        pod = spec["leaderWorkerTemplate"][key]
        assert pod["metadata"]["labels"] == doc["metadata"]["labels"]
        (container,) = pod["spec"]["containers"]
        assert container["command"] == parse_script(script).command
        assert container["args"] == expected(script, rank)
        assert container["resources"]["limits"] == {"nvidia.com/gpu": per_node}
        if len(nodes) == 2 or key == "leaderTemplate":
            assert pod["spec"]["nodeSelector"] == {"flowc.dev/node": str(node)}
        else:  # one template for the workers: on the instance's other nodes, one pod per node
            affinity = pod["spec"]["affinity"]
            terms = affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
            assert terms == [{"matchExpressions": [{"key": "flowc.dev/node", "operator": "In",
                                                    "values": [str(n) for n in nodes[1:]]}]}]
            (apart,) = affinity["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            assert apart["labelSelector"] == {"matchLabels": {"flowc.dev/instance": doc["metadata"]["name"]}}
        assert ("readinessProbe" in container) == (key == "leaderTemplate")  # only rank 0 serves


@pytest.mark.parametrize("run_name", RUNS)
@pytest.mark.parametrize("example", GPU_EXAMPLES)
def test_kubernetes_manifest(plans, example, run_name):
    target, version, extra = RUNS[run_name]
    plan = plans[example]
    documents, files = manifest(plan, target, version, allow_degrade="--allow-degrade" in extra)
    check_manifest(plan, documents, files)
    for doc in engine_documents(documents):
        annotations = doc["metadata"]["annotations"]
        assert annotations["flowc.dev/plan"].startswith("plan: plan.json (flowc ")
        tp_flag = "--tp-size" if target == "sglang" else "--tensor-parallel-size"
        assert f"\n# tensor parallelism: the group's tp\n{tp_flag} " in annotations["flowc.dev/args"]


def test_kubernetes_env_is_the_pods(plans):
    documents, _ = manifest(plans["chat-70b"], "vllm")
    for doc in documents:
        (container,) = doc["spec"]["template"]["spec"]["containers"]
        host, port = container["env"]
        assert host == {"name": "VLLM_NIXL_SIDE_CHANNEL_HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
        assert port["name"] == "VLLM_NIXL_SIDE_CHANNEL_PORT" and 5600 <= int(port["value"]) < 5608


def test_amd_gpus_are_requested_as_amd_gpus(plans):
    plan = with_group(plans["moe-h200"], vendor="amd")
    (obj,) = yaml.safe_load_all(dict(export_plan(plan, target="vllm", k8s=True).files)["kubernetes.yaml"])
    assert obj["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"] == {"amd.com/gpu": 8}


# ---------------------------------------------------------------------------------- command line

def test_the_command_offers_every_target():
    parser = argparse.ArgumentParser()
    export_cmd.add_arguments(parser)
    (target,) = [action for action in parser._actions if action.dest == "target"]
    assert tuple(target.choices) == TARGETS


def test_stdout_separators_and_json(capsys):
    code, out, _ = run(capsys, "export", str(PLANS / "moe-h200.json"), "--target", "vllm", "--k8s")
    assert code == 0
    assert out.startswith("==> deepseek/g0-colocated-0.sh <==\n#!/usr/bin/env bash\n")
    assert "\n==> kubernetes.yaml <==\n" in out
    code, out, _ = run(capsys, "--json", "export", str(PLANS / "moe-h200.json"), "--target", "vllm")
    listing = json.loads(out)
    assert [f["path"] for f in listing] == ["deepseek/g0-colocated-0.sh"]
    assert listing[0]["content"].startswith("#!/usr/bin/env bash\n")


def test_output_directory(capsys, tmp_path, plans):
    code, out, _ = run(capsys, "export", str(PLANS / "chat-70b.json"), "--target", "vllm", "--k8s",
                       "-o", str(tmp_path))
    groups = plans["chat-70b"].deployments[0].groups
    # a script per instance, the router's and the manifest
    assert code == 0 and out == f"wrote {sum(g.replicas for g in groups) + 2} files under {tmp_path}\n"
    for j, g in enumerate(groups):
        for i, instance in enumerate(g.instances):
            script = tmp_path / "chatbot" / f"g{j}-{g.role}-{i}.sh"
            assert os.access(script, os.X_OK)
            text = script.read_text(encoding="utf-8")
            assert text.startswith("#!/usr/bin/env bash\n") and "\nset -euo pipefail\n" in text
            gpus = ",".join(str(ref.index) for ref in instance.gpus)
            assert f"# instance {i} of {g.replicas}: node {instance.gpus[0].node}, GPUs {gpus}\n" in text
            assert f"# group {j}: {g.role} on h100-sxm, tp {g.tp} x pp {g.pp}\n" in text
    assert (tmp_path / "kubernetes.yaml").is_file()


def test_model_path(capsys, tmp_path, plans):
    (script,) = scripts(plans["moe-h200"], "vllm", model_paths={"*": "/models/dsv3"}).values()
    assert launch(script)[2][:2] == ["serve", "/models/dsv3"]
    path = str(PLANS / "shared-cluster.json")
    code, out, _ = run(capsys, "--json", "export", path, "--target", "vllm", "--model-path", "qwen2.5-7b=/m/7b")
    assert code == 0
    contents = {f["path"]: f["content"] for f in json.loads(out)}
    assert "serve /m/7b\n" in contents["small/g0-colocated-0.sh"]
    assert "serve Qwen/Qwen2.5-72B\n" in contents["large/g0-colocated-0.sh"]
    code, _, err = run(capsys, "export", path, "--target", "vllm", "--model-path", "/m/7b")
    assert code == 2 and "names no model, and the plan serves several" in err
    code, _, err = run(capsys, "export", str(PLANS / "tiny-cpu.json"), "--target", "vllm", "--model-path", "x=/y")
    assert code == 2 and "the plan has no model `x`" in err


def test_not_a_plan(capsys, tmp_path):
    code, _, err = run(capsys, "export", str(tmp_path / "missing.json"), "--target", "vllm")
    assert code == 2 and "does not exist" in err
    bad = tmp_path / "bad.json"
    bad.write_text("{}", encoding="utf-8")
    code, _, err = run(capsys, "export", str(bad), "--target", "vllm")
    assert code == 1 and "is not a flowc plan" in err
    code, out, _ = run(capsys, "--json", "export", str(PLANS / "tiny-cpu.json"), "--target", "vllm")
    document = json.loads(out)
    # a CPU device, a plan for the flowc runtime, and a model with no Hugging Face repo
    assert code == 1 and document["valid"] is False and document["error_count"] == 3


# ---------------------------------------------------------------------------------- running the scripts

BASH = shutil.which("bash")
needs_bash = pytest.mark.skipif(BASH is None, reason="bash is not installed")
NODE_ADDRESS = "10.0.0.7"  # FLOWC_NODE_ADDRESS in the runs
MASTER_ADDRESS = "10.0.0.1"  # FLOWC_MASTER_ADDR in the runs
# Stands in for `vllm` and `python3`: prints the arguments it was given and the engine's
# environment as one JSON line. Its own interpreter by absolute path: `python3` is the stub.
STUB = """#!{python} -S
import json, os, sys
env = {{k: v for k, v in os.environ.items() if k == "CUDA_VISIBLE_DEVICES" or k.startswith("VLLM_")}}
print(json.dumps({{"argv": [os.path.basename(sys.argv[0]), *sys.argv[1:]], "env": env}}))
"""


def run_scripts(files: dict[str, str], tmp_path: Path, env: dict[str, str] | None = None) -> dict[str, dict]:
    """Each script checked by `bash -n`, then run by bash with only the stubs on PATH (and `env`),
    in an empty folder that it must leave empty: {path: what the stub printed}."""
    stubs, work, saved = tmp_path / "stubs", tmp_path / "work", tmp_path / "scripts"
    for folder in (stubs, work, saved):
        folder.mkdir(exist_ok=True)
    for name in ("vllm", "python3"):  # python3: SGLang's server and router
        (stubs / name).write_text(STUB.format(python=sys.executable), encoding="utf-8")
        (stubs / name).chmod(0o755)
    printed = {}
    for path, script in files.items():
        assert re.fullmatch(r"[a-z0-9-]+/[a-z0-9-]+\.sh", path), path
        file = saved / path.replace("/", "--")
        file.write_text(script, encoding="utf-8")
        syntax = subprocess.run([BASH, "-n", str(file)], capture_output=True, text=True)
        assert syntax.returncode == 0, (path, syntax.stderr)
        result = subprocess.run([BASH, str(file)], env={"PATH": str(stubs), "FLOWC_NODE_ADDRESS": NODE_ADDRESS,
                                                        "FLOWC_MASTER_ADDR": MASTER_ADDRESS, **(env or {})},
                                cwd=work, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, (path, result.stderr)
        (line,) = result.stdout.splitlines()
        printed[path] = json.loads(line)
    assert not any(work.iterdir())
    return printed


def check_runs(plan: Plan, files: dict[str, str], printed: dict[str, dict]) -> None:
    """The engine got the arguments `parse_script` reads in its script, and the environment the
    plan places it in: its GPUs, and for vLLM's NIXL its node's address and a port of its own."""
    shares = [(d, node, gpus) for d in plan.deployments for g in d.groups for inst in g.instances
              for node, gpus in node_shares(inst.gpus)]
    assert len(shares) == len(files) == len(printed)
    ports = {}
    for (d, node, gpus), (path, script) in zip(shares, files.items()):
        launch = parse_script(script)
        run = printed[path]
        words = [word.replace("$FLOWC_MASTER_ADDR", MASTER_ADDRESS) for _, ws in launch.args for word in ws]
        assert run["argv"] == [*launch.command, *words]
        env = dict(run["env"])
        assert env.pop("CUDA_VISIBLE_DEVICES") == ",".join(map(str, gpus))
        assert set(env) == {name for name, _ in launch.env} - {"CUDA_VISIBLE_DEVICES"}
        if env:
            nodes = {ref.node for g in d.groups for i in g.instances for ref in i.gpus}
            assert env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == ("localhost" if len(nodes) == 1 else NODE_ADDRESS)
            ports.setdefault(node, []).append(int(env["VLLM_NIXL_SIDE_CHANNEL_PORT"]))
    for node_ports in ports.values():
        assert sorted(node_ports) == list(range(5600, 5600 + len(node_ports)))


def _chunk(plan: Plan, **changes) -> Plan:
    return with_group(plan, scheduler=plan.deployments[0].groups[0].scheduler.model_copy(update=changes))


def _four_nodes(plan: Plan) -> Plan:
    """The two-node plan's instance over four nodes of two GPUs: a worker template for three nodes."""
    g = plan.deployments[0].groups[0]
    refs = [GpuRef(node=n, index=i) for n in range(4) for i in range(2)]
    return with_group(plan, instances=[g.instances[0].model_copy(update={"gpus": refs})])


def _prefill_over_nodes(plan: Plan) -> Plan:
    """chat-70b with its last prefill instance over nodes 1 and 2: a LeaderWorkerSet the router
    reaches through its leader."""
    g = plan.deployments[0].groups[1]
    spread = g.instances[-1].model_copy(update={"gpus": [GpuRef(node=1, index=2), GpuRef(node=2, index=0)]})
    return with_group(plan, group=1, instances=[*g.instances[:-1], spread])


# Every export the tests above make, from the stored plans: (plan, target, version, options).
EXPORTS = {
    **{f"{example}-{run_name}": (lambda plans, e=example, r=run_name: (
        plans[e], RUNS[r][0], RUNS[r][1], {"allow_degrade": "--allow-degrade" in RUNS[r][2]}))
       for example in GPU_EXAMPLES for run_name in RUNS},
    "tp1-pp2": lambda plans: (with_group(plans["chat-70b"], tp=1, pp=2), "vllm", None, {}),
    "tp1-pp2-sglang": lambda plans: (with_group(plans["chat-70b"], tp=1, pp=2), "sglang", None, {}),
    "chunk-512": lambda plans: (_chunk(plans["moe-h200"], chunk_size=512), "vllm", None, {}),
    "chunk-512-degraded": lambda plans: (_chunk(plans["moe-h200"], chunk_size=512), "sglang", None,
                                         {"allow_degrade": True}),
    "no-chunked-prefill": lambda plans: (_chunk(plans["moe-h200"], chunked_prefill=False), "vllm", "0.8.5", {}),
    "int4-torchao": lambda plans: (with_weights(plans["shared-cluster"], "int4"), "sglang", None, {}),
    "int4-degraded": lambda plans: (with_weights(plans["shared-cluster"], "int4"), "vllm", None,
                                    {"allow_degrade": True}),
    "kv-int8-degraded": lambda plans: (with_group(plans["shared-cluster"], deployment_fields={"kv": "int8"}),
                                       "sglang", None, {"allow_degrade": True}),
    "ep-4": lambda plans: (with_group(plans["moe-h200"], ep=4), "sglang", None, {}),
    "model-path": lambda plans: (plans["moe-h200"], "vllm", None, {"model_paths": {"*": "/models/deepseek v3"}}),
    **{f"{TWO_NODE}-{target}": (lambda plans, t=target: (plans[TWO_NODE], t, None, {})) for target in TARGETS},
    **{f"four-nodes-{target}": (lambda plans, t=target: (_four_nodes(plans[TWO_NODE]), t, None, {}))
       for target in TARGETS},
    **{f"prefill-over-nodes-{target}": (lambda plans, t=target: (_prefill_over_nodes(plans["chat-70b"]), t, None, {}))
       for target in TARGETS},
}


@needs_bash
@pytest.mark.parametrize("name", EXPORTS)
def test_every_script_runs_as_parsed(tmp_path, plans, name):
    plan, target, version, options = EXPORTS[name](plans)
    documents, files = manifest(plan, target, version, **options)
    check_runs(plan, files, run_scripts(files, tmp_path))
    check_manifest(plan, documents, files)


# ---------------------------------------------------------------------------------- over nodes, and routers

def bash_run(script: str, tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`script` run by bash with the stubs of run_scripts on PATH and only `env` besides."""
    file = tmp_path / "one.sh"
    file.write_text(script, encoding="utf-8")
    return subprocess.run([BASH, str(file)], env={"PATH": str(tmp_path / "stubs"), **env}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)


def test_the_two_node_plan_is_one_flowc_loads(plans):
    from flowc.compiler.plan_io import plan_problems

    plan = plans[TWO_NODE]
    assert plan_problems(plan) == []
    (g,) = plan.deployments[0].groups
    assert (g.tp, g.pp, g.replicas) == (4, 2, 1)
    assert node_shares(g.instances[0].gpus) == [(0, [0, 1, 2, 3]), (1, [0, 1, 2, 3])]


@needs_bash
@pytest.mark.parametrize("target", TARGETS)
def test_an_instance_over_two_nodes_starts_a_share_per_node(tmp_path, plans, target):
    plan = plans[TWO_NODE]
    documents, files = manifest(plan, target)
    assert list(files) == ["big/g0-colocated-0-node0.sh", "big/g0-colocated-0-node1.sh"]
    printed = run_scripts(files, tmp_path)
    check_runs(plan, files, printed)
    check_manifest(plan, documents, files)
    for rank, path in enumerate(files):
        argv = printed[path]["argv"]
        assert printed[path]["env"]["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
        assert flag(argv, "--nnodes") == "2" and flag(argv, "--node-rank") == str(rank)
        if target == "vllm":
            assert flag(argv, "--distributed-executor-backend") == "mp"
            assert flag(argv, "--master-addr") == MASTER_ADDRESS and flag(argv, "--master-port") == "29501"
            assert ("--headless" in argv) == (rank > 0)
            assert flag(argv, "--tensor-parallel-size") == "4" and flag(argv, "--pipeline-parallel-size") == "2"
        else:
            assert flag(argv, "--dist-init-addr") == f"{MASTER_ADDRESS}:20000"
            assert flag(argv, "--tp-size") == "4" and flag(argv, "--pp-size") == "2"
    # without the first node's address a script refuses to start, and says what to set
    for script in files.values():
        result = bash_run(script, tmp_path, {})
        assert result.returncode != 0 and result.stdout == ""
        assert ("FLOWC_MASTER_ADDR: set FLOWC_MASTER_ADDR to the address of node 0, where node rank 0 of this "
                "instance runs") in result.stderr
    (lws,) = documents
    assert lws["kind"] == "LeaderWorkerSet" and lws["metadata"]["name"] == "big-g0-colocated-0"
    template = lws["spec"]["leaderWorkerTemplate"]
    worker_args = template["workerTemplate"]["spec"]["containers"][0]["args"]
    assert flag(worker_args, "--node-rank") == "$(LWS_WORKER_INDEX)"
    assert "$(LWS_LEADER_ADDRESS)" in flag(worker_args, "--master-addr" if target == "vllm" else "--dist-init-addr")
    assert template["workerTemplate"]["spec"]["nodeSelector"] == {"flowc.dev/node": "1"}


def test_vllm_without_the_multi_node_flags_is_refused(plans):
    with pytest.raises(ExportError) as info:
        export_plan(plans[TWO_NODE], target="vllm", version="0.8.5", allow_degrade=True)
    (problem,) = info.value.problems
    assert problem.message == ("instance 0 of group 0 (colocated) of deployment `big` spans nodes 0, 1, and vLLM "
                               "0.8.5 starts an engine over nodes only on a Ray cluster (it has no --headless, "
                               "--master-addr, --master-port, --nnodes, --node-rank), which flowc does not set up")
    assert problem.help.startswith("use --version 0.13.0, or keep instances within a node")
    assert not problem.degradable


def router_addresses(files: dict[str, str]) -> dict[str, str]:
    """An address per instance of an export, in the variables the router script names."""
    return {f"FLOWC_ADDR_{Path(path).stem.upper().replace('-', '_')}": f"10.0.1.{k}"
            for k, path in enumerate(p for p in files if is_engine_script(p))}


@needs_bash
def test_the_sglang_router_names_every_prefill_and_decode_instance(tmp_path, plans):
    plan = plans["code-assistant-8b"]
    files = dict(export_plan(plan, target="sglang", k8s=True).files)
    router = files.pop("copilot/router.sh")
    documents = list(yaml.safe_load_all(files.pop("kubernetes.yaml")))
    addresses = router_addresses(files)
    printed = run_scripts({"copilot/router.sh": router}, tmp_path, addresses)
    expected, services = ["--pd-disaggregation"], []
    for (path, script), address in zip(files.items(), addresses.values()):
        args = launch(script)[2]
        port = flag(args, "--port")
        if flag(args, "--disaggregation-mode") == "prefill":
            bootstrap = flag(args, "--disaggregation-bootstrap-port")
            expected += ["--prefill", f"http://{address}:{port}", bootstrap]
        else:
            expected += ["--decode", f"http://{address}:{port}"]
        services.append((f"svc-copilot-{Path(path).stem}", port))
    argv = printed["copilot/router.sh"]["argv"]
    assert argv == ["python3", "-m", "sglang_router.launch_router", *expected, "--host", "0.0.0.0", "--port", "8080"]
    assert argv[3:] == [w for _, ws in parse_script(router).args for w in ws
                        for w in [re.sub(r"\$\{(\w+)\}", lambda m: addresses[m.group(1)], w)]]
    # an address left unset: refused, naming the variable
    unset = next(name for name in addresses if "_PREFILL_" in name)  # e.g. FLOWC_ADDR_G1_PREFILL_1
    script = unset.removeprefix("FLOWC_ADDR_").lower().replace("_", "-") + ".sh"
    missing = {name: address for name, address in addresses.items() if name != unset}
    result = bash_run(router, tmp_path, missing)
    assert result.returncode != 0 and result.stdout == ""
    assert f"{unset}: set {unset} to the address of node 0, which runs {script}" in result.stderr
    # Kubernetes: a Service per instance, and the router at their DNS names
    check_manifest(plan, documents, files)
    found = [(doc["metadata"]["name"], str(doc["spec"]["ports"][0]["port"])) for doc in documents
             if doc["kind"] == "Service"]
    assert found == services
    (router_doc,) = [doc for doc in documents if doc["metadata"]["name"] == "copilot-router"]
    (container,) = router_doc["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["python3", "-m", "sglang_router.launch_router"]
    by_dns = [re.sub(r"http://10\.0\.1\.(\d+):", lambda m: f"http://{services[int(m.group(1))][0]}:", w)
              for w in argv[3:]]
    assert container["args"] == by_dns


@needs_bash
def test_vllm_gets_no_router_but_the_reason(tmp_path, plans):
    files = dict(export_plan(plans["code-assistant-8b"], target="vllm", k8s=True).files)
    router = files["copilot/router.sh"]
    assert "# flowc export: prefill/decode router of deployment `copilot`: NOT GENERATED.\n" in router
    assert "# vLLM 0.13.0 ships no prefill/decode router" in router
    run_scripts({}, tmp_path)  # the stubs
    result = bash_run(router, tmp_path, router_addresses(files))
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == ("flowc: no prefill/decode router generated for vLLM 0.13.0: see the comments in this "
                             "script\n")
    kinds = [doc["kind"] for doc in yaml.safe_load_all(files["kubernetes.yaml"])]
    assert kinds == ["Deployment"] * 3  # no router to reach Services


def test_a_router_flag_outside_the_list_is_an_internal_error(plans):
    engine = load_engine("sglang")
    router = dict(export_plan(plans["code-assistant-8b"], target="sglang").files)["copilot/router.sh"]
    assert check_router(engine, router).command == ["python3", "-m", "sglang_router.launch_router"]
    narrowed = {**engine.router, "flags": [f for f in engine.router["flags"] if f != "--prefill"]}
    with pytest.raises(TemplateError, match="router.sh.j2 emits `--prefill`"):
        check_router(dataclasses.replace(engine, router=narrowed), router)


# ---------------------------------------------------------------------------------- hostile plans

PAYLOAD = "touch PWNED"
CONTROLS = ["\n", "\r", "\t", "\x00", "\x1b", "\x7f", "\x85", "\x9b", "\u202e", "\u2066", "\u2069"]


def renamed(plan: Plan, name: str, deployment: int = 0) -> Plan:
    return with_group(plan, deployment, deployment_fields={"name": name})


def refusal(plan: Plan, target: str = "vllm", **options) -> list[tuple[str, str]]:
    with pytest.raises(ExportError) as info:
        export_plan(plan, target=target, k8s=True, **options)
    return [(p.message, p.help) for p in info.value.problems]


def cli_export(capsys, tmp_path: Path, plan: Plan, *extra: str) -> tuple[int, str, Path]:
    """`flowc export PLAN --target vllm --k8s -o DIR` on `plan` written as a file: (exit, stderr, DIR)."""
    tmp_path.mkdir(exist_ok=True)
    path = tmp_path / "hostile.json"
    path.write_text(plan.model_dump_json(), encoding="utf-8")
    out_dir = tmp_path / "deep" / "er" / "out"
    code, _, err = run(capsys, "export", str(path), "--target", "vllm", "--k8s", "-o", str(out_dir), *extra)
    return code, err, out_dir


def written(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_shell_quote_is_the_one_way_in():
    assert shell_quote("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"
    assert shell_quote(8) == "8"
    assert shell_quote("$(touch PWNED)") == "'$(touch PWNED)'"
    assert shell_quote("it's") == "'it'\"'\"'s'"
    for character in CONTROLS:
        with pytest.raises(TemplateError, match=f"U\\+{ord(character):04X}"):
            shell_quote(f"a{character}b")


@pytest.mark.parametrize("character", CONTROLS)
@pytest.mark.parametrize("target", TARGETS)
def test_a_control_character_in_a_name_is_refused(plans, target, character):
    code = f"U+{ord(character):04X}"
    problems = refusal(renamed(plans["moe-h200"], f"x{character}{PAYLOAD}"), target)
    assert problems == [(f"the plan's deployments[0].name contains a control character ({code}), which a launch "
                         "script cannot carry safely",
                         "compile the plan again from its spec (flowc writes no control characters)")]
    gpu = with_group(plans["moe-h200"], gpu=f"h200{character}{PAYLOAD}")
    assert refusal(gpu, target)[0][0].startswith(f"the plan's deployments[0].groups[0].gpu contains a control "
                                                 f"character ({code})")


def test_the_command_refuses_a_name_with_a_command_in_it(capsys, tmp_path, plans):
    """Whichever refuses it, the plan loader or export: exit 1, a diagnostic, nothing written."""
    for k, plan in enumerate((renamed(plans["moe-h200"], f"x\n{PAYLOAD}"),
                              with_group(plans["moe-h200"], gpu=f"h200-sxm\n{PAYLOAD}"))):
        code, err, out_dir = cli_export(capsys, tmp_path / str(k), plan)
        assert code == 1 and err.startswith("error") and "\n" + PAYLOAD not in err
        assert written(out_dir) == []


def test_a_control_character_in_a_spec_file_name_is_refused_by_export(capsys, tmp_path, plans):
    """A spec file may have any name a file system allows, so the plan loader keeps it: export refuses it."""
    plan = plans["moe-h200"].model_copy(update={"spec_files": ["ok.flow", f"x.flow\n{PAYLOAD}"]})
    message = ("the plan's spec_files[1] contains a control character (U+000A), which a launch script cannot carry "
               "safely")
    assert refusal(plan) == [(message, "rename the spec file and compile it again")]
    code, err, out_dir = cli_export(capsys, tmp_path, plan)
    assert code == 1 and err == f"error: {message}\n  = help: rename the spec file and compile it again\n"
    assert written(out_dir) == []


def test_a_control_character_in_the_model_path_or_plan_file_name_is_refused(capsys, tmp_path, plans):
    plan = plans["moe-h200"]
    assert refusal(plan, model_paths={"*": f"/m\n{PAYLOAD}"}) == [(
        "`--model-path PATH` contains a control character (U+000A), which a launch script cannot carry safely",
        "give the checkpoint's path without control characters")]
    assert refusal(plan, model_paths={"deepseek-v3": "/m\u202e"})[0][0].startswith(
        "`--model-path deepseek-v3=PATH` contains a control character (U+202E)")
    assert refusal(plan, plan_name=f"p\n{PAYLOAD}.json") == [(
        "the plan file's name contains a control character (U+000A), which a launch script cannot carry safely",
        "rename the plan file")]
    code, err, out_dir = cli_export(capsys, tmp_path, plan, "--model-path", f"/m\n{PAYLOAD}")
    assert code == 1 and "error: `--model-path PATH` contains a control character (U+000A)" in err
    assert written(out_dir) == []


def test_every_text_of_a_plan_is_checked(plans):
    """A newline in any text of the plan refuses the export with the text's place, whichever text
    it is: never an internal error, never a file."""
    plan = plans["code-assistant-8b"]
    data = plan.model_dump()

    def places(node, path=()):
        if isinstance(node, str):
            yield path
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            yield from places(value, (*path, key))

    checked = 0
    for path in places(data):
        changed = json.loads(json.dumps(data))
        parent = changed
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] += "\n"
        try:
            hostile = Plan.model_validate(changed)
        except ValueError:  # a text the schema restricts (a role, a mode)
            continue
        shown = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in path).lstrip(".")
        for target in TARGETS:
            problems = refusal(hostile, target, allow_degrade=True)
            assert [m for m, _ in problems] == [f"the plan's {shown} contains a control character (U+000A), "
                                                "which a launch script cannot carry safely"]
        checked += 1
    assert checked > 20
    g = plan.deployments[0].groups[0]
    keyed = with_group(plan, memory=g.memory.model_copy(update={"arena_offsets": {"x\x1b[2J": 0}}))
    assert refusal(keyed)[0][0] == ("the plan's deployments[0].groups[0].memory.arena_offsets.x\\x1b[2J contains a "
                                    "control character (U+001B), which a launch script cannot carry safely")


@pytest.mark.parametrize("hostile", ["$(touch PWNED)", "`touch PWNED`", "it's; touch PWNED", "a b\"c\\d"])
@needs_bash
def test_shell_syntax_in_values_stays_text(tmp_path, plans, hostile):
    """In the model path (a command's word) and a spec file's name (a comment): quoted, run as the
    literal text, nothing executed."""
    plan = plans["code-assistant-8b"].model_copy(update={"spec_files": [f"{hostile}.flow"]})
    for target in TARGETS:
        documents, files = manifest(plan, target, model_paths={"*": hostile})
        printed = run_scripts(files, tmp_path)
        check_runs(plan, files, printed)
        check_manifest(plan, documents, files)
        for run_ in printed.values():
            assert run_["argv"][2 if target == "vllm" else 4] == hostile
        for script in files.values():
            assert f", from {shlex.quote(hostile + '.flow')})\n" in script
            assert f"# the model: {shlex.quote(hostile)} (--model-path)" in script
        assert all(doc["spec"]["template"]["spec"]["containers"][0]["args"][1] == hostile
                   for doc in engine_documents(documents))
    assert not (tmp_path / "work" / "PWNED").exists() and not Path("PWNED").exists()


def test_a_model_path_that_reads_as_a_flag_is_refused(plans):
    ((message, help),) = refusal(plans["moe-h200"], model_paths={"*": "--trust-remote-code"})
    assert message == "the --model-path of model `deepseek-v3` starts with `-`: the engine would read it as a flag"
    assert help == "write a relative path with `./` in front"


@pytest.mark.parametrize("name", ["../../../tmp/x", "/tmp/abs", "..", "/", "a/../../b"])
def test_deployment_names_cannot_leave_the_output_folder(capsys, tmp_path, plans, name):
    plan = renamed(plans["shared-cluster"], name)
    out_dir = tmp_path / "1" / "2" / "3" / "out"
    files = export_plan(plan, target="vllm", k8s=True).files
    slug = {"..": "deployment", "/": "deployment"}.get(name, re.sub(r"[^a-z0-9]+", "-", name).strip("-"))
    # the same files as the honest plan's, the renamed deployment's under its slug
    honest = [path for path, _ in export_plan(plans["shared-cluster"], target="vllm", k8s=True).files]
    assert [path for path, _ in files] == [re.sub(r"^small/", f"{slug}/", path) for path in honest]
    assert any(path.startswith(f"{slug}/") for path, _ in files)
    assert export_cmd.write_files(files, out_dir) is None
    assert written(tmp_path) == sorted(f"1/2/3/out/{path}" for path, _ in files)
    # the command: the plan loader refuses such a name, or export writes the same slugs
    code, err, cli_dir = cli_export(capsys, tmp_path / "cli", plan)
    assert (code, written(cli_dir)) in ((1, []), (0, sorted(path for path, _ in files))), err
    assert written(tmp_path / "cli") == sorted(f"deep/er/out/{p}" for p in written(cli_dir)) + ["hostile.json"]


def test_deployments_whose_slugs_meet_get_distinct_files(plans):
    plan = plans["shared-cluster"]
    for names, slugs in ((["small", "small"], ["small", "small-2"]), (["A.b", "a_b"], ["a-b", "a-b-2"]),
                         (["x", "x-2"], ["x", "x-2"]), (["x-2", "X"], ["x-2", "x"])):
        hostile = renamed(renamed(plan, names[0], 0), names[1], 1)
        documents, files = manifest(hostile, "vllm")
        assert sorted({path.split("/")[0] for path in files}) == sorted(slugs)
        check_manifest(hostile, documents, files)
        # each keeps its own deployment's settings, although the names may be equal
        served = {path.split("/")[0]: flag(launch(s)[2], "--served-model-name") for path, s in files.items()}
        assert served == {slugs[0]: "qwen2.5-7b", slugs[1]: "qwen2.5-72b"}


def test_a_long_name_gives_valid_kubernetes_names(plans):
    plan = renamed(plans["shared-cluster"], "Very_Long." * 30 + "-")
    documents, files = manifest(plan, "sglang")
    check_manifest(plan, documents, files)
    assert documents[0]["metadata"]["name"] == "very-long-very-long-very-long-g0-colocated-0"


@pytest.mark.parametrize("separator", ["\n", "\r\n", "\x85"])
def test_yaml_documents_in_a_name_are_refused(capsys, tmp_path, plans, separator):
    name = separator.join(["x", "---", "apiVersion: v1", "kind: Pod", "spec:", "  hostPID: true"])
    assert refusal(renamed(plans["code-assistant-8b"], name))[0][0].startswith(
        "the plan's deployments[0].name contains a control character")
    code, err, out_dir = cli_export(capsys, tmp_path, renamed(plans["code-assistant-8b"], name))
    assert code == 1 and err.startswith("error") and written(out_dir) == []


@pytest.mark.parametrize("name", ["x\u2028---\u2028kind: Pod\u2028hostPID: true", "x: y", "'--- {kind: Pod}",
                                  "x # kind: Pod", "true", "0"])
def test_yaml_syntax_in_a_name_stays_a_value(plans, name):
    """No control character, so the export goes on: the name is data, one Deployment per instance."""
    plan = renamed(plans["code-assistant-8b"], name)
    documents, files = manifest(plan, "vllm")
    check_manifest(plan, documents, files)
    assert [doc["kind"] for doc in documents] == ["Deployment"] * 3

    def keys(node):
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            yield key
            yield from keys(value)

    assert "hostPID" not in set(keys(documents))
    plan_notes = documents[0]["metadata"]["annotations"]["flowc.dev/plan"].split("\n")
    assert plan_notes[1].startswith(f"deployment `{shell_quote(name)}`: model llama-3.1-8b")


def test_a_symbolic_link_out_of_the_output_folder_is_refused(capsys, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    for link, target in (("chatbot", outside), ("kubernetes.yaml", outside / "k.yaml")):
        out_dir = tmp_path / f"out-{link}"
        out_dir.mkdir()
        (out_dir / link).symlink_to(target)
        code, out, err = run(capsys, "export", str(PLANS / "chat-70b.json"), "--target", "vllm", "--k8s",
                             "-o", str(out_dir))
        assert code == 2 and out == ""
        assert f"outside `{out_dir}`; nothing was written\n" in err
        assert f"= help: remove the symbolic link under `{out_dir}` that leads out of it, or give another -o DIR" in err
        assert written(outside) == [] and written(out_dir) == []
    # a link that stays inside is followed
    out_dir = tmp_path / "out-inside"
    (out_dir / "real").mkdir(parents=True)
    (out_dir / "chatbot").symlink_to(out_dir / "real")
    code, _, _ = run(capsys, "export", str(PLANS / "chat-70b.json"), "--target", "vllm", "-o", str(out_dir))
    assert code == 0 and written(out_dir / "real") and all(p.endswith(".sh") for p in written(out_dir / "real"))


def test_a_loop_of_links_is_a_usage_error(capsys, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "chatbot").symlink_to(out_dir / "loop")
    (out_dir / "loop").symlink_to(out_dir / "chatbot")
    code, _, err = run(capsys, "export", str(PLANS / "chat-70b.json"), "--target", "vllm", "-o", str(out_dir))
    assert code == 2 and err.startswith(f"error: cannot write under `{out_dir}`")
