"""Distributed layouts on the flowc runtime: throughput and the time spent communicating, per
layout, with the plan's predicted figures beside them.

For each layout a spec is compiled with the layout forced (`tp in [..]`, `pp in [..]`), the plan
is run by the engine with random weights, and the spec's workload is replayed at its arrival
times (`flowc run --replay`'s path). Printed per layout: measured output tokens/s, TTFT p50 and
TPOT p50 next to the plan's prediction for the same requests, and the seconds rank 0 (the
process that drives the instance) spent in TP collectives and in pipeline sends and receives,
as a share of the replay's wall time (`runtime/parallel.CommTime`). The disaggregated layout
(`1p1d`) is the tp 1 plan compiled for two GPUs with its instance split into a prefill and a
decode instance (the compiler keeps this small load colocated); its communication is the KV
moved between them (`DisaggregatedEngine.kv_seconds`). `1p1d` runs both instances in this
process, one step after the other, the KV moving in memory; `1p1d-procs` runs each in a process
of its own, stepping at once, the KV moving over gloo (for it, the KV column is the time this
process waited on the moves, the transfers themselves run in the instances' processes).

On this CPU the ranks are processes on shared cores and the predictions use `cpu-local`'s
estimated peaks, not measured ones (`flowc calibrate` measures them), so the predicted column
says what the planner believed, not what a calibrated device would give.

Run: python benchmarks/bench_distributed.py [--requests 32] [--rate 8] [--layouts tp1,tp2,pp2,tp2xpp2,1p1d,1p1d-procs]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import flowc
from flowc.compiler.model.instance import simulate_plan_deployment, simulate_plan_instance
from flowc.compiler.plan import GpuRef, Instance
from flowc.replay import replay_report, replay_requests
from flowc.runtime import DisaggregatedEngine, Engine

# name: (tp, pp, GPUs)
LAYOUTS = {"tp1": (1, 1, 1), "tp2": (2, 1, 2), "pp2": (1, 2, 2), "tp2xpp2": (2, 2, 4), "1p1d": (1, 1, 2),
           "1p1d-procs": (1, 1, 2)}

SPEC = """use std.cpu_local

model bench-llama {{
  architecture llama
  layers 4
  hidden 512
  heads 8
  kv_heads 2
  head_dim 64
  ffn 1408
  vocab 4096
  max_context 1024 tok
  weights fp32
  kv fp32
  tied_embeddings false
}}

cluster box {{
  node x 1 {{
    gpu cpu-local x {gpus}
  }}
}}

workload chat {{
  arrival poisson {rate} req/s
  prompt uniform(32 tok, 256 tok)
  output uniform(16 tok, 64 tok)
}}

slo relaxed {{
  ttft p90 <= 30 s
  tpot p90 <= 5 s
}}

deploy bench {{
  model bench-llama
  on box
  serve chat under relaxed
  engine flowc
  tp in [{tp}]
  pp in [{pp}]
  max_batched_tokens in [512 tok]
  max_seqs in [32]
}}
"""


def split(plan):
    """The plan with its one colocated instance made a prefill instance on GPU 0 and a decode
    instance on GPU 1."""
    dp = plan.deployments[0]
    (group,) = dp.groups
    decode = group.model_copy(update={"role": "decode", "instances": [Instance(gpus=[GpuRef(node=0, index=1)])]})
    groups = [group.model_copy(update={"role": "prefill"}), decode]
    return plan.model_copy(update={"deployments": [dp.model_copy(update={"groups": groups,
                                                                          "mode": "disaggregated"})]})


def run_layout(name: str, requests: int, rate: float, folder: Path) -> dict:
    tp, pp, gpus = LAYOUTS[name]
    spec_path = folder / f"{name}.flow"
    spec_path.write_text(SPEC.format(gpus=gpus, tp=tp, pp=pp, rate=rate))
    spec = flowc.load(spec_path)
    plan = flowc.compile(spec)
    disaggregated = name.startswith("1p1d")
    if disaggregated:
        plan = split(plan)
    dp = plan.deployments[0]
    workload = spec.workloads[spec.deployments[dp.name].workload]
    engine = (DisaggregatedEngine.from_plan(plan, processes=name == "1p1d-procs") if disaggregated
              else Engine.from_plan(plan, share_cores=True))
    with engine:
        batch, sampled = replay_requests(workload, requests, engine.config.vocab, 0, engine.config.max_context)
        start = time.perf_counter()
        outputs = engine.generate(batch, replay=True)
        wall = time.perf_counter() - start
    if isinstance(engine, DisaggregatedEngine):
        predicted = simulate_plan_deployment(spec, dp, sampled, router="round_robin")
        comm = {"collectives": 0.0, "pipeline": 0.0, "kv": engine.kv_seconds,
                "kv_note": f"{engine.kv_transfers} transfers, {engine.kv_bytes / 2**20:.1f} MiB"}
    else:
        predicted = simulate_plan_instance(spec, dp, 0, sampled)
        c = engine.runner.state.parallel.comm  # counted from the start, warm-up included
        comm = {"collectives": c.collectives, "pipeline": c.pipeline, "kv": 0.0, "kv_note": ""}
    return {"layout": name, "ranks": gpus, "wall": wall, **comm, **replay_report(outputs, predicted)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--rate", type=float, default=8.0, help="the workload's arrival rate (req/s)")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated, of {', '.join(LAYOUTS)}")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.layouts.split(","):
            rows.append(run_layout(name, args.requests, args.rate, Path(folder)))
    print(f"{args.requests} requests at {args.rate:g} req/s (prompts 32-256, outputs 16-64 tokens), "
          "bench-llama (4 layers, hidden 512) in fp32, random weights; rank 0's time in communication")
    print(f"{'layout':<10} {'GPUs':>4} {'tok/s':>7} {'pred':>7} {'TTFT p50':>9} {'pred':>8} {'TPOT p50':>9} "
          f"{'pred':>8} {'collectives':>12} {'pipeline':>12} {'KV transfer':>12}")
    for r in rows:
        thr, ttft, tpot = r["output_tokens_per_s"], r["ttft_ms"], r["tpot_ms"]
        shares = [f"{r[k]:5.2f} s {100 * r[k] / r['wall']:3.0f}%" for k in ("collectives", "pipeline", "kv")]
        print(f"{r['layout']:<10} {r['ranks']:>4} {thr['measured']:>7.1f} {thr['predicted']:>7.1f} "
              f"{ttft['measured']['p50']:>7.1f}ms {ttft['predicted']['p50']:>6.1f}ms "
              f"{tpot['measured']['p50']:>7.1f}ms {tpot['predicted']['p50']:>6.1f}ms "
              + " ".join(f"{share:>12}" for share in shares) + (f"  ({r['kv_note']})" if r["kv_note"] else ""))
        if r["errors"]:
            print(f"           {len(r['errors'])} requests failed: {r['errors'][0]}")

if __name__ == "__main__":
    main()
