"""flowc's plans against two baselines, all judged by the same simulator, and compile times.

The baselines are the ones every plan reports (`compiler/optimize/baselines.py`): vLLM-style
(replicas of the smallest instance that fits, at the engine's default settings) and, with
`allow disaggregation`, DistServe-style (the best prefill and decode instances in a balanced
mix), sized like the plan and measured with the plan's goodput definition; the compiler places
a baseline instead when it does better, so flowc's column is never below theirs in the
deployment's objective. Goodput is the highest arrival rate that sustains the SLO, per GPU.

Also: compile time of every example, and of generated specs (a 70B model on 8 and 16 GPUs, two
models on a 512-GPU cluster), with the solver's status.

Run: python benchmarks/bench_planner.py
"""

from __future__ import annotations

import time
from pathlib import Path

import flowc
from flowc.compiler.optimize.compile import compile_spec

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def per_gpu(plan_deployment, name: str) -> float | None:
    """A baseline's goodput per GPU, as the plan reports it (`optimize/baselines.py`)."""
    for b in plan_deployment.baselines:
        if b.name == name:
            return b.goodput_rps / b.gpus
    return None


def compare_examples() -> None:
    print(f"{'example':<22} {'deployment':<10} {'GPUs':>4} {'flowc':>8} {'vLLM-style':>10} {'DistServe':>9} "
          f"{'compile':>8}  solver   (goodput: req/s per GPU)")
    for path in sorted(EXAMPLES.glob("*.flow")):
        spec = flowc.load(path)
        start = time.perf_counter()
        plan = compile_spec(spec)
        took = time.perf_counter() - start
        for d in plan.deployments:
            vllm, distserve = per_gpu(d, "vLLM-style"), per_gpu(d, "DistServe-style")
            show = lambda x: f"{x:.3f}" if x is not None else "-"  # noqa: E731  (a one-line cell formatter)
            print(f"{path.stem:<22} {d.name:<10} {d.gpus:>4} {d.predicted.goodput_rps_per_gpu:>8.3f} "
                  f"{show(vllm):>10} {show(distserve):>9} {took:>7.1f}s  {plan.solver.status}")


GENERATED = """
use std.gpus
use std.models
use std.slos

cluster c {{
  node x {nodes} {{
    gpu h100-sxm x 8
  }}
  network ib-ndr x 8
}}

workload big {{
  arrival poisson {rate70} req/s
  prompt lognormal(median 1024 tok, sigma 0.6) max 8192 tok
  output lognormal(median 256 tok, sigma 0.8) max 2048 tok
}}

workload small {{
  arrival poisson {rate8} req/s
  prompt lognormal(median 512 tok, sigma 0.6) max 4096 tok
  output lognormal(median 128 tok, sigma 0.8) max 1024 tok
}}

slo relaxed {{
  ttft p90 <= 1 s
  tpot p90 <= 60 ms
}}

deploy large {{
  model llama-3.1-70b
  on c
  serve big under relaxed
  objective min gpus
  tp in [4, 8]
}}
{second}
"""

SECOND = """
deploy compact {
  model llama-3.1-8b
  on c
  serve small under relaxed
  objective min gpus
  tp in [1, 2]
}
"""


def compile_times() -> None:
    print("\ncompile time of generated specs:")
    cases = [("70B on 8 GPUs", dict(nodes=1, rate70=4, rate8=1, second="")),
             ("70B on 16 GPUs", dict(nodes=2, rate70=10, rate8=1, second="")),
             ("70B + 8B on 512 GPUs", dict(nodes=64, rate70=200, rate8=400, second=SECOND))]
    for label, values in cases:
        spec = flowc.load(GENERATED.format(**values))
        start = time.perf_counter()
        plan = compile_spec(spec, time_limit_s=60)
        took = time.perf_counter() - start
        used = ", ".join(f"{d.name} {d.gpus} GPUs" for d in plan.deployments)
        print(f"  {label:<22} {took:6.1f} s  solver {plan.solver.status} (gap {plan.solver.gap:.1%})  {used}")


if __name__ == "__main__":
    compare_examples()
    compile_times()
