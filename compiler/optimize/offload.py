"""Offload tier assignment: which share of each layer's weights (and of the MoE experts, and
optionally of the KV cache) lives in host memory and streams over the host link every step,
overlapped with compute (FlexGen, Sheng et al. 2023, reduced to one GPU's weight placement).

The planned GPU is one TP rank of the instance's last pipeline stage (it holds the LM head;
with pp = 1 it holds everything). Its weights are split into units, in execution order:
the embedding (pp = 1), each of its layers, and the LM head. For each unit u:

    variables   f_u in [0, 1]   share of u's non-expert weights kept in HBM
                e_u in [0, 1]   share of u's routed experts kept in HBM (MoE layers)
                g   in [0, 1]   share of the batch's KV cache kept in host memory (optional)
                s >= 0          the streaming buffer: the largest share streamed for one unit
                t_u >= 0        the unit's time in the step
    streamed    o_u = (1 - f_u) W_u + (1 - e_u) X_u  (+ g K_u for a layer's KV in a decode step)
    time        t_u >= c_u               compute of the unit (the cost model)
                t_u >= o_u / b           its transfer, b = the host link's effective bandwidth
                (max(compute, transfer), linearized: the transfer of a unit overlaps compute)
    HBM         sum_u (f_u W_u + e_u X_u) + (1 - g) K + 2 s + pinned <= budget
                s >= o_u for every streamed unit (double buffering: one unit's share is being
                computed on while the next one's arrives)
    host        (sum_u ((1 - f_u) W_u + (1 - e_u) X_u) + g K) x gpus <= host memory
    objective   minimize sum_u t_u of a decode step (+ prefill_weight x the prefill step's)

budget = usable HBM - activations - runtime reserve (memory.memory_budget; the activations
may be replaced by the packed arena); K, the running batch's KV cache (kv_tokens_needed
tokens, whole blocks), stays in HBM unless KV offload is allowed; pinned = the final norm.
The embedding is the exception among units: its offloaded rows are gathered on the host and
only the step's rows cross the link (llama.cpp keeps token embeddings on the CPU the same
way), so it streams rows x hidden x 2 / tp bytes per step and needs no streaming buffer
(`embedding_on_host=False` pins it in HBM instead, for a runtime without the host gather).
The LM head streams like a layer; it holds up to s for free, as the buffer is there anyway.

Experts: routing statistics are uniform in this model (every expert equally hot), so which
experts go to host memory does not matter; e_u says how many (`experts_offloaded`, rounded
up). A step streams the offloaded experts whole (prefetch: the layer's routing is not known
before its transfer must start); fetching only the experts the router picked would cost
less in decode but could not overlap the layer's own compute.

Solver: GLOP (pywraplp). The problem is a small continuous LP; GLOP solves it exactly (no
scaling of bytes into integers as CP-SAT would need) in milliseconds. Two solves: the step
time first, then, with the time held at its optimum, the least offloaded bytes (routed
experts first, then other weights, then KV), which also spreads the offload evenly over
identical layers (the streaming buffer shrinks) and offloads nothing when everything fits.

Units: GB and ms inside the LP (well scaled); bytes and seconds outside. The reported step
times evaluate the chosen shares with `Operators.host_transfer_time` (its latency included),
so they can exceed the LP's objective by that latency per streamed unit.

Compute c_u comes from the cost model: a layer's is the step time of a one-layer variant of
the model minus that of a zero-layer variant (which is the embedding, final norm and LM head),
per step kind: decode = min(max_seqs, kv_tokens_needed) sequences reading kv_tokens_needed
keys; prefill = one fresh chunk of max_batched_tokens. With pp > 1 the stage holds
ceil(layers / pp) layers (the last ones) and the whole LM head, slightly more than the even
split geometry.weight_bytes_per_rank charges every stage.

Not modelled: the first unit's transfer that nothing precedes (it overlaps the previous
step's tail in a steady state), contention of the TP ranks for a shared PCIe switch, host
memory bandwidth, pinned-memory limits, the decode step's new KV written back to offloaded
KV, and attention computed on the CPU (FlexGen's option for offloaded KV).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from flowc.compiler import spec
from flowc.compiler.model.cost import CostModel, Parallelism
from flowc.compiler.model.geometry import kv_bytes_per_token_per_rank, layer_weight_bytes
from flowc.compiler.model.memory import memory_budget
from flowc.compiler.model.operators import causal_pairs, operators
from flowc.compiler.plan import Scheduler
from flowc.compiler.spec import DTYPE_BYTES

__all__ = ["OffloadPlan", "OffloadInfeasible", "Shares", "Unit", "plan_offload", "solve_offload", "stage_units"]

GB = 1e9
MS = 1e-3


class OffloadInfeasible(ValueError):
    """The weights cannot be placed in HBM and host memory together."""


@dataclass(frozen=True)
class Unit:
    """An offloadable piece of the GPU's weights, run as one block in the step.

    `dense_bytes`: weights other than routed experts (attention, norms, router, dense MLP,
    shared experts; the embedding or LM head table); `expert_bytes`: routed experts;
    `kv_bytes`: the layer's KV cache of the batch (decode reads all of it);
    `kv_write_bytes`: KV the prefill step writes; `compute_decode`, `compute_prefill`: seconds
    of the unit in each step; `stream_share`: bytes crossing the link per offloaded byte (1 for
    streamed weights, rows / vocab for the host-gathered embedding); `staged`: whether the
    streamed share needs the HBM streaming buffer; `layer`: the model's layer index, or None."""

    name: str
    dense_bytes: float
    expert_bytes: float = 0.0
    kv_bytes: float = 0.0
    kv_write_bytes: float = 0.0
    compute_decode: float = 0.0
    compute_prefill: float = 0.0
    stream_share_decode: float = 1.0
    stream_share_prefill: float = 1.0
    staged: bool = True
    layer: Optional[int] = None

    @property
    def bytes(self) -> float:
        return self.dense_bytes + self.expert_bytes


@dataclass(frozen=True)
class OffloadPlan:
    """Where one GPU's weights live. Lists run over the layers the GPU holds (`layers` names
    them); fractions are shares kept in HBM: of the whole layer, of its non-expert weights, of
    its routed experts (1.0 for dense layers); `head_hbm_fraction` for the embedding and LM
    head. `offloaded` is bytes in host memory per GPU by category: "weights" (everything but
    routed experts), "experts", "kv". `staging_bytes`: HBM of the double-buffered streaming
    buffer. `step_time_decode` and `step_time_prefill`: seconds of one step of the stage with
    this placement; `transfer_bytes_*`: host-to-device bytes per step. `status`: "fits"
    (nothing to offload, no solve) or the LP's status ("OPTIMAL")."""

    layers: list[int]
    hbm_fraction: list[float]
    dense_hbm_fraction: list[float]
    expert_hbm_fraction: list[float]
    experts_offloaded: list[int]
    head_hbm_fraction: dict[str, float]
    kv_host_fraction: float
    offloaded: dict[str, int]
    staging_bytes: int
    hbm_budget: int
    step_time_decode: float
    step_time_prefill: float
    status: str
    transfer_bytes_decode: int = 0
    transfer_bytes_prefill: int = 0

    @property
    def offloaded_bytes(self) -> int:
        return sum(self.offloaded.values())


# ------------------------------------------------------------------------------ the LP itself


@dataclass(frozen=True)
class Shares:
    """The LP's answer: per unit, the share of non-expert weights (f) and of routed experts
    (e) kept in HBM; the share of the KV cache in host memory (g); the largest streamed unit in
    bytes (s; the streaming buffer holds two)."""

    f: list[float]
    e: list[float]
    g: float
    s: float
    status: str


def _stream(u: Unit, f: float, e: float, g: float, decode: bool) -> tuple[float, float]:
    """(host-to-device bytes, device-to-host bytes) of unit u in a step."""
    if decode:
        return (1 - f) * u.dense_bytes * u.stream_share_decode + (1 - e) * u.expert_bytes + g * u.kv_bytes, 0.0
    return (1 - f) * u.dense_bytes * u.stream_share_prefill + (1 - e) * u.expert_bytes, g * u.kv_write_bytes


def solve_offload(units: list[Unit], hbm_budget: float, host_capacity: float, bandwidth: float, *,
                  pinned_bytes: float = 0.0, kv_bytes: float = 0.0, allow_kv_offload: bool = False,
                  prefill_weight: float = 0.0, gpus: int = 1) -> Shares:
    """The LP of the module docstring on explicit units. `hbm_budget`: bytes for weights, KV
    and streaming buffers on the GPU; `host_capacity`: host bytes for the `gpus` GPUs that
    offload alike; `bandwidth`: effective host-link bytes/s; `kv_bytes`: the batch's KV on the
    GPU (sum of the units' kv_bytes). Raises OffloadInfeasible."""
    from ortools.linear_solver import pywraplp

    bw = bandwidth / GB * MS  # GB per ms
    solver = pywraplp.Solver.CreateSolver("GLOP")
    f = [solver.NumVar(0.0 if u.dense_bytes > 0 else 1.0, 1.0, f"f{i}") for i, u in enumerate(units)]
    e = [solver.NumVar(0.0, 1.0, f"e{i}") if u.expert_bytes > 0 else None for i, u in enumerate(units)]
    g = solver.NumVar(0.0, 1.0 if allow_kv_offload and kv_bytes > 0 else 0.0, "g")
    s = solver.NumVar(0.0, solver.infinity(), "s")
    td = [solver.NumVar(u.compute_decode / MS, solver.infinity(), f"td{i}") for i, u in enumerate(units)]
    tp = [solver.NumVar(u.compute_prefill / MS, solver.infinity(), f"tp{i}") for i, u in enumerate(units)] \
        if prefill_weight > 0 else []

    def expr(i: int, decode: bool):
        """(host-to-device GB, device-to-host GB) of unit i as linear expressions."""
        u = units[i]
        share = u.stream_share_decode if decode else u.stream_share_prefill
        h2d = (1 - f[i]) * (u.dense_bytes * share / GB)
        if e[i] is not None:
            h2d = h2d + (1 - e[i]) * (u.expert_bytes / GB)
        if decode:
            return h2d + g * (u.kv_bytes / GB), None
        return h2d, g * (u.kv_write_bytes / GB)

    resident = sum(f[i] * (u.dense_bytes / GB) + (e[i] * (u.expert_bytes / GB) if e[i] is not None else 0.0)
                   for i, u in enumerate(units))
    offloaded = sum((1 - f[i]) * (u.dense_bytes / GB) + ((1 - e[i]) * (u.expert_bytes / GB) if e[i] is not None
                                                         else 0.0) for i, u in enumerate(units))
    solver.Add(resident + (1 - g) * (kv_bytes / GB) + 2 * s + pinned_bytes / GB <= hbm_budget / GB)
    solver.Add((offloaded + g * (kv_bytes / GB)) * gpus <= host_capacity / GB)
    for i, u in enumerate(units):
        h2d_d, _ = expr(i, True)
        solver.Add(td[i] * bw >= h2d_d)
        if u.staged:
            solver.Add(s >= h2d_d)
            solver.Add(s >= expr(i, False)[0])
        if prefill_weight > 0:
            h2d_p, d2h_p = expr(i, False)
            solver.Add(tp[i] * bw >= h2d_p)
            solver.Add(tp[i] * bw >= d2h_p)
    step = sum(td) + (prefill_weight * sum(tp) if prefill_weight > 0 else 0.0)
    solver.Minimize(step)
    status = solver.Solve()
    if status != pywraplp.Solver.OPTIMAL:
        raise OffloadInfeasible(
            "the weights cannot be placed: HBM (with a double-buffered streaming buffer for the "
            "largest streamed unit) and host memory together are too small"
            if status == pywraplp.Solver.INFEASIBLE else f"the offload LP did not solve (status {status})")
    best = solver.Objective().Value()
    # second solve: least offloaded bytes at (numerically) the same step time
    solver.Add(step <= best * (1 + 1e-9) + 1e-9)
    experts_off = sum((1 - e[i]) * (u.expert_bytes / GB) for i, u in enumerate(units) if e[i] is not None)
    dense_off = sum((1 - f[i]) * (u.dense_bytes / GB) for i, u in enumerate(units))
    solver.Minimize(experts_off + 1.001 * dense_off + 1.002 * g * (kv_bytes / GB) + 1e-3 * s)
    status2 = solver.Solve()
    if status2 != pywraplp.Solver.OPTIMAL:  # the first solve's point is feasible here: numerical trouble
        raise OffloadInfeasible(f"the offload LP's second solve failed (status {status2})")
    return Shares([v.solution_value() for v in f], [v.solution_value() if v is not None else 1.0 for v in e],
                  g.solution_value(), s.solution_value() * GB, "OPTIMAL")


# ----------------------------------------------------------------------- units of a real model


def _variant(m: spec.Model, layers: int, dense_layers: int) -> spec.Model:
    """The model with `layers` layers, `dense_layers` of them dense (MoE models)."""
    update: dict = {"layers": layers}
    if m.moe is not None:
        update["moe"] = m.moe.model_copy(update={"dense_layers": dense_layers})
    return m.model_copy(update=update)


def stage_units(model: spec.Model, cost_layer: dict[str, CostModel], *, tp: int, pp: int, decode_seqs: int,
                kv_tokens: int, prefill_tokens: int, embedding_on_host: bool = True) -> tuple[list[Unit], float]:
    """The units of the last pipeline stage's GPU (every stage when pp = 1) and its pinned
    bytes (the final norm; the embedding too without `embedding_on_host`). `cost_layer`:
    cost models of the "base" (no layers: embedding, final norm, LM head), "dense" and "moe"
    single-layer variants; a layer's compute is its variant's step minus the base's."""
    m = model
    other = max(DTYPE_BYTES[m.weights], 2.0)
    n = -(-m.layers // pp)
    first = m.layers - n
    dense_b, moe_b, expert_b = layer_weight_bytes(m, tp)
    kv_layer = kv_bytes_per_token_per_rank(m, tp, 1) / m.layers  # one layer, one token
    pairs = causal_pairs(prefill_tokens, 0, m.sliding_window)
    keys = kv_tokens

    def times(c: CostModel) -> tuple[float, float]:
        return (c.step_time(decode_seqs, 0, decode_seqs, keys),
                c.step_time(prefill_tokens, pairs, 0, 0))

    base_d, base_p = times(cost_layer["base"])
    per_kind = {}
    for kind in ("dense", "moe"):
        if kind in cost_layer:
            d, p = times(cost_layer[kind])
            per_kind[kind] = (d - base_d, p - base_p)
    bd = cost_layer["base"].breakdown(decode_seqs, 0, decode_seqs, keys)
    bp = cost_layer["base"].breakdown(prefill_tokens, pairs, 0, 0)
    units: list[Unit] = []
    table = m.vocab * m.hidden / tp * other
    pinned = (2 * m.hidden if m.architecture == "gptj" else m.hidden) * other  # the final norm
    if pp == 1 and not m.tied_embeddings:
        if embedding_on_host:
            units.append(Unit("embedding", table, compute_decode=bd["embedding"], compute_prefill=bp["embedding"],
                              stream_share_decode=decode_seqs / m.vocab,
                              stream_share_prefill=prefill_tokens / m.vocab, staged=False))
        else:
            units.append(Unit("embedding", 0.0, compute_decode=bd["embedding"], compute_prefill=bp["embedding"],
                              staged=False))
            pinned += table
    dense_layers = m.moe.dense_layers if m.moe is not None else m.layers
    for layer in range(first, m.layers):
        kind = "dense" if layer < dense_layers else "moe"
        cd, cp = per_kind[kind]
        units.append(Unit(f"layer {layer}", dense_b if kind == "dense" else moe_b,
                          0.0 if kind == "dense" else expert_b, kv_bytes=kv_layer * kv_tokens,
                          kv_write_bytes=kv_layer * prefill_tokens, compute_decode=cd, compute_prefill=cp,
                          layer=layer))
    lm_bytes = table  # untied: the LM head; tied: the one table, used by both ends
    if m.architecture == "gptj":
        lm_bytes += m.vocab / tp * other  # the LM head bias
    head_d = base_d - (bd["embedding"] if pp == 1 and not m.tied_embeddings else 0.0)
    head_p = base_p - (bp["embedding"] if pp == 1 and not m.tied_embeddings else 0.0)
    units.append(Unit("lm_head", lm_bytes, compute_decode=head_d, compute_prefill=head_p))
    return units, pinned


def plan_offload(model: spec.Model, gpu: spec.GPU, host_link: spec.Link, host_memory_bytes: int, *, tp: int = 1,
                 pp: int = 1, scheduler: Scheduler = Scheduler(), kv_tokens_needed: int = 0,
                 cost: Optional[CostModel] = None, intra_link: Optional[spec.Link] = None,
                 activation_bytes: Optional[int] = None, allow_kv_offload: bool = False,
                 prefill_weight: float = 0.0, embedding_on_host: bool = True) -> OffloadPlan:
    """Place one GPU's weights (the last pipeline stage's, one TP rank) between HBM and host
    memory to minimize the decode step (plus `prefill_weight` x the prefill step).

    host_memory_bytes: host memory the instance may fill, shared equally by its tp x pp GPUs.
    kv_tokens_needed: KV tokens the running batch holds (kept in HBM, or partly in host
    memory with `allow_kv_offload`); the decode step runs min(scheduler.max_seqs,
    kv_tokens_needed) sequences reading all of them; the prefill step is one fresh chunk of
    scheduler.max_batched_tokens.
    cost: the instance's cost model (its links and EP degree are used); without it,
    `intra_link` (TP collectives; may be omitted at tp 1). activation_bytes: the activation
    arena, if known (default: memory.activation_peak_bytes through memory_budget)."""
    m = model
    if cost is not None:
        if cost.model != m or cost.gpu.name != gpu.name:
            raise ValueError(f"cost model is for {cost.model.name} on {cost.gpu.name}, not {m.name} on {gpu.name}")
        if cost.parallelism.tp != tp or cost.parallelism.pp != pp:
            raise ValueError(f"cost model is for tp {cost.parallelism.tp} pp {cost.parallelism.pp}, "
                             f"not tp {tp} pp {pp}")
        intra, inter, ep = cost.intra_link, cost.inter_link, cost.parallelism.ep
    else:
        if intra_link is None and tp > 1:
            raise ValueError("plan_offload needs `cost` or `intra_link` for tp > 1")
        intra, inter, ep = intra_link or host_link, None, 1
    budget = memory_budget(m, gpu.memory, tp=tp, pp=pp, ep=ep, scheduler=scheduler, vendor=gpu.vendor)
    activations = budget.activations if activation_bytes is None else activation_bytes
    kv_tokens = -(-kv_tokens_needed // scheduler.block_size) * scheduler.block_size
    kv_total = kv_tokens * budget.kv_bytes_per_token
    hbm_budget = budget.usable - activations - budget.reserve  # for weights, KV and streaming buffers
    gpus = tp * pp

    par = Parallelism(tp=tp, pp=1, ep=ep)
    costs = {"base": CostModel(_variant(m, 0, 0), gpu, intra, parallelism=par, inter_link=inter)}
    dense_layers = m.moe.dense_layers if m.moe is not None else m.layers
    n = -(-m.layers // pp)
    stage = range(m.layers - n, m.layers)
    if any(layer < dense_layers for layer in stage):
        costs["dense"] = CostModel(_variant(m, 1, 1), gpu, intra, parallelism=par, inter_link=inter)
    if any(layer >= dense_layers for layer in stage):
        costs["moe"] = CostModel(_variant(m, 1, 0), gpu, intra, parallelism=par, inter_link=inter)
    seqs = max(1, min(scheduler.max_seqs, kv_tokens_needed))
    units, pinned = stage_units(m, costs, tp=tp, pp=pp, decode_seqs=seqs, kv_tokens=max(kv_tokens_needed, seqs),
                                prefill_tokens=scheduler.max_batched_tokens, embedding_on_host=embedding_on_host)
    total = sum(u.bytes for u in units) + pinned
    host_share = host_memory_bytes / gpus
    gib = 2**30
    kv_in_hbm = 0 if allow_kv_offload else kv_total
    if hbm_budget < pinned + kv_in_hbm:
        raise OffloadInfeasible(
            f"{gpu.name}: activations ({activations / gib:.2f} GiB), runtime reserve ({budget.reserve / gib:.2f} GiB)"
            + (f" and the batch's KV cache ({kv_total / gib:.2f} GiB)" if kv_in_hbm else "")
            + f" leave no room for weights in {budget.usable / gib:.2f} GiB of usable HBM")
    if total + kv_total > hbm_budget + host_share:
        raise OffloadInfeasible(
            f"{m.name} needs {total / gib:.2f} GiB of weights per GPU (tp {tp}, pp {pp})"
            + (f" and {kv_total / gib:.2f} GiB of KV cache" if kv_total else "")
            + f"; HBM leaves {hbm_budget / gib:.2f} GiB after activations and the runtime reserve, and host "
            f"memory gives {host_share / gib:.2f} GiB per GPU: "
            f"{(total + kv_total - hbm_budget - host_share) / gib:.2f} GiB short")

    ops = operators(gpu)
    probe = 1 << 30  # the link's marginal seconds per byte, whatever host_transfer_time's form
    bandwidth = probe / (ops.host_transfer_time(2 * probe, host_link) - ops.host_transfer_time(probe, host_link))

    if total + kv_total <= hbm_budget:
        sol = Shares([1.0] * len(units), [1.0] * len(units), 0.0, 0.0, "fits")
    else:
        sol = solve_offload(units, hbm_budget, host_memory_bytes, bandwidth, pinned_bytes=pinned, kv_bytes=kv_total,
                            allow_kv_offload=allow_kv_offload, prefill_weight=prefill_weight, gpus=gpus)
    return _plan(m, units, sol, ops, host_link, kv_total, hbm_budget)


def _clean(x: float) -> float:
    """Snap LP noise: shares within 1e-9 of 0 or 1 are 0 or 1."""
    return 0.0 if x < 1e-9 else 1.0 if x > 1 - 1e-9 else x


def _plan(m: spec.Model, units: list[Unit], sol: Shares, ops, host_link: spec.Link, kv_total: float,
          hbm_budget: float) -> OffloadPlan:
    f = [_clean(x) for x in sol.f]
    e = [_clean(x) for x in sol.e]
    g = _clean(sol.g)
    step = {True: 0.0, False: 0.0}
    moved = {True: 0.0, False: 0.0}
    for i, u in enumerate(units):
        for decode in (True, False):
            h2d, d2h = _stream(u, f[i], e[i], g, decode)
            compute = u.compute_decode if decode else u.compute_prefill
            step[decode] += max(compute, ops.host_transfer_time(h2d, host_link), ops.host_transfer_time(d2h, host_link))
            moved[decode] += h2d
    layer_idx = [i for i, u in enumerate(units) if u.layer is not None]
    weights_off = sum((1 - f[i]) * u.dense_bytes for i, u in enumerate(units))
    experts_off = sum((1 - e[i]) * u.expert_bytes for i, u in enumerate(units))
    staging = max([_stream(u, f[i], e[i], g, d)[0] for i, u in enumerate(units) if u.staged for d in (True, False)],
                  default=0.0)
    experts = m.moe.experts if m.moe is not None else 0
    return OffloadPlan(
        layers=[units[i].layer for i in layer_idx],
        hbm_fraction=[(f[i] * units[i].dense_bytes + e[i] * units[i].expert_bytes) / units[i].bytes for i in layer_idx],
        dense_hbm_fraction=[f[i] for i in layer_idx],
        expert_hbm_fraction=[e[i] for i in layer_idx],
        experts_offloaded=[math.ceil((1 - e[i]) * experts - 1e-6) if units[i].expert_bytes else 0 for i in layer_idx],
        head_hbm_fraction={u.name: f[i] for i, u in enumerate(units) if u.layer is None},
        kv_host_fraction=g,
        # rounded up: less stays in HBM, so the rounded map keeps within the LP's budget
        offloaded={"weights": math.ceil(weights_off), "experts": math.ceil(experts_off),
                   "kv": int(round(g * kv_total))},
        staging_bytes=int(math.ceil(2 * staging)) if sol.status != "fits" else 0,
        hbm_budget=int(hbm_budget),
        step_time_decode=step[True],
        step_time_prefill=step[False],
        status=sol.status,
        transfer_bytes_decode=int(round(moved[True])),
        transfer_bytes_prefill=int(round(moved[False])),
    )
