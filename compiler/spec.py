"""The spec IR: a checked spec as pydantic models, every unit normalized.

Sizes are bytes (int), durations seconds, bandwidths bytes/s, rates per second, compute FLOP/s,
prices usd per hour, shares fractions in [0, 1]. References between top-level objects are by
name (keys of the Spec's dicts); a deployment carries its own copy of the model with the
deployment's overrides applied.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

DTYPE_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5, "fp4": 0.5}
Dtype = Literal["fp32", "bf16", "fp16", "fp8", "int8", "int4", "fp4"]


class IR(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Location(IR):
    """Where an object was declared, for diagnostics of later phases."""

    file: str
    line: int
    col: int


class Link(IR):
    name: str
    kind: Literal["nvlink", "xgmi", "pcie", "infiniband", "ethernet", "memory"]
    bandwidth: float = Field(description="bytes/s per GPU or NIC, per direction")
    latency: Optional[float] = Field(None, description="seconds")
    doc: Optional[str] = None
    location: Optional[Location] = None


class GPU(IR):
    name: str
    vendor: Literal["nvidia", "amd", "cpu"]
    memory: int = Field(description="bytes of device memory")
    memory_bandwidth: float = Field(description="bytes/s")
    flops: dict[Dtype, float] = Field(description="dense peak FLOP/s per dtype")
    interconnect: str = Field(description="link between GPUs of a node")
    host_link: str = Field(description="link to host memory")
    price: Optional[float] = Field(None, description="usd per GPU-hour")
    overheads: dict[Literal["step", "layer", "sequence", "token", "layer_token", "wake", "request"], float] = Field(
        default_factory=dict, description="seconds the engine spends per iteration beyond what the kernels take at "
        "the device's peaks: once per step, per layer, per sequence and per token of the step, and per token in "
        "each layer; `wake`: extra seconds of the first iteration after the engine idled (measured by "
        "`flowc calibrate`)")
    doc: Optional[str] = None
    location: Optional[Location] = None


class NodeGroup(IR):
    name: Optional[str] = None
    count: int = Field(description="number of identical nodes")
    gpu: str
    gpus_per_node: int
    link: Link
    link_domain: int = Field(description="GPUs per fast-link domain")
    host_memory: Optional[int] = Field(None, description="bytes per node")
    host_link: Link
    price: Optional[float] = Field(None, description="usd per node-hour")


class Cluster(IR):
    name: str
    nodes: list[NodeGroup]
    network: Optional[Link] = None
    network_nics: int = 1
    doc: Optional[str] = None
    location: Optional[Location] = None

    @property
    def total_gpus(self) -> int:
        return sum(group.count * group.gpus_per_node for group in self.nodes)


class MoE(IR):
    experts: int
    top_k: int
    expert_ffn: int
    shared_experts: int = 0
    dense_layers: int = 0


class MLA(IR):
    q_lora_rank: Optional[int] = None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int


class Model(IR):
    name: str
    architecture: Literal["llama", "qwen2", "mixtral", "qwen3_moe", "deepseek_v3", "gptj"]
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    max_context: int = Field(description="tokens")
    weights: Dtype = "bf16"
    kv: Dtype = "bf16"
    tied_embeddings: bool = False
    attention_bias: bool = False
    mlp: Literal["gated", "plain"] = "gated"
    sliding_window: Optional[int] = Field(None, description="tokens")
    moe: Optional[MoE] = None
    mla: Optional[MLA] = None
    doc: Optional[str] = None
    location: Optional[Location] = None


class Arrival(IR):
    kind: Literal["poisson", "gamma", "constant", "trace", "batch"]
    rate: Optional[float] = Field(None, description="requests/s (from the trace for `trace`; None for a `batch`, "
                                  "whose requests are all queued at the start)")
    cv: Optional[float] = Field(None, description="coefficient of variation of inter-arrival times (gamma)")
    trace: Optional[str] = Field(None, description="path of the trace file")


class Lengths(IR):
    """A distribution of token counts."""

    kind: Literal["fixed", "uniform", "normal", "lognormal", "trace"]
    value: Optional[int] = None
    low: Optional[int] = None
    high: Optional[int] = None
    mean: Optional[float] = None
    std: Optional[float] = None
    median: Optional[float] = None
    sigma: Optional[float] = None
    trace: Optional[str] = None
    min: Optional[int] = None
    max: Optional[int] = None

    @property
    def upper_bound(self) -> Optional[int]:
        """The largest length this distribution can produce, when it is bounded."""
        candidates = [self.max, self.value, self.high]
        if self.kind in ("fixed", "uniform") or self.max is not None:
            return min(c for c in candidates if c is not None)
        return None


class Workload(IR):
    name: str
    arrival: Arrival
    prompt: Lengths
    output: Lengths
    requests: Optional[int] = None
    duration: Optional[float] = Field(None, description="seconds")
    doc: Optional[str] = None
    location: Optional[Location] = None

    @property
    def is_batch(self) -> bool:
        """An offline job (`arrival batch`): every request queued at the start, no rate."""
        return self.arrival.kind == "batch"


class SLOTarget(IR):
    metric: Literal["ttft", "tpot", "e2e"]
    percentile: Optional[float] = Field(None, description="in (0, 100]; None: every request, see attainment")
    limit: float = Field(description="seconds")


class SLO(IR):
    name: str
    targets: list[SLOTarget]
    attainment: Optional[float] = Field(None, description="share of requests meeting every limit, in (0, 1]")
    doc: Optional[str] = None
    location: Optional[Location] = None


# The largest values a spec may give, far above any real deployment: flowc's solvers count in
# 64-bit integers, and its simulations allocate per GPU and per request.
MAX_CLUSTER_GPUS = 2**20  # GPUs in one cluster
MAX_COUNT = 2**16  # nodes in a group, GPUs or NICs per node
MAX_RATE = 1e6  # requests/s of one workload
MAX_CV = 100.0  # coefficient of variation of inter-arrival times
MAX_PRICE = 1e6 / 3600  # usd per second (1,000,000 usd/h)
MAX_KNOB = 2**24  # a search knob's value (tp, replicas, tokens, ...)
# The most requests one sample may hold: about 0.25 GB of arrays, and hours of simulation.
# More is a typo (`requests 1e12 req`) rather than a workload, and would exhaust memory.
MAX_REQUESTS = 10**7

# A name of a spec object: the grammar's WORD (grammar/flow.lark; a test pins the two together).
NAME_PATTERN = r"[A-Za-z_][A-Za-z0-9_]*(?:[-.][A-Za-z0-9_]+)*"

# The engines a prediction is for (model/engines.py holds their profiles).
ENGINES = ("vllm", "sglang", "trtllm", "flowc")

SEARCH_KNOBS = ("tp", "pp", "ep", "replicas", "max_batched_tokens", "chunk_size", "block_size", "max_seqs")


class Deployment(IR):
    name: str
    model: Model
    cluster: str
    workload: str
    slo: str
    objective: Literal["max_goodput_per_gpu", "min_gpus", "min_cost", "max_throughput"] = "max_goodput_per_gpu"
    search: dict[str, list[int]] = Field(default_factory=dict, description="knob -> allowed values")
    max_gpus: Optional[int] = None
    allow_disaggregation: bool = False
    allow_offload: bool = False
    engine: Optional[str] = Field(None, description="the engine predicted for (spec.ENGINES); None: the standard "
                                  "library's default (model/engines.default_engine)")
    doc: Optional[str] = None
    location: Optional[Location] = None


class Spec(IR):
    """A checked .flow spec with everything it imports."""

    files: list[str] = Field(description="the files given, in order")
    links: dict[str, Link] = Field(default_factory=dict)
    gpus: dict[str, GPU] = Field(default_factory=dict)
    clusters: dict[str, Cluster] = Field(default_factory=dict)
    models: dict[str, Model] = Field(default_factory=dict)
    workloads: dict[str, Workload] = Field(default_factory=dict)
    slos: dict[str, SLO] = Field(default_factory=dict)
    deployments: dict[str, Deployment] = Field(default_factory=dict)
