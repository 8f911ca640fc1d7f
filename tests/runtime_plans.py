"""Plans for runtime tests: one colocated instance of a model with chosen scheduler settings
and KV pool, its memory map from the memory model and its arena packed by the compiler.

The optimizer would size the pool to fill the device; runtime tests want small pools (to force
preemption) and small token budgets (to force chunked prefill), so they state them here.
"""

from __future__ import annotations

import flowc
from flowc.compiler.arena import pack, step_buffers
from flowc.compiler.memory import kv_bytes_per_token_per_rank, weight_bytes_per_rank
from flowc.compiler.plan import (DeploymentPlan, GpuRef, Instance, InstanceGroup, MemoryMap, Percentiles, Plan,
                                 Predicted, Scheduler, SolverStatus)
from flowc.compiler.spec import Model


def instance_plan(model: Model, *, tp: int = 1, max_batched_tokens: int = 64, max_seqs: int = 8,
                  chunk_size: int | None = None, block_size: int = 16, kv_blocks: int = 64,
                  role: str = "colocated", vendor: str = "cpu") -> Plan:
    layout = pack(step_buffers(model, tp, max_batched_tokens, max_seqs))
    kv_cache = kv_blocks * block_size * kv_bytes_per_token_per_rank(model, tp)
    weights = weight_bytes_per_rank(model, tp)
    memory = MemoryMap(capacity=2**30, weights=weights, kv_cache=kv_cache, kv_blocks=kv_blocks,
                       activations=layout.size, reserve=0, free=2**30 - weights - kv_cache - layout.size,
                       arena_offsets=layout.offsets)
    group = InstanceGroup(role=role, gpu="cpu-test", vendor=vendor, tp=tp, pp=1,
                          instances=[Instance(gpus=[GpuRef(node=0, index=i) for i in range(tp)])],
                          scheduler=Scheduler(max_batched_tokens=max_batched_tokens,
                                              chunk_size=chunk_size or max_batched_tokens, max_seqs=max_seqs,
                                              block_size=block_size),
                          memory=memory, capacity_rps=1.0)
    zero = Percentiles(p50=0.0, p90=0.0, p99=0.0)
    predicted = Predicted(ttft_ms=zero, tpot_ms=zero, e2e_ms=zero, output_tokens_per_s=0.0, goodput_rps=0.0,
                          goodput_rps_per_gpu=0.0, attainment=1.0, meets_slo=True)
    deployment = DeploymentPlan(name="test", cluster="box", model=model.name, weights=model.weights, kv=model.kv,
                                model_spec=model, mode="colocated" if role == "colocated" else "disaggregated",
                                objective="max_goodput_per_gpu", groups=[group], predicted=predicted)
    return Plan(flowc_version=flowc.__version__, spec_files=["test.flow"], deployments=[deployment],
                solver=SolverStatus(status="optimal", objective=0.0, bound=0.0, gap=0.0, wall_s=0.0), compile_s=0.0)
