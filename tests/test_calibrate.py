"""`flowc calibrate`: the overhead fit, the profile it writes, and the cost model's use of it."""

from __future__ import annotations

import random

import pytest

import flowc
import flowc.cli
from flowc.calibrate import FIT_KINDS, OVERHEAD_KINDS, Profile, calibrate, fit_overheads, wake_overhead
from flowc.compiler.frontend.fmt import format_source
from flowc.compiler.frontend.library import stdlib_spec
from flowc.compiler.model.cost import CostModel, Parallelism
from flowc.compiler.source import SourceFile
from flowc.compiler.spec import GPU, Link


def test_the_fit_recovers_known_overheads_and_drops_negative_terms():
    rng = random.Random(0)
    truth = {"step": 3e-4, "layer": 5e-5, "sequence": 0.0, "token": 2e-6, "layer_token": 4e-6}
    kernel = lambda layers, shape: 1e-5 * layers + 1e-7 * shape[0]  # noqa: E731  (a one-line stand-in kernel)
    samples = []
    for _ in range(60):
        layers, tokens, seqs = rng.choice((2, 6)), rng.randint(1, 500), rng.randint(1, 48)
        shape = (tokens, 0, seqs, 0, seqs)
        seconds = (kernel(layers, shape) + truth["step"] + truth["layer"] * layers + truth["token"] * tokens
                   + truth["layer_token"] * layers * tokens)
        samples.append((layers, shape, seconds))
    overheads, error = fit_overheads(samples, kernel)
    for kind in FIT_KINDS:
        assert overheads[kind] == pytest.approx(truth[kind], abs=1e-9)
    assert error < 1e-6


def test_the_fit_drops_each_shapes_stalled_repeats():
    # five runs of each shape; one of each is slowed 10x by "a background process"
    truth = {"step": 0.0, "layer": 1e-4, "sequence": 0.0, "token": 1e-5, "layer_token": 0.0}
    kernel = lambda layers, shape: 0.0  # noqa: E731  (a one-line stand-in kernel)
    samples = []
    for layers in (2, 6):
        for tokens in (1, 16, 128, 480):
            seconds = truth["layer"] * layers + truth["token"] * tokens
            shape = (tokens, 0, 1, 0, 1)
            samples += [(layers, shape, seconds)] * 4 + [(layers, shape, 10 * seconds)]
    overheads, error = fit_overheads(samples, kernel)
    for kind in FIT_KINDS:
        assert overheads[kind] == pytest.approx(truth[kind], abs=1e-9)
    assert error < 1e-6


def test_the_wake_overhead_is_the_typical_extra_time_of_a_step_after_idling():
    busy, woken = [], []
    for i, tokens in enumerate((1, 16, 128, 480)):
        shape = (tokens, 0, 1, 0, 1)
        busy += [(2, shape, 1e-3 * tokens)] * 5
        # 2e-4 extra after idling, but one shape reads 5e-4 (the median over shapes ignores it)
        woken += [(2, shape, 1e-3 * tokens + (5e-4 if i == 0 else 2e-4))] * 5
    assert wake_overhead(busy, woken) == pytest.approx(2e-4)
    assert wake_overhead(woken, busy) == 0.0  # never negative
    assert wake_overhead(busy, []) == 0.0


def test_the_cost_model_adds_the_declared_overheads_exactly():
    spec = stdlib_spec()
    model, gpu = spec.models["llama-3.1-8b"], spec.gpus["h100-sxm"]
    link = spec.links[gpu.interconnect]
    overheads = {"step": 1e-3, "layer": 2e-5, "sequence": 3e-6, "token": 4e-7, "layer_token": 5e-8}
    # a GPU's own overheads replace its engine's: zero ones leave the kernels alone
    plain = CostModel(model, gpu.model_copy(update={"overheads": {"step": 0.0}}), link, parallelism=Parallelism(pp=2))
    loaded = CostModel(model, gpu.model_copy(update={"overheads": overheads}), link, parallelism=Parallelism(pp=2))
    for tokens, pairs, decodes, keys in ((1, 0, 1, 100), (300, 5000, 40, 9000), (512, 40000, 0, 0)):
        rows = decodes + (1 if pairs else 0)
        extra = 1e-3 + 2e-5 * model.layers / 2 + 3e-6 * rows + (4e-7 + 5e-8 * model.layers / 2) * tokens
        assert loaded.step_time(tokens, pairs, decodes, keys) - plain.step_time(tokens, pairs, decodes, keys) \
            == pytest.approx(extra, rel=1e-12)
        parts = loaded.breakdown(tokens, pairs, decodes, keys)
        assert parts["overhead"] == pytest.approx(extra, rel=1e-12)
        assert sum(parts.values()) == pytest.approx(loaded.step_time(tokens, pairs, decodes, keys), rel=1e-9)


def test_a_profile_is_a_spec_the_checker_accepts(tmp_path):
    profile = Profile(name="box-cpu", device="test", vendor="cpu", memory=3 * 2**30,
                      flops={"fp32": 2.0e11, "bf16": 9.0e11}, memory_bandwidth=4.0e10, link_bandwidth=2.5e9,
                      link_latency=3.0e-4, overheads={"step": 1e-4, "layer": 2.5e-4, "sequence": 5e-6, "token": 1.4e-5,
                                                        "layer_token": 4e-6, "wake": 3e-4})
    text = profile.to_flow()
    assert format_source(SourceFile("profile.flow", text)) == text  # `flowc fmt --check` passes
    (tmp_path / "profile.flow").write_text(text)
    spec = flowc.load(tmp_path / "profile.flow")
    gpu = spec.gpus["box-cpu"]
    assert gpu.vendor == "cpu" and gpu.memory == 3 * 2**30
    assert gpu.flops == {"fp32": pytest.approx(2.0e11), "bf16": pytest.approx(9.0e11)}
    assert gpu.memory_bandwidth == pytest.approx(4.0e10)
    assert gpu.overheads == {k: pytest.approx(v, rel=1e-2) for k, v in profile.overheads.items()}
    link = spec.links[gpu.interconnect]
    assert link.bandwidth == pytest.approx(2.5e9) and link.latency == pytest.approx(3.0e-4)


def test_calibrate_measures_this_machine():
    pytest.importorskip("torch")
    profile = calibrate(name="here", repeats=1, collectives=False)
    assert profile.vendor in ("cpu", "nvidia") and profile.steps > 50
    assert all(v > 0 for v in profile.flops.values()) and profile.memory_bandwidth > 0
    assert set(profile.overheads) == set(OVERHEAD_KINDS) and all(v >= 0 for v in profile.overheads.values())
    # the engine does take time outside its kernels: the fit must find some
    assert sum(profile.overheads.values()) > 0
    gpu = GPU(name="here", vendor=profile.vendor, memory=profile.memory, memory_bandwidth=profile.memory_bandwidth,
              flops=profile.flops, interconnect="l", host_link="l", overheads=profile.overheads)
    assert CostModel(stdlib_spec().models["tiny-llama"], gpu, Link(name="l", kind="memory", bandwidth=1e10)
                     ).step_time(1, 0, 1, 10) > 0


def test_cli_writes_a_profile(tmp_path, capsys):
    pytest.importorskip("torch")
    out = tmp_path / "p.flow"
    assert flowc.cli.main(["calibrate", "--out", str(out), "--name", "my-cpu", "--repeats", "1",
                           "--memory-gib", "1"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert flowc.load(out).gpus["my-cpu"].memory == 2**30
    assert flowc.cli.main(["calibrate", "--name", "bad name"]) == 2
