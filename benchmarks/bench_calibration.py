"""Calibrate this machine, then check the plan's predictions against a replay on it.

1. `flowc calibrate` writes a hardware profile of the local device (profile.flow).
2. The tiny-cpu example's spec, with its `cpu-local` device replaced by the profile's, is compiled.
3. `flowc run --replay` replays the spec's workload on the engine and simulates the same
   requests on the plan's instance; printed: measured and predicted mean TTFT and TPOT and
   the relative error of each (target: within 20%), before calibration (`cpu-local`'s
   estimated figures) and after. Replays on a shared 2-core machine vary by about 20% from run
   to run, so the calibrated spec is replayed five times and the median compared.

Run: python benchmarks/bench_calibration.py [--requests 64] [--repeats 10] [--replays 5]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import flowc
import flowc.cli
from flowc.calibrate import calibrate, summary

ROOT = Path(__file__).resolve().parents[1]


def calibrated_spec(example: str, profile_file: str, gpu: str) -> str:
    """The example with its `cpu-local` device replaced by the profile's."""
    return example.replace("use std.cpu_local", f'use "{profile_file}"').replace("gpu cpu-local x", f"gpu {gpu} x")


def replay(spec: Path, requests: int, capsys_file: Path) -> dict:
    plan = spec.with_suffix(".json")
    plan.write_text(flowc.compile(spec).model_dump_json())
    stdout = sys.stdout
    with capsys_file.open("w") as out:
        sys.stdout = out
        try:
            flowc.cli.main(["--json", "run", str(plan), "--replay", "--requests", str(requests)])
        finally:
            sys.stdout = stdout
    return json.loads(capsys_file.read_text())


def show(title: str, reports: list[dict]) -> None:
    """Each replay's mean TTFT and TPOT against the prediction, then the median replay's."""
    print(title)
    for metric in ("ttft_ms", "tpot_ms"):
        measured = sorted(r[metric]["measured"]["mean"] for r in reports)
        p = reports[0][metric]["predicted"]["mean"]  # the same requests every time: one prediction
        m = measured[len(measured) // 2]
        runs = ", ".join(f"{x:.2f}" for x in measured)
        print(f"  mean {metric[:4].upper()}: measured {m:7.2f} ms (median of {runs}), predicted {p:7.2f} ms, "
              f"error {(p - m) / m:+6.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--replays", type=int, default=5, help="replays after calibration (the median is compared)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        example = (ROOT / "examples" / "tiny-cpu.flow").read_text()
        before = folder / "before.flow"
        before.write_text(example)
        show("before calibration (cpu-local's estimated figures):",
             [replay(before, args.requests, folder / "out.json")])
        profile = calibrate(name="this-cpu", repeats=args.repeats)
        print("\n" + summary(profile))
        (folder / "profile.flow").write_text(profile.to_flow())
        after = folder / "after.flow"
        after.write_text(calibrated_spec(example, "profile.flow", "this-cpu"))
        show("\nafter `flowc calibrate`:",
             [replay(after, args.requests, folder / "out.json") for _ in range(args.replays)])


if __name__ == "__main__":
    main()
