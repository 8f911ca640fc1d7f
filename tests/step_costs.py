"""Step costs for simulator tests, shared by the test modules that drive the simulator directly."""

from __future__ import annotations


class OneSecondSteps:
    """A StepCost whose every iteration takes 1 s."""

    wake_time = 0.0

    def step_time(self, tokens, prefill_attn_pairs, decode_seqs, decode_kv_tokens):
        return 1.0

    def prefill_pairs(self, new_tokens, past_tokens):
        return new_tokens * past_tokens + new_tokens * (new_tokens + 1) // 2

    def pp_hop_time(self, tokens):
        return 0.0

    def kv_transfer_time(self, tokens):
        return 0.0
