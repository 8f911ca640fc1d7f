"""Dependencies run one way: each room of the compiler imports only the rooms below it, the
runtime only the plan contract and the shared geometry, library code never the CLI, and
nothing in compiler/ or runtime/ prints or exits. Imports are read from the source (module
level and inside functions alike), so a lazy import that goes the wrong way fails too."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"compiler": "flowc.compiler", "runtime": "flowc.runtime", "flowc": "flowc"}

# The compiler's rooms, in the order data flows, with what each may import besides itself.
BASE = {"flowc.compiler.diagnostics", "flowc.compiler.source", "flowc.compiler.units", "flowc.compiler.version"}
IR = {"flowc.compiler.spec", "flowc.compiler.plan"}
ALLOWED = {
    "base": {"base"},
    "ir": {"base", "ir"},
    "model": {"base", "ir", "model"},
    # reading a plan checks it against the model it carries (geometry, parallelism, step graph)
    "plan_io": {"base", "ir", "model"},
    "frontend": {"base", "ir", "model", "frontend"},
    "verify": {"base", "ir", "model", "verify"},
    "optimize": {"base", "ir", "model", "verify", "optimize"},
    "render": {"base", "ir", "model", "verify", "render"},
}
# The runtime's contract with the compiler: the plan schema (with the model it carries) and the
# geometry arithmetic both sides must agree on.
RUNTIME_MAY_IMPORT = {"flowc.compiler.plan", "flowc.compiler.plan_io", "flowc.compiler.spec", "flowc.compiler.units",
                      "flowc.compiler.model.geometry", "flowc.compiler.model.parallelism"}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((package, *parts))] = path
    return out


def _imports(name: str, path: Path) -> set[str]:
    """Every flowc module `name` imports (`from X import y` counts X.y when that is a module)."""
    modules = _modules()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules)
    return {m for m in found if m == "flowc" or m.startswith("flowc.")}


def _room(module: str) -> str | None:
    if module in BASE:
        return "base"
    if module in IR:
        return "ir"
    parts = module.split(".")
    if len(parts) >= 3 and parts[:2] == ["flowc", "compiler"] and parts[2] in ALLOWED:
        return parts[2]
    return None


MODULES = _modules()


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m.startswith("flowc.compiler.")))
def test_compiler_rooms_import_only_downward(name):
    room = _room(name)
    assert room is not None, f"{name} belongs to no room: add it to one (tests/test_layering.py)"
    for imported in _imports(name, MODULES[name]):
        assert imported.startswith("flowc.compiler"), f"{name} imports {imported}: the compiler sits below flowc/"
        target = _room(imported)
        if target is None:  # `flowc.compiler` itself (the package)
            continue
        assert target in ALLOWED[room], f"{name} ({room}) imports {imported} ({target})"


def test_the_verifier_is_independent_of_the_optimizer():
    for name in (m for m in MODULES if m.startswith("flowc.compiler.verify")):
        assert not any(i.startswith("flowc.compiler.optimize") for i in _imports(name, MODULES[name])), name


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m.startswith("flowc.runtime")))
def test_the_runtime_imports_only_the_plan_contract(name):
    for imported in _imports(name, MODULES[name]):
        assert imported.startswith("flowc.runtime") or imported in RUNTIME_MAY_IMPORT, (
            f"{name} imports {imported}: the runtime reads the plan and the shared geometry only")


CLI = {"flowc.cli", "flowc.__main__"}


@pytest.mark.parametrize("name", sorted(m for m in MODULES if not m.endswith("_cmd") and m not in CLI))
def test_library_code_never_imports_a_command(name):
    for imported in _imports(name, MODULES[name]):
        assert not imported.endswith("_cmd") and imported not in CLI, f"{name} imports the command {imported}"


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m.startswith(("flowc.compiler", "flowc.runtime"))))
def test_library_code_never_prints_or_exits(name):
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id not in ("print", "exit", "quit"), f"{name}:{node.lineno} calls {node.func.id}"
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "sys":
            assert node.attr not in ("exit", "stdout", "stderr"), f"{name}:{node.lineno} uses sys.{node.attr}"


def _loaded_by(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(result.stdout.split())


def test_importing_the_runtime_loads_no_parser():
    loaded = _loaded_by("import flowc.runtime.engine")
    assert not {"lark", "flowc.compiler.frontend.parser", "ortools", "matplotlib"} & loaded
    assert not any(m.startswith(("flowc.compiler.frontend", "flowc.compiler.optimize")) for m in loaded)


def test_a_wrong_import_is_caught(tmp_path, monkeypatch):
    """The rule above can fail: a model module that imports the optimizer is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from flowc.compiler.optimize.arena import pack\n", encoding="utf-8")
    imports = _imports("flowc.compiler.model.bad", bad)
    assert "flowc.compiler.optimize.arena" in imports
    assert _room("flowc.compiler.optimize.arena") not in ALLOWED["model"]
