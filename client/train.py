"""One readable DP-LoRA recipe: a site's notes in, an adapter update and its privacy cost out.

Read it top to bottom; there is no trainer framework, only Opacus, PEFT and
torch called directly.

Privacy unit = the patient. The dataset Opacus samples from has one item per
patient; each time a patient is drawn, one of their notes is picked at random
and becomes one training example. A patient with 50 notes therefore adds at
most one per-sample gradient (clipped to ``max_grad_norm``) to any step, the
same as a patient with one note, and the (epsilon, delta) reported is
per patient, not per note.

Order of operations (each step only runs if the one before succeeded):

1. validate every knob and the data, raise once listing all problems;
2. fix the sampling rate q and the noise multiplier sigma;
3. reserve (sigma, q, steps) in the site's privacy ledger (fsynced) -- a run
   that would take the site past its epsilon ceiling is refused here, before
   any gradient is computed;
4. DP-SGD: Poisson sampling, per-patient clipping, Gaussian noise -- through
   Opacus' ``make_private`` (``clipping`` "flat" or "ghost", physical batches
   through ``BatchMemoryManager``) or through book-keeping clipping of the LoRA
   weights (``clipping="bk"``, :mod:`client.dp.bookkeeping`, Opacus'
   accountant) -- exactly ``steps`` noisy steps, each one seen by the
   accountant. Sampling, the note picked for a sampled patient and the noise
   all come from fresh ``os.urandom`` keys each round (:mod:`client.dp.noise`;
   ChaCha20 by default): nothing in any config seeds them, and torch's global
   RNG (seeded by the site with the run's LoRA init seed) is never used;
5. check the accountant saw exactly what was reserved and that every LoRA
   tensor moved; return the adapter and the privacy scalars.

``train_dp(..., private=False)`` is the one exception, and it is NOT private: the
non-private baseline of the privacy-utility study (``docs/results.md``). The
same patients, the same Poisson sampling and the same optimizer, but no
clipping, no noise, no accountant and no ledger entry; its privacy scalars say
epsilon = +inf and sigma = 0, which the wire contract refuses, so such an
adapter can never leave a site through the ClientApp. No run config can ask
for it: the knobs are the run's :class:`~shared.run_config.TrainConfig`, which has no such
switch, and :func:`client.site.site_train` never passes ``private``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from opacus import PrivacyEngine
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from torch.utils.data import DataLoader

from client.dp.baseline import train_nonprivate
from client.dp.config import TrainResult, config_problems
from client.dp.examples import IGNORE_INDEX, PatientExamples, collate
from client.dp.noise import GaussianNoise, noise_source_name, note_window_rng, use_noise
from client.dp.sampling import patients_bucket, poisson_loader, sample_rate_for
from client.dp.steps import bookkeeping_steps, opacus_steps
from client.model import adapter_state
from client.patient_split import group_by_patient
from client.schedule import schedule_learning_rate
from shared.accounting import compute_epsilon
from shared.errors import ConfigError, PrivacyError, Problem, TrainingError
from shared.privacy_scalars import PrivacyScalars
from shared.run_config import TrainConfig

if TYPE_CHECKING:
    from peft import PeftModel

    from client.dp.ledger import Ledger
    from client.notes import Note

log = logging.getLogger("fedsynth.train")

# A site needs at least this many expected batches' worth of patients: with fewer,
# q > 1/2 and subsampling barely amplifies privacy (and one patient is a large
# share of every step).
MIN_PATIENTS_PER_EXPECTED_BATCH = 2


def _trainable(model: PeftModel) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def train_dp(
    model: PeftModel,
    tokenizer: Any,
    notes: Sequence[Note],
    *,
    config: TrainConfig,
    ledger: Ledger,
    round_id: str,
    delta: float,
    epsilon_ceiling: float,
    progress: Callable[[int, int, float], None] | None = None,
    private: bool = True,
) -> TrainResult:
    """Train the LoRA weights of ``model`` with DP-SGD on ``notes`` (patient-level DP).

    ``model`` is a PEFT LoRA model already on its device (only LoRA parameters
    trainable); it is trained in place and left unwrapped, so the same object
    can be trained again next round. ``delta`` is per patient and must be
    ``<= 1/n_patients``; ``epsilon_ceiling`` is the site's cap on cumulative
    epsilon, checked by the ledger before anything is trained.
    ``progress(step, total, loss)`` is called after each noisy step with the mean
    (non-private, local-only) loss of that logical batch. ``private=False`` is the
    study's NON-PRIVATE baseline (module docstring): ``config`` must then have
    ``noise_multiplier`` and ``epsilon_per_round`` both 0, and nothing is charged.

    Raises :class:`ConfigError` (bad knobs), :class:`PrivacyError` (too few
    patients, delta too large, unreachable target epsilon),
    :class:`BudgetExceededError` (ceiling; nothing trained, nothing written) and
    :class:`TrainingError` (LoRA weights did not move, or the accountant did not
    see exactly what was reserved).
    """
    # 1. Validate everything, raise once per kind of error.
    problems = config_problems(
        config, private=private, delta=delta, epsilon_ceiling=epsilon_ceiling, round_id=round_id
    )
    trainable = _trainable(model)
    if not trainable:
        problems.append(Problem("model", "has no trainable parameters (add a LoRA adapter first)"))
    not_lora = [n for n in trainable if "lora_" not in n]
    if not_lora:
        problems.append(
            Problem("model", f"non-LoRA parameters are trainable: {', '.join(not_lora[:5])}")
        )
    if problems:
        raise ConfigError("invalid DP training settings", problems)

    by_patient = group_by_patient(notes)
    patient_ids = sorted(by_patient)
    n_patients = len(patient_ids)
    privacy_problems = []
    min_patients = MIN_PATIENTS_PER_EXPECTED_BATCH * config.expected_batch_size
    if n_patients < min_patients:
        privacy_problems.append(
            Problem(
                "notes",
                f"{n_patients} patients is too few for an expected batch of {config.expected_batch_size} "
                f"(need at least {min_patients}); lower expected_batch_size or add patients",
            )
        )
    if n_patients and delta > 1 / n_patients:
        privacy_problems.append(
            Problem(
                "delta",
                f"delta={delta:g} exceeds 1/n_patients = 1/{n_patients} = {1 / n_patients:.3g}",
            )
        )
    if privacy_problems:
        raise PrivacyError("privacy preconditions do not hold", privacy_problems)

    # 2. Sampling rate and noise. Each patient is sampled with q = B / bucket(n)
    # (client.dp.sampling.sample_rate_for): q leaves the site with every update, so it
    # depends on the bucketed count only; the accountant is charged with that same q.
    dataset = PatientExamples(
        [by_patient[pid] for pid in patient_ids], tokenizer, max_length=config.max_length,
        rng=note_window_rng(),
    )
    pad_id = (
        tokenizer.pad_token_id
        if tokenizer.pad_token_id is not None
        else (tokenizer.eos_token_id or 0)
    )
    sample_rate = sample_rate_for(n_patients, config.expected_batch_size)
    poisson = poisson_loader(
        dataset, sample_rate=sample_rate, collate_fn=partial(collate, pad_id=pad_id),
        secure=config.secure_mode,
    )
    steps = config.steps
    if not private:
        return train_nonprivate(
            model, poisson, config=config, trainable=trainable, delta=delta, n_patients=n_patients,
            progress=progress,
        )
    if config.noise_multiplier > 0:
        sigma = float(config.noise_multiplier)
    else:
        sigma = noise_multiplier_for(
            target_epsilon=config.epsilon_per_round,
            delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=config.accountant,
        )

    # 3. Reserve the privacy cost before any gradient is computed (fsynced; raises
    # BudgetExceededError when the cumulative epsilon would cross the ceiling).
    entry = ledger.reserve(
        round_id=round_id,
        noise_multiplier=sigma,
        sample_rate=sample_rate,
        steps=steps,
        delta=delta,
        accountant=config.accountant,
        epsilon_ceiling=epsilon_ceiling,
        noise_source=noise_source_name(secure=config.secure_mode),
    )

    # 4. DP-SGD.
    before = {n: p.detach().clone() for n, p in trainable.items()}
    was_training = model.training
    model.train()  # Opacus only records activations in training mode
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=config.learning_rate)
    schedule_learning_rate(optimizer, schedule=config.lr_schedule, steps=steps)
    if config.clipping == "bk":
        accountant = create_accountant(mechanism=config.accountant)
        try:
            mean_loss = bookkeeping_steps(
                model,
                poisson,
                optimizer,
                accountant,
                noise_multiplier=sigma,
                sample_rate=sample_rate,
                max_grad_norm=config.max_grad_norm,
                # the mean over the batch q·n expects (as Opacus' flat/ghost paths divide)
                expected_batch_size=max(1, int(n_patients * sample_rate)),
                max_physical_batch_size=config.max_physical_batch_size,
                steps=steps,
                secure_noise=config.secure_mode,
                progress=progress,
            )
        finally:
            model.train(was_training)
    else:
        accountant, mean_loss = _opacus_round(
            model, optimizer, poisson, config=config, sigma=sigma, sample_rate=sample_rate,
            params=list(trainable.values()), progress=progress,
        )
        model.train(was_training)

    # 5. Check what happened is what was reserved, and that training did something.
    charged = accountant.history
    if sum(s for _, _, s in charged) != steps or any(
        (n, q) != (sigma, sample_rate) for n, q, _ in charged
    ):
        raise TrainingError(
            f"the accountant saw {charged}, not the reserved {(sigma, sample_rate, steps)}; "
            "the ledger entry stands (conservative), but this update must not be sent"
        )
    frozen = [n for n, p in trainable.items() if torch.equal(p.detach(), before[n])]
    if frozen:
        raise TrainingError(
            "LoRA weights did not move during DP training",
            [Problem(n, "unchanged after training") for n in frozen],
        )

    epsilon_round = compute_epsilon(
        [(sigma, sample_rate, steps)], delta=delta, accountant=config.accountant
    )
    privacy = PrivacyScalars(
        epsilon=float(ledger.epsilon(delta=delta, accountant=config.accountant)),
        epsilon_round=epsilon_round,
        delta=float(delta),
        noise_multiplier=sigma,
        sample_rate=sample_rate,
        steps=steps,
        max_grad_norm=float(config.max_grad_norm),
        accountant=config.accountant,
        secure_mode=bool(config.secure_mode),
        patients_bucket=patients_bucket(n_patients),
        ledger_seq=entry.seq,  # the reservation's ledger position: the coordinator's anchor
        ledger_head=entry.hash,
    )
    return TrainResult(
        adapter=adapter_state(model), privacy=privacy, mean_loss=mean_loss, ledger_entry=entry,
        noise_source=noise_source_name(secure=config.secure_mode),
    )


def noise_multiplier_for(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    """The smallest sigma (found to Opacus' 0.01-epsilon tolerance) whose ``steps``
    Poisson-subsampled Gaussian steps at rate ``sample_rate`` cost at most
    ``target_epsilon`` at ``delta`` (one round alone, per patient).

    Raises :class:`PrivacyError` when no sigma reaches the target.
    """
    try:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
            )
        )
    except ValueError as exc:
        raise PrivacyError(
            f"target_epsilon={target_epsilon} is unreachable at delta={delta:g}, "
            f"q={sample_rate:.4g}, {steps} steps: {exc}"
        ) from exc


def _opacus_round(
    model: PeftModel,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    *,
    config: TrainConfig,
    sigma: float,
    sample_rate: float,
    params: list[torch.nn.Parameter],
    progress: Callable[[int, int, float], None] | None,
) -> tuple[Any, float]:
    """``steps`` noisy steps through Opacus' ``make_private`` (flat or ghost clipping).

    ``loader`` is already the secret Poisson loader (:func:`client.dp.sampling.poisson_loader`),
    so Opacus is told not to re-sample; its noise draw is replaced by the
    round's secret :class:`~client.dp.noise.GaussianNoise`. Opacus' own
    ``secure_mode`` (torchcsprng, unmaintained) is never used.
    Returns Opacus' accountant (what it was charged) and the mean local loss.
    The model is unwrapped again before returning, errors included, so it can be
    trained next round.
    """
    ghost = config.clipping == "ghost"
    with warnings.catch_warnings():
        # Opacus' secure_mode (torchcsprng) stays off: the noise is replaced below.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=config.accountant, secure_mode=False)
    private = engine.make_private(
        module=model,
        optimizer=optimizer,
        criterion=torch.nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX),
        data_loader=loader,
        noise_multiplier=sigma,
        max_grad_norm=config.max_grad_norm,
        poisson_sampling=False,  # loader already samples each patient with q, secretly
        grad_sample_mode="ghost" if ghost else "hooks",
    )
    if ghost:
        dp_model, dp_optimizer, criterion, dp_loader = private
    else:
        (dp_model, dp_optimizer, dp_loader), criterion = private, None
    noise = None
    try:
        noise = GaussianNoise(
            [p.shape for p in dp_optimizer.params], dtypes=[p.dtype for p in dp_optimizer.params],
            std=sigma * config.max_grad_norm, steps=config.steps, device=params[0].device,
            secure=config.secure_mode,
        )
        dp_model.forbid_grad_accumulation()  # what make_private does under poisson_sampling=True
        # make_private derived q = 1/len(loader); the loader samples with the bucket-based q
        # (client.dp.sampling.sample_rate_for), so the accountant and the mean are told that q.
        dp_optimizer.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
        dp_optimizer.expected_batch_size = max(1, int(len(loader.dataset) * sample_rate))  # as bk
        use_noise(dp_optimizer, noise)
        with warnings.catch_warnings():
            # Opacus hooks frozen modules whose inputs need no gradient; torch warns on each.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            mean_loss = opacus_steps(
                dp_model,
                dp_optimizer,
                criterion,
                dp_loader,
                params=params,
                steps=config.steps,
                max_physical_batch_size=config.max_physical_batch_size,
                progress=progress,
            )
    finally:
        if noise is not None:
            noise.close()
        dp_model.to_standard_module()  # removes Opacus hooks and per-sample attributes
    return engine.accountant, mean_loss
