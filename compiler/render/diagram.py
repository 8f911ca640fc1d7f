"""Pictures of a plan for `flowc viz`: Graphviz DOT, a Mermaid flowchart and a rich tree.

DOT and Mermaid draw the same diagram (`_Builder`): a box per cluster node, a diagram node per GPU
the plan uses (filled with its deployment's color, shaped by its instance group's role), a box
per instance around its GPUs (its TP group; one box per node when its pipeline spans nodes),
KV-cache edges from prefill to decode instances and edges between pipeline stages, each labelled
with the link it crosses. Given the spec, the unused GPUs of the cluster are drawn grey and the
edges name their links' bandwidths.

Diagram ids are generated (`n0g3`, `d0g1i2`), never taken from user text; deployment, cluster,
GPU and link names only ever appear inside labels, escaped for each format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from rich.text import Text
from rich.tree import Tree

from flowc.compiler.model.topology import cluster_nodes
from flowc.compiler.plan import DeploymentPlan, GpuRef, Instance, InstanceGroup, Plan
from flowc.compiler.render.text import group_shape_text, memory_text, range_text, scheduler_text, slo_verdict
from flowc.compiler.spec import NodeGroup, Spec
from flowc.compiler.units import format_gbps

# Okabe-Ito, colorblind-safe; its black is left out so that no GPU is filled black.
DEPLOYMENT_COLORS = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7"]
UNUSED_COLOR = "#DDDDDD"
UNUSED_INK = "#777777"


@dataclass(frozen=True)
class RoleStyle:
    """How GPUs of one role look: `dot_shape`/`dot_style` for Graphviz, `mermaid_shape` the
    brackets around a Mermaid label, `dasharray`/`stroke_width` the outline for SVG and CSS."""

    dot_shape: str
    dot_style: str
    mermaid_shape: tuple[str, str]
    dasharray: Optional[str]
    stroke_width: float


ROLE_STYLES: dict[str, RoleStyle] = {
    "colocated": RoleStyle("box", "filled", ("[", "]"), None, 1.0),
    "prefill": RoleStyle("hexagon", "filled,dashed", ("{{", "}}"), "5 3", 1.5),
    "decode": RoleStyle("box", "filled,rounded,bold", ("([", "])"), None, 2.5),
}

# Edge kind -> (legend label, DOT style, Mermaid arrow).
_EDGE_STYLES = {"kv": ("KV cache", "solid", "-->"), "pp": ("pipeline stages", "dashed", "-.->")}

# Beyond this many prefill x decode pairs between two groups one summary edge stands for them:
# more is unreadable, and Mermaid refuses diagrams with over 500 edges.
_MAX_KV_PAIRS = 16


def deployment_color(index: int) -> str:
    """The fill of deployment `index` of a plan (the palette repeats past seven)."""
    return DEPLOYMENT_COLORS[index % len(DEPLOYMENT_COLORS)]


def ink(fill: str) -> str:
    """Black or white, whichever reads better on `fill` (#RRGGBB), by relative luminance."""
    r, g, b = (int(fill[i:i + 2], 16) / 255 for i in (1, 3, 5))
    return "#000000" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.4 else "#FFFFFF"


# ---------------------------------------------------------------------------------- the layout

@dataclass
class _Gpu:
    id: str
    label: str
    tooltip: str
    dep: Optional[int] = None  # None: a GPU of the cluster that the plan leaves unused
    role: Optional[str] = None


@dataclass
class _Box:
    """A box of GPUs: one instance's GPUs on one node."""

    id: str
    label: str
    gpus: list[_Gpu]
    first: int  # the lowest GPU index in it: boxes are drawn in GPU order


@dataclass
class _Node:
    id: str
    label: str
    boxes: list[_Box]
    loose: list[_Gpu] = field(default_factory=list)  # unused GPUs, outside every instance box


@dataclass
class _Edge:
    kind: str  # "kv" or "pp"
    tail: tuple[str, str]  # (GPU id, box id)
    head: tuple[str, str]
    label: str


@dataclass
class _Diagram:
    title: str
    deployments: list[tuple[str, str]]  # (name, model), indexed like plan.deployments
    nodes: list[_Node]
    edges: list[_Edge]
    roles: list[str]  # roles present, in ROLE_STYLES order

    @property
    def has_unused(self) -> bool:
        return any(node.loose for node in self.nodes)


def _title(plan: Plan) -> str:
    count = len(plan.deployments)
    return f"{count} deployment{'s' if count != 1 else ''}, {sum(d.gpus for d in plan.deployments)} GPUs"


class _Builder:
    """Lays out the diagram of a plan; `build()` returns it."""

    def __init__(self, plan: Plan, spec: Optional[Spec]):
        self.plan = plan
        names = list(dict.fromkeys(d.cluster for d in plan.deployments))
        # one cluster (the usual case) keeps the ids equal to GpuRef's `n0g3`
        self.prefix = {name: "" if len(names) == 1 else f"c{i}_" for i, name in enumerate(names)}
        self.clusters = {name: spec.clusters.get(name) if spec is not None else None for name in names}
        self.node_groups: dict[str, list[NodeGroup]] = {
            name: cluster_nodes(c) if c is not None else [] for name, c in self.clusters.items()}
        self.edges: list[_Edge] = []
        self.boxes: dict[tuple[str, int], dict[str, _Box]] = {}  # (cluster, node) -> box id -> box
        self.gpu_types: dict[tuple[str, int], list[str]] = {}  # (cluster, node) -> GPU types the plan puts there

    def gpu_id(self, cluster: str, ref: GpuRef) -> str:
        # a negative index (an invalid plan) must still give an id
        return f"{self.prefix[cluster]}{ref}".replace("-", "m")

    def box_id(self, cluster: str, i: int, j: int, k: int, node: Optional[int] = None) -> str:
        return f"{self.prefix[cluster]}d{i}g{j}i{k}" + (f"n{node}".replace("-", "m") if node is not None else "")

    def node_group(self, cluster: str, node: int) -> Optional[NodeGroup]:
        """The spec's node group of `node`; None without the spec or past its nodes."""
        groups = self.node_groups[cluster]
        return groups[node] if 0 <= node < len(groups) else None

    def link_text(self, cluster: str, a: set[int], b: set[int]) -> str:
        """The link between GPUs on nodes `a` and GPUs on nodes `b` (verify.py's rule): the node's
        link when both sit on one and the same node, else the network. `nvlink4 450 GB/s`,
        `network ib-ndr x 8, 400 GB/s`; without the spec only whether it leaves the node."""
        network = len(a) > 1 or a != b
        group, spec_cluster = self.node_group(cluster, min(a)), self.clusters[cluster]
        if not network:
            return f"{group.link.name} {format_gbps(group.link.bandwidth)}" if group is not None else "inside the node"
        if spec_cluster is None:
            return "network"
        net, nics = spec_cluster.network, spec_cluster.network_nics
        return f"network {net.name} x {nics}, {format_gbps(net.bandwidth * nics)}" if net is not None else "no network"

    def end(self, cluster: str, ijk: tuple[int, int, int], inst: Instance, ref: GpuRef) -> tuple[str, str]:
        """Where an edge from or to GPU `ref` of an instance starts or ends: (GPU id, box id)."""
        spans = len({r.node for r in inst.gpus}) > 1
        return self.gpu_id(cluster, ref), self.box_id(cluster, *ijk, ref.node if spans else None)

    def add_instance(self, i: int, d: DeploymentPlan, j: int, g: InstanceGroup, k: int, inst: Instance) -> None:
        nodes = list(dict.fromkeys(ref.node for ref in inst.gpus))
        shape = f"tp {g.tp}" + (f" x pp {g.pp}" if g.pp > 1 else "") + (f" x ep {g.ep}" if g.ep > 1 else "")
        for node in nodes:
            box_id = self.box_id(d.cluster, i, j, k, node if len(nodes) > 1 else None)
            first = min(ref.index for ref in inst.gpus if ref.node == node)
            box = _Box(box_id, f"{d.name}: {g.role} g{j}.i{k} ({shape})", [], first)
            self.boxes.setdefault((d.cluster, node), {})[box_id] = box
            self.gpu_types.setdefault((d.cluster, node), []).append(g.gpu)
            for position, ref in enumerate(inst.gpus):
                if ref.node == node:
                    stage, rank = divmod(position, max(g.tp, 1))
                    tooltip = f"{d.name}, {g.role} g{j}.i{k}, {g.gpu}, stage {stage}, rank {rank}"
                    box.gpus.append(_Gpu(self.gpu_id(d.cluster, ref), str(ref), tooltip, i, g.role))
        # from the first GPU of each stage to the next one's
        heads = inst.gpus[::max(g.tp, 1)]
        for stage, (a, b) in enumerate(zip(heads, heads[1:])):
            self.edges.append(_Edge("pp", self.end(d.cluster, (i, j, k), inst, a),
                                    self.end(d.cluster, (i, j, k), inst, b),
                                    f"stage {stage} to {stage + 1}: {self.link_text(d.cluster, {a.node}, {b.node})}"))

    def add_kv(self, i: int, d: DeploymentPlan) -> None:
        """Prefill -> decode edges: every pair, as the verifier charges traffic to every pair; one
        edge for all of them past _MAX_KV_PAIRS."""
        def instances(role: str) -> list[tuple[int, int, Instance]]:
            return [(j, k, inst) for j, g in enumerate(d.groups) if g.role == role
                    for k, inst in enumerate(g.instances) if inst.gpus]

        pairs = [(p, q) for p in instances("prefill") for q in instances("decode")]
        links = [self.link_text(d.cluster, {r.node for r in p[2].gpus}, {r.node for r in q[2].gpus})
                 for p, q in pairs]
        labels = [f"KV: {text}" for text in links]
        if len(pairs) > _MAX_KV_PAIRS:
            prefill, decode = len(instances("prefill")), len(instances("decode"))
            pairs, labels = pairs[:1], [f"KV: {', '.join(dict.fromkeys(links))} ({prefill} x {decode} pairs)"]
        for ((pj, pk, p), (qj, qk, q)), label in zip(pairs, labels):
            self.edges.append(_Edge("kv", self.end(d.cluster, (i, pj, pk), p, p.gpus[0]),
                                    self.end(d.cluster, (i, qj, qk), q, q.gpus[0]), label))

    def node(self, cluster: str, node: int) -> _Node:
        group = self.node_group(cluster, node)
        if group is None:
            label = f"{cluster} node {node}: {', '.join(dict.fromkeys(self.gpu_types.get((cluster, node), [])))}"
        else:
            name = f" ({group.name})" if group.name else ""
            label = f"{cluster} node {node}{name}: {group.gpu} x {group.gpus_per_node}, {group.link.name}"
        boxes = sorted(self.boxes.get((cluster, node), {}).values(), key=lambda box: box.first)
        out = _Node(self.prefix[cluster] + f"node{node}".replace("-", "m"), label, boxes)
        taken = {gpu.id for box in boxes for gpu in box.gpus}
        for index in range(group.gpus_per_node if group is not None else 0):
            ref = GpuRef(node=node, index=index)
            if self.gpu_id(cluster, ref) not in taken:
                out.loose.append(_Gpu(self.gpu_id(cluster, ref), str(ref), f"{ref}: unused"))
        return out

    def build(self) -> _Diagram:
        for i, d in enumerate(self.plan.deployments):
            for j, g in enumerate(d.groups):
                for k, inst in enumerate(g.instances):
                    self.add_instance(i, d, j, g, k, inst)
            if d.mode == "disaggregated":
                self.add_kv(i, d)
        nodes = [self.node(cluster, node) for cluster in self.prefix
                 for node in sorted({n for c, n in self.boxes if c == cluster}
                                    | set(range(len(self.node_groups[cluster]))))]
        roles = {g.role for d in self.plan.deployments for g in d.groups}
        return _Diagram(title=f"plan: {_title(self.plan)}",
                        deployments=[(d.name, d.model) for d in self.plan.deployments], nodes=nodes,
                        edges=self.edges, roles=[role for role in ROLE_STYLES if role in roles])


# ---------------------------------------------------------------------------------- DOT

def _dot(text: str) -> str:
    """A DOT string literal. Graphviz decodes HTML entities in every string (`&amp;`), then reads
    `\\\\` as a backslash and `\\n` as a line break in labels."""
    text = text.replace("&", "&amp;").replace("\\", "\\\\").replace('"', '\\"')
    return '"' + text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\\n") + '"'


def _dot_attrs(**attrs: str) -> str:
    return "[" + ", ".join(f"{key}={_dot(value)}" for key, value in attrs.items()) + "]"


def _dot_graph(indent: str, **attrs: str) -> list[str]:
    """A (sub)graph's attributes, one `key=value;` statement each (pydot reads these, not `graph [..]`)."""
    return [f"{indent}{key}={_dot(value)};" for key, value in attrs.items()]


_DOT_UNUSED = {"shape": "box", "style": "filled,dashed", "fillcolor": UNUSED_COLOR, "fontcolor": UNUSED_INK,
               "color": UNUSED_INK}


def _dot_look(dep: Optional[int], role: Optional[str]) -> dict[str, str]:
    """Shape and colors of a GPU of deployment `dep` in `role`; either None: the legend's plain
    role, or its deployment's color as a box."""
    style = ROLE_STYLES[role or "colocated"]
    fill = deployment_color(dep) if dep is not None else "#FFFFFF"
    return {"shape": style.dot_shape, "style": style.dot_style, "fillcolor": fill, "fontcolor": ink(fill)}


def _dot_gpu(gpu: _Gpu) -> str:
    look = _DOT_UNUSED if gpu.dep is None else _dot_look(gpu.dep, gpu.role)
    return f"{gpu.id} {_dot_attrs(label=gpu.label, tooltip=gpu.tooltip, **look)};"


def to_dot(plan: Plan, spec: Optional[Spec] = None) -> str:
    """Graphviz DOT of `plan`: `cluster_node0`.. per node, `cluster_d0g1i2` per instance (with
    `n1` appended per node when its stages span nodes), a node per GPU, `cluster_legend`."""
    diagram = _Builder(plan, spec).build()
    # compound: edges end at instance boxes (ltail, lhead); newrank: boxes inside nodes may set a rank
    lines = ["digraph plan {", *_dot_graph("  ", label=diagram.title, labelloc="t", fontname="Helvetica",
                                           rankdir="LR", compound="true", newrank="true"),
             f"  node {_dot_attrs(fontname='Helvetica', fontsize='10')};",
             f"  edge {_dot_attrs(fontname='Helvetica', fontsize='9')};"]
    for node in diagram.nodes:
        lines.append(f"  subgraph cluster_{node.id} {{")
        lines.extend(_dot_graph("    ", label=node.label, style="rounded", color="#555555"))
        for box in node.boxes:
            lines.append(f"    subgraph cluster_{box.id} {{")
            # rank same: one column per instance (rankdir LR), prefill columns left of decode ones
            lines.extend(_dot_graph("      ", label=box.label, style="dashed", color="#999999", rank="same"))
            lines.extend(f"      {_dot_gpu(gpu)}" for gpu in box.gpus)
            lines.append("    }")
        lines.extend(f"    {_dot_gpu(gpu)}" for gpu in node.loose)
        lines.append("  }")
    for edge in diagram.edges:
        attrs = {"label": edge.label, "style": _EDGE_STYLES[edge.kind][1]}
        if edge.tail[1] != edge.head[1]:  # a hop inside one box ends at its GPUs
            attrs.update(ltail=f"cluster_{edge.tail[1]}", lhead=f"cluster_{edge.head[1]}")
        lines.append(f"  {edge.tail[0]} -> {edge.head[0]} {_dot_attrs(**attrs)};")
    lines.extend(f"  {line}" for line in _dot_legend(diagram))
    lines.append("}")
    return "\n".join(lines) + "\n"


def _dot_legend(diagram: _Diagram) -> list[str]:
    lines = ["subgraph cluster_legend {", *_dot_graph("  ", label="legend", style="rounded")]
    for i, (name, model) in enumerate(diagram.deployments):
        lines.append(f"  legend_d{i} {_dot_attrs(label=f'{name} ({model})', **_dot_look(i, None))};")
    lines.extend(f"  legend_{role} {_dot_attrs(label=role, **_dot_look(None, role))};" for role in diagram.roles)
    if diagram.has_unused:
        lines.append(f"  legend_unused {_dot_attrs(label='unused', **_DOT_UNUSED)};")
    kinds = {edge.kind for edge in diagram.edges}
    for kind, (label, style, _) in _EDGE_STYLES.items():
        if kind in kinds:
            lines.append(f"  legend_{kind}_a [shape=point];")
            lines.append(f"  legend_{kind}_b [shape=point];")
            lines.append(f"  legend_{kind}_a -> legend_{kind}_b {_dot_attrs(label=label, style=style)};")
    lines.append("}")
    return lines


# ---------------------------------------------------------------------------------- Mermaid

# Characters kept as they are in a quoted Mermaid label besides letters and digits (unicode ones
# too); every other one becomes an entity (`#34;`), so that no quote ends the label, no `%%{`
# starts a directive, no `#name;` is read as an entity and no `<` as HTML.
_MERMAID_PLAIN = frozenset(" _-.,:/+=()")


def _mermaid(text: str) -> str:
    """A double-quoted Mermaid label; line breaks become `<br>`."""
    lines = ("".join(ch if ch.isalnum() or ch in _MERMAID_PLAIN else f"#{ord(ch)};" for ch in line)
             for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"))
    return '"' + "<br>".join(lines) + '"'


def _mermaid_css(fill: str, text: str, stroke: str, dasharray: Optional[str], width: float) -> str:
    css = f"fill:{fill},color:{text},stroke:{stroke},stroke-width:{width:g}px"
    return css + (f",stroke-dasharray:{dasharray}" if dasharray else "")


_UNUSED_CSS = _mermaid_css(UNUSED_COLOR, UNUSED_INK, UNUSED_INK, "3 3", 1)


class _MermaidClasses:
    """The classDefs of a flowchart, each with the ids it styles."""

    def __init__(self) -> None:
        self.css: dict[str, str] = {}
        self.ids: dict[str, list[str]] = {}

    def add(self, name: str, css: str, id: str) -> None:
        self.css[name] = css
        self.ids.setdefault(name, []).append(id)

    def lines(self) -> list[str]:
        return ([f"  classDef {name} {css}" for name, css in self.css.items()]
                + [f"  class {','.join(ids)} {name}" for name, ids in self.ids.items()])


def _mermaid_gpu(gpu: _Gpu, classes: _MermaidClasses) -> str:
    if gpu.dep is None:
        classes.add("unused", _UNUSED_CSS, gpu.id)
        return f"{gpu.id}[{_mermaid(gpu.label)}]"
    role, fill = ROLE_STYLES[gpu.role], deployment_color(gpu.dep)
    classes.add(f"d{gpu.dep}_{gpu.role}", _mermaid_css(fill, ink(fill), "#333333", role.dasharray, role.stroke_width),
                gpu.id)
    opening, closing = role.mermaid_shape
    return f"{gpu.id}{opening}{_mermaid(gpu.label)}{closing}"


def _mermaid_end(edge_end: tuple[str, str], other: tuple[str, str]) -> str:
    """A box for an edge between two boxes; the GPU itself for a pipeline hop inside one box."""
    return edge_end[1] if edge_end[1] != other[1] else edge_end[0]


def to_mermaid(plan: Plan, spec: Optional[Spec] = None) -> str:
    """A Mermaid flowchart of `plan`, the same diagram as `to_dot` (ids alike, without `cluster_`)."""
    diagram = _Builder(plan, spec).build()
    classes = _MermaidClasses()
    lines = ["---", f'title: "{diagram.title}"', "---", "flowchart LR"]
    for node in diagram.nodes:
        lines.append(f"  subgraph {node.id}[{_mermaid(node.label)}]")
        for box in node.boxes:
            lines.append(f"    subgraph {box.id}[{_mermaid(box.label)}]")
            lines.extend(f"      {_mermaid_gpu(gpu, classes)}" for gpu in box.gpus)
            lines.append("    end")
        lines.extend(f"    {_mermaid_gpu(gpu, classes)}" for gpu in node.loose)
        lines.append("  end")
    for edge in diagram.edges:
        lines.append(f"  {_mermaid_end(edge.tail, edge.head)} {_EDGE_STYLES[edge.kind][2]}|{_mermaid(edge.label)}| "
                     f"{_mermaid_end(edge.head, edge.tail)}")
    lines.append(f"  subgraph legend[{_mermaid('legend')}]")
    lines.extend(f"    {line}" for line in _mermaid_legend(diagram, classes))
    lines.append("  end")
    return "\n".join(lines + classes.lines()) + "\n"


def _mermaid_legend(diagram: _Diagram, classes: _MermaidClasses) -> list[str]:
    lines = []
    for i, (name, model) in enumerate(diagram.deployments):
        fill = deployment_color(i)
        lines.append(f"legend_d{i}[{_mermaid(f'{name} ({model})')}]")
        classes.add(f"d{i}", _mermaid_css(fill, ink(fill), "#333333", None, 1), f"legend_d{i}")
    for role in diagram.roles:
        style = ROLE_STYLES[role]
        lines.append(f"legend_{role}{style.mermaid_shape[0]}{_mermaid(role)}{style.mermaid_shape[1]}")
        classes.add(f"role_{role}", _mermaid_css("#FFFFFF", "#000000", "#333333", style.dasharray, style.stroke_width),
                    f"legend_{role}")
    if diagram.has_unused:
        lines.append(f"legend_unused[{_mermaid('unused')}]")
        classes.add("unused", _UNUSED_CSS, "legend_unused")
    kinds = {edge.kind for edge in diagram.edges}
    for kind, (label, _, arrow) in _EDGE_STYLES.items():
        if kind in kinds:
            lines.append(f'legend_{kind}_a[" "] {arrow}|{_mermaid(label)}| legend_{kind}_b[" "]')
    return lines


# ---------------------------------------------------------------------------------- rich tree

def _stages(g: InstanceGroup, inst: Instance) -> str:
    """`n0g0 n0g1`, or per stage `stage 0: n0g0 n0g1 | stage 1: n1g0 n1g1` when pipelined."""
    stages = [" ".join(str(ref) for ref in inst.gpus[s * g.tp:(s + 1) * g.tp]) for s in range(g.pp)]
    return stages[0] if g.pp == 1 else " | ".join(f"stage {s}: {gpus}" for s, gpus in enumerate(stages))


def _group_tree(j: int, g: InstanceGroup, color: str) -> Tree:
    tree = Tree(Text.assemble((f"group {j}: {g.role}", f"bold {color}"),
                              f", {g.replicas} x {g.gpu} ({group_shape_text(g)}), {g.capacity_rps:.2f} req/s each"))
    tree.add(Text(f"scheduler: {scheduler_text(g.scheduler)}"))
    tree.add(Text(f"memory per GPU: {memory_text(g.memory)}"))
    for k, inst in enumerate(g.instances):
        tree.add(Text(f"instance {k}: {_stages(g, inst)}"))
    return tree


def plan_tree(plan: Plan) -> Tree:
    """plan -> deployments (model, mode, objective, predictions) -> instance groups (role, GPU,
    parallelism, replicas, scheduler, memory per GPU) -> instances with their GPUs. Labels are
    `Text`, so that names are never read as rich markup."""
    s = plan.solver
    root = Tree(Text(f"plan (flowc {plan.flowc_version}, format {plan.format_version}): {_title(plan)}, "
                     f"solver {s.status} (gap {s.gap:.1%})", style="bold"))
    for i, d in enumerate(plan.deployments):
        color = deployment_color(i)
        node = root.add(Text.assemble((d.name, f"bold {color}"),
                                      f": {d.model} ({d.weights} weights, {d.kv} KV) on {d.cluster}, {d.mode}, "
                                      f"objective {d.objective.replace('_', ' ')}, {d.gpus} GPUs"))
        p = d.predicted
        verdict = slo_verdict(p)
        ttft, tpot = p.ttft_ms.p90, p.tpot_ms.p90
        node.add(Text.assemble(f"predicted: TTFT p90 {ttft:,.0f} ms{range_text(ttft, 'ttft', p.interval)}, "
                               f"TPOT p90 {tpot:,.1f} ms{range_text(tpot, 'tpot', p.interval, 1)}, "
                               f"goodput {p.goodput_rps:,.2f} req/s ({p.goodput_rps_per_gpu:,.3f} per GPU), "
                               f"attainment {p.attainment:.1%}: ", verdict))
        for j, g in enumerate(d.groups):
            node.add(_group_tree(j, g, color))
    return root
