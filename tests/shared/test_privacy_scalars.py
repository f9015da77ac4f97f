"""The privacy scalars: one type, whose wire form the wire check reads back into the same type."""

import dataclasses
import math

import numpy as np
import pytest

from shared import wire, wire_adapter, wire_pack
from shared.privacy_scalars import PRIVACY_KEYS, PrivacyScalars
from shared.report import Privacy
from shared.run_config import RunConfig

RUN = RunConfig.from_flower({"lora.r": 2})
A, B = "base.layer.lora_A.weight", "base.layer.lora_B.weight"
ADAPTER = {A: np.ones((2, 4), np.float32), B: np.zeros((4, 2), np.float32)}
SCALARS = PrivacyScalars(epsilon=1.5, epsilon_round=0.5, delta=1e-5, noise_multiplier=1.1, sample_rate=0.01,
                         steps=50, max_grad_norm=1.0, accountant="prv", secure_mode=True,
                         patients_bucket=120, ledger_seq=3, ledger_head="ab" * 32)


def test_the_keys_are_the_fields():
    assert PRIVACY_KEYS == {f.name for f in dataclasses.fields(PrivacyScalars)}
    assert set(SCALARS.to_record()) == PRIVACY_KEYS


def test_wire_form_round_trips_through_the_wire_check():
    got = wire.check_reply(wire_pack.pack_train_reply(ADAPTER, SCALARS.to_record()), kind="train",
                           spec=wire_adapter.spec_of(ADAPTER), run=RUN).privacy
    assert isinstance(got, PrivacyScalars) and got == SCALARS
    assert PrivacyScalars.from_record(SCALARS.to_record()) == SCALARS


def test_the_wire_refuses_scalars_without_a_patients_bucket():
    with pytest.raises(TypeError):  # Flower's ConfigRecord takes no None: it cannot even be packed
        wire_pack.pack_train_reply(ADAPTER, dataclasses.replace(SCALARS, patients_bucket=None).to_record())


def test_non_private_baseline_is_not_private():
    assert SCALARS.private
    assert not dataclasses.replace(SCALARS, noise_multiplier=0.0).private
    assert not dataclasses.replace(SCALARS, epsilon=math.inf).private


def test_the_report_is_built_from_the_scalars():
    p = Privacy.from_scalars(SCALARS, epsilon_ceiling=8.0, noise_source="chacha20-gaussian")
    for name in PRIVACY_KEYS - {"patients_bucket"}:  # the report shows no patient count
        assert getattr(p, name) == getattr(SCALARS, name), name
    assert p.epsilon_remaining == 6.5 and p.noise_source == "chacha20-gaussian"
    assert "patients_bucket" not in Privacy.model_fields
