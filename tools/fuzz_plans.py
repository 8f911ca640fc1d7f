"""Fuzz the plan files flowc's plan commands read; the oracle: no plan that `flowc verify`
accepts makes `flowc run` fail or compute other tokens, and no command ends in an internal
error (exit 3), hangs or grows without bound, whatever the plan holds.

    python tools/fuzz_plans.py --plans 300 --seed 1 --keep fuzz-plans-failures

Two base plans are compiled first: examples/tiny-cpu.flow (tp 1) and TP2_SPEC below (tp 2 on
two `cpu-local` devices, so `run` takes the distributed runner over gloo). Each is run
unmutated (`flowc run --prompts` with PROMPTS, greedy, fp32, seed 0): its output tokens are the
baseline. Each case then applies one to three mutations (MUTATIONS: numbers, fields, the
format version, the arena, scheduler settings, GPU references, parallelism, the model, control
characters in every string field in turn, spec paths outside the folder, path-like names,
structure) to one base plan and runs, in a folder of its own:

* `verify plan.json`, `viz plan.json --format F` (tree, dot, mermaid or html),
  `export plan.json --target vllm -o out`, and `export` of the plan's GPU twin (every group's
  vendor set to nvidia, so that export renders its scripts instead of refusing a CPU plan),
  each in a fork of the fuzzer with flowc already imported;
* `run plan.json --prompts prompts.jsonl --dtype fp32 --seed 0`, in a fresh interpreter (a
  fork of a process whose torch thread pools run can deadlock), for every plan verify accepts
  and a seeded share of the others (--run-share).

A failure (`judge`): an exit code other than 0, 1 or 2, an exception escaping `flowc.cli.main`,
a command past --timeout or past --max-rss-gib (its whole process tree); verify accepting a
plan that `run` fails on or computes other tokens from than its base's baseline; a command
other than verify exiting 0 on a plan verify refused as not a plan (F0520 at load time); a
file written or removed anywhere but the command's output; a raw control character (C0 but
newline and tab, DEL, C1, bidi overrides) or the marker of the secret file outside the case
folder in any output or exported file. Prints the mutations tried per kind, the exit codes per
command, the failures grouped by cause with the folder that reproduces each (kept under
--keep), cases per second and peak RSS. Exit status 1 when anything failed. Case `i` draws
from `random.Random(f"{seed}:{i}")`; `control` takes the string fields in turn, so a run is
deterministic for its seed.
"""

from __future__ import annotations

import argparse
import copy
import itertools
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
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))  # fuzz_commands, beside this file, also when imported
from fuzz_commands import _FRESH_CHILD, EXAMPLES, OK_CODES, _call_main, _paths, _rss_bytes, _show, mutate_json  # noqa: E402

# ---------------------------------------------------------------------------------- base plans

TP2_SPEC = """\
## examples/tiny-cpu.flow on two cpu-local devices at tp 2: `flowc run` takes the distributed
## runner (one process per rank, gloo).
use std.cpu_local
use std.models

cluster laptop {
  node x 1 {
    gpu cpu-local x 2
  }
}

workload chat-tiny {
  arrival poisson 4 req/s
  prompt uniform(16 tok, 192 tok)
  output uniform(8 tok, 64 tok)
}

slo relaxed {
  ttft p90 <= 2 s
  tpot p90 <= 200 ms
}

deploy tiny {
  model tiny-llama { weights fp32; kv fp32 }
  on laptop
  serve chat-tiny under relaxed
  max_batched_tokens in [512 tok]
  max_seqs in [32]
  tp in [2]
}
"""

# Greedy requests of tiny-llama's vocabulary (256): any two runs of a sound plan agree exactly.
PROMPTS = [{"id": "a", "prompt_token_ids": [3, 17, 42, 99, 200], "max_tokens": 8, "temperature": 0},
           {"id": "b", "prompt_token_ids": [5, 1, 250, 7, 7, 64, 128, 31, 2, 90, 11, 180], "max_tokens": 8,
            "temperature": 0},
           {"id": "c", "prompt_token_ids": [(37 * k + 11) % 256 for k in range(20)], "max_tokens": 8,
            "temperature": 0}]
PROMPTS_JSONL = "".join(json.dumps(p) + "\n" for p in PROMPTS).encode()

SECRET = "FLOWC-FUZZ-SECRET-7d41c9"  # a line of a file outside every case folder; must never be shown
SECRET_TEXT = f"# a file a plan must not make flowc show\nsecret {SECRET}\n"


@dataclass
class Base:
    """An unmutated plan, the spec it names, the buffers of its arena alive at the same time,
    and its baseline tokens (request id -> output token ids)."""

    name: str
    spec_name: str
    spec: bytes
    document: dict
    live_pairs: list[tuple[str, str]]
    tokens: dict = field(default_factory=dict)


def live_pairs(document: dict) -> list[tuple[str, str]]:
    """Pairs of the first group's arena buffers alive at the same time in the step graph: the
    pairs an overlap corrupts."""
    from flowc.compiler.model.step_graph import step_buffers
    from flowc.compiler.plan import Plan

    dep = Plan.model_validate(document).deployments[0]
    group = dep.groups[0]
    buffers = step_buffers(dep.model_spec, group.tp, group.scheduler.max_batched_tokens, group.scheduler.max_seqs,
                           group.ep)
    return [(a.name, b.name) for i, a in enumerate(buffers) for b in buffers[i + 1:]
            if a.size_bytes and b.size_bytes and a.alive_with(b)]


# ---------------------------------------------------------------------------------- mutations


@dataclass
class Context:
    """What mutations share across a run: the folder outside every case (the secret), the
    absolute folder a name may send export's files to, and how many mutations of each kind
    came before (`control` takes the string fields in turn)."""

    outside: Path
    escape: Path
    turns: Counter = field(default_factory=Counter)

    @property
    def secret(self) -> Path:
        return self.outside / "secret.flow"


Mutator = Callable[[dict, random.Random, Base, Context], Optional[str]]


def _get(document, path: tuple):
    for part in path:
        document = document[part]
    return document


def _deployments(document: dict) -> list[dict]:
    deps = document.get("deployments")
    return [d for d in deps if isinstance(d, dict)] if isinstance(deps, list) else []


def _groups(document: dict) -> list[dict]:
    return [g for d in _deployments(document) if isinstance(d.get("groups"), list)
            for g in d["groups"] if isinstance(g, dict)]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def mutate_number(document: dict, rng: random.Random, base: Base, ctx: Context) -> Optional[str]:
    """A numeric field set to 0, -1, a huge value, a float where an int is, a string, NaN or
    an infinity (written as JSON's NaN, Infinity)."""
    paths = [p for p in _paths(document) if p and _is_number(_get(document, p))]
    if not paths:
        return None
    path = rng.choice(paths)
    old = _get(document, path)
    odd = [0, -1, 1e30, 2**63, 10**30, str(old), math.nan, math.inf, -math.inf]
    odd += [old + 0.5, float(old)] if isinstance(old, int) else [0.5, -0.0]
    new = rng.choice(odd)
    _get(document, path[:-1])[path[-1]] = new
    return f"{_show(path)}: {old!r} -> {new!r}"


def mutate_field(document: dict, rng: random.Random, base: Base, ctx: Context) -> Optional[str]:
    """A field deleted, added, emptied or given a value of another type (fuzz_commands')."""
    if len(_paths(document)) < 2:
        return None
    mutated, what = mutate_json(document, rng)
    document.clear()
    document.update(mutated)
    return what


FORMAT_VERSIONS = ("\uff11.\uff15", "\u0661.\u0665", "1.\uff15", "2.0", "0.9", "99.1", "1.999999999999999999999999",
                   "1.5.0", "v1.5", "", " 1.5", "1.5\n", "junk", "1", "+1.5", "1_0.5", "-1.5", 1.5, None, ["1.5"])


def mutate_format_version(document: dict, rng: random.Random, base: Base, ctx: Context) -> Optional[str]:
    """`format_version` in non-ASCII digits, another major, junk, another type, or deleted."""
    if rng.random() < 0.1:
        document.pop("format_version", None)
        return "format_version deleted"
    value = rng.choice(FORMAT_VERSIONS)
    document["format_version"] = value
    return f"format_version = {json.dumps(value)}"


def _arena(document: dict) -> Optional[dict]:
    """The first group's memory map when it has an arena of the compiler's shape."""
    for group in _groups(document):
        memory = group.get("memory")
        if isinstance(memory, dict) and isinstance(memory.get("arena_offsets"), dict) \
                and isinstance(memory.get("arena_sizes"), dict):
            return memory
    return None


def overlap(memory: dict, pairs: list[tuple[str, str]], rng: random.Random) -> Optional[str]:
    """Move buffer a onto buffer b's offset, for a pair alive at the same time that still fits
    the arena there: two live buffers on the same bytes."""
    offsets, sizes, arena = memory["arena_offsets"], memory["arena_sizes"], memory.get("activations")
    fits = [(a, b) for a, b in pairs for x, y in ((a, b), (b, a))
            if all(_is_number(v) for v in (offsets.get(x), offsets.get(y), sizes.get(x)))
            and (not _is_number(arena) or offsets[y] + sizes[x] <= arena)]
    if not fits:
        return None
    a, b = rng.choice(fits)
    offsets[a] = offsets[b]
    return f"{a} moved onto {b} at {offsets[b]} (alive together)"


def mutate_arena(document: dict, rng: random.Random, base: Base, ctx: Context) -> Optional[str]:
    """The activation arena: two live buffers overlapping, a buffer past the end, a size shrunk
    or grown, an offset or a size dropped, the offsets emptied, the arena shrunk, a buffer no
    graph has."""
    memory = _arena(document)
    if memory is None:
        return None
    offsets, sizes = memory["arena_offsets"], memory["arena_sizes"]
    op = rng.choice(("overlap", "overlap", "past end", "shrink", "grow", "drop offset", "drop size",
                     "empty offsets", "empty both", "smaller arena", "unknown buffer"))
    if op == "overlap":
        return overlap(memory, base.live_pairs, rng)
    names = sorted(set(offsets) & set(sizes))
    name = rng.choice(names) if names else None
    arena = memory.get("activations")
    if op == "past end" and name and _is_number(arena) and _is_number(sizes[name]):
        offsets[name] = rng.choice((arena - sizes[name] + 256, arena, 2**40))
        return f"{name} at {offsets[name]}, past the end of {arena}"
    if op in ("shrink", "grow") and name and isinstance(sizes[name], int):
        old = sizes[name]
        sizes[name] = rng.choice((old // 2, 0, 1)) if op == "shrink" else rng.choice((old * 2, old + 256))
        return f"{name} size {old} -> {sizes[name]}"
    if op == "drop offset" and name:
        del offsets[name]
        return f"the offset of {name} dropped"
    if op == "drop size" and name:
        del sizes[name]
        return f"the size of {name} dropped"
    if op == "empty offsets":
        offsets.clear()
        return "arena_offsets emptied"
    if op == "empty both":
        offsets.clear()
        sizes.clear()
        return "arena_offsets and arena_sizes emptied"
    if op == "smaller arena" and isinstance(arena, int):
        memory["activations"] = arena // 2
        return f"activations {arena} -> {arena // 2}"
    offsets["layer.bogus"], sizes["layer.bogus"] = 0, 256
    return "a buffer `layer.bogus` no step graph has"


SCHEDULER_VALUES = {"kv_blocks": (0, 1, 3, 8, 10**12, 2**63), "block_size": (3, 1, 7, 0, 1024, 2**31),
                    "max_seqs": (1, 2, 0, 10**9), "max_batched_tokens": (1, 4, 16, 100_000, 10**9),
                    "chunk_size": (1, 3, 1024, 10**9, None), "chunked_prefill": (False,)}


def mutate_scheduler(document: dict, rng: random.Random, base: Base, ctx: Context) -> Optional[str]:
    """kv_blocks, block_size, max_seqs, max_batched_tokens, chunk_size or chunked_prefill set to
    a value a compiler could have written for another spec, or could not."""
    groups = [g for g in _groups(document)
              if isinstance(g.get("scheduler"), dict) and isinstance(g.get("memory"), dict)]
    if not groups:
        return None
    group = rng.choice(groups)
    key = rng.choice(sorted(SCHEDULER_VALUES))
    value = rng.choice(SCHEDULER_VALUES[key])
    (group["memory"] if key == "kv_blocks" else group["scheduler"])[key] = value
    return f"{'memory' if key == 'kv_blocks' else 'scheduler'}.{key} = {json.dumps(value)}"


def _instances(group: dict) -> list[list]:
    instances = group.get("instances")
    return [i["gpus"] for i in instances if isinstance(i, dict) and isinstance(i.get("gpus"), list)] \
        if isinstance(instances, list) else []


def mutate_gpus(document: dict, rng: random.Random, base: Base, ctx: Context) -> Optional[str]:
    """GPU references duplicated, out of range, reordered, or an instance added on another GPU."""
    groups = [g for g in _groups(document) if any(all(isinstance(r, dict) for r in gpus) and gpus
                                                  for gpus in _instances(g))]
    if not groups:
        return None
    group = rng.choice(groups)
    gpus = rng.choice([gpus for gpus in _instances(group) if gpus and all(isinstance(r, dict) for r in gpus)])
    op = rng.choice(("duplicate", "out of range", "reorder", "another instance"))
    if op == "duplicate" and len(gpus) > 1:
        gpus[1] = dict(gpus[0])
        return f"{json.dumps(gpus[0])} twice in one instance"
    if op == "duplicate":
        group["instances"].append({"gpus": [dict(r) for r in gpus]})
        return "a second instance on the same GPUs"
    if op == "reorder" and len(gpus) > 1:
        gpus.reverse()
        return "an instance's GPUs reversed"
    if op == "another instance":
        group["instances"].append({"gpus": [{"node": 0, "index": len(gpus) + k} for k in range(len(gpus))]})
        return f"another instance on GPUs {len(gpus)}..{2 * len(gpus) - 1} of node 0"
    ref = rng.choice(gpus)
    key, value = rng.choice((("index", 10**30), ("index", 2), ("index", 5), ("node", 5), ("node", 1),
                             ("node", 10**30)))
    ref[key] = value
    return f"a GPU's {key} = {value}"


PARALLELISM_VALUES = (0, 1, 2, 3, 4, 8, 64, 10**9)


def mutate_parallelism(document: dict, rng: random.Random, base: Base, ctx: Context) -> Optional[str]:
    """tp, pp or ep changed, with or without every instance's GPU list made to match."""
    groups = _groups(document)
    if not groups:
        return None
    group = rng.choice(groups)
    key = rng.choice(("tp", "pp", "ep"))
    value = rng.choice([v for v in PARALLELISM_VALUES if v != group.get(key)])
    group[key] = value
    tp, pp = group.get("tp"), group.get("pp")
    if rng.random() < 0.5 and isinstance(tp, int) and isinstance(pp, int) and 1 <= tp * pp <= 64 \
            and isinstance(group.get("instances"), list):
        group["instances"] = [{"gpus": [{"node": 0, "index": k} for k in range(tp * pp)]}
                              for _ in group["instances"]]
        return f"{key} = {value}, every instance on GPUs 0..{tp * pp - 1} of node 0"
    return f"{key} = {value}"


MODEL_VALUES = {"layers": (1, 3, 0, 64, 10**9), "hidden": (32, 65, 128, 0, 10**7), "heads": (1, 3, 8, 0),
                "kv_heads": (1, 3, 4, 8, 0), "head_dim": (8, 17, 32, 0, 10**6), "ffn": (64, 127, 0, 10**8),
                "vocab": (8, 16, 100, 257, 0, 10**9), "max_context": (4, 16, 10**9),
                "architecture": ("mixtral", "qwen2", "gptj", "deepseek_v3", "unknown"),
                "weights": ("bf16", "fp16", "fp8", "int4", "x"), "kv": ("bf16", "fp8", "x"),
                "tied_embeddings": (True,), "attention_bias": (True,), "mlp": ("plain", "x"),
                "sliding_window": (4, 0), "moe": ({"experts": 4, "top_k": 2, "expert_ffn": 64},),
                "name": ("llama-3.1-8b", "x")}


def mutate_model_spec(document: dict, rng: random.Random, base: Base, ctx: Context) -> Optional[str]:
    """A field of the model the plan carries changed or deleted, the model pointing its
    location at the secret file, or the whole `model_spec` deleted or null."""
    deps = _deployments(document)
    if not deps:
        return None
    dep = rng.choice(deps)
    spec = dep.get("model_spec")
    op = rng.choice(("change", "change", "change", "delete field", "location", "delete", "null"))
    if op in ("delete", "null") or not isinstance(spec, dict):
        if op == "null":
            dep["model_spec"] = None
            return "model_spec = null"
        dep.pop("model_spec", None)
        return "model_spec deleted"
    if op == "delete field":
        key = rng.choice(sorted(spec))
        del spec[key]
        return f"model_spec.{key} deleted"
    if op == "location":
        spec["location"] = {"file": str(ctx.secret), "line": 2, "col": 1}
        return "model_spec.location names the secret file outside the folder"
    key = rng.choice(sorted(MODEL_VALUES))
    spec[key] = rng.choice(MODEL_VALUES[key])
    return f"model_spec.{key} = {json.dumps(spec[key])}"


# Control characters, and a lone surrogate (valid JSON, not encodable as UTF-8)
CONTROLS = ("\n", "\r", "\t", "\x1b[31m", "\x00", "\u202e", "\x9b", "\x07", "\ud800")
ARENA_NAME, ALTERNATIVE_SUMMARY, ALTERNATIVE_REASON, BASELINE_NOTE = \
    ("<an arena buffer's name>",), ("<a new alternative's summary>",), ("<a new alternative's reason>",), \
    ("deployments", 0, "baselines", 0, "note")


def control_targets(document: dict) -> list[tuple]:
    """Every string field of a plan: each string value, an arena buffer's name (its key in
    arena_offsets and arena_sizes), an alternative's summary and reason (the compiled plans have
    none: one is added), a baseline's note."""
    strings = [p for p in _paths(document) if p and isinstance(_get(document, p), str)]
    return strings + [ARENA_NAME, ALTERNATIVE_SUMMARY, ALTERNATIVE_REASON, BASELINE_NOTE]


def insert_control(document: dict, target: tuple, char: str, rng: random.Random) -> Optional[str]:
    """`char` inserted into the string field `target` (control_targets); None when the document
    no longer has it."""
    def spliced(text: str) -> str:
        at = rng.randint(0, len(text))
        return text[:at] + char + text[at:]

    deps = _deployments(document)
    if target == ARENA_NAME:
        memory = _arena(document)
        names = sorted(set(memory["arena_offsets"]) & set(memory["arena_sizes"])) if memory else []
        if not names:
            return None
        name = rng.choice(names)
        new = spliced(name)
        for table in ("arena_offsets", "arena_sizes"):
            memory[table][new] = memory[table].pop(name)
        return f"{char!r} in the arena buffer name {name}: {new!r}"
    if target in (ALTERNATIVE_SUMMARY, ALTERNATIVE_REASON):
        if not deps or not isinstance(deps[0].setdefault("alternatives", []), list):
            return None
        alternative = {"summary": "tp 1 x 2 replicas, colocated", "objective_value": 1.0, "reason": "fewer req/s"}
        key = "summary" if target == ALTERNATIVE_SUMMARY else "reason"
        alternative[key] = spliced(alternative[key])
        deps[0]["alternatives"].append(alternative)
        return f"{char!r} in a new alternative's {key}: {alternative[key]!r}"
    try:
        parent = _get(document, target[:-1])
        old = parent[target[-1]]
    except (KeyError, IndexError, TypeError):
        return None
    if target == BASELINE_NOTE and old is None:
        old = "measured on the same GPUs"
    if not isinstance(old, str):
        return None
    parent[target[-1]] = spliced(old)
    return f"{char!r} in {_show(target)}: {parent[target[-1]]!r}"


def mutate_control(document: dict, rng: random.Random, base: Base, ctx: Context) -> Optional[str]:
    """A control character inserted into the next string field of the base plan, in turn."""
    targets = control_targets(base.document)
    target = targets[ctx.turns["control"] % len(targets)]
    return insert_control(document, target, rng.choice(CONTROLS), rng)


def mutate_spec_files(document: dict, rng: random.Random, base: Base, ctx: Context) -> Optional[str]:
    """`spec_files` naming the secret file outside the folder (absolute, or relative through
    `..`), a device, a folder, the plan itself, a missing file, nothing, or two files."""
    value = rng.choice(([str(ctx.secret)], ["../outside/secret.flow"], ["../outside/secret.flow"],
                        ["/dev/zero"], ["."], ["plan.json"], ["missing.flow"], [], [base.spec_name, str(ctx.secret)],
                        ["/" + "a" * 5000]))
    document["spec_files"] = value
    shown = [str(v).replace(str(ctx.secret), "<outside>/secret.flow")[:40] for v in value]
    return f"spec_files = {json.dumps(shown)}"


def mutate_names(document: dict, rng: random.Random, base: Base, ctx: Context) -> Optional[str]:
    """A deployment, model, cluster or GPU name made path-like (export writes files named after
    deployments), empty, very long or shell-like."""
    deps = _deployments(document)
    if not deps:
        return None
    dep = rng.choice(deps)
    value = rng.choice(("../escaped", "../../escaped", str(ctx.escape / "abs"), "a/b", "", ".", "..",
                        "x" * 5000, "\u540d\u524d", "-rf", "$(touch pwned)", "a'b\"c", "name with spaces"))
    key = rng.choice(("name", "name", "name", "model", "cluster", "gpu"))
    where = dep
    if key == "gpu":
        groups = _groups({"deployments": [dep]})
        if not groups:
            return None
        where = groups[0]
    where[key] = value
    shown = value.replace(str(ctx.escape), "<escape>")
    return f"{key} = {json.dumps(shown[:40] + ('...' if len(shown) > 40 else ''))}"


def mutate_structure(document: dict, rng: random.Random, base: Base, ctx: Context) -> Optional[str]:
    """Deployments or groups emptied or duplicated, thousands of instances or alternatives, a
    group's role, vendor or the deployment's mode changed."""
    deps = _deployments(document)
    if not deps:
        return None
    dep = rng.choice(deps)
    groups = dep.get("groups") if isinstance(dep.get("groups"), list) else None
    op = rng.choice(("no deployments", "duplicate deployment", "no groups", "duplicate group", "many instances",
                     "many alternatives", "role", "vendor", "mode"))
    if op == "no deployments":
        document["deployments"] = []
    elif op == "duplicate deployment":
        twin = copy.deepcopy(dep)
        if rng.random() < 0.5:
            twin["name"] = f"{twin.get('name')}-2"
        document["deployments"].append(twin)
    elif op == "no groups":
        dep["groups"] = []
    elif op == "duplicate group" and groups:
        groups.append(copy.deepcopy(groups[0]))
    elif op == "many instances" and groups and isinstance(groups[0], dict) \
            and isinstance(groups[0].get("instances"), list) and groups[0]["instances"]:
        groups[0]["instances"] = groups[0]["instances"] * 5000
    elif op == "many alternatives":
        dep["alternatives"] = [{"summary": f"tp 1 x {k} replicas", "objective_value": k, "reason": "fewer req/s"}
                               for k in range(20000)]
    elif op in ("role", "vendor") and groups and isinstance(groups[0], dict):
        value = rng.choice(("prefill", "decode")) if op == "role" else rng.choice(("nvidia", "amd"))
        groups[0][op] = value
        return f"{op} = {value}"
    elif op == "mode":
        dep["mode"] = "disaggregated"
    else:
        return None
    return op


MUTATIONS: dict[str, tuple[Mutator, float]] = {
    # kind: (mutator, weight)
    "number": (mutate_number, 3),
    "field": (mutate_field, 2),
    "format_version": (mutate_format_version, 1),
    "arena": (mutate_arena, 3),
    "scheduler": (mutate_scheduler, 2),
    "gpus": (mutate_gpus, 2),
    "parallelism": (mutate_parallelism, 2),
    "model_spec": (mutate_model_spec, 2),
    "control": (mutate_control, 3),
    "spec_files": (mutate_spec_files, 1),
    "names": (mutate_names, 1.5),
    "structure": (mutate_structure, 1.5),
}


def mutate(document: dict, rng: random.Random, base: Base, ctx: Context) -> tuple[dict, list[tuple[str, str]]]:
    """A copy of `document` with one to three mutations, and (kind, what) of each. A kind that
    does not apply to what the document has become is replaced by `field`, which always does."""
    document = copy.deepcopy(document)
    kinds = list(MUTATIONS)
    done = []
    for _ in range(rng.randint(1, 3)):
        kind = rng.choices(kinds, weights=[MUTATIONS[k][1] for k in kinds])[0]
        what = MUTATIONS[kind][0](document, rng, base, ctx)
        if what is None:
            kind, what = "field", mutate_field(document, rng, base, ctx)
        ctx.turns[kind] += 1
        done.append((kind, what or "nothing left to mutate"))
    return document, done


def gpu_twin(document: dict) -> dict:
    """The plan with every group's vendor nvidia: what export renders scripts for."""
    twin = copy.deepcopy(document)
    for group in _groups(twin):
        group["vendor"] = "nvidia"
    return twin


# ---------------------------------------------------------------------------------- cases

VIZ_FORMATS = ("tree", "tree", "dot", "dot", "mermaid", "mermaid", "html")
RUN = ["run", "plan.json", "--prompts", "prompts.jsonl", "--dtype", "fp32", "--seed", "0"]


@dataclass
class Case:
    index: int
    base: Base
    mutations: list[tuple[str, str]]
    plan: bytes
    viz: str
    sampled_run: bool  # run even when verify refuses the plan

    def commands(self) -> dict[str, tuple[list[str], tuple[str, ...]]]:
        """label -> (argv, what it may write: paths relative to the case folder)."""
        viz = ["viz", "plan.json", "--format", self.viz] + (["-o", "report.html"] if self.viz == "html" else [])
        return {"verify": (["verify", "plan.json"], ()),
                "viz": (viz, ("report.html",)),
                "export": (["export", "plan.json", "--target", "vllm", "-o", "out"], ("out",)),
                "export-gpu": (["export", "plan-gpu.json", "--target", "vllm", "--k8s", "--allow-degrade",
                                "--model-path", "ckpt/tiny-llama", "-o", "out-gpu"], ("out-gpu",)),
                "run": (RUN, ())}

    def files(self) -> dict[str, bytes]:
        twin = json.dumps(gpu_twin(json.loads(self.plan)), indent=1).encode()
        return {"plan.json": self.plan, "plan-gpu.json": twin, self.base.spec_name: self.base.spec,
                "prompts.jsonl": PROMPTS_JSONL}


def make_case(index: int, seed: int, bases: list[Base], ctx: Context, run_share: float) -> Case:
    rng = random.Random(f"{seed}:{index}")
    base = rng.choice(bases)
    document, done = mutate(base.document, rng, base, ctx)
    plan = json.dumps(document, indent=1).encode()  # ASCII: json escapes the rest, lone surrogates too
    return Case(index, base, done, plan, rng.choice(VIZ_FORMATS), rng.random() < run_share)


# ---------------------------------------------------------------------------------- running


@dataclass
class Result:
    label: str
    argv: list[str]
    code: Optional[int]
    error: str = ""            # an exception that escaped main
    slow: str = ""             # why the watchdog stopped it
    stdout: bytes = b""
    stderr: bytes = b""
    outputs: dict[str, bytes] = field(default_factory=dict)  # files it wrote where it may
    strays: list[str] = field(default_factory=list)          # files it wrote or removed anywhere else
    wall_s: float = 0.0
    peak_rss: int = 0


def _tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and every process below it (a tp 2 run's ranks)."""
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        total += _rss_bytes(p)
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                todo += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
            except OSError:
                pass
    return total


def _watch(pid: int, finished: Callable[[], bool], timeout_s: float, max_rss: int) -> tuple[str, int]:
    """Wait until `finished()`; (why it was not, peak RSS of the tree) when it ran past
    `timeout_s` or its process tree grew past `max_rss` bytes (the caller kills it). Unlike
    fuzz_commands._wait, it counts the processes a run starts."""
    start, peak = time.monotonic(), 0
    while not finished():
        peak = max(peak, _tree_rss(pid))
        if time.monotonic() - start > timeout_s:
            return f"ran past {timeout_s:g} s", peak
        if peak > max_rss:
            return f"grew past {max_rss / 2**30:g} GiB", peak
        time.sleep(0.02)
    return "", peak


def _snapshot(root: Path) -> dict[str, tuple]:
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            found[os.path.join(folder, name)] = ("dir",)
        for name in files:
            path = os.path.join(folder, name)
            try:
                info = os.lstat(path)
            except OSError:
                continue
            found[path] = (info.st_size, info.st_mtime_ns)
    return found


HARNESS = (".result.json", ".stdout", ".stderr")


def run_command(label: str, argv: list[str], folder: Path, may_write: tuple[str, ...], watched: Path,
                timeout_s: float, max_rss: int, fresh: bool = False) -> Result:
    """`flowc ARGV` in `folder`: in a fork (flowc already imported), or with `fresh` in a new
    interpreter in a session of its own (killed whole). Files it writes under `may_write` are
    its outputs; any other change under `watched` is a stray."""
    result_file, out_file, err_file = (folder / name for name in HARNESS)
    before = _snapshot(watched)
    start = time.perf_counter()
    if fresh:
        with open(out_file, "wb") as out, open(err_file, "wb") as err:
            child = subprocess.Popen([sys.executable, "-c", _FRESH_CHILD, json.dumps(argv), str(result_file)],
                                     cwd=folder, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                     start_new_session=True)
        slow, peak = _watch(child.pid, lambda: child.poll() is not None, timeout_s, max_rss)
        try:  # the run and whatever it left behind (its ranks)
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        child.wait()
    else:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: run the command, write the result, exit without cleanup
            try:
                os.chdir(folder)
                os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
                # stdout strict as in a UTF-8 locale, stderr backslashreplace as Python's
                with open(HARNESS[1], "w", encoding="utf-8") as out, \
                        open(HARNESS[2], "w", encoding="utf-8", errors="backslashreplace") as err:
                    os.dup2(out.fileno(), 1)
                    os.dup2(err.fileno(), 2)
                    with redirect_stdout(out), redirect_stderr(err):
                        code, error = _call_main(argv)
                result_file.write_text(json.dumps({"code": code, "error": error}))
            finally:
                os._exit(0)
        slow, peak = _watch(pid, lambda: os.waitpid(pid, os.WNOHANG)[0] != 0, timeout_s, max_rss)
        if slow:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    result = Result(label, argv, None, slow=slow, wall_s=time.perf_counter() - start, peak_rss=peak)
    if not slow:
        found = json.loads(result_file.read_text()) if result_file.is_file() else \
            {"code": None, "error": "the process died without a result"}
        result.code, result.error = found["code"], found["error"]
    result.stdout = out_file.read_bytes() if out_file.is_file() else b""
    result.stderr = err_file.read_bytes() if err_file.is_file() else b""
    outputs, harness = [str(folder / p) for p in may_write], [str(folder / p) for p in HARNESS]
    after = _snapshot(watched)
    for path in sorted(set(before) | set(after)):
        if before.get(path) == after.get(path) or path in harness:
            continue
        if any(path == a or path.startswith(a + os.sep) for a in outputs):
            if path in after and after[path] != ("dir",):
                result.outputs[os.path.relpath(path, folder)] = Path(path).read_bytes()
        else:
            result.strays.append(f"{'removed' if path not in after else 'wrote'} {path}")
    for name in HARNESS:
        (folder / name).unlink(missing_ok=True)
    return result


# ---------------------------------------------------------------------------------- the oracle

# Raw control characters: C0 but newline and tab, DEL, C1, bidi embeddings, overrides, isolates
RAW_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
# How plan_io.load_plan_file refuses a document that is not a plan it reads
LOAD_REFUSAL = re.compile(r"error\[F0520\]: (`[^`]*` is not (a flowc plan|valid JSON)|plan format_version .* is not "
                          r"supported)")


@dataclass
class Failure:
    cause: str
    command: str
    detail: str

    def __post_init__(self):  # printed by the fuzzer: no raw control character, no lone surrogate
        escaped = RAW_CONTROL.sub(lambda m: repr(m.group())[1:-1], self.detail)
        self.detail = escaped.encode("utf-8", "backslashreplace").decode()

    @property
    def signature(self) -> str:
        """The failure without its figures: failures of one cause share it."""
        return re.sub(r"\d+", "N", self.detail)[:160]


def run_tokens(stdout: bytes) -> dict:
    """request id -> output token ids (or the error) from `flowc run`'s JSON lines."""
    found = {}
    for line in stdout.decode("utf-8", "replace").splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict) and "id" in item:
            found[str(item["id"])] = ["error", item["error"]] if item.get("error") else item.get("output_token_ids")
        else:
            found.setdefault("<not a result>", []).append(line[:80])
    return found


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def judge(results: dict[str, Result], base: Base) -> list[Failure]:
    """The failures of one case's commands (the module docstring's list)."""
    failures = []
    for r in results.values():
        if r.slow:
            failures.append(Failure("hang" if r.slow.startswith("ran past") else "memory", r.label, r.slow))
        elif r.error:
            failures.append(Failure("exception escaped main", r.label, r.error))
        elif r.code not in OK_CODES:
            internal = [line for line in _text(r.stderr).splitlines() if line.startswith("internal error")]
            failures.append(Failure("internal error (exit 3)" if r.code == 3 else f"exit {r.code}", r.label,
                                    (internal or [_text(r.stderr).strip()[-200:]])[0]))
        if r.strays:
            failures.append(Failure("wrote outside its output", r.label, "; ".join(r.strays[:3])))
        for where, data in (("stdout", r.stdout), ("stderr", r.stderr), *r.outputs.items()):
            text = _text(data)
            raw = RAW_CONTROL.search(text)
            if raw:
                context = text[max(0, raw.start() - 40):raw.end() + 20]
                failures.append(Failure("raw control character", r.label, f"{raw.group()!r} in {where}: {context!r}"))
            if SECRET in text:
                failures.append(Failure("secret file shown", r.label, f"in {where}"))
    verify, run = results.get("verify"), results.get("run")
    refusal = LOAD_REFUSAL.search(_text(verify.stderr)) if verify and verify.code == 1 else None
    if refusal:
        for label in ("viz", "export", "run"):
            if label in results and results[label].code == 0:
                failures.append(Failure("load-refused plan accepted", label, f"verify: {refusal.group()}"))
    if verify and verify.code == 0 and run is not None and not run.slow:
        if run.code != 0:
            failures.append(Failure("verified plan does not run", "run", f"exit {run.code}: "
                                    + _text(run.stderr).strip()[-300:]))
        elif run_tokens(run.stdout) != base.tokens:
            failures.append(Failure("verified plan computes other tokens", "run",
                                    f"{run_tokens(run.stdout)} instead of {base.tokens}"))
    return failures


def refusal(verify: Result) -> str:
    """Why verify refused a plan: `load` (not a plan, F0520 from plan_io), else its first code."""
    text = _text(verify.stderr)
    if LOAD_REFUSAL.search(text):
        return "load"
    code = re.search(r"error\[(F\d+)\]", text)
    return code.group(1) if code else "other"


@dataclass
class Outcome:
    case: Case
    results: dict[str, Result]
    failures: list[Failure]

    @property
    def other_tokens(self) -> bool:
        """A plan verify refused ran to the end with other tokens (expected, and counted)."""
        run = self.results.get("run")
        return run is not None and run.code == 0 and run_tokens(run.stdout) != self.case.base.tokens


def run_case(case: Case, scratch: Path, ctx: Context, timeout_s: float, max_rss: int) -> Outcome:
    folder = scratch / f"case{case.index}"
    folder.mkdir()
    for name, data in case.files().items():
        (folder / name).write_bytes(data)
    results = {}
    for label, (argv, may_write) in case.commands().items():
        if label == "run" and not (case.sampled_run or results["verify"].code == 0):
            continue
        results[label] = run_command(label, argv, folder, may_write, scratch, timeout_s, max_rss,
                                     fresh=label == "run")
    return Outcome(case, results, judge(results, case.base))


# ---------------------------------------------------------------------------------- the fuzzer


@dataclass
class Report:
    outcomes: list[Outcome]
    wall_s: float
    kept: dict[int, Path] = field(default_factory=dict)

    @property
    def failures(self) -> list[tuple[Outcome, Failure]]:
        return [(o, f) for o in self.outcomes for f in o.failures]

    def groups(self) -> dict[tuple[str, str, str], list[Outcome]]:
        """(cause, command, signature) -> the cases that failed so."""
        found: dict[tuple[str, str, str], list[Outcome]] = {}
        for o, f in self.failures:
            found.setdefault((f.cause, f.command, f.signature), []).append(o)
        return found

    def lines(self) -> list[str]:
        mutated = [o for o in self.outcomes if o.case.mutations]
        kinds = Counter(kind for o in mutated for kind, _ in o.case.mutations)
        per_base = Counter(o.case.base.name for o in mutated)
        runs = [o for o in self.outcomes if "run" in o.results]
        verified = sum(1 for o in runs if o.results["verify"].code == 0)
        out = [f"cases: {len(mutated)} mutated plans ({', '.join(f'{b} {n}' for b, n in sorted(per_base.items()))})"
               f" and {len(self.outcomes) - len(mutated)} baselines; runs: {len(runs)} ({verified} verified, "
               f"{len(runs) - verified} sampled)",
               "mutations: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))]
        for label in ("verify", "viz", "export", "export-gpu", "run"):
            codes = Counter("slow" if r.slow else str(r.code) for o in self.outcomes
                            for r in [o.results.get(label)] if r is not None)
            out.append(f"exit codes of {label}: " + ", ".join(f"{c}: {n}" for c, n in sorted(codes.items())))
        refusals = Counter(refusal(o.results["verify"]) for o in mutated if o.results["verify"].code == 1)
        out.append("verify refused: " + ", ".join(f"{why} {n}" for why, n in refusals.most_common()))
        causes = Counter(f.cause for _, f in self.failures)
        out.append(f"failures: {len(self.failures)} in {len({id(o) for o, _ in self.failures})} cases"
                   + (f" ({', '.join(f'{c} {n}' for c, n in causes.most_common())})" if causes else ""))
        out.append(f"plans verify refused that ran with other tokens: {sum(o.other_tokens for o in runs)}")
        if self.wall_s:
            out.append(f"rate: {len(self.outcomes) / self.wall_s:.2f} cases/s ({self.wall_s:.1f} s)")
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        largest = max((r for o in self.outcomes for r in o.results.values()), key=lambda r: r.peak_rss, default=None)
        if largest is not None:
            out.append(f"peak RSS: fuzzer {own / 2**30:.2f} GiB, largest command {largest.peak_rss / 2**30:.2f} GiB "
                       f"({largest.label}, with the processes it started)")
        for (cause, command, signature), cases in sorted(self.groups().items()):
            first = cases[0]
            where = self.kept.get(first.case.index)
            out.append(f"\nFAILED {cause}: {command}, {len(cases)} case{'s' if len(cases) > 1 else ''}: {signature}")
            out.append(f"    e.g. case {first.case.index} ({first.case.base.name}): "
                       + "; ".join(f"{k}: {w}" for k, w in first.case.mutations))
            if where is not None:
                out.append(f"    reproduce: cd {where} && flowc {' '.join(first.results[command].argv)}")
        return out


def preload() -> None:
    """Import what the plan commands import when they run, once, before the first fork: each
    case's fork then starts with it (never torch: `run` has an interpreter of its own)."""
    import flowc.api  # noqa: F401
    import flowc.cli  # noqa: F401
    import flowc.compiler.render.diagram  # noqa: F401
    import flowc.compiler.render.export  # noqa: F401
    import flowc.compiler.render.html  # noqa: F401
    import flowc.compiler.verify  # noqa: F401
    import flowc.export_cmd  # noqa: F401
    import flowc.verify_cmd  # noqa: F401
    import flowc.viz_cmd  # noqa: F401


def compile_bases(scratch: Path, timeout_s: float, max_rss: int) -> list[Base]:
    """The two base plans, each compiled in a folder of its own, with their live arena pairs."""
    bases = []
    for name, spec in (("tiny-cpu", (EXAMPLES / "tiny-cpu.flow").read_bytes()), ("tiny-cpu-tp2", TP2_SPEC.encode())):
        folder = scratch / "bases" / name
        folder.mkdir(parents=True)
        spec_name = f"{name}.flow"
        (folder / spec_name).write_bytes(spec)
        result = run_command("compile", ["compile", spec_name, "-o", "plan.json"], folder, ("plan.json",), folder,
                             timeout_s, max_rss)
        if result.code != 0:
            raise SystemExit(f"fuzz: cannot compile {name}: {_text(result.stderr)[-500:]}")
        document = json.loads((folder / "plan.json").read_text())
        bases.append(Base(name, spec_name, spec, document, live_pairs(document)))
    return bases


def fuzz(plans: int, seed: int, *, run_share: float = 0.1, timeout_s: float = 180.0, max_rss_gib: float = 6.0,
         keep: Optional[Path] = None, on_case: Callable[[Outcome], None] = lambda o: None) -> Report:
    """The baselines of both base plans, then `plans` mutated plans drawn from `seed`; the
    folders of failing cases are copied under `keep` (with `outside/`, the secret's folder)."""
    max_rss = int(max_rss_gib * 2**30)
    outcomes, kept = [], {}
    start = time.perf_counter()
    preload()
    with tempfile.TemporaryDirectory(prefix="flowc-fuzz-plans-") as temporary:
        scratch = Path(temporary)
        ctx = Context(scratch / "outside", scratch / "escape")
        ctx.outside.mkdir()
        bases = compile_bases(scratch, timeout_s, max_rss)
        baselines = [Case(-1 - k, base, [], json.dumps(base.document, indent=1).encode(), "tree", True)
                     for k, base in enumerate(bases)]
        mutated = (make_case(index, seed, bases, ctx, run_share) for index in range(plans))
        for case in itertools.chain(baselines, mutated):
            ctx.secret.write_text(SECRET_TEXT)
            outcome = run_case(case, scratch, ctx, timeout_s, max_rss)
            if not case.mutations:  # a baseline: its tokens are what every mutated plan of its base must give
                run = outcome.results["run"]
                if run.code != 0 or set(run_tokens(run.stdout)) != {p["id"] for p in PROMPTS}:
                    raise SystemExit(f"fuzz: the unmutated {case.base.name} plan does not run: "
                                     f"{_text(run.stderr)[-500:]}")
                case.base.tokens = run_tokens(run.stdout)
                outcome.failures = judge(outcome.results, case.base)
            outcomes.append(outcome)
            on_case(outcome)
            folder = scratch / f"case{case.index}"
            if outcome.failures and keep is not None:
                kept[case.index] = _keep(outcome, folder, keep, ctx)
            for entry in scratch.iterdir():  # what a case left behind, its own folder included
                if entry.name in ("bases", "outside"):
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
    return Report(outcomes, time.perf_counter() - start, kept)


def _keep(outcome: Outcome, folder: Path, keep: Path, ctx: Context) -> Path:
    """Copy the case's folder (and the secret's) under `keep`, with README.txt saying what failed."""
    target = keep / f"case{outcome.case.index}"
    shutil.copytree(folder, target, dirs_exist_ok=True, symlinks=True)
    shutil.copytree(ctx.outside, keep / "outside", dirs_exist_ok=True)
    lines = [f"base: {outcome.case.base.name}", *(f"mutation: {k}: {w}" for k, w in outcome.case.mutations),
             f"the secret file outside the folder was {ctx.secret} (a copy: ../outside/secret.flow)", ""]
    for r in outcome.results.values():
        lines.append(f"flowc {' '.join(r.argv)}  -> {r.slow or r.error or f'exit {r.code}'} ({r.wall_s:.1f} s)")
    lines += ["", *(f"FAILED {f.cause} ({f.command}): {f.detail}" for f in outcome.failures)]
    (target / "README.txt").write_text("\n".join(lines) + "\n", encoding="utf-8", errors="backslashreplace")
    return target


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plans", type=int, default=100, help="mutated plans to try")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-share", type=float, default=0.1,
                        help="share of the plans verify refuses that `flowc run` is tried on too (default 0.1)")
    parser.add_argument("--timeout", type=float, default=180.0,
                        help="a command running longer is a hang (default 180 s: a loaded machine runs slowly)")
    parser.add_argument("--max-rss-gib", type=float, default=6.0,
                        help="a command whose processes grow past it grows without bound (default 6)")
    parser.add_argument("--keep", type=Path, default=Path("fuzz-plans-failures"),
                        help="where to copy the folder of each failing case (default: ./fuzz-plans-failures)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every case")
    args = parser.parse_args(argv)
    if args.plans < 0 or not 0 <= args.run_share <= 1 or not (args.timeout > 0 and math.isfinite(args.timeout)) \
            or not args.max_rss_gib > 0:
        parser.error("--plans must be >= 0, --run-share from 0 to 1, --timeout and --max-rss-gib positive")
    args.keep = args.keep.resolve()

    def show(o: Outcome) -> None:
        if args.verbose or o.failures:
            codes = " ".join(f"{label} {r.slow and 'slow' or r.code}" for label, r in o.results.items())
            what = "; ".join(f"{k}: {w}" for k, w in o.case.mutations) or "unmutated"
            print(f"case {o.case.index} ({o.case.base.name}) [{codes}] {what}", flush=True)
        for f in o.failures:
            print(f"    FAILED {f.cause} ({f.command}): {f.detail[:300]}", flush=True)

    report = fuzz(args.plans, args.seed, run_share=args.run_share, timeout_s=args.timeout,
                  max_rss_gib=args.max_rss_gib, keep=args.keep, on_case=show)
    print("\n".join(report.lines()))
    if report.failures:
        print(f"\nfailing cases kept under {args.keep}")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
