"""flowc's plans against two baselines, all judged by the same simulator, and compile times.

Baselines, per deployment, on the GPUs the flowc plan uses (so per-GPU figures compare):
- vLLM-style default: the smallest TP that holds the weights and the longest request,
  colocated, replicated over those GPUs;
- DistServe-style: the prefill and the decode candidate with the best capacity per GPU (each
  phase searched alone, no placement constraints), split over those GPUs in proportion to the
  GPUs each phase needs per request.
Goodput is the highest arrival rate meeting the SLO (bisection), divided by the GPUs.

Also: compile time of every example, and of generated specs (a 70B model on 8 and 16 GPUs, two
models on a 512-GPU cluster), with the solver's status.

Run: python benchmarks/bench_planner.py
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import flowc
from flowc.compiler.model.goodput import goodput_search
from flowc.compiler.model.workload import sample_requests
from flowc.compiler.optimize.candidates import CAPACITY_REQUESTS, measure
from flowc.compiler.optimize.compile import compile_spec

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _goodput_per_gpu(configs, requests, slo) -> float:
    gpus = sum(c.pp * c.cost.parallelism.tp for c in configs)
    return goodput_search(configs, lambda scale: requests.scaled(scale), slo).goodput / gpus


def _config(measured, role=None):
    return replace(measured.config, role=role or measured.config.role)


def baselines(spec, deployment, gpus: int) -> tuple[float | None, float | None]:
    requests = sample_requests(spec.workloads[deployment.workload], CAPACITY_REQUESTS)
    slo = spec.slos[deployment.slo]
    measured, _, _ = measure(spec, deployment, requests, seed=0)
    colocated = [m for m in measured if m.candidate.role == "colocated"]
    vllm = None
    if colocated:
        smallest = min(colocated, key=lambda m: (m.candidate.gpus, m.candidate.tp))
        replicas = max(1, gpus // smallest.candidate.gpus)
        vllm = _goodput_per_gpu([_config(smallest)] * replicas, requests, slo)
    prefill = [m for m in measured if m.candidate.role == "prefill"]
    decode = [m for m in measured if m.candidate.role == "decode"]
    distserve = None
    if prefill and decode:
        best_p = max(prefill, key=lambda m: m.candidate.capacity_rps / m.candidate.gpus)
        best_d = max(decode, key=lambda m: m.candidate.capacity_rps / m.candidate.gpus)
        need_p = best_p.candidate.gpus / best_p.candidate.capacity_rps  # GPUs per req/s of each phase
        need_d = best_d.candidate.gpus / best_d.candidate.capacity_rps
        n_p = max(1, round(gpus * need_p / (need_p + need_d) / best_p.candidate.gpus))
        n_d = max(1, (gpus - n_p * best_p.candidate.gpus) // best_d.candidate.gpus)
        distserve = _goodput_per_gpu([_config(best_p)] * n_p + [_config(best_d)] * n_d, requests, slo)
    return vllm, distserve


def compare_examples() -> None:
    print(f"{'example':<22} {'deployment':<10} {'GPUs':>4} {'flowc':>8} {'vLLM-style':>10} {'DistServe':>9} "
          f"{'compile':>8}  solver   (goodput: req/s per GPU)")
    for path in sorted(EXAMPLES.glob("*.flow")):
        spec = flowc.load(path)
        start = time.perf_counter()
        plan = compile_spec(spec)
        took = time.perf_counter() - start
        for d in plan.deployments:
            vllm, distserve = baselines(spec, spec.deployments[d.name], d.gpus)
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
        print(f"  {label:<22} {took:6.1f} s  solver {plan.solver.status} (gap {plan.solver.gap:.1%}, "
              f"{plan.solver.wall_s:.2f} s)  {used}")


if __name__ == "__main__":
    compare_examples()
    compile_times()
