"""A round started by hand (``fedsynth-site train``) is configured exactly as the ClientApp's.

Both reach :func:`client.site.train_local_round` with a RunConfig: the CLI builds it
from the run config's defaults plus its options, the ClientApp parses what Flower
sends (``[tool.flwr.app.config]`` plus the run's overrides). Both are floored by the
same function (:func:`client.policy.floor_run`), then by the count-dependent noise
floor. These tests stop each round where :func:`client.train.train_dp` would start
and compare everything it and the model builder were given.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from flwr.app import Context, Message, RecordDict
from typer.testing import CliRunner

from client import cli
from client import site as site_mod
from client.app import train_reply
from shared import wire, wire_pack
from shared.run_config import RunConfig

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT_RUN_CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


class _Stop(Exception):
    """Raised where training would start: the round's configuration is complete."""


@pytest.fixture
def captured(clean_site_env, monkeypatch):
    """Everything train_dp and the model builder receive, keyed by the path that called them."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 100), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)  # as the Flower runtime would
    seen: list[dict] = []
    data = SimpleNamespace(train_patients=400, train=[], heldout=[])

    def build_site_model(settings, *, lora, global_adapter=None):
        seen.append({"lora": lora, "seed": torch.initial_seed(), "global_adapter": global_adapter})
        return None, None

    def train_dp(model, tokenizer, notes, **kwargs):
        seen[-1].update({k: v for k, v in kwargs.items() if k not in ("ledger", "progress", "round_id")})
        raise _Stop()

    monkeypatch.setattr(site_mod, "load_site_data", lambda settings: data)
    monkeypatch.setattr(site_mod, "build_site_model", build_site_model)
    monkeypatch.setattr(site_mod, "open_ledger", lambda settings: None)
    monkeypatch.setattr(site_mod, "train_dp", train_dp)
    monkeypatch.setattr(site_mod, "adapter_spec", lambda settings, run: {})
    return seen


def _by_cli(tmp_path: Path, *options: str) -> None:
    result = CliRunner().invoke(cli.app, ["train", "--notes", str(tmp_path / "notes.jsonl"),
                                          "--output-dir", str(tmp_path / "cli"), *options])
    assert isinstance(result.exception, _Stop), result.output


def _by_client_app(tmp_path: Path, overrides: dict) -> None:
    # What Flower hands the ClientApp: the app's [tool.flwr.app.config] with the run's overrides.
    context = Context(run_id=1, node_id=100, state=RecordDict(),
                      run_config=PYPROJECT_RUN_CONFIG | overrides,
                      node_config={"notes-path": str(tmp_path / "notes.jsonl"),
                                   "output-dir": str(tmp_path / "app")})
    message = Message(wire_pack.pack_instruction(round_id=1, adapter=None), dst_node_id=100,
                      message_type="train", group_id="1")
    reply = train_reply(message, context)  # training stopped: the app declines with site_error
    assert wire.check_reply(reply, kind="train", spec=None, run=RunConfig()).decline == "site_error"


@pytest.mark.parametrize(("options", "overrides"), [
    ((), {}),
    (("--steps", "7", "--batch", "16", "--epsilon-per-round", "1.5", "--lora-targets", "q_proj,v_proj"),
     {"train.steps": 7, "train.expected-batch-size": 16, "train.noise-multiplier": 0.0,
      "train.epsilon-per-round": 1.5, "lora.targets": "q_proj,v_proj"}),
    (("--noise-multiplier", "3.0"), {"train.noise-multiplier": 3.0}),
])
def test_cli_round_and_client_app_round_are_configured_identically(tmp_path, captured, options, overrides):
    _by_cli(tmp_path, *options)
    _by_client_app(tmp_path, overrides)
    assert len(captured) == 2
    by_cli, by_app = captured
    assert by_cli == by_app
    assert by_cli["lora"] == RunConfig.from_flower(PYPROJECT_RUN_CONFIG | overrides).lora


def test_default_round_is_the_recipe_floored_by_the_site(tmp_path, captured):
    """No option: the run config's defaults, the site's noise floor applied (sigma 1 costs more than 2)."""
    _by_cli(tmp_path)
    (got,) = captured
    want = RunConfig().train
    train = got["config"]
    assert (train.steps, train.expected_batch_size, train.learning_rate, train.max_length) == (
        want.steps, want.expected_batch_size, want.learning_rate, want.max_length)
    # sigma 1.0 at q = 64/400 over 100 steps costs more than the default per-round cap of 2
    assert (train.noise_multiplier, train.epsilon_per_round) == (0.0, 2.0)
    assert got["private"] is True and got["seed"] == RunConfig().lora.init_seed


def test_the_non_private_switch_is_unreachable_from_a_run():
    """``private=False`` (the study's baseline) is an argument of train_dp/train_local_round only:
    no run-config type has such a field, and neither the ClientApp nor the site CLI passes it."""
    import dataclasses
    import inspect

    from shared.run_config import GenerateConfig, LoraConfig, TrainConfig

    for typ in (RunConfig, TrainConfig, LoraConfig, GenerateConfig):
        assert not [f.name for f in dataclasses.fields(typ) if "private" in f.name]
    assert "private" not in inspect.signature(site_mod.site_train).parameters
    for module in ("app.py", "cli.py"):
        assert not re.search(r"\bprivate\s*=", (ROOT / "client" / module).read_text(encoding="utf-8"))
