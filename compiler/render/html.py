"""The HTML report of a plan (`flowc viz --format html`): one self-contained file, readable offline.

`render_report(plan, spec)` draws the cluster (GPUs colored by deployment and role, links with
the traffic the plan puts on them), a memory map per instance group, TTFT and TPOT CDFs and
the SLO against arrival rate from simulations of the plan, and lists the alternatives, the
binding constraints, the solver status and the spec's source text; with `autotune=` (a
`flowc autotune` result document) also the autotuned trials and their Pareto frontier.

Charts are matplotlib figures saved as inline SVG with glyphs drawn as paths, so the file
references no font, script, stylesheet or URL. Every number a chart shows is also in a table:
searchable, copyable, and checked by the tests against the plan.

Simulations are the verifier's (`model/instance.simulate_plan_deployment`: the whole deployment,
least_work router) on the workload sampled with `seed`; traffic is the verifier's too
(`model/traffic.py`, F0525). The plan is assumed to match the spec: verify it first (`flowc viz` does).
"""

from __future__ import annotations

import html
from typing import Mapping, Optional, Sequence

from matplotlib.figure import Figure

from flowc.compiler.diagnostics import Diagnostic
from flowc.compiler.model.goodput import TOLERANCE as GOODPUT_TOLERANCE
from flowc.compiler.model.memory import GPU_MEMORY_UTILIZATION
from flowc.compiler.model.topology import cluster_nodes
from flowc.compiler.plan import DeploymentPlan, Plan, Predicted
from flowc.compiler.render.charts import (
    MEMORY_COLORS,
    cdf_figure,
    cluster_figure,
    goodput_figure,
    group_label,
    memory_figure,
    memory_rows,
    pareto_figure,
    svg,
    sweep_values,
    target_label,
)
from flowc.compiler.render.report_data import Flow, Progress, Runs, flows, simulate_all
from flowc.compiler.render.text import slo_verdict
from flowc.compiler.spec import Cluster, Spec
from flowc.compiler.units import format_duration, format_gbps, format_gib, format_ms, format_rps

__all__ = ["render_report", "MEMORY_COLORS"]


def render_report(plan: Plan, spec: Spec, *, requests: Optional[int] = None, seed: int = 0,
                  sources: Optional[Mapping[str, str]] = None, diagnostics: Sequence[Diagnostic] = (),
                  on_progress: Optional[Progress] = None, autotune: Optional[Mapping] = None) -> str:
    """The report as one HTML document. `requests`, `seed`: the simulations' sample of each
    workload; `sources`: the spec's source text by file name (shown at the end);
    `diagnostics`: what the verifier found, listed at the top; `on_progress(what, done,
    total)` is called before each simulation. `requests` None: as many as the verifier
    re-simulates (the plan's `predicted.requests`, about 1000), so the charts agree with the
    plan's predictions. `autotune`: the JSON document of `flowc autotune -o` (AutotuneResult.to_dict()),
    drawn as the trials' goodput per GPU against p90 TTFT and TPOT with the Pareto frontier."""
    runs = simulate_all(plan, spec, requests, seed, on_progress)
    traffic = flows(plan, spec)
    title = f"flowc plan: {', '.join(plan.spec_files) or 'no spec file'}"
    body = [f"<h1>{_e(title)}</h1>", _overview(plan, diagnostics)]
    body.append("<h2 id='cluster'>Cluster</h2>")
    for name in dict.fromkeys(dp.cluster for dp in plan.deployments):
        cluster = spec.clusters[name]
        body.append(_figure(cluster_figure(plan, cluster, traffic), f"cluster-{name}",
                            f"Cluster <code>{_e(name)}</code>: GPUs by deployment and role (P prefill, D decode, "
                            "C colocated, with the instance number); arrows carry the traffic the plan sends "
                            "between nodes."))
        body.append(_links_table(cluster, traffic))
    body.append("<h2 id='memory'>Memory per GPU</h2>")
    body.append(_figure(memory_figure(plan), "memory",
                        "One GPU of each instance group; the dashed tick is the usable share "
                        f"({GPU_MEMORY_UTILIZATION:.0%}) of its memory, hatched bytes live in host memory."))
    body.append(_memory_table(plan))
    for dp in plan.deployments:
        body.append(_deployment_section(dp, spec, runs[dp.name], seed))
    if autotune is not None:
        body.append(_autotune_section(autotune))
    body.append(_spec_section(spec, sources or {}))
    return _page(title, "\n".join(body))


def _figure(fig: Figure, key: str, caption: str) -> str:
    return f"<figure class='chart' id='{_e(key)}'>{svg(fig, key)}<figcaption>{caption}</figcaption></figure>"


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    """A table of cells given as HTML (text escaped by the caller); a cell that is already a
    `<td ...>` element (one with attributes) is kept as it is."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table class='{cls}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _meets_cell(p: Predicted) -> str:
    text, color = slo_verdict(p)
    return {"green": "yes", "red": "<b class='bad'>no</b>"}.get(color, _e(text))


def _overview(plan: Plan, diagnostics: Sequence[Diagnostic]) -> str:
    s = plan.solver
    rows = [(f"<code>{_e(dp.name)}</code>", _e(dp.cluster), _e(dp.model), _e(dp.mode), _e(dp.objective),
             str(dp.gpus), _meets_cell(dp.predicted),
             format_rps(dp.predicted.goodput_rps)) for dp in plan.deployments]
    out = [_table(("deployment", "cluster", "model", "mode", "objective", "GPUs", "meets SLO", "goodput"), rows),
           "<h2 id='solver'>Solver</h2>",
           _table(("status", "objective", "bound", "gap", "flowc", "plan format"),  # plans keep no timings
                  [(_e(s.status), f"{s.objective:.6g}", f"{s.bound:.6g}", f"{s.gap:.2%}", _e(plan.flowc_version),
                    _e(plan.format_version))])]
    if diagnostics:
        items = "".join(f"<li><b>{_e(d.code)}</b> {_e(d.message)}</li>" for d in diagnostics)
        out.insert(0, f"<div class='warn'><p>The verifier disagrees with this plan:</p><ul>{items}</ul></div>")
    return "\n".join(out)


def _links_table(cluster: Cluster, flows: list[Flow]) -> str:
    nodes = cluster_nodes(cluster)
    mine = [f for f in flows if f.cluster == cluster.name]
    rows = []
    for node, group in enumerate(nodes):
        link = group.link
        for f in (f for f in mine if not f.network and f.src == node):
            rows.append((f"n{node}", f"{_e(link.name)} ({_e(link.kind)})", f"{format_gbps(link.bandwidth)} per GPU",
                         _e(f.deployment), _e(f.kind), format_gbps(f.bps), "-"))
    net = cluster.network
    for f in (f for f in mine if f.network):
        capacity = net.bandwidth * cluster.network_nics if net is not None else 0.0
        share = f"{f.bps / capacity:.1%} of a node's network" if capacity else "<b class='bad'>no network</b>"
        rows.append((f"n{f.src} -> n{f.dst}", f"{_e(net.name)} ({_e(net.kind)})" if net else "none",
                     f"{cluster.network_nics} x {format_gbps(net.bandwidth)}" if net else "-", _e(f.deployment),
                     _e(f.kind), format_gbps(f.bps), share))
    if not rows:
        return "<p>The plan sends no traffic between instances on this cluster (no disaggregation, no pipeline).</p>"
    return _table(("where", "link", "bandwidth", "deployment", "traffic", "bytes/s", "load"), rows, "links")


def _bytes_cell(n: int) -> str:
    """GiB to read, the exact bytes in `data-bytes` (and on hover)."""
    return f"<td class='num' data-bytes='{n}' title='{n:,} B'>{format_gib(n)}</td>"


def _memory_table(plan: Plan) -> str:
    rows = []
    for dp, j, g in memory_rows(plan):
        mm = g.memory
        offloaded = ", ".join(f"{_e(k)} {format_gib(v)}" for k, v in sorted(mm.offloaded.items()) if v) or "-"
        rows.append((_e(group_label(dp, j, g)), _bytes_cell(mm.capacity), _bytes_cell(mm.weights),
                     _bytes_cell(mm.kv_cache), f"{mm.kv_blocks:,} x {g.scheduler.block_size} tokens",
                     _bytes_cell(mm.activations), _bytes_cell(mm.reserve), _bytes_cell(mm.free), offloaded))
    return _table(("group (one GPU)", "capacity", "weights", "KV cache", "KV blocks", "activation arena", "reserve",
                   "free", "offloaded to host"), rows, "memory")


def _deployment_section(dp: DeploymentPlan, spec: Spec, runs: Runs, seed: int) -> str:
    d = spec.deployments[dp.name]
    p = dp.predicted
    out = [f"<h2 id='deployment-{_e(dp.name)}'>Deployment <code>{_e(dp.name)}</code></h2>",
           f"<p>{_e(dp.model)} (weights {_e(dp.weights)}, KV {_e(dp.kv)}) on <code>{_e(dp.cluster)}</code>, "
           f"{_e(dp.mode)}, objective {_e(dp.objective)}: {dp.gpus} GPUs. Workload <code>{_e(d.workload)}</code> "
           + (f"a batch of {p.requests:,} requests" if p.makespan_s is not None else f"at {format_rps(runs.rate)}")
           + f" under slo <code>{_e(d.slo)}</code>: "
           + "; ".join(_e(target_label(t.metric, t.percentile, t.limit)) for t in runs.slo.targets)
           + (f"; attainment ≥ {runs.slo.attainment:.0%}" if runs.slo.attainment is not None else "") + ".</p>"]
    rows = []
    for j, g in enumerate(dp.groups):
        s = g.scheduler
        for k, inst in enumerate(g.instances):
            rows.append((str(j), _e(g.role), _e(g.gpu), f"{g.tp} / {g.pp} / {g.ep}", str(k),
                         " ".join(f"<code>{ref}</code>" for ref in inst.gpus),
                         f"{s.max_batched_tokens} tokens{' chunked' if s.chunked_prefill else ''}, "
                         f"{s.max_seqs} seqs", format_rps(g.capacity_rps)))
    out.append(_table(("group", "role", "GPU", "tp / pp / ep", "instance", "GPUs", "scheduler", "capacity"), rows))
    base = runs.base
    latency = [(f"{metric.upper()}", *(format_ms(getattr(getattr(p, f"{metric}_ms"), f"p{q}")) for q in (50, 90, 99)),
                *(format_ms(base.percentile(metric, q) * 1e3) for q in (50, 90, 99)))
               for metric in ("ttft", "tpot", "e2e")]
    out.append("<h3>Latency</h3>")
    out.append(_figure(cdf_figure(dp, runs), f"cdf-{dp.name}",
                       f"CDFs of {len(base)} requests of workload <code>{_e(d.workload)}</code> (seed {seed}) "
                       "simulated on the whole deployment "
                       + ("all queued at the start" if p.makespan_s is not None else f"at {format_rps(runs.rate)}")
                       + "; dashed: the SLO's limits."))
    out.append(_table(("ms", "plan p50", "plan p90", "plan p99", "simulated p50", "simulated p90", "simulated p99"),
                      latency))
    out.append(f"<p>Simulated joint attainment {base.attainment(runs.slo)['joint']['share']:.1%} "
               f"(plan: {p.attainment:.1%}); output {base.output_throughput:,.0f} tok/s "
               f"(plan: {p.output_tokens_per_s:,.0f}).</p>")
    if p.makespan_s is not None:  # a batch has no arrival rate to sweep
        out.append(f"<p>The batch takes {format_duration(p.makespan_s)} (simulated: {format_duration(base.makespan)}): "
                   f"{format_rps(p.goodput_rps)} ({format_rps(p.goodput_rps_per_gpu)} per GPU).</p>")
        out.append(_alternatives(dp))
        return "\n".join(out)
    sweep = sweep_values(runs)
    out.append("<h3>Goodput against arrival rate</h3>")
    out.append(_figure(goodput_figure(dp, runs, sweep), f"goodput-{dp.name}",
                       f"The same {len(runs.base)} requests (seed {seed}) arriving faster or slower. The plan's "
                       f"goodput ({format_rps(p.goodput_rps)}, {format_rps(p.goodput_rps_per_gpu)} per GPU) is the "
                       f"highest rate that sustains the SLO, to within {GOODPUT_TOLERANCE:.0%}: its simulation meets "
                       f"the SLO and the rate is within the capacity ({format_rps(runs.capacity)}, the steady "
                       "throughput with every request queued at once; above it queues grow without bound)."))
    limits = [_e(target_label(t.metric, t.percentile, t.limit)) for t in runs.slo.targets]
    header = ("arrival rate", "attainment", *limits, "SLO")
    out.append(_table(header, [(format_rps(r["rate"]), f"{r['attainment']:.1%}", *(format_ms(v) for v in r["values"]),
                                _verdict(r)) for r in sweep]))
    out.append(_alternatives(dp))
    return "\n".join(out)


def _alternatives(dp: DeploymentPlan) -> str:
    out = []
    if dp.baselines:
        out.append("<h3>Baselines</h3>")
        out.append("<p>Measured as the plan is (the same simulator, requests and goodput definition); the plan "
                   "is never worse in its objective.</p>")
        out.append(_table(("baseline", "instances", "GPUs", "goodput", "per GPU", "sustains the load"),
                          [(_e(b.name), _e(b.summary), str(b.gpus), format_rps(b.goodput_rps),
                            format_rps(b.goodput_rps / b.gpus), ("yes" if b.sustains_load else "no") + _e(b.note or ""))
                           for b in dp.baselines]))
    out.append("<h3>Alternatives</h3>")
    if dp.alternatives:
        out.append(_table(("configuration", "objective value", "why it lost"),
                          [(_e(a.summary), f"{a.objective_value:.4g}" if a.objective_value is not None else "-",
                            _e(a.reason)) for a in dp.alternatives], "alternatives"))
    else:
        out.append("<p>No other configuration was considered.</p>")
    out.append("<h3>Binding constraints</h3>")
    out.append("<ul>" + "".join(f"<li>{_e(b)}</li>" for b in dp.binding) + "</ul>" if dp.binding
               else "<p>None: the plan is limited by the SLO and the load, not by a constraint.</p>")
    return "\n".join(out)


def _verdict(row: dict) -> str:
    if row["meets"]:
        return "met"
    return "<b class='bad'>over capacity</b>" if row["over_capacity"] else "<b class='bad'>missed</b>"


def _configuration(config: Mapping) -> str:
    return ", ".join(f"{k} {('on' if v else 'off') if isinstance(v, bool) else v}" for k, v in config.items()) \
        or "as declared"


def _autotune_section(document: Mapping) -> str:
    """The autotuned trials: a chart of those meeting the SLO and a table of the frontier."""
    trials = [{**t, "rank": rank} for rank, t in enumerate(document["trials"], 1)]
    feasible = [t for t in trials if t["metrics"] is not None and t["metrics"]["meets_slo"]]
    frontier = [t for t in feasible if t["pareto"]]
    out = [f"<h2 id='autotune'>Autotuning <code>{_e(document['deployment'])}</code></h2>",
           f"<p>{len(trials)} configurations ({_e(document['strategy'])}, {_e(document['evaluator'])}d, objective "
           f"{_e(document['objective'])}): {len(feasible)} meet the SLO, {len(frontier)} on the Pareto frontier of "
           "goodput per GPU (max), p90 TTFT (min) and p90 TPOT (min).</p>"]
    if not feasible:
        out.append("<p>No configuration meets the SLO: there is no frontier to draw.</p>")
        return "\n".join(out)
    out.append(_figure(pareto_figure(feasible, frontier), "autotune-pareto",
                       "Each point is a configuration meeting the SLO; the frontier's are numbered by their rank "
                       "under the objective."))
    rows = [(str(t["rank"]), _e(_configuration(t["config"])), format_rps(t["metrics"]["goodput_rps_per_gpu"]),
             format_ms(t["metrics"]["ttft_p90_ms"]), format_ms(t["metrics"]["tpot_p90_ms"]), str(t["metrics"]["gpus"]),
             f"{t['objective_value']:.4g}") for t in frontier]
    out.append(_table(("rank", "configuration", "goodput per GPU", "TTFT p90", "TPOT p90", "GPUs", "objective"),
                      rows, "pareto"))
    return "\n".join(out)


def _spec_section(spec: Spec, sources: Mapping[str, str]) -> str:
    out = ["<h2 id='spec'>Spec</h2>"]
    shown = [name for name in sources if not name.startswith("<std>")] or list(spec.files)
    for name in shown:
        text = sources.get(name)
        out.append(f"<h3><code>{_e(name)}</code></h3>")
        out.append(f"<pre class='spec'>{_e(text)}</pre>" if text is not None else "<p>(source text not given)</p>")
    return "\n".join(out)


_CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.85em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure.chart { margin: 1em 0; } figure.chart svg { max-width: 100%; height: auto; }
figcaption { font-size: 0.85em; color: #555; }
pre.spec { background: #f7f7f7; border: 1px solid #ddd; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.bad { color: #c0392b; } .warn { background: #fff4e5; border: 1px solid #f0b27a; padding: 0.5em 1em; }
"""


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>\n<title>{_e(title)}</title>\n"
            f"<style>{_CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")
