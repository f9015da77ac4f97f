"""Distance to closest record (DCR): every report against every training note, read
against held-out patients' notes (never trained on) at the same distance.

Embeddings come from :class:`client.evaluate.embeddings.Embedder` (cosine
distance, 0..2). Site-only: every number here is a function of private notes;
what leaves the site is only the DP per-patient release (docs/metrics.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from client.evaluate.privacy import distance_to_closest_record
from client.evaluate.summary import Cell
from client.evaluate.tokens import word_tokens
from shared.errors import InputError, Problem

# Cosine distance at or below which a report counts as a near-exact copy of a training note
# (MiniLM puts paraphrases of one note at ~0.02-0.1; re-spacing or re-casing one at ~0.00x).
NEAR_COPY_DISTANCE = 0.01
DCR_QUANTILES = (0.01, 0.05, 0.25, 0.5)


@dataclass(frozen=True)
class DcrContrast:
    """Distance to closest record (cosine, 0..2) against ALL training notes, read against
    the same distance for held-out patients' notes (never trained on).

    Site-only: every number here is a function of private notes.

    d_train: per report, distance to its closest training note (exact, every note compared).
    heldout_d_train: per held-out note, distance to its closest training note: what a note
        of an unseen patient of the same population reaches — the "not memorized" baseline.
    train_closer_share: share of reports closer to training notes than the median held-out
        note is (ties count 0.5). A generator that learned the population but not the
        training notes scores ~0.5; copies score 1.
    below_heldout_p05_share: share of reports closer than the 5 % closest held-out notes
        (ideal ~0.05).
    exact_copy_rate: share of reports whose normalised text equals a training note's
        (0 when texts were not given). near_copy_rate: share within NEAR_COPY_DISTANCE of a
        training note, or an exact copy.
    """

    d_train: np.ndarray
    heldout_d_train: np.ndarray
    train_closer_share: float
    below_heldout_p05_share: float
    exact_copy_rate: float
    near_copy_rate: float

    def quantiles(self) -> dict[float, float]:
        """Quantiles of the reports' distance to the closest training note."""
        return {q: float(np.quantile(self.d_train, q)) for q in DCR_QUANTILES}

    def cells(self) -> dict[str, Cell]:
        n = len(self.d_train)
        out = {
            "privacy.dcr_train_closer_share": Cell(self.train_closer_share, n),
            "privacy.dcr_below_heldout_p05_share": Cell(self.below_heldout_p05_share, n),
            "privacy.dcr_exact_copy_rate": Cell(self.exact_copy_rate, n),
            "privacy.dcr_near_copy_rate": Cell(self.near_copy_rate, n),
        }
        for q, v in self.quantiles().items():
            out[f"privacy.dcr_train_q{round(q * 100):02d}"] = Cell(v, n)
        hq = np.quantile(self.heldout_d_train, [0.05, 0.5])
        out["privacy.heldout.dcr_train_q05"] = Cell(float(hq[0]), len(self.heldout_d_train))
        out["privacy.heldout.dcr_train_q50"] = Cell(float(hq[1]), len(self.heldout_d_train))
        return out


def _share_below(x: np.ndarray, threshold: float) -> float:
    return float(np.mean(np.where(x < threshold, 1.0, np.where(x == threshold, 0.5, 0.0))))


def dcr_contrast(
    synthetic_emb: np.ndarray,
    train_emb: np.ndarray,
    heldout_emb: np.ndarray,
    *,
    synthetic_texts: Sequence[str] | None = None,
    train_texts: Sequence[str] | None = None,
) -> DcrContrast:
    """DCR of every report against every training note, and the held-out baseline.

    No subsampling: a copy of any training note is found. Exact (blocked matrix
    products over normalised embeddings, O(reports x notes x dim), a few ms at
    site sizes). ``synthetic_texts``/``train_texts``: when both are given, exact
    copies are counted by hashing normalised texts.
    """
    tr, ho, sy = np.asarray(train_emb), np.asarray(heldout_emb), np.asarray(synthetic_emb)
    problems = []
    if tr.ndim != 2 or ho.ndim != 2 or len(tr) == 0 or len(ho) == 0:
        problems.append(Problem("train_emb/heldout_emb", f"need non-empty 2-D arrays, got shapes {tr.shape} and {ho.shape}"))
    if sy.ndim != 2 or len(sy) == 0:
        problems.append(Problem("synthetic_emb", f"needs a non-empty 2-D array, got shape {sy.shape}"))
    if synthetic_texts is not None and len(synthetic_texts) != len(sy):
        problems.append(Problem("synthetic_texts", f"{len(synthetic_texts)} texts for {len(sy)} embeddings"))
    if problems:
        raise InputError("cannot compute DCR", problems)
    d_tr = distance_to_closest_record(sy, tr)
    d_ho = distance_to_closest_record(ho, tr)
    exact = np.zeros(len(sy), dtype=bool)
    if synthetic_texts is not None and train_texts is not None:
        seen = {" ".join(word_tokens(t)) for t in train_texts}
        exact = np.array([" ".join(word_tokens(t)) in seen for t in synthetic_texts], dtype=bool)
    return DcrContrast(
        d_train=d_tr,
        heldout_d_train=d_ho,
        train_closer_share=_share_below(d_tr, float(np.median(d_ho))),
        below_heldout_p05_share=_share_below(d_tr, float(np.quantile(d_ho, 0.05))),
        exact_copy_rate=float(exact.mean()),
        near_copy_rate=float(np.mean(exact | (d_tr <= NEAR_COPY_DISTANCE))),
    )


def dcr_train_closer_share(
    synthetic_emb: np.ndarray, train_emb: np.ndarray, heldout_emb: np.ndarray
) -> float:
    """Share of reports closer to the training notes than the median held-out note is
    (:attr:`DcrContrast.train_closer_share`): ~0.5 when reports are like unseen
    patients' notes, 1.0 for copies of training notes. Every training note is compared.
    """
    return dcr_contrast(synthetic_emb, train_emb, heldout_emb).train_closer_share
