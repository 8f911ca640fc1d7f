"""tools/fuzz_commands.py: a short deterministic run of both fuzzers finds nothing, and each
input the fuzzers found ending in an internal error is a regression test of its own."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

import flowc.cli
from flowc.compiler.plan_io import load_plan_file

REPO = Path(__file__).resolve().parents[1]


def load_fuzzer():
    spec = importlib.util.spec_from_file_location("fuzz_commands", REPO / "tools" / "fuzz_commands.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


fuzzer = load_fuzzer()


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = flowc.cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def plan_folder(tmp_path_factory) -> Path:
    """examples/tiny-cpu.flow and its compiled plan.json, in a folder to copy from."""
    folder = tmp_path_factory.mktemp("base")
    fuzzer.make_base(folder)
    return folder


def _copy(plan_folder: Path, tmp_path: Path) -> dict:
    for name in ("plan.json", "tiny-cpu.flow"):
        shutil.copy(plan_folder / name, tmp_path / name)
    return json.loads((tmp_path / "plan.json").read_text())


# ---------------------------------------------------------------------------------- the fuzzers

def test_a_short_run_of_both_fuzzers_finds_no_internal_error():
    pytest.importorskip("torch")
    # the watchdog is for hangs, not speed: generous, as a loaded CI machine runs an engine case slowly
    report = fuzzer.fuzz(compiles=20, files=100, seed=7, runs=4, large=False, timeout_s=900)
    kinds = {o.case.kind for o in report.outcomes}
    assert len(report.outcomes) == 120 and {"compile", "plan", "trace"} <= kinds
    assert [(o.case.argv, o.case.what, o.error or o.stderr[-300:]) for o in report.failures] == []
    assert not [o for o in report.outcomes if o.slow]


def test_numeric_literals_skip_names_strings_and_comments():
    text = 'model llama-3.1-8b { weights fp8 }  # 80 GiB\ngpu h100-sxm x 8\nprompt trace "a1.csv" max 512 tok\n'
    found = [text[a:b] for a, b in fuzzer.numeric_literals(text)]
    assert found == ["8", "512"]


def test_mutations_are_deterministic_per_seed():
    import random

    spec = (REPO / "examples" / "tiny-cpu.flow").read_text(encoding="utf-8")
    first = fuzzer.mutate_numbers(spec, random.Random(3))
    assert first == fuzzer.mutate_numbers(spec, random.Random(3)) and first[0] != spec


# ---------------------------------------------------------------------------------- regressions

def test_nan_in_a_plan_is_f0520(plan_folder, tmp_path, capsys):
    document = _copy(plan_folder, tmp_path)
    document["deployments"][0]["groups"][0]["capacity_rps"] = float("nan")
    (tmp_path / "plan.json").write_text(json.dumps(document))
    plan, found = load_plan_file(tmp_path / "plan.json")
    assert plan is None and [d.code for d in found] == ["F0520"]
    assert found[0].notes == ("at deployments[0].groups[0].capacity_rps: NaN is not a number",)
    code, _, err = run(capsys, "verify", str(tmp_path / "plan.json"))
    assert code == 1 and err.startswith("error[F0520]: `plan.json` is not a flowc plan (1 problem)")


@pytest.mark.parametrize("change, note", [
    (lambda g: g["memory"]["arena_offsets"].update(embed=10**30), "at deployments[0].groups[0].memory.arena_offsets"),
    (lambda g: g.update(tp=0), "at deployments[0].groups[0].tp: 0 is not from 1 to 16,777,216"),
    (lambda g: g["scheduler"].update(block_size=-16), "at deployments[0].groups[0].scheduler.block_size"),
    (lambda g: g["instances"][0]["gpus"].append({"node": 0, "index": 1}),
     "at deployments[0].groups[0].instances[0].gpus: 2 GPUs for tp 1 x pp 1"),
    (lambda g: g["instances"][0]["gpus"][0].update(index=-1),
     "at deployments[0].groups[0].instances[0].gpus[0]: GPU n0g-1 is outside cluster `laptop` (nodes 0 to 0; "
     "node 0: GPUs 0 to 0)"),
])
def test_plan_values_no_compiler_writes_are_f0520(plan_folder, tmp_path, change, note):
    """Regression: `flowc run` of a plan with an activation buffer far outside its arena ended
    in an internal error; values out of range are refused when the plan is read, for every
    command alike."""
    document = _copy(plan_folder, tmp_path)
    change(document["deployments"][0]["groups"][0])
    (tmp_path / "plan.json").write_text(json.dumps(document))
    plan, found = load_plan_file(tmp_path / "plan.json")
    assert plan is None and [d.code for d in found] == ["F0520"]
    assert found[0].notes[0].startswith(note)


def test_run_refuses_a_plan_with_a_buffer_outside_its_arena(plan_folder, tmp_path, capsys):
    pytest.importorskip("torch")
    document = _copy(plan_folder, tmp_path)
    memory = document["deployments"][0]["groups"][0]["memory"]
    memory["arena_offsets"][next(iter(memory["arena_offsets"]))] = 10**30
    (tmp_path / "plan.json").write_text(json.dumps(document))
    (tmp_path / "p.jsonl").write_bytes(fuzzer.PROMPTS_OK)
    code, _, err = run(capsys, "run", str(tmp_path / "plan.json"), "--prompts", str(tmp_path / "p.jsonl"))
    assert code == 1 and err.startswith("error[F0520]") and "internal error" not in err


def test_a_trace_with_a_nan_arrival_time_is_f0309(tmp_path, capsys):
    """Regression: a NaN arrival time passed the trace reader and the simulator never finished
    those requests (internal error)."""
    (tmp_path / "trace.flow").write_text(fuzzer.TRACE_SPEC)
    rows = fuzzer.TRACE_CSV.splitlines()
    rows[5] = "nan," + rows[5].split(",", 1)[1]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    code, _, err = run(capsys, "simulate", str(tmp_path / "trace.flow"))
    assert code == 1 and "error[F0309]" in err and "the arrival time (arrival_time) is not a finite number" in err


def test_a_config_json_value_of_the_wrong_type_is_an_error(plan_folder, tmp_path, capsys):
    """Regression: `max_position_embeddings: "x"` in config.json ended in an internal error
    (a TypeError comparing it with the plan's context)."""
    pytest.importorskip("torch")
    _copy(plan_folder, tmp_path)
    weights = fuzzer.save_tiny_llama(tmp_path / "w")
    (tmp_path / "p.jsonl").write_bytes(fuzzer.PROMPTS_OK)
    argv = ["run", str(tmp_path / "plan.json"), "--prompts", str(tmp_path / "p.jsonl"), "--weights", str(weights)]
    assert run(capsys, *argv)[0] == 0  # the checkpoint as written loads
    config = json.loads((weights / "config.json").read_text())
    (weights / "config.json").write_text(json.dumps({**config, "max_position_embeddings": "x"}))
    code, _, err = run(capsys, *argv)
    assert code == 1 and "max_position_embeddings is 'x', not a whole number of at least 1" in err


def test_a_workload_of_too_many_requests_is_f0307(tmp_path, capsys):
    """Regression: `requests 1e12 req` ended in an internal error (numpy could not allocate
    7 TiB for the arrival times)."""
    spec = tmp_path / "many.flow"
    spec.write_text(fuzzer.TOY_MODEL_SPEC.replace("requests 200 req", "requests 1e12 req"))
    code, _, err = run(capsys, "simulate", str(spec))
    assert code == 1 and "internal error" not in err
    assert "error[F0307]: workload `w` asks to simulate 1e+12 requests; flowc simulates at most 10,000,000" in err


def test_a_cluster_of_too_many_gpus_is_f0307(tmp_path, capsys):
    """Regression: `gpu toy-gpu x 1e12` made the placement list 5e11 link domains and grew the
    process past 14 GB before the fuzzer's watchdog could stop it; the checker now refuses it."""
    spec = tmp_path / "huge.flow"
    spec.write_text(fuzzer.TOY_MOE_SPEC.replace("gpu toy-gpu x 4", "gpu toy-gpu x 1e12"))
    code, _, err = run(capsys, "compile", str(spec), "--time-limit", "1")
    assert code == 1 and "internal error" not in err
    assert "error[F0307]: the number of GPUs per node is beyond the largest flowc takes" in err


def test_a_plan_asking_to_simulate_1e30_requests_is_f0520(tmp_path, capsys):
    """Regression (fuzz seed 12): `viz --format dot` of such a plan ended in an internal error."""
    plan = tmp_path / "plan.json"
    assert run(capsys, "compile", str(REPO / "examples" / "tiny-cpu.flow"), "-o", str(plan))[0] == 0
    document = json.loads(plan.read_text())
    document["deployments"][0]["predicted"]["requests"] = 10**30
    plan.write_text(json.dumps(document))
    code, _, err = run(capsys, "viz", str(plan), "--format", "dot")
    assert code == 1 and "internal error" not in err
    assert "predicted.requests: 1000000000000000000000000000000 is not a request count from 1 to 10,000,000" in err
