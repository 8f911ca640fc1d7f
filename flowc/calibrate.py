"""`flowc calibrate`: measure the local device with the runtime's own kernels and engine, and
write a hardware profile (a `.flow` file with one `link` and one `gpu`) the cost model uses.

Measured (peaks as the best of repeated runs; engine times as typical ones, see below):
  * `flops fp32` / `flops bf16`: the best torch.mm throughput over a sweep of square and
    skinny GEMMs (the linear layers of the runtime's model are torch.mm);
  * `memory_bandwidth`: a large tensor copy (bytes read + written per second);
  * the link between ranks: gloo all-reduce between two local processes at several sizes,
    fitted to latency + bytes / bandwidth (what tensor parallelism on this machine uses);
  * `overhead step|layer|sequence|token|layer_token`: the engine's time per iteration beyond
    its kernels at those peaks. Tiny random-weight Llama models with 2 and 6 layers run
    prefill and decode steps of many shapes through the real engine (scheduler, inputs,
    model, sampler); each step's wall time minus what the cost model predicts for its kernels
    is fitted by least squares (in relative error) to step + layer x layers + sequence x
    sequences + (token + layer_token x layers) x tokens, with non-negative coefficients. On a
    CPU most of it is the kernels themselves running far below the GEMM peak on tiny shapes.
    One untimed round first pays the one-time costs; then rounds go over every shape and
    depth in turn, and a shape's repeats count by the mean of their fastest 80% (a shared
    host alternates between fast and slow spells, which the replays average too);
  * `overhead wake`: how much slower the first step is after the engine idled (as between
    a server's arrivals: GPU clocks and CPU caches cool down), from each shape run right
    after a pause and again at once.
The device is the CPU here (`--device local` runs on CUDA when torch sees a GPU, where the
same steps run on the Triton kernels). The profile's `memory` is what the engine may use: the
GPU's memory, or `--memory-gib` of the host's RAM for a CPU (default 2 GiB).
"""

from __future__ import annotations

import datetime
import math
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from flowc.compiler.diagnostics import escape_control

FIT_KINDS = ("step", "layer", "sequence", "token", "layer_token")  # per-iteration terms, fitted together
OVERHEAD_KINDS = FIT_KINDS + ("wake",)  # wake: the first iteration after idling, measured apart
GEMM_SHAPES = ((256, 256, 256), (512, 512, 512), (1024, 1024, 1024), (64, 2048, 2048), (2048, 2048, 512))
COPY_BYTES = 256 * 2**20
ALLREDUCE_BYTES = (4 * 2**10, 64 * 2**10, 1 * 2**20, 8 * 2**20)
PROBE_LAYERS = (2, 6)  # two depths separate the per-layer overhead from the per-step one
# the pause before a batch of requests that wakes the engine: a server between arrivals idles,
# and a device (GPU clocks, CPU frequency and caches) runs its next step slower than in a busy
# loop; the same batch run again at once is the busy case
IDLE_S = 0.05


@dataclass
class Profile:
    name: str
    device: str
    vendor: str
    memory: int
    flops: dict[str, float]  # dtype -> FLOP/s
    memory_bandwidth: float  # B/s
    link_bandwidth: Optional[float] = None  # B/s of the gloo/NCCL all-reduce fit (None: not measured)
    link_latency: Optional[float] = None  # s
    overheads: dict[str, float] = field(default_factory=dict)  # kind -> s
    fit_error: float = 0.0  # median relative error of the step-time fit on its own samples
    steps: int = 0  # engine steps the overhead fit used

    def to_flow(self) -> str:
        """The profile as a .flow file: a `link` for the ranks' collectives and the `gpu`."""
        link = f"{self.name}-link"
        host = "cpu-memory" if self.vendor == "cpu" else "pcie5"
        lines = [f"## Hardware profile of {self.device}, measured by `flowc calibrate` on "
                 f"{datetime.date.today().isoformat()}",
                 "## (re-run it after changing the machine, drivers or torch; see flowc/calibrate.py)",
                 "use std.links", ""]
        if self.link_bandwidth:
            kind = "memory" if self.vendor == "cpu" else "pcie"
            lines += [f"link {link} {{  # all-reduce between local ranks (gloo on CPU, NCCL on GPUs)",
                      f"  kind {kind}",
                      f"  bandwidth {self.link_bandwidth / 1e9:.3g} GB/s",
                      f"  latency {self.link_latency * 1e6:.3g} us",
                      "}", ""]
        interconnect = link if self.link_bandwidth else host
        lines += [f"gpu {self.name} {{",
                  f"  vendor {self.vendor}",
                  f"  memory {self.memory} B" if self.memory % 2**30 else f"  memory {self.memory // 2**30} GiB",
                  f"  memory_bandwidth {self.memory_bandwidth / 1e9:.3g} GB/s  # measured: tensor copy"]
        lines += [f"  flops {dtype} {peak / 1e9:.3g} GFLOP/s  # measured: best torch.mm"
                  for dtype, peak in sorted(self.flops.items())]
        lines += [f"  interconnect {interconnect}", f"  host_link {host}"]
        notes = {"step": "  # measured: engine steps beyond the kernels at these peaks",
                 "wake": "  # measured: the first step after idling, extra"}
        lines += [f"  overhead {kind} {self.overheads.get(kind, 0.0) * 1e6:.3g} us{notes.get(kind, '')}"
                  for kind in OVERHEAD_KINDS]
        lines += ["}", ""]
        from flowc.compiler.frontend.fmt import format_source
        from flowc.compiler.source import SourceFile

        return format_source(SourceFile("profile.flow", "\n".join(lines)))


Progress = Callable[[str, int, Optional[int]], None]


def _quiet(what: str, done: int, total: Optional[int]) -> None:
    pass


def _best_time(fn, repeats: int) -> float:
    fn()  # warm up (allocations, thread pools)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure_gemm(device, dtype, repeats: int) -> float:
    """Best FLOP/s of torch.mm over GEMM_SHAPES."""
    import torch

    best = 0.0
    for m, n, k in GEMM_SHAPES:
        a = torch.randn(m, k, device=device).to(dtype)
        b = torch.randn(k, n, device=device).to(dtype)
        out = torch.empty(m, n, device=device, dtype=dtype)
        seconds = _best_time(lambda: (torch.mm(a, b, out=out), _sync(device)), repeats)
        best = max(best, 2 * m * n * k / seconds)
    return best


def measure_copy(device, repeats: int) -> float:
    """Bytes read + written per second by a large tensor copy."""
    import torch

    src = torch.ones(COPY_BYTES // 4, device=device)
    dst = torch.empty_like(src)
    seconds = _best_time(lambda: (dst.copy_(src), _sync(device)), repeats)
    return 2 * COPY_BYTES / seconds


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _allreduce_rank(parallel, sizes: tuple[int, ...], repeats: int) -> list[float]:
    """Run in each of two processes: best time of an all-reduce of each size (rank 0's)."""
    import torch
    import torch.distributed as dist

    times = []
    for nbytes in sizes:
        t = torch.ones(nbytes // 4)
        dist.barrier()
        times.append(_best_time(lambda: dist.all_reduce(t), repeats))
    return times


def measure_allreduce(repeats: int) -> tuple[float, float]:
    """(bandwidth B/s, latency s) of a two-rank gloo all-reduce: t = latency + bus_bytes / bw,
    bus bytes = 2 (n - 1) / n x bytes = bytes for n = 2 (the cost model's convention)."""
    import numpy as np

    from flowc.runtime.parallel import launch

    times = launch(_allreduce_rank, 2, ALLREDUCE_BYTES, repeats)[0]
    slope, intercept = np.polyfit(np.array(ALLREDUCE_BYTES, dtype=float), np.array(times), 1)
    return 1.0 / max(slope, 1e-15), max(intercept, 0.0)


def _probe_model(layers: int):
    from flowc.compiler.spec import Model

    return Model(name=f"probe-{layers}", architecture="llama", layers=layers, hidden=64, heads=4, kv_heads=2,
                 head_dim=16, ffn=128, vocab=256, max_context=1024, weights="fp32", kv="fp32")


def _step_shape(scheduled) -> tuple[int, int, int, int, int]:
    """(tokens, prefill pairs, decode sequences, decode keys, sequences) of one engine step."""
    from flowc.compiler.model.operators import causal_pairs

    tokens = pairs = decodes = keys = 0
    for s in scheduled:
        tokens += s.num_tokens
        if s.start > 0 and s.num_tokens == 1:
            decodes += 1
            keys += s.start + 1
        else:
            pairs += causal_pairs(s.num_tokens, s.start)
    return tokens, pairs, decodes, keys, len(scheduled)


PROBE_BATCHES = ((1, 16), (1, 128), (1, 480), (4, 32), (16, 32), (48, 16))  # (requests, prompt tokens)


def engine_steps(device_name: str, repeats: int, on_round: Callable[[int], None] = lambda done: None
                 ) -> tuple[list[tuple[int, tuple, float]], list[tuple[int, tuple, float]]]:
    """Engine iterations of tiny random models of PROBE_LAYERS depths, as (layers, step shape,
    seconds): (busy steps, first steps after idling). Each of PROBE_BATCHES (prefills of
    several lengths, then decodes of several batch sizes) runs `repeats` times after one
    untimed warm-up round, twice in a row: after an IDLE_S pause, whose first step is an
    after-idle one, then at once again, all busy. Rounds go over every batch and depth in
    turn, so a machine that speeds up or slows down during calibration moves every shape
    alike. An iteration's seconds are the time from the end of the previous step (the start
    of `generate` for the first) to the end of this one, so the loop's own bookkeeping
    (request intake, streamed events, finished requests) is counted as the engine's overhead,
    as it is in every token's latency."""
    from contextlib import ExitStack

    from flowc.compiler.optimize.instance_plan import instance_plan
    from flowc.runtime import Engine, Request, SamplingParams

    vendor = "cpu" if device_name == "cpu" else "nvidia"
    busy, woken = [], []
    rng = random.Random(0)  # distinct prompts: a prefix-cache hit would skip the work being timed
    ends: list[tuple[tuple, float]] = []

    def timed(step):
        def timed_step():
            scheduled, finished = step()
            _sync(device_name)
            ends.append((_step_shape(scheduled), time.perf_counter()))
            return scheduled, finished
        return timed_step

    with ExitStack() as stack:
        engines = {}
        for layers in PROBE_LAYERS:
            plan = instance_plan(_probe_model(layers), vendor=vendor, max_batched_tokens=512, max_seqs=64,
                                 kv_blocks=2048)
            engine = engines[layers] = stack.enter_context(Engine.from_plan(plan))
            engine.step = timed(engine.step)
        for repeat in range(repeats + 1):  # round 0 only warms up
            on_round(repeat)
            for batch, prompt in PROBE_BATCHES:
                for layers, engine in engines.items():
                    time.sleep(IDLE_S)
                    for after_idle in (True, False):
                        requests = [Request([rng.randrange(1, 256) for _ in range(prompt)],
                                            SamplingParams(max_tokens=8, ignore_eos=True)) for _ in range(batch)]
                        ends.clear()
                        previous = time.perf_counter()
                        engine.generate(requests)
                        for i, (shape, end) in enumerate(ends):
                            if repeat:
                                (woken if after_idle and i == 0 else busy).append((layers, shape, end - previous))
                            previous = end
    return busy, woken


def _by_shape(samples: list[tuple[int, tuple, float]], reduce: Callable[[list[float]], float]
              ) -> dict[tuple, float]:
    """Each (layers, shape)'s repeated times reduced to one."""
    times: dict[tuple, list[float]] = {}
    for layers, shape, seconds in samples:
        times.setdefault((layers, tuple(shape)), []).append(seconds)
    return {key: reduce(values) for key, values in times.items()}


def _typical(seconds: list[float]) -> float:
    """The mean of the fastest 80% of a step's repeated times: a rare step that a background
    process stalled is dropped, while a machine that alternates between a fast and a slow state
    (a shared host does) counts with both, as the replays it predicts do."""
    kept = sorted(seconds)[:max(1, math.ceil(0.8 * len(seconds)))]
    return sum(kept) / len(kept)


def fit_overheads(samples: list[tuple[int, tuple, float]], kernel_time: Callable[[int, tuple], float]
                  ) -> tuple[dict[str, float], float]:
    """Non-negative least squares of (measured - kernels) on [1, layers, sequences, tokens,
    layers x tokens] (FIT_KINDS), in relative error: coefficients that come out negative are
    dropped and the rest refitted. Steps of the same depth and shape are first reduced to one
    typical time (`_typical`). Returns the overheads and the median relative error of the
    fitted step times."""
    import numpy as np

    typical = _by_shape(samples, _typical)
    keys = list(typical)
    rows = np.array([[1.0, layers, shape[4], shape[0], layers * shape[0]] for layers, shape in keys])
    kernels = np.array([kernel_time(layers, shape) for layers, shape in keys])
    measured = np.array([typical[key] for key in keys])
    target = np.maximum(measured - kernels, 0.0)
    # relative errors: the few long prefills must not buy their fit with every short step's
    weight = 1 / measured
    active = list(range(len(FIT_KINDS)))
    while True:
        coef, *_ = np.linalg.lstsq(rows[:, active] * weight[:, None], target * weight, rcond=None)
        if (coef >= 0).all():
            break
        active = [a for a, c in zip(active, coef) if c >= 0]
    full = np.zeros(len(FIT_KINDS))
    full[active] = coef
    predicted = kernels + rows @ full
    error = float(np.median(np.abs(predicted - measured) / measured))
    return dict(zip(FIT_KINDS, map(float, full))), error


def wake_overhead(busy: list[tuple[int, tuple, float]], woken: list[tuple[int, tuple, float]]) -> float:
    """The extra seconds of a step after idling: the median over shapes of (median time after an
    idle pause - median time of the same depth and shape when busy), at least 0. Medians, not
    `_typical`: waking the CPU's worker threads sometimes stalls for milliseconds (a vCPU the
    host descheduled), and those stalls are too rare and too erratic to predict."""
    busy_times, woken_times = _by_shape(busy, statistics.median), _by_shape(woken, statistics.median)
    extra = [woken_times[key] - busy_times[key] for key in woken_times if key in busy_times]
    return max(0.0, statistics.median(extra)) if extra else 0.0


def calibrate(*, name: str = "local", memory: Optional[int] = None, repeats: int = 5, collectives: bool = True,
              on_progress: Progress = _quiet) -> Profile:
    """Measure this machine's device (the first CUDA GPU if torch sees one, else the CPU)."""
    import torch

    from flowc.compiler.model.cost import CostModel, Parallelism
    from flowc.compiler.spec import GPU, Link

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    steps = 3 + (1 if collectives and not cuda else 0)
    on_progress("GEMM throughput", 0, steps)
    flops = {"fp32": measure_gemm(device, torch.float32, repeats)}
    flops["bf16"] = measure_gemm(device, torch.bfloat16, repeats)
    on_progress("memory bandwidth", 1, steps)
    bandwidth = measure_copy(device, repeats)
    link_bw = link_latency = None
    if collectives and not cuda:  # NCCL needs two GPUs; one lent GPU cannot measure it
        on_progress("gloo all-reduce between two processes", 2, steps)
        link_bw, link_latency = measure_allreduce(repeats)
    if memory is None:
        memory = torch.cuda.get_device_properties(0).total_memory if cuda else 2 * 2**30
    vendor = "nvidia" if cuda else "cpu"
    bare = GPU(name=name, vendor=vendor, memory=memory, memory_bandwidth=bandwidth, flops=flops,
               interconnect="local", host_link="local")
    link = Link(name="local", kind="memory", bandwidth=link_bw or bandwidth)
    costs = {layers: CostModel(_probe_model(layers), bare, link, parallelism=Parallelism()) for layers in PROBE_LAYERS}
    busy, woken = engine_steps(device, repeats, lambda done: on_progress(
        f"engine steps, round {done + 1} of {repeats + 1}", steps - 1, steps))
    overheads, error = fit_overheads(busy, lambda layers, shape: costs[layers].step_time(*shape[:4]))
    overheads["wake"] = wake_overhead(busy, woken)
    on_progress("done", steps, steps)
    device_name = torch.cuda.get_device_name(0) if cuda else f"this machine's CPU ({torch.get_num_threads()} threads)"
    return Profile(name=name, device=device_name, vendor=vendor, memory=memory, flops=flops,
                   memory_bandwidth=bandwidth, link_bandwidth=link_bw, link_latency=link_latency,
                   overheads=overheads, fit_error=error, steps=len(busy) + len(woken))


def summary(profile: Profile) -> str:
    o = profile.overheads
    text = [f"{profile.device}:",
            "  GEMM " + ", ".join(f"{d} {v / 1e9:.1f} GFLOP/s" for d, v in sorted(profile.flops.items())),
            f"  copy {profile.memory_bandwidth / 1e9:.1f} GB/s"]
    if profile.link_bandwidth:
        text.append(f"  all-reduce {profile.link_bandwidth / 1e9:.2f} GB/s + {profile.link_latency * 1e6:.0f} us")
    text.append(f"  engine overhead: step {o['step'] * 1e6:.0f} us + layer {o['layer'] * 1e6:.0f} us + sequence "
                f"{o['sequence'] * 1e6:.1f} us + token {o['token'] * 1e6:.2f} us + token x layer "
                f"{o['layer_token'] * 1e6:.2f} us "
                f"(median fit error {profile.fit_error:.1%} over {profile.steps} steps); "
                f"waking from idle {o.get('wake', 0.0) * 1e6:.0f} us")
    return "\n".join(text)


# ---------------------------------------------------------------------------------- the CLI


def add_arguments(parser) -> None:
    from flowc.compiler.spec import ENGINES

    parser.add_argument("--device", choices=("local",), default="local",
                        help="the device to measure: this machine's GPU if torch sees one, else its CPU")
    parser.add_argument("-o", "--out", metavar="PROFILE.flow",
                        help="write the hardware profile here (default: print it)")
    parser.add_argument("--name", help="the profile's gpu name (default: local; with --from-benchmark: GPU-measured)")
    parser.add_argument("--memory-gib", type=float, metavar="N",
                        help="GiB the engine may use on a CPU device (default 2; a GPU's own memory otherwise)")
    parser.add_argument("--repeats", type=int, default=5, help="repetitions of each measurement (default 5)")
    bench = parser.add_argument_group(
        "from a serving benchmark", "fit a standard library GPU's engine overheads to runs measured by vLLM's or "
        "SGLang's serving benchmark, instead of measuring this machine")
    bench.add_argument("--from-benchmark", nargs="+", metavar="FILE",
                       help="result files: `vllm bench serve --save-result` JSON (or benchmarks/benchmark_serving.py"
                            "'s), `python -m sglang.bench_serving --output-file` JSONL")
    bench.add_argument("--model", help="the standard library model the benchmarked server ran, e.g. llama-3.1-8b")
    bench.add_argument("--gpu", help="the standard library GPU it ran on, e.g. h100-sxm")
    bench.add_argument("--tp", type=int, help="its tensor-parallel size (default 1)")
    bench.add_argument("--pp", type=int, help="its pipeline-parallel size (default 1)")
    bench.add_argument("--engine", choices=ENGINES, help="the engine measured (default: each file's backend)")
    bench.add_argument("--dtype", help="weight dtype the server ran (default: the model's)")
    bench.add_argument("--kv-dtype", help="KV-cache dtype it ran (default: the model's)")


BENCHMARK_FLAGS = ("model", "gpu", "tp", "pp", "engine", "dtype", "kv_dtype")


def cmd_calibrate(args, out) -> int:
    import importlib.util
    import re

    if args.from_benchmark:
        from flowc.calibrate_benchmark import cmd_from_benchmark

        return cmd_from_benchmark(args, out)
    given = [flag for flag in BENCHMARK_FLAGS if getattr(args, flag) is not None]
    if given:
        return out.usage_error(f"--{given[0].replace('_', '-')} goes with --from-benchmark",
                               "give the benchmark's result files: `--from-benchmark FILE...`")
    args.name = args.name or "local"
    if importlib.util.find_spec("torch") is None:
        return out.usage_error("calibration runs the flowc runtime, which needs torch",
                               'install it with `pip install "flowc[runtime]"`')
    if not re.fullmatch(r"[A-Za-z_][\w-]*", args.name):
        return out.usage_error(f"--name {args.name!r} is not a valid name", "use letters, digits, `-` and `_`")
    if args.repeats < 1:
        return out.usage_error(f"--repeats must be at least 1 (got {args.repeats})")
    if args.memory_gib is not None and not args.memory_gib > 0:
        return out.usage_error(f"--memory-gib must be positive (got {args.memory_gib})")
    memory = None if args.memory_gib is None else int(args.memory_gib * 2**30)
    from flowc.progress import progress

    with progress("calibrating", enabled=not out.json, color=out.color) as bar:
        profile = calibrate(name=args.name, memory=memory, repeats=args.repeats, on_progress=bar)
    text = profile.to_flow()
    if args.out and (failed := out.write_file(args.out, text)) is not None:
        return failed
    if out.json:
        import json
        from dataclasses import asdict

        print(json.dumps(asdict(profile), indent=2))
        return 0
    print(summary(profile))
    if args.out:
        out_path = escape_control(args.out)
        print(f"wrote {out_path}: `use \"{out_path}\"` in a spec and place `gpu {args.name} x 1` in a node")
    else:
        print(text)
    return 0
