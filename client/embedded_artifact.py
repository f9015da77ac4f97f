"""The shipped embedded model: where it lives, what its BUILD.json promises, and checking it.

fedsynth ships the embedded default model it builds (:mod:`client.pretrain`,
recipe + seed 0) as package data in ``client/embedded_model/``: ``config.json``,
``generation_config.json``, the tokenizer files, the weights in float16
``model.safetensors`` (loaded as float32) and ``BUILD.json`` (recipe, seed,
steps, ``corpus_sha256`` of the public text it was trained on and
``weights_sha256`` of the weights file). They are our weights, trained by our
code on our fictional public text only, never downloaded and never trained on a
site's notes: an auditor checks that with ``fedsynth-site build-model --rebuild``
(same recipe, same seed, same step count; bit-identical on one machine and torch
version) and the hashes in BUILD.json.

``python -m client.embedded_regenerate`` (``make embedded-model``) rebuilds the
shipped folder from the current RECIPE; run it after changing the recipe.

Nothing here trains or imports the builder (:mod:`client.pretrain` imports this).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from shared.errors import ModelError
from shared.signing import sha256_file

#: The folder shipped with the package (its files are package data, see pyproject.toml).
SHIPPED_DIR = Path(__file__).resolve().parent / "embedded_model"
#: The weights file of an embedded-model folder (float16 safetensors).
WEIGHTS_FILE = "model.safetensors"
#: The command that regenerates :data:`SHIPPED_DIR` (named in error messages).
REGENERATE_COMMAND = "make embedded-model  (python -m client.embedded_regenerate)"


def read_build(folder: Path) -> dict[str, Any] | None:
    """``folder``'s BUILD.json as a dict, or None when it has none or it is not a JSON object."""
    path = Path(folder) / "BUILD.json"
    try:
        build = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return build if isinstance(build, dict) else None


def is_build_of(build: dict[str, Any] | None, recipe: dict[str, Any], seed: int) -> bool:
    """Whether ``build`` (a BUILD.json) records exactly ``recipe`` and ``seed``, trained for the
    recipe's full step count (not a test's shortened build)."""
    return (
        build is not None
        and build.get("recipe") == recipe
        and build.get("seed") == seed
        and build.get("steps") == recipe.get("steps")
    )


def verify_weights(folder: Path) -> dict[str, Any]:
    """``folder``'s BUILD.json, after checking its weights file hashes to ``weights_sha256``.

    Privacy meaning: BUILD.json vouches that the weights were trained on public
    text only; weights swapped after the build (an operator's, a site-tuned
    model's) would carry that claim falsely, so they are refused, never used.
    Raises :class:`ModelError` naming the file and the reason.
    """
    folder = Path(folder)
    build = read_build(folder)
    if build is None:
        raise ModelError(f"embedded model {folder}: BUILD.json is missing or unreadable")
    expected = build.get("weights_sha256")
    weights = folder / WEIGHTS_FILE
    if not isinstance(expected, str):
        raise ModelError(f"embedded model {folder / 'BUILD.json'}: no weights_sha256 recorded")
    if not weights.is_file():
        raise ModelError(f"embedded model {weights}: weights file missing")
    actual = sha256_file(weights)
    if actual != expected:
        raise ModelError(
            f"embedded model {weights}: sha256 {actual[:16]}... does not match BUILD.json's "
            f"weights_sha256 {expected[:16]}... (the weights were changed after the build); "
            "delete the folder to have it reinstalled, or run `fedsynth-site build-model --rebuild`"
        )
    return build


def copy_folder(src: Path, dst: Path) -> None:
    """Copy the files of the embedded-model folder ``src`` into the existing folder ``dst``."""
    for path in sorted(Path(src).iterdir()):
        if path.is_file() and not path.name.startswith("."):
            shutil.copyfile(path, dst / path.name)
