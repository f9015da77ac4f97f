"""LoRA adapters on disk: read any form a site meets, write the PEFT folder form.

Forms accepted by :func:`read_adapter` (``fedsynth-site generate --adapter``):

* a PEFT adapter folder: ``adapter_config.json`` + ``adapter_model.safetensors``
  (what ``PeftModel.save_pretrained`` writes, what the coordinator checkpoints
  every round, and what :func:`write_peft_adapter` writes for a site's rounds);
* the coordinator's checkpoint root (``state.json`` naming the last complete
  ``round-NNNN`` folder; the weights' sha256 must match ``state.json``);
* a bare ``.safetensors`` file of PEFT state-dict keys (older site adapters).

Adapter files are untrusted input: every problem is an :class:`InputError`
naming the path, never a traceback; the tensors themselves are checked name by
name and shape by shape when loaded into a model (:func:`client.model.load_adapter_state`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from shared.atomic import replace_dir
from shared.errors import InputError, Problem
from shared.signing import sha256_file

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
STATE_NAME = "state.json"


@dataclass(frozen=True)
class AdapterFiles:
    """An adapter read from disk: its tensors and the LoRA shape to wrap a model with.

    ``r`` is the LoRA rank, ``alpha`` its scale (update = alpha/r * B@A), ``targets``
    the wrapped module-name suffixes; ``source`` is the weights file actually read.
    """

    tensors: dict[str, torch.Tensor]
    r: int
    alpha: float
    targets: tuple[str, ...]
    source: Path


def target_modules(names: list[str]) -> list[str]:
    """LoRA target module names (the path segment before ``.lora_A``) found in tensor names."""
    return sorted({n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names if ".lora_" in n})


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError, ValueError) as exc:
        raise InputError("cannot read adapter weights", [Problem(str(path), str(exc))]) from None
    if not any(".lora_A" in k for k in tensors):
        raise InputError("not a LoRA adapter", [Problem(str(path), "no lora_A tensors")])
    return tensors


def _rank(tensors: Mapping[str, torch.Tensor]) -> int:
    return int(next(v.shape[0] for k, v in sorted(tensors.items()) if ".lora_A" in k))


def _from_folder(folder: Path) -> AdapterFiles:
    config_path, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    problems = [Problem(str(p), "missing") for p in (config_path, weights) if not p.is_file()]
    if problems:
        raise InputError("incomplete PEFT adapter folder", problems)
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        r, alpha = config["r"], config["lora_alpha"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError("unreadable adapter config", [Problem(str(config_path), str(exc))]) from None
    bad = [
        Problem(str(config_path), f"{name} must be a positive number, got {value!r}")
        for name, value in (("r", r), ("lora_alpha", alpha))
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0
    ]
    if config.get("peft_type", "LORA") != "LORA":
        bad.append(Problem(str(config_path), f"peft_type {config.get('peft_type')!r} is not LORA"))
    if bad:
        raise InputError("invalid adapter config", bad)
    tensors = _load_weights(weights)
    if int(r) != _rank(tensors):
        raise InputError(
            "adapter config does not match its weights",
            [Problem(str(config_path), f"r={r} but lora_A has rank {_rank(tensors)}")],
        )
    return AdapterFiles(tensors, int(r), float(alpha), tuple(target_modules(list(tensors))), weights)


def _checkpoint_round(root: Path) -> Path:
    """The round folder ``state.json`` names, after checking its weights' sha256."""
    state_path = root / STATE_NAME
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
        rel, digest = str(state["path"]), str(state["sha256"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError("unreadable checkpoint state", [Problem(str(state_path), str(exc))]) from None
    folder = root / rel
    if Path(rel).name != rel or not rel.startswith("round-") or not folder.is_dir():
        raise InputError("checkpoint state names no round folder", [Problem(str(state_path), rel)])
    weights = folder / WEIGHTS_NAME
    try:
        actual = sha256_file(weights)
    except OSError as exc:
        raise InputError("cannot read checkpoint weights", [Problem(str(weights), str(exc))]) from None
    if actual != digest:
        raise InputError("checkpoint does not match its state file", [Problem(str(weights), "sha256 differs")])
    return folder


def read_adapter(path: Path) -> AdapterFiles:
    """Read an adapter in any accepted form (see the module docstring).

    A bare ``.safetensors`` file carries no config: its rank is read from the
    tensors and ``alpha = 2 * r`` (the site default's ratio, 16/8).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(
            "adapter not found",
            [Problem(str(path), "no such file or folder (expected a PEFT adapter folder, the "
                                "coordinator's checkpoint folder, or a .safetensors file)")],
        )
    if path.is_dir():
        if (path / CONFIG_NAME).is_file():
            return _from_folder(path)
        if (path / STATE_NAME).is_file():
            return _from_folder(_checkpoint_round(path))
        raise InputError(
            "not an adapter folder",
            [Problem(str(path), f"neither {CONFIG_NAME} (PEFT adapter) nor {STATE_NAME} (checkpoints)")],
        )
    tensors = _load_weights(path)
    r = _rank(tensors)
    return AdapterFiles(tensors, r, float(2 * r), tuple(target_modules(list(tensors))), path)


def peft_config(
    tensors: Mapping[str, torch.Tensor], *, r: int, alpha: float, dropout: float, base_model: str
) -> dict[str, object]:
    """PEFT ``adapter_config.json`` content (targets read from the tensor names)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": target_modules(list(tensors)),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }


def write_peft_adapter(
    folder: Path,
    tensors: Mapping[str, torch.Tensor],
    *,
    r: int,
    alpha: float,
    dropout: float,
    base_model: str,
) -> Path:
    """Write ``folder`` as a PEFT adapter folder, atomically (temp folder, then rename).

    ``base_model`` goes to ``base_model_name_or_path`` (the local model directory,
    or ``"embedded"``); the folder loads with ``PeftModel.from_pretrained``.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS_NAME))
        config = peft_config(tensors, r=r, alpha=alpha, dropout=dropout, base_model=base_model)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
        replace_dir(tmp, folder, (WEIGHTS_NAME, CONFIG_NAME))  # a rerun of the same round replaces it
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
