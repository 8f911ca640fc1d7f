"""The network traffic a plan puts on its links at the workload's rate: what the verifier
checks against link bandwidths (F0525) and what the HTML report draws.

Two kinds of transfer, each from one set of GPUs to another:

* pipeline activations: every hop between consecutive stages of an instance carries
  rate / instances x tokens x hidden x 2 B x tp (each TP rank sends its copy of the hidden
  state; tokens: mean prompt + output for colocated instances, prompt for prefill, output for
  decode; instances: the deployment's instances of that role);
* KV cache, prefill -> decode (disaggregated deployments): rate x mean prompt x the model's KV
  bytes per token, split evenly over every (prefill, decode) pair of instances, whichever pair
  a router would choose.

A transfer whose two ends sit on one node stays on that node's links; any other crosses the
network whole: it leaves each sending node in proportion to the senders' GPUs there and enters
each receiving node likewise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from flowc.compiler.model.geometry import kv_bytes_per_token
from flowc.compiler.model.workload import base_rate, sample_requests
from flowc.compiler.plan import DeploymentPlan, GpuRef
from flowc.compiler.spec import Model, Spec
from flowc.compiler.units import format_gbps

Kind = Literal["pipeline activations", "KV cache"]


@dataclass(frozen=True)
class Transfer:
    """Bytes/s from GPUs `src` (group, instance `src_at`) to GPUs `dst` of one deployment."""

    deployment: str
    kind: Kind
    src: tuple[GpuRef, ...]
    dst: tuple[GpuRef, ...]
    bps: float
    src_at: tuple[int, int]
    dst_at: tuple[int, int]

    @property
    def node(self) -> Optional[int]:
        """The node both ends sit on, or None when the transfer crosses the network."""
        nodes = {ref.node for ref in self.src + self.dst}
        return next(iter(nodes)) if len(nodes) == 1 else None

    def node_shares(self, end: Literal["src", "dst"]) -> dict[int, float]:
        """Bytes/s the transfer takes out of (src) or into (dst) each node."""
        refs = self.src if end == "src" else self.dst
        shares: dict[int, float] = {}
        for ref in refs:
            shares[ref.node] = shares.get(ref.node, 0.0) + self.bps / len(refs)
        return shares


@dataclass(frozen=True)
class Traffic:
    transfers: list[Transfer]
    arithmetic: list[str]  # how each rate was computed, for diagnostics and the report


def deployment_traffic(dp: DeploymentPlan, model: Model, rate: float, mean_prompt: float,
                       mean_output: float) -> Traffic:
    """Every transfer of one deployment's plan at `rate` req/s with the given mean lengths."""
    transfers, arithmetic = [], []
    for j, g in enumerate(dp.groups):
        if g.pp < 2:
            continue
        tokens = {"colocated": mean_prompt + mean_output, "prefill": mean_prompt, "decode": mean_output}[g.role]
        peers = sum(x.replicas for x in dp.groups if x.role == g.role) or 1
        bps = rate / peers * tokens * model.hidden * 2 * g.tp
        arithmetic.append(f"`{dp.name}` group {j}: {rate:g} req/s / {peers} instances x {tokens:.0f} tok x hidden "
                          f"{model.hidden} x 2 B x tp {g.tp} = {format_gbps(bps)} per pipeline hop")
        for k, inst in enumerate(g.instances):
            for stage in range(g.pp - 1):
                transfers.append(Transfer(dp.name, "pipeline activations",
                                          tuple(inst.gpus[stage * g.tp:(stage + 1) * g.tp]),
                                          tuple(inst.gpus[(stage + 1) * g.tp:(stage + 2) * g.tp]), bps, (j, k), (j, k)))
    if dp.mode != "disaggregated":
        return Traffic(transfers, arithmetic)
    prefill = [(j, k, inst) for j, g in enumerate(dp.groups) if g.role == "prefill"
               for k, inst in enumerate(g.instances)]
    decode = [(j, k, inst) for j, g in enumerate(dp.groups) if g.role == "decode" for k, inst in enumerate(g.instances)]
    if not prefill or not decode:  # a malformed plan (the verifier's F0520): nothing to send
        return Traffic(transfers, arithmetic)
    per_token = kv_bytes_per_token(model)
    kv_bps = rate * mean_prompt * per_token
    arithmetic.append(f"`{dp.name}`: {rate:g} req/s x {mean_prompt:.0f} tok mean prompt x {per_token:,} B of KV per "
                      f"token = {format_gbps(kv_bps)} from prefill to decode instances")
    pair = kv_bps / (len(prefill) * len(decode))
    for pj, pk, p in prefill:
        for dj, dk, q in decode:
            transfers.append(Transfer(dp.name, "KV cache", tuple(p.gpus), tuple(q.gpus), pair, (pj, pk), (dj, dk)))
    return Traffic(transfers, arithmetic)


def spec_traffic(spec: Spec, dp: DeploymentPlan, seed: int = 0) -> Traffic:
    """A deployment's traffic at its workload's rate (a batch: at the plan's throughput) and mean
    lengths (the workload sampled with `seed`, its default request count)."""
    workload = spec.workloads[spec.deployments[dp.name].workload]
    requests = sample_requests(workload, seed=seed)
    mean_prompt = float(requests.prompt.mean()) if len(requests) else 0.0
    mean_output = float(requests.output.mean()) if len(requests) else 0.0
    rate = dp.predicted.goodput_rps if workload.is_batch else base_rate(workload)
    return deployment_traffic(dp, spec.deployments[dp.name].model, rate, mean_prompt, mean_output)
