"""The command line, run in-process through flowc.cli.main, and the Python API."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from flow_samples import VALID_SPEC

import flowc
import flowc.cli
from flowc.compiler.spec import Spec

ROOT = Path(__file__).resolve().parents[1]
INVALID = VALID_SPEC.replace("tp in [2, 4, 8]", "tp in [2, 3, 8]")
UNFORMATTED = "x  y {a 1;b   2}\n"
FORMATTED = "x y { a 1; b 2 }\n"


@pytest.fixture(autouse=True)
def _no_color_env(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.delenv("FLOWC_DEBUG", raising=False)


@pytest.fixture
def valid(tmp_path) -> Path:
    path = tmp_path / "valid.flow"
    path.write_text(VALID_SPEC, encoding="utf-8")
    return path


@pytest.fixture
def invalid(tmp_path) -> Path:
    path = tmp_path / "invalid.flow"
    path.write_text(INVALID, encoding="utf-8")
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = flowc.cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        flowc.cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"flowc {flowc.__version__}\n"
    assert flowc.__version__ == "0.1.0"


def test_no_command_is_a_usage_error(capsys):
    code, out, err = run(capsys)
    assert code == 2
    assert out == ""
    assert "usage: flowc" in err


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        flowc.cli.main(["frobnicate", "x.flow"])
    assert info.value.code == 2


def test_check_ok(capsys, valid):
    code, out, err = run(capsys, "check", str(valid))
    assert code == 0
    assert out == "checked 1 file: ok\n"
    assert err == ""


def test_check_invalid(capsys, monkeypatch, invalid):
    monkeypatch.chdir(invalid.parent)
    code, out, err = run(capsys, "check", "invalid.flow")
    assert code == 1
    assert out == ""
    assert "error[F0401]: tp 3 cannot split llama-3.1-70b's 64 attention heads (8 KV heads)" in err
    assert "--> invalid.flow:31:13" in err
    assert "31 |   tp in [2, 3, 8]" in err
    assert err.rstrip().endswith("checked 1 file: 1 of 1 failed")


def test_check_several_files(capsys, valid, invalid):
    code, out, err = run(capsys, "check", str(valid), str(invalid))
    assert code == 1
    assert "checked 2 files: 1 of 2 failed" in err


def test_check_json_on_success(capsys, valid):
    code, out, err = run(capsys, "check", "--json", str(valid))
    assert code == 0
    document = json.loads(out)
    assert document == {"format_version": "1.0", "valid": True, "error_count": 0, "warning_count": 0,
                        "diagnostics": []}
    assert err == ""


def test_check_json_on_failure(capsys, invalid):
    code, out, err = run(capsys, "check", "--json", str(invalid))
    assert code == 1
    document = json.loads(out)
    assert set(document) >= {"format_version", "valid", "error_count", "warning_count", "diagnostics"}
    assert document["valid"] is False
    assert document["error_count"] == 1
    (d,) = document["diagnostics"]
    assert (d["severity"], d["code"]) == ("error", "F0401")
    assert d["range"]["start"] == {"line": 31, "column": 13, "byte": INVALID.index("3, 8]")}
    assert d["snippet"]["code"] == "  tp in [2, 3, 8]"
    assert "\x1b[" not in out
    assert err == ""


def test_check_json_reports_warnings(capsys, tmp_path):
    path = tmp_path / "unused.flow"
    path.write_text(VALID_SPEC + "\nslo unused { ttft p90 <= 1 s }\n", encoding="utf-8")
    code, out, _ = run(capsys, "check", "--json", str(path))
    assert code == 0
    document = json.loads(out)
    assert document["valid"] is True
    assert document["warning_count"] == 1
    assert document["diagnostics"][0]["code"] == "W0201"


def test_global_json_option_before_the_command(capsys, valid):
    code, out, _ = run(capsys, "--json", "check", str(valid))
    assert code == 0
    assert json.loads(out)["valid"] is True


def test_missing_file_is_a_usage_error(capsys, tmp_path):
    code, out, err = run(capsys, "check", str(tmp_path / "nope.flow"))
    assert code == 2
    assert out == ""
    assert "does not exist" in err
    code, out, err = run(capsys, "check", "--json", str(tmp_path / "nope.flow"))
    assert code == 2
    assert json.loads(out)["valid"] is False


def test_directory_is_a_usage_error(capsys, tmp_path):
    code, _, err = run(capsys, "check", str(tmp_path))
    assert code == 2
    assert "is a directory" in err


def test_fmt_check(capsys, tmp_path):
    messy, tidy = tmp_path / "messy.flow", tmp_path / "tidy.flow"
    messy.write_text(UNFORMATTED, encoding="utf-8")
    tidy.write_text(FORMATTED, encoding="utf-8")
    code, out, err = run(capsys, "fmt", "--check", str(messy))
    assert code == 1
    assert f"would reformat {messy}" in err
    assert messy.read_text(encoding="utf-8") == UNFORMATTED
    code, out, err = run(capsys, "fmt", "--check", str(tidy))
    assert (code, out, err) == (0, "", "")


def test_fmt_diff_prints_a_unified_diff_and_changes_nothing(capsys, tmp_path):
    messy = tmp_path / "messy.flow"
    messy.write_text(UNFORMATTED, encoding="utf-8")
    code, out, _ = run(capsys, "fmt", "--diff", str(messy))
    assert code == 1
    assert out == f"--- a/{messy}\n+++ b/{messy}\n@@ -1 +1 @@\n-{UNFORMATTED}+{FORMATTED}"
    assert messy.read_text(encoding="utf-8") == UNFORMATTED


def test_fmt_rewrites_in_place(capsys, tmp_path):
    messy = tmp_path / "messy.flow"
    messy.write_text(UNFORMATTED, encoding="utf-8")
    code, out, err = run(capsys, "fmt", str(messy))
    assert code == 0
    assert out == ""
    assert err.startswith("formatted")
    assert messy.read_text(encoding="utf-8") == FORMATTED
    assert run(capsys, "fmt", str(messy)) == (0, "", "")


def test_fmt_on_a_syntax_error(capsys, tmp_path):
    bad = tmp_path / "bad.flow"
    bad.write_text("x y { a = 1 }\n", encoding="utf-8")
    code, out, err = run(capsys, "fmt", str(bad))
    assert code == 1
    assert "error[F0101]" in err
    assert bad.read_text(encoding="utf-8") == "x y { a = 1 }\n"


def test_schema(capsys):
    code, out, _ = run(capsys, "schema")
    assert code == 0
    schema = json.loads(out)
    assert {"Deployment", "GPU", "Cluster", "Model", "Workload", "SLO", "Link"} <= set(schema["$defs"])
    assert schema["title"] == "Spec"
    assert "tp" not in schema["$defs"]["Deployment"]["properties"]
    assert schema["$defs"]["Deployment"]["properties"]["search"]["type"] == "object"


def test_stdlib_listing_on_a_wide_terminal(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = run(capsys, "stdlib", "--no-color")
    assert code == 0
    assert "h100-sxm" in out
    assert "llama-3.1-70b" in out
    assert "deepseek-v3" in out
    assert "\x1b[" not in out


def test_stdlib_listing_piped_keeps_full_names(capsys, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    code, out, _ = run(capsys, "stdlib", "--no-color")
    assert code == 0
    assert "h100-sxm" in out
    assert "llama-3.1-70b" in out


def test_stdlib_listing_json(capsys):
    code, out, _ = run(capsys, "stdlib", "--json")
    assert code == 0
    document = json.loads(out)
    models = {m["name"]: m for m in document["models"]}
    gpus = {g["name"]: g for g in document["gpus"]}
    assert models["llama-3.1-70b"]["params_B"] == 70.55
    assert models["llama-3.1-70b"]["kv_KiB_per_token"] == 320.0
    assert models["deepseek-v3"]["experts"] == "8/256"
    assert gpus["h100-sxm"]["memory_GiB"] == 80.0
    assert gpus["h100-sxm"]["interconnect_GB_s"] == 450.0
    assert "nvlink4" in document["links"]


def test_explain(capsys):
    from flowc.compiler.diagnostics import known_codes

    if "F0101" not in known_codes():
        pytest.skip("the error catalog has no F0101.md yet")
    code, out, _ = run(capsys, "explain", "f0101")
    assert code == 0
    assert out.startswith("F0101")
    code, _, err = run(capsys, "explain", "F9999")
    assert code == 2
    assert "no diagnostic code `F9999`" in err


# ------------------------------------------------------------------ colors

def test_color_only_on_a_terminal(capsys, monkeypatch, invalid):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    _, _, err = run(capsys, "check", str(invalid))
    assert "\x1b[1;31merror[F0401]" in err


def test_no_color_option(capsys, monkeypatch, invalid):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    code, _, err = run(capsys, "check", "--no-color", str(invalid))
    assert code == 1
    assert "error[F0401]" in err
    assert "\x1b[" not in err


def test_no_color_environment(capsys, monkeypatch, invalid):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.setenv("NO_COLOR", "1")
    code, out, err = run(capsys, "check", str(invalid))
    assert code == 1
    assert "error[F0401]" in err
    assert "\x1b[" not in err + out
    code, out, err = run(capsys, "stdlib")
    assert code == 0
    assert "\x1b[" not in err + out


def test_no_color_when_piped(capsys, invalid):
    _, _, err = run(capsys, "check", str(invalid))
    assert "error[F0401]" in err
    assert "\x1b[" not in err


# ------------------------------------------------------------------ the Python API

def test_load_text_and_path(tmp_path, monkeypatch, valid):
    from_text = flowc.load(VALID_SPEC)
    from_path = flowc.load(valid)
    from_str_path = flowc.load(str(valid))
    assert isinstance(from_text, Spec) and isinstance(from_path, Spec)
    assert from_text.files == ["<spec>"]
    assert from_path.deployments["chatbot"].model.weights == "fp8"
    assert from_str_path.deployments.keys() == from_text.deployments.keys() == {"chatbot"}
    monkeypatch.chdir(tmp_path)
    assert flowc.load("valid.flow").clusters["lab"].total_gpus == 16


def test_load_invalid_text_raises_flow_error():
    with pytest.raises(flowc.FlowError) as info:
        flowc.load(INVALID)
    error = info.value
    assert [d.code for d in error.diagnostics] == ["F0401"] == error.codes
    assert isinstance(error.diagnostics[0], flowc.Diagnostic)
    assert error.diagnostics[0].span.line == 31
    assert "error[F0401]" in str(error)


def test_load_missing_path_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        flowc.load(tmp_path / "nope.flow")


# ------------------------------------------------------------------ what a check imports

def test_check_does_not_import_heavy_modules(valid):
    code = (
        "import sys, flowc.cli\n"
        f"rc = flowc.cli.main(['check', {str(valid)!r}])\n"
        "heavy = [m for m in ('torch', 'ortools', 'triton', 'networkx', 'pandas', 'numpy', 'rich') "
        "if m in sys.modules]\n"
        "print('RC', rc, 'HEAVY', ','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith("RC 0 HEAVY"), result.stdout + result.stderr
    heavy = set(filter(None, line.split("HEAVY", 1)[1].strip().split(",")))
    assert not heavy & {"torch", "ortools", "triton", "numpy"}, heavy


def test_caret_lines_up_under_tab_indented_code(capsys, tmp_path):
    path = tmp_path / "tabs.flow"
    path.write_text("use std.links\ngpu g {\n\tvendor nvidia\n\tmemory 80 G\n}\n", encoding="utf-8")
    code, _, err = run(capsys, "check", str(path))
    assert code == 1
    lines = err.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("4 |"))
    code_line, caret_line = lines[at].expandtabs(), lines[at + 1].expandtabs()
    assert caret_line.index("^") == code_line.rindex("G")


# ------------------------------------------------------------------ compile: nothing to compile

@pytest.mark.parametrize("text", ["", "# only a comment\n", "use std.gpus\ncluster c {\n  node x 1 {\n"
                                  "    gpu h100-sxm x 1\n  }\n}\n"])
def test_compile_of_a_spec_without_deployments_is_f0512(capsys, tmp_path, text):
    """Regression: an empty or comment-only spec ended in an internal error (max() of nothing)."""
    path = tmp_path / "nothing.flow"
    path.write_text(text, encoding="utf-8")
    code, out, err = run(capsys, "compile", str(path))
    assert code == 1 and out == ""
    assert err.startswith(f"error[F0512]: nothing to compile: `{path}` declares no `deploy` block")
    assert "internal error" not in err
    with pytest.raises(flowc.FlowError) as caught:
        flowc.compile(path)
    assert caught.value.codes == ["F0512"]


def test_simulate_of_a_spec_without_deployments_is_f0512(capsys, tmp_path):
    """It printed nothing and exited 0."""
    path = tmp_path / "nothing.flow"
    path.write_text("# only a comment\n", encoding="utf-8")
    code, out, err = run(capsys, "simulate", str(path))
    assert code == 1 and out == ""
    assert err.startswith(f"error[F0512]: nothing to simulate: `{path}` declares no `deploy` block")


@pytest.mark.parametrize("limit", ["0", "-1", "nan", "inf"])
def test_compile_time_limit_must_be_positive(capsys, valid, limit):
    code, _, err = run(capsys, "compile", str(valid), "--time-limit", limit)
    assert code == 2 and f"--time-limit must be a positive number of seconds (got {float(limit)})" in err
