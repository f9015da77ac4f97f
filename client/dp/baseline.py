"""The NON-PRIVATE baseline of the privacy-utility study: the DP recipe minus DP.

``train_dp(..., private=False)`` lands here (from :func:`client.train.train_dp`,
after the same validation). It is NOT private: same patients, same
Poisson sampling and the same optimizer as a private run, but no
clipping, no noise, no accountant and no ledger entry. Its privacy scalars say
epsilon = +inf and sigma = 0, which the wire contract refuses, so such an
adapter can never leave a site through the ClientApp; no run config can ask
for it (the run's TrainConfig has no such switch; :func:`client.site.site_train`
never passes ``private``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader

from client.dp.config import TrainResult
from client.dp.examples import per_patient_loss
from client.model import adapter_state
from client.schedule import schedule_learning_rate
from shared.dp_defaults import patients_bucket
from shared.errors import Problem, TrainingError
from shared.privacy_scalars import PrivacyScalars
from shared.run_config import TrainConfig

if TYPE_CHECKING:
    from peft import PeftModel


log = logging.getLogger("fedsynth.train")


def train_nonprivate(
    model: PeftModel,
    poisson: DataLoader,
    *,
    config: TrainConfig,
    trainable: dict[str, torch.nn.Parameter],
    delta: float,
    n_patients: int,
    progress: Callable[[int, int, float], None] | None,
) -> TrainResult:
    """The NON-PRIVATE baseline: the DP recipe minus clipping, noise, accountant and ledger.

    Same Poisson sampling of patients (``poisson``: the secret Poisson loader a
    private run uses, :func:`client.dp.sampling.poisson_loader`), same
    per-patient loss (mean over report tokens), same AdamW; the gradient is the
    sum of per-patient gradients over ``expected_batch_size``, exactly the
    scaling Opacus applies before noise. An empty batch is a step with no update.
    Nothing is written to any ledger: this update has no privacy guarantee.
    """
    log.warning(
        "NON-PRIVATE training (privacy-utility baseline): no clipping, no noise, no ledger entry; "
        "this adapter has NO differential-privacy guarantee and the wire refuses it"
    )
    sample_rate = float(poisson.batch_sampler.sample_rate)  # the q the sampler draws with
    device = next(iter(trainable.values())).device
    params = list(trainable.values())
    before = {n: p.detach().clone() for n, p in trainable.items()}
    was_training = model.training
    model.train()
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate)
    schedule_learning_rate(optimizer, schedule=config.lr_schedule, steps=config.steps)
    taken, total_loss, total_examples = 0, 0.0, 0
    try:
        while taken < config.steps:
            for batch in poisson:
                rows = batch["input_ids"].shape[0] if isinstance(batch, dict) else 0
                step_loss = 0.0
                optimizer.zero_grad()
                for start in range(0, rows, config.max_physical_batch_size):
                    part = {k: v[start : start + config.max_physical_batch_size] for k, v in batch.items()}
                    labels = part["labels"].to(device)
                    logits = model(
                        input_ids=part["input_ids"].to(device),
                        attention_mask=part["attention_mask"].to(device),
                    ).logits
                    per_patient = per_patient_loss(logits, labels)
                    (per_patient.sum() / config.expected_batch_size).backward()
                    step_loss += float(per_patient.detach().sum())
                # an empty batch has no gradients (AdamW leaves those weights alone), but it is
                # still a step: the rate schedule counts it, as the DP paths' noisy steps do
                optimizer.step()
                optimizer.zero_grad()
                taken += 1
                total_loss, total_examples = total_loss + step_loss, total_examples + rows
                if progress is not None:
                    progress(taken, config.steps, step_loss / max(rows, 1))
                if taken >= config.steps:
                    break
    finally:
        model.train(was_training)
    frozen = [n for n, p in trainable.items() if torch.equal(p.detach(), before[n])]
    if frozen:
        raise TrainingError(
            "LoRA weights did not move during (non-private) training",
            [Problem(n, "unchanged after training") for n in frozen],
        )
    privacy = PrivacyScalars(
        epsilon=math.inf,
        epsilon_round=math.inf,
        delta=float(delta),
        noise_multiplier=0.0,
        sample_rate=sample_rate,
        steps=config.steps,
        max_grad_norm=math.inf,
        accountant="none",
        secure_mode=False,
        patients_bucket=patients_bucket(n_patients),
    )
    return TrainResult(
        adapter=adapter_state(model),
        privacy=privacy,
        mean_loss=total_loss / max(total_examples, 1),
        ledger_entry=None,
    )
