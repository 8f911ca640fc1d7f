"""Compile specs in separate processes under different hash seeds and report any difference.

    python tools/determinism.py examples/tiny-cpu.flow examples/shared-cluster.flow
    python tools/determinism.py --seeds 0,1,12345,random examples/chat-70b.flow

Plan files carry no wall-clock figures, so they must be byte-identical; in `flowc compile`'s
text the compile time on its last line is left out of the comparison. Exit status:
0 when every spec compiles to the same plan and text under every seed, 1 otherwise. The
compiles run from the installed tree: one edited during the check is an error, not a finding.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HASH_SEEDS = ("0", "1", "12345", "random")
# `...; compiled in 5.9 s.`: the compile's wall-clock in the text
TIMINGS = re.compile(r" in \d+(\.\d+)? s\b")


@dataclass(frozen=True)
class Compiled:
    hash_seed: str
    plan: str  # the plan file, as written
    text: str  # `flowc compile`'s stdout, timings removed


def without_timings(text: str) -> str:
    return TIMINGS.sub(" in <time>", text)


def compile_once(spec: str, hash_seed: str, folder: Path) -> Compiled:
    """`flowc compile SPEC -o PLAN` in a fresh interpreter with PYTHONHASHSEED=hash_seed."""
    out = folder / f"plan-{hash_seed}.json"
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "NO_COLOR": "1", "COLUMNS": "120"}
    done = subprocess.run([sys.executable, "-m", "flowc", "compile", spec, "-o", str(out)], env=env, cwd=REPO,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"flowc compile {spec} (PYTHONHASHSEED={hash_seed}) exited {done.returncode}:\n"
                           + done.stderr)
    text = done.stdout.replace(str(out), "<plan>")
    return Compiled(hash_seed, out.read_text(encoding="utf-8"), without_timings(text))


def compile_under_seeds(spec: str, hash_seeds=HASH_SEEDS) -> list[Compiled]:
    """One compile per hash seed. A tree edited meanwhile (by a colleague, an editor's save)
    would pass for nondeterminism: that is an error instead."""
    before = _compiler_hash()
    with tempfile.TemporaryDirectory(prefix="flowc-determinism-") as folder:
        runs = [compile_once(spec, seed, Path(folder)) for seed in hash_seeds]
    if _compiler_hash() != before:
        raise RuntimeError(f"the compiler's source changed while {spec} was compiled: run the check again")
    return runs


def _compiler_hash() -> str:
    """The hash autotune keys its cache by (the compiler, the stdlib, the grammar), read now."""
    from flowc.autotune import _CODE, _code_files, _files_hash

    return _files_hash(_code_files(_CODE["simulate"]))


def differences(runs: list[Compiled]) -> list[str]:
    """Unified diffs of every run's plan and text against the first run's (empty: identical)."""
    first, found = runs[0], []
    for run in runs[1:]:
        for what in ("plan", "text"):
            a, b = getattr(first, what), getattr(run, what)
            if a != b:
                found.append("".join(difflib.unified_diff(
                    a.splitlines(keepends=True), b.splitlines(keepends=True),
                    f"{what} PYTHONHASHSEED={first.hash_seed}", f"{what} PYTHONHASHSEED={run.hash_seed}")))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("specs", nargs="+")
    parser.add_argument("--seeds", default=",".join(HASH_SEEDS), help="PYTHONHASHSEED values, comma-separated")
    args = parser.parse_args()
    failed = False
    for spec in args.specs:
        found = differences(compile_under_seeds(spec, args.seeds.split(",")))
        print(f"{spec}: " + ("identical" if not found else f"{len(found)} difference(s)"))
        for diff in found:
            print(diff)
        failed = failed or bool(found)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
