"""The error catalog: every diagnostic code has an explanation and a fixture with golden output.

Layout (tests/error_catalog/):

- `CODE.flow` with `CODE.txt` and `CODE.json` next to it: a one-file spec whose first diagnostic is
  CODE. `CODE.txt` is what `flowc check --no-color CODE.flow` prints (stderr, then stdout) and
  `CODE.json` what `flowc check --json CODE.flow` prints on stdout, both run in
  tests/error_catalog/ on the bare file name.
- `CODE/main.flow` with `CODE/expected.txt` and `CODE/expected.json`: the same for codes that need
  several files (imports, traces), run inside CODE/.
- `CODE/main.flow` with `CODE/plan.json` next to it (plan fixtures, the F052x codes of the
  verifier): a valid spec and a plan whose first diagnostic is CODE. `CODE/expected.txt` is what
  `flowc verify --no-color plan.json --against main.flow` prints (stderr, then stdout) and
  `CODE/expected.json` what `flowc verify --json plan.json --against main.flow` prints on stdout,
  run inside CODE/.
- `CODE.flow` for the codes of `flowc compile` (COMPILE_CODES): a spec that checks clean and
  fails to compile; the goldens are what `flowc compile` prints.
- `CODE/benchmark.json` with `CODE/expected.txt` and `CODE/expected.json` (serving-benchmark
  results, F06xx): what `flowc calibrate --no-color --from-benchmark benchmark.json` (and
  `--json`) prints for the standard library model and GPU of BENCHMARK_ARGS, run inside CODE/.
- Other entries (such as `F0207_shared/`, a file that F0207's fixture imports from outside its
  tree) are not fixtures.

Messages name paths relative to the working directory; should an absolute path slip in, the
test maps the fixture's directory to `$DIR` (and tests/error_catalog to `$DIR/..`), so goldens
stay the same on every machine.

Regenerate the goldens after changing a message on purpose, then review the diff:

    FLOWC_UPDATE_GOLDEN=1 python -m pytest tests/test_error_catalog.py -q
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from flowc.cli import main
from flowc.compiler.diagnostics import explanation, known_codes

ROOT = Path(__file__).resolve().parent.parent
CATALOG = Path(__file__).resolve().parent / "error_catalog"
ERRORS = ROOT / "compiler" / "errors"
UPDATE = os.environ.get("FLOWC_UPDATE_GOLDEN") == "1"
CODE = re.compile(r"[FW]0\d{3}")
CODE_LITERAL = re.compile(r"""["']([FW]0\d{3})["']""")


def _documented() -> list[str]:
    return sorted(p.stem for p in ERRORS.glob("*.md") if CODE.fullmatch(p.stem))


def _raised() -> set[str]:
    sources = [*ROOT.joinpath("compiler").rglob("*.py"), *ROOT.joinpath("flowc").glob("*.py")]
    return {code for path in sources for code in CODE_LITERAL.findall(path.read_text(encoding="utf-8"))}


def _fixture(code: str) -> tuple[Path, str, Path, Path] | None:
    """(working directory, file to check, text golden, JSON golden) of a code's fixture."""
    single = CATALOG / f"{code}.flow"
    if single.is_file():
        return CATALOG, single.name, CATALOG / f"{code}.txt", CATALOG / f"{code}.json"
    folder = CATALOG / code
    for name in ("main.flow", "benchmark.json"):
        if (folder / name).is_file():
            return folder, name, folder / "expected.txt", folder / "expected.json"
    return None


def _plan_fixture(code: str) -> bool:
    return (CATALOG / code / "plan.json").is_file()


def _benchmark_fixture(code: str) -> bool:
    return (CATALOG / code / "benchmark.json").is_file()


BENCHMARK_ARGS = ["--model", "llama-3.1-8b", "--gpu", "h100-sxm"]


def _fixtures() -> list[str]:
    found = {p.stem for p in CATALOG.glob("*.flow")} | {p.name for p in CATALOG.iterdir() if p.is_dir()}
    return sorted(code for code in found if CODE.fullmatch(code))


# Codes that `flowc compile` raises on a spec that checks clean; the others come from `check`.
COMPILE_CODES = {"F0510", "F0511", "F0512"}
DOCUMENTED = _documented()
FIXTURES = _fixtures()


# ---------------------------------------------------------------------------------- explanations

@pytest.mark.parametrize("code", DOCUMENTED)
def test_explanation(code):
    text = explanation(code)
    assert text is not None, f"`flowc explain {code}` finds no explanation"
    first, blank, *rest = text.splitlines()
    assert re.fullmatch(rf"{code}: \S.*", first), f"{code}.md must start with `{code}: title`"
    assert blank == "", f"{code}.md: the title line is followed by a blank line"
    assert "Erroneous example" in text and "Fix" in text, f"{code}.md needs an example and its fix"
    assert text.endswith("\n") and len(rest) <= 30
    assert _fixture(code) is not None, f"{code} has no fixture in tests/error_catalog"


def test_every_raised_code_is_documented():
    raised = _raised()
    assert len(raised) > 30  # the regex still finds the codes
    assert sorted(raised - set(DOCUMENTED)) == [], "codes raised in the sources without errors/CODE.md"
    assert sorted(set(DOCUMENTED) - raised) == [], "errors/CODE.md for codes no source raises"


def test_catalog_is_packaged():
    assert known_codes() == DOCUMENTED


def test_every_fixture_is_documented():
    assert FIXTURES == DOCUMENTED


# ---------------------------------------------------------------------------------- fixtures

def _stable(text: str, workdir: Path) -> str:
    """Replace absolute paths of the fixture's directory (and of the catalog) with `$DIR`."""
    for real, shown in ((workdir, "$DIR"), (CATALOG, "$DIR/..")):
        for form in {str(real), str(real.resolve())}:
            for spelled in (form, json.dumps(form)[1:-1]):
                # not when the path goes on as a longer name: F0207 must not match F0207_shared
                text = re.sub(re.escape(spelled) + r"(?![\w.-])", lambda _: shown, text)
    return text


def _run(args: list[str], workdir: Path, monkeypatch, capsys) -> tuple[int, str, str]:
    monkeypatch.chdir(workdir)
    monkeypatch.delenv("NO_COLOR", raising=False)
    capsys.readouterr()
    status = main(args)
    out, err = capsys.readouterr()
    return status, _stable(out, workdir), _stable(err, workdir)


def _compare(golden: Path, actual: str) -> None:
    if UPDATE:
        golden.write_text(actual, encoding="utf-8")
        return
    assert golden.is_file(), f"no golden {golden.relative_to(ROOT)}: run with FLOWC_UPDATE_GOLDEN=1"
    assert actual == golden.read_text(encoding="utf-8"), f"output differs from {golden.relative_to(ROOT)}"


def _check_outputs(code: str, as_json: tuple[int, str, str], as_text: tuple[int, str, str], json_golden: Path,
                   text_golden: Path, status: int = 1) -> None:
    """A fixture's command run with --json and with --no-color, (status, stdout, stderr) each:
    the exit status, the fixture's code first, and both outputs as their goldens."""
    got, out, err = as_json
    document = json.loads(out)
    assert got == status
    assert err == ""
    assert document["diagnostics"], "the fixture produced no diagnostic"
    assert document["diagnostics"][0]["code"] == code, "the first diagnostic is not the fixture's code"
    _compare(json_golden, out)
    got, out, err = as_text
    assert got == status
    assert re.match(rf"{'warning' if code.startswith('W') else 'error'}\[{code}\]", err)
    _compare(text_golden, err + out)


@pytest.mark.parametrize("code", [code for code in FIXTURES if _plan_fixture(code)])
def test_plan_fixture(code, monkeypatch, capsys):
    workdir, name, text_golden, json_golden = _fixture(code)
    # the spec itself is valid: the mistake is in the plan
    assert _run(["check", name], workdir, monkeypatch, capsys)[0] == 0

    _check_outputs(code, _run(["verify", "--json", "plan.json", "--against", name], workdir, monkeypatch, capsys),
                   _run(["verify", "--no-color", "plan.json", "--against", name], workdir, monkeypatch, capsys),
                   json_golden, text_golden)


@pytest.mark.parametrize("code", [code for code in FIXTURES if _benchmark_fixture(code)])
def test_benchmark_fixture(code, monkeypatch, capsys):
    workdir, name, text_golden, json_golden = _fixture(code)
    command = ["calibrate", "--from-benchmark", name, *BENCHMARK_ARGS]

    _check_outputs(code, _run(["--json", *command], workdir, monkeypatch, capsys),
                   _run(["--no-color", *command], workdir, monkeypatch, capsys), json_golden, text_golden)


@pytest.mark.parametrize("code", [c for c in FIXTURES if not (_plan_fixture(c) or _benchmark_fixture(c))])
def test_fixture(code, monkeypatch, capsys):
    workdir, name, text_golden, json_golden = _fixture(code)
    command = "compile" if code in COMPILE_CODES else "check"
    if command == "compile":  # the spec itself is valid: only compiling it fails
        assert _run(["check", name], workdir, monkeypatch, capsys)[0] == 0

    _check_outputs(code, _run([command, "--json", name], workdir, monkeypatch, capsys),
                   _run([command, "--no-color", name], workdir, monkeypatch, capsys), json_golden, text_golden,
                   status=0 if code.startswith("W") else 1)


# ---------------------------------------------------------------------------------- flowc explain

def test_explain_prints_the_explanation(capsys):
    status = main(["explain", "F0302"])
    out, err = capsys.readouterr()
    assert status == 0
    assert out == (ERRORS / "F0302.md").read_text(encoding="utf-8")
    assert err == ""


def test_explain_lowercase_code(capsys):
    assert main(["explain", "f0302"]) == 0
    assert capsys.readouterr().out.startswith("F0302: ")


def test_explain_unknown_code(capsys):
    status = main(["explain", "F9999"])
    out, err = capsys.readouterr()
    assert status == 2
    assert out == ""
    assert "no diagnostic code `F9999`" in err
    assert re.search(r"help: (did you mean `[FW]0\d{3}`\?|codes look like)", err)
