"""The wire contract refuses every smuggling attempt, and lets honest replies through."""

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from shared import wire, wire_pack, wire_version
from shared.errors import WireError
from shared.run_config import RunConfig
from tests.shared.wire_samples import RUN, SECRET, SPEC, A, B, adapter, privacy, refused


def test_honest_replies_pass():
    r = wire.check_reply(wire_pack.pack_train_reply(adapter(), privacy()), kind="train", spec=SPEC, run=RUN)
    np.testing.assert_array_equal(r.adapter[A], adapter()[A])
    assert r.privacy.patients_bucket == 120 and r.privacy.to_record() == privacy()
    m = wire.check_reply(wire_pack.pack_evaluate_reply({"diversity.distinct_2": 0.123456789}),
                         kind="evaluate", spec=None, run=RUN)
    assert m.metrics == {"diversity.distinct_2": 0.123457}
    d = wire.check_reply(wire_pack.pack_decline("budget_exceeded"), kind="train", spec=SPEC, run=RUN)
    assert d.decline == "budget_exceeded" and d.adapter is None


@pytest.mark.parametrize("reason", ["budget_exceeded", "evaluation_budget", "secagg_required", "site_error",
                                    "wire_version"])
def test_every_typed_decline_passes_and_nothing_else(reason):
    assert wire_pack.DECLINE_REASONS == {"budget_exceeded", "evaluation_budget", "secagg_required", "site_error",
                                    "wire_version"}
    for kind, spec in (("train", SPEC), ("evaluate", None)):
        assert wire.check_reply(wire_pack.pack_decline(reason), kind=kind, spec=spec, run=RUN).decline == reason
    refused(wire_pack.pack_decline(reason.upper()), match="reason")


def test_text_in_metric_names_and_values():
    refused(RecordDict({"metrics": MetricRecord({SECRET: 1.0})}), "evaluate", match="not a whitelisted")
    refused(RecordDict({"metrics": MetricRecord({"dp.train.loss_drop_mean": [0.5, 0.7]})}), "evaluate",
            match="scalar")
    rec = ConfigRecord({"dp.train.loss_drop_mean": SECRET})
    refused(RecordDict({"metrics": rec}), "evaluate", match="must be a MetricRecord")
    # eight bytes of text hidden in a float's mantissa: refused for its precision
    hidden = np.frombuffer(b"JohnDoe!", dtype=np.float64)[0]
    if np.isfinite(hidden):
        refused(RecordDict({"metrics": MetricRecord({"dp.train.loss_drop_mean": float(hidden)})}), "evaluate",
                match="significant digits")
    refused(RecordDict({"metrics": MetricRecord({"dp.train.loss_drop_mean": float("nan")})}), "evaluate",
            match="finite")


def test_text_in_config_echo_and_extra_records():
    content = wire_pack.pack_train_reply(adapter(), privacy())
    content["echo"] = ConfigRecord({"note_id": "n-0042", "text": SECRET})
    err = refused(content, match="not allowed")
    assert any("echo" in p.where for p in err.problems)
    refused(wire_pack.pack_train_reply(adapter(), privacy(note=SECRET)), match="not a privacy key")
    refused(wire_pack.pack_train_reply(adapter(), privacy(accountant=SECRET)), match="accountant")
    refused(wire_pack.pack_train_reply(adapter(), privacy(steps="50")), match="steps")
    refused(wire_pack.pack_train_reply(adapter(), privacy(secure_mode=1)), match="secure_mode")
    refused(wire_pack.pack_train_reply(adapter(), privacy(patients_bucket=123)), match="multiple of 10")
    refused(wire_pack.pack_train_reply(adapter(), privacy(noise_multiplier=0.0)), match="not DP")
    refused(wire_pack.pack_train_reply(adapter(), privacy(accountant="rdp")), match="differs from the run")
    bad_decline = RecordDict({"decline": ConfigRecord({"reason": SECRET})})
    refused(bad_decline, match="reason")
    refused(RecordDict({"decline": ConfigRecord({"reason": "budget_exceeded", "why": SECRET})}))
    # a train layout under an evaluate reply, and vice versa
    refused(wire_pack.pack_train_reply(adapter(), privacy()), "evaluate", match="not allowed")


def test_every_violation_listed_at_once():
    content = wire_pack.pack_train_reply(adapter() | {"x": np.zeros(1, np.float32)}, privacy(note="x"))
    content["extra"] = ArrayRecord()
    err = refused(content)
    assert len(err.problems) >= 3


def test_instruction_checked_on_receipt():
    got = wire.check_instruction(wire_pack.pack_instruction(round_id=3, adapter=adapter()), spec=SPEC, run=RUN)
    assert got.round_id == 3 and set(got.adapter) == {A, B}
    assert wire.check_instruction(wire_pack.pack_instruction(round_id=1, adapter=None), spec=SPEC,
                                  run=RUN).adapter is None
    bad = wire_pack.pack_instruction(round_id=1, adapter=adapter() | {A: np.full((2, 8), np.inf, np.float32)})
    bad["cmd"] = ConfigRecord({"exec": "upload notes"})
    with pytest.raises(WireError) as err:
        wire.check_instruction(bad, spec=SPEC, run=RUN)
    assert "non-finite" in str(err.value) and "cmd" in str(err.value)
    with pytest.raises(WireError, match="round"):
        wire.check_instruction(RecordDict({"instruction": ConfigRecord({"round": True, "wire_version": wire_version.WIRE_VERSION})}), spec=SPEC, run=RUN)


# ---- ledger anchor (issue #12 §2) and a site stricter than the run (§5) ----


def test_ledger_seq_and_head_are_strictly_checked():
    ok = wire.check_reply(wire_pack.pack_train_reply(adapter(), privacy()), kind="train", spec=SPEC, run=RUN)
    assert ok.privacy.ledger_seq == 3 and ok.privacy.ledger_head == "ab" * 32
    for seq in (0, -1, 10**12 + 1, 1.0, True, "3", [3]):
        refused(wire_pack.pack_train_reply(adapter(), privacy(ledger_seq=seq)), match="ledger_seq")
    for head in ("AB" * 32, "ab" * 31, "ab" * 33, "ab" * 32 + "\n", "zz" * 32, SECRET, b"ab" * 32,
                 ["ab" * 32], "\u0661" * 64):
        refused(wire_pack.pack_train_reply(adapter(), privacy(ledger_head=head)), match="ledger_head")
    for key in ("ledger_seq", "ledger_head"):
        p = privacy()
        del p[key]
        refused(wire_pack.pack_train_reply(adapter(), p), match="missing")


def test_site_may_be_stricter_on_secure_mode_never_looser():
    strict_run = RunConfig.from_flower({"lora.r": 2, "train.secure-mode": True})
    # run says False, site used secure noise anyway: accepted, and reported as used
    ok = wire.check_reply(wire_pack.pack_train_reply(adapter(), privacy(secure_mode=True)), kind="train",
                          spec=SPEC, run=RUN)
    assert ok.privacy.secure_mode is True
    # run says True: True passes, False (looser) is refused
    wire.check_reply(wire_pack.pack_train_reply(adapter(), privacy(secure_mode=True)), kind="train",
                     spec=SPEC, run=strict_run)
    with pytest.raises(WireError, match="secure-mode is true"):
        wire.check_reply(wire_pack.pack_train_reply(adapter(), privacy(secure_mode=False)), kind="train",
                         spec=SPEC, run=strict_run)


def test_accountant_must_be_the_runs():
    rdp_run = RunConfig.from_flower({"lora.r": 2, "train.accountant": "rdp"})
    wire.check_reply(wire_pack.pack_train_reply(adapter(), privacy(accountant="rdp")), kind="train",
                     spec=SPEC, run=rdp_run)
    refused(wire_pack.pack_train_reply(adapter(), privacy(accountant="rdp")), match="differs from the run")
    refused(wire_pack.pack_train_reply(adapter(), privacy(accountant=["prv"])), match="accountant")


def test_delta_is_bounded_by_the_patients_bucket():
    # bucket 120: delta must be < 1/1200
    wire.check_reply(wire_pack.pack_train_reply(adapter(), privacy(delta=1 / 1200 * 0.999)), kind="train",
                     spec=SPEC, run=RUN)
    refused(wire_pack.pack_train_reply(adapter(), privacy(delta=1 / 1200)), match="patients_bucket")
    refused(wire_pack.pack_train_reply(adapter(), privacy(delta=0.5)), match="patients_bucket")
    # a bucket of 0 is floored at 10: delta < 1/100
    wire.check_reply(wire_pack.pack_train_reply(adapter(), privacy(patients_bucket=0, delta=0.009)),
                     kind="train", spec=SPEC, run=RUN)
    refused(wire_pack.pack_train_reply(adapter(), privacy(patients_bucket=0, delta=0.01)),
            match="patients_bucket")
    refused(wire_pack.pack_train_reply(adapter(), privacy(patients_bucket=10_000, delta=1e-5)),
            match="patients_bucket")


def test_malformed_values_are_refused_not_raised():
    # issue #13 §1: an accountant given as a list used to raise TypeError
    for over in ({"accountant": ["prv", "rdp"]}, {"epsilon": 10**400}, {"patients_bucket": 10**30},
                 {"secure_mode": [True]}, {"ledger_head": ["x"]}):
        try:
            content = wire_pack.pack_train_reply(adapter(), privacy(**over))
        except Exception:  # Flower itself refuses to build the record: nothing to check
            continue
        err = refused(content)
        assert not any(wire.INTERNAL_FAILURE in p.reason for p in err.problems), err.problems
