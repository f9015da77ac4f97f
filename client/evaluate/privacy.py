"""Lexical privacy / memorization metrics of synthetic reports against private notes.

Everything here is computed at the site from private notes. Per-report arrays
(``LexicalPrivacy``) never leave the site; only the aggregates of
:func:`lexical_summary` (and the other float helpers) may go into a metric
summary, which applies small-cell suppression. These are *measurements* of
leakage, not privacy guarantees: the guarantee is DP-SGD's epsilon.

All lexical metrics use ``client.evaluate.tokens.word_tokens`` (lower-cased
word/punctuation tokens), so they mean the same whatever model wrote the text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from client.evaluate.inputs import text_problems
from client.evaluate.ngram_index import PrivateIndex, TokenCorpus, check_groups
from client.evaluate.summary import Cell
from shared.errors import ConfigError, InputError, Problem


@dataclass(frozen=True)
class LexicalPrivacy:
    """Per-report lexical leakage (site-only) — one entry per synthetic report.

    overlap_8 / overlap_13: share (0..1) of the report's token k-gram positions that
        occur verbatim somewhere in the private notes (0 for reports shorter than k).
    verbatim_13: the report contains at least one 13-token span copied from a private note.
    verbatim_unique_13: the report contains a 13-token span found verbatim in the private
        notes of exactly one group (patient): spans of two or more patients are shared
        phrasing (templates), a one-patient span is what memorizing a person looks like.
    lcs_tokens: longest common token substring with the whole private corpus, in tokens (exact).
    rouge_l_max: max ROUGE-L F1 to the retrieved candidate private notes (exact on those
        candidates; a lower bound on the max over all notes: notes sharing no rare
        3-gram (within the retrieval budget) with the report are not scored; 0 when none is retrieved).
    """

    overlap_8: np.ndarray
    overlap_13: np.ndarray
    verbatim_13: np.ndarray
    verbatim_unique_13: np.ndarray
    lcs_tokens: np.ndarray
    rouge_l_max: np.ndarray

    def cells(self) -> dict[str, Cell]:
        """Aggregates for ``build_summary``; n = number of reports."""
        n = len(self.lcs_tokens)
        return {name: Cell(value, n) for name, value in lexical_summary(self).items()}


def lexical_privacy(
    synthetic: Sequence[str],
    private: Sequence[str],
    *,
    candidates: int = 20,
    index: PrivateIndex | None = None,
    groups: Sequence[str] | None = None,
) -> LexicalPrivacy:
    """Lexical memorization of each synthetic report against the private notes.

    ``candidates``: private notes retrieved per report (by shared rare 3-grams) and
    scored with exact ROUGE-L. ``index``: a :class:`PrivateIndex` already built over
    ``private`` (reuse it across calls; ``private`` is then not re-read; its own
    groups are used). ``groups``: patient id per private note, for
    ``verbatim_unique_13``; None = every note is its own group (then a span in two
    notes of one patient counts as shared). Linear in corpus size; never compares
    all report x note pairs.
    """
    problems = text_problems(synthetic, "synthetic")
    if index is None:
        problems += text_problems(private, "private")
        if groups is not None and not problems:
            problems += check_groups(groups, len(private))
    elif groups is not None:
        problems.append(Problem("groups", "give groups to the PrivateIndex, not with an index"))
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
        problems.append(Problem("candidates", f"must be an integer >= 1, got {candidates!r}"))
    if problems:
        raise InputError("cannot compute lexical privacy metrics", problems)
    index = index if index is not None else PrivateIndex(private, groups=groups)
    scan = index.scan(synthetic, candidates=candidates)
    doc = scan.synthetic.doc_of()
    n = scan.synthetic.n_docs

    def overlap(k: int) -> np.ndarray:
        found = np.bincount(doc[scan.hits[k]], minlength=n)
        return np.divide(found, scan.grams[k], out=np.zeros(n), where=scan.grams[k] > 0)

    a_docs = np.repeat(np.arange(n), [len(c) for c in scan.candidates])
    b_docs = np.concatenate(scan.candidates) if n else np.zeros(0, dtype=np.int64)
    f1 = rouge_l_pairs(scan.synthetic, a_docs, index.corpus, b_docs)
    best = np.zeros(n)
    np.maximum.at(best, a_docs, f1)
    return LexicalPrivacy(
        overlap_8=overlap(8),
        overlap_13=overlap(13),
        verbatim_13=np.bincount(doc[scan.hits[13]], minlength=n) > 0,
        verbatim_unique_13=np.bincount(doc[scan.hit_groups == 1], minlength=n) > 0,
        lcs_tokens=scan.lcs.copy(),
        rouge_l_max=best,
    )


def lexical_summary(result: LexicalPrivacy) -> dict[str, float]:
    """Aggregates for the metric summary (names from shared.wire). Empty dict for no reports.

    Overlaps are means of per-report shares; lcs/rouge are max and 95th percentile.
    """
    if len(result.lcs_tokens) == 0:
        return {}
    return {
        "privacy.ngram_overlap_8": float(np.mean(result.overlap_8)),
        "privacy.ngram_overlap_13": float(np.mean(result.overlap_13)),
        "privacy.verbatim_rate_13": float(np.mean(result.verbatim_13)),
        "privacy.verbatim_unique_rate_13": float(np.mean(result.verbatim_unique_13)),
        "privacy.lcs_max": float(np.max(result.lcs_tokens)),
        "privacy.lcs_p95": float(np.percentile(result.lcs_tokens, 95)),
        "privacy.rouge_l_max": float(np.max(result.rouge_l_max)),
        "privacy.rouge_l_p95": float(np.percentile(result.rouge_l_max, 95)),
    }


def rouge_l(a_tokens: Sequence[str], b_tokens: Sequence[str]) -> float:
    """ROUGE-L F1 = 2 LCS / (|a| + |b|), LCS = longest common subsequence (exact DP); 0 if both empty."""
    if not a_tokens and not b_tokens:
        return 0.0
    prev = [0] * (len(b_tokens) + 1)
    for x in a_tokens:
        cur = [0]
        for j, y in enumerate(b_tokens):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return 2.0 * prev[-1] / (len(a_tokens) + len(b_tokens))


def rouge_l_pairs(
    a: TokenCorpus, a_docs: np.ndarray, b: TokenCorpus, b_docs: np.ndarray, *, chunk: int = 8192
) -> np.ndarray:
    """ROUGE-L F1 for each pair (a_docs[i], b_docs[i]) of token-id documents, exact.

    Bit-parallel LCS (Crochemore et al. 2001): bits run along the a-document, one
    step per b-token, all pairs of a chunk advanced together in numpy:
    V' = (V + (V & M[t])) | (V & ~M[t]); LCS = number of zero bits of V.
    """
    a_docs, b_docs = np.asarray(a_docs, dtype=np.int64), np.asarray(b_docs, dtype=np.int64)
    la, lb = a.lengths()[a_docs], b.lengths()[b_docs]
    out = np.zeros(len(a_docs))
    order = np.argsort(la, kind="stable")  # similar lengths share a word count
    n_vocab = int(max(a.tokens.max(initial=-1), b.tokens.max(initial=-1))) + 1
    for lo in range(0, len(order), chunk):
        idx = order[lo : lo + chunk]
        lcs = _lcs_chunk(a, a_docs[idx], b, b_docs[idx], n_vocab)
        total = la[idx] + lb[idx]
        out[idx] = np.divide(2.0 * lcs, total, out=np.zeros(len(idx)), where=total > 0)
    return out


def _lcs_chunk(
    a: TokenCorpus, a_docs: np.ndarray, b: TokenCorpus, b_docs: np.ndarray, n_vocab: int
) -> np.ndarray:
    ua, ai = np.unique(a_docs, return_inverse=True)
    la = a.lengths()[ua]
    words = max(1, int(-(-la.max(initial=1) // 64)))
    u = np.repeat(np.arange(len(ua)), la)
    pos = np.arange(len(u)) - np.repeat(np.cumsum(la) - la, la)
    toks = a.tokens[np.repeat(a.starts[ua], la) + pos]
    local_vocab, tok_local = np.unique(toks, return_inverse=True)
    row_key, row = np.unique(u * len(local_vocab) + tok_local, return_inverse=True)
    zero_row = len(row_key)
    # word-major: each 64-bit word of all rows is one contiguous array
    masks = np.zeros((words, zero_row + 1), dtype=np.uint64)
    np.bitwise_or.at(
        masks, (pos // 64, row), np.left_shift(np.uint64(1), (pos % 64).astype(np.uint64))
    )
    table = np.full((len(ua), len(local_vocab)), zero_row, dtype=np.int32)
    table[row_key // len(local_vocab), row_key % len(local_vocab)] = np.arange(zero_row)
    to_local = np.full(n_vocab, -1, dtype=np.int64)
    to_local[local_vocab] = np.arange(len(local_vocab))
    lb = b.lengths()[b_docs]
    tmax = int(lb.max(initial=0))
    steps = np.arange(tmax)
    valid = steps[:, None] < lb[None, :]  # (step, pair): one contiguous row per step
    b_tok = b.tokens[
        np.minimum(steps[:, None] + b.starts[b_docs][None, :], max(len(b.tokens) - 1, 0))
    ]
    loc = np.where(valid, to_local[b_tok], -1)
    rows = np.where(loc >= 0, table[ai[None, :], np.maximum(loc, 0)], zero_row)
    v = np.full((words, len(a_docs)), np.iinfo(np.uint64).max, dtype=np.uint64)
    s = np.empty_like(v)
    carry = np.empty(v.shape, dtype=bool)
    for t in range(tmax):
        m = masks[:, rows[t]]
        np.bitwise_and(v, m, out=s)
        np.add(s, v, out=s)
        np.less(s, v, out=carry)
        for w in range(1, words):  # ripple the carries between 64-bit words
            s[w] += carry[w - 1]
            carry[w] |= carry[w - 1] & (s[w] == 0)
        np.invert(m, out=m)
        np.bitwise_and(v, m, out=v)
        np.bitwise_or(v, s, out=v)
    return words * 64 - np.bitwise_count(v).sum(axis=0).astype(np.int64)


def distance_to_closest_record(
    query_emb: np.ndarray, reference_emb: np.ndarray, *, block: int = 1024
) -> np.ndarray:
    """Cosine distance (0..2) from each query row to its closest reference row."""
    q, r = _unit(query_emb, "query_emb"), _unit(reference_emb, "reference_emb")
    if q.shape[1] != r.shape[1]:
        raise InputError(
            "embedding dimensions differ",
            [Problem("reference_emb", f"dim {r.shape[1]} != {q.shape[1]}")],
        )
    if len(r) == 0:
        raise InputError("no reference embeddings", [Problem("reference_emb", "is empty")])
    best = np.empty(len(q))
    for lo in range(0, len(q), block):
        best[lo : lo + block] = (q[lo : lo + block] @ r.T).max(axis=1)
    return 1.0 - best


def _unit(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    problems = []
    if x.ndim != 2:
        problems.append(Problem(name, f"must be 2-D (rows x dim), got shape {x.shape}"))
    elif not np.isfinite(x).all():
        problems.append(Problem(name, "contains NaN or infinite values"))
    else:
        norms = np.linalg.norm(x, axis=1)
        if (norms == 0).any():
            problems.append(Problem(name, f"{int((norms == 0).sum())} rows have zero norm"))
    if problems:
        raise InputError("invalid embeddings", problems)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


_SPACE = re.compile(r"\s+")
_PIECE = re.compile(r"\w+|[^\w\s]")
_WORD = re.compile(r"\w")
MIN_IDENTIFIER_CHARS = 4


def _norm(text: str) -> str:
    return _SPACE.sub(" ", text.lower()).strip()


def phi_echo(synthetic: Sequence[str], identifiers: Iterable[str]) -> list[list[str]]:
    """Per report, the known identifiers (as given, first spelling) that appear in it.

    Matching is case-insensitive, whitespace-normalised (runs of whitespace = one
    space) and on word boundaries: "Anna" is found in "saw anna today" but not in
    "Savannah". Identifiers shorter than 4 characters are ignored (too many false
    hits). Each hit is PHI copied into a synthetic report.
    """
    problems = text_problems(synthetic, "synthetic")
    idents = list(identifiers) if not isinstance(identifiers, str) else [identifiers]
    problems += [
        Problem("identifiers", f"item {i} is {type(x).__name__}, not str")
        for i, x in enumerate(idents)
        if not isinstance(x, str)
    ][:10]
    if problems:
        raise InputError("cannot check PHI echo", problems)
    by_first: dict[str, dict[str, str]] = {}
    for ident in idents:
        norm = _norm(ident)
        if len(norm) >= MIN_IDENTIFIER_CHARS:
            by_first.setdefault(_PIECE.match(norm).group(), {}).setdefault(norm, ident)
    out: list[list[str]] = []
    for text in synthetic:
        norm = _norm(text)
        found: dict[str, None] = {}
        for piece in _PIECE.finditer(norm):
            start = piece.start()  # pieces are whole \w+ runs, so the start is a word boundary
            for ident, original in by_first.get(piece.group(), {}).items():
                end = start + len(ident)
                if not norm.startswith(ident, start):
                    continue
                if _WORD.match(ident[-1]) and end < len(norm) and _WORD.match(norm[end]):
                    continue  # ident continues into a longer word
                found[original] = None
        out.append(list(found))
    return out


def phi_echo_rate(echoes: Sequence[Sequence[str]]) -> float:
    """Share of reports echoing at least one known identifier (0 for no reports)."""
    return float(np.mean([len(e) > 0 for e in echoes])) if len(echoes) else 0.0


def privacy_cells(
    *,
    echoes: Sequence[Sequence[str]] | None = None,
    dcr_share: float | None = None,
    n_dcr: int = 0,
    exposures: Sequence[float] | None = None,
) -> dict[str, Cell]:
    """Cells for the other privacy scalars: PHI echo rate (n = reports), DCR share
    (n = ``n_dcr``, the synthetic reports scored), max canary exposure (n = canaries)."""
    out: dict[str, Cell] = {}
    if echoes is not None:
        out["privacy.phi_echo_rate"] = Cell(phi_echo_rate(echoes), len(echoes))
    if dcr_share is not None:
        out["privacy.dcr_train_closer_share"] = Cell(float(dcr_share), n_dcr)
    if exposures:
        out["privacy.canary_exposure_max"] = Cell(float(max(exposures)), len(exposures))
    return out


def canary_exposure(candidate_logprobs: np.ndarray, true_index: int) -> float:
    """Secret Sharer exposure (Carlini et al. 2019), in bits: log2(n) - log2(rank).

    ``candidate_logprobs``: model log-likelihood of the true canary and of n-1
    alternatives from the same template; rank 1 = most likely; ties are resolved
    in the secret's favour (rank = 1 + number strictly more likely), the
    conservative choice. When the alternatives are a uniform sample of a larger
    space R, the estimator is rank scaled to the full space, rank_R ~ rank * |R| / n,
    which gives the same log2(n) - log2(rank): exposure is then resolved only up to
    log2(n) bits (score 2^E alternatives to see E bits). The paper's distribution-fit
    (skew-normal) extrapolation is not used. Exposure 0 = the secret is the least
    likely candidate; log2(n) = it is the most likely (memorized).
    """
    lp = np.asarray(candidate_logprobs, dtype=np.float64)
    problems = []
    if lp.ndim != 1 or len(lp) < 2:
        problems.append(
            Problem("candidate_logprobs", f"need a 1-D array of >= 2 values, got shape {lp.shape}")
        )
    elif not np.isfinite(lp).all():
        problems.append(Problem("candidate_logprobs", "contains NaN or infinite values"))
    if (
        isinstance(true_index, bool)
        or not isinstance(true_index, (int, np.integer))
        or not 0 <= true_index < max(lp.size, 1)
    ):
        problems.append(Problem("true_index", f"must index candidate_logprobs, got {true_index!r}"))
    if problems:
        raise ConfigError("cannot compute canary exposure", problems)
    rank = 1 + int(np.sum(lp > lp[true_index]))
    return float(np.log2(len(lp)) - np.log2(rank))
