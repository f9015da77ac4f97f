"""The held-out baseline: how close real notes of unseen patients come to the training notes.

Templated clinical notes share long spans ("Patient denies suicidal ideation,
homicidal ideation ...") across patients, so an absolute lexical threshold flags
text no model ever saw. Held-out patients were never trained on: whatever
closeness their real notes reach against the training notes is what "not
memorized" looks like at this site. Every memorization metric of a report is
read against the same metric for held-out notes, and the release gate blocks
only reports closer to the training patients than the held-out patients' notes
come (docs/metrics.md).

Site-only: every array here is computed from private notes; none leaves the site.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from client.evaluate.ngram_index import PrivateIndex
from client.evaluate.privacy import LexicalPrivacy, distance_to_closest_record, lexical_privacy
from client.evaluate.summary import Cell
from shared.errors import InputError, Problem

# Held-out notes scored lexically at most (a uniform sample beyond): quantiles and means of
# 2,000 notes are stable to ~1 %, and the scan then costs seconds at any site size.
MAX_LEXICAL_BASELINE = 2000


@dataclass(frozen=True)
class HeldoutReference:
    """Training-note index plus the held-out notes' closeness to it.

    ``train_index``: n-gram index over the TRAINING notes only, grouped by patient.
    ``heldout``: lexical metrics of each held-out note (or of a uniform sample of
    MAX_LEXICAL_BASELINE of them) against the training notes.
    ``heldout_dcr``: cosine distance of each held-out note to its closest training note
    (None without embeddings). ``train_emb``: the training notes' embeddings (or None).
    """

    train_index: PrivateIndex
    heldout: LexicalPrivacy
    heldout_dcr: np.ndarray | None
    train_emb: np.ndarray | None

    @property
    def n_heldout(self) -> int:
        return len(self.heldout.lcs_tokens)

    def thresholds(self, quantile: float) -> dict[str, float]:
        """Closeness the held-out notes reach at ``quantile`` (0..1): longest common span
        (tokens), ROUGE-L F1, and, with embeddings, the (1 - quantile) distance quantile."""
        out = {
            "lcs_tokens": float(np.quantile(self.heldout.lcs_tokens, quantile)),
            "rouge_l": float(np.quantile(self.heldout.rouge_l_max, quantile)),
        }
        if self.heldout_dcr is not None:
            out["dcr"] = float(np.quantile(self.heldout_dcr, 1.0 - quantile))
        return out


def heldout_reference(
    train_texts: Sequence[str],
    train_groups: Sequence[str],
    heldout_texts: Sequence[str],
    *,
    train_emb: np.ndarray | None = None,
    heldout_emb: np.ndarray | None = None,
    candidates: int = 20,
    seed: int = 0,
) -> HeldoutReference:
    """Index the training notes (grouped by patient) and score held-out notes against them:
    all of them by embedding distance, up to MAX_LEXICAL_BASELINE (sampled with ``seed``)
    lexically."""
    problems = []
    if not len(train_texts) or not len(heldout_texts):
        problems.append(Problem("notes", "the held-out baseline needs training and held-out notes"))
    if (train_emb is None) != (heldout_emb is None):
        problems.append(Problem("train_emb/heldout_emb", "give both or neither"))
    if problems:
        raise InputError("cannot build the held-out baseline", problems)
    index = PrivateIndex(list(train_texts), groups=list(train_groups))
    held = list(heldout_texts)
    if len(held) > MAX_LEXICAL_BASELINE:
        pick = np.random.default_rng(seed).choice(len(held), MAX_LEXICAL_BASELINE, replace=False)
        held = [held[i] for i in np.sort(pick)]
    lex = lexical_privacy(held, [], index=index, candidates=candidates)
    dcr = None
    if train_emb is not None and heldout_emb is not None:
        dcr = distance_to_closest_record(heldout_emb, train_emb)
    return HeldoutReference(index, lex, dcr, None if train_emb is None else np.asarray(train_emb))


# lexical_summary name -> LexicalPrivacy field, for the per-metric contrast
_CONTRASTED = {
    "ngram_overlap_8": "overlap_8",
    "ngram_overlap_13": "overlap_13",
    "verbatim_rate_13": "verbatim_13",
    "verbatim_unique_rate_13": "verbatim_unique_13",
    "lcs_mean": "lcs_tokens",
    "rouge_l_mean": "rouge_l_max",
}


def contrast_cells(reports_vs_train: LexicalPrivacy, ref: HeldoutReference) -> dict[str, Cell]:
    """Each memorization metric for reports and for held-out notes, both against training notes.

    ``privacy.train.<m>``: reports vs training notes; ``privacy.heldout.<m>``: held-out
    notes vs training notes (the baseline); ``privacy.excess.<m>``: the difference.
    Excess ~0 = reports are no closer to the training patients than unseen patients'
    notes are; > 0 = closer (memorization). Means over reports / held-out notes.
    """
    n_rep, n_ho = len(reports_vs_train.lcs_tokens), ref.n_heldout
    out: dict[str, Cell] = {}
    for name, attr in _CONTRASTED.items():
        rep = float(np.mean(getattr(reports_vs_train, attr)))
        ho = float(np.mean(getattr(ref.heldout, attr)))
        out[f"privacy.train.{name}"] = Cell(rep, n_rep)
        out[f"privacy.heldout.{name}"] = Cell(ho, n_ho)
        out[f"privacy.excess.{name}"] = Cell(rep - ho, min(n_rep, n_ho))
    return out
