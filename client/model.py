"""Load a local Hugging Face causal LM, wrap it with LoRA, and move adapters in and out.

Hospitals stage weights offline, so models only ever come from a local
directory (``local_files_only=True``); the hub is never contacted. The model
is built on its target device *before* PEFT or Opacus wrap it: moving a model
after Opacus has wrapped a PEFT model leaves the LoRA weights silently frozen.

Only LoRA tensors are trainable and only LoRA tensors leave a site (see
``shared.wire``): :func:`adapter_state` is the one way to read them out and
:func:`load_adapter_state` the one way to put a (possibly untrusted) global
adapter back, with every name and shape checked.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from client.model_build import (
    FAMILIES,
    build_tokenizer,
    causal_lm_from_config,
    family_config,
)
from shared.adapter_spec import DEFAULT_LORA_TARGETS, MODEL_TYPE_FAMILY
from shared.errors import ConfigError, ModelError, Problem
from shared.run_config import LoraConfig as RunLoraConfig

# One definition of the family tables, shared with the coordinator's adapter spec.
_MODEL_TYPE_FAMILY = MODEL_TYPE_FAMILY
_DEFAULT_TARGETS = {family: list(targets) for family, targets in DEFAULT_LORA_TARGETS.items()}
_RUN_LORA = RunLoraConfig()  # the defaults' one definition: shared/run_config.py

_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def family_of(model_or_config: Any) -> str | None:
    """The fedsynth family of a model or config (``None`` when unsupported)."""
    config = getattr(model_or_config, "config", model_or_config)
    return _MODEL_TYPE_FAMILY.get(getattr(config, "model_type", None))


def default_lora_targets(model_or_config: Any) -> list[str]:
    """Module-name suffixes LoRA wraps by default for this model's family.

    Raises :class:`ModelError` for a family not in :data:`FAMILIES`: pass
    ``targets=`` to :func:`add_lora` explicitly for those.
    """
    family = family_of(model_or_config)
    if family is None:
        config = getattr(model_or_config, "config", model_or_config)
        model_type = getattr(config, "model_type", type(model_or_config).__name__)
        raise ModelError(
            f"no default LoRA targets for model family {model_type!r} (known: {', '.join(FAMILIES)}); "
            "name the target modules explicitly (`fedsynth-site train --lora-targets q_proj,v_proj`, "
            "or `lora.targets` in the run config)"
        )
    return list(_DEFAULT_TARGETS[family])


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every token id that ends a generated report, in a stable order.

    Releases such as Llama 3 Instruct (and fine-tunes like OpenBioLLM) list
    several end ids in ``generation_config.json`` (``<|end_of_text|>``,
    ``<|eot_id|>``, ...) while the tokenizer names only one; the chat turn ends
    with one the tokenizer does not name. Both sources are honoured: the
    generation config's ids first, then the tokenizer's eos if it is not among them.
    """
    ids: list[int] = []
    gen = getattr(model, "generation_config", None)
    for source in (getattr(gen, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        for v in [source] if isinstance(source, int) else list(source or []):
            if isinstance(v, int) and not isinstance(v, bool) and v not in ids:
                ids.append(v)
    return ids


def _missing_files(model_dir: Path) -> list[Problem]:
    where = str(model_dir)
    if not model_dir.is_dir():
        return [Problem(where, "model directory does not exist")]
    problems = []
    if not (model_dir / "config.json").is_file():
        problems.append(Problem(where, "missing config.json"))
    if not any(any(model_dir.glob(p)) for p in _WEIGHT_PATTERNS):
        problems.append(Problem(where, "missing weights (*.safetensors or pytorch_model*.bin)"))
    if not any((model_dir / f).is_file() for f in _TOKENIZER_FILES):
        problems.append(
            Problem(where, "missing tokenizer (tokenizer.json, tokenizer.model or vocab.json)")
        )
    return problems


def _default_dtype(device: str) -> torch.dtype:
    # float32 on CPU (bf16 matmuls are slow there and DP noise wants the precision);
    # bf16 on a GPU that supports it.
    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_model(
    model_dir: Path | None, *, device: str = "cpu", dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a local directory, on ``device``.

    ``model_dir=None`` loads the embedded default model (trained on public text
    only and shipped with fedsynth; installed into the cache on first use, see
    :mod:`client.pretrain`). ``dtype=None`` means float32
    on CPU and bfloat16 on a bf16-capable GPU. The tokenizer gets a pad token
    (its eos) when it has none. Raises :class:`ModelError` listing every missing
    piece (directory, config, weights, tokenizer).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model_dir is None:
        from client.pretrain import ensure_embedded_model

        model_dir = ensure_embedded_model()
    model_dir = Path(model_dir)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} requested but no CUDA device is available")
    problems = _missing_files(model_dir)
    if problems:
        raise ModelError(f"cannot load model from {model_dir}", problems)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            model_dir,
            local_files_only=True,
            dtype=dtype or _default_dtype(device),
            device_map=device,
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot load model from {model_dir}: {exc}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


def _linear_names(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def add_lora(
    model: PreTrainedModel,
    *,
    r: int = _RUN_LORA.r,
    alpha: float = _RUN_LORA.alpha,
    dropout: float = _RUN_LORA.dropout,
    targets: Sequence[str] | None = None,
) -> PeftModel:
    """Wrap ``model`` with a fresh LoRA adapter; every non-LoRA parameter is frozen.

    ``r`` is the LoRA rank, ``alpha`` its scale (update = alpha/r * B@A),
    ``dropout`` the LoRA input dropout (defaults: the run config's ``lora.*``). ``targets`` are module-name suffixes
    (default: :func:`default_lora_targets`); each must match at least one
    ``nn.Linear`` in the model. Call this after the model is on its device.
    """
    problems = []
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        problems.append(Problem("r", f"must be an integer >= 1, got {r!r}"))
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or alpha <= 0:
        problems.append(Problem("alpha", f"must be > 0, got {alpha!r}"))
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        problems.append(Problem("dropout", f"must be in [0, 1), got {dropout!r}"))
    if problems:
        raise ConfigError("invalid LoRA settings", problems)
    if isinstance(model, PeftModel):
        raise ModelError("model already has a LoRA adapter; load a fresh base model")
    targets = list(targets) if targets is not None else default_lora_targets(model)
    linears = _linear_names(model)
    unmatched = [
        Problem("targets", f"no nn.Linear module named *.{t} in {type(model).__name__}")
        for t in targets
        if not any(n == t or n.endswith("." + t) for n in linears)
    ]
    if not targets or unmatched:
        raise ModelError("LoRA targets do not match the model", unmatched or [Problem("targets", "empty")])
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=float(dropout),
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    leaked = [n for n in trainable if "lora_" not in n]
    if leaked or not trainable:
        raise ModelError(
            "LoRA wrapping left non-LoRA parameters trainable (or none trainable)",
            [Problem(n, "trainable but not a LoRA parameter") for n in leaked],
        )
    return peft_model


def _unwrap(model: Any) -> PeftModel:
    # Opacus' GradSampleModule keeps the wrapped module in ``_module``.
    while not isinstance(model, PeftModel) and hasattr(model, "_module"):
        model = model._module
    if not isinstance(model, PeftModel):
        raise ModelError(f"expected a PEFT (LoRA) model, got {type(model).__name__}")
    return model


def adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """The LoRA tensors only, as detached CPU copies, named as PEFT saves them.

    This is what an adapter update is on the wire: no base weights, nothing else.
    """
    peft_model = _unwrap(model)
    state = get_peft_model_state_dict(peft_model)
    return {name: t.detach().to("cpu", copy=True).contiguous() for name, t in sorted(state.items())}


def load_adapter_state(model: PeftModel, tensors: Mapping[str, torch.Tensor | np.ndarray]) -> None:
    """Copy ``tensors`` into the model's LoRA weights (in place, cast to their dtype).

    ``tensors`` is untrusted (it may come from the coordinator): names must be
    exactly the adapter's names and shapes exactly its shapes, values finite;
    otherwise :class:`ModelError` lists every mismatch and nothing is changed.
    """
    peft_model = _unwrap(model)
    expected = get_peft_model_state_dict(peft_model)
    problems = []
    converted: dict[str, torch.Tensor] = {}
    for name in sorted(set(tensors) - set(expected)):
        problems.append(Problem(name, "unexpected tensor (not in this adapter)"))
    for name in sorted(set(expected) - set(tensors)):
        problems.append(Problem(name, "missing tensor"))
    for name in sorted(set(expected) & set(tensors)):
        value = tensors[name]
        try:
            t = torch.as_tensor(np.asarray(value) if isinstance(value, np.ndarray) else value)
        except (TypeError, ValueError, RuntimeError) as exc:
            problems.append(Problem(name, f"not a tensor: {exc}"))
            continue
        if tuple(t.shape) != tuple(expected[name].shape):
            problems.append(
                Problem(name, f"shape {tuple(t.shape)} != expected {tuple(expected[name].shape)}")
            )
        elif not (t.is_floating_point() and bool(torch.isfinite(t).all())):
            problems.append(Problem(name, "not finite floating-point values"))
        else:
            converted[name] = t.to(device=expected[name].device, dtype=expected[name].dtype)
    if problems:
        raise ModelError("adapter tensors do not match the model's LoRA adapter", problems)
    result = set_peft_model_state_dict(peft_model, converted)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise ModelError("adapter load left unexpected keys", [Problem(k, "unexpected") for k in unexpected])


def adapter_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 (hex) over the sorted tensor names, dtypes, shapes and raw bytes."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = torch.as_tensor(tensors[name]).detach().to("cpu").contiguous()
        h.update(name.encode("utf-8") + b"\0")
        h.update(str(t.dtype).encode() + b"\0")
        h.update(json.dumps(list(t.shape)).encode() + b"\0")
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_identity(model_dir: Path) -> str:
    """sha256 (hex) identifying a local model cheaply: config.json bytes, the
    weight index bytes, and every weight file's name and size (no full read)."""
    model_dir = Path(model_dir)
    problems = _missing_files(model_dir)
    if problems:
        raise ModelError(f"cannot identify model in {model_dir}", problems)
    h = hashlib.sha256()
    h.update(b"config.json\0" + (model_dir / "config.json").read_bytes())
    files = sorted({p for pattern in _WEIGHT_PATTERNS for p in model_dir.glob(pattern)})
    for path in files:
        h.update(f"\0{path.name}\0{path.stat().st_size}".encode())
        if path.name.endswith(".index.json"):
            h.update(path.read_bytes())
    return h.hexdigest()


_TINY_TEXTS = (
    "Write a psychiatric evaluation report for a patient with ICD-10 code F32.1 "
    "(Moderate depressive episode). Use the sections: Reason for referral, History, "
    "Mental status examination, Risk assessment, Diagnosis, Plan.",
    "The patient reports low mood, poor sleep and anxiety. No suicidal ideation. "
    "Plan: follow-up in two weeks, psychotherapy, consider medication.",
    "Generalized anxiety disorder. Schizophrenia. Bipolar affective disorder. <think>reasoning</think>",
)


def tiny_random_model(
    family: str, *, seed: int = 0, vocab_size: int = 512
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A tiny random-init model of ``family`` (hidden 64, 2 layers; qwen3_5: one
    linear-attention and one full-attention layer) with a small in-memory BPE
    tokenizer and chat template. For tests: builds in well under a second."""
    if family not in FAMILIES:
        raise ModelError(f"unknown model family {family!r} (known: {', '.join(FAMILIES)})")
    tokenizer = build_tokenizer(_TINY_TEXTS, vocab_size=vocab_size)
    config = family_config(
        family,
        tokenizer,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = causal_lm_from_config(config)
    model.eval()
    return model, tokenizer
