"""What one round of DP-LoRA training takes and gives back: knobs, privacy scalars, result.

Kept apart from the recipe (:mod:`client.train`) so the non-private study
baseline (:mod:`client.baseline`) and the recipe share them without importing
each other. ``config_problems`` validates every knob and lists all problems.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from shared.errors import Problem
from shared.whitelist import ACCOUNTANTS

if TYPE_CHECKING:
    from client.ledger import LedgerEntry


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
    gradients materialised), "ghost" (Opacus ghost clipping, two backward
    passes, no per-sample gradients) or "bk" (book-keeping,
    :mod:`client.dp_bookkeeping`: one backward pass, per-sample gradients of the
    LoRA weights only, Opacus' Poisson loader and accountant); all three clip
    the whole per-patient gradient to ``max_grad_norm`` and add the same noise.

    ``secure_mode`` picks the DP noise source (:mod:`client.dp_noise`): True
    (the default) draws it from a ChaCha20 keystream keyed from ``os.urandom``
    each round, with Opacus' floating-point attack mitigation; False from a
    torch generator seeded from ``os.urandom`` each round (fresh, not a CSPRNG).
    There is deliberately no seed: nothing in a config can make noise or
    sampling predictable.

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
    secure_mode: bool = True
    clipping: Literal["flat", "ghost", "bk"] = "flat"
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
    ``ledger_seq``/``ledger_head`` name this round's reservation in the site's
    ledger (its seq and chain hash; 0 and 64 zeros when nothing was reserved):
    the coordinator records them per site so a ledger that is later lowered,
    restored or forked is noticed outside the site (docs/privacy-model.md).
    ``epsilon`` covers at least every record up to ``ledger_seq``.
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
    ledger_seq: int = 0
    ledger_head: str = "0" * 64

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
            "ledger_seq": int(self.ledger_seq),
            "ledger_head": str(self.ledger_head),
        }

    @property
    def private(self) -> bool:
        """False for the non-private baseline (no noise, unbounded epsilon)."""
        return self.noise_multiplier > 0 and math.isfinite(self.epsilon)


@dataclass(frozen=True)
class TrainResult:
    """An adapter update and what it cost.

    ``adapter`` holds the LoRA tensors only (PEFT names, CPU copies).
    ``noise_source`` names where the DP noise came from (``client.dp_noise``;
    "none" for the non-private baseline). ``mean_loss`` is the mean training loss over all examples seen; it is
    computed from private notes without noise, so it is for the local progress
    display only and must not leave the site. ``ledger_entry`` is the
    reservation made before training; the ClientApp marks it released once the
    update passed the wire check (``client.site.release_update``). It is None only for the
    non-private baseline, which reserves nothing.
    """

    adapter: dict[str, torch.Tensor]
    privacy: PrivacyScalars
    mean_loss: float
    ledger_entry: LedgerEntry | None
    noise_source: str = "none"


def config_problems(
    config: DPConfig, *, delta: float, epsilon_ceiling: float, round_id: str
) -> list[Problem]:
    """Every problem with ``config`` and the round's privacy parameters (empty = valid).

    ``delta`` is per patient, ``epsilon_ceiling`` the site's cap on cumulative
    epsilon; the caller raises one :class:`ConfigError` listing them all.
    """
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
    if config.clipping not in ("flat", "ghost", "bk"):
        problems.append(
            Problem("clipping", f"must be 'flat', 'ghost' or 'bk', got {config.clipping!r}")
        )
    if not isinstance(config.secure_mode, bool):
        problems.append(Problem("secure_mode", f"must be a boolean, got {config.secure_mode!r}"))
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        problems.append(Problem("delta", f"must be in (0, 1), got {delta!r}"))
    positive("epsilon_ceiling", epsilon_ceiling)
    if not isinstance(round_id, str) or not round_id.strip():
        problems.append(Problem("round_id", "must be a non-empty string"))
    return problems
