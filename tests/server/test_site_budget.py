"""The coordinator anchors each site's epsilon outside the site (issue #12 §2).

The adversary is the site's own operator: they can delete all local state,
restore an old backup, or re-make the ledger and its MACs with a new secret.
The coordinator keeps the last ledger position and epsilon per site key and
recomputes epsilon from every (sigma, q, steps) the site reported, so each of
those moves is refused, typed, while the round goes on with the other sites.
"""

import hashlib
import json
import shutil

import pytest
from flwr.proto.node_pb2 import NodeInfo

from server import report as rep
from server.app import run_federation
from server.site_budget import (
    STATE_NAME,
    Admitted,
    BudgetRefusal,
    SiteBudgetRegistry,
    key_for,
    site_keys,
)
from shared.accounting import compute_epsilon
from shared.audit import AuditLog
from shared.errors import LedgerError
from shared.privacy_scalars import PrivacyScalars
from shared.report_consortium import ConsortiumReport
from shared.report_io import read_report
from shared.run_config import RunConfig
from shared.signing import generate_key, load_private_key
from tests.federation import RC, InProcessGrid, contexts
from tests.server.summaries import RUN as REPORT_RUN
from tests.server.summaries import sample_summary

RUN = (1.0, 0.1, 50)  # sigma, q, steps of one honest round


def eps(n_runs, accountant="prv"):
    return compute_epsilon([RUN] * n_runs, delta=1e-5, accountant=accountant)


def head(tag):
    return hashlib.sha256(str(tag).encode()).hexdigest()


def privacy(seq, *, runs=None, epsilon=None, head_tag=None, **over):
    runs = seq if runs is None else runs
    p = dict(epsilon=eps(runs) if epsilon is None else epsilon, epsilon_round=eps(1), delta=1e-5,
             noise_multiplier=RUN[0], sample_rate=RUN[1], steps=RUN[2], max_grad_norm=1.0,
             accountant="prv", secure_mode=False, patients_bucket=40, ledger_seq=seq,
             ledger_head=head(seq if head_tag is None else head_tag))
    p.update(over)
    return p


def admit(reg, p, key="node:7", rnd=1):
    return reg.admit(key, PrivacyScalars(**p), run_name="r", round_id=rnd, node=7)


def test_honest_site_is_admitted_round_after_round(tmp_path):
    reg = SiteBudgetRegistry.open(tmp_path)
    for seq in (1, 2, 3):
        got = admit(reg, privacy(seq), rnd=seq)
        assert isinstance(got, Admitted), got
        assert got.epsilon_recomputed == pytest.approx(eps(seq), rel=1e-6)
    # a ledger that also holds runs the coordinator never saw (other runs, DP metrics): seq jumps, eps higher
    assert isinstance(admit(reg, privacy(10, runs=8)), Admitted)
    assert reg.get("node:7")["ledger_seq"] == 10


def test_epsilon_going_down_between_rounds_is_refused(tmp_path):
    reg = SiteBudgetRegistry.open(tmp_path)
    assert isinstance(admit(reg, privacy(1, runs=4)), Admitted)
    got = admit(reg, privacy(2, runs=3))  # newer ledger position, but less epsilon than anchored
    assert isinstance(got, BudgetRefusal) and got.codes == ("epsilon_decreased",)
    assert reg.get("node:7")["ledger_seq"] == 1  # nothing recorded for a refusal


def test_restored_backup_same_or_lower_seq_is_refused(tmp_path):
    reg = SiteBudgetRegistry.open(tmp_path)
    for seq in (1, 2, 3):
        admit(reg, privacy(seq))
    # the operator restores the backup taken after round 1 (and re-signs it): an older position
    got = admit(reg, privacy(2, epsilon=eps(3) * 1.5, head_tag="re-signed"))
    assert isinstance(got, BudgetRefusal) and "rollback" in got.codes
    # deletes all state and starts a fresh ledger
    got = admit(reg, privacy(1, runs=1, head_tag="fresh"))
    assert isinstance(got, BudgetRefusal) and {"rollback", "epsilon_decreased"} <= set(got.codes)
    # sends the anchored state again: no reservation for this round
    got = admit(reg, privacy(3))
    assert isinstance(got, BudgetRefusal) and "replay" in got.codes


def test_fork_same_seq_different_head_is_refused(tmp_path):
    reg = SiteBudgetRegistry.open(tmp_path)
    admit(reg, privacy(1))
    admit(reg, privacy(2))
    got = admit(reg, privacy(2, epsilon=eps(3) + 1.0, head_tag="other branch"))
    assert isinstance(got, BudgetRefusal) and got.codes == ("fork",)


def test_epsilon_below_the_recomputation_from_its_own_reports_is_refused(tmp_path):
    reg = SiteBudgetRegistry.open(tmp_path)
    # round 1 already: a site claiming a fraction of what its (sigma, q, steps, delta) give
    got = admit(reg, privacy(1, epsilon=eps(1) / 2))
    assert isinstance(got, BudgetRefusal) and got.codes == ("epsilon_below_recomputed",)
    # a site that keeps epsilon flat while reporting a new round each time
    assert isinstance(admit(reg, privacy(1)), Admitted)
    got = admit(reg, privacy(2, epsilon=eps(1)))
    assert isinstance(got, BudgetRefusal) and got.codes == ("epsilon_below_recomputed",)
    # and the recomputation uses the reported accountant and delta
    rdp = privacy(2, epsilon=eps(2, "rdp"), accountant="rdp")
    assert isinstance(admit(reg, rdp), Admitted)


def test_registry_survives_a_restart_and_refuses_tampering(tmp_path):
    reg = SiteBudgetRegistry.open(tmp_path)
    admit(reg, privacy(1))
    admit(reg, privacy(2))
    again = SiteBudgetRegistry.open(tmp_path)  # a restarted coordinator
    assert again.get("node:7")["ledger_seq"] == 2 and len(again.get("node:7")["history"]) == 2
    assert again.digest() == reg.digest()
    got = admit(again, privacy(1, runs=2, head_tag="x"))
    assert isinstance(got, BudgetRefusal) and "rollback" in got.codes
    # no temp files left behind
    assert [p.name for p in tmp_path.iterdir()] == [STATE_NAME]
    # an edited registry (lowering a site's anchor) stops the coordinator instead of starting afresh
    path = tmp_path / STATE_NAME
    body = json.loads(path.read_text())
    body["sites"]["node:7"]["ledger_seq"] = 0
    path.write_text(json.dumps(body))
    with pytest.raises(LedgerError, match="registry"):
        SiteBudgetRegistry.open(tmp_path)
    path.write_text(path.read_text()[:40])  # torn / truncated
    with pytest.raises(LedgerError, match="registry"):
        SiteBudgetRegistry.open(tmp_path)


class _NodesGrid:
    def __init__(self, infos):
        self.infos = infos

    def get_nodes(self):
        return self.infos


def test_site_key_is_the_supernode_public_key_when_flower_exposes_it():
    pk = b"-----BEGIN PUBLIC KEY-----abc"
    keys = site_keys(_NodesGrid([NodeInfo(node_id=5, public_key=pk), NodeInfo(node_id=6)]))
    assert keys == {5: f"pubkey:{hashlib.sha256(pk).hexdigest()}", 6: "node:6"}
    assert key_for(9, keys) == "node:9"

    class Broken:
        def get_nodes(self):
            raise RuntimeError("no node listing")

    assert site_keys(Broken()) == {}


# ---- through the coordinator loop, with the fake sites of tests/server/test_app.py ----------------


def _ledger(tmp_path, k):
    return tmp_path / f"s{k}" / f"fake-ledger-site{k}.json"


def test_site_that_deletes_its_state_is_refused_and_the_round_goes_on(tmp_path, calls):
    rc = RC | {"num-rounds": 2, "min-sites": 1}
    ctx = contexts(tmp_path, rc, n=2)
    first = run_federation(InProcessGrid(ctx), RunConfig.from_flower(rc), run_dir=tmp_path / "a",
                           sleep=lambda s: None)
    assert first["rounds"][1]["train"]["accepted"] == [100, 101]
    _ledger(tmp_path, 1).unlink()  # site1's operator deletes all local state
    second = run_federation(InProcessGrid(contexts(tmp_path, rc, n=2)), RunConfig.from_flower(rc),
                            run_dir=tmp_path / "b", sleep=lambda s: None)
    rnd = second["rounds"][0]
    assert rnd["train"]["accepted"] == [100] and rnd["aggregated"] is True
    refused = rnd["train"]["refused"]["101"]
    assert refused["kind"] == "ledger" and {"rollback", "epsilon_decreased"} <= set(refused["codes"])
    assert len(refused["sha256"]) == 16
    audit = [json.loads(x) for x in (tmp_path / "b" / "audit.jsonl").read_text().splitlines()]
    reasons = [e["data"]["reason"] for e in audit if e["kind"] == "update_rejected"]
    assert any(r.startswith("refused (ledger: rollback") for r in reasons), reasons
    assert all("site_budget_sha256" in e["data"] for e in audit if e["kind"] == "round")


def test_restored_backup_is_refused_under_secagg(tmp_path, calls):
    from tests.federation import SECAGG_RC
    from tests.federation import run_over_wire as secagg_run

    rc = SECAGG_RC | {"num-rounds": 1}
    backup = tmp_path / "backup.json"
    secagg_run(tmp_path, rc, name="a")
    shutil.copy(_ledger(tmp_path, 1), backup)  # the operator's backup after run a
    summary, _, _ = secagg_run(tmp_path, rc, name="b")
    assert summary["rounds"][0]["train"]["accepted"] == [100, 101]
    shutil.copy(backup, _ledger(tmp_path, 1))  # ... restored
    summary, adapter, _ = secagg_run(tmp_path, rc, name="c")
    rnd = summary["rounds"][0]
    refused = rnd["train"]["refused"]
    # the restored ledger re-reaches run b's position with another head: a fork
    assert refused["101"]["kind"] == "ledger" and "fork" in refused["101"]["codes"]
    # one checked contribution left: never unmasked alone
    assert refused["100"]["kind"] == "too_few" and rnd["aggregated"] is False and adapter is None


def test_consortium_report_shows_anchored_and_recomputed_epsilon(tmp_path, calls):
    key = tmp_path / "keys" / "coordinator.key"
    generate_key(key)
    rc = RC | {"num-rounds": 2}
    run_dir = tmp_path / "run"
    run_federation(InProcessGrid(contexts(tmp_path, rc, n=3)), RunConfig.from_flower(rc), run_dir=run_dir,
                   sleep=lambda s: None, key=load_private_key(key))
    report = read_report(run_dir / "consortium-report.json", ConsortiumReport)
    reg = SiteBudgetRegistry.open(tmp_path)
    steps = RunConfig.from_flower(rc).train.steps
    for site, node in zip(report.sites, (100, 101), strict=True):
        anchored = reg.get(f"node:{node}")
        assert site.site_key == f"node:{node}"
        assert site.ledger_seq == anchored["ledger_seq"] == 2
        assert site.ledger_head == anchored["ledger_head"]
        assert site.epsilon == pytest.approx(anchored["epsilon"])
        assert site.epsilon_recomputed == pytest.approx(
            compute_epsilon([(1.0, 0.1, steps)] * 2, delta=1e-5, accountant="prv"))
        assert [r.ledger_seq for r in site.rounds] == [1, 2]
        assert all(r.epsilon_recomputed is not None for r in site.rounds)
    html = (run_dir / "consortium-report.html").read_text()
    assert "recomputed by the coordinator" in html and report.sites[0].ledger_head[:16] in html


def test_old_summaries_without_anchor_still_make_a_report(tmp_path):
    report = rep.build_consortium_report(sample_summary(tmp_path / "run"), run=REPORT_RUN, run_dir=tmp_path / "run")
    assert all(s.ledger_seq is None and s.epsilon_recomputed is None for s in report.sites)
    audit = AuditLog(tmp_path / "audit.jsonl", actor="coordinator")
    rep.audit_round(audit, sample_summary(tmp_path / "run2")["rounds"][0])


def test_report_schema_refuses_what_the_anchor_refuses():
    from pydantic import ValidationError

    from shared.report_consortium import SitePrivacySummary, SiteRoundPrivacy

    def rnd(r, seq, e, rec):
        return SiteRoundPrivacy(round=r, epsilon=e, epsilon_round=0.5, delta=1e-5, noise_multiplier=1.0,
                                sample_rate=0.1, steps=10, max_grad_norm=1.0, accountant="prv",
                                secure_mode=False, ledger_seq=seq, ledger_head=head(seq),
                                epsilon_recomputed=rec)

    ok = SitePrivacySummary(site_id="node-1", rounds=[rnd(1, 1, 1.0, 1.0), rnd(2, 2, 2.0, 1.9)],
                            site_key="node:1", epsilon=2.0, epsilon_recomputed=1.9, ledger_seq=2,
                            ledger_head=head(2))
    assert ok.ledger_seq == 2
    with pytest.raises(ValidationError, match="increase"):
        SitePrivacySummary(site_id="node-1", rounds=[rnd(1, 2, 1.0, 1.0), rnd(2, 2, 2.0, 1.9)])
    with pytest.raises(ValidationError, match="recomputation"):
        SitePrivacySummary(site_id="node-1", rounds=[rnd(1, 1, 1.0, 3.0)])
    with pytest.raises(ValidationError, match="site_key"):
        SitePrivacySummary(site_id="node-1", rounds=[], site_key="Jane Roe")


def test_round_anchor_admits_under_the_nodes_site_key(tmp_path):
    from server.site_budget import round_anchor

    reg = SiteBudgetRegistry.open(tmp_path)
    anchor = round_anchor(reg, {7: "pubkey:ab"}, run_name="r", round_id=3)
    assert isinstance(anchor(7, PrivacyScalars(**privacy(1))), Admitted)
    assert reg.get("pubkey:ab")["last_round"] == 3 and reg.get("node:7") is None
    assert isinstance(anchor(8, PrivacyScalars(**privacy(1))), Admitted) and reg.get("node:8") is not None  # no key: node id
    assert isinstance(anchor(7, PrivacyScalars(**privacy(1))), BudgetRefusal)  # the same ledger state again: replay
