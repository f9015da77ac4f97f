"""Hashed token n-gram index over the private corpus, linear in corpus size.

Answers, for a batch of synthetic reports and without comparing all pairs:

- which synthetic token k-grams occur somewhere in the private notes (k = 8, 13);
- the longest common token substring of each report with the whole private corpus;
- which private notes share the most (rare) k-grams with a report (candidates for ROUGE-L).

How: tokens (``word_tokens``) are interned to int32 ids; each corpus keeps a
polynomial prefix hash (random 64-bit value per token id, random odd base,
arithmetic mod 2^64), so the hash of any L-gram costs O(1). Matching L-grams are
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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from client.evaluate.tokens import word_tokens

TOP_LEVEL = 13  # levels 1..TOP_LEVEL are scanned bottom-up for every position
# k-gram length for ROUGE-L candidate retrieval: 3-grams survive an edit every 4th token
RETRIEVAL_K = 3
_U64 = np.uint64


@dataclass(frozen=True)
class TokenCorpus:
    """Documents as one int32 array of token ids; doc d is tokens[starts[d]:starts[d+1]]."""

    tokens: np.ndarray
    starts: np.ndarray

    @property
    def n_docs(self) -> int:
        return len(self.starts) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.starts)

    def doc_of(self) -> np.ndarray:
        """Document id (int32) of every token position."""
        return np.repeat(np.arange(self.n_docs, dtype=np.int32), self.lengths())

    def remaining(self) -> np.ndarray:
        """Tokens from each position to the end of its document, position included."""
        ends = np.repeat(self.starts[1:], self.lengths())
        return (ends - np.arange(len(self.tokens))).astype(np.int32)


def encode(texts: Sequence[str], vocab: dict[str, int], *, chunk: int = 4096) -> TokenCorpus:
    """Tokenize ``texts`` and intern tokens into ``vocab`` (extended in place with new tokens)."""
    lengths = np.zeros(len(texts) + 1, dtype=np.int64)
    parts: list[np.ndarray] = []
    for lo in range(0, len(texts), chunk):
        docs = [word_tokens(t) for t in texts[lo : lo + chunk]]
        lengths[lo + 1 : lo + 1 + len(docs)] = [len(d) for d in docs]
        flat = [tok for d in docs for tok in d]
        for tok in set(flat).difference(vocab):
            vocab[tok] = len(vocab)
        parts.append(np.fromiter(map(vocab.__getitem__, flat), dtype=np.int32, count=len(flat)))
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    return TokenCorpus(tokens=tokens, starts=np.cumsum(lengths))


class _Hasher:
    """Random polynomial hash shared by both corpora: h(L-gram) = sum_j g(t_j) B^j mod 2^64."""

    def __init__(self, seed: int | None) -> None:
        self._rng = np.random.default_rng(seed)
        self.base = int(self._rng.integers(1 << 62, dtype=np.uint64)) * 2 + 1  # odd => invertible
        self._g = np.zeros(0, dtype=_U64)
        self._pow = np.ones(1, dtype=_U64)
        self._inv = np.ones(1, dtype=_U64)

    def values(self, n_vocab: int) -> np.ndarray:
        if len(self._g) < n_vocab:
            extra = self._rng.integers(
                0, np.iinfo(np.uint64).max, n_vocab - len(self._g), dtype=_U64, endpoint=True
            )
            self._g = np.concatenate([self._g, extra])
        return self._g

    def powers(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if len(self._pow) < n:
            b, binv = self.base, pow(self.base, -1, 1 << 64)
            self._pow = np.cumprod(np.r_[_U64(1), np.full(n - 1, b, dtype=_U64)], dtype=_U64)
            self._inv = np.cumprod(np.r_[_U64(1), np.full(n - 1, binv, dtype=_U64)], dtype=_U64)
        return self._pow, self._inv


@dataclass(frozen=True)
class _Hashed:
    corpus: TokenCorpus
    prefix: np.ndarray  # uint64, len n+1: prefix[i] = sum_{j<i} g(t_j) B^(j - start(doc j))
    rel: np.ndarray  # int32 position inside its document
    remaining: np.ndarray  # int32
    doc: np.ndarray  # int32 doc id per position

    def gram_hash(self, pos: np.ndarray, length: int, inv: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            return (self.prefix[pos + length] - self.prefix[pos]) * inv[self.rel[pos]]


def _hash_corpus(corpus: TokenCorpus, hasher: _Hasher, n_vocab: int) -> _Hashed:
    g = hasher.values(n_vocab)
    maxlen = int(corpus.lengths().max(initial=0)) + 1
    pw, _ = hasher.powers(maxlen)
    doc = corpus.doc_of()
    rel = (np.arange(len(corpus.tokens)) - corpus.starts[:-1][doc]).astype(np.int32)
    prefix = np.zeros(len(corpus.tokens) + 1, dtype=_U64)
    with np.errstate(over="ignore"):
        np.cumsum(g[corpus.tokens] * pw[rel], out=prefix[1:])
    return _Hashed(corpus, prefix, rel, corpus.remaining(), doc)


def _tokens_equal(
    a: np.ndarray, ia: np.ndarray, b: np.ndarray, ib: np.ndarray, length: int
) -> np.ndarray:
    eq = np.ones(len(ia), dtype=bool)
    for t in range(length):
        eq &= a[ia + t] == b[ib + t]
    return eq


@dataclass(frozen=True)
class _Lookup:
    """Private L-gram hashes sorted (hash top bits | index); synthetic queries' hash ranges in it."""

    p_pos: np.ndarray  # private positions, in key order
    lo: np.ndarray  # per synthetic query: first matching key
    hi: np.ndarray  # one past the last matching key


def _lookup(
    s: _Hashed, s_pos: np.ndarray, p: _Hashed, p_pos: np.ndarray, length: int, inv: np.ndarray
) -> _Lookup:
    bits = max(1, int(len(p_pos)).bit_length())
    shift = _U64(bits)
    keys = (p.gram_hash(p_pos, length, inv) >> shift) << shift
    keys |= np.arange(len(p_pos), dtype=_U64)
    keys.sort()
    key_hash = keys >> shift
    q = s.gram_hash(s_pos, length, inv) >> shift
    order = np.argsort(q, kind="stable")
    lo, hi = np.empty(len(q), np.int64), np.empty(len(q), np.int64)
    lo[order] = np.searchsorted(key_hash, q[order], "left")
    hi[order] = np.searchsorted(key_hash, q[order], "right")
    idx = (keys & _U64((1 << bits) - 1)).astype(np.int64)
    return _Lookup(p_pos[idx], lo, hi)


def _verify(
    s: _Hashed, s_pos: np.ndarray, p: _Hashed, look: _Lookup, which: np.ndarray, length: int
) -> np.ndarray:
    """Exact check of queries ``which`` (indices into s_pos): True where some private key in range matches."""
    ok = np.zeros(len(which), dtype=bool)
    j = look.lo[which].copy()
    active = np.nonzero(j < look.hi[which])[0]
    while active.size:
        eq = _tokens_equal(
            s.corpus.tokens, s_pos[which[active]], p.corpus.tokens, look.p_pos[j[active]], length
        )
        ok[active[eq]] = True
        rest = active[~eq]
        j[rest] += 1
        active = rest[j[rest] < look.hi[which[rest]]]
    return ok


def _private_marks(look: _Lookup, n_private: int) -> np.ndarray:
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
    """

    synthetic: TokenCorpus
    hits: dict[int, np.ndarray]
    grams: dict[int, np.ndarray]
    lcs: np.ndarray
    candidates: list[np.ndarray]


class PrivateIndex:
    """Index over the private notes' tokens; build once per evaluation, query with synthetic batches."""

    def __init__(self, private: Sequence[str], *, seed: int | None = None) -> None:
        self.vocab: dict[str, int] = {}
        self.corpus = encode(private, self.vocab)
        self.n_private_vocab = len(self.vocab)
        self._hasher = _Hasher(seed)
        self._hashed = _hash_corpus(self.corpus, self._hasher, len(self.vocab))

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
        s = _hash_corpus(sc, self._hasher, len(vocab))
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
        for length in range(2, TOP_LEVEL + 1):
            s_pos = np.nonzero(s_mark[:-1] & s_mark[1:] & (s.remaining[:-1] >= length))[0]
            p_pos = np.nonzero(p_mark[:-1] & p_mark[1:] & (p.remaining[:-1] >= length))[0]
            look = _lookup(s, s_pos, p, p_pos, length, inv)
            which = np.nonzero(look.hi > look.lo)[0]
            ok = _verify(s, s_pos, p, look, which, length)
            s_mark = np.zeros(n_s, dtype=bool)
            s_mark[s_pos[which[ok]]] = True
            p_mark = _private_marks(look, n_p)
            lcs[np.unique(s.doc[s_mark])] = length
            hits[length] = s_mark
            grams[length] = np.bincount(s.doc[s.remaining >= length], minlength=sc.n_docs)
            if length == RETRIEVAL_K and candidates > 0:
                cand = _retrieve(s, s_pos, look, which[ok], p.doc, sc.n_docs, candidates, budget)
        self._extend_lcs(s, s_mark, p_mark, inv, lcs)
        return Scan(sc, hits, grams, lcs, cand)

    def _extend_lcs(
        self, s: _Hashed, s_mark: np.ndarray, p_mark: np.ndarray, inv: np.ndarray, lcs: np.ndarray
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
                look = _lookup(s, s_pos, p, np.sort(p_pos), length, inv)
                found = _docs_with_match(s, s_pos, p, look, length)
                docs = np.nonzero(want == length)[0]
                good = np.isin(docs, found)
                lo[docs[good]] = length
                hi[docs[~good]] = length - 1
        lcs[hi >= TOP_LEVEL] = np.maximum(lcs[hi >= TOP_LEVEL], lo[hi >= TOP_LEVEL])


def _docs_with_match(
    s: _Hashed, s_pos: np.ndarray, p: _Hashed, look: _Lookup, length: int
) -> np.ndarray:
    """Docs with at least one verified match: verify one hit per doc first, the rest only if it failed."""
    which = np.nonzero(look.hi > look.lo)[0]
    docs = s.doc[s_pos[which]]
    _, first = np.unique(docs, return_index=True)
    ok = _verify(s, s_pos, p, look, which[first], length)
    found = set(docs[first][ok].tolist())
    failed = np.isin(docs, docs[first][~ok])
    if failed.any():
        rest = which[failed]
        ok_rest = _verify(s, s_pos, p, look, rest, length)
        found.update(s.doc[s_pos[rest[ok_rest]]].tolist())
    return np.array(sorted(found), dtype=np.int64)


def _retrieve(
    s: _Hashed,
    s_pos: np.ndarray,
    look: _Lookup,
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
