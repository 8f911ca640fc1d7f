"""The plan: the one contract between the compiler and the runtime.

A versioned pydantic document (`format_version` "MAJOR.MINOR"; minor bumps only add fields).
For each deployment: its mode, its instance groups (role, TP, PP, EP and the exact GPUs of each
instance), the scheduler settings, a memory map per GPU, the predicted metrics, the
alternatives considered with the reason each lost, and the constraints that bind.

A GPU is named by `GpuRef(node, index)`: `node` counts the cluster's nodes in declaration order
(node groups expanded, `node x 2` is nodes 0 and 1), `index` the GPU within its node.
"""

from __future__ import annotations

import re
from typing import Iterator, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from flowc.compiler.spec import ENGINES, Model

# 1.1: Predicted.requests, Scheduler.chunked_prefill; 1.2: MemoryMap.offload_step_s;
# 1.3: DeploymentPlan.model_spec, InstanceGroup.vendor; 1.4: MemoryMap.arena_sizes;
# 1.5: Predicted.makespan_s (offline batches), the objective max_throughput, DeploymentPlan.baselines;
# compile_s and solver.wall_s are no longer set (a plan is the same on every compile; the CLI times it);
# 1.6: Plan.clusters (the node groups of each cluster: GPU references are checked without the spec);
# 1.7: DeploymentPlan.engine (the engine the predictions are for), Predicted.interval and
# Predicted.meets_slo_pessimistic (prediction intervals)
FORMAT_VERSION = "1.7"
# The minor version that added each field a reader may require (the comment above says what each added).
ADDED_IN = {"model_spec": 3, "arena_sizes": 4, "clusters": 6}
SUPPORTED_MAJOR = int(FORMAT_VERSION.split(".")[0])
_VERSION = re.compile(r"([0-9]+)\.([0-9]+)")


def parse_format_version(text: str) -> Optional[tuple[int, int]]:
    """(major, minor) of a plan's `format_version` when this flowc reads it (the same major),
    else None."""
    match = _VERSION.fullmatch(text.strip())
    if match is None or int(match.group(1)) != SUPPORTED_MAJOR:
        return None
    return int(match.group(1)), int(match.group(2))


class PlanModel(BaseModel):
    # Percentiles of a run with rejected requests are infinite: keep them as JSON's Infinity.
    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="constants")


class GpuRef(PlanModel):
    node: int
    index: int

    def __str__(self) -> str:
        return f"n{self.node}g{self.index}"


class NodeGroupShape(PlanModel):
    """`count` nodes of `gpus` GPUs of type `gpu` each: a cluster's node group as GPU references
    count it (1.6)."""

    gpu: str
    gpus: int
    count: int


class Instance(PlanModel):
    """One engine: tp x pp GPUs; `gpus[stage * tp + rank]` is the GPU of TP rank `rank` in
    pipeline stage `stage`."""

    gpus: list[GpuRef]


class Scheduler(PlanModel):
    """An engine's batching settings, and the one home of their defaults (vLLM's: a token budget
    of 8192 with chunked prefill, 256 sequences, blocks of 16 tokens). A chunk size left out is
    the token budget."""

    max_batched_tokens: int = 8192
    chunked_prefill: bool = True
    # left out (or None): the token budget, filled in before validation (the 0 is never used)
    chunk_size: int = Field(default=0, description="largest prefill chunk of one sequence per step (at most "
                            "max_batched_tokens; left out: max_batched_tokens)")
    max_seqs: int = 256
    block_size: int = 16

    @model_validator(mode="before")
    @classmethod
    def _chunk_defaults_to_budget(cls, data):
        if isinstance(data, dict) and data.get("chunk_size") is None:
            data = {**data,
                    "chunk_size": data.get("max_batched_tokens", cls.model_fields["max_batched_tokens"].default)}
        return data


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
    arena_sizes: dict[str, int] = Field(default_factory=dict, description="bytes of each activation buffer, beside "
                                        "its offset: the runtime lays its buffers out from the plan alone (1.4)")


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
    goodput_rps: float = Field(description="highest arrival rate that sustains the SLO, for the whole deployment "
                                           "(model/goodput.py); of a batch: its requests / makespan_s")
    goodput_rps_per_gpu: float
    attainment: float = Field(description="joint SLO attainment at the workload's rate")
    meets_slo: bool
    requests: Optional[int] = Field(None, description="requests simulated (the workload sampled with seed 0); "
                                    "None: the workload's default count")
    makespan_s: Optional[float] = Field(None, description="a batch: seconds from its start to its last request's "
                                        "end (1.5)")
    interval: dict[str, tuple[float, float]] = Field(
        default_factory=dict, description="metric (ttft, tpot, e2e, throughput) -> (low, high): the nominal 80% "
        "prediction interval of its figures as factors of them (model/intervals.py; 1.7)")
    meets_slo_pessimistic: Optional[bool] = Field(
        None, description="whether the SLO holds with every latency at the slow end of its interval (1.7); "
        "meets_slo without it: only at the optimistic end")


class Alternative(PlanModel):
    summary: str = Field(description="e.g. `tp 2 x 4 replicas, colocated`")
    objective_value: Optional[float] = None
    reason: str = Field(description="why it lost")


class Baseline(PlanModel):
    """A configuration the plan is compared with, measured end to end the way the plan is
    (`optimize/baselines.py`); the plan is never worse in its objective (1.5)."""

    name: str = Field(description="`vLLM-style` or `DistServe-style`")
    summary: str = Field(description="its instances, e.g. `4 x h100-sxm tp 2 x pp 1 colocated`")
    gpus: int
    goodput_rps: float
    sustains_load: bool = Field(description="whether it sustains the workload's rate under the SLO")
    note: Optional[str] = None


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
    engine: str = Field("vllm", description="the engine the predictions are for (1.7; older plans: vLLM's kernels)")
    groups: list[InstanceGroup]
    predicted: Predicted
    alternatives: list[Alternative] = Field(default_factory=list)
    baselines: list[Baseline] = Field(default_factory=list, description="what the plan was compared with (1.5)")
    binding: list[str] = Field(default_factory=list, description="constraints that limit the plan")

    @field_validator("engine")
    @classmethod
    def _known_engine(cls, value: str) -> str:
        if value not in ENGINES:
            raise ValueError(f"unknown engine `{value}` (flowc predicts for {', '.join(ENGINES)})")
        return value

    @property
    def gpus(self) -> int:
        return sum(g.replicas * g.gpus_per_instance for g in self.groups)

    def instance_labels(self) -> list[str]:
        """`ROLE K` for every instance, in plan order (groups, then their instances; K counts
        within the role): the simulator's instance indices (`plan_instances`) and the runtime's
        names for them (`RequestOutput.instances`)."""
        seen: dict[str, int] = {}
        labels = []
        for g in self.groups:
            for _ in g.instances:
                labels.append(f"{g.role} {seen.get(g.role, 0)}")
                seen[g.role] = seen.get(g.role, 0) + 1
        return labels

    @property
    def replicas(self) -> int:
        """Instances of every group and role: what a spec's `replicas` counts."""
        return sum(g.replicas for g in self.groups)


class SolverStatus(PlanModel):
    status: Literal["optimal", "feasible"]
    objective: float
    bound: float
    gap: float = Field(description="relative gap between objective and bound")
    # wall-clock, written by plans before 1.5: read and dropped, so a spec compiles to the same plan
    wall_s: Optional[float] = Field(None, exclude=True)

    @field_validator("wall_s")
    @classmethod
    def _drop_wall_clock(cls, value: Optional[float]) -> None:
        return None


class Plan(PlanModel):
    format_version: str = FORMAT_VERSION
    flowc_version: str
    spec_files: list[str]
    clusters: dict[str, list[NodeGroupShape]] = Field(
        default_factory=dict, description="the node groups of each cluster the plan places on, in declaration order "
        "(1.6): every command checks a plan's GPU references against them, without the spec")
    deployments: list[DeploymentPlan]
    solver: SolverStatus
    compile_s: Optional[float] = Field(None, exclude=True)  # as `SolverStatus.wall_s`

    def texts(self) -> Iterator[tuple[str, str]]:
        """(JSON path, text) of every string of the plan, keys included: the texts a command
        might print, write into a script or a manifest."""
        return _texts(self.model_dump())

    def has(self, field: str) -> bool:
        """Whether the plan's format version carries `field` (one added by a minor version after 1.0):
        a plan written before it may leave it empty."""
        version = parse_format_version(self.format_version)
        return version is not None and version[1] >= ADDED_IN[field]

    @field_validator("compile_s")
    @classmethod
    def _drop_wall_clock(cls, value: Optional[float]) -> None:
        return None


def _texts(data, where: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(data, str):
        yield where, data
    elif isinstance(data, dict):
        for key, value in data.items():
            inner = f"{where}.{key}" if where else str(key)
            yield from _texts(key, inner)
            yield from _texts(value, inner)
    elif isinstance(data, list):
        for k, value in enumerate(data):
            yield from _texts(value, f"{where}[{k}]")
