"""Which tensor, pipeline and expert parallel degrees a model can take.

The one rule that the checker (on a spec's search lists), the optimizer (on the shapes it
enumerates), `flowc.estimate`, the plan verifier and the runtime all apply:

* tp splits the attention heads evenly, and the KV heads split or replicate whole (tp divides
  kv_heads, or kv_heads divides tp; MLA's latent is not split by heads); it splits the MLP's
  columns evenly too (the dense FFN and shared experts over tp, each routed expert's FFN over
  tp / ep), as engines' column-parallel layers require;
* pp splits the layers evenly;
* ep > 1 needs a mixture-of-experts model; it divides the experts and the TP degree (whole
  experts are spread over groups of the instance's TP ranks: ep <= tp, see the cost model).

And one rule of the hardware (`domain_problem`): a TP group stays inside one link domain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

from flowc.compiler.spec import Model

Knob = Literal["tp", "pp", "ep"]
# The checker's code for each knob; the verifier reports every one as F0523.
CODES = {"tp": "F0401", "pp": "F0402", "ep": "F0403"}


@dataclass(frozen=True)
class Problem:
    """Why a degree is not possible for a model: the knob, a message, how to fix it, and a
    short label for the value's span in a diagnostic."""

    knob: Knob
    message: str
    help: str
    label: str = "uneven split"
    code: str = ""  # left out: the knob's code (CODES)

    def __post_init__(self):
        if not self.code:
            object.__setattr__(self, "code", CODES[self.knob])


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _splits_heads(m: Model, tp: int) -> bool:
    return m.heads % tp == 0 and (m.mla is not None or m.kv_heads % tp == 0 or tp % m.kv_heads == 0)


def _dense_ffn(m: Model) -> int:
    """Columns of the MLP every rank splits over tp: the dense FFN, or an MoE model's shared
    experts (its dense layers' FFN too, when it has some)."""
    if m.moe is None:
        return m.ffn
    shared = m.moe.shared_experts * m.moe.expert_ffn
    return math.gcd(shared, m.ffn) if m.moe.dense_layers else shared


def _splits_ffn(m: Model, tp: int, ep: int = 1) -> bool:
    if _dense_ffn(m) % tp:
        return False
    return m.moe is None or tp % ep != 0 or m.moe.expert_ffn % (tp // ep) == 0


def valid_tp(m: Model) -> list[int]:
    """TP degrees that split the attention heads (KV heads split or replicate whole) and the MLP
    evenly."""
    return [t for t in divisors(m.heads) if _splits_heads(m, t) and _splits_ffn(m, t)]


def valid_ep(m: Model, tp: int) -> list[int]:
    """EP degrees possible with `tp`: 1, and for an MoE model the common divisors of its
    experts and tp."""
    if m.moe is None:
        return [1]
    return [e for e in divisors(tp) if m.moe.experts % e == 0]


def problems(m: Model, tp: int = 1, pp: int = 1, ep: int = 1) -> list[Problem]:
    """Everything that rules out running `m` at tp x pp with expert parallelism ep (empty: it
    can run). Degrees below 1 are problems of their own knob and nothing else is checked."""
    degrees: tuple[tuple[Knob, int], ...] = (("tp", tp), ("pp", pp), ("ep", ep))
    low = [Problem(knob, f"{knob} {value} is not a degree of parallelism", f"use {knob} 1 or more", "below 1")
           for knob, value in degrees if value < 1]
    if low:
        return low
    found = []
    if not _splits_heads(m, tp):
        found.append(Problem("tp", f"tp {tp} cannot split {m.name}'s {m.heads} attention heads ({m.kv_heads} KV heads)",
                             "tensor parallel degrees for this model: " + ", ".join(map(str, valid_tp(m)))))
    elif not _splits_ffn(m, tp, ep):
        columns = m.moe.expert_ffn if m.moe is not None and _dense_ffn(m) % tp == 0 else _dense_ffn(m)
        found.append(Problem("tp", f"tp {tp} cannot split {m.name}'s MLP of {columns} columns evenly",
                             "tensor parallel degrees for this model: " + ", ".join(map(str, valid_tp(m)))))
    if m.layers % pp:
        found.append(Problem("pp", f"pp {pp} cannot split {m.name}'s {m.layers} layers evenly",
                             "pipeline degrees for this model: " + ", ".join(map(str, divisors(m.layers)))))
    if ep > 1:
        if m.moe is None:
            found.append(Problem("ep", f"ep {ep} needs a mixture-of-experts model; {m.name} is dense",
                                 "remove `ep` or set it to 1", "no experts"))
        elif m.moe.experts % ep or tp % ep:
            found.append(Problem("ep", f"ep {ep} cannot split {m.name}'s {m.moe.experts} experts over tp {tp}: "
                                 "it must divide both", "expert parallel degrees with tp "
                                 f"{tp}: " + ", ".join(map(str, valid_ep(m, tp)))))
    return found


def domain_problem(tp: int, domain: int, where: str = "a link domain") -> Optional[Problem]:
    """F0404 when a TP group of `tp` GPUs cannot stay inside one link domain of `domain` GPUs
    (`where` names the domain in the message), else None. Tensor parallelism exchanges
    activations at every layer, so its group runs over the fast link only, never the network."""
    if tp <= domain:
        return None
    return Problem("tp", f"tp {tp} is larger than {where} ({domain} GPUs)",
                   f"tensor parallelism stays inside one domain: use tp <= {domain}, with pp across nodes",
                   "does not fit a domain", code="F0404")
