"""Specs and checkpoints are untrusted input (issue 15): the files they name stay inside their
directory tree, diagnostics never print what another file holds, and control characters from
user text reach the terminal only as visible escapes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import flowc
import flowc.cli

TRACE = "arrival_time,prompt_tokens,output_tokens\n0,10,5\n0.5,20,6\n1.0,30,7\n"
# Control characters a terminal would act on: clear the screen, carriage return, backspace, a
# right-to-left override, and the escaped forms flowc must print instead.
CONTROLS = "\x1b[2J\r\x08\u202e"
ESCAPED = "\\x1b[2J\\r\\x08\\u202e"
RAW = {"\x1b", "\r", "\x08", "\u202e"}
# In a file a lone CR ends the line (Python reads it with universal newlines); in spec text it
# stays in the line.
IN_FILE, IN_FILE_ESCAPED = "\x1b[2J\x08\u202e", "\\x1b[2J\\x08\\u202e"


@pytest.fixture(autouse=True)
def _plain(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.delenv("FLOWC_DEBUG", raising=False)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = flowc.cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def spec_with_trace(folder: Path, trace: str) -> Path:
    """`folder/spec/main.flow`, a workload whose arrivals and prompts come from `trace`."""
    (folder / "spec").mkdir(parents=True, exist_ok=True)
    path = folder / "spec" / "main.flow"
    path.write_text(f'workload w {{\n  arrival trace "{trace}"\n  prompt trace "{trace}"\n  output 100 tok\n}}\n',
                    encoding="utf-8")
    return path


@pytest.fixture
def outside(tmp_path) -> Path:
    """A valid trace beside the spec's directory, not in it."""
    (tmp_path / "outside").mkdir()
    path = tmp_path / "outside" / "x.csv"
    path.write_text(TRACE, encoding="utf-8")
    return path


def assert_f0207(code: int, err: str, name: str) -> None:
    assert code == 1
    assert err.startswith(f"error[F0207]: `{name}` is outside the spec's directory tree\n")
    assert err.count("error[") == 1  # once, though the spec reads the trace twice
    assert "--allow-outside" in err


# ------------------------------------------------------------------ traces stay in the spec's tree

def test_a_relative_trace_out_of_the_tree_is_f0207(tmp_path, outside, capsys, monkeypatch):
    main = spec_with_trace(tmp_path, "../outside/x.csv")
    monkeypatch.chdir(main.parent)
    code, _, err = run(capsys, "check", "main.flow")
    assert_f0207(code, err, "../outside/x.csv")
    assert "resolves to" in err and "= note: the spec's directory is ." in err


def test_an_absolute_trace_out_of_the_tree_is_f0207(tmp_path, outside, capsys):
    code, _, err = run(capsys, "check", str(spec_with_trace(tmp_path, str(outside))))
    assert_f0207(code, err, str(outside))


def test_a_link_in_the_tree_pointing_out_is_f0207(tmp_path, outside, capsys):
    main = spec_with_trace(tmp_path, "traces/x.csv")
    (main.parent / "traces").mkdir()
    (main.parent / "traces" / "x.csv").symlink_to(outside)
    code, _, err = run(capsys, "check", str(main))
    assert_f0207(code, err, "traces/x.csv")
    assert f"resolves to {outside}" in err


def test_a_link_inside_the_tree_is_read(tmp_path, capsys):
    main = spec_with_trace(tmp_path, "traces/x.csv")
    (main.parent / "traces").mkdir()
    (main.parent / "real.csv").write_text(TRACE, encoding="utf-8")
    (main.parent / "traces" / "x.csv").symlink_to(main.parent / "real.csv")
    assert run(capsys, "check", str(main))[0] == 0


@pytest.mark.parametrize("flag", ["--allow-outside", "--allow-outside-imports"])
def test_the_flag_lifts_the_rule(tmp_path, outside, capsys, flag):
    main = spec_with_trace(tmp_path, "../outside/x.csv")
    code, out, err = run(capsys, "check", flag, str(main))
    assert (code, err) == (0, "")
    assert out == "checked 1 file: ok\n"
    spec = flowc.load(main, allow_outside=True)
    assert spec.workloads["w"].arrival.trace == str(outside)
    assert spec.workloads["w"].arrival.rate == pytest.approx(2.0)


def test_simulate_takes_the_flag_too(tmp_path, outside, capsys):
    main = spec_with_trace(tmp_path, "../outside/x.csv")
    code, _, err = run(capsys, "simulate", str(main))
    assert code == 1 and err.startswith("error[F0207]")
    # past the check: a spec without deployments simulates nothing (F0512), but the trace was read
    code, _, err = run(capsys, "simulate", "--allow-outside", str(main))
    assert "F0207" not in err and "F0512" in err


def test_a_trace_in_spec_text_stays_in_the_working_directory(tmp_path, outside, monkeypatch):
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    text = spec_with_trace(tmp_path, "../outside/x.csv").read_text(encoding="utf-8")
    with pytest.raises(flowc.FlowError) as caught:
        flowc.load(text)
    assert caught.value.codes == ["F0207"]
    assert caught.value.diagnostics[0].notes == ("the spec's directory is .",)
    assert flowc.load(text, allow_outside=True).workloads["w"].arrival.trace == str(outside)


def test_a_use_through_a_link_pointing_out_is_f0207(tmp_path, capsys):
    """The rule `use` has always had, through the function traces use now."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "links.flow").write_text("link l { kind pcie; bandwidth 1 GB/s }\n", encoding="utf-8")
    (tmp_path / "spec").mkdir()
    (tmp_path / "spec" / "links.flow").symlink_to(tmp_path / "outside" / "links.flow")
    (tmp_path / "spec" / "main.flow").write_text('use "links.flow"\n', encoding="utf-8")
    code, _, err = run(capsys, "check", str(tmp_path / "spec" / "main.flow"))
    assert code == 1 and err.startswith("error[F0207]: `links.flow` is outside the spec's directory tree")


@pytest.mark.skipif(not Path("/proc/self/environ").is_file(), reason="needs Linux's /proc")
def test_proc_self_environ_reveals_nothing(tmp_path):
    """The process's environment holds secrets; neither the refusal nor, with the flag, the
    malformed-trace diagnostic may show any of it."""
    main = spec_with_trace(tmp_path, "/proc/self/environ")
    secret = "FLOWC_TEST_TOKEN=hunter2-0123456789"
    env = {"FLOWC_TEST_TOKEN": secret.split("=", 1)[1], "PATH": os.environ.get("PATH", ""),
           **{k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ}}
    for flags, expected in (([], "error[F0207]"), (["--allow-outside"], "error[F0309]")):
        result = subprocess.run([sys.executable, "-m", "flowc", "check", *flags, str(main)], capture_output=True,
                                text=True, env=env, timeout=120)
        assert result.returncode == 1, result.stderr
        assert result.stderr.startswith(expected)
        assert "hunter2" not in result.stderr + result.stdout
        assert "FLOWC_TEST_TOKEN" not in result.stderr + result.stdout and "PATH=" not in result.stderr


# ------------------------------------------------------------------ did-you-mean lists only the tree

def test_a_missing_trace_out_of_the_tree_names_nothing_there(tmp_path, outside, capsys):
    (outside.parent / "conversation-secret.csv").write_text(TRACE, encoding="utf-8")
    main = spec_with_trace(tmp_path, "../outside/conversation-secre.csv")
    code, _, err = run(capsys, "check", str(main))
    assert code == 1 and err.startswith("error[F0207]")
    assert "conversation-secret" not in err.replace("conversation-secre.csv", "")
    # with the flag the file is allowed, yet its folder is still not listed
    code, _, err = run(capsys, "check", "--allow-outside", str(main))
    assert code == 1 and err.startswith("error[F0208]")
    assert "did you mean" not in err and "conversation-secret" not in err.replace("conversation-secre.csv", "")


def test_a_missing_trace_in_the_tree_still_gets_a_suggestion(tmp_path, capsys):
    main = spec_with_trace(tmp_path, "traces/conv.csv")
    (main.parent / "traces").mkdir()
    (main.parent / "traces" / "conversation.csv").write_text(TRACE, encoding="utf-8")
    code, _, err = run(capsys, "check", str(main))
    assert code == 1 and 'did you mean `"traces/conversation.csv"`?' in err


# ------------------------------------------------------------------ a trace's content is never printed

@pytest.mark.parametrize(("content", "note"), [
    (TRACE + "1.5,sk-live-SECRET42,9\n", "line 5 of t.csv: the prompt length (prompt_tokens) is not a whole number"),
    (TRACE + "1.5,9,sk-live-SECRET42\n", "line 5 of t.csv: the output length (output_tokens) is not a whole number"),
    (TRACE + "sk-live-SECRET42,9,9\n", "line 5 of t.csv: the arrival time (arrival_time) is neither a number"),
    (TRACE + "sk-live-SECRET42\n", "line 5 of t.csv: the row has 1 of the header's 3 fields"),
    ("password=sk-live-SECRET42,b,c\n1,2,3\n", "line 1 of t.csv: the header has no TIMESTAMP,ContextTokens,"
     "GeneratedTokens or arrival_time,prompt_tokens,output_tokens columns"),
    (b"arrival_time,prompt_tokens,output_tokens\n0,1,1\n\xffsk-live-SECRET42,1,1\n", "= note: t.csv: not UTF-8 text"),
])
def test_a_malformed_trace_is_reported_by_line_and_field(tmp_path, capsys, content, note):
    main = spec_with_trace(tmp_path, "t.csv")
    trace = main.parent / "t.csv"
    trace.write_bytes(content) if isinstance(content, bytes) else trace.write_text(content, encoding="utf-8")
    code, out, err = run(capsys, "check", str(main))
    assert code == 1 and err.startswith("error[F0309]")
    assert note in err
    assert "SECRET42" not in err
    code, out, _ = run(capsys, "check", "--json", str(main))
    assert "SECRET42" not in out and json.loads(out)["diagnostics"][0]["code"] == "F0309"


# ------------------------------------------------------------------ control characters in diagnostics

def test_controls_in_a_source_line_are_escaped_and_the_caret_still_points(tmp_path, capsys):
    path = tmp_path / "slo.flow"
    path.write_text(f'slo s {{ ttft p90 <= 2 s; doc "{IN_FILE}"; tpot p90 <= 2 G }}  # {IN_FILE}\n',
                    encoding="utf-8")
    code, _, err = run(capsys, "check", str(path))
    assert code == 1
    assert not RAW & set(err)
    assert f'doc "{IN_FILE_ESCAPED}"; tpot' in err and f"# {IN_FILE_ESCAPED}" in err
    lines = err.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("error[F0301]"))
    code_line, caret_line = lines[at + 3], lines[at + 4]
    assert caret_line.index("^") == code_line.rindex(" G ") + 1


def test_a_carriage_return_in_spec_text_is_escaped():
    with pytest.raises(flowc.FlowError) as caught:
        flowc.load(f'slo s {{ ttft p90 <= 2 s; doc "{CONTROLS}"; tpot p90 <= 2 G }}  # {CONTROLS}\n')
    shown = str(caught.value)  # FlowError's text is the renderer's, without color
    assert not RAW & set(shown)
    assert f'doc "{ESCAPED}"; tpot' in shown and f"# {ESCAPED}" in shown
    lines = shown.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("error[F0301]"))
    assert lines[at + 4].index("^") == lines[at + 3].rindex(" G ") + 1


def test_controls_in_a_message_and_its_underline_are_escaped(tmp_path, capsys):
    """The underline of a span holding control characters covers their escaped form."""
    path = tmp_path / "w.flow"
    path.write_text(f'workload w {{ arrival trace "{IN_FILE}.csv"; prompt 3 tok; output 3 tok }}\n',
                    encoding="utf-8")
    code, _, err = run(capsys, "check", str(path))
    assert code == 1 and not RAW & set(err)
    assert err.startswith(f"error[F0208]: trace file `{IN_FILE_ESCAPED}.csv` not found\n")
    code_line, caret_line = err.splitlines()[3:5]
    quoted = f'"{IN_FILE_ESCAPED}.csv"'
    assert caret_line.index("^") == code_line.index(quoted)
    assert caret_line.count("^") == len(quoted)


def test_controls_in_a_spec_file_name_are_escaped(tmp_path, capsys):
    name = f"bad{CONTROLS}.flow"  # a file name may hold a CR
    (tmp_path / name).write_text("slo s { ttft p90 <= 2 G }\n", encoding="utf-8")
    code, _, err = run(capsys, "check", str(tmp_path / name))
    assert code == 1 and not RAW & set(err)
    assert f"bad{ESCAPED}.flow:1:23" in err
    code, out, _ = run(capsys, "check", "--json", str(tmp_path / name))
    assert not RAW & set(out)  # json.dumps escapes them itself
    assert json.loads(out)["diagnostics"][0]["range"]["filename"].endswith(name)


def test_controls_in_a_usage_error_are_escaped(tmp_path, capsys):
    code, out, err = run(capsys, "check", str(tmp_path / f"missing{CONTROLS}.flow"))
    assert code == 2 and out == ""
    assert not RAW & set(err)
    assert f"missing{ESCAPED}.flow` does not exist" in err
    code, _, err = run(capsys, "explain", f"F{CONTROLS}")
    assert code == 2 and err.startswith(f"error: no diagnostic code `F{ESCAPED}`\n  = help: ")
    assert not RAW & set(err)


def test_controls_in_an_argparse_error_are_escaped(capsys):
    with pytest.raises(SystemExit) as exited:
        flowc.cli.main(["check", f"--bogus{CONTROLS}", "x.flow"])
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert not RAW & set(err)
    assert f"unrecognized arguments: --bogus{ESCAPED}" in err


def test_escape_control_covers_every_class():
    from flowc.compiler.diagnostics import escape_control

    assert escape_control("a\x00\t\n\x7f\x85\x9f\u202a\u202e\u2066\u2069 é ü") == \
        "a\\x00\\t\\n\\x7f\\x85\\x9f\\u202a\\u202e\\u2066\\u2069 é ü"


# ------------------------------------------------------------------ checkpoints stay in their directory

# 1 layer, hidden 8, 2 heads of 4, 1 KV head, ffn 16, vocab 16, tied embeddings
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8, "intermediate_size": 16,
          "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 16,
          "max_position_embeddings": 32, "tie_word_embeddings": True}
SHAPES = {"model.embed_tokens.weight": (16, 8), "model.norm.weight": (8,),
          "model.layers.0.input_layernorm.weight": (8,), "model.layers.0.post_attention_layernorm.weight": (8,),
          "model.layers.0.self_attn.q_proj.weight": (8, 8), "model.layers.0.self_attn.k_proj.weight": (4, 8),
          "model.layers.0.self_attn.v_proj.weight": (4, 8), "model.layers.0.self_attn.o_proj.weight": (8, 8),
          "model.layers.0.mlp.gate_proj.weight": (16, 8), "model.layers.0.mlp.up_proj.weight": (16, 8),
          "model.layers.0.mlp.down_proj.weight": (8, 16)}
SECOND = "model.norm.weight"  # the tensor of the second shard


def checkpoint(folder: Path, second: str = "model-2.safetensors") -> Path:
    """A two-shard checkpoint in `folder`: shard 2 holds model.norm.weight and is named
    `second` in the index (the test puts the file there)."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(shape, generator=g) for name, shape in SHAPES.items()}
    save_file({n: t for n, t in tensors.items() if n != SECOND}, folder / "model-1.safetensors")
    save_file({SECOND: tensors[SECOND]}, folder / "model-2.safetensors")
    (folder / "config.json").write_text(json.dumps(CONFIG))
    weight_map = {name: "model-1.safetensors" for name in SHAPES} | {SECOND: second}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def load(folder: Path):
    torch = pytest.importorskip("torch")
    from flowc.runtime.kernels import get_ops
    from flowc.runtime.weights import load_model

    return load_model(folder, get_ops("torch"), dtype=torch.float32)


def test_a_checkpoint_loads_its_own_shards(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    model = load(checkpoint(tmp_path / "ckpt"))
    assert torch.equal(model.norm, load_file(tmp_path / "ckpt" / "model-2.safetensors")[SECOND])


@pytest.mark.parametrize("how", ["../", "absolute", "link"])
def test_a_shard_outside_the_checkpoint_is_refused(tmp_path, how):
    from flowc.runtime.weights import WeightsError

    folder = tmp_path / "ckpt"
    elsewhere = tmp_path / "elsewhere.safetensors"
    second = {"../": "../elsewhere.safetensors", "absolute": str(elsewhere), "link": "model-2.safetensors"}[how]
    checkpoint(folder, second)
    (folder / "model-2.safetensors").rename(elsewhere)  # a valid shard: the old loader read it
    if how == "link":
        (folder / "model-2.safetensors").symlink_to(elsewhere)
    with pytest.raises(WeightsError) as caught:
        load(folder)
    message = str(caught.value)
    assert message.startswith(f"{folder / 'model.safetensors.index.json'} maps {SECOND!r} to {second!r}, "
                              f"which lies outside {folder}")


def test_an_index_entry_is_quoted_safely(tmp_path):
    from flowc.runtime.weights import WeightsError

    folder = checkpoint(tmp_path / "ckpt", f"/tmp/{CONTROLS}x")
    with pytest.raises(WeightsError) as caught:
        load(folder)
    assert not RAW & set(str(caught.value))
    assert f"to '/tmp/{ESCAPED}x'" in str(caught.value)


def test_an_index_entry_that_is_no_file_name_is_an_error(tmp_path):
    from flowc.runtime.weights import WeightsError

    with pytest.raises(WeightsError, match=r"maps 'model.norm.weight' to \['x'\], which is not a file name"):
        load(checkpoint(tmp_path / "ckpt", ["x"]))


def test_a_hugging_face_cache_snapshot_loads(tmp_path):
    """The hub's cache links each file of `snapshots/REV/` to `../../blobs/HASH`: those links
    stay in the model's own cache folder and load; a link anywhere else in the cache does not."""
    from flowc.runtime.weights import WeightsError

    repo = tmp_path / "models--org--tiny"
    source = checkpoint(tmp_path / "downloaded")
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    for file in source.iterdir():
        file.rename(repo / "blobs" / f"hash-{file.name}")
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", f"hash-{file.name}"))
    assert load(snapshot).norm.shape == (8,)
    (repo / "other").mkdir()
    (repo / "blobs" / "hash-model-2.safetensors").rename(repo / "other" / "hash-model-2.safetensors")
    (snapshot / "model-2.safetensors").unlink()
    (snapshot / "model-2.safetensors").symlink_to(Path("..", "..", "other", "hash-model-2.safetensors"))
    with pytest.raises(WeightsError, match="lies outside"):
        load(snapshot)
