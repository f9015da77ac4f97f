"""The ClientApp's site policy ``require_secagg`` (FEDSYNTH_SITE_REQUIRE_SECAGG).

A site that requires SecAgg+ declines every plain train message with
``secagg_required`` before anything is trained or spent, whatever the
coordinator's run config says; SecAgg+ rounds and evaluation are unaffected.
The federation-level tests reuse the in-process ServerApp/SecAgg+ harness
(tests/federation.py) and the TEST-ONLY fake site (tests/fake_site.py, the
``calls`` fixture of tests/conftest.py).
"""

import importlib
import json

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict

from client.app import app as client_app
from shared import wire, wire_pack
from shared.audit import verify_log
from shared.run_config import RunConfig
from tests.fake_site import A, B
from tests.federation import SECAGG_RC, contexts, quantisation_bound
from tests.federation import run_over_wire as run

ENV = "FEDSYNTH_SITE_REQUIRE_SECAGG"


@pytest.fixture(autouse=True)
def clean_env(clean_site_env):
    """FEDSYNTH_SITE_* cleared, cwd a temporary directory (tests/client/conftest.py)."""


def _train_message(round_id: int = 3) -> Message:
    return Message(wire_pack.pack_instruction(round_id=round_id, adapter=None), dst_node_id=100,
                   message_type="train", group_id=str(round_id))


def _context(tmp_path, run_config: dict) -> Context:
    return Context(run_id=1, node_id=100, state=RecordDict(), run_config=run_config,
                   node_config={"site-id": "site-a", "output-dir": str(tmp_path / "out")})


@pytest.fixture
def real_site(monkeypatch):
    """The real client/site.py with its training function replaced by one that must not run."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 100), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)  # as the Flower runtime would
    site = importlib.import_module("client.site")
    trained, specs = [], []

    def train_local_round(settings, run=None, **kwargs):
        trained.append(kwargs.get("round_id"))
        raise AssertionError("training ran")

    def adapter_spec(settings, run):
        specs.append(run)
        return {A: ((run.lora.r, 4), run.lora.dtype), B: ((4, run.lora.r), run.lora.dtype)}

    monkeypatch.setattr(site, "train_local_round", train_local_round)
    monkeypatch.setattr(site, "adapter_spec", adapter_spec)
    return trained, specs


@pytest.mark.parametrize("run_secagg", [False, True])
def test_plain_round_is_declined_before_training_ledger_or_spec(tmp_path, monkeypatch, real_site, run_secagg):
    trained, specs = real_site
    monkeypatch.setenv(ENV, "true")
    ctx = _context(tmp_path, {"lora.r": 2, "secagg": run_secagg})
    reply = client_app(_train_message(), ctx)
    got = wire.check_reply(reply.content, kind="train", spec=None, run=RunConfig.from_flower({"lora.r": 2}))
    assert got.decline == "secagg_required" and got.adapter is None
    assert trained == [] and specs == []  # nothing trained, not even the model config read
    assert not (tmp_path / "out" / "privacy-ledger.jsonl").exists()
    # the refusal is in the site's (hash-chained) audit log
    audit = tmp_path / "out" / "audit.jsonl"
    assert verify_log(audit, {}, allow_unsigned=True) == 1  # no signing key configured here
    entries = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [(e["kind"], e["actor"], e["data"]) for e in entries] == [
        ("update_rejected", "site-a", {"phase": "train", "reason": "secagg_required", "round": 3})]


def test_without_the_setting_the_same_plain_round_reaches_training(tmp_path, monkeypatch, real_site):
    trained, specs = real_site
    for value in (None, "false"):  # default, and set explicitly
        if value is not None:
            monkeypatch.setenv(ENV, value)
        reply = client_app(_train_message(), _context(tmp_path, {"lora.r": 2, "secagg": False}))
        # the stand-in training raised, so the existing fail-closed path answers
        assert dict(reply.content["decline"]) == {"reason": "site_error"}
    assert trained == [3, 3] and len(specs) == 2
    assert not (tmp_path / "out" / "audit.jsonl").exists() or "secagg_required" not in \
        (tmp_path / "out" / "audit.jsonl").read_text()


@pytest.mark.parametrize("require", [False, True])
def test_plain_train_reply_with_the_fake_site(tmp_path, monkeypatch, calls, require):
    # The fake site has no audit_log: the decline must still be sent (local log line only).
    monkeypatch.setenv(ENV, str(require).lower())
    rc = {"lora.r": 2, "secagg": False}
    ctx = contexts(tmp_path, rc, n=1)[100]
    reply = client_app(_train_message(round_id=1), ctx)
    run_cfg = RunConfig.from_flower(rc)
    spec = {A: ((2, 4), "float32"), B: ((4, 2), "float32")}
    got = wire.check_reply(reply.content, kind="train", spec=spec, run=run_cfg)
    if require:
        assert got.decline == "secagg_required" and calls == []
    else:
        assert got.decline is None and [c[0] for c in calls] == ["train"]
        np.testing.assert_array_equal(got.adapter[A], np.ones((2, 4), np.float32))  # site0: 0 + 1


@pytest.mark.parametrize("require", [False, True])
def test_secagg_round_is_unaffected_by_the_setting(tmp_path, monkeypatch, calls, require):
    monkeypatch.setenv(ENV, str(require).lower())
    summary, adapter, _ = run(tmp_path, SECAGG_RC)
    rnd = summary["rounds"][0]
    assert rnd["aggregated"] is True and rnd["train"]["accepted"] == [100, 101]
    assert rnd["train"]["declined"] == {}
    # site0 sends 1 (weight 10), site1 sends 2 (weight 20): the weighted mean 5/3, through SecAgg+
    np.testing.assert_allclose(adapter[A], np.full((2, 4), 5 / 3), atol=quantisation_bound([10, 20]), rtol=0)
    assert [c[0] for c in calls].count("train") == 2


def test_plain_federation_gets_nothing_from_sites_that_require_secagg(tmp_path, monkeypatch, calls):
    monkeypatch.setenv(ENV, "true")
    summary, adapter, _ = run(tmp_path, SECAGG_RC | {"secagg": False})
    rnd = summary["rounds"][0]
    assert rnd["train"]["accepted"] == []
    assert rnd["train"]["declined"] == {"100": "secagg_required", "101": "secagg_required"}
    assert rnd["aggregated"] is False and adapter is None
    assert "train" not in [c[0] for c in calls]


def test_evaluate_is_unaffected_by_the_setting(tmp_path, monkeypatch, calls):
    # Metric summaries of the GLOBAL adapter: sent in the clear under SecAgg+ as well.
    monkeypatch.setenv(ENV, "true")
    rc = {"lora.r": 2, "secagg": False}
    msg = Message(wire_pack.pack_instruction(round_id=1, adapter=None), dst_node_id=100,
                  message_type="evaluate", group_id="1")
    reply = client_app(msg, contexts(tmp_path, rc, n=1)[100])
    got = wire.check_reply(reply.content, kind="evaluate", spec=None, run=RunConfig.from_flower(rc))
    assert got.metrics == {"diversity.distinct_1": 0.25} and [c[0] for c in calls] == ["evaluate"]


@pytest.mark.parametrize(("error", "reason"), [("evaluation", "evaluation_budget"), ("epsilon", "budget_exceeded")])
def test_a_refused_evaluation_is_a_typed_decline(tmp_path, monkeypatch, error, reason):
    """#12 §3: past the run's evaluation budget or the ε ceiling, the coordinator gets a typed flag only."""
    import types

    from flwr.supercore.task_identity import TaskIdentity

    from shared.errors import BudgetExceededError, EvaluationBudgetError

    for attr, value in (("_run_id", 1), ("_node_id", 100), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)  # as the Flower runtime would

    def site_evaluate(*args, **kwargs):
        if error == "evaluation":
            raise EvaluationBudgetError("this run has used 4 of its 4 evaluations")
        raise BudgetExceededError("over the ceiling", projected_epsilon=9.0, ceiling=8.0)

    fake = types.ModuleType("client.site")
    fake.adapter_spec = lambda settings, run: {}
    fake.site_evaluate = site_evaluate
    monkeypatch.setattr("client.app.site", fake)
    msg = Message(wire_pack.pack_instruction(round_id=2, adapter=None), dst_node_id=100,
                  message_type="evaluate", group_id="2")
    reply = client_app(msg, _context(tmp_path, {"lora.r": 2}))
    got = wire.check_reply(reply.content, kind="evaluate", spec=None, run=RunConfig.from_flower({"lora.r": 2}))
    assert got.decline == reason and not got.metrics


@pytest.mark.parametrize("kind", ["train", "evaluate"])
def test_coordinator_of_another_wire_version_is_declined_before_anything(tmp_path, real_site, kind, caplog):
    """A v1 (unversioned) coordinator: the site declines with the typed ``wire_version`` reason,
    logs which side to upgrade, and reads nothing else (no spec, no training)."""
    from flwr.app import ConfigRecord

    trained, specs = real_site
    old = Message(RecordDict({"instruction": ConfigRecord({"round": 3})}), dst_node_id=100,
                  message_type=kind, group_id="3")
    with caplog.at_level("WARNING", logger="fedsynth"):
        reply = client_app(old, _context(tmp_path, {"lora.r": 2}))
    got = wire.check_reply(reply.content, kind=kind, spec=None, run=RunConfig.from_flower({"lora.r": 2}))
    assert got.decline == "wire_version"
    assert trained == [] and specs == []
    assert "coordinator speaks wire v1 (unversioned), this side v2: upgrade the coordinator" in caplog.text
