"""Request sampling: distributions against their parameters, clipping, arrival processes, traces."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flowc.compiler import spec
from flowc.compiler.model.traces import read_trace
from flowc.compiler.model.workload import Requests, fixed_requests, sample_requests

AZURE_CONV = Path("/work/shared/traces/azure_llm_2023_conv.csv")


def workload(arrival=None, prompt=None, output=None, **kw) -> spec.Workload:
    return spec.Workload(name="w", arrival=arrival or spec.Arrival(kind="poisson", rate=10.0),
                         prompt=prompt or spec.Lengths(kind="fixed", value=100),
                         output=output or spec.Lengths(kind="fixed", value=10), **kw)


N = 40_000


def test_lengths_match_their_distribution_parameters():
    w = workload(prompt=spec.Lengths(kind="lognormal", median=1024, sigma=0.6),
                 output=spec.Lengths(kind="normal", mean=300, std=50))
    r = sample_requests(w, N, seed=1)
    # median of a lognormal: standard error ~ 1.25 sigma median / sqrt(n) ~ 0.4%
    assert abs(np.median(r.prompt) / 1024 - 1) < 0.02
    assert abs(np.log(r.prompt).std() - 0.6) < 0.01
    assert abs(r.output.mean() - 300) < 1.5  # std error 50/200 = 0.25
    assert abs(r.output.std() - 50) < 1.5
    w = workload(prompt=spec.Lengths(kind="uniform", low=10, high=20), output=spec.Lengths(kind="fixed", value=7))
    r = sample_requests(w, N, seed=2)
    assert r.prompt.min() == 10 and r.prompt.max() == 20  # both ends included
    assert abs(r.prompt.mean() - 15) < 0.05
    assert (r.output == 7).all()
    assert r.prompt.dtype == np.int64 and r.output.dtype == np.int64


def test_lengths_are_clipped_to_min_max_and_at_least_one_token():
    w = workload(prompt=spec.Lengths(kind="lognormal", median=1000, sigma=1.5, min=200, max=3000),
                 output=spec.Lengths(kind="normal", mean=0, std=10))
    r = sample_requests(w, N, seed=3)
    assert r.prompt.min() == 200 and r.prompt.max() == 3000
    # P(X > 3000) for a lognormal(1000, 1.5) is 1 - Phi(ln 3 / 1.5) = 0.232
    assert abs((r.prompt == 3000).mean() - 0.232) < 0.01
    assert r.output.min() == 1
    assert abs((r.output == 1).mean() - 0.5596) < 0.01  # every draw below 1.5 (rounds to <= 1): Phi(0.15)


def test_poisson_gamma_and_constant_arrivals():
    r = sample_requests(workload(spec.Arrival(kind="poisson", rate=5.0)), N, seed=4)
    gaps = np.diff(r.arrival)
    assert r.arrival[0] == 0 and (gaps >= 0).all()
    assert abs(gaps.mean() * 5 - 1) < 0.02
    assert abs(gaps.std() / gaps.mean() - 1) < 0.02
    for cv in (0.5, 2.0, 4.0):
        r = sample_requests(workload(spec.Arrival(kind="gamma", rate=5.0, cv=cv)), N, seed=5)
        gaps = np.diff(r.arrival)
        assert abs(gaps.mean() * 5 - 1) < 0.05, cv
        assert abs(gaps.std() / gaps.mean() / cv - 1) < 0.06, cv
    r = sample_requests(workload(spec.Arrival(kind="constant", rate=4.0)), 9, seed=6)
    np.testing.assert_allclose(r.arrival, np.arange(9) / 4.0)


def test_rate_scale_compresses_the_same_draws():
    w = workload(spec.Arrival(kind="gamma", rate=2.0, cv=3.0),
                 prompt=spec.Lengths(kind="lognormal", median=500, sigma=1))
    a = sample_requests(w, 1000, seed=7)
    b = sample_requests(w, 1000, seed=7, rate_scale=4.0)
    np.testing.assert_allclose(b.arrival, a.arrival / 4.0)
    np.testing.assert_array_equal(a.prompt, b.prompt)
    c = sample_requests(w, 1000, seed=8)
    assert not np.array_equal(a.prompt, c.prompt)
    np.testing.assert_array_equal(sample_requests(w, 1000, seed=7).prompt, a.prompt)  # deterministic per seed


def test_how_many_requests():
    assert len(sample_requests(workload(), seed=0)) == 1000
    assert len(sample_requests(workload(requests=123), seed=0)) == 123
    assert len(sample_requests(workload(requests=123), 50, seed=0)) == 50
    r = sample_requests(workload(spec.Arrival(kind="poisson", rate=20.0), duration=500.0), seed=0)
    assert r.arrival.max() < 500.0
    assert abs(len(r) - 10_000) < 4 * 100  # Poisson count: sd sqrt(10000)
    fast = sample_requests(workload(spec.Arrival(kind="poisson", rate=20.0), duration=500.0), seed=0, rate_scale=2.0)
    assert abs(len(fast) - 20_000) < 4 * 142
    np.testing.assert_allclose(fast.arrival[: len(r) // 2], r.arrival[: len(r) // 2] / 2)


def write_trace(path: Path, rows) -> Path:
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    lines += [f"2023-11-16 18:15:{s:010.7f},{p},{o}" for s, p, o in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_trace_rows_stay_aligned_when_arrivals_come_from_the_same_trace(tmp_path):
    rows = [(46.6805900, 374, 44), (50.9951690, 396, 109), (51.0, 879, 0), (55.25, 91, 12)]
    path = str(write_trace(tmp_path / "t.csv", rows))
    w = workload(spec.Arrival(kind="trace", trace=path), spec.Lengths(kind="trace", trace=path),
                 spec.Lengths(kind="trace", trace=path))
    r = sample_requests(w, seed=0)
    np.testing.assert_allclose(r.arrival, [0.0, 4.314579, 4.31941, 8.56941], atol=1e-6)
    assert r.prompt.tolist() == [374, 396, 879, 91]
    assert r.output.tolist() == [44, 109, 1, 12]  # 0 generated tokens becomes 1
    # rate_scale compresses time; more requests than rows repeats the trace after its span + one mean gap
    np.testing.assert_allclose(sample_requests(w, seed=0, rate_scale=2.0).arrival, r.arrival / 2)
    long = sample_requests(w, 10, seed=0)
    gap = 8.56941 / 3
    np.testing.assert_allclose(long.arrival[4:8], r.arrival + 8.56941 + gap, atol=1e-6)
    assert long.prompt.tolist()[:8] == [374, 396, 879, 91] * 2
    # with another arrival process the column is resampled
    w = workload(spec.Arrival(kind="poisson", rate=1.0), spec.Lengths(kind="trace", trace=path, max=800))
    r = sample_requests(w, 4000, seed=0)
    assert set(r.prompt.tolist()) == {374, 396, 800, 91}
    assert abs((r.prompt == 800).mean() - 0.25) < 0.03


@pytest.mark.skipif(not AZURE_CONV.is_file(), reason="the shared Azure trace is not here")
def test_the_azure_conversation_trace():
    path = str(AZURE_CONV)
    trace = read_trace(AZURE_CONV)
    w = workload(spec.Arrival(kind="trace", trace=path), spec.Lengths(kind="trace", trace=path),
                 spec.Lengths(kind="trace", trace=path))
    r = sample_requests(w, seed=0)
    # The README says 19,365 requests; the file holds 19,366 rows (its last line has no newline,
    # which `wc -l` does not count).
    assert len(r) == len(trace.arrivals) == 19_366
    assert r.prompt.mean() == pytest.approx(np.mean(trace.prompt))
    assert r.output.mean() == pytest.approx(np.mean(trace.output))  # every row has >= 1 output token
    assert r.arrival[-1] == pytest.approx(trace.arrivals[-1])


def test_fixed_requests_and_validation():
    r = fixed_requests(5, 100, 20)
    assert (r.arrival == 0).all() and (r.prompt == 100).all() and (r.output == 20).all()
    np.testing.assert_allclose(fixed_requests(5, 100, 20, rate=2.0, poisson=False).arrival, [0, 0.5, 1, 1.5, 2])
    poisson = fixed_requests(20_000, 100, 20, rate=2.0, seed=3)
    assert abs(np.diff(poisson.arrival).mean() * 2 - 1) < 0.03
    assert abs(np.diff(poisson.arrival).std() * 2 - 1) < 0.03
    np.testing.assert_array_equal(fixed_requests(50, 1, 1, rate=2.0, seed=3).arrival, poisson.arrival[:50])
    with pytest.raises(ValueError):
        Requests([1.0, 0.5], [1, 1], [1, 1])
    with pytest.raises(ValueError):
        Requests([0.0], [0], [1])
    with pytest.raises(ValueError):
        Requests([0.0, 1.0], [1], [1])
