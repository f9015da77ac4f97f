"""The learning rate within one round: constant, or decayed linearly to the round's end.

Why decay under DP: with a constant rate, DP-SGD's loss stops falling once the
noise the optimizer follows balances what the gradients teach (on the proxy
site at ε = 8 the loss sat at ≈ 0.67 from about step 125 of 300, where the
non-private arm went on to 0.41). Shrinking the rate towards the end of a
round lowers that noise floor before the adapter is sent. Measured there
(docs/results.md): the last round's loss fell from 0.68 to 0.65 and the
adapter's weights moved half as far, but fidelity stayed at chance; the
default stays "constant", the recipe the curve was measured with.

Privacy meaning: none. The rate only rescales updates computed from the already
clipped and noised gradients (post-processing), so ε, the ledger entry and
the accountant are the same for every schedule.
"""

from __future__ import annotations

import torch

from shared.errors import ConfigError
from shared.run_config import LR_SCHEDULES


def linear_factor(step: int, steps: int) -> float:
    """The rate multiplier for step ``step`` (0-based) of ``steps``: ``1 - step / steps``."""
    return max(0.0, 1.0 - step / steps)


def schedule_learning_rate(optimizer: torch.optim.Optimizer, *, schedule: str, steps: int) -> None:
    """Make ``optimizer`` follow ``schedule`` over this round's ``steps`` optimizer steps.

    ``optimizer`` is the plain torch optimizer (Opacus' DPOptimizer calls its
    ``step`` once per logical batch, never for a skipped virtual step), so the
    post-step hook counts logical steps only.
    """
    if schedule not in LR_SCHEDULES:
        raise ConfigError(f"train.lr-schedule {schedule!r} is not one of {', '.join(LR_SCHEDULES)}")
    if schedule == "constant":
        return
    base = [group["lr"] for group in optimizer.param_groups]
    taken = 0

    def after_step(opt: torch.optim.Optimizer, _args: object, _kwargs: object) -> None:
        nonlocal taken
        taken += 1
        for group, lr in zip(opt.param_groups, base, strict=True):
            group["lr"] = lr * linear_factor(taken, steps)

    optimizer.register_step_post_hook(after_step)
