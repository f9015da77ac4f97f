"""SecAgg+ stage parameters checked at the site (client/secagg_guard.py), with crafted messages.

The adversary is a coordinator that runs Flower's protocol with parameters Flower's
client mod accepts: a reconstruction threshold of at most half the group, a group
too small to hide one site, or a node listed as both active and dead in the unmask
stage (which hands it both of that node's mask secrets).
"""

import json

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE

from client.secagg_guard import secagg_problems
from shared.settings import SiteSettings, load_settings

NID = 100


@pytest.fixture(autouse=True)
def clean_env(clean_site_env, monkeypatch, tmp_path):
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", NID), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)  # as the Flower runtime would


def _setup(sample=5, share=5, threshold=3):
    return {"stage": "setup", "sample_num": sample, "share_num": share, "threshold": threshold,
            "clipping_range": 1.0, "target_range": 1 << 16, "mod_range": 1 << 32, "max_weight": 1000.0}


def _problems(stage, configs, state=None, **settings):
    return secagg_problems(stage, configs, state or {}, own_nid=NID,
                           settings=load_settings(SiteSettings, **settings))


def test_setup_accepts_flowers_own_parameters_for_the_default_run():
    # secagg-reconstruction-threshold 0.6 of 3 and of 5 sites, as Flower's workflow computes them
    assert _problems("setup", _setup(3, 3, 2)) == []
    assert _problems("setup", _setup(5, 5, 3)) == []


@pytest.mark.parametrize("share,threshold", [(5, 1), (4, 2), (10, 5), (5, 2)])
def test_setup_refuses_a_threshold_at_or_below_half_the_group(share, threshold):
    got = _problems("setup", _setup(share, share, threshold))
    assert any(p.where == "secagg.threshold" and "half" in p.reason for p in got)


def test_setup_refuses_a_threshold_fraction_below_the_site_floor():
    # 4 of 7 is above half but below 0.6 of 7 (4.2)
    got = _problems("setup", _setup(7, 7, 4))
    assert [p.where for p in got] == ["secagg.threshold"] and "MIN_SECAGG_THRESHOLD" in got[0].reason
    assert _problems("setup", _setup(7, 7, 4), min_secagg_threshold=0.55) == []


def test_setup_refuses_a_group_below_the_site_minimum():
    got = _problems("setup", _setup(2, 2, 2))
    assert [p.where for p in got] == ["secagg.share_num"]
    assert _problems("setup", _setup(2, 2, 2), min_secagg_group_size=2) == []  # demo/test harness


def test_setup_refuses_fewer_sampled_sites_than_the_site_minimum_and_inconsistent_counts():
    assert [p.where for p in _problems("setup", _setup(3, 3, 2), min_sites=4)] == ["secagg.sample_num"]
    assert any(p.where == "secagg.share_num" for p in _problems("setup", _setup(3, 5, 3)))
    assert any("above the" in p.reason for p in _problems("setup", _setup(5, 5, 6)))
    assert _problems("setup", {"stage": "setup", "threshold": True}) != []


def test_share_keys_refuses_a_group_that_is_too_small_or_larger_than_announced():
    keys = lambda *ids: {"stage": "share_keys", **{str(i): [b"pk1", b"pk2"] for i in ids}}  # noqa: E731
    state = {"share_num": 3, "threshold": 2}
    assert _problems("share_keys", keys(NID, 101, 102), state) == []
    assert _problems("share_keys", keys(NID, 101), state) != []  # 2 < min group 3
    assert _problems("share_keys", keys(NID, 101, 102, 103), state) != []  # > share_num
    assert _problems("share_keys", keys(101, 102, 103), state) != []  # this node left out


def test_unmask_refuses_a_node_both_active_and_dead_and_this_node_dead():
    ok = {"stage": "unmask", "active_nids": [NID, 101], "dead_nids": [102]}
    assert _problems("unmask", ok) == []
    both = {"stage": "unmask", "active_nids": [NID, 101], "dead_nids": [101]}
    assert any("both active and dead" in p.reason for p in _problems("unmask", both))
    me_dead = {"stage": "unmask", "active_nids": [101, 102], "dead_nids": [NID]}
    assert any("this node" in p.reason for p in _problems("unmask", me_dead))
    twice = {"stage": "unmask", "active_nids": [NID, 101, 101], "dead_nids": []}
    assert _problems("unmask", twice) != []


# ---- through the real ClientApp ------------------------------------------------------


def _message(configs):
    return Message(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(configs)}), dst_node_id=NID,
                   message_type="train", group_id="1")


def _context(tmp_path, state=None):
    ctx = Context(run_id=1, node_id=NID, state=RecordDict(), run_config={"secagg": True},
                  node_config={"site-id": "site-a", "output-dir": str(tmp_path / "out")})
    if state is not None:
        ctx.state.config_records[RECORD_KEY_STATE] = ConfigRecord(state)
    return ctx


def _unmask_state():
    # what Flower's mod holds after collect_masked_vectors: this node's shares of 101's secrets
    return {"current_stage": "collect_masked_vectors", "nid": NID, "share_num": 3, "threshold": 2,
            "rd_seed_share_dict:K": [NID, 101], "rd_seed_share_dict:V": [b"seed-100", b"seed-101"],
            "sk1_share_dict:K": [NID, 101], "sk1_share_dict:V": [b"sk1-100", b"sk1-101"]}


def test_flowers_mod_alone_hands_out_both_secrets_of_a_node_listed_active_and_dead():
    # Why the guard exists: without it the site sends 101's seed share AND its key share.
    attack = {"stage": "unmask", "active_nids": [NID, 101], "dead_nids": [101]}
    ctx = Context(run_id=1, node_id=NID, state=RecordDict(), run_config={}, node_config={})
    ctx.state.config_records[RECORD_KEY_STATE] = ConfigRecord(_unmask_state())
    out = secaggplus_mod(_message(attack), ctx, lambda m, c: None)
    shares = out.content.config_records[RECORD_KEY_CONFIGS]["shares"]
    assert b"seed-101" in shares and b"sk1-101" in shares


def test_clientapp_drops_out_of_the_unmask_attack_and_audits_it(tmp_path):
    from client.app import SiteDeclinedError, app

    attack = {"stage": "unmask", "active_nids": [NID, 101], "dead_nids": [101]}
    with pytest.raises(SiteDeclinedError) as err:
        app(_message(attack), _context(tmp_path, _unmask_state()))
    assert str(err.value) == "site_error"  # fixed text: Flower forwards it to the coordinator
    entries = [json.loads(x) for x in (tmp_path / "out" / "audit.jsonl").read_text().splitlines()]
    assert [(e["kind"], e["data"]["reason"], e["data"]["stage"]) for e in entries] == [
        ("update_rejected", "secagg_params", "unmask")]


@pytest.mark.parametrize("configs", [_setup(5, 5, 1), _setup(4, 4, 2), _setup(2, 2, 2)])
def test_clientapp_refuses_a_bad_setup_before_generating_keys(tmp_path, configs):
    from client.app import SiteDeclinedError, app

    ctx = _context(tmp_path)
    with pytest.raises(SiteDeclinedError):
        app(_message(configs), ctx)
    assert RECORD_KEY_STATE not in ctx.state.config_records  # Flower's mod never ran


def test_clientapp_runs_flowers_setup_when_the_parameters_are_sound(tmp_path, monkeypatch):
    from client.app import app

    ctx = _context(tmp_path)
    reply = app(_message(_setup(3, 3, 2)), ctx)
    assert set(reply.content.config_records[RECORD_KEY_CONFIGS]) == {"pk1", "pk2"}
    monkeypatch.setenv("FEDSYNTH_SITE_MIN_SECAGG_GROUP_SIZE", "2")  # the two-site demo harness
    reply = app(_message(_setup(2, 2, 2)), _context(tmp_path))
    assert set(reply.content.config_records[RECORD_KEY_CONFIGS]) == {"pk1", "pk2"}
