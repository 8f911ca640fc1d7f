"""The plan verifier: an independent re-check of a plan against its spec, from first principles.

`verify_plan(plan, spec)` returns diagnostics (empty when the plan is sound) and raises nothing
for a bad plan (`flowc verify` is its command, in flowc/verify_cmd.py).

Independence: nothing here imports the optimizer (a test pins it); the verifier recomputes what
a plan claims from the spec with the shared models it must agree with: parallelism validity
(`model/parallelism.py`), the memory budget, the traffic of a plan (`model/traffic.py`), the
cost model and the simulator (`model/instance.py` builds a plan's instances).

Modules: `structure.py` (F0520-F0523), `memory.py` (F0524), `bandwidth.py` (F0525),
`predictions.py` (F0526), `context.py` (the state the checks share and the tolerances).

Checks, one code each (F052x: planning):

- F0520 the plan does not match the spec, or is malformed: format_version major, unknown
  deployment / cluster / model / GPU type, dtypes other than the spec deployment's, a spec
  deployment the plan leaves out, groups and roles that contradict the mode, scheduler
  values that are not positive (or a chunk above the token budget), knob values outside the
  deployment's `search` lists, or outside flowc's defaults for the scheduler knobs a spec leaves
  open (`model/search.knob_choices`; `replicas` counts the deployment's instances, all groups
  together), a recorded cluster (`Plan.clusters`) that is not the spec's, more GPUs than
  `max_gpus`, disaggregation not allowed. (A plan read from a file has passed
  `plan_io.plan_problems` before any of this.)
- F0521 a GPU reference outside the cluster (node beyond the expanded node groups, index
  beyond gpus_per_node), or a group's GPU type that is not the node's GPU.
- F0522 a GPU used twice (by two instances of any deployments, or twice in one instance).
- F0523 parallelism: GPUs per instance != tp x pp; a TP group (one stage) not inside one link
  domain of one node; stages on different nodes without a network; tp that does not split the
  heads (KV heads split or replicate whole), pp that does not split the layers, ep > 1 on a
  dense model or one that does not divide the experts and tp (model/parallelism.py).
- F0524 memory, per group against `memory_budget(model, gpu.memory, tp, pp,
  max_batched_tokens, max_seqs, block_size)`: capacity is the GPU's memory; weights on the GPU
  plus offloaded weights and experts equal the model's; KV blocks at most what fits in the
  usable memory left by the weights on the GPU, the model's activations and reserve (without
  offload: the budget's kv_blocks) plus the blocks offloaded as "kv", and they fit in
  `kv_cache`; reserve not below the model's; the
  categories sum to capacity, and what the engine takes (all but `free`) stays within the
  usable share (90%); the arena holds one step (`step_graph.layout_problems`: no two live
  buffers share bytes, none leaves the arena); an instance holds the workload's
  longest request (prompt + output; prefill instances the prompt) when it is bounded;
  offloaded bytes need `allow offload` and fit in each node's host memory (all deployments).
- F0525 bandwidth at the workload's rate (`model/traffic.py`): disaggregated KV traffic must
  fit the links: within one node each instance's GPUs' own links (GPUs x link bandwidth);
  across nodes the network (bandwidth x NICs per node, each direction, shared by every
  deployment); pipeline activation hops that cross nodes are charged to the network too.
- F0526 predictions. Claims first: percentiles are non-negative, attainment a share, a plan
  that meets the SLO claims a goodput of at least the workload's rate, goodput per GPU is
  goodput / GPUs. Then the deployment is re-simulated from the plan (see `simulate_plan_deployment`; a group
  with offloaded weights adds its memory map's `offload_step_s` to every step) on the
  workload sampled with seed `PREDICTION_SEED`: `meets_slo` must agree (unless the run is
  within `BORDERLINE` of a limit), and `meets_slo_pessimistic` with the run's latencies at the
  slow end of the plan's own `interval` (`model/intervals.pessimistic`), joint attainment
  within `ATTAINMENT_TOLERANCE`, p50 TTFT and TPOT within `TOLERANCE` (relative, or
  `ABS_TOLERANCE_MS`); the claimed goodput must not exceed the steady-state throughput of
  the same requests all queued at once by more than `TOLERANCE`, and must meet the SLO when
  simulated at (1 - TOLERANCE) of it.

Later checks of a deployment rely on earlier ones: memory, bandwidth and predictions are not
checked for a group or deployment whose structure failed (F0520, F0521, F0523), and
predictions only for a deployment with no other diagnostic, so one mistake gives one code.
"""

from __future__ import annotations

from flowc.compiler.diagnostics import Diagnostic
from flowc.compiler.plan import SUPPORTED_MAJOR, Plan, parse_format_version
from flowc.compiler.spec import Spec
from flowc.compiler.verify.bandwidth import check_bandwidth
from flowc.compiler.verify.context import (
    ABS_TOLERANCE_MS,
    ATTAINMENT_TOLERANCE,
    BORDERLINE,
    PREDICTION_SEED,
    TOLERANCE,
    DeploymentCheck,
    Verifier,
)
from flowc.compiler.verify.memory import check_host_memory, check_memory
from flowc.compiler.verify.predictions import check_predictions
from flowc.compiler.verify.structure import check_shared_gpus, check_spec_match, check_structure

__all__ = ["verify_plan", "TOLERANCE", "ABS_TOLERANCE_MS", "ATTAINMENT_TOLERANCE", "BORDERLINE", "PREDICTION_SEED"]


def verify_plan(plan: Plan, spec: Spec) -> list[Diagnostic]:
    """Every problem of `plan` against `spec` (see the module docstring), sorted by code; empty
    when the plan is sound."""
    v = Verifier(plan, spec)
    if parse_format_version(plan.format_version) is None:
        v.error("F0520", f"plan format_version `{plan.format_version}` is not supported "
                f"(this flowc reads {SUPPORTED_MAJOR}.x)",
                "compile the plan again with this flowc, or verify it with the flowc that wrote it",
                at="format_version")
        return v.out
    deps = [DeploymentCheck(i, dp) for i, dp in enumerate(plan.deployments)]
    seen: dict[str, int] = {}
    for dep in deps:
        name = dep.plan.name
        if name in seen:
            v.error("F0520", f"deployment `{name}` is planned twice (deployments[{seen[name]}] and "
                    f"deployments[{dep.index}])", "keep one plan per deployment",
                    at=f"deployments[{dep.index}]", dep=dep, structural=True)
            continue
        seen[name] = dep.index
    for name in spec.deployments:
        if name not in seen:
            v.error("F0520", f"the spec's deployment `{name}` has no plan",
                    "compile the plan again from this spec (a plan covers every deployment)",
                    at="deployments")
    for dep in deps:
        if dep.ok:
            check_spec_match(v, dep)
        if dep.ok:
            check_structure(v, dep)
    check_shared_gpus(v, deps)
    host: dict[tuple[str, int], list[tuple[str, int]]] = {}
    for dep in deps:
        if dep.checked:
            check_memory(v, dep, host)
    check_host_memory(v, deps, host)
    check_bandwidth(v, [dep for dep in deps if dep.ok])
    for dep in deps:
        if dep.ok and dep.clean:
            check_predictions(v, dep)
    return sorted(v.out, key=lambda d: d.code)
