"""shared/wire_secagg.py: the SecAgg+ reply and instruction checks, one refusal per bad part.

A site checks its own reply before Flower's secaggplus_mod masks it (masked=False);
the coordinator checks what arrives before unmasking (masked=True). Each test starts
from a reply that passes and breaks exactly one thing, so every refusal is shown to
be that check's (tests/server/test_secagg.py drives the whole protocol).
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from shared import wire_version
from shared.errors import WireError
from shared.run_config import RunConfig
from shared.wire_secagg import (
    FITRES_METRICS,
    FITRES_NUM_EXAMPLES,
    FITRES_PARAMETERS,
    FITRES_STATUS,
    SECAGG_CONFIGS_KEY,
    SECAGG_LAYOUT_KEY,
    SECAGG_MASKED_KEY,
    check_secagg_reply,
    pack_secagg_reply,
    secagg_max_weight,
    secagg_weight,
    unpack_secagg_instruction,
)
from tests.fake_site import A, B

RUN = RunConfig.from_flower({"lora.r": 2, "secagg": True, "secagg-clipping-range": 1.0})
SPEC = {A: ((2, 4), "float32"), B: ((4, 2), "float32")}
PRIVACY = dict(epsilon=1.0, epsilon_round=1.0, delta=1e-5, noise_multiplier=1.0, sample_rate=0.1,
               steps=1, max_grad_norm=1.0, accountant="prv", secure_mode=True, patients_bucket=30,
               ledger_seq=1, ledger_head="0f" * 32)
GOOD = {A: np.full((2, 4), 0.25), B: np.zeros((4, 2))}


def _reply(contribution=None, **kw):
    kw = {"weight": 30, "privacy": PRIVACY} | kw
    return pack_secagg_reply(GOOD if contribution is None else contribution, **kw)


def _refusal(content, *, masked=False, spec=SPEC, run=RUN) -> str:
    with pytest.raises(WireError) as err:
        check_secagg_reply(content, spec=spec, run=run, masked=masked)
    return " | ".join(f"{p.where}: {p.reason}" for p in err.value.problems)


def _masked(blobs):
    """A reply as the mod leaves it: clear values gone, the masked vectors in secaggplus_configs."""
    content = _reply()
    content[FITRES_PARAMETERS] = type(content[FITRES_PARAMETERS])()
    content[SECAGG_CONFIGS_KEY] = ConfigRecord({SECAGG_MASKED_KEY: blobs})
    return content


def _ints(*shapes):
    from flwr.common import ndarray_to_bytes

    return [ndarray_to_bytes(np.zeros(s, np.int64)) for s in shapes]


# --- weights ----------------------------------------------------------------------------

def test_weights_follow_the_run_weighting_and_are_clamped():
    assert secagg_max_weight(RUN) == 1000 and secagg_weight(30, RUN) == 30
    assert secagg_weight(0, RUN) == 1 and secagg_weight(5000, RUN) == 1000
    capped = RunConfig.from_flower({"lora.r": 2, "aggregation.weight-cap": 50})
    assert secagg_max_weight(capped) == 50 and secagg_weight(80, capped) == 50
    uniform = RunConfig.from_flower({"lora.r": 2, "aggregation.weighting": "uniform"})
    assert secagg_max_weight(uniform) == 1 and secagg_weight(400, uniform) == 1


# --- the site's reply, before masking ---------------------------------------------------

def test_a_good_reply_and_a_good_decline_pass():
    ok = check_secagg_reply(_reply(), spec=SPEC, run=RUN, masked=False)
    assert ok.weight == 30 and ok.privacy.patients_bucket == 30 and ok.decline is None
    np.testing.assert_array_equal(ok.contribution[A], GOOD[A])
    zeros = {k: np.zeros_like(v) for k, v in GOOD.items()}
    no = check_secagg_reply(_reply(zeros, weight=0, privacy=None, decline="budget_exceeded"),
                            spec=SPEC, run=RUN, masked=False)
    assert no.decline == "budget_exceeded" and no.weight == 0 and no.privacy is None


def test_not_a_recorddict_and_another_wire_version_are_refused():
    with pytest.raises(WireError, match="not a RecordDict"):
        check_secagg_reply({"fitres.parameters": 1}, spec=SPEC, run=RUN, masked=False)
    content = _reply()
    content[wire_version.WIRE_KEY] = ConfigRecord({"version": wire_version.WIRE_VERSION + 1})
    with pytest.raises(WireError, match="wire version mismatch"):
        check_secagg_reply(content, spec=SPEC, run=RUN, masked=False)


@pytest.mark.parametrize("key", [FITRES_STATUS, FITRES_NUM_EXAMPLES, FITRES_METRICS, SECAGG_LAYOUT_KEY])
def test_each_missing_record_is_refused(key):
    content = _reply()
    del content[key]
    assert f"record[{key!r}]: missing" in _refusal(content)


def test_the_masked_vectors_may_not_come_from_a_site_before_masking():
    content = _reply()
    content[SECAGG_CONFIGS_KEY] = ConfigRecord({SECAGG_MASKED_KEY: [b"x"]})
    assert "not allowed" in _refusal(content, masked=False)


def test_a_status_other_than_success_is_refused():
    content = _reply()
    content[FITRES_STATUS] = ConfigRecord({"code": 0, "message": "Success, and the notes are ..."})
    assert "fitres.status" in _refusal(content)


@pytest.mark.parametrize("record", [
    MetricRecord({"num_examples": 1001}),  # above the run's max weight
    MetricRecord({"num_examples": -1}),
    MetricRecord({"num_examples": 30, "patients": 31}),  # a second, unchecked number
])
def test_a_weight_outside_its_record_contract_is_refused(record):
    content = _reply()
    content[FITRES_NUM_EXAMPLES] = record
    assert "fitres.num_examples" in _refusal(content)


def test_a_decline_with_weight_is_refused():
    zeros = {k: np.zeros_like(v) for k, v in GOOD.items()}
    assert "weight 0" in _refusal(_reply(zeros, weight=10, privacy=None, decline="site_error"))


def test_an_unknown_decline_reason_is_refused():
    zeros = {k: np.zeros_like(v) for k, v in GOOD.items()}
    assert "decline" in _refusal(_reply(zeros, weight=0, privacy=None, decline="patient Jane Roe"))


def test_privacy_scalars_are_checked_as_in_a_plain_reply():
    assert "epsilon" in _refusal(_reply(privacy=PRIVACY | {"epsilon": -1.0}))
    missing = {k: v for k, v in PRIVACY.items() if k != "ledger_head"}
    assert "ledger_head" in _refusal(_reply(privacy=missing))


@pytest.mark.parametrize("names", [[B, A], [A, A], [], ["x"]])
def test_a_layout_not_sorted_unique_or_not_the_spec_is_refused(names):
    content = _reply()
    content[SECAGG_LAYOUT_KEY] = ConfigRecord({"names": names})
    assert "layout" in _refusal(content)


def test_a_contribution_shaped_unlike_the_spec_is_refused():
    wide = {A: np.zeros((2, 5)), B: np.zeros((5, 2))}
    assert "shape" in _refusal(_reply(wide))


def test_round_one_checks_the_lora_structure_without_a_spec():
    assert check_secagg_reply(_reply(), spec=None, run=RUN, masked=False).shapes == ((2, 4), (4, 2))
    rank3 = {A: np.zeros((3, 4)), B: np.zeros((4, 3))}  # the run says lora.r = 2
    assert _refusal(_reply(rank3), spec=None)


@pytest.mark.parametrize("value, reason", [(np.nan, "non-finite"), (np.inf, "non-finite"),
                                           (1.5, "clipping-range"), (-1.01, "clipping-range")])
def test_a_contribution_value_outside_its_range_is_refused(value, reason):
    bad = GOOD | {A: np.full((2, 4), value)}
    assert reason in _refusal(_reply(bad))


def test_a_contribution_in_another_dtype_or_not_canonically_encoded_is_refused():
    assert "float64" in _refusal(_reply({k: v.astype(np.float32) for k, v in GOOD.items()}))
    content = _reply()
    arrays = content[FITRES_PARAMETERS]
    first = arrays["0"]
    arrays["0"] = type(first)(dtype=first.dtype, shape=first.shape, stype=first.stype,
                              data=first.data + b"\0covert")
    assert "canonical" in _refusal(content) or "decode" in _refusal(content)


# --- the coordinator's view, after masking ----------------------------------------------

def test_a_masked_reply_passes_and_its_shapes_are_the_spec():
    ok = check_secagg_reply(_masked(_ints((1,), (2, 4), (4, 2))), spec=SPEC, run=RUN, masked=True)
    assert ok.shapes == ((2, 4), (4, 2)) and ok.contribution is None and ok.weight == 30


def test_clear_values_left_by_the_mod_are_refused():
    content = _reply()
    content[SECAGG_CONFIGS_KEY] = ConfigRecord({SECAGG_MASKED_KEY: _ints((1,), (2, 4), (4, 2))})
    assert "not masked" in _refusal(content, masked=True)


@pytest.mark.parametrize("blobs, reason", [
    (lambda: _ints((2,), (2, 4), (4, 2)), "weight factor"),  # the weight factor is one integer
    (lambda: _ints((1,), (2, 4)), "names for"),  # a tensor missing
    (lambda: _ints((1,), (2, 4), (4, 3)), "shape"),
    (lambda: _ints((1,))[:1] + [np.zeros((2, 4)).tobytes()], "decode"),  # not an ndarray blob
])
def test_masked_vectors_of_the_wrong_form_are_refused(blobs, reason):
    assert reason in _refusal(_masked(blobs()), masked=True)


def test_masked_vectors_must_be_integers():
    from flwr.common import ndarray_to_bytes

    blobs = _ints((1,), (2, 4)) + [ndarray_to_bytes(np.zeros((4, 2)))]
    assert "integers" in _refusal(_masked(blobs), masked=True)


def test_masked_configs_holding_anything_else_are_refused():
    content = _masked(_ints((1,), (2, 4), (4, 2)))
    content[SECAGG_CONFIGS_KEY] = ConfigRecord({SECAGG_MASKED_KEY: _ints((1,)), "note": "Jane Roe"})
    assert "masked vectors" in _refusal(content, masked=True)


# --- the instruction a site receives ----------------------------------------------------

def _fitins(arrays, config):
    from flwr.common import FitIns, ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import fitins_to_recorddict

    content = fitins_to_recorddict(FitIns(ndarrays_to_parameters(arrays), config), True)
    content[SECAGG_CONFIGS_KEY] = ConfigRecord({})
    return content


V = {"wire_version": wire_version.WIRE_VERSION}


def test_round_one_instruction_has_no_adapter():
    got = unpack_secagg_instruction(_fitins([], {"round": 1} | V), spec=SPEC, run=RUN)
    assert got.round_id == 1 and got.adapter is None


def test_an_instruction_with_other_records_or_a_wrong_array_count_is_refused():
    content = _fitins([np.ones((2, 4), np.float32)], {"round": 2} | V)
    with pytest.raises(WireError, match="secagg instruction refused"):
        unpack_secagg_instruction(content, spec=SPEC, run=RUN)  # 1 array for 2 tensors
    extra = _fitins([], {"round": 2} | V)
    extra["leak"] = ConfigRecord({"text": "x"})
    with pytest.raises(WireError, match="records must be exactly"):
        unpack_secagg_instruction(extra, spec=SPEC, run=RUN)
    with pytest.raises(WireError):
        unpack_secagg_instruction(RecordDict(), spec=SPEC, run=RUN)
