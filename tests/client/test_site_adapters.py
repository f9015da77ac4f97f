"""A local round's adapter on disk: the safetensors file and the PEFT folder beside it."""

from __future__ import annotations

import json
from types import SimpleNamespace

import torch
from peft import PeftModel

from client import site
from client.adapter_files import read_adapter
from client.model import adapter_hash, adapter_state, add_lora, tiny_random_model
from shared.run_config import RunConfig
from shared.settings import SiteSettings, load_settings


def test_train_local_round_writes_a_peft_folder(tmp_path, monkeypatch):
    model, tok = tiny_random_model("qwen3", seed=2)
    peft = add_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_()
    trained = adapter_state(peft)
    # Everything but the saving is stubbed: the data, noise floors, ledger and DP training.
    data = SimpleNamespace(train_patients=40, train=[])
    monkeypatch.setattr(site, "site_delta", lambda settings, n: 1e-5)
    monkeypatch.setattr(site, "floor_dp", lambda train, settings, **kw: (train, []))
    monkeypatch.setattr(site, "build_site_model", lambda settings, **kw: (peft, tok))
    monkeypatch.setattr(site, "open_ledger", lambda settings: None)
    monkeypatch.setattr(site, "train_dp", lambda *a, **kw: SimpleNamespace(adapter=trained))
    model_dir = tmp_path / "models" / "qwen3"
    settings = load_settings(SiteSettings, output_dir=tmp_path / "out", model_dir=model_dir)
    run = RunConfig.from_flower({"lora.r": 4, "lora.alpha": 8})
    site.train_local_round(settings, run, round_id=7, data=data)

    folder = site.adapter_folder(settings, 7)
    assert folder == tmp_path / "out" / "adapters" / "round-7"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(model_dir)
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    # the file form is still written, with the same tensors
    assert adapter_hash(read_adapter(site.adapter_path(settings, 7)).tensors) == adapter_hash(trained)
    assert adapter_hash(read_adapter(folder).tensors) == adapter_hash(trained)
    base, _ = tiny_random_model("qwen3", seed=2)
    assert adapter_hash(adapter_state(PeftModel.from_pretrained(base, folder))) == adapter_hash(trained)
