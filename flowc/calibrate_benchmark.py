"""`flowc calibrate --from-benchmark FILE...`: a hardware profile whose engine overheads are
fitted to serving runs measured by vLLM's or SGLang's serving benchmark, for a standard library
model and GPU (compiler/model/benchmarks.py reads the files, compiler/model/benchmark_fit.py
fits). The profile is a `.flow` file declaring a new gpu: the standard library GPU's attributes
and the fitted `overhead` lines, under a comment header stating the source files, the engine and
the fit's errors before and after. Exit codes: 0 written, 1 a file that is not a usable result
or a configuration that cannot serve it (diagnostics), 2 a usage or I/O error.
"""

from __future__ import annotations

import datetime
import json
import re
import sys
from fractions import Fraction
from pathlib import Path

from flowc.compiler.diagnostics import FlowError, escape_control, suggestion_help
from flowc.compiler.model.benchmark_fit import BenchmarkFit, Prediction
from flowc.compiler.model.benchmarks import METRIC_NAMES, TOOL_NAMES, BenchmarkRun
from flowc.compiler.spec import GPU, NAME_PATTERN, Model

EXIT_OK, EXIT_INVALID = 0, 1
METRIC_ORDER = ("ttft", "tpot", "itl", "e2e", "throughput")
BANDWIDTHS = (("TB/s", 10**12), ("GB/s", 10**9), ("MB/s", 10**6), ("B/s", 1))
COMPUTES = (("TFLOP/s", 10**12), ("GFLOP/s", 10**9), ("MFLOP/s", 10**6), ("FLOP/s", 1))


def _value(metric: str, value: float) -> str:
    if metric == "throughput":
        return f"{value:,.0f} tok/s"
    return f"{value * 1e3:.4g} ms"


def _quantity(seconds: float) -> str:
    """Seconds as a .flow duration that reads back exactly (`2 ms`, `17.8 us`)."""
    from flowc.compiler import units

    if seconds == 0:
        return "0 ms"
    return units.format_value(units.Value(Fraction(repr(seconds)), units.TIME))


def _decimal(value: float, scales: tuple[tuple[str, int], ...]) -> str:
    """`value` in the first of `scales` (unit, base units per unit) it reaches one of, written as
    the exact decimal of its shortest repr, so that the checker reads back the same float."""
    from flowc.compiler.units import Value, format_value

    exact = Fraction(repr(value))
    unit, scale = next(((u, s) for u, s in scales if exact >= s), scales[-1])
    return f"{format_value(Value(exact / scale))} {unit}"  # a plain number: its exact decimal


def _overheads_text(overheads: dict[str, float]) -> str:
    order = {kind: i for i, kind in enumerate(("step", "layer", "sequence", "token", "layer_token", "request", "wake"))}
    return ", ".join(f"{kind} {_quantity(value)}"
                     for kind, value in sorted(overheads.items(), key=lambda kv: order.get(kv[0], 99))) or "none"


def _run_label(run: BenchmarkRun, runs: list[BenchmarkRun]) -> str:
    name = escape_control(run.file)
    several = sum(1 for r in runs if r.file == run.file) > 1
    return f"{name} run {run.run}" if several else name


def _errors_line(before: Prediction, after: Prediction) -> str:
    return ", ".join(f"{METRIC_NAMES[m]} {before.error(m):+.1%} -> {after.error(m):+.1%}"
                     for m in METRIC_ORDER if m in after.compared)


def profile_text(fit: BenchmarkFit, runs: list[BenchmarkRun], *, model: Model, base: GPU, tp: int, pp: int) -> str:
    """The `.flow` profile: `use std.links` and one gpu, under a header stating where its
    overheads come from."""
    from flowc.compiler import units
    from flowc.compiler.frontend.fmt import format_source
    from flowc.compiler.model.engines import engine_profile
    from flowc.compiler.source import SourceFile

    g = fit.gpu
    label = engine_profile(fit.engine).label
    files = sorted({escape_control(run.file) for run in runs})
    lines = [f"# Hardware profile: {base.name} with {label}'s engine overheads fitted by "
             f"`flowc calibrate --from-benchmark` on {datetime.date.today().isoformat()}",
             f"# to {len(runs)} run{'s' if len(runs) != 1 else ''} of {model.name} (weights {model.weights}, "
             f"KV {model.kv}; tp {tp}, pp {pp}) measured with {label} in:"]
    lines += [f"#   {name}" for name in files]
    lines += [f"# Mean |log(predicted / measured)| over the median TTFT, TPOT and output throughput: "
              f"before {fit.score_before:.3f}, after {fit.score_after:.3f}",
              f"# (before: {label}'s profile, overheads {_overheads_text(fit.before_overheads)}).",
              "# Predicted / measured - 1 per run, before -> after:"]
    for before, after in zip(fit.before, fit.after):
        lines.append(f"#   {_run_label(after.run, runs)} ({after.run.load()}): {_errors_line(before, after)}")
    lines += [f"# Fitted: overhead {', '.join(fit.fitted)}; kept from the engine: the kernels' calibration, "
              "the scheduler.",
              f"# Use it for {label} (`engine {fit.engine}` in a deployment): the gpu's own overheads replace the "
              "engine's.",
              "use std.links", "",
              f"## {base.name} serving with {label}, its overheads fitted to measured runs",
              f"gpu {g.name} {{",
              f"  vendor {g.vendor}",
              f"  memory {units.format_value(units.Value(Fraction(g.memory), units.BYTES))}",
              f"  memory_bandwidth {_decimal(g.memory_bandwidth, BANDWIDTHS)}"]
    lines += [f"  flops {dtype} {_decimal(peak, COMPUTES)}" for dtype, peak in g.flops.items()]
    lines += [f"  interconnect {g.interconnect}", f"  host_link {g.host_link}"]
    if g.price is not None:
        lines.append(f"  price {units.format_value(units.Value(Fraction(repr(g.price)) / 3600, units.PRICE))}")
    for kind, value in g.overheads.items():
        note = "fitted" if kind in fit.fitted else f"{label}'s"
        lines.append(f"  overhead {kind} {_quantity(value)}  # {note}")
    lines += ["}", ""]
    return format_source(SourceFile("profile.flow", "\n".join(lines)))


def _table(fit: BenchmarkFit, runs: list[BenchmarkRun]) -> str:
    rows = [("run", "load", "metric", "measured", "before", "error", "after", "error")]
    for before, after in zip(fit.before, fit.after):
        run = after.run
        metrics = [m for m in METRIC_ORDER if m in after.compared]
        labels = [_run_label(run, runs), run.load(), f"({after.mode}, {after.requests} requests simulated)"]
        for i in range(max(len(metrics), 2)):
            first = (labels[0] if i == 0 else "", labels[1] if i == 0 else labels[2] if i == 1 else "")
            if i >= len(metrics):
                rows.append((*first, "", "", "", "", "", ""))
                continue
            m = metrics[i]
            rows.append((*first, METRIC_NAMES[m] + ("" if m in after.fitted else " *"),
                         _value(m, run.measured()[m]), _value(m, before.predicted[m]), f"{before.error(m):+.1%}",
                         _value(m, after.predicted[m]), f"{after.error(m):+.1%}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = {3, 4, 5, 6, 7}
    return "\n".join("  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in rows)


def _summary(fit: BenchmarkFit, runs: list[BenchmarkRun], model: Model, base: GPU, tp: int, pp: int) -> str:
    name = fit.gpu.name
    from flowc.compiler.model.engines import engine_profile

    label = engine_profile(fit.engine).label
    fitted = {k: v for k, v in fit.overheads.items() if k in fit.fitted}
    text = [f"{fit.gpu.name}: {base.name} serving {model.name} (tp {tp}, pp {pp}) with {label}, fitted to "
            f"{len(runs)} run{'s' if len(runs) != 1 else ''}",
            f"  overheads: {_overheads_text(fitted)} (before: {label}'s {_overheads_text(fit.before_overheads)})",
            f"  mean |log(predicted / measured)|: before {fit.score_before:.3f}, after {fit.score_after:.3f} "
            f"({fit.evaluations} simulations)", "", _table(fit, runs)]
    if any(m not in p.fitted for p in fit.after for m in p.compared):
        text.append("* shown, not fitted (the fit scores the median TTFT, the median TPOT (or ITL without one) "
                    "and the output throughput)")
    if fit.calibrated_as != fit.base_calibrated_as:
        text.append(f"warning: {fit.calibration_source}; {base.name} itself is predicted with "
                    f"{fit.base_calibrated_as or 'generic'}'s kernel curves, and the fit holds for {name}'s own")
    return "\n".join(text) + "\n"


def _fit_document(fit: BenchmarkFit, text: str) -> dict:
    def prediction(p: Prediction) -> dict:
        return {"mode": p.mode, "requests": p.requests,
                "predicted": {m: p.predicted[m] for m in p.compared}, "fitted": list(p.fitted)}

    return {"gpu": fit.gpu.name, "engine": fit.engine, "overheads": fit.overheads, "fitted": list(fit.fitted),
            "before_overheads": fit.before_overheads, "score_before": fit.score_before,
            "score_after": fit.score_after, "evaluations": fit.evaluations,
            "calibration_source": fit.calibration_source,
            "runs": [{"file": after.run.file, "run": after.run.run, "engine": after.run.engine,
                      "load": after.run.load(), "measured": after.run.measured(),
                      "before": prediction(before), "after": prediction(after)}
                     for before, after in zip(fit.before, fit.after)],
            "profile": text}


def cmd_from_benchmark(args, out) -> int:
    from flowc.compiler.frontend.library import stdlib_spec
    from flowc.compiler.model.benchmark_fit import fit_benchmarks
    from flowc.compiler.model.benchmarks import read_benchmarks
    from flowc.compiler.spec import DTYPE_BYTES

    if args.memory_gib is not None:
        return out.usage_error("--memory-gib measures this machine; it does not go with --from-benchmark")
    for name in args.from_benchmark:
        if not Path(name).is_file():
            what = "is a directory" if Path(name).is_dir() else "does not exist"
            return out.usage_error(f"`{name}` {what}", "give the result file the serving benchmark wrote")
    for flag in ("model", "gpu"):
        if getattr(args, flag) is None:
            return out.usage_error(f"--from-benchmark needs --{flag}",
                                   f"name the standard library {flag} the benchmarked server ran "
                                   f"(`flowc stdlib` lists them), e.g. `--{flag} "
                                   f"{'llama-3.1-8b' if flag == 'model' else 'h100-sxm'}`")
    stdlib = stdlib_spec()
    for flag, table, kind in (("model", stdlib.models, "models"), ("gpu", stdlib.gpus, "GPUs")):
        if getattr(args, flag) not in table:
            return out.usage_error(f"--{flag} `{getattr(args, flag)}` is not a standard library {kind[:-1]}",
                                   suggestion_help(getattr(args, flag), table, f"standard library {kind}"))
    model, base = stdlib.models[args.model], stdlib.gpus[args.gpu]
    for flag, value in (("--dtype", args.dtype), ("--kv-dtype", args.kv_dtype)):
        if value is not None and value not in DTYPE_BYTES:
            return out.usage_error(f"{flag} `{value}` is not a dtype", suggestion_help(value, DTYPE_BYTES, "dtypes"))
    model = model.model_copy(update={"weights": args.dtype or model.weights, "kv": args.kv_dtype or model.kv})
    tp, pp = args.tp or 1, args.pp or 1
    for flag, value in (("--tp", args.tp), ("--pp", args.pp)):
        if value is not None and value < 1:
            return out.usage_error(f"{flag} must be at least 1 (got {value})")
    name = args.name or f"{base.name}-measured"
    if not re.fullmatch(NAME_PATTERN, name):
        return out.usage_error(f"--name {name!r} is not a valid name", "use letters, digits, `-` and `_`")
    if name in stdlib.gpus:
        return out.usage_error(f"--name `{name}` is a standard library GPU",
                               f"give the profile a name of its own (default: {base.name}-measured)")
    try:
        runs = read_benchmarks(args.from_benchmark)
    except FlowError as error:
        out.diagnostics(error.diagnostics, error.sources)
        return EXIT_INVALID
    except OSError as error:
        return out.usage_error(f"cannot read `{error.filename}`: {error.strerror or error}")
    engines = sorted({run.engine for run in runs})
    if args.engine is None and len(engines) > 1:
        return out.usage_error(f"the files hold runs of {' and '.join(engines)}",
                               "calibrate one engine at a time, or name the one measured with --engine")
    engine = args.engine or engines[0]
    link = stdlib.links[base.interconnect]
    from flowc.progress import progress

    try:
        with progress("fitting overheads", enabled=not out.json, color=out.color) as bar:
            fit = fit_benchmarks(runs, model, base, link, engine=engine, tp=tp, pp=pp, name=name, on_progress=bar)
    except FlowError as error:
        out.diagnostics(error.diagnostics, error.sources)
        return EXIT_INVALID
    text = profile_text(fit, runs, model=model, base=base, tp=tp, pp=pp)
    if args.out and (failed := out.write_file(args.out, text)) is not None:
        return failed
    if out.json:
        print(json.dumps(_fit_document(fit, text), indent=2))
        return EXIT_OK
    sys.stdout.write(_summary(fit, runs, model, base, tp, pp))
    tools = sorted({TOOL_NAMES[run.tool] for run in runs})
    print(f"read {len(runs)} run{'s' if len(runs) != 1 else ''} of {' and '.join(tools)}")
    if args.out:
        path = escape_control(args.out)
        print(f"wrote {path}: `use \"{path}\"` in a spec, place `gpu {name} x N` in a node and deploy with "
              f"`engine {engine}`")
    else:
        print()
        sys.stdout.write(text)
    return EXIT_OK
