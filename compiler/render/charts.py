"""The HTML report's charts, as matplotlib figures: the cluster with the plan's GPUs and
traffic, the memory map per group, latency CDFs against the SLO, the SLO against arrival
rate, and autotuning's Pareto frontier. `svg` turns a figure into inline SVG whose glyphs are
paths, so the report references no font."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch, Rectangle
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from flowc.compiler.model.memory import GPU_MEMORY_UTILIZATION
from flowc.compiler.model.topology import cluster_nodes
from flowc.compiler.plan import DeploymentPlan, InstanceGroup, Plan
from flowc.compiler.render.diagram import ROLE_STYLES, UNUSED_COLOR, UNUSED_INK, deployment_color, ink
from flowc.compiler.render.report_data import Flow, Runs
from flowc.compiler.spec import Cluster
from flowc.compiler.units import GiB, format_gbps, format_rps

CELL_W, CELL_H, GAP, PAD, TITLE_H, FOOT_H = 1.0, 0.8, 0.15, 0.25, 0.55, 0.75


MEMORY_COLORS = {"weights": "#4e79a7", "kv_cache": "#59a14f", "activations": "#f28e2b", "reserve": "#b07aa1",
                 "free": "#e8e8e8", "offloaded": "#9c755f"}


MEMORY_LABELS = {"weights": "weights", "kv_cache": "KV cache", "activations": "activation arena",
                 "reserve": "reserve", "free": "free", "offloaded": "offloaded to host"}


ON_GPU = ("weights", "kv_cache", "activations", "reserve", "free")  # MemoryMap fields, adding up to capacity


def _gpu_look(deployment: int, role: str) -> dict:
    """Patch properties of a GPU of plan.deployments[deployment] in `role`."""
    style = ROLE_STYLES[role]
    dashes = (0, tuple(float(x) for x in style.dasharray.split())) if style.dasharray else "solid"
    return {"facecolor": deployment_color(deployment), "edgecolor": "#222222", "linewidth": style.stroke_width,
            "linestyle": dashes}


UNUSED_LOOK = {"facecolor": UNUSED_COLOR, "edgecolor": UNUSED_INK, "linewidth": 0.8, "linestyle": (0, (3.0, 3.0))}


def svg(fig: Figure, key: str) -> str:
    """The figure as an inline <svg> element: glyphs as paths (no font is referenced), ids
    salted by `key` so that two charts of one page never share an id, and no date (the same
    plan gives the same file)."""
    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "path", "svg.hashsalt": key}):
        fig.savefig(buffer, format="svg", bbox_inches="tight",
                    metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    text = buffer.getvalue()
    return text[text.index("<svg"):]  # drop the XML declaration and the DOCTYPE (it names a URL)


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


def _columns(gpus: int, domain: int) -> int:
    """GPUs per row in a node's drawing: whole link domains per row (or rows per domain)."""
    if domain < gpus and (domain > 4 or 4 % domain):
        return domain
    return min(gpus, 4)


def cluster_figure(plan: Plan, cluster: Cluster, flows: list[Flow]) -> Figure:
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
    inside: dict[int, list[Flow]] = {}
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
        ax.text(0, node_h + 0.15, f"network {net.name} ({net.kind}): {cluster.network_nics} x "
                f"{format_gbps(net.bandwidth)} = {format_gbps(net.bandwidth * cluster.network_nics)} "
                "per node and direction", ha="left", va="bottom", fontsize=7.5)
        for row in range(rows):
            bus_y = -row * spacing_y - 0.8
            ax.plot([0, width], [bus_y, bus_y], color="#555555", linewidth=2.5, solid_capstyle="round")
        for index, (x, y) in anchors.items():
            ax.plot([x, x], [y, y - 0.8], color="#555555", linewidth=1.2)
            if index in egress or index in ingress:
                ax.text(x + 0.1, y - 0.4,
                        f"out {format_gbps(egress.get(index, 0.0))}\nin {format_gbps(ingress.get(index, 0.0))}",
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


def memory_rows(plan: Plan) -> list[tuple[DeploymentPlan, int, InstanceGroup]]:
    return [(dp, j, g) for dp in plan.deployments for j, g in enumerate(dp.groups)]


def group_label(dp: DeploymentPlan, j: int, g: InstanceGroup) -> str:
    return f"{dp.name} group {j}: {g.role}, {g.gpu} tp {g.tp} x pp {g.pp}"


def memory_figure(plan: Plan) -> Figure:
    rows = memory_rows(plan)
    fig = Figure(figsize=(11, 0.55 * len(rows) + 1.3))
    ax = fig.add_subplot()
    widest = 0.0
    for y, (_, _, g) in enumerate(rows):
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
    ax.set_yticks(range(len(rows)), [group_label(dp, j, g) for dp, j, g in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, widest * 1.02)
    ax.set_xlabel("GiB per GPU")
    ax.spines[["top", "right"]].set_visible(False)
    handles = [Patch(facecolor=MEMORY_COLORS[k], label=MEMORY_LABELS[k]) for k in ON_GPU]
    handles.append(Patch(facecolor="white", edgecolor=MEMORY_COLORS["offloaded"], hatch="///",
                         label=MEMORY_LABELS["offloaded"]))
    ax.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=6, fontsize=7.5, frameon=False)
    return fig


def target_label(metric: str, percentile: Optional[float], limit: float) -> str:
    which = f"p{percentile:g}" if percentile is not None else "every request"
    return f"{metric.upper()} {which} ≤ {limit * 1e3:g} ms"


def slo_id(deployment: str, metric: str, percentile: Optional[float], limit: float) -> str:
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


def cdf_figure(dp: DeploymentPlan, runs: Runs) -> Figure:
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
                              label=f"SLO {target_label(t.metric, t.percentile, t.limit)}")
            line.set_gid(slo_id(dp.name, metric, t.percentile, t.limit))
            if t.percentile is not None:
                ax.axhline(t.percentile / 100, color="#d62728", linestyle=":", linewidth=0.8)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def sweep_values(runs: Runs) -> list[dict]:
    """Per simulated rate: joint attainment, whether the rate sustains the SLO (met, and within
    the capacity), whether it is over the capacity, each target's value (ms)."""
    rows = []
    for rate, result in runs.sweep:
        report = result.attainment(runs.slo)
        values = []
        for t in runs.slo.targets:
            entry = next(e for e in report[t.metric]["targets"]
                         if e["percentile"] == t.percentile and e["limit"] == t.limit)
            values.append(entry["value"] * 1e3)
        rows.append({"rate": rate, "attainment": report["joint"]["share"], "meets": runs.sustained(rate, result),
                     "over_capacity": rate > max(runs.capacity, runs.goodput) * (1 + 1e-9), "values": values})
    return rows


def goodput_figure(dp: DeploymentPlan, runs: Runs, rows: list[dict]) -> Figure:
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


def _plain_axes(ax) -> None:
    """The report's chart style: a light grid, no top or right frame."""
    ax.grid(alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)


def pareto_figure(trials: Sequence[Mapping], frontier: Sequence[Mapping]) -> Figure:
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
