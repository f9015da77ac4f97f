"""Diversity: is the synthetic corpus varied, or a few reports rephrased (mode collapse)?

Lexical metrics use :func:`client.evaluate.tokens.word_tokens` (lower-cased
words and punctuation), never a model tokenizer, so corpora from different
model families compare. Embedding metrics take L2-normalised embeddings from
:class:`client.evaluate.embeddings.Embedder`. Sampling is seeded.

These metrics describe synthetic text (plus, for the collapse ratio, real
notes' within-code similarity); only the scalar ``cells()`` leave the site.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sacrebleu.metrics.bleu import BLEU

from client.evaluate.fidelity import check_embeddings
from client.evaluate.inputs import check_texts
from client.evaluate.summary import Cell
from client.evaluate.tokens import word_tokens
from shared.errors import InputError, Problem


def total_tokens(texts: Sequence[str]) -> int:
    """Number of :func:`word_tokens` tokens in a corpus (for choosing a matched ``token_budget``)."""
    return sum(len(word_tokens(t)) for t in texts)


# Reports per Self-BLEU subset (docs/metrics.md): each is scored against the other 99.
SELF_BLEU_SUBSET = 100


@dataclass(frozen=True)
class MatchedReference:
    """Which real notes the diversity reference uses, and the shared distinct-n token budget.

    ``indices``: a uniform sample without replacement of min(reports, notes) real notes
    (sorted). ``token_budget``: min(tokens of all reports, tokens of the sampled notes),
    so distinct-n of both corpora is measured on equally many tokens; None when
    either side has no tokens (distinct-n is then not computed).
    """

    indices: np.ndarray
    token_budget: int | None


def matched_reference(
    report_tokens: Sequence[int], note_tokens: Sequence[int], *, seed: int
) -> MatchedReference:
    """Sample the real-note reference for the diversity metrics and the matched budget.

    ``report_tokens``/``note_tokens``: :func:`word_tokens` counts per report / per note.
    The budget is computed over the SAME notes the reference then uses, so it never
    exceeds either corpus (it is at most each side's total).
    """
    problems = [
        Problem(name, "must be a non-empty sequence of non-negative integer token counts")
        for name, counts in (("report_tokens", report_tokens), ("note_tokens", note_tokens))
        if isinstance(counts, str) or not isinstance(counts, Sequence) or not len(counts)
        or any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 0 for c in counts)
    ]
    if problems:
        raise InputError("invalid diversity reference input", problems)
    m = min(len(report_tokens), len(note_tokens))
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(note_tokens), size=m, replace=False))
    budget = min(int(sum(report_tokens)), int(sum(int(note_tokens[i]) for i in idx)))
    return MatchedReference(idx, budget if budget >= 1 else None)


@dataclass(frozen=True)
class DistinctResult:
    """distinct-n = unique n-grams / n-grams, over a sample of ``tokens_used`` tokens."""

    distinct: dict[int, float]
    tokens_used: int
    n_reports: int  # reports (whole or cut) that the sample drew from
    matched: bool  # False when no budget was given: the whole corpus was used

    def cells(self) -> dict[str, Cell]:
        return {
            f"diversity.distinct_{k}": Cell(v, self.n_reports)
            for k, v in self.distinct.items()
            if k in (1, 2, 3) and math.isfinite(v)
        }


def distinct_n(
    texts: Sequence[str], *, token_budget: int | None = None, ns: Sequence[int] = (1, 2, 3), seed: int = 0
) -> DistinctResult:
    """distinct-n on a token-count-matched sample.

    Reports are shuffled (``seed``) and taken whole until ``token_budget``
    tokens are collected, the last one cut to fit; n-grams never cross report
    boundaries. Give every corpus the same budget (e.g. the smallest
    :func:`total_tokens`): distinct-n falls as the sample grows, so only equal
    budgets compare. ``None`` uses all tokens (``matched`` = False).
    """
    check_texts(texts, "texts", min_n=1)
    docs = [word_tokens(t) for t in texts]
    available = sum(len(d) for d in docs)
    problems = []
    if token_budget is not None and (not isinstance(token_budget, int) or token_budget < 1):
        problems.append(Problem("token_budget", f"must be a positive integer, got {token_budget!r}"))
    elif token_budget is not None and token_budget > available:
        problems.append(Problem("token_budget", f"{token_budget} exceeds the corpus's {available} tokens"))
    if not ns or any(not isinstance(n, int) or n < 1 for n in ns):
        problems.append(Problem("ns", f"must be positive integers, got {ns!r}"))
    if problems:
        raise InputError("invalid distinct-n input", problems)
    budget = available if token_budget is None else token_budget
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    sample: list[list[str]] = []
    left = budget
    for i in order:
        if left <= 0:
            break
        if docs[i]:
            sample.append(docs[i][:left])
            left -= len(sample[-1])
    distinct: dict[int, float] = {}
    for n in ns:
        grams = [tuple(d[j : j + n]) for d in sample for j in range(len(d) - n + 1)]
        distinct[n] = len(set(grams)) / len(grams) if grams else math.nan
    return DistinctResult(distinct, budget, len(sample), token_budget is not None)


@dataclass(frozen=True)
class SelfBleuResult:
    """Mean sentence BLEU-4 (0–1) of each sampled report against the other sampled reports."""

    self_bleu: float
    subset_size: int

    def cells(self) -> dict[str, Cell]:
        return {"diversity.self_bleu_4": Cell(self.self_bleu, self.subset_size)} if math.isfinite(self.self_bleu) else {}


def self_bleu(texts: Sequence[str], *, subset_size: int = SELF_BLEU_SUBSET, seed: int = 0) -> SelfBleuResult:
    """Self-BLEU-4 on a seeded subset of ``subset_size`` reports (all when fewer).

    Each report is the hypothesis, the other subset reports its references
    (sacrebleu sentence BLEU, exponential smoothing, on word_tokens joined by
    spaces). 1.0 = every report is a copy of another; lower = more varied.
    Compare corpora only at the same ``subset_size``: more references raise it.
    Cost grows as subset_size² × report length.
    """
    check_texts(texts, "texts", min_n=2)
    if not isinstance(subset_size, int) or subset_size < 2:
        raise InputError(f"subset_size must be an integer ≥ 2, got {subset_size!r}")
    idx = list(range(len(texts)))
    random.Random(seed).shuffle(idx)
    chosen = [" ".join(word_tokens(texts[i])) for i in idx[:subset_size]]
    bleu = BLEU(tokenize="none", effective_order=True, max_ngram_order=4)
    scores = [
        bleu.sentence_score(hyp, chosen[:j] + chosen[j + 1 :]).score / 100.0 for j, hyp in enumerate(chosen)
    ]
    return SelfBleuResult(float(np.mean(scores)), len(chosen))


def _mtld_pass(tokens: Sequence[str], threshold: float) -> float:
    factors, types, count, ttr = 0.0, set(), 0, 1.0
    for tok in tokens:
        count += 1
        types.add(tok)
        ttr = len(types) / count
        if ttr <= threshold:
            factors += 1.0
            types, count, ttr = set(), 0, 1.0
    factors += (1.0 - ttr) / (1.0 - threshold)  # partial factor for the unfinished segment
    return len(tokens) / factors if factors > 0 else math.nan


def mtld_tokens(tokens: Sequence[str], *, threshold: float = 0.72) -> float:
    """MTLD of one token sequence: mean of the forward and backward passes (McCarthy & Jarvis 2010).

    NaN when a pass never completes any factor (every word new: the text is too
    short to measure).
    """
    return (_mtld_pass(tokens, threshold) + _mtld_pass(list(reversed(tokens)), threshold)) / 2.0


@dataclass(frozen=True)
class MtldResult:
    """Mean per-report MTLD over ``n_scored`` reports (``n_unmeasurable`` too short to score)."""

    mtld: float
    per_report: np.ndarray
    n_scored: int
    n_unmeasurable: int

    def cells(self) -> dict[str, Cell]:
        return {"diversity.mtld": Cell(self.mtld, self.n_scored)} if math.isfinite(self.mtld) else {}


def mtld(texts: Sequence[str], *, threshold: float = 0.72) -> MtldResult:
    """MTLD of each report over its words (punctuation tokens dropped), and the mean.

    Higher = richer vocabulary within a report. MTLD is per text: a corpus of
    100 copies of one good report scores as well as that report (use
    distinct-n, Self-BLEU and the duplicate rates for cross-report repetition).
    """
    check_texts(texts, "texts", min_n=1)
    if not 0.0 < threshold < 1.0:
        raise InputError(f"threshold must be in (0, 1), got {threshold}")
    per = np.array([mtld_tokens([t for t in word_tokens(x) if t[0].isalnum()], threshold=threshold)
                    for x in texts])
    ok = np.isfinite(per)
    return MtldResult(float(per[ok].mean()) if ok.any() else math.nan, per, int(ok.sum()), int((~ok).sum()))


def _unit(emb: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    return emb / np.where(norms > 0, norms, 1.0)


def vendi_score(emb: np.ndarray) -> float:
    """exp(Shannon entropy of the eigenvalues of K/n), K the cosine-similarity kernel of ``emb``.

    The effective number of distinct items: 1 when all embeddings are equal,
    k for k mutually orthogonal ones, at most min(n, d). Eigenvalues are taken
    from the d×d Gram matrix when n > d (same non-zero spectrum, cheaper).
    """
    problems = check_embeddings(emb, None, "emb")
    if not problems and emb.shape[0] < 1:
        problems.append(Problem("emb", "needs at least one embedding"))
    if problems:
        raise InputError("invalid Vendi input", problems)
    x = _unit(emb.astype(np.float64))
    n = x.shape[0]
    gram = (x.T @ x) if n > x.shape[1] else (x @ x.T)
    lam = np.clip(np.linalg.eigvalsh(gram / n), 0.0, None)
    lam = lam[lam > 1e-12]
    lam = lam / lam.sum()  # trace(K)/n = 1 for unit rows; renormalise rounding only
    return float(math.exp(-(lam * np.log(lam)).sum()))


def mean_pairwise_cosine(emb: np.ndarray) -> float:
    """Mean cosine similarity over distinct pairs (i ≠ j) of rows; needs ≥ 2 rows. O(n·d)."""
    x = _unit(emb.astype(np.float64))
    n = x.shape[0]
    s = x.sum(axis=0)
    return float((s @ s - n) / (n * (n - 1)))


@dataclass(frozen=True)
class ModeCollapseResult:
    """Within-code mean pairwise cosine, synthetic vs real, and their ratio (> 1: more collapsed than real)."""

    ratio: float
    synth_similarity: float
    real_similarity: float
    per_code: dict[str, tuple[float, float]]  # code -> (synthetic, real) mean pairwise cosine
    skipped_codes: tuple[str, ...]
    n_notes: int

    def cells(self) -> dict[str, Cell]:
        return {"diversity.mode_collapse_ratio": Cell(self.ratio, self.n_notes)} if math.isfinite(self.ratio) else {}


def mode_collapse_ratio(
    real_emb: np.ndarray, real_codes: Sequence[str], synth_emb: np.ndarray, synth_codes: Sequence[str]
) -> ModeCollapseResult:
    """Mean over codes of synthetic within-code similarity divided by the same for real notes.

    Only codes with ≥ 2 embeddings on both sides count (others listed in
    ``skipped_codes``). NaN when no code qualifies or real similarity ≤ 0.
    """
    problems = check_embeddings(real_emb, real_codes, "real_emb") + check_embeddings(synth_emb, synth_codes, "synth_emb")
    if problems:
        raise InputError("invalid mode-collapse input", problems)
    r_lab, s_lab = np.asarray(real_codes), np.asarray(synth_codes)
    per_code: dict[str, tuple[float, float]] = {}
    skipped, n_notes = [], 0
    for code in sorted(set(real_codes) | set(synth_codes)):
        r, s = real_emb[r_lab == code], synth_emb[s_lab == code]
        if r.shape[0] < 2 or s.shape[0] < 2:
            skipped.append(code)
            continue
        per_code[code] = (mean_pairwise_cosine(s), mean_pairwise_cosine(r))
        n_notes += min(r.shape[0], s.shape[0])
    if not per_code:
        return ModeCollapseResult(math.nan, math.nan, math.nan, per_code, tuple(skipped), 0)
    synth_sim = float(np.mean([v[0] for v in per_code.values()]))
    real_sim = float(np.mean([v[1] for v in per_code.values()]))
    ratio = synth_sim / real_sim if real_sim > 0 else math.nan
    return ModeCollapseResult(ratio, synth_sim, real_sim, per_code, tuple(skipped), n_notes)


def normalized_text(text: str) -> str:
    """Case, whitespace and spacing around punctuation removed: the form exact duplicates are compared in."""
    return " ".join(word_tokens(text))


def shingles(text: str, k: int = 5) -> frozenset[tuple[str, ...]]:
    """Set of word k-grams of ``text`` (a text shorter than k gives its whole token tuple)."""
    toks = word_tokens(text)
    if len(toks) < k:
        return frozenset({tuple(toks)})
    return frozenset(tuple(toks[i : i + k]) for i in range(len(toks) - k + 1))


def near_duplicate_flags(texts: Sequence[str], *, threshold: float = 0.8, k: int = 5) -> np.ndarray:
    """For each text: does another text have word-k-gram Jaccard ≥ ``threshold`` with it? (exact)

    An exact, indexed similarity join (prefix filtering): shingles are ordered
    rarest first; two sets with Jaccard ≥ t must share one of the first
    ``|s| − ⌈t·|s|⌉ + 1`` shingles of each, so only texts sharing such a
    shingle (and of compatible size) are compared. Identical shingle sets are
    grouped first, so exact copies cost nothing. No all-pairs loop.
    """
    check_texts(texts, "texts", min_n=1)
    if not 0.0 < threshold <= 1.0:
        raise InputError(f"threshold must be in (0, 1], got {threshold}")
    groups: dict[frozenset, list[int]] = defaultdict(list)
    for i, t in enumerate(texts):
        groups[shingles(t, k)].append(i)
    flags = np.zeros(len(texts), dtype=bool)
    uniq = list(groups)
    for s in uniq:
        if len(groups[s]) > 1:
            flags[groups[s]] = True
    # Shingle ids, then ranks ordered rarest first (ties by id): the global order prefixes use.
    ids: dict[tuple[str, ...], int] = {}
    arrays = [np.fromiter((ids.setdefault(g, len(ids)) for g in s), dtype=np.int64, count=len(s)) for s in uniq]
    freq = np.bincount(np.concatenate(arrays), minlength=len(ids))
    rank = np.empty(len(ids), dtype=np.int64)
    rank[np.lexsort((np.arange(len(ids)), freq))] = np.arange(len(ids))
    ranked = [np.sort(rank[a]) for a in arrays]
    order = sorted(range(len(uniq)), key=lambda u: ranked[u].size)  # smaller sets first
    index: dict[int, list[int]] = defaultdict(list)
    for u in order:
        size = ranked[u].size
        prefix = size - math.ceil(threshold * size - 1e-9) + 1
        seen: set[int] = set()
        for g in ranked[u][:prefix].tolist():
            for other in index[g]:
                if other in seen or ranked[other].size < threshold * size - 1e-9:
                    continue
                seen.add(other)
                inter = np.intersect1d(ranked[u], ranked[other], assume_unique=True).size
                if inter >= threshold * (size + ranked[other].size - inter) - 1e-9:
                    flags[groups[uniq[u]]] = True
                    flags[groups[uniq[other]]] = True
            index[g].append(u)
    return flags


@dataclass(frozen=True)
class DuplicateResult:
    """Exact duplicate rate (reports repeating an earlier one) and near-duplicate rate (Jaccard ≥ threshold)."""

    exact_rate: float
    near_rate: float
    n_reports: int

    def cells(self) -> dict[str, Cell]:
        return {
            "diversity.exact_duplicate_rate": Cell(self.exact_rate, self.n_reports),
            "diversity.near_duplicate_rate": Cell(self.near_rate, self.n_reports),
        }


def duplicate_rates(texts: Sequence[str], *, threshold: float = 0.8, k: int = 5) -> DuplicateResult:
    """Exact: (n − distinct normalised texts) / n. Near: share of reports with a near-duplicate partner.

    A corpus of one report repeated n times has exact rate (n−1)/n and near rate 1.
    """
    check_texts(texts, "texts", min_n=1)
    exact = 1.0 - len({normalized_text(t) for t in texts}) / len(texts)
    near = float(near_duplicate_flags(texts, threshold=threshold, k=k).mean())
    return DuplicateResult(exact, near, len(texts))
