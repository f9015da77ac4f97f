"""Issue #12 §4: the ledger's ``released`` record is written only after the wire check passed.

The real client/site.py and its real ledger; only the training itself is replaced
(by a stand-in that makes a real reservation), so the ClientApp's order of
events is what is tested: reserve -> train -> check_reply -> released.
"""

import importlib
import json

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict

from client.app import app as client_app
from client.dp.config import TrainResult
from shared import wire_pack
from shared.privacy_scalars import PrivacyScalars
from tests.fake_site import A, B
from tests.federation import SECAGG_RC
from tests.federation import run_over_wire as run


@pytest.fixture(autouse=True)
def clean_env(clean_site_env):
    """FEDSYNTH_SITE_* cleared, cwd a temporary directory (tests/client/conftest.py)."""


@pytest.fixture
def site(monkeypatch):
    """client/site.py whose training reserves for real and returns ``site.next_adapter``."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 100), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)
    mod = importlib.import_module("client.site")

    def train_local_round(settings, run, *, round_id, global_adapter=None, **_):
        dp = run.train
        ledger = mod.open_ledger(settings)
        entry = ledger.reserve(round_id=str(round_id), noise_multiplier=1.0, sample_rate=0.1, steps=3,
                               delta=1e-5, accountant=dp.accountant, epsilon_ceiling=settings.epsilon_ceiling)
        eps = ledger.epsilon(delta=1e-5, accountant=dp.accountant)
        privacy = PrivacyScalars(epsilon=eps, epsilon_round=eps, delta=1e-5, noise_multiplier=1.0,
                                 sample_rate=0.1, steps=3, max_grad_norm=1.0, accountant=dp.accountant,
                                 secure_mode=dp.secure_mode, patients_bucket=10)
        return TrainResult(adapter=dict(mod.next_adapter), privacy=privacy, mean_loss=0.0, ledger_entry=entry)

    monkeypatch.setattr(mod, "train_local_round", train_local_round)
    monkeypatch.setattr(mod, "adapter_spec", lambda settings, run: {A: ((2, 4), "float32"), B: ((4, 2), "float32")})
    monkeypatch.setattr(mod, "next_adapter", {A: torch.ones(2, 4), B: torch.zeros(4, 2)}, raising=False)
    return mod


def _round(tmp_path):
    msg = Message(wire_pack.pack_instruction(round_id=1, adapter=None), dst_node_id=100,
                  message_type="train", group_id="1")
    ctx = Context(run_id=1, node_id=100, state=RecordDict(), run_config={"lora.r": 2},
                  node_config={"site-id": "site-a", "output-dir": str(tmp_path / "out")})
    return client_app(msg, ctx).content


def site_settings_for(tmp_path):
    from client.node_config import site_settings

    return site_settings({"site-id": "site-a", "output-dir": str(tmp_path / "out")})


def _released(site, tmp_path):
    kinds = [e.kind for e in site.open_ledger(site_settings_for(tmp_path)).entries()]
    audit = [json.loads(line) for line in (tmp_path / "out" / "audit.jsonl").read_text().splitlines()]
    anchored = [e["data"]["kind"] for e in audit if e["kind"] == "ledger_anchor"]
    return kinds, anchored


def test_a_reply_that_fails_the_wire_check_is_never_marked_released(tmp_path, site):
    site.next_adapter = {A: torch.full((2, 4), float("nan")), B: torch.zeros(4, 2)}  # check_reply refuses NaN
    content = _round(tmp_path)
    assert dict(content["decline"]) == {"reason": "site_error"}
    kinds, anchored = _released(site, tmp_path)
    assert kinds == ["reserve"] and anchored == ["reserve"]  # the spend counts; nothing "left"


def test_a_reply_that_passes_is_marked_released_after_the_check(tmp_path, site):
    content = _round(tmp_path)
    privacy = dict(content["privacy"])
    kinds, anchored = _released(site, tmp_path)
    assert kinds == ["reserve", "released"] and anchored == ["reserve", "released"]
    first = site.open_ledger(site_settings_for(tmp_path)).entries()[0]
    assert (privacy["ledger_seq"], privacy["ledger_head"]) == (first.seq, first.hash)
    np.testing.assert_array_equal(np.asarray(content["adapter"][A].numpy()), np.ones((2, 4), np.float32))


def test_secagg_rounds_release_after_their_checks(tmp_path, calls):
    summary, _, _ = run(tmp_path, SECAGG_RC)
    assert summary["rounds"][0]["aggregated"] is True
    import client.app

    assert sorted(client.app.site.released) == [("site0", 1), ("site1", 1)]
