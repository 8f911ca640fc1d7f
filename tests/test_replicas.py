"""Replicas: every instance of a colocated deployment behind the least-work router, with the
tokens of one instance, and `flowc run --replay` reporting each instance."""

from __future__ import annotations

import json
from pathlib import Path

from runtime_models import sample_prompts, tiny_spec

import flowc.cli
from flowc.compiler.optimize.instance_plan import instance_plan
from flowc.compiler.plan import GpuRef, Instance, NodeGroupShape
from flowc.compiler.plan_io import plan_problems
from flowc.runtime import open_plan
from flowc.runtime.engine import Engine, Request
from flowc.runtime.replicas import ReplicatedEngine
from flowc.runtime.sequence import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
MAX_TOKENS = [9, 3, 12, 5, 7, 2, 10, 4]


def two_instances(spec):
    base = instance_plan(spec, max_batched_tokens=64, max_seqs=8)
    group = base.deployments[0].groups[0]
    group = group.model_copy(update={"instances": [Instance(gpus=[GpuRef(node=0, index=i)]) for i in range(2)]})
    deployment = base.deployments[0].model_copy(update={"groups": [group]})
    plan = base.model_copy(update={"deployments": [deployment],
                                   "clusters": {"local": [NodeGroupShape(gpu="local", gpus=2, count=1)]}})
    assert plan_problems(plan) == []
    return plan


def test_replicas_route_by_least_work_and_keep_the_tokens():
    spec = tiny_spec("llama")
    prompts = sample_prompts(spec.vocab, n=len(MAX_TOKENS))
    requests = [Request(p, SamplingParams(max_tokens=n)) for p, n in zip(prompts, MAX_TOKENS)]
    with open_plan(two_instances(spec), seed=2) as engine:
        assert isinstance(engine, ReplicatedEngine)
        outputs = engine.generate(requests)
    with Engine.from_plan(instance_plan(spec, max_batched_tokens=64, max_seqs=8), seed=2) as single:
        assert [o.output_token_ids for o in outputs] == [o.output_token_ids for o in single.generate(requests)]
    # submitted together: each goes to the instance with the fewest tokens to compute so far
    load, expected = [0, 0], []
    for prompt, n in zip(prompts, MAX_TOKENS):
        k = min(range(2), key=load.__getitem__)
        load[k] += len(prompt) + n
        expected.append((f"colocated {k}",))
    assert [o.instances for o in outputs] == expected and len(set(expected)) == 2


def test_replay_of_replicas_reports_each_instance(tmp_path, capsys):
    text = (ROOT / "examples" / "tiny-cpu.flow").read_text().replace("gpu cpu-local x 1", "gpu cpu-local x 2")
    text = text.replace("  max_seqs in [32]\n", "  max_seqs in [32]\n  replicas in [2]\n")
    (tmp_path / "replicas.flow").write_text(text)
    assert flowc.cli.main(["compile", str(tmp_path / "replicas.flow"), "-o", str(tmp_path / "plan.json")]) == 0
    capsys.readouterr()
    code = flowc.cli.main(["--json", "run", str(tmp_path / "plan.json"), "--replay", "--requests", "8",
                           "--time-scale", "0.1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(out)
    rows = [(row["instance"], row["metric"]) for row in report["instances"]]
    assert rows == [("colocated 0", "ttft"), ("colocated 0", "tpot"), ("colocated 1", "ttft"), ("colocated 1", "tpot")]
    assert sum(row["requests"] for row in report["instances"][::2]) == 8
    assert all(row["predicted_p50_ms"] > 0 for row in report["instances"])
