"""The report HTML opens in a real headless browser and shows its plots (e2e).

Skipped where Chromium is not installed (.ci/run installs it). Known answer: a
screenshot of the page has thousands more drawn pixels than a screenshot of the
same page with its embedded images removed.
"""

import re
import shutil
import subprocess

import pytest
from PIL import Image

from shared.report_html import render_html
from tests.shared.reports import consortium_report, site_report

pytestmark = pytest.mark.e2e
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _screenshot(html: str, tmp_path, name: str) -> Image.Image:
    page = tmp_path / f"{name}.html"
    page.write_text(html, encoding="utf-8")
    png = tmp_path / f"{name}.png"
    subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / ('profile-' + name)}", "--window-size=1100,2400",
         f"--screenshot={png}", page.as_uri()],
        check=True, capture_output=True, timeout=120,
    )
    return Image.open(png).convert("L")


def _ink(img: Image.Image) -> int:
    return sum(1 for v in img.getdata() if v < 200)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed")
@pytest.mark.parametrize("make", [site_report, consortium_report], ids=["site", "consortium"])
def test_report_renders_with_plots(make, tmp_path):
    html = render_html(make())
    assert html.count("data:image/png;base64,") >= 2
    with_plots = _screenshot(html, tmp_path, "with")
    without = _screenshot(re.sub(r'<img [^>]*src="data:image/png;base64,[^"]*"[^>]*>', "", html), tmp_path, "without")
    assert with_plots.size[0] > 500
    assert _ink(with_plots) - _ink(without) > 5000  # the plots add thousands of drawn pixels
