"""tools/fuzz_plans.py: its mutators do what they say, its oracle and watchdog catch what they
should, and a short deterministic run finds nothing."""

from __future__ import annotations

import copy
import importlib.util
import json
import random
import sys
from collections import Counter
from pathlib import Path

import pytest

from flowc.compiler.model.step_graph import overlaps, step_buffers
from flowc.compiler.plan import Plan

REPO = Path(__file__).resolve().parents[1]


def load_fuzzer():
    spec = importlib.util.spec_from_file_location("fuzz_plans", REPO / "tools" / "fuzz_plans.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


fuzzer = load_fuzzer()


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Both base plans, compiled as the fuzzer compiles them."""
    return fuzzer.compile_bases(tmp_path_factory.mktemp("fuzz-plans"), 120, 6 * 2**30)


@pytest.fixture
def ctx(tmp_path):
    return fuzzer.Context(tmp_path / "outside", tmp_path / "escape")


def _arena_buffers(document: dict):
    dep = Plan.model_validate(document).deployments[0]
    group = dep.groups[0]
    return step_buffers(dep.model_spec, group.tp, group.scheduler.max_batched_tokens, group.scheduler.max_seqs)


# ---------------------------------------------------------------------------------- mutators

def test_the_bases_are_tp_1_and_tp_2_with_live_pairs(bases):
    assert [b.name for b in bases] == ["tiny-cpu", "tiny-cpu-tp2"]
    assert [b.document["deployments"][0]["groups"][0]["tp"] for b in bases] == [1, 2]
    assert all(("residual", "layer.qkv") in b.live_pairs for b in bases)


@pytest.mark.parametrize("seed", range(8))
def test_the_overlap_mutation_puts_two_live_buffers_on_the_same_bytes(bases, seed):
    for base in bases:
        document = copy.deepcopy(base.document)
        memory = document["deployments"][0]["groups"][0]["memory"]
        assert overlaps(_arena_buffers(document), memory["arena_offsets"]) == []
        what = fuzzer.overlap(memory, base.live_pairs, random.Random(seed))
        moved, onto = what.split(" moved onto ")[0], what.split(" moved onto ")[1].split(" at ")[0]
        found = overlaps(_arena_buffers(document), memory["arena_offsets"])
        assert tuple(sorted((moved, onto))) in {tuple(sorted(pair)) for pair in found}
        assert memory["arena_offsets"][moved] == memory["arena_offsets"][onto]
        # still inside the arena: the overlap is the plan's only fault
        assert memory["arena_offsets"][moved] + memory["arena_sizes"][moved] <= memory["activations"]


def _control_locations(document, path=()) -> list[tuple]:
    """Paths of the strings (values, and keys as path + ("<key>",)) holding a character of CONTROLS."""
    found = []
    if isinstance(document, dict):
        for key, value in document.items():
            if any(c in key for c in fuzzer.CONTROLS):
                found.append((*path, "<key>"))
            found += _control_locations(value, (*path, key))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            found += _control_locations(value, (*path, index))
    elif isinstance(document, str) and any(c in document for c in fuzzer.CONTROLS):
        found.append(path)
    return found


def test_the_control_mutation_reaches_every_string_field_in_turn(bases, ctx):
    base = bases[1]
    targets = fuzzer.control_targets(base.document)
    strings = [p for p in fuzzer._paths(base.document) if p and isinstance(fuzzer._get(base.document, p), str)]
    assert {("spec_files", 0), ("deployments", 0, "name"), ("deployments", 0, "groups", 0, "gpu"),
            ("deployments", 0, "baselines", 0, "summary"), ("deployments", 0, "binding", 0)} <= set(strings)
    reached = []
    for turn in range(len(targets)):
        ctx.turns["control"] = turn
        document = copy.deepcopy(base.document)
        assert fuzzer.mutate_control(document, random.Random(turn), base, ctx) is not None
        reached.append(_control_locations(document))
    memory = ("deployments", 0, "groups", 0, "memory")
    alternative = ("deployments", 0, "alternatives", 0)
    assert reached == [[p] for p in strings] + [
        [(*memory, "arena_offsets", "<key>"), (*memory, "arena_sizes", "<key>")],  # one name, in both tables
        [(*alternative, "summary")], [(*alternative, "reason")], [("deployments", 0, "baselines", 0, "note")]]


def test_a_renamed_arena_buffer_keeps_its_offset_and_size(bases, ctx):
    document = copy.deepcopy(bases[0].document)
    memory = document["deployments"][0]["groups"][0]["memory"]
    before = sorted(zip(memory["arena_offsets"].values(), memory["arena_sizes"].values()))
    fuzzer.insert_control(document, fuzzer.ARENA_NAME, "\x1b[31m", random.Random(0))
    assert set(memory["arena_offsets"]) == set(memory["arena_sizes"])
    assert sorted(zip(memory["arena_offsets"].values(), memory["arena_sizes"].values())) == before
    assert sum("\x1b[31m" in name for name in memory["arena_offsets"]) == 1


@pytest.mark.parametrize("kind", sorted(fuzzer.MUTATIONS))
def test_every_mutation_kind_changes_a_base_plan(bases, ctx, kind):
    mutator = fuzzer.MUTATIONS[kind][0]
    for base in bases:
        for seed in range(5):
            document = copy.deepcopy(base.document)
            what = mutator(document, random.Random(seed), base, ctx)
            assert what and document != base.document, (kind, seed, what)


def test_spec_files_can_name_the_secret_outside_the_folder(bases, ctx):
    seen = set()
    for seed in range(40):
        document = copy.deepcopy(bases[0].document)
        fuzzer.mutate_spec_files(document, random.Random(seed), bases[0], ctx)
        seen.update(document["spec_files"])
    assert {str(ctx.secret), "../outside/secret.flow"} <= seen


def test_a_case_is_the_same_for_the_same_seed(bases, tmp_path):
    def cases(seed):
        ctx = fuzzer.Context(tmp_path / "outside", tmp_path / "escape")
        return [(c.base.name, c.mutations, c.plan, c.viz, c.sampled_run)
                for c in (fuzzer.make_case(i, seed, bases, ctx, 0.1) for i in range(30))]

    first = cases(4)
    assert first == cases(4) and first != cases(5)
    kinds = Counter(kind for _, mutations, *_ in first for kind, _ in mutations)
    assert len(kinds) >= 8


def test_the_gpu_twin_runs_every_group_on_nvidia(bases):
    twin = fuzzer.gpu_twin(bases[0].document)
    assert [g["vendor"] for g in twin["deployments"][0]["groups"]] == ["nvidia"]
    assert bases[0].document["deployments"][0]["groups"][0]["vendor"] == "cpu"


# ---------------------------------------------------------------------------------- oracle

def _result(label, code, stdout=b"", stderr=b"", **more):
    return fuzzer.Result(label, [label, "plan.json"], code, stdout=stdout, stderr=stderr, **more)


def _tokens_out(tokens: dict) -> bytes:
    return b"".join(json.dumps({"id": k, "output_token_ids": v, "finish_reason": "length"}).encode() + b"\n"
                    for k, v in tokens.items())


def test_the_oracle(bases):
    base = copy.copy(bases[0])
    base.tokens = {"a": [1, 2], "b": [3]}
    good = {"verify": _result("verify", 0), "run": _result("run", 0, _tokens_out(base.tokens))}
    assert fuzzer.judge(good, base) == []

    def causes(results):
        return [(f.cause, f.command) for f in fuzzer.judge(results, base)]

    internal = b"internal error: KeyError: 'x'\n  = note: this is a bug in flowc\n"
    assert causes({**good, "viz": _result("viz", 3, stderr=internal)}) == [("internal error (exit 3)", "viz")]
    assert causes({**good, "run": _result("run", 1)}) == [("verified plan does not run", "run")]
    other = _result("run", 0, _tokens_out({"a": [1, 2], "b": [4]}))
    assert causes({**good, "run": other}) == [("verified plan computes other tokens", "run")]
    assert causes({"verify": _result("verify", 1, stderr=b"error[F0524]: too big\n"), "run": other}) == []
    refused = _result("verify", 1, stderr=b"error[F0520]: `plan.json` is not a flowc plan (1 problem)\n")
    assert causes({"verify": refused, "export": _result("export", 0)}) == [("load-refused plan accepted", "export")]
    version = _result("verify", 1, stderr=b"error[F0520]: plan format_version `2.0` is not supported (this flowc ")
    assert causes({"verify": version, "run": _result("run", 0)}) == [("load-refused plan accepted", "run")]
    assert causes({**good, "viz": _result("viz", 0, b"tiny\x1b[31m")}) == [("raw control character", "viz")]
    assert causes({**good, "viz": _result("viz", 1, stderr="a\u202eb".encode())}) == [("raw control character", "viz")]
    assert causes({**good, "viz": _result("viz", 0, b"tabs\tand\nnewlines")}) == []
    leaked = _result("verify", 1, stderr=f"  2 | secret {fuzzer.SECRET}".encode())
    assert causes({"verify": leaked}) == [("secret file shown", "verify")]
    script = _result("export-gpu", 0, outputs={"out-gpu/x.sh": b"# \x00"}, strays=["wrote /tmp/escaped/g0.sh"])
    assert causes({"verify": refused, "export-gpu": script}) == [("wrote outside its output", "export-gpu"),
                                                                  ("raw control character", "export-gpu")]
    assert causes({**good, "run": _result("run", None, slow="ran past 9 s")}) == [("hang", "run")]
    assert causes({**good, "run": _result("run", None, slow="grew past 6 GiB")}) == [("memory", "run")]
    assert causes({**good, "viz": _result("viz", None, error="KeyError: 'x'")}) == [("exception escaped main", "viz")]
    # what the fuzzer prints of a failure is safe to print
    assert fuzzer.Failure("exit 3", "viz", "a\x1b[31mb\ud800").detail == "a\\x1b[31mb\\ud800"


def test_run_command_sees_files_written_outside_its_output(bases, tmp_path):
    folder = tmp_path / "case"
    folder.mkdir()
    (folder / "tiny-cpu.flow").write_bytes(bases[0].spec)
    result = fuzzer.run_command("compile", ["compile", "tiny-cpu.flow", "-o", "plan.json"], folder, (), tmp_path,
                                120, 6 * 2**30)
    assert result.code == 0 and result.outputs == {}
    assert result.strays == [f"wrote {folder / 'plan.json'}"]
    again = fuzzer.run_command("verify", ["verify", "plan.json"], folder, (), tmp_path, 120, 6 * 2**30)
    assert (again.code, again.strays, again.stdout) == (0, [], b"verified plan.json: ok\n")


def test_run_command_stops_a_run_past_its_timeout(bases, tmp_path):
    pytest.importorskip("torch")
    folder = tmp_path / "case"
    folder.mkdir()
    (folder / "plan.json").write_text(json.dumps(bases[1].document))  # tp 2: the run starts rank processes
    (folder / "prompts.jsonl").write_bytes(fuzzer.PROMPTS_JSONL)
    result = fuzzer.run_command("run", fuzzer.RUN, folder, (), tmp_path, 0.5, 6 * 2**30, fresh=True)
    assert result.slow == "ran past 0.5 s" and result.code is None


# ---------------------------------------------------------------------------------- the fuzzer

def test_a_short_run_of_the_plan_fuzzer_finds_nothing():
    pytest.importorskip("torch")
    # the watchdog is for hangs, not speed: generous, as a loaded CI machine runs an engine case slowly
    report = fuzzer.fuzz(plans=20, seed=3, run_share=0.1, timeout_s=600)
    assert len(report.outcomes) == 22 and all("run" in o.results for o in report.outcomes[:2])
    assert [(o.case.index, f.cause, f.command, f.detail[:200]) for o, f in report.failures] == []
