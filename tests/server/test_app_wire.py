"""Issue #13 §2 on the coordinator: the adapter spec is known from round 1 (from the base
model's config.json), the wire version is checked, and a refusal reaches the coordinator's
disk and logs as a hash and typed codes only, never as what the site sent.

Each test plays a covert site against the real ServerApp (server/app.py) in-process, with
the TEST-ONLY fake client.site of tests/server/test_app.py for the honest sites.
"""

import json
import logging

import numpy as np
import pytest
from flwr.app import Message

import server.app
from server.app import run_federation
from shared import adapter_spec, wire_pack, wire_secagg, wire_version
from shared.errors import ConfigError, WireError
from shared.run_config import RunConfig
from shared.settings import CoordinatorSettings
from tests import fake_site
from tests.fake_site import A, B, fake_privacy, fake_spec, make_fake_site
from tests.federation import (
    RC,
    SECAGG_RC,
    InProcessGrid,
    WireGrid,
    contexts,
    coordinator_knows_the_fake_spec,
    site_floors_for_two_fake_sites,
)

REAL_RUN_ADAPTER_SPEC = server.app.run_adapter_spec  # before the `calls` fixture patches it
COVERT = "base_model.model.John_Doe_MRN_123456_suicide.lora_A.weight"
COVERT_B = COVERT.replace("lora_A", "lora_B")
TINY_LLAMA = {"model_type": "llama", "hidden_size": 4, "intermediate_size": 8, "num_hidden_layers": 1,
              "num_attention_heads": 1, "num_key_value_heads": 1, "vocab_size": 16}


def covert_site(adapter):
    """A site that sends ``adapter`` (honest privacy scalars) in every train round."""
    def handler(msg, context):
        if msg.metadata.message_type != "train":
            from client.app import app as client_app
            return client_app(msg, context)
        run = RunConfig.from_flower(RC)
        from client.node_config import site_settings
        settings = site_settings(dict(context.node_config))
        p = fake_privacy(settings, run, patients_bucket=30)
        return Message(wire_pack.pack_train_reply(adapter, p), reply_to=msg)
    return handler


def coordinator_disk(run_dir):
    return "".join(p.read_text(errors="replace") for p in sorted(run_dir.rglob("*")) if p.is_file()
                   and p.suffix in (".json", ".jsonl", ".html", ".sig"))


@pytest.mark.parametrize("adapter", [
    # round 1, no global adapter yet: a tensor named after a patient, with a proper B partner
    {COVERT: np.zeros((2, 4), np.float32), COVERT_B: np.zeros((4, 2), np.float32)},
    # ... or the spec's own names alongside a covert extra pair
    {A: np.zeros((2, 4), np.float32), B: np.zeros((4, 2), np.float32),
     COVERT: np.zeros((2, 4), np.float32), COVERT_B: np.zeros((4, 2), np.float32)},
    # a 64 MB "LoRA" pair under the spec's names (2 x 4M float32 each)
    {A: np.zeros((2, 4 * 2**20), np.float32), B: np.zeros((4 * 2**20, 2), np.float32)},
], ids=["patient-name", "extra-pair", "64MB-pair"])
def test_round_one_adapter_is_checked_against_the_spec(tmp_path, calls, adapter, caplog):
    grid = InProcessGrid(contexts(tmp_path, RC, n=3), handlers={102: covert_site(adapter)})
    with caplog.at_level(logging.INFO):
        summary = run_federation(grid, RunConfig.from_flower(RC), run_dir=tmp_path / "run", sleep=lambda s: None)
    rnd = summary["rounds"][0]
    assert rnd["train"]["accepted"] == [100, 101]
    refused = rnd["train"]["refused"]["102"]
    assert refused["kind"] == "wire" and len(refused["sha256"]) == 16
    # nothing of what was refused reaches the coordinator's disk or log, only its hash
    for text in (coordinator_disk(tmp_path / "run"), caplog.text):
        assert "John_Doe" not in text and "MRN" not in text
    assert refused["sha256"] in caplog.text


def test_round_one_spec_comes_from_the_base_model_config(tmp_path, monkeypatch):
    config = tmp_path / "model" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps(TINY_LLAMA))
    run = RunConfig.from_flower(RC | {"lora.targets": "q_proj"})
    for path in (config, config.parent):  # the file or its model directory; no weights needed
        got = REAL_RUN_ADAPTER_SPEC(run, CoordinatorSettings(base_model_config=path))
        assert got == fake_spec(run)
    monkeypatch.setenv("FEDSYNTH_COORD_BASE_MODEL_CONFIG", str(config))
    assert REAL_RUN_ADAPTER_SPEC(run) == fake_spec(run)
    # default targets (attention + MLP): 7 modules x A/B on the one layer
    assert len(REAL_RUN_ADAPTER_SPEC(RunConfig.from_flower(RC))) == 14
    with pytest.raises(ConfigError, match="no such file"):
        REAL_RUN_ADAPTER_SPEC(run, CoordinatorSettings(base_model_config=tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match="gate_proj_typo"):
        REAL_RUN_ADAPTER_SPEC(RunConfig.from_flower(RC | {"lora.targets": "gate_proj_typo"}),
                              CoordinatorSettings(base_model_config=config))


def test_embedded_default_spec_is_the_sites_own(monkeypatch):
    """The coordinator's default (no config set) is exactly what a site on the embedded model sends."""
    from client.model import _DEFAULT_TARGETS, _MODEL_TYPE_FAMILY
    from client.pretrain import ensure_embedded_model
    from client.site import _spec_for

    monkeypatch.delenv("FEDSYNTH_COORD_BASE_MODEL_CONFIG", raising=False)
    built = json.loads((ensure_embedded_model() / "config.json").read_text())
    assert {k: built[k] for k in adapter_spec.EMBEDDED_MODEL_CONFIG} == adapter_spec.EMBEDDED_MODEL_CONFIG
    run = RunConfig.from_flower({"lora.r": 4})
    site = _spec_for(None, run.lora, run.lora.dtype)
    # 4 layers x (4 attention + 3 MLP projections) x (A, B)
    assert REAL_RUN_ADAPTER_SPEC(run, CoordinatorSettings()) == site and len(site) == 56
    # the family tables the two sides use agree
    assert {k: tuple(v) for k, v in _DEFAULT_TARGETS.items()} == adapter_spec.DEFAULT_LORA_TARGETS
    assert _MODEL_TYPE_FAMILY == adapter_spec.MODEL_TYPE_FAMILY


def test_resume_refuses_a_checkpoint_of_another_spec(tmp_path, calls, monkeypatch):
    run_federation(InProcessGrid(contexts(tmp_path, RC, n=2)), RunConfig.from_flower(RC),
                   run_dir=tmp_path / "run", sleep=lambda s: None)
    rc2 = RC | {"num-rounds": 2}
    other = {A: ((2, 8), "float32"), B: ((8, 2), "float32")}
    with pytest.raises(ConfigError, match="adapter spec"):
        run_federation(InProcessGrid(contexts(tmp_path, rc2, n=2)), RunConfig.from_flower(rc2),
                       run_dir=tmp_path / "run", sleep=lambda s: None, spec=other)


def test_site_of_another_wire_version_is_refused_with_a_clear_message(tmp_path, calls, caplog):
    from client.app import app as client_app

    def old_site(msg, context):  # a site from before wire versioning: no "wire" record
        reply = client_app(msg, context)
        content = reply.content
        del content[wire_version.WIRE_KEY]
        return Message(content, reply_to=msg)

    grid = InProcessGrid(contexts(tmp_path, RC, n=3), handlers={102: old_site})
    with caplog.at_level(logging.WARNING):
        summary = run_federation(grid, RunConfig.from_flower(RC), run_dir=tmp_path / "run", sleep=lambda s: None)
    refused = summary["rounds"][0]["train"]["refused"]["102"]
    assert refused["kind"] == "wire" and refused["codes"] == ["wire_version"]
    assert "site speaks wire v1 (unversioned), this side v2: upgrade the site" in caplog.text


def test_secagg_round_one_layout_is_checked_against_the_spec():
    run = RunConfig.from_flower({"lora.r": 2, "secagg": True})
    p = dict(epsilon=1.0, epsilon_round=1.0, delta=1e-5, noise_multiplier=1.0, sample_rate=0.1, steps=10,
             max_grad_norm=1.0, accountant="prv", secure_mode=True, patients_bucket=30, ledger_seq=1,
             ledger_head="ab" * 32)
    covert = {COVERT: np.zeros((2, 4)), COVERT_B: np.zeros((4, 2))}
    content = wire_secagg.pack_secagg_reply(covert, weight=30, privacy=p)
    with pytest.raises(WireError, match="differ from the adapter spec") as err:
        wire_secagg.check_secagg_reply(content, spec=fake_spec(run), run=run, masked=False)
    assert "John_Doe" not in repr(wire_version.refusal_codes(err.value))
    honest = wire_secagg.pack_secagg_reply({A: np.zeros((2, 4)), B: np.zeros((4, 2))}, weight=30, privacy=p)
    assert wire_secagg.check_secagg_reply(honest, spec=fake_spec(run), run=run, masked=False).weight == 30


def test_secagg_round_one_refuses_a_covert_layout(tmp_path, monkeypatch):
    """Under SecAgg+ the layout (names, masked shapes) is checked against the run's spec in round 1:
    a site whose own spec names a patient is a dropout, and its name reaches no coordinator file."""

    from flwr.app import Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)
    fake = make_fake_site([])
    honest_spec, honest_train = fake.adapter_spec, fake.site_train

    def rename(d):
        return {n.replace("model.layers.0.self_attn.q_proj", "John_Doe_MRN_123456_suicide"): v for n, v in d.items()}

    fake.adapter_spec = lambda s, run: rename(honest_spec(s, run)) if s.site_id == "site4" else honest_spec(s, run)

    def site_train(settings, run, *, global_adapter, round_id):
        adapter, privacy = honest_train(settings, run, global_adapter=None, round_id=round_id)
        return (rename(adapter) if settings.site_id == "site4" else adapter), privacy

    fake.site_train = site_train
    monkeypatch.setattr("client.app.site", fake)
    site_floors_for_two_fake_sites(monkeypatch)
    coordinator_knows_the_fake_spec(monkeypatch)
    ctx = contexts(tmp_path, SECAGG_RC, n=2)
    ctx[104] = Context(run_id=1, node_id=104, state=RecordDict(), run_config=SECAGG_RC,
                       node_config={"site-id": "site4", "output-dir": str(tmp_path / "s4")})
    summary = run_federation(WireGrid(ctx), RunConfig.from_flower(SECAGG_RC), run_dir=tmp_path / "run",
                             sleep=lambda s: None)
    rnd = summary["rounds"][0]
    assert rnd["train"]["accepted"] == [100, 101] and "104" in rnd["train"]["refused"]
    assert "John_Doe" not in coordinator_disk(tmp_path / "run")


def test_e2e_fake_sites_and_the_coordinator_derive_the_same_spec(tmp_path):
    """The e2e bundles (tests/e2e) point FEDSYNTH_COORD_BASE_MODEL_CONFIG at the fake sites' config."""
    path = fake_site.write_base_model_config(tmp_path / "base-model")
    for rc in ({"lora.r": 2}, {"lora.r": 4, "lora.targets": "q_proj,v_proj"}):
        run = RunConfig.from_flower(rc)
        spec = REAL_RUN_ADAPTER_SPEC(run, CoordinatorSettings(base_model_config=path))
        assert spec == fake_site.adapter_spec(None, run) and A in spec and B in spec
