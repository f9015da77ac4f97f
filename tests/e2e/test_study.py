"""The reduced privacy–utility study end to end (e2e: real demo data, embedded model, flwr run).

``run_study(reduced=True, flower=True)``: ε = 8 through the Flower simulation
(``flwr run``: the deployment's ServerApp, ClientApp and transport) and the
NON-PRIVATE baseline through the site driver, one round each. Checks the
table, not the science: every setting, every column, finite numbers, the ε
actually spent within the target, and the no-DP arm labelled as such.
Run with ``pytest -m e2e tests/e2e/test_study.py`` (minutes on 2 CPU cores).
"""

import json
import math

import pytest

from bench.study import plan, run_study
from bench.study_tables import COLUMNS

pytestmark = pytest.mark.e2e


def test_reduced_study_table(tmp_path):
    out = tmp_path / "study"
    results = run_study(out, reduced=True, flower=True)
    expected = plan(reduced=True).settings
    assert sorted(r.setting for r in results) == sorted(expected)
    assert "no-dp" in expected and any(s.startswith("eps-") for s in expected)

    record = json.loads((out / "study.json").read_text())
    assert record["columns"] == list(COLUMNS)
    by_setting = {s["setting"]: s for s in record["settings"]}
    assert set(by_setting) == set(expected)
    for name, s in by_setting.items():
        assert len(s["per_site"]) == 3, name
        for stat in ("mean", "min", "max"):
            for column in COLUMNS:
                value = s[stat][column]
                assert isinstance(value, float) and math.isfinite(value), (name, stat, column, value)
        for site, row in s["per_site"].items():
            assert set(row) == set(COLUMNS), (name, site)

    no_dp = by_setting["no-dp"]
    assert no_dp["private"] is False and "NO DP" in no_dp["label"]
    assert no_dp["epsilon_achieved"] == {} and no_dp["epsilon_target"] is None
    assert (out / "no-dp" / "NON-PRIVATE-BASELINE.txt").is_file()
    # the non-private arm reserved nothing for training in any site's ledger (its
    # evaluation is a DP release like any other, charged as "eval-..." before it runs)
    for ledger in (out / "no-dp" / "sites").glob("*/output/privacy-ledger.jsonl"):
        records = [json.loads(line) for line in ledger.read_text().splitlines()]
        assert all(r["round_id"].startswith("eval-") for r in records if r["kind"] == "reserve")

    dp = by_setting["eps-8"]
    assert dp["private"] is True and dp["epsilon_target"] == 8.0
    assert len(dp["epsilon_achieved"]) == 3
    assert all(0 < e <= 8.0 for e in dp["epsilon_achieved"].values())
    # the Flower arm left the coordinator's consortium summary and every site's ledger
    assert list((out / "eps-8" / "coordinator").glob("*/consortium-summary.json"))
    assert len(list((out / "eps-8" / "sites").glob("*/output/privacy-ledger.jsonl"))) == 3

    table = (out / "study.md").read_text()
    assert "NO DP" in table and "DP ε = 8" in table
    assert all(c in table for c in COLUMNS)
    assert (out / "results-privacy-utility.png").stat().st_size > 1000
    assert (out / "results-canaries.png").stat().st_size > 1000
