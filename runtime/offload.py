"""Offloaded weights at run time: the plan's memory map says how many bytes of a GPU's weights
live in host memory, by the categories of compiler/optimize/offload.py ("weights": all but
routed experts, "experts": routed experts, "kv": KV cache, which this runtime does not stream);
this module picks which of the rank's parameters those are and streams them in.

The plan records totals, not the optimizer's per-unit shares, so the runtime places them by
its own rule, in the optimizer's units (the embedding, each layer, the LM head) and whole
matrices (a matrix feeds one GEMM as a whole):

- "weights": the embedding table first when it is a unit of its own (untied, first stage): its
  rows are gathered on the host and only the step's rows cross the link, the optimizer's
  cheapest bytes. The rest spreads evenly over the streamed units (layers and LM head; a tied
  table is the LM head's), the same bytes for each as far as its size allows (the optimizer
  sizes the streaming buffer by the largest unit's share); each unit offloads the subset of its
  matrices closest to its share plus the error carried so far, so the total stays within about
  one matrix of the plan's figure.
- "experts": the same even spread over the MoE layers' routed-expert matrices.

Device-resident bytes are then the plan's `MemoryMap.weights` within that tolerance. Host
parameters sit in (pinned, on CUDA) host memory; a streamed unit's parameters are views of one
of two staging slots on the device (double buffering), each the size of the largest unit's
streamed bytes, and the slot is filled before the unit runs. On CUDA the copies run on a side
stream ordered by events: unit j + 1's copy starts once unit j - 1 (the slot's previous user)
has computed, so it overlaps unit j's compute; on CPU it is a plain copy before the unit.

The model is built on the meta device and each parameter then allocated where it lives, so the
device never holds the whole rank's weights, even while they load.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn

from .model import CausalLM

__all__ = ["HOST_CATEGORIES", "OffloadedWeights", "offload_problem"]

HOST_CATEGORIES = ("weights", "experts")  # what the runtime keeps in host memory; "kv" is refused
ALIGN = 256  # bytes: each streamed matrix starts aligned in its slot, as GEMM kernels prefer


def offload_problem(offloaded: dict[str, int], pp: int) -> Optional[str]:
    """Why a memory map's host placement cannot run in this runtime, or None."""
    if not any(offloaded.values()):
        return None
    unknown = sorted(k for k, v in offloaded.items() if v and k not in HOST_CATEGORIES)
    if unknown:
        return (f"keeps {', '.join(unknown)} in host memory, which the flowc runtime does not stream (it streams "
                f"{' and '.join(HOST_CATEGORIES)}): compile with `forbid offload`")
    if pp > 1:  # the optimizer offloads single-stage instances only (optimize/offload.py)
        return "offloads weights of a pipeline-parallel instance, which flowc never plans: compile the spec again"
    return None


@dataclass
class _Unit:
    """One block of the forward in execution order: `key` is the layer's index in this rank's
    stage, or the number of layers for the LM head (`CausalLM.forward` passes it)."""

    key: int
    dense: list[str]  # candidate matrices (parameter names) of category "weights"
    experts: list[str]  # of category "experts"


def _closest(names: list[str], sizes: dict[str, int], target: float) -> list[str]:
    """The subset of `names` whose bytes are closest to `target` (few matrices per unit: brute force)."""
    subsets = (list(c) for r in range(len(names) + 1) for c in itertools.combinations(names, r))
    return min(subsets, key=lambda s: abs(sum(sizes[n] for n in s) - target))


def _spread(units: list[list[str]], sizes: dict[str, int], total: float) -> set[str]:
    """Matrices of `units` adding up to about `total` bytes, as even a number of bytes per unit
    as the units' sizes allow (the double-buffered slots hold the largest unit's: an even spread
    keeps them smallest, as the optimizer's buffer constraint does), the rounding error carried
    from unit to unit."""
    caps = [sum(sizes[n] for n in names) for names in units]
    left, share = min(total, sum(caps)), [0.0] * len(units)
    for k, i in enumerate(sorted(range(len(units)), key=caps.__getitem__)):  # water-filling, smallest first
        share[i] = min(caps[i], left / (len(units) - k))
        left -= share[i]
    chosen: set[str] = set()
    wanted = taken = 0.0
    for names, bytes_ in zip(units, share):
        wanted += bytes_
        pick = _closest(names, sizes, wanted - taken)
        taken += sum(sizes[n] for n in pick)
        chosen.update(pick)
    return chosen


class OffloadedWeights:
    """The host placement of one rank's parameters (see the module docstring). Build the model
    on the meta device, construct this (it allocates every parameter where it lives), load the
    weights, then `install` (the staging slots; the model streams from then on)."""

    def __init__(self, model: CausalLM, offloaded: dict[str, int], device: torch.device):
        self.model, self.device = model, torch.device(device)
        params = dict(model.named_parameters())  # a tied table once, under its first name
        self.sizes = {n: p.numel() * p.element_size() for n, p in params.items()}
        names = {id(p): n for n, p in params.items()}
        units = []
        for i, layer in enumerate(model.layers):
            mats = [f"layers.{i}.{n}" for n, p in layer.named_parameters() if p.dim() >= 2]
            experts = [n for n in mats if model.config.is_moe and n.split(".")[-2] == "mlp"
                       and n.split(".")[-1] in ("gate_up", "down")]
            units.append(_Unit(i, [n for n in mats if n not in experts], experts))
        if model.lm_head is not None:
            units.append(_Unit(len(model.layers), [names[id(model.lm_head)]], []))
        self.units = units
        host: set[str] = set()
        dense_target = offloaded.get("weights", 0)
        # the embedding as a unit of its own: gathered on the host, no staging (module docstring)
        if model.embed is not None and model.embed is not model.lm_head and dense_target >= self.sizes["embed"] / 2:
            host.add("embed")
            dense_target -= self.sizes["embed"]
        host |= _spread([u.dense for u in units], self.sizes, max(0, dense_target))
        host |= _spread([u.experts for u in units if u.experts], self.sizes, offloaded.get("experts", 0))
        self.host = host
        pin = self.device.type == "cuda"  # page-locked: the side stream's copies run asynchronously
        real = {}
        for name, p in params.items():
            where = torch.device("cpu") if name in host else self.device
            data = torch.zeros(p.shape, dtype=p.dtype, device=where,  # zeros: the vocabulary's padding rows
                               pin_memory=pin and name in host)
            real[id(p)] = nn.Parameter(data, requires_grad=False)
        # new Parameter objects (a meta tensor's data cannot be swapped in place), a tied one shared
        for module in model.modules():
            for attr, p in list(module._parameters.items()):
                if p is not None:
                    setattr(module, attr, real[id(p)])
        # what the meta build left on the meta device
        model.device = self.device
        model.cos_sin = model.config.cos_sin_cache(model.config.max_context, self.device)
        self.staging: Optional[torch.Tensor] = None

    @property
    def resident_bytes(self) -> int:
        """Parameter bytes that live on the device (the staging slots aside)."""
        return sum(n for name, n in self.sizes.items() if name not in self.host)

    @property
    def host_bytes(self) -> int:
        return sum(n for name, n in self.sizes.items() if name in self.host)

    @property
    def staging_bytes(self) -> int:
        return 0 if self.staging is None else self.staging.numel()

    def install(self) -> None:
        """After the weights are loaded: keep the host copies, make every streamed parameter a
        view of its unit's staging slot, and have the model stream them."""
        params = dict(self.model.named_parameters())
        if "embed" in self.host:
            self.model.host_embed = params["embed"].data
        streamed = [(u.key, [n for n in u.dense + u.experts if n in self.host]) for u in self.units]
        streamed = [(key, names) for key, names in streamed if names]
        offsets, slot_bytes = [], 0
        for _, names in streamed:
            at, end = {}, 0
            for n in names:
                at[n], end = end, end + -(-self.sizes[n] // ALIGN) * ALIGN
            offsets.append(at)
            slot_bytes = max(slot_bytes, end)
        self.staging = torch.empty(2 * slot_bytes, dtype=torch.uint8, device=self.device)
        self.order: dict[int, int] = {}  # unit key -> its index among the streamed units
        self.copies: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # (slot view, host tensor)
        for j, ((key, names), at) in enumerate(zip(streamed, offsets)):
            base = (j % 2) * slot_bytes
            pairs = []
            for n in names:
                p = params[n]
                start = base + at[n]
                view = self.staging[start:start + self.sizes[n]].view(p.dtype).view(p.shape)
                pairs.append((view, p.data))
                p.data = view
            self.order[key] = j
            self.copies.append(pairs)
        self.issued: set[int] = set()
        if self.device.type == "cuda":
            self.stream = torch.cuda.Stream(self.device)
            self.ready = [torch.cuda.Event(), torch.cuda.Event()]  # a slot's copy done
            self.free = [torch.cuda.Event(), torch.cuda.Event()]  # a slot's unit computed
        self.model.streamer = self

    def _issue(self, j: int) -> None:
        """Start filling slot j % 2 with streamed unit j's parameters."""
        if self.device.type != "cuda":
            for view, host in self.copies[j]:
                view.copy_(host)
        else:
            slot = j % 2
            self.stream.wait_event(self.free[slot])  # its previous unit has computed
            with torch.cuda.stream(self.stream):
                for view, host in self.copies[j]:
                    view.copy_(host, non_blocking=True)
            self.ready[slot].record(self.stream)
        self.issued.add(j)

    @contextlib.contextmanager
    def unit(self, key: int) -> Iterator[None]:
        """Around the unit `key` of a forward: its parameters are in their slot inside."""
        j = self.order.get(key)
        if j is None:
            yield
            return
        try:
            if j not in self.issued:
                self._issue(j)
            self.issued.discard(j)
            if self.device.type == "cuda":
                current = torch.cuda.current_stream(self.device)
                current.wait_event(self.ready[j % 2])
                # the next unit (the first one again after the last: the next step's) into the
                # other slot, while this one computes; not when both share a slot (an odd count)
                following = (j + 1) % len(self.copies)
                if following % 2 != j % 2:
                    self._issue(following)
            yield
            if self.device.type == "cuda":
                self.free[j % 2].record(current)
        except BaseException:
            self.issued.clear()  # a step cut short: refill every slot on the next one
            raise

