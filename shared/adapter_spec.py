"""The run's LoRA adapter spec from a base model's ``config.json``: tensor names, shapes, dtype.

Both sides derive the spec the same way, from the same inputs, without any weights:

- the site (client/site.py) from its model directory's ``config.json``;
- the coordinator (server/app.py) from ``FEDSYNTH_COORD_BASE_MODEL_CONFIG`` (the
  base model's ``config.json`` or its directory), or, when unset, the embedded
  default model's config (:data:`EMBEDDED_MODEL_CONFIG`).

So from round 1 on, before any global adapter exists, the coordinator checks every
tensor name, shape and size a site sends against the spec: a tensor named after a
patient, or a 64 MB "LoRA" pair, is refused like any other wire violation.

The spec is built the way the site builds its adapter: a causal LM on PyTorch's
``meta`` device (shapes only, nothing allocated or read) wrapped by PEFT LoRA with
rank ``r`` on ``targets`` (default: the family's attention and MLP projections,
:data:`DEFAULT_LORA_TARGETS`).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from shared.errors import ConfigError, Problem

AdapterSpec = dict[str, tuple[tuple[int, ...], str]]
"""Adapter tensor name (PEFT state-dict key) -> (shape, wire dtype)."""

# config.model_type -> fedsynth family: the one definition (client/model.py uses it too).
# Qwen3.5 checkpoints are multimodal wrappers ("qwen3_5") whose text part is
# "qwen3_5_text"; both load as Qwen3_5ForCausalLM.
MODEL_TYPE_FAMILY: dict[str, str] = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen3_5": "qwen3_5",
    "qwen3_5_text": "qwen3_5",
    "qwen3_next": "qwen3_next",
    "mistral": "mistral",
}
# Default LoRA targets (``lora.targets = ""``): the attention and the MLP projections. The
# privacy-utility study (issue #15, docs/results.md) found attention-only LoRA too weak to
# learn code-specific content (F1 0.18 at 200 steps against 0.54+ with the MLP); DP-SGD noise
# is added per trainable coordinate, so ``lora.targets`` can still narrow the adapter.
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
DEFAULT_LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": (*_ATTENTION, *_MLP),
    "qwen2": (*_ATTENTION, *_MLP),
    "qwen3": (*_ATTENTION, *_MLP),
    # Qwen3.5 is hybrid: Gated-DeltaNet linear-attention layers (in_proj_qkv, in_proj_z,
    # out_proj; in_proj_a/in_proj_b are per-head gates, too small to matter) beside
    # full-attention layers (q/k/v/o_proj); every layer has a dense MLP. All are adapted.
    "qwen3_5": (*_ATTENTION, "in_proj_qkv", "in_proj_z", "out_proj", *_MLP),
    # Mistral: Llama-style attention and MLP projections.
    "mistral": (*_ATTENTION, *_MLP),
    # Qwen3-Next is hybrid too: Gated-DeltaNet layers project q/k/v/z together
    # (in_proj_qkvz; in_proj_ba are per-head gates) and back (out_proj). Its MLPs are
    # mixture-of-experts: adapting every expert would multiply the adapter (and the noise
    # dimension) by the expert count, so they stay frozen; set lora.targets to adapt them.
    "qwen3_next": (*_ATTENTION, "in_proj_qkvz", "out_proj"),
}

EMBEDDED_MODEL_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "head_dim": 48,
    "hidden_act": "silu",
    "hidden_size": 192,
    "intermediate_size": 512,
    "max_position_embeddings": 1024,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 4,
    "num_hidden_layers": 4,
    "num_key_value_heads": 4,
    "pad_token_id": 0,
    "tie_word_embeddings": True,
    "vocab_size": 4096,
}
"""The shape of the embedded default model client/pretrain.py builds (its config.json, less
runtime fields). The coordinator must not import client/; a test checks this against the
built model's config.json and the site's own spec."""

_MAX_CONFIG_BYTES = 1 << 20


def load_model_config(path: Path) -> dict[str, Any]:
    """The ``config.json`` at ``path`` (the file, or a model directory holding it), as a dict.

    Raises :class:`ConfigError` naming the file and why (missing, unreadable, not a JSON
    object, no ``model_type``). Only the config is read: weights need not be present.
    """
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    where = str(file)
    try:
        if file.stat().st_size > _MAX_CONFIG_BYTES:
            raise ConfigError("invalid base model config", [Problem(where, "larger than 1 MiB")])
        data = json.loads(file.read_text(encoding="utf-8"))
    except ConfigError:
        raise
    except FileNotFoundError:
        raise ConfigError("invalid base model config", [Problem(where, "no such file")]) from None
    except (OSError, ValueError) as exc:
        raise ConfigError("invalid base model config",
                          [Problem(where, f"not readable JSON ({type(exc).__name__})")]) from None
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise ConfigError("invalid base model config", [Problem(where, "not a JSON object with a model_type")])
    return data


def default_targets(config: Mapping[str, Any]) -> tuple[str, ...]:
    """The family's default LoRA target module suffixes; ConfigError for an unknown family."""
    family = MODEL_TYPE_FAMILY.get(str(config.get("model_type")))
    if family is None:
        raise ConfigError("no default LoRA targets", [Problem(
            "model_type", f"{str(config.get('model_type'))[:40]!r} is not a known family "
                          f"({', '.join(sorted(DEFAULT_LORA_TARGETS))}); set lora.targets explicitly")])
    return DEFAULT_LORA_TARGETS[family]


def spec_from_config(
    config: Mapping[str, Any], *, r: int, targets: Sequence[str] | None, dtype: str
) -> AdapterSpec:
    """The adapter spec of rank-``r`` LoRA on ``targets`` of the model ``config`` describes.

    ``targets`` None or empty: the family default. Names are PEFT state-dict keys
    (``base_model.model.<module>.lora_A.weight``), shapes ``(r, in)``/``(out, r)``,
    every tensor in the run's wire ``dtype``. ConfigError when the config cannot
    describe a model or a target matches no linear layer.
    """
    key = json.dumps(dict(config), sort_keys=True, default=str)
    tgt = tuple(targets) if targets else default_targets(config)
    return dict(_spec_cached(key, int(r), tgt, str(dtype)))


@functools.lru_cache(maxsize=8)
def _spec_cached(config_json: str, r: int, targets: tuple[str, ...], dtype: str) -> tuple:
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config = json.loads(config_json)
    try:
        model_config = CONFIG_MAPPING[config["model_type"]].from_dict(config)
        with torch.device("meta"):  # shapes only: no weights are read or allocated
            model = AutoModelForCausalLM.from_config(model_config)
            linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
            unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linears)]
            if unmatched:
                raise ConfigError("LoRA targets do not match the base model", [
                    Problem("lora.targets", f"no linear layer named *.{t[:40]}") for t in unmatched])
            peft_model = get_peft_model(model, LoraConfig(
                r=r, lora_alpha=2 * r, target_modules=list(targets), bias="none", task_type="CAUSAL_LM"))
            state = get_peft_model_state_dict(peft_model)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to build is a config problem, named
        raise ConfigError("the base model config does not describe a causal LM this version can build",
                          [Problem("config.json", f"{type(exc).__name__}: {str(exc)[:200]}")]) from None
    return tuple(sorted((name, (tuple(int(d) for d in t.shape), dtype)) for name, t in state.items()))
