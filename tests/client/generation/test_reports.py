"""Synthetic reports' local JSONL file: round trip, bad lines, the plain format."""

from __future__ import annotations

import dataclasses
import json

import pytest

from client.generation.generate import generate_reports
from client.generation.reports import SyntheticReport, read_reports, write_reports
from client.model import tiny_random_model
from shared.errors import InputError
from shared.run_config import GenerateConfig


@pytest.fixture(scope="module")
def tiny():
    return tiny_random_model("llama", seed=1)


def test_reports_jsonl_round_trip_and_bad_lines(tmp_path, tiny):
    model, tok = tiny
    reports = generate_reports(
        model, tok, ["F32.1", "f20"], n_per_code=2, sampling=GenerateConfig(max_new_tokens=8, seed=7),
        setting="zero-shot", model_id="tiny-llama", batch_size=4,
    )
    path = tmp_path / "out" / "reports.jsonl"
    write_reports(reports, path)
    assert read_reports(path) == reports
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 4 and json.loads(lines[0])["report_id"] == reports[0].report_id

    good = json.loads(lines[0])
    missing = {k: v for k, v in good.items() if k != "text"}
    extra = dict(good, note_id="n1")
    wrong = dict(good, seed="7")
    bad_code = dict(good, code="XYZ")
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(
        "\n".join(
            [lines[0], "{not json", json.dumps(missing), "", json.dumps(extra), json.dumps(wrong), json.dumps(bad_code), "[1]"]
        ).encode()
        + b"\n\xff\xfe\n"
    )
    with pytest.raises(InputError) as err:
        read_reports(bad)
    by_line = {}
    for p in err.value.problems:
        assert p.where == str(bad)
        by_line.setdefault(p.line, []).append(p.reason)
    assert sorted(by_line) == [2, 3, 5, 6, 7, 8, 9]
    assert "invalid JSON" in by_line[2][0] and "missing field 'text'" in by_line[3]
    assert "unknown field 'note_id'" in by_line[5] and "UTF-8" in by_line[9][0]
    with pytest.raises(InputError):
        read_reports(tmp_path / "absent.jsonl")


def test_report_is_frozen():
    r = SyntheticReport("id", "F32.1", "t", "zero-shot", "m", None, {}, 0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.text = "x"  # type: ignore[misc]


def test_read_reports_plain_format(tmp_path):
    """#14 §4: plain {"icd10", "text"} lines (any generator) are read; empty text is refused."""
    path = tmp_path / "plain.jsonl"
    path.write_text("\n".join(json.dumps(o) for o in (
        {"icd10": "f321", "text": "Low mood for weeks."},
        {"icd10": ["I10", "E11.9"], "text": "BP high.", "report_id": "mine-7"},
    )) + "\n")
    got = read_reports(path)
    assert [(r.code, r.report_id) for r in got] == [("F32.1", "plain.jsonl:1"), ("I10", "mine-7")]
    path.write_text("\n".join(json.dumps(o) for o in (
        {"icd10": "I10", "text": "  "}, {"icd10": "Q99.99x", "text": "x"}, {"icd10": "I10", "text": 3},
    )) + "\n")
    with pytest.raises(InputError) as exc:
        read_reports(path)
    msg = str(exc.value) + " ".join(str(p) for p in exc.value.problems)
    assert "empty" in msg and "unknown ICD-10 code" in msg and "'text' must be a string" in msg
