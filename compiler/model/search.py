"""A deployment's search space: the values of each knob it allows, with flowc's defaults for
the knobs its spec leaves open. The optimizer enumerates it, the checker's capacity checks
and `flowc.simulate`'s baseline take their settings from it.

Engine defaults (a single value: block size, sequence cap, chunk size) are the plan's
`Scheduler` defaults; what flowc searches beyond them is stated here.
"""

from __future__ import annotations

from typing import Optional

from flowc.compiler.model.parallelism import divisors, problems, valid_tp
from flowc.compiler.plan import Scheduler
from flowc.compiler.spec import Deployment, Model

# Token budgets tried when a spec leaves max_batched_tokens open: vLLM's default with chunked
# prefill (8192) and the smaller budget vLLM uses for latency-bound serving (2048), which bounds
# how long a prefill chunk stalls the decodes batched with it.
DEFAULT_BATCHED_TOKENS = (2048, 8192)
_DEFAULTS = Scheduler()


def tp_choices(d: Deployment) -> list[int]:
    return [tp for tp in d.search.get("tp") or valid_tp(d.model) if not problems(d.model, tp=tp)]


def pp_choices(d: Deployment) -> list[int]:
    return [pp for pp in d.search.get("pp") or divisors(d.model.layers) if not problems(d.model, pp=pp)]


def default_ep(m: Model, tp: int) -> list[int]:
    """Expert parallelism a spec leaves open: every expert's FFN split over the TP ranks (ep 1),
    or whole experts spread across them (ep = tp) when the experts divide evenly."""
    if m.moe is None or tp == 1 or m.moe.experts % tp:
        return [1]
    return [1, tp]


def ep_choices(d: Deployment, tp: int) -> list[int]:
    """The EP degrees to try with `tp`: the spec's list (those the model can take at this tp) or
    `default_ep`."""
    return [ep for ep in d.search.get("ep") or default_ep(d.model, tp) if not problems(d.model, tp=tp, ep=ep)]


def replica_choices(d: Deployment) -> Optional[tuple[int, ...]]:
    """Instance counts the deployment allows (all groups and roles together); None: any."""
    allowed = d.search.get("replicas")
    return tuple(allowed) if allowed else None


def _values(d: Deployment, knob: str, default: int) -> list[int]:
    return d.search.get(knob) or [default]


def batched_token_choices(d: Deployment) -> list[int]:
    return d.search.get("max_batched_tokens") or list(DEFAULT_BATCHED_TOKENS)


def scheduler_choices(d: Deployment) -> list[Scheduler]:
    """Every scheduler setting the deployment allows: token budgets x sequence caps x block
    sizes x prefill chunks (a chunk at most the budget; open: as large as the budget)."""
    return [Scheduler(max_batched_tokens=budget, max_seqs=seqs, block_size=block, chunk_size=chunk)
            for budget in batched_token_choices(d)
            for seqs in _values(d, "max_seqs", _DEFAULTS.max_seqs)
            for block in _values(d, "block_size", _DEFAULTS.block_size)
            for chunk in d.search.get("chunk_size") or [budget] if chunk <= budget]


def knob_choices(d: Deployment, tp: int) -> dict[str, list[int]]:
    """The values of every knob of one instance group the deployment allows (its ep at `tp`): the
    spec's lists, else flowc's defaults. A chunk size left open is the token budget."""
    return {"tp": tp_choices(d), "pp": pp_choices(d), "ep": ep_choices(d, tp),
            "max_batched_tokens": batched_token_choices(d), "max_seqs": _values(d, "max_seqs", _DEFAULTS.max_seqs),
            "block_size": _values(d, "block_size", _DEFAULTS.block_size)}


def roomiest_scheduler(d: Deployment) -> Scheduler:
    """The allowed setting that leaves the most memory for KV: the smallest token budget,
    sequence cap and block size (what the capacity checks size instances with)."""
    return Scheduler(max_batched_tokens=min(batched_token_choices(d)),
                     max_seqs=min(_values(d, "max_seqs", _DEFAULTS.max_seqs)),
                     block_size=min(_values(d, "block_size", _DEFAULTS.block_size)))


def baseline_scheduler(d: Deployment) -> Scheduler:
    """The setting of `flowc.simulate`'s baseline: each knob at the engine default when the
    spec allows it, else at the spec's first value (a pinned knob is always respected)."""
    def pick(knob: str, default: int) -> int:
        allowed = d.search.get(knob)
        return default if not allowed or default in allowed else allowed[0]

    budget = pick("max_batched_tokens", _DEFAULTS.max_batched_tokens)
    chunks = [c for c in d.search.get("chunk_size", []) if c <= budget]
    return Scheduler(max_batched_tokens=budget, max_seqs=pick("max_seqs", _DEFAULTS.max_seqs),
                     block_size=pick("block_size", _DEFAULTS.block_size), chunk_size=chunks[0] if chunks else budget)
