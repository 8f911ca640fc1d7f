"""Predict each published end-to-end measurement of ../shared/calibration/e2e_dev.json and
print the error table. A development check: the cost model is fitted on operator data only,
and nothing here is tuned to these records.

Assumptions, the same for every record:
- ShareGPT-like lengths: lognormal prompts and outputs whose means match the one record that
  states them (224,442 input and 190,594 output tokens over 1,000 requests: sglang's
  bench_serving on ShareGPT), with sigma 1.0 (a heavy tail, as ShareGPT has), capped at 4096.
- "request rate R, N prompts": open-loop Poisson at R req/s with N requests; "RPS=inf, N
  prompts" or "offline": all N requests at t = 0 (capped at 2,000 to keep the run short);
  "light load": one request at a time.
- vLLM's ITL with multi-step scheduling (10 steps) is reported per scheduler step, so ITL rows
  compare with 10 x TPOT there and with TPOT elsewhere.

Run: python benchmarks/e2e_check.py [path/to/e2e_dev.json]
"""

from __future__ import annotations

import json
import math
import re
import statistics
import sys
from pathlib import Path

import numpy as np

from flowc.compiler.frontend.library import stdlib_spec
from flowc.compiler.model.cost import CostModel, Parallelism
from flowc.compiler.model.memory import memory_budget
from flowc.compiler.model.simulator import InstanceConfig, simulate
from flowc.compiler.model.workload import Requests

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "calibration" / "e2e_dev.json"
MODELS = {"Llama-3.1-8B-Instruct": "llama-3.1-8b", "Llama-3-8B": "llama-3.1-8b",
          "Llama-3.1-70B-Instruct": "llama-3.1-70b", "Llama-3.1-405B-FP8": "llama-3.1-405b"}
MEAN_PROMPT, MEAN_OUTPUT, SIGMA, CAP = 224.4, 190.6, 1.0, 4096
MAX_OFFLINE = 2000


def gpu_name(text: str) -> str:
    return "a100-sxm-80g" if text.startswith("A100") else "h100-sxm"


def sharegpt_like(n: int, rate: float | None, seed: int = 0) -> Requests:
    rng = np.random.default_rng(seed)

    def lengths(mean: float) -> np.ndarray:
        median = mean / math.exp(SIGMA**2 / 2)  # lognormal mean = median * exp(sigma^2 / 2)
        return np.clip(np.rint(rng.lognormal(math.log(median), SIGMA, n)), 1, CAP).astype(np.int64)

    prompt, output = lengths(MEAN_PROMPT), lengths(MEAN_OUTPUT)
    arrival = np.zeros(n) if rate is None else np.concatenate([[0.0], np.cumsum(rng.exponential(1 / rate, n - 1))])
    return Requests(arrival, prompt, output)


def load_of(record: dict) -> tuple[int, float | None, int | None]:
    """(requests, rate or None, closed-loop concurrency or None)."""
    text = record["concurrency_or_batch"]
    if "light load" in text:
        return 50, None, 1
    count = int(re.search(r"(\d+) (?:prompts|requests)", text).group(1))
    rate = re.search(r"(?:RPS|rate)\s*=?\s*([\d.]+)", text)
    if "inf" in text or "offline" in text or rate is None:
        return min(count, MAX_OFFLINE), None, None
    return count, float(rate.group(1)), None


def predict(record: dict) -> float:
    spec = stdlib_spec()
    model = spec.models[MODELS[record["model"]]]
    if "FP8" in record["model"]:
        model = model.model_copy(update={"weights": "fp8"})
    gpu = spec.gpus[gpu_name(record["gpu"])]
    tp = record["tp"] or record["gpu_count"]
    budget = memory_budget(model, gpu.memory, tp=tp)
    cost = CostModel(model, gpu, spec.links[gpu.interconnect], parallelism=Parallelism(tp=tp))
    instance = InstanceConfig(cost=cost, kv_capacity_tokens=budget.kv_tokens)
    n, rate, concurrency = load_of(record)
    result = simulate(sharegpt_like(n, rate), [instance], closed_loop_concurrency=concurrency)
    metric = record["metric"]
    if metric == "output_throughput":
        return result.output_throughput
    if metric == "median_TTFT":
        return result.percentile("ttft", 50) * 1e3
    if metric == "median_E2E_latency":
        return result.percentile("e2e", 50) * 1e3
    tpot = result.percentile("tpot", 50) * 1e3
    if metric == "median_ITL" and "num-scheduler-steps 10" in record["notes"]:
        return 10 * tpot
    return tpot


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT
    if not path.is_file():
        sys.exit(f"no dev set at {path} (it lives in ../shared/calibration, outside the repository)")
    records = json.loads(path.read_text())
    errors: dict[str, list[float]] = {}
    print(f"{'model':<24} {'gpus':>4} {'engine':<7} {'load':<28} {'metric':<20} "
          f"{'measured':>10} {'predicted':>10} {'error':>7}")
    for record in records:
        if record.get("kind") != "e2e" or record["model"] not in MODELS:
            continue
        predicted = predict(record)
        measured = float(record["value"])
        error = (predicted - measured) / measured
        engine = "vllm" if "engine=vLLM" in record["notes"] or record["notes"].startswith("engine=vLLM") else "sglang"
        metric = "TPOT" if record["metric"].startswith("TPOT") else record["metric"]
        errors.setdefault(metric, []).append(abs(error))
        print(f"{record['model']:<24} {record['gpu_count']:>4} {engine:<7} {record['concurrency_or_batch'][:28]:<28} "
              f"{metric:<20} {measured:>10.1f} {predicted:>10.1f} {error:>+7.0%}")
    print("\nmedian absolute error per metric:")
    for metric, values in sorted(errors.items()):
        print(f"  {metric:<20} {statistics.median(values):>6.0%}  ({len(values)} records)")


if __name__ == "__main__":
    main()
