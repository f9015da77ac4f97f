"""Model loading, LoRA wrapping and adapter tensors, for every supported family."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from client.generation.generate import generate_reports
from client.model import (
    FAMILIES,
    adapter_hash,
    adapter_state,
    add_lora,
    default_lora_targets,
    load_adapter_state,
    load_model,
    model_identity,
    tiny_random_model,
)
from shared.errors import ConfigError, ModelError
from shared.run_config import GenerateConfig


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory) -> Path:
    model, tok = tiny_random_model("llama", seed=3)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_family_builds_lora_and_generates(family):
    model, tok = tiny_random_model(family)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    targets = default_lora_targets(model)
    peft = add_lora(model, r=4, alpha=8)
    trainable = [n for n, p in peft.named_parameters() if p.requires_grad]
    frozen = [n for n, p in peft.named_parameters() if not p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("lora_" in n for n in frozen)
    wrapped = {n.rsplit(".", 1)[-1] for n, m in peft.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == set(targets)
    # Every LoRA tensor the adapter exports is a trainable parameter (and vice versa).
    assert len(adapter_state(peft)) == len(trainable)
    reports = generate_reports(
        peft,
        tok,
        ["F32.1", "F41.1"],
        n_per_code=2,
        sampling=GenerateConfig(max_new_tokens=8),
        setting="zero-shot",
        model_id=f"tiny-{family}",
    )
    assert [r.code for r in reports] == ["F32.1", "F32.1", "F41.1", "F41.1"]
    assert len({r.report_id for r in reports}) == 4


def test_qwen3_5_wraps_both_layer_kinds():
    model, _ = tiny_random_model("qwen3_5")
    kinds = model.config.layer_types
    assert kinds.count("linear_attention") == 1 and kinds.count("full_attention") == 1
    peft = add_lora(model)
    wrapped = [n for n, m in peft.named_modules() if hasattr(m, "lora_A")]
    for suffix in ("linear_attn.in_proj_qkv", "linear_attn.in_proj_z", "linear_attn.out_proj"):
        assert any(n.endswith(suffix) for n in wrapped), suffix
    for suffix in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"):
        assert any(n.endswith(suffix) for n in wrapped), suffix


def test_unknown_family_needs_explicit_targets():
    from transformers import GPT2Config

    with pytest.raises(ModelError, match="--lora-targets"):
        default_lora_targets(GPT2Config())
    with pytest.raises(ModelError):
        tiny_random_model("gpt2")


def test_add_lora_validates_settings_and_targets():
    model, _ = tiny_random_model("llama")
    with pytest.raises(ConfigError) as err:
        add_lora(model, r=0, alpha=-1, dropout=1.5)
    assert len(err.value.problems) == 3
    with pytest.raises(ModelError) as err:
        add_lora(model, targets=["q_proj", "nope_proj", "also_missing"])
    reasons = [p.reason for p in err.value.problems]
    assert len(reasons) == 2
    assert "*.nope_proj" in reasons[0] and "*.also_missing" in reasons[1]


def test_load_model_round_trips(saved_llama):
    original, _ = tiny_random_model("llama", seed=3)
    model, tok = load_model(saved_llama)
    assert model.device.type == "cpu" and model.dtype == torch.float32
    for (n, a), (_, b) in zip(original.state_dict().items(), model.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    assert tok.pad_token_id is not None and tok.chat_template
    ids = tok("Moderate depressive episode", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "Moderate depressive episode"


def test_load_model_lists_every_missing_piece(tmp_path, saved_llama):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError) as err:
        load_model(tmp_path / "empty")
    reasons = " ".join(p.reason for p in err.value.problems)
    assert len(err.value.problems) == 3
    assert "config.json" in reasons and "weights" in reasons and "tokenizer" in reasons
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_bytes((saved_llama / "config.json").read_bytes())
    with pytest.raises(ModelError) as err:
        load_model(partial)
    assert len(err.value.problems) == 2


def test_adapter_state_round_trip_and_mismatch():
    model, _ = tiny_random_model("qwen3")
    peft = add_lora(model, r=4)
    state = adapter_state(peft)
    assert all(t.device.type == "cpu" and not t.requires_grad for t in state.values())
    assert all(".lora_A." in n or ".lora_B." in n for n in state)
    # LoRA B starts at zero; give every tensor a distinct known value.
    new = {n: torch.full_like(t, 0.01 * (i + 1)) for i, (n, t) in enumerate(state.items())}
    load_adapter_state(peft, {n: t.numpy() for n, t in new.items()})
    back = adapter_state(peft)
    assert all(torch.equal(back[n], new[n]) for n in new)
    assert adapter_hash(back) == adapter_hash(new) != adapter_hash(state)
    # The export is a copy: mutating it does not touch the model.
    back[next(iter(back))].zero_()
    assert adapter_hash(adapter_state(peft)) == adapter_hash(new)

    bad = dict(new)
    first, second = list(bad)[:2]
    bad[first] = torch.zeros(3, 3)
    del bad[second]
    bad["base_model.model.lm_head.weight"] = torch.zeros(1)
    with pytest.raises(ModelError) as err:
        load_adapter_state(peft, bad)
    reasons = {p.where: p.reason for p in err.value.problems}
    assert len(reasons) == 3
    assert "shape" in reasons[first] and reasons[second] == "missing tensor"
    assert "unexpected" in reasons["base_model.model.lm_head.weight"]
    assert adapter_hash(adapter_state(peft)) == adapter_hash(new)  # nothing changed

    nan = dict(new)
    nan[first] = torch.full_like(new[first], float("nan"))
    with pytest.raises(ModelError, match="adapter tensors"):
        load_adapter_state(peft, nan)


def test_adapter_hash_sees_names_dtypes_and_values():
    a = {"x": torch.zeros(2, 2), "y": torch.ones(3)}
    assert adapter_hash(a) == adapter_hash(dict(reversed(list(a.items()))))
    assert adapter_hash(a) != adapter_hash({"x": torch.zeros(2, 2), "z": torch.ones(3)})
    assert adapter_hash(a) != adapter_hash({"x": torch.zeros(4), "y": torch.ones(3)})
    assert adapter_hash(a) != adapter_hash({"x": torch.zeros(2, 2, dtype=torch.bfloat16), "y": torch.ones(3)})
    b = {"x": torch.zeros(2, 2), "y": torch.ones(3)}
    b["y"][1] = 1 + 1e-6
    assert adapter_hash(a) != adapter_hash(b)
    assert adapter_hash({"x": np.zeros((2, 2), dtype=np.float32), "y": np.ones(3, dtype=np.float32)}) == adapter_hash(a)


def test_model_identity_is_cheap_and_sensitive(tmp_path, saved_llama):
    ident = model_identity(saved_llama)
    assert len(ident) == 64 and ident == model_identity(saved_llama)
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in saved_llama.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    assert model_identity(copy) == ident
    cfg = json.loads((copy / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5
    (copy / "config.json").write_text(json.dumps(cfg))
    assert model_identity(copy) != ident
    with pytest.raises(ModelError):
        model_identity(tmp_path / "absent")
