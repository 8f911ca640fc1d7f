"""Terminal renderings of estimates and simulation reports."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from flowc.compiler.estimate import Estimate, LatencyStats
from flowc.compiler.serving import DeploymentReport
from flowc.console import make_console

GiB = 2**30


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
    shape = f"tp {e.tp} x pp {e.pp}" + (f" x ep {e.ep}" if e.ep > 1 else "")
    layout = (f"{e.disaggregated[0]} prefill + {e.disaggregated[1]} decode instances" if e.disaggregated
              else f"{e.replicas} replica{'s' if e.replicas > 1 else ''}")
    console.print(f"[bold]{e.model}[/] on {e.gpus} x {e.gpu}: {shape}, {layout}; "
                  f"{e.input_len} tokens in, {e.output_len} out ({e.mode.replace('_', ' ')}, "
                  f"{e.requests_simulated} requests simulated)")
    console.print(_latency_table(e.ttft_ms, e.tpot_ms, e.e2e_ms))
    console.print(f"throughput: {e.output_tokens_per_s:,.0f} output tok/s ({e.output_tokens_per_s_per_gpu:,.0f} per GPU), "
                  f"{e.requests_per_s:,.2f} req/s")
    console.print(f"KV cache: {e.kv_capacity_tokens:,} tokens per instance, up to {e.max_concurrent_seqs} "
                  f"sequences at once; preemptions: {e.preemptions}")
    memory = ", ".join(f"{name} {value / GiB:.1f} GiB" for name, value in e.memory_per_gpu.items())
    console.print(f"memory per GPU: {memory}")
    if not e.calibrated:
        console.print(f"[yellow]note:[/] no measured data for {e.gpu}; the cost model uses {e.calibration_source}")


def print_simulation(reports: dict[str, DeploymentReport], console: Console | None = None) -> None:
    console = console or make_console()
    for r in reports.values():
        verdict = "[green]meets its SLO[/]" if r.meets_slo else "[red]misses its SLO[/]"
        console.print(f"[bold]deploy {r.deployment}[/]: {r.model} on {r.replicas} x (tp {r.tp} x pp {r.pp}) "
                      f"{r.gpu} = {r.gpus} GPUs, {verdict}")
        console.print(f"  {r.note}")
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
