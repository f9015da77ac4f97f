"""DP noise and Poisson sampling are secret: fresh every round and site, exact in distribution.

The adversary is a coordinator (or anyone) with the source code and the run
config: it knows every seed a config, a site setting or the LoRA init can set,
and it can replay torch's global RNG. If it can regenerate a round's noise it
can subtract it from the update, and the epsilon the site reports is a fiction.
"""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from torch.optim.optimizer import register_optimizer_step_pre_hook

import client.dp.noise as dp_noise
import client.train as train_mod
from client.dp.ledger import Ledger
from client.dp.noise import (
    GaussianNoise,
    box_muller,
    deterministic_for_tests,
    mitigated,
    uniforms,
)
from client.model import add_lora, tiny_random_model
from client.notes import Note
from client.train import train_dp
from shared.run_config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXT = "The patient reports low mood and poor sleep for two months. Plan: review in two weeks."
SIGMA = 30.0  # noise dominates the clipped sum: the gradients' correlation is the noise's


def make_notes(n_patients: int) -> list[Note]:
    return [
        Note(note_id=f"n{p}", patient_id=f"p{p}", icd10=("F32.1",), text=f"Note of {p}. {TEXT}",
             date=None, identifiers=(), source="test", line=p + 1)
        for p in range(n_patients)
    ]


def run_round(ledger_path: Path, round_id: str, *, clipping: str, monkeypatch) -> tuple:
    """One train_dp round from the same LoRA init and the same global seeds as any other.

    Returns (the noisy gradient of every optimizer step, flattened; the patients of
    every collated batch). Everything a config, a site or ``lora.init-seed`` can fix
    is fixed identically -- including torch's, numpy's and Python's global RNGs.
    """
    torch.manual_seed(0)  # what client.site does with the run's lora.init-seed
    np.random.seed(0)
    random.seed(0)
    model, tok = tiny_random_model("llama", seed=0)
    model = add_lora(model, r=4, alpha=8)
    grads: list[torch.Tensor] = []
    batches: list[list[int]] = []
    real_collate = train_mod.collate

    def recording_collate(examples, **kw):
        batches.append(sorted(e["patient"] for e in examples))
        return real_collate(examples, **kw)

    def record(optimizer, args, kwargs):
        if type(optimizer) is torch.optim.AdamW:  # the step the noisy gradient reaches
            grads.append(torch.cat([p.grad.reshape(-1) for g in optimizer.param_groups
                                    for p in g["params"]]).clone())

    monkeypatch.setattr(train_mod, "collate", recording_collate)
    handle = register_optimizer_step_pre_hook(record)
    try:
        train_dp(
            model, tok, make_notes(8),
            config=TrainConfig(noise_multiplier=SIGMA, expected_batch_size=2, max_physical_batch_size=2,
                            steps=6, max_length=64, accountant="rdp", clipping=clipping),
            ledger=Ledger(ledger_path, site_id=ledger_path.stem), round_id=round_id, delta=1e-3,
            epsilon_ceiling=1e9,
        )
    finally:
        handle.remove()
    assert len(grads) == 6
    return torch.cat(grads), batches


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1])


@pytest.mark.parametrize("clipping", ["flat", "ghost", "bk"])
def test_identical_rounds_and_sites_draw_independent_noise_and_batches(tmp_path, monkeypatch, clipping):
    """Reproduction of issue #12 s.1: two rounds at one site, and a round at a second
    site, with identical inputs. On the old code (noise seeded with config.seed + 1,
    sampling with config.seed) all three gradients and batch lists were bit-identical."""
    g1, b1 = run_round(tmp_path / "site-a.jsonl", "r1", clipping=clipping, monkeypatch=monkeypatch)
    g2, b2 = run_round(tmp_path / "site-a.jsonl", "r2", clipping=clipping, monkeypatch=monkeypatch)
    g3, b3 = run_round(tmp_path / "site-b.jsonl", "r1", clipping=clipping, monkeypatch=monkeypatch)
    n = g1.numel()
    assert n > 10_000
    # independent N(0, 1) pairs: corr ~ N(0, 1/n); 0.1 is > 10 standard deviations
    for a, b in ((g1, g2), (g1, g3), (g2, g3)):
        assert abs(corr(a, b)) < 0.1
    assert b1 != b2 and b1 != b3 and b2 != b3


def test_secure_noise_is_gaussian_with_std_sigma_c():
    """Mean, variance and a KS test against N(0, (sigma C)^2), on what draw() returns
    (after the four-draw mitigation), in two tensors of different shapes."""
    sigma, c = 0.8, 1.5
    with deterministic_for_tests(5), GaussianNoise(
        [(200_000,), (31, 17)], std=sigma * c, steps=1, device="cpu"
    ) as source:
        big, small = source.draw()
    x = torch.cat([big, small.reshape(-1)]).double().numpy()
    n = x.size
    assert big.dtype == torch.float32 and small.shape == (31, 17)
    assert abs(x.mean()) < 5 * sigma * c / math.sqrt(n)
    assert abs(x.var() / (sigma * c) ** 2 - 1) < 5 * math.sqrt(2 / n)
    assert stats.kstest(x, "norm", args=(0, sigma * c)).pvalue > 1e-3
    # the control: the same test tells a 10% wrong std apart
    assert stats.kstest(x, "norm", args=(0, 1.1 * sigma * c)).pvalue < 1e-6


@pytest.mark.parametrize("secure", [True, False])
def test_fresh_sources_are_independent_and_do_not_touch_torchs_global_rng(secure):
    draws = []
    for _ in range(2):
        torch.manual_seed(0)  # an adversary's replay of the global RNG
        state = torch.get_rng_state()
        with GaussianNoise([(50_000,)], std=2.0, steps=1, device="cpu", secure=secure) as source:
            draws.append(source.draw()[0])
        assert torch.equal(torch.get_rng_state(), state)  # global RNG neither used nor advanced
        assert source.name == ("chacha20-gaussian" if secure else "torch-urandom-seeded")
    assert abs(corr(*draws)) < 0.05
    x = draws[0].double()
    assert abs(float(x.std()) / 2.0 - 1) < 0.05 and abs(float(x.mean())) < 0.05


def test_mitigation_throws_one_draw_away_then_halves_the_sum_of_four():
    """Opacus' secure-mode combine (optimizer._generate_noise): one discarded
    draw per tensor, then (z1 + z2 + z3 + z4) / 2 * std."""
    z = torch.arange(1.0, 1 + 1 + 4 * 3, dtype=torch.float64)  # 1 | 2 3 4 | 5 6 7 | 8 9 10 | 11 12 13
    got = mitigated(z, 3, std=2.0)
    want = torch.tensor([2 + 5 + 8 + 11, 3 + 6 + 9 + 12, 4 + 7 + 10 + 13], dtype=torch.float64)
    torch.testing.assert_close(got, want)  # * std 2 / 2 = the plain sum


def test_each_step_consumes_the_keystream_of_the_mitigated_draws():
    """Per step and tensor of n coordinates: 1 + 4n normals, 8 keystream bytes each
    (53-bit uniforms), rounded up to an even count for Box-Muller."""
    shapes = [(10, 3), (7,)]
    with GaussianNoise(shapes, std=1.0, steps=1, device="cpu") as source:
        source.draw()
        normals = (1 + 4 * 30) + (1 + 4 * 7)
        assert source._stream.bytes_used == 8 * (normals + normals % 2)
        with pytest.raises(Exception, match="more than the 1 reserved"):
            source.draw()


def test_uniforms_and_box_muller():
    words = torch.tensor([0, -1, 1 << 62, -(1 << 62)], dtype=torch.int64)
    u = uniforms(words)
    assert bool(((u > 0) & (u <= 1)).all())
    assert float(u[0]) == 2.0**-53 and float(u[1]) == 1.0  # the extremes: log stays finite
    assert float(u[2]) == 0.25 + 2.0**-53 and float(u[3]) == 0.75 + 2.0**-53  # bits 63..11, unsigned
    z = box_muller(torch.tensor([math.exp(-0.5), math.exp(-2.0), 0.0, 0.25], dtype=torch.float64))
    torch.testing.assert_close(z, torch.tensor([1.0, 0.0, 0.0, 2.0], dtype=torch.float64))


def test_nothing_in_a_run_can_seed_noise_or_sampling():
    """No train knob (the run config's TrainConfig, what train_dp takes) is a seed, and the test hook is referenced
    nowhere outside client/dp/noise.py (no config key, setting or env var reaches it)."""
    from shared.run_config import RunConfig

    assert not [f.name for f in dataclasses.fields(TrainConfig) if "seed" in f.name]
    train_knobs = dataclasses.fields(type(RunConfig.from_flower({}).train))
    assert not [f.name for f in train_knobs if "seed" in f.name]
    root = Path(dp_noise.__file__).resolve().parents[2]
    users = [
        p for d in ("client", "server", "shared", "bench") for p in (root / d).rglob("*.py")
        if "deterministic_for_tests" in p.read_text(encoding="utf-8") or "_test_seed" in p.read_text(
            encoding="utf-8")
    ]
    assert users == [root / "client" / "dp" / "noise.py"]
    assert TrainConfig().secure_mode is True and RunConfig.from_flower({}).train.secure_mode is True


def test_the_ledger_and_the_privacy_report_name_the_noise_source(tmp_path):
    from client.privacy_report import ledger_privacy

    ledger = Ledger(tmp_path / "l.jsonl", site_id="site-a")
    ledger.reserve(round_id="1", noise_multiplier=1.0, sample_rate=0.1, steps=5, delta=1e-4,
                   accountant="rdp", epsilon_ceiling=100.0, noise_source="chacha20-gaussian")
    assert Ledger(tmp_path / "l.jsonl", site_id="site-a").entries()[0].noise_source == "chacha20-gaussian"
    p = ledger_privacy(ledger.entries(), round_id=1, epsilon_ceiling=100.0, max_grad_norm=1.0,
                       secure_mode=True)
    assert p.noise_source == "chacha20-gaussian"
    assert p.model_dump()["noise_source"] == "chacha20-gaussian"


def test_a_failing_keystream_is_an_error_not_a_hang_and_close_stops_the_thread(monkeypatch):
    import time

    from shared.errors import ConfigError, TrainingError

    source = GaussianNoise([(1000,)], std=1.0, steps=50, device="cpu")  # never drawn from
    start = time.perf_counter()
    source.close()
    assert time.perf_counter() - start < 2 and source._thread is None

    def broken(self, n, *, pin=False):
        raise OSError("keystream unavailable")

    monkeypatch.setattr(dp_noise._KeyStream, "words", broken)
    with GaussianNoise([(10,)], std=1.0, steps=2, device="cpu") as source:
        with pytest.raises(TrainingError, match="keystream unavailable"):
            source.draw()
    with pytest.raises(ConfigError) as bad:
        GaussianNoise([(10,)], std=float("nan"), steps=-1, device="cpu", dtypes=[])
    assert {p.where for p in bad.value.problems} == {"std", "steps", "dtypes"}


@pytest.mark.gpu
def test_gpu_noise_equals_cpu_noise_from_the_same_keys():
    """On a GPU the keystream is copied on a side stream and transformed on the device:
    same keys (test hook), same noise as on the CPU, and the same distribution."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    shapes, out = [(300_000,), (64, 33)], {}
    for device in ("cpu", "cuda"):
        with deterministic_for_tests(9), GaussianNoise(
            shapes, std=1.7, steps=3, device=device, dtypes=[torch.float32, torch.bfloat16]
        ) as source:
            out[device] = [t for _ in range(3) for t in source.draw()]
    for cpu, gpu in zip(out["cpu"], out["cuda"], strict=True):
        assert gpu.device.type == "cuda" and gpu.dtype == cpu.dtype
        torch.testing.assert_close(gpu.cpu().float(), cpu.float(), rtol=1e-2, atol=1e-5)
    x = torch.cat([t.reshape(-1) for t in out["cuda"][::2]]).cpu().double().numpy()  # float32 ones
    assert stats.kstest(x, "norm", args=(0, 1.7)).pvalue > 1e-3
