"""The wire whitelist holds only DP-noised and synthetic-only metrics; the report page plots some."""

from shared.report_html import HEADLINE_METRICS
from shared.whitelist import METRIC_NAMES


def test_only_dp_and_synthetic_only_names_are_whitelisted():
    # #12 §3: nothing computed in the clear from private notes, and no max/min over notes
    assert all(
        name.startswith(("dp.train.", "dp.heldout.", "diversity.")) or name == "count.reports"
        for name in METRIC_NAMES
    )
    assert not any(part in name for name in METRIC_NAMES for part in ("max", "min", "p95"))
    assert "diversity.mode_collapse_ratio" not in METRIC_NAMES  # compares with real notes


def test_headline_metrics_are_whitelisted_and_pair_train_with_heldout():
    assert set(HEADLINE_METRICS) <= METRIC_NAMES
    i = HEADLINE_METRICS.index("dp.train.verbatim_13_rate")
    assert HEADLINE_METRICS[i + 1] == "dp.heldout.verbatim_13_rate"
