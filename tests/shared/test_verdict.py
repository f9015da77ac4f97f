"""The auditor's five minutes (issue #13 §6): a verdict on top, baselines, directions, participation."""

import re

from shared.report_consortium import Participation
from shared.report_html import metric_direction, render_html
from shared.verdict import MAX_MIA_AUC, MEMORIZATION_MARGINS, consortium_verdict, site_verdict
from shared.whitelist import METRIC_NAMES
from tests.shared.reports import consortium_report, site_report

SAFE = {"dp.train.verbatim_13_rate": 0.01, "dp.heldout.verbatim_13_rate": 0.01,
        "dp.train.loss_drop_mean": 0.30, "dp.heldout.loss_drop_mean": 0.28, "count.reports": 20.0}


def _site(metrics=SAFE, **kw):
    r = site_report(metrics=metrics, **kw)
    return r.model_copy(update={"verdict": site_verdict(r)})


def _check(verdict, name):
    return next(c for c in verdict.checks if c.name == name)


def test_safe_round_is_released_with_baselines_beside_each_number():
    v = _site().verdict
    assert v.outcome == "release", v
    c = _check(v, "dp.train.verbatim_13_rate")
    assert c.baseline == 0.01 and c.threshold == 0.01 + MEMORIZATION_MARGINS["verbatim_13_rate"][0]
    assert c.direction == "at most" and c.passed
    assert _check(v, "membership.auc").threshold == MAX_MIA_AUC
    assert _check(v, "epsilon").threshold == 8.0


def test_train_above_heldout_is_held():
    v = _site({**SAFE, "dp.train.verbatim_13_rate": 0.2}).verdict
    assert v.outcome == "hold" and _check(v, "dp.train.verbatim_13_rate").passed is False
    v = _site({**SAFE, "dp.train.loss_drop_mean": 0.5}).verdict
    assert v.outcome == "hold"


def test_extracted_canary_or_strong_membership_signal_is_held():
    canaries = {"planted": 2, "exposure_mean": 3.0, "exposure_max": 4.0, "exposure_possible": 10.0,
                "extracted_verbatim": 1}
    assert _site(canaries=canaries).verdict.outcome == "hold"
    assert _site(membership={"auc": 0.75, "tpr_at_1fpr": 0.2}).verdict.outcome == "hold"


def test_gate_removing_most_reports_is_held():
    v = _site(release_gate={"checked": 100, "kept": 10, "removed": {"verbatim_13": 90}}).verdict
    assert v.outcome == "hold" and _check(v, "release_gate.kept_share").value == 0.1


def test_unmeasured_round_is_incomplete_not_released():
    assert _site(release_gate=None).verdict.outcome == "incomplete"
    no_heldout = {k: v for k, v in SAFE.items() if "heldout" not in k}
    v = _site(no_heldout).verdict
    assert v.outcome == "incomplete" and _check(v, "dp.train.verbatim_13_rate").passed is None


def test_consortium_verdict_checks_every_sites_ceiling():
    r = consortium_report(metrics=[{"round": 3, "metrics": SAFE}])
    assert consortium_verdict(r).outcome == "release"
    sites = [s.model_dump() for s in r.sites]
    sites[0]["epsilon_ceiling"] = 1.0  # site-a's latest ε is 2.4
    v = consortium_verdict(consortium_report(sites=sites, metrics=[{"round": 3, "metrics": SAFE}]))
    assert v.outcome == "hold" and _check(v, "epsilon.site-a").passed is False


def test_every_metric_has_a_direction_and_lower_is_better_ones_say_so():
    assert all(metric_direction(n) for n in METRIC_NAMES)
    for name in ("diversity.self_bleu_4", "diversity.exact_duplicate_rate", "diversity.near_duplicate_rate",
                 "dp.train.verbatim_13_rate", "dp.heldout.verbatim_26_rate", "dp.train.phi_echo_rate"):
        assert "lower" in metric_direction(name) and "higher" not in metric_direction(name), name
    for name in ("diversity.distinct_2", "diversity.mtld", "diversity.vendi"):
        assert metric_direction(name).startswith("higher")


def test_html_opens_with_the_verdict():
    page = render_html(_site({**SAFE, "dp.train.verbatim_13_rate": 0.2}))
    assert page.index('id="verdict"') < page.index("What ε means") < page.index("Metric summaries")
    assert "Verdict: hold" in page and "<b>FAIL</b>" in page and "held-out baseline" in page
    assert re.search(r"dp\.train\.verbatim_13_rate</td><td class=\"num\">0\.2</td><td>at most 0\.02", page)
    assert "written before verdicts existed" in render_html(site_report())


def test_consortium_html_has_a_participation_table():
    part = [Participation(round=rnd, site_id=s, train=t, evaluate="evaluated")
            for rnd in (1, 2) for s, t in (("node-1", "trained"), ("node-2", "declined"))]
    r = consortium_report(participation=part)
    page = render_html(r.model_copy(update={"verdict": consortium_verdict(r)}))
    assert "<h2>Participation</h2>" in page and "declined / evaluated" in page
    assert "Rounds count from 1" in page and page.index('id="verdict"') < page.index("Participation")


def test_verify_fails_a_verdict_that_does_not_follow_from_the_numbers(tmp_path, capsys):
    from shared.report_io import write_report
    from shared.signing import generate_key, load_private_key
    from shared.verify import main

    generate_key(tmp_path / "site-a.key")
    report = _site({**SAFE, "dp.train.verbatim_13_rate": 0.2})  # hold
    forged = report.model_copy(update={"verdict": report.verdict.model_copy(update={"outcome": "release"})})
    path = write_report(forged, tmp_path / "report-round-2.json", key=load_private_key(tmp_path / "site-a.key"))
    assert main([str(path), "--key", f"site-a={tmp_path / 'site-a.key.pub'}"]) == 1
    assert "verdict 'release' does not follow from its numbers" in capsys.readouterr().out
    write_report(report, path, key=load_private_key(tmp_path / "site-a.key"))
    assert main([str(path), "--key", f"site-a={tmp_path / 'site-a.key.pub'}"]) == 0
