"""Disaggregated serving (runtime/disagg.py): prefill and decode instances in one process give
the colocated engine's and transformers' greedy tokens, also when the decode pool makes
requests wait; the KV layout check; blocks freed on the acknowledgement; aborts while the KV
moves; `flowc run` on a disaggregated plan file."""

from __future__ import annotations

import copy
import itertools
import json
import os
import signal
from pathlib import Path

import pytest
from runtime_models import hf_greedy, sample_prompts, tiny_spec

import flowc.cli
from flowc.compiler.optimize.instance_plan import instance_plan
from flowc.compiler.plan import GpuRef, Instance, NodeGroupShape, Plan
from flowc.compiler.plan_io import plan_problems
from flowc.runtime import open_plan
from flowc.runtime.disagg import DisaggregatedEngine
from flowc.runtime.engine import Engine, EngineError, Request, TokenEvent
from flowc.runtime.instance_process import RemoteInstance
from flowc.runtime.kv_transport import InProcessTransport, check_layouts, kv_layout
from flowc.runtime.sequence import SamplingParams

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
SPEC = tiny_spec("llama")
MAX_TOKENS = [20, 12, 16, 20, 9, 24, 14, 18]
SETTINGS = dict(max_batched_tokens=32, chunk_size=16, max_seqs=4)


def disaggregated_plan(prefill: int = 1, decode: int = 1, prefill_settings=None, decode_settings=None) -> Plan:
    """One deployment: a prefill group of `prefill` instances and a decode group of `decode`, each
    instance on GPUs of its own, tp x pp of them (instance_plan's groups, re-placed)."""
    gpus = itertools.count()
    groups = []
    for role, count, settings in (("prefill", prefill, prefill_settings), ("decode", decode, decode_settings)):
        group = instance_plan(SPEC, role=role, **(settings or {})).deployments[0].groups[0]
        instances = [Instance(gpus=[GpuRef(node=0, index=next(gpus)) for _ in range(group.tp * group.pp)])
                     for _ in range(count)]
        groups.append(group.model_copy(update={"instances": instances}))
    base = instance_plan(SPEC, role="prefill")
    deployment = base.deployments[0].model_copy(update={"groups": groups})
    cluster = [NodeGroupShape(gpu="local", gpus=next(gpus), count=1)]
    plan = base.model_copy(update={"deployments": [deployment], "clusters": {"local": cluster}})
    assert plan_problems(plan) == []
    return plan


@pytest.fixture(scope="module")
def llama(saved):
    return saved("llama")


@pytest.fixture(scope="module")
def expected(llama):
    """transformers' greedy tokens of the sample prompts, and the colocated engine's."""
    prompts = sample_prompts(SPEC.vocab)
    with Engine.from_plan(instance_plan(SPEC, **SETTINGS, kv_blocks=16), llama) as engine:
        colocated = [o.output_token_ids for o in engine.generate(_requests())]
    reference = hf_greedy(llama, prompts, MAX_TOKENS)
    assert colocated == reference
    return reference


def _requests() -> list[Request]:
    return [Request(p, SamplingParams(max_tokens=n), request_id=f"r{i}")
            for i, (p, n) in enumerate(zip(sample_prompts(SPEC.vocab), MAX_TOKENS))]


def _run(engine: DisaggregatedEngine, check_blocks: bool = True) -> tuple[dict, list[TokenEvent], int]:
    """Every sample request through add_request/poll: outputs, events, and the most prefilled
    requests that waited at once for room on a decode instance (`check_blocks`: each instance's
    block books checked after every poll, for instances in this process)."""
    outputs = {r.request_id: engine.add_request(r) for r in _requests()}
    events, most_waiting = [], 0
    while engine.has_work():
        events += engine.poll()
        most_waiting = max(most_waiting, engine.num_waiting_for_decode)
        for e in engine.prefill + engine.decode if check_blocks else ():
            e.block_manager.check()
    return outputs, events, most_waiting


def _idle(engine: DisaggregatedEngine) -> bool:
    return all(e.block_manager.num_used == 0 and not e.has_work() for e in engine.prefill + engine.decode)


@pytest.mark.parametrize("prefill", [1, 2])
def test_greedy_matches_colocated_and_transformers(llama, expected, prefill):
    # the longest request needs 6 blocks of the decode pool's 8: requests wait for room there
    plan = disaggregated_plan(prefill, 1, SETTINGS, {**SETTINGS, "kv_blocks": 8})
    with DisaggregatedEngine.from_plan(plan, llama) as engine:
        outputs, events, most_waiting = _run(engine)
        assert _idle(engine)
        if prefill == 2:  # round robin: both prefilled, and kept full blocks in their prefix caches
            assert all(e.block_manager.num_cached > 0 for e in engine.prefill)
        again = engine.generate(_requests())  # the batch API, on a warm prefix cache
    assert most_waiting > 0, "the decode pool was meant to make prefilled requests wait"
    assert [outputs[f"r{i}"].output_token_ids for i in range(8)] == expected
    assert [o.output_token_ids for o in again] == expected
    # where each was served: the prefill instances in turn, then the one decode instance
    assert plan.deployments[0].instance_labels() == [f"prefill {k}" for k in range(prefill)] + ["decode 0"]
    assert [o.instances for o in again] == [(f"prefill {i % prefill}", "decode 0") for i in range(8)]
    for request_id, output in outputs.items():
        mine = [e for e in events if e.request_id == request_id]
        assert [e.token_id for e in mine] == output.output_token_ids
        assert [e.index for e in mine] == list(range(len(mine)))
        assert [e.finish_reason for e in mine] == [None] * (len(mine) - 1) + ["length"]
        assert output.arrival_time < output.first_token_time <= output.finish_time


@pytest.mark.parametrize("processes", [False, True])
def test_seeded_sampling_goes_on_where_the_prefill_left_it(llama, processes):
    params = SamplingParams(max_tokens=12, temperature=0.9, top_k=20, top_p=0.9, seed=1234)
    requests = [Request(p, params, request_id=f"s{i}") for i, p in enumerate(sample_prompts(SPEC.vocab, n=3))]
    with Engine.from_plan(instance_plan(SPEC, **SETTINGS), llama) as engine:
        colocated = [o.output_token_ids for o in engine.generate(requests)]
    plan = disaggregated_plan(1, 1, SETTINGS, SETTINGS)
    with DisaggregatedEngine.from_plan(plan, llama, processes=processes) as engine:
        # the output shows each token as its event comes, on the decode instance too
        seen = {}
        for event in engine.stream(requests):
            output = engine._live.get(event.request_id)
            if output is not None:
                assert output.output_token_ids[event.index] == event.token_id
            seen.setdefault(event.request_id, []).append(event.token_id)
        disaggregated = [seen[f"s{i}"] for i in range(3)]
    assert disaggregated == colocated and all(len(tokens) == 12 for tokens in colocated)


def test_mismatched_kv_layouts_are_refused(llama):
    plan = disaggregated_plan(1, 1, {"block_size": 16}, {"block_size": 8, "kv_blocks": 128})
    with pytest.raises(EngineError, match=r"block_size 16 vs 8.*same model, KV dtype \(and --dtype\), block_size, tp"):
        DisaggregatedEngine.from_plan(plan)
    plan = instance_plan(SPEC)
    with Engine.from_plan(plan) as fp32, Engine.from_plan(plan, dtype="bf16") as bf16:
        check_layouts(kv_layout(fp32), kv_layout(fp32))
        with pytest.raises(EngineError, match="dtype fp32 vs bf16"):
            check_layouts(kv_layout(fp32), kv_layout(bf16))
    with pytest.raises(EngineError, match="open_plan"):  # Engine still runs one colocated instance
        Engine.from_plan(disaggregated_plan())


class HeldTransport(InProcessTransport):
    """The in-process transport with a gate: while `hold` names "acks" (or "deliveries"), those
    wait in the transport, as they would on a slow link. `sent`: the request ids sent."""

    def __init__(self):
        super().__init__()
        self.hold: set[str] = set()
        self.sent: list[str] = []

    def send(self, transfer, blocks):
        self.sent.append(transfer.request_id)
        super().send(transfer, blocks)

    def recv(self, consumer):
        return [] if "deliveries" in self.hold else super().recv(consumer)

    def acks(self, producer):
        return [] if "acks" in self.hold else super().acks(producer)


def test_prefill_blocks_are_freed_only_after_the_ack(llama, expected):
    transport = HeldTransport()
    transport.hold.add("acks")
    plan = disaggregated_plan(1, 1, {"max_batched_tokens": 64})
    prompt, n = sample_prompts(SPEC.vocab)[1], MAX_TOKENS[1]  # 45 tokens: 3 blocks, 2 of them full
    with DisaggregatedEngine.from_plan(plan, llama, transport=transport) as engine:
        [producer], [consumer] = engine.prefill, engine.decode
        output = engine.add_request(Request(prompt, SamplingParams(max_tokens=n), request_id="a"))
        engine.poll()  # the prefill, the transfer, the first decode step; the ack waits
        assert len(output.output_token_ids) == 2
        for _ in range(3):
            assert producer.block_manager.num_used == 3 and producer.has_work()
            assert consumer.block_manager.num_used == 3
            engine.poll()
        transport.hold.clear()
        engine.poll()  # the ack: the producer lets its blocks go, full ones into its prefix cache
        bm = producer.block_manager
        assert (bm.num_used, bm.num_cached, bm.num_free) == (0, 2, bm.num_blocks - 2)
        assert not producer.has_work()
        while engine.has_work():
            engine.poll()
        assert _idle(engine)
        assert transport.sent == ["a"]
        [alone] = engine.generate([Request(prompt, SamplingParams(max_tokens=1), request_id="alone")])
        assert alone.output_token_ids == expected[1][:1] and alone.finish_reason == "length"
        assert transport.sent == ["a"] and _idle(engine)  # done at its first token: its KV never moved
    assert output.output_token_ids == expected[1] and output.finish_reason == "length"


def test_abort_while_the_kv_is_on_its_way(llama, expected):
    transport = HeldTransport()
    transport.hold.add("deliveries")
    plan = disaggregated_plan(1, 1, {"max_batched_tokens": 64})
    prompts = sample_prompts(SPEC.vocab)
    with DisaggregatedEngine.from_plan(plan, llama, transport=transport) as engine:
        [producer], [consumer] = engine.prefill, engine.decode
        gone = engine.add_request(Request(prompts[1], SamplingParams(max_tokens=MAX_TOKENS[1]), request_id="gone"))
        events = engine.poll()
        assert events == [TokenEvent("gone", gone.output_token_ids[0], 0)]  # the first token, from the prefill
        # waiting for its KV: blocks reserved, neither running nor queued
        sched = consumer.scheduler
        assert sched.has_work() and not sched.running and not sched.waiting and consumer.block_manager.num_used == 3
        assert producer.block_manager.num_used == 3  # it keeps its blocks until the ack
        assert engine.abort("gone") is gone and gone.finish_reason == "abort"
        assert producer.block_manager.num_used == 0 and consumer.block_manager.num_used == 0
        assert engine.abort("gone") is None
        transport.hold.clear()
        kept = engine.add_request(Request(prompts[3], SamplingParams(max_tokens=MAX_TOKENS[3]), request_id="kept"))
        while engine.has_work():
            events += engine.poll()
        assert _idle(engine)
    mine = [e for e in events if e.request_id == "gone"]
    assert mine[1:] == [TokenEvent("gone", None, 1, "abort")]  # exactly one final event
    assert gone.output_token_ids == [mine[0].token_id] == expected[1][:1]
    assert kept.output_token_ids == expected[3] and kept.finish_reason == "length"


@pytest.mark.parametrize("where", ["waiting for room", "ack on its way"])
def test_abort_while_waiting_for_a_decode_slot_or_for_the_ack(llama, expected, where):
    transport = HeldTransport()
    if where == "ack on its way":
        transport.hold.add("acks")
    # one sequence at a time on the decode instance: the second prefilled request waits for it
    plan = disaggregated_plan(1, 1, {"max_batched_tokens": 128}, {"max_seqs": 1})
    prompts = sample_prompts(SPEC.vocab)
    with DisaggregatedEngine.from_plan(plan, llama, transport=transport) as engine:
        [producer], [consumer] = engine.prefill, engine.decode
        first = engine.add_request(Request(prompts[1], SamplingParams(max_tokens=MAX_TOKENS[1]), request_id="first"))
        second = engine.add_request(Request(prompts[3], SamplingParams(max_tokens=MAX_TOKENS[3]),
                                            request_id="second"))
        events = engine.poll()  # both prefilled (45 + 70 tokens: 3 + 5 blocks); first moves on
        assert [e.request_id for e in events] == ["first", "second", "first"]
        acked = where == "waiting for room"  # first's 3 blocks went at once
        assert engine.num_waiting_for_decode == 1 and producer.block_manager.num_used == 5 + 3 * (not acked)
        victim = "second" if where == "waiting for room" else "first"
        engine.abort(victim)
        assert producer.block_manager.num_used == (0 if victim == "second" else 5)
        if victim == "first":  # its decode slot is free: second moves on in the next poll
            assert consumer.block_manager.num_used == 0
        transport.hold.clear()
        while engine.has_work():
            events += engine.poll()
        assert _idle(engine)
    mine = [e for e in events if e.request_id == victim]
    assert mine[-1] == TokenEvent(victim, None, len(mine) - 1, "abort")
    assert [e.finish_reason for e in mine[:-1]] == [None] * (len(mine) - 1)
    survivor, index = (first, 1) if victim == "second" else (second, 3)
    assert survivor.output_token_ids == expected[index] and survivor.finish_reason == "length"


@pytest.mark.parametrize("processes", [[], ["--processes"]])
def test_flowc_run_runs_a_disaggregated_plan_file(capsys, llama, expected, tmp_path, processes):
    plan = tmp_path / "plan.json"
    plan.write_text(disaggregated_plan(2, 1, SETTINGS, {**SETTINGS, "kv_blocks": 8}).model_dump_json())
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"r{i}", "prompt_token_ids": p, "max_tokens": n}) + "\n"
                               for i, (p, n) in enumerate(zip(sample_prompts(SPEC.vocab), MAX_TOKENS))))
    code = flowc.cli.main(["run", str(plan), "--weights", str(llama), "--prompts", str(prompts), *processes])
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["output_token_ids"] for line in lines] == expected
    assert all(line["ttft_ms"] > 0 and line["finish_reason"] == "length" for line in lines)
    assert "ran 8 requests" in err
    with open_plan(instance_plan(SPEC)) as engine:  # a colocated plan still gets the colocated engine
        assert type(engine) is Engine
    colocated = tmp_path / "colocated.json"
    colocated.write_text(instance_plan(SPEC).model_dump_json())
    assert flowc.cli.main(["run", str(colocated), "--prompts", str(prompts), "--processes"]) == 1
    assert "is colocated; processes of their own are for the prefill and decode instances" in capsys.readouterr().err


def test_flowc_run_replays_a_disaggregated_plan(capsys, tmp_path):
    """examples/tiny-cpu.flow on two CPU cores, compiled, its instance split into a prefill and a
    decode instance (the compiler keeps this tiny load colocated)."""
    spec = tmp_path / "tiny-cpu.flow"
    text = (ROOT / "examples" / "tiny-cpu.flow").read_text()
    spec.write_text(text.replace("gpu cpu-local x 1", "gpu cpu-local x 2"))
    compiled = tmp_path / "plan.json"
    assert flowc.cli.main(["compile", str(spec), "-o", str(compiled)]) == 0
    document = json.loads(compiled.read_text())
    deployment = document["deployments"][0]
    [group] = deployment["groups"]
    assert group["role"] == "colocated" and len(group["instances"]) == 1
    decode = copy.deepcopy(group)
    decode["instances"][0]["gpus"][0]["index"] = 1
    deployment["groups"] = [{**group, "role": "prefill"}, {**decode, "role": "decode"}]
    deployment["mode"] = "disaggregated"
    plan = tmp_path / "disaggregated.json"
    plan.write_text(json.dumps(document))
    capsys.readouterr()
    code = flowc.cli.main(["--json", "run", str(plan), "--replay", "--requests", "6", "--time-scale", "0.1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(out)
    assert report["requests"] == 6 and report["errors"] == []
    for metric in ("ttft_ms", "tpot_ms"):
        assert report[metric]["measured"]["mean"] > 0 and report[metric]["predicted"]["p50"] > 0
    assert report["output_tokens_per_s"]["measured"] > 0
    # per instance: the prefill instance's TTFT and the decode instance's TPOT, each over all 6
    # requests (one of each), measured next to predicted
    rows = {row["instance"]: row for row in report["instances"]}
    assert sorted(rows) == ["decode 0", "prefill 0"]
    assert (rows["prefill 0"]["metric"], rows["decode 0"]["metric"]) == ("ttft", "tpot")
    assert all(row["requests"] == 6 and row["measured_p50_ms"] > 0 and row["predicted_p50_ms"] > 0
               for row in rows.values())
    assert rows["prefill 0"]["measured_p50_ms"] == pytest.approx(report["ttft_ms"]["measured"]["p50"])
    code = flowc.cli.main(["--no-color", "run", str(plan), "--replay", "--requests", "6", "--time-scale", "0.1"])
    out, _ = capsys.readouterr()
    assert code == 0 and "per instance: p50 of what it serves" in out and "prefill 0" in out


# A slow device (1 GFLOP/s) and a tight TPOT: prefills would stall the decodes, so the compiler
# splits the two GPUs into a prefill and a decode instance.
SLOW_SPEC = """use std.links
use std.models

gpu slow-cpu {
  vendor cpu
  memory 1 GiB
  memory_bandwidth 2 GB/s
  flops fp32 1 GFLOP/s
  flops bf16 1 GFLOP/s
  interconnect cpu-memory
  host_link cpu-memory
}

cluster box {
  node x 1 {
    gpu slow-cpu x 2
  }
}

workload chat {
  arrival poisson 0.5 req/s
  prompt uniform(300 tok, 480 tok)
  output uniform(16 tok, 31 tok)
}

slo tight {
  ttft p90 <= 10 s
  tpot p90 <= 20 ms
}

deploy tiny {
  model tiny-llama { weights fp32; kv fp32 }
  on box
  serve chat under tight
  tp in [1]
  pp in [1]
  allow disaggregation
}
"""


@pytest.mark.parametrize("processes", [False, True])
def test_a_compiled_disaggregated_plan_gives_the_colocated_tokens(tmp_path, capsys, processes):
    (tmp_path / "slow.flow").write_text(SLOW_SPEC)
    assert flowc.cli.main(["compile", str(tmp_path / "slow.flow"), "-o", str(tmp_path / "plan.json")]) == 0
    capsys.readouterr()
    with open_plan(tmp_path / "plan.json", seed=3, processes=processes) as engine:
        assert isinstance(engine, DisaggregatedEngine)
        assert engine.plan.instance_labels() == ["prefill 0", "decode 0"]
        vocab = engine.config.vocab
        requests = [Request(p, SamplingParams(max_tokens=n)) for p, n in zip(sample_prompts(vocab), MAX_TOKENS)]
        disaggregated = engine.generate(requests)
    colocated = instance_plan(engine.plan.model_spec, max_batched_tokens=512, max_seqs=8)
    with Engine.from_plan(colocated, seed=3) as single:
        expected = [o.output_token_ids for o in single.generate(requests)]
    assert [o.output_token_ids for o in disaggregated] == expected
    assert all(o.instances == ("prefill 0", "decode 0") for o in disaggregated)


def test_instances_in_processes_of_their_own_give_the_same_tokens(llama, expected):
    # 2 prefill + 1 decode instance, each in a process, the KV moving over gloo; the decode pool
    # makes prefilled requests wait, and an abort while prefilling frees the request there
    plan = disaggregated_plan(2, 1, SETTINGS, {**SETTINGS, "kv_blocks": 8})
    prompts = sample_prompts(SPEC.vocab)
    with DisaggregatedEngine.from_plan(plan, llama, processes=True) as engine:
        assert all(isinstance(e, RemoteInstance) for e in engine.prefill + engine.decode)
        outputs, events, most_waiting = _run(engine, check_blocks=False)
        gone = engine.add_request(Request(prompts[0], SamplingParams(max_tokens=30), request_id="gone"))
        assert engine.abort("gone") is gone and gone.finish_reason == "abort"
        again = engine.generate(_requests())
        assert not engine.has_work() and engine.kv_transfers == 16 and engine.kv_bytes > 0
    assert most_waiting > 0
    assert [outputs[f"r{i}"].output_token_ids for i in range(8)] == expected
    assert [o.output_token_ids for o in again] == expected
    # round robin: "gone" took prefill instance 0's turn
    assert [o.instances for o in again] == [(f"prefill {(i + 1) % 2}", "decode 0") for i in range(8)]
    for request_id, output in outputs.items():
        mine = [e for e in events if e.request_id == request_id]
        assert [e.token_id for e in mine] == output.output_token_ids
        assert output.arrival_time < output.first_token_time <= output.finish_time


@pytest.mark.parametrize("fault", ["dies", "hangs"])
def test_an_instance_process_that_fails_ends_its_requests_and_the_others_keep_serving(llama, expected, fault):
    plan = disaggregated_plan(2, 1, SETTINGS, SETTINGS)
    with DisaggregatedEngine.from_plan(plan, llama, processes=True, timeout_s=5) as engine:
        outputs = {r.request_id: engine.add_request(r) for r in _requests()}  # r0, r2, ... on prefill 0
        engine.poll()
        # mid-run: some requests prefilled and moved on, some not yet
        os.kill(engine.prefill[0].process.pid, signal.SIGKILL if fault == "dies" else signal.SIGSTOP)
        events = []
        while engine.has_work():
            events += engine.poll()
        failed = {rid for rid, o in outputs.items() if o.error}
        assert failed and failed <= {f"r{i}" for i in range(0, 8, 2)}  # only prefill 0's requests
        for rid in failed:
            assert outputs[rid].finish_reason == "abort"
            why = "exited (exit code -9)" if fault == "dies" else "did not answer for 5 s"
            assert f"instance prefill 0 failed: instance process 0 {why}" in outputs[rid].error
            assert [e.finish_reason for e in events if e.request_id == rid][-1] == "abort"
        for i in range(8):
            if f"r{i}" not in failed:  # served to the end, the KV of those that had left prefill 0 too
                assert outputs[f"r{i}"].output_token_ids == expected[i]
        after = engine.generate(_requests())  # new requests go to prefill 1
    assert [o.output_token_ids for o in after] == expected
    assert {o.instances for o in after} == {("prefill 1", "decode 0")}


@pytest.mark.parametrize("layout", [{"tp": 2}, {"pp": 2}])
def test_instances_of_several_ranks_run_in_processes_of_their_own(llama, expected, layout):
    # each instance's KV is spread over its two ranks (KV heads, or stages of uneven layers):
    # gathered from the prefill instance's ranks, scattered over the decode instance's
    plan = disaggregated_plan(1, 1, {**SETTINGS, **layout}, {**SETTINGS, **layout})
    with pytest.raises(EngineError, match="run each instance in a process of its own"):
        DisaggregatedEngine.from_plan(plan, llama)
    with DisaggregatedEngine.from_plan(plan, llama, processes=True, share_cores=True) as engine:
        outputs = engine.generate(_requests())
        assert engine.kv_transfers == 8
    assert [o.output_token_ids for o in outputs] == expected
