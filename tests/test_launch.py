"""`flowc launch`: a plan whose instance spans two nodes, compiled by the real compiler, run as
two torchrun "nodes" on this machine (static rendezvous on 127.0.0.1): the same tokens as
`flowc run` spawning the ranks itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import flowc.cli
from flowc.compiler.plan import GpuRef
from flowc.compiler.render.export import even_node_shares, node_shares
from flowc.runtime.parallel import free_port

pytest.importorskip("torch")

SPEC = """use std.cpu_local
use std.models

cluster pair {
  node x 2 {
    gpu cpu-local x 1
  }
  network ethernet 10 Gb/s
}

workload chat {
  arrival poisson 1 req/s
  prompt uniform(16 tok, 64 tok)
  output uniform(8 tok, 16 tok)
}

slo relaxed {
  ttft p90 <= 5 s
  tpot p90 <= 1 s
}

deploy tiny {
  model tiny-llama { weights fp32; kv fp32 }
  on pair
  serve chat under relaxed
  pp in [2]
  max_batched_tokens in [512 tok]
  max_seqs in [32]
}
"""
PROMPTS = [{"id": "a", "prompt_token_ids": [1, 2, 3, 4], "max_tokens": 8},
           {"id": "b", "prompt_token_ids": [9, 8, 7], "max_tokens": 6}]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = flowc.cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """The spec compiled into plan.json, and a prompts file."""
    folder = tmp_path_factory.mktemp("launch")
    (folder / "pair.flow").write_text(SPEC)
    assert flowc.cli.main(["compile", str(folder / "pair.flow"), "-o", str(folder / "plan.json")]) == 0
    (folder / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return folder


def _launch(folder: Path, capsys) -> dict[str, str]:
    cwd = os.getcwd()
    os.chdir(folder)  # the scripts name the plan as it was given: relative to where they run
    try:
        code, out, err = run(capsys, "launch", "plan.json", "-o", "out")
    finally:
        os.chdir(cwd)
    assert code == 0, err
    assert out == "wrote 2 files under out\n"
    return {path.name: path.read_text() for path in sorted((folder / "out" / "tiny").iterdir())}


def test_one_script_per_node_with_the_torchrun_arguments(folder, capsys):
    scripts = _launch(folder, capsys)
    assert sorted(scripts) == ["g0-0-node0.sh", "g0-0-node1.sh"]
    for k, name in enumerate(sorted(scripts)):
        script = scripts[name]
        subprocess.run(["bash", "-n", str(folder / "out" / "tiny" / name)], check=True)
        command = script.splitlines()[-1]
        assert command == (f"exec torchrun --nnodes 2 --node-rank {k} --nproc-per-node 1 --master-addr "
                           '"$master_addr" --master-port "$master_port" -m flowc run plan.json --launcher torchrun '
                           '--deployment tiny "$@"')
        assert f"# here: ranks {k}-{k} on node {k}'s GPUs 0\n" in script
        assert "CUDA_VISIBLE_DEVICES" not in script  # a CPU plan


def test_a_script_refuses_to_start_without_the_master_address(folder, capsys):
    _launch(folder, capsys)
    env = {k: v for k, v in os.environ.items() if k != "FLOWC_MASTER_ADDR"}
    done = subprocess.run(["bash", str(folder / "out" / "tiny" / "g0-0-node1.sh")], env=env, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode != 0
    assert "set FLOWC_MASTER_ADDR to the address of node 0 of this instance" in done.stderr


def test_two_torchrun_nodes_give_the_tokens_of_one_machine(folder, capsys):
    _launch(folder, capsys)
    code, spawned, err = run(capsys, "run", str(folder / "plan.json"), "--prompts", str(folder / "prompts.jsonl"))
    assert code == 0, err
    env = {**os.environ, "FLOWC_MASTER_ADDR": "127.0.0.1", "FLOWC_MASTER_PORT": str(free_port()),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    nodes = [subprocess.Popen(["bash", f"out/tiny/g0-0-node{k}.sh", "--prompts", "prompts.jsonl"], cwd=folder,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k in (1, 0)]
    try:
        results = [node.communicate(timeout=180) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    (worker_out, worker_err), (out, err) = results
    assert [node.returncode for node in nodes] == [0, 0], worker_err + err
    assert worker_out == ""  # rank 1 serves rank 0's steps and prints nothing
    tokens = {r["id"]: r["output_token_ids"] for r in map(json.loads, out.splitlines())}
    assert tokens == {r["id"]: r["output_token_ids"] for r in map(json.loads, spawned.splitlines())}
    assert [len(tokens[p["id"]]) for p in PROMPTS] == [8, 6]


def test_ranks_must_take_each_nodes_gpus_together():
    def shares(*gpus):
        return node_shares([GpuRef(node=n, index=i) for n, i in gpus])

    assert shares((0, 4), (0, 5), (1, 0), (1, 1)) == [(0, [4, 5]), (1, [0, 1])]
    assert even_node_shares(shares((0, 4), (0, 5), (1, 0), (1, 1)))
    assert not even_node_shares(shares((0, 0), (1, 0), (0, 1), (1, 1)))  # node 0's GPUs apart
    assert not even_node_shares(shares((0, 0), (0, 1), (1, 0)))  # 2 GPUs on node 0, 1 on node 1


def test_torchrun_launcher_outside_torchrun_is_a_usage_error(folder, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    code, out, err = run(capsys, "run", str(folder / "plan.json"), "--prompts", str(folder / "prompts.jsonl"),
                         "--launcher", "torchrun")
    assert code == 2 and out == ""
    assert "torchrun did not start this process" in err


def test_a_disaggregated_deployment_is_not_launched(folder, capsys, tmp_path):
    document = json.loads((folder / "plan.json").read_text())
    deployment = document["deployments"][0]
    [group] = deployment["groups"]
    # the roles alone: the load check takes a GPU used twice (that is verify's F0522)
    deployment.update(groups=[{**group, "role": "prefill"}, {**group, "role": "decode"}], mode="disaggregated")
    (tmp_path / "split.json").write_text(json.dumps(document))
    code, out, err = run(capsys, "launch", str(tmp_path / "split.json"))
    assert code == 1 and out == ""
    assert err.startswith("error: deployment `tiny` is disaggregated: the flowc runtime serves its prefill and "
                          "decode instances in one process\n")


def test_k8s_manifest_runs_the_same_commands_as_a_leader_worker_set(folder, capsys):
    import yaml

    cwd = os.getcwd()
    os.chdir(folder)
    try:
        assert run(capsys, "launch", "plan.json", "--k8s")[0] == 2  # the image is needed
        code, out, err = run(capsys, "launch", "plan.json", "-o", "k8s", "--k8s", "--image", "registry/flowc:1",
                             "--run-args", "--replay --requests 8")
    finally:
        os.chdir(cwd)
    assert code == 0, err
    config, group = yaml.safe_load_all((folder / "k8s" / "kubernetes.yaml").read_text())
    # the plan and the spec a replay reads, byte for byte, where the pods mount them
    assert config["kind"] == "ConfigMap" and config["data"] == {"plan.json": (folder / "plan.json").read_text(),
                                                                "pair.flow": SPEC}
    assert group["kind"] == "LeaderWorkerSet" and group["spec"]["leaderWorkerTemplate"]["size"] == 2
    templates = group["spec"]["leaderWorkerTemplate"]
    script = (folder / "k8s" / "tiny" / "g0-0-node0.sh").read_text().splitlines()[-1]
    for rank, template in (("0", templates["leaderTemplate"]), ("$(LWS_WORKER_INDEX)", templates["workerTemplate"])):
        (container,) = template["spec"]["containers"]
        assert container["image"] == "registry/flowc:1" and "resources" not in container  # a CPU plan
        assert container["command"] == ["torchrun", "--nnodes", "2", "--node-rank", rank, "--nproc-per-node", "1",
                                        "--master-addr", "$(LWS_LEADER_ADDRESS)", "--master-port", "29500", "-m",
                                        "flowc", "run", "/flowc/plan.json", "--launcher", "torchrun",
                                        "--deployment", "tiny", "--replay", "--requests", "8"]
        assert container["volumeMounts"] == [{"name": "plan", "mountPath": "/flowc", "readOnly": True}]
    # the script and the pods run the same torchrun command but for the plan's path and the rendezvous
    assert "--nnodes 2 --node-rank 0 --nproc-per-node 1" in script
    assert "-m flowc run plan.json --launcher torchrun" in script
    assert templates["leaderTemplate"]["spec"]["nodeSelector"] == {"flowc.dev/node": "0"}
    terms = templates["workerTemplate"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms == [{"matchExpressions": [{"key": "flowc.dev/node", "operator": "In", "values": ["1"]}]}]
