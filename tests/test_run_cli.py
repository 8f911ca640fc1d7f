"""`flowc run`: the tiny-cpu example compiled by the real compiler and executed by the engine."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import flowc.cli

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("torch")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = flowc.cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def plan(tmp_path_factory) -> Path:
    """examples/tiny-cpu.flow compiled into a plan next to a copy of the spec."""
    folder = tmp_path_factory.mktemp("tiny")
    spec = folder / "tiny-cpu.flow"
    shutil.copy(ROOT / "examples" / "tiny-cpu.flow", spec)
    path = folder / "plan.json"
    assert flowc.cli.main(["compile", str(spec), "-o", str(path)]) == 0
    return path


def test_prompts_file(capsys, plan, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join([
        json.dumps({"id": "a", "prompt_token_ids": [1, 2, 3, 4], "max_tokens": 6}),
        json.dumps({"id": "b", "prompt_token_ids": [9, 8, 7], "max_tokens": 4, "temperature": 0.7, "seed": 5}),
        "",
        "{not json",
        json.dumps({"id": "c", "prompt_token_ids": [1], "temperature": -2}),
        json.dumps({"id": "d", "prompt_token_ids": [1], "colour": "red"}),
    ]) + "\n")
    code, out, err = run(capsys, "run", str(plan), "--prompts", str(prompts))
    lines = {item["id"]: item for item in map(json.loads, out.splitlines())}
    assert code == 1  # some requests failed
    assert lines["a"]["finish_reason"] == "length" and len(lines["a"]["output_token_ids"]) == 6
    assert len(lines["b"]["output_token_ids"]) == 4 and lines["b"]["ttft_ms"] > 0
    assert lines["4"]["error"].startswith(f"{prompts}:4: not JSON")
    assert "temperature" in lines["c"]["error"]
    assert "unknown field 'colour'" in lines["6"]["error"]
    assert "ran 3 requests, 3 failed" in err


def test_greedy_output_is_reproducible(capsys, plan, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt_token_ids": [5, 6, 7], "max_tokens": 8}) + "\n")
    first = run(capsys, "run", str(plan), "--prompts", str(prompts))
    second = run(capsys, "run", str(plan), "--prompts", str(prompts), "--seed", "0")
    assert first[0] == 0
    assert json.loads(first[1])["output_token_ids"] == json.loads(second[1])["output_token_ids"]


def test_replay_reports_measured_next_to_predicted(capsys, plan):
    code, out, err = run(capsys, "--json", "run", str(plan), "--replay", "--requests", "6", "--time-scale", "0.1")
    report = json.loads(out)
    assert code == 0, err
    assert report["requests"] == 6 and report["errors"] == []
    for metric in ("ttft_ms", "tpot_ms"):
        assert report[metric]["measured"]["mean"] > 0
        assert report[metric]["predicted"]["p90"] >= report[metric]["predicted"]["p50"] > 0
    assert report["output_tokens_per_s"]["measured"] > 0


def test_user_mistakes_are_diagnosed(capsys, plan, tmp_path):
    code, _, err = run(capsys, "run", str(tmp_path / "nope.json"), "--replay")
    assert code == 2 and "does not exist" in err
    code, _, err = run(capsys, "run", str(plan), "--prompts", str(tmp_path / "nope.jsonl"))
    assert code == 2 and "does not exist" in err
    code, _, err = run(capsys, "run", str(plan), "--replay", "--time-scale", "0")
    assert code == 2 and "--time-scale" in err
    code, _, err = run(capsys, "run", str(plan), "--replay", "--weights", str(tmp_path))
    assert code == 1 and "config.json" in err and "Traceback" not in err


@pytest.mark.parametrize("data, words", [
    (b"\x00\x01\xff\xfe", "is not UTF-8 text (byte 0xff at offset 2)"),
    (b"", "holds no request"),
    (b"\n  \n", "holds no request"),
])
def test_a_prompts_file_that_is_not_requests_is_a_usage_error(capsys, plan, tmp_path, data, words):
    """Regression: a file that is not UTF-8 ended in an internal error; an empty one ran nothing
    and exited 0."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes(data)
    code, out, err = run(capsys, "run", str(plan), "--prompts", str(prompts))
    assert code == 2 and out == ""
    assert err.startswith(f"error: `{prompts}` {words}") and "internal error" not in err


def test_prompt_lines_of_the_wrong_types_are_request_errors(capsys, plan, tmp_path):
    """Regression: `"stop_token_ids": 5` ended in an internal error (tuple() of an int)."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join([
        json.dumps({"id": "ok", "prompt_token_ids": [1, 2], "max_tokens": 2}),
        json.dumps({"prompt_token_ids": [1], "stop_token_ids": 5}),
        json.dumps({"prompt_token_ids": [1], "id": {"a": 1}}),
        json.dumps({"prompt": 5}),
        json.dumps({"prompt_token_ids": [1, True]}),
    ]) + "\n")
    code, out, err = run(capsys, "run", str(plan), "--prompts", str(prompts))
    lines = {item["id"]: item for item in map(json.loads, out.splitlines())}
    assert code == 1 and "internal error" not in err
    assert len(lines["ok"]["output_token_ids"]) == 2
    assert lines["2"]["error"] == "stop_token_ids must be a list of token ids, got 5"
    assert lines["3"]["error"] == f"{prompts}:3: id must be a string or a number, got {{'a': 1}}"
    assert lines["4"]["error"].startswith(f"{prompts}:4: a text prompt needs a tokenizer")
    assert "prompt token 1 is True" in lines["5"]["error"]


def test_a_malformed_plan_is_f0520(capsys, plan, tmp_path):
    broken = tmp_path / "plan.json"
    broken.write_text(plan.read_text()[:200])
    code, _, err = run(capsys, "run", str(broken), "--prompts", str(broken))
    assert code == 1 and err.startswith("error[F0520]: `plan.json` is not valid JSON")


def test_triton_without_a_gpu_is_a_usage_error(capsys, plan, tmp_path, monkeypatch):
    """Regression: `--backend triton` on a machine without a GPU ended in Triton's internal
    error ("0 active drivers") after loading the model."""
    import torch

    from flowc.runtime.triton_shim import HAVE_TRITON

    if torch.cuda.is_available() or not HAVE_TRITON:
        pytest.skip("needs a machine without a CUDA device, with triton installed")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt_token_ids": [1]}) + "\n")
    code, _, err = run(capsys, "run", str(plan), "--prompts", str(prompts), "--backend", "triton")
    assert code == 2
    assert err.startswith("error: the triton kernel backend needs a CUDA GPU, and this runs on cpu")
    assert "TRITON_INTERPRET=1" in err


def _engine_import_fails(monkeypatch, error: ImportError) -> None:
    import builtins

    real = builtins.__import__

    def failing(name, *args, **kwargs):
        if name == "flowc.runtime.engine":
            raise error
        return real(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", failing)


def test_a_missing_torch_is_a_usage_error(capsys, plan, monkeypatch):
    _engine_import_fails(monkeypatch, ModuleNotFoundError("No module named 'torch'", name="torch"))
    code, _, err = run(capsys, "run", str(plan), "--replay", "--requests", "1")
    assert code == 2
    assert "the flowc runtime needs torch" in err and 'pip install "flowc[runtime]"' in err


def test_another_import_error_is_not_blamed_on_torch(capsys, plan, monkeypatch):
    _engine_import_fails(monkeypatch, ImportError("cannot import name 'Block'", name="flowc.runtime.blocks"))
    code, _, err = run(capsys, "run", str(plan), "--replay", "--requests", "1")
    assert code == 3  # a broken flowc install is an internal error, reported as one
    assert "needs torch" not in err and "cannot import name 'Block'" in err
