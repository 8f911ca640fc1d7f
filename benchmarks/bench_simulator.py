"""Simulator speed: requests simulated per second for one 70B-at-TP4 instance under Poisson
load, the time of one goodput bisection, and how the time grows with requests and replicas.

    python benchmarks/bench_simulator.py [--requests 100000] [--load 0.85] [--runs 3]

Uses `compiler.cost.CostModel` (Llama-3.1-70B, H100 SXM, TP4) when it can be imported, else a
linear stand-in with the same shape (see `StandInCost`). Prints each figure next to its
target. A script, not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from flowc.compiler import spec
from flowc.compiler.model.goodput import goodput_search
from flowc.compiler.model.simulator import InstanceConfig, simulate
from flowc.compiler.model.workload import Requests, sample_requests

TARGET_100K_S = 2.0
TARGET_ESTIMATE_MS = 20
TARGET_GOODPUT_S = 1.0


class StandInCost:
    """Llama-3.1-70B at TP4 on H100 SXM, to first order: a step reads the weights once
    (35 GB per GPU at ~2.7 TB/s: 13 ms), spends ~58 us of compute per token (140 GFLOP at
    ~600 TFLOP/s per GPU x 4) and reads 80 KB of KV per GPU per key attended (3e-8 s)."""

    calibrated = False
    wake_time = 0.0

    def step_time(self, tokens, prefill_attn_pairs, decode_seqs, decode_kv_tokens):
        return 0.013 + 5.8e-5 * tokens + 3e-8 * decode_kv_tokens + 1e-10 * prefill_attn_pairs

    def prefill_pairs(self, new_tokens, past_tokens):
        return new_tokens * past_tokens + new_tokens * (new_tokens + 1) // 2

    def pp_hop_time(self, tokens):
        return 5e-6 + tokens * 16384 / 50e9

    def kv_transfer_time(self, tokens):
        return 1e-4 + tokens * 327_680 / 50e9


def setup():
    from flowc.stdlib_listing import stdlib_spec

    stdlib = stdlib_spec()
    model, gpu = stdlib.models["llama-3.1-70b"], stdlib.gpus["h100-sxm"]
    try:
        from flowc.compiler.model.memory import memory_budget

        kv_tokens = memory_budget(model, gpu.memory, tp=4).kv_tokens
    except Exception:  # the memory model's API moved: a round figure for 4 x 80 GB
        kv_tokens = 400_000
    try:
        from flowc.compiler.model.cost import CostModel, Parallelism

        cost = CostModel(model, gpu, stdlib.links[gpu.interconnect], parallelism=Parallelism(tp=4))
        name = "compiler.cost.CostModel (llama-3.1-70b, h100-sxm, tp4)"
    except ImportError:
        cost = StandInCost()
        name = "linear stand-in (compiler.cost not importable)"
    return cost, name, kv_tokens


def chat_workload(rate: float) -> spec.Workload:
    return spec.Workload(
        name="chat", arrival=spec.Arrival(kind="poisson", rate=rate),
        prompt=spec.Lengths(kind="lognormal", median=1024, sigma=0.6, max=8192),
        output=spec.Lengths(kind="lognormal", median=256, sigma=0.8, max=2048))


def timed(fn, runs: int):
    times, result = [], None
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--load", type=float, default=0.85, help="arrival rate as a share of the capacity")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    cost, cost_name, kv_tokens = setup()
    instance = InstanceConfig(cost=cost, kv_capacity_tokens=kv_tokens)
    print(f"cost: {cost_name}; KV capacity {kv_tokens:,} tokens; max_seqs 256, budget 8192")

    # capacity: the request throughput of a saturated run (all at t=0)
    probe = sample_requests(chat_workload(1.0), 5000, seed=1)
    capacity = simulate(Requests(np.zeros(len(probe)), probe.prompt, probe.output), [instance]).request_throughput
    rate = args.load * capacity
    print(f"capacity {capacity:.2f} req/s; load {args.load:.0%}: Poisson {rate:.2f} req/s")

    requests = sample_requests(chat_workload(rate), args.requests, seed=0)
    best, median, result = timed(lambda: simulate(requests, [instance]), args.runs)
    mean_batch = result.tokens_generated / result.iterations
    print(f"\n{args.requests:,} requests, 1 instance: {best:.3f} s best, {median:.3f} s median "
          f"({args.requests / best:,.0f} req/s simulated; target < {TARGET_100K_S} s for 100k)")
    print(f"  {result.iterations:,} iterations ({best / result.iterations * 1e6:.2f} us each), "
          f"{mean_batch:.0f} tokens out per iteration, {result.preemptions} preemptions, "
          f"TTFT p50/p99 {result.percentile('ttft', 50) * 1e3:.0f}/{result.percentile('ttft', 99) * 1e3:.0f} ms, "
          f"TPOT p50/p99 {result.percentile('tpot', 50) * 1e3:.1f}/{result.percentile('tpot', 99) * 1e3:.1f} ms")

    slo = spec.SLO(name="bench", targets=[spec.SLOTarget(metric="ttft", percentile=99, limit=1.0),
                                          spec.SLOTarget(metric="tpot", percentile=99, limit=0.08)])
    for n in (1000, 5000):
        w = chat_workload(rate).model_copy(update={"requests": n})
        best, median, search = timed(lambda: goodput_search([instance], w, slo, seed=0), args.runs)
        print(f"\ngoodput bisection, {n:,} requests per simulation (SLO ttft p99 <= 1 s, tpot p99 <= 80 ms): "
              f"{best:.3f} s best, {median:.3f} s median, {search.simulations} simulations "
              f"(target < {TARGET_GOODPUT_S} s); goodput {search.goodput:.2f} req/s of capacity {search.capacity:.2f}")

    print("\ngrowth with requests (1 instance, same load):")
    for n in (10_000, 30_000, 100_000):
        r = sample_requests(chat_workload(rate), n, seed=0)
        best, _, _ = timed(lambda: simulate(r, [instance]), args.runs)
        print(f"  {n:>7,} requests: {best:.3f} s ({best / n * 1e6:.1f} us per request)")

    print("\ngrowth with replicas (100k requests, same load per replica):")
    for replicas in (1, 2, 4, 8):
        r = sample_requests(chat_workload(rate * replicas), args.requests, seed=0)
        for router in ("round_robin", "least_work"):
            best, _, res = timed(lambda: simulate(r, [instance] * replicas, router=router), max(1, args.runs - 1))
            print(f"  {replicas} x, {router:<11}: {best:.3f} s ({best / args.requests * 1e6:.1f} us per request, "
                  f"{res.iterations:,} iterations)")

    print("\nflowc.estimate, in process (llama-3.1-70b on h100-sxm, tp 4, 1024 in / 256 out), median of 20 calls:")
    from flowc.api import estimate

    for label, load in (("batch 32 (closed loop)", {"batch": 32}), ("rate 4 req/s (open loop)", {"rate": 4.0}),
                        ("offline", {})):
        calls = []
        for _ in range(20):
            start = time.perf_counter()
            estimate("llama-3.1-70b", "h100-sxm", tp=4, input_len=1024, output_len=256, **load)
            calls.append(time.perf_counter() - start)
        print(f"  {label:<26}: {statistics.median(calls) * 1e3:.1f} ms (target < {TARGET_ESTIMATE_MS} ms)")


if __name__ == "__main__":
    main()
