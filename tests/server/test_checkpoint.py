"""Checkpoints: PEFT-loadable, atomic, resumable, tamper-evident."""

import json

import numpy as np
import pytest

from server import checkpoint
from shared.errors import InputError
from shared.run_config import LoraConfig

LORA = LoraConfig(r=2, alpha=4.0, dropout=0.0)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)
    import torch

    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def lora_adapter(model, seed):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, get_peft_model_state_dict

    peft_model = get_peft_model(model, PeftLoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    state = get_peft_model_state_dict(peft_model)
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=tuple(v.shape)).astype(np.float32) for k, v in state.items()}


def test_roundtrip_resume_and_peft_load(tmp_path):
    from peft import PeftModel

    adapter = lora_adapter(tiny_llama(), 1)
    assert checkpoint.load_latest(tmp_path) is None
    checkpoint.save_round(tmp_path, 1, adapter, lora=LORA, base_model="tiny")
    adapter2 = {k: v + 1 for k, v in adapter.items()}
    path = checkpoint.save_round(tmp_path, 2, adapter2, lora=LORA, base_model="tiny")
    rnd, loaded = checkpoint.load_latest(tmp_path)
    assert rnd == 2 and set(loaded) == set(adapter2)
    for k in adapter2:
        np.testing.assert_array_equal(loaded[k], adapter2[k])
    assert json.loads((path / "adapter_config.json").read_text())["target_modules"] == ["q_proj", "v_proj"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers

    model = PeftModel.from_pretrained(tiny_llama(), str(path))
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    assert set(state) == set(adapter2)
    for k in adapter2:
        np.testing.assert_allclose(state[k].detach().numpy(), adapter2[k])


def test_tampered_checkpoint_refused(tmp_path):
    adapter = {"m.q_proj.lora_A.weight": np.ones((2, 4), np.float32),
               "m.q_proj.lora_B.weight": np.zeros((4, 2), np.float32)}
    path = checkpoint.save_round(tmp_path, 1, adapter, lora=LORA)
    from safetensors.numpy import save_file

    save_file({k: v * 2 for k, v in adapter.items()}, str(path / "adapter_model.safetensors"))
    with pytest.raises(InputError, match="does not match"):
        checkpoint.load_latest(tmp_path)


def test_state_only_points_at_complete_rounds(tmp_path):
    adapter = {"m.q_proj.lora_A.weight": np.ones((2, 4), np.float32),
               "m.q_proj.lora_B.weight": np.zeros((4, 2), np.float32)}
    checkpoint.save_round(tmp_path, 1, adapter, lora=LORA)
    # a crash mid-write of round 2 leaves only a temp dir behind
    (tmp_path / ".round-0002.tmp").mkdir()
    rnd, _ = checkpoint.load_latest(tmp_path)
    assert rnd == 1
