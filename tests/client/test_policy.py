"""Site floors (client/policy.py) and δ from the bucketed count (client/site.py).

The adversaries: a coordinator choosing the run config (it has the source code and
knows every floor's name), and a local process feeding the SuperNode's node config.
Each knob is played looser than the site allows; the site must tighten it or refuse.
"""

import json
import math
import types

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict

from client import policy
from shared import wire_pack
from shared.audit import AuditLog
from shared.errors import ConfigError, PrivacyError
from shared.run_config import RunConfig, TrainConfig
from shared.settings import SiteSettings, load_settings

A, B = "base.layer.lora_A.weight", "base.layer.lora_B.weight"


@pytest.fixture(autouse=True)
def clean_env(clean_site_env):
    """FEDSYNTH_SITE_* cleared, cwd a temporary directory (tests/client/conftest.py)."""


def _settings(**kw) -> SiteSettings:
    return load_settings(SiteSettings, **kw)


LOOSE = {  # what a coordinator that wants the data in the clear would send
    "train.secure-mode": False, "generate.temperature": 0.0, "train.noise-multiplier": 0.0,
    "train.epsilon-per-round": 1000.0, "evaluate.k-min": 2,
}


# ---- apply_site_floors: one test per knob ------------------------------------------


def test_secure_mode_off_is_forced_on():
    run, tightened = policy.apply_site_floors(RunConfig.from_flower({"train.secure-mode": False}), _settings())
    assert run.train.secure_mode is True and any("secure-mode" in t for t in tightened)
    # the site may opt out (to compare noise sources); then the run's value stands
    run, tightened = policy.apply_site_floors(RunConfig.from_flower({"train.secure-mode": False}),
                                              _settings(require_secure_noise=False))
    assert run.train.secure_mode is False and tightened == []


def test_temperature_zero_is_raised_to_the_site_floor():
    run, tightened = policy.apply_site_floors(RunConfig.from_flower({"generate.temperature": 0.0}), _settings())
    assert run.generate.temperature == 0.7 and any("temperature" in t for t in tightened)
    run, _ = policy.apply_site_floors(RunConfig.from_flower({"generate.temperature": 0.0}),
                                      _settings(min_eval_temperature=0.9))
    assert run.generate.temperature == 0.9


def test_greedy_decoding_through_top_k_or_top_p_is_raised():
    run, tightened = policy.apply_site_floors(
        RunConfig.from_flower({"generate.top-k": 1, "generate.top-p": 0.01}), _settings())
    assert (run.generate.top_k, run.generate.top_p) == (50, 0.9)
    assert sum("generate.top-" in t for t in tightened) == 2
    run, tightened = policy.apply_site_floors(RunConfig.from_flower({"generate.top-k": 0}), _settings())
    assert run.generate.top_k == 0 and not any("top-k" in t for t in tightened)  # 0 = no filter


def test_epsilon_per_round_1000_is_lowered_to_the_site_cap():
    rc = {"train.noise-multiplier": 0.0, "train.epsilon-per-round": 1000.0}
    run, tightened = policy.apply_site_floors(RunConfig.from_flower(rc), _settings())
    assert run.train.epsilon_per_round == 2.0 and run.train.noise_multiplier == 0.0
    assert any("epsilon-per-round 1000" in t for t in tightened)


def test_small_noise_multiplier_is_raised():
    run, tightened = policy.apply_site_floors(RunConfig.from_flower({"train.noise-multiplier": 0.01}), _settings())
    assert run.train.noise_multiplier == 0.5 and any("noise-multiplier 0.01" in t for t in tightened)


def test_run_k_min_2_is_raised_to_the_site_k_min():
    run, tightened = policy.apply_site_floors(RunConfig.from_flower({"evaluate.k-min": 2}), _settings(k_min=12))
    assert run.evaluate_k_min == 12 and any("k-min 2 -> 12" in t for t in tightened)


def test_secagg_threshold_001_refuses_the_run():
    rc = {"secagg": True, "secagg-reconstruction-threshold": 0.01}
    with pytest.raises(PrivacyError, match="floors") as err:
        policy.apply_site_floors(RunConfig.from_flower(rc), _settings())
    assert [p.where for p in err.value.problems] == ["secagg-reconstruction-threshold"]
    # 0.5 is not above half either: the site setting itself must be > 0.5
    with pytest.raises(ConfigError):
        _settings(min_secagg_threshold=0.5)
    # without secagg the threshold is not used and not refused
    policy.apply_site_floors(RunConfig.from_flower({"secagg-reconstruction-threshold": 0.01}), _settings())


def test_min_sites_below_the_site_floor_refuses_the_run():
    with pytest.raises(PrivacyError) as err:
        policy.apply_site_floors(RunConfig.from_flower({"min-sites": 2}), _settings(min_sites=3))
    assert [p.where for p in err.value.problems] == ["min-sites"]


def test_all_loose_knobs_at_once_and_a_tight_run_is_untouched():
    run, tightened = policy.apply_site_floors(RunConfig.from_flower(LOOSE), _settings())
    assert (run.train.secure_mode, run.generate.temperature, run.train.epsilon_per_round,
            run.evaluate_k_min) == (True, 0.7, 2.0, 10)
    assert len(tightened) == 4
    tight = RunConfig.from_flower({"train.secure-mode": True, "generate.temperature": 0.8,
                                   "evaluate.k-min": 20, "train.noise-multiplier": 2.0})
    again, none = policy.apply_site_floors(tight, _settings())
    assert again is tight and none == []


# ---- floor_dp: the other mode's floor at the round's real sampling rate -----------


def test_sigma_that_costs_more_than_the_epsilon_cap_becomes_the_cap():
    dp = TrainConfig(noise_multiplier=0.6, steps=200, expected_batch_size=50, accountant="rdp")
    out, tightened = policy.floor_dp(dp, _settings(require_secure_noise=False), n_patients=100, delta=1e-5)
    assert out.noise_multiplier == 0 and out.epsilon_per_round == 2.0
    assert any("costs epsilon" in t for t in tightened)
    # a big sigma is below the cap already: untouched
    big = TrainConfig(noise_multiplier=50.0, steps=10, expected_batch_size=10, accountant="rdp")
    assert policy.floor_dp(big, _settings(require_secure_noise=False), n_patients=1000, delta=1e-5) == (big, [])


def test_epsilon_target_that_needs_too_little_noise_becomes_the_sigma_floor():
    # many patients, few steps: epsilon 8 (under a cap of 10) needs sigma ~0.32 < 0.5
    dp = TrainConfig(noise_multiplier=0.0, epsilon_per_round=8.0, steps=2, expected_batch_size=10, accountant="rdp")
    site = _settings(require_secure_noise=False, max_epsilon_per_round=10.0)
    out, tightened = policy.floor_dp(dp, site, n_patients=10_000, delta=1e-5)
    assert out.noise_multiplier == 0.5 and out.epsilon_per_round == 0
    assert any("needs noise multiplier" in t for t in tightened)


def test_floor_dp_forces_secure_noise_and_caps_epsilon():
    dp = TrainConfig(noise_multiplier=0.0, epsilon_per_round=1000.0, steps=20, expected_batch_size=10, accountant="rdp",
                  secure_mode=False)
    out, tightened = policy.floor_dp(dp, _settings(), n_patients=100, delta=1e-5)
    assert out.secure_mode is True and out.epsilon_per_round <= 2.0
    assert any("secure-mode" in t for t in tightened)


# ---- node config: only tighten -------------------------------------------------------


def test_node_config_may_lower_the_epsilon_ceiling_but_not_raise_it(monkeypatch):
    from client.node_config import site_settings

    assert site_settings({"epsilon-ceiling": 4.0}).epsilon_ceiling == 4.0
    for value in (1000, 1000.0, "1000", 8.5):
        with pytest.raises(ConfigError, match="node config") as err:
            site_settings({"epsilon-ceiling": value})
        assert "FEDSYNTH_SITE_EPSILON_CEILING" in str(err.value)
    monkeypatch.setenv("FEDSYNTH_SITE_EPSILON_CEILING", "2.0")
    with pytest.raises(ConfigError):
        site_settings({"epsilon-ceiling": 8.0})  # the default is not the floor: the env is


def test_node_config_may_raise_k_min_but_not_lower_it():
    from client.node_config import site_settings

    assert site_settings({"k-min": 20}).k_min == 20
    with pytest.raises(ConfigError, match="FEDSYNTH_SITE_K_MIN"):
        site_settings({"k-min": 2})


def test_node_config_may_not_move_a_ledger_the_environment_sets(monkeypatch, tmp_path):
    from client.node_config import site_settings

    fresh = tmp_path / "fresh-ledger.jsonl"
    assert site_settings({"ledger-path": str(fresh)}).ledger_path == fresh  # no env: allowed
    monkeypatch.setenv("FEDSYNTH_SITE_LEDGER_PATH", str(tmp_path / "ledger.jsonl"))
    with pytest.raises(ConfigError, match="ledger"):
        site_settings({"ledger-path": str(fresh)})
    # data-dir / output-dir do not move it either
    assert site_settings({"data-dir": str(tmp_path / "d")}).ledger_path == tmp_path / "ledger.jsonl"


def test_node_config_cannot_set_the_floors_themselves():
    from client.node_config import site_settings

    for key in ("min-sites", "require-secure-noise", "min-secagg-group-size", "min-eval-temperature"):
        with pytest.raises(ConfigError, match="unknown key"):
            site_settings({key: 1})


# ---- through the ClientApp: what the site functions receive -------------------------


@pytest.fixture
def seen(monkeypatch):
    """TEST-ONLY client.site: records the run it is given; real audit log."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 100), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)
    runs: list = []
    mod = types.ModuleType("client.site")
    mod.adapter_spec = lambda settings, run: {A: ((run.lora.r, 4), run.lora.dtype),
                                              B: ((4, run.lora.r), run.lora.dtype)}

    def site_train(settings, run, *, global_adapter, round_id):
        runs.append(("train", run))
        adapter = {A: np.ones((run.lora.r, 4), np.float32), B: np.ones((4, run.lora.r), np.float32)}
        return adapter, dict(epsilon=0.5, epsilon_round=0.5, delta=1e-5, noise_multiplier=1.0,
                             sample_rate=0.1, steps=run.train.steps, max_grad_norm=1.0,
                             accountant=run.train.accountant, secure_mode=run.train.secure_mode,
                             patients_bucket=10, ledger_seq=1, ledger_head="ab" * 32)

    def site_evaluate(settings, run, *, global_adapter, round_id):
        runs.append(("evaluate", run))
        return {"diversity.distinct_1": 0.25}

    mod.site_train, mod.site_evaluate = site_train, site_evaluate
    mod.release_update = lambda settings, privacy: None
    mod.audit_log = lambda s: AuditLog(s.output_dir / "audit.jsonl", key=None, actor=s.site_id)
    monkeypatch.setattr("client.app.site", mod)
    return runs


def _ctx(tmp_path, rc, node=None):
    return Context(run_id=1, node_id=100, state=RecordDict(), run_config=rc,
                   node_config={"site-id": "site-a", "output-dir": str(tmp_path / "out"), **(node or {})})


def _msg(kind, round_id=1):
    return Message(wire_pack.pack_instruction(round_id=round_id, adapter=None), dst_node_id=100,
                   message_type=kind, group_id=str(round_id))


def _audit(tmp_path):
    path = tmp_path / "out" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("kind", ["train", "evaluate"])
def test_clientapp_hands_the_site_only_the_tightened_run(tmp_path, seen, kind):
    from client.app import app

    rc = {"lora.r": 2, **LOOSE}
    reply = app(_msg(kind), _ctx(tmp_path, rc))
    assert "decline" not in reply.content.config_records
    [(phase, run)] = seen
    assert phase == kind
    assert (run.train.secure_mode, run.generate.temperature, run.train.epsilon_per_round,
            run.evaluate_k_min) == (True, 0.7, 2.0, 10)
    [entry] = [e for e in _audit(tmp_path) if e["kind"] == "policy_tightened"]
    assert entry["data"]["phase"] == kind and entry["data"]["round"] == 1 and len(entry["data"]["knobs"]) == 4


@pytest.mark.parametrize("kind", ["train", "evaluate"])
def test_clientapp_declines_a_run_below_a_coordinator_side_floor(tmp_path, seen, monkeypatch, kind):
    from client.app import app

    monkeypatch.setenv("FEDSYNTH_SITE_MIN_SITES", "3")
    reply = app(_msg(kind), _ctx(tmp_path, {"lora.r": 2, "min-sites": 2}))
    assert dict(reply.content["decline"]) == {"reason": "site_error"} and seen == []
    [entry] = _audit(tmp_path)
    assert entry["kind"] == "update_rejected" and entry["data"]["reason"] == "site_floor"


def test_clientapp_declines_when_node_config_loosens_a_floor(tmp_path, seen):
    from client.app import app

    for node in ({"epsilon-ceiling": 1000}, {"k-min": 2}):
        reply = app(_msg("train"), _ctx(tmp_path, {"lora.r": 2}, node))
        assert dict(reply.content["decline"]) == {"reason": "site_error"}
    assert seen == []


# ---- δ from the bucketed count ---------------------------------------------------------


def test_default_delta_depends_on_the_bucket_only():
    from client.site import site_delta

    s = _settings()
    assert site_delta(s, 96) == site_delta(s, 90) == site_delta(s, 99)  # the demo's n = 96 is not told
    assert site_delta(s, 96) != 1 / (10 * 96)
    assert site_delta(s, 5) == 1e-5  # bucket 0
    b = 20_000
    assert site_delta(s, b + 7) == pytest.approx(1 / (10 * b * math.log(b)))


def test_default_delta_is_far_below_one_over_ten_n():
    from client.site import site_delta

    s = _settings()
    for n in (*range(1, 2000), 9_999, 10_000, 10_009, 123_456, 10**7):
        assert site_delta(s, n) < 1 / (10 * n) and site_delta(s, n) <= 1e-5


@pytest.mark.parametrize("n", [10, 96, 640, 5000])
def test_configured_delta_at_or_above_one_over_ten_n_is_refused(n):
    from client.site import site_delta

    for delta in (1 / n, 1 / (10 * n)):
        with pytest.raises(PrivacyError, match=r"1/\(10 \* n_patients\)"):
            site_delta(_settings(delta=delta), n)
    assert site_delta(_settings(delta=1e-7), n) == 1e-7
    with pytest.raises(PrivacyError, match="no training patients"):
        site_delta(_settings(), 0)


# ---- the CLI path: a round run by hand gets the same noise floors ---------------------


def test_fedsynth_site_train_by_hand_gets_the_site_floors(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from client import site
    from client.cli import app as cli

    seen = []

    class Stop(Exception):
        pass

    def train_dp(model, tokenizer, notes, *, config, **kwargs):
        seen.append((config, kwargs["delta"]))
        raise Stop  # nothing is trained; the floors were applied before this point

    monkeypatch.setattr(site, "load_site_data", lambda s: types.SimpleNamespace(train_patients=96, train=[]))
    monkeypatch.setattr(site, "build_site_model", lambda *a, **k: (None, None))
    monkeypatch.setattr(site, "train_dp", train_dp)
    out = CliRunner().invoke(cli, ["train", "--output-dir", str(tmp_path / "out"),
                                   "--noise-multiplier", "0.01", "--batch", "16", "--steps", "5"])
    assert isinstance(out.exception, Stop), out.output
    [(config, delta)] = seen
    # sigma 0.01 -> 0.5 (floor), and 0.5 at q = 1/6 over 5 steps costs ~12.7 > 2: run at epsilon 2
    assert config.noise_multiplier == 0 and config.epsilon_per_round == 2.0 and config.secure_mode is True
    assert delta == 1e-5  # the bucketed default, not 1/(10 * 96)
    # as in a federated round: the run's floors (floor_run), then the count-dependent one (floor_dp)
    entries = _audit(tmp_path)
    assert [e["kind"] for e in entries] == ["policy_tightened"] * 2
    assert all(e["data"]["round"] == "local-1" for e in entries)
    knobs = [k for e in entries for k in e["data"]["knobs"]]
    assert any("noise-multiplier 0.01 -> 0.5" in k for k in knobs) and any("costs epsilon" in k for k in knobs)
