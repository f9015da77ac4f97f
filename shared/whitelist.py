"""The names that may cross the wire, with no dependencies (auditor tools import this).

:mod:`shared.wire` checks messages against these sets; :mod:`shared.report`
checks report metric names against them.
"""

from __future__ import annotations

# Aggregate metric summaries a site may send. Each value is one float computed
# over at least k_min reports/notes; anything else is refused.
METRIC_NAMES: frozenset[str] = frozenset(
    {
        # counts the other cells were computed over (bucketed)
        "count.reports",
        "count.notes",
        # fidelity
        "fidelity.centroid_cosine_mean",
        "fidelity.centroid_margin_mean",
        "fidelity.own_code_nearest_share",
        "fidelity.real_classifier_macro_f1",
        "fidelity.tstr_macro_f1",
        "fidelity.trtr_macro_f1",
        "fidelity.tstr_trtr_ratio",
        "fidelity.frechet_distance_mean",
        "fidelity.length_ratio",
        "fidelity.length_ks",
        # diversity
        "diversity.distinct_1",
        "diversity.distinct_2",
        "diversity.distinct_3",
        "diversity.self_bleu_4",
        "diversity.mtld",
        "diversity.vendi",
        "diversity.mode_collapse_ratio",
        "diversity.exact_duplicate_rate",
        "diversity.near_duplicate_rate",
        # privacy / memorization
        "privacy.ngram_overlap_8",
        "privacy.ngram_overlap_13",
        "privacy.verbatim_rate_13",
        "privacy.verbatim_unique_rate_13",
        "privacy.lcs_max",
        "privacy.lcs_p95",
        "privacy.rouge_l_max",
        "privacy.rouge_l_p95",
        "privacy.dcr_train_closer_share",
        "privacy.phi_echo_rate",
        "privacy.canary_exposure_max",
        "privacy.mia_auc",
        "privacy.mia_tpr_at_1fpr",
        "privacy.mia_auc_calibrated",
        "privacy.mia_tpr_at_1fpr_calibrated",
        # release gate
        "release.kept_share",
    }
)

# Privacy scalars a site sends with each adapter update.
PRIVACY_KEYS: frozenset[str] = frozenset(
    {
        "epsilon",  # cumulative epsilon over every round this site trained (from its ledger)
        "epsilon_round",  # this round's increment
        "delta",
        "noise_multiplier",
        "sample_rate",
        "steps",
        "max_grad_norm",
        "accountant",  # one of ACCOUNTANTS
        "secure_mode",
        "patients_bucket",  # number of training patients rounded down to a multiple of 10
        "ledger_seq",  # seq of this round's reservation in the site's privacy ledger
        "ledger_head",  # that record's chain hash (64 hex): the coordinator's anchor of the ledger
    }
)
ACCOUNTANTS: frozenset[str] = frozenset({"prv", "rdp"})
