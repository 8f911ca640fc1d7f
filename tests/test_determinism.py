"""The same spec compiles to the same plan, byte for byte, in separate processes under
different hash seeds (set and dict order, hash-keyed caches): plan files carry no wall-clock
figures, and only the compile time on `flowc compile`'s last line is left out (tools/determinism.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from unittest import mock

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_tool():
    spec = importlib.util.spec_from_file_location("determinism", REPO / "tools" / "determinism.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


determinism = _load_tool()


def _assert_identical(runs) -> None:
    found = determinism.differences(runs)
    assert not found, "\n".join(found)


def test_tiny_cpu_plan_and_text_are_identical_across_hash_seeds():
    runs = determinism.compile_under_seeds("examples/tiny-cpu.flow", ("0", "1", "12345", "random"))
    assert len(runs) == 4
    plan = json.loads(runs[0].plan)
    assert [d["name"] for d in plan["deployments"]] == ["tiny"]
    assert "compile_s" not in plan and "wall_s" not in plan["solver"]
    assert "deploy tiny" in runs[0].text and "compiled in <time>" in runs[0].text
    _assert_identical(runs)


def test_disaggregated_plan_is_identical_across_hash_seeds():
    runs = determinism.compile_under_seeds("examples/chat-70b.flow", ("0", "12345"))
    plan = json.loads(runs[0].plan)
    assert [d["mode"] for d in plan["deployments"]] == ["disaggregated"]  # what this test is here for
    _assert_identical(runs)


@pytest.mark.slow
@pytest.mark.parametrize("example", ["shared-cluster", "code-assistant-8b", "moe-h200"])
def test_every_example_is_identical_across_hash_seeds(example):
    _assert_identical(determinism.compile_under_seeds(f"examples/{example}.flow"))


# ------------------------------------------------------------------- the comparison itself

def _plan_document(**changes) -> str:
    plan = {"format_version": "1.5", "deployments": [{"name": "a", "gpus": 2}], "solver": {"status": "optimal"}}
    plan.update(changes)
    return json.dumps(plan, indent=2)


def test_plan_files_carry_no_wall_clock():
    import flowc
    from flowc.compiler.plan import Plan

    plan = flowc.compile(REPO / "examples" / "tiny-cpu.flow")
    assert plan.compile_s is None and plan.solver.wall_s is None  # the CLI times the compile itself
    written = json.loads(plan.model_dump_json())
    assert "compile_s" not in written and "wall_s" not in written["solver"]
    # a plan of format 1.4 that carries them still reads
    old = {**written, "compile_s": 5.9, "solver": {**written["solver"], "wall_s": 0.02}}
    assert Plan.model_validate(old) == plan


def test_a_changed_plan_field_is_reported_with_its_seed():
    same = determinism.Compiled("0", _plan_document(), "text")
    other = determinism.Compiled("1", _plan_document(deployments=[]), "text")
    assert determinism.differences([same, same]) == []
    [diff] = determinism.differences([same, other])
    assert "plan PYTHONHASHSEED=1" in diff and '-  "deployments": [' in diff


def test_text_timings_are_masked_and_nothing_else():
    line = "Plan: 2 deployments, 8 GPUs; solver optimal (gap 0.0%); compiled in 5.9 s."
    masked = "Plan: 2 deployments, 8 GPUs; solver optimal (gap 0.0%); compiled in <time>."
    assert determinism.without_timings(line) == masked
    assert determinism.without_timings("TTFT p99 94 ms, 17.88 req/s") == "TTFT p99 94 ms, 17.88 req/s"


def test_a_tree_edited_during_the_check_is_an_error_not_a_finding(monkeypatch):
    hashes = iter(["the tree before", "the tree after an edit"])
    monkeypatch.setattr(determinism, "_compiler_hash", lambda: next(hashes))
    monkeypatch.setattr(determinism, "compile_once", lambda spec, seed, folder: determinism.Compiled(seed, "{}", ""))
    with pytest.raises(RuntimeError, match="changed while x.flow was compiled"):
        determinism.compile_under_seeds("x.flow", ("0", "1"))


# ---------------------------------------------------------------------------------- arena

def test_arena_offsets_do_not_depend_on_the_machine_core_count():
    """A plan records its arena offsets, so they must not depend on the machine that compiled it.
    deepseek-v3 at tp 4 is a step graph where greedy misses the bound and CP-SAT runs."""
    from flowc.compiler.frontend.library import stdlib_spec
    from flowc.compiler.model.step_graph import step_buffers
    from flowc.compiler.optimize.arena import pack

    buffers = step_buffers(stdlib_spec().models["deepseek-v3"], 4, 2048, 64)
    layouts = []
    for cores in (1, 8):
        with mock.patch.object(os, "cpu_count", return_value=cores):
            layouts.append(pack(buffers))
    assert layouts[0].solver == "cp-sat" and layouts[0].size == layouts[1].size  # both optimal
    assert layouts[0].offsets == layouts[1].offsets
