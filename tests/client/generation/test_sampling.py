"""Next-token sampler: exact top-p/top-k against HF's logits warpers, greedy, plain temperature."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from client.generation.sampling import apply_repetition_penalty, draw, sample_next


def _reference(logits, *, temperature, top_p, top_k):
    scores = logits[None].clone()
    scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.softmax(scores, -1)[0]


@pytest.mark.parametrize(
    ("top_p", "top_k", "candidates", "full_sort"),
    [
        (0.9, 0, 64, False),  # nucleus (55 tokens) fits in the 64 candidates
        (0.9, 0, 16, True),  # it does not: rows are redone with a full sort
        (0.8, 12, 256, False),  # top-k then top-p, renormalised over the k
    ],
)
def test_sampler_distribution_matches_hf_top_p(top_p, top_k, candidates, full_sort):
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(200, generator=gen) * 1.5  # nucleus: 55 tokens at 0.9
    expected = _reference(logits, temperature=0.8, top_p=top_p, top_k=top_k)
    n = 20_000
    stats: dict[str, int] = {}
    draws = sample_next(
        logits.expand(n, -1),
        temperature=0.8,
        top_p=top_p,
        top_k=top_k,
        generator=torch.Generator().manual_seed(5),
        candidates=candidates,
        stats=stats,
    )
    observed = torch.bincount(draws, minlength=200).double() / n
    assert observed[expected == 0].sum() == 0  # nothing outside the nucleus, ever
    tv = 0.5 * (observed - expected.double()).abs().sum().item()
    assert tv < 0.02, tv
    support = int((expected > 0).sum())
    assert support > 4  # the case is not trivial
    assert (stats.get("full_sort_rows", 0) == n) == full_sort
    # The check can fail: plain temperature sampling (no nucleus) is far off.
    wrong = torch.softmax(logits / 0.8, -1).double()
    assert 0.5 * (observed - wrong).abs().sum().item() > 0.05


def test_greedy_sampler_and_plain_temperature():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0]])
    assert sample_next(logits, temperature=0).tolist() == [1, 0]
    draws = sample_next(
        logits[:1].expand(4000, -1), temperature=1.0, generator=torch.Generator().manual_seed(0)
    )
    assert set(draws.tolist()) == {0, 1, 2}


def test_repetition_penalty_follows_hf_rule_on_seen_tokens_only():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    # positive seen logit divided, negative seen logit multiplied: both move away from being drawn
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0]]
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.0), logits)


def test_draw_flags_rows_whose_nucleus_exceeds_the_candidates():
    gen = torch.Generator().manual_seed(3)
    flat = torch.zeros(1, 100)  # uniform: top-p 0.9 needs 90 tokens
    sharp = torch.full((1, 100), -20.0)
    sharp[0, 7] = 20.0  # one token holds all the mass
    logits = torch.cat([flat, sharp])
    u = torch.rand(2, generator=gen)
    tokens, exact = draw(logits, u, temperature=1.0, top_p=0.9, candidates=16)
    assert exact.tolist() == [False, True] and tokens[1].item() == 7
    _, exact = draw(logits, u, temperature=1.0, top_p=0.9, candidates=100)
    assert exact.all()
    # Inverse CDF on the same uniform is deterministic; u near 1 picks the last kept token.
    t1, _ = draw(flat, torch.tensor([0.999]), temperature=1.0, top_p=0.9, candidates=100)
    t2, _ = draw(flat, torch.tensor([0.999]), temperature=1.0, top_p=0.9, candidates=100)
    assert t1.item() == t2.item()
