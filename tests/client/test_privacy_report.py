"""A site's per-round privacy report: ε from the whole ledger, signed, verifiable, tamper-evident."""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from client import privacy_report as pr
from client.dp.ledger import Ledger, compute_epsilon
from client.evaluate.release import GateResult
from shared.audit import AuditLog, verify_log
from shared.errors import PrivacyError
from shared.report import SiteRoundReport
from shared.report_io import read_report
from shared.run_config import RunConfig
from shared.settings import SiteSettings, load_settings
from shared.signing import generate_key, load_private_key, load_public_key, sha256_file
from shared.verify import EXIT_FAILED, EXIT_OK, exit_code, verify_paths

DELTA = 1e-3
RUN = RunConfig.from_flower({"run-name": "audit-run", "train.accountant": "rdp", "train.max-grad-norm": 0.5})


@dataclass
class Evaluation:
    """The fields of client.evaluate.suite.SiteEvaluation the report reads."""

    summary: dict[str, float]
    gate: GateResult | None = None
    mia: dict[str, float] | None = None
    canaries: list[dict[str, Any]] = field(default_factory=list)


def _evaluation() -> Evaluation:
    return Evaluation(
        summary={"diversity.distinct_2": 0.61, "dp.train.loss_drop_mean": 0.52, "dp.heldout.verbatim_13_rate": 0.75},
        gate=GateResult(kept=[0, 1, 3], removed={"verbatim_13": 1, "rouge_l": 1}, total=4),
        mia={"auc": 0.52, "tpr_at_1fpr": 0.02},
        canaries=[{"repetitions": 1, "exposure": 1.5, "exposure_possible": 6.0},
                  {"repetitions": 10, "exposure": 4.0, "exposure_possible": 6.0}],
    )


@pytest.fixture
def site(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (model / "model.safetensors").write_bytes(b"\0" * 64)
    (model / "tokenizer.json").write_text("{}")
    key = tmp_path / "keys" / "site-a.key"
    generate_key(key)
    settings = load_settings(SiteSettings, site_id="site-a", output_dir=tmp_path / "out", model_dir=model,
                             epsilon_ceiling=10.0, signing_key=key)
    ledger = Ledger(settings.ledger_path, site_id="site-a")
    return settings, ledger, key


def _reserve(ledger: Ledger, round_id: int, *, sigma: float = 1.0, q: float = 0.1, steps: int = 20):
    return ledger.reserve(round_id=str(round_id), noise_multiplier=sigma, sample_rate=q, steps=steps,
                          delta=DELTA, accountant="rdp", epsilon_ceiling=100.0)


def _issue(settings, ledger, round_id, evaluation=None, **kw):
    audit = AuditLog(settings.output_dir / "audit.jsonl", key=load_private_key(settings.signing_key),
                     actor=settings.site_id)
    return pr.issue_round_report(settings, RUN, round_id=round_id, evaluation=evaluation or _evaluation(),
                                 ledger=ledger, audit=audit, **kw)


def test_epsilon_covers_every_reservation_including_unreleased(site):
    _, ledger, _ = site
    first = _reserve(ledger, 1)
    ledger.mark_released(first)
    _reserve(ledger, 2, sigma=0.8, steps=10)  # a crashed round: reserved, never released
    _reserve(ledger, 3, sigma=1.2, steps=5)
    p = pr.ledger_privacy(ledger.entries(), round_id=3, epsilon_ceiling=10.0, max_grad_norm=0.5,
                          secure_mode=False)
    everything = [(1.0, 0.1, 20), (0.8, 0.1, 10), (1.2, 0.1, 5)]
    assert p.epsilon == pytest.approx(compute_epsilon(everything, delta=DELTA, accountant="rdp"))
    assert p.epsilon > compute_epsilon(everything[::2], delta=DELTA, accountant="rdp")  # round 2 counts
    assert p.epsilon_round == pytest.approx(compute_epsilon([(1.2, 0.1, 5)], delta=DELTA, accountant="rdp"))
    assert (p.noise_multiplier, p.sample_rate, p.steps, p.max_grad_norm) == (1.2, 0.1, 5, 0.5)
    assert p.epsilon_remaining == pytest.approx(10.0 - p.epsilon)


def test_round_without_training_spends_nothing_new(site):
    _, ledger, _ = site
    _reserve(ledger, 1)
    p = pr.ledger_privacy(ledger.entries(), round_id=2, epsilon_ceiling=0.5, max_grad_norm=1.0,
                          secure_mode=True)
    assert p.epsilon_round == 0.0 and p.steps == 0 and p.epsilon > 0
    assert p.epsilon_remaining == 0.0  # ceiling already crossed: floored, not negative


def test_evaluation_releases_count_in_epsilon_but_not_in_the_shown_training_knobs(site):
    _, ledger, _ = site
    _reserve(ledger, 1)
    ledger.reserve(round_id="eval-0123456789abcdef-1", noise_multiplier=5.0, sample_rate=1.0, steps=1,
                   delta=DELTA, accountant="rdp", epsilon_ceiling=100.0)
    p = pr.ledger_privacy(ledger.entries(), round_id=2, epsilon_ceiling=10.0, max_grad_norm=1.0,
                          secure_mode=False)
    both = [(1.0, 0.1, 20), (5.0, 1.0, 1)]
    assert p.epsilon == pytest.approx(compute_epsilon(both, delta=DELTA, accountant="rdp"))
    assert (p.noise_multiplier, p.sample_rate) == (1.0, 0.1)  # training's, not the release's


def test_empty_ledger_issues_no_report(site):
    settings, ledger, _ = site
    with pytest.raises(PrivacyError, match="no training reservation"):
        pr.ledger_privacy([], round_id=1, epsilon_ceiling=1.0, max_grad_norm=1.0, secure_mode=False)
    assert _issue(settings, ledger, 1) is None
    assert not (settings.output_dir / pr.REPORT_DIR).exists()


def test_report_is_signed_valid_and_audited(site):
    settings, ledger, key = site
    _reserve(ledger, 1)
    issued = _issue(settings, ledger, 1, texts=["says 4 8 1 5 here", "plain"],
                    canaries=[{"secret": "4 8 1 5"}, {"secret": "9 9 9 9"}])
    report = read_report(issued.json_path, SiteRoundReport)
    assert issued.json_path == settings.output_dir / "privacy-reports" / "report-round-1.json"
    assert report.site_id == "site-a" and report.run_id == "audit-run" and report.round == 1
    assert report.privacy.epsilon == pytest.approx(ledger.epsilon(delta=DELTA, accountant="rdp"))
    assert report.release_gate.checked == 4 and report.release_gate.kept == 3
    assert report.membership.auc == 0.52
    assert report.canaries.planted == 2 and report.canaries.exposure_max == 4.0
    assert report.canaries.extracted_verbatim == 1
    assert report.model.family == "llama" and report.config_hash == pr.config_hash(RUN)
    assert "<html" in issued.html_path.read_text().lower()

    keys = {"site-a": load_public_key(key.with_name(key.name + ".pub"))}
    results = verify_paths([settings.output_dir], keys)
    assert exit_code(results) == EXIT_OK, [r.lines() for r in results]
    assert any("site report site-a round 1" in r.message for r in results)
    entries = [json.loads(x) for x in (settings.output_dir / "audit.jsonl").read_text().splitlines()]
    assert verify_log(settings.output_dir / "audit.jsonl", keys) == 1
    assert entries[-1]["kind"] == "report_issued"
    assert entries[-1]["data"]["report_sha256"] == sha256_file(issued.json_path)
    # the report names the log position before its own report_issued entry (issue #13 §3)
    assert (report.audit_seq, report.audit_head) == (entries[-1]["seq"], entries[-1]["prev"])


def test_flipping_one_byte_fails_verification(site):
    settings, ledger, key = site
    _reserve(ledger, 1)
    issued = _issue(settings, ledger, 1)
    keys = {"site-a": load_public_key(key.with_name(key.name + ".pub"))}
    data = bytearray(issued.json_path.read_bytes())
    at = data.index(b'"epsilon"')  # tamper where it matters most
    data[at + 1] ^= 0x01
    issued.json_path.write_bytes(bytes(data))
    results = verify_paths([issued.json_path], keys)
    assert exit_code(results) == EXIT_FAILED
    assert "hash mismatch" in results[0].message


def test_signed_by_another_site_fails(site, tmp_path):
    settings, ledger, key = site
    _reserve(ledger, 1)
    issued = _issue(settings, ledger, 1)
    other = tmp_path / "site-b.key"
    generate_key(other)
    # site-a's key filed under the name site-b: the report names site-a, so it must fail
    keys = {"site-b": load_public_key(key.with_name(key.name + ".pub"))}
    results = verify_paths([issued.json_path], keys)
    assert exit_code(results) == EXIT_FAILED and "not by 'site-a'" in results[0].message


def test_history_grows_and_ignores_other_runs(site):
    settings, ledger, _ = site
    other_run = RunConfig.from_flower({"run-name": "older-run", "train.accountant": "rdp"})
    _reserve(ledger, 1)
    audit = AuditLog(settings.output_dir / "audit.jsonl", actor="site-a")
    stale = pr.issue_round_report(settings, other_run, round_id=1, evaluation=_evaluation(), ledger=ledger,
                                  audit=audit)
    stale.json_path.rename(stale.json_path.with_name("report-round-0.json"))  # an older run's round 0
    first = _issue(settings, ledger, 1)
    _reserve(ledger, 2)
    second = _issue(settings, ledger, 2)
    report = read_report(second.json_path, SiteRoundReport)
    assert [h.round for h in report.history] == [1]
    assert report.history[0].epsilon == first.report.privacy.epsilon < report.privacy.epsilon
    assert report.history[0].metrics == first.report.metrics


def test_unsigned_without_key_and_stale_signature_removed(site, tmp_path):
    settings, ledger, _ = site
    _reserve(ledger, 1)
    signed = _issue(settings, ledger, 1)
    assert signed.signature is not None and signed.signature.exists()
    audit = AuditLog(tmp_path / "unsigned-audit.jsonl", actor="site-a")
    unsigned = pr.issue_round_report(settings, RUN, round_id=1, evaluation=_evaluation(), ledger=ledger,
                                     audit=audit)
    assert unsigned.signature is None
    assert not Path(str(unsigned.json_path) + ".sig").exists()


def test_config_hash_changes_with_any_knob():
    a = pr.config_hash(RUN)
    assert a == pr.config_hash(RunConfig.from_flower({"run-name": "audit-run", "train.accountant": "rdp",
                                                      "train.max-grad-norm": 0.5}))
    assert a != pr.config_hash(RunConfig.from_flower({"run-name": "audit-run", "train.accountant": "rdp",
                                                      "train.max-grad-norm": 0.6}))


def test_signed_report_names_the_noise_source(site):
    """The ledger's noise source (client.dp.noise) is in the signed report and its HTML."""
    settings, ledger, _ = site
    ledger.reserve(round_id="1", noise_multiplier=1.0, sample_rate=0.1, steps=20, delta=DELTA,
                   accountant="rdp", epsilon_ceiling=100.0, noise_source="chacha20-gaussian")
    issued = _issue(settings, ledger, 1)
    report = read_report(issued.json_path, SiteRoundReport)
    assert report.privacy.noise_source == "chacha20-gaussian"
    assert json.loads(issued.json_path.read_text())["privacy"]["noise_source"] == "chacha20-gaussian"
    assert "chacha20-gaussian" in issued.html_path.read_text()
