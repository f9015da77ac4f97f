"""One round's steps on the coordinator (server/rounds.py), without a ClientApp.

The full rounds, with the real ClientApp and fake sites, are tests/server/test_app.py
and test_secagg.py; here each step gets hand-made replies.
"""

import numpy as np
import pytest
from flwr.app import Error, Message, RecordDict

from server import rounds
from server.site_budget import Admitted, BudgetRefusal
from shared import wire_pack
from shared.errors import Problem
from shared.run_config import RunConfig

RUN = RunConfig.from_flower({"lora.r": 2})
A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
SPEC = {A: ((2, 4), "float32"), B: ((4, 2), "float32")}
PRIVACY = dict(epsilon=1.0, epsilon_round=1.0, delta=1e-5, noise_multiplier=1.0, sample_rate=0.1,
               steps=RUN.train.steps, max_grad_norm=1.0, accountant=RUN.train.accountant,
               secure_mode=RUN.train.secure_mode, patients_bucket=30, ledger_seq=1, ledger_head="0f" * 32)


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """The Flower runtime sets the task identity that messages carry; in-process we do."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def reply(node, content):
    sent = Message(RecordDict(), dst_node_id=node, message_type="evaluate", group_id="1")
    return Message(content, reply_to=sent)


def test_sample_is_seeded_sorted_and_at_least_min_sites():
    nodes = list(range(100, 110))
    got = rounds.sample(nodes, 0.3, 2, seed=7)
    assert got == sorted(got) and len(got) == 3 and got == rounds.sample(nodes, 0.3, 2, seed=7)
    assert len(rounds.sample(nodes, 0.0, 4, seed=1)) == 4
    assert rounds.sample(nodes[:2], 1.0, 5, seed=1) == nodes[:2]


def test_classify_sorts_every_reply_and_ignores_unasked_and_duplicates():
    good = wire_pack.pack_evaluate_reply({"diversity.distinct_1": 0.5})
    replies = [
        reply(102, good),
        reply(100, wire_pack.pack_evaluate_reply({"diversity.distinct_1": 0.25})),
        reply(100, wire_pack.pack_evaluate_reply({"diversity.distinct_1": 0.99})),  # a second reply: ignored
        reply(101, wire_pack.pack_decline("budget_exceeded")),
        reply(103, RecordDict()),  # not the wire contract
        reply(104, Error(code=1, reason="boom")),
        reply(999, good),  # never asked
    ]
    got = rounds.classify(replies, [100, 101, 102, 103, 104, 105], kind="evaluate", spec=None, run=RUN)
    r = got.replies
    assert r.accepted == (100, 102) and r.declined == {101: "budget_exceeded"}
    assert list(r.refused) == [103] and r.refused[103]["kind"] == "wire" and r.failed == (104,)
    assert r.missing == (105,) and got.anchored == {}
    assert rounds.mean_metrics([got.accepted[n].metrics for n in r.accepted]) == {
        "diversity.distinct_1": pytest.approx(0.375)}


def test_a_train_update_the_budget_anchor_refuses_is_a_typed_refusal():
    adapter = {A: np.zeros((2, 4), np.float32), B: np.zeros((4, 2), np.float32)}
    content = wire_pack.pack_train_reply(adapter, PRIVACY)

    def anchor(node, privacy):
        if node == 101:
            return BudgetRefusal(("rollback",), (Problem("privacy['ledger_seq']", "rolled back"),))
        return Admitted(f"node:{node}", privacy.ledger_seq, privacy.ledger_head, 1.0, 0.9)

    got = rounds.classify([reply(100, content), reply(101, content)], [100, 101], kind="train", spec=SPEC,
                          run=RUN, anchor=anchor)
    assert got.replies.accepted == (100,)
    assert got.replies.refused[101]["kind"] == "ledger" and got.replies.refused[101]["codes"] == ["rollback"]
    assert got.anchored == {"100": {"site_key": "node:100", "ledger_seq": 1, "ledger_head": "0f" * 32,
                                    "epsilon": 1.0, "epsilon_recomputed": 0.9}}


def test_aggregate_weights_by_patients_and_records_each_site():
    base = {A: np.zeros((2, 4), np.float32), B: np.zeros((4, 2), np.float32)}
    replies = [reply(100 + k, wire_pack.pack_train_reply({n: v + (k + 1) for n, v in base.items()},
                                                    PRIVACY | {"patients_bucket": 10 * (k + 1)}))
               for k in range(2)]
    got = rounds.classify(replies, [100, 101], kind="train", spec=SPEC, run=RUN)
    out = rounds.aggregate(got, None, RUN)
    assert out.aggregated and out.aggregated_count == 2
    np.testing.assert_allclose(out.adapter[A], 5 / 3, rtol=1e-6)  # (1*10 + 2*20) / 30
    assert out.weights == {"100": pytest.approx(1 / 3), "101": pytest.approx(2 / 3)}
    assert set(out.update_norms) == {"100", "101"} and out.privacy["101"]["patients_bucket"] == 20


def test_wait_for_sites_returns_what_is_there_at_the_deadline():
    class Grid:
        def get_node_ids(self):
            return [3, 1]

    assert rounds.wait_for_sites(Grid(), 1, 10.0, sleep=lambda s: None) == [1, 3]
    assert rounds.wait_for_sites(Grid(), 5, 0.0, sleep=lambda s: None) == [1, 3]
