"""Issuing and reading reports (shared.report_io): signed JSON round trips, every bad field named
on reading, the published schemas match the models, and a re-issue without a key drops a stale .sig."""

import json

import pytest

from shared.errors import InputError
from shared.report import SiteRoundReport
from shared.report_consortium import ConsortiumReport
from shared.report_io import issue_report, parse_report, read_report, write_report, write_schemas
from shared.signing import generate_key, load_private_key, load_public_key, verify_file
from tests.shared.reports import consortium_report, site_report


def test_write_read_round_trip_and_sign(tmp_path):
    generate_key(tmp_path / "site-a.key")
    key = load_private_key(tmp_path / "site-a.key")
    report = site_report()
    path = write_report(report, tmp_path / "out" / "round-2.json", key=key)
    assert read_report(path, SiteRoundReport) == report
    assert verify_file(path, {"site-a": load_public_key(tmp_path / "site-a.key.pub")})
    consortium = consortium_report()
    cpath = write_report(consortium, tmp_path / "consortium.json")
    assert read_report(cpath, ConsortiumReport) == consortium
    assert parse_report(cpath, cpath.read_bytes()) == consortium  # type chosen from report_type
    assert not (tmp_path / "consortium.json.sig").exists()


def test_read_report_lists_every_bad_field(tmp_path):
    data = json.loads(site_report().model_dump_json())
    data["privacy"]["epsilon"] = -1
    data["metrics"]["free.text"] = 1.0
    data["release_gate"]["kept"] = 500
    data["extra"] = "smuggled"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InputError) as exc:
        read_report(path, SiteRoundReport)
    text = str(exc.value)
    for field in ("privacy.epsilon", "metrics", "release_gate", "extra"):
        assert f"{path}: {field}" in text, text
    path.write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        read_report(path, SiteRoundReport)


def test_schema_export_round_trips(tmp_path):
    import jsonschema  # a dev dependency (pyproject [dev]): missing is a failure, not a skip
    paths = write_schemas(tmp_path / "schemas")
    assert sorted(p.name for p in paths) == ["consortium-report.schema.json", "site-round-report.schema.json"]
    for path, cls, report in ((paths[0], SiteRoundReport, site_report()), (paths[1], ConsortiumReport, consortium_report())):
        schema = json.loads(path.read_text())
        expected = cls.model_json_schema(mode="serialization")
        assert {k: v for k, v in schema.items() if k != "$id"} == json.loads(json.dumps(expected))
        doc = json.loads(report.model_dump_json())
        jsonschema.validate(doc, schema)
        assert cls.model_validate(doc) == report
        broken = dict(doc)
        del broken["config_hash"]
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, schema)


def test_issue_report_writes_json_sig_and_html_and_drops_a_stale_sig(tmp_path):
    generate_key(tmp_path / "site-a.key")
    key = load_private_key(tmp_path / "site-a.key")
    report = site_report()
    signed = issue_report(report, tmp_path / "round-2.json", key=key, html="<p>page</p>")
    assert signed.signature is not None and signed.signature.exists()
    assert signed.html_path.read_text() == "<p>page</p>" and read_report(signed.json_path, SiteRoundReport) == report
    unsigned = issue_report(report, tmp_path / "round-2.json", key=None, html="<p>page</p>")
    assert unsigned.signature is None and not signed.signature.exists()
