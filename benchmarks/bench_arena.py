"""Activation arena sizes: per stdlib model and token budget, the lower bound (peak of live
bytes), the greedy-by-size layout, the CP-SAT layout, its ratio to the bound, the solver's
status and time, and the memory model's activation estimate for comparison.

    python benchmarks/bench_arena.py [--tokens 2048 8192] [--max-seqs 256] [--time-limit 5]
                                     [--models llama-3.1-8b deepseek-v3]

"cp-sat" in the solver column means the solve ran (greedy missed the bound); "greedy" means
greedy met the bound, which proves it optimal, and the solve was skipped. A script, not a
test: solve times depend on the machine.
"""

from __future__ import annotations

import argparse
import time

from flowc.compiler.model.memory import activation_peak_bytes
from flowc.compiler.model.step_graph import step_buffers
from flowc.compiler.optimize.arena import pack
from flowc.stdlib_listing import stdlib_spec

# TP degrees that put each model on 80 GB GPUs (the smallest power of two that holds it)
TP = {"llama-2-70b": 4, "llama-3.1-70b": 4, "llama-3.1-405b": 8, "mixtral-8x7b": 2, "mixtral-8x22b": 4,
      "qwen2.5-72b": 4, "deepseek-v3": 8}
MiB = 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--max-seqs", type=int, default=256)
    ap.add_argument("--time-limit", type=float, default=5.0)
    ap.add_argument("--models", nargs="*")
    args = ap.parse_args()
    models = stdlib_spec().models
    names = args.models or [n for n in models if n != "cpu-local"]
    print(f"{'model':16s} {'tp':>2s} {'tokens':>6s} {'bufs':>4s} {'lower MiB':>10s} {'greedy MiB':>10s} "
          f"{'cp-sat MiB':>10s} {'ratio':>6s} {'greedy/lb':>9s} {'status':>8s} {'solver':>7s} {'time s':>7s} "
          f"{'memory.py MiB':>13s} {'arena/mem':>9s}")
    for name in names:
        m = models[name]
        tp = TP.get(name, 1)
        for tokens in args.tokens:
            bufs = step_buffers(m, tp, tokens, args.max_seqs)
            t0 = time.perf_counter()
            layout = pack(bufs, time_limit_s=args.time_limit)
            elapsed = time.perf_counter() - t0
            estimate = activation_peak_bytes(m, tp, tokens, args.max_seqs)
            print(f"{name:16s} {tp:2d} {tokens:6d} {len(bufs):4d} {layout.lower_bound / MiB:10.1f} "
                  f"{layout.greedy_size / MiB:10.1f} {layout.size / MiB:10.1f} {layout.ratio:6.3f} "
                  f"{layout.greedy_size / layout.lower_bound:9.3f} {layout.status:>8s} {layout.solver:>7s} "
                  f"{elapsed:7.3f} {estimate / MiB:13.1f} {layout.size / estimate:9.2f}")


if __name__ == "__main__":
    main()
