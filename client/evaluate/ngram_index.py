"""Hashed token n-gram index over the private corpus, linear in corpus size.

Answers, for a batch of synthetic reports and without comparing all pairs:

- which synthetic token k-grams occur somewhere in the private notes (k = 8, 13);
- the longest common token substring of each report with the whole private corpus;
- which private notes share the most (rare) k-grams with a report (candidates for ROUGE-L);
- for each synthetic 13-gram found, how many distinct *groups* (patients) have a
  private note containing it — 1 means only one patient's records hold that span.

How (primitives in :mod:`client.evaluate.token_hash`): tokens are interned to
int32 ids; each corpus keeps a polynomial prefix hash, so the hash of any
L-gram costs O(1). Matching L-grams are
found by sorting the private hashes (packed with their index into one uint64)
and binary-searching the sorted synthetic hashes. Every hash hit is then
**verified against the real tokens**, so all answers are exact: a hash
collision can cost time, never a wrong result.

The longest common substring is found bottom-up: a length-L match needs
matches of length L-1 at positions i and i+1 on both sides, so level L only
hashes positions that survived level L-1 (apriori filtering). Above the top
level (13) each report runs its own binary search between 13 and an upper
bound given by its run of consecutive 13-gram hits, testing only the private
positions whose own run is long enough. Work is proportional to the number of
positions that actually share grams, never to reports x notes.

Group counts (patients per copied 13-gram) reuse the 13-gram lookup: each
distinct hash range is expanded once and compared token by token with one
representative query, then distinct (range, group) pairs are counted with
``np.unique`` — linear in private positions, exact under collisions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from client.evaluate.token_hash import (
    Hashed,
    Hasher,
    Lookup,
    TokenCorpus,
    encode,
    hash_corpus,
    lookup,
    tokens_equal,
    verify,
)
from shared.errors import InputError, Problem

TOP_LEVEL = 13  # levels 1..TOP_LEVEL are scanned bottom-up for every position
# k-gram length for ROUGE-L candidate retrieval: 3-grams survive an edit every 4th token
RETRIEVAL_K = 3


def _group_counts(
    s: Hashed,
    s_pos: np.ndarray,
    p: Hashed,
    look: Lookup,
    hits: np.ndarray,
    group: np.ndarray,
    n_groups: int,
    length: int,
) -> np.ndarray:
    """Distinct groups of the private positions equal to each verified query ``hits`` (exact).

    Queries with equal hashes share one key range. Per range one representative
    query is compared token by token with every private position in the range,
    so a colliding L-gram never adds a group; queries equal to the representative
    take its count, the rest (a different L-gram with the same hash: rare) go to
    the next pass. Ranges are disjoint, so one pass is linear in private positions.
    """
    counts = np.zeros(len(hits), dtype=np.int64)
    todo = np.arange(len(hits))
    while todo.size:
        q = hits[todo]
        ulo, first = np.unique(look.lo[q], return_index=True)
        rep = q[first]
        size = look.hi[rep] - ulo
        run = np.repeat(np.arange(len(rep)), size)
        key = np.arange(int(size.sum())) + np.repeat(ulo - (np.cumsum(size) - size), size)
        pp = look.p_pos[key]
        eq = tokens_equal(s.corpus.tokens, s_pos[rep[run]], p.corpus.tokens, pp, length)
        pairs = np.unique(run[eq] * max(n_groups, 1) + group[p.doc[pp[eq]]])
        per_rep = np.bincount(pairs // max(n_groups, 1), minlength=len(rep))
        r_of = np.searchsorted(ulo, look.lo[q])
        same = tokens_equal(s.corpus.tokens, s_pos[q], s.corpus.tokens, s_pos[rep[r_of]], length)
        counts[todo[same]] = per_rep[r_of[same]]
        todo = todo[~same]
    return counts


def _private_marks(look: Lookup, n_private: int) -> np.ndarray:
    """Private positions whose hash equals some query hash (a superset of true matches)."""
    hit = look.hi > look.lo
    cover = np.bincount(look.lo[hit], minlength=len(look.p_pos) + 1)
    cover -= np.bincount(look.hi[hit], minlength=len(look.p_pos) + 1)
    mark = np.zeros(n_private, dtype=bool)
    mark[look.p_pos[np.cumsum(cover[:-1]) > 0]] = True
    return mark


def _runs(mark: np.ndarray) -> np.ndarray:
    """run[i] = number of consecutive True values starting at i (0 where mark[i] is False)."""
    idx = np.arange(len(mark))
    falses = np.r_[np.nonzero(~mark)[0], len(mark)]
    return falses[np.searchsorted(falses, idx)] - idx


@dataclass(frozen=True)
class Scan:
    """Per-report lexical matches against the private corpus (exact).

    ``hits[k]`` is a bool per synthetic token position: the k-gram starting there
    occurs in the private corpus (k = 2..TOP_LEVEL, verified against the tokens).
    ``grams[k]`` counts each report's k-gram positions. ``lcs`` is each report's
    longest common token substring with the whole private corpus, in tokens.
    ``hit_groups`` (int per synthetic position): number of distinct groups
    (patients) with a private note containing the TOP_LEVEL-gram starting there,
    exact; 0 where ``hits[TOP_LEVEL]`` is False.
    """

    synthetic: TokenCorpus
    hits: dict[int, np.ndarray]
    grams: dict[int, np.ndarray]
    lcs: np.ndarray
    candidates: list[np.ndarray]
    hit_groups: np.ndarray


def check_groups(groups: object, n_private: int) -> list[Problem]:
    """Problems with ``groups``: a sequence of ``n_private`` non-empty strings (one label per private note)."""
    if isinstance(groups, str) or not isinstance(groups, Sequence):
        return [Problem("groups", "must be a sequence of strings (one group label per private note)")]
    problems = []
    if len(groups) != n_private:
        problems.append(Problem("groups", f"has {len(groups)} labels for {n_private} private notes"))
    bad = [
        Problem("groups", f"item {i} is {type(g).__name__}, not str")
        if not isinstance(g, str)
        else Problem("groups", f"item {i} is empty (would merge unrelated notes into one group)")
        for i, g in enumerate(groups)
        if not isinstance(g, str) or not g.strip()
    ]
    return problems + bad[:10]


class PrivateIndex:
    """Index over the private notes' tokens; build once per evaluation, query with synthetic batches.

    ``groups``: one label per private note (the patient id), so a scan can tell
    whether a copied span occurs in one patient's records only (see
    ``Scan.hit_groups``). None = every note is its own group: a span repeated in
    two notes of the same patient then counts as shared. Raises InputError listing
    every problem with ``groups`` (wrong length, non-string or empty labels).
    """

    def __init__(
        self, private: Sequence[str], *, groups: Sequence[str] | None = None, seed: int | None = None
    ) -> None:
        if groups is not None:
            problems = check_groups(groups, len(private))
            if problems:
                raise InputError("invalid private note groups", problems)
            labels, group = np.unique(np.array(list(groups), dtype=object), return_inverse=True)
            self._group = np.asarray(group, dtype=np.int64).reshape(-1)
            self.n_groups = len(labels)
        else:
            self._group = np.arange(len(private), dtype=np.int64)
            self.n_groups = len(private)
        self.vocab: dict[str, int] = {}
        self.corpus = encode(private, self.vocab)
        self.n_private_vocab = len(self.vocab)
        self._hasher = Hasher(seed)
        self._hashed = hash_corpus(self.corpus, self._hasher, len(self.vocab))

    @property
    def n_docs(self) -> int:
        return self.corpus.n_docs

    def scan(self, synthetic: Sequence[str], *, candidates: int = 20, budget: int = 256) -> Scan:
        """Match ``synthetic`` texts against the private notes.

        ``candidates``: how many private notes to retrieve per report (top by number
        of shared RETRIEVAL_K-gram occurrences). ``budget``: per report, private
        occurrences expanded for retrieval, rarest grams first; a gram occurring at
        more than ``budget`` private positions is boilerplate, ignored for retrieval only.
        """
        vocab = dict(self.vocab)
        sc = encode(synthetic, vocab)
        p = self._hashed
        s = hash_corpus(sc, self._hasher, len(vocab))
        maxlen = int(max(sc.lengths().max(initial=0), self.corpus.lengths().max(initial=0))) + 1
        _, inv = self._hasher.powers(maxlen)
        n_s, n_p = len(sc.tokens), len(self.corpus.tokens)
        lcs = np.zeros(sc.n_docs, dtype=np.int64)
        hits: dict[int, np.ndarray] = {}
        grams: dict[int, np.ndarray] = {}
        in_syn = np.zeros(len(vocab), dtype=bool)
        in_syn[sc.tokens] = True
        s_mark = sc.tokens < self.n_private_vocab
        p_mark = in_syn[self.corpus.tokens]
        lcs[np.unique(s.doc[s_mark])] = 1
        cand: list[np.ndarray] = [np.zeros(0, dtype=np.int64) for _ in range(sc.n_docs)]
        hit_groups = np.zeros(n_s, dtype=np.int64)
        for length in range(2, TOP_LEVEL + 1):
            s_pos = np.nonzero(s_mark[:-1] & s_mark[1:] & (s.remaining[:-1] >= length))[0]
            p_pos = np.nonzero(p_mark[:-1] & p_mark[1:] & (p.remaining[:-1] >= length))[0]
            look = lookup(s, s_pos, p, p_pos, length, inv)
            which = np.nonzero(look.hi > look.lo)[0]
            ok = verify(s, s_pos, p, look, which, length)
            s_mark = np.zeros(n_s, dtype=bool)
            s_mark[s_pos[which[ok]]] = True
            p_mark = _private_marks(look, n_p)
            lcs[np.unique(s.doc[s_mark])] = length
            hits[length] = s_mark
            grams[length] = np.bincount(s.doc[s.remaining >= length], minlength=sc.n_docs)
            if length == RETRIEVAL_K and candidates > 0:
                cand = _retrieve(s, s_pos, look, which[ok], p.doc, sc.n_docs, candidates, budget)
            if length == TOP_LEVEL:
                hit_groups[s_pos[which[ok]]] = _group_counts(
                    s, s_pos, p, look, which[ok], self._group, self.n_groups, length
                )
        self._extend_lcs(s, s_mark, p_mark, inv, lcs)
        return Scan(sc, hits, grams, lcs, cand, hit_groups)

    def _extend_lcs(
        self, s: Hashed, s_mark: np.ndarray, p_mark: np.ndarray, inv: np.ndarray, lcs: np.ndarray
    ) -> None:
        """Per-report binary search above TOP_LEVEL, using runs of TOP_LEVEL-gram hits as bounds."""
        p = self._hashed
        base = TOP_LEVEL - 1
        s_run, p_run = _runs(s_mark), _runs(p_mark)
        s_idx = np.nonzero(s_mark)[0]
        s_doc, s_r = s.doc[s_idx], s_run[s_idx]
        p_idx = np.nonzero(p_mark)[0]
        p_order = np.argsort(-p_run[p_idx], kind="stable")
        p_idx, p_r = p_idx[p_order], p_run[p_idx][p_order]
        hi = np.full(s.corpus.n_docs, -1, dtype=np.int64)
        np.maximum.at(hi, s_doc, s_r + base)
        lo = np.where(hi >= TOP_LEVEL, TOP_LEVEL, 0)
        first = True
        while True:
            active = np.nonzero(hi > lo)[0]
            if not active.size:
                break
            mid = hi[active] if first else (lo[active] + hi[active] + 1) // 2
            first = False
            want = np.full(s.corpus.n_docs, -1, dtype=np.int64)
            want[active] = mid
            for length in np.unique(mid):
                length = int(length)
                sel = (want[s_doc] == length) & (s_r >= length - base)
                s_pos = s_idx[sel]
                p_pos = p_idx[: np.searchsorted(-p_r, -(length - base), "right")]
                look = lookup(s, s_pos, p, np.sort(p_pos), length, inv)
                found = _docs_with_match(s, s_pos, p, look, length)
                docs = np.nonzero(want == length)[0]
                good = np.isin(docs, found)
                lo[docs[good]] = length
                hi[docs[~good]] = length - 1
        lcs[hi >= TOP_LEVEL] = np.maximum(lcs[hi >= TOP_LEVEL], lo[hi >= TOP_LEVEL])


def _docs_with_match(
    s: Hashed, s_pos: np.ndarray, p: Hashed, look: Lookup, length: int
) -> np.ndarray:
    """Docs with at least one verified match: verify one hit per doc first, the rest only if it failed."""
    which = np.nonzero(look.hi > look.lo)[0]
    docs = s.doc[s_pos[which]]
    _, first = np.unique(docs, return_index=True)
    ok = verify(s, s_pos, p, look, which[first], length)
    found = set(docs[first][ok].tolist())
    failed = np.isin(docs, docs[first][~ok])
    if failed.any():
        rest = which[failed]
        ok_rest = verify(s, s_pos, p, look, rest, length)
        found.update(s.doc[s_pos[rest[ok_rest]]].tolist())
    return np.array(sorted(found), dtype=np.int64)


def _retrieve(
    s: Hashed,
    s_pos: np.ndarray,
    look: Lookup,
    hit: np.ndarray,
    p_doc: np.ndarray,
    n_syn: int,
    m: int,
    budget: int,
) -> list[np.ndarray]:
    """Top-m private docs per report by count of shared k-grams, rarest grams first within a budget."""
    width = len(look.p_pos) + 1
    key = s.doc[s_pos[hit]].astype(np.int64) * width + look.lo[hit]
    key, first = np.unique(key, return_index=True)  # one entry per distinct gram per report
    sdoc, lo = key // width, key % width
    size = look.hi[hit][first] - lo
    order = np.lexsort((size, sdoc))
    sdoc, lo, size = sdoc[order], lo[order], size[order]
    cum = np.cumsum(size)
    cut = (
        np.r_[0, np.nonzero(np.diff(sdoc))[0] + 1].astype(np.int64)
        if len(sdoc)
        else np.zeros(0, np.int64)
    )
    before = cum - size - np.repeat(cum[cut] - size[cut], np.diff(np.r_[cut, len(sdoc)]))
    keep = (before < budget) & (size <= budget)
    sdoc, lo, size = sdoc[keep], lo[keep], size[keep]
    offs = np.arange(int(size.sum())) - np.repeat(np.cumsum(size) - size, size)
    pdoc = p_doc[look.p_pos[np.repeat(lo, size) + offs]].astype(np.int64)
    n_p = int(p_doc.max(initial=0)) + 1
    pair = np.sort(np.repeat(sdoc, size) * n_p + pdoc)
    first = np.r_[True, pair[1:] != pair[:-1]][: len(pair)]
    count = np.diff(np.r_[np.nonzero(first)[0], len(pair)])
    pair = pair[first]
    ps, pd = pair // n_p, pair % n_p
    order = np.lexsort((pd, -count, ps))
    ps, pd = ps[order], pd[order]
    starts = np.searchsorted(ps, np.arange(n_syn + 1))
    rank = np.arange(len(ps)) - np.repeat(starts[:-1], np.diff(starts))
    keep = rank < m
    ends = np.searchsorted(ps[keep], np.arange(1, n_syn + 1))
    return np.split(pd[keep], ends[:-1]) if n_syn else []
