"""The engine under load and faults: benchmarks/soak_engine.py's soak (random lengths, waves
submitted while it runs, invalid requests, aborts, abandoned streams, a KV pool small enough
that preemption is routine; see its docstring for every invariant it checks). A few hundred
requests by default; the 10,000-request soak with `-m slow`."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from flowc.runtime.scheduler import Scheduler

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "soak_engine.py"


@pytest.fixture(scope="module")
def soak_engine():
    spec = importlib.util.spec_from_file_location("soak_engine", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak_engine"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the script runs: a tiny model's steps only lose time to more threads
    yield module
    torch.set_num_threads(threads)
    del sys.modules["soak_engine"]


def test_a_short_soak_holds_every_invariant(soak_engine):
    report = soak_engine.soak(200, seed=0)
    assert report.failures == [] and report.ok
    # it did exercise what it checks
    assert report.requests == 200 and report.valid + report.invalid == 200 and report.invalid > 0
    assert set(report.cancelled) == {"waiting", "running", "preempted", "stream closed"}
    assert report.completed > 0 and report.stopped > 0
    assert report.preemptions >= report.preempted_requests > 0 and report.alone_checked > 0
    assert report.pool.startswith("whole")


def test_the_soak_catches_blocks_an_abort_does_not_free(soak_engine, monkeypatch):
    abort = Scheduler.abort

    def leaky_abort(self, request_id):
        seq = self._by_id.get(request_id)
        held = list(seq.block_ids) if seq is not None else []
        for block in held:  # one reference too many: the blocks never come back
            self.block_manager._ref[block] += 1
        return abort(self, request_id)

    monkeypatch.setattr(Scheduler, "abort", leaky_abort)
    report = soak_engine.soak(60, seed=0)
    assert not report.ok
    assert any("ref counts differ" in f for f in report.failures)


@pytest.mark.slow
def test_a_soak_of_ten_thousand_requests(soak_engine):
    report = soak_engine.soak(10_000, seed=0)
    assert report.failures == [] and report.ok
    assert report.completed > 5_000 and report.preempted_requests > 1_000
