"""Issue 15: one validation of a plan (`plan_io.plan_problems`), applied when any command reads
a plan and when the engine is given one, so a plan `flowc verify` refuses at load never runs,
exports or draws. Each test is a reproducer of a tampered plan that used to get through."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

import flowc.cli
from flowc.compiler.model.step_graph import layout_problems, step_buffers
from flowc.compiler.plan import Plan
from flowc.compiler.plan_io import load_plan_file, plan_problems
from flowc.compiler.spec import NAME_PATTERN

REPO = Path(__file__).resolve().parents[1]
PROMPTS = '{"prompt_token_ids": [1, 2, 3], "max_tokens": 4}\n'


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("compiled")
    shutil.copy(REPO / "examples" / "tiny-cpu.flow", folder / "tiny-cpu.flow")
    assert flowc.cli.main(["compile", str(folder / "tiny-cpu.flow"), "-o", str(folder / "plan.json")]) == 0
    return folder


@pytest.fixture
def folder(compiled, tmp_path, monkeypatch) -> Path:
    for name in ("plan.json", "tiny-cpu.flow"):
        shutil.copy(compiled / name, tmp_path / name)
    (tmp_path / "prompts.jsonl").write_text(PROMPTS)
    tamper(tmp_path, lambda d: d.update(spec_files=["tiny-cpu.flow"]))  # the spec beside the plan
    monkeypatch.chdir(tmp_path)
    return tmp_path


def tamper(folder: Path, change) -> Path:
    document = json.loads((folder / "plan.json").read_text())
    change(document)
    (folder / "plan.json").write_text(json.dumps(document))
    return folder / "plan.json"


def group(document) -> dict:
    return document["deployments"][0]["groups"][0]


def every_command(capsys, plan: Path) -> dict[str, tuple[int, str]]:
    """Exit code and stderr of verify, viz, export and run on `plan`."""
    commands = {"verify": ["verify", str(plan)], "viz": ["viz", str(plan), "--format", "tree"],
                "export": ["export", str(plan), "--target", "vllm", "-o", str(plan.parent / "launch")],
                "run": ["run", str(plan), "--prompts", str(plan.parent / "prompts.jsonl"), "--dtype", "fp32"]}
    results = {}
    for name, argv in commands.items():
        code = flowc.cli.main(argv)
        results[name] = (code, capsys.readouterr().err)
    return results


def refused_by_all(capsys, plan: Path, note: str) -> None:
    for name, (code, err) in every_command(capsys, plan).items():
        assert code == 1, f"{name} exit {code}: {err[-400:]}"
        assert "is not a flowc plan" in err or "not a plan this flowc runs" in err, (name, err[-400:])
        assert note in err, (name, err[-400:])
    assert not (plan.parent / "launch").exists()


# ------------------------------------------------------------------------- the arena

def test_two_live_buffers_moved_onto_the_same_bytes_are_refused_by_every_command(folder, capsys):
    """Reproducer: moving one activation buffer's offset onto another's passed verify; `run`
    crashed on some and silently computed other tokens on others."""
    def overlap(document):
        offsets = group(document)["memory"]["arena_offsets"]
        offsets["layer.attn_in"] = offsets["residual"]  # both alive through the attention block
    plan = tamper(folder, overlap)
    refused_by_all(capsys, plan, "residual and layer.attn_in are alive together and share bytes")


def test_buffers_that_are_never_alive_together_may_share_bytes(compiled):
    """The packing reuses bytes across lifetimes: the check is lifetime-aware, not a plain
    interval overlap, or no compiled plan would pass."""
    plan, found = load_plan_file(compiled / "plan.json")
    assert found == []
    memory = plan.deployments[0].groups[0].memory
    spans = sorted((o, o + memory.arena_sizes[n]) for n, o in memory.arena_offsets.items())
    assert any(a_end > b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))  # bytes are shared


def test_layout_problems_name_every_kind_of_bad_layout(compiled):
    plan, _ = load_plan_file(compiled / "plan.json")
    dep = plan.deployments[0]
    g, m = dep.groups[0], dep.model_spec
    memory, s = g.memory, g.scheduler

    def problems(offsets=None, sizes=None, arena=None):
        return layout_problems(m, g.tp, s.max_batched_tokens, s.max_seqs, offsets or dict(memory.arena_offsets),
                               sizes or dict(memory.arena_sizes), memory.activations if arena is None else arena)

    assert problems() == []
    assert problems(offsets={**memory.arena_offsets, "residual": 1}) == ["residual at byte 1 is not aligned to 256 B"]
    assert problems(sizes={**memory.arena_sizes, "logits": 8}) == [
        f"logits gets 8 B, the step needs {memory.arena_sizes['logits']:,} B"]
    assert problems(arena=1024)[0].endswith("is not inside the arena of 1,024 B")
    names = {b.name for b in step_buffers(m, g.tp, s.max_batched_tokens, s.max_seqs)}
    assert set(memory.arena_offsets) == names
    assert problems(offsets={n: o for n, o in memory.arena_offsets.items() if n != "probs"})[0] == \
        "no offset or size for probs"


def test_an_empty_arena_is_refused(folder, capsys):
    def empty(document):
        group(document)["memory"].update(arena_offsets={}, arena_sizes={})
    refused_by_all(capsys, tamper(folder, empty), "no offset or size for input_ids")


# ------------------------------------------------------------------------- the model and the placement

def test_a_plan_without_deployments_is_refused(folder, capsys):
    """An empty plan verified as "ok" and exported nothing; no spec compiles to one (F0512)."""
    refused_by_all(capsys, tamper(folder, lambda d: d.update(deployments=[])), "the plan has no deployment")


def test_a_plan_without_its_model_is_refused(folder, capsys):
    refused_by_all(capsys, tamper(folder, lambda d: d["deployments"][0].pop("model_spec")),
                   "the plan does not carry its model")


def test_a_model_larger_than_its_memory_map_is_refused(folder, capsys):
    """A model_spec grown past what its memory map holds would allocate gigabytes in `run`."""
    plan = tamper(folder, lambda d: d["deployments"][0]["model_spec"].update(hidden=2**20))
    refused_by_all(capsys, plan, "B of weights per GPU (with those offloaded); model `tiny-llama`")


def test_gpu_indices_outside_the_plans_cluster_are_refused(folder, capsys):
    """Reproducer: export wrote scripts for GPU index 10^30."""
    plan = tamper(folder, lambda d: group(d)["instances"][0]["gpus"][0].update(index=10**30))
    refused_by_all(capsys, plan, "is outside cluster `laptop` (nodes 0 to 0; node 0: GPUs 0 to 0)")


def test_tp_64_on_a_one_gpu_cluster_never_starts_a_process(folder, capsys):
    """Reproducer: a `tp 64` plan spawned 63 workers and grew by 7 GB."""
    def tp64(document):
        g = group(document)
        g["tp"] = 64
        g["instances"][0]["gpus"] = [{"node": 0, "index": i} for i in range(64)]
    refused_by_all(capsys, tamper(folder, tp64), "GPUs 0 to 0")


def test_a_cluster_the_plan_does_not_record_is_refused(folder, capsys):
    refused_by_all(capsys, tamper(folder, lambda d: d.update(clusters={})),
                   "cluster `laptop` is not among the plan's clusters")


def test_a_gpu_of_another_type_is_refused(compiled):
    plan, _ = load_plan_file(compiled / "plan.json")
    document = json.loads(plan.model_dump_json())
    document["clusters"]["laptop"][0]["gpu"] = "h100-sxm"
    assert ("deployments[0].groups[0].instances[0].gpus[0]", "GPU n0g0 is a h100-sxm, the group runs on cpu-local") \
        in plan_problems(Plan.model_validate(document))


def test_verify_checks_the_recorded_cluster_against_the_spec(folder, capsys):
    plan = tamper(folder, lambda d: d["clusters"]["laptop"][0].update(gpus=4))
    assert flowc.cli.main(["verify", str(plan)]) == 1
    assert "the plan's copy of cluster `laptop` differs from the spec's" in capsys.readouterr().err


def test_block_size_3_is_not_one_the_spec_allows(folder, capsys):
    """Reproducer: verify accepted `block_size 3` in a plan of a spec that leaves block_size open,
    where flowc only ever tries the engine default (16)."""
    plan = tamper(folder, lambda d: group(d)["scheduler"].update(block_size=3))
    assert flowc.cli.main(["verify", str(plan)]) == 1
    assert "block_size 3 is not one flowc tries where the spec leaves it open (16)" in capsys.readouterr().err


# ------------------------------------------------------------------------- text, version, numbers

@pytest.mark.parametrize("field", ["name", "model", "cluster"])
def test_control_characters_in_names_are_refused(folder, capsys, field):
    def inject(document):
        document["deployments"][0][field] = "tiny\nrm -rf ~"
    refused_by_all(capsys, tamper(folder, inject), f"at deployments[0].{field}: 'tiny\\nrm -rf ~' contains a "
                   "control character")


def test_escape_sequences_in_free_text_are_refused(folder, capsys):
    def inject(document):
        document["deployments"][0]["binding"] = ["\x1b]0;pwned\x07\x1b[2J"]
    refused_by_all(capsys, tamper(folder, inject), "at deployments[0].binding[0]")


def test_a_name_no_spec_can_give_is_refused(compiled):
    plan, _ = load_plan_file(compiled / "plan.json")
    document = json.loads(plan.model_dump_json())
    group(document)["gpu"] = "../../x"
    assert ("deployments[0].groups[0].gpu", "'../../x' is not a name a spec can give") in \
        plan_problems(Plan.model_validate(document))


def test_the_name_rule_is_the_grammars():
    grammar = (REPO / "grammar" / "flow.lark").read_text()
    assert re.search(r"^WORD: /(.*)/$", grammar, re.MULTILINE).group(1) == NAME_PATTERN


@pytest.mark.parametrize("version", ["１.５", "1.6\n", "2.0", "x"])
def test_a_format_version_this_flowc_does_not_read_is_refused(folder, capsys, version):
    plan = tamper(folder, lambda d: d.update(format_version=version))
    for name, (code, err) in every_command(capsys, plan).items():
        assert code == 1 and "format_version" in err, (name, err[-300:])


def test_nan_timings_are_refused(folder, capsys):
    plan = tamper(folder, lambda d: d["deployments"][0]["predicted"]["ttft_ms"].update(p50=float("nan")))
    refused_by_all(capsys, plan, "NaN is not a number")


def test_the_engine_applies_the_same_validation_to_a_plan_object(compiled):
    from flowc.runtime.engine import Engine, EngineError

    plan, _ = load_plan_file(compiled / "plan.json")
    memory = plan.deployments[0].groups[0].memory
    offsets = {**memory.arena_offsets, "layer.attn_in": memory.arena_offsets["residual"]}
    g = plan.deployments[0].groups[0].model_copy(
        update={"memory": memory.model_copy(update={"arena_offsets": offsets})})
    bad = plan.model_copy(update={"deployments": [plan.deployments[0].model_copy(update={"groups": [g]})]})
    with pytest.raises(EngineError, match="residual and layer.attn_in are alive together"):
        Engine.from_plan(bad)


# ------------------------------------------------------------------------- what the host can start

def test_more_ranks_than_the_machine_has_devices_are_refused_before_any_process(monkeypatch):
    from runtime_models import tiny_spec

    from flowc.compiler.optimize.instance_plan import instance_plan
    from flowc.runtime import engine

    monkeypatch.setattr(engine.os, "sched_getaffinity", lambda pid: {0})
    with pytest.raises(engine.EngineError,
                       match="runs tp 2 x pp 1, one process per rank, 2 of them here, and this machine has 1 CPU "
                             "cores"):
        engine.Engine.from_plan(instance_plan(tiny_spec("llama"), tp=2))


def test_a_memory_map_larger_than_the_machine_is_refused(monkeypatch):
    from runtime_models import tiny_spec

    from flowc.compiler.optimize.instance_plan import instance_plan
    from flowc.runtime import engine

    monkeypatch.setattr(engine, "_host_memory", lambda: 1024)
    with pytest.raises(engine.EngineError, match="and this machine has 0.00 GiB"):
        engine.Engine.from_plan(instance_plan(tiny_spec("llama")))


def test_the_triton_kernels_refuse_a_block_size_they_cannot_tile(monkeypatch):
    pytest.importorskip("triton")
    from runtime_models import tiny_spec

    from flowc.compiler.optimize.instance_plan import instance_plan
    from flowc.runtime.engine import Engine, EngineError

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(EngineError, match="block_size 8 is not a legal tl.dot tile dimension"):
        Engine.from_plan(instance_plan(tiny_spec("llama"), block_size=8), backend="triton")


# ------------------------------------------------------------------------- the spec a plan names

@pytest.mark.parametrize("named", ["/etc/passwd", "../outside-15/secret.flow", "secret.txt"])
def test_a_plan_cannot_make_verify_read_a_file_outside_its_trees(folder, capsys, named):
    """Reproducer: `spec_files: ["/etc/passwd"]` printed the file's lines as parse errors."""
    outside = folder.parent / "outside-15"
    outside.mkdir(exist_ok=True)
    (outside / "secret.flow").write_text("SECRET_MARKER_15 {\n")
    (folder / "secret.txt").write_text("SECRET_MARKER_15\n")
    plan = tamper(folder, lambda d: d.update(spec_files=[named]))
    for argv in (["verify", str(plan)], ["viz", str(plan), "--format", "html", "-o", str(folder / "r.html")]):
        code = flowc.cli.main(argv)
        out, err = capsys.readouterr()
        assert code == 2 and "--against SPEC.flow" in err
        assert "SECRET_MARKER_15" not in out + err and "root:" not in out + err
