"""The round's typed values and the JSON record each becomes (server/round_state.py)."""

import dataclasses

import numpy as np
import pytest

from server.round_state import EvaluateOutcome, PhaseReplies, RoundRecord, TrainOutcome

REPLIES = PhaseReplies(sent=(100, 101, 102, 103), accepted=(100, 101), declined={102: "budget_exceeded"},
                       refused={103: {"kind": "wire", "sha256": "ab" * 8, "problems": 2}})


def test_phase_record_keys_nodes_as_strings():
    assert REPLIES.to_json() == {
        "sent": [100, 101, 102, 103], "accepted": [100, 101], "declined": {"102": "budget_exceeded"},
        "refused": {"103": {"kind": "wire", "sha256": "ab" * 8, "problems": 2}}, "failed": [], "missing": [],
    }


def test_values_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        REPLIES.accepted = ()  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        RoundRecord(round=1, train=TrainOutcome(replies=REPLIES)).round = 2  # type: ignore[misc]


def test_a_round_that_aggregated_nothing_records_no_weights_or_privacy():
    record = RoundRecord(round=3, train=TrainOutcome(replies=REPLIES)).to_json()
    assert record == {"round": 3, "train": REPLIES.to_json(), "site_budget": {}, "aggregated": False}
    assert TrainOutcome(replies=REPLIES).aggregated_count == 0


def test_an_aggregated_plain_round_records_weights_norms_privacy_checkpoint_and_evaluation():
    train = TrainOutcome(replies=REPLIES, site_budget={"100": {"ledger_seq": 1}}, adapter={"a": np.zeros(1)},
                         weights={"100": 0.25, "101": 0.75}, update_norms={"100": 1.0, "101": 2.0},
                         privacy={"100": {"epsilon": 1.0}, "101": {"epsilon": 2.0}})
    ev = EvaluateOutcome(replies=PhaseReplies(sent=(100,), accepted=(100,)), mean={"m": 0.5})
    record = RoundRecord(round=1, train=train, checkpoint="round-0001", evaluate=ev).to_json()
    assert record["aggregated"] is True and train.aggregated_count == 2
    assert set(record) == {"round", "train", "site_budget", "aggregated", "weights", "update_norms", "privacy",
                           "checkpoint", "evaluate"}
    assert record["evaluate"]["mean"] == {"m": 0.5} and record["evaluate"]["accepted"] == [100]
    assert record["site_budget"] == {"100": {"ledger_seq": 1}}


def test_a_secagg_round_records_its_protocol_and_no_per_site_norms():
    train = TrainOutcome(replies=REPLIES, weights={}, privacy={}, secagg={"num_shares": 3})
    record = RoundRecord(round=1, train=train).to_json()
    assert record["secagg"] == {"num_shares": 3} and "update_norms" not in record
    assert record["weights"] == {} and record["privacy"] == {} and record["aggregated"] is False
