import base64
import json
import re
from datetime import UTC, datetime, timedelta, timezone

import pytest

from shared.errors import InputError
from shared.report import SiteRoundReport
from shared.report_html import render_html
from shared.report_io import parse_report
from tests.shared.reports import HASH, consortium_report, site_report


def test_defaults_state_what_epsilon_covers():
    p = site_report().privacy
    assert p.unit_of_privacy == "patient"
    assert "patient" in p.what_epsilon_covers
    assert any("Metric summaries" in t for t in p.what_epsilon_does_not_cover)
    assert any("Release-gate" in t and "not differential privacy" in t for t in p.what_epsilon_does_not_cover)


def test_created_is_utc():
    r = site_report(created=datetime(2025, 3, 1, 14, 0, tzinfo=timezone(timedelta(hours=2))))
    assert r.created == datetime(2025, 3, 1, 12, 0, tzinfo=UTC) and r.created.utcoffset() == timedelta(0)
    with pytest.raises(ValueError, match="timezone"):
        site_report(created=datetime(2025, 3, 1))


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d["metrics"].__setitem__("dp.train.loss_drop_mean", float("nan")), "finite"),
    (lambda d: d["privacy"].__setitem__("epsilon_remaining", 7.0), "epsilon_remaining"),
    (lambda d: d["privacy"].__setitem__("accountant", "gdp"), "accountant"),
    (lambda d: d["privacy"].__setitem__("unit_of_privacy", "note"), "patient"),
    (lambda d: d.__setitem__("site_id", "<script>alert(1)</script>"), "site_id"),
    (lambda d: d["history"][1].__setitem__("epsilon", 9.0), "decreases"),
    (lambda d: d.__setitem__("config_hash", "xyz"), "config_hash"),
])
def test_invalid_values_refused(mutate, match):
    data = json.loads(site_report().model_dump_json())
    mutate(data)
    with pytest.raises(InputError, match=match):
        parse_report("mem.json", json.dumps(data).encode(), SiteRoundReport)


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'<img alt="plot" src="data:image/png;base64,([A-Za-z0-9+/=]+)">', page)]


def test_site_html_is_self_contained_with_plots():
    page = render_html(site_report())
    images = _images(page)
    assert len(images) == 3  # epsilon, metrics, release gate
    assert all(img.startswith(b"\x89PNG\r\n\x1a\n") for img in images)
    assert "<script" not in page.lower()
    assert not re.search(r"(src|href)=\"(https?:)?//", page)
    assert "Unit of privacy: <b>patient</b>" in page
    assert "not</b> covered by DP-SGD" in page and "defence in depth" in page


def test_html_escapes_malicious_strings():
    evil = "<script>alert('x')</script>"
    report = site_report(model={"id": evil, "family": "llama\"><img src=x>", "identity_hash": HASH})
    report = report.model_copy(update={"site_id": evil, "run_id": "r&<b>"})  # bypasses validation on purpose
    page = render_html(report)
    assert "<script>" not in page and "<img src=x>" not in page and "<b>r" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "r&amp;&lt;b&gt;" in page


def test_consortium_html_plots_each_site_and_escapes():
    evil = "<script>x</script>"
    with pytest.raises(ValueError, match="site_id"):
        consortium_report(sites=[{"site_id": evil, "rounds": []}])
    report = consortium_report()
    page = render_html(report)
    assert len(_images(page)) == 2
    assert "site-a" in page and "site-b" in page and "checkpoints/round-2" in page
    forged = report.model_copy(update={"sites": [report.sites[0].model_copy(update={"site_id": evil})]})
    page = render_html(forged)
    assert "<script>" not in page and "&lt;script&gt;x&lt;/script&gt;" in page
