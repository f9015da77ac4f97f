"""The release gate: which synthetic reports may leave the site for downstream researchers.

Filtering with private data is defence in depth, NOT differential privacy. The
gate looks at the private notes to drop reports that visibly copy them; that
decision itself depends on private data, and a report that passes can still
leak information a lexical or embedding check does not see. The formal
guarantee of a release is the DP-SGD epsilon of the adapter that generated it;
the gate only removes the obvious failures, and its counts go in the privacy
report so an auditor sees how much it removed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from client.evaluate.heldout import HeldoutReference
from client.evaluate.ngram_index import PrivateIndex
from client.evaluate.privacy import (
    distance_to_closest_record,
    lexical_privacy,
    phi_echo,
)
from client.evaluate.summary import Cell
from shared.errors import ConfigError, InputError, Problem


@dataclass(frozen=True, kw_only=True)
class GateConfig:
    """Release thresholds (privacy knobs).

    max_ngram: a report sharing any token span this long (tokens) with a private note is removed.
    max_rouge_l: a report whose max ROUGE-L F1 to retrieved private notes is >= this is removed.
    min_dcr: when set, a report whose cosine distance to the closest private note is <= this is removed.
    rouge_candidates: private notes retrieved per report for the ROUGE-L check.
    heldout_quantile: with a held-out baseline (``release_gate(heldout=...)``), a report is
        removed for copying only when it is closer to the training notes than this quantile
        of held-out patients' notes is (longest copied span, ROUGE-L, embedding distance);
        max_ngram and max_rouge_l then stay as floors below which nothing is removed.
    """

    max_ngram: int = 13
    max_rouge_l: float = 0.7
    min_dcr: float | None = None
    rouge_candidates: int = 20
    heldout_quantile: float = 0.99

    def problems(self) -> list[Problem]:
        out = []
        if (
            isinstance(self.max_ngram, bool)
            or not isinstance(self.max_ngram, int)
            or self.max_ngram < 2
        ):
            out.append(Problem("max_ngram", f"must be an integer >= 2, got {self.max_ngram!r}"))
        if not isinstance(self.max_rouge_l, (int, float)) or not 0.0 < self.max_rouge_l <= 1.0:
            out.append(Problem("max_rouge_l", f"must be in (0, 1], got {self.max_rouge_l!r}"))
        if self.min_dcr is not None and (
            not isinstance(self.min_dcr, (int, float)) or not 0.0 <= self.min_dcr < 2.0
        ):
            out.append(
                Problem(
                    "min_dcr", f"must be None or a cosine distance in [0, 2), got {self.min_dcr!r}"
                )
            )
        if (
            isinstance(self.rouge_candidates, bool)
            or not isinstance(self.rouge_candidates, int)
            or self.rouge_candidates < 1
        ):
            out.append(
                Problem(
                    "rouge_candidates", f"must be an integer >= 1, got {self.rouge_candidates!r}"
                )
            )
        if (
            isinstance(self.heldout_quantile, bool)
            or not isinstance(self.heldout_quantile, (int, float))
            or not 0.5 <= self.heldout_quantile <= 1.0
        ):
            out.append(
                Problem("heldout_quantile", f"must be in [0.5, 1], got {self.heldout_quantile!r}")
            )
        return out


@dataclass(frozen=True)
class GateResult:
    """kept: indices of releasable reports, in input order.

    removed: reason -> number of reports failing that check ("verbatim_13" — the key
    is f"verbatim_{max_ngram}" —, "rouge_l", "phi_echo", "dcr"). A report failing
    several checks counts under each, so the counts may add up to more than the
    number removed (= total - len(kept)).

    calibrated: the thresholds came from held-out patients' notes (``heldout_notes`` of
    them); thresholds: the effective values applied — "verbatim_min_tokens" (a copied span
    this long or longer is removed), "rouge_l_above" (ROUGE-L F1 above this is removed,
    with max_rouge_l as floor), "dcr_below" (cosine distance to the closest training note
    below this is removed; with a held-out baseline and embeddings), "heldout_quantile".
    """

    kept: list[int]
    removed: dict[str, int]
    total: int = 0
    config: GateConfig | None = None  # the thresholds applied (stated in the privacy report)
    calibrated: bool = False
    heldout_notes: int = 0
    thresholds: dict[str, float] = field(default_factory=dict)

    def cells(self) -> dict[str, Cell]:
        """``release.kept_share`` for ``build_summary``; n = reports the gate saw."""
        return (
            {"release.kept_share": Cell(len(self.kept) / self.total, self.total)}
            if self.total
            else {}
        )


def release_gate(
    synthetic: Sequence[str],
    private: Sequence[str],
    identifiers: Iterable[str],
    *,
    config: GateConfig,
    synthetic_emb: np.ndarray | None = None,
    private_emb: np.ndarray | None = None,
    index: PrivateIndex | None = None,
    heldout: HeldoutReference | None = None,
) -> GateResult:
    """Keep a report only if it has no ``max_ngram``-token verbatim overlap with any
    private note, echoes no known identifier, has max ROUGE-L below ``max_rouge_l``
    and (when ``min_dcr`` is set) a distance to the closest private note above it.

    Defence in depth, not differential privacy (see module docstring). ``index``: a
    PrivateIndex already built over ``private``, to reuse.

    ``heldout``: the held-out baseline (:func:`client.evaluate.heldout.heldout_reference`).
    Then the copy checks compare each report with the TRAINING notes and remove it only
    when it is closer to them than ``config.heldout_quantile`` of held-out patients' notes
    are (those patients were never trained on, so their closeness is shared phrasing, not
    memorization); with ``synthetic_emb`` also by embedding distance ("dcr_heldout").
    Identifier echo is always removed.
    """
    if not isinstance(config, GateConfig):
        raise ConfigError(
            "invalid release gate configuration", [Problem("config", "must be a GateConfig")]
        )
    problems = config.problems()
    if config.min_dcr is not None:
        if synthetic_emb is None or private_emb is None:
            problems.append(Problem("synthetic_emb/private_emb", "required when min_dcr is set"))
        elif len(np.asarray(synthetic_emb)) != len(synthetic):
            problems.append(
                Problem(
                    "synthetic_emb",
                    f"{len(np.asarray(synthetic_emb))} rows for {len(synthetic)} reports",
                )
            )
    if problems:
        raise ConfigError("invalid release gate configuration", problems)
    echoes = phi_echo(synthetic, identifiers)  # also validates the texts
    if index is None and heldout is None:  # with a baseline, the training-note index is used
        if isinstance(private, str) or not all(isinstance(t, str) for t in private):
            raise InputError(
                "cannot run the release gate", [Problem("private", "must be a sequence of strings")]
            )
        index = PrivateIndex(private)
    n = len(synthetic)
    verbatim_min = float(config.max_ngram)
    if heldout is None:
        lex = lexical_privacy(synthetic, private, candidates=config.rouge_candidates, index=index)
        verbatim, rouge = lex.lcs_tokens >= config.max_ngram, lex.rouge_l_max >= config.max_rouge_l
        thresholds = {"verbatim_min_tokens": verbatim_min, "rouge_l_min": float(config.max_rouge_l)}
    else:
        lex = lexical_privacy(
            synthetic, [], candidates=config.rouge_candidates, index=heldout.train_index
        )
        base = heldout.thresholds(config.heldout_quantile)
        verbatim_min = max(verbatim_min, float(np.floor(base["lcs_tokens"])) + 1.0)
        rouge_above = base["rouge_l"]
        verbatim = lex.lcs_tokens >= verbatim_min
        rouge = (lex.rouge_l_max >= config.max_rouge_l) & (lex.rouge_l_max > rouge_above)
        thresholds = {
            "verbatim_min_tokens": verbatim_min,
            "rouge_l_min": float(config.max_rouge_l),
            "rouge_l_above": rouge_above,
            "heldout_quantile": float(config.heldout_quantile),
        }
    fails = {
        f"verbatim_{config.max_ngram}": verbatim,
        "rouge_l": rouge,
        "phi_echo": np.array([len(e) > 0 for e in echoes], dtype=bool).reshape(n),
    }
    if heldout is not None and heldout.heldout_dcr is not None and synthetic_emb is not None:
        if len(np.asarray(synthetic_emb)) != n:
            raise ConfigError(
                "invalid release gate input",
                [Problem("synthetic_emb", f"{len(np.asarray(synthetic_emb))} rows for {n} reports")],
            )
        thresholds["dcr_below"] = base["dcr"]
        fails["dcr_heldout"] = (
            distance_to_closest_record(synthetic_emb, heldout.train_emb) < base["dcr"]
        )
    if config.min_dcr is not None:
        fails["dcr"] = distance_to_closest_record(synthetic_emb, private_emb) <= config.min_dcr
    bad = np.zeros(n, dtype=bool)
    for mask in fails.values():
        bad |= mask
    return GateResult(
        kept=np.nonzero(~bad)[0].tolist(),
        removed={k: int(v.sum()) for k, v in fails.items()},
        total=n,
        config=config,
        calibrated=heldout is not None,
        heldout_notes=0 if heldout is None else heldout.n_heldout,
        thresholds=thresholds,
    )
