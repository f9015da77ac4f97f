"""ServerApp <-> ClientApp message flow in-process, with the TEST-ONLY fake client.site.

The harness (tests/federation.py) hands each Message straight to the real ClientApp,
which calls the fake site of tests/fake_site.py (the ``calls`` fixture injects it):
known answers, so the federation's values can be checked.
"""

import json
import types

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.app import app as client_app
from server import checkpoint
from server.app import run_federation
from server.run_summary import SUMMARY_NAME
from shared import wire, wire_pack
from shared.errors import ConfigError
from shared.run_config import RunConfig
from tests.fake_site import SECRET, A, B
from tests.federation import RC, InProcessGrid, contexts


def test_round_aggregates_accepted_sites_only(tmp_path, calls):
    # site0, site1 train; site2 is out of budget; site3 fails; node 104 dropped off.
    ctx = contexts(tmp_path, RC, n=5)
    grid = InProcessGrid(ctx, dropped={104})
    summary = run_federation(grid, RunConfig.from_flower(RC), run_dir=tmp_path / "run", sleep=lambda s: None)
    rnd = summary["rounds"][0]
    assert rnd["train"]["accepted"] == [100, 101]
    assert rnd["train"]["declined"] == {"102": "budget_exceeded", "103": "site_error"}
    assert rnd["train"]["missing"] == [104]
    # patients weighting: site0 bucket 10 (value 1), site1 bucket 20 (value 2) -> 5/3
    _, adapter = checkpoint.load_latest(tmp_path / "run" / "checkpoints")
    np.testing.assert_allclose(adapter[A], np.full((2, 4), 5 / 3), rtol=1e-6)
    assert rnd["evaluate"]["mean"]["diversity.distinct_1"] == pytest.approx((0.25 + 0.5 + 0.75 + 1.0) / 4)
    text = (tmp_path / "run" / SUMMARY_NAME).read_text()
    assert "Jane" not in text and "MRN" not in text
    assert json.loads(text)["status"] == "completed"


def test_resume_from_last_checkpoint(tmp_path, calls):
    run_dir = tmp_path / "run"
    ctx = contexts(tmp_path, RC, n=2)
    run_federation(InProcessGrid(ctx), RunConfig.from_flower(RC), run_dir=run_dir, sleep=lambda s: None)
    calls.clear()
    rc2 = RC | {"num-rounds": 2}
    summary = run_federation(InProcessGrid(contexts(tmp_path, rc2, n=2)), RunConfig.from_flower(rc2),
                             run_dir=run_dir, sleep=lambda s: None)
    trained = [c for c in calls if c[0] == "train"]
    assert {c[2] for c in trained} == {2}  # round 1 was not redone
    np.testing.assert_allclose(trained[0][3][A], np.full((2, 4), 5 / 3), rtol=1e-6)
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert checkpoint.load_latest(run_dir / "checkpoints")[0] == 2


def test_server_refuses_hostile_reply_and_goes_on(tmp_path, calls):
    def hostile(msg, context):
        content = wire_pack.pack_train_reply({A: np.ones((2, 4), np.float32), B: np.ones((4, 2), np.float32)},
                                        dict(epsilon=1.0, epsilon_round=1.0, delta=1e-5, noise_multiplier=1.0,
                                             sample_rate=0.1, steps=1, max_grad_norm=1.0, accountant="prv",
                                             secure_mode=False, patients_bucket=10,
                                             ledger_seq=1, ledger_head="ab" * 32))
        content["leak"] = ConfigRecord({"text": SECRET})
        return Message(content, reply_to=msg)

    ctx = contexts(tmp_path, RC, n=3)
    grid = InProcessGrid(ctx, handlers={102: hostile})
    summary = run_federation(grid, RunConfig.from_flower(RC), run_dir=tmp_path / "run", sleep=lambda s: None)
    rnd = summary["rounds"][0]
    assert rnd["train"]["accepted"] == [100, 101]
    assert "102" in rnd["train"]["refused"]
    assert SECRET not in json.dumps(summary)


def test_too_few_sites_leaves_global_unchanged(tmp_path, calls):
    rc = RC | {"min-sites": 3}
    ctx = contexts(tmp_path, rc, n=4)  # only site0/site1 can produce updates
    summary = run_federation(InProcessGrid(ctx), RunConfig.from_flower(rc), run_dir=tmp_path / "run",
                             sleep=lambda s: None)
    assert summary["rounds"][0]["aggregated"] is False
    assert checkpoint.load_latest(tmp_path / "run" / "checkpoints") is None
    stopped = run_federation(InProcessGrid(contexts(tmp_path, rc, n=2)), RunConfig.from_flower(rc),
                             run_dir=tmp_path / "run2", sleep=lambda s: None)
    assert stopped["status"].startswith("failed: 2 sites connected")


def test_client_refuses_bad_instruction_and_run_config(tmp_path, calls):
    ctx = contexts(tmp_path, RC, n=1)[100]
    content = wire_pack.pack_instruction(round_id=1, adapter=None)
    content["cmd"] = ConfigRecord({"upload": "notes.jsonl"})
    msg = Message(content, dst_node_id=100, message_type="train", group_id="1")
    reply = client_app(msg, ctx)
    assert dict(reply.content["decline"]) == {"reason": "site_error"}
    assert calls == []  # the site functions never ran
    bad = Context(run_id=1, node_id=100, state=RecordDict(), node_config=dict(ctx.node_config),
                  run_config={"num-rounds": 1, "data-exfil": "yes"})
    ok_msg = Message(wire_pack.pack_instruction(round_id=1, adapter=None), dst_node_id=100,
                     message_type="evaluate", group_id="1")
    assert dict(client_app(ok_msg, bad).content["decline"]) == {"reason": "site_error"}


def test_secagg_refuses_robust_aggregation():
    # with secagg the coordinator only sees the sum (tests/server/test_secagg.py covers the rounds)
    with pytest.raises(ConfigError, match="fedavg"):
        RunConfig.from_flower(RC | {"secagg": True, "aggregation": "median"})


def test_malformed_reply_is_a_typed_refusal_and_the_run_goes_on(tmp_path, calls, monkeypatch):
    """Issue #13 §1: an accountant sent as a list used to raise TypeError and end the run."""
    def malformed(msg, context):
        if msg.metadata.message_type != "train":
            return client_app(msg, context)
        p = dict(epsilon=1.0, epsilon_round=1.0, delta=1e-5, noise_multiplier=1.0, sample_rate=0.1,
                 steps=1, max_grad_norm=1.0, accountant=["prv", SECRET], secure_mode=False,
                 patients_bucket=10, ledger_seq=1, ledger_head="ab" * 32)
        content = wire_pack.pack_train_reply({A: np.ones((2, 4), np.float32), B: np.ones((4, 2), np.float32)}, p)
        return Message(content, reply_to=msg)

    rc = RC | {"num-rounds": 2}
    grid = InProcessGrid(contexts(tmp_path, rc, n=3), handlers={102: malformed})
    summary = run_federation(grid, RunConfig.from_flower(rc), run_dir=tmp_path / "run", sleep=lambda s: None)
    assert summary["status"] == "completed"
    for rnd in summary["rounds"]:
        assert rnd["train"]["accepted"] == [100, 101] and rnd["aggregated"] is True
        refused = rnd["train"]["refused"]["102"]
        assert refused["kind"] == "wire" and len(refused["sha256"]) == 16
    # the refusal is recorded by hash: nothing the site sent is echoed
    run_dir = tmp_path / "run"
    for name in (SUMMARY_NAME, "audit.jsonl", "consortium-report.json"):
        assert SECRET not in (run_dir / name).read_text()

    # even a check that raises something other than WireError cannot end the run
    real = wire.check_reply

    def exploding(content, **kw):
        if kw.get("kind") == "train" and "privacy" in content and content["privacy"]["patients_bucket"] == 20:
            raise TypeError(SECRET)
        return real(content, **kw)

    import server.rounds as server_rounds

    # only the coordinator's view of the wire module explodes (the sites' checks stay real)
    monkeypatch.setattr(server_rounds, "wire", types.SimpleNamespace(**{**vars(wire), "check_reply": exploding}))
    summary = run_federation(InProcessGrid(contexts(tmp_path, RC | {"min-sites": 1}, n=2)),
                             RunConfig.from_flower(RC | {"min-sites": 1, "run-name": "other"}),
                             run_dir=tmp_path / "other", sleep=lambda s: None)
    rnd = summary["rounds"][0]
    assert rnd["train"]["accepted"] == [100] and rnd["train"]["refused"]["101"]["kind"] == "wire"
    assert SECRET not in json.dumps(summary)


def node_info(node_id, name, public_key=b""):
    """What Flower 1.39's grid.get_nodes() returns per node (the fields we read)."""
    return types.SimpleNamespace(node_id=node_id, name=name, public_key=public_key)


def test_sites_are_named_in_summary_audit_and_report(tmp_path, calls):
    ctx = contexts(tmp_path, RC, n=3)
    infos = [node_info(100, "st-mary", b"pk-a"), node_info(101, "../../etc <b>x</b>", b"pk-b"),
             node_info(102, "st-mary", b"pk-c")]  # 101: not a valid name; 102: name taken by 100
    summary = run_federation(InProcessGrid(ctx, nodes=infos), RunConfig.from_flower(RC),
                             run_dir=tmp_path / "run", sleep=lambda s: None)
    assert summary["site_names"] == {"100": "st-mary", "101": "node-101", "102": "node-102"}
    entries = [json.loads(line) for line in (tmp_path / "run" / "audit.jsonl").read_text().splitlines()]
    reg = [e["data"] for e in entries if e["kind"] == "site_registered"]
    assert {d["site"] for d in reg} == {"st-mary", "node-101", "node-102"}
    first = next(d for d in reg if d["node"] == "100")
    assert first["named"] is True and len(first["public_key_sha256"]) == 64
    acc = [e["data"] for e in entries if e["kind"] == "update_accepted"]
    assert {d["site"] for d in acc} == {"st-mary", "node-101"}
    report = json.loads((tmp_path / "run" / "consortium-report.json").read_text())
    assert {s["site_id"] for s in report["sites"]} == {"st-mary", "node-101"}
    html = (tmp_path / "run" / "consortium-report.html").read_text()
    assert "st-mary" in html and "etc" not in html


def test_no_site_trained_is_a_failed_run(tmp_path, calls):
    # site2 declines (budget), site3 fails: no update is ever aggregated
    ctx = {k: v for k, v in contexts(tmp_path, RC, n=4).items() if k in (102, 103)}
    summary = run_federation(InProcessGrid(ctx), RunConfig.from_flower(RC), run_dir=tmp_path / "run",
                             sleep=lambda s: None)
    assert summary["status"].startswith("failed: no site's update was aggregated")
    assert "declined (budget_exceeded) 1" in summary["status"]
    report = json.loads((tmp_path / "run" / "consortium-report.json").read_text())
    assert report["status"] == "failed" and "declined (budget_exceeded)" in report["status_reason"]
    html = (tmp_path / "run" / "consortium-report.html").read_text()
    assert "This run failed" in html and "No sites." not in html
    entries = [json.loads(line) for line in (tmp_path / "run" / "audit.jsonl").read_text().splitlines()]
    assert entries[-1]["kind"] == "run_end" and entries[-1]["data"]["status"].startswith("failed")


def test_progress_lines_name_phases_and_sites(tmp_path, calls, caplog):
    import logging

    ctx = contexts(tmp_path, RC, n=3)
    infos = [node_info(100, "alpha"), node_info(101, "beta"), node_info(102, "gamma")]
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.addHandler(caplog.handler)
    try:
        run_federation(InProcessGrid(ctx, nodes=infos), RunConfig.from_flower(RC),
                       run_dir=tmp_path / "run", sleep=lambda s: None)
    finally:
        flwr_logger.removeHandler(caplog.handler)
    text = "\n".join(r.getMessage() for r in caplog.records if r.getMessage().startswith("fedsynth"))
    assert "round 1/1: 3 sites connected: alpha, beta, gamma" in text
    assert "round 1: train on" in text and "train done after" in text
    assert "alpha (ε=" in text and "gamma (budget_exceeded)" in text
    assert "round 1: evaluate on" in text and "evaluate done after" in text
    assert "run " in text and ": completed" in text
