"""`flowc export`: launch scripts and Kubernetes manifests for vLLM and SGLang from a plan.

The example plans are compiled once and kept in tests/export_goldens/plans/ (compiling them all
takes longer than this whole module); the goldens there pin the output of `flowc export --k8s`
for each plan and engine version. Regenerate both after a change on purpose, then review the diff:

    FLOWC_UPDATE_GOLDEN=1 python -m pytest tests/test_export.py -q

The checks below parse the scripts on their own (shlex), not with compiler/render/export.py's parser.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
from pathlib import Path

import pytest
import yaml

import flowc.cli
from flowc import export_cmd
from flowc.compiler.model import memory
from flowc.compiler.plan import GpuRef, Plan
from flowc.compiler.render.export import (
    TARGETS,
    ExportError,
    TemplateError,
    UnknownVersion,
    check_script,
    export_plan,
    hf_repos,
    known_versions,
    load_engine,
)

ROOT = Path(__file__).resolve().parents[1]
GOLDENS = Path(__file__).resolve().parent / "export_goldens"
PLANS = GOLDENS / "plans"
UPDATE = os.environ.get("FLOWC_UPDATE_GOLDEN") == "1"
EXAMPLES = ("chat-70b", "code-assistant-8b", "moe-h200", "shared-cluster", "tiny-cpu")
GPU_EXAMPLES = EXAMPLES[:-1]
# (target, version, extra flags) of each golden: both vLLM versions (0.8.5 degraded: it has no
# connector for the disaggregated plans) and SGLang.
RUNS = {"vllm": ("vllm", None, ()), "vllm-0.8.5": ("vllm", "0.8.5", ("--allow-degrade",)),
        "sglang": ("sglang", None, ())}
ENGINE_VERSIONS = [(t, v) for t in TARGETS for v in known_versions(t)]


def _compile(example: str) -> Plan:
    from flowc.api import check_sources
    from flowc.compiler.optimize.compile import compile_spec

    return compile_spec(check_sources(Path("examples") / f"{example}.flow").spec)


@pytest.fixture(scope="module")
def plans() -> dict[str, Plan]:
    if UPDATE:
        cwd = Path.cwd()
        os.chdir(ROOT)  # the plans name their spec as `flowc compile examples/X.flow` does
        try:
            for example in EXAMPLES:
                (PLANS / f"{example}.json").write_text(_compile(example).model_dump_json(indent=2) + "\n",
                                                       encoding="utf-8")
        finally:
            os.chdir(cwd)
    return {e: Plan.model_validate_json((PLANS / f"{e}.json").read_text(encoding="utf-8")) for e in EXAMPLES}


@pytest.fixture(autouse=True)
def _no_color_env(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.delenv("FLOWC_DEBUG", raising=False)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = flowc.cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def scripts(plan: Plan, target: str, version: str | None = None, **options) -> dict[str, str]:
    return {path: text for path, text in export_plan(plan, target=target, version=version, **options).files
            if path.endswith(".sh")}


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


# ---------------------------------------------------------------------------------- goldens

@pytest.mark.parametrize("run_name", RUNS)
@pytest.mark.parametrize("example", EXAMPLES)
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
    assert code == (1 if example == "tiny-cpu" else 0)


@pytest.mark.slow
def test_stored_plans_are_what_the_examples_compile_to(monkeypatch, plans):
    monkeypatch.chdir(ROOT)
    for example in EXAMPLES:  # byte for byte: plans carry no timings
        stored = (PLANS / f"{example}.json").read_text(encoding="utf-8")
        assert _compile(example).model_dump_json(indent=2) + "\n" == stored, example


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
    plan = with_group(plans["shared-cluster"], deployment_fields={"weights": "int4"})
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


def test_offload_and_multi_node_instances_are_refused(plans):
    plan = plans["shared-cluster"]
    g = plan.deployments[0].groups[0]
    offloading = with_group(plan, memory=g.memory.model_copy(update={"offloaded": {"weights": 1 << 30}}))
    with pytest.raises(ExportError, match="offloads to host memory"):
        export_plan(offloading, target="vllm")
    assert "offload dropped" in next(iter(scripts(offloading, "vllm", allow_degrade=True).values()))
    spread = g.instances[0].model_copy(update={"gpus": [GpuRef(node=0, index=0), GpuRef(node=1, index=0)]})
    with pytest.raises(ExportError, match="spans nodes 0, 1"):
        export_plan(with_group(plan, instances=[spread, *g.instances[1:]]), target="sglang", allow_degrade=True)


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

@pytest.mark.parametrize("target", ["vllm", "sglang"])
@pytest.mark.parametrize("example", GPU_EXAMPLES)
def test_kubernetes_manifest(plans, example, target):
    plan = plans[example]
    files = dict(export_plan(plan, target=target, k8s=True).files)
    objects = list(yaml.safe_load_all(files["kubernetes.yaml"]))
    instances = [(d, g, inst) for d in plan.deployments for g in d.groups for inst in g.instances]
    assert len(objects) == len(instances)
    for obj, (_, g, inst) in zip(objects, instances):
        assert obj["kind"] == "Deployment" and obj["spec"]["replicas"] == 1
        pod = obj["spec"]["template"]["spec"]
        assert pod["nodeSelector"] == {"flowc.dev/node": str(inst.gpus[0].node)}
        (container,) = pod["containers"]
        assert container["resources"]["limits"] == {"nvidia.com/gpu": g.tp * g.pp}
        assert obj["spec"]["selector"]["matchLabels"].items() <= obj["spec"]["template"]["metadata"]["labels"].items()
        assert str(g.tp) in container["args"]
        assert "CUDA_VISIBLE_DEVICES" not in {e["name"] for e in container.get("env", [])}


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
    code, out, _ = run(capsys, "export", str(PLANS / "moe-h200.json"), "--target", "sglang", "--k8s")
    assert code == 0
    assert out.startswith("==> deepseek/g0-colocated-0.sh <==\n#!/usr/bin/env bash\n")
    assert "\n==> kubernetes.yaml <==\n" in out
    code, out, _ = run(capsys, "--json", "export", str(PLANS / "moe-h200.json"), "--target", "sglang")
    listing = json.loads(out)
    assert [f["path"] for f in listing] == ["deepseek/g0-colocated-0.sh"]
    assert listing[0]["content"].startswith("#!/usr/bin/env bash\n")


def test_output_directory(capsys, tmp_path, plans):
    code, out, _ = run(capsys, "export", str(PLANS / "chat-70b.json"), "--target", "vllm", "--k8s",
                       "-o", str(tmp_path))
    groups = plans["chat-70b"].deployments[0].groups
    assert code == 0 and out == f"wrote {sum(g.replicas for g in groups) + 1} files under {tmp_path}\n"
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
    code, out, _ = run(capsys, "--json", "export", str(PLANS / "tiny-cpu.json"), "--target", "sglang")
    document = json.loads(out)
    assert code == 1 and document["valid"] is False and document["error_count"] == 2
