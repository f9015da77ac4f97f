"""Token corpora as int arrays, random polynomial k-gram hashes, and exact hash lookups.

The building blocks of :mod:`client.evaluate.ngram_index`. Tokens
(``word_tokens``) are interned to int32 ids; each corpus keeps a polynomial
prefix hash (random 64-bit value per token id, random odd base, arithmetic mod
2^64), so the hash of any L-gram costs O(1). :func:`lookup` finds, for each
query L-gram, the range of private L-grams with the same (truncated) hash;
:func:`verify` checks the real tokens, so callers' answers are exact — a hash
collision costs time, never a wrong result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from client.evaluate.tokens import word_tokens

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


class Hasher:
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
class Hashed:
    corpus: TokenCorpus
    prefix: np.ndarray  # uint64, len n+1: prefix[i] = sum_{j<i} g(t_j) B^(j - start(doc j))
    rel: np.ndarray  # int32 position inside its document
    remaining: np.ndarray  # int32
    doc: np.ndarray  # int32 doc id per position

    def gram_hash(self, pos: np.ndarray, length: int, inv: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            return (self.prefix[pos + length] - self.prefix[pos]) * inv[self.rel[pos]]


def hash_corpus(corpus: TokenCorpus, hasher: Hasher, n_vocab: int) -> Hashed:
    g = hasher.values(n_vocab)
    maxlen = int(corpus.lengths().max(initial=0)) + 1
    pw, _ = hasher.powers(maxlen)
    doc = corpus.doc_of()
    rel = (np.arange(len(corpus.tokens)) - corpus.starts[:-1][doc]).astype(np.int32)
    prefix = np.zeros(len(corpus.tokens) + 1, dtype=_U64)
    with np.errstate(over="ignore"):
        np.cumsum(g[corpus.tokens] * pw[rel], out=prefix[1:])
    return Hashed(corpus, prefix, rel, corpus.remaining(), doc)


def tokens_equal(
    a: np.ndarray, ia: np.ndarray, b: np.ndarray, ib: np.ndarray, length: int
) -> np.ndarray:
    eq = np.ones(len(ia), dtype=bool)
    for t in range(length):
        eq &= a[ia + t] == b[ib + t]
    return eq


@dataclass(frozen=True)
class Lookup:
    """Private L-gram hashes sorted (hash top bits | index); synthetic queries' hash ranges in it."""

    p_pos: np.ndarray  # private positions, in key order
    lo: np.ndarray  # per synthetic query: first matching key
    hi: np.ndarray  # one past the last matching key


def lookup(
    s: Hashed, s_pos: np.ndarray, p: Hashed, p_pos: np.ndarray, length: int, inv: np.ndarray
) -> Lookup:
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
    return Lookup(p_pos[idx], lo, hi)


def verify(
    s: Hashed, s_pos: np.ndarray, p: Hashed, look: Lookup, which: np.ndarray, length: int
) -> np.ndarray:
    """Exact check of queries ``which`` (indices into s_pos): True where some private key in range matches."""
    ok = np.zeros(len(which), dtype=bool)
    j = look.lo[which].copy()
    active = np.nonzero(j < look.hi[which])[0]
    while active.size:
        eq = tokens_equal(
            s.corpus.tokens, s_pos[which[active]], p.corpus.tokens, look.p_pos[j[active]], length
        )
        ok[active[eq]] = True
        rest = active[~eq]
        j[rest] += 1
        active = rest[j[rest] < look.hi[which[rest]]]
    return ok
