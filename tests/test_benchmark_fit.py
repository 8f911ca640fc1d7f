"""`flowc calibrate --from-benchmark`: reading vLLM's and SGLang's serving-benchmark results
(compiler/model/benchmarks.py), fitting a GPU's overheads to them (compiler/model/benchmark_fit.py)
and the profile the command writes (flowc/calibrate_benchmark.py).

The measured figures are flowc's own predictions for a GPU with KNOWN overheads, written in
each benchmark's file shape: the fit must find those overheads again."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

import flowc
import flowc.cli
from flowc.calibrate_benchmark import profile_text
from flowc.compiler.diagnostics import FlowError
from flowc.compiler.frontend.library import stdlib_spec
from flowc.compiler.model.benchmark_fit import BenchmarkFit, fit_benchmarks, replay
from flowc.compiler.model.benchmarks import read_benchmark, read_benchmarks
from flowc.compiler.model.engines import engine_profile

MODEL, GPU = "llama-3.1-8b", "h100-sxm"
TRUTH = {"step": 1.7e-3, "sequence": 23e-6, "request": 5e-3}  # off the search's grid
IN, OUT = 512, 128
SECRET = "SECRET-MODEL-ID-42"  # a value in the files that no message may show


def _true_gpu():
    return stdlib_spec().gpus[GPU].model_copy(update={"overheads": TRUTH})


def _estimate(engine: str, **load):
    return flowc.estimate(MODEL, _true_gpu(), input_len=IN, output_len=OUT, engine=engine, **load)


def vllm_result(rate: float = 8.0, engine: str = "vllm") -> dict:
    """What `vllm bench serve --save-result` writes for a run at `rate` (its default metrics:
    TTFT, TPOT, ITL), the figures from flowc's prediction with TRUTH."""
    e = _estimate(engine, rate=rate)
    n = e.requests_simulated
    result = {"date": "20250301-101500", "backend": engine, "model_id": SECRET, "tokenizer_id": SECRET,
              "num_prompts": n, "request_rate": rate, "burstiness": 1.0, "max_concurrency": None,
              "duration": n / e.requests_per_s, "completed": n, "total_input_tokens": IN * n,
              "total_output_tokens": OUT * n, "request_throughput": e.requests_per_s, "request_goodput:": None,
              "output_throughput": e.output_tokens_per_s, "total_token_throughput": (IN + OUT) * e.requests_per_s}
    for metric, stats in (("ttft", e.ttft_ms), ("tpot", e.tpot_ms), ("itl", e.tpot_ms)):
        result |= {f"mean_{metric}_ms": stats.mean, f"median_{metric}_ms": stats.p50, f"std_{metric}_ms": 0.5,
                   f"p99_{metric}_ms": stats.p99}
    return result


def sglang_line(batch: int, backend: str = "vllm", engine: str = "vllm") -> dict:
    """One line of `python -m sglang.bench_serving --output-file`: a closed loop at `batch`
    (request rate inf, max concurrency `batch`)."""
    e = _estimate(engine, batch=batch)
    n = e.requests_simulated
    return {"backend": backend, "dataset_name": "random", "request_rate": math.inf, "max_concurrency": batch,
            "sharegpt_output_len": None, "random_input_len": IN, "random_output_len": OUT, "random_range_ratio": 1.0,
            "duration": n / e.requests_per_s, "completed": n, "total_input_tokens": IN * n,
            "total_output_tokens": OUT * n, "total_output_tokens_retokenized": OUT * n,
            "request_throughput": e.requests_per_s, "input_throughput": IN * e.requests_per_s,
            "output_throughput": e.output_tokens_per_s, "mean_e2e_latency_ms": e.e2e_ms.mean,
            "median_e2e_latency_ms": e.e2e_ms.p50, "std_e2e_latency_ms": 1.0, "p99_e2e_latency_ms": e.e2e_ms.p99,
            "mean_ttft_ms": e.ttft_ms.mean, "median_ttft_ms": e.ttft_ms.p50, "std_ttft_ms": 1.0,
            "p99_ttft_ms": e.ttft_ms.p99, "mean_tpot_ms": e.tpot_ms.mean, "median_tpot_ms": e.tpot_ms.p50,
            "std_tpot_ms": 0.1, "p99_tpot_ms": e.tpot_ms.p99, "mean_itl_ms": e.tpot_ms.mean,
            "median_itl_ms": e.tpot_ms.p50, "std_itl_ms": 0.1, "p95_itl_ms": e.tpot_ms.p90,
            "p99_itl_ms": e.tpot_ms.p99, "concurrency": batch, "accept_length": None}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bench")
    paths = {"vllm": folder / "vllm-8.0qps-Llama-3.1-8B.json", "sglang": folder / "sglang_random.jsonl"}
    paths["vllm"].write_text(json.dumps(vllm_result()))
    # SGLang's benchmark driving a vLLM server (`--backend vllm`): two closed loops
    paths["sglang"].write_text("".join(json.dumps(sglang_line(b)) + "\n" for b in (32, 8)))
    return paths


@pytest.fixture(scope="module")
def fitted(files) -> BenchmarkFit:
    spec = stdlib_spec()
    gpu = spec.gpus[GPU]
    runs = read_benchmarks([files["vllm"], files["sglang"]])
    return fit_benchmarks(runs, spec.models[MODEL], gpu, spec.links[gpu.interconnect], engine="vllm",
                          name=f"{GPU}-measured")


# ---------------------------------------------------------------------------------- reading


def test_a_vllm_result_is_read_with_its_load_lengths_and_medians(files):
    (run,) = read_benchmark(files["vllm"])
    document = json.loads(files["vllm"].read_text())
    assert (run.tool, run.engine, run.run, run.line) == ("vllm", "vllm", 1, 1)
    assert run.rate == 8.0 and run.concurrency is None and run.burstiness == 1.0
    assert run.completed == document["completed"] and not run.per_request
    assert run.prompt_lens == (IN,) and run.output_lens == (OUT,)  # the means of the totals
    assert run.ttft == pytest.approx(document["median_ttft_ms"] / 1e3)
    assert run.tpot == pytest.approx(document["median_tpot_ms"] / 1e3)
    assert run.e2e is None  # not among vLLM's default metrics
    assert run.output_throughput == pytest.approx(document["output_throughput"])
    assert run.load() == "rate 8 req/s"


def test_an_sglang_jsonl_file_is_one_run_per_line(files):
    runs = read_benchmark(files["sglang"])
    assert [(r.run, r.line, r.tool, r.engine, r.rate, r.concurrency) for r in runs] == [
        (1, 1, "sglang", "vllm", None, 32), (2, 2, "sglang", "vllm", None, 8)]  # Infinity: every request at once
    assert runs[0].e2e == pytest.approx(json.loads(files["sglang"].read_text().splitlines()[0])
                                        ["median_e2e_latency_ms"] / 1e3)
    assert replay(runs[0]).mode == "closed loop"


def test_per_request_lengths_are_the_successful_requests(tmp_path):
    line = sglang_line(8) | {"backend": "sglang", "input_lens": [100, 200, 300], "output_lens": [10, 0, 30]}
    path = tmp_path / "details.jsonl"
    path.write_text(json.dumps(line) + "\n")
    (run,) = read_benchmark(path)
    assert run.engine == "sglang" and run.per_request
    assert run.prompt_lens == (100, 300) and run.output_lens == (10, 30)  # the failed one (0 tokens) is left out


@pytest.mark.parametrize("backend, engine", [("sglang", "sglang"), ("openai-chat", "vllm"), ("vllm", "vllm")])
def test_the_engine_is_the_backend_the_benchmark_drove(tmp_path, backend, engine):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({**vllm_result(), "backend": backend}))
    assert read_benchmark(path)[0].engine == engine


def test_a_rate_run_whose_cap_binds_is_a_closed_loop(tmp_path):
    result = vllm_result() | {"max_concurrency": 2}  # 8 req/s x ~1.2 s in flight >> 2
    path = tmp_path / "capped.json"
    path.write_text(json.dumps(result))
    assert replay(read_benchmark(path)[0]).mode == "closed loop"
    path.write_text(json.dumps(vllm_result() | {"max_concurrency": 1000}))
    assert replay(read_benchmark(path)[0]).mode == "open loop"


# ---------------------------------------------------------------------------------- fitting


def test_the_fit_recovers_known_overheads(fitted):
    assert fitted.fitted == ("step", "sequence", "request")
    assert fitted.overheads["step"] == pytest.approx(TRUTH["step"], rel=0.1)
    assert fitted.overheads["sequence"] == pytest.approx(TRUTH["sequence"], rel=0.35)
    assert fitted.overheads["request"] == pytest.approx(TRUTH["request"], rel=0.1, abs=5e-4)
    assert fitted.score_after < 0.01 < 0.05 < fitted.score_before
    for prediction in fitted.after:
        for metric in prediction.fitted:
            assert abs(prediction.error(metric)) < 0.03, (prediction.run.file, metric)
    assert fitted.gpu.name == f"{GPU}-measured" and fitted.calibrated_as == fitted.base_calibrated_as == GPU
    assert fitted.before_overheads == dict(engine_profile("vllm").overheads)


def test_a_model_that_does_not_fit_the_gpus_is_a_diagnostic(files):
    spec = stdlib_spec()
    gpu = spec.gpus[GPU]
    with pytest.raises(FlowError) as error:
        fit_benchmarks(read_benchmark(files["vllm"]), spec.models["llama-3.1-405b"], gpu,
                       spec.links[gpu.interconnect], engine="vllm")
    assert error.value.codes == ["F0503"]


# ---------------------------------------------------------------------------------- the command


def test_the_command_writes_a_profile_that_checks_and_predicts_the_runs(files, tmp_path, capsys):
    out = tmp_path / "h100-measured.flow"
    status = flowc.cli.main(["calibrate", "--from-benchmark", str(files["vllm"]), str(files["sglang"]),
                             "--model", MODEL, "--gpu", GPU, "-o", str(out)])
    printed = capsys.readouterr().out
    assert status == 0
    assert re.search(r"run\s+load\s+metric\s+measured\s+before\s+error\s+after\s+error", printed)
    assert "TPOT p50" in printed and "output tok/s" in printed and f"wrote {out}" in printed
    text = out.read_text()
    assert str(files["vllm"]) in text and "before" in text and "after" in text  # the header names its sources
    assert SECRET not in printed + text
    assert flowc.cli.main(["check", str(out)]) == 0
    # a spec that uses it
    (tmp_path / "spec.flow").write_text(
        'use std.links\nuse std.models\nuse std.slos\nuse "h100-measured.flow"\n'
        "cluster box { node x 1 { gpu h100-sxm-measured x 1 } }\n"
        "workload chat { arrival poisson 8 req/s; prompt 512 tok; output 128 tok }\n"
        "deploy chatbot { model llama-3.1-8b; on box; serve chat under chat; engine vllm }\n")
    spec = flowc.load(tmp_path / "spec.flow")
    gpu = spec.gpus[f"{GPU}-measured"]
    assert set(gpu.overheads) == {"step", "sequence", "request"}
    assert gpu.overheads["step"] == pytest.approx(TRUTH["step"], rel=0.1)
    measured = json.loads(files["vllm"].read_text())
    predicted = flowc.estimate(MODEL, gpu, input_len=IN, output_len=OUT, rate=8.0, engine="vllm")
    assert predicted.tpot_ms.p50 == pytest.approx(measured["median_tpot_ms"], rel=0.03)
    assert predicted.ttft_ms.p50 == pytest.approx(measured["median_ttft_ms"], rel=0.05)
    closed = json.loads(files["sglang"].read_text().splitlines()[0])
    predicted = flowc.estimate(MODEL, gpu, input_len=IN, output_len=OUT, batch=32, engine="vllm")
    assert predicted.tpot_ms.p50 == pytest.approx(closed["median_tpot_ms"], rel=0.03)
    assert predicted.output_tokens_per_s == pytest.approx(closed["output_throughput"], rel=0.03)


def test_json_output(files, capsys):
    status = flowc.cli.main(["--json", "calibrate", "--from-benchmark", str(files["vllm"]),
                             "--model", MODEL, "--gpu", GPU, "--name", "my-h100"])
    document = json.loads(capsys.readouterr().out)
    assert status == 0
    assert document["gpu"] == "my-h100" and document["engine"] == "vllm"
    assert set(document["overheads"]) >= {"step", "sequence", "request"}
    assert document["runs"][0]["after"]["mode"] == "open loop"
    assert "gpu my-h100 {" in document["profile"]


def test_a_profile_keeps_every_attribute_of_the_stdlib_gpu(tmp_path, fitted):
    spec = stdlib_spec()
    for name in ("a100-sxm-40g", "h100-pcie", "b200", "mi300x"):
        base = spec.gpus[name].model_copy(update={"price": 2.75})
        gpu = base.model_copy(update={"name": f"{name}-measured", "overheads": {"step": 1.23e-3, "sequence": 4.5e-6}})
        fit = BenchmarkFit(**{**fitted.__dict__, "gpu": gpu})
        text = profile_text(fit, [p.run for p in fitted.after], model=spec.models[MODEL], base=base, tp=1, pp=1)
        (tmp_path / f"{name}.flow").write_text(text)
        loaded = flowc.load(tmp_path / f"{name}.flow").gpus[f"{name}-measured"]
        assert loaded.model_dump(exclude={"doc", "location"}) == gpu.model_dump(exclude={"doc", "location"})


def _bad(name: str) -> tuple[str, str]:
    good = vllm_result()
    cases = {
        "not-json.json": ('{"completed": 10, "model_id": "' + SECRET, "not JSON"),
        "missing.json": (json.dumps({k: v for k, v in good.items() if k != "total_output_tokens"}),
                         "`total_output_tokens`"),
        "nan.json": (json.dumps(good | {"median_tpot_ms": math.nan}, indent=2), "`median_tpot_ms`"),
        "none-completed.json": (json.dumps(good | {"completed": 0}), "`completed`"),
        "not-a-result.json": (json.dumps({"model_id": SECRET}), "not a serving-benchmark result"),
        "empty.jsonl": ("", "empty"),
        "bad-line.jsonl": (json.dumps(good) + "\n{" + SECRET + "\n", "not JSON Lines"),
        "bad-rate.json": (json.dumps(good | {"request_rate": SECRET}), "`request_rate`"),
        "bad-lens.json": (json.dumps(good | {"input_lens": [1, 2], "output_lens": [SECRET, 3]}), "`output_lens`"),
    }
    return cases[name]


@pytest.mark.parametrize("name", ["not-json.json", "missing.json", "nan.json", "none-completed.json",
                                  "not-a-result.json", "empty.jsonl", "bad-line.jsonl", "bad-rate.json",
                                  "bad-lens.json"])
def test_a_bad_file_is_a_diagnostic_naming_the_file_and_field(tmp_path, capsys, name):
    text, expected = _bad(name)
    path = tmp_path / name
    path.write_text(text)
    status = flowc.cli.main(["calibrate", "--no-color", "--from-benchmark", str(path), "--model", MODEL,
                             "--gpu", GPU])
    captured = capsys.readouterr()
    assert status == 1
    assert captured.err.startswith("error[F0601]") and expected in captured.err
    assert f"--> {path}:" in captured.err and "= help: " in captured.err
    assert "Traceback" not in captured.err and SECRET not in captured.err + captured.out
    with pytest.raises(FlowError) as error:
        read_benchmark(path)
    assert set(error.value.codes) == {"F0601"}


@pytest.mark.parametrize("args, message", [
    (["--model", MODEL], "needs --gpu"),
    (["--model", "llama-3.1-8", "--gpu", GPU], "did you mean `llama-3.1-8b`"),
    (["--model", MODEL, "--gpu", GPU, "--tp", "0"], "--tp must be at least 1"),
    (["--model", MODEL, "--gpu", GPU, "--dtype", "fp9"], "not a dtype"),
    (["--model", MODEL, "--gpu", GPU, "--name", "h100-pcie"], "standard library GPU"),
    (["--model", MODEL, "--gpu", GPU, "--name", "bad name"], "not a valid name"),
])
def test_usage_errors(files, capsys, args, message):
    assert flowc.cli.main(["calibrate", "--from-benchmark", str(files["vllm"]), *args]) == 2
    assert message in capsys.readouterr().err


def test_other_usage_errors(files, tmp_path, capsys):
    assert flowc.cli.main(["calibrate", "--model", MODEL]) == 2  # without --from-benchmark
    assert "--model goes with --from-benchmark" in capsys.readouterr().err
    assert flowc.cli.main(["calibrate", "--from-benchmark", str(tmp_path / "missing.json"), "--model", MODEL,
                           "--gpu", GPU]) == 2
    assert "does not exist" in capsys.readouterr().err
    sglang = tmp_path / "sglang.jsonl"
    sglang.write_text(json.dumps(sglang_line(8) | {"backend": "sglang"}) + "\n")
    assert flowc.cli.main(["calibrate", "--from-benchmark", str(files["vllm"]), str(sglang), "--model", MODEL,
                           "--gpu", GPU]) == 2
    assert "runs of sglang and vllm" in capsys.readouterr().err


def test_the_fit_recovers_sglang_overheads(tmp_path):
    path = tmp_path / "sglang.jsonl"
    path.write_text("".join(json.dumps(sglang_line(b, backend="sglang", engine="sglang")) + "\n" for b in (32, 8)))
    runs = read_benchmark(path)
    assert {run.engine for run in runs} == {"sglang"}
    spec = stdlib_spec()
    gpu = spec.gpus[GPU]
    fit = fit_benchmarks(runs, spec.models[MODEL], gpu, spec.links[gpu.interconnect], engine="sglang")
    assert fit.score_after < 0.01
    assert fit.overheads["step"] == pytest.approx(TRUTH["step"], rel=0.15)
