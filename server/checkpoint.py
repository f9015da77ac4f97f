"""The global adapter, checkpointed every round in PEFT format, crash-safe.

Layout under a checkpoint root (``<run_dir>/checkpoints``)::

    round-0003/adapter_config.json         PEFT LoraConfig
    round-0003/adapter_model.safetensors   the global LoRA tensors (PEFT state-dict keys)
    state.json                             {"round": 3, "path": "round-0003", "sha256": ...}

A round directory is written under a temporary name and renamed into place, and
``state.json`` is replaced atomically only afterwards, so ``state.json`` always
names a complete checkpoint: a coordinator killed at any point resumes from the
last round that finished. Any ``round-NNNN`` directory is loadable with
``peft.PeftModel.from_pretrained(base_model, path)``.

The global adapter is DP with respect to every site's patients (post-processing
of DP updates), so these files may be published.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from shared.atomic import PRIVATE, replace_dir, write_atomic
from shared.errors import InputError, Problem
from shared.run_config import LoraConfig
from shared.signing import sha256_file

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
STATE_NAME = "state.json"


def round_dir_name(round_id: int) -> str:
    return f"round-{round_id:04d}"


def target_modules(names: list[str] | tuple[str, ...] | set[str]) -> list[str]:
    """LoRA target module names (the path segment before ``.lora_A``) found in tensor names."""
    return sorted({n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names if ".lora_" in n})


def adapter_config(
    adapter: Mapping[str, np.ndarray], *, lora: LoraConfig, base_model: str
) -> dict[str, object]:
    """PEFT ``adapter_config.json`` content for ``adapter`` (targets read from its tensor names)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": target_modules(list(adapter)),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }


def save_round(
    root: Path,
    round_id: int,
    adapter: Mapping[str, np.ndarray],
    *,
    lora: LoraConfig,
    base_model: str = "",
) -> Path:
    """Write round ``round_id``'s global adapter atomically and point ``state.json`` at it."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / round_dir_name(round_id)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}."))
    try:
        tensors = {k: np.ascontiguousarray(v) for k, v in adapter.items()}
        save_file(tensors, str(tmp / WEIGHTS_NAME))
        config = adapter_config(tensors, lora=lora, base_model=base_model)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
        # A rerun of a round that crashed after its rename replaces it.
        replace_dir(tmp, final, (WEIGHTS_NAME, CONFIG_NAME))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    state = {"round": round_id, "path": final.name, "sha256": sha256_file(final / WEIGHTS_NAME)}
    write_atomic(root / STATE_NAME, json.dumps(state, indent=2, sort_keys=True), mode=PRIVATE)
    return final


def load_latest(root: Path) -> tuple[int, dict[str, np.ndarray]] | None:
    """(round, adapter) of the last complete checkpoint, or None when there is none.

    The adapter file's sha256 must match ``state.json``; a mismatch raises
    :class:`InputError` rather than resuming from a tampered or torn file.
    """
    state_path = root / STATE_NAME
    if not state_path.exists():
        return None
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
        round_id, rel, digest = int(state["round"]), str(state["path"]), str(state["sha256"])
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError("unreadable checkpoint state", [Problem(str(state_path), str(exc))]) from None
    if rel != round_dir_name(round_id):
        raise InputError("checkpoint state names an unexpected path", [Problem(str(state_path), rel)])
    weights = root / rel / WEIGHTS_NAME
    if not weights.exists() or sha256_file(weights) != digest:
        raise InputError(
            "checkpoint does not match its state file", [Problem(str(weights), "missing or sha256 differs")]
        )
    return round_id, load_file(str(weights))
