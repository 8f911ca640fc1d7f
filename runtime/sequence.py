"""One request's state as the runtime tracks it: its sampling parameters and its sequence.

`SamplingParams` is what a user asks for; `validate(vocab_size)` turns every bad value into a
`RequestError` whose message can be shown to that user as is. `Sequence` is the request in
flight: the known tokens (prompt, then outputs), how many of them have their KV in the cache
(`num_computed_tokens`), the KV blocks it holds, its status and timings. The engine validates
the prompt; the scheduler and block manager own the mutable fields.
"""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

MAX_SEED = 2**64  # torch.Generator.manual_seed accepts [0, 2**64)


class RequestError(ValueError):
    """A problem with one request (bad parameters, a prompt that cannot be served); the message
    is written for the user who sent it."""


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def finite_float(x: object) -> Optional[float]:
    """x as a float when it is a real number (not a bool) that a float holds finitely, else
    None (NaN, infinities, ints beyond any float, other types)."""
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return None
    try:
        value = float(x)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


def is_token_id(x: object, vocab_size: int) -> bool:
    """Whether x is a token id of a vocabulary of vocab_size tokens (an int, not a bool)."""
    return _is_int(x) and 0 <= x < vocab_size  # type: ignore[operator]


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each output token.

    temperature 0 (the default) is greedy: the argmax of the logits. Otherwise the logits are
    divided by the temperature, then top_k (0 = off) keeps the k most likely tokens, then top_p
    keeps the smallest set of most likely tokens whose probability reaches top_p (1.0 = off).
    A seed makes the request's samples reproducible whatever it is batched with. Generation
    stops after max_tokens outputs, or on a token of stop_token_ids or (unless ignore_eos) of
    the model's end-of-sequence ids; the stop token is part of the output.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        # Accept a list from JSON; a frozen dataclass must hold a hashable tuple.
        if isinstance(self.stop_token_ids, list):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    def validate(self, vocab_size: int) -> None:
        """Raise RequestError naming the first bad field, its value and the allowed range."""
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise RequestError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        temperature = finite_float(self.temperature)
        if temperature is None or temperature < 0:
            raise RequestError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise RequestError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        top_p = finite_float(self.top_p)
        if top_p is None or not 0.0 < top_p <= 1.0:
            raise RequestError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < MAX_SEED):
            raise RequestError(f"seed must be an integer in [0, 2**64) or null, got {self.seed!r}")
        if not isinstance(self.stop_token_ids, tuple):
            raise RequestError(f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}")
        for i, token in enumerate(self.stop_token_ids):
            if not is_token_id(token, vocab_size):
                raise RequestError(f"stop_token_ids[{i}] = {token!r} is not a token id in [0, {vocab_size})")
        if not isinstance(self.ignore_eos, bool):
            raise RequestError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")


class SequenceStatus(enum.Enum):
    WAITING = "waiting"    # queued, holds no KV blocks (new, or preempted)
    RUNNING = "running"    # admitted: holds KV blocks, gets tokens each step
    FINISHED = "finished"  # done; finish_reason says why
    # disaggregated serving (disagg.py): both hold KV blocks and get no tokens
    PREFILLED = "prefilled"  # prefill instance: sampled its first token; its KV waits to move to a decode instance
    RECEIVING = "receiving"  # decode instance: blocks reserved, waiting for the KV of its prompt to arrive


@dataclass(eq=False)  # identity semantics: two requests with equal fields are still two requests
class Sequence:
    """A request in flight.

    The known tokens are `prompt_token_ids + output_token_ids`; the first `num_computed_tokens`
    of them have their KV in the cache, in `block_ids` (position p lives in
    block_ids[p // block_size]). A step that brings num_computed_tokens up to num_tokens yields
    logits for the next token. `generator` is seeded from params.seed (None without a seed:
    the sampler then draws from torch's global generator). `error` holds the message when the
    scheduler aborts the request itself (finish_reason "abort"). `block_hashes` is the block
    manager's record of the prefix-cache hashes of this sequence's registered blocks.
    `decoding` (the scheduler's) says the sequence sampled since it was last admitted: each
    step now computes its one newest token. A prefill chunk with one token left is not a decode.
    `handoff` (a prefill instance's, disagg.py): the sequence stops after its first token and
    waits, holding its blocks, for its KV to move to a decode instance.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    eos_token_ids: tuple[int, ...] = ()
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    num_cached_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    decoding: bool = False
    finish_reason: Optional[str] = None
    error: Optional[str] = None
    first_token_time: Optional[float] = None
    token_times: list[float] = field(default_factory=list)
    num_preemptions: int = 0
    generator: Optional[torch.Generator] = field(default=None, repr=False)
    handoff: bool = False

    def __post_init__(self):
        if self.generator is None and self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def token_ids(self) -> list[int]:
        """The known tokens: prompt, then outputs (a new list)."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
