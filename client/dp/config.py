"""What one round of DP-LoRA training gives back, and the check of what it takes.

The knobs are the run's own :class:`shared.run_config.TrainConfig` (one type,
one set of defaults, for the ClientApp, ``fedsynth-site train`` and the study);
there is no client-side copy. The study's non-private baseline is not a knob:
it is the ``private=False`` argument of :func:`client.train.train_dp`, which no
run config, node config or setting reaches (:func:`client.site.site_train`
never passes it).

Kept apart from the recipe (:mod:`client.train`) so the non-private study
baseline (:mod:`client.dp.baseline`) and the recipe share them without importing
each other. ``config_problems`` validates every knob and lists all problems.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from shared.errors import Problem
from shared.privacy_scalars import PrivacyScalars
from shared.run_config import CLIPPINGS, LR_SCHEDULES, TrainConfig
from shared.whitelist import ACCOUNTANTS

if TYPE_CHECKING:
    from client.dp.ledger import LedgerEntry


@dataclass(frozen=True)
class TrainResult:
    """An adapter update and what it cost.

    ``adapter`` holds the LoRA tensors only (PEFT names, CPU copies).
    ``noise_source`` names where the DP noise came from (``client.dp.noise``;
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
    config: TrainConfig, *, private: bool, delta: float, epsilon_ceiling: float, round_id: str
) -> list[Problem]:
    """Every problem with ``config`` and the round's privacy parameters (empty = valid).

    A run config's TrainConfig is already checked by its parser; this also covers
    one built in code (tests, the study). ``private`` True: exactly one of
    ``noise_multiplier`` and ``epsilon_per_round`` is > 0. ``private`` False (the
    non-private baseline): both must be 0. ``delta`` is per patient,
    ``epsilon_ceiling`` the site's cap on cumulative epsilon; the caller raises one
    :class:`ConfigError` listing them all.
    """
    problems = []

    def number(name: str, value: Any, *, integer: bool = False, zero: bool = False) -> bool:
        kind = int if integer else (int, float)
        if (
            isinstance(value, bool)
            or not isinstance(value, kind)
            or not math.isfinite(value)
            or value < 0
            or (value == 0 and not zero)
        ):
            what = "an integer >= 1" if integer else f"a finite number {'>=' if zero else '>'} 0"
            problems.append(Problem(name, f"must be {what}, got {value!r}"))
            return False
        return True

    sigma_ok = number("noise_multiplier", config.noise_multiplier, zero=True)
    eps_ok = number("epsilon_per_round", config.epsilon_per_round, zero=True)
    if not isinstance(private, bool):
        problems.append(Problem("private", f"must be a boolean, got {private!r}"))
    elif sigma_ok and eps_ok:
        if not private and (config.noise_multiplier > 0 or config.epsilon_per_round > 0):
            problems.append(Problem(
                "private", "the non-private baseline takes neither noise_multiplier nor epsilon_per_round"))
        elif private and (config.noise_multiplier > 0) == (config.epsilon_per_round > 0):
            problems.append(Problem(
                "noise_multiplier/epsilon_per_round",
                "set exactly one of them > 0 (sigma directly, or a per-round epsilon to derive it)"))
    number("max_grad_norm", config.max_grad_norm)
    number("learning_rate", config.learning_rate)
    for name in ("expected_batch_size", "max_physical_batch_size", "steps", "max_length"):
        number(name, getattr(config, name), integer=True)
    if isinstance(config.max_length, int) and config.max_length == 1:
        problems.append(Problem("max_length", "must be >= 2 (one token predicts the next)"))
    if config.accountant not in ACCOUNTANTS:
        problems.append(
            Problem(
                "accountant", f"must be one of {sorted(ACCOUNTANTS)}, got {config.accountant!r}"
            )
        )
    if config.clipping not in CLIPPINGS:
        problems.append(
            Problem("clipping", f"must be one of {list(CLIPPINGS)}, got {config.clipping!r}")
        )
    if config.lr_schedule not in LR_SCHEDULES:
        problems.append(
            Problem("lr_schedule", f"must be one of {list(LR_SCHEDULES)}, got {config.lr_schedule!r}")
        )
    if not isinstance(config.secure_mode, bool):
        problems.append(Problem("secure_mode", f"must be a boolean, got {config.secure_mode!r}"))
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        problems.append(Problem("delta", f"must be in (0, 1), got {delta!r}"))
    number("epsilon_ceiling", epsilon_ceiling)
    if not isinstance(round_id, str) or not round_id.strip():
        problems.append(Problem("round_id", "must be a non-empty string"))
    return problems
