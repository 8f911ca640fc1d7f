"""`flowc export`: a plan as launch scripts for vLLM or SGLang, and a Kubernetes manifest.

Pure: a Plan in, files (relative path, content) out. One bash script per engine instance (per
node of it when it spans nodes), from the engine's jinja2 template in engines/templates/, and per
disaggregated deployment a prefill/decode router script; the flags an engine version has, and the
values it accepts for the flags that take a dtype, come from engines/ENGINE-VERSION.json, each
naming its source. Every rendered script is checked against that list: a flag the version lacks
is a bug in flowc (TemplateError), never output.

Each flag's value comes from the plan and is explained by the comment line above it. What a
version cannot express (a CPU device, weights it cannot quantize to, a KV dtype outside its
choices, offload, disaggregation without a connector) is a Problem: refused, or with
`allow_degrade` dropped with a `# DEGRADED` comment in the script and a warning.

Plans travel between people and machines, so every text in one is treated as hostile:
- a value reaches a script only through `shell_quote` (bash quoting, so `$(...)`, backquotes
  and quotes stay literal), in commands and in comments alike; a control character in any text
  of the plan or the command line (a newline would end a comment and start a command) is a
  Problem, refused before anything is rendered;
- file names come from slugs (lowercase letters, digits, dashes) of the deployment names, made
  distinct, so a name cannot climb out of the output folder or overwrite another deployment's;
- the manifest is built as data and serialized by PyYAML's safe dumper, so a name cannot add a
  document or a key; its explanations are annotations (`flowc.dev/*`) below a static header.
"""

from __future__ import annotations

import functools
import json
import re
import shlex
from dataclasses import dataclass, field
from importlib import resources
from typing import Mapping, NamedTuple, Optional

from flowc.compiler.diagnostics import escape_control, first_control_character
from flowc.compiler.model.engines import engine_profile
from flowc.compiler.model.memory import CONTEXT_RESERVE, GRAPH_RESERVE, NCCL_RESERVE
from flowc.compiler.plan import DeploymentPlan, InstanceGroup, Plan
from flowc.compiler.units import format_gib

TARGETS = ("vllm", "sglang")
LABELS = {"vllm": "vLLM", "sglang": "SGLang"}
K8S_MANIFEST = "kubernetes.yaml"
NODE_LABEL = "flowc.dev/node"
# Slugs: with the group, role and instance an instance's name stays within a Kubernetes name's
# 63 characters for up to 10^6 deployments, groups and instances.
SLUG_LENGTH, ROLE_SLUG_LENGTH = 30, len("colocated")
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
# An instance over several nodes: one script per node, each naming the address of the instance's
# first node (its rank 0), which flowc does not know: the user sets it, the script refuses to start
# without it. The templates write the variable as a word `parse_script` reads as MASTER_ADDR_WORD.
MASTER_ADDR_ENV = "FLOWC_MASTER_ADDR"
MASTER_ADDR_WORD = f"${MASTER_ADDR_ENV}"
# The flags that start one engine over nodes without Ray, and the port rank 0 listens on for the
# other nodes (+ the instance's slot on its first node):
MULTI_NODE = {
    # vLLM's multiprocessing backend over nodes; 29501 is its default --master-port
    # (ParallelConfig.master_port in vllm/config/parallel.py)
    "vllm": (("--distributed-executor-backend", "--nnodes", "--node-rank", "--master-addr", "--master-port",
              "--headless"), 29501),
    # --dist-init-addr has no default port: 20000 is the one of SGLang's multi-node example
    "sglang": (("--nnodes", "--node-rank", "--dist-init-addr"), 20000),
}
# Kubernetes: a multi-node instance is a LeaderWorkerSet, which gives every pod of a group the
# leader's address and the pod's index (LWS >= 0.6.0), expanded by Kubernetes in `args`.
LWS_LEADER_ADDRESS, LWS_WORKER_INDEX = "$(LWS_LEADER_ADDRESS)", "$(LWS_WORKER_INDEX)"
ROUTER_SCRIPT = "router.sh"
# The router's port: above the engines' (8000 + slot, 30000 + slot) and bootstrap ports (8998 + slot)
# for up to 79 instances on its node.
ROUTER_PORT = 8080


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
    router: Mapping[str, object]  # the version's prefill/decode router: its template and flags, or `missing`

    @property
    def label(self) -> str:
        return f"{LABELS[self.target]} {self.version}"


class Setting(NamedTuple):
    value: object
    why: str  # a comment line: static text and values quoted by shell_quote


# ---------------------------------------------------------------------------------- hostile text

def _code_point(character: str) -> str:
    return f"U+{ord(character):04X}"


def shell_quote(value: object) -> str:
    """The one way a value reaches a launch script, as a word of a command or inside a comment:
    quoted for bash (shlex), so spaces, `$(...)`, backquotes and quotes stay literal text. A
    control character is refused, quoted or not: a newline ends a comment and starts a command.
    `export_plan` refuses every text holding one before it renders (`_control_problems`), so
    one here is a bug in flowc."""
    text = str(value)
    found = first_control_character(text)
    if found:
        raise TemplateError(f"a value with a control character ({_code_point(found)}) reached a launch script "
                            "unchecked")
    return shlex.quote(text)


def _control_problems(plan: Plan, model_paths: Mapping[str, str], plan_name: str) -> list[Problem]:
    """A Problem for each text of the plan or the command line holding a control character. The
    message names where the text is, never the text (it could act on the terminal too)."""
    texts = [("the plan file's name", plan_name, "rename the plan file")]
    texts += [(f"`--model-path {'' if model == '*' else escape_control(model) + '='}PATH`", path,
               "give the checkpoint's path without control characters") for model, path in model_paths.items()]
    for where, text in plan.texts():
        fix = ("rename the spec file and compile it again" if where.startswith("spec_files[") else
               "compile the plan again from its spec (flowc writes no control characters)")
        texts.append((f"the plan's {escape_control(where)}", text, fix))  # a key holds the character too
    problems = []
    for what, text, fix in texts:
        found = first_control_character(text)
        if found:
            problems.append(Problem(f"{what} contains a control character ({_code_point(found)}), which a launch "
                                    "script cannot carry safely", fix))
    return problems


def _slug(text: str, limit: int, empty: str) -> str:
    """`text` as lowercase letters, digits and single dashes, at most `limit` characters, a letter
    or digit at both ends (`empty` when none is left): a file name that cannot be `..` or hold a
    `/`, a Kubernetes name and label value."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower())[:limit].strip("-") or empty


def deployment_slugs(plan: Plan) -> list[str]:
    """A slug per deployment, distinct: one whose slug is taken already (names that differ only
    in what a slug drops, or equal names) gets the first free `-2`, `-3`, ..."""
    taken, slugs = set(), []
    for d in plan.deployments:
        base = _slug(d.name, SLUG_LENGTH, "deployment")
        slug, n = base, 1
        while slug in taken:
            n += 1
            slug = f"{base}-{n}"
        taken.add(slug)
        slugs.append(slug)
    return slugs


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
                      env=frozenset(data["env"]), kv_connectors=tuple(data.get("kv_connectors", ())),
                      router=data["router"])


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

def node_shares(gpus) -> list[tuple[int, list[int]]]:
    """An instance's GPUs in rank order as runs on one node: [(node, GPU indices)]."""
    shares: list[tuple[int, list[int]]] = []
    for ref in gpus:
        if shares and shares[-1][0] == ref.node:
            shares[-1][1].append(ref.index)
        else:
            shares.append((ref.node, [ref.index]))
    return shares


def even_node_shares(shares: list[tuple[int, list[int]]]) -> bool:
    """Whether each node holds one run of the ranks, all runs of one length: what a launcher that
    numbers ranks node by node needs (vLLM's and SGLang's multi-node flags, torchrun)."""
    nodes = [node for node, _ in shares]
    return len(set(nodes)) == len(nodes) and len({len(share) for _, share in shares}) == 1


@dataclass
class _Instance:
    """One engine to launch: an instance of a group, or its share on one node when it spans nodes
    (then one script per node, `node_rank` among the instance's `nodes`)."""

    deployment: DeploymentPlan
    deployment_index: int
    slug: str  # the deployment's, distinct from every other deployment's
    group_index: int
    group: InstanceGroup
    index: int
    node: int
    gpus: list[int]
    slot: int  # its position among the instances on its node: offsets its ports
    nodes: list[int]  # the instance's nodes in rank order: node_rank 0 runs the first
    node_rank: int
    master_slot: int  # the slot of the instance on its first node: offsets the ports every node meets at

    @property
    def multi_node(self) -> bool:
        return len(self.nodes) > 1

    @property
    def role(self) -> str:
        return _slug(self.group.role, ROLE_SLUG_LENGTH, "role")

    @property
    def _suffix(self) -> str:
        return f"g{self.group_index}-{self.role}-{self.index}"

    @property
    def name(self) -> str:
        """The Kubernetes name and `flowc.dev/instance` label: distinct per instance."""
        return f"{self.slug}-{self._suffix}"

    @property
    def path(self) -> str:
        """Its script, relative to the output folder: slugs only, so it stays inside."""
        return f"{self.slug}/{self._suffix}" + (f"-node{self.node_rank}" if self.multi_node else "") + ".sh"

    @property
    def address_env(self) -> str:
        """The variable the router script reads this instance's address from (its first node's)."""
        return "FLOWC_ADDR_" + self._suffix.upper().replace("-", "_")

    @property
    def service(self) -> str:
        """Its Kubernetes Service: a DNS-1035 label (a letter first), within 63 characters."""
        return f"svc-{self.name}"


class _Mapper:
    """Maps the groups of a plan onto one engine version, collecting the Problems."""

    def __init__(self, engine: EngineSpec, model_paths: Mapping[str, str]):
        self.engine = engine
        self.model_paths = model_paths
        self.problems: list[Problem] = []
        self.degraded: dict[tuple[int, int], list[Problem]] = {}

    def problem(self, key: tuple[int, int] | None, message: str, help: str, dropped: str | None = None) -> None:
        problem = Problem(message, help, dropped)
        self.problems.append(problem)
        if key is not None and problem.degradable:
            self.degraded.setdefault(key, []).append(problem)

    def model(self, d: DeploymentPlan) -> Setting | None:
        path = self.model_paths.get(d.model) or self.model_paths.get("*")
        q = shell_quote
        if path and path.startswith("-"):
            self.problem(None, f"the --model-path of model `{d.model}` starts with `-`: the engine would read it "
                         "as a flag", "write a relative path with `./` in front")
            return None
        if path:
            return Setting(path, f"the model: {q(path)} (--model-path), flowc model `{q(d.model)}`")
        repo = hf_repos().get(d.model)
        if repo:
            return Setting(repo, f"the model: Hugging Face repo {q(repo)}, named for flowc model `{q(d.model)}` in "
                                 "the standard library (stdlib/models.flow)")
        self.problem(None, f"model `{d.model}` of deployment `{d.name}` names no Hugging Face repo",
                     f"pass `--model-path {d.model}=PATH` (a checkpoint directory or a Hugging Face repo id)")
        return None

    def group(self, key: tuple[int, int], d: DeploymentPlan, j: int, g: InstanceGroup) -> dict:
        """The template values of group `j` of `d` that all its instances share; `key` is (the
        deployment's position, j), distinct even when two deployments have the same name."""
        e = self.engine
        where = f"group {j} ({g.role}) of deployment `{d.name}`"
        if g.vendor == "cpu":
            self.problem(None, f"{e.label} runs on GPUs: {where} runs on `{g.gpu}`, a CPU device",
                         "run CPU plans with `flowc run`, or compile the spec for NVIDIA or AMD GPUs")
        for i, instance in enumerate(g.instances):
            self._nodes(where, i, instance.gpus)
        if d.engine != e.target:
            planned = engine_profile(d.engine).label
            self.problem(key, f"{where} was planned for {planned}: its predictions come from {planned}'s kernels "
                         f"and overheads, not {e.label}'s", f"write `engine {e.target}` in deployment `{d.name}` and "
                         "compile again", f"the plan's predicted latency and throughput are {planned}'s")
        values = {"memory": self._memory(where, g), **self._weights(key, where, d)}
        if g.memory.offloaded:
            held = ", ".join(f"{name} {format_gib(n)}" for name, n in sorted(g.memory.offloaded.items()))
            self.problem(key, f"{where} offloads to host memory ({held}), which {e.label} cannot run as planned: "
                         "its --cpu-offload-gb streams weights without the plan's overlap",
                         "compile with `forbid offload`", "offload dropped: the instance keeps everything on its "
                         "GPUs, more than the plan's memory map holds (it may not fit)")
        engine_values = self._vllm(key, where, g) if e.target == "vllm" else self._sglang(key, where, g)
        return {**values, **engine_values}

    def _nodes(self, where: str, i: int, gpus) -> None:
        """An instance over several nodes: each node starts an equal, consecutive run of its ranks
        (both engines give a node world size / nnodes local ranks), with flags the version has."""
        e, shares = self.engine, node_shares(gpus)
        if len(shares) == 1:
            return
        nodes = [node for node, _ in shares]
        shown = ", ".join(map(str, nodes))
        flags, _ = MULTI_NODE[e.target]
        if not even_node_shares(shares):
            self.problem(None, f"instance {i} of {where} spans nodes {shown} with its ranks not in equal consecutive "
                         f"runs per node, which {e.label} needs: each node starts the next {len(gpus)} / nodes "
                         "ranks", "compile the plan again with this flowc")
        elif not set(flags) <= e.flags:
            able = [v for v in known_versions(e.target) if set(flags) <= load_engine(e.target, v).flags]
            self.problem(None, f"instance {i} of {where} spans nodes {shown}, and {e.label} starts an engine over "
                         f"nodes only on a Ray cluster (it has no {', '.join(sorted(set(flags) - e.flags))}), which "
                         "flowc does not set up",
                         (f"use --version {' or '.join(able)}, or " if able else "")
                         + "keep instances within a node (limit tp x pp to the GPUs of a node in the spec)")

    def _memory(self, where: str, g: InstanceGroup) -> Setting:
        hundredths, why = MEMORY_FRACTION[self.engine.target](g)
        # a CPU group is refused already; its memory map has no CUDA reserve to derive a fraction from
        if not 0 < hundredths <= 100 and g.vendor != "cpu":
            self.problem(None, f"the memory map of {where} gives a memory fraction of {hundredths / 100:.2f}, "
                         "outside (0, 1]", "compile the plan again with this flowc")
        return Setting(f"{hundredths // 100}.{hundredths % 100:02d}", why)

    def _weights(self, key, where: str, d: DeploymentPlan) -> dict:
        e, q = self.engine, shell_quote
        values = {"quantization": None, "torchao": None}
        if d.weights in ACTIVATION_DTYPE:
            dtype = ACTIVATION_DTYPE[d.weights]
            values["dtype"] = Setting(dtype, f"weights and activations in {q(d.weights)} (the plan's weights "
                                      "dtype)")
        else:
            dtype = QUANTIZED_ACTIVATIONS
            values["dtype"] = Setting(dtype, "activations in bf16 (the memory model's), weights quantized below")
            variable, flag, value = ONLINE_QUANTIZATION[e.target].get(d.weights, (None, None, None))
            if variable and value in e.choices[flag]:
                values[variable] = Setting(value, f"{q(d.weights)} weights (the plan's): the engine quantizes a "
                                           "16-bit checkpoint when it loads, and reads a checkpoint already in "
                                           f"{q(d.weights)} as it is")
            else:
                self.problem(key, f"{e.label} has no flag that quantizes weights to {d.weights}, which {where} has",
                             f"compile with `weights fp8` or a 16-bit dtype, or pass --model-path to a {d.weights} "
                             "checkpoint with --allow-degrade (the engine reads its quantization_config)",
                             f"{q(d.weights)} weights not mapped: the engine loads the checkpoint in its own dtype, "
                             "so its weights and KV cache differ from the plan's memory map")
        values["kv"] = self._kv(key, where, d.kv, dtype)
        return values

    def _kv(self, key, where: str, kv: str, dtype: str) -> Setting:
        choices, q = self.engine.choices["--kv-cache-dtype"], shell_quote
        for name in KV_NAMES.get(kv, ()):
            if name in choices:
                return Setting(name, f"KV cache in {q(kv)} (the plan's kv dtype)")
        if ACTIVATION_DTYPE.get(kv) == dtype:
            return Setting("auto", f"KV cache in {q(kv)} (the plan's kv dtype): `auto` keeps the model dtype, "
                                   f"{dtype}")
        self.problem(key, f"{self.engine.label} cannot keep the KV cache in {kv}, as {where} does: "
                     f"--kv-cache-dtype accepts {', '.join(choices)}",
                     "compile with `kv fp8` or the model's dtype, or pick another --target or --version",
                     f"KV cache in the model dtype (`auto`) instead of {q(kv)}: its size differs from the plan's "
                     "memory map")
        return Setting("auto", f"KV cache in the model dtype: DEGRADED from the plan's {q(kv)}")

    def _vllm(self, key, where: str, g: InstanceGroup) -> dict:
        e, s = self.engine, g.scheduler
        values = {"expert_parallel": None, "chunk_cap": None, "kv_transfer": None, "disaggregated": False}
        sizes = e.choices.get("--block-size")
        if sizes is not None and str(s.block_size) not in sizes:
            self.problem(key, f"{e.label} has no KV-cache block of {s.block_size} tokens, which {where} has: "
                         f"--block-size accepts {', '.join(sizes)}",
                         f"compile with `block_size in [{', '.join(t + ' tok' for t in sizes if t != '1')}]`, "
                         "or use --target sglang (any --page-size)")
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
        values["kv_transfer"] = Setting(config, f"disaggregated {shell_quote(g.role)}: {VLLM_KV_ROLES[g.role]} of KV "
                                        f"caches, sent between instances by {VLLM_CONNECTOR}")
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
    """Every instance of the plan, in plan order, one per node it spans; `slot` counts the
    instances on each node."""
    found, slots = [], {}
    for k, (d, slug) in enumerate(zip(plan.deployments, deployment_slugs(plan))):
        for j, g in enumerate(d.groups):
            for i, instance in enumerate(g.instances):
                shares = node_shares(instance.gpus)
                nodes = [node for node, _ in shares]
                master_slot = slots.get(nodes[0], 0)
                for rank, (node, gpus) in enumerate(shares):
                    found.append(_Instance(d, k, slug, j, g, i, node, gpus, slots.get(node, 0), nodes, rank,
                                           master_slot))
                    slots[node] = slots.get(node, 0) + 1
    return found


# ---------------------------------------------------------------------------------- rendering

@functools.cache
def _jinja():
    import jinja2  # only `flowc export` needs it

    directory = str(_engines_dir().joinpath("templates"))
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(directory), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)
    env.filters["q"] = shell_quote
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
    instance on a node, and an address the other nodes reach when the deployment spans nodes.
    A `value` of None is the address the user sets in FLOWC_NODE_ADDRESS; a `k8s` of None the pod's IP."""
    node = shell_quote(instance.node)
    host = Setting("localhost", f"NIXL handshake address: every instance of this deployment is on node {node}")
    if len(nodes) > 1:
        host = Setting(None, f"NIXL handshake address: this deployment spans nodes, so node {node}'s address "
                       "(FLOWC_NODE_ADDRESS), which the others reach")
    port = NIXL_SIDE_CHANNEL_PORT + instance.slot
    port_why = f"NIXL handshake port: {NIXL_SIDE_CHANNEL_PORT} + the instance's slot {instance.slot} on node {node}"
    # In Kubernetes every pod has an address of its own.
    return [{"name": "VLLM_NIXL_SIDE_CHANNEL_HOST", "value": host.value, "why": host.why, "k8s": None,
             "k8s_why": "NIXL handshake address: the pod's IP, which the other pods reach"},
            {"name": "VLLM_NIXL_SIDE_CHANNEL_PORT", "value": str(port), "why": port_why, "k8s": str(port),
             "k8s_why": port_why}]


def _describe(plan: Plan, plan_name: str, instance: _Instance) -> list[str]:
    """What a script or manifest object launches, of which plan: comment lines, values quoted."""
    d, g, q = instance.deployment, instance.group, shell_quote
    spec_files = ", ".join(map(q, plan.spec_files))
    ep = f", ep {q(g.ep)}" if g.ep > 1 else ""
    lines = [f"plan: {q(plan_name)} (flowc {q(plan.flowc_version)}, plan format {q(plan.format_version)}, "
             f"from {spec_files})",
             f"deployment `{q(d.name)}`: model {q(d.model)}, weights {q(d.weights)}, kv {q(d.kv)}, {q(d.mode)}",
             f"group {instance.group_index}: {q(g.role)} on {q(g.gpu)}, tp {q(g.tp)} x pp {q(g.pp)}{ep}",
             f"instance {instance.index} of {g.replicas}: node {q(instance.node)}, "
             f"GPUs {q(','.join(map(str, instance.gpus)))}"]
    if instance.multi_node:
        lines.append(f"the instance spans nodes {q(','.join(map(str, instance.nodes)))}: this is node rank "
                     f"{instance.node_rank} of {len(instance.nodes)}, its next {len(instance.gpus)} ranks")
    return lines


def _multi_node(target: str, instance: _Instance) -> dict | None:
    """The template values of an instance's share on one node, when it spans nodes."""
    if not instance.multi_node:
        return None
    _, base_port = MULTI_NODE[target]
    return {"nnodes": len(instance.nodes), "node_rank": instance.node_rank, "master_node": instance.nodes[0],
            "base_port": base_port, "master_slot": instance.master_slot,
            "master_port": base_port + instance.master_slot, "env": MASTER_ADDR_ENV, "word": MASTER_ADDR_WORD}


# ---------------------------------------------------------------------------------- router

class _Rendered(NamedTuple):
    """An instance's share on one node as rendered, for the manifest and the router."""

    instance: _Instance
    launch: Launch
    env: list[dict]
    port: int
    describe: list[str]
    degraded: list[str]
    bootstrap_port: int | None  # where decode instances fetch a prefill instance's KV (SGLang)


URL_WORD = re.compile(r"[A-Za-z0-9_:/.{}$-]+")


def _router_args(shares: list[_Rendered], host) -> list[tuple[str, list[str]]]:
    """The router's arguments, each with its comment: every prefill and decode instance of a
    deployment, at `host(instance)` (a variable in the script, a Service in Kubernetes)."""
    args = [("prefill/decode disaggregation: each request goes to a prefill instance, then to a decode instance",
             ["--pd-disaggregation"])]
    for r in shares:
        i = r.instance
        url = f"http://{host(i)}:{r.port}"
        if i.group.role == "prefill":
            args.append((f"prefill instance {i.index} of group {i.group_index}: its address and bootstrap port",
                         ["--prefill", url, str(r.bootstrap_port)]))
        else:
            args.append((f"decode instance {i.index} of group {i.group_index}", ["--decode", url]))
    args.append(("listen on every interface of the router's node", ["--host", "0.0.0.0"]))
    args.append((f"{ROUTER_PORT}: above the engines' and bootstrap ports of up to 79 instances on its node",
                 ["--port", str(ROUTER_PORT)]))
    return args


def _router_script(engine: EngineSpec, d: DeploymentPlan, shares: list[_Rendered]) -> str:
    """`<deployment>/router.sh`: the engine's own router over every prefill and decode instance,
    whose addresses come from variables named for their scripts; or, for a version without a
    supported router, a script that says so and exits 1."""
    entries = [{"env": r.instance.address_env, "script": r.instance.path.split("/", 1)[1], "node": r.instance.node}
               for r in shares]
    args = []
    for comment, words in _router_args(shares, lambda i: "${" + i.address_env + "}"):
        for word in words:  # static text, numbers and slugs: nothing to quote but the variable to expand
            if not URL_WORD.fullmatch(word):
                raise TemplateError(f"router argument `{word}` is not a plain word")
        args.append((comment, " ".join(f'"{w}"' if "$" in w else w for w in words)))
    template = _jinja().get_template("router.sh.j2")
    return template.render(engine=engine, router=engine.router, name=shell_quote(d.name), entries=entries,
                           args=args)


def check_router(engine: EngineSpec, script: str) -> Launch:
    """The router script's flags against the version's router list; TemplateError if one is not there."""
    launch = parse_script(script)
    flags = set(engine.router.get("flags", ()))
    for _, words in launch.args:
        for token in words:
            if token.startswith("--") and token not in flags:
                raise TemplateError(f"router.sh.j2 emits `{token}`, which {engine.label}'s router does not have "
                                    f"(engines/{engine.target}-{engine.version}.json)")
    return launch


# ---------------------------------------------------------------------------------- kubernetes

K8S_HEADER = f"""\
# flowc export: a Kubernetes manifest, one Deployment (one replica) per engine instance of a plan,
# and a LeaderWorkerSet (leaderworkerset.x-k8s.io, installed apart) per instance that spans nodes:
# its leader runs node rank 0 and serves requests, each worker a further node, reaching the leader
# at LWS_LEADER_ADDRESS with its rank from LWS_WORKER_INDEX (LWS 0.6 or later).
# Each one's annotations say what it launches: flowc.dev/plan (the plan, deployment, group and
# instance), flowc.dev/engine, flowc.dev/args (every argument with the reason for its value), and
# flowc.dev/env and flowc.dev/degraded when there are any.
# Nodes: a pod runs on the node labelled {NODE_LABEL}="<node index>", the plan's node index
# (nodes counted in the cluster's declaration order, `node x 2` being nodes 0 and 1). Label the
# nodes once, e.g. `kubectl label node NAME {NODE_LABEL}=0`.
# GPUs: the device plugin picks which GPUs of that node a pod gets (the limit counts them), so the
# plan's GPU indices are not pinned here; the launch scripts pin them with CUDA_VISIBLE_DEVICES.
# Engines with several GPUs exchange tensors through shared memory: the dshm volume at /dev/shm.
# Disaggregated instances (flowc.dev/role prefill and decode) need a prefill/decode router that
# sends each request to a prefill instance, then to a decode instance: where the engine has one,
# a router Deployment (flowc.dev/role router) reaches each instance through a Service of its own.
"""


def _words(launch: Launch) -> list[str]:
    return [word for _, words in launch.args for word in words]


def _args_note(launch: Launch) -> str:
    """The arguments as the script's args block shows them: each line below its comments."""
    return "\n".join(line for comments, words in launch.args
                     for line in (*(f"# {c}" for c in comments), shlex.join(words)))


def _k8s_container(engine: EngineSpec, launch: Launch, args: list[str], env: list[dict], port: int, gpus: int,
                   vendor: str, serves: bool) -> dict:
    """An engine's container running `launch.command` with `args`; only a container that `serves`
    requests has a port and a readiness probe."""
    container = {"name": "engine", "image": engine.image, "command": launch.command, "args": args}
    if env:
        container["env"] = [{"name": e["name"], "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
                            if e["k8s"] is None else {"name": e["name"], "value": e["k8s"]} for e in env]
    if serves:
        container.update({"ports": [{"containerPort": port}],
                          "readinessProbe": {"httpGet": {"path": "/health", "port": port}}})
    resource = "amd.com/gpu" if vendor == "amd" else "nvidia.com/gpu"
    container.update({"resources": {"limits": {resource: gpus}},
                      "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]})
    return container


def _k8s_pod(labels: dict, placement: dict, container: dict) -> dict:
    return {"metadata": {"labels": dict(labels)},  # a copy: no YAML alias
            "spec": {**placement, "containers": [container],
                     "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]}}


def _k8s_metadata(engine: EngineSpec, r: _Rendered) -> tuple[dict, dict]:
    """The labels and annotations of an instance's object: data, every text of the plan a value in it."""
    instance = r.instance
    labels = {"flowc.dev/deployment": instance.slug, "flowc.dev/group": str(instance.group_index),
              "flowc.dev/role": instance.role, "flowc.dev/instance": instance.name}
    annotations = {"flowc.dev/plan": "\n".join(r.describe),
                   "flowc.dev/engine": f"{engine.label}, flags of {engine.source}",
                   "flowc.dev/args": _args_note(r.launch)}
    if r.env:
        annotations["flowc.dev/env"] = "\n".join(f"{e['name']}: {e['k8s_why']}" for e in r.env)
    if r.degraded:
        annotations["flowc.dev/degraded"] = "\n".join(r.degraded)
    return labels, annotations


def _k8s_deployment(engine: EngineSpec, r: _Rendered) -> dict:
    """One instance on one node as a Deployment of one replica."""
    instance = r.instance
    labels, annotations = _k8s_metadata(engine, r)
    container = _k8s_container(engine, r.launch, _words(r.launch), r.env, r.port, len(instance.gpus),
                               instance.group.vendor, True)
    pod = _k8s_pod(labels, {"nodeSelector": {NODE_LABEL: str(instance.node)}}, container)
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": instance.name, "labels": labels, "annotations": annotations},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"flowc.dev/instance": instance.name}},
                     "template": pod}}


def _k8s_leader_worker_set(engine: EngineSpec, shares: list[_Rendered]) -> dict:
    """An instance over several nodes as a LeaderWorkerSet of one group: the leader runs node
    rank 0's command, the workers (one template for all) the others', each its rank from LWS."""
    leader, workers = shares[0], shares[1:]
    labels, annotations = _k8s_metadata(engine, leader)
    # the scripts' arguments: the containers' have LWS's variables in the place of theirs
    annotations["flowc.dev/worker-args"] = _args_note(workers[0].launch)

    # the script's variable for rank 0's address becomes the leader's, which Kubernetes expands
    leader_args = [word.replace(MASTER_ADDR_WORD, LWS_LEADER_ADDRESS) for word in _words(leader.launch)]
    worker_args = [word.replace(MASTER_ADDR_WORD, LWS_LEADER_ADDRESS) for word in _words(workers[0].launch)]
    worker_args[worker_args.index("--node-rank") + 1] = LWS_WORKER_INDEX  # 1, 2, ...: the workers' ranks

    g = leader.instance.group
    leader_pod = _k8s_pod(labels, {"nodeSelector": {NODE_LABEL: str(leader.instance.node)}},
                          _k8s_container(engine, leader.launch, leader_args, leader.env, leader.port,
                                         len(leader.instance.gpus), g.vendor, True))
    nodes = [str(r.instance.node) for r in workers]
    # one template for every worker: pinned to its node, or to the instance's other nodes
    terms = [{"matchExpressions": [{"key": NODE_LABEL, "operator": "In", "values": nodes}]}]
    apart = [{"labelSelector": {"matchLabels": {"flowc.dev/instance": leader.instance.name}},
              "topologyKey": "kubernetes.io/hostname"}]  # one pod of the instance per node
    placement = ({"nodeSelector": {NODE_LABEL: nodes[0]}} if len(nodes) == 1 else
                 {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution":
                                                {"nodeSelectorTerms": terms}},
                               "podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": apart}}})
    worker_pod = _k8s_pod(labels, placement,
                          _k8s_container(engine, workers[0].launch, worker_args, workers[0].env, workers[0].port,
                                         len(workers[0].instance.gpus), g.vendor, False))
    return {"apiVersion": "leaderworkerset.x-k8s.io/v1", "kind": "LeaderWorkerSet",
            "metadata": {"name": leader.instance.name, "labels": labels, "annotations": annotations},
            "spec": {"replicas": 1, "leaderWorkerTemplate": {"size": len(shares), "leaderTemplate": leader_pod,
                                                             "workerTemplate": worker_pod}}}


def _k8s_service(r: _Rendered) -> dict:
    """An instance's Service: the router reaches it by DNS name (its leader, when it spans nodes)."""
    i = r.instance
    selector = {"flowc.dev/instance": i.name}
    if i.multi_node:
        selector["leaderworkerset.sigs.k8s.io/worker-index"] = "0"
    ports = [{"name": "http", "port": r.port, "targetPort": r.port}]
    if r.bootstrap_port is not None:
        ports.append({"name": "bootstrap", "port": r.bootstrap_port, "targetPort": r.bootstrap_port})
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": i.service, "labels": {"flowc.dev/deployment": i.slug,
                                                       "flowc.dev/instance": i.name}},
            "spec": {"selector": selector, "ports": ports}}


def _k8s_router(engine: EngineSpec, shares: list[_Rendered]) -> dict:
    """The router of a deployment as a Deployment, every instance at its Service's DNS name."""
    slug = shares[0].instance.slug
    name = f"{slug}-router"
    labels = {"flowc.dev/deployment": slug, "flowc.dev/role": "router"}
    args = _router_args(shares, lambda i: i.service)
    annotations = {"flowc.dev/engine": f"{engine.label}'s router, flags of {engine.router['source']}",
                   "flowc.dev/args": "\n".join(f"# {c}\n{shlex.join(words)}" for c, words in args)}
    container = {"name": "router", "image": engine.image, "command": list(engine.router["command"]),
                 "args": [word for _, words in args for word in words],
                 "ports": [{"containerPort": ROUTER_PORT}]}
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "labels": labels, "annotations": annotations},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"flowc.dev/deployment": slug,
                                                                 "flowc.dev/role": "router"}},
                     "template": {"metadata": {"labels": dict(labels)}, "spec": {"containers": [container]}}}}


@functools.cache
def _yaml_dumper():
    import yaml  # only `flowc export --k8s` needs it

    class Dumper(yaml.SafeDumper):
        """PyYAML's safe dumper, writing a text of several lines as a literal block (the
        annotations), which it quotes instead when a block cannot hold it exactly."""

    Dumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
        "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))
    return Dumper


def yaml_documents(documents: list[dict]) -> str:
    """Kubernetes documents as YAML by PyYAML's safe dumper (flowc export and flowc launch)."""
    import yaml

    # no folding: a long argument stays on one line
    return yaml.dump_all(documents, Dumper=_yaml_dumper(), sort_keys=False, explicit_start=True, width=float("inf"))


def _k8s_manifest(documents: list[dict]) -> str:
    return K8S_HEADER + yaml_documents(documents)


# ---------------------------------------------------------------------------------- export

def export_plan(plan: Plan, *, target: str, version: str | None = None, k8s: bool = False,
                model_paths: Mapping[str, str] | None = None, allow_degrade: bool = False,
                plan_name: str = "plan.json") -> Export:
    """The launch scripts of every instance of `plan` (and with `k8s` a manifest). Raises
    UnknownVersion, or ExportError with every problem that is refused."""
    engine = load_engine(target, version)
    model_paths = model_paths or {}
    unsafe = _control_problems(plan, model_paths, plan_name)
    if unsafe:  # before any other message quotes those texts
        raise ExportError(unsafe)
    mapper = _Mapper(engine, model_paths)
    groups = {(k, j): mapper.group((k, j), d, j, g) for k, d in enumerate(plan.deployments)
              for j, g in enumerate(d.groups)}
    models = [mapper.model(d) for d in plan.deployments]
    refused = [p for p in mapper.problems if not (allow_degrade and p.degradable)]
    if refused:
        raise ExportError(refused)
    warnings = [f"{p.message}; DEGRADED (--allow-degrade): {p.dropped}" for ps in mapper.degraded.values() for p in ps]

    instances = _instances(plan)
    nodes_of: dict[int, set[int]] = {}
    for instance in instances:
        nodes_of.setdefault(instance.deployment_index, set()).update(instance.nodes)
    template = _jinja().get_template(engine.template)
    files, rendered = [], []
    for instance in instances:
        g, key = instance.group, (instance.deployment_index, instance.group_index)
        disaggregated = groups[key]["disaggregated"]
        env = _nixl_env(instance, nodes_of[instance.deployment_index]) if target == "vllm" and disaggregated else []
        describe = _describe(plan, plan_name, instance)
        degraded = [p.dropped for p in mapper.degraded.get(key, [])]
        port = engine.default_port + instance.slot
        bootstrap_port = SGLANG_BOOTSTRAP_PORT + instance.slot
        script = template.render(**groups[key], engine=engine, describe=describe, degraded=degraded,
                                 d=instance.deployment, g=g, i=instance, s=g.scheduler,
                                 model=models[instance.deployment_index], env=env,
                                 cuda_visible_devices=",".join(map(str, instance.gpus)), port=port,
                                 bootstrap_port=bootstrap_port, multi_node=_multi_node(target, instance))
        launch = check_script(engine, script)
        files.append((instance.path, script))
        prefill_bootstrap = bootstrap_port if target == "sglang" and g.role == "prefill" else None
        rendered.append(_Rendered(instance, launch, env, port, describe, degraded, prefill_bootstrap))

    # per instance its shares in node-rank order; per disaggregated deployment its instances
    by_instance: dict[tuple[int, int, int], list[_Rendered]] = {}
    for r in rendered:
        i = r.instance
        by_instance.setdefault((i.deployment_index, i.group_index, i.index), []).append(r)
    routed: dict[int, list[_Rendered]] = {}
    for (k, j, _), shares in by_instance.items():
        if groups[(k, j)]["disaggregated"]:
            routed.setdefault(k, []).append(shares[0])  # node rank 0 serves the instance's requests
    documents = []
    for k, shares in routed.items():
        script = _router_script(engine, plan.deployments[k], shares)
        check_router(engine, script)
        files.append((f"{shares[0].instance.slug}/{ROUTER_SCRIPT}", script))
    if k8s:
        for shares in by_instance.values():
            documents.append(_k8s_deployment(engine, shares[0]) if len(shares) == 1 else
                             _k8s_leader_worker_set(engine, shares))
        if "command" in engine.router:
            for shares in routed.values():
                documents += [_k8s_service(r) for r in shares]
                documents.append(_k8s_router(engine, shares))
        files.append((K8S_MANIFEST, _k8s_manifest(documents)))
    return Export(files, warnings)
