"""Adapters on disk: the PEFT folder a site writes, the coordinator's checkpoints, bad paths."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft import PeftModel

from client.adapter_files import read_adapter, write_peft_adapter
from client.model import adapter_hash, adapter_state, add_lora, tiny_random_model
from server.checkpoint import save_round
from shared.errors import InputError
from shared.run_config import LoraConfig


@pytest.fixture(scope="module")
def trained():
    model, _ = tiny_random_model("llama", seed=1)
    peft = add_lora(model, r=4, alpha=8)
    with torch.no_grad():  # non-zero B so a wrong load is visible
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_()
    return adapter_state(peft)


def test_site_peft_folder_loads_with_peft_and_reads_back(tmp_path, trained):
    folder = write_peft_adapter(tmp_path / "round-3", trained, r=4, alpha=8, dropout=0.0,
                                base_model="/models/llama3")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "/models/llama3"
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 8, "LORA")
    # the default targets the adapter was trained on: attention and MLP projections
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj",
                                             "gate_proj", "up_proj", "down_proj"}
    # PEFT itself loads the folder onto a fresh base model, tensors unchanged.
    base, _ = tiny_random_model("llama", seed=1)
    loaded = PeftModel.from_pretrained(base, folder)
    assert adapter_hash(adapter_state(loaded)) == adapter_hash(trained)
    back = read_adapter(folder)
    assert (back.r, back.alpha) == (4, 8.0) and adapter_hash(back.tensors) == adapter_hash(trained)


def test_coordinator_checkpoint_folder_reads_its_latest_round(tmp_path, trained):
    root = tmp_path / "checkpoints"
    first = {k: np.zeros_like(v.numpy()) for k, v in trained.items()}
    save_round(root, 1, first, lora=LoraConfig(r=4, alpha=8), base_model="m")
    save_round(root, 2, {k: v.numpy() for k, v in trained.items()}, lora=LoraConfig(r=4, alpha=8),
               base_model="m")
    got = read_adapter(root)
    assert got.source == root / "round-0002" / "adapter_model.safetensors"
    assert adapter_hash(got.tensors) == adapter_hash(trained)
    assert adapter_hash(read_adapter(root / "round-0001").tensors) != adapter_hash(trained)
    # A tampered latest round is refused, not silently loaded.
    weights = root / "round-0002" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    with pytest.raises(InputError, match="does not match its state file"):
        read_adapter(root)


def test_bad_adapter_paths_are_clear_input_errors(tmp_path, trained):
    with pytest.raises(InputError, match="adapter not found") as err:
        read_adapter(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="not an adapter folder"):
        read_adapter(tmp_path / "empty")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(InputError, match="cannot read adapter weights"):
        read_adapter(tmp_path / "junk.safetensors")
    half = tmp_path / "half"
    write_peft_adapter(half, trained, r=4, alpha=8, dropout=0.0, base_model="m")
    (half / "adapter_model.safetensors").unlink()
    with pytest.raises(InputError, match="incomplete PEFT adapter folder"):
        read_adapter(half)
    lying = tmp_path / "lying"
    write_peft_adapter(lying, trained, r=4, alpha=8, dropout=0.0, base_model="m")
    cfg = json.loads((lying / "adapter_config.json").read_text())
    (lying / "adapter_config.json").write_text(json.dumps({**cfg, "r": 16}))
    with pytest.raises(InputError, match="does not match its weights"):
        read_adapter(lying)
