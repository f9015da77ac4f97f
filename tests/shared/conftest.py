"""Fixtures shared by the tests of shared/."""

import hashlib

import pytest

from shared.audit import AuditLog
from shared.signing import generate_key, load_private_key, sign_file
from tests.shared.reports import NAMES, consortium_report, issue_report, site_report


@pytest.fixture
def bundle(tmp_path):
    """What an auditor receives: public keys, signed reports, signed audit logs, a signed checkpoint."""
    keys_dir, private = tmp_path / "keys", {}
    for name in NAMES:
        generate_key(tmp_path / "private" / f"{name}.key")
        private[name] = load_private_key(tmp_path / "private" / f"{name}.key")
        keys_dir.mkdir(exist_ok=True)
        (keys_dir / f"{name}.key.pub").write_bytes((tmp_path / "private" / f"{name}.key.pub").read_bytes())
    out = tmp_path / "bundle"
    for site in ("site-a", "site-b"):
        log = AuditLog(out / site / "audit.jsonl", key=private[site], actor=site)
        log.append("run_start", {"run_id": "run-1"})
        for rnd in (1, 2):
            log.append("round", {"round": rnd, "epsilon": 1.0})
            issue_report(log, site_report(site_id=site, round_=rnd, history=[]),
                   out / site / f"report-round-{rnd}.json", private[site])
    clog = AuditLog(out / "coordinator" / "coordinator.audit.jsonl", key=private["coordinator"], actor="coordinator")
    clog.append("update_accepted", {"round": 1, "site": "site-a"})
    clog.append("update_rejected", {"round": 1, "site": "site-b", "reason": "norm bound"})
    ckpt = out / "coordinator" / "adapter.safetensors"
    ckpt.write_bytes(b"\x00\x01weights" * 100)
    sign_file(ckpt, private["coordinator"])
    checkpoints = [{"round": 2, "path": "adapter.safetensors",
                    "sha256": hashlib.sha256(ckpt.read_bytes()).hexdigest()}]
    issue_report(clog, consortium_report(checkpoints=checkpoints), out / "coordinator" / "consortium.json",
           private["coordinator"])
    (out / "README.txt").write_text("not signed, ignored")
    return {"dir": out, "keys": keys_dir, "private": private}
