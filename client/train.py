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
4. DP-SGD: Poisson sampling, per-patient clipping, Gaussian noise (Opacus),
   physical batches through ``BatchMemoryManager``, exactly ``steps`` noisy
   steps, each one seen by the accountant;
5. check the accountant saw exactly what was reserved and that every LoRA
   tensor moved; return the adapter and the privacy scalars.

``DPConfig(private=False)`` is the one exception, and it is NOT private: the
non-private baseline of the privacy-utility study (``docs/results.md``). The
same patients, the same Poisson-sampled batches and the same optimizer, but no
clipping, no noise, no accountant and no ledger entry; its privacy scalars say
epsilon = +inf and sigma = 0, which the wire contract refuses, so such an
adapter can never leave a site through the ClientApp. No run config can ask
for it (:func:`client.site.dp_config` always builds a private config).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import DPDataLoader
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch.utils.data import DataLoader, Dataset

from client.model import adapter_state
from client.notes import group_by_patient
from client.prompt import prompt_and_body
from shared.errors import ConfigError, PrivacyError, Problem, TrainingError
from shared.wire import ACCOUNTANTS

if TYPE_CHECKING:
    from peft import PeftModel

    from client.ledger import Ledger, LedgerEntry
    from client.notes import Note

log = logging.getLogger("fedsynth.train")

IGNORE_INDEX = -100  # label value cross-entropy skips: prompt and padding positions

# A site needs at least this many expected batches' worth of patients: with fewer,
# q > 1/2 and subsampling barely amplifies privacy (and one patient is a large
# share of every step).
MIN_PATIENTS_PER_EXPECTED_BATCH = 2


@dataclass(frozen=True, kw_only=True)
class DPConfig:
    """The knobs of one round of DP-LoRA training at one site.

    Exactly one of ``noise_multiplier`` (sigma: noise std / ``max_grad_norm``)
    and ``target_epsilon`` (this round's epsilon alone, at the run's delta; sigma
    is then derived with Opacus' ``get_noise_multiplier``) must be given.
    ``expected_batch_size`` is the logical batch in patients per step, in
    expectation under Poisson sampling; ``max_physical_batch_size`` only bounds
    memory and does not change the privacy cost. ``steps`` is the number of
    noisy optimizer steps (logical batches) the accountant is charged for.
    ``max_length`` is in tokens (prompt + report). ``clipping`` picks how
    per-patient gradient norms are computed: "flat" (Opacus hooks, per-sample
    gradients materialised) or "ghost" (ghost clipping, two backward passes, no
    per-sample gradients); both clip the whole per-patient gradient to
    ``max_grad_norm``.

    ``private=False`` switches DP off entirely (the study's non-private
    baseline, see the module docstring): then neither ``noise_multiplier`` nor
    ``target_epsilon`` may be given, and nothing is charged to any ledger.
    """

    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    max_grad_norm: float = 1.0
    expected_batch_size: int = 16
    max_physical_batch_size: int = 8
    steps: int = 20
    learning_rate: float = 5e-3
    max_length: int = 256
    accountant: Literal["prv", "rdp"] = "prv"
    secure_mode: bool = False
    clipping: Literal["flat", "ghost"] = "flat"
    seed: int = 0
    private: bool = True


@dataclass(frozen=True)
class PrivacyScalars:
    """What this round cost, as sent with the adapter (``shared.wire.PRIVACY_KEYS``).

    ``epsilon`` is cumulative over every round in the site's ledger (recomputed
    from the whole ledger), ``epsilon_round`` this round alone; both at
    ``delta``, per patient. ``patients_bucket`` is the number of training
    patients rounded down to a multiple of 10 (the exact count does not leave).
    A non-private baseline (``DPConfig(private=False)``) reports epsilon =
    epsilon_round = +inf, noise_multiplier = 0, max_grad_norm = +inf and
    accountant "none": :func:`shared.wire.check_reply` refuses every one of them.
    """

    epsilon: float
    epsilon_round: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    accountant: str
    secure_mode: bool
    patients_bucket: int

    def as_dict(self) -> dict[str, float | int | str | bool]:
        """The scalars keyed exactly by ``shared.wire.PRIVACY_KEYS``."""
        return {
            "epsilon": float(self.epsilon),
            "epsilon_round": float(self.epsilon_round),
            "delta": float(self.delta),
            "noise_multiplier": float(self.noise_multiplier),
            "sample_rate": float(self.sample_rate),
            "steps": int(self.steps),
            "max_grad_norm": float(self.max_grad_norm),
            "accountant": str(self.accountant),
            "secure_mode": bool(self.secure_mode),
            "patients_bucket": int(self.patients_bucket),
        }

    @property
    def private(self) -> bool:
        """False for the non-private baseline (no noise, unbounded epsilon)."""
        return self.noise_multiplier > 0 and math.isfinite(self.epsilon)


@dataclass(frozen=True)
class TrainResult:
    """An adapter update and what it cost.

    ``adapter`` holds the LoRA tensors only (PEFT names, CPU copies).
    ``mean_loss`` is the mean training loss over all examples seen; it is
    computed from private notes without noise, so it is for the local progress
    display only and must not leave the site. ``ledger_entry`` is the
    reservation made before training; the caller marks it released once the
    update has been sent (``Ledger.mark_released``). It is None only for the
    non-private baseline, which reserves nothing.
    """

    adapter: dict[str, torch.Tensor]
    privacy: PrivacyScalars
    mean_loss: float
    ledger_entry: LedgerEntry | None


class PatientExamples(Dataset):
    """One item per patient; reading an item draws one of that patient's notes.

    Item ``i`` is ``{"input_ids", "labels", "patient": i}``: one training
    example from a note picked uniformly among patient ``i``'s notes, with its
    primary ICD-10 code as the conditioning prompt. A note longer than
    ``max_length`` tokens contributes a window of its body drawn uniformly at
    random behind the full prompt, so every part of a long note can be learned
    over the steps; still one example per sampled patient per step.
    """

    def __init__(
        self,
        patients: Sequence[Sequence[Note]],
        tokenizer: Any,
        *,
        max_length: int,
        rng: random.Random,
    ) -> None:
        self.patients = [list(notes) for notes in patients]
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.rng = rng
        self._cache: dict[tuple[int, int], tuple[list[int], list[int]]] = {}

    def __len__(self) -> int:
        return len(self.patients)

    def __getitem__(self, index: int) -> dict[str, Any]:
        notes = self.patients[index]
        pick = self.rng.randrange(len(notes))
        key = (index, pick)
        if key not in self._cache:
            note = notes[pick]
            self._cache[key] = prompt_and_body(note.primary_code, note.text, self.tokenizer)
        prompt, body = self._cache[key]
        room = max(1, self.max_length - len(prompt))
        start = self.rng.randrange(len(body) - room + 1) if len(body) > room else 0
        window = body[start : start + room]
        ids = (prompt + window)[: self.max_length]
        labels = ([IGNORE_INDEX] * len(prompt) + window)[: self.max_length]
        return {"input_ids": ids, "labels": labels, "patient": index}


def collate(examples: Sequence[dict[str, Any]], *, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a physical batch; padding gets label -100 and attention 0."""
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[row, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.tensor(e["labels"], dtype=torch.long)
        attention[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


def _config_problems(
    config: DPConfig, *, delta: float, epsilon_ceiling: float, round_id: str
) -> list[Problem]:
    problems = []

    def positive(name: str, value: Any, *, integer: bool = False) -> None:
        kind = int if integer else (int, float)
        if (
            isinstance(value, bool)
            or not isinstance(value, kind)
            or not math.isfinite(value)
            or value <= 0
        ):
            what = "an integer >= 1" if integer else "a finite number > 0"
            problems.append(Problem(name, f"must be {what}, got {value!r}"))

    if not isinstance(config.private, bool):
        problems.append(Problem("private", f"must be a boolean, got {config.private!r}"))
    elif not config.private:
        if config.noise_multiplier is not None or config.target_epsilon is not None:
            problems.append(
                Problem(
                    "private",
                    "the non-private baseline takes neither noise_multiplier nor target_epsilon",
                )
            )
    elif (config.noise_multiplier is None) == (config.target_epsilon is None):
        problems.append(
            Problem(
                "noise_multiplier/target_epsilon",
                "give exactly one of them (sigma directly, or a per-round epsilon to derive it)",
            )
        )
    if config.noise_multiplier is not None:
        positive("noise_multiplier", config.noise_multiplier)
    if config.target_epsilon is not None:
        positive("target_epsilon", config.target_epsilon)
    positive("max_grad_norm", config.max_grad_norm)
    positive("learning_rate", config.learning_rate)
    for name in ("expected_batch_size", "max_physical_batch_size", "steps", "max_length"):
        positive(name, getattr(config, name), integer=True)
    if isinstance(config.max_length, int) and config.max_length == 1:
        problems.append(Problem("max_length", "must be >= 2 (one token predicts the next)"))
    if config.accountant not in ACCOUNTANTS:
        problems.append(
            Problem(
                "accountant", f"must be one of {sorted(ACCOUNTANTS)}, got {config.accountant!r}"
            )
        )
    if config.clipping not in ("flat", "ghost"):
        problems.append(Problem("clipping", f"must be 'flat' or 'ghost', got {config.clipping!r}"))
    if config.secure_mode and importlib.util.find_spec("torchcsprng") is None:
        problems.append(
            Problem("secure_mode", "needs the torchcsprng package, which is not installed")
        )
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        problems.append(Problem("delta", f"must be in (0, 1), got {delta!r}"))
    positive("epsilon_ceiling", epsilon_ceiling)
    if not isinstance(round_id, str) or not round_id.strip():
        problems.append(Problem("round_id", "must be a non-empty string"))
    return problems


def _trainable(model: PeftModel) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token logits and targets, flattened for cross-entropy: ``(B*T, V)`` and ``(B*T,)``."""
    logits = logits[:, :-1, :]
    targets = labels[:, 1:]
    return logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1)


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


def train_dp(
    model: PeftModel,
    tokenizer: Any,
    notes: Sequence[Note],
    *,
    config: DPConfig,
    ledger: Ledger,
    round_id: str,
    delta: float,
    epsilon_ceiling: float,
    progress: Callable[[int, int, float], None] | None = None,
) -> TrainResult:
    """Train the LoRA weights of ``model`` with DP-SGD on ``notes`` (patient-level DP).

    ``model`` is a PEFT LoRA model already on its device (only LoRA parameters
    trainable); it is trained in place and left unwrapped, so the same object
    can be trained again next round. ``delta`` is per patient and must be
    ``<= 1/n_patients``; ``epsilon_ceiling`` is the site's cap on cumulative
    epsilon, checked by the ledger before anything is trained.
    ``progress(step, total, loss)`` is called after each noisy step with the mean
    (non-private, local-only) loss of that logical batch.

    Raises :class:`ConfigError` (bad knobs), :class:`PrivacyError` (too few
    patients, delta too large, unreachable target epsilon),
    :class:`BudgetExceededError` (ceiling; nothing trained, nothing written) and
    :class:`TrainingError` (LoRA weights did not move, or the accountant did not
    see exactly what was reserved).
    """
    # 1. Validate everything, raise once per kind of error.
    problems = _config_problems(
        config, delta=delta, epsilon_ceiling=epsilon_ceiling, round_id=round_id
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

    # 2. Sampling rate and noise. Opacus' DPDataLoader samples each patient with
    # q = 1/len(loader) = 1/ceil(n/B); the accountant is charged with that same q.
    # It equals B/n when B divides n and is slightly smaller otherwise (expected
    # batch never above B).
    device = next(iter(trainable.values())).device
    rng = random.SystemRandom() if config.secure_mode else random.Random(config.seed)
    dataset = PatientExamples(
        [by_patient[pid] for pid in patient_ids], tokenizer, max_length=config.max_length, rng=rng
    )
    pad_id = (
        tokenizer.pad_token_id
        if tokenizer.pad_token_id is not None
        else (tokenizer.eos_token_id or 0)
    )
    sampler_rng = None if config.secure_mode else torch.Generator().manual_seed(config.seed)
    loader = DataLoader(
        dataset,
        batch_size=config.expected_batch_size,
        collate_fn=partial(collate, pad_id=pad_id),
        generator=sampler_rng,
    )
    sample_rate = 1.0 / len(loader)
    steps = config.steps
    if not config.private:
        return _train_nonprivate(
            model, loader, config=config, trainable=trainable, delta=delta, n_patients=n_patients,
            progress=progress,
        )
    if config.noise_multiplier is not None:
        sigma = float(config.noise_multiplier)
    else:
        sigma = noise_multiplier_for(
            target_epsilon=config.target_epsilon,
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
    )

    # 4. DP-SGD.
    before = {n: p.detach().clone() for n, p in trainable.items()}
    ghost = config.clipping == "ghost"
    was_training = model.training
    model.train()  # Opacus only records activations in training mode
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=config.learning_rate)
    with warnings.catch_warnings():
        # secure_mode is reported with every update; Opacus' reminder adds nothing.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=config.accountant, secure_mode=config.secure_mode)
    noise_rng = (
        None if config.secure_mode else torch.Generator(device=device).manual_seed(config.seed + 1)
    )
    private = engine.make_private(
        module=model,
        optimizer=optimizer,
        criterion=torch.nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX),
        data_loader=loader,
        noise_multiplier=sigma,
        max_grad_norm=config.max_grad_norm,
        poisson_sampling=True,
        grad_sample_mode="ghost" if ghost else "hooks",
        noise_generator=noise_rng,
    )
    if ghost:
        dp_model, dp_optimizer, criterion, dp_loader = private
    else:
        (dp_model, dp_optimizer, dp_loader), criterion = private, None

    try:
        with warnings.catch_warnings():
            # Opacus hooks frozen modules whose inputs need no gradient; torch warns on each.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            mean_loss = _dp_steps(
                dp_model,
                dp_optimizer,
                criterion,
                dp_loader,
                params=list(trainable.values()),
                steps=steps,
                max_physical_batch_size=config.max_physical_batch_size,
                progress=progress,
            )
    finally:
        dp_model.to_standard_module()  # removes Opacus hooks and per-sample attributes
        model.train(was_training)

    # 5. Check what happened is what was reserved, and that training did something.
    charged = engine.accountant.history
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

    epsilon_round = _epsilon_of(
        sigma, sample_rate, steps, delta=delta, accountant=config.accountant
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
        patients_bucket=(n_patients // 10) * 10,
    )
    return TrainResult(
        adapter=adapter_state(model), privacy=privacy, mean_loss=mean_loss, ledger_entry=entry
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


def _epsilon_of(
    sigma: float, sample_rate: float, steps: int, *, delta: float, accountant: str
) -> float:
    """Epsilon of one round alone: ``steps`` Poisson-subsampled Gaussian steps."""
    acc = create_accountant(mechanism=accountant)
    acc.history = [(sigma, sample_rate, steps)]
    return float(acc.get_epsilon(delta=delta))


def _dp_steps(
    dp_model: Any,
    dp_optimizer: Any,
    criterion: Any,
    dp_loader: DataLoader,
    *,
    params: Sequence[torch.nn.Parameter],
    steps: int,
    max_physical_batch_size: int,
    progress: Callable[[int, int, float], None] | None,
) -> float:
    """Run exactly ``steps`` noisy DP-SGD steps; return the mean per-patient loss.

    ``criterion`` is Opacus' ghost-clipping loss wrapper, or ``None`` for flat
    (hooks) clipping. The loss of one patient is the mean over their report
    tokens, so a long note weighs no more than a short one before clipping.
    The Poisson loader is re-iterated as often as needed: one pass over it is
    only ``1/q`` logical batches.
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
                    flat_logits, flat_targets = _token_losses(logits, labels)
                    if ghost:
                        loss = criterion(
                            flat_logits, flat_targets, shape=(rows, logits.shape[1] - 1)
                        )
                        per_patient = loss.loss_per_sample.detach()
                    else:
                        token_loss = F.cross_entropy(
                            flat_logits, flat_targets, ignore_index=IGNORE_INDEX, reduction="none"
                        ).view(rows, -1)
                        counted = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1).clamp(min=1)
                        per_patient = token_loss.sum(dim=1) / counted
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


def _train_nonprivate(
    model: PeftModel,
    loader: DataLoader,
    *,
    config: DPConfig,
    trainable: dict[str, torch.nn.Parameter],
    delta: float,
    n_patients: int,
    progress: Callable[[int, int, float], None] | None,
) -> TrainResult:
    """The NON-PRIVATE baseline: the DP recipe minus clipping, noise, accountant and ledger.

    Same Poisson sampling of patients (Opacus' ``DPDataLoader`` over the same
    loader and seed, so the same batches a private run would draw), same
    per-patient loss (mean over report tokens), same AdamW; the gradient is the
    sum of per-patient gradients over ``expected_batch_size``, exactly the
    scaling Opacus applies before noise. An empty batch is a step with no update.
    Nothing is written to any ledger: this update has no privacy guarantee.
    """
    log.warning(
        "NON-PRIVATE training (privacy-utility baseline): no clipping, no noise, no ledger entry; "
        "this adapter has NO differential-privacy guarantee and the wire refuses it"
    )
    sample_rate = 1.0 / len(loader)
    device = next(iter(trainable.values())).device
    params = list(trainable.values())
    before = {n: p.detach().clone() for n, p in trainable.items()}
    was_training = model.training
    model.train()
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate)
    poisson = DPDataLoader.from_data_loader(loader)
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
                    flat_logits, flat_targets = _token_losses(logits, labels)
                    token_loss = F.cross_entropy(
                        flat_logits, flat_targets, ignore_index=IGNORE_INDEX, reduction="none"
                    ).view(labels.shape[0], -1)
                    counted = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1).clamp(min=1)
                    per_patient = token_loss.sum(dim=1) / counted
                    (per_patient.sum() / config.expected_batch_size).backward()
                    step_loss += float(per_patient.detach().sum())
                if rows:
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
        patients_bucket=(n_patients // 10) * 10,
    )
    return TrainResult(
        adapter=adapter_state(model),
        privacy=privacy,
        mean_loss=total_loss / max(total_examples, 1),
        ledger_entry=None,
    )
