"""A plan for one instance with stated settings, no optimizer: what runtime tests, benchmarks
and `flowc calibrate` run. Its memory map comes from the memory model and its arena is packed
as the optimizer packs it, so the runtime reads it exactly as it reads a compiled plan."""

from __future__ import annotations

from typing import Optional

from flowc.compiler.model.geometry import kv_bytes_per_token_per_rank, weight_bytes_per_rank
from flowc.compiler.optimize.arena import pack_step
from flowc.compiler.plan import (
    DeploymentPlan,
    GpuRef,
    Instance,
    InstanceGroup,
    MemoryMap,
    NodeGroupShape,
    Percentiles,
    Plan,
    Predicted,
    Scheduler,
    SolverStatus,
)
from flowc.compiler.spec import Model
from flowc.compiler.version import FLOWC_VERSION


def instance_plan(model: Model, *, gpu: str = "local", vendor: str = "cpu", tp: int = 1, pp: int = 1, ep: int = 1,
                  max_batched_tokens: int = 64, max_seqs: int = 8, chunk_size: Optional[int] = None,
                  block_size: int = 16, kv_blocks: int = 64, role: str = "colocated") -> Plan:
    """A plan for one instance of `model` with the stated scheduler settings and KV pool: its
    memory map from the memory model, its arena packed by the compiler, no predictions. For
    driving the runtime directly (runtime tests, `flowc calibrate`): the optimizer would size
    the pool to fill the device and choose the settings itself."""
    scheduler = Scheduler(max_batched_tokens=max_batched_tokens, chunk_size=chunk_size, max_seqs=max_seqs,
                          block_size=block_size)
    layout = pack_step(model, tp, scheduler, ep)
    kv_cache = kv_blocks * block_size * kv_bytes_per_token_per_rank(model, tp, pp)
    weights = weight_bytes_per_rank(model, tp, pp)
    capacity = weights + kv_cache + layout.size
    memory = MemoryMap(capacity=capacity, weights=weights, kv_cache=kv_cache, kv_blocks=kv_blocks,
                       activations=layout.size, reserve=0, free=0, arena_offsets=layout.offsets,
                       arena_sizes=layout.sizes)
    group = InstanceGroup(role=role, gpu=gpu, vendor=vendor, tp=tp, pp=pp, ep=ep,
                          instances=[Instance(gpus=[GpuRef(node=0, index=i) for i in range(tp * pp)])],
                          scheduler=scheduler,
                          memory=memory, capacity_rps=0.0)
    zero = Percentiles(p50=0.0, p90=0.0, p99=0.0)
    predicted = Predicted(ttft_ms=zero, tpot_ms=zero, e2e_ms=zero, output_tokens_per_s=0.0, goodput_rps=0.0,
                          goodput_rps_per_gpu=0.0, attainment=1.0, meets_slo=True)
    deployment = DeploymentPlan(name="instance", cluster="local", model=model.name, weights=model.weights,
                                kv=model.kv, model_spec=model,
                                mode="colocated" if role == "colocated" else "disaggregated",
                                objective="max_goodput_per_gpu", groups=[group], predicted=predicted)
    return Plan(flowc_version=FLOWC_VERSION, spec_files=[],
                clusters={"local": [NodeGroupShape(gpu=gpu, gpus=tp * pp, count=1)]}, deployments=[deployment],
                solver=SolverStatus(status="optimal", objective=0.0, bound=0.0, gap=0.0))
