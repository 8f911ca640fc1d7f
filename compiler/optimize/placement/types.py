"""The placement's public types: its inputs (`Candidate`, `Demand`), its result (`Placement`) and
its errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from flowc.compiler.plan import GpuRef

Role = Literal["colocated", "prefill", "decode"]
Objective = Literal["max_goodput_per_gpu", "min_gpus", "min_cost", "max_throughput"]


@dataclass(frozen=True)
class Candidate:
    deployment: str
    key: str  # unique, e.g. "chatbot/h100-sxm/tp4/pp1/colocated"
    gpu: str  # GPU type; only nodes of this type can host it
    tp: int
    pp: int
    role: Role
    capacity_rps: float  # requests/s one instance sustains under the SLO
    kv_bytes_per_request: float = 0.0  # prefill -> decode KV traffic per request (disaggregated only)

    @property
    def gpus(self) -> int:
        return self.tp * self.pp


@dataclass(frozen=True)
class Demand:
    deployment: str
    objective: Objective
    load_rps: float  # the workload's arrival rate: the plan must serve at least this
    max_gpus: Optional[int] = None
    # the instance counts the deployment may run, all roles together (prefill plus decode
    # instances when disaggregated); None: any count
    replicas: Optional[tuple[int, ...]] = None


@dataclass
class PlacedInstance:
    candidate_key: str
    gpus: list[GpuRef]  # gpus[stage * tp + rank]


@dataclass
class DeploymentPlacement:
    deployment: str
    objective: Objective
    mode: Literal["colocated", "disaggregated"]
    instances: list[PlacedInstance]
    goodput_rps: float  # sum of capacities; disaggregated: min(prefill sum, decode sum)
    gpus: int
    cost_per_hour: Optional[float]  # None when a GPU used has no price
    objective_value: float  # GPUs, usd/h, req/s per GPU or req/s, as the objective says
    bound: float  # best bound on objective_value (given the earlier deployments' locks)
    gap: float
    optimal: bool
    prefill_rps: float = 0.0
    decode_rps: float = 0.0


@dataclass
class Placement:
    deployments: dict[str, DeploymentPlacement]
    status: Literal["optimal", "feasible"]
    objective: float  # the first (highest-priority) deployment's objective value
    bound: float  # and its bound
    gap: float  # the largest relative gap over all deployments
    wall_s: float
    binding: list[str] = field(default_factory=list)
    model: Literal["aggregated", "configs", "per-node"] = "aggregated"
    solves: int = 0

    def instances(self, deployment: str) -> list[PlacedInstance]:
        return self.deployments[deployment].instances


class PlacementError(Exception):
    pass


class PlacementInfeasible(PlacementError):
    """The loads cannot be served. `max_goodput_rps[d]`: the largest load deployment d could be
    served at (with the deployments before it served, and at a replica count it allows);
    `gpus_needed[d]`: the fewest GPUs of its candidates' types that serve its load given enough
    nodes (ignoring the cluster's size and `max_gpus`; at a replica count it allows when one
    serves the load, else with more instances: those deployments are in `beyond_replicas`; None
    when no candidate can serve it)."""

    def __init__(self, deployment: str, message: str, max_goodput_rps: dict[str, float],
                 gpus_needed: dict[str, Optional[int]], load_rps: dict[str, float],
                 beyond_replicas: frozenset[str] = frozenset()):
        super().__init__(message)
        self.deployment = deployment
        self.message = message
        self.max_goodput_rps = max_goodput_rps
        self.gpus_needed = gpus_needed
        self.load_rps = load_rps
        self.beyond_replicas = beyond_replicas


class PlacementTimeout(PlacementError):
    """No feasible placement was found within the time limit (none proven impossible either)."""
