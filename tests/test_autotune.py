"""flowc.autotune (flowc/autotune.py), `flowc autotune` (flowc/autotune_cmd.py) and the
report's Pareto frontier (`flowc viz --autotune`).

Most tests tune the tiny CPU example with its scheduler knobs left open. The module's
ground truth compiles each of the 16 configurations of SPACE once, as a one-configuration
autotune (the same trial function), into a cache the other tests share: they then pay for
no compile unless they test evaluating itself (cache, cancel, parallel, measure).
"""

from __future__ import annotations

import itertools
import json
import random
import threading
from pathlib import Path

import pytest

import flowc
from flowc.autotune import AutotuneError, AutotuneResult, Metrics, Trial, _pareto
from flowc.cli import main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY = EXAMPLES / "tiny-cpu.flow"
# The tiny CPU example without its pinned scheduler knobs: the search has to find them.
OPEN = TINY.read_text().replace("  max_batched_tokens in [512 tok]\n  max_seqs in [32]\n", "")
SPACE = {"max_batched_tokens": [128, 256, 512, 1024], "max_seqs": [4, 8, 16, 32]}
CONFIGS = [dict(zip(SPACE, values)) for values in itertools.product(*SPACE.values())]


@pytest.fixture(scope="module")
def truth(tmp_path_factory):
    """(cache folder, one trial per configuration of SPACE in space order)."""
    cache = tmp_path_factory.mktemp("autotune-cache")
    trials = []
    for config in CONFIGS:
        result = flowc.autotune(OPEN, space={k: [v] for k, v in config.items()}, budget=1, cache_dir=cache)
        (trial,) = result.trials
        trials.append(trial)
    return cache, trials


def _expected_ranking(trials: list[Trial]) -> list[dict]:
    """Meets the SLO, then objective value, then goodput per GPU, then the space's order."""
    order = sorted(range(len(trials)), key=lambda i: (trials[i].meets_slo, trials[i].objective_value,
                                                      trials[i].metrics.goodput_rps_per_gpu, -i), reverse=True)
    return [CONFIGS[i] for i in order]


# ------------------------------------------------------------------------------------ search

def test_with_budget_for_every_configuration_it_is_the_exhaustive_ranking(truth):
    cache, trials = truth
    assert all(t.status == "ok" and t.meets_slo for t in trials)
    assert len({t.objective_value for t in trials}) > 4  # the knobs matter: there is something to find
    result = flowc.autotune(OPEN, space=SPACE, budget=len(CONFIGS), cache_dir=cache)
    assert result.strategy == "exhaustive" and not result.cancelled
    assert [t.config for t in result.trials] == _expected_ranking(trials)
    by_config = {json.dumps(c): t.objective_value for c, t in zip(CONFIGS, trials)}
    assert [t.objective_value for t in result.trials] == [by_config[json.dumps(t.config)] for t in result.trials]
    assert result.best == result.trials[0]
    assert (result.evaluations, result.cached) == (0, len(CONFIGS))  # the ground truth's cache, same keys


def test_coordinate_descent_finds_the_optimum_with_a_smaller_budget(truth):
    cache, trials = truth
    optimum = _expected_ranking(trials)[0]
    value = trials[CONFIGS.index(optimum)].objective_value
    result = flowc.autotune(OPEN, space=SPACE, budget=10, cache_dir=cache)
    assert result.strategy == "coordinate descent"
    assert len(result.trials) == 10
    assert result.best.config == optimum and result.best.objective_value == value


def test_the_objective_changes_the_ranking(truth):
    cache, _ = truth
    slowest = flowc.autotune(OPEN, space=SPACE, budget=16, cache_dir=cache,
                             objective=lambda m: -m.goodput_rps_per_gpu)
    assert slowest.objective == "custom"
    values = [t.metrics.goodput_rps_per_gpu for t in slowest.trials]
    assert values == sorted(values)
    with pytest.raises(AutotuneError, match="did you mean `min_ttft_p90`"):
        flowc.autotune(OPEN, space=SPACE, objective="min_ttft_p99", cache_dir=cache)


def _dominates(a: Trial, b: Trial) -> bool:
    x, y = a.metrics, b.metrics
    at_least = (x.goodput_rps_per_gpu >= y.goodput_rps_per_gpu and x.ttft_p90_ms <= y.ttft_p90_ms
                and x.tpot_p90_ms <= y.tpot_p90_ms)
    better = (x.goodput_rps_per_gpu > y.goodput_rps_per_gpu or x.ttft_p90_ms < y.ttft_p90_ms
              or x.tpot_p90_ms < y.tpot_p90_ms)
    return at_least and better


def _check_frontier(trials: list[Trial], frontier: list[Trial]) -> None:
    feasible = [t for t in trials if t.meets_slo]
    assert frontier and all(t.meets_slo for t in frontier)
    for t in frontier:
        assert not any(_dominates(u, t) for u in feasible)
    for t in feasible:
        if t not in frontier:
            assert any(_dominates(f, t) for f in frontier)


def test_the_pareto_frontier_is_exactly_the_non_dominated_trials(truth):
    cache, _ = truth
    result = flowc.autotune(OPEN, space=SPACE, budget=16, cache_dir=cache)
    _check_frontier(result.trials, result.pareto)
    # the tiny example's latencies barely move with these knobs: also random metrics, with ties
    rng = random.Random(7)
    for _ in range(30):
        trials = [Trial(status="ok", config={"max_seqs": i}, key=str(i), metrics=Metrics(
            goodput_rps_per_gpu=rng.choice([1.0, 2.0, 3.0]), ttft_p90_ms=rng.choice([10.0, 20.0, 30.0]),
            tpot_p90_ms=rng.choice([1.0, 2.0]), gpus=1, meets_slo=rng.random() < 0.8, goodput_rps=1.0,
            mode="colocated", summary="")) for i in range(12)]
        if not any(t.meets_slo for t in trials):
            continue
        frontier = _pareto(trials)
        _check_frontier(trials, [trials[i] for i in sorted(frontier)])


# ------------------------------------------------------------------------------------- cache

def test_a_rerun_reads_every_trial_from_the_cache_and_a_corrupt_entry_is_evaluated_again(tmp_path):
    space = {"max_seqs": [4, 32]}
    first = flowc.autotune(OPEN, space=space, cache_dir=tmp_path)
    assert (first.evaluations, first.cached) == (2, 0)
    again = flowc.autotune(OPEN, space=space, cache_dir=tmp_path)
    assert (again.evaluations, again.cached) == (0, 2)
    assert [(t.config, t.objective_value) for t in again.trials] == \
        [(t.config, t.objective_value) for t in first.trials]
    assert all(t.cached for t in again.trials)
    entries = sorted(tmp_path.glob("*.json"))
    assert len(entries) == 2 and not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))
    entries[0].write_text(entries[0].read_text()[:100])  # cut short, as by a crash without the atomic rename
    repaired = flowc.autotune(OPEN, space=space, cache_dir=tmp_path)
    assert (repaired.evaluations, repaired.cached) == (1, 1)
    assert [t.objective_value for t in repaired.trials] == [t.objective_value for t in first.trials]
    json.loads(entries[0].read_text())  # rewritten whole


def test_edited_code_misses_the_cache_and_unchanged_code_hits_it(truth, monkeypatch):
    cache, trials = truth
    space = {"max_batched_tokens": [512], "max_seqs": [32]}
    same = flowc.autotune(OPEN, space=space, cache_dir=cache)
    assert (same.evaluations, same.cached) == (0, 1)
    assert same.trials[0].key == trials[CONFIGS.index({"max_batched_tokens": 512, "max_seqs": 32})].key
    monkeypatch.setattr(flowc.autotune, "_code_hash", lambda evaluator: "the hash of an edited tree")
    edited = flowc.autotune(OPEN, space=space, cache_dir=cache)
    assert (edited.evaluations, edited.cached) == (1, 0)
    assert edited.trials[0].key != same.trials[0].key


def _settings_with(monkeypatch, target, name: str, value) -> dict:
    with monkeypatch.context() as patched:
        patched.setattr(target, name, value)
        return flowc.autotune._settings("simulate", 0, 16)


def test_every_evaluator_setting_and_library_version_is_in_the_key(monkeypatch):
    import platform
    from importlib import metadata

    module = flowc.autotune
    base = module._settings("simulate", 0, 16)
    assert base["code"] == module._code_hash("simulate") and len(base["code"]) == 64
    assert base["libraries"] == {"ortools": metadata.version("ortools"), "numpy": metadata.version("numpy")}
    assert base["python"] == platform.python_version() and base["compile_time_limit_s"] == 10.0
    assert module._settings("simulate", 0, 99) == base  # the request count only matters to "measure"
    variants = [module._settings("simulate", 1, 16),
                _settings_with(monkeypatch, module, "COMPILE_TIME_LIMIT_S", 30.0),
                _settings_with(monkeypatch, module.metadata, "version", lambda name: "0.0"),
                _settings_with(monkeypatch, module.platform, "python_version", lambda: "3.99.0")]
    keys = {module._key(settings) for settings in [base, *variants]}
    assert len(keys) == 5


def test_measured_keys_hold_the_runtime_code_the_machine_and_the_request_count():
    pytest.importorskip("torch")
    from importlib import metadata

    module = flowc.autotune
    measured = module._settings("measure", 0, 16)
    assert measured["code"] == module._code_hash("measure") != module._code_hash("simulate")
    assert measured["libraries"]["torch"] == metadata.version("torch") and measured["requests"] == 16
    assert measured["host"] and isinstance(measured["devices"], list)
    assert module._key(module._settings("measure", 0, 4)) != module._key(measured)
    names = {name for name, _ in module._code_files(module._CODE["measure"])}
    assert {"flowc.runtime/engine.py", "flowc.replay"} <= names


def _package(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def _probe_hash(monkeypatch, root: Path) -> tuple[list[str], str]:
    """(file names, code hash) of the package `probe_pkg` found under root."""
    import importlib

    with monkeypatch.context() as patched:
        patched.syspath_prepend(str(root))
        importlib.invalidate_caches()
        files = flowc.autotune._code_files(("probe_pkg",))
    return [name for name, _ in files], flowc.autotune._files_hash(files)


def test_the_code_hash_follows_every_source_and_data_file_and_nothing_else(monkeypatch, tmp_path):
    names = {name for name, _ in flowc.autotune._code_files(flowc.autotune._CODE["simulate"])}
    assert {"flowc.compiler/model/simulator.py", "flowc.compiler/optimize/placement/solve.py",
            "flowc.stdlib/calibration.json", "flowc.stdlib/gpus.flow", "flowc.grammar/flow.lark",
            "flowc.autotune"} <= names
    assert not any(n.startswith("flowc.runtime") or "__pycache__" in n or "/." in n for n in names)

    tree = {"probe_pkg/__init__.py": "", "probe_pkg/model/cost.py": "A = 1\n", "probe_pkg/data.json": "{}",
            "probe_pkg/__pycache__/cost.cpython-311.pyc": "x", "probe_pkg/.ruff_cache/entry.json": "x",
            "probe_pkg/notes.md": "x"}
    _package(tmp_path / "a", tree)
    files, original = _probe_hash(monkeypatch, tmp_path / "a")
    assert files == ["probe_pkg/__init__.py", "probe_pkg/data.json", "probe_pkg/model/cost.py"]
    _package(tmp_path / "moved", tree)
    assert _probe_hash(monkeypatch, tmp_path / "moved")[1] == original  # another checkout of the same code
    _package(tmp_path / "a", {"probe_pkg/__pycache__/cost.cpython-311.pyc": "y", "probe_pkg/.ruff_cache/e.json": "y",
                              "probe_pkg/notes.md": "y"})
    assert _probe_hash(monkeypatch, tmp_path / "a")[1] == original  # caches and prose are not code

    changed = set()
    for edit in ({"probe_pkg/model/cost.py": "A = 2\n"}, {"probe_pkg/data.json": '{"fit": 1}'},
                 {"probe_pkg/model/extra.py": ""}):
        _package(tmp_path / "moved", edit)
        changed.add(_probe_hash(monkeypatch, tmp_path / "moved")[1])
    (tmp_path / "moved" / "probe_pkg" / "model" / "extra.py").rename(tmp_path / "moved" / "probe_pkg" / "other.py")
    changed.add(_probe_hash(monkeypatch, tmp_path / "moved")[1])
    assert len(changed) == 4 and original not in changed


def test_the_default_cache_follows_xdg_cache_home(monkeypatch, tmp_path):
    from flowc.autotune import default_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "flowc" / "autotune"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # invalid per the XDG spec: ignored
    assert default_cache_dir() == Path.home() / ".cache" / "flowc" / "autotune"


def test_cancelling_after_two_trials_returns_them_and_a_rerun_resumes(tmp_path):
    space = {"max_seqs": [4, 8, 16, 32]}
    cancel = threading.Event()

    def progress(what, done, total):
        if done == 2:
            cancel.set()

    stopped = flowc.autotune(OPEN, space=space, cache_dir=tmp_path, cancel=cancel, on_progress=progress)
    assert stopped.cancelled and len(stopped.trials) == 2 and stopped.evaluations == 2
    resumed = flowc.autotune(OPEN, space=space, cache_dir=tmp_path)
    assert not resumed.cancelled and len(resumed.trials) == 4
    assert (resumed.evaluations, resumed.cached) == (2, 2)


INTERRUPTED = """
import json, os, signal, sys
import flowc

def progress(what, done, total):
    if done == 2:  # as a terminal's Ctrl-C, between trials, after CP-SAT has solved in this process
        os.kill(os.getpid(), signal.SIGINT)

result = flowc.autotune(sys.argv[1], space={"max_seqs": [4, 8, 16, 32]}, cache_dir=sys.argv[2], on_progress=progress)
print(json.dumps({"cancelled": result.cancelled, "trials": len(result.trials)}))
"""


def test_ctrl_c_returns_the_trials_done(tmp_path):
    import subprocess
    import sys

    spec = tmp_path / "open.flow"
    spec.write_text(OPEN)
    run = subprocess.run([sys.executable, "-c", INTERRUPTED, str(spec), str(tmp_path / "cache")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr  # a solver's own SIGINT handler would end the process (130)
    assert json.loads(run.stdout) == {"cancelled": True, "trials": 2}
    assert not list((tmp_path / "cache").glob(".*.tmp"))


def test_cli_prints_the_trials_done_when_interrupted(truth, tmp_path, capsys, monkeypatch):
    import flowc.autotune as module

    calls = []
    real = module._run_job

    def interrupted(job):
        calls.append(job)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(module, "_run_job", interrupted)
    spec = tmp_path / "open.flow"
    spec.write_text(OPEN)
    code = main(["autotune", str(spec), "--space", "max_seqs=4,8,16,32", "--cache-dir", str(tmp_path)])
    assert code == 130
    assert "2 trials (exhaustive, interrupted): 2 evaluated" in capsys.readouterr().out


def test_parallel_workers_give_the_same_results(truth, tmp_path):
    cache, _ = truth
    space = {"max_batched_tokens": [256, 512], "max_seqs": [8, 32]}
    serial = flowc.autotune(OPEN, space=space, cache_dir=cache)
    parallel = flowc.autotune(OPEN, space=space, cache_dir=tmp_path, parallel=2)
    assert parallel.evaluations == 4
    assert [(t.config, t.metrics) for t in parallel.trials] == [(t.config, t.metrics) for t in serial.trials]


# -------------------------------------------------------------------- knobs, JSON, failures

def test_dtype_disaggregation_and_router_knobs_round_trip_through_json(tmp_path):
    space = {"kv": ["fp32", "bf16"], "disaggregation": [False, True], "router": ["round_robin", "least_work"]}
    result = flowc.autotune(TINY, space=space, cache_dir=tmp_path)
    assert result.evaluations == 8 and all(t.status == "ok" for t in result.trials)
    for t in result.trials:
        assert t.plan.deployments[0].kv == t.config["kv"] and isinstance(t.config["disaggregation"], bool)
    # one instance: the router cannot matter, and re-simulating agrees with the plan's own prediction
    for t in result.trials:
        assert t.metrics.goodput_rps_per_gpu == pytest.approx(t.plan.deployments[0].predicted.goodput_rps_per_gpu,
                                                              rel=0.05)
    assert AutotuneResult.from_json(result.to_json()) == result


def test_an_infeasible_value_is_a_failed_trial_with_the_checkers_diagnostic(truth):
    cache, _ = truth
    result = flowc.autotune(OPEN, space={"tp": [1, 3], "max_seqs": [32]}, cache_dir=cache)
    failed = next(t for t in result.trials if t.config["tp"] == 3)
    assert failed.status == "failed" and failed.problems[0].code == "F0401"
    assert "cannot split" in failed.problems[0].message and failed.objective_value is None
    assert result.trials[-1] == failed
    assert result.best.config == {"tp": 1, "max_seqs": 32}


@pytest.mark.parametrize("space, message", [
    ({"tpp": [1, 2]}, "unknown knob `tpp`.*did you mean `tp`"),
    ({"max_seqs": []}, "`max_seqs` has no values"),
    ({"max_seqs": 8}, "must map to a list"),
    ({"tp": ["2"]}, "whole numbers"),
    ({"tp": [True]}, "whole numbers"),
    ({"tp": [0]}, "whole numbers of at least 1"),
    ({"weights": ["fp9"]}, "did you mean `fp8`"),
    ({"disaggregation": ["yes"]}, "True or False"),
    ({"router": ["random"]}, "routers are round_robin, least_work"),
    ({"max_seqs": [8, 8]}, "lists 8 twice"),
])
def test_space_mistakes_are_clear_errors(space, message, tmp_path):
    with pytest.raises(AutotuneError, match=message):
        flowc.autotune(OPEN, space=space, cache_dir=tmp_path)


def test_setting_mistakes_are_clear_errors(tmp_path):
    with pytest.raises(AutotuneError, match="2 deployments"):
        flowc.autotune(EXAMPLES / "shared-cluster.flow", cache_dir=tmp_path)
    with pytest.raises(AutotuneError, match="no deployment `tiny2`.*did you mean `tiny`"):
        flowc.autotune(OPEN, deployment="tiny2", cache_dir=tmp_path)
    with pytest.raises(AutotuneError, match="budget"):
        flowc.autotune(OPEN, budget=0, cache_dir=tmp_path)
    with pytest.raises(AutotuneError, match="min_cost needs prices"):
        flowc.autotune(OPEN, objective="min_cost", cache_dir=tmp_path)
    with pytest.raises(AutotuneError, match="evaluator"):
        flowc.autotune(OPEN, evaluator="guess", cache_dir=tmp_path)
    with pytest.raises(AutotuneError, match="no router"):
        flowc.autotune(OPEN, space={"router": ["least_work"]}, evaluator="measure", cache_dir=tmp_path)
    with pytest.raises(AutotuneError, match="pass the spec's path or text"):
        flowc.autotune(flowc.load(OPEN), cache_dir=tmp_path)  # a Spec from text has no file to check trials from
    with pytest.raises(flowc.FlowError):
        flowc.autotune(OPEN.replace("max_context", "max_contxt") + "\nbroken {", cache_dir=tmp_path)


def test_a_spec_loaded_from_its_file_is_accepted(truth):
    cache, _ = truth
    spec = flowc.load(TINY)
    result = flowc.autotune(spec, space={"max_seqs": [32]}, cache_dir=cache)
    assert result.spec_files == spec.files and result.best is not None


# ---------------------------------------------------------------------------------- measure

def test_measure_runs_the_engine_on_this_machine(tmp_path):
    pytest.importorskip("torch")
    result = flowc.autotune(TINY, space={"max_seqs": [4, 32]}, budget=2, evaluator="measure", measure_requests=4,
                            cache_dir=tmp_path)
    assert result.evaluations == 2
    for t in result.trials:
        assert t.status == "ok" and t.metrics.measured and t.metrics.gpus == 1
        assert 0 < t.metrics.ttft_p90_ms < 60_000 and t.metrics.tpot_p90_ms > 0
        assert (t.metrics.goodput_rps_per_gpu > 0) == t.metrics.meets_slo
    refused = flowc.autotune(TINY, space={"weights": ["fp8"]}, evaluator="measure", measure_requests=2,
                             cache_dir=tmp_path)
    (trial,) = refused.trials
    assert trial.status == "failed" and "fp8" in trial.problems[0].message  # the runtime's refusal, not a crash


def test_measure_refuses_a_spec_for_gpus_this_machine_lacks(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(AutotuneError, match="this machine does not have"):
        flowc.autotune(EXAMPLES / "chat-70b.flow", evaluator="measure", cache_dir=tmp_path)


# -------------------------------------------------------------------------------- CLI, report

def test_cli_prints_the_ranking_and_writes_the_result(truth, tmp_path, capsys):
    cache, trials = truth
    spec = tmp_path / "open.flow"
    spec.write_text(OPEN)
    results = tmp_path / "results.json"
    code = main(["autotune", str(spec), "--space", "max_batched_tokens=128,256,512,1024",
                 "--space", "max_seqs=4,8,16,32", "--budget", "16", "--cache-dir", str(cache), "-o", str(results)])
    out = capsys.readouterr().out
    assert code == 0
    assert "best: " + flowc.autotune.describe(_expected_ranking(trials)[0]) in out
    assert "16 trials (exhaustive): 0 evaluated, 16 from the cache" in out
    saved = AutotuneResult.from_json(results.read_text())
    assert [t.config for t in saved.trials] == _expected_ranking(trials)

    assert main(["autotune", str(spec), "--space", "max_seqs=4,32", "--cache-dir", str(cache), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert [t["config"]["max_seqs"] for t in document["trials"]] == [32, 4]


@pytest.mark.parametrize("argv, message", [
    (["--space", "max_seqs"], "is not KNOB=V1,V2"),
    (["--space", "max_seqs=a,b"], "whole numbers"),
    (["--space", "max_sequences=4"], "did you mean `max_seqs`"),
    (["--objective", "fastest"], "unknown objective"),
])
def test_cli_usage_errors_exit_2(argv, message, tmp_path, capsys):
    spec = tmp_path / "open.flow"
    spec.write_text(OPEN)
    assert main(["autotune", str(spec), "--cache-dir", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err


def test_cli_missing_spec_exits_2(capsys, tmp_path):
    assert main(["autotune", str(tmp_path / "nope.flow")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_the_html_report_draws_the_frontier(truth, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    cache, _ = truth
    spec, plan, results, report = (tmp_path / name for name in ("open.flow", "plan.json", "r.json", "r.html"))
    spec.write_text(OPEN)
    assert main(["compile", str(spec), "-o", str(plan)]) == 0
    assert main(["autotune", str(spec), "--space", "max_batched_tokens=128,256,512,1024",
                 "--space", "max_seqs=4,8,16,32", "--cache-dir", str(cache), "-o", str(results)]) == 0
    assert main(["viz", str(plan), "-o", str(report), "--autotune", str(results)]) == 0
    page = report.read_text()
    frontier = AutotuneResult.from_json(results.read_text()).pareto
    assert "id='autotune-pareto'" in page and "<svg" in page[page.index("id='autotune-pareto'"):]
    table = page[page.index("<table class='pareto'>"):]
    table = table[:table.index("</table>")]
    assert table.count("<tr>") == len(frontier) + 1
    for t in frontier:
        assert flowc.autotune.describe(t.config) in table
    capsys.readouterr()
    assert main(["viz", str(plan), "--format", "dot", "--autotune", str(results)]) == 2
    assert main(["viz", str(plan), "-o", str(report), "--autotune", str(plan)]) == 2
    assert "is not a flowc autotune result" in capsys.readouterr().err


def test_flowc_autotune_is_callable_and_holds_the_api():
    import flowc.autotune as module

    assert flowc.autotune is module and callable(flowc.autotune)
    assert flowc.autotune.AutotuneResult is AutotuneResult


def test_an_offline_batch_autotunes_on_its_throughput(tmp_path):
    text = (Path(__file__).resolve().parents[1] / "examples" / "tiny-cpu.flow").read_text()
    text = text.replace("arrival poisson 4 req/s", "arrival batch\n  requests 40 req").replace(
        "serve chat-tiny under relaxed", "serve chat-tiny under relaxed\n  objective max throughput")
    result = flowc.autotune(text, space={"router": ["round_robin", "least_work"]}, cache_dir=tmp_path)
    assert [t.status for t in result.trials] == ["ok", "ok"]
    for t in result.trials:  # one instance: both routers give the plan's own batch throughput
        assert t.metrics.goodput_rps == pytest.approx(t.plan.deployments[0].predicted.goodput_rps, rel=1e-9)
