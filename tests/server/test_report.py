"""The coordinator's signed consortium report and audit log, built from a run's summary."""

import json

import pytest

from server import report as rep
from server.app import run_federation
from shared.audit import AuditLog, verify_log
from shared.report_consortium import ConsortiumReport
from shared.report_io import read_report
from shared.run_config import RunConfig
from shared.signing import generate_key, load_private_key, load_public_key, sha256_file
from shared.verify import EXIT_FAILED, EXIT_OK, exit_code, verify_paths
from tests.federation import RC, InProcessGrid, contexts
from tests.server.summaries import RUN, sample_summary


@pytest.fixture
def key(tmp_path):
    path = tmp_path / "keys" / "coordinator.key"
    generate_key(path)
    return path


def test_report_carries_sites_metrics_and_checkpoint_hashes(tmp_path):
    run_dir = tmp_path / "run"
    report = rep.build_consortium_report(sample_summary(run_dir), run=RUN, run_dir=run_dir)
    assert report.run_id == "r1" and report.rounds == 2
    assert [s.site_id for s in report.sites] == ["node-7", "node-8"]
    assert [p.epsilon for p in report.sites[1].rounds] == [0.7, 1.4]
    assert [(m.round, m.metrics["diversity.distinct_2"]) for m in report.metrics] == [
        (1, pytest.approx(0.5)), (2, pytest.approx(0.6))]
    assert report.aggregation.norm_bound is None and report.aggregation.method == "fedavg"
    ckpt = report.checkpoints[1]
    assert ckpt.sha256 == sha256_file(run_dir / ckpt.path)
    assert ckpt.sha256 == json.loads((run_dir / "checkpoints" / "state.json").read_text())["sha256"]
    assert report.config_hash == rep.config_hash(RUN) != rep.config_hash(RunConfig.from_flower({"run-name": "r2"}))


def test_signed_report_verifies_and_a_flipped_byte_fails(tmp_path, key):
    run_dir = tmp_path / "run"
    audit = rep.open_audit(run_dir, key=load_private_key(key))
    issued = rep.issue_consortium_report(sample_summary(run_dir), run=RUN, run_dir=run_dir, audit=audit)
    assert issued.json_path == run_dir / "consortium-report.json" and issued.signature.exists()
    assert "<html" in issued.html_path.read_text().lower()
    keys = {"coordinator": load_public_key(key.with_name(key.name + ".pub"))}
    results = verify_paths([run_dir], keys)
    assert exit_code(results) == EXIT_OK, [r.lines() for r in results]
    assert any("consortium report run r1" in r.message for r in results)
    assert isinstance(read_report(issued.json_path, ConsortiumReport), ConsortiumReport)

    data = bytearray(issued.json_path.read_bytes())
    data[data.index(b'"epsilon"') + 2] ^= 0x01
    issued.json_path.write_bytes(bytes(data))
    results = verify_paths([issued.json_path], keys)
    assert exit_code(results) == EXIT_FAILED and "hash mismatch" in results[0].message


def test_report_signed_by_a_site_key_is_refused(tmp_path, key):
    run_dir = tmp_path / "run"
    audit = rep.open_audit(run_dir, key=load_private_key(key))
    issued = rep.issue_consortium_report(sample_summary(run_dir), run=RUN, run_dir=run_dir, audit=audit)
    keys = {"site-a": load_public_key(key.with_name(key.name + ".pub"))}
    results = verify_paths([issued.json_path], keys)
    assert exit_code(results) == EXIT_FAILED and "not by 'coordinator'" in results[0].message


def test_audit_round_records_every_site_with_a_short_reason(tmp_path):
    audit = AuditLog(tmp_path / "audit.jsonl", actor="coordinator")
    record = sample_summary(tmp_path / "run")["rounds"][0]
    record["train"]["refused"] = {"10": ["adapter: " + "x" * 500 + "\nnewline"]}
    record["train"]["missing"] = [11]
    rep.audit_round(audit, record)
    entries = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    kinds = [(e["kind"], e["data"].get("node")) for e in entries]
    assert kinds == [("update_accepted", "7"), ("update_accepted", "8"), ("update_rejected", "9"),
                     ("update_rejected", "10"), ("update_rejected", "11"), ("round", None)]
    reasons = [e["data"]["reason"] for e in entries if e["kind"] == "update_rejected"]
    assert reasons[0] == "declined: budget_exceeded" and reasons[2].startswith("missing")
    # a refusal is recorded by a hash of what was refused, never its content (issue #13 §2)
    assert reasons[1].startswith("refused (wire) sha256 ") and "x" * 10 not in reasons[1]
    assert "\n" not in reasons[1] and len(reasons[1]) <= 200
    assert entries[0]["data"]["epsilon"] == 0.5 and entries[-1]["data"]["aggregated"] is True


def test_federation_run_dir_verifies_end_to_end(tmp_path, key, calls):
    run_dir = tmp_path / "run"
    rc = RC | {"num-rounds": 2}
    run_federation(InProcessGrid(contexts(tmp_path, rc, n=3)), RunConfig.from_flower(rc), run_dir=run_dir,
                   sleep=lambda s: None, key=load_private_key(key))
    keys = {"coordinator": load_public_key(key.with_name(key.name + ".pub"))}
    results = verify_paths([run_dir], keys)
    assert exit_code(results) == EXIT_OK, [r.lines() for r in results]
    entries = [json.loads(x) for x in (run_dir / "audit.jsonl").read_text().splitlines()]
    assert verify_log(run_dir / "audit.jsonl", keys) == len(entries)
    kinds = [e["kind"] for e in entries]
    assert kinds[:2] == ["run_start", "config"] and kinds[-2:] == ["report_issued", "run_end"]
    assert kinds.count("round") == 2 and kinds.count("update_accepted") == 4
    rejected = [e["data"]["reason"] for e in entries if e["kind"] == "update_rejected"]
    assert rejected == ["declined: budget_exceeded"] * 2  # site2 of the fake is out of budget
    # the participation table: which site trained in which round (issue #13 §6), from 1
    report = read_report(run_dir / "consortium-report.json", ConsortiumReport)
    table = {(p.round, p.site_id): p.train for p in report.participation}
    assert sorted({r for r, _ in table}) == [1, 2] and len(table) == 6
    for rnd in (1, 2):
        row = sorted(t for (r, _), t in table.items() if r == rnd)
        assert row == ["declined", "trained", "trained"]
    assert all(p.evaluate == "evaluated" for p in report.participation)
    # the report names the coordinator log's position before its report_issued entry
    issued = next(e for e in entries if e["kind"] == "report_issued")
    assert (report.audit_seq, report.audit_head) == (issued["seq"], issued["prev"])
    report = read_report(run_dir / "consortium-report.json", ConsortiumReport)
    assert entries[-1]["data"]["report_sha256"] == sha256_file(run_dir / "consortium-report.json")
    assert report.rounds == 2 and [len(s.rounds) for s in report.sites] == [2, 2]
    assert entries[1]["data"]["config_hash"] == report.config_hash
