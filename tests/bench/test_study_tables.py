"""The study's tables: reading evaluations, means over sites, markdown, exposure lift, figures."""

import json
import math

import pytest

from bench.study_tables import (
    COLUMNS,
    EXPOSURE_COLUMNS,
    GROUPS,
    METRICS,
    SettingResult,
    collect,
    exposure_lift_markdown,
    load_results,
    plot,
    site_row,
    table_markdown,
    write_outputs,
)


def evaluation(value: float, *, canaries=True) -> dict:
    doc = {"cells": {name: {"value": value, "n": 30} for _, name in METRICS}}
    if canaries:
        doc["canaries"] = [
            {"repetitions": 1, "exposure": 1.0, "reference": False},
            {"repetitions": 5, "exposure": 5.0, "reference": False},
            {"repetitions": 10, "exposure": 8.0, "reference": False},
            {"repetitions": 0, "exposure": 0.5, "reference": True},
            {"repetitions": 0, "exposure": 1.5, "reference": True},
        ]
    return doc


def test_site_row_reads_metrics_and_exposure_by_repetition():
    row = site_row(evaluation(0.25))
    assert set(row) == set(COLUMNS)
    assert all(row[c] == 0.25 for c, _ in METRICS)
    assert (row["exposure_rep1"], row["exposure_rep5"], row["exposure_rep10"], row["exposure_rep0"]) == (
        1.0, 5.0, 8.0, 1.0)
    bare = site_row({"cells": {}})
    assert all(math.isnan(v) for v in bare.values())


def test_collect_means_min_max_over_sites_and_labels_no_dp(tmp_path):
    for site, value in (("site-a", 0.1), ("site-b", 0.2), ("site-c", 0.6)):
        d = tmp_path / site
        (d / "output" / "evaluation" / "round-1").mkdir(parents=True)
        (d / "output" / "evaluation" / "round-2").mkdir(parents=True)
        (d / "notes.jsonl").write_text("")
        (d / "output" / "evaluation" / "round-1" / "evaluation.json").write_text(json.dumps(evaluation(9.0)))
        (d / "output" / "evaluation" / "round-2" / "evaluation.json").write_text(json.dumps(evaluation(value)))
    r = collect(SettingResult("no-dp", "NO DP (non-private baseline)", False, None, None), tmp_path)
    assert r.mean["mia_auc"] == pytest.approx(0.3) and (r.min["mia_auc"], r.max["mia_auc"]) == (0.1, 0.6)
    table = table_markdown([r])
    assert "NO DP (non-private baseline) | ∞ (no DP)" in table and "0.300 [0.100, 0.600]" in table
    grouped = [c for _, columns in GROUPS for c in columns]
    assert sorted(grouped) == sorted(COLUMNS) and len(grouped) == len(set(grouped))
    assert all(f" {c} |" in table for c in COLUMNS)


def test_plot_survives_equal_site_values(tmp_path):
    """Three sites with the same value: mean may exceed max by a rounding error (was a crash)."""
    r = SettingResult("eps-8", "DP ε = 8", True, 8.0, 5.6)
    for column in COLUMNS:
        r.mean[column], r.min[column], r.max[column] = 0.1 + 1e-17, 0.1, 0.1
    paths = plot([r], tmp_path)
    assert [p.name for p in paths] == ["results-privacy-utility.png", "results-canaries.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_exposure_lift_is_paired_by_site_and_survives_a_json_round_trip(tmp_path):
    def row(**exposure):
        values = dict.fromkeys(COLUMNS, 0.5)
        values.update(exposure)
        return values

    base = SettingResult("zero-shot", "zero-shot (base model)", True, None, None,
                         per_site={"site-a": row(exposure_rep10=1.0), "site-b": row(exposure_rep10=6.0)})
    trained = SettingResult("no-dp", "NO DP (non-private baseline)", False, None, None,
                            per_site={"site-a": row(exposure_rep10=4.0), "site-b": row(exposure_rep10=7.0)})
    for r in (base, trained):
        for stat, fn in (("mean", lambda v: sum(v) / len(v)), ("min", min), ("max", max)):
            getattr(r, stat).update({c: fn([s[c] for s in r.per_site.values()]) for c in COLUMNS})
    lift = exposure_lift_markdown([base, trained])
    # paired by site: site-a +3, site-b +1 -> mean +2, range [+1, +3]
    assert "| NO DP (non-private baseline) | +0.00 [+0.00, +0.00] | +0.00 [+0.00, +0.00] | +2.00 [+1.00, +3.00] |" in lift
    assert "zero-shot (base model) |" not in lift and len(EXPOSURE_COLUMNS) == 4
    assert exposure_lift_markdown([trained]) == ""

    (tmp_path / "study.json").write_text(json.dumps({"settings": [vars(base), vars(trained)]}))
    again = load_results(tmp_path / "study.json")
    assert [r.setting for r in again] == ["zero-shot", "no-dp"] and again[1].per_site == trained.per_site
    text = write_outputs(again, tmp_path)
    assert lift in text and (tmp_path / "study.md").read_text() == text
