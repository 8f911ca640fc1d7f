"""Terminal renderings of estimates and simulation reports."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from flowc.compiler.model.engines import engine_profile
from flowc.compiler.model.estimate import Estimate, LatencyStats
from flowc.compiler.model.serving import DeploymentReport
from flowc.compiler.model.workload import base_rate
from flowc.compiler.render.text import (
    gpu_ranges,
    group_shape_text,
    memory_text,
    range_text,
    scheduler_text,
    shape_text,
    slo_verdict,
)
from flowc.compiler.units import format_duration, format_gib, format_rps
from flowc.console import make_console


def _latency_row(table: Table, name: str, stats: LatencyStats) -> None:
    table.add_row(name, *(f"{value:,.1f}" for value in (stats.mean, stats.p50, stats.p90, stats.p99)))


def _latency_table(ttft: LatencyStats, tpot: LatencyStats, e2e: LatencyStats) -> Table:
    table = Table(box=None, pad_edge=False)
    for column in ("ms", "mean", "p50", "p90", "p99"):
        table.add_column(column, justify="left" if column == "ms" else "right")
    _latency_row(table, "TTFT", ttft)
    _latency_row(table, "TPOT", tpot)
    _latency_row(table, "end to end", e2e)
    return table


def print_estimate(e: Estimate, console: Console | None = None) -> None:
    console = console or make_console()
    shape = shape_text(e.tp, e.pp, e.ep)
    layout = (f"{e.disaggregated[0]} prefill + {e.disaggregated[1]} decode instances" if e.disaggregated
              else f"{e.replicas} replica{'s' if e.replicas > 1 else ''}")
    console.print(f"[bold]{e.model}[/] on {e.gpus} x {e.gpu} ({engine_profile(e.engine).label}): {shape}, {layout}; "
                  f"{e.input_len} tokens in, {e.output_len} out ({e.mode.replace('_', ' ')}, "
                  f"{e.requests_simulated} requests simulated)")
    console.print(_latency_table(e.ttft_ms, e.tpot_ms, e.e2e_ms))
    console.print(f"throughput: {e.output_tokens_per_s:,.0f} output tok/s "
                  f"({e.output_tokens_per_s_per_gpu:,.0f} per GPU), {e.requests_per_s:,.2f} req/s")
    ranges = [f"TTFT p50 {e.ttft_ms.p50:,.1f} ms{range_text(e.ttft_ms.p50, 'ttft', e.interval, 1)}",
              f"TPOT p50 {e.tpot_ms.p50:,.1f} ms{range_text(e.tpot_ms.p50, 'tpot', e.interval, 1)}",
              f"throughput{range_text(e.output_tokens_per_s, 'throughput', e.interval)} tok/s"]
    if any("[" in text for text in ranges):
        console.print("80% prediction interval (from published serving runs; docs/predictions.md): "
                      + ", ".join(ranges))
    console.print(f"KV cache: {e.kv_capacity_tokens:,} tokens per instance, up to {e.max_concurrent_seqs} "
                  f"sequences at once; preemptions: {e.preemptions}")
    memory = ", ".join(f"{name} {format_gib(value, 1)}" for name, value in e.memory_per_gpu.items())
    console.print(f"memory per GPU: {memory}")
    if not e.calibrated:
        console.print(f"[yellow]note:[/] no measured data for {e.gpu}; the cost model uses {e.calibration_source}")


def print_simulation(reports: dict[str, DeploymentReport], console: Console | None = None) -> None:
    console = console or make_console()
    for r in reports.values():
        verdict = "[green]meets its SLO[/]" if r.meets_slo else "[red]misses its SLO[/]"
        console.print(f"[bold]deploy {r.deployment}[/]: {r.model} on {r.replicas} x ({shape_text(r.tp, r.pp)}) "
                      f"{r.gpu} = {r.gpus} GPUs, {verdict}")
        console.print(f"  {r.note}")
        console.print(f"  scheduler: {scheduler_text(r.scheduler)}; "
                      f"KV cache {r.kv_capacity_tokens:,} tokens per instance")
        console.print(_latency_table(r.ttft_ms, r.tpot_ms, r.e2e_ms))
        for t in r.targets:
            where = f"p{t.percentile:g} = {t.value_ms:,.1f} ms" if t.value_ms is not None else "limit"
            mark = "[green]ok[/]" if t.met else "[red]missed[/]"
            console.print(f"  {t.metric} {where} (limit {t.limit_ms:,.0f} ms; {t.share_meeting:.1%} of requests "
                          f"under it): {mark}")
        console.print(f"  joint attainment {r.joint_attainment:.1%}; {r.finished}/{r.requests} requests finished, "
                      f"{r.preemptions} preemptions; {r.output_tokens_per_s:,.0f} output tok/s "
                      f"({r.output_tokens_per_s_per_gpu:,.0f} per GPU)")
        if r.goodput_req_s is not None:
            console.print(f"  goodput: {r.goodput_req_s:,.2f} req/s ({r.goodput_req_s_per_gpu:,.3f} per GPU)")


def _target_text(target, predicted) -> str:
    """`TTFT p90 212 ms [170-260] (SLO 500)` when the plan predicts that percentile (with its 80%
    prediction interval), else the limit."""
    stats = getattr(predicted, f"{target.metric}_ms").model_dump()
    key = f"p{target.percentile:g}" if target.percentile is not None else None
    if key in stats:
        value = stats[key]
        return (f"{target.metric.upper()} {key} {value:,.0f} ms{range_text(value, target.metric, predicted.interval)} "
                f"(SLO {target.limit * 1e3:,.0f})")
    return f"{target.metric.upper()} limit {target.limit * 1e3:,.0f} ms"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def print_plan(plan, spec, *, explain: bool = False, console: Console | None = None,
               compile_s: float | None = None) -> None:
    """Terraform-style: a legend, one block per deployment, one summary line."""
    console = console or make_console()
    console.print("[dim]legend:[/] [green]+[/] instance group   [yellow]~[/] alternative   "
                  "[red]![/] binding constraint   = baseline\n")
    for d in plan.deployments:
        slo = spec.slos[spec.deployments[d.name].slo]
        workload = spec.workloads[spec.deployments[d.name].workload]
        console.print(f"[bold]deploy {d.name}[/] ({d.model}, {d.weights} weights, {d.kv} KV) on {d.cluster}: "
                      f"{d.mode}, objective {d.objective.replace('_', ' ')}")
        measured = "when saturated" if workload.is_batch else "under the SLO"
        for g in d.groups:
            console.print(f"  [green]+[/] {g.replicas} x ({group_shape_text(g)}) {g.gpu}, {g.role}: "
                          f"{g.capacity_rps:.2f} req/s each {measured}")
            for instance in g.instances:
                console.print(f"      {gpu_ranges(instance.gpus)}")
            console.print(f"      scheduler: {scheduler_text(g.scheduler)}")
            console.print(f"      memory per GPU: {memory_text(g.memory)}")
        p = d.predicted
        limits = ", ".join(_target_text(t, p) for t in slo.targets)
        text, color = slo_verdict(p)
        verdict = f"[{color}]{text}[/]"
        if p.makespan_s is not None:  # an offline batch: how long the job takes
            console.print(f"  predicted for a batch of {p.requests:,} requests: all done in "
                          f"{format_duration(p.makespan_s)}; {limits}; {verdict} (attainment {p.attainment:.1%})")
            console.print(f"  throughput {format_rps(p.goodput_rps)} ({format_rps(p.goodput_rps_per_gpu)} per GPU), "
                          f"{p.output_tokens_per_s:,.0f} output tok/s")
        else:
            console.print(f"  predicted at {format_rps(base_rate(workload))}: {limits}; {verdict} "
                          f"(attainment {p.attainment:.1%})")
            console.print(f"  goodput {p.goodput_rps:,.2f} req/s ({p.goodput_rps_per_gpu:,.3f} per GPU), "
                          f"{p.output_tokens_per_s:,.0f}{range_text(p.output_tokens_per_s, 'throughput', p.interval)} "
                          "output tok/s")
        for b in d.baselines:  # measured as the plan is: the plan is never worse in its objective
            verdict = "sustains the load" if b.sustains_load else "[red]misses the load[/]"
            console.print(f"  = {b.name} baseline, {b.summary} ({_count(b.gpus, 'GPU')}): goodput "
                          f"{format_rps(b.goodput_rps)} ({format_rps(b.goodput_rps / b.gpus)} per GPU), "
                          f"{verdict}{b.note or ''}")
        for constraint in d.binding:
            console.print(f"  [red]![/] {constraint}")
        if explain:
            for a in d.alternatives:  # the reason carries the objective value, in the objective's unit
                console.print(f"  [yellow]~[/] {a.summary}: {a.reason}")
        console.print()
    gpus = sum(d.gpus for d in plan.deployments)
    s = plan.solver
    console.print(f"Plan: {_count(len(plan.deployments), 'deployment')}, {_count(gpus, 'GPU')}; "
                  f"solver {s.status} (gap {s.gap:.1%})"
                  + (f"; compiled in {compile_s:.1f} s." if compile_s is not None else "."))
