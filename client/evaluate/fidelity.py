"""Fidelity: do synthetic reports look like real notes of the code they were conditioned on?

Every function takes embeddings (float arrays of shape (n, d), one row per
text, as made by :class:`client.evaluate.embeddings.Embedder`) and code labels
(one string per row; for real notes the primary ICD-10 code). Codes are
compared as given, so callers pass canonical codes (``shared.icd10.normalize``).

Privacy meaning: results hold per-report arrays for the site's own inspection;
only the scalar ``cells()`` go to :func:`client.evaluate.summary.build_summary`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import stats
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score

from client.evaluate.summary import Cell
from client.evaluate.tokens import word_tokens
from shared.errors import InputError, Problem


def check_embeddings(emb: np.ndarray, codes: Sequence[str] | None, where: str) -> list[Problem]:
    """Problems with one embedding matrix (and its code labels, when given)."""
    problems: list[Problem] = []
    if not isinstance(emb, np.ndarray) or emb.ndim != 2:
        return [Problem(where, "expected a 2-d numpy array (n, d)")]
    if not np.issubdtype(emb.dtype, np.floating):
        problems.append(Problem(where, f"expected floats, got dtype {emb.dtype}"))
    elif not np.isfinite(emb).all():
        problems.append(Problem(where, "contains NaN or infinite values"))
    if codes is not None:
        if isinstance(codes, str) or len(codes) != emb.shape[0]:
            problems.append(Problem(where, f"{emb.shape[0]} rows but {len(codes)} code labels"))
        elif not all(isinstance(c, str) and c for c in codes):
            problems.append(Problem(where, "every code label must be a non-empty string"))
    return problems


def _validate(*items: tuple[np.ndarray, Sequence[str] | None, str]) -> None:
    problems: list[Problem] = []
    for emb, codes, where in items:
        problems += check_embeddings(emb, codes, where)
    dims = {emb.shape[1] for emb, _, _ in items if isinstance(emb, np.ndarray) and emb.ndim == 2}
    if len(dims) > 1:
        problems.append(Problem("embeddings", f"different widths {sorted(dims)}: embed with one model"))
    if problems:
        raise InputError("invalid fidelity input", problems)


def _unit(emb: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    return emb / np.where(norms > 0, norms, 1.0)


def _finite_cells(pairs: dict[str, tuple[float, int]]) -> dict[str, Cell]:
    return {k: Cell(float(v), int(n)) for k, (v, n) in pairs.items() if math.isfinite(v)}


@dataclass(frozen=True)
class CentroidResult:
    """Per-report cosine to own-code centroid, margin over best other centroid, nearest-is-own flag.

    Arrays cover the ``n_scored`` synthetic reports whose code has real notes
    (``scored_index`` gives their positions in the input); ``skipped_codes``
    had none. ``margin`` is NaN everywhere when real notes cover one code only.
    """

    cosine: np.ndarray
    margin: np.ndarray
    own_nearest: np.ndarray
    scored_index: np.ndarray
    skipped_codes: tuple[str, ...]
    cosine_mean: float
    margin_mean: float
    own_nearest_share: float

    @property
    def n_scored(self) -> int:
        return int(self.scored_index.size)

    def cells(self) -> dict[str, Cell]:
        n = self.n_scored
        return _finite_cells({
            "fidelity.centroid_cosine_mean": (self.cosine_mean, n),
            "fidelity.centroid_margin_mean": (self.margin_mean, n),
            "fidelity.own_code_nearest_share": (self.own_nearest_share, n),
        })


def centroid_similarity(
    real_emb: np.ndarray, real_codes: Sequence[str], synth_emb: np.ndarray, synth_codes: Sequence[str]
) -> CentroidResult:
    """Cosine of each synthetic embedding to the (normalised) mean of real embeddings of its code."""
    _validate((real_emb, real_codes, "real_emb"), (synth_emb, synth_codes, "synth_emb"))
    codes = sorted(set(real_codes))
    if not codes:
        raise InputError("centroid similarity needs at least one real note")
    real_u = _unit(real_emb.astype(np.float64))
    labels = np.asarray(real_codes)
    centroids = _unit(np.stack([real_u[labels == c].mean(axis=0) for c in codes]))
    sims = _unit(synth_emb.astype(np.float64)) @ centroids.T  # (n_synth, n_codes)
    pos = {c: i for i, c in enumerate(codes)}
    scored = np.array([i for i, c in enumerate(synth_codes) if c in pos], dtype=np.int64)
    own = np.array([pos[synth_codes[i]] for i in scored], dtype=np.int64)
    skipped = tuple(sorted({c for c in synth_codes if c not in pos}))
    if scored.size == 0:
        empty = np.zeros(0)
        return CentroidResult(empty, empty, empty.astype(bool), scored, skipped, math.nan, math.nan, math.nan)
    s = sims[scored]
    cosine = s[np.arange(scored.size), own]
    if len(codes) > 1:
        others = s.copy()
        others[np.arange(scored.size), own] = -np.inf
        margin = cosine - others.max(axis=1)
    else:
        margin = np.full(scored.size, math.nan)
    own_nearest = s.argmax(axis=1) == own
    return CentroidResult(
        cosine=cosine,
        margin=margin,
        own_nearest=own_nearest,
        scored_index=scored,
        skipped_codes=skipped,
        cosine_mean=float(cosine.mean()),
        margin_mean=float(margin.mean()) if len(codes) > 1 else math.nan,
        own_nearest_share=float(own_nearest.mean()),
    )


def _classifier(seed: int) -> LogisticRegression:
    # Balanced weights so a frequent code cannot carry the macro-F1.
    return LogisticRegression(max_iter=2000, class_weight="balanced", random_state=seed)


def _fit_predict(train_x: np.ndarray, train_y: Sequence[str], test_x: np.ndarray, seed: int) -> np.ndarray:
    clf = _classifier(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(train_x, np.asarray(train_y))
    return clf.predict(test_x)


def _macro_f1(y_true: Sequence[str], y_pred: np.ndarray, labels: Sequence[str]) -> float:
    return float(f1_score(np.asarray(y_true), y_pred, labels=list(labels), average="macro", zero_division=0))


@dataclass(frozen=True)
class ClassifierResult:
    """Macro-F1 of a classifier trained on real notes predicting synthetic reports' conditioning codes.

    Only synthetic reports whose code occurs in the real training notes are
    scored (``n_scored``); ``excluded_codes`` lists the others. ``note`` says
    what was restricted or why the score is NaN.
    """

    macro_f1: float
    n_scored: int
    labels: tuple[str, ...]
    excluded_codes: tuple[str, ...]
    predictions: np.ndarray
    note: str

    def cells(self) -> dict[str, Cell]:
        return _finite_cells({"fidelity.real_classifier_macro_f1": (self.macro_f1, self.n_scored)})


def real_classifier_f1(
    real_emb: np.ndarray,
    real_codes: Sequence[str],
    synth_emb: np.ndarray,
    synth_codes: Sequence[str],
    *,
    seed: int = 0,
) -> ClassifierResult:
    """Train logistic regression on real embeddings → predict synthetic codes → macro-F1 over shared codes."""
    _validate((real_emb, real_codes, "real_emb"), (synth_emb, synth_codes, "synth_emb"))
    real_set = set(real_codes)
    keep = np.array([i for i, c in enumerate(synth_codes) if c in real_set], dtype=np.int64)
    excluded = tuple(sorted({c for c in synth_codes if c not in real_set}))
    labels = tuple(sorted({synth_codes[i] for i in keep}))
    notes = []
    if excluded:
        notes.append(f"{len(excluded)} synthetic codes absent from real notes were not scored")
    if len(real_set) < 2 or keep.size == 0:
        notes.append("needs real notes of at least 2 codes and a synthetic report of a shared code")
        return ClassifierResult(math.nan, 0, labels, excluded, np.zeros(0, dtype=object), "; ".join(notes))
    pred = _fit_predict(real_emb, real_codes, synth_emb[keep], seed)
    truth = [synth_codes[i] for i in keep]
    return ClassifierResult(_macro_f1(truth, pred, labels), int(keep.size), labels, excluded, pred, "; ".join(notes))


@dataclass(frozen=True)
class TstrResult:
    """Train-synthetic-test-real vs train-real-test-real macro-F1 on the codes all three sets share.

    ``ratio`` = tstr / trtr (1.0: synthetic data trains a classifier as well as
    real data does). ``dropped`` maps each side to the codes left out because
    another side lacked them; ``note`` explains restrictions or NaN.
    """

    tstr_macro_f1: float
    trtr_macro_f1: float
    ratio: float
    shared_codes: tuple[str, ...]
    dropped: dict[str, tuple[str, ...]]
    n_synth_train: int
    n_real_train: int
    n_real_test: int
    note: str = field(default="")

    def cells(self) -> dict[str, Cell]:
        n_tstr = min(self.n_synth_train, self.n_real_test)
        n_trtr = min(self.n_real_train, self.n_real_test)
        return _finite_cells({
            "fidelity.tstr_macro_f1": (self.tstr_macro_f1, n_tstr),
            "fidelity.trtr_macro_f1": (self.trtr_macro_f1, n_trtr),
            "fidelity.tstr_trtr_ratio": (self.ratio, min(n_tstr, n_trtr)),
        })


def tstr_trtr(
    real_train_emb: np.ndarray,
    real_train_codes: Sequence[str],
    real_test_emb: np.ndarray,
    real_test_codes: Sequence[str],
    synth_emb: np.ndarray,
    synth_codes: Sequence[str],
    *,
    seed: int = 0,
) -> TstrResult:
    """TSTR and TRTR macro-F1 on held-out real notes, both restricted to the codes every set has.

    Held-out real notes must come from patients not in ``real_train`` (a
    patient-level split), or TRTR is inflated by near-copies.
    """
    _validate(
        (real_train_emb, real_train_codes, "real_train_emb"),
        (real_test_emb, real_test_codes, "real_test_emb"),
        (synth_emb, synth_codes, "synth_emb"),
    )
    sides = {"real_train": set(real_train_codes), "real_test": set(real_test_codes), "synthetic": set(synth_codes)}
    shared = sides["real_train"] & sides["real_test"] & sides["synthetic"]
    dropped = {k: tuple(sorted(v - shared)) for k, v in sides.items() if v - shared}
    note = ""
    if dropped:
        note = "restricted to codes present in real train, real test and synthetic; dropped: " + "; ".join(
            f"{k}: {', '.join(v)}" for k, v in dropped.items()
        )

    def pick(codes: Sequence[str]) -> np.ndarray:
        return np.array([i for i, c in enumerate(codes) if c in shared], dtype=np.int64)

    i_tr, i_te, i_sy = pick(real_train_codes), pick(real_test_codes), pick(synth_codes)
    labels = tuple(sorted(shared))
    if len(shared) < 2:
        note = (note + "; " if note else "") + "needs at least 2 shared codes: no score"
        return TstrResult(math.nan, math.nan, math.nan, labels, dropped, i_sy.size, i_tr.size, i_te.size, note)
    test_x = real_test_emb[i_te]
    test_y = [real_test_codes[i] for i in i_te]
    tstr = _macro_f1(test_y, _fit_predict(synth_emb[i_sy], [synth_codes[i] for i in i_sy], test_x, seed), labels)
    trtr = _macro_f1(
        test_y, _fit_predict(real_train_emb[i_tr], [real_train_codes[i] for i in i_tr], test_x, seed), labels
    )
    ratio = tstr / trtr if trtr > 0 else math.nan
    return TstrResult(tstr, trtr, ratio, labels, dropped, int(i_sy.size), int(i_tr.size), int(i_te.size), note)


def frechet_distance(a: np.ndarray, b: np.ndarray, *, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussian fits of two embedding sets (each ≥ 2 rows).

    ``‖μa − μb‖² + Tr(Σa + Σb − 2 (Σa Σb)^½)`` with ``eps·I`` added to each
    covariance. The trace of the matrix square root is taken as the sum of
    square roots of the eigenvalues of the symmetric ``Σa^½ Σb Σa^½`` (same
    value, but stable for the rank-deficient covariances that few notes in
    384 dimensions give, where ``sqrtm(Σa Σb)`` returns complex noise).
    """
    _validate((a, None, "a"), (b, None, "b"))
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise InputError("the Fréchet distance needs at least 2 embeddings per side")
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    eye = np.eye(a64.shape[1])
    cov_a = np.cov(a64, rowvar=False) + eps * eye
    cov_b = np.cov(b64, rowvar=False) + eps * eye
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = sqrt_a @ cov_b @ sqrt_a
    tr_sqrt = float(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum())
    diff = a64.mean(axis=0) - b64.mean(axis=0)
    value = float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_sqrt)
    return max(value, 0.0)


@dataclass(frozen=True)
class FrechetResult:
    """Per-code Fréchet distances (codes with ≥ ``min_per_side`` on both sides) and their mean."""

    per_code: dict[str, float]
    mean: float
    skipped_codes: tuple[str, ...]
    n_notes: int  # real + synthetic rows in the compared codes

    @property
    def n_skipped(self) -> int:
        return len(self.skipped_codes)

    def cells(self) -> dict[str, Cell]:
        return _finite_cells({"fidelity.frechet_distance_mean": (self.mean, self.n_notes)})


def frechet_per_code(
    real_emb: np.ndarray,
    real_codes: Sequence[str],
    synth_emb: np.ndarray,
    synth_codes: Sequence[str],
    *,
    min_per_side: int = 2,
    eps: float = 1e-6,
) -> FrechetResult:
    """Fréchet distance per code between real and synthetic embeddings; mean over compared codes.

    A code with fewer than ``min_per_side`` (≥ 2) embeddings on either side is
    skipped and listed. Lower is closer; 0 means identical Gaussian fits.
    """
    _validate((real_emb, real_codes, "real_emb"), (synth_emb, synth_codes, "synth_emb"))
    if min_per_side < 2:
        raise InputError(f"min_per_side must be at least 2, got {min_per_side}")
    r_lab, s_lab = np.asarray(real_codes), np.asarray(synth_codes)
    per_code: dict[str, float] = {}
    skipped: list[str] = []
    n_notes = 0
    for code in sorted(set(real_codes) | set(synth_codes)):
        r, s = real_emb[r_lab == code], synth_emb[s_lab == code]
        if r.shape[0] < min_per_side or s.shape[0] < min_per_side:
            skipped.append(code)
            continue
        per_code[code] = frechet_distance(r, s, eps=eps)
        n_notes += r.shape[0] + s.shape[0]
    mean = float(np.mean(list(per_code.values()))) if per_code else math.nan
    return FrechetResult(per_code, mean, tuple(skipped), n_notes)


def word_count(text: str) -> int:
    """Words in ``text``: tokens of :func:`word_tokens` that are letters/digits (punctuation not counted)."""
    return sum(1 for t in word_tokens(text) if t[0].isalnum())


@dataclass(frozen=True)
class LengthResult:
    """Synthetic vs real length in words: ratio of means and the two-sample KS statistic (0 = same)."""

    real_mean: float
    synth_mean: float
    ratio: float
    ks: float
    n_real: int
    n_synth: int

    def cells(self) -> dict[str, Cell]:
        n = min(self.n_real, self.n_synth)
        return _finite_cells({"fidelity.length_ratio": (self.ratio, n), "fidelity.length_ks": (self.ks, n)})


def length_distribution(real_texts: Sequence[str], synth_texts: Sequence[str]) -> LengthResult:
    """Mean-length ratio (synthetic / real, in words) and the KS statistic between length distributions."""
    problems = [
        Problem(where, "expected a non-empty sequence of strings")
        for where, texts in (("real_texts", real_texts), ("synth_texts", synth_texts))
        if isinstance(texts, str) or not texts or not all(isinstance(t, str) for t in texts)
    ]
    if problems:
        raise InputError("invalid length input", problems)
    real = np.array([word_count(t) for t in real_texts], dtype=np.float64)
    synth = np.array([word_count(t) for t in synth_texts], dtype=np.float64)
    ratio = float(synth.mean() / real.mean()) if real.mean() > 0 else math.nan
    ks = float(stats.ks_2samp(real, synth).statistic)
    return LengthResult(float(real.mean()), float(synth.mean()), ratio, ks, real.size, synth.size)
