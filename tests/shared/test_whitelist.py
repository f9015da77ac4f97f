"""The wire whitelist holds the metrics the site sends, and the report page lists the headline ones."""

from shared.report_html import HEADLINE_METRICS
from shared.whitelist import METRIC_NAMES


def test_unique_verbatim_rate_is_whitelisted_and_plotted():
    assert "privacy.verbatim_unique_rate_13" in METRIC_NAMES
    assert set(HEADLINE_METRICS) <= METRIC_NAMES
    i = HEADLINE_METRICS.index("privacy.verbatim_rate_13")
    assert HEADLINE_METRICS[i + 1] == "privacy.verbatim_unique_rate_13"
