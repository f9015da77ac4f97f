"""Book-keeping DP clipping for LoRA: known answers against per-row autograd and Opacus.

A tiny random Llama with LoRA r=4; lora_B is randomised so both A and B
tensors get non-zero gradients. Rows are right-padded to different lengths
(attention 0, labels -100) with prompt positions masked, like ``client.train``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from client.dp.bookkeeping import LoraBookkeeping, _use_ghost, add_noise, noisy_step
from client.dp.noise import GaussianNoise, deterministic_for_tests, use_noise
from client.model import add_lora, tiny_random_model
from shared.errors import ConfigError, TrainingError

IGNORE = -100
LENGTHS = (14, 9, 5, 11)  # real tokens per row; the batch is padded to 14


def noise_for(params, *, std: float, steps: int = 1) -> GaussianNoise:
    """The round's secret noise source for ``params`` (ChaCha20, the default)."""
    return GaussianNoise(
        [p.shape for p in params], dtypes=[p.dtype for p in params], std=std, steps=steps,
        device=params[0].device,
    )


@pytest.fixture(scope="module")
def base():
    model, tokenizer = tiny_random_model("llama", seed=0)
    model = add_lora(model, r=4, alpha=8)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    model.train()
    return model, len(tokenizer)


@pytest.fixture
def model(base):
    return copy.deepcopy(base[0])


def make_batch(vocab: int, lengths=LENGTHS, *, seed: int = 0, pad_id: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(3, vocab, (n,), generator=gen)
        labels[row, 2:n] = ids[row, 2:n]  # the first two tokens are "prompt"
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def per_patient_loss(model, batch: dict) -> torch.Tensor:
    """The recipe's loss: each row's mean over its report tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits, targets = logits[:, :-1].float(), batch["labels"][:, 1:]
    token = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction="none",
    ).view(targets.shape)
    return token.sum(1) / (targets != IGNORE).sum(1).clamp(min=1)


def lora_params(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def rows(batch: dict, index) -> dict:
    return {k: v[index] for k, v in batch.items()}


def reference(model, batch: dict, max_grad_norm: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Per-row autograd, one row at a time, clipped by hand with Opacus' formula."""
    params = lora_params(model)
    norms, total = [], [torch.zeros_like(p) for p in params]
    for i in range(batch["input_ids"].shape[0]):
        grads = torch.autograd.grad(
            per_patient_loss(model, rows(batch, slice(i, i + 1))).sum(), params
        )
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).float()
        factor = (max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
        total = [t + factor * g for t, g in zip(total, grads, strict=True)]
        norms.append(norm)
    return torch.stack(norms), total


def bk_clipped(model, batches: list[dict], max_grad_norm: float, *, strategy: str = "auto"):
    with LoraBookkeeping(model, strategy=strategy) as bk:
        norms = []
        for batch in batches:
            per_patient_loss(model, batch).sum().backward()
            norms.append(bk.accumulate_clipped(max_grad_norm=max_grad_norm))
        grads = [p.grad.clone() for p in bk.params]
    for p in lora_params(model):
        p.grad = None
    return torch.cat(norms), grads


def close(got: list[torch.Tensor], want: list[torch.Tensor], rel: float = 1e-5) -> bool:
    diff = torch.sqrt(sum(((g - w) ** 2).sum() for g, w in zip(got, want, strict=True)))
    scale = torch.sqrt(sum((w**2).sum() for w in want))
    return bool(diff <= rel * scale + 1e-9)


@pytest.mark.parametrize("strategy", ["materialize", "ghost", "auto"])
@pytest.mark.parametrize("clip", ["none_clip", "all_clip"])
def test_clipped_sum_matches_per_row_autograd(base, model, strategy, clip):
    batch = make_batch(base[1])
    ref_norms, ref_sum = reference(model, batch, max_grad_norm=1e6)
    max_grad_norm = 1e6 if clip == "none_clip" else 0.2 * float(ref_norms.min())
    if clip == "all_clip":
        ref_norms, ref_sum = reference(model, batch, max_grad_norm=max_grad_norm)
    norms, got = bk_clipped(model, [batch], max_grad_norm, strategy=strategy)
    assert torch.allclose(norms, ref_norms, rtol=1e-5)
    assert bool((norms > 0).all())
    assert close(got, ref_sum)
    if clip == "all_clip":  # every row clipped: each contributes norm C, so the sum is <= 4C
        assert torch.sqrt(sum((g**2).sum() for g in got)) <= 4 * max_grad_norm * (1 + 1e-5)


def test_physical_batches_accumulate_to_the_logical_sum(base, model):
    batch = make_batch(base[1])
    _, ref_sum = reference(model, batch, max_grad_norm=0.5)
    _, got = bk_clipped(model, [rows(batch, slice(0, 3)), rows(batch, slice(3, 4))], 0.5)
    assert close(got, ref_sum)


def test_padding_does_not_leak_into_norms(base, model):
    a = make_batch(base[1], pad_id=0)
    b = make_batch(base[1], pad_id=7)  # same real tokens, different pad token ids
    assert not torch.equal(a["input_ids"], b["input_ids"])
    norms_a, sum_a = bk_clipped(model, [a], 0.5)
    norms_b, sum_b = bk_clipped(model, [b], 0.5)
    assert torch.allclose(norms_a, norms_b, rtol=1e-5)
    assert close(sum_a, sum_b)


def test_one_patient_moves_the_clipped_sum_by_at_most_c(base, model):
    c = 0.05
    batch = make_batch(base[1])
    _, full = bk_clipped(model, [batch], c)
    _, without = bk_clipped(model, [rows(batch, slice(0, 3))], c)  # patient 3 removed
    other = make_batch(base[1], lengths=(14, 9, 5, 3), seed=5)
    replaced = {k: torch.cat([batch[k][:3], other[k][3:]]) for k in batch}
    _, swapped = bk_clipped(model, [replaced], c)

    def dist(x, y):
        return float(torch.sqrt(sum(((u - v) ** 2).sum() for u, v in zip(x, y, strict=True))))

    # Add/remove adjacency (what the Poisson accountant assumes): at most C, and
    # tight here because that row's gradient is clipped down to norm C.
    assert c * (1 - 1e-3) <= dist(full, without) <= c * (1 + 1e-5)
    # Replace-one adjacency: at most 2C (two clipped vectors differ by <= 2C).
    assert 0 < dist(full, swapped) <= 2 * c * (1 + 1e-5)


def test_noise_std_is_sigma_c_over_expected_batch_and_fresh(model):
    params = lora_params(model)
    n = sum(p.numel() for p in params)
    assert n > 3000

    def noise() -> torch.Tensor:
        for p in params:
            p.grad = None  # an empty batch: the clipped sum is zero
        with noise_for(params, std=2.0 * 0.5) as source:
            add_noise(
                params, noise_multiplier=2.0, max_grad_norm=0.5, expected_batch_size=4, noise=source
            )
        out = torch.cat([p.grad.reshape(-1) for p in params])
        for p in params:
            p.grad = None
        return out

    x = noise()
    want = 2.0 * 0.5 / 4
    assert abs(float(x.std()) / want - 1) < 0.1
    assert abs(float(x.mean())) < 5 * want / n**0.5
    y = noise()  # a second source: fresh keys, independent noise
    assert abs(float(torch.corrcoef(torch.stack([x, y]))[0, 1])) < 0.1
    with deterministic_for_tests(3):
        a = noise()
    with deterministic_for_tests(3):
        assert torch.equal(a, noise())  # only the test hook repeats it


def test_noise_source_must_match_sigma_c_and_the_parameters(model):
    params = lora_params(model)
    knobs = dict(noise_multiplier=2.0, max_grad_norm=0.5, expected_batch_size=4)
    with noise_for(params, std=1.5) as wrong_std, pytest.raises(ConfigError, match="noise"):
        add_noise(params, **knobs, noise=wrong_std)
    with noise_for(params[:-1], std=1.0) as wrong_shapes, pytest.raises(ConfigError, match="noise"):
        add_noise(params, **knobs, noise=wrong_shapes)


def test_matches_opacus_flat_clipping_with_noise(base, model):
    """Same batch, same keys (test hook): BK's noisy gradient equals Opacus hooks +
    DPOptimizer's with the secret noise plugged in (:func:`client.dp.noise.use_noise`)."""
    batch, sigma, c, expected = make_batch(base[1]), 0.7, 0.3, 6
    opacus_model = copy.deepcopy(model)
    gsm = GradSampleModule(opacus_model, batch_first=True, loss_reduction="mean")
    dp_opt = DPOptimizer(
        torch.optim.SGD(lora_params(opacus_model), lr=0.0),
        noise_multiplier=sigma,
        max_grad_norm=c,
        expected_batch_size=expected,
        loss_reduction="mean",
    )
    with deterministic_for_tests(11), noise_for(dp_opt.params, std=sigma * c) as source:
        use_noise(dp_opt, source)
        per_patient_loss(gsm, batch).mean().backward()
        dp_opt.step()
    assert source.drawn == 1
    want = [p.grad.clone() for p in lora_params(opacus_model)]
    gsm.to_standard_module()

    with LoraBookkeeping(model) as bk:
        per_patient_loss(model, batch).sum().backward()
        bk.accumulate_clipped(max_grad_norm=c)
        with deterministic_for_tests(11), noise_for(bk.params, std=sigma * c) as source:
            add_noise(
                bk.params,
                noise_multiplier=sigma,
                max_grad_norm=c,
                expected_batch_size=expected,
                noise=source,
            )
        got = [p.grad.clone() for p in bk.params]
    assert close(got, want)


def test_hooks_removed_and_plain_training_unchanged(base, model):
    batch = make_batch(base[1])
    params = lora_params(model)
    plain = torch.autograd.grad(per_patient_loss(model, batch).mean(), params)
    hooks_before = sum(len(m._forward_hooks) for m in model.modules())
    with pytest.raises(RuntimeError, match="boom"), LoraBookkeeping(model) as bk:
        per_patient_loss(model, batch).sum().backward()
        assert not any(p.requires_grad for p in bk.params)
        raise RuntimeError("boom")
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks_before
    assert lora_params(model) == params  # requires_grad restored
    for p in params:
        p.grad = None
    per_patient_loss(model, batch).mean().backward()
    assert all(p.grad is not None for p in params)
    assert close([p.grad for p in params], list(plain), rel=1e-6)


def test_noisy_step_moves_every_adapter_tensor(base, model):
    params = lora_params(model)
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    source = noise_for(params, std=1.0, steps=2)
    knobs = dict(noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4, noise=source)
    with source, LoraBookkeeping(model) as bk:
        per_patient_loss(model, make_batch(base[1])).sum().backward()
        bk.accumulate_clipped(max_grad_norm=1.0)
        noisy_step(optimizer, bk.params, **knobs)
        assert all(p.grad is None for p in params)
        moved = [p.detach().clone() for p in params]
        noisy_step(optimizer, bk.params, **knobs)  # an empty Poisson batch: noise only
    assert all(not torch.equal(a, b) for a, b in zip(before, moved, strict=True))
    assert all(not torch.equal(a, p) for a, p in zip(moved, params, strict=True))


def test_refuses_other_trainable_parameters_and_bad_knobs(model):
    model.get_input_embeddings().weight.requires_grad_(True)
    with pytest.raises(ConfigError, match="embed_tokens"):
        LoraBookkeeping(model)
    model.get_input_embeddings().weight.requires_grad_(False)
    with pytest.raises(ConfigError) as err:
        add_noise(
            lora_params(model),
            noise_multiplier=-1.0,
            max_grad_norm=float("nan"),
            expected_batch_size=0,
            noise=noise_for(lora_params(model), std=1.0, steps=0),
        )
    assert {p.where for p in err.value.problems} == {
        "noise_multiplier",
        "max_grad_norm",
        "expected_batch_size",
    }
    with LoraBookkeeping(model) as bk, pytest.raises(ConfigError):
        bk.accumulate_clipped(max_grad_norm=0)


def test_layer_rule():
    assert not _use_ghost(512, 4096, 16)  # LoRA A of a Llama-8B projection: materialise
    assert not _use_ghost(128, 16, 4096)  # LoRA B
    assert _use_ghost(2, 4096, 4096)  # a full square layer on 2 tokens: ghost


def test_nothing_recorded_without_autograd(base, model):
    with LoraBookkeeping(model) as bk:
        with torch.no_grad():  # e.g. a local progress evaluation: must not count as a batch
            per_patient_loss(model, make_batch(base[1]))
        with pytest.raises(TrainingError, match="no per-sample gradients"):
            bk.accumulate_clipped(max_grad_norm=1.0)
