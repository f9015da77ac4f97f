"""The names that may cross the wire, with no dependencies (auditor tools import this).

:mod:`shared.wire` checks messages against these sets; :mod:`shared.report`
checks report metric names against them. The privacy scalars' keys are the fields
of their one type (:data:`shared.privacy_scalars.PRIVACY_KEYS`).
"""

from __future__ import annotations

# Aggregate metric summaries a site may send (docs/metrics.md). Two kinds only:
# - "dp.<group>.*": statistics over private notes released through the Gaussian mechanism on
#   bounded per-patient contributions, charged to the site's privacy ledger (client/evaluate/
#   dp_metrics.py); <group> is "train" or "heldout" patients; ".patients" is a noisy count;
# - "count.reports" and "diversity.*": computed from the synthetic reports alone, sent only when
#   the reports' codes came from the run config (post-processing of the DP adapter).
# Nothing computed in the clear from private notes, and no max/min over notes, is named here.
_DP_STATS = ("patients", "verbatim_13_rate", "verbatim_26_rate", "phi_echo_rate",
             "centroid_cosine_mean", "loss_drop_mean")
METRIC_NAMES: frozenset[str] = frozenset(
    {
        *(f"dp.{group}.{stat}" for group in ("train", "heldout") for stat in _DP_STATS),
        # synthetic reports only
        "count.reports",
        "diversity.distinct_1",
        "diversity.distinct_2",
        "diversity.distinct_3",
        "diversity.self_bleu_4",
        "diversity.mtld",
        "diversity.vendi",
        "diversity.exact_duplicate_rate",
        "diversity.near_duplicate_rate",
    }
)

ACCOUNTANTS: frozenset[str] = frozenset({"prv", "rdp"})
