"""Issue #13 §2: every number on the wire is rounded or bounded, counts are buckets, and the
contract carries a version both sides check. Each test plays a site (or coordinator) that
tries to smuggle bits through a number, or speaks another version."""

import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from shared import wire, wire_adapter, wire_numbers, wire_pack, wire_version
from shared.errors import WireError
from tests.shared.wire_samples import RUN, SPEC, adapter, privacy


def raw_train(priv):
    """A train reply packed WITHOUT the site's rounding: what a covert site would send."""
    return RecordDict({"adapter": wire_adapter.pack_adapter(adapter()), "privacy": ConfigRecord(priv),
                       "wire": wire_version.wire_record()})


def metrics(**values):
    return RecordDict({"metrics": MetricRecord(values), "wire": wire_version.wire_record()})


def refused(content, kind="train", match=""):
    with pytest.raises(WireError) as err:
        wire.check_reply(content, kind=kind, spec=SPEC, run=RUN)
    assert match in str(err.value), str(err.value)
    return str(err.value)


def test_metric_ints_obey_the_six_digit_rule():
    # An 18-digit int and 2^63-1 used to pass as whitelisted metrics: 60 covert bits each.
    refused(metrics(**{"dp.train.patients": 123456789012345678}), "evaluate", "significant digits")
    refused(metrics(**{"dp.train.patients": 2**63 - 1}), "evaluate", "")
    refused(metrics(**{"dp.train.patients": 1234567}), "evaluate", "significant digits")
    # magnitude is bounded too (1e17 has one significant digit but a free exponent)
    refused(metrics(**{"dp.train.patients": 10**12}), "evaluate", "magnitude")
    refused(metrics(**{"dp.train.loss_drop_mean": 1e300}), "evaluate", "magnitude")
    ok = wire.check_reply(metrics(**{"dp.train.patients": 123456}), kind="evaluate", spec=None, run=RUN)
    assert ok.metrics == {"dp.train.patients": 123456.0}


def test_counts_are_buckets():
    for bad in (-50, 7, 12345, 15.5, -10):
        refused(metrics(**{"count.reports": bad}), "evaluate", "")
    for good in (0, 10, 120, 40.0):
        wire.check_reply(metrics(**{"count.reports": good}), kind="evaluate", spec=None, run=RUN)
    # the site's packer floors a raw count to its bucket, so an honest site passes
    packed = wire_pack.pack_evaluate_reply({"count.reports": 47, "diversity.mtld": 12.3456789})
    got = wire.check_reply(packed, kind="evaluate", spec=None, run=RUN).metrics
    assert got == {"count.reports": 40.0, "diversity.mtld": 12.3457}


def test_privacy_floats_have_six_significant_digits():
    for key, value in (("epsilon", 1.2345678901), ("noise_multiplier", 1.1000001),
                       ("sample_rate", 0.0123456789), ("delta", 1.00000001e-5),
                       ("max_grad_norm", 1.0000000000000002)):
        refused(raw_train(privacy(**{key: value})), match=f"privacy[{key!r}]: more than 6 significant")
    # an int privacy number is no freer channel
    refused(raw_train(privacy(epsilon=123456789)), match="significant")
    # nor is the exponent: six digits of 1e300 or 1e-300 still carry ~10 bits
    refused(raw_train(privacy(epsilon=1e300)), match="privacy['epsilon']: magnitude outside")
    refused(raw_train(privacy(max_grad_norm=1e-300)), match="privacy['max_grad_norm']: magnitude outside")


def test_site_rounds_privacy_before_sending_and_never_under_reports_epsilon():
    raw = privacy(epsilon=1.2345641, epsilon_round=1.2345641, delta=9.9999991e-6, noise_multiplier=1.23456789)
    got = wire.check_reply(wire_pack.pack_train_reply(adapter(), raw), kind="train", spec=SPEC, run=RUN).privacy
    assert got.epsilon == 1.23457 >= raw["epsilon"]  # rounded up, not to nearest (1.23456)
    assert got.epsilon_round <= got.epsilon
    assert got.delta >= raw["delta"] and got.noise_multiplier == 1.23457
    for v in (0.1, 3.0, 9.999995, 1e-7 + 1e-13, 123456.7):
        up = wire_numbers.round_sig_up(v)
        assert up >= v and wire_numbers.round_sig(up) == up


@pytest.mark.parametrize("key,value,match", [
    ("steps", 10**6 + 1, "steps"), ("steps", 2**62, "steps"), ("steps", 0, "steps"),
    ("patients_bucket", 10**8, "patients_bucket"), ("patients_bucket", 2**62, "patients_bucket"),
    ("patients_bucket", 125, "patients_bucket"), ("patients_bucket", -10, "patients_bucket"),
])
def test_privacy_ints_are_bounded(key, value, match):
    refused(raw_train(privacy(**{key: value})), match=match)


def test_privacy_ints_at_their_bounds_pass():
    ok = raw_train(privacy(steps=10**6, patients_bucket=10**7, delta=1e-9))
    assert wire.check_reply(ok, kind="train", spec=SPEC, run=RUN).privacy.steps == 10**6
    # six digits: the largest buckets and step counts are representable
    for steps, bucket in ((999_999, 9_999_990), (123_456, 1_234_560)):
        wire.check_reply(raw_train(privacy(steps=steps, patients_bucket=bucket, delta=1e-9)),
                         kind="train", spec=SPEC, run=RUN)
    # the ledger position is an exact counter (monotonic at the anchor), bounded by 10^12
    got = wire.check_reply(raw_train(privacy(ledger_seq=1_234_567)), kind="train", spec=SPEC, run=RUN)
    assert got.privacy.ledger_seq == 1_234_567
    refused(raw_train(privacy(ledger_seq=10**12 + 1)), match="ledger_seq")


# ---- the wire version --------------------------------------------------------------------------


def test_coordinator_refuses_a_site_of_another_version_with_a_clear_message():
    old = wire_pack.pack_train_reply(adapter(), privacy())
    del old["wire"]  # a v1 site sends no version
    msg = refused(old, match="wire version mismatch")
    assert "site speaks wire v1 (unversioned), this side v2: upgrade the site" in msg
    newer = wire_pack.pack_train_reply(adapter(), privacy())
    newer["wire"] = ConfigRecord({"version": wire_version.WIRE_VERSION + 1})
    assert f"site speaks wire v{wire_version.WIRE_VERSION + 1}" in refused(newer, match="upgrade the coordinator")
    odd = wire_pack.pack_decline("site_error")
    odd["wire"] = ConfigRecord({"version": "Jane Roe MRN 998877"})
    assert "Jane" not in refused(odd, match="unreadable version")
    extra = wire_pack.pack_decline("site_error")
    extra["wire"] = ConfigRecord({"version": wire_version.WIRE_VERSION, "note": "Jane Roe"})
    assert "Jane" not in refused(extra, match="site speaks wire an unreadable version")


def test_site_refuses_a_coordinator_of_another_version_with_a_clear_message():
    old = RecordDict({"instruction": ConfigRecord({"round": 1})})  # a v1 coordinator
    with pytest.raises(WireError, match="coordinator speaks wire v1 \\(unversioned\\), this side v2: "
                                        "upgrade the coordinator"):
        wire.check_instruction(old, spec=SPEC, run=RUN)
    newer = RecordDict({"instruction": ConfigRecord({"round": 1, "wire_version": wire_version.WIRE_VERSION + 1})})
    with pytest.raises(WireError, match="upgrade the site"):
        wire.check_instruction(newer, spec=SPEC, run=RUN)
    assert wire.check_instruction(wire_pack.pack_instruction(round_id=1, adapter=None), spec=SPEC,
                                  run=RUN).round_id == 1


def test_every_packed_reply_carries_the_version():
    for content in (wire_pack.pack_train_reply(adapter(), privacy()), wire_pack.pack_evaluate_reply({}),
                    wire_pack.pack_decline("wire_version")):
        assert dict(content["wire"]) == {"version": wire_version.WIRE_VERSION}
