"""Front-end timings: parse + check of a large spec, `import flowc.cli`, `flowc check` of the
examples, and which heavy modules a check imports.

    python benchmarks/bench_frontend.py [--lines 2000] [--runs 5]

Prints each figure next to its target. A script, not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "ortools", "networkx", "triton", "rich", "pandas", "numpy")
TARGET_CHECK_S = 0.5
TARGET_IMPORT_S = 0.3


def group(i: int) -> str:
    """One set of declarations with unique names: about 50 lines."""
    return f"""\
## Benchmark GPU {i}
gpu bench-gpu-{i} {{
  vendor nvidia
  memory {80 + i % 4 * 16} GiB
  memory_bandwidth 3.35 TB/s
  flops bf16 989 TFLOP/s
  flops fp8 1978 TFLOP/s
  interconnect nvlink4
  host_link pcie5
  price 2.5 usd/h
}}

model bench-model-{i} {{
  architecture llama
  layers 32
  hidden 4096
  heads 32
  kv_heads 8
  ffn 14336
  vocab 128256
  max_context 131072 tok
  weights bf16
}}

cluster bench-cluster-{i} {{
  node x 2 {{
    gpu {"h100-sxm" if i % 2 else f"bench-gpu-{i}"} x 8
    host_memory 2 TiB
  }}
  network ib-ndr x 8
}}

workload bench-load-{i} {{
  arrival poisson {1 + i % 20} req/s
  prompt lognormal(median 1024 tok, sigma 0.6) max 8192 tok
  output uniform(16 tok, 1024 tok)
}}

slo bench-slo-{i} {{
  ttft p90 <= {200 + i} ms
  tpot p99 <= 50 ms
}}

deploy bench-deploy-{i} {{
  model {"llama-3.1-8b" if i % 3 == 0 else f"bench-model-{i}"} {{ weights fp8 }}
  on bench-cluster-{i}
  serve bench-load-{i} under {"chat" if i % 5 == 0 else f"bench-slo-{i}"}
  tp in [1, 2, 4, 8]
  max_batched_tokens in [2048 tok, 8192 tok]
}}
"""


def big_spec(lines: int) -> str:
    parts = ["use std.gpus\nuse std.links\nuse std.models\nuse std.slos\n"]
    i = 0
    while sum(p.count("\n") for p in parts) < lines:
        parts.append(group(i))
        i += 1
    return "\n".join(parts)


def run_python(code: str, cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, cwd=cwd, env=_env())
    return time.perf_counter() - start


def _env() -> dict:
    return {**os.environ, "NO_COLOR": "1"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    text = big_spec(args.lines)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        spec_path = tmp_dir / "big.flow"
        spec_path.write_text(text, encoding="utf-8")

        # 1. parse + check, in this process
        start = time.perf_counter()
        import flowc  # timed: the first load includes the imports

        spec = flowc.load(text)
        cold = time.perf_counter() - start
        flowc.load(text)  # warm-up
        warm = []
        for _ in range(args.runs):
            start = time.perf_counter()
            flowc.load(text)
            warm.append(time.perf_counter() - start)
        median = statistics.median(warm)
        print(f"spec: {text.count(chr(10))} lines, {len(spec.deployments)} deployments, {len(spec.gpus)} gpus, "
              f"{len(spec.models)} models, {len(spec.clusters)} clusters")
        print(f"parse+check (flowc.load), median of {args.runs}: {median:.3f} s   "
              f"target < {TARGET_CHECK_S} s   {'ok' if median < TARGET_CHECK_S else 'SLOW'}")
        print(f"parse+check, first cold run (imports included): {cold:.3f} s")
        print(f"  runs: {', '.join(f'{t:.3f}' for t in warm)}")

        # 2. import time of the CLI, in fresh interpreters
        run_python("pass", tmp_dir)
        run_python("import flowc.cli", tmp_dir)  # compile caches
        baseline = statistics.median(run_python("pass", tmp_dir) for _ in range(args.runs))
        imported = statistics.median(run_python("import flowc.cli", tmp_dir) for _ in range(args.runs))
        cost = imported - baseline
        print(f"import flowc.cli: {cost:.3f} s over a bare interpreter ({imported:.3f} - {baseline:.3f}), "
              f"median of {args.runs}   target < {TARGET_IMPORT_S} s   {'ok' if cost < TARGET_IMPORT_S else 'SLOW'}")
        result = subprocess.run([sys.executable, "-X", "importtime", "-c", "import flowc.cli"], cwd=tmp_dir,
                                capture_output=True, text=True, env=_env())
        rows = []
        for line in result.stderr.splitlines():
            if line.startswith("import time:") and "|" in line and "cumulative" not in line:
                _, cumulative, raw = line[len("import time:"):].split("|")
                name = raw.strip()
                if "." not in name and name not in ("flowc", "site", "encodings"):  # third-party roots
                    rows.append((int(cumulative), name))
        print("  heaviest packages imported (cumulative, one run): " + ", ".join(
            f"{name} {us / 1000:.0f} ms" for us, name in sorted(rows, reverse=True)[:6]))

        # 3. the heavy modules a check pulls in
        probe = (
            "import sys, flowc.cli\n"
            f"flowc.cli.main(['check', {str(spec_path)!r}])\n"
            f"print('HEAVY', ','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
        )
        result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_dir, capture_output=True, text=True,
                                env=_env())
        line = next((out for out in result.stdout.splitlines() if out.startswith("HEAVY")), "HEAVY ?")
        heavy = [m for m in line[len("HEAVY"):].strip().split(",") if m]
        print(f"heavy modules imported by `flowc check`: {', '.join(heavy) or 'none'}   "
              f"(of {', '.join(HEAVY)}; expected none)")

        # 4. `flowc check examples/*.flow` wall time
        examples = sorted(glob.glob(str(ROOT / "examples" / "*.flow")))
        if examples:
            times = []
            for _ in range(args.runs):
                start = time.perf_counter()
                result = subprocess.run([sys.executable, "-m", "flowc", "check", *examples], cwd=ROOT,
                                        capture_output=True, text=True, env=_env())
                times.append(time.perf_counter() - start)
            print(f"flowc check examples/*.flow ({len(examples)} files, exit {result.returncode}), "
                  f"median of {args.runs}: {statistics.median(times):.3f} s wall")
        else:
            print("flowc check examples/*.flow: no examples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
