"""load_canaries: planted canaries first, then never-planted references as the exposure baseline."""

import json

from client.evaluate.suite import REFERENCE_CANARIES_SCORED, load_canaries


def entry(secret: str) -> dict:
    return {"text": f"code {secret}.", "prefix": "code ", "secret": secret, "suffix": "."}


def test_references_follow_planted_with_repetitions_zero(tmp_path):
    path = tmp_path / "canaries.json"
    refs = [entry(f"9 9 9 9 9 {i % 10}") for i in range(REFERENCE_CANARIES_SCORED + 5)]
    path.write_text(json.dumps({
        "canaries": [{**entry("1 2 3 4 5 6"), "repetitions": 5, "patient_id": "p1"}],
        "references": refs,
    }))
    got = load_canaries(path)
    assert len(got) == 1 + REFERENCE_CANARIES_SCORED  # references capped: each costs a scoring pass
    assert got[0]["reference"] is False and got[0]["repetitions"] == 5
    assert all(c["reference"] is True and c["repetitions"] == 0 for c in got[1:])
    assert [c["secret"] for c in got[1:]] == [r["secret"] for r in refs[:REFERENCE_CANARIES_SCORED]]


def test_file_without_references_and_missing_file(tmp_path):
    path = tmp_path / "canaries.json"
    path.write_text(json.dumps({"canaries": [{**entry("1 2 3 4 5 6"), "repetitions": 1}]}))
    assert [c["reference"] for c in load_canaries(path)] == [False]
    assert load_canaries(tmp_path / "absent.json") == []
