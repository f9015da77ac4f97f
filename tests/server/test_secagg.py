"""SecAgg+ train rounds in-process: the real ServerApp loop and ClientApp, Flower's real protocol.

Messages travel through Flower's protobuf serde both ways (as on the wire: the
SecAgg+ workflow sends one shared content object to every node, which the mod
mutates), and a ClientApp exception becomes an error reply as Flower makes it.
The site functions are the TEST-ONLY fake of tests/fake_site.py: site k
sends the global adapter + (k + 1) with patients bucket 10 (k + 1), so the plain
FedAvg is known; every test checks VALUES (SecAgg+ with the wrong layout fails
silently: the run completes and the adapter stays unchanged).
"""

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.app import app as client_app
from server import checkpoint
from server.app import run_federation
from shared import wire_pack, wire_secagg, wire_version
from shared.errors import ConfigError, WireError
from shared.run_config import RunConfig
from tests.fake_site import SECRET, A, B
from tests.federation import SECAGG_RC as RC
from tests.federation import WireGrid, contexts, quantisation_bound
from tests.federation import run_over_wire as run


def test_secure_rounds_equal_plain_fedavg(tmp_path, calls):
    rc = RC | {"num-rounds": 2}
    summary, adapter, grid = run(tmp_path, rc)
    plain, plain_adapter, _ = run(tmp_path, rc | {"secagg": False}, name="plain")
    # round 1: 1 (w 10) and 2 (w 20) -> 5/3; round 2 adds the same mean delta -> 10/3
    bound = quantisation_bound([10, 20])
    for name in (A, B):
        np.testing.assert_allclose(plain_adapter[name], np.full_like(plain_adapter[name], 10 / 3), rtol=1e-6)
        np.testing.assert_allclose(adapter[name], plain_adapter[name], atol=2 * bound, rtol=0)
        assert np.abs(adapter[name] - 10 / 3).max() > 0  # quantised, i.e. really through SecAgg+
    rnd1 = summary["rounds"][0]
    assert rnd1["aggregated"] is True and rnd1["train"]["accepted"] == [100, 101]
    assert rnd1["weights"] == {"100": 10, "101": 20}
    assert rnd1["privacy"]["101"]["patients_bucket"] == 20
    assert rnd1["evaluate"]["mean"] == plain["rounds"][0]["evaluate"]["mean"]
    # 4 SecAgg+ stages per node and round, then one evaluate per node
    assert sum(m.metadata.message_type == "train" for m in grid.sent) == 2 * 4 * 2
    # the coordinator never held a clear adapter from a site: every train reply it got was masked
    fitres = [m.content for m in grid.received if m.metadata.message_type == "train"
              and wire_secagg.FITRES_METRICS in m.content.config_records]
    assert len(fitres) == 4
    for content in fitres:
        assert len(content[wire_secagg.FITRES_PARAMETERS]) == 0
        assert len(content[wire_secagg.SECAGG_CONFIGS_KEY][wire_secagg.SECAGG_MASKED_KEY]) == 3  # weight + 2 tensors


def test_declines_join_with_weight_zero(tmp_path, calls):
    # site2 is out of budget, site3 fails on a note quoting a patient: both send zeros, weight 0
    summary, adapter, _ = run(tmp_path, RC, n=4)
    rnd = summary["rounds"][0]
    assert rnd["train"]["accepted"] == [100, 101]
    assert rnd["train"]["declined"] == {"102": "budget_exceeded", "103": "site_error"}
    np.testing.assert_allclose(adapter[A], np.full((2, 4), 5 / 3), atol=quantisation_bound([10, 20]), rtol=0)
    assert SECRET not in json.dumps(summary)


def test_refused_site_is_a_dropout_and_never_enters_the_sum(tmp_path, calls):
    def leaky(msg, context):  # a site whose reply grows an extra record after masking
        reply = client_app(msg, context)
        if reply.has_content() and wire_secagg.FITRES_METRICS in reply.content.config_records:
            reply.content["leak"] = ConfigRecord({"text": SECRET})
        return reply

    ctx = contexts(tmp_path, RC, n=2)
    ctx[104] = Context(run_id=1, node_id=104, state=RecordDict(), run_config=RC,
                       node_config={"site-id": "site4", "output-dir": str(tmp_path / "s4")})
    grid = WireGrid(ctx, handlers={104: leaky})
    summary = run_federation(grid, RunConfig.from_flower(RC), run_dir=tmp_path / "run", sleep=lambda s: None)
    rnd = summary["rounds"][0]
    assert "104" in rnd["train"]["refused"] and rnd["train"]["accepted"] == [100, 101]
    _, adapter = checkpoint.load_latest(tmp_path / "run" / "checkpoints")
    # site4 (value 5, weight 50) excluded: its pairwise masks were removed, its value never added
    np.testing.assert_allclose(adapter[B], np.full((4, 2), 5 / 3), atol=quantisation_bound([10, 20]), rtol=0)
    assert SECRET not in json.dumps(summary)


def test_too_few_contributions_halt_before_unmasking(tmp_path, calls):
    # 2 sites, one declines: unmasking would reveal the other's update, so nothing is unmasked
    ctx = contexts(tmp_path, RC, n=3)
    del ctx[101]
    grid = WireGrid(ctx)
    summary = run_federation(grid, RunConfig.from_flower(RC), run_dir=tmp_path / "run", sleep=lambda s: None)
    rnd = summary["rounds"][0]
    assert rnd["aggregated"] is False and rnd["train"]["declined"] == {"102": "budget_exceeded"}
    assert checkpoint.load_latest(tmp_path / "run" / "checkpoints") is None
    # the unmask stage (asking for key shares) was never sent
    stages = [m.content["secaggplus_configs"].get("stage") for m in grid.sent
              if m.metadata.message_type == "train" and "secaggplus_configs" in m.content]
    assert "unmask" not in stages


def test_site_bounds_its_own_update(tmp_path, calls):
    # update-norm-bound moves to the site: round 1 B deltas (1 and 2 in 8 cells) scaled to norm 0.5
    summary, adapter, _ = run(tmp_path, RC | {"update-norm-bound": 0.5})
    per_cell = 0.5 / np.sqrt(8)
    np.testing.assert_allclose(adapter[B], np.full((4, 2), per_cell), atol=quantisation_bound([10, 20]), rtol=0)
    np.testing.assert_allclose(adapter[A], np.full((2, 4), 5 / 3), atol=quantisation_bound([10, 20]), rtol=0)


def test_plain_message_refused_when_run_says_secagg(tmp_path, calls):
    ctx = contexts(tmp_path, RC, n=1)[100]
    msg = Message(wire_pack.pack_instruction(round_id=1, adapter=None), dst_node_id=100,
                  message_type="train", group_id="1")
    assert dict(client_app(msg, ctx).content["decline"]) == {"reason": "site_error"}
    assert calls == []


def test_robust_aggregation_refused_with_secagg():
    for method in ("trimmed-mean", "median"):
        with pytest.raises(ConfigError, match="fedavg"):
            RunConfig.from_flower({"secagg": True, "aggregation": method})
    RunConfig.from_flower({"secagg": False, "aggregation": "median"})


# ---- the site-side pieces ---------------------------------------------------

PRIVACY = dict(epsilon=1.0, epsilon_round=1.0, delta=1e-5, noise_multiplier=1.0, sample_rate=0.1,
               steps=1, max_grad_norm=1.0, accountant="prv", secure_mode=True, patients_bucket=30,
               ledger_seq=1, ledger_head="0f" * 32)
SPEC = {A: ((2, 4), "float32"), B: ((4, 2), "float32")}


def test_contribution_is_delta_clipped_in_norm_and_range():
    run = RunConfig.from_flower({"lora.r": 2, "update-norm-bound": 1.0, "secagg-clipping-range": 0.5})
    glob = {A: np.zeros((2, 4), np.float32), B: np.zeros((4, 2), np.float32)}
    new = {A: glob[A] + 0.1, B: glob[B] + 3.0}
    out, clipped = wire_secagg.secagg_contribution(new, glob, run)
    assert clipped == 0
    norm = np.sqrt(sum(float(np.sum(v * v)) for v in out.values()))
    assert norm == pytest.approx(1.0) and out[A].dtype == np.float64
    first, clipped = wire_secagg.secagg_contribution({A: np.full((2, 4), 0.9), B: np.full((4, 2), 2.0)}, None, run)
    assert clipped == 8  # the eight A coordinates at 0.9 > 0.5
    np.testing.assert_allclose(first[A], 0.5)  # round 1: A absolute, not norm-bounded, range-clipped
    np.testing.assert_allclose(first[B], 1 / np.sqrt(8))


def test_check_secagg_reply_refuses_what_may_not_leave():
    run = RunConfig.from_flower({"lora.r": 2, "secagg-clipping-range": 1.0})
    good = {A: np.full((2, 4), 0.25), B: np.zeros((4, 2))}
    ok = wire_secagg.check_secagg_reply(wire_secagg.pack_secagg_reply(good, weight=30, privacy=PRIVACY),
                                 spec=SPEC, run=run, masked=False)
    assert ok.weight == 30 and ok.names == (A, B) and ok.shapes == ((2, 4), (4, 2))

    def problems(content, masked=False):
        with pytest.raises(WireError) as err:
            wire_secagg.check_secagg_reply(content, spec=SPEC, run=run, masked=masked)
        return " ".join(str(p) for p in err.value.problems)

    assert "clipping-range" in problems(wire_secagg.pack_secagg_reply(good | {A: np.full((2, 4), 1.5)},
                                                              weight=30, privacy=PRIVACY))
    assert "secagg_weight" in problems(wire_secagg.pack_secagg_reply(good, weight=31, privacy=PRIVACY))
    assert "float64" in problems(wire_secagg.pack_secagg_reply({k: v.astype(np.float32) for k, v in good.items()},
                                                       weight=30, privacy=PRIVACY))
    assert "not a privacy key" in problems(wire_secagg.pack_secagg_reply(good, weight=30, privacy=PRIVACY | {"x": 1}))
    assert "all-zero" in problems(wire_secagg.pack_secagg_reply(good, weight=0, decline="site_error"))
    extra = wire_secagg.pack_secagg_reply(good, weight=30, privacy=PRIVACY)
    extra["leak"] = ConfigRecord({"text": SECRET})
    assert "not allowed" in problems(extra)
    # coordinator side: clear values that the mod did not remove are refused
    unmasked = wire_secagg.pack_secagg_reply(good, weight=30, privacy=PRIVACY)
    unmasked[wire_secagg.SECAGG_CONFIGS_KEY] = ConfigRecord({wire_secagg.SECAGG_MASKED_KEY: [b"x"]})
    assert "not masked" in problems(unmasked, masked=True)


def test_secagg_instruction_is_checked_like_a_plain_one():
    from flwr.common import FitIns, ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import fitins_to_recorddict

    run = RunConfig.from_flower({"lora.r": 2})
    glob = {A: np.ones((2, 4), np.float32), B: np.full((4, 2), 2, np.float32)}
    v = {"wire_version": wire_version.WIRE_VERSION}
    content = fitins_to_recorddict(FitIns(ndarrays_to_parameters([glob[A], glob[B]]), {"round": 3} | v), True)
    content[wire_secagg.SECAGG_CONFIGS_KEY] = ConfigRecord({})
    got = wire_secagg.unpack_secagg_instruction(content, spec=SPEC, run=run)
    assert got.round_id == 3 and np.array_equal(got.adapter[B], glob[B])
    old = fitins_to_recorddict(FitIns(ndarrays_to_parameters([glob[A], glob[B]]), {"round": 3}), True)
    old[wire_secagg.SECAGG_CONFIGS_KEY] = ConfigRecord({})
    with pytest.raises(WireError, match="coordinator speaks wire v1"):  # a coordinator from before #13
        wire_secagg.unpack_secagg_instruction(old, spec=SPEC, run=run)
    bad = fitins_to_recorddict(FitIns(ndarrays_to_parameters([glob[A], glob[B]]), {"round": 3, "cmd": "x"} | v),
                               True)
    bad[wire_secagg.SECAGG_CONFIGS_KEY] = ConfigRecord({})
    with pytest.raises(WireError):
        wire_secagg.unpack_secagg_instruction(bad, spec=SPEC, run=run)
    wrong = fitins_to_recorddict(FitIns(ndarrays_to_parameters([glob[B], glob[A]]), {"round": 3} | v), True)
    wrong[wire_secagg.SECAGG_CONFIGS_KEY] = ConfigRecord({})
    with pytest.raises(WireError):
        wire_secagg.unpack_secagg_instruction(wrong, spec=SPEC, run=run)
