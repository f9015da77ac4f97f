"""Known-answer tests for the lexical privacy metrics, DCR, PHI echo and canary exposure."""

from __future__ import annotations

import numpy as np
import pytest

from client.evaluate.ngram_index import PrivateIndex, encode
from client.evaluate.privacy import (
    canary_exposure,
    distance_to_closest_record,
    lexical_privacy,
    lexical_summary,
    phi_echo,
    phi_echo_rate,
    rouge_l,
    rouge_l_pairs,
)
from client.evaluate.tokens import word_tokens
from shared.errors import ConfigError, InputError
from shared.whitelist import METRIC_NAMES


def _notes(
    rng: np.random.Generator, n: int, prefix: str = "w", vocab: int = 400, length: int = 60
) -> list[str]:
    words = [f"{prefix}{i}" for i in range(vocab)]
    return [" ".join(rng.choice(words, size=length + int(rng.integers(0, 20)))) for _ in range(n)]


def test_verbatim_copies_score_as_memorized() -> None:
    private = _notes(np.random.default_rng(0), 30)
    synthetic = private[:10]
    lp = lexical_privacy(synthetic, private)
    assert lp.verbatim_13.all()
    assert np.allclose(lp.overlap_8, 1.0) and np.allclose(lp.overlap_13, 1.0)
    assert lp.lcs_tokens.tolist() == [len(word_tokens(s)) for s in synthetic]
    assert np.allclose(lp.rouge_l_max, 1.0)
    summary = lexical_summary(lp)
    assert summary["privacy.verbatim_rate_13"] == 1.0 and summary["privacy.rouge_l_max"] == 1.0


def test_disjoint_vocabulary_scores_zero() -> None:
    rng = np.random.default_rng(1)
    lp = lexical_privacy(_notes(rng, 10, prefix="a"), _notes(rng, 30, prefix="b"))
    assert not lp.verbatim_13.any()
    assert (lp.overlap_8 == 0).all() and (lp.overlap_13 == 0).all()
    assert (lp.lcs_tokens == 0).all() and (lp.rouge_l_max == 0).all()


def test_planted_passage_gives_exact_lcs() -> None:
    rng = np.random.default_rng(2)
    private = _notes(rng, 50, prefix="p")
    src = word_tokens(private[17])
    own = word_tokens(_notes(rng, 1, prefix="s")[0])
    report = " ".join(own[:30] + src[5:25] + own[30:])
    lp = lexical_privacy([report], private)
    assert lp.lcs_tokens[0] == 20
    assert lp.verbatim_13[0]
    n8 = len(own) + 20 - 7
    assert lp.overlap_8[0] == pytest.approx(13 / n8)  # the 13 8-grams inside the passage
    assert lp.rouge_l_max[0] == pytest.approx(rouge_l(word_tokens(report), src))


@pytest.mark.parametrize(
    ("a", "b", "expect"),
    [
        ("a b c d", "a b c d", 1.0),
        ("a b c d", "e f", 0.0),
        ("a b c d e", "a c e", 2 * 3 / 8),  # LCS "a c e"
        ("the cat sat on the mat", "the cat on a mat", 2 * 4 / 11),  # LCS "the cat on mat"
        ("a b", "b a", 2 * 1 / 4),
        ("", "", 0.0),
    ],
)
def test_rouge_l_hand_computed(a: str, b: str, expect: float) -> None:
    assert rouge_l(a.split(), b.split()) == pytest.approx(expect)


def test_bit_parallel_rouge_matches_dp_across_word_boundaries() -> None:
    rng = np.random.default_rng(3)
    a_texts, b_texts = _notes(rng, 6, vocab=4, length=130), _notes(rng, 6, vocab=4, length=60)
    vocab: dict[str, int] = {}
    a, b = encode(a_texts, vocab), encode(b_texts, vocab)
    ai, bi = rng.integers(0, 6, 30), rng.integers(0, 6, 30)
    got = rouge_l_pairs(a, ai, b, bi, chunk=7)
    want = [
        rouge_l(word_tokens(a_texts[x]), word_tokens(b_texts[y]))
        for x, y in zip(ai, bi, strict=True)
    ]
    assert got == pytest.approx(want)


def test_dcr_ties_count_half_and_distance() -> None:
    x = np.eye(3)
    assert distance_to_closest_record(x, x[:1]).tolist() == pytest.approx([0.0, 1.0, 1.0])
    with pytest.raises(InputError):
        distance_to_closest_record(np.zeros((1, 3)), x)


def test_phi_echo_finds_identifiers_on_word_boundaries() -> None:
    idents = ["Anna Kowalski", "MRN-448812", "Anna", "Bob", "12 Elm Street"]
    reports = [
        "Seen with ANNA   kowalski today; ref mrn-448812.",
        "Savannah was discharged; annabel is fine; Bob attended",
        "lives at 12 elm street, apt 3",
        "12 elm streets is not an address here",
    ]
    echoes = phi_echo(reports, idents)
    assert set(echoes[0]) == {"Anna Kowalski", "MRN-448812", "Anna"}
    assert echoes[1] == []  # substrings inside other words; "Bob" is under 4 characters
    assert echoes[2] == ["12 Elm Street"]
    assert echoes[3] == []
    assert phi_echo_rate(echoes) == 0.5


def test_canary_exposure_first_and_last() -> None:
    k = 10
    lp = np.linspace(-50.0, -10.0, 2**k)
    assert canary_exposure(lp, 2**k - 1) == pytest.approx(k)  # most likely
    assert canary_exposure(lp, 0) == pytest.approx(0.0)  # least likely
    assert canary_exposure(lp, 2**k - 2) == pytest.approx(k - 1)
    with pytest.raises(ConfigError):
        canary_exposure(lp, 2**k)


def test_invalid_inputs_listed_together() -> None:
    with pytest.raises(InputError) as err:
        lexical_privacy(["ok", 3], [None], candidates=0)  # type: ignore[list-item]
    assert len(err.value.problems) == 3


def test_cells_for_summary() -> None:
    private = _notes(np.random.default_rng(5), 12)
    cells = lexical_privacy(private[:3], private).cells()
    assert cells["privacy.verbatim_rate_13"].value == 1.0 and cells["privacy.lcs_max"].n == 3


def _patients_case() -> tuple[list[str], list[str], list[str]]:
    """Notes of 5 patients (p0 has 2 notes sharing a 30-token span; p1..p3 share a boilerplate span)."""
    rng = np.random.default_rng(6)
    private = _notes(rng, 6, prefix="n", vocab=5000)
    groups = ["p0", "p0", "p1", "p2", "p3", "p4"]
    own = word_tokens(_notes(rng, 1, prefix="u", vocab=5000)[0])
    boiler = word_tokens(_notes(rng, 1, prefix="b", vocab=5000)[0])[:30]
    toks = [word_tokens(t) for t in private]
    toks[0] = toks[0][:10] + own[:30] + toks[0][10:]
    toks[1] = toks[1][:25] + own[:30] + toks[1][25:]
    for i in (2, 3, 4):
        toks[i] = toks[i][:15] + boiler + toks[i][15:]
    return [" ".join(t) for t in toks], groups, own[:30] + boiler


def test_unique_verbatim_separates_one_patient_spans_from_boilerplate() -> None:
    private, groups, spans = _patients_case()
    own, boiler = spans[:30], spans[30:]
    filler = word_tokens(_notes(np.random.default_rng(7), 1, prefix="s", vocab=5000)[0])
    reports = [
        " ".join(filler[:20] + own[5:25] + filler[20:]),  # 20 tokens of p0's own span
        " ".join(filler[:20] + boiler[5:25] + filler[20:]),  # 20 tokens shared by p1, p2, p3
        " ".join(filler),  # nothing copied
        " ".join(word_tokens(private[5])[:20]),  # 20 tokens of p4's only note
    ]
    lp = lexical_privacy(reports, private, groups=groups)
    assert lp.verbatim_13.tolist() == [True, True, False, True]
    assert lp.verbatim_unique_13.tolist() == [True, False, False, True]
    assert lexical_summary(lp)["privacy.verbatim_unique_rate_13"] == 0.5
    # groups=None: every note is its own group, so p0's span (in 2 notes) is shared
    plain = lexical_privacy(reports, private)
    assert plain.verbatim_13.tolist() == lp.verbatim_13.tolist()
    assert plain.verbatim_unique_13.tolist() == [False, False, False, True]


def test_unique_verbatim_one_patient_span_beside_boilerplate() -> None:
    """A report hitting boilerplate and a one-patient span counts once; all patients distinct => unique."""
    private, _, spans = _patients_case()
    report = " ".join(spans[30:50] + ["x"] + spans[:20])
    lp = lexical_privacy([report], private, groups=["a", "a", "b", "c", "d", "e"])
    assert lp.verbatim_unique_13.tolist() == [True]
    lp = lexical_privacy([" ".join(spans[30:50])], private, groups=["a"] * 6)
    assert lp.verbatim_unique_13.tolist() == [True]  # one patient holds every note


def test_invalid_groups_listed_together() -> None:
    private, _, _ = _patients_case()
    with pytest.raises(InputError) as err:
        lexical_privacy(["x"], private, groups=["p0", 3, "", "p1"])  # type: ignore[list-item]
    wheres = [p.where for p in err.value.problems]
    assert wheres == ["groups"] * 3  # wrong length, a non-string, an empty label
    with pytest.raises(InputError):
        lexical_privacy(["x"], private, groups="p0p0p1")  # type: ignore[arg-type]
    with pytest.raises(InputError):
        PrivateIndex(private, groups=["p"] * 5)
    with pytest.raises(InputError):  # groups belong to the index when one is given
        lexical_privacy(["x"], private, index=PrivateIndex(private), groups=["p"] * 6)


def test_lexical_cells_stay_at_the_site() -> None:
    """Report-level lexical cells (max, p95, rates over reports) are local-only: none is whitelisted."""
    private, groups, _ = _patients_case()
    cells = lexical_privacy(private[:2], private, groups=groups).cells()
    assert cells["privacy.verbatim_unique_rate_13"].value == 1.0
    assert not set(cells) & METRIC_NAMES
