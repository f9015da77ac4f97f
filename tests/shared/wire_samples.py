"""TEST-ONLY samples for the wire tests: a rank-2 run, its adapter spec, an honest adapter and
privacy record, and ``refused`` (the reply must be refused by shared.wire.check_reply)."""

import numpy as np
import pytest
from flwr.app import RecordDict

from shared import wire, wire_version
from shared.errors import WireError
from shared.run_config import RunConfig

RUN = RunConfig.from_flower({"lora.r": 2})
A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
SPEC = {A: ((2, 8), "float32"), B: ((8, 2), "float32")}
SECRET = "Patient John Doe, MRN 123456, attempted suicide"


def adapter():
    return {A: np.full((2, 8), 0.5, np.float32), B: np.zeros((8, 2), np.float32)}


def privacy(**over):
    p = dict(epsilon=1.5, epsilon_round=0.5, delta=1e-5, noise_multiplier=1.1, sample_rate=0.01,
             steps=50, max_grad_norm=1.0, accountant="prv", secure_mode=True, patients_bucket=120,
             ledger_seq=3, ledger_head="ab" * 32)
    p.update(over)
    return p


def refused(content, kind="train", spec=SPEC, match=None):
    if isinstance(content, RecordDict) and wire_version.WIRE_KEY not in content:
        content[wire_version.WIRE_KEY] = wire_version.wire_record()  # a current peer: the check reads on past the version
    with pytest.raises(WireError) as err:
        wire.check_reply(content, kind=kind, spec=spec, run=RUN)
    if match:
        assert match in str(err.value), str(err.value)
    return err.value
