"""The HTML report of `flowc viz` (compiler/render/html.py, flowc/viz_cmd.py): it renders every
example plan, references nothing outside itself, shows the plan's own numbers, and a real
headless Chromium renders it with the network blocked.

Every example runs (about 35 s on two cores, most of it compiling them). Screenshots and
reports are kept in $FLOWC_TEST_ARTIFACTS (default: pytest's temporary directory).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from flowc.api import check_sources
from flowc.cli import main
from flowc.compiler.model.goodput import CONFIRM_SCALE
from flowc.compiler.model.workload import base_rate, sample_requests
from flowc.compiler.optimize.compile import compile_spec
from flowc.compiler.plan import GpuRef, Instance
from flowc.compiler.render.charts import sweep_values
from flowc.compiler.render.html import render_report
from flowc.compiler.render.report_data import simulate_all
from flowc.compiler.units import format_gbps
from flowc.progress import progress

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EXAMPLE_NAMES = ["chat-70b", "code-assistant-8b", "moe-h200", "shared-cluster", "tiny-cpu"]
NAMESPACES = {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}
# Attributes that load or link something; in a self-contained page each may only point into it.
REFERENCES = {"src", "href", "xlink:href", "srcset", "action", "formaction", "poster", "data", "background"}
GiB = 2**30


@pytest.fixture(scope="module")
def example():
    """name -> (plan, checked spec, report HTML), compiled and rendered once per module."""
    cache = {}

    def get(name: str):
        if name not in cache:
            checked = check_sources(EXAMPLES / f"{name}.flow")
            plan = compile_spec(checked.spec)
            sources = {file: source.text for file, source in checked.sources.items()}
            cache[name] = (plan, checked, render_report(plan, checked.spec, sources=sources))
        return cache[name]

    return get


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    where = os.environ.get("FLOWC_TEST_ARTIFACTS")
    if not where:
        return tmp_path_factory.mktemp("viz")
    Path(where).mkdir(parents=True, exist_ok=True)
    return Path(where)


class _Document(HTMLParser):
    """Every start tag with its attributes, the text, and the <style> blocks of a page."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []
        self.styles: list[str] = []
        self._in_style = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, {name: value or "" for name, value in attrs}))
        self._in_style = tag == "style"

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, {name: value or "" for name, value in attrs}))

    def handle_endtag(self, tag):
        self._in_style = False

    def handle_data(self, data):
        (self.styles if self._in_style else self.text).append(data)

    def plain_text(self) -> str:
        return re.sub(r"\s+", " ", " ".join(self.text))

    def rows(self, table_class: str) -> list[list[tuple[str, dict[str, str]]]]:
        """The <td> cells (their attributes) of tables of a class; text is not kept per cell."""
        rows, inside = [], False
        for tag, attrs in self.tags:
            if tag == "table":
                inside = table_class in attrs.get("class", "").split()
            elif inside and tag == "tr":
                rows.append([])
            elif inside and tag == "td":
                rows[-1].append(attrs)
        return [row for row in rows if row]


def _expected_svgs(plan) -> int:
    """One cluster drawing per cluster, the memory chart, a CDF and a goodput chart per deployment."""
    return len({dp.cluster for dp in plan.deployments}) + 1 + 2 * len(plan.deployments)


def _slo_limit_texts(plan, spec) -> set[str]:
    slos = [spec.slos[spec.deployments[dp.name].slo] for dp in plan.deployments]
    return {f"{t.limit * 1e3:g} ms" for slo in slos for t in slo.targets}


# ---------------------------------------------------------------------------------- the HTML


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_report_renders_every_section(example, name):
    plan, checked, report = example(name)
    assert report.startswith("<!DOCTYPE html>")
    doc = _Document(report)
    text = doc.plain_text()
    assert report.count("<svg") == _expected_svgs(plan)
    for dp in plan.deployments:
        assert f"Deployment {dp.name}" in text
        for b in dp.binding:
            assert b in text
        for alternative in dp.alternatives:
            assert alternative.summary in text and alternative.reason in text
    assert plan.solver.status in text
    for gpu in {str(ref) for dp in plan.deployments for g in dp.groups for inst in g.instances for ref in inst.gpus}:
        assert gpu in text
    for limit in _slo_limit_texts(plan, checked.spec):
        assert limit in text
    spec_file = checked.spec.files[0]
    assert checked.sources[spec_file].text.strip() in html.unescape(report)


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_report_references_nothing_outside_itself(example, name):
    report = example(name)[2]
    doc = _Document(report)
    for tag, attrs in doc.tags:
        assert tag not in ("script", "link", "img", "iframe", "object", "embed", "base"), tag
        for attr, value in attrs.items():
            if attr == "xmlns" or attr.startswith("xmlns:"):  # names, never fetched
                assert value in NAMESPACES, (tag, attr, value)
                continue
            if attr in REFERENCES:
                assert value.startswith("#"), (tag, attr, value)  # a fragment of this page
            assert not re.search(r"url\(\s*['\"]?(?!#)", value), (tag, attr, value)
            assert not re.search(r"(?i)\b(https?|ftp|file):|^\s*//", value), (tag, attr, value)
    for style in doc.styles:
        assert "@import" not in style and not re.search(r"url\(\s*['\"]?(?!#)", style)
        assert not re.search(r"(?i)\b(https?|ftp|file):|//", style)


def test_memory_numbers_are_the_plans(example):
    plan, _, report = example("chat-70b")
    rows = _Document(report).rows("memory")
    groups = [g for dp in plan.deployments for g in dp.groups]
    assert len(rows) == len(groups)
    fields = ("capacity", "weights", "kv_cache", "activations", "reserve", "free")
    for row, g in zip(rows, groups):
        shown = [int(cell["data-bytes"]) for cell in row if "data-bytes" in cell]
        assert shown == [getattr(g.memory, f) for f in fields]
    for g in groups:  # the visible labels: GiB with two decimals, and the block count
        assert f"{g.memory.weights / GiB:.2f} GiB" in report
        assert f"{g.memory.kv_blocks:,} x {g.scheduler.block_size} tokens" in report


def test_offloaded_bytes_are_shown_as_host_memory(example):
    plan, checked, _ = example("tiny-cpu")
    dp = plan.deployments[0]
    g = dp.groups[0]
    moved = g.memory.weights // 2
    memory = g.memory.model_copy(update={"weights": g.memory.weights - moved, "free": g.memory.free + moved,
                                         "offloaded": {"weights": moved}})
    groups = [g.model_copy(update={"memory": memory})]
    offloaded = plan.model_copy(update={"deployments": [dp.model_copy(update={"groups": groups})]})
    report = render_report(offloaded, checked.spec, requests=200)
    row = _Document(report).rows("memory")[0]
    assert [int(cell["data-bytes"]) for cell in row if "data-bytes" in cell][1] == memory.weights
    assert f"weights {moved / GiB:.2f} GiB" in report


def test_pipeline_hops_across_nodes_are_charged_to_the_network(example):
    """chat-70b served by four colocated tp 1 x pp 2 instances, stage 0 on n0 and stage 1 on n1:
    each instance's hop carries rate / instances x (mean prompt + mean output) x hidden x 2 B x
    tp, as the verifier charges it."""
    plan, checked, _ = example("chat-70b")
    spec, dp = checked.spec, plan.deployments[0]
    staged = dp.groups[0].model_copy(update={"role": "colocated", "tp": 1, "pp": 2, "instances": [
        Instance(gpus=[GpuRef(node=0, index=k), GpuRef(node=1, index=k)]) for k in range(4)]})
    piped = plan.model_copy(update={"deployments": [dp.model_copy(update={"mode": "colocated", "groups": [staged]})]})
    report = render_report(piped, spec, requests=200)
    workload = spec.workloads[spec.deployments[dp.name].workload]
    sampled = sample_requests(workload, seed=0)
    tokens = float(sampled.prompt.mean()) + float(sampled.output.mean())
    hop = base_rate(workload) / 4 * tokens * dp.model_spec.hidden * 2 * 1
    assert f"n0 -> n1 ib-ndr (infiniband) 8 x 50 GB/s chatbot pipeline activations {format_gbps(4 * hop)}" \
        in _Document(report).plain_text()  # the four instances' hops, all from n0 to n1


@pytest.mark.parametrize("name", ["chat-70b", "tiny-cpu"])
def test_cdf_slo_markers_are_drawn_at_the_specs_limits(example, name):
    plan, checked, report = example(name)
    spec = checked.spec
    markers = set(re.findall(r'id="(slo-limit-[^"]+)"', report))
    expected = set()
    for dp in plan.deployments:
        for t in spec.slos[spec.deployments[dp.name].slo].targets:
            which = f"p{t.percentile:g}" if t.percentile is not None else "all"
            expected.add(f"slo-limit-{dp.name}-{t.metric}-{which}-{t.limit * 1e3:g}ms")
    assert markers == expected


@pytest.mark.parametrize("name", ["code-assistant-8b", "tiny-cpu"])
def test_the_reports_attainment_table_agrees_with_the_plans_goodput(example, name):
    # One definition (model/goodput.sustains) and one measurement (the plan's request count and
    # seed): at the goodput itself the table says the SLO is met, and at the workload's rate it
    # says what the plan says; no rate past the confirmation point is sustained.
    plan, checked, _ = example(name)
    runs = simulate_all(plan, checked.spec, None, 0, None)
    for dp in plan.deployments:
        r = runs[dp.name]
        rows = {round(row["rate"], 9): row for row in sweep_values(r)}
        assert rows[round(dp.predicted.goodput_rps, 9)]["meets"]
        assert rows[round(r.rate, 9)]["meets"] == dp.predicted.meets_slo
        assert not any(row["meets"] for rate, row in rows.items() if rate > dp.predicted.goodput_rps * CONFIRM_SCALE)


def test_report_is_deterministic_and_escapes_the_spec(example):
    plan, checked, _ = example("tiny-cpu")
    sources = {"evil.flow": "# <script>alert('x')</script> & <b>"}
    first = render_report(plan, checked.spec, requests=100, sources=sources)
    assert first == render_report(plan, checked.spec, requests=100, sources=sources)
    assert "<script>" not in first and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &lt;b&gt;" in first


# ------------------------------------------------------------------------------------- the CLI


@pytest.fixture
def plan_file(example, tmp_path) -> Path:
    """The tiny-cpu plan, naming its spec by absolute path (pytest may run from anywhere)."""
    plan = example("tiny-cpu")[0].model_copy(update={"spec_files": [str(EXAMPLES / "tiny-cpu.flow")]})
    path = tmp_path / "plan.json"
    path.write_text(plan.model_dump_json(indent=2))
    return path


def test_cli_writes_the_report(plan_file, tmp_path, capsys):
    out = tmp_path / "plan.html"
    assert main(["viz", str(plan_file), "-o", str(out), "--requests", "100"]) == 0
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert f"wrote {out}" in capsys.readouterr().out
    assert main(["--json", "viz", str(plan_file), "-o", str(out), "--requests", "100"]) == 0
    assert json.loads(capsys.readouterr().out) == {"format": "html", "output": str(out), "verifier": []}


def test_cli_errors(plan_file, tmp_path, capsys):
    assert main(["viz", str(tmp_path / "missing.json"), "-o", str(tmp_path / "x.html")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["viz", str(plan_file)]) == 2  # html needs -o
    assert "-o FILE.html" in capsys.readouterr().err
    garbage = tmp_path / "garbage.json"
    garbage.write_text('{"deployments": 3}')
    assert main(["viz", str(garbage), "-o", str(tmp_path / "x.html")]) == 1
    assert "F0520" in capsys.readouterr().err and not (tmp_path / "x.html").exists()
    orphan = tmp_path / "orphan.json"
    orphan.write_text(json.dumps({**json.loads(plan_file.read_text()), "spec_files": ["nowhere/gone.flow"]}))
    assert main(["viz", str(orphan), "-o", str(tmp_path / "x.html")]) == 2
    assert "--against" in capsys.readouterr().err
    assert main(["viz", str(plan_file), "-o", str(tmp_path / "x.html"), "--against",
                 str(EXAMPLES / "chat-70b.flow")]) == 1  # another spec: the plan's deployment is not in it
    assert "F0520" in capsys.readouterr().err and not (tmp_path / "x.html").exists()


def test_cli_without_matplotlib_says_how_to_install_it(plan_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    for module in ("flowc.compiler.render.html", "flowc.compiler.render.charts"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    assert main(["viz", str(plan_file), "-o", str(tmp_path / "x.html")]) == 2
    assert 'pip install "flowc[viz]"' in capsys.readouterr().err


# -------------------------------------------------------------------------------- in Chromium


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium)")
    return found


def _run_chromium(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    # Offline: every host resolves to nothing and every non-loopback request goes to a closed port.
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--no-first-run", "--disable-extensions", "--hide-scrollbars", f"--user-data-dir={profile}",
               "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
               "--host-resolver-rules=MAP * ~NOTFOUND", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


def _png_colors(path: Path) -> int:
    """Distinct colors of the screenshot, up to 257 (Pillow comes with matplotlib)."""
    image = pytest.importorskip("PIL.Image").open(path).convert("RGB")
    return len(image.getcolors(maxcolors=256) or range(257))


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_chromium_renders_the_report_offline(example, artifacts, tmp_path, name):
    browser = _chromium()
    plan, checked, report = example(name)
    page = artifacts / f"{name}.html"
    page.write_text(report, encoding="utf-8")
    dom = _run_chromium(browser, tmp_path / "profile", "--dump-dom", page.as_uri()).stdout
    text = _Document(dom).plain_text()
    assert dom.count("<svg") == _expected_svgs(plan)
    for dp in plan.deployments:
        assert dp.name in text
        for alternative in dp.alternatives:
            assert alternative.reason in text
    for gpu in {str(ref) for dp in plan.deployments for g in dp.groups for inst in g.instances for ref in inst.gpus}:
        assert gpu in text
    for limit in _slo_limit_texts(plan, checked.spec):
        assert limit in text
    shot = artifacts / f"{name}.png"
    shot.unlink(missing_ok=True)
    _run_chromium(browser, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1400,3000", page.as_uri())
    assert shot.stat().st_size > 10_000
    assert _png_colors(shot) > 16  # text, tables and charts, not a blank or single-color page


# ---------------------------------------------------------------------------------- progress


def test_progress_is_silent_off_a_terminal(capsys):
    with progress("simulating", total=3) as bar:
        bar.advance()
        bar("simulating `x` at 2 req/s", 2, 3)
    with progress("simulating", total=3, enabled=False) as bar:
        bar.advance()
    assert capsys.readouterr() == ("", "")


def test_progress_draws_on_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.delenv("TERM", raising=False)
    with progress("simulating", total=3, color=False) as bar:
        bar("simulating `x` at 2 req/s", 2, 3)
        bar.advance()
    drawn = capsys.readouterr()
    assert drawn.out == "" and "simulating" in drawn.err
    with progress("simulating", total=3, enabled=False) as bar:  # --json: nothing, even on a terminal
        bar.advance()
    assert capsys.readouterr() == ("", "")
