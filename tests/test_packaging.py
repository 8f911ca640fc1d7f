"""Packaging: the package data an installed flowc needs (grammar, stdlib, error catalog)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_editable_install_has_its_package_data():
    assert resources.files("flowc.grammar").joinpath("flow.lark").is_file()
    stdlib = resources.files("flowc.stdlib")
    for module in ("gpus", "links", "models", "slos"):
        assert stdlib.joinpath(f"{module}.flow").is_file(), module
    errors = resources.files("flowc.compiler").joinpath("errors")
    assert errors.is_dir()
    markdown = [p.name for p in errors.iterdir() if p.name.endswith(".md")]
    if not markdown:
        pytest.skip("the error catalog (compiler/errors/*.md) is still empty")
    assert "F0101.md" in markdown


def test_std_modules_are_found_through_the_package():
    from flowc.compiler.frontend.imports import std_modules, std_source

    assert {"gpus", "links", "models", "slos", "cpu_local"} <= set(std_modules())
    assert "gpu h100-sxm" in std_source("gpus").text
    assert std_source("nope") is None


@pytest.mark.slow
def test_wheel_installs_and_runs_from_elsewhere(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for package in ("flowc", "compiler", "runtime", "stdlib", "grammar"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                    "-w", str(wheels), "-q"], check=True, cwd=tmp_path, timeout=300)
    (wheel,) = wheels.glob("flowc-*.whl")
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--target", str(target), "--no-deps", "-q", str(wheel)],
                   check=True, timeout=300)
    assert (target / "flowc" / "grammar" / "flow.lark").is_file()
    assert (target / "flowc" / "stdlib" / "gpus.flow").is_file()

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NO_COLOR")}
    env["PYTHONPATH"] = str(target)
    script = (
        "import flowc, os\n"
        "assert os.path.dirname(flowc.__file__).startswith(os.environ['PYTHONPATH']), flowc.__file__\n"
        "spec = flowc.load('use std.gpus\\nuse std.models\\n"
        "cluster c {\\n  node x 1 { gpu h100-sxm x 8 }\\n}\\n')\n"
        "print(spec.gpus['h100-sxm'].memory, 'llama-3.1-70b' in spec.models)\n"
        "try:\n"
        "    flowc.load('gpu g { memory = 1 }')\n"
        "except flowc.FlowError as e:\n"
        "    print(e.codes)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=work, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"{80 * 2**30} True", "['F0101']"]

    errors = target / "flowc" / "compiler" / "errors"
    if errors.is_dir() and any(errors.glob("*.md")):
        explain = subprocess.run([sys.executable, "-m", "flowc", "explain", "F0101"], cwd=work, env=env,
                                 capture_output=True, text=True, timeout=120)
        assert explain.returncode == 0, explain.stderr
        assert explain.stdout.startswith("F0101")
