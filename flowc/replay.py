"""Replaying a spec's workload on the flowc runtime, and comparing what it measured with what
the plan predicts (`flowc run --replay`, `flowc autotune --evaluator measure`, `flowc
calibrate`'s checks)."""

from __future__ import annotations


def replay_requests(workload, n: int, vocab: int, seed: int, context: int):
    """The spec's workload as engine requests: the compiler's sampled arrivals and lengths
    (clipped to the model's context), random prompt tokens, exact output lengths."""
    import numpy as np

    from flowc.compiler.model.workload import Requests, sample_requests
    from flowc.runtime.engine import Request
    from flowc.runtime.sequence import SamplingParams

    sampled = sample_requests(workload, n, seed=seed)
    prompt = np.minimum(sampled.prompt, context - 1)
    output = np.minimum(sampled.output, context - prompt)
    rng = np.random.default_rng(seed)
    requests = [Request(prompt_token_ids=rng.integers(0, vocab, int(p)).tolist(),
                        params=SamplingParams(max_tokens=int(o), ignore_eos=True), request_id=str(i),
                        arrival_time=float(a))
                for i, (a, p, o) in enumerate(zip(sampled.arrival, prompt, output))]
    return requests, Requests(sampled.arrival, prompt, output)


def replay_report(outputs, predicted, labels: list[str] | None = None) -> dict:
    """Measured vs predicted mean, p50 and p90 TTFT and TPOT (ms) and output throughput. With
    `labels` (`DeploymentPlan.instance_labels()`, the simulator's instance order) and outputs
    that name their instances (a run of several), also per instance: TTFT where requests were
    prefilled, TPOT where they were decoded (both on a colocated instance)."""
    import numpy as np

    done = [o for o in outputs if o.error is None and o.first_token_time is not None]
    ttft = np.array([o.ttft_s for o in done]) * 1e3
    tpot = np.array([o.tpot_s for o in done if o.tpot_s is not None]) * 1e3
    span = max(o.finish_time for o in done) - min(o.arrival_time for o in done) if done else 0.0
    tokens = sum(len(o.output_token_ids) for o in done)

    def stats(values, metric):
        measured = {"mean": float(values.mean()), "p50": float(np.percentile(values, 50)),
                    "p90": float(np.percentile(values, 90))} if len(values) else {}
        model = {"mean": predicted.mean(metric) * 1e3, "p50": predicted.percentile(metric, 50) * 1e3,
                 "p90": predicted.percentile(metric, 90) * 1e3}
        return {"measured": measured, "predicted": model}

    report = {"requests": len(outputs), "errors": [o.error for o in outputs if o.error],
              "ttft_ms": stats(ttft, "ttft"), "tpot_ms": stats(tpot, "tpot"),
              "output_tokens_per_s": {"measured": tokens / span if span > 0 else 0.0,
                                      "predicted": predicted.output_throughput}}
    if labels and any(o.instances for o in done):
        report["instances"] = _per_instance(done, predicted, labels)
    return report


def _per_instance(done, predicted, labels: list[str]) -> list[dict]:
    """Per instance: its requests, and the p50 of the metric it serves (a prefill instance's TTFT,
    a decode instance's TPOT), measured and predicted."""
    import numpy as np

    rows = []
    for index, label in enumerate(labels):
        role = label.split()[0]
        mine = [o for o in done if label in o.instances]
        # a prefill instance serves TTFT, a decode instance TPOT, a colocated instance both
        for metric in {"prefill": ("ttft",), "decode": ("tpot",)}.get(role, ("ttft", "tpot")):
            served_by = predicted.decode_instance if role == "decode" else predicted.instance
            values = np.array([v for v in (getattr(o, f"{metric}_s") for o in mine) if v is not None]) * 1e3
            model = getattr(predicted, metric)
            model = model[(served_by == index) & np.isfinite(model)] * 1e3
            rows.append({"instance": label, "metric": metric, "requests": len(mine),
                         "measured_p50_ms": float(np.percentile(values, 50)) if len(values) else None,
                         "predicted_p50_ms": float(np.percentile(model, 50)) if len(model) else None})
    return rows
