"""The base model's per-note losses for calibrated membership inference, cached at the site.

The calibrated attack (:func:`client.evaluate.membership.calibrated_scores`)
subtracts each note's loss under the base model (the adapter switched off)
from its loss under the adapter. The base model does not change between
rounds, nor do the site's notes, so scoring them again every round repeats
the same forward passes (about half of the membership-inference time).

The cache is keyed by

* the base model: sha256 over every base weight's name, dtype, shape and bytes
  (LoRA weights excluded), so any change to the weights invalidates it;
* the notes: sha256 over the (code, text) pairs in order;
* what is scored: the token ids and labels built by
  :func:`client.prompt.training_example` (so the tokenizer, the prompt and
  ``max_length`` are covered), and ``batch_size``.

Privacy meaning: the cached losses are derived from the site's private notes.
They are written owner-only (0600) in the site's cache folder, next to the
embedding caches, and are never sent anywhere: only the DP-noised statistics of
:mod:`client.evaluate.dp_metrics` leave the site.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from client.evaluate.array_cache import load_cached, save_cached
from client.evaluate.membership import per_note_losses
from client.model import adapter_hash
from client.prompt import training_example
from shared.errors import InputError, Problem

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
_VERSION = b"fedsynth-base-losses-v1\0"


def base_model_hash(model: Any) -> str:
    """sha256 (hex) of a PEFT model's base weights: names, dtypes, shapes and bytes, LoRA weights left out."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return adapter_hash({n: t for n, t in base.state_dict().items() if "lora_" not in n})


def notes_hash(notes_codes_texts: Sequence[tuple[str, str]]) -> str:
    """sha256 (hex) over the (code, text) pairs in order, each string length-prefixed."""
    digest = hashlib.sha256(_VERSION)
    for code, text in notes_codes_texts:
        for s in (code, text):
            raw = s.encode("utf-8")
            digest.update(len(raw).to_bytes(8, "big") + raw)
    return digest.hexdigest()


def _scored_hash(tokenizer: Any, notes: Sequence[tuple[str, str]], max_length: int, batch_size: int) -> str:
    digest = hashlib.sha256(_VERSION + f"{max_length}\0{batch_size}\0".encode())
    for code, text in notes:
        ex = training_example(code, text, tokenizer, max_length=max_length)
        digest.update(json.dumps([ex["input_ids"], ex["labels"]]).encode() + b"\0")
    return digest.hexdigest()


def base_note_losses(
    model: Any,
    tokenizer: Any,
    notes_codes_texts: Sequence[tuple[str, str]],
    *,
    cache_dir: Path,
    name: str,
    batch_size: int = 8,
    max_length: int = 1024,
) -> np.ndarray:
    """Per-note mean token loss (nats/token) of each note under ``model``'s base model (adapter off).

    ``model`` is a PEFT model. Same values as
    :func:`client.evaluate.membership.per_note_losses` inside
    ``model.disable_adapter()``, read from ``cache_dir/<name>.npy`` when the
    cache was written for the same base weights, notes, tokenization and
    batching (see the module docstring); anything else is recomputed and the
    cache overwritten (owner-only, atomically; the manifest is written last).
    """
    problems = []
    if not hasattr(model, "disable_adapter"):
        problems.append(Problem("model", "needs a PEFT model (its base model is the reference)"))
    if not isinstance(name, str) or not _NAME.match(name):
        problems.append(Problem("name", f"{name!r} must be 1-100 characters of letters, digits, '_', '.', '-'"))
    if isinstance(notes_codes_texts, str) or not isinstance(notes_codes_texts, Sequence) or not all(
        isinstance(item, tuple | list) and len(item) == 2 and all(isinstance(x, str) for x in item)
        for item in notes_codes_texts
    ):
        problems.append(Problem("notes_codes_texts", "expected a sequence of (code, text) pairs of strings"))
    if problems:
        raise InputError("invalid base-loss cache input", problems)
    notes = [(str(c), str(t)) for c, t in notes_codes_texts]
    key_parts = {
        "base_model_sha256": base_model_hash(model),
        "notes_sha256": notes_hash(notes),
        "scored_sha256": _scored_hash(tokenizer, notes, max_length, batch_size),
    }
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    npy, manifest = cache_dir / f"{name}.npy", cache_dir / f"{name}.json"
    cached = load_cached(npy, manifest, key_field="key", key=key, n=len(notes),
                         valid=lambda a: a.dtype == np.float64 and a.shape == (len(notes),))
    if cached is not None:
        return cached
    with model.disable_adapter():
        losses = per_note_losses(model, tokenizer, notes, batch_size=batch_size, max_length=max_length)
    save_cached(npy, manifest, np.asarray(losses, dtype=np.float64), {"key": key, **key_parts, "n": len(notes)})
    return losses
