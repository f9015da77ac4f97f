"""fedsynth-verify over a whole directory: each way to cut short or swap the audit trail fails.

Every test here starts from the consistent bundle of test_verify (exit 0) and plays an
operator who edits files without the signing keys (or with another party's key).
"""

import json
import shutil

import pytest

from shared.audit import AuditLog
from tests.shared.reports import issue_report, key_args, run, site_report


def _fails(capsys, bundle, *needles):
    code, out, err = run(capsys, bundle["dir"], *key_args(bundle))
    assert code == 1, out
    fails = "\n".join(line for line in out.splitlines() if not line.startswith("OK "))
    for needle in needles:
        assert needle in fails, out
    assert "Traceback" not in out + err
    return fails


def _lines(path):
    return path.read_bytes().splitlines(keepends=True)


@pytest.mark.parametrize("keep", [4, 3, 1])
def test_log_cut_short_fails(bundle, capsys, keep):
    # keep=4: only the last report_issued cut; keep=1: only the first entry left
    log = bundle["dir"] / "site-a" / "audit.jsonl"
    log.write_bytes(b"".join(_lines(log)[:keep]))
    _fails(capsys, bundle, "site-a/audit.jsonl: audit trail does not match",
           "report-round-2.json has no report_issued entry")


def test_log_cut_below_the_reports_position_fails(bundle, capsys):
    # the round-2 report names the position it was written at; the log is cut below it
    log = bundle["dir"] / "site-a" / "audit.jsonl"
    log.write_bytes(b"".join(_lines(log)[:2]))
    _fails(capsys, bundle, "report-round-2.json has no report_issued entry",
           "report-round-1.json has no report_issued entry")


def test_emptied_log_fails(bundle, capsys):
    (bundle["dir"] / "site-b" / "audit.jsonl").write_bytes(b"")
    _fails(capsys, bundle, "audit log is empty but 2 report(s) were issued")


def test_deleted_log_fails(bundle, capsys):
    (bundle["dir"] / "site-b" / "audit.jsonl").unlink()
    _fails(capsys, bundle, "site-b/report-round-1.json: no audit log for this report",
           "site-b/report-round-2.json: no audit log for this report")


def test_deleted_coordinator_log_fails(bundle, capsys):
    (bundle["dir"] / "coordinator" / "coordinator.audit.jsonl").unlink()
    _fails(capsys, bundle, "consortium.json: no audit log for this report")


def test_deleted_report_and_signature_fail(bundle, capsys):
    for name in ("report-round-2.json", "report-round-2.json.sig"):
        (bundle["dir"] / "site-a" / name).unlink()
    _fails(capsys, bundle, "issued report-round-2.json, which is missing")


def test_deleted_consortium_report_fails(bundle, capsys):
    for name in ("consortium.json", "consortium.json.sig"):
        (bundle["dir"] / "coordinator" / name).unlink()
    _fails(capsys, bundle, "issued consortium.json, which is missing")


def test_round2_report_replaced_by_signed_round1_fails(bundle, capsys):
    site = bundle["dir"] / "site-a"
    for suffix in ("", ".sig"):
        shutil.copyfile(site / f"report-round-1.json{suffix}", site / f"report-round-2.json{suffix}")
    _fails(capsys, bundle, "issued report-round-2.json with sha256", "the file differs",
           "report-round-2.json is round 1, the log issued round 2 there")


def test_log_replaced_by_another_sites_log_fails(bundle, capsys):
    shutil.copyfile(bundle["dir"] / "site-b" / "audit.jsonl", bundle["dir"] / "site-a" / "audit.jsonl")
    _fails(capsys, bundle, "actor 'site-b' signed by 'site-b', but this is 'site-a''s log")


def test_log_rewritten_with_another_sites_key_and_name_fails(bundle, capsys):
    # site-b's operator forges site-a's whole log, report hashes and all, with site-b's key
    site = bundle["dir"] / "site-a"
    original = _lines(site / "audit.jsonl")
    (site / "audit.jsonl").unlink()
    forged = AuditLog(site / "audit.jsonl", key=bundle["private"]["site-b"], actor="site-b")
    for line in original:
        entry = json.loads(line)
        forged.append(entry["kind"], entry["data"])
    _fails(capsys, bundle, "but this is 'site-a''s log")


def test_log_with_no_reports_is_bound_to_its_directory(bundle, capsys):
    for p in (bundle["dir"] / "site-a").glob("report-round-*"):
        p.unlink()
    log = bundle["dir"] / "site-a" / "audit.jsonl"
    log.write_bytes(_lines(log)[0])  # a valid one-entry chain, nothing issued from it
    code, out, _ = run(capsys, bundle["dir"], *key_args(bundle))
    assert code == 0, out
    log.write_bytes(_lines(bundle["dir"] / "site-b" / "audit.jsonl")[0])  # site-b's, also valid
    _fails(capsys, bundle, "this is 'site-a''s log")


def test_altered_checkpoint_fails(bundle, capsys):
    ckpt = bundle["dir"] / "coordinator" / "adapter.safetensors"
    ckpt.write_bytes(ckpt.read_bytes().replace(b"weights", b"WEIGHTS", 1))
    ckpt.with_name(ckpt.name + ".sig").unlink()  # no coordinator key: drop the signature
    _fails(capsys, bundle, "round 2: adapter.safetensors sha256 differs from the report")


def test_deleted_checkpoint_fails(bundle, capsys):
    ckpt = bundle["dir"] / "coordinator" / "adapter.safetensors"
    ckpt.unlink()
    ckpt.with_name(ckpt.name + ".sig").unlink()
    _fails(capsys, bundle, "round 2: adapter.safetensors is missing")


def test_reissued_round_keeps_the_latest_entry(bundle, capsys):
    # a site may re-issue a round (restart): the latest report_issued for the path wins
    log = AuditLog(bundle["dir"] / "site-a" / "audit.jsonl", key=bundle["private"]["site-a"], actor="site-a")
    issue_report(log, site_report(site_id="site-a", round_=2, history=[], metrics_mode="dp-noised"),
           bundle["dir"] / "site-a" / "report-round-2.json", bundle["private"]["site-a"])
    code, out, _ = run(capsys, bundle["dir"], *key_args(bundle))
    assert code == 0, out


def _launcher_log(bundle, site, key_of):
    log = AuditLog(bundle["dir"] / site / "launcher.audit.jsonl", key=bundle["private"][key_of],
                   actor=f"{key_of}-launcher")
    log.append("update_rejected", {"reason": "bundle_not_trusted", "run_id": "7"})


def test_launcher_log_signed_by_its_site_verifies(bundle, capsys):
    _launcher_log(bundle, "site-a", "site-a")
    code, out, _ = run(capsys, bundle["dir"], *key_args(bundle))
    assert code == 0 and "launcher.audit.jsonl: audit log valid: 1 entries" in out


def test_launcher_log_of_another_site_fails(bundle, capsys):
    _launcher_log(bundle, "site-a", "site-b")
    _fails(capsys, bundle, "launcher log entry by 'site-b-launcher' signed by 'site-b'")


def test_unsigned_launcher_log_fails(bundle, capsys):
    AuditLog(bundle["dir"] / "site-a" / "launcher.audit.jsonl", key=None, actor="site-a-launcher").append(
        "update_rejected", {"reason": "bundle_not_trusted"})
    _fails(capsys, bundle, "launcher.audit.jsonl: line 1: entry seq=0: entry is not signed")
