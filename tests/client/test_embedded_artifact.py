"""client/embedded_artifact.py: BUILD.json reading and matching, the weights-hash check; regeneration
(client/embedded_regenerate.py).

The shipped folder's own checks (recipe, corpus and weights hashes) are in test_pretrain.py.
"""

from __future__ import annotations

import json

import pytest

from client import embedded_regenerate, pretrain
from client.embedded_artifact import (
    WEIGHTS_FILE,
    is_build_of,
    read_build,
    verify_weights,
)
from shared.errors import ModelError
from shared.signing import sha256_file as file_sha256


def _folder(tmp_path, weights: bytes = b"w", **build):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / WEIGHTS_FILE).write_bytes(weights)
    record = {"weights_sha256": file_sha256(folder / WEIGHTS_FILE)} | build
    (folder / "BUILD.json").write_text(json.dumps(record))
    return folder


def test_read_build_is_none_when_missing_or_not_an_object(tmp_path):
    assert read_build(tmp_path) is None
    (tmp_path / "BUILD.json").write_text("[1, 2]")
    assert read_build(tmp_path) is None
    (tmp_path / "BUILD.json").write_text("{torn")
    assert read_build(tmp_path) is None


def test_is_build_of_needs_recipe_seed_and_the_full_step_count():
    recipe = {"version": 7, "steps": 800}
    assert is_build_of({"recipe": recipe, "seed": 0, "steps": 800}, recipe, 0)
    assert not is_build_of({"recipe": recipe, "seed": 1, "steps": 800}, recipe, 0)
    assert not is_build_of({"recipe": recipe, "seed": 0, "steps": 3}, recipe, 0)  # a test's short build
    assert not is_build_of({"recipe": {**recipe, "version": 6}, "seed": 0, "steps": 800}, recipe, 0)
    assert not is_build_of(None, recipe, 0)


def test_verify_weights_accepts_the_built_weights(tmp_path):
    folder = _folder(tmp_path, seed=0)
    assert verify_weights(folder)["seed"] == 0


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda f: (f / WEIGHTS_FILE).write_bytes(b"swapped"), "does not match BUILD.json"),
        (lambda f: (f / WEIGHTS_FILE).unlink(), "weights file missing"),
        (lambda f: (f / "BUILD.json").write_text("{}"), "no weights_sha256"),
        (lambda f: (f / "BUILD.json").unlink(), "BUILD.json is missing"),
    ],
)
def test_verify_weights_refuses_with_the_file_and_the_reason(tmp_path, damage, reason):
    folder = _folder(tmp_path)
    damage(folder)
    with pytest.raises(ModelError, match=reason) as err:
        verify_weights(folder)
    assert str(folder) in str(err.value)


def test_regenerate_writes_a_complete_folder_and_an_interrupted_one_keeps_the_old(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrain, "RECIPE", {**pretrain.RECIPE, "steps": 1, "n_public": 40, "n_styled": 10})
    out = tmp_path / "embedded_model"
    record = embedded_regenerate.regenerate(out)
    assert read_build(out) == json.loads(json.dumps(record)) and verify_weights(out)["steps"] == 1
    assert is_build_of(read_build(out), pretrain.RECIPE, 0)
    assert {"config.json", "tokenizer.json", WEIGHTS_FILE} <= {p.name for p in out.iterdir()}

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrain, "build_embedded", killed)
    with pytest.raises(KeyboardInterrupt):
        embedded_regenerate.regenerate(out)
    assert read_build(out) == json.loads(json.dumps(record))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["embedded_model"]
