"""Adapter statistics of a proxy run: weight sizes and per-patient gradient norms with known answers."""

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from bench.adapter_stats import run_stats, weight_stats
from client import site
from client.demo.data import write_demo
from client.model import adapter_state
from shared.errors import InputError
from shared.run_config import RunConfig, with_overrides
from shared.settings import SiteSettings

NAME = "base_model.model.model.layers.0.self_attn.q_proj"


def test_weight_stats_known_values():
    a = np.full((2, 5), 0.1, dtype=np.float32)  # r x d_in
    b = np.full((3, 2), 0.2, dtype=np.float32)  # d_out x r
    got = weight_stats({f"{NAME}.lora_A.weight": a, f"{NAME}.lora_B.weight": b}, alpha=4.0, r=2)
    # every entry of B·A is 2 · 0.2 · 0.1 = 0.04, times alpha / r = 2
    assert got == pytest.approx({"rms_A": 0.1, "rms_B": 0.2, "rms_delta_W": 0.08})
    with pytest.raises(InputError, match="lora_A"):
        weight_stats({"x": a}, alpha=1.0, r=1)


def test_not_a_run_is_named(tmp_path):
    with pytest.raises(InputError) as exc:
        run_stats(tmp_path)
    assert f"{tmp_path / 'proxy.json'}: no such file" in str(exc.value)


def test_gradient_norms_at_the_initial_adapter_equal_the_base_rows(tmp_path):
    """A round adapter that IS PEFT's initialisation must give round 0's norms exactly; a moved one must not."""
    overrides = {"lora.r": 2, "lora.alpha": 4.0, "train.max-length": 96}
    notes = write_demo(tmp_path / "data", seed=5, patients_per_site=20).sites["site-a"]
    (tmp_path / "proxy.json").write_text(json.dumps({  # the fields bench/proxy.py writes that are read here
        "arm": "eps-8", "notes": str(notes), "training_patients": 16, "rounds": 2, "overrides": overrides,
        "rounds_log": [], "real_classifier_f1": 0.0, "tstr_trtr": 0.0, "centroid_margin": 0.0}))
    run = with_overrides(RunConfig(), {"num-rounds": 2, "min-sites": 1, **overrides})
    settings = SiteSettings(site_id="proxy", notes_path=notes, output_dir=tmp_path / "output", device="cpu")
    torch.manual_seed(run.lora.init_seed)
    model, _ = site.build_site_model(settings, lora=run.lora)
    init = {k: v.numpy() for k, v in adapter_state(model).items()}
    moved = {k: v + 0.05 for k, v in init.items()}
    (tmp_path / "output" / "adapters").mkdir(parents=True)
    save_file(init, str(tmp_path / "output" / "adapters" / "round-1.safetensors"))
    save_file(moved, str(tmp_path / "output" / "adapters" / "round-2.safetensors"))
    rows = run_stats(tmp_path, grad_patients=4)
    assert [r["round"] for r in rows] == [0, 1, 2]
    base, first, second = rows
    assert first["rms_B"] == 0.0 and first["rms_delta_W"] == 0.0  # PEFT starts B at zero
    for key in ("grad_norm_p10", "grad_norm_median", "grad_norm_p90"):
        assert base[key] > 0 and first[key] == pytest.approx(base[key], rel=1e-6), key
    assert second["grad_norm_median"] != pytest.approx(base["grad_norm_median"], rel=1e-3)
    assert second["rms_delta_W"] > 0 and base["clip"] == run.train.max_grad_norm
