"""Turn a step's logits into one token per sampling sequence.

Greedy rows (temperature below 1e-5, which includes the default 0: dividing by a smaller
temperature only risks overflow, and the distribution is the argmax anyway) take the argmax,
the first maximal token on ties. Other rows: logits / temperature, then top-k (exactly k
tokens; ties at the k-th value go to the lower token id), then top-p on the renormalized
distribution (the smallest set of most likely tokens whose probability reaches top_p, always
at least one), then one draw from what is kept.

The draw is inverse-CDF sampling with one uniform number from the sequence's own generator
(or torch's global one when it has none), drawn on the CPU whatever the logits' device: a
seeded request samples the same tokens whatever else is in the batch and wherever it runs.
"""

from __future__ import annotations

import torch

from .sequence import Sequence

GREEDY_BELOW = 1e-5


class Sampler:
    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """logits [S, V] fp32, row i for seqs[i]; returns the S sampled token ids."""
        if logits.dim() != 2 or logits.shape[0] != len(seqs):
            raise ValueError(f"logits of shape {tuple(logits.shape)} for {len(seqs)} sequences")
        tokens = logits.argmax(dim=-1)
        rows = [i for i, seq in enumerate(seqs) if seq.params.temperature >= GREEDY_BELOW]
        if rows:
            tokens[rows] = self._draw(logits[rows], [seqs[i] for i in rows])
        return tokens.tolist()

    def _draw(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        device, vocab = logits.device, logits.shape[-1]
        temperature = torch.tensor([s.params.temperature for s in seqs], dtype=torch.float32, device=device)
        logits = logits / temperature[:, None]
        token_ids = None
        if any(s.params.top_k > 0 or s.params.top_p < 1.0 for s in seqs):
            # Work in descending order: top-k is then a prefix, top-p a prefix of what is left.
            logits, token_ids = logits.sort(dim=-1, descending=True, stable=True)
            rank = torch.arange(vocab, device=device)
            # a top_k beyond the vocabulary keeps it all, as 0 does (and may not fit an int64)
            top_k = torch.tensor([min(s.params.top_k or vocab, vocab) for s in seqs], device=device)
            logits = logits.masked_fill(rank >= top_k[:, None], float("-inf"))
            probs = logits.softmax(dim=-1)
            mass_before = probs.cumsum(dim=-1) - probs  # 0 for the top token: it is always kept
            top_p = torch.tensor([s.params.top_p for s in seqs], dtype=torch.float32, device=device)
            # top_p = 1 keeps everything: cumulative rounding must not drop the tail.
            keep = (mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0)
            probs = probs.masked_fill(~keep, 0.0)
        else:
            probs = logits.softmax(dim=-1)
        cdf = probs.cumsum(dim=-1)
        uniform = torch.rand(len(seqs))  # unseeded rows: one call to the global generator
        for i, s in enumerate(seqs):
            if s.generator is not None:
                uniform[i] = torch.rand((), generator=s.generator)
        total = cdf[:, -1]
        # u * total can round up to total; kept strictly below it, the first cdf entry above the
        # target is a step of the cdf, so the token found always has mass (never a dropped one).
        target = torch.minimum(uniform.to(device) * total, torch.nextafter(total, torch.zeros_like(total)))
        index = torch.searchsorted(cdf, target[:, None], right=True).squeeze(-1)
        if token_ids is None:
            return index
        return token_ids.gather(-1, index[:, None]).squeeze(-1)
