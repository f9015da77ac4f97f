"""The proxy-site harness: a DP and a non-private arm on a public proxy population, scored for fidelity."""

import json
import math

import pytest

from bench.proxy import PROXY_SEED, ROUND_FIELDS, run_proxy
from client.demo.data import write_demo

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore:Optimal order")]

TINY = {"train.steps": 2, "train.max-length": 64, "train.expected-batch-size": 16,
        "train.max-physical-batch-size": 16, "lora.r": 1, "lora.alpha": 2.0, "generate.max-new-tokens": 16}


@pytest.mark.parametrize("epsilon", [8.0, None], ids=["dp", "no-dp"])
def test_proxy_trains_scores_and_spends_at_most_its_epsilon(tmp_path, epsilon):
    score_rounds = epsilon is None  # one arm of each: with and without the per-round learning curve
    record = run_proxy(tmp_path, patients=100, seed=0, rounds=2, epsilon=epsilon, overrides=TINY,
                       reports_per_code=1, score_rounds=score_rounds)
    assert record == json.loads((tmp_path / "proxy.json").read_text())
    assert [r["round"] for r in record["rounds_log"]] == [1, 2]
    assert record["training_patients"] == 80
    assert record["reports"] == 13  # one per code of the demo generator
    for key in ("real_classifier_f1", "tstr_trtr", "centroid_margin"):
        assert math.isfinite(record[key]), key
    first, last = record["rounds_log"]
    for key in ROUND_FIELDS:  # the last round carries the run's own scores; earlier rounds only when asked
        assert last[key] == record[key], key
        assert (key in first) is score_rounds, key
        if score_rounds:
            assert math.isfinite(first[key]), key
    if epsilon is None:  # the non-private arm: no noise, nothing accounted
        assert last["sigma"] == 0 and math.isinf(last["epsilon"])
    else:  # the ledger's composed ε over both rounds stays at or under the whole-run target
        assert last["sigma"] > 0 and 0 < last["epsilon"] <= epsilon
        assert record["epsilon_per_round"] < epsilon


def test_zero_shot_arm_trains_nothing(tmp_path):
    record = run_proxy(tmp_path, patients=60, seed=0, rounds=3, epsilon=8.0, overrides=TINY, reports_per_code=1,
                       zero_shot=True)
    assert record["arm"] == "zero-shot" and record["rounds_log"] == [] and record["rounds"] == 0
    assert not (tmp_path / "output" / "adapters").exists()
    assert math.isfinite(record["real_classifier_f1"])


def test_the_proxy_population_is_not_a_demo_site(tmp_path):
    """Hyperparameters are chosen on the proxy, so it must not hold any demo site's patients."""
    run_proxy(tmp_path / "proxy", patients=60, seed=0, rounds=1, epsilon=None, overrides=TINY,
              reports_per_code=1)
    demo = write_demo(tmp_path / "demo", seed=0, patients_per_site=60)
    proxy_texts = {json.loads(line)["text"] for line in
                   (tmp_path / "proxy" / "data" / "site-a" / "notes.jsonl").read_text().splitlines()}
    for notes in demo.sites.values():
        texts = {json.loads(line)["text"] for line in notes.read_text().splitlines()}
        assert not texts & proxy_texts
    assert PROXY_SEED > 10**6


def test_a_public_notes_file_from_another_generator_is_the_proxy_site(tmp_path, monkeypatch):
    # Issue #15 item 6: the recipe tried on notes the embedded model never saw (other layout,
    # codes and vocabulary), read from a notes file instead of the demo generator.
    import bench.proxy
    from tests.client.evaluate.second_generator import CODES, make_notes, write_notes

    notes = write_notes(make_notes(40, seed=3), tmp_path / "other.jsonl")  # 80 notes, 64 for training
    monkeypatch.setattr(bench.proxy, "MAX_REAL_TRAIN_NOTES", 50)  # a large site's notes are sampled
    record = run_proxy(tmp_path / "run", patients=999, seed=0, rounds=1, epsilon=8.0, overrides=TINY,
                       reports_per_code=1, notes=notes)
    assert not (tmp_path / "run" / "data").exists()  # no demo population written
    assert record["notes"] == str(notes) and record["patients"] == 40
    assert record["reports"] == len(CODES) and record["chance_f1"] == pytest.approx(1 / len(CODES))
    assert 0 < record["rounds_log"][0]["epsilon"] <= 8.0
    assert record["real_notes_scored"] == {"train": 50, "heldout": 16}


def test_a_bad_notes_file_is_named_with_its_lines_and_no_traceback(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"note_id": 1}\nnot json\n', encoding="utf-8")

    def proxy(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(root / "bench" / "proxy.py"), "--zero-shot", *args],
                              cwd=root, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})

    got = proxy("--out", str(tmp_path / "run"), "--notes", str(bad))
    assert got.returncode == 3 and "Traceback" not in got.stderr, got.stderr
    assert f"{bad}:1: missing fields" in got.stderr and f"{bad}:2: invalid JSON" in got.stderr
    missing = proxy("--out", str(tmp_path / "run2"), "--notes", str(tmp_path / "absent.jsonl"))
    assert missing.returncode == 2 and "no such notes file" in missing.stderr
    assert not (tmp_path / "run2").exists()
