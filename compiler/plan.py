"""The plan: the one contract between the compiler and the runtime.

A versioned pydantic document (`format_version` "MAJOR.MINOR"; minor bumps only add fields).
For each deployment: its mode, its instance groups (role, TP, PP, EP and the exact GPUs of each
instance), the scheduler settings, a memory map per GPU, the predicted metrics, the
alternatives considered with the reason each lost, and the constraints that bind.

A GPU is named by `GpuRef(node, index)`: `node` counts the cluster's nodes in declaration order
(node groups expanded, `node x 2` is nodes 0 and 1), `index` the GPU within its node.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from flowc.compiler.spec import Model

# 1.1: Predicted.requests, Scheduler.chunked_prefill; 1.2: MemoryMap.offload_step_s;
# 1.3: DeploymentPlan.model_spec, InstanceGroup.vendor
FORMAT_VERSION = "1.3"


class PlanModel(BaseModel):
    # Percentiles of a run with rejected requests are infinite: keep them as JSON's Infinity.
    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="constants")


class GpuRef(PlanModel):
    node: int
    index: int

    def __str__(self) -> str:
        return f"n{self.node}g{self.index}"


class Instance(PlanModel):
    """One engine: tp x pp GPUs; `gpus[stage * tp + rank]` is the GPU of TP rank `rank` in
    pipeline stage `stage`."""

    gpus: list[GpuRef]


class Scheduler(PlanModel):
    max_batched_tokens: int
    chunked_prefill: bool = True
    chunk_size: int = Field(description="largest prefill chunk (at most max_batched_tokens)")
    max_seqs: int
    block_size: int


class MemoryMap(PlanModel):
    """Bytes on one GPU of an instance, from the single memory model (compiler/model/memory.py).

    With offloaded weights (compiler/optimize/offload.py, pp = 1 instances): `weights` is what stays on
    the GPU, `offloaded` what lives in host memory ("weights": all but routed experts,
    "experts", "kv"), the two weight categories adding up to the memory model's weights;
    `reserve` includes the double-buffered streaming buffer (and a 1 MiB margin for the
    offload LP's tolerance); `offload_step_s` is the seconds that streaming adds to every
    engine iteration (the offload plan's decode step minus the cost model's at the same batch),
    which the simulator and the verifier add to the instance's step time."""

    capacity: int
    weights: int
    kv_cache: int
    kv_blocks: int = Field(description="blocks of the instance's KV cache (each GPU holds its share of every block)")
    activations: int = Field(description="the activation arena")
    reserve: int
    free: int
    offloaded: dict[str, int] = Field(default_factory=dict, description="bytes kept in host memory, by category")
    offload_step_s: float = Field(0.0, description="seconds streaming offloaded bytes adds to every iteration (1.2)")
    arena_offsets: dict[str, int] = Field(default_factory=dict,
                                          description="offset of each activation buffer in the arena")


class InstanceGroup(PlanModel):
    role: Literal["colocated", "prefill", "decode"]
    gpu: str = Field(description="GPU type (stdlib or spec name)")
    vendor: Literal["nvidia", "amd", "cpu"] = Field("nvidia", description="the GPU type's vendor: which device "
                                                    "the runtime runs on (1.3)")
    tp: int
    pp: int
    ep: int = 1
    instances: list[Instance]
    scheduler: Scheduler
    memory: MemoryMap
    capacity_rps: float = Field(description="requests/s one instance sustains under the SLO (simulated)")

    @property
    def replicas(self) -> int:
        return len(self.instances)

    @property
    def gpus_per_instance(self) -> int:
        return self.tp * self.pp


class Percentiles(PlanModel):
    """Milliseconds."""

    p50: float
    p90: float
    p99: float


class Predicted(PlanModel):
    ttft_ms: Percentiles
    tpot_ms: Percentiles
    e2e_ms: Percentiles
    output_tokens_per_s: float
    goodput_rps: float = Field(description="highest arrival rate meeting the SLO, for the whole deployment")
    goodput_rps_per_gpu: float
    attainment: float = Field(description="joint SLO attainment at the workload's rate")
    meets_slo: bool
    requests: Optional[int] = Field(None, description="requests simulated (the workload sampled with seed 0); "
                                    "None: the workload's default count")


class Alternative(PlanModel):
    summary: str = Field(description="e.g. `tp 2 x 4 replicas, colocated`")
    objective_value: Optional[float] = None
    reason: str = Field(description="why it lost")


class DeploymentPlan(PlanModel):
    name: str
    cluster: str
    model: str
    weights: str
    kv: str
    model_spec: Optional[Model] = Field(None, description="the model as deployed (dtype overrides applied), "
                                        "what the runtime builds (1.3)")
    mode: Literal["colocated", "disaggregated"]
    objective: str
    groups: list[InstanceGroup]
    predicted: Predicted
    alternatives: list[Alternative] = Field(default_factory=list)
    binding: list[str] = Field(default_factory=list, description="constraints that limit the plan")

    @property
    def gpus(self) -> int:
        return sum(g.replicas * g.gpus_per_instance for g in self.groups)


class SolverStatus(PlanModel):
    status: Literal["optimal", "feasible"]
    objective: float
    bound: float
    gap: float = Field(description="relative gap between objective and bound")
    wall_s: float


class Plan(PlanModel):
    format_version: str = FORMAT_VERSION
    flowc_version: str
    spec_files: list[str]
    deployments: list[DeploymentPlan]
    solver: SolverStatus
    compile_s: float


def instance_plan(model: "Model", *, gpu: str = "local", vendor: str = "cpu", tp: int = 1,
                  max_batched_tokens: int = 64, max_seqs: int = 8, chunk_size: Optional[int] = None,
                  block_size: int = 16, kv_blocks: int = 64, role: str = "colocated") -> "Plan":
    """A plan for one instance of `model` with the stated scheduler settings and KV pool: its
    memory map from the memory model, its arena packed by the compiler, no predictions. For
    driving the runtime directly (runtime tests, `flowc calibrate`): the optimizer would size
    the pool to fill the device and choose the settings itself."""
    from flowc.compiler.optimize.arena import pack, step_buffers
    from flowc.compiler.model.memory import kv_bytes_per_token_per_rank, weight_bytes_per_rank

    layout = pack(step_buffers(model, tp, max_batched_tokens, max_seqs))
    kv_cache = kv_blocks * block_size * kv_bytes_per_token_per_rank(model, tp)
    weights = weight_bytes_per_rank(model, tp)
    capacity = weights + kv_cache + layout.size
    memory = MemoryMap(capacity=capacity, weights=weights, kv_cache=kv_cache, kv_blocks=kv_blocks,
                       activations=layout.size, reserve=0, free=0, arena_offsets=layout.offsets)
    group = InstanceGroup(role=role, gpu=gpu, vendor=vendor, tp=tp, pp=1,
                          instances=[Instance(gpus=[GpuRef(node=0, index=i) for i in range(tp)])],
                          scheduler=Scheduler(max_batched_tokens=max_batched_tokens,
                                              chunk_size=chunk_size or max_batched_tokens, max_seqs=max_seqs,
                                              block_size=block_size),
                          memory=memory, capacity_rps=0.0)
    zero = Percentiles(p50=0.0, p90=0.0, p99=0.0)
    predicted = Predicted(ttft_ms=zero, tpot_ms=zero, e2e_ms=zero, output_tokens_per_s=0.0, goodput_rps=0.0,
                          goodput_rps_per_gpu=0.0, attainment=1.0, meets_slo=True)
    deployment = DeploymentPlan(name="instance", cluster="local", model=model.name, weights=model.weights,
                                kv=model.kv, model_spec=model,
                                mode="colocated" if role == "colocated" else "disaggregated",
                                objective="max_goodput_per_gpu", groups=[group], predicted=predicted)
    from flowc import __version__  # as the optimizer does; here, not at the top: flowc imports this module

    return Plan(flowc_version=__version__, spec_files=[], deployments=[deployment],
                solver=SolverStatus(status="optimal", objective=0.0, bound=0.0, gap=0.0, wall_s=0.0), compile_s=0.0)
