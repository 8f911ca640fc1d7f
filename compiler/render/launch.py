"""`flowc launch`: a plan's colocated instances as torchrun commands for the flowc runtime.

Pure: a Plan in, files (relative path, content) out. An instance of tp x pp ranks spans the
nodes its GPUs are on; for each of those nodes one bash script starts that node's ranks with
torchrun (`--nnodes`, `--node-rank`, `--nproc-per-node`, a static rendezvous at node 0's address),
each rank running `flowc run PLAN --launcher torchrun`: rank 0 runs the requests (the script's
arguments: `--prompts FILE` or `--replay`), the others serve its steps (runtime/runner.py).

torchrun numbers ranks node by node (node rank x processes per node + local rank), and the
runtime's rank r is GPU r of the instance's list (TP rank r % tp of stage r // tp), so an
instance launches only when its GPU list takes each node's GPUs together, the same number on
every node (`export.even_node_shares`, the rule vLLM's and SGLang's multi-node flags share).
`CUDA_VISIBLE_DEVICES` gives each node's ranks the plan's GPUs there, in order. Hosts are not
in the plan: the scripts read node 0's address from FLOWC_MASTER_ADDR and refuse to start
without it.

Disaggregated deployments are not launched: the runtime serves their prefill and decode
instances in one process (`flowc run`). Every value reaches a script through
`export.shell_quote`, and file names are the deployments' slugs (`export.deployment_slugs`).
"""

from __future__ import annotations

from typing import NamedTuple

from flowc.compiler.plan import DeploymentPlan, Plan
from flowc.compiler.render.export import deployment_slugs, even_node_shares, node_shares, shell_quote

MASTER_PORT = 29500  # torchrun's default rendezvous port; instance i of a plan uses MASTER_PORT + i


class LaunchProblem(NamedTuple):
    message: str
    help: str


def _script(plan_name: str, d: DeploymentPlan, group: int, index: int, ordinal: int, node_rank: int,
            nodes: list[tuple[int, list[int]]], vendor: str) -> str:
    g = d.groups[group]
    node, gpus = nodes[node_rank]
    per_node = len(gpus)
    first = node_rank * per_node
    lines = [
        "#!/usr/bin/env bash",
        f"# flowc launch: deployment {shell_quote(d.name)}, group {group} instance {index} (tp {g.tp} x pp {g.pp}, "
        f"{g.tp * g.pp} ranks), node {node_rank} of {len(nodes)}",
        f"# plan: {shell_quote(plan_name)}, the same file on every node, found from where this script runs",
        f"# here: ranks {first}-{first + per_node - 1} on node {node}'s GPUs {','.join(map(str, gpus))}",
        "# FLOWC_MASTER_ADDR: the address of this instance's node 0 (it hosts the rendezvous), the same on",
        f"# every node; FLOWC_MASTER_PORT: a free port there (default {MASTER_PORT + ordinal}). The arguments go to",
        "# `flowc run` on rank 0: --prompts FILE.jsonl, or --replay.",
        "set -euo pipefail",
        'master_addr="${FLOWC_MASTER_ADDR:?set FLOWC_MASTER_ADDR to the address of node 0 of this instance}"',
        f'master_port="${{FLOWC_MASTER_PORT:-{MASTER_PORT + ordinal}}}"',
    ]
    if vendor == "nvidia":  # the runtime puts local rank k on cuda:k: the plan's k-th GPU of this node
        lines.append(f"export CUDA_VISIBLE_DEVICES={shell_quote(','.join(map(str, gpus)))}")
    lines.append(f"exec torchrun --nnodes {len(nodes)} --node-rank {node_rank} --nproc-per-node {per_node} "
                 '--master-addr "$master_addr" --master-port "$master_port" '
                 + " ".join(shell_quote(word) for word in _run_words(plan_name, d)) + ' "$@"')
    return "\n".join(lines) + "\n"


def _run_words(plan_path: str, d: DeploymentPlan) -> list[str]:
    """What each rank runs, after torchrun's own flags (the run's arguments follow)."""
    return ["-m", "flowc", "run", plan_path, "--launcher", "torchrun", "--deployment", d.name]


def _launchable(plan: Plan, plan_name: str, problems: list[LaunchProblem]):
    """(deployment, its slug, group index, instance index, ordinal, node shares) of every
    instance torchrun can start; a LaunchProblem in `problems` for each other."""
    ordinal = 0
    for d, slug in zip(plan.deployments, deployment_slugs(plan)):
        if d.mode == "disaggregated":
            problems.append(LaunchProblem(
                f"deployment `{d.name}` is disaggregated: the flowc runtime serves its prefill and decode instances "
                "in one process", f"run it with `flowc run {plan_name} --deployment {d.name}`"))
            continue
        for j, g in enumerate(d.groups):
            for i, instance in enumerate(g.instances):
                nodes = node_shares(instance.gpus)
                if not even_node_shares(nodes):
                    problems.append(LaunchProblem(
                        f"instance {i} of group {j} of deployment `{d.name}` does not take each node's GPUs together, "
                        "the same number on every node: torchrun cannot number its ranks as the runtime does",
                        "compile the plan again (the placer keeps an instance's GPUs of a node together)"))
                    continue
                yield d, slug, j, i, ordinal, nodes
                ordinal += 1


def launch_plan(plan: Plan, plan_name: str, *, image: str | None = None, mounted: dict[str, str] | None = None,
                run_args: tuple[str, ...] = ()) -> tuple[list[tuple[str, str]], list[LaunchProblem]]:
    """(files, problems): a script per node of every colocated instance
    (`DEPLOYMENT/gGROUP-INSTANCE-nodeK.sh`), and what cannot be launched, with its fix. With an
    `image`, also `kubernetes.yaml` (`manifest`: the `mounted` files, `plan.json` and the specs a
    replay reads, in a ConfigMap; `run_args` after `flowc run`'s own)."""
    files: list[tuple[str, str]] = []
    problems: list[LaunchProblem] = []
    launchable = list(_launchable(plan, plan_name, problems))
    for d, slug, j, i, ordinal, nodes in launchable:
        for k in range(len(nodes)):
            files.append((f"{slug}/g{j}-{i}-node{k}.sh",
                          _script(plan_name, d, j, i, ordinal, k, nodes, d.groups[j].vendor)))
    if image is not None and launchable:
        files.append(("kubernetes.yaml", manifest(launchable, mounted or {}, image, run_args)))
    return files, problems


# ------------------------------------------------------------------------------- Kubernetes

PLAN_MOUNT = "/flowc"  # where the pods see the plan (the ConfigMap `flowc-plan`)
K8S_HEADER = """\
# flowc launch: the flowc runtime on Kubernetes, a LeaderWorkerSet (leaderworkerset.x-k8s.io,
# 0.6 or later, installed apart) per instance: its leader runs node rank 0 (rank 0 runs the
# requests, given as the arguments after `flowc run`'s), each worker a further node, reaching the
# leader at LWS_LEADER_ADDRESS with its node rank from LWS_WORKER_INDEX. The plan (and the spec
# files beside it) are the ConfigMap flowc-plan, mounted at /flowc. `flowc run` is a batch (a
# prompts file or a replay),
# not a server: when it ends the group ends, and the LeaderWorkerSet starts it again.
"""


def manifest(launchable: list, mounted: dict[str, str], image: str, run_args: tuple[str, ...]) -> str:
    """The ConfigMap holding the `mounted` files (name: text), then one LeaderWorkerSet per
    instance, as YAML built from data (every text of the plan a value, never a template)."""
    from flowc.compiler.render.export import NODE_LABEL, yaml_documents

    documents: list[dict] = [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "flowc-plan"},
                              "data": dict(mounted)}]
    for d, slug, j, i, ordinal, nodes in launchable:
        g = d.groups[j]
        per_node = len(nodes[0][1])
        name = f"{slug}-g{j}-{i}"[:63].strip("-")
        labels = {"flowc.dev/deployment": slug, "flowc.dev/instance": name}

        def pod(node_rank: str, placement: dict) -> dict:
            command = ["torchrun", "--nnodes", str(len(nodes)), "--node-rank", node_rank, "--nproc-per-node",
                       str(per_node), "--master-addr", "$(LWS_LEADER_ADDRESS)", "--master-port",
                       str(MASTER_PORT + ordinal), *_run_words(f"{PLAN_MOUNT}/plan.json", d), *run_args]
            container = {"name": "flowc", "image": image, "command": command,
                         "volumeMounts": [{"name": "plan", "mountPath": PLAN_MOUNT, "readOnly": True}]}
            if g.vendor == "nvidia":  # the device plugin hands the pod its GPUs
                container["resources"] = {"limits": {"nvidia.com/gpu": per_node}}
            return {"metadata": {"labels": dict(labels)},
                    "spec": {**placement, "restartPolicy": "Always", "containers": [container],
                             "volumes": [{"name": "plan", "configMap": {"name": "flowc-plan"}}]}}

        others = [str(node) for node, _ in nodes[1:]] or [str(nodes[0][0])]
        documents.append({
            "apiVersion": "leaderworkerset.x-k8s.io/v1", "kind": "LeaderWorkerSet",
            "metadata": {"name": name, "labels": dict(labels)},
            "spec": {"replicas": 1, "leaderWorkerTemplate": {
                "size": len(nodes),
                "leaderTemplate": pod("0", {"nodeSelector": {NODE_LABEL: str(nodes[0][0])}}),
                "workerTemplate": pod("$(LWS_WORKER_INDEX)", {"affinity": {"nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [
                        {"key": NODE_LABEL, "operator": "In", "values": others}]}]}}}})}}})
    return K8S_HEADER + yaml_documents(documents)
