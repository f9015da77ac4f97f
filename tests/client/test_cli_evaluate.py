"""`fedsynth-site evaluate` end to end on notes and reports from a generator the project does not use.

Notes: tests/client/evaluate/second_generator.py (SOAP primary-care notes). Reports:
the plain ``{"icd10", "text"}`` format — unseen patients' notes (must pass the gate)
and verbatim copies of training notes (must be blocked). Small enough for CI.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from client.cli import app
from client.patient_split import split_by_patient
from tests.client.evaluate.second_generator import make_notes, write_notes, write_plain_reports

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture()
def site(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no .env from elsewhere
    notes = make_notes(30, seed=11, prefix="s")
    write_notes(notes, tmp_path / "notes.jsonl")
    split = split_by_patient(notes, heldout_fraction=0.2, seed=0)  # the site's default split
    return tmp_path, split


def _run(tmp_path, reports, *extra):
    return CliRunner().invoke(app, ["evaluate", str(reports), "--notes", str(tmp_path / "notes.jsonl"),
                                    "--output-dir", str(tmp_path / "out"), *extra])


def test_evaluate_plain_reports_from_another_generator(site):
    tmp_path, split = site
    unseen = make_notes(4, seed=12, prefix="u")
    copies = split.train[:3]
    path = write_plain_reports([(n.primary_code, n.text) for n in (*unseen, *copies)], tmp_path / "r.jsonl")
    result = _run(tmp_path, path)
    assert result.exit_code == 0, result.output
    detail = json.loads((tmp_path / "out" / "evaluation" / "r" / "evaluation.json").read_text())
    gate = detail["release_gate"]
    assert gate["calibrated"] and gate["checked"] == 11 and gate["kept"] >= 7
    rows = [json.loads(line) for line in (tmp_path / "out" / "evaluation" / "r" / "per-report.jsonl").open()]
    assert [r["released"] for r in rows[8:]] == [False] * 3  # the copies
    assert sum(r["released"] for r in rows[:8]) >= 7  # unseen patients' notes
    cells = detail["cells"]
    assert cells["privacy.dcr_exact_copy_rate"]["value"] == pytest.approx(3 / 11)
    assert "privacy.heldout.verbatim_unique_rate_13" in cells and "privacy.excess.lcs_mean" in cells
    assert "privacy.mia_auc" not in cells  # no adapter given
    summary = json.loads((tmp_path / "out" / "evaluation" / "r" / "summary.json").read_text())
    assert not any(k.startswith("privacy.") for k in summary)  # private-note metrics stay local


def test_empty_file_refused_before_any_model_loads(site, monkeypatch):
    tmp_path, _ = site
    (tmp_path / "empty.jsonl").write_text("")

    def no_models(*args, **kwargs):
        raise AssertionError("a model was loaded for an empty file")

    monkeypatch.setattr("client.evaluate.embeddings.Embedder.__init__", no_models)
    monkeypatch.setattr("client.site.load_site_data", no_models)
    result = _run(tmp_path, tmp_path / "empty.jsonl")
    assert result.exit_code == 3 and "no reports" in result.output and '"icd10"' in result.output


def test_empty_text_refused(site):
    tmp_path, _ = site
    path = write_plain_reports([("I10", "BP well controlled."), ("I10", "")], tmp_path / "r.jsonl")
    result = _run(tmp_path, path)
    assert result.exit_code == 3 and "empty" in result.output and ":2" in result.output.replace(" ", "")


def test_wrong_format_is_explained_and_bounded(site):
    tmp_path, _ = site
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps({"diagnosis": "I10", "body": f"x {i}"}) + "\n" for i in range(481)))
    result = _run(tmp_path, path)
    assert result.exit_code == 3
    assert '"icd10"' in result.output and "more problems" in result.output
    assert result.output.count("unknown field") < 60


def test_single_report_is_evaluated(site):
    tmp_path, _ = site
    unseen = make_notes(1, seed=13, prefix="u", notes_per_patient=1)
    path = write_plain_reports([(unseen[0].primary_code, unseen[0].text)], tmp_path / "one.jsonl")
    result = _run(tmp_path, path)
    assert result.exit_code == 0, result.output
    assert "1 report:" in result.output and "Self-BLEU" in result.output


def test_model_dir_without_adapter_is_refused(site):
    tmp_path, _ = site
    path = write_plain_reports([("I10", "BP well controlled.")], tmp_path / "r.jsonl")
    result = _run(tmp_path, path, "--model-dir", str(tmp_path))
    assert result.exit_code != 0 and "--adapter" in result.output


def test_adapter_adds_membership_inference_and_canaries(site):
    """With --adapter the command scores membership inference and canary exposure (embedded model)."""
    import torch
    from safetensors.torch import save_file

    from client.model import adapter_state, add_lora, load_model

    tmp_path, _ = site
    torch.manual_seed(0)
    model, _ = load_model(None)
    state = {k: v.detach().contiguous() for k, v in adapter_state(add_lora(model, r=2, alpha=4)).items()}
    save_file(state, str(tmp_path / "adapter.safetensors"))
    (tmp_path / "canaries.json").write_text(json.dumps({"canaries": [
        {"text": "code 1 2 3 4.", "prefix": "code ", "secret": "1 2 3 4", "suffix": ".", "repetitions": 3}]}))
    unseen = make_notes(2, seed=14, prefix="u", notes_per_patient=1)
    path = write_plain_reports([(n.primary_code, n.text) for n in unseen], tmp_path / "r.jsonl")
    result = _run(tmp_path, path, "--adapter", str(tmp_path / "adapter.safetensors"))
    assert result.exit_code == 0, result.output
    detail = json.loads((tmp_path / "out" / "evaluation" / "r" / "evaluation.json").read_text())
    assert 0.0 <= detail["membership"]["auc"] <= 1.0 and "auc_calibrated" in detail["membership"]
    assert "privacy.mia_auc" in detail["cells"] and "privacy.canary_exposure_max" in detail["cells"]
    assert len(detail["canaries"]) == 1 and detail["canaries"][0]["repetitions"] == 3
