"""Plan diagrams (compiler/render/diagram.py): DOT read back by pydot (and drawn by Graphviz's `dot` when
installed), Mermaid read back by the real Mermaid parser under node, the rich tree.

Plans are built by hand over the example specs (compiling takes seconds each; the `slow` test
compiles the examples for real). The Mermaid parser is installed with npm once into pytest's
cache (`.pytest_cache/d/mermaid-*`); without node, npm or the registry those tests skip.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pydot
import pytest
from rich.console import Console

import flowc
from flowc.compiler.plan import (
    DeploymentPlan,
    GpuRef,
    Instance,
    InstanceGroup,
    MemoryMap,
    Percentiles,
    Plan,
    Predicted,
    Scheduler,
    SolverStatus,
)
from flowc.compiler.render.diagram import DEPLOYMENT_COLORS, UNUSED_COLOR, plan_tree, to_dot, to_mermaid
from flowc.compiler.spec import Spec

# pydot's parser calls pyparsing's deprecated camelCase names
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pydot")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
GiB = 1 << 30
GPU_ID = re.compile(r"(c\d+_)?n\d+g\d+")

# Everything that could end a label, start a comment or directive, or be read as an escape.
EVIL = 'ev"il [x] {y} (z) <b>&amp; --> ; %%{init: {"theme": "dark"}}%% #quot; #35; a\\b\\ `t` |p| é 中文 🚀 end'


# ---------------------------------------------------------------------------------- plans

def group(role: str, gpu: str, instances: list[list[tuple[int, int]]], tp: int = 1, pp: int = 1) -> InstanceGroup:
    memory = MemoryMap(capacity=80 * GiB, weights=30 * GiB, kv_cache=40 * GiB, kv_blocks=1000, activations=GiB,
                       reserve=2 * GiB, free=7 * GiB)
    return InstanceGroup(role=role, gpu=gpu, tp=tp, pp=pp,
                         instances=[Instance(gpus=[GpuRef(node=n, index=i) for n, i in gpus]) for gpus in instances],
                         scheduler=Scheduler(max_batched_tokens=2048, chunk_size=2048, max_seqs=64, block_size=16),
                         memory=memory, capacity_rps=1.5)


def deployment(name: str, cluster: str, groups: list[InstanceGroup]) -> DeploymentPlan:
    ms = Percentiles(p50=10.0, p90=20.0, p99=30.0)
    predicted = Predicted(ttft_ms=ms, tpot_ms=ms, e2e_ms=ms, output_tokens_per_s=100.0, goodput_rps=3.0,
                          goodput_rps_per_gpu=1.0, attainment=0.95, meets_slo=True)
    mode = "colocated" if all(g.role == "colocated" for g in groups) else "disaggregated"
    return DeploymentPlan(name=name, cluster=cluster, model="llama-3.1-8b", weights="bf16", kv="bf16", mode=mode,
                          objective="min_cost", groups=groups, predicted=predicted)


def make_plan(*deployments: DeploymentPlan) -> Plan:
    return Plan(flowc_version=flowc.__version__, spec_files=["spec.flow"], deployments=list(deployments),
                solver=SolverStatus(status="optimal", objective=1.0, bound=1.0, gap=0.0))


def code_assistant() -> tuple[Plan, Spec]:
    """What `flowc compile examples/code-assistant-8b.flow` plans: two prefill GPUs, one decode GPU."""
    plan = make_plan(deployment("copilot", "inference", [group("prefill", "h100-sxm", [[(0, 0)], [(0, 1)]]),
                                                         group("decode", "h100-sxm", [[(0, 2)]])]))
    return plan, flowc.load(EXAMPLES / "code-assistant-8b.flow")


def pipelined() -> tuple[Plan, Spec]:
    """On chat-70b's two 8-GPU nodes: a prefill instance whose two stages sit on both nodes, and
    one decode instance per node."""
    prefill = group("prefill", "h100-sxm", [[(0, 0), (0, 1), (1, 0), (1, 1)]], tp=2, pp=2)
    decode = group("decode", "h100-sxm", [[(0, 2), (0, 3)], [(1, 2), (1, 3)]], tp=2)
    return make_plan(deployment("chatbot", "lab", [prefill, decode])), flowc.load(EXAMPLES / "chat-70b.flow")


def two_clusters() -> tuple[Plan, Spec]:
    spec = flowc.load("use std.gpus\nuse std.links\n"
                      "cluster east {\n  node x 1 {\n    gpu h100-sxm x 4\n  }\n}\n"
                      "cluster west {\n  node x 2 {\n    gpu a100-sxm-80g x 2\n  }\n  network ib-ndr\n}\n")
    plan = make_plan(deployment("a", "east", [group("colocated", "h100-sxm", [[(0, 0), (0, 1)]], tp=2)]),
                     deployment("b", "west", [group("colocated", "a100-sxm-80g", [[(0, 0)], [(1, 1)]])]))
    return plan, spec


def evil(plan: Plan, spec: Spec) -> tuple[Plan, Spec]:
    """`pipelined` with user names (deployment, model, cluster, GPU type, links) set to EVIL."""
    names = {"deployment": EVIL + " dep", "model": EVIL + " model", "cluster": EVIL + " cluster",
             "gpu": EVIL + " gpu", "link": EVIL + " link", "network": EVIL + " net"}
    (cluster,) = spec.clusters.values()
    node_groups = [g.model_copy(update={"gpu": names["gpu"], "link": g.link.model_copy(update={"name": names["link"]})})
                   for g in cluster.nodes]
    cluster = cluster.model_copy(update={"name": names["cluster"], "nodes": node_groups,
                                         "network": cluster.network.model_copy(update={"name": names["network"]})})
    spec = spec.model_copy(update={"clusters": {names["cluster"]: cluster}})
    dp = plan.deployments[0]
    dp = dp.model_copy(update={"name": names["deployment"], "model": names["model"], "cluster": names["cluster"],
                               "groups": [g.model_copy(update={"gpu": names["gpu"]}) for g in dp.groups]})
    return plan.model_copy(update={"deployments": [dp]}), spec


def gpus_of(plan: Plan) -> set[str]:
    return {str(ref) for d in plan.deployments for g in d.groups for inst in g.instances for ref in inst.gpus}


# ---------------------------------------------------------------------------------- DOT

def unquote_dot(value: str) -> str:
    """A DOT string literal as Graphviz shows it: HTML entities decoded, then `\\n` a line break
    and `\\x` the character x."""
    assert value[0] == value[-1] == '"', value
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), html.unescape(value[1:-1]),
                  flags=re.S)


def read_dot(text: str) -> pydot.Dot:
    graphs = pydot.graph_from_dot_data(text)
    assert graphs is not None and len(graphs) == 1, "pydot cannot read the DOT"
    return graphs[0]


def dot_nodes(graph) -> dict[str, pydot.Node]:
    """Every node declared in `graph` and its subgraphs, by name (less `node [..]` defaults)."""
    out = {n.get_name(): n for n in graph.get_nodes() if n.get_name() not in ("node", "edge", "graph")}
    for sub in graph.get_subgraphs():
        out.update(dot_nodes(sub))
    return out


def dot_labels(graph) -> list[str]:
    labels = [graph.get_label(), *(n.get_label() for n in graph.get_nodes()),
              *(e.get_label() for e in graph.get_edges())]
    out = [unquote_dot(label) for label in labels if label]
    for sub in graph.get_subgraphs():
        out += dot_labels(sub)
    return out


def node_clusters(graph) -> list:
    return [s for s in graph.get_subgraphs() if re.fullmatch(r"cluster_(c\d+_)?node\d+", s.get_name())]


def draw_svg(text: str) -> list[str]:
    """The lines of text in the SVG Graphviz draws of `text` (skip without `dot`)."""
    dot = shutil.which("dot")
    if dot is None:
        pytest.skip("Graphviz `dot` is not installed")
    run = subprocess.run([dot, "-Tsvg"], input=text.encode(), capture_output=True, timeout=60)
    assert run.returncode == 0, run.stderr.decode()
    # Graphviz built without a font library warns that it guesses widths; anything else is ours
    problems = [line for line in run.stderr.decode().splitlines()
                if line.strip() and "font" not in line.lower() and "character" not in line.lower()]
    assert not problems, problems
    root = ET.fromstring(run.stdout)
    return ["".join(t.itertext()) for t in root.iter("{http://www.w3.org/2000/svg}text")]


def test_broken_dot_is_rejected():
    assert pydot.graph_from_dot_data('digraph { a [label="x] }') is None
    if shutil.which("dot"):
        assert subprocess.run(["dot", "-Tsvg"], input=b'digraph { a [label="x] }', capture_output=True).returncode


def test_dot_code_assistant():
    plan, spec = code_assistant()
    graph = read_dot(to_dot(plan, spec))
    nodes = {name: n for name, n in dot_nodes(graph).items() if GPU_ID.fullmatch(name)}
    assert set(nodes) == {f"n0g{i}" for i in range(8)}  # 3 used, 5 of the node's 8 unused
    unused = {name for name, n in nodes.items() if unquote_dot(n.get("fillcolor")) == UNUSED_COLOR}
    assert unused == {f"n0g{i}" for i in range(3, 8)}
    assert {unquote_dot(nodes[f"n0g{i}"].get("fillcolor")) for i in range(3)} == {DEPLOYMENT_COLORS[0]}
    assert unquote_dot(nodes["n0g0"].get("shape")) != unquote_dot(nodes["n0g2"].get("shape"))  # prefill, decode
    (node0,) = node_clusters(graph)
    assert unquote_dot(node0.get_label()) == "inference node 0: h100-sxm x 8, nvlink4"
    assert [s.get_name() for s in node0.get_subgraphs()] == ["cluster_d0g0i0", "cluster_d0g0i1", "cluster_d0g1i0"]
    kv = [(e.get_source(), e.get_destination(), unquote_dot(e.get_label())) for e in graph.get_edges()]
    assert kv == [("n0g0", "n0g2", "KV: nvlink4 450 GB/s"), ("n0g1", "n0g2", "KV: nvlink4 450 GB/s")]


def test_dot_without_spec_draws_only_the_plan():
    plan, _ = pipelined()
    graph = read_dot(to_dot(plan))
    assert {name for name in dot_nodes(graph) if GPU_ID.fullmatch(name)} == gpus_of(plan)
    assert len(node_clusters(graph)) == 2
    labels = {unquote_dot(e.get_label()) for e in graph.get_edges()}
    assert labels == {"KV: network", "stage 0 to 1: network"}


def test_dot_pipeline_across_nodes():
    plan, spec = pipelined()
    graph = read_dot(to_dot(plan, spec))
    gpus = {name for name in dot_nodes(graph) if GPU_ID.fullmatch(name)}
    assert len(gpus) == 16 and gpus_of(plan) < gpus
    node0, node1 = node_clusters(graph)
    # the prefill instance is boxed once per node it spans
    assert [s.get_name() for s in node0.get_subgraphs()] == ["cluster_d0g0i0n0", "cluster_d0g1i0"]
    assert [s.get_name() for s in node1.get_subgraphs()] == ["cluster_d0g0i0n1", "cluster_d0g1i1"]
    edges = {(e.get_source(), e.get_destination()): unquote_dot(e.get_label()) for e in graph.get_edges()}
    assert edges == {("n0g0", "n1g0"): "stage 0 to 1: network ib-ndr x 8, 400 GB/s",
                     ("n0g0", "n0g2"): "KV: network ib-ndr x 8, 400 GB/s",
                     ("n0g0", "n1g2"): "KV: network ib-ndr x 8, 400 GB/s"}


def test_dot_two_clusters_keep_their_gpus_apart():
    plan, spec = two_clusters()
    graph = read_dot(to_dot(plan, spec))
    gpus = {name for name in dot_nodes(graph) if GPU_ID.fullmatch(name)}
    assert gpus == {f"c0_n0g{i}" for i in range(4)} | {f"c1_n{n}g{i}" for n in range(2) for i in range(2)}
    assert [unquote_dot(s.get_label()) for s in node_clusters(graph)] == [
        "east node 0: h100-sxm x 4, nvlink4", "west node 0: a100-sxm-80g x 2, nvlink3",
        "west node 1: a100-sxm-80g x 2, nvlink3"]


def test_dot_summarizes_many_kv_pairs():
    decode = group("decode", "h100-sxm", [[(1, i)] for i in range(4)])
    plan = make_plan(deployment("big", "lab", [group("prefill", "h100-sxm", [[(0, i)] for i in range(5)]), decode]))
    (edge,) = read_dot(to_dot(plan, flowc.load(EXAMPLES / "chat-70b.flow"))).get_edges()
    assert unquote_dot(edge.get_label()) == "KV: network ib-ndr x 8, 400 GB/s (5 x 4 pairs)"


def test_dot_of_a_plan_its_spec_does_not_match():
    """An invalid plan (the verifier's business) still draws: a node past the spec's, a negative
    index, an instance without GPUs."""
    _, spec = code_assistant()
    plan = make_plan(deployment("copilot", "inference", [group("prefill", "h100-sxm", [[(3, 0)], [(0, -1)], []]),
                                                         group("decode", "h100-sxm", [[(0, 2)]])]))
    graph = read_dot(to_dot(plan, spec))
    assert {"n3g0", "n0gm1", "n0g2"} <= set(dot_nodes(graph))
    assert [unquote_dot(s.get_label()) for s in node_clusters(graph)] == [
        "inference node 0: h100-sxm x 8, nvlink4", "inference node 3: h100-sxm"]
    assert {unquote_dot(e.get_label()) for e in graph.get_edges()} == {"KV: no network", "KV: nvlink4 450 GB/s"}


def evil_pipelined() -> tuple[Plan, Spec]:
    return evil(*pipelined())


def test_dot_keeps_evil_names_intact():
    plan, spec = evil_pipelined()
    labels = "\n".join(dot_labels(read_dot(to_dot(plan, spec))))
    for suffix in ("dep", "model", "cluster", "gpu", "link", "net"):
        assert f"{EVIL} {suffix}" in labels


@pytest.mark.parametrize("case", [code_assistant, pipelined, two_clusters, evil_pipelined])
@pytest.mark.parametrize("with_spec", [True, False])
def test_graphviz_draws_every_label_as_pydot_reads_it(case, with_spec):
    plan, spec = case()
    text = to_dot(plan, spec if with_spec else None)
    drawn = draw_svg(text)
    for label in dot_labels(read_dot(text)):
        for line in label.split("\n"):
            assert line in drawn


# ---------------------------------------------------------------------------------- Mermaid

MERMAID, JSDOM = "11.17.2", "29.1.1"

# Parses each diagram of a JSON list on stdin with mermaid.parse and reads back what the
# flowchart parser built. Mermaid sanitizes labels with DOMPurify, which needs a DOM: jsdom's.
CHECK_MJS = r"""
import { JSDOM } from 'jsdom';
const dom = new JSDOM('<!doctype html><html><body></body></html>');
globalThis.window = dom.window;
globalThis.document = dom.window.document;
const { default: mermaid } = await import('mermaid');
let input = '';
for await (const chunk of process.stdin) input += chunk;
const out = [];
for (const text of JSON.parse(input)) {
  try {
    await mermaid.parse(text);
    const { db } = await mermaid.mermaidAPI.getDiagramFromText(text);
    out.push({
      ok: true,
      vertices: Object.fromEntries([...db.getVertices()].map(([id, v]) => [id, {text: v.text, classes: v.classes}])),
      subgraphs: db.getSubGraphs().map(s => ({id: s.id, title: s.title, nodes: s.nodes})),
      edges: db.getEdges().map(e => ({start: e.start, end: e.end, text: e.text})),
    });
  } catch (e) {
    out.push({ok: false, error: String(e?.message ?? e)});
  }
}
process.stdout.write(JSON.stringify(out));
"""


def _npm_install(npm: str, root: Path) -> None:
    """Install mermaid and jsdom under `root`: into a staging folder first, so that an
    interrupted install is never taken for a finished one."""
    staging = root / f"staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    # fail fast without a network: one retry, short waits
    command = [npm, "install", "--prefix", str(staging), "--no-audit", "--no-fund", "--loglevel=error",
               "--fetch-retries=1", "--fetch-retry-mintimeout=1000", "--fetch-retry-maxtimeout=2000",
               "--fetch-timeout=30000", f"mermaid@{MERMAID}", f"jsdom@{JSDOM}"]
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.skip("npm install of mermaid timed out (no network?)")
    if run.returncode != 0:
        pytest.skip(f"npm install of mermaid failed (no network?): {run.stderr.strip()[:300]}")
    try:
        os.replace(staging / "node_modules", root / "node_modules")
    except OSError:  # another run finished first
        pass
    shutil.rmtree(staging, ignore_errors=True)


@pytest.fixture(scope="session")
def mermaid_parse(request, tmp_path_factory):
    """Parses a list of diagrams with Mermaid: a dict per diagram (`ok`, and `error` or what was parsed)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are needed to run the Mermaid parser")
    key = f"mermaid-{MERMAID}-jsdom-{JSDOM}"
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    root = cache.mkdir(key) if cache is not None else tmp_path_factory.mktemp(key)
    if not (root / "node_modules" / "mermaid" / "package.json").is_file():
        _npm_install(npm, root)
    script = root / "check.mjs"
    script.write_text(CHECK_MJS)

    def parse(texts: list[str]) -> list[dict]:
        run = subprocess.run([node, str(script)], input=json.dumps(texts), capture_output=True, text=True,
                             timeout=120, cwd=root)
        assert run.returncode == 0, run.stderr
        return json.loads(run.stdout)

    try:
        smoke = parse(["flowchart LR\n  a --> b"])
    except AssertionError as e:
        pytest.skip(f"the Mermaid parser does not run under this node: {str(e)[-500:]}")
    assert smoke[0]["ok"], smoke
    return parse


def parsed(mermaid_parse, texts: list[str]) -> list[dict]:
    results = mermaid_parse(texts)
    for text, result in zip(texts, results):
        assert result["ok"], f"{result['error']}\n{text}"
    return results


def mermaid_text(label: str) -> str:
    """A label as Mermaid shows it. Mermaid's parser stores `#name;` as `ﬂ°name¶ß` and `#35;` as
    `ﬂ°°35¶ß` (decoded to HTML entities when it draws); `<br>` is a line break."""
    label = label.replace("ﬂ°°", "&#").replace("ﬂ°", "&").replace("¶ß", ";")
    return html.unescape(label.replace("<br>", "\n"))


def mermaid_labels(result: dict) -> list[str]:
    texts = ([v["text"] for v in result["vertices"].values()] + [s["title"] for s in result["subgraphs"]]
             + [e["text"] for e in result["edges"]])
    return [mermaid_text(t) for t in texts]


def test_broken_mermaid_is_rejected(mermaid_parse):
    """The harness fails on what unescaped names would produce: quotes in a node, an edge and a
    subgraph label, a directive in a label, an unclosed quote or subgraph."""
    broken = ['a["x"y"] --> b', 'a -->|"k"v"| b', 'subgraph s["a"b"]\n  x\n  end', 'a["x"] -->|"%%{init: {}}%%"| b',
              'a["x --> b', "subgraph s\n  a"]
    results = mermaid_parse([f"flowchart LR\n  {body}" for body in broken])
    assert [r["ok"] for r in results] == [False] * len(broken)


def test_mermaid_code_assistant(mermaid_parse):
    plan, spec = code_assistant()
    with_spec, without = parsed(mermaid_parse, [to_mermaid(plan, spec), to_mermaid(plan)])
    assert {v for v in with_spec["vertices"] if GPU_ID.fullmatch(v)} == {f"n0g{i}" for i in range(8)}
    assert {v for v in without["vertices"] if GPU_ID.fullmatch(v)} == gpus_of(plan)
    assert with_spec["vertices"]["n0g7"]["classes"] == ["unused"]
    subgraphs = {s["id"]: s for s in with_spec["subgraphs"]}
    assert set(subgraphs) == {"node0", "d0g0i0", "d0g0i1", "d0g1i0", "legend"}
    assert mermaid_text(subgraphs["node0"]["title"]) == "inference node 0: h100-sxm x 8, nvlink4"
    kv = [(e["start"], e["end"], e["text"]) for e in with_spec["edges"] if not e["start"].startswith("legend")]
    assert kv == [("d0g0i0", "d0g1i0", "KV: nvlink4 450 GB/s"), ("d0g0i1", "d0g1i0", "KV: nvlink4 450 GB/s")]


def test_mermaid_pipelines_clusters_and_evil_names(mermaid_parse):
    (plan, spec), (plan2, spec2) = pipelined(), two_clusters()
    piped, clusters, bad = parsed(mermaid_parse, [to_mermaid(plan, spec), to_mermaid(plan2, spec2),
                                                  to_mermaid(*evil(plan, spec))])
    assert len([v for v in piped["vertices"] if GPU_ID.fullmatch(v)]) == 16
    edges = {(e["start"], e["end"]): e["text"] for e in piped["edges"] if not e["start"].startswith("legend")}
    assert edges[("d0g0i0n0", "d0g0i0n1")] == "stage 0 to 1: network ib-ndr x 8, 400 GB/s"
    assert [v for v in clusters["vertices"] if GPU_ID.fullmatch(v)][:2] == ["c0_n0g0", "c0_n0g1"]
    assert {s["id"] for s in clusters["subgraphs"]} >= {"c0_node0", "c1_node0", "c1_node1"}
    labels = "\n".join(mermaid_labels(bad))
    for suffix in ("dep", "model", "cluster", "gpu", "link", "net"):
        assert f"{EVIL} {suffix}" in labels
    assert len([v for v in bad["vertices"] if GPU_ID.fullmatch(v)]) == 16  # nothing leaked out of a label


def test_mermaid_newlines_in_names(mermaid_parse):
    plan, _ = code_assistant()
    dp = plan.deployments[0].model_copy(update={"name": "two\nlines\r\nthree"})
    (result,) = parsed(mermaid_parse, [to_mermaid(plan.model_copy(update={"deployments": [dp]}))])
    assert "two\nlines\nthree: prefill g0.i0 (tp 1)" in mermaid_labels(result)


# ---------------------------------------------------------------------------------- tree

def tree_text(plan: Plan, width: int = 120) -> str:
    console = Console(record=True, width=width)
    console.print(plan_tree(plan))
    return console.export_text()


def test_plan_tree():
    plan, _ = two_clusters()
    text = tree_text(plan)
    for d in plan.deployments:
        assert f"{d.name}: {d.model}" in text
        for j, g in enumerate(d.groups):
            assert f"group {j}: {g.role}, {g.replicas} x {g.gpu}" in text
    assert "instance 0: n0g0 n0g1" in text and "instance 1: n1g1" in text
    assert "TTFT p90 20 ms, TPOT p90 20.0 ms" in text


def test_plan_tree_pipeline_stages_and_markup_names():
    plan, _ = pipelined()
    assert "instance 0: stage 0: n0g0 n0g1 | stage 1: n1g0 n1g1" in tree_text(plan)
    dp = plan.deployments[0].model_copy(update={"name": "[bold red]x[/] " + EVIL})
    assert "[bold red]x[/] " + EVIL in tree_text(plan.model_copy(update={"deployments": [dp]}), width=300)


# ---------------------------------------------------------------------------------- the examples

@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(p.stem for p in EXAMPLES.glob("*.flow")))
def test_compiled_examples_render(name, mermaid_parse):
    spec = flowc.load(EXAMPLES / f"{name}.flow")
    plan = flowc.compile(spec)
    for text in (to_dot(plan, spec), to_dot(plan)):
        assert gpus_of(plan) <= set(dot_nodes(read_dot(text)))
        if shutil.which("dot"):
            draw_svg(text)
    parsed(mermaid_parse, [to_mermaid(plan, spec), to_mermaid(plan)])
    assert all(d.name in tree_text(plan) for d in plan.deployments)
