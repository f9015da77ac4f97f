"""`fedsynth-site generate` and `train` options for staged models and adapters."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from client import cli
from client.adapter_files import write_peft_adapter
from client.model import adapter_hash, adapter_state, add_lora, load_model
from server.checkpoint import save_round
from shared.errors import ConfigError
from shared.run_config import LoraConfig
from tests.client.model_families import write_release


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    root = tmp_path_factory.mktemp("staged")
    model_dir = write_release("qwen2.5", root / "qwen2.5")
    model, _ = load_model(model_dir)
    tensors = adapter_state(add_lora(model, r=2, alpha=4))
    folder = write_peft_adapter(root / "adapters" / "round-1", tensors, r=2, alpha=4, dropout=0.0,
                                base_model=str(model_dir))
    save_round(root / "checkpoints", 1, {k: v.numpy() for k, v in tensors.items()},
               lora=LoraConfig(r=2, alpha=4), base_model=str(model_dir))
    return {"model": model_dir, "peft": folder, "ckpt": root / "checkpoints",
            "hash": adapter_hash(tensors)}


def _generate(tmp_path, monkeypatch, staged, *extra):
    monkeypatch.setenv("FEDSYNTH_SITE_MODEL_DIR", str(staged["model"]))
    monkeypatch.setenv("FEDSYNTH_SITE_DEVICE", "cpu")
    out = tmp_path / "reports.jsonl"
    args = ["generate", str(out), "--codes", "F32.1", "--n-per-code", "1", "--max-new-tokens", "3",
            *extra]
    result = CliRunner().invoke(cli.app, args, terminal_width=200)
    rows = [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []
    return result, rows


def test_generate_reads_site_model_dir_setting(tmp_path, monkeypatch, staged):
    result, rows = _generate(tmp_path, monkeypatch, staged)
    assert result.exit_code == 0, result.output
    assert [r["model_id"] for r in rows] == [str(staged["model"])]  # not the embedded model
    assert rows[0]["setting"] == "zero-shot"


@pytest.mark.parametrize("form", ["peft", "ckpt"])
def test_generate_adapter_accepts_peft_and_checkpoint_folders(form, tmp_path, monkeypatch, staged):
    result, rows = _generate(tmp_path, monkeypatch, staged, "--adapter", str(staged[form]))
    assert result.exit_code == 0, result.output
    assert rows[0]["setting"] == "adapter" and rows[0]["adapter_hash"] == staged["hash"]


def test_generate_missing_adapter_is_a_clear_error(tmp_path, monkeypatch, staged):
    missing = tmp_path / "no-such-adapter"
    result, rows = _generate(tmp_path, monkeypatch, staged, "--adapter", str(missing))
    assert result.exit_code == 3 and rows == []
    assert "adapter not found" in result.output and str(missing) in result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)  # typer.Exit


def test_train_lora_targets_reach_the_run_config(tmp_path, monkeypatch):
    seen = {}

    def fake_round(settings, run, *, round_id, progress):
        seen["targets"] = run.lora.targets
        raise ConfigError("stop here")

    monkeypatch.setattr("client.site.train_local_round", fake_round)
    notes = tmp_path / "notes.jsonl"
    notes.write_text("")
    base = ["train", "--notes", str(notes), "--output-dir", str(tmp_path / "out")]
    runner = CliRunner()
    result = runner.invoke(cli.app, [*base, "--lora-targets", "q_proj, v_proj,q_proj"])
    assert result.exit_code == 2 and seen["targets"] == ("q_proj", "v_proj"), result.output
    runner.invoke(cli.app, base)
    assert seen["targets"] == ()  # the family default
    seen.clear()
    bad = runner.invoke(cli.app, [*base, "--lora-targets", " , "])
    assert bad.exit_code == 2 and "invalid --lora-targets" in bad.output and not seen
