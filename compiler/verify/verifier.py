"""The plan verifier: an independent re-check of a plan against its spec, from first principles.

`verify_plan(plan, spec)` returns diagnostics (empty when the plan is sound) and raises nothing
for a bad plan; `verify_file(plan_path, spec_path)` loads both first; `cmd_verify` is the body
of `flowc verify plan.json [--against spec.flow]`.

Independence: nothing here imports the optimizer or the placement (or the candidate
enumeration); the verifier recomputes what a plan claims from the spec with the shared models
it must agree with: the memory model (`memory_budget`, `kv_bytes_per_token`), the cost model
and the simulator.

Checks, one code each (F052x: planning):

- F0520 the plan does not match the spec, or is malformed: format_version major, unknown
  deployment / cluster / model / GPU type, dtypes other than the spec deployment's, a spec
  deployment the plan leaves out, groups and roles that contradict the mode, scheduler
  values that are not positive (or a chunk above the token budget), knob values outside the
  deployment's `search` lists, more GPUs than `max_gpus`, disaggregation not allowed.
- F0521 a GPU reference outside the cluster (node beyond the expanded node groups, index
  beyond gpus_per_node), or a group's GPU type that is not the node's GPU.
- F0522 a GPU used twice (by two instances of any deployments, or twice in one instance).
- F0523 parallelism: GPUs per instance != tp x pp; a TP group (one stage) not inside one link
  domain of one node; stages on different nodes without a network; tp that does not split the
  heads (KV heads split or replicate whole), pp that does not split the layers, ep > 1 on a
  dense model or one that does not divide the experts and tp (experts stay in the TP group).
- F0524 memory, per group against `memory_budget(model, gpu.memory, tp, pp,
  max_batched_tokens, max_seqs, block_size)`: capacity is the GPU's memory; weights on the GPU
  plus offloaded weights and experts equal the model's; KV blocks at most what fits in the
  usable memory left by the weights on the GPU, the model's activations and reserve (without
  offload: the budget's kv_blocks) plus the blocks offloaded as "kv", and they fit in
  `kv_cache`; reserve not below the model's; the
  categories sum to capacity, and what the engine takes (all but `free`) stays within the
  usable share (90%); arena offsets inside the arena; an instance holds the workload's
  longest request (prompt + output; prefill instances the prompt) when it is bounded;
  offloaded bytes need `allow offload` and fit in each node's host memory (all deployments).
- F0525 bandwidth at the workload's rate: disaggregated KV traffic (rate x mean prompt x
  kv_bytes_per_token(model), split evenly over prefill x decode pairs) must fit the links:
  within one node each instance's GPUs' own links (GPUs x link bandwidth); across nodes the
  network (bandwidth x NICs per node, each direction, shared by every deployment); pipeline
  activation hops that cross nodes are charged to the network the same way.
- F0526 predictions. Claims first: percentiles are non-negative, attainment a share, a plan
  that meets the SLO claims a goodput of at least the workload's rate, goodput per GPU is
  goodput / GPUs. Then the deployment is re-simulated from the plan (see `simulate_plan_deployment`; a group
  with offloaded weights adds its memory map's `offload_step_s` to every step) on the
  workload sampled with seed `PREDICTION_SEED`: `meets_slo` must agree (unless the run is
  within `BORDERLINE` of a limit), joint attainment within `ATTAINMENT_TOLERANCE`, p50 TTFT and
  TPOT within `TOLERANCE` (relative, or `ABS_TOLERANCE_MS`); the claimed goodput must not exceed
  the steady-state throughput of the same requests all queued at once by more than
  `TOLERANCE`, and must meet the SLO when simulated at (1 - TOLERANCE) of it.

Later checks of a deployment rely on earlier ones: memory, bandwidth and predictions are not
checked for a group or deployment whose structure failed (F0520, F0521, F0523), and
predictions only for a deployment with no other diagnostic, so one mistake gives one code.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from pydantic import ValidationError

from flowc.compiler.diagnostics import Diagnostic, suggestion_help
from flowc.compiler.model.memory import GPU_MEMORY_UTILIZATION, kv_bytes_per_token, memory_budget
from flowc.compiler.plan import FORMAT_VERSION, DeploymentPlan, GpuRef, Plan
from flowc.compiler.spec import Cluster, Deployment, Link, NodeGroup, Spec

__all__ = ["verify_plan", "verify_file", "verify_file_with_sources", "cmd_verify", "TOLERANCE",
           "ABS_TOLERANCE_MS", "ATTAINMENT_TOLERANCE", "BORDERLINE", "PREDICTION_SEED"]

# Predictions are re-simulated with the same cost model and simulator the optimizer uses, so a
# plan built as documented reproduces exactly; the tolerance absorbs legitimate differences in
# how a run is set up and stays far below the errors that matter (a 2x slip is always caught).
# Measured on examples/ (chat-70b at tp 2 and tp 4, code-assistant-8b): another seed, 4x the
# requests or a round-robin router move p50 TTFT and TPOT by under 5%; the cost model's error
# against hardware (10-25%) does not enter, both sides use the same model.
TOLERANCE = 0.15
ABS_TOLERANCE_MS = 0.5  # tiny latencies: a relative tolerance of 15% of 3 ms is noise
# meets_slo is not judged when the re-simulation is this close to a limit: a percentile within
# 5% of its limit, or a share of requests within 2 points of the required attainment.
BORDERLINE = 0.05
BORDERLINE_SHARE = 0.02
ATTAINMENT_TOLERANCE = 0.05  # joint attainment, absolute: sampling noise of a few hundred requests is ~2 points
PREDICTION_SEED = 0
ROUTER = "least_work"
SUPPORTED_MAJOR = int(FORMAT_VERSION.split(".")[0])
_VERSION = re.compile(r"(\d+)\.(\d+)")


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _gbps(n: float) -> str:
    return f"{n / 1e9:.2f} GB/s"


def _refs(gpus) -> str:
    return ", ".join(str(g) for g in gpus)


@dataclass
class _Node:
    index: int
    group: NodeGroup


@dataclass
class _Deployment:
    """What the checks of one deployment learned, for the later ones."""

    index: int
    plan: DeploymentPlan
    spec: Optional[Deployment] = None
    cluster: Optional[Cluster] = None
    ok: bool = True  # no structural problem: bandwidth and predictions can be checked
    clean: bool = True  # no diagnostic at all: predictions can be checked
    groups_ok: dict[int, bool] = field(default_factory=dict)
    checked: bool = False  # its structure was checked: memory can be checked group by group


def cluster_nodes(cluster: Cluster) -> list[_Node]:
    """The cluster's nodes in plan order: node groups expanded (`node x 2` is nodes 0 and 1)."""
    out = []
    for group in cluster.nodes:
        for _ in range(group.count):
            out.append(_Node(len(out), group))
    return out


class _Verifier:
    def __init__(self, plan: Plan, spec: Spec):
        self.plan, self.spec = plan, spec
        self.out: list[Diagnostic] = []
        self._workload_cache: dict[str, object] = {}

    # ------------------------------------------------------------------ helpers

    def error(self, code: str, message: str, help: str, *, at: Optional[str] = None, notes=(),
              dep: Optional[_Deployment] = None, structural: bool = False) -> None:
        all_notes = tuple(notes) + ((f"at {at}",) if at else ())
        self.out.append(Diagnostic(code, message, help=help, notes=all_notes))
        if dep is not None:
            dep.clean = False
            if structural:
                dep.ok = False

    def requests(self, workload_name: str, n: Optional[int] = None):
        """The workload sampled once per count with the prediction seed (numpy is imported here only)."""
        if (workload_name, n) not in self._workload_cache:
            from flowc.compiler.model.workload import sample_requests

            self._workload_cache[workload_name, n] = sample_requests(self.spec.workloads[workload_name], n,
                                                                     seed=PREDICTION_SEED)
        return self._workload_cache[workload_name, n]

    def rate(self, workload_name: str) -> float:
        from flowc.compiler.model.workload import base_rate

        return base_rate(self.spec.workloads[workload_name])

    # ------------------------------------------------------------------ driver

    def run(self) -> list[Diagnostic]:
        plan, spec = self.plan, self.spec
        match = _VERSION.fullmatch(plan.format_version.strip())
        if match is None or int(match.group(1)) != SUPPORTED_MAJOR:
            self.error("F0520", f"plan format_version `{plan.format_version}` is not supported "
                       f"(this flowc reads {SUPPORTED_MAJOR}.x)",
                       "compile the plan again with this flowc, or verify it with the flowc that wrote it",
                       at="format_version")
            return self.out
        deps = [_Deployment(i, dp) for i, dp in enumerate(plan.deployments)]
        seen: dict[str, int] = {}
        for dep in deps:
            name = dep.plan.name
            if name in seen:
                self.error("F0520", f"deployment `{name}` is planned twice (deployments[{seen[name]}] and "
                           f"deployments[{dep.index}])", "keep one plan per deployment",
                           at=f"deployments[{dep.index}]", dep=dep, structural=True)
                continue
            seen[name] = dep.index
        for name in spec.deployments:
            if name not in seen:
                self.error("F0520", f"the spec's deployment `{name}` has no plan",
                           "compile the plan again from this spec (a plan covers every deployment)",
                           at="deployments")
        for dep in deps:
            if dep.ok:
                self.check_spec_match(dep)
            if dep.ok:
                self.check_structure(dep)
        self.check_shared_gpus(deps)
        host: dict[tuple[str, int], list[tuple[str, int]]] = {}
        for dep in deps:
            if dep.checked:
                self.check_memory(dep, host)
        self.check_host_memory(deps, host)
        self.check_bandwidth([dep for dep in deps if dep.ok])
        for dep in deps:
            if dep.ok and dep.clean:
                self.check_predictions(dep)
        return sorted(self.out, key=lambda d: d.code)

    # ------------------------------------------------------------------ F0520

    def check_spec_match(self, dep: _Deployment) -> None:
        spec, dp, i = self.spec, dep.plan, dep.index
        at = f"deployments[{i}]"
        if dp.name not in spec.deployments:
            self.error("F0520", f"deployment `{dp.name}` is not in the spec",
                       suggestion_help(dp.name, spec.deployments, "the spec's deployments"),
                       at=f"{at}.name", dep=dep, structural=True)
            return
        d = spec.deployments[dp.name]
        if dp.cluster != d.cluster or dp.cluster not in spec.clusters:
            known = dp.cluster in spec.clusters
            self.error("F0520", f"deployment `{dp.name}`: the plan places it on cluster `{dp.cluster}`, "
                       f"the spec on `{d.cluster}`" + ("" if known else f" (no cluster `{dp.cluster}` in the spec)"),
                       "compile the plan again from this spec", at=f"{at}.cluster", dep=dep, structural=True)
            return
        if dp.model != d.model.name:
            known = dp.model in spec.models
            self.error("F0520", f"deployment `{dp.name}`: the plan serves model `{dp.model}`, the spec deploys "
                       f"`{d.model.name}`" + ("" if known else f" (no model `{dp.model}` in the spec)"),
                       "compile the plan again from this spec", at=f"{at}.model", dep=dep, structural=True)
            return
        for what, planned, wanted in (("weights", dp.weights, d.model.weights), ("kv", dp.kv, d.model.kv)):
            if planned != wanted:
                self.error("F0520", f"deployment `{dp.name}`: the plan keeps {what} in {planned}, the spec's "
                           f"deployment in {wanted}", "compile the plan again from this spec",
                           at=f"{at}.{what}", dep=dep, structural=True)
        if dp.model_spec is not None and dp.model_spec != d.model.model_copy(update={"location": None}):
            self.error("F0520", f"deployment `{dp.name}`: the plan's copy of model `{dp.model}` differs from the "
                       "spec's", "compile the plan again from this spec", at=f"{at}.model_spec", dep=dep,
                       structural=True)
        if not dep.ok:
            return
        dep.spec, dep.cluster = d, spec.clusters[d.cluster]
        # mode and roles
        if not dp.groups:
            self.error("F0520", f"deployment `{dp.name}` has no instance groups", "compile the plan again",
                       at=f"{at}.groups", dep=dep, structural=True)
            return
        roles = [g.role for g in dp.groups]
        if dp.mode == "colocated" and any(r != "colocated" for r in roles):
            self.error("F0520", f"deployment `{dp.name}` is colocated but has prefill or decode groups",
                       "a colocated deployment has only `colocated` groups", at=f"{at}.groups", dep=dep,
                       structural=True)
        if dp.mode == "disaggregated":
            if not d.allow_disaggregation:
                self.error("F0520", f"deployment `{dp.name}` is disaggregated, but its spec does not "
                           "`allow disaggregation`", "add `allow disaggregation` to the deployment, or plan it "
                           "colocated", at=f"{at}.mode", dep=dep)
            if "colocated" in roles or "prefill" not in roles or "decode" not in roles:
                self.error("F0520", f"deployment `{dp.name}` is disaggregated but does not have prefill and "
                           "decode groups only", "a disaggregated deployment has `prefill` and `decode` groups",
                           at=f"{at}.groups", dep=dep, structural=True)
        for j, g in enumerate(dp.groups):
            gat = f"{at}.groups[{j}]"
            ok = True
            if not g.instances:
                self.error("F0520", f"deployment `{dp.name}`, group {j}: no instances",
                           "drop the group or give it instances", at=f"{gat}.instances", dep=dep, structural=True)
                ok = False
            if g.gpu not in self.spec.gpus:
                self.error("F0520", f"deployment `{dp.name}`, group {j}: unknown GPU type `{g.gpu}`",
                           suggestion_help(g.gpu, self.spec.gpus, "GPU types"), at=f"{gat}.gpu", dep=dep,
                           structural=True)
                ok = False
            elif g.vendor != self.spec.gpus[g.gpu].vendor:
                self.error("F0520", f"deployment `{dp.name}`, group {j}: the plan says {g.gpu} is a {g.vendor} device, "
                           f"the spec says {self.spec.gpus[g.gpu].vendor}", "compile the plan again from this spec",
                           at=f"{gat}.vendor", dep=dep, structural=True)
                ok = False
            s = g.scheduler
            bad = [k for k in ("max_batched_tokens", "chunk_size", "max_seqs", "block_size") if getattr(s, k) < 1]
            if bad:
                self.error("F0520", f"deployment `{dp.name}`, group {j}: scheduler " + ", ".join(
                           f"{k} {getattr(s, k)}" for k in bad) + " (must be at least 1)",
                           "compile the plan again", at=f"{gat}.scheduler", dep=dep, structural=True)
                ok = False
            elif s.chunk_size > s.max_batched_tokens:
                self.error("F0520", f"deployment `{dp.name}`, group {j}: chunk_size {s.chunk_size} is above "
                           f"max_batched_tokens {s.max_batched_tokens}",
                           "a prefill chunk fits the token budget: chunk_size <= max_batched_tokens",
                           at=f"{gat}.scheduler.chunk_size", dep=dep, structural=True)
                ok = False
            dep.groups_ok[j] = ok
            # the deployment's own search space
            values = {"tp": g.tp, "pp": g.pp, "ep": g.ep, "replicas": g.replicas,
                      "max_batched_tokens": s.max_batched_tokens, "max_seqs": s.max_seqs,
                      "block_size": s.block_size}
            if s.chunked_prefill:
                values["chunk_size"] = s.chunk_size
            for knob, value in values.items():
                allowed = d.search.get(knob)
                if allowed and value not in allowed:
                    self.error("F0520", f"deployment `{dp.name}`, group {j}: {knob} {value} is not one the spec "
                               f"allows ({', '.join(map(str, allowed))})", "compile the plan again from this spec",
                               at=gat, dep=dep)
        if d.max_gpus is not None and dp.gpus > d.max_gpus:
            self.error("F0520", f"deployment `{dp.name}` uses {dp.gpus} GPUs, its spec allows max_gpus {d.max_gpus}",
                       "compile the plan again from this spec", at=at, dep=dep)

    # ------------------------------------------------------------------ F0521, F0523

    def check_structure(self, dep: _Deployment) -> None:
        dp, d, cluster = dep.plan, dep.spec, dep.cluster
        m = d.model
        nodes = cluster_nodes(cluster)
        for j, g in enumerate(dp.groups):
            gat = f"deployments[{dep.index}].groups[{j}]"
            where = f"deployment `{dp.name}`, group {j}"
            ok = True
            # F0521: every GPU inside the cluster, of the group's type
            for k, inst in enumerate(g.instances):
                for r, ref in enumerate(inst.gpus):
                    at = f"{gat}.instances[{k}].gpus[{r}]"
                    if not 0 <= ref.node < len(nodes):
                        self.error("F0521", f"{where}: GPU {ref} is outside cluster `{cluster.name}` (nodes 0 to "
                                   f"{len(nodes) - 1})", "use a node of the cluster; node groups count in "
                                   "declaration order, `node x 2` is nodes n0 and n1", at=at, dep=dep,
                                   structural=True)
                        ok = False
                        continue
                    node = nodes[ref.node].group
                    if not 0 <= ref.index < node.gpus_per_node:
                        self.error("F0521", f"{where}: GPU {ref} is outside node n{ref.node} ({node.gpus_per_node} "
                                   f"GPUs: g0 to g{node.gpus_per_node - 1})", "use a GPU the node has",
                                   at=at, dep=dep, structural=True)
                        ok = False
                    elif node.gpu != g.gpu:
                        self.error("F0521", f"{where}: GPU {ref} is a {node.gpu}, the group runs on {g.gpu}",
                                   f"place the group on {g.gpu} GPUs, or set its gpu to {node.gpu}", at=at,
                                   dep=dep, structural=True)
                        ok = False
            # F0523: the parallelism the model can take
            if min(g.tp, g.pp, g.ep) < 1:
                self.error("F0523", f"{where}: tp {g.tp}, pp {g.pp}, ep {g.ep}: each must be at least 1",
                           "compile the plan again", at=gat, dep=dep, structural=True)
                dep.groups_ok[j] = False
                continue
            kv_ok = m.mla is not None or m.kv_heads % g.tp == 0 or g.tp % m.kv_heads == 0
            if m.heads % g.tp or not kv_ok:
                self.error("F0523", f"{where}: tp {g.tp} cannot split {m.name}'s {m.heads} attention heads "
                           f"({m.kv_heads} KV heads)", "use a tp that divides the heads and divides or is a "
                           "multiple of the KV heads", at=f"{gat}.tp", dep=dep, structural=True)
                ok = False
            if m.layers % g.pp:
                self.error("F0523", f"{where}: pp {g.pp} cannot split {m.name}'s {m.layers} layers evenly",
                           "use a pp that divides the layers", at=f"{gat}.pp", dep=dep, structural=True)
                ok = False
            if g.ep > 1:
                why = None
                if m.moe is None:
                    why = f"{m.name} is dense"
                elif m.moe.experts % g.ep or g.tp % g.ep:
                    why = f"it must divide {m.name}'s {m.moe.experts} experts and the group's tp {g.tp}"
                if why:
                    self.error("F0523", f"{where}: ep {g.ep} is not possible: {why}",
                               "use ep 1, or an ep that divides both the experts and tp", at=f"{gat}.ep", dep=dep,
                               structural=True)
                    ok = False
            for k, inst in enumerate(g.instances):
                iat = f"{gat}.instances[{k}]"
                if len(inst.gpus) != g.tp * g.pp:
                    self.error("F0523", f"{where}, instance {k}: {len(inst.gpus)} GPUs, tp {g.tp} x pp {g.pp} needs "
                               f"{g.tp * g.pp}", "give each instance tp x pp GPUs", at=iat, dep=dep, structural=True)
                    ok = False
                    continue
                if any(not 0 <= ref.node < len(nodes) or not 0 <= ref.index < nodes[ref.node].group.gpus_per_node
                       for ref in inst.gpus):
                    continue  # reported as F0521
                stage_nodes = []
                for stage in range(g.pp):
                    tpg = inst.gpus[stage * g.tp:(stage + 1) * g.tp]
                    on = sorted({ref.node for ref in tpg})
                    stage_nodes.append(on[0])
                    if len(on) > 1:
                        self.error("F0523", f"{where}, instance {k}: the TP group of stage {stage} ({_refs(tpg)}) "
                                   f"spans nodes " + ", ".join(f"n{n}" for n in on),
                                   "keep each TP group inside one node; split across nodes with pp", at=iat,
                                   dep=dep, structural=True)
                        ok = False
                        continue
                    domain = nodes[on[0]].group.link_domain
                    domains = sorted({ref.index // domain for ref in tpg})
                    if len(domains) > 1:
                        self.error("F0523", f"{where}, instance {k}: the TP group of stage {stage} ({_refs(tpg)}) "
                                   f"spans link domains {', '.join(map(str, domains))} of node n{on[0]} "
                                   f"(link_domain {domain})", f"keep each TP group inside one domain of {domain} "
                                   "GPUs (indices that agree on index // link_domain)", at=iat, dep=dep,
                                   structural=True)
                        ok = False
                if cluster.network is None and len(set(stage_nodes)) > 1:
                    self.error("F0523", f"{where}, instance {k}: pipeline stages on nodes "
                               + ", ".join(f"n{n}" for n in dict.fromkeys(stage_nodes))
                               + f", but cluster `{cluster.name}` has no network",
                               "keep the instance on one node, or declare a `network` for the cluster", at=iat,
                               dep=dep, structural=True)
                    ok = False
            dep.groups_ok[j] = dep.groups_ok.get(j, True) and ok
        dep.checked = True

    # ------------------------------------------------------------------ F0522

    def check_shared_gpus(self, deps: list[_Deployment]) -> None:
        users: dict[tuple[str, int, int], tuple[str, str]] = {}
        for dep in deps:
            if dep.cluster is None:
                continue
            for j, g in enumerate(dep.plan.groups):
                for k, inst in enumerate(g.instances):
                    for r, ref in enumerate(inst.gpus):
                        key = (dep.cluster.name, ref.node, ref.index)
                        who = f"`{dep.plan.name}` group {j} instance {k}"
                        at = f"deployments[{dep.index}].groups[{j}].instances[{k}].gpus[{r}]"
                        if key in users:
                            first_who, first_at = users[key]
                            self.error("F0522", f"GPU {ref} is used twice: by {first_who} and by {who}",
                                       "give every instance its own GPUs", notes=(f"first use at {first_at}",),
                                       at=at, dep=dep)
                        else:
                            users[key] = (who, at)

    # ------------------------------------------------------------------ F0524

    def check_memory(self, dep: _Deployment, host: dict[tuple[str, int], list[tuple[str, int]]]) -> None:
        dp, d = dep.plan, dep.spec
        m = d.model
        for j, g in enumerate(dp.groups):
            if not dep.groups_ok.get(j, False):
                continue
            gat = f"deployments[{dep.index}].groups[{j}].memory"
            where = f"deployment `{dp.name}`, group {j}"
            mm, s = g.memory, g.scheduler
            gpu = self.spec.gpus[g.gpu]

            def fail(message: str, help: str, at: str = gat, notes=()) -> None:
                self.error("F0524", f"{where}: {message}", help, at=at, notes=notes, dep=dep)

            negative = [k for k in ("capacity", "weights", "kv_cache", "kv_blocks", "activations", "reserve", "free",
                                    "offload_step_s")
                        if getattr(mm, k) < 0] + [f"offloaded.{k}" for k, v in mm.offloaded.items() if v < 0]
            if negative:
                fail("negative " + ", ".join(negative) + " in the memory map", "compile the plan again")
                continue
            b = memory_budget(m, gpu.memory, tp=g.tp, pp=g.pp, max_batched_tokens=s.max_batched_tokens,
                              max_seqs=s.max_seqs, block_size=s.block_size, vendor=gpu.vendor)
            shape = f"tp {g.tp} x pp {g.pp} on {gpu.name}, max_batched_tokens {s.max_batched_tokens}"
            if mm.capacity != gpu.memory:
                fail(f"capacity {_gib(mm.capacity)} in the memory map, a {gpu.name} has {_gib(gpu.memory)}",
                     "the capacity is the GPU's memory", at=f"{gat}.capacity")
            # host categories (compiler/optimize/offload.py): "weights" (all but routed experts), "experts", "kv"
            off_weights = mm.offloaded.get("weights", 0) + mm.offloaded.get("experts", 0)
            if mm.weights + off_weights != b.weights:
                kept = f"{_gib(mm.weights)} of weights per GPU" + (
                    f" (+ {_gib(off_weights)} offloaded)" if off_weights else "")
                fail(f"{kept}; the memory model gives {_gib(b.weights)} for {m.name} at {m.weights}, {shape}",
                     "compile the plan again: a rank's weights come from the memory model (compiler/model/memory.py)",
                     at=f"{gat}.weights",
                     notes=(f"plan: {mm.weights + off_weights:,} B, memory model: {b.weights:,} B",))
            block_bytes = b.kv_bytes_per_token * s.block_size
            room = b.usable - mm.weights - b.activations - b.reserve
            limit = max(0, room // block_bytes) if mm.weights + off_weights == b.weights else b.kv_blocks
            limit += mm.offloaded.get("kv", 0) // block_bytes  # blocks kept in host memory
            if mm.kv_blocks < 1:
                fail(f"no KV blocks ({shape})", "the instance cannot serve a request: use a larger tp or pp",
                     at=f"{gat}.kv_blocks")
            elif mm.kv_blocks > limit:
                fail(f"{mm.kv_blocks:,} KV blocks, the memory model fits {limit:,} ({shape}, block_size "
                     f"{s.block_size})", "compile the plan again: the KV cache is sized by the memory model "
                     "(memory_budget in compiler/model/memory.py)",
                     at=f"{gat}.kv_blocks",
                     notes=(f"per GPU: {_gib(b.usable)} usable - weights {_gib(mm.weights)} - activations "
                            f"{_gib(b.activations)} - reserve {_gib(b.reserve)}, / {block_bytes:,} B per block",))
            elif mm.kv_cache < mm.kv_blocks * block_bytes:
                fail(f"kv_cache {_gib(mm.kv_cache)} cannot hold {mm.kv_blocks:,} blocks of {block_bytes:,} B per GPU "
                     f"({_gib(mm.kv_blocks * block_bytes)})", "give kv_cache the bytes of its blocks",
                     at=f"{gat}.kv_cache")
            if mm.reserve < b.reserve:
                fail(f"reserve {_gib(mm.reserve)}, the memory model reserves {_gib(b.reserve)} per GPU",
                     "keep the runtime reserve of compiler/model/memory.py", at=f"{gat}.reserve")
            total = mm.weights + mm.kv_cache + mm.activations + mm.reserve + mm.free
            if total != mm.capacity:
                fail(f"the categories add up to {total:,} B, not the capacity {mm.capacity:,} B",
                     "weights + kv_cache + activations + reserve + free must equal capacity")
            used = total - mm.free
            if used > b.usable:
                fail(f"the engine takes {_gib(used)} per GPU, more than the usable {_gib(b.usable)} "
                     f"({GPU_MEMORY_UTILIZATION:.0%} of {_gib(gpu.memory)})",
                     "shrink the KV cache or the activation arena")
            outside = [name for name, offset in mm.arena_offsets.items() if not 0 <= offset < max(mm.activations, 1)]
            if outside:
                fail("arena offsets outside the activation arena: " + ", ".join(outside),
                     "lay out the arena again", at=f"{gat}.arena_offsets")
            longest = self.longest_request(d.workload, g.role)
            if longest is not None and mm.kv_blocks >= 1 and mm.kv_blocks * s.block_size < longest:
                fail(f"an instance holds {mm.kv_blocks * s.block_size:,} tokens of KV, workload `{d.workload}` "
                     f"sends requests of up to {longest:,}", "use a larger tp or pp, `kv fp8`, or cap the lengths",
                     at=f"{gat}.kv_blocks")
            offloaded = sum(v for v in mm.offloaded.values())
            if offloaded > 0:
                if not d.allow_offload:
                    fail(f"{_gib(offloaded)} per GPU offloaded to host memory, but the deployment does not "
                         "`allow offload`", "add `allow offload` to the deployment, or keep everything on the GPU",
                         at=f"{gat}.offloaded")
                for inst in g.instances:
                    for ref in inst.gpus:
                        host.setdefault((dep.cluster.name, ref.node), []).append((dp.name, offloaded))

    def longest_request(self, workload_name: str, role: str) -> Optional[int]:
        w = self.spec.workloads[workload_name]
        prompt, output = w.prompt.upper_bound, w.output.upper_bound
        if role == "prefill":
            return prompt
        return None if prompt is None or output is None else prompt + output

    def check_host_memory(self, deps: list[_Deployment], host: dict[tuple[str, int], list[tuple[str, int]]]) -> None:
        for (cluster_name, node), uses in sorted(host.items()):
            cluster = self.spec.clusters[cluster_name]
            nodes = cluster_nodes(cluster)
            if not 0 <= node < len(nodes):
                continue  # reported as F0521
            capacity = nodes[node].group.host_memory or 0
            need = sum(n for _, n in uses)
            if need <= capacity:
                continue
            names = list(dict.fromkeys(name for name, _ in uses))
            self.error("F0524", f"node n{node} of cluster `{cluster_name}`: {_gib(need)} offloaded to host memory by "
                       + ", ".join(f"`{n}`" for n in names) + f", the node has {_gib(capacity)}",
                       "offload less, or declare more `host_memory` for the node", at="deployments")
            for dep in deps:
                if dep.plan.name in names:
                    dep.clean = False

    # ------------------------------------------------------------------ F0525

    def check_bandwidth(self, deps: list[_Deployment]) -> None:
        # bytes/s leaving and entering each node over the network, per cluster, with who sends it
        egress: dict[tuple[str, int], float] = {}
        ingress: dict[tuple[str, int], float] = {}
        senders: dict[tuple[str, int], list[str]] = {}
        kinds: dict[tuple[str, int], set[str]] = {}
        arithmetic: dict[str, list[str]] = {}  # deployment -> how its traffic was computed
        for dep in deps:
            dp, d, cluster = dep.plan, dep.spec, dep.cluster
            if d is None or not all(dep.groups_ok.get(j, False) for j in range(len(dp.groups))):
                continue
            rate = self.rate(d.workload)
            requests = self.requests(d.workload)
            mean_prompt = float(requests.prompt.mean()) if len(requests) else 0.0
            mean_output = float(requests.output.mean()) if len(requests) else 0.0
            nodes = cluster_nodes(cluster)

            def cross(gpus_from: list[GpuRef], gpus_to: list[GpuRef], bps: float, kind: str) -> None:
                for refs, table in ((gpus_from, egress), (gpus_to, ingress)):
                    for ref in refs:
                        key = (cluster.name, ref.node)
                        table[key] = table.get(key, 0.0) + bps / len(refs)
                        senders.setdefault(key, [])
                        kinds.setdefault(key, set()).add(kind)
                        if dp.name not in senders[key]:
                            senders[key].append(dp.name)

            # pipeline hops: tokens through an instance x hidden x 2 B, every TP rank sends its copy
            for j, g in enumerate(dp.groups):
                if g.pp < 2:
                    continue
                share = {"colocated": mean_prompt + mean_output, "prefill": mean_prompt, "decode": mean_output}[g.role]
                peers = sum(x.replicas for x in dp.groups if x.role == g.role) or 1
                bps = rate / peers * share * d.model.hidden * 2 * g.tp
                arithmetic.setdefault(dp.name, []).append(
                    f"`{dp.name}` group {j}: {rate:g} req/s / {peers} instances x {share:.0f} tok x hidden "
                    f"{d.model.hidden} x 2 B x tp {g.tp} = {_gbps(bps)} per pipeline hop")
                for inst in g.instances:
                    for stage in range(g.pp - 1):
                        a = inst.gpus[stage * g.tp:(stage + 1) * g.tp]
                        b = inst.gpus[(stage + 1) * g.tp:(stage + 2) * g.tp]
                        if a[0].node != b[0].node:
                            cross(a, b, bps, "pipeline activations")
            if dp.mode != "disaggregated":
                continue
            kv_bps = rate * mean_prompt * kv_bytes_per_token(d.model)
            arithmetic.setdefault(dp.name, []).append(
                f"`{dp.name}`: {rate:g} req/s x {mean_prompt:.0f} tok mean prompt x {kv_bytes_per_token(d.model):,} B "
                f"of KV per token = {_gbps(kv_bps)} from prefill to decode instances")
            prefill = [(j, k, inst) for j, g in enumerate(dp.groups) if g.role == "prefill"
                       for k, inst in enumerate(g.instances)]
            decode = [(j, k, inst) for j, g in enumerate(dp.groups) if g.role == "decode"
                      for k, inst in enumerate(g.instances)]
            if not prefill or not decode:
                continue
            pair = kv_bps / (len(prefill) * len(decode))
            sent: dict[tuple[int, int], float] = {}
            received: dict[tuple[int, int], float] = {}
            for pj, pk, p in prefill:
                p_nodes = {ref.node for ref in p.gpus}
                for dj, dk, q in decode:
                    q_nodes = {ref.node for ref in q.gpus}
                    if len(p_nodes) == 1 and p_nodes == q_nodes:
                        sent[(pj, pk)] = sent.get((pj, pk), 0.0) + pair
                        received[(dj, dk)] = received.get((dj, dk), 0.0) + pair
                    else:
                        cross(p.gpus, q.gpus, pair, "KV cache")
            for table, verb in ((sent, "sends"), (received, "receives")):
                for (j, k), bps in table.items():
                    inst = dp.groups[j].instances[k]
                    link = nodes[inst.gpus[0].node].group.link
                    capacity = len(inst.gpus) * link.bandwidth
                    if bps > capacity:
                        self.error("F0525", f"deployment `{dp.name}`, group {j}, instance {k} "
                                   f"({_refs(inst.gpus)}) {verb} {_gbps(bps)} of KV cache inside its node, more "
                                   f"than its {len(inst.gpus)} x {link.name} links carry ({_gbps(capacity)})",
                                   "add prefill and decode instances, or use `kv fp8`",
                                   notes=(f"{rate:g} req/s x {mean_prompt:.0f} tok mean prompt x "
                                          f"{kv_bytes_per_token(d.model):,} B/tok",),
                                   at=f"deployments[{dep.index}].groups[{j}].instances[{k}]", dep=dep)
        for table, direction in ((egress, "out of"), (ingress, "into")):
            for (cluster_name, node), bps in sorted(table.items()):
                cluster = self.spec.clusters[cluster_name]
                names = senders[(cluster_name, node)]
                network = cluster.network
                capacity = network.bandwidth * cluster.network_nics if network is not None else 0.0
                if bps <= capacity:
                    continue
                what = (f"the network's {_gbps(capacity)} ({cluster.network_nics} x {network.name})"
                        if network is not None else "nothing: the cluster has no network")
                what_moves = " and ".join(sorted(kinds[(cluster_name, node)]))
                self.error("F0525", f"node n{node} of cluster `{cluster_name}`: {_gbps(bps)} of {what_moves} "
                           f"{direction} the node (" + ", ".join(f"`{n}`" for n in names)
                           + f"), more than {what}",
                           "put prefill and decode instances (and pipeline stages) on the same node, use `kv fp8`, "
                           "or a faster network", at="deployments",
                           notes=tuple(line for n in names for line in arithmetic.get(n, [])))
                for dep in deps:
                    if dep.plan.name in names:
                        dep.clean = False

    # ------------------------------------------------------------------ F0526

    def check_predictions(self, dep: _Deployment) -> None:
        dp, d = dep.plan, dep.spec
        at = f"deployments[{dep.index}].predicted"
        where = f"deployment `{dp.name}`"
        pred = dp.predicted
        rate = self.rate(d.workload)

        def fail(message: str, help: str, sub: str = "", notes=()) -> None:
            self.error("F0526", f"{where}: {message}", help, at=at + sub, notes=notes, dep=dep)

        for name, p in (("ttft_ms", pred.ttft_ms), ("tpot_ms", pred.tpot_ms), ("e2e_ms", pred.e2e_ms)):
            values = (p.p50, p.p90, p.p99)
            if any(math.isnan(v) or v < 0 for v in values):
                fail(f"predicted {name} percentiles {p.p50:g}, {p.p90:g}, {p.p99:g} are not non-negative numbers",
                     "compile the plan again", sub=f".{name}")
                return
        if not 0.0 <= pred.attainment <= 1.0:
            fail(f"predicted attainment {pred.attainment:g} is not a share in [0, 1]", "compile the plan again",
                 sub=".attainment")
            return
        if pred.meets_slo and pred.goodput_rps < rate * (1 - 1e-9):
            fail(f"the plan claims to meet slo `{d.slo}` at {rate:g} req/s but predicts a goodput of only "
                 f"{pred.goodput_rps:g} req/s", "a plan that meets the SLO at the workload's rate has at least that "
                 "goodput: compile the plan again", sub=".goodput_rps")
            return
        gpus = dp.gpus
        if gpus and not math.isclose(pred.goodput_rps_per_gpu, pred.goodput_rps / gpus, rel_tol=0.01, abs_tol=1e-9):
            fail(f"goodput per GPU {pred.goodput_rps_per_gpu:g} req/s is not goodput {pred.goodput_rps:g} req/s / "
                 f"{gpus} GPUs", "compile the plan again", sub=".goodput_rps_per_gpu")
            return

        problem = self.simulated_problem(dep)
        if problem:
            message, help, sub, notes = problem
            fail(message, help, sub, notes)

    def simulated_problem(self, dep: _Deployment):
        """The first prediction of the deployment its re-simulation contradicts, as (message, help,
        JSON path suffix, notes), or None."""
        dp, d = dep.plan, dep.spec
        pred = dp.predicted
        slo = self.spec.slos[d.slo]
        rate = self.rate(d.workload)
        requests = self.requests(d.workload, pred.requests)
        again = "compile the plan again: its predictions do not follow from its configuration"

        def run(reqs):
            return simulate_plan_deployment(self.spec, dep.plan, reqs)

        result = run(requests)
        meets = result.meets(slo)
        if meets != pred.meets_slo and not _borderline(result, slo):
            return (f"the plan says the SLO is {'met' if pred.meets_slo else 'missed'}; re-simulated, slo `{d.slo}` "
                    f"is {'met' if meets else 'missed'} at {rate:g} req/s", again, ".meets_slo",
                    (_attainment_note(result, slo),))
        share = result.attainment(slo)["joint"]["share"]
        if abs(share - pred.attainment) > ATTAINMENT_TOLERANCE:
            return (f"predicted attainment {pred.attainment:.1%}; re-simulated {share:.1%} (more than "
                    f"{ATTAINMENT_TOLERANCE * 100:.0f} points apart)", again, ".attainment", ())
        for metric in ("ttft", "tpot"):
            ours = result.percentile(metric, 50) * 1e3
            theirs = getattr(pred, f"{metric}_ms").p50
            if math.isnan(ours) or (math.isinf(ours) and math.isinf(theirs)):
                continue  # no TPOT (one-token outputs), or over half the requests never served on both sides
            if math.isinf(ours) or abs(theirs - ours) > max(TOLERANCE * ours, ABS_TOLERANCE_MS):
                return (f"predicted p50 {metric.upper()} {theirs:.2f} ms; re-simulated {ours:.2f} ms (more than "
                        f"{TOLERANCE:.0%} apart)", again, f".{metric}_ms.p50", ())
        if pred.goodput_rps > rate and pred.goodput_rps > 0:
            capacity = _capacity(run(_all_at_once(requests)))
            if pred.goodput_rps > capacity * (1 + TOLERANCE):
                return (f"predicted goodput {pred.goodput_rps:g} req/s, but the deployment completes at most "
                        f"{capacity:.3g} req/s of workload `{d.workload}` (re-simulated with every request queued)",
                        "compile the plan again: its goodput is overstated", ".goodput_rps", ())
            probe = pred.goodput_rps * (1 - TOLERANCE)
            if probe > rate:
                at_probe = run(requests.scaled(probe / rate))
                if not at_probe.meets(slo) and not _borderline(at_probe, slo):
                    return (f"predicted goodput {pred.goodput_rps:g} req/s, but at {probe:.3g} req/s "
                            f"({1 - TOLERANCE:.0%} of it) the re-simulation misses slo `{d.slo}`",
                            "compile the plan again: its goodput is overstated", ".goodput_rps",
                            (_attainment_note(at_probe, slo),))
        return None


def _attainment_note(result, slo) -> str:
    report = result.attainment(slo)
    parts = []
    for target in slo.targets:
        label = target.metric if target.percentile is None else f"{target.metric} p{target.percentile:g}"
        value = report[target.metric]["value"]
        for entry in report[target.metric]["targets"]:
            if entry["percentile"] == target.percentile and entry["limit"] == target.limit:
                value = entry["value"]
        parts.append(f"{label} {value * 1e3:.1f} ms (limit {target.limit * 1e3:g} ms)")
    parts.append(f"joint attainment {report['joint']['share']:.1%}"
                 + (f" (needs {slo.attainment:.0%})" if slo.attainment is not None else ""))
    return "re-simulated: " + ", ".join(parts)


def _all_at_once(requests):
    from flowc.compiler.model.workload import Requests

    return Requests(requests.arrival * 0.0, requests.prompt, requests.output)


def _capacity(result) -> float:
    """Requests/s completed in steady state by a run with every request queued at t=0: between
    the 10th and the 90th percentile of completion times (neither ramp-up nor drain counts)."""
    import numpy as np

    finish = np.sort(result.finish[result.finished])
    if len(finish) < 10:
        return result.request_throughput
    i, j = len(finish) // 10, len(finish) - 1 - len(finish) // 10
    span = float(finish[j] - finish[i])
    return (j - i) / span if span > 0 else result.request_throughput


def _borderline(result, slo) -> bool:
    """Whether the run is too close to a limit for meets_slo to be decided either way."""
    report = result.attainment(slo)
    for target in slo.targets:
        for entry in report[target.metric]["targets"]:
            if entry["limit"] != target.limit or entry["percentile"] != target.percentile:
                continue
            if target.percentile is not None:
                value = entry["value"]
                if math.isfinite(value) and abs(value - target.limit) <= BORDERLINE * target.limit:
                    return True
    needed = slo.attainment if slo.attainment is not None else None
    if needed is not None and abs(report["joint"]["share"] - needed) <= BORDERLINE_SHARE:
        return True
    return False


def simulate_plan_deployment(spec: Spec, dp: DeploymentPlan, requests, *, router: str = ROUTER):
    """Re-simulate a deployment from its plan (what the verifier checks predictions against),
    on `plan_instances(spec, dp)`, behind `router` (default least_work, as flowc.simulate and
    goodput searches use; `flowc.autotune` compares routers with it)."""
    from flowc.compiler.model.simulator import simulate

    return simulate(requests, plan_instances(spec, dp), router=router)


def plan_instances(spec: Spec, dp: DeploymentPlan) -> list:
    """The simulator's InstanceConfig of every instance of a deployment's plan.

    Each instance: `CostModel(model, gpu, node link, Parallelism(tp, pp, ep), inter_link)` where
    inter_link is the cluster's network when the instance's stages span nodes, or when it is a
    prefill instance and a decode instance is not on its (single) node; and `InstanceConfig`
    with `kv_capacity_tokens = kv_blocks x block_size`, the scheduler's block size, token budget,
    max_seqs and chunked-prefill switch, and the group's role. A group with offloaded weights
    adds its memory map's `offload_step_s` to every step (`cost.StreamedCost`)."""
    from flowc.compiler.model.cost import CostModel, Parallelism, StreamedCost
    from flowc.compiler.model.simulator import InstanceConfig

    d = spec.deployments[dp.name]
    cluster = spec.clusters[d.cluster]
    nodes = cluster_nodes(cluster)
    decode_nodes = [{ref.node for ref in inst.gpus} for g in dp.groups if g.role == "decode" for inst in g.instances]
    costs: dict[tuple[int, Optional[str]], object] = {}
    instances = []
    for j, g in enumerate(dp.groups):
        gpu = spec.gpus[g.gpu]
        s = g.scheduler
        for inst in g.instances:
            on = {ref.node for ref in inst.gpus}
            link = nodes[inst.gpus[0].node].group.link
            remote = len(on) > 1 or (g.role == "prefill" and any(q != on for q in decode_nodes))
            inter: Optional[Link] = cluster.network if remote else None
            key = (j, inter.name if inter is not None else None)
            if key not in costs:
                costs[key] = CostModel(d.model, gpu, link, parallelism=Parallelism(tp=g.tp, pp=g.pp, ep=g.ep),
                                       inter_link=inter)
            cost = costs[key] if g.memory.offload_step_s <= 0 else StreamedCost(costs[key], g.memory.offload_step_s)
            instances.append(InstanceConfig(cost=cost, pp=g.pp,
                                            kv_capacity_tokens=g.memory.kv_blocks * s.block_size,
                                            block_size=s.block_size, max_batched_tokens=s.max_batched_tokens,
                                            max_seqs=s.max_seqs,
                                            chunked_prefill=s.chunked_prefill, chunk_size=s.chunk_size,
                                            role=g.role))
    return instances


# ---------------------------------------------------------------------------------- the API

def verify_plan(plan: Plan, spec: Spec) -> list[Diagnostic]:
    """Every problem of `plan` against `spec` (see the module docstring), sorted by code; empty
    when the plan is sound."""
    return _Verifier(plan, spec).run()


def load_plan_file(path: Path) -> tuple[Optional[Plan], list[Diagnostic]]:
    """The plan in a JSON file, or F0520 diagnostics (never a traceback). OSError propagates."""
    text = path.read_text(encoding="utf-8")
    name = path.name
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        return None, [Diagnostic("F0520", f"`{name}` is not valid JSON: {error.msg} at line {error.lineno} column "
                                 f"{error.colno}", help="give a plan written by `flowc`")]
    if isinstance(data, dict) and isinstance(data.get("format_version"), str):
        version = data["format_version"]
        match = _VERSION.fullmatch(version.strip())
        if match is None or int(match.group(1)) != SUPPORTED_MAJOR:
            return None, [Diagnostic("F0520", f"plan format_version `{version}` is not supported (this flowc reads "
                                     f"{SUPPORTED_MAJOR}.x)", help="compile the plan again with this flowc, or "
                                     "verify it with the flowc that wrote it", notes=("at format_version",))]
    try:
        return Plan.model_validate(data), []
    except ValidationError as error:
        problems = error.errors()
        notes = tuple(f"at {_json_path(p['loc'])}: {p['msg']}" for p in problems[:10])
        if len(problems) > 10:
            notes += (f"and {len(problems) - 10} more",)
        return None, [Diagnostic("F0520", f"`{name}` is not a flowc plan ({len(problems)} problem"
                                 f"{'s' if len(problems) != 1 else ''})", help="give a plan written by `flowc`",
                                 notes=notes)]


def _json_path(loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(the document)"


def verify_file_with_sources(plan_path, spec_path=None):
    """(diagnostics, sources) for a plan file against a spec file (default: the plan's
    `spec_files[0]`, relative to the plan's directory unless absolute; failing that, relative to
    the working directory). Spec errors come back as
    the spec's diagnostics, with the sources to render them. Raises FileNotFoundError for a
    missing plan or spec file, and ValueError when no spec is given and the plan names none."""
    from flowc.api import check_sources  # the front end; imported here so `compiler` stays below the API

    from flowc.compiler.diagnostics import FlowError

    plan_path = Path(plan_path)
    if not plan_path.is_file():
        raise FileNotFoundError(f"no such file: {plan_path}")
    plan, problems = load_plan_file(plan_path)
    if plan is None:
        return problems, {}
    if spec_path is None:
        if not plan.spec_files:
            raise ValueError(f"`{plan_path}` names no spec file")
        spec_path = Path(plan.spec_files[0])
        if not spec_path.is_absolute() and (plan_path.parent / spec_path).is_file():
            spec_path = plan_path.parent / spec_path
        # else: as written, relative to the working directory (a plan that recorded the path the
        # spec was compiled under, not relative to where the plan was written)
    spec_path = Path(spec_path)
    if not spec_path.is_file():
        raise FileNotFoundError(f"no such file: {spec_path}")
    try:
        checked = check_sources(spec_path)
    except FlowError as error:
        return error.diagnostics, error.sources
    return verify_plan(plan, checked.spec), checked.sources


def verify_file(plan_path, spec_path=None) -> list[Diagnostic]:
    """Diagnostics of a plan file against a spec file; see `verify_file_with_sources`."""
    return verify_file_with_sources(plan_path, spec_path)[0]


# ---------------------------------------------------------------------------------- the CLI

def cmd_verify(args, out) -> int:
    """`flowc verify PLAN [--against SPEC]`, shaped like flowc.cli's `_cmd_*` functions: `args`
    has `plan`, `against` (None: the plan's spec_files[0]) and `json`; `out` is flowc.cli's
    `_Output`. Exit 0: the plan is sound; 1: it is not (or the spec is invalid); 2: a file is
    missing or unreadable, or no spec is known."""
    plan_name, spec_name = args.plan, getattr(args, "against", None)
    for name, what in ((plan_name, "a plan (.json)"), (spec_name, "a .flow file")):
        if name is not None and not Path(name).is_file():
            state = "is a directory" if Path(name).is_dir() else "does not exist"
            return out.usage_error(f"`{name}` {state}", f"give the path of {what}")
    try:
        diagnostics, sources = verify_file_with_sources(plan_name, spec_name)
    except FileNotFoundError as error:
        return out.usage_error(str(error), "give the spec with `--against FILE`")
    except ValueError as error:
        return out.usage_error(str(error), "give the spec with `--against FILE`")
    except (OSError, UnicodeDecodeError) as error:
        return out.usage_error(f"cannot read `{plan_name}`: {getattr(error, 'strerror', None) or error}")
    out.diagnostics(diagnostics, sources)
    errors = sum(1 for d in diagnostics if d.severity == "error")
    if not out.json:
        against = f" against {spec_name}" if spec_name else ""
        if errors:
            print(f"verified {plan_name}{against}: {errors} error{'s' if errors != 1 else ''}", file=sys.stderr)
        else:
            print(f"verified {plan_name}{against}: ok")
    return 1 if errors else 0


def simulate_instance(spec: Spec, dp: DeploymentPlan, group_index: int, requests):
    """Simulate `requests` on ONE instance of the plan's group `group_index`, as the verifier
    models it (its GPU's cost model, the plan's scheduler and KV pool, offload overhead): what
    the plan predicts for a replay of those requests on that instance (`flowc run --replay`)."""
    from flowc.compiler.model.cost import CostModel, Parallelism, StreamedCost
    from flowc.compiler.model.simulator import InstanceConfig, simulate

    d, g = spec.deployments[dp.name], dp.groups[group_index]
    cluster = spec.clusters[d.cluster]
    node = cluster_nodes(cluster)[g.instances[0].gpus[0].node]
    cost = CostModel(d.model, spec.gpus[g.gpu], node.group.link, parallelism=Parallelism(tp=g.tp, pp=g.pp, ep=g.ep))
    if g.memory.offload_step_s > 0:
        cost = StreamedCost(cost, g.memory.offload_step_s)
    s = g.scheduler
    instance = InstanceConfig(cost=cost, pp=g.pp, kv_capacity_tokens=g.memory.kv_blocks * s.block_size,
                              block_size=s.block_size, max_batched_tokens=s.max_batched_tokens, max_seqs=s.max_seqs,
                              chunked_prefill=s.chunked_prefill, chunk_size=s.chunk_size, role=g.role)
    return simulate(requests, [instance])
