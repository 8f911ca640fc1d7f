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
import io
import math
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch, Rectangle
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from flowc.compiler.diagnostics import Diagnostic
from flowc.compiler.model.memory import GPU_MEMORY_UTILIZATION
from flowc.compiler.plan import DeploymentPlan, InstanceGroup, Plan
from flowc.compiler.render.diagram import ROLE_STYLES, UNUSED_COLOR, UNUSED_INK, deployment_color, ink
from flowc.compiler.model.results import SimResult
from flowc.compiler.spec import SLO, Cluster, Spec
from flowc.compiler.model.instance import simulate_plan_deployment
from flowc.compiler.model.topology import cluster_nodes
from flowc.compiler.model.traffic import spec_traffic
from flowc.compiler.model.workload import base_rate, sample_requests
from flowc.compiler.units import GiB, format_gbps, format_gib, format_ms, format_rps
from flowc.compiler.verify import PREDICTION_SEED

__all__ = ["render_report", "MEMORY_COLORS"]

# GPUs look as in `flowc viz --format dot|mermaid` (compiler/render/diagram.py): filled with their
# deployment's color, outlined by their role; grey when unused. Memory categories have their own.
MEMORY_COLORS = {"weights": "#4e79a7", "kv_cache": "#59a14f", "activations": "#f28e2b", "reserve": "#b07aa1",
                 "free": "#e8e8e8", "offloaded": "#9c755f"}
MEMORY_LABELS = {"weights": "weights", "kv_cache": "KV cache", "activations": "activation arena",
                 "reserve": "reserve", "free": "free", "offloaded": "offloaded to host"}
ON_GPU = ("weights", "kv_cache", "activations", "reserve", "free")  # MemoryMap fields, adding up to capacity

RATE_SCALES = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)  # of the workload's rate
GOODPUT_SCALES = (0.8, 1.0, 1.25)  # of the plan's goodput: where the SLO breaks

Progress = Callable[[str, int, int], None]  # (what, done, total)


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
    runs = _simulate_all(plan, spec, requests, seed, on_progress)
    flows = _flows(plan, spec)
    title = f"flowc plan: {', '.join(plan.spec_files) or 'no spec file'}"
    body = [f"<h1>{_e(title)}</h1>", _overview(plan, diagnostics)]
    body.append("<h2 id='cluster'>Cluster</h2>")
    for name in dict.fromkeys(dp.cluster for dp in plan.deployments):
        cluster = spec.clusters[name]
        body.append(_figure(_cluster_figure(plan, cluster, flows), f"cluster-{name}",
                            f"Cluster <code>{_e(name)}</code>: GPUs by deployment and role (P prefill, D decode, "
                            "C colocated, with the instance number); arrows carry the traffic the plan sends "
                            "between nodes."))
        body.append(_links_table(cluster, flows))
    body.append("<h2 id='memory'>Memory per GPU</h2>")
    body.append(_figure(_memory_figure(plan), "memory",
                        "One GPU of each instance group; the dashed tick is the usable share "
                        f"({GPU_MEMORY_UTILIZATION:.0%}) of its memory, hatched bytes live in host memory."))
    body.append(_memory_table(plan))
    for dp in plan.deployments:
        body.append(_deployment_section(dp, spec, runs[dp.name], seed))
    if autotune is not None:
        body.append(_autotune_section(autotune))
    body.append(_spec_section(spec, sources or {}))
    return _page(title, "\n".join(body))


# ------------------------------------------------------------------------------- simulation


@dataclass(frozen=True)
class _Runs:
    """The simulations of one deployment: at the workload's rate, and over a sweep of rates."""

    slo: SLO
    rate: float
    base: SimResult
    sweep: list[tuple[float, SimResult]]


def _sweep_rates(rate: float, goodput: float) -> list[float]:
    """Rates around the workload's (the workload's own among them) and around the plan's
    goodput, leaving out those within 2% of another."""
    rates = [rate * s for s in RATE_SCALES]
    if 0 < goodput < math.inf:
        rates += [r for r in (goodput * s for s in GOODPUT_SCALES) if all(abs(r - k) > 0.02 * k for k in rates)]
    return sorted(rates)


def _simulate_all(plan: Plan, spec: Spec, n: Optional[int], seed: int,
                  on_progress: Optional[Progress]) -> dict[str, _Runs]:
    sweeps = [_sweep_rates(base_rate(spec.workloads[spec.deployments[dp.name].workload]), dp.predicted.goodput_rps)
              for dp in plan.deployments]
    total, done = sum(map(len, sweeps)), 0
    runs = {}
    for dp, rates in zip(plan.deployments, sweeps):
        d = spec.deployments[dp.name]
        workload = spec.workloads[d.workload]
        sampled = sample_requests(workload, n if n is not None else dp.predicted.requests, seed=seed)
        rate = base_rate(workload)
        sweep = []
        for r in rates:
            if on_progress is not None:
                on_progress(f"simulating `{dp.name}` at {format_rps(r)}", done, total)
            sweep.append((r, simulate_plan_deployment(spec, dp, sampled.scaled(r / rate))))
            done += 1
        base = next(result for r, result in sweep if r == rate)
        runs[dp.name] = _Runs(spec.slos[d.slo], rate, base, sweep)
    if on_progress is not None:
        on_progress("drawing the charts", done, total)
    return runs


# ---------------------------------------------------------------------------------- traffic


@dataclass(frozen=True)
class _Flow:
    """Bytes/s a deployment sends from node `src` to node `dst`, inside the node or (`network`)
    over the network: a transfer that crosses the network leaves and enters through the NICs
    even where some of its GPUs share a node."""

    cluster: str
    deployment: str
    kind: str
    src: int
    dst: int
    network: bool
    bps: float


def _flows(plan: Plan, spec: Spec) -> list[_Flow]:
    """The plan's traffic (`model/traffic.py`, as the verifier's F0525 check charges it) by pair
    of nodes: a transfer that stays on one node is drawn inside it; one that crosses the network
    from each sending node to each receiving node, in proportion to their GPUs."""
    totals: dict[tuple, float] = {}
    for dp in plan.deployments:
        for t in spec_traffic(spec, dp, seed=PREDICTION_SEED).transfers:
            if t.node is not None:
                pairs = {(t.node, t.node): t.bps}
            else:
                dst = t.node_shares("dst")
                pairs = {(a, b): sent * received / t.bps for a, sent in t.node_shares("src").items()
                         for b, received in dst.items()}
            for (a, b), bps in pairs.items():
                key = (dp.cluster, dp.name, t.kind, a, b, t.node is None)
                totals[key] = totals.get(key, 0.0) + bps
    return [_Flow(*key, bps) for key, bps in totals.items() if bps > 0]


# ---------------------------------------------------------------------------------- figures


def _gpu_look(deployment: int, role: str) -> dict:
    """Patch properties of a GPU of plan.deployments[deployment] in `role`."""
    style = ROLE_STYLES[role]
    dashes = (0, tuple(float(x) for x in style.dasharray.split())) if style.dasharray else "solid"
    return {"facecolor": deployment_color(deployment), "edgecolor": "#222222", "linewidth": style.stroke_width,
            "linestyle": dashes}


UNUSED_LOOK = {"facecolor": UNUSED_COLOR, "edgecolor": UNUSED_INK, "linewidth": 0.8, "linestyle": (0, (3.0, 3.0))}


def _svg(fig: Figure, key: str) -> str:
    """The figure as an inline <svg> element: glyphs as paths (no font is referenced), ids
    salted by `key` so that two charts of one page never share an id, and no date (the same
    plan gives the same file)."""
    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "path", "svg.hashsalt": key}):
        fig.savefig(buffer, format="svg", bbox_inches="tight",
                    metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    text = buffer.getvalue()
    return text[text.index("<svg"):]  # drop the XML declaration and the DOCTYPE (it names a URL)


def _figure(fig: Figure, key: str, caption: str) -> str:
    return f"<figure class='chart' id='{_e(key)}'>{_svg(fig, key)}<figcaption>{caption}</figcaption></figure>"


@dataclass(frozen=True)
class _Use:
    index: int  # of the deployment in the plan
    role: str
    instance: int  # within its role, across the deployment's groups
    stage: int


def _gpu_uses(plan: Plan, cluster: str) -> dict[tuple[int, int], _Use]:
    uses = {}
    for i, dp in enumerate(plan.deployments):
        if dp.cluster != cluster:
            continue
        counts: dict[str, int] = {}
        for g in dp.groups:
            for inst in g.instances:
                number = counts.get(g.role, 0)
                counts[g.role] = number + 1
                for r, ref in enumerate(inst.gpus):
                    uses[ref.node, ref.index] = _Use(i, g.role, number, r // g.tp)
    return uses


CELL_W, CELL_H, GAP, PAD, TITLE_H, FOOT_H = 1.0, 0.8, 0.15, 0.25, 0.55, 0.75


def _columns(gpus: int, domain: int) -> int:
    """GPUs per row in a node's drawing: whole link domains per row (or rows per domain)."""
    if domain < gpus and (domain > 4 or 4 % domain):
        return domain
    return min(gpus, 4)


def _cluster_figure(plan: Plan, cluster: Cluster, flows: list[_Flow]) -> Figure:
    nodes = cluster_nodes(cluster)
    uses = _gpu_uses(plan, cluster.name)
    shapes = [(_columns(n.gpus_per_node, n.link_domain), n.gpus_per_node) for n in nodes]
    # at least three cells wide: room for the node's title and link line
    node_w = max(max(cols for cols, _ in shapes), 3) * (CELL_W + GAP) - GAP + 2 * PAD
    node_h = max(-(-gpus // cols) for cols, gpus in shapes) * (CELL_H + GAP) - GAP + 2 * PAD + TITLE_H + FOOT_H
    per_row = min(len(nodes), 4)
    rows = -(-len(nodes) // per_row)
    net = cluster.network
    crossing: dict[tuple[int, int], float] = {}
    inside: dict[int, list[_Flow]] = {}
    egress: dict[int, float] = {}
    ingress: dict[int, float] = {}
    for f in flows:
        if f.cluster != cluster.name:
            continue
        if not f.network:
            inside.setdefault(f.src, []).append(f)
            continue
        if f.src != f.dst:
            crossing[f.src, f.dst] = crossing.get((f.src, f.dst), 0.0) + f.bps
        egress[f.src] = egress.get(f.src, 0.0) + f.bps
        ingress[f.dst] = ingress.get(f.dst, 0.0) + f.bps
    # rows of nodes, each with room below for its stubs to the network bus (and the arcs under it)
    below = 2.2 if net is not None else 0.6
    spacing_x, spacing_y = node_w + 1.2, node_h + below
    width = per_row * spacing_x - 1.2
    bottom = -(rows - 1) * spacing_y - below
    top = node_h + (0.5 if net is not None else 0.1)
    scale = min(0.8, 13.0 / width)  # inches per unit (a GPU cell is one unit wide)
    fig = Figure(figsize=(width * scale, (top - bottom) * scale))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    ax.set_xlim(-0.1, width + 0.1)
    ax.set_ylim(bottom, top)
    anchors = {}  # node -> where its network stub leaves its box
    for node, group in enumerate(nodes):
        x0 = (node % per_row) * spacing_x
        y0 = -(node // per_row) * spacing_y
        anchors[node] = (x0 + node_w / 2, y0)
        ax.add_patch(FancyBboxPatch((x0, y0), node_w, node_h, boxstyle="round,pad=0,rounding_size=0.15",
                                    facecolor="#f7f7f7", edgecolor="#555555", linewidth=1.0))
        host = f", host {group.host_memory / 2**40:g} TiB" if group.host_memory else ""
        ax.text(x0 + PAD, y0 + node_h - PAD, f"n{node}: {group.gpus_per_node} x {group.gpu}{host}",
                ha="left", va="top", fontsize=7.5, fontweight="bold")
        cols = _columns(group.gpus_per_node, group.link_domain)
        grid_top = y0 + node_h - PAD - TITLE_H
        cells = [(x0 + PAD + (index % cols) * (CELL_W + GAP), grid_top - (index // cols + 1) * (CELL_H + GAP) + GAP)
                 for index in range(group.gpus_per_node)]
        for index, (cx, cy) in enumerate(cells):
            use = uses.get((node, index))
            look = _gpu_look(use.index, use.role) if use else UNUSED_LOOK
            ax.add_patch(Rectangle((cx, cy), CELL_W, CELL_H, **look))
            label = f"g{index}"
            if use is not None:
                label += f"\n{use.role[0].upper()}{use.instance}" + (f" s{use.stage}" if use.stage else "")
            ax.text(cx + CELL_W / 2, cy + CELL_H / 2, label, ha="center", va="center", fontsize=6.5,
                    color=ink(deployment_color(use.index)) if use else UNUSED_INK)
        if group.link_domain < group.gpus_per_node:  # dashed: the fast-link domains a TP group stays inside
            for start in range(0, group.gpus_per_node, group.link_domain):
                corners = cells[start:start + group.link_domain]
                xs, ys = [c[0] for c in corners], [c[1] for c in corners]
                ax.add_patch(Rectangle((min(xs) - GAP / 2, min(ys) - GAP / 2), max(xs) - min(xs) + CELL_W + GAP,
                                       max(ys) - min(ys) + CELL_H + GAP, fill=False, linestyle="--",
                                       edgecolor="#777777", linewidth=0.7))
        foot = f"{group.link.name}: {format_gbps(group.link.bandwidth)} per GPU"
        for kind in sorted({f.kind for f in inside.get(node, [])}):
            foot += f"\n{kind} inside: {format_gbps(sum(f.bps for f in inside[node] if f.kind == kind))}"
        ax.text(x0 + PAD, y0 + PAD, foot, ha="left", va="bottom", fontsize=6.5, color="#333333")

    if net is not None:
        ax.text(0, node_h + 0.15, f"network {net.name} ({net.kind}): {cluster.network_nics} x {format_gbps(net.bandwidth)} "
                f"= {format_gbps(net.bandwidth * cluster.network_nics)} per node and direction", ha="left", va="bottom",
                fontsize=7.5)
        for row in range(rows):
            bus_y = -row * spacing_y - 0.8
            ax.plot([0, width], [bus_y, bus_y], color="#555555", linewidth=2.5, solid_capstyle="round")
        for index, (x, y) in anchors.items():
            ax.plot([x, x], [y, y - 0.8], color="#555555", linewidth=1.2)
            if index in egress or index in ingress:
                ax.text(x + 0.1, y - 0.4, f"out {format_gbps(egress.get(index, 0.0))}\nin {format_gbps(ingress.get(index, 0.0))}",
                        ha="left", va="center", fontsize=6.5, color="#c0392b")
    for (a, b), bps in sorted(crossing.items()):
        (xa, ya), (xb, yb) = anchors[a], anchors[b]
        start, end = (xa - 0.4, ya - 0.8), (xb + 0.4, yb - 0.8)
        bow = 0.15 if xb >= xa else -0.15  # arcs bow down, away from the nodes, whichever way they go
        ax.add_patch(FancyArrowPatch(start, end, connectionstyle=f"arc3,rad={bow}", arrowstyle="-|>",
                                     mutation_scale=12, color="#c0392b", linewidth=1.4))
        depth = 0.15 * math.dist(start, end) / 2  # how far the arc bows from its chord
        ax.text((start[0] + end[0]) / 2, min(start[1], end[1]) - depth - 0.1, f"n{a} -> n{b}: {format_gbps(bps)}",
                ha="center", va="top", fontsize=7, color="#c0392b",
                bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "linewidth": 0})
    handles = [Patch(label=f"{dp.name} {role}", **_gpu_look(i, role)) for i, dp in enumerate(plan.deployments)
               if dp.cluster == cluster.name for role in dict.fromkeys(g.role for g in dp.groups)]
    handles.append(Patch(label="unused", **UNUSED_LOOK))
    ax.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=min(len(handles), 5),
              fontsize=7.5, frameon=False)
    return fig


def _memory_rows(plan: Plan) -> list[tuple[DeploymentPlan, int, InstanceGroup]]:
    return [(dp, j, g) for dp in plan.deployments for j, g in enumerate(dp.groups)]


def _group_label(dp: DeploymentPlan, j: int, g: InstanceGroup) -> str:
    return f"{dp.name} group {j}: {g.role}, {g.gpu} tp {g.tp} x pp {g.pp}"


def _memory_figure(plan: Plan) -> Figure:
    rows = _memory_rows(plan)
    fig = Figure(figsize=(11, 0.55 * len(rows) + 1.3))
    ax = fig.add_subplot()
    widest = 0.0
    for y, (dp, j, g) in enumerate(rows):
        mm = g.memory
        left = 0.0
        for key in ON_GPU:
            size = getattr(mm, key) / GiB
            ax.barh(y, size, left=left, height=0.6, color=MEMORY_COLORS[key], edgecolor="white", linewidth=0.5)
            if size >= 0.07 * mm.capacity / GiB:
                ax.text(left + size / 2, y, f"{size:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if key == "free" else "white")
            left += size
        offloaded = sum(mm.offloaded.values()) / GiB
        if offloaded:
            ax.barh(y, offloaded, left=left, height=0.6, color="white", edgecolor=MEMORY_COLORS["offloaded"],
                    hatch="///", linewidth=0.8)
            parts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in sorted(mm.offloaded.items()) if v)
            ax.text(left + offloaded + 0.5, y, f"host: {parts}", ha="left", va="center", fontsize=7)
        usable = mm.capacity * GPU_MEMORY_UTILIZATION / GiB
        ax.plot([usable, usable], [y - 0.38, y + 0.38], color="#333333", linestyle="--", linewidth=1)
        widest = max(widest, left + (offloaded + 0.4 * left if offloaded else 0.0))  # room for the host label
    ax.set_yticks(range(len(rows)), [_group_label(dp, j, g) for dp, j, g in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, widest * 1.02)
    ax.set_xlabel("GiB per GPU")
    ax.spines[["top", "right"]].set_visible(False)
    handles = [Patch(facecolor=MEMORY_COLORS[k], label=MEMORY_LABELS[k]) for k in ON_GPU]
    handles.append(Patch(facecolor="white", edgecolor=MEMORY_COLORS["offloaded"], hatch="///",
                         label=MEMORY_LABELS["offloaded"]))
    ax.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=6, fontsize=7.5, frameon=False)
    return fig


def _target_label(metric: str, percentile: Optional[float], limit: float) -> str:
    which = f"p{percentile:g}" if percentile is not None else "every request"
    return f"{metric.upper()} {which} ≤ {limit * 1e3:g} ms"


def _slo_id(deployment: str, metric: str, percentile: Optional[float], limit: float) -> str:
    """The id of the SLO marker in a CDF: it carries the limit the marker is drawn at."""
    which = f"p{percentile:g}" if percentile is not None else "all"
    return f"slo-limit-{deployment}-{metric}-{which}-{limit * 1e3:g}ms"


def _log_scale(ax, which: str) -> None:
    """Axis `which` ("x" or "y") of `ax` on a log scale labelled 1, 2, 5, 10, 20, ... rather
    than in powers of ten."""
    getattr(ax, f"set_{which}scale")("log")
    axis = getattr(ax, f"{which}axis")
    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def _cdf_figure(dp: DeploymentPlan, runs: _Runs) -> Figure:
    fig = Figure(figsize=(11, 3.6))
    axes = fig.subplots(1, 2)
    for ax, metric in zip(axes, ("ttft", "tpot")):
        values = getattr(runs.base, metric)
        values = values[~np.isnan(values)] * 1e3
        served = np.sort(values[np.isfinite(values)])
        ax.set_title(f"{dp.name}: {metric.upper()}" + (f" ({len(values) - len(served)} never served)"
                                                       if len(served) < len(values) else ""), fontsize=9)
        ax.set_xlabel(f"{metric.upper()} (ms)")
        ax.set_ylabel("share of requests")
        ax.set_ylim(0, 1.02)
        _plain_axes(ax)
        if not len(served):
            ax.text(0.5, 0.5, "no request has one" if not len(values) else "no request served",
                    transform=ax.transAxes, ha="center")
            continue
        ax.step(served, np.arange(1, len(served) + 1) / len(values), where="post", color="#1f77b4",
                label="simulated")
        limits = [t for t in runs.slo.targets if t.metric == metric]
        if served[-1] > 10 * served[0] or any(t.limit * 1e3 > 10 * served[-1] for t in limits):
            _log_scale(ax, "x")
        for t in limits:
            line = ax.axvline(t.limit * 1e3, color="#d62728", linestyle="--", linewidth=1.2,
                              label=f"SLO {_target_label(t.metric, t.percentile, t.limit)}")
            line.set_gid(_slo_id(dp.name, metric, t.percentile, t.limit))
            if t.percentile is not None:
                ax.axhline(t.percentile / 100, color="#d62728", linestyle=":", linewidth=0.8)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def _sweep_values(runs: _Runs) -> list[dict]:
    """Per simulated rate: joint attainment, whether the SLO is met, each target's value (ms)."""
    rows = []
    for rate, result in runs.sweep:
        report = result.attainment(runs.slo)
        values = []
        for t in runs.slo.targets:
            entry = next(e for e in report[t.metric]["targets"]
                         if e["percentile"] == t.percentile and e["limit"] == t.limit)
            values.append(entry["value"] * 1e3)
        rows.append({"rate": rate, "attainment": report["joint"]["share"], "meets": result.meets(runs.slo),
                     "values": values})
    return rows


def _goodput_figure(dp: DeploymentPlan, runs: _Runs, rows: list[dict]) -> Figure:
    fig = Figure(figsize=(11, 3.6))
    share_ax, value_ax = fig.subplots(1, 2)
    rates = [r["rate"] for r in rows]
    log_x = rates[-1] > 20 * rates[0]
    share_ax.plot(rates, [r["attainment"] for r in rows], color="#1f77b4", linewidth=1.2)
    for r in rows:
        share_ax.plot(r["rate"], r["attainment"], "o" if r["meets"] else "x", color="#2ca02c" if r["meets"]
                      else "#d62728", markersize=6)
    if runs.slo.attainment is not None:
        share_ax.axhline(runs.slo.attainment, color="#d62728", linestyle="--", linewidth=1,
                         label=f"required {runs.slo.attainment:.0%}")
    share_ax.set_ylabel("requests meeting every limit")
    share_ax.set_ylim(-0.02, 1.05)
    share_ax.set_title(f"{dp.name}: SLO attainment (o met, x missed)", fontsize=9)
    for i, t in enumerate(runs.slo.targets):
        which = f"p{t.percentile:g}" if t.percentile is not None else "max"
        value_ax.plot(rates, [r["values"][i] for r in rows], marker="o", markersize=3, color=f"C{i}",
                      label=f"{t.metric.upper()} {which}")
        value_ax.axhline(t.limit * 1e3, color=f"C{i}", linestyle="--", linewidth=0.9)
    _log_scale(value_ax, "y")
    value_ax.set_ylabel("ms (dashed: the SLO's limits)")
    value_ax.set_title(f"{dp.name}: latency against load", fontsize=9)
    for ax in (share_ax, value_ax):
        if log_x:
            _log_scale(ax, "x")
        ax.axvline(runs.rate, color="#555555", linestyle=":", linewidth=1, label=f"workload {format_rps(runs.rate)}")
        goodput = dp.predicted.goodput_rps
        if 0 < goodput < math.inf:
            ax.axvline(goodput, color="#9467bd", linestyle="-.", linewidth=1, label=f"goodput {format_rps(goodput)}")
        ax.set_xlabel("arrival rate (req/s)")
        _plain_axes(ax)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------- HTML


def _plain_axes(ax) -> None:
    """The report's chart style: a light grid, no top or right frame."""
    ax.grid(alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    """A table of cells given as HTML (text escaped by the caller); a cell that is already a
    `<td ...>` element (one with attributes) is kept as it is."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table class='{cls}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _overview(plan: Plan, diagnostics: Sequence[Diagnostic]) -> str:
    s = plan.solver
    rows = [(f"<code>{_e(dp.name)}</code>", _e(dp.cluster), _e(dp.model), _e(dp.mode), _e(dp.objective),
             str(dp.gpus), "yes" if dp.predicted.meets_slo else "<b class='bad'>no</b>",
             format_rps(dp.predicted.goodput_rps)) for dp in plan.deployments]
    out = [_table(("deployment", "cluster", "model", "mode", "objective", "GPUs", "meets SLO", "goodput"), rows),
           "<h2 id='solver'>Solver</h2>",
           _table(("status", "objective", "bound", "gap", "solver time", "compile time", "flowc", "plan format"),
                  [(_e(s.status), f"{s.objective:.6g}", f"{s.bound:.6g}", f"{s.gap:.2%}", f"{s.wall_s:.2f} s",
                    f"{plan.compile_s:.1f} s", _e(plan.flowc_version), _e(plan.format_version))])]
    if diagnostics:
        items = "".join(f"<li><b>{_e(d.code)}</b> {_e(d.message)}</li>" for d in diagnostics)
        out.insert(0, f"<div class='warn'><p>The verifier disagrees with this plan:</p><ul>{items}</ul></div>")
    return "\n".join(out)


def _links_table(cluster: Cluster, flows: list[_Flow]) -> str:
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
                     f"{cluster.network_nics} x {format_gbps(net.bandwidth)}" if net else "-", _e(f.deployment), _e(f.kind),
                     format_gbps(f.bps), share))
    if not rows:
        return "<p>The plan sends no traffic between instances on this cluster (no disaggregation, no pipeline).</p>"
    return _table(("where", "link", "bandwidth", "deployment", "traffic", "bytes/s", "load"), rows, "links")


def _bytes_cell(n: int) -> str:
    """GiB to read, the exact bytes in `data-bytes` (and on hover)."""
    return f"<td class='num' data-bytes='{n}' title='{n:,} B'>{format_gib(n)}</td>"


def _memory_table(plan: Plan) -> str:
    rows = []
    for dp, j, g in _memory_rows(plan):
        mm = g.memory
        offloaded = ", ".join(f"{_e(k)} {format_gib(v)}" for k, v in sorted(mm.offloaded.items()) if v) or "-"
        rows.append((_e(_group_label(dp, j, g)), _bytes_cell(mm.capacity), _bytes_cell(mm.weights),
                     _bytes_cell(mm.kv_cache), f"{mm.kv_blocks:,} x {g.scheduler.block_size} tokens",
                     _bytes_cell(mm.activations), _bytes_cell(mm.reserve), _bytes_cell(mm.free), offloaded))
    return _table(("group (one GPU)", "capacity", "weights", "KV cache", "KV blocks", "activation arena", "reserve",
                   "free", "offloaded to host"), rows, "memory")


def _deployment_section(dp: DeploymentPlan, spec: Spec, runs: _Runs, seed: int) -> str:
    d = spec.deployments[dp.name]
    p = dp.predicted
    out = [f"<h2 id='deployment-{_e(dp.name)}'>Deployment <code>{_e(dp.name)}</code></h2>",
           f"<p>{_e(dp.model)} (weights {_e(dp.weights)}, KV {_e(dp.kv)}) on <code>{_e(dp.cluster)}</code>, "
           f"{_e(dp.mode)}, objective {_e(dp.objective)}: {dp.gpus} GPUs. Workload <code>{_e(d.workload)}</code> at "
           f"{format_rps(runs.rate)} under slo <code>{_e(d.slo)}</code>: "
           + "; ".join(_e(_target_label(t.metric, t.percentile, t.limit)) for t in runs.slo.targets)
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
    out.append(_figure(_cdf_figure(dp, runs), f"cdf-{dp.name}",
                       f"CDFs of {len(base)} requests of workload <code>{_e(d.workload)}</code> (seed {seed}) "
                       f"simulated on the whole deployment at {format_rps(runs.rate)}; dashed: the SLO's limits."))
    out.append(_table(("ms", "plan p50", "plan p90", "plan p99", "simulated p50", "simulated p90", "simulated p99"),
                      latency))
    out.append(f"<p>Simulated joint attainment {base.attainment(runs.slo)['joint']['share']:.1%} "
               f"(plan: {p.attainment:.1%}); output {base.output_throughput:,.0f} tok/s "
               f"(plan: {p.output_tokens_per_s:,.0f}).</p>")
    sweep = _sweep_values(runs)
    out.append("<h3>Goodput against arrival rate</h3>")
    out.append(_figure(_goodput_figure(dp, runs, sweep), f"goodput-{dp.name}",
                       f"The same {len(runs.base)} requests arriving faster or slower; the plan's goodput "
                       f"({format_rps(p.goodput_rps)}, {format_rps(p.goodput_rps_per_gpu)} per GPU) is the highest rate its "
                       "compile-time search found to meet the SLO."))
    limits = [_e(_target_label(t.metric, t.percentile, t.limit)) for t in runs.slo.targets]
    header = ("arrival rate", "attainment", *limits, "SLO")
    out.append(_table(header, [(format_rps(r["rate"]), f"{r['attainment']:.1%}", *(format_ms(v) for v in r["values"]),
                                "met" if r["meets"] else "<b class='bad'>missed</b>") for r in sweep]))
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


def _configuration(config: Mapping) -> str:
    return ", ".join(f"{k} {('on' if v else 'off') if isinstance(v, bool) else v}" for k, v in config.items()) \
        or "as declared"


def _pareto_figure(trials: Sequence[Mapping], frontier: Sequence[Mapping]) -> Figure:
    """Goodput per GPU against p90 TTFT and against p90 TPOT: every trial meeting the SLO, the
    frontier's numbered by rank (the third objective is the other panel's)."""
    fig = Figure(figsize=(11, 3.6))
    for ax, metric, name in zip(fig.subplots(1, 2), ("ttft_p90_ms", "tpot_p90_ms"), ("TTFT", "TPOT")):
        rest = [t for t in trials if not t["pareto"]]
        ax.scatter([t["metrics"][metric] for t in rest], [t["metrics"]["goodput_rps_per_gpu"] for t in rest],
                   color="#bbbbbb", s=18, label="other trials meeting the SLO")
        ax.scatter([t["metrics"][metric] for t in frontier], [t["metrics"]["goodput_rps_per_gpu"] for t in frontier],
                   color="#d62728", marker="D", s=26, label="Pareto frontier", zorder=3)
        labels: dict[tuple[float, float], list[str]] = {}  # trials at one point share one label
        for t in frontier:
            labels.setdefault((t["metrics"][metric], t["metrics"]["goodput_rps_per_gpu"]), []).append(str(t["rank"]))
        for point, ranks in labels.items():
            ax.annotate(", ".join(ranks), point, fontsize=7, xytext=(4, 3), textcoords="offset points")
        values = [t["metrics"][metric] for t in trials]
        if min(values) > 0 and max(values) > 20 * min(values):
            _log_scale(ax, "x")
        ax.set_xlabel(f"{name} p90 (ms)")
        ax.set_ylabel("goodput per GPU (req/s)")
        ax.set_title(f"goodput per GPU against {name} p90 (up and left is better)", fontsize=9)
        _plain_axes(ax)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


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
    out.append(_figure(_pareto_figure(feasible, frontier), "autotune-pareto",
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
