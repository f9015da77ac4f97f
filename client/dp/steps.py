"""The DP-SGD step loops: exactly ``steps`` noisy steps, each one charged to the accountant.

Two ways to clip each patient's whole LoRA gradient to ``max_grad_norm``:

- :func:`opacus_steps` runs Opacus' private model and optimizer (``hooks``:
  per-sample gradients materialised; ``ghost``: two backward passes) through
  ``BatchMemoryManager``;
- :func:`bookkeeping_steps` runs :mod:`client.dp.bookkeeping` (one forward,
  one backward, per-sample gradients of the LoRA weights only), with Opacus'
  Poisson loader and accountant.

Both return the mean per-patient training loss (nats per token). It is computed
from private notes without noise: a local progress figure that never leaves the
site.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch.utils.data import DataLoader

from client.dp.bookkeeping import LoraBookkeeping, noisy_step
from client.dp.examples import per_patient_loss, token_losses
from client.dp.noise import GaussianNoise

Progress = Callable[[int, int, float], None]


def _noise_only_step(optimizer: Any, params: Sequence[torch.nn.Parameter], *, ghost: bool) -> None:
    """A step for an empty Poisson batch: zero clipped-gradient sum, plus noise.

    Poisson sampling sometimes draws nobody. DP-SGD still releases a noisy
    (all-noise) update for that step and the accountant still counts it; a model
    cannot run a forward pass on zero rows, so the empty sum is set directly.
    """
    for p in params:
        if ghost:
            p.grad = torch.zeros_like(p)
        else:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    optimizer.step()
    optimizer.zero_grad()


def opacus_steps(
    dp_model: Any,
    dp_optimizer: Any,
    criterion: Any,
    dp_loader: DataLoader,
    *,
    params: Sequence[torch.nn.Parameter],
    steps: int,
    max_physical_batch_size: int,
    progress: Progress | None,
) -> float:
    """Run exactly ``steps`` noisy steps with Opacus' private model and optimizer.

    ``criterion`` is Opacus' ghost-clipping loss wrapper, or ``None`` for flat
    (hooks) clipping. The Poisson loader is re-iterated as often as needed: one
    pass over it is only ``1/q`` logical batches.
    """
    ghost = criterion is not None
    device = params[0].device
    # The accountant hook runs exactly once per noisy step; counting its calls is
    # how the loop knows where a logical batch ends (BatchMemoryManager hides it).
    taken = [0]
    accountant_hook = dp_optimizer.step_hook

    def on_noisy_step(opt: Any) -> None:
        accountant_hook(opt)
        taken[0] += 1

    dp_optimizer.attach_step_hook(on_noisy_step)
    total_loss, total_examples = 0.0, 0
    step_loss, step_examples = 0.0, 0
    while taken[0] < steps:
        with BatchMemoryManager(
            data_loader=dp_loader,
            max_physical_batch_size=max_physical_batch_size,
            optimizer=dp_optimizer,
        ) as physical_batches:
            for batch in physical_batches:
                rows = batch["input_ids"].shape[0] if isinstance(batch, dict) else 0
                before = taken[0]
                if rows == 0:
                    _noise_only_step(dp_optimizer, params, ghost=ghost)
                else:
                    labels = batch["labels"].to(device)
                    logits = dp_model(
                        input_ids=batch["input_ids"].to(device),
                        attention_mask=batch["attention_mask"].to(device),
                    ).logits
                    if ghost:
                        flat_logits, flat_targets = token_losses(logits, labels)
                        loss = criterion(
                            flat_logits, flat_targets, shape=(rows, logits.shape[1] - 1)
                        )
                        per_patient = loss.loss_per_sample.detach()
                    else:
                        per_patient = per_patient_loss(logits, labels)
                        loss = per_patient.mean()
                        per_patient = per_patient.detach()
                    loss.backward()
                    dp_optimizer.step()  # clips; adds noise and steps only at a logical batch's end
                    dp_optimizer.zero_grad()
                    step_loss += float(per_patient.sum())
                    step_examples += rows
                if taken[0] == before:
                    continue  # a physical batch inside a logical one
                total_loss, total_examples = total_loss + step_loss, total_examples + step_examples
                if progress is not None:
                    progress(taken[0], steps, step_loss / max(step_examples, 1))
                step_loss, step_examples = 0.0, 0
                if taken[0] >= steps:
                    break
    return total_loss / max(total_examples, 1)


def bookkeeping_steps(
    model: Any,
    poisson_loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    accountant: Any,
    *,
    noise_multiplier: float,
    sample_rate: float,
    max_grad_norm: float,
    expected_batch_size: int,
    max_physical_batch_size: int,
    steps: int,
    secure_noise: bool,
    progress: Progress | None,
) -> float:
    """Run exactly ``steps`` noisy steps with book-keeping clipping (one backward pass).

    ``poisson_loader`` is Opacus' ``DPDataLoader`` (Poisson sampling at
    ``sample_rate``); each logical batch is split into physical batches of at
    most ``max_physical_batch_size`` rows, whose clipped per-patient gradients
    are summed; then Gaussian noise (std ``noise_multiplier * max_grad_norm``)
    is added once, the sum divided by ``expected_batch_size``, the optimizer
    steps and ``accountant`` is charged once -- for an empty batch too. The
    noise comes from a fresh secret :class:`~client.dp.noise.GaussianNoise`
    (``secure_noise``: ChaCha20, else an ``os.urandom``-seeded torch generator).
    """
    device = next(p for p in model.parameters()).device
    taken, total_loss, total_examples = 0, 0.0, 0
    bk = LoraBookkeeping(model)
    noise = GaussianNoise(
        [p.shape for p in bk.params], dtypes=[p.dtype for p in bk.params],
        std=noise_multiplier * max_grad_norm, steps=steps, device=device, secure=secure_noise,
    )
    with noise, bk:  # hooks removed, flags restored and the noise thread stopped, errors included
        while taken < steps:
            for logical in poisson_loader:
                rows = logical["input_ids"].shape[0] if isinstance(logical, dict) else 0
                step_loss = 0.0
                for start in range(0, rows, max_physical_batch_size):
                    part = {k: v[start : start + max_physical_batch_size].to(device) for k, v in logical.items()}
                    logits = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits
                    per_patient = per_patient_loss(logits, part["labels"])
                    # SUM, not mean: each row's gradient must be that patient's own (see dp_bookkeeping).
                    per_patient.sum().backward()
                    bk.accumulate_clipped(max_grad_norm=max_grad_norm)
                    step_loss += float(per_patient.detach().sum())
                noisy_step(
                    optimizer,
                    bk.params,
                    noise_multiplier=noise_multiplier,
                    max_grad_norm=max_grad_norm,
                    expected_batch_size=expected_batch_size,
                    noise=noise,
                )
                accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
                taken += 1
                total_loss, total_examples = total_loss + step_loss, total_examples + rows
                if progress is not None:
                    progress(taken, steps, step_loss / max(rows, 1))
                if taken >= steps:
                    break
    return total_loss / max(total_examples, 1)
