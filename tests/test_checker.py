"""The checker: IR values of a realistic spec, cross-checks, capacity, traces, imports."""

from __future__ import annotations

from pathlib import Path

import pytest
from flow_samples import VALID_SPEC, load_error

import flowc

SMALL_CLUSTER = """\
use std.gpus
use std.models
cluster small {
  node x 1 { gpu %s x %d }
}
workload w {
  arrival poisson 1 req/s
  prompt 100 tok
  output 100 tok
}
slo s { ttft p90 <= 1 s }
"""

DEPLOY = """
deploy %s {
  model %s
  on small
  serve w under s
}
"""


def one(error: flowc.FlowError, code: str):
    found = [d for d in error.diagnostics if d.code == code]
    assert len(found) == 1, error.codes
    return found[0]


# ------------------------------------------------------------------ IR values

@pytest.fixture(scope="module")
def spec():
    return flowc.load(VALID_SPEC)


def test_cluster(spec):
    lab = spec.clusters["lab"]
    assert lab.total_gpus == 16
    assert lab.doc == "Two 8-GPU H100 nodes"
    (group,) = lab.nodes
    assert (group.count, group.gpu, group.gpus_per_node, group.link_domain) == (2, "h100-sxm", 8, 8)
    assert group.host_memory == 2 * 2**40
    assert group.link.name == "nvlink4" and group.link.kind == "nvlink"
    assert group.link.bandwidth == 450e9
    assert group.host_link.name == "pcie5"
    assert lab.network.name == "ib-ndr"
    assert lab.network.kind == "infiniband"
    assert lab.network.bandwidth == 50e9
    assert lab.network_nics == 8


def test_gpu_and_model_from_the_stdlib(spec):
    h100 = spec.gpus["h100-sxm"]
    assert h100.memory == 80 * 2**30
    assert h100.memory_bandwidth == 3.35e12
    assert h100.flops["bf16"] == 989e12
    assert h100.vendor == "nvidia"
    llama = spec.models["llama-3.1-70b"]
    assert (llama.layers, llama.hidden, llama.heads, llama.kv_heads, llama.head_dim) == (80, 8192, 64, 8, 128)
    assert llama.max_context == 131072
    assert llama.weights == "bf16" and llama.kv == "bf16"


def test_workload(spec):
    chat = spec.workloads["chat"]
    assert (chat.arrival.kind, chat.arrival.rate, chat.arrival.cv) == ("poisson", 12.0, None)
    assert chat.prompt.kind == "lognormal"
    assert (chat.prompt.median, chat.prompt.sigma, chat.prompt.max, chat.prompt.min) == (1024.0, 0.6, 8192, None)
    assert (chat.output.median, chat.output.sigma, chat.output.max) == (256.0, 0.8, 2048)
    assert chat.requests == 2000


def test_slo(spec):
    slo = spec.slos["interactive"]
    assert [(t.metric, t.percentile, t.limit) for t in slo.targets] == [("ttft", 90.0, 0.5), ("tpot", 99.9, 0.05)]
    assert slo.attainment == 0.9


def test_deployment(spec):
    d = spec.deployments["chatbot"]
    assert d.model.weights == "fp8"
    assert d.model.kv == "fp8"
    assert spec.models["llama-3.1-70b"].weights == "bf16"
    assert spec.models["llama-3.1-70b"].kv == "bf16"
    assert (d.cluster, d.workload, d.slo) == ("lab", "chat", "interactive")
    assert d.objective == "max_goodput_per_gpu"
    assert d.search == {"tp": [2, 4, 8], "pp": [1]}
    assert d.max_gpus == 16
    assert d.allow_disaggregation is True
    assert d.allow_offload is True
    assert d.location.line == 26


def test_other_objectives_forbid_and_token_knobs():
    text = VALID_SPEC.replace("objective max goodput_per_gpu", "objective min gpus").replace(
        "allow disaggregation, offload",
        "allow disaggregation\n  forbid offload\n  max_batched_tokens in [2048 tok, 8192 tok]")
    d = flowc.load(text).deployments["chatbot"]
    assert d.objective == "min_gpus"
    assert (d.allow_disaggregation, d.allow_offload) == (True, False)
    assert d.search["max_batched_tokens"] == [2048, 8192]


def test_other_length_distributions_and_arrivals():
    text = VALID_SPEC.replace("arrival poisson 12 req/s", "arrival gamma 600 req/min cv 2").replace(
        "prompt lognormal(median 1024 tok, sigma 0.6) max 8192 tok", "prompt uniform(128 tok, 2048 tok)").replace(
        "output lognormal(median 256 tok, sigma 0.8) max 2048 tok",
        "output normal(mean 256 tok, std 64 tok) min 1 tok max 1024 tok")
    chat = flowc.load(text).workloads["chat"]
    assert (chat.arrival.kind, chat.arrival.rate, chat.arrival.cv) == ("gamma", 10.0, 2.0)
    assert ((chat.prompt.kind, chat.prompt.low, chat.prompt.high, chat.prompt.upper_bound)
            == ("uniform", 128, 2048, 2048))
    assert ((chat.output.kind, chat.output.mean, chat.output.std, chat.output.min, chat.output.max)
            == ("normal", 256.0, 64.0, 1, 1024))


# ------------------------------------------------------------------ cross-checks

def test_tp_that_does_not_split_the_heads_is_f0401():
    error = load_error(VALID_SPEC.replace("tp in [2, 4, 8]", "tp in [2, 3, 8]"))
    assert error.codes == ["F0401"]
    d = error.diagnostics[0]
    assert d.message == "tp 3 cannot split llama-3.1-70b's 64 attention heads (8 KV heads)"
    assert (d.span.line, d.span.col) == (31, 13)
    assert d.help.endswith("1, 2, 4, 8, 16, 32, 64")


def test_pp_that_does_not_split_the_layers_is_f0402():
    error = load_error(VALID_SPEC.replace("pp 1", "pp 3"))
    assert error.codes == ["F0402"]
    d = error.diagnostics[0]
    assert "80 layers" in d.message
    assert d.help.endswith("1, 2, 4, 5, 8, 10, 16, 20, 40, 80")


def test_ep_on_a_dense_model_is_f0403():
    error = load_error(VALID_SPEC.replace("pp 1", "pp 1\n  ep in [1, 2]"))
    assert error.codes == ["F0403"]
    assert error.diagnostics[0].message == "ep 2 needs a mixture-of-experts model; llama-3.1-70b is dense"


MOE_12 = """\
use std.gpus
cluster box {
  node x 1 { gpu h100-sxm x 8 }
}
model moe-12 {
  architecture mixtral
  layers 4
  hidden 1024
  heads 8
  kv_heads 8
  ffn 2048
  vocab 32000
  max_context 4096 tok
  moe { experts 12; top_k 2 }
}
workload w {
  arrival poisson 1 req/s
  prompt 100 tok
  output 100 tok
}
slo s { ttft p90 <= 1 s }
deploy d {
  model moe-12
  on box
  serve w under s
  %s
}
"""


def test_an_ep_that_does_not_divide_the_allowed_tp_is_f0403():
    """Regression: `tp in [8]` with `ep in [3]` on 12 experts passed check (3 divides 12), then
    the optimizer built the shape and the verifier refused it: ep must divide tp as well."""
    error = load_error(MOE_12 % "tp in [8]\n  ep in [3]")
    assert error.codes == ["F0403"]
    d = error.diagnostics[0]
    assert d.message == "ep 3 cannot split moe-12's 12 experts over tp 8: it must divide both"
    assert d.help == "expert parallel degrees with tp 8: 1, 2, 4"
    error = load_error(MOE_12 % "tp in [2, 8]\n  ep in [1, 3]")
    assert one(error, "F0403").message == ("ep 3 cannot split moe-12's 12 experts over any allowed tp (2, 8): "
                                          "it must divide the experts and tp")


def test_an_ep_possible_with_one_of_the_tps_is_accepted():
    spec = flowc.load(MOE_12 % "tp in [2, 4]\n  ep in [4]")
    assert spec.deployments["d"].search == {"tp": [2, 4], "ep": [4]}


def test_tp_beyond_a_node_is_f0404():
    error = load_error(VALID_SPEC.replace("tp in [2, 4, 8]", "tp 16"))
    assert error.codes == ["F0404"]
    d = error.diagnostics[0]
    assert "(8 GPUs)" in d.message
    assert "tp <= 8" in d.help


def test_max_gpus_beyond_the_cluster_is_f0405():
    error = load_error(VALID_SPEC.replace("max_gpus 16", "max_gpus 32"))
    assert error.codes == ["F0405"]
    assert "(16)" in error.diagnostics[0].message


def test_a_model_that_fits_nowhere_is_f0501():
    error = load_error(SMALL_CLUSTER % ("a100-sxm-40g", 8) + DEPLOY % ("big", "llama-3.1-405b"))
    assert error.codes == ["F0501"]
    d = error.diagnostics[0]
    assert d.message == "llama-3.1-405b cannot fit in cluster `small` at any parallelism"
    assert (d.span.line, d.span.col) == (14, 9)
    notes = "\n".join(d.notes)
    assert "405.85 B parameters at bf16" in notes
    assert "8 x a100-sxm-40g" in notes
    assert "756.0 GiB" in notes and "320.0 GiB" in notes  # 811,706,777,600 B of weights; 8 x 40 GiB


def test_quantized_405b_fits_on_h100s():
    spec = flowc.load(SMALL_CLUSTER % ("h100-sxm", 8) + DEPLOY % ("big", "llama-3.1-405b { weights fp8 }"))
    assert spec.deployments["big"].model.weights == "fp8"


def test_deployments_that_fit_alone_but_not_together_is_f0502():
    text = SMALL_CLUSTER % ("a100-sxm-40g", 4) + DEPLOY % ("one", "llama-3.1-70b")
    assert flowc.load(text).deployments["one"].model.name == "llama-3.1-70b"  # 141 GB in 160 GiB
    error = load_error(text + DEPLOY % ("two", "llama-3.1-70b"))
    assert error.codes == ["F0502"]
    d = error.diagnostics[0]
    assert d.message == "the 2 deployments on `small` cannot all fit"
    assert any(n.startswith("one: llama-3.1-70b at bf16") for n in d.notes)
    assert any(n.startswith("two: llama-3.1-70b at bf16") for n in d.notes)


def test_several_errors_in_different_blocks_are_reported_together():
    text = VALID_SPEC.replace("host_memory 2 TiB", "host_memory 2 TB/s").replace(
        "requests 2000 req", "requests 2000 req\n  colour blue").replace("ttft p90", "latency p90")
    error = load_error(text)
    assert error.codes == ["F0302", "F0204", "F0209"]
    assert [d.span.line for d in error.diagnostics] == [8, 18, 22]
    assert error.diagnostics[2].help == "did you mean `e2e`?"


def test_a_gpus_repeated_flops_or_overhead_is_f0311_and_the_rest_is_kept(tmp_path):
    (tmp_path / "g.flow").write_text("""use std.links
gpu g {
  vendor cpu
  memory 1 GiB
  memory_bandwidth 10 GB/s
  flops fp32 1 TFLOP/s
  flops fp32 2 TFLOP/s
  flops bf16 4 TFLOP/s
  interconnect cpu-memory
  host_link cpu-memory
  overhead wake 1 ms
  overhead wake 2 ms
  overhead layer 0 us
}
""")
    with pytest.raises(flowc.FlowError) as info:
        flowc.load(tmp_path / "g.flow")
    messages = sorted(d.message for d in info.value.diagnostics if d.code == "F0311")
    assert messages == ["`flops fp32` is given twice", "`overhead wake` is given twice"]
    (tmp_path / "g.flow").write_text((tmp_path / "g.flow").read_text().replace("  flops fp32 2 TFLOP/s\n", "")
                                     .replace("  overhead wake 2 ms\n", ""))
    gpu = flowc.load(tmp_path / "g.flow").gpus["g"]
    assert gpu.flops == {"fp32": 1e12, "bf16": 4e12}
    assert gpu.overheads == {"wake": pytest.approx(1e-3), "layer": 0.0}  # a zero overhead is kept


def test_unknown_names():
    error = load_error(VALID_SPEC.replace("on lab", "on labb")
                       .replace("model llama-3.1-70b {", "model llama-3.1-07b {"))
    assert error.codes == ["F0201", "F0201"]
    assert [d.help for d in error.diagnostics] == ["did you mean `llama-3.1-70b`?", "did you mean `lab`?"]


def test_a_name_of_the_wrong_kind_is_f0210():
    error = load_error(VALID_SPEC.replace("on lab", "on chat"))
    assert error.codes == ["F0210"]
    assert error.diagnostics[0].message == "`chat` is a workload, not a cluster"


def test_unknown_stdlib_name_without_imports_suggests_the_module():
    text = VALID_SPEC.replace("use std.gpus\nuse std.models\n", "")
    error = load_error(text)
    assert error.codes == ["F0201", "F0201", "F0201"]  # the gpu, the network link, the model
    helps = [d.help for d in error.diagnostics]
    assert "`use std.gpus`" in helps[0]
    assert "`use std.models`" in helps[2]


def test_unknown_stdlib_gpu_with_another_std_module_suggests_std_gpus():
    error = load_error(VALID_SPEC.replace("use std.gpus\n", "use std.links\n"))
    d = one(error, "F0201")
    assert "use std.gpus" in d.help


def test_a_name_from_a_module_that_is_not_imported_here(tmp_path):
    (tmp_path / "hw.flow").write_text("use std.gpus\n", encoding="utf-8")
    main = tmp_path / "main.flow"
    main.write_text('use "hw.flow"\n' + VALID_SPEC.replace("use std.gpus\n", ""), encoding="utf-8")
    assert flowc.load(main).clusters["lab"].total_gpus == 16  # visible through hw.flow


# ------------------------------------------------------------------ traces

AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
TRACE_SPEC = """\
use std.gpus
use std.models
cluster c {
  node x 1 { gpu h100-sxm x 8 }
}
workload w {
  arrival trace "%s"
  prompt trace "%s"
  output trace "%s" max 200 tok
}
slo s { ttft p90 <= 1 s }
deploy d {
  model llama-3.1-8b
  on c
  serve w under s
}
"""


def write_spec(tmp_path, trace: str):
    path = tmp_path / "spec.flow"
    path.write_text(TRACE_SPEC % (trace, trace, trace), encoding="utf-8")
    return path


def test_valid_azure_trace(tmp_path):
    (tmp_path / "traces").mkdir()
    (tmp_path / "traces" / "t.csv").write_text(
        AZURE_HEADER + "2023-11-16 18:15:46.5000000,374,44\n2023-11-16 18:15:48.5000000,396,109\n"
        "2023-11-16 18:15:50.5000000,879,59\n", encoding="utf-8")
    spec = flowc.load(write_spec(tmp_path, "traces/t.csv"))
    w = spec.workloads["w"]
    assert w.arrival.kind == "trace"
    assert w.arrival.trace == str((tmp_path / "traces" / "t.csv").resolve())
    assert w.arrival.rate == pytest.approx(0.5)  # 2 gaps over 4 s
    assert (w.prompt.kind, w.prompt.trace, w.prompt.max) == ("trace", w.arrival.trace, None)
    assert w.output.max == 200


def test_valid_plain_trace(tmp_path):
    (tmp_path / "t.csv").write_text("arrival_time,prompt_tokens,output_tokens\n0,10,5\n0.5,20,6\n1.0,30,7\n",
                                    encoding="utf-8")
    spec = flowc.load(write_spec(tmp_path, "t.csv"))
    assert spec.workloads["w"].arrival.rate == pytest.approx(2.0)


def test_trace_longer_than_the_context_is_f0410(tmp_path):
    (tmp_path / "t.csv").write_text(AZURE_HEADER + "2023-11-16 18:15:46,131000,44\n2023-11-16 18:15:47,10,10\n",
                                    encoding="utf-8")
    with pytest.raises(flowc.FlowError) as info:  # spec text: its traces resolve against the working directory
        flowc.load(write_spec(tmp_path, "t.csv").read_text(encoding="utf-8")
                   .replace('"t.csv"', f'"{tmp_path}/t.csv"'), allow_outside=True)
    error = info.value
    assert error.codes == ["F0410"]
    assert "131200 tokens" in error.diagnostics[0].message


def test_missing_trace_is_f0208(tmp_path):
    with pytest.raises(flowc.FlowError) as info:
        flowc.load(write_spec(tmp_path, "nope.csv"))
    assert set(info.value.codes) == {"F0208"}
    d = info.value.diagnostics[0]
    assert d.message == "trace file `nope.csv` not found"
    assert tmp_path.name in d.label


@pytest.mark.parametrize(("content", "line"), [
    (AZURE_HEADER + "2023-11-16 18:15:46.6805900,abc,44\n", 2),
    ("a,b,c\n1,2,3\n", 1),
    (AZURE_HEADER, 2),
    ("", 1),
    (AZURE_HEADER + "2023-11-16 18:15:46,1,1\n2023-11-16 18:15:40,1,1\n", 3),
    (AZURE_HEADER + "2023-11-16 18:15:46,-1,1\n", 2),
])
def test_malformed_trace_is_f0309(tmp_path, content, line):
    (tmp_path / "t.csv").write_text(content, encoding="utf-8")
    with pytest.raises(flowc.FlowError) as info:
        flowc.load(write_spec(tmp_path, "t.csv"))
    assert set(info.value.codes) == {"F0309"}
    d = info.value.diagnostics[0]
    assert d.message == "malformed trace file `t.csv`"
    assert d.notes[0].startswith(f"line {line} of t.csv: ")


# ------------------------------------------------------------------ imports

def test_use_outside_the_tree_is_f0207(tmp_path):
    (tmp_path / "shared").mkdir()
    (tmp_path / "spec").mkdir()
    (tmp_path / "shared" / "links.flow").write_text("link mine {\n  kind nvlink\n  bandwidth 100 GB/s\n}\n",
                                                    encoding="utf-8")
    main = tmp_path / "spec" / "main.flow"
    main.write_text('use "../shared/links.flow"\n', encoding="utf-8")
    with pytest.raises(flowc.FlowError) as info:
        flowc.load(main)
    assert info.value.codes == ["F0207"]
    d = info.value.diagnostics[0]
    assert d.message == "`../shared/links.flow` is outside the spec's directory tree"
    assert "--allow-outside" in d.help
    spec = flowc.load(main, allow_outside=True)
    assert spec.links["mine"].bandwidth == 100e9


def test_use_of_a_file_below_the_spec(tmp_path):
    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "links.flow").write_text("link mine { kind pcie; bandwidth 1 GB/s }\n", encoding="utf-8")
    main = tmp_path / "main.flow"
    main.write_text('use "common/links.flow"\n', encoding="utf-8")
    assert flowc.load(main).links["mine"].kind == "pcie"


def test_import_cycle_is_f0206(tmp_path):
    (tmp_path / "a.flow").write_text('use "b.flow"\nlink la { kind pcie; bandwidth 1 GB/s }\n', encoding="utf-8")
    (tmp_path / "b.flow").write_text('use "a.flow"\nlink lb { kind pcie; bandwidth 1 GB/s }\n', encoding="utf-8")
    with pytest.raises(flowc.FlowError) as info:
        flowc.load(tmp_path / "a.flow")
    assert info.value.codes == ["F0206"]
    d = info.value.diagnostics[0]
    assert d.message.startswith("import cycle: ")
    assert d.message.count("a.flow") == 2 and "b.flow" in d.message


def test_missing_import_is_f0205(tmp_path):
    (tmp_path / "links.flow").write_text("", encoding="utf-8")
    main = tmp_path / "main.flow"
    main.write_text('use "link.flow"\nuse std.gpu\n', encoding="utf-8")
    with pytest.raises(flowc.FlowError) as info:
        flowc.load(main)
    assert info.value.codes == ["F0205", "F0205"]
    assert [d.help for d in info.value.diagnostics] == ['did you mean `"links.flow"`?', "did you mean `std.gpus`?"]


def test_paths_outside_the_working_directory_are_shown_absolute(tmp_path, monkeypatch):
    (tmp_path / "cwd").mkdir()
    (tmp_path / "elsewhere").mkdir()
    spec = tmp_path / "elsewhere" / "s.flow"
    spec.write_text("gpu g { memory 80 G }\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path / "cwd")
    with pytest.raises(flowc.FlowError) as info:
        flowc.load(spec)
    assert info.value.diagnostics[0].span.file == str(spec)


def test_paths_below_the_working_directory_are_relative(tmp_path, monkeypatch):
    (tmp_path / "specs").mkdir()
    spec = tmp_path / "specs" / "s.flow"
    spec.write_text("gpu g { memory 80 G }\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(flowc.FlowError) as info:
        flowc.load(spec)
    assert info.value.diagnostics[0].span.file == "specs/s.flow"


TINY = (Path(__file__).resolve().parents[1] / "examples" / "tiny-cpu.flow").read_text()


@pytest.mark.parametrize("old, new, what", [
    ("arrival poisson 4 req/s", "arrival poisson 123456789012345678901234567890 req/s", "arrival rate"),
    ("gpu cpu-local x 1", "gpu cpu-local x 120000000000000000000000000000", "the number of GPUs per node"),
    ("node x 1 {", "node x 70000 {", "the number of nodes"),
    ("max_seqs in [32]", "max_seqs in [32]\n  replicas in [1, 120000000000000000000000000000]", "replicas"),
    ("arrival poisson 4 req/s", "arrival gamma 4 req/s cv 1e29", "cv"),
    ("gpu cpu-local x 1\n", "gpu cpu-local x 1\n    price 1.2e29 usd/h\n", "a price"),
])
def test_values_beyond_what_the_solvers_hold_are_f0307(old, new, what):
    """Regression (fuzzed compiles): these overflowed CP-SAT's int64 or hung the simulation."""
    assert old in TINY
    with pytest.raises(flowc.FlowError) as caught:
        flowc.load(TINY.replace(old, new, 1))
    (d,) = [d for d in caught.value.diagnostics if d.code == "F0307"]
    assert d.message == f"{what} is beyond the largest flowc takes"


def test_more_pipeline_stages_than_gpus_is_a_check_error():
    """Regression: `pp 32` on 8 GPUs passed check, then compile said the weights did not fit
    even with offload. Here: tiny-llama's two layers in two stages, on one GPU."""
    with pytest.raises(flowc.FlowError) as caught:
        flowc.load(TINY.replace("max_seqs in [32]", "max_seqs in [32]\n  pp in [1, 2]"))
    (d,) = caught.value.diagnostics
    assert d.code == "F0405" and d.message == "pp 2 needs at least 2 GPUs per instance; deployment `tiny` may use 1"


def test_a_model_of_1e12_layers_is_f0307():
    """Regression (fuzz seed 13): `layers 1e12` checked clean and compile ran for hours."""
    text = ("model huge {\n  architecture llama\n  layers 1e12\n  hidden 64\n  heads 4\n  ffn 128\n"
            "  vocab 256\n  max_context 1024 tok\n}\n")
    with pytest.raises(flowc.FlowError) as caught:
        flowc.load(text)
    assert [d.message for d in caught.value.diagnostics if d.code == "F0307"] == [
        "layers is beyond the largest flowc takes"]
