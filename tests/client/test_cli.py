"""fedsynth-site (client/cli.py): exit codes, one clear line for expected errors, never a traceback.

Expected errors (shared.errors) exit with their class's code (the epilog's table);
a traceback in the output would mean an expected error was treated as a bug.
"""

from __future__ import annotations

import os
import stat

import pytest
from typer.testing import CliRunner

from client.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def clean_env(clean_site_env):
    """FEDSYNTH_SITE_* cleared, cwd a temporary directory (tests/client/conftest.py)."""


def invoke(*args: str, env: dict[str, str] | None = None):
    result = runner.invoke(app, list(args), env=env)
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result = runner.invoke(app, ["demo-data", str(out), "--patients-per-site", "12"])
    assert result.exit_code == 0, result.output
    return out


def _site_notes(demo):
    notes = sorted(demo.rglob("*.jsonl"))
    assert notes, "demo-data wrote no notes"
    return notes[0]


def test_help_lists_every_command_and_the_exit_codes():
    result = invoke("--help", env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for command in ("validate", "demo-data", "build-model", "keygen", "train", "budget", "generate",
                    "evaluate", "ledger", "doctor"):
        assert command in result.output, command
    assert "6 budget exceeded" in result.output and "7 privacy ledger" in result.output
    assert invoke("ledger", "--help").exit_code == 0


def test_no_command_shows_help_and_an_unknown_one_is_a_usage_error():
    assert "Usage" in invoke().output
    result = invoke("upload-notes")
    assert result.exit_code == 2 and "No such command" in result.output


def test_validate_a_good_file(demo):
    result = invoke("validate", str(_site_notes(demo)))
    assert result.exit_code == 0, result.output
    assert "notes" in result.output and "skipped lines: 0" in result.output


def test_validate_a_bad_line_exits_3_strict_and_is_counted_when_skipping(demo, tmp_path):
    bad = tmp_path / "notes.jsonl"
    bad.write_text(_site_notes(demo).read_text() + "{not json\n")
    strict = invoke("validate", str(bad))
    assert strict.exit_code == 3 and "error:" in strict.output
    skip = invoke("validate", str(bad), "--mode", "skip")
    assert skip.exit_code == 0 and "skipped lines: 1" in skip.output


def test_validate_a_missing_file_or_an_unknown_mode(tmp_path, demo):
    missing = invoke("validate", str(tmp_path / "nowhere.jsonl"))
    assert missing.exit_code == 3 and "error:" in missing.output
    mode = invoke("validate", str(_site_notes(demo)), "--mode", "lenient")
    assert mode.exit_code in (2, 3) and "error:" in mode.output


def test_keygen_writes_a_private_key_and_refuses_to_overwrite_it(tmp_path):
    key = tmp_path / "keys" / "site.key"
    first = invoke("keygen", str(key))
    assert first.exit_code == 0, first.output
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600 and key.with_name("site.key.pub").is_file()
    before = key.read_bytes()
    again = invoke("keygen", str(key))
    assert again.exit_code == 2 and "refusing to overwrite" in again.output
    assert key.read_bytes() == before
    assert invoke("keygen", str(key), "--overwrite").exit_code == 0 and key.read_bytes() != before


def test_a_bad_setting_exits_2_naming_it(tmp_path):
    result = invoke("budget", "--output-dir", str(tmp_path / "out"),
                    env={"FEDSYNTH_SITE_EPSILON_CEILING": "-1", "FEDSYNTH_SITE_DELTA": "1e-5"})
    assert result.exit_code == 2 and "FEDSYNTH_SITE_EPSILON_CEILING" in result.output


def test_train_refuses_bad_lora_targets_before_anything_is_spent(tmp_path, demo):
    out = tmp_path / "out"
    result = invoke("train", "--notes", str(_site_notes(demo)), "--output-dir", str(out),
                    "--lora-targets", "q_proj,../../etc")
    assert result.exit_code == 2 and "--lora-targets" in result.output
    assert not (out / "privacy-ledger.jsonl").exists()


def test_build_model_installs_the_shipped_model_and_rebuild_compares_it(tmp_path, monkeypatch):
    from client import pretrain

    env = {"FEDSYNTH_CACHE_DIR": str(tmp_path / "cache")}
    result = invoke("build-model", env=env)
    assert result.exit_code == 0, result.output
    assert str(tmp_path / "cache") in result.output and "weights sha256" in result.output
    # --rebuild trains (a tiny recipe here) and says whether it matches the shipped weights.
    monkeypatch.setattr(pretrain, "RECIPE", {**pretrain.RECIPE, "steps": 1, "n_public": 40, "n_styled": 10})
    result = invoke("build-model", "--rebuild", env=env)
    assert result.exit_code == 0, result.output
    assert "differs from the shipped weights" in " ".join(result.output.split())


def test_build_model_refuses_swapped_weights_with_one_line(tmp_path):
    from client.embedded_artifact import WEIGHTS_FILE
    from client.pretrain import cached_model_dir

    env = {"FEDSYNTH_CACHE_DIR": str(tmp_path / "cache")}
    assert invoke("build-model", env=env).exit_code == 0
    path = cached_model_dir(cache=tmp_path / "cache")
    (path / WEIGHTS_FILE).write_bytes(b"not the built weights")
    result = invoke("build-model", env=env)
    assert result.exit_code == 4 and "does not match BUILD.json" in " ".join(result.output.split())
