"""The sampler: greedy = argmax, exact top-k/top-p kept sets, the sampled distribution against
exact probabilities, and seeded reproducibility whatever the batch."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from flowc.runtime.sampler import Sampler
from flowc.runtime.sequence import SamplingParams, Sequence


def seq(rid: str = "r", **params) -> Sequence:
    return Sequence(rid, [1], SamplingParams(**params))


def draw(logits: list[float], n: int, **params) -> Counter:
    """n samples from one row of logits (a batch of n identical rows of one unseeded request)."""
    rows = torch.tensor([logits], dtype=torch.float32).expand(n, -1).contiguous()
    return Counter(Sampler().sample(rows, [seq(**params)] * n))


def exact_probs(logits: list[float], temperature: float, top_k: int = 0, top_p: float = 1.0) -> dict[int, float]:
    """The reference: a plain-Python statement of the documented algorithm."""
    order = sorted(range(len(logits)), key=lambda t: (-logits[t], t))[:top_k or len(logits)]
    weights = [math.exp(logits[t] / temperature) for t in order]
    probs = [w / sum(weights) for w in weights]
    kept, mass = [], 0.0
    for t, p in zip(order, probs):
        kept.append((t, p))
        mass += p
        if mass >= top_p:
            break
    total = sum(p for _, p in kept)
    return {t: p / total for t, p in kept}


def chi_square(counts: Counter, probs: dict[int, float]) -> float:
    n = sum(counts.values())
    assert set(counts) <= set(probs), f"sampled tokens outside the kept set: {set(counts) - set(probs)}"
    return sum((counts[t] - n * p) ** 2 / (n * p) for t, p in probs.items())


# chi-square critical values at p = 1e-4, by degrees of freedom
CHI2_CRIT = {2: 18.42, 3: 21.11, 4: 23.51, 5: 25.74, 6: 27.86, 7: 29.88}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_greedy_is_argmax_with_first_index_on_ties():
    logits = torch.randn(6, 50)
    logits[2, 7] = logits[2, 31] = logits[2].max() + 1.0
    tokens = Sampler().sample(logits, [seq(str(i)) for i in range(6)])
    assert tokens == logits.argmax(dim=-1).tolist()
    assert tokens[2] == 7


def test_greedy_rows_ignore_top_k_top_p_and_mix_with_sampled_rows():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 2.9], [0.0, 0.0, 9.0]])
    seqs = [seq("a", top_k=1), seq("b", temperature=1.0, top_k=1), seq("c", top_p=0.1)]
    assert Sampler().sample(logits, seqs) == [1, 0, 2]


LOGITS = [1.0, 3.0, 2.0, 0.5, 2.5, -1.0, 0.0, 1.5]


@pytest.mark.parametrize("top_k, kept", [(1, {1}), (3, {1, 2, 4}), (5, {1, 2, 4, 7, 0})])
def test_top_k_kept_set(top_k, kept):
    assert set(draw(LOGITS, 3000, temperature=1.0, top_k=top_k)) == kept


def test_top_k_ties_go_to_the_lower_token_id():
    assert set(draw([2.0, 1.0, 2.0, 2.0], 2000, temperature=1.0, top_k=2)) == {0, 2}
    many_ties = [1.0 if t % 7 == 0 else 0.0 for t in range(5000)]  # an unstable sort reorders these
    assert set(draw(many_ties, 300, temperature=1.0, top_k=3)) == {0, 7, 14}


P = [0.4, 0.05, 0.25, 0.2, 0.1]
LOG_P = [math.log(p) for p in P]


@pytest.mark.parametrize("top_p, kept", [
    (0.01, {0}),           # always at least one token
    (0.39, {0}),           # 0.4 alone reaches it
    (0.6, {0, 2}),         # 0.4 < 0.6, 0.65 >= 0.6 (an inclusive-cumsum filter would keep only {0})
    (0.7, {0, 2, 3}),
    (0.9, {0, 2, 3, 4}),
    (1.0, {0, 1, 2, 3, 4}),
])
def test_top_p_kept_set(top_p, kept):
    assert set(draw(LOG_P, 4000, temperature=1.0, top_p=top_p)) == kept


def test_top_p_applies_to_the_top_k_renormalized_distribution():
    # top-2 renormalized: 0.4/0.65 = 0.615 >= 0.6 keeps token 0 alone; top-p on the original
    # probabilities (0.4 < 0.6) would also keep token 2.
    assert set(draw(LOG_P, 3000, temperature=1.0, top_k=2, top_p=0.6)) == {0}
    assert set(draw(LOG_P, 3000, temperature=1.0, top_k=2, top_p=0.62)) == {0, 2}


@pytest.mark.parametrize("params", [
    dict(temperature=1.5),
    dict(temperature=0.7, top_k=4),
    dict(temperature=0.8, top_k=6, top_p=0.9),
])
def test_sampled_distribution_matches_exact_probabilities(params):
    n = 40_000
    counts = draw(LOGITS, n, **params)
    probs = exact_probs(LOGITS, **params)
    stat = chi_square(counts, probs)
    assert stat < CHI2_CRIT[len(probs) - 1], (stat, counts, probs)
    # The test has the power to see a wrong temperature: the same counts against T = 1.
    wrong = exact_probs(LOGITS, 1.0, params.get("top_k", 0), params.get("top_p", 1.0))
    if set(wrong) == set(probs):
        assert chi_square(counts, wrong) > 100


def test_seeded_samples_do_not_depend_on_the_batch():
    steps = [torch.randn(8, 40) for _ in range(15)]
    params = dict(temperature=1.0, top_p=0.95, seed=1234)

    alone = seq("seeded", **params)
    expected = [Sampler().sample(logits[3:4], [alone])[0] for logits in steps]

    batched = seq("seeded", **params)
    got = []
    for i, logits in enumerate(steps):
        # The seeded row moves around a batch of unseeded, greedy and other seeded rows.
        others = [seq("u"), seq("g", temperature=0.9), seq("s", temperature=2.0, seed=i), seq("k", top_k=3)]
        pos = i % 5
        rows = others[:pos] + [batched] + others[pos:]
        batch = torch.randn(5, 40)
        batch[pos] = logits[3]
        got.append(Sampler().sample(batch, rows)[pos])
    assert got == expected

    other_seed = seq("other", temperature=1.0, top_p=0.95, seed=4321)
    assert [Sampler().sample(logits[3:4], [other_seed])[0] for logits in steps] != expected


def test_equal_seeds_give_equal_streams_in_one_batch():
    a, b = seq("a", temperature=1.0, seed=7), seq("b", temperature=1.0, seed=7)
    for _ in range(10):
        row = torch.randn(1, 30)
        x, y = Sampler().sample(torch.cat([row, row]), [a, b])
        assert x == y
