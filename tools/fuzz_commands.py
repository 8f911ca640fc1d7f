"""Fuzz flowc's commands with the inputs a user could get wrong; the oracle: exit 0, 1 or 2,
never 3 (an internal error) and never an exception escaping `flowc.cli.main`.

    python tools/fuzz_commands.py --compiles 500 --files 300 --seed 1

Two parts, each case run in process in a folder of its own:

* compiles: a valid spec (examples/*.flow and the small specs below) with one to three of its
  numeric literals replaced by 0, a negative, a huge (1e12, 1e400), a fractional (0.5, 2.7)
  or another value, compiled by `flowc compile --time-limit T`;
* files: a plan compiled from examples/tiny-cpu.flow, mutated (truncated, not JSON, not
  UTF-8, fields deleted, added or given the wrong type, numbers made huge, negative or NaN)
  and given to `flowc verify`, `viz` and `export` (and a few `run`s); the plan's spec deleted
  or broken; prompts files, trace CSVs and checkpoints (`run --weights`) broken the same ways.

Each case runs in a fork of the fuzzer (flowc already imported: no new interpreter; a `run`
case, which starts the engine, in a fresh interpreter, since a fork of a process whose torch
thread pools are running can deadlock), killed
when it runs longer than --timeout or grows beyond --max-rss-gib (reported as `slow`, not as a
failure). Prints the inputs tried per kind, the histogram of exit codes, every failure with
its command and the folder that reproduces it (kept under --keep), cases per second and the
peak RSS (the fuzzer's or its largest case's). Exit status: 1 when a case failed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
OK_CODES = (0, 1, 2)

# ---------------------------------------------------------------------------------- specs

# Small specs that compile in about a second: custom model geometry, custom GPUs, every
# distribution, disaggregation, offload, MoE, prices, replicas, traces.
TOY_MODEL_SPEC = """\
use std.cpu_local
use std.links

model toy {
  architecture llama
  layers 4
  hidden 128
  heads 8
  kv_heads 4
  head_dim 16
  ffn 256
  vocab 512
  max_context 1024 tok
  weights fp32
  kv fp32
}

cluster box {
  node x 2 {
    gpu cpu-local x 2
    host_memory 8 GiB
  }
  network eth-100g x 1
}

workload w {
  arrival gamma 3 req/s cv 2
  prompt lognormal(median 64 tok, sigma 0.5) max 256 tok
  output normal(mean 32 tok, std 8 tok) min 1 tok max 128 tok
  requests 200 req
}

slo s {
  ttft p90 <= 3 s
  tpot p99 <= 400 ms
  attainment >= 80 %
}

deploy d {
  model toy
  on box
  serve w under s
  tp in [1, 2]
  max_batched_tokens in [256 tok, 512 tok]
  max_seqs in [16]
  replicas in [1, 2]
  max_gpus 4
  allow disaggregation
}
"""

TOY_MOE_SPEC = """\
use std.links

gpu toy-gpu {
  vendor nvidia
  memory 2 GiB
  memory_bandwidth 200 GB/s
  flops bf16 20 TFLOP/s
  flops fp8 40 TFLOP/s
  interconnect nvlink4
  host_link pcie5
  overhead step 1 ms
}

model toy-moe {
  architecture mixtral
  layers 4
  hidden 256
  heads 8
  kv_heads 2
  ffn 512
  vocab 1024
  max_context 4096 tok
  moe {
    experts 8
    top_k 2
    expert_ffn 256
  }
}

cluster pod {
  node x 1 {
    gpu toy-gpu x 4
    link_domain 2
    host_memory 16 GiB
    price 4 usd/h
  }
}

workload w {
  arrival constant 5 req/s
  prompt uniform(32 tok, 512 tok)
  output 64 tok
}

slo s {
  ttft p90 <= 1 s
  tpot p90 <= 100 ms
}

deploy d {
  model toy-moe { weights fp8 }
  on pod
  serve w under s
  objective min cost
  ep in [1, 2]
  allow offload
}
"""

TRACE_SPEC = """\
use std.cpu_local
use std.models

cluster laptop {
  node x 1 {
    gpu cpu-local x 1
  }
}

workload replayed {
  arrival trace "t.csv"
  prompt trace "t.csv" max 256 tok
  output trace "t.csv" max 64 tok
}

slo relaxed {
  ttft p90 <= 2 s
  tpot p90 <= 200 ms
}

deploy tiny {
  model tiny-llama { weights fp32; kv fp32 }
  on laptop
  serve replayed under relaxed
  max_batched_tokens in [512 tok]
  max_seqs in [32]
}
"""

TRACE_CSV = "arrival_time,prompt_tokens,output_tokens\n" + "".join(
    f"{0.25 * i:.2f},{16 + 37 * i % 200},{4 + 11 * i % 50}\n" for i in range(40))


@dataclass(frozen=True)
class Seed:
    """A valid spec to mutate, the files it reads, and how often to draw it."""

    name: str
    text: str
    files: dict[str, bytes]
    weight: float


def seeds(include_large: bool = True) -> list[Seed]:
    """The specs to mutate: the small ones, and with `include_large` the other examples (slower)."""
    trace = {"t.csv": TRACE_CSV.encode()}
    azure = {"traces/azure_code_sample.csv": (EXAMPLES / "traces" / "azure_code_sample.csv").read_bytes()}
    small = [Seed("tiny-cpu.flow", (EXAMPLES / "tiny-cpu.flow").read_text(encoding="utf-8"), {}, 4),
             Seed("toy-model.flow", TOY_MODEL_SPEC, {}, 3), Seed("toy-moe.flow", TOY_MOE_SPEC, {}, 3),
             Seed("trace.flow", TRACE_SPEC, trace, 2)]
    large = [Seed(path.name, path.read_text(encoding="utf-8"), azure if "code-assistant" in path.name else {}, 0.25)
             for path in sorted(EXAMPLES.glob("*.flow")) if path.name != "tiny-cpu.flow"]
    return small + (large if include_large else [])


# ---------------------------------------------------------------------------------- cases


@dataclass
class Case:
    kind: str                 # what is fuzzed: compile, plan, spec, prompts, trace, weights
    what: str                 # the mutation, in words
    argv: list[str]           # the flowc command, run in the case's folder
    files: dict[str, bytes]   # written into the folder first
    links: dict[str, Path] = field(default_factory=dict)  # folder name -> shared directory


@dataclass
class Outcome:
    case: Case
    code: Optional[int]
    error: str = ""           # an exception that escaped main
    slow: str = ""            # why the case was stopped (too long, too much memory)
    stderr: str = ""
    wall_s: float = 0.0

    @property
    def failed(self) -> bool:
        return not self.slow and self.code not in OK_CODES


# Literals a user could type where a number belongs. There is no unary minus: `-1` is a
# syntax error, which must be reported as one.
REPLACEMENTS = ("0", "-1", "1e12", "1e400", "0.5", "2.7", "1", "3", "65536", "1e-9", "123456789012345678901234567890")
NUMBER = re.compile(r"(?<![\w.\-])\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?![\w.])")
STRING = re.compile(r'"[^"\n]*"')


def numeric_literals(text: str) -> list[tuple[int, int]]:
    """(start, end) of each number in `text` outside comments, strings and names."""
    spans, offset = [], 0
    for line in text.splitlines(keepends=True):
        code = line.split("#", 1)[0]
        strings = [m.span() for m in STRING.finditer(code)]
        for m in NUMBER.finditer(code):
            if not any(a <= m.start() < b for a, b in strings):
                spans.append((offset + m.start(), offset + m.end()))
        offset += len(line)
    return spans


def mutate_numbers(text: str, rng: random.Random) -> tuple[str, str]:
    """`text` with one to three numeric literals replaced, and what changed."""
    spans = numeric_literals(text)
    chosen = sorted(rng.sample(spans, min(len(spans), rng.randint(1, 3))), reverse=True)
    changes = []
    for start, end in chosen:
        new = rng.choice(REPLACEMENTS)
        line = text.count("\n", 0, start) + 1
        changes.append(f"line {line}: {text[start:end]} -> {new}")
        text = text[:start] + new + text[end:]
    return text, "; ".join(reversed(changes))


def compile_case(rng: random.Random, pool: list[Seed], time_limit: float) -> Case:
    seed = rng.choices(pool, weights=[s.weight for s in pool])[0]
    text, what = mutate_numbers(seed.text, rng)
    return Case("compile", f"{seed.name}: {what}", ["compile", "--json", seed.name, "--time-limit", str(time_limit)],
                {seed.name: text.encode(), **seed.files})


# ---------------------------------------------------------------------------------- file mutations

ODD_VALUES = (None, True, "x", "", [], {}, 0, -1, -0.0, 0.5, 2.7, 1e12, 10**30, 1e308, float("nan"), float("inf"),
              -float("inf"))


def _paths(document, prefix=()) -> list[tuple]:
    """Every JSON path in `document` (keys and list indices)."""
    found = [prefix]
    if isinstance(document, dict):
        for key, value in document.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            found += _paths(value, (*prefix, index))
    return found


def _show(path: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path) or "(the document)"


def mutate_json(document, rng: random.Random) -> tuple[object, str]:
    """A deep copy of `document` with one field deleted, added, emptied or given an odd value."""
    document = json.loads(json.dumps(document))
    path = rng.choice(_paths(document)[1:])
    parent = document
    for part in path[:-1]:
        parent = parent[part]
    key, op = path[-1], rng.choice(("delete", "extra", "odd", "odd", "odd", "duplicate"))
    if op == "delete":
        del parent[key]
    elif op == "extra" and isinstance(parent[key], dict):
        parent[key]["unexpected"] = 1
    elif op == "duplicate" and isinstance(parent[key], list) and parent[key]:
        parent[key].append(parent[key][0])
    else:
        op, value = "odd", rng.choice(ODD_VALUES)
        parent[key] = value
        return document, f"{_show(path)} = {json.dumps(value)}"
    return document, f"{op} {_show(path)}"


def mutate_bytes(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """`data` truncated, with a byte that breaks JSON, bytes that are not UTF-8, or emptied."""
    op = rng.choice(("truncate", "garbage", "not utf-8", "empty", "binary"))
    at = rng.randrange(len(data) + 1) if data else 0
    if op == "truncate":
        return data[:at], f"truncated at byte {at}"
    if op == "garbage":
        return data[:at] + rng.choice((b"}", b"{", b",", b"\"", b"\x00", b"]")) + data[at:], f"a stray byte at {at}"
    if op == "not utf-8":
        return data[:at] + b"\xff\xfe\xc3" + data[at:], f"invalid UTF-8 at byte {at}"
    if op == "binary":
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 300))), "random bytes"
    return b"", "empty"


def _mutated_document(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """A JSON file's bytes broken as bytes (one time in three) or as a document."""
    if rng.random() < 1 / 3:
        return mutate_bytes(data, rng)
    document, what = mutate_json(json.loads(data), rng)
    return json.dumps(document, indent=1).encode(), what


PLAN_COMMANDS = (["verify", "plan.json"], ["viz", "plan.json", "--format", "tree"],
                 ["viz", "plan.json", "--format", "dot"], ["viz", "plan.json", "--format", "mermaid"],
                 ["export", "plan.json", "--target", "vllm"], ["export", "plan.json", "--target", "sglang", "--k8s"])
PROMPTS_OK = b'{"prompt_token_ids": [1, 2, 3], "max_tokens": 2}\n'


@dataclass
class Base:
    """The valid files the file cases start from: a compiled tiny-cpu plan with its spec, a
    prompts file and a tiny-llama checkpoint (made on first use)."""

    folder: Path
    plan: bytes
    spec: bytes
    _weights: Optional[Path] = None

    @property
    def plan_files(self) -> dict[str, bytes]:
        return {"plan.json": self.plan, "tiny-cpu.flow": self.spec}

    def weights(self) -> Path:
        if self._weights is None:
            self._weights = save_tiny_llama(self.folder / "weights")
        return self._weights


def make_base(folder: Path) -> Base:
    from flowc.cli import main

    spec = (EXAMPLES / "tiny-cpu.flow").read_bytes()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiny-cpu.flow").write_bytes(spec)
    with _in_folder(folder), _quiet():
        code = main(["compile", "tiny-cpu.flow", "-o", "plan.json", "--time-limit", "2"])
    if code != 0:
        raise SystemExit("fuzz: cannot compile examples/tiny-cpu.flow")
    return Base(folder, (folder / "plan.json").read_bytes(), spec)


def plan_case(rng: random.Random, base: Base) -> Case:
    data, what = _mutated_document(base.plan, rng)
    return Case("plan", what, list(rng.choice(PLAN_COMMANDS)), {**base.plan_files, "plan.json": data})


def spec_case(rng: random.Random, base: Base) -> Case:
    """The plan's spec deleted, or broken as bytes or by a number."""
    op = rng.choice(("deleted", "bytes", "number"))
    files = dict(base.plan_files)
    if op == "deleted":
        del files["tiny-cpu.flow"]
        what = "the plan's spec deleted"
    elif op == "bytes":
        files["tiny-cpu.flow"], what = mutate_bytes(base.spec, rng)
    else:
        text, what = mutate_numbers(base.spec.decode(), rng)
        files["tiny-cpu.flow"] = text.encode()
    command = rng.choice((["verify", "plan.json"], ["viz", "plan.json", "--format", "dot"]))
    return Case("spec", f"spec: {what}", command, files)


def trace_case(rng: random.Random, base: Base) -> Case:
    """TRACE_SPEC with its CSV broken: emptied, bytes, columns, cells non-numeric or negative."""
    rows = [line.split(",") for line in TRACE_CSV.splitlines()]
    op = rng.choice(("bytes", "header", "cell", "cell", "row"))
    if op == "bytes":
        data, what = mutate_bytes(TRACE_CSV.encode(), rng)
    else:
        r = 0 if op == "header" else rng.randrange(1, len(rows))
        c = rng.randrange(3)
        if op == "row":
            rows[r] = rows[r][:rng.randrange(3)] + (["9", "9"] if rng.random() < 0.5 else [])
            what = f"row {r + 1} with {len(rows[r])} cells"
        else:
            value = rng.choice(("x", "", "-5", "0", "nan", "inf", "1e400", "2.5", "-1e-9", "99999999999"))
            what = f"row {r + 1} column {c + 1} = {value!r}"
            rows[r][c] = value
        data = ("\n".join(",".join(row) for row in rows) + "\n").encode()
    command = rng.choice((["check", "trace.flow"], ["simulate", "trace.flow"],
                          ["compile", "trace.flow", "--time-limit", "1"]))
    return Case("trace", f"t.csv: {what}", command, {"trace.flow": TRACE_SPEC.encode(), "t.csv": data})


def prompts_case(rng: random.Random, base: Base) -> Case:
    lines = [PROMPTS_OK, b'{"prompt_token_ids": [5], "max_tokens": 1, "seed": 3}\n']
    if rng.random() < 0.5:
        data, what = mutate_bytes(b"".join(lines), rng)
    else:
        item, what = mutate_json({"prompt_token_ids": [1, 2], "max_tokens": 2, "temperature": 0.5, "top_k": 3,
                                  "top_p": 0.9, "seed": 1, "stop_token_ids": [7], "ignore_eos": False, "id": "a"},
                                 rng)
        data = lines[0] + json.dumps(item).encode() + b"\n"
    return Case("prompts", f"prompts: {what}", ["run", "plan.json", "--prompts", "p.jsonl"],
                {**base.plan_files, "p.jsonl": data})


def run_plan_case(rng: random.Random, base: Base) -> Case:
    """A mutated plan given to `flowc run` (which builds an engine from it)."""
    case = plan_case(rng, base)
    return Case("plan-run", case.what, ["run", "plan.json", "--prompts", "p.jsonl"],
                {**case.files, "p.jsonl": PROMPTS_OK})


def weights_case(rng: random.Random, base: Base) -> Case:
    """The tiny-llama checkpoint with one file deleted, broken or replaced."""
    source = base.weights()
    files = {f"w/{p.name}": p.read_bytes() for p in source.iterdir()}
    name = rng.choice(sorted(files))
    op = rng.choice(("delete", "bytes", "json", "shape"))
    if op == "delete":
        del files[name]
        what = f"{name} deleted"
    elif op == "json" and name.endswith(".json"):
        files[name], what = _mutated_document(files[name], rng)
        what = f"{name}: {what}"
    elif op == "shape":
        files["w/model.safetensors"], what = _reshaped_tensor(source / "model.safetensors", rng)
    else:
        files[name], what = mutate_bytes(files[name], rng)
        what = f"{name}: {what}"
    return Case("weights", what, ["run", "plan.json", "--prompts", "p.jsonl", "--weights", "w"],
                {**base.plan_files, "p.jsonl": PROMPTS_OK, **files})


FILE_KINDS: dict[str, tuple[Callable[[random.Random, Base], Case], float, bool]] = {
    # kind: (make a case, weight, whether it builds an engine: those are slow and capped by --runs)
    "plan": (plan_case, 6, False),
    "spec": (spec_case, 1.5, False),
    "trace": (trace_case, 2, False),
    "prompts": (prompts_case, 1, True),
    "plan-run": (run_plan_case, 0.5, True),
    "weights": (weights_case, 1, True),
}


def file_case(rng: random.Random, base: Base, runs_left: int) -> Case:
    kinds = [k for k, (_, _, engine) in FILE_KINDS.items() if runs_left > 0 or not engine]
    kind = rng.choices(kinds, weights=[FILE_KINDS[k][1] for k in kinds])[0]
    return FILE_KINDS[kind][0](rng, base)


# ---------------------------------------------------------------------------------- checkpoints

TINY_LLAMA_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128,
                     "vocab_size": 256, "num_hidden_layers": 2, "max_position_embeddings": 512,
                     "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
                     "hidden_act": "silu", "torch_dtype": "float32", "eos_token_id": 2}


def _tiny_llama_shapes() -> dict[str, tuple[int, ...]]:
    c = TINY_LLAMA_CONFIG
    h, q, kv, f = c["hidden_size"], c["num_attention_heads"] * c["head_dim"], \
        c["num_key_value_heads"] * c["head_dim"], c["intermediate_size"]
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], h), "model.norm.weight": (h,),
              "lm_head.weight": (c["vocab_size"], h)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                       p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                       p + "mlp.down_proj.weight": (h, f)})
    return shapes


def save_tiny_llama(folder: Path) -> Path:
    """A Hugging Face directory of stdlib tiny-llama: config.json and model.safetensors."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(shape, generator=generator) * 0.02 for name, shape in _tiny_llama_shapes().items()}
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(TINY_LLAMA_CONFIG, indent=1))
    return folder


def _reshaped_tensor(file: Path, rng: random.Random) -> tuple[bytes, str]:
    """model.safetensors with one tensor of another shape (or dtype)."""
    import torch
    from safetensors.torch import load_file, save

    tensors = load_file(str(file))
    name = rng.choice(sorted(tensors))
    if rng.random() < 0.3:
        tensors[name] = tensors[name].to(torch.int32)
        return save(tensors), f"{name} as int32"
    tensors[name] = torch.zeros(*(d + 1 for d in tensors[name].shape))
    return save(tensors), f"{name} of shape {list(tensors[name].shape)}"


# ---------------------------------------------------------------------------------- running


@contextlib.contextmanager
def _in_folder(folder: Path):
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


@contextlib.contextmanager
def _quiet():
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # the process has just ended
        return 0


def _call_main(argv: list[str]) -> tuple[Optional[int], str]:
    """(exit code, exception that escaped) of `flowc.cli.main(argv)`."""
    from flowc.cli import main

    try:
        return main(list(argv)), ""
    except SystemExit as exit_:  # argparse's usage errors
        return (exit_.code if isinstance(exit_.code, int) else 2), ""
    except BaseException as error:  # noqa: BLE001 - the oracle: nothing may escape main
        return None, f"{type(error).__name__}: {error}"


# `_call_main` in a fresh interpreter: argv (JSON) and the result file as arguments
_FRESH_CHILD = """
import json, sys
from flowc.cli import main
try:
    code, error = main(json.loads(sys.argv[1])), ""
except SystemExit as exit_:
    code, error = (exit_.code if isinstance(exit_.code, int) else 2), ""
except BaseException as error_:
    code, error = None, f"{type(error_).__name__}: {error_}"
with open(sys.argv[2], "w") as out:
    json.dump({"code": code, "error": error}, out)
"""


def run_case(case: Case, folder: Path, timeout_s: float, max_rss: int) -> Outcome:
    """Write the case's files into `folder` and run its command there, in a fork of this process
    (flowc's modules already imported), so that a case stuck in native code or growing without
    bound can be killed: it is then `slow`, with the reason."""
    import flowc.cli  # noqa: F401 - imported once, before forking

    for name, data in case.files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    result, err = folder / ".result.json", folder / ".stderr"
    start = time.perf_counter()
    if case.argv[0] == "run":  # a fork of a process with torch's thread pools running can deadlock
        with open(err, "w") as stderr:
            child = subprocess.Popen([sys.executable, "-c", _FRESH_CHILD, json.dumps(case.argv), str(result)],
                                     cwd=folder, stdout=subprocess.DEVNULL, stderr=stderr)
        slow = _wait(child.pid, lambda: child.poll() is not None, child.kill, timeout_s, max_rss)
        child.wait()
    elif (pid := os.fork()) == 0:  # the child: run the command, write the result, exit without cleanup
        code, error = 1, "the case did not finish"
        try:
            os.chdir(folder)
            with open(err, "w") as stderr, contextlib.redirect_stdout(io.StringIO()), \
                    contextlib.redirect_stderr(stderr):
                code, error = _call_main(case.argv)
            result.write_text(json.dumps({"code": code, "error": error}))
        finally:
            os._exit(0)
    else:
        slow = _wait(pid, lambda: os.waitpid(pid, os.WNOHANG)[0] != 0,
                     lambda: (os.kill(pid, signal.SIGKILL), os.waitpid(pid, 0)), timeout_s, max_rss)
    outcome = Outcome(case, None, slow=slow)
    if not outcome.slow:
        found = json.loads(result.read_text()) if result.is_file() else {"code": None, "error": "the case crashed"}
        outcome.code, outcome.error = found["code"], found["error"]
    outcome.stderr = err.read_text(errors="replace") if err.is_file() else ""
    outcome.wall_s = time.perf_counter() - start
    return outcome


def _wait(pid: int, finished: Callable[[], bool], kill: Callable[[], object], timeout_s: float,
          max_rss: int) -> str:
    """Wait until the child `pid` has `finished` (which reaps it); `kill` it past `timeout_s` or
    `max_rss` bytes and say why."""
    start = time.monotonic()
    while not finished():
        reason = (f"ran past {timeout_s:g} s" if time.monotonic() - start > timeout_s else
                  f"grew past {max_rss / 2**30:g} GiB" if _rss_bytes(pid) > max_rss else "")
        if reason:
            kill()
            return reason
        time.sleep(0.02)
    return ""


# ---------------------------------------------------------------------------------- report


@dataclass
class Report:
    outcomes: list[Outcome]
    wall_s: float

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.failed]

    def lines(self) -> list[str]:
        tried = Counter(o.case.kind for o in self.outcomes)
        codes = Counter("slow" if o.slow else str(o.code) for o in self.outcomes)
        peak_kib = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
        out = [f"inputs tried: {len(self.outcomes)} ({', '.join(f'{k} {n}' for k, n in sorted(tried.items()))})",
               "exit codes: " + ", ".join(f"{c}: {n}" for c, n in sorted(codes.items())),
               f"failures: {len(self.failures)}",
               f"rate: {len(self.outcomes) / self.wall_s:.2f} cases/s ({self.wall_s:.1f} s)" if self.wall_s else "",
               f"peak RSS: {peak_kib / 2**20:.2f} GiB"]
        for o in self.outcomes:
            if o.slow:
                out.append(f"slow: {o.case.kind}: flowc {' '.join(o.case.argv)} ({o.case.what}): {o.slow}")
        return [line for line in out if line]


def fuzz(compiles: int, files: int, seed: int, *, runs: Optional[int] = None, time_limit: float = 2.0,
         timeout_s: float = 60.0, max_rss_gib: float = 6.0, large: bool = True, keep: Optional[Path] = None,
         on_case: Callable[[Outcome], None] = lambda o: None) -> Report:
    """Run `compiles` compile cases (of the large examples too with `large`) and `files` file
    cases (at most `runs` of them build an engine; default files // 20), drawn from `seed`.
    Failing inputs are kept under `keep`."""
    rng = random.Random(seed)
    runs = max(1, files // 20) if runs is None else runs
    outcomes: list[Outcome] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="flowc-fuzz-") as scratch:
        scratch_dir = Path(scratch)
        pool = seeds(large)
        base = make_base(scratch_dir / "base") if files else None
        for index in range(compiles + files):
            if index < compiles:
                case = compile_case(rng, pool, time_limit)
            else:
                case = file_case(rng, base, runs)
                runs -= FILE_KINDS[case.kind][2]
            folder = scratch_dir / f"case{index}"
            folder.mkdir()
            outcome = run_case(case, folder, timeout_s, int(max_rss_gib * 2**30))
            outcomes.append(outcome)
            on_case(outcome)
            if outcome.failed and keep is not None:
                shutil.copytree(folder, keep / f"case{index}", dirs_exist_ok=True)
            shutil.rmtree(folder, ignore_errors=True)
    return Report(outcomes, time.perf_counter() - start)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compiles", type=int, default=100, help="compile cases (mutated specs)")
    parser.add_argument("--files", type=int, default=100, help="malformed-file cases")
    parser.add_argument("--runs", type=int, help="of the file cases, at most this many run an engine "
                        "(default: files / 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-limit", type=float, default=2.0, help="flowc compile's --time-limit (s)")
    parser.add_argument("--timeout", type=float, default=60.0, help="stop a case after this many seconds")
    parser.add_argument("--max-rss-gib", type=float, default=6.0, help="stop a case when the process grows past it")
    parser.add_argument("--keep", type=Path, default=Path("fuzz-failures"),
                        help="where to copy the folder of each failing case (default: ./fuzz-failures)")
    parser.add_argument("--small-only", action="store_true",
                        help="mutate only the small specs (not chat-70b and the other large examples)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every case")
    args = parser.parse_args(argv)
    if min(args.compiles, args.files) < 0 or not (args.timeout > 0 and math.isfinite(args.timeout)):
        parser.error("counts must be >= 0 and --timeout positive")
    args.keep = args.keep.resolve()

    def show(o: Outcome) -> None:
        if args.verbose or o.failed:
            print(f"[{o.code}] {o.wall_s:5.1f} s {o.case.kind}: flowc {' '.join(o.case.argv)}  # {o.case.what}",
                  flush=True)
        if o.failed:
            print(f"    FAILED: {o.error or o.stderr.strip()[-400:]}", flush=True)

    report = fuzz(args.compiles, args.files, args.seed, runs=args.runs, time_limit=args.time_limit,
                  timeout_s=args.timeout, max_rss_gib=args.max_rss_gib, large=not args.small_only, keep=args.keep,
                  on_case=show)
    print("\n".join(report.lines()))
    if report.failures:
        print(f"failing inputs kept under {args.keep}")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
