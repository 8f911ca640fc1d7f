"""Placement solve time: two deployments sharing 8-, 16-, 64- and 512-GPU H100 clusters.

    python benchmarks/bench_placement.py [--workers 2] [--time-limit 60] [--seed 0]

Deployments (made-up capacities with a seeded spread, ~20 candidates each):
  chat   a 70B model, max_goodput_per_gpu, tp 2/4/8 x pp 1/2 x 3 scheduler variants (18)
  code   an 8B model, min_gpus, tp 1/2/4/8 x 5 scheduler variants (20)
Loads scale with the cluster so that about 70% of its GPUs are needed. Extra rows:
  disagg a disaggregated chat deployment (10 prefill + 10 decode candidates) next to code,
         once with a fast network (aggregated model) and once with a network too slow for
         its KV traffic (per-node model with the KV rows).
Rows marked "per-node layer" force the fallback layer where the configuration layer applies;
"ratio_tolerance 1%" shows the plan size when the best ratio may be missed by 1%.
Each row prints the model used, status, gap, CP-SAT solves and wall time against the
targets (512 GPUs: < 60 s; a 70B model on 8 or 16 GPUs: < 1 s). A script, not a test.
"""

from __future__ import annotations

import argparse
import random
import time

from flowc.compiler import spec
from flowc.compiler.optimize.placement import Candidate, Demand, PlacementInfeasible, solve_placement
from flowc.compiler.optimize.placement import model as placement_model

NVLINK = spec.Link(name="nvlink4", kind="nvlink", bandwidth=450e9)
PCIE = spec.Link(name="pcie5", kind="pcie", bandwidth=64e9)
H100 = spec.GPU(name="h100-sxm", vendor="nvidia", memory=80 * 2**30, memory_bandwidth=3.35e12,
                flops={"bf16": 989e12}, interconnect="nvlink4", host_link="pcie5", price=2.5)


def cluster(nodes: int, network_gbps: float | None = 400.0, nics: int = 8) -> spec.Cluster:
    net = None if network_gbps is None else spec.Link(name="ib", kind="infiniband", bandwidth=network_gbps / 8 * 1e9)
    return spec.Cluster(name=f"c{nodes}", network=net, network_nics=nics, nodes=[
        spec.NodeGroup(count=nodes, gpu="h100-sxm", gpus_per_node=8, link=NVLINK, link_domain=8, host_link=PCIE,
                       price=98.32)])


def chat_candidates(rng: random.Random, name: str = "chat") -> list[Candidate]:
    out = []
    for tp in (2, 4, 8):
        for pp in (1, 2):
            for v, f in enumerate((0.8, 1.0, 1.1)):
                cap = round(1.6 * (tp * pp) ** 0.92 * f * rng.uniform(0.9, 1.1) / (1.15 if pp > 1 else 1.0), 3)
                out.append(Candidate(name, f"{name}/tp{tp}/pp{pp}/v{v}", "h100-sxm", tp, pp, "colocated", cap))
    return out


def code_candidates(rng: random.Random) -> list[Candidate]:
    out = []
    for tp in (1, 2, 4, 8):
        for v, f in enumerate((0.7, 0.85, 1.0, 1.1, 1.2)):
            cap = round(9.0 * tp ** 0.85 * f * rng.uniform(0.9, 1.1), 3)
            out.append(Candidate("code", f"code/tp{tp}/v{v}", "h100-sxm", tp, 1, "colocated", cap))
    return out


def disagg_candidates(rng: random.Random, kv_bytes: float) -> list[Candidate]:
    out = []
    for role, base in (("prefill", 5.0), ("decode", 2.2)):
        for tp in (1, 2, 4, 8):
            for v, f in enumerate((0.9, 1.0, 1.1)[:3 if tp in (2, 4) else 2]):
                cap = round(base * tp ** 0.9 * f * rng.uniform(0.9, 1.1), 3)
                out.append(Candidate("chat", f"chat/tp{tp}/{role}/v{v}", "h100-sxm", tp, 1, role, cap, kv_bytes))
    return out


def run(label: str, c: spec.Cluster, demands: list[Demand], cands: list[Candidate], args, target: float | None,
        layer: str | None = None, **kw) -> None:
    t0 = time.perf_counter()
    placement_model._LAYER = layer
    try:
        r = solve_placement(c, {"h100-sxm": H100}, demands, cands, time_limit_s=args.time_limit, workers=args.workers,
                            **kw)
    except PlacementInfeasible as e:
        print(f"{label:<40} infeasible: {e}")
        return
    finally:
        placement_model._LAYER = None
    wall = time.perf_counter() - t0
    mark = "" if target is None else ("  ok" if wall < target else "  SLOW") + f" (target < {target:g} s)"
    per = ", ".join(f"{n}: {d.gpus} GPUs {d.goodput_rps:.1f} req/s" for n, d in r.deployments.items())
    print(f"{label:<40} {r.model:<10} {r.status:<8} gap {r.gap:.2%}  solves {r.solves:>2}  "
          f"{wall:7.3f} s{mark}\n{'':<40} {per}")
    for b in r.binding:
        print(f"{'':<40} binding: {b}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    chat, code = chat_candidates(rng), code_candidates(rng)
    for gpus, nodes in ((8, 1), (16, 2), (64, 8), (512, 64)):
        # ~45% of the GPUs for chat at its best ratio (~1.4 req/s per GPU), ~25% for code (~8.5 req/s per GPU)
        demands = [Demand("chat", "max_goodput_per_gpu", round(0.45 * gpus * 1.4, 1)),
                   Demand("code", "min_gpus", round(0.25 * gpus * 8.5, 1))]
        target = 60.0 if gpus == 512 else (1.0 if gpus <= 16 else None)
        run(f"{gpus:>3} GPUs ({nodes} x 8), chat + code", cluster(nodes), demands, chat + code, args, target)
    for gpus, nodes in ((16, 2), (64, 8), (512, 64)):
        kv = 160e6  # ~0.5k tokens of a 70B model's KV
        demands = [Demand("chat", "max_goodput_per_gpu", round(0.3 * gpus * 1.5, 1)),
                   Demand("code", "min_gpus", round(0.25 * gpus * 8.5, 1))]
        dis = disagg_candidates(rng, kv)
        run(f"{gpus:>3} GPUs, disaggregated, fast network", cluster(nodes), demands, dis + code, args, None)
        # a network that carries a few prefill instances' KV per node but not the whole load
        run(f"{gpus:>3} GPUs, disaggregated, slow network", cluster(nodes, network_gbps=8.0, nics=1), demands,
            dis + code, args, 60.0 if gpus == 512 else None)
        if gpus == 512:
            run("512 GPUs, slow network, per-node layer", cluster(nodes, network_gbps=8.0, nics=1), demands,
                dis + code, args, 60.0, layer="per-node")
            near = [Demand("chat", "max_goodput_per_gpu", 320.0), demands[1]]  # near the KV limit (~331)
            run("512 GPUs, slow network, near KV limit", cluster(nodes, network_gbps=8.0, nics=1), near,
                dis + code, args, 60.0)
            run("512 GPUs, ... same, per-node layer", cluster(nodes, network_gbps=8.0, nics=1), near,
                dis + code, args, 60.0, layer="per-node")
            run("512 GPUs, fast network, tolerance 1%", cluster(nodes), demands, dis + code, args, None,
                ratio_tolerance=0.01)


if __name__ == "__main__":
    main()
