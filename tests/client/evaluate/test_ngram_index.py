"""PrivateIndex against brute-force references on small random corpora (fixed seeds)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from client.evaluate import token_hash
from client.evaluate.ngram_index import RETRIEVAL_K, TOP_LEVEL, PrivateIndex, encode
from client.evaluate.tokens import word_tokens


def _brute_lcs(a: list[str], docs: list[list[str]]) -> int:
    best = 0
    for b in docs:
        prev = [0] * (len(b) + 1)
        for x in a:
            cur = [0]
            for j, y in enumerate(b):
                cur.append(prev[j] + 1 if x == y else 0)
            best = max(best, *cur)
            prev = cur
    return best


def _grams(t: list[str], k: int) -> list[tuple[str, ...]]:
    return [tuple(t[i : i + k]) for i in range(len(t) - k + 1)]


def _random_case(rng: np.random.Generator) -> tuple[list[str], list[str]]:
    words = [f"w{i}" for i in range(int(rng.integers(2, 10)))]
    private = [
        " ".join(rng.choice(words, size=int(rng.integers(0, 60))))
        for _ in range(int(rng.integers(1, 8)))
    ]
    synthetic = []
    for _ in range(int(rng.integers(1, 8))):
        toks = list(rng.choice(words, size=int(rng.integers(0, 50))))
        src = word_tokens(private[int(rng.integers(len(private)))])
        if src and rng.random() < 0.6:  # plant a passage of random length, up to a whole note
            a = int(rng.integers(len(src)))
            b = int(rng.integers(a, len(src) + 1))
            cut = int(rng.integers(0, len(toks) + 1))
            toks = toks[:cut] + src[a:b] + toks[cut:]
        synthetic.append(" ".join(toks))
    return synthetic, private


@pytest.mark.parametrize("seed", range(12))
def test_scan_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    synthetic, private = _random_case(rng)
    scan = PrivateIndex(private, seed=seed).scan(synthetic, candidates=3, budget=10_000)
    p_tok = [word_tokens(p) for p in private]
    doc = scan.synthetic.doc_of()
    for i, text in enumerate(synthetic):
        s_tok = word_tokens(text)
        assert scan.lcs[i] == _brute_lcs(s_tok, p_tok)
        for k in range(2, TOP_LEVEL + 1):
            priv = {g for p in p_tok for g in _grams(p, k)}
            expect = [g in priv for g in _grams(s_tok, k)]
            assert scan.hits[k][doc == i][: len(expect)].tolist() == expect
            assert not scan.hits[k][doc == i][len(expect) :].any()
            assert scan.grams[k][i] == len(expect)
        # candidates: private docs by number of k-gram occurrences shared with the report
        mine = set(_grams(s_tok, RETRIEVAL_K))
        score = Counter(
            {d: sum(g in mine for g in _grams(p, RETRIEVAL_K)) for d, p in enumerate(p_tok)}
        )
        ranked = sorted((d for d, c in score.items() if c > 0), key=lambda d: (-score[d], d))
        assert scan.candidates[i].tolist() == ranked[:3]


def test_long_copies_and_repeats() -> None:
    """Many repeated identical notes and whole-note copies: exact LCS well above the bottom-up levels."""
    rng = np.random.default_rng(7)
    words = [f"x{i}" for i in range(3)]
    base = list(rng.choice(words, size=150))
    private = [" ".join(base)] * 5 + [" ".join(rng.choice(words, size=120)) for _ in range(5)]
    synthetic = [" ".join(base), " ".join(base[10:97]), "zz " + " ".join(base[:40]) + " zz"]
    scan = PrivateIndex(private, seed=1).scan(synthetic)
    p_tok = [word_tokens(p) for p in private]
    assert scan.lcs.tolist() == [_brute_lcs(word_tokens(s), p_tok) for s in synthetic]
    assert scan.lcs[0] == 150


def test_hash_seed_does_not_change_answers() -> None:
    rng = np.random.default_rng(3)
    synthetic, private = _random_case(rng)
    a = PrivateIndex(private, seed=1).scan(synthetic)
    b = PrivateIndex(private, seed=2).scan(synthetic)
    assert a.lcs.tolist() == b.lcs.tolist()
    assert all((a.hits[k] == b.hits[k]).all() for k in a.hits)


def test_encode_shares_vocabulary_and_offsets() -> None:
    vocab: dict[str, int] = {}
    a = encode(["Hello, world", "", "world"], vocab)
    b = encode(["WORLD new"], vocab)
    assert a.starts.tolist() == [0, 3, 3, 4]
    assert a.tokens[2] == a.tokens[3] == b.tokens[0]
    assert b.tokens[1] == len(vocab) - 1
    assert a.remaining().tolist() == [3, 2, 1, 1]


def _brute_groups(s_tok: list[str], p_tok: list[list[str]], groups: list[str]) -> list[int]:
    """Per TOP_LEVEL-gram of the report: number of distinct groups with a note containing it."""
    holders: dict[tuple[str, ...], set[str]] = {}
    for toks, g in zip(p_tok, groups, strict=True):
        for gram in _grams(toks, TOP_LEVEL):
            holders.setdefault(gram, set()).add(g)
    return [len(holders.get(gram, ())) for gram in _grams(s_tok, TOP_LEVEL)]


def _check_groups_against_brute(synthetic: list[str], private: list[str], groups: list[str] | None, **kw) -> None:
    scan = PrivateIndex(private, groups=groups, **kw).scan(synthetic)
    p_tok = [word_tokens(p) for p in private]
    labels = groups if groups is not None else [str(i) for i in range(len(private))]
    doc = scan.synthetic.doc_of()
    for i, text in enumerate(synthetic):
        expect = _brute_groups(word_tokens(text), p_tok, labels)
        got = scan.hit_groups[doc == i]
        assert got[: len(expect)].tolist() == expect
        assert not got[len(expect) :].any()


@pytest.mark.parametrize("seed", range(12))
def test_hit_groups_match_brute_force(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    synthetic, private = _random_case(rng)
    private = private + private[: int(rng.integers(0, len(private) + 1))]  # repeated notes
    groups = [f"p{int(g)}" for g in rng.integers(0, 3, len(private))]
    _check_groups_against_brute(synthetic, private, groups, seed=seed)
    _check_groups_against_brute(synthetic, private, None, seed=seed)


def test_hit_groups_exact_when_every_hash_collides(monkeypatch: pytest.MonkeyPatch) -> None:
    """All tokens hash alike, so every L-gram of a length collides: counts must still be exact."""
    monkeypatch.setattr(token_hash.Hasher, "values", lambda self, n: np.ones(n, dtype=np.uint64))
    a, b = " ".join(f"a{i}" for i in range(20)), " ".join(f"b{i}" for i in range(20))
    private = [f"x {a} y", f"{a} z", f"q {a}", f"w {b} w", "filler only here"]
    synthetic = [f"{a} and {b}", f"{b} then {a}", "no copy at all"]
    scan = PrivateIndex(private, groups=["p1", "p2", "p3", "p4", "p4"]).scan(synthetic)
    doc = scan.synthetic.doc_of()
    assert sorted(set(scan.hit_groups[doc == 0].tolist())) == [0, 1, 3]  # b: one patient, a: three
    assert sorted(set(scan.hit_groups[doc == 1].tolist())) == [0, 1, 3]
    assert not scan.hit_groups[doc == 2].any()
    _check_groups_against_brute(synthetic, private, ["p1", "p2", "p3", "p4", "p4"])
    rng = np.random.default_rng(5)
    for _ in range(6):
        synthetic, private = _random_case(rng)
        groups = [f"p{int(g)}" for g in rng.integers(0, 3, len(private))]
        _check_groups_against_brute(synthetic, private, groups, seed=0)
