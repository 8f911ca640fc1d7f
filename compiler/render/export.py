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


def _deployment_slugs(plan: Plan) -> list[str]:
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
    deployment_index: int
    slug: str  # the deployment's, distinct from every other deployment's
    group_index: int
    group: InstanceGroup
    index: int
    node: int
    gpus: list[int]
    slot: int  # its position among the instances on its node: offsets its ports

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
        return f"{self.slug}/{self._suffix}.sh"


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
            nodes = sorted({ref.node for ref in instance.gpus})
            if len(nodes) > 1:
                self.problem(None, f"instance {i} of {where} spans nodes {', '.join(map(str, nodes))}: a launch "
                             "script starts an engine on one node",
                             "keep instances within a node (limit tp x pp to the GPUs of a node in the spec)")
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
    """Every instance of the plan, in plan order; `slot` counts the instances on each node."""
    found, slots = [], {}
    for k, (d, slug) in enumerate(zip(plan.deployments, _deployment_slugs(plan))):
        for j, g in enumerate(d.groups):
            for i, instance in enumerate(g.instances):
                node = instance.gpus[0].node
                found.append(_Instance(d, k, slug, j, g, i, node, [ref.index for ref in instance.gpus],
                                       slots.get(node, 0)))
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
    return [f"plan: {q(plan_name)} (flowc {q(plan.flowc_version)}, plan format {q(plan.format_version)}, "
            f"from {spec_files})",
            f"deployment `{q(d.name)}`: model {q(d.model)}, weights {q(d.weights)}, kv {q(d.kv)}, {q(d.mode)}",
            f"group {instance.group_index}: {q(g.role)} on {q(g.gpu)}, tp {q(g.tp)} x pp {q(g.pp)}{ep}",
            f"instance {instance.index} of {g.replicas}: node {q(instance.node)}, "
            f"GPUs {q(','.join(map(str, instance.gpus)))}"]


# ---------------------------------------------------------------------------------- kubernetes

K8S_HEADER = f"""\
# flowc export: a Kubernetes manifest, one Deployment (one replica) per engine instance of a plan.
# Each one's annotations say what it launches: flowc.dev/plan (the plan, deployment, group and
# instance), flowc.dev/engine, flowc.dev/args (every argument with the reason for its value), and
# flowc.dev/env and flowc.dev/degraded when there are any.
# Nodes: a pod runs on the node labelled {NODE_LABEL}="<node index>", the plan's node index
# (nodes counted in the cluster's declaration order, `node x 2` being nodes 0 and 1). Label the
# nodes once, e.g. `kubectl label node NAME {NODE_LABEL}=0`.
# GPUs: the device plugin picks which GPUs of that node a pod gets (the limit counts them), so the
# plan's GPU indices are not pinned here; the launch scripts pin them with CUDA_VISIBLE_DEVICES.
# Engines with several GPUs exchange tensors through shared memory: the dshm volume at /dev/shm.
# Disaggregated instances (flowc.dev/role prefill and decode) need a prefill/decode router, not
# generated by flowc, that sends each request to a prefill instance, then to a decode instance.
"""


def _k8s_deployment(engine: EngineSpec, instance: _Instance, launch: Launch, env: list[dict], port: int,
                    describe: list[str], degraded: list[str]) -> dict:
    """One instance as a Deployment of one replica: data, every text of the plan a value in it."""
    g = instance.group
    labels = {"flowc.dev/deployment": instance.slug, "flowc.dev/group": str(instance.group_index),
              "flowc.dev/role": instance.role, "flowc.dev/instance": instance.name}
    # the arguments as the script's args block shows them: each line below its comments
    args = [line for comments, words in launch.args for line in (*(f"# {c}" for c in comments), shlex.join(words))]
    annotations = {"flowc.dev/plan": "\n".join(describe),
                   "flowc.dev/engine": f"{engine.label}, flags of {engine.source}", "flowc.dev/args": "\n".join(args)}
    if env:
        annotations["flowc.dev/env"] = "\n".join(f"{e['name']}: {e['k8s_why']}" for e in env)
    if degraded:
        annotations["flowc.dev/degraded"] = "\n".join(degraded)
    container = {"name": "engine", "image": engine.image, "command": launch.command,
                 "args": [word for _, words in launch.args for word in words]}
    if env:
        container["env"] = [{"name": e["name"], "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
                            if e["k8s"] is None else {"name": e["name"], "value": e["k8s"]} for e in env]
    resource = "amd.com/gpu" if g.vendor == "amd" else "nvidia.com/gpu"
    container.update({"ports": [{"containerPort": port}],
                      "readinessProbe": {"httpGet": {"path": "/health", "port": port}},
                      "resources": {"limits": {resource: g.gpus_per_instance}},
                      "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]})
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": instance.name, "labels": labels, "annotations": annotations},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"flowc.dev/instance": instance.name}},
                     "template": {"metadata": {"labels": dict(labels)},  # a copy: no YAML alias
                                  "spec": {"nodeSelector": {NODE_LABEL: str(instance.node)},
                                           "containers": [container],
                                           "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]}}}}


@functools.cache
def _yaml_dumper():
    import yaml  # only `flowc export --k8s` needs it

    class Dumper(yaml.SafeDumper):
        """PyYAML's safe dumper, writing a text of several lines as a literal block (the
        annotations), which it quotes instead when a block cannot hold it exactly."""

    Dumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
        "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))
    return Dumper


def _k8s_manifest(documents: list[dict]) -> str:
    import yaml

    # no folding: a long argument stays on one line
    return K8S_HEADER + yaml.dump_all(documents, Dumper=_yaml_dumper(), sort_keys=False, explicit_start=True,
                                      width=float("inf"))


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
        nodes_of.setdefault(instance.deployment_index, set()).add(instance.node)
    template = _jinja().get_template(engine.template)
    files, documents = [], []
    for instance in instances:
        g, key = instance.group, (instance.deployment_index, instance.group_index)
        disaggregated = groups[key]["disaggregated"]
        env = _nixl_env(instance, nodes_of[instance.deployment_index]) if target == "vllm" and disaggregated else []
        describe = _describe(plan, plan_name, instance)
        degraded = [p.dropped for p in mapper.degraded.get(key, [])]
        port = engine.default_port + instance.slot
        script = template.render(**groups[key], engine=engine, describe=describe, degraded=degraded,
                                 d=instance.deployment, g=g, i=instance, s=g.scheduler,
                                 model=models[instance.deployment_index], env=env,
                                 cuda_visible_devices=",".join(map(str, instance.gpus)), port=port,
                                 bootstrap_port=SGLANG_BOOTSTRAP_PORT + instance.slot)
        launch = check_script(engine, script)
        files.append((instance.path, script))
        if k8s:
            documents.append(_k8s_deployment(engine, instance, launch, env, port, describe, degraded))
    if k8s:
        files.append((K8S_MANIFEST, _k8s_manifest(documents)))
    return Export(files, warnings)
