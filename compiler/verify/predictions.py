"""Predictions (F0526): the plan's claims are well formed, and they follow from its
configuration when the deployment is re-simulated (`model/instance.simulate_plan_deployment`)."""

from __future__ import annotations

import math

from flowc.compiler.model.goodput import steady_throughput
from flowc.compiler.model.instance import simulate_plan_deployment
from flowc.compiler.model.intervals import pessimistic
from flowc.compiler.verify.context import (
    ABS_TOLERANCE_MS,
    ATTAINMENT_TOLERANCE,
    BORDERLINE,
    BORDERLINE_SHARE,
    TOLERANCE,
    DeploymentCheck,
    Verifier,
)


def check_predictions(v: Verifier, dep: DeploymentCheck) -> None:
    dp, d = dep.plan, dep.spec
    at = f"deployments[{dep.index}].predicted"
    where = f"deployment `{dp.name}`"
    pred = dp.predicted
    rate = v.rate(d.workload)

    def fail(message: str, help: str, sub: str = "", notes=()) -> None:
        v.error("F0526", f"{where}: {message}", help, at=at + sub, notes=notes, dep=dep)

    for name, p in (("ttft_ms", pred.ttft_ms), ("tpot_ms", pred.tpot_ms), ("e2e_ms", pred.e2e_ms)):
        values = (p.p50, p.p90, p.p99)
        if any(math.isnan(x) or x < 0 for x in values):
            fail(f"predicted {name} percentiles {p.p50:g}, {p.p90:g}, {p.p99:g} are not non-negative numbers",
                 "compile the plan again", sub=f".{name}")
            return
    if not 0.0 <= pred.attainment <= 1.0:
        fail(f"predicted attainment {pred.attainment:g} is not a share in [0, 1]", "compile the plan again",
             sub=".attainment")
        return
    if pred.meets_slo and pred.goodput_rps < rate * (1 - 1e-9):
        fail(f"the plan claims to meet slo `{d.slo}` at {rate:g} req/s but predicts a goodput of only "
             f"{pred.goodput_rps:g} req/s", "a plan that meets the SLO at the workload's rate has at least that "
             "goodput: compile the plan again", sub=".goodput_rps")
        return
    gpus = dp.gpus
    if gpus and not math.isclose(pred.goodput_rps_per_gpu, pred.goodput_rps / gpus, rel_tol=0.01, abs_tol=1e-9):
        fail(f"goodput per GPU {pred.goodput_rps_per_gpu:g} req/s is not goodput {pred.goodput_rps:g} req/s / "
             f"{gpus} GPUs", "compile the plan again", sub=".goodput_rps_per_gpu")
        return

    problem = simulated_problem(v, dep)
    if problem:
        message, help, sub, notes = problem
        fail(message, help, sub, notes)


def simulated_problem(v: Verifier, dep: DeploymentCheck):
    """The first prediction of the deployment its re-simulation contradicts, as (message, help,
    JSON path suffix, notes), or None."""
    dp, d = dep.plan, dep.spec
    pred = dp.predicted
    slo = v.spec.slos[d.slo]
    rate = v.rate(d.workload)
    requests = v.requests(d.workload, pred.requests)
    again = "compile the plan again: its predictions do not follow from its configuration"

    def run(reqs):
        return simulate_plan_deployment(v.spec, dep.plan, reqs)

    result = run(requests)
    meets = result.meets(slo)
    if meets != pred.meets_slo and not _borderline(result, slo):
        return (f"the plan says the SLO is {'met' if pred.meets_slo else 'missed'}; re-simulated, slo `{d.slo}` "
                f"is {'met' if meets else 'missed'} at {rate:g} req/s", again, ".meets_slo",
                (_attainment_note(result, slo),))
    if pred.meets_slo_pessimistic is not None:
        slow = pessimistic(result, pred.interval)
        if slow.meets(slo) != pred.meets_slo_pessimistic and not _borderline(slow, slo):
            said, found = ("met", "missed") if pred.meets_slo_pessimistic else ("missed", "met")
            return (f"the plan says the SLO is {said} at the slow end of its prediction interval; re-simulated, it "
                    f"is {found}", again, ".meets_slo_pessimistic", (_attainment_note(slow, slo),))
    share = result.attainment(slo)["joint"]["share"]
    if abs(share - pred.attainment) > ATTAINMENT_TOLERANCE:
        return (f"predicted attainment {pred.attainment:.1%}; re-simulated {share:.1%} (more than "
                f"{ATTAINMENT_TOLERANCE * 100:.0f} points apart)", again, ".attainment", ())
    for metric in ("ttft", "tpot"):
        ours = result.percentile(metric, 50) * 1e3
        theirs = getattr(pred, f"{metric}_ms").p50
        if math.isnan(ours) or (math.isinf(ours) and math.isinf(theirs)):
            continue  # no TPOT (one-token outputs), or over half the requests never served on both sides
        if math.isinf(ours) or abs(theirs - ours) > max(TOLERANCE * ours, ABS_TOLERANCE_MS):
            return (f"predicted p50 {metric.upper()} {theirs:.2f} ms; re-simulated {ours:.2f} ms (more than "
                    f"{TOLERANCE:.0%} apart)", again, f".{metric}_ms.p50", ())
    if v.spec.workloads[d.workload].is_batch:
        return _batch_problem(result, pred, slo)
    if pred.goodput_rps > rate and pred.goodput_rps > 0:
        capacity = steady_throughput(run(requests.all_at_once()))
        if pred.goodput_rps > capacity * (1 + TOLERANCE):
            return (f"predicted goodput {pred.goodput_rps:g} req/s, but the deployment completes at most "
                    f"{capacity:.3g} req/s of workload `{d.workload}` (re-simulated with every request queued)",
                    "compile the plan again: its goodput is overstated", ".goodput_rps", ())
        probe = pred.goodput_rps * (1 - TOLERANCE)
        if probe > rate:
            at_probe = run(requests.scaled(probe / rate))
            if not at_probe.meets(slo) and not _borderline(at_probe, slo):
                return (f"predicted goodput {pred.goodput_rps:g} req/s, but at {probe:.3g} req/s "
                        f"({1 - TOLERANCE:.0%} of it) the re-simulation misses slo `{d.slo}`",
                        "compile the plan again: its goodput is overstated", ".goodput_rps",
                        (_attainment_note(at_probe, slo),))
    return None


def _batch_problem(result, pred, slo):
    """A batch's claims: the time its requests take, and its throughput (requests / that time,
    0 when the SLO is missed)."""
    again = "compile the plan again: its predictions do not follow from its configuration"
    if pred.makespan_s is None or not math.isclose(pred.makespan_s, result.makespan, rel_tol=TOLERANCE):
        return (f"predicted batch time {pred.makespan_s} s; re-simulated {result.makespan:.4g} s (more than "
                f"{TOLERANCE:.0%} apart)", again, ".makespan_s", ())
    throughput = result.request_throughput if result.meets(slo) else 0.0
    if not math.isclose(pred.goodput_rps, throughput, rel_tol=TOLERANCE, abs_tol=1e-9):
        return (f"predicted batch throughput {pred.goodput_rps:g} req/s; re-simulated {throughput:.4g} req/s",
                again, ".goodput_rps", ())
    return None


def _attainment_note(result, slo) -> str:
    report = result.attainment(slo)
    parts = []
    for target in slo.targets:
        label = target.metric if target.percentile is None else f"{target.metric} p{target.percentile:g}"
        value = report[target.metric]["value"]
        for entry in report[target.metric]["targets"]:
            if entry["percentile"] == target.percentile and entry["limit"] == target.limit:
                value = entry["value"]
        parts.append(f"{label} {value * 1e3:.1f} ms (limit {target.limit * 1e3:g} ms)")
    parts.append(f"joint attainment {report['joint']['share']:.1%}"
                 + (f" (needs {slo.attainment:.0%})" if slo.attainment is not None else ""))
    return "re-simulated: " + ", ".join(parts)


def _borderline(result, slo) -> bool:
    """Whether the run is too close to a limit for meets_slo to be decided either way."""
    report = result.attainment(slo)
    for target in slo.targets:
        for entry in report[target.metric]["targets"]:
            if entry["limit"] != target.limit or entry["percentile"] != target.percentile:
                continue
            if target.percentile is not None:
                value = entry["value"]
                if math.isfinite(value) and abs(value - target.limit) <= BORDERLINE * target.limit:
                    return True
    needed = slo.attainment if slo.attainment is not None else None
    if needed is not None and abs(report["joint"]["share"] - needed) <= BORDERLINE_SHARE:
        return True
    return False
