"""The run's consortium summary (server/run_summary.py): resume, crash-safe write, final status."""

import json

from server.run_summary import SUMMARY_NAME, RunSummary, run_status, start_summary, write_summary
from shared.run_config import RunConfig

RUN = RunConfig.from_flower({"num-rounds": 3, "run-name": "r1"})


def test_a_fresh_summary_holds_the_run_settings(tmp_path):
    s = start_summary(tmp_path / SUMMARY_NAME, RUN, 0)
    assert (s.run_name, s.num_rounds, s.status, s.last_round, s.rounds) == ("r1", 3, "running", 0, ())
    assert "site_names" not in s.to_json()  # until a round names its sites


def test_resume_keeps_the_rounds_up_to_the_checkpoint_and_the_names(tmp_path):
    path = tmp_path / SUMMARY_NAME
    path.write_text(json.dumps({"rounds": [{"round": 1}, {"round": 2}, {"round": 3}],
                                "site_names": {"100": "st-mary"}}))
    s = start_summary(path, RUN, 2)
    assert [r["round"] for r in s.rounds] == [1, 2] and s.last_round == 2
    assert s.site_names == {"100": "st-mary"}
    path.write_text("{not json")
    assert start_summary(path, RUN, 2).rounds == ()  # unreadable: a fresh summary, logged


def test_with_round_returns_a_new_summary(tmp_path):
    s = start_summary(tmp_path / SUMMARY_NAME, RUN, 0)
    s2 = s.with_round({"round": 1, "aggregated": True})
    assert s.rounds == () and s.last_round == 0
    assert s2.last_round == 1 and len(s2.rounds) == 1


def test_written_summary_has_each_sites_latest_epsilon(tmp_path):
    s = start_summary(tmp_path / SUMMARY_NAME, RUN, 0)
    s = s.with_round({"round": 1, "privacy": {"100": {"epsilon": 1.0}, "101": {"epsilon": 0.5}}})
    s = s.with_round({"round": 2, "privacy": {"100": {"epsilon": 2.0}}})
    write_summary(tmp_path, s)
    got = json.loads((tmp_path / SUMMARY_NAME).read_text())
    assert got["site_epsilon"] == {"100": 2.0, "101": 0.5} and got["last_round"] == 2
    assert "site_epsilon" not in s.to_json()
    assert [p.name for p in tmp_path.iterdir()] == [SUMMARY_NAME]  # no temp file left


def _summary(*rounds):
    return RunSummary(run_name="r", num_rounds=len(rounds), aggregation="fedavg", weighting="patients",
                      update_norm_bound=0.0, secagg=False, min_sites=2, rounds=rounds)


def test_status_is_completed_once_any_round_aggregated():
    assert run_status(_summary({"round": 1, "aggregated": False}, {"round": 2, "aggregated": True})) == "completed"


def test_a_run_that_aggregated_nothing_fails_and_says_why():
    status = run_status(_summary(
        {"round": 1, "aggregated": False, "train": {"declined": {"100": "budget_exceeded"}, "refused": {"101": {}},
                                                    "failed": [], "missing": [102]}},
        {"round": 2, "aggregated": False, "train": {"declined": {"100": "budget_exceeded"}}},
    ))
    assert status == ("failed: no site's update was aggregated in 2 rounds "
                      "(declined (budget_exceeded) 2, missing 1, refused 1)")
    assert run_status(_summary()) == "failed: no site's update was aggregated in 0 rounds (no replies)"
