"""Diversity metrics against known answers: a collapsed corpus must score as collapsed."""

import math
import random

import numpy as np
import pytest

from client.evaluate.diversity import (
    distinct_n,
    duplicate_rates,
    mean_pairwise_cosine,
    mode_collapse_ratio,
    mtld,
    mtld_tokens,
    near_duplicate_flags,
    self_bleu,
    total_tokens,
    vendi_score,
)
from shared.errors import InputError

REPORT = (
    "Reason for referral: low mood for three months. History: the patient reports poor sleep, "
    "loss of appetite and withdrawal from friends. Mental status examination: tearful, slowed speech, "
    "no psychotic features. Risk assessment: passive death wishes, no plan. Diagnosis: moderate "
    "depressive episode. Plan: start sertraline, weekly psychotherapy, review in two weeks."
)

_WORDS = (
    "anxiety sleep mood appetite panic worry voices paranoia mania energy focus guilt anger trauma "
    "nightmares flashbacks avoidance tremor sweating palpitations racing thoughts grandiosity spending "
    "insomnia fatigue hopeless irritable restless withdrawn tearful agitated calm euthymic labile flat "
    "coherent tangential pressured slowed impaired intact fair poor good insight judgement lithium "
    "sertraline therapy review referral family work school housing alcohol cannabis"
).split()


def diverse_corpus(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(60)) + "." for _ in range(n)]


def test_distinct_n_floor_for_repeated_report_and_high_for_diverse():
    repeated = [REPORT] * 100
    diverse = diverse_corpus(100)
    budget = min(total_tokens(repeated), total_tokens(diverse))
    rep = distinct_n(repeated, token_budget=budget)
    div = distinct_n(diverse, token_budget=budget)
    vocab = len(set(REPORT.lower().replace(".", " . ").replace(":", " : ").replace(",", " , ").split()))
    # Floor: the report's own vocabulary spread over the whole budget.
    assert rep.distinct[1] == pytest.approx(vocab / budget, rel=0.05)
    assert rep.distinct[3] < 0.02
    assert div.distinct[2] > 0.4 and div.distinct[3] > 0.9
    assert all(div.distinct[n] > 10 * rep.distinct[n] for n in (2, 3))
    assert rep.tokens_used == div.tokens_used == budget and rep.matched


def test_distinct_n_is_token_matched_and_seeded():
    corpus = diverse_corpus(40)
    a = distinct_n(corpus, token_budget=500, seed=3)
    b = distinct_n(corpus, token_budget=500, seed=3)
    assert a == b and a.tokens_used == 500
    with pytest.raises(InputError):
        distinct_n(corpus, token_budget=10**9)


def test_self_bleu_is_one_for_copies_and_low_for_diverse():
    assert self_bleu([REPORT] * 30, subset_size=20).self_bleu == pytest.approx(1.0)
    low = self_bleu(diverse_corpus(30), subset_size=20).self_bleu
    assert 0.0 <= low < 0.3


def test_mtld_known_answers():
    # "a a a a": a factor closes at every second token, both directions: 4 / 2 = 2.
    assert mtld_tokens(["a"] * 4) == pytest.approx(2.0)
    # "a b a c": forward closes one factor at "a b a", rest TTR 1 -> 4/1 = 4;
    # backward "c a b a": TTR 0.75 at the end -> partial (1-0.75)/(1-0.72) -> 4/0.892857 = 4.48.
    assert mtld_tokens(["a", "b", "a", "c"]) == pytest.approx((4.0 + 4.48) / 2)
    # Every word new: no factor completes, so the text is too short to measure.
    assert math.isnan(mtld_tokens(["a", "b", "c"]))
    res = mtld(["a a a a.", "one two three", "a b a c"])
    assert res.n_scored == 2 and res.n_unmeasurable == 1
    assert res.mtld == pytest.approx((2.0 + 4.24) / 2)


def test_vendi_known_answers():
    for k in (1, 3, 7):
        assert vendi_score(np.eye(k, 16)) == pytest.approx(k, abs=1e-9)
    # n > d path (Gram of width d) gives the same answer: 2 orthogonal directions, 50 copies each.
    two = np.repeat(np.eye(2, 3), 50, axis=0)
    assert vendi_score(two) == pytest.approx(2.0, abs=1e-9)
    rng = np.random.default_rng(0)
    one = np.repeat(rng.normal(size=(1, 384)), 100, axis=0)
    assert vendi_score(one) == pytest.approx(1.0, abs=1e-9)
    assert vendi_score(rng.normal(size=(100, 384))) > 30


def test_mode_collapse_ratio_high_for_collapsed_synthetic():
    rng = np.random.default_rng(0)
    codes = ["F32"] * 20 + ["F41.1"] * 20
    centres = {c: rng.normal(size=64) for c in ("F32", "F41.1")}
    real = np.stack([centres[c] + 1.5 * rng.normal(size=64) for c in codes])
    collapsed = np.stack([centres[c] + 0.05 * rng.normal(size=64) for c in codes])
    similar = np.stack([centres[c] + 1.5 * rng.normal(size=64) for c in codes])
    high = mode_collapse_ratio(real, codes, collapsed, codes)
    assert high.ratio > 1.5 and high.skipped_codes == ()
    assert mode_collapse_ratio(real, codes, similar, codes).ratio == pytest.approx(1.0, abs=0.2)


def test_mean_pairwise_cosine_matches_all_pairs():
    x = np.random.default_rng(1).normal(size=(12, 5))
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = u @ u.T
    expect = (sims.sum() - np.trace(sims)) / (12 * 11)
    assert mean_pairwise_cosine(x) == pytest.approx(expect)


def test_duplicate_rates_for_copies_and_diverse():
    rep = duplicate_rates([REPORT] * 100)
    assert rep.exact_rate == pytest.approx(0.99) and rep.near_rate == 1.0
    div = duplicate_rates(diverse_corpus(50))
    assert div.exact_rate == 0.0 and div.near_rate == 0.0
    # Normalisation: case and spacing do not hide a copy.
    assert duplicate_rates([REPORT, REPORT.upper().replace(" ", "  "), "other"]).exact_rate == pytest.approx(1 / 3)


def test_near_duplicates_found_by_index_match_brute_force():
    rng = random.Random(5)
    base = diverse_corpus(30, seed=7)
    corpus = list(base)
    for i in range(15):  # edits of varying size around the 0.8 threshold
        words = base[i].split()
        for _ in range(rng.randint(0, 4)):
            words[rng.randrange(len(words))] = "zzz"
        corpus.append(" ".join(words))
    flags = near_duplicate_flags(corpus, threshold=0.8, k=5)

    from client.evaluate.diversity import shingles

    sh = [shingles(t, 5) for t in corpus]
    brute = np.zeros(len(corpus), dtype=bool)
    for i in range(len(corpus)):
        for j in range(len(corpus)):
            if i != j and len(sh[i] & sh[j]) / len(sh[i] | sh[j]) >= 0.8:
                brute[i] = True
    assert brute.any() and not brute.all()
    assert (flags == brute).all()


def test_self_bleu_matches_sacrebleu_sentence_bleu_and_docs():
    """Cross-check: the mean of sacrebleu's sentence_bleu of each report against all the others."""
    from sacrebleu import sentence_bleu

    from client.evaluate.diversity import SELF_BLEU_SUBSET

    assert SELF_BLEU_SUBSET == 100  # docs/metrics.md: "default 100"
    rng = np.random.default_rng(3)
    words = [f"w{i}" for i in range(40)]
    texts = [" ".join(rng.choice(words, int(rng.integers(8, 30)))) for _ in range(25)]
    want = np.mean([sentence_bleu(t, texts[:i] + texts[i + 1:]).score / 100 for i, t in enumerate(texts)])
    assert self_bleu(texts, subset_size=len(texts)).self_bleu == pytest.approx(want, abs=1e-9)
