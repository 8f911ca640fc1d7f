"""`flowc export`: a plan as launch scripts for vLLM or SGLang, and a Kubernetes manifest.

Pure: a Plan in, files (relative path, content) out. One bash script per engine instance, from
the engine's jinja2 template in engines/templates/; the flags an engine version has, and the
values it accepts for the flags that take a dtype, come from engines/ENGINE-VERSION.json, each
naming its source. Every rendered script is checked against that list: a flag the version lacks
is a bug in flowc (TemplateError), never output.

Each flag's value comes from the plan and is explained by the comment line above it. What a
version cannot express (a CPU device, weights it cannot quantize to, a KV dtype outside its
choices, offload, disaggregation without a connector) is a Problem: refused, or with
`allow_degrade` dropped with a `# DEGRADED` comment in the script and a warning.
"""

from __future__ import annotations

import functools
import json
import re
import shlex
from dataclasses import dataclass, field
from importlib import resources
from typing import Mapping, NamedTuple, Optional

from flowc.compiler.model.memory import CONTEXT_RESERVE, GRAPH_RESERVE, NCCL_RESERVE
from flowc.compiler.plan import DeploymentPlan, InstanceGroup, Plan
from flowc.compiler.units import format_gib

TARGETS = ("vllm", "sglang")
LABELS = {"vllm": "vLLM", "sglang": "SGLang"}
K8S_MANIFEST = "kubernetes.yaml"
NODE_LABEL = "flowc.dev/node"
# Engines compute in 16-bit when the weights are quantized: flowc's memory model sizes
# activations in bf16 (geometry.ACTIVATION_BYTES).
ACTIVATION_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
QUANTIZED_ACTIVATIONS = "bfloat16"
# Weight dtypes an engine quantizes a 16-bit checkpoint to at load time: (template variable, flag, value).
ONLINE_QUANTIZATION = {
    "vllm": {"fp8": ("quantization", "--quantization", "fp8")},
    # SGLang's torchao weight-only quantization (int4 in groups of 128, its usual group size).
    "sglang": {"fp8": ("quantization", "--quantization", "fp8"), "int8": ("torchao", "--torchao-config", "int8wo"),
               "int4": ("torchao", "--torchao-config", "int4wo-128")},
}
# An engine's names for a flowc KV dtype, in order of preference.
KV_NAMES = {"fp8": ("fp8", "fp8_e4m3"), "bf16": ("bfloat16", "bf16"), "fp16": ("float16",), "fp32": ("float32",),
            "fp4": ("fp4_e2m1",)}
VLLM_CONNECTOR = "NixlConnector"  # vLLM's connector for n:m prefill/decode instances
VLLM_KV_ROLES = {"prefill": "kv_producer", "decode": "kv_consumer"}
NIXL_SIDE_CHANNEL_PORT = 5600  # vLLM's default VLLM_NIXL_SIDE_CHANNEL_PORT
SGLANG_TRANSFER_BACKEND = "mooncake"  # SGLang's default disaggregation transfer backend
SGLANG_BOOTSTRAP_PORT = 8998  # SGLang's default --disaggregation-bootstrap-port


class TemplateError(RuntimeError):
    """A template emitted a flag or value its engine version does not have: a bug in flowc."""


class UnknownVersion(ValueError):
    def __init__(self, target: str, version: str, known: list[str]):
        self.target, self.version, self.known = target, version, known
        super().__init__(f"no {LABELS[target]} version `{version}`")


@dataclass(frozen=True)
class Problem:
    """Something of the plan the engine version cannot run as planned. `dropped` says what the
    script does instead when it is degradable and the user allows it."""

    message: str
    help: str
    dropped: Optional[str] = None

    @property
    def degradable(self) -> bool:
        return self.dropped is not None


class ExportError(Exception):
    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("; ".join(p.message for p in problems))


@dataclass(frozen=True)
class Export:
    files: list[tuple[str, str]]
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class EngineSpec:
    """One version of an engine: its documented flags and the choices of the ones flowc maps."""

    target: str
    version: str
    source: str
    template: str
    image: str
    default_port: int
    flags: frozenset[str]
    choices: Mapping[str, tuple[str, ...]]
    env: frozenset[str]
    kv_connectors: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"{LABELS[self.target]} {self.version}"


class Setting(NamedTuple):
    value: object
    why: str


# ---------------------------------------------------------------------------------- engines

def _engines_dir():
    return resources.files(__package__).joinpath("engines")


def known_versions(target: str) -> list[str]:
    """The versions of `target` with a flag list, newest first."""
    prefix = f"{target}-"
    versions = [p.name[len(prefix):-len(".json")] for p in _engines_dir().iterdir()
                if p.name.startswith(prefix) and p.name.endswith(".json")]
    return sorted(versions, key=lambda v: tuple(int(part) for part in v.split(".")), reverse=True)


def load_engine(target: str, version: str | None = None) -> EngineSpec:
    known = known_versions(target)
    version = version or known[0]
    if version not in known:
        raise UnknownVersion(target, version, known)
    data = json.loads(_engines_dir().joinpath(f"{target}-{version}.json").read_text(encoding="utf-8"))
    return EngineSpec(target=target, version=version, source=data["source"], template=data["template"],
                      image=data["image"], default_port=data["default_port"], flags=frozenset(data["flags"]),
                      choices={flag: tuple(values) for flag, values in data["choices"].items()},
                      env=frozenset(data["env"]), kv_connectors=tuple(data.get("kv_connectors", ())))


@functools.cache
def hf_repos() -> dict[str, str]:
    """flowc model name -> Hugging Face repo id, from the `# config.json: ORG/NAME` comment on
    each `model` line of the standard library's models.flow."""
    text = resources.files("flowc.stdlib").joinpath("models.flow").read_text(encoding="utf-8")
    return dict(re.findall(r"^model\s+(\S+)\s*\{\s*#\s*config\.json:\s*(\S+)", text, re.MULTILINE))


# ---------------------------------------------------------------------------------- memory

def _floor_hundredths(numerator: int, denominator: int) -> int:
    return 100 * numerator // denominator


def vllm_memory_fraction(group: InstanceGroup) -> Setting:
    """--gpu-memory-utilization: vLLM sizes its KV cache as utilization x total memory minus the
    weights, the peak activations and the non-torch memory (NCCL) it profiles; the CUDA context
    exists before its baseline and CUDA graphs are captured after the KV cache is sized, so both
    stay outside. Of the plan's reserve that leaves everything but the context and graph pools."""
    m = group.memory
    used = m.weights + m.kv_cache + m.activations + m.reserve - CONTEXT_RESERVE - GRAPH_RESERVE
    hundredths = _floor_hundredths(used, m.capacity)
    why = (f"(weights {format_gib(m.weights)} + KV {format_gib(m.kv_cache)} + activations {format_gib(m.activations)} "
           f"+ reserve {format_gib(m.reserve)} - CUDA context {format_gib(CONTEXT_RESERVE)} "
           f"- CUDA graphs {format_gib(GRAPH_RESERVE)}) / {format_gib(m.capacity)} = {used / m.capacity:.4f}, "
           "rounded down")
    return Setting(hundredths, why)


def sglang_memory_fraction(group: InstanceGroup) -> Setting:
    """--mem-fraction-static: SGLang's static pool holds the weights and the KV cache, as a share
    of the memory free when it starts (after the CUDA context and, across GPUs, NCCL)."""
    m = group.memory
    nccl = NCCL_RESERVE if group.gpus_per_instance > 1 else 0
    free_at_start = m.capacity - CONTEXT_RESERVE - nccl
    hundredths = _floor_hundredths(m.weights + m.kv_cache, free_at_start)
    why = (f"(weights {format_gib(m.weights)} + KV {format_gib(m.kv_cache)}) / (capacity {format_gib(m.capacity)} "
           f"- CUDA context {format_gib(CONTEXT_RESERVE)}" + (f" - NCCL {format_gib(nccl)}" if nccl else "")
           + f") = {(m.weights + m.kv_cache) / free_at_start:.4f}, rounded down")
    return Setting(hundredths, why)


MEMORY_FRACTION = {"vllm": vllm_memory_fraction, "sglang": sglang_memory_fraction}


# ---------------------------------------------------------------------------------- mapping

@dataclass
class _Instance:
    """One engine to launch: an instance of a group, on one node."""

    deployment: DeploymentPlan
    group_index: int
    group: InstanceGroup
    index: int
    node: int
    gpus: list[int]
    slot: int  # its position among the instances on its node: offsets its ports

    @property
    def name(self) -> str:
        raw = f"{self.deployment.name}-g{self.group_index}-{self.group.role}-{self.index}".lower()
        return re.sub(r"[^a-z0-9-]+", "-", raw).strip("-")[:63]

    @property
    def path(self) -> str:
        return f"{self.deployment.name}/g{self.group_index}-{self.group.role}-{self.index}.sh"


class _Mapper:
    """Maps the groups of a plan onto one engine version, collecting the Problems."""

    def __init__(self, engine: EngineSpec, model_paths: Mapping[str, str]):
        self.engine = engine
        self.model_paths = model_paths
        self.problems: list[Problem] = []
        self.degraded: dict[tuple[str, int], list[Problem]] = {}

    def problem(self, key: tuple[str, int] | None, message: str, help: str, dropped: str | None = None) -> None:
        problem = Problem(message, help, dropped)
        self.problems.append(problem)
        if key is not None and problem.degradable:
            self.degraded.setdefault(key, []).append(problem)

    def model(self, d: DeploymentPlan) -> Setting | None:
        path = self.model_paths.get(d.model) or self.model_paths.get("*")
        if path:
            return Setting(path, f"the model: {path} (--model-path), flowc model `{d.model}`")
        repo = hf_repos().get(d.model)
        if repo:
            return Setting(repo, f"the model: Hugging Face repo {repo}, named for flowc model `{d.model}` in "
                                 "the standard library (stdlib/models.flow)")
        self.problem(None, f"model `{d.model}` of deployment `{d.name}` names no Hugging Face repo",
                     f"pass `--model-path {d.model}=PATH` (a checkpoint directory or a Hugging Face repo id)")
        return None

    def group(self, d: DeploymentPlan, j: int, g: InstanceGroup) -> dict:
        """The template values of group `j` of `d` that all its instances share."""
        e, key = self.engine, (d.name, j)
        where = f"group {j} ({g.role}) of deployment `{d.name}`"
        if g.vendor == "cpu":
            self.problem(None, f"{e.label} runs on GPUs: {where} runs on `{g.gpu}`, a CPU device",
                         "run CPU plans with `flowc run`, or compile the spec for NVIDIA or AMD GPUs")
        for i, instance in enumerate(g.instances):
            nodes = sorted({ref.node for ref in instance.gpus})
            if len(nodes) > 1:
                self.problem(None, f"instance {i} of {where} spans nodes {', '.join(map(str, nodes))}: a launch "
                             "script starts an engine on one node",
                             "keep instances within a node (limit tp x pp to the GPUs of a node in the spec)")
        values = {"memory": self._memory(where, g), **self._weights(key, where, d)}
        if g.memory.offloaded:
            held = ", ".join(f"{name} {format_gib(n)}" for name, n in sorted(g.memory.offloaded.items()))
            self.problem(key, f"{where} offloads to host memory ({held}), which {e.label} cannot run as planned: "
                         "its --cpu-offload-gb streams weights without the plan's overlap",
                         "compile with `forbid offload`", "offload dropped: the instance keeps everything on its "
                         "GPUs, more than the plan's memory map holds (it may not fit)")
        engine_values = self._vllm(key, where, g) if e.target == "vllm" else self._sglang(key, where, g)
        return {**values, **engine_values}

    def _memory(self, where: str, g: InstanceGroup) -> Setting:
        hundredths, why = MEMORY_FRACTION[self.engine.target](g)
        # a CPU group is refused already; its memory map has no CUDA reserve to derive a fraction from
        if not 0 < hundredths <= 100 and g.vendor != "cpu":
            self.problem(None, f"the memory map of {where} gives a memory fraction of {hundredths / 100:.2f}, "
                         "outside (0, 1]", "compile the plan again with this flowc")
        return Setting(f"{hundredths // 100}.{hundredths % 100:02d}", why)

    def _weights(self, key, where: str, d: DeploymentPlan) -> dict:
        e = self.engine
        values = {"quantization": None, "torchao": None}
        if d.weights in ACTIVATION_DTYPE:
            dtype = ACTIVATION_DTYPE[d.weights]
            values["dtype"] = Setting(dtype, f"weights and activations in {d.weights} (the plan's weights dtype)")
        else:
            dtype = QUANTIZED_ACTIVATIONS
            values["dtype"] = Setting(dtype, "activations in bf16 (the memory model's), weights quantized below")
            variable, flag, value = ONLINE_QUANTIZATION[e.target].get(d.weights, (None, None, None))
            if variable and value in e.choices[flag]:
                values[variable] = Setting(value, f"{d.weights} weights (the plan's): the engine quantizes a 16-bit "
                                           f"checkpoint when it loads, and reads a checkpoint already in {d.weights} "
                                           "as it is")
            else:
                self.problem(key, f"{e.label} has no flag that quantizes weights to {d.weights}, which {where} has",
                             f"compile with `weights fp8` or a 16-bit dtype, or pass --model-path to a {d.weights} "
                             "checkpoint with --allow-degrade (the engine reads its quantization_config)",
                             f"{d.weights} weights not mapped: the engine loads the checkpoint in its own dtype, so "
                             "its weights and KV cache differ from the plan's memory map")
        values["kv"] = self._kv(key, where, d.kv, dtype)
        return values

    def _kv(self, key, where: str, kv: str, dtype: str) -> Setting:
        choices = self.engine.choices["--kv-cache-dtype"]
        for name in KV_NAMES.get(kv, ()):
            if name in choices:
                return Setting(name, f"KV cache in {kv} (the plan's kv dtype)")
        if ACTIVATION_DTYPE.get(kv) == dtype:
            return Setting("auto", f"KV cache in {kv} (the plan's kv dtype): `auto` keeps the model dtype, {dtype}")
        self.problem(key, f"{self.engine.label} cannot keep the KV cache in {kv}, as {where} does: "
                     f"--kv-cache-dtype accepts {', '.join(choices)}",
                     "compile with `kv fp8` or the model's dtype, or pick another --target or --version",
                     f"KV cache in the model dtype (`auto`) instead of {kv}: its size differs from the plan's "
                     "memory map")
        return Setting("auto", f"KV cache in the model dtype: DEGRADED from the plan's {kv}")

    def _vllm(self, key, where: str, g: InstanceGroup) -> dict:
        e, s = self.engine, g.scheduler
        values = {"expert_parallel": None, "chunk_cap": None, "kv_transfer": None, "disaggregated": False}
        if g.ep > 1 and g.ep == g.tp:
            values["expert_parallel"] = Setting(True, f"expert parallelism: ep {g.ep} = tp, and vLLM's expert "
                                                "parallel group is the TP group")
        elif g.ep > 1:
            self.problem(key, f"{e.label} spreads experts over all {g.tp} TP ranks, but {where} has ep {g.ep}",
                         f"compile with ep in [1, {g.tp}], or use --target sglang (--ep-size)",
                         f"no expert parallelism: the experts are split over the TP group, not ep {g.ep}")
        if s.chunked_prefill and s.chunk_size < s.max_batched_tokens:
            values["chunk_cap"] = Setting(s.chunk_size, "the largest prefill chunk of one request per iteration "
                                          "(the plan's chunk_size): vLLM caps a request's new tokens per step here")
        if g.role == "colocated":
            return values
        if VLLM_CONNECTOR not in e.kv_connectors:
            able = [v for v in known_versions("vllm") if VLLM_CONNECTOR in load_engine("vllm", v).kv_connectors]
            self.problem(key, f"{e.label} has no {VLLM_CONNECTOR} for disaggregated prefill/decode, which {where} "
                         f"needs; its KV connectors: {', '.join(e.kv_connectors)}",
                         f"use --version {' or '.join(able)}, or --target sglang",
                         "no KV transfer: this instance serves whole requests (prefill and decode) by itself")
            return values
        config = json.dumps({"kv_connector": VLLM_CONNECTOR, "kv_role": VLLM_KV_ROLES[g.role]}, separators=(",", ":"))
        values["kv_transfer"] = Setting(config, f"disaggregated {g.role}: {VLLM_KV_ROLES[g.role]} of KV caches, "
                                        f"sent between instances by {VLLM_CONNECTOR}")
        values["disaggregated"] = True
        return values

    def _sglang(self, key, where: str, g: InstanceGroup) -> dict:
        s = g.scheduler
        if s.chunked_prefill and s.chunk_size < s.max_batched_tokens:
            self.problem(key, f"SGLang has no per-request prefill chunk below the batch's token budget: {where} "
                         f"has chunk_size {s.chunk_size} < max_batched_tokens {s.max_batched_tokens}",
                         "compile with chunk_size equal to max_batched_tokens, or use --target vllm",
                         f"prefill chunks are bounded by the token budget {s.max_batched_tokens}, not the plan's "
                         f"chunk_size {s.chunk_size}")
        return {"mixed_chunk": g.role == "colocated" and s.chunked_prefill,
                "transfer_backend": SGLANG_TRANSFER_BACKEND, "disaggregated": g.role != "colocated"}


def _instances(plan: Plan) -> list[_Instance]:
    """Every instance of the plan, in plan order; `slot` counts the instances on each node."""
    found, slots = [], {}
    for d in plan.deployments:
        for j, g in enumerate(d.groups):
            for i, instance in enumerate(g.instances):
                node = instance.gpus[0].node
                found.append(_Instance(d, j, g, i, node, [ref.index for ref in instance.gpus], slots.get(node, 0)))
                slots[node] = slots.get(node, 0) + 1
    return found


# ---------------------------------------------------------------------------------- rendering

@functools.cache
def _jinja():
    import jinja2  # only `flowc export` needs it

    directory = str(_engines_dir().joinpath("templates"))
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(directory), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)
    env.filters["q"] = lambda value: shlex.quote(str(value))
    env.filters["y"] = lambda value: json.dumps(value)  # a JSON scalar is a YAML flow scalar
    return env


class Launch(NamedTuple):
    """A rendered script, parsed back: its exports, its command and its arguments, each argument
    line with the comment lines above it."""

    env: list[tuple[str, str]]
    command: list[str]
    args: list[tuple[list[str], list[str]]]


def parse_script(script: str) -> Launch:
    env, command, args, comments, in_args = [], [], [], [], False
    for line in script.splitlines():
        text = line.strip()
        if text.startswith("#"):
            comments.append(text.lstrip("#").strip())
        elif in_args and text == ")":
            in_args = False
        elif in_args:
            args.append((comments, shlex.split(text)))
            comments = []
        elif text == "args=(":
            in_args, comments = True, []
        elif text.startswith("export "):
            name, _, value = text[len("export "):].partition("=")
            env.append((name, value))
            comments = []
        elif text.startswith("exec "):
            words = text.split()
            command = words[1:words.index('"${args[@]}"')]
        else:
            comments = []
    return Launch(env, command, args)


def check_script(engine: EngineSpec, script: str) -> Launch:
    """The script's flags, values and exports against the version's lists; TemplateError if any
    is not there."""
    launch = parse_script(script)
    tokens = [token for _, words in launch.args for token in words]
    for k, token in enumerate(tokens):
        if not token.startswith("--"):
            continue
        if token not in engine.flags:
            raise TemplateError(f"{engine.template} emits `{token}`, which {engine.label} does not have "
                                f"(engines/{engine.target}-{engine.version}.json)")
        choices = engine.choices.get(token)
        value = tokens[k + 1] if k + 1 < len(tokens) else None
        if choices is not None and value not in choices:
            raise TemplateError(f"{engine.template} passes `{token} {value}`; {engine.label} accepts "
                                f"{', '.join(choices)}")
    for name, _ in launch.env:
        if name != "CUDA_VISIBLE_DEVICES" and name not in engine.env:
            raise TemplateError(f"{engine.template} exports {name}, which {engine.label} does not read")
    return launch


def _nixl_env(instance: _Instance, nodes: set[int]) -> list[dict]:
    """vLLM's NIXL handshake listens on a host and port of each instance: a port of its own per
    instance on a node, and an address the other nodes reach when the deployment spans nodes."""
    node = instance.node
    host = Setting("localhost", f"NIXL handshake address: every instance of this deployment is on node {node}")
    if len(nodes) > 1:
        host = Setting(f'"${{FLOWC_NODE_ADDRESS:?set FLOWC_NODE_ADDRESS to the address of node {node}}}"',
                       "NIXL handshake address: this deployment spans nodes, so node "
                       f"{node}'s address, which the others reach")
    port = NIXL_SIDE_CHANNEL_PORT + instance.slot
    port_why = f"NIXL handshake port: {NIXL_SIDE_CHANNEL_PORT} + the instance's slot {instance.slot} on node {node}"
    # In Kubernetes (k8s None: the pod's IP) every pod has an address of its own.
    return [{"name": "VLLM_NIXL_SIDE_CHANNEL_HOST", "value": host.value, "why": host.why, "k8s": None,
             "k8s_why": "NIXL handshake address: the pod's IP, which the other pods reach"},
            {"name": "VLLM_NIXL_SIDE_CHANNEL_PORT", "value": str(port), "why": port_why, "k8s": str(port),
             "k8s_why": port_why}]


def export_plan(plan: Plan, *, target: str, version: str | None = None, k8s: bool = False,
                model_paths: Mapping[str, str] | None = None, allow_degrade: bool = False,
                plan_name: str = "plan.json") -> Export:
    """The launch scripts of every instance of `plan` (and with `k8s` a manifest). Raises
    UnknownVersion, or ExportError with every problem that is refused."""
    engine = load_engine(target, version)
    mapper = _Mapper(engine, model_paths or {})
    groups = {(d.name, j): mapper.group(d, j, g) for d in plan.deployments for j, g in enumerate(d.groups)}
    models = {d.name: mapper.model(d) for d in plan.deployments}
    refused = [p for p in mapper.problems if not (allow_degrade and p.degradable)]
    if refused:
        raise ExportError(refused)
    warnings = [f"{p.message}; DEGRADED (--allow-degrade): {p.dropped}" for ps in mapper.degraded.values() for p in ps]

    instances = _instances(plan)
    nodes_of = {d.name: {i.node for i in instances if i.deployment is d} for d in plan.deployments}
    template = _jinja().get_template(engine.template)
    files, objects = [], []
    for instance in instances:
        d, g = instance.deployment, instance.group
        key = (d.name, instance.group_index)
        env = _nixl_env(instance, nodes_of[d.name]) if target == "vllm" and groups[key]["disaggregated"] else []
        header = {"engine": engine, "plan": plan, "plan_name": plan_name, "d": d, "g": g, "i": instance,
                  "replicas": g.replicas, "degraded": [p.dropped for p in mapper.degraded.get(key, [])]}
        script = template.render(**header, **groups[key], s=g.scheduler, model=models[d.name], env=env,
                                 cuda_visible_devices=",".join(map(str, instance.gpus)),
                                 port=engine.default_port + instance.slot,
                                 bootstrap_port=SGLANG_BOOTSTRAP_PORT + instance.slot)
        launch = check_script(engine, script)
        files.append((instance.path, script))
        labels = [("flowc.dev/deployment", d.name), ("flowc.dev/group", str(instance.group_index)),
                  ("flowc.dev/role", g.role), ("flowc.dev/instance", instance.name)]
        objects.append({**header, "launch": launch, "env": env, "port": engine.default_port + instance.slot,
                        "labels": labels, "resource": "amd.com/gpu" if g.vendor == "amd" else "nvidia.com/gpu"})
    if k8s:
        manifest = _jinja().get_template("kubernetes.yaml.j2").render(
            engine=engine, plan=plan, plan_name=plan_name, objects=objects, node_label=NODE_LABEL)
        files.append((K8S_MANIFEST, manifest))
    return Export(files, warnings)
