"""A site's update as what it adds to the global adapter: the maths both sides share.

The coordinator (:func:`server.strategy.aggregate`, plain rounds) and the site
(:func:`shared.wire_secagg.secagg_contribution`, SecAgg+ rounds, where only the
sum of contributions ever reaches the coordinator) must turn an adapter into the
same per-site value, or a SecAgg+ round would not aggregate what a plain round
does. That value is :func:`site_contribution`:

- the update *delta* against the current global adapter (:func:`update_delta`);
- scaled so its global L2 norm is at most ``norm_bound`` (:func:`clip_delta`;
  0 = off): one site's pull on the global adapter is bounded (robustness against
  a faulty or hostile site; not a DP mechanism by itself);
- in round 1 (no global adapter yet) ``lora_B`` against PEFT's zero init, and
  ``lora_A`` as absolute values: its seeded random init is never seen by the
  coordinator, so it is averaged as is and not norm-bounded.

The new global adapter is then the reference plus the combined contributions
(:func:`add_to_reference`). All maths in float64; adapters are
``dict[str, np.ndarray]`` keyed by PEFT tensor name. Pure functions, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

Adapter = dict[str, np.ndarray]

LORA_B_SUFFIX = ".lora_B.weight"


def is_lora_b(name: str) -> bool:
    """True for a LoRA ``B`` tensor (PEFT initialises it to zero)."""
    return name.endswith(LORA_B_SUFFIX)


def update_delta(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray] | None) -> Adapter:
    """``update - reference`` per tensor (float64).

    Without a reference (round 1, no global adapter yet) PEFT's own
    initialisation is the reference: ``lora_B`` starts at zero, so its delta is
    the tensor itself; ``lora_A`` starts at a seeded random matrix the
    coordinator never sees, so A tensors get a zero delta here (and are
    contributed as absolute values by :func:`site_contribution`).
    """
    out: Adapter = {}
    for name, value in update.items():
        v = np.asarray(value, dtype=np.float64)
        if reference is not None:
            out[name] = v - np.asarray(reference[name], dtype=np.float64)
        elif is_lora_b(name):
            out[name] = v
        else:
            out[name] = np.zeros_like(v)
    return out


def update_norm(delta: Mapping[str, np.ndarray]) -> float:
    """Global L2 norm of a delta over all its tensors."""
    return float(np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in delta.values())))


def clip_delta(delta: Mapping[str, np.ndarray], bound: float) -> Adapter:
    """Scale ``delta`` so its global L2 norm (over all tensors) is at most ``bound`` (0 = off).

    Bounds how far one site can move the global adapter in one round (robustness
    against a faulty or hostile site); it is not a DP mechanism by itself.
    """
    if bound <= 0:
        return {k: np.asarray(v, dtype=np.float64) for k, v in delta.items()}
    norm = update_norm(delta)
    scale = min(1.0, bound / norm) if norm > 0 else 1.0
    return {k: np.asarray(v, dtype=np.float64) * scale for k, v in delta.items()}


def site_contribution(
    update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray] | None, *, norm_bound: float
) -> Adapter:
    """What one site's adapter adds to the combination (float64), before any weighting.

    The delta against ``reference`` bounded to L2 norm ``norm_bound`` (0 = off); in
    round 1 (``reference`` None) ``lora_A`` tensors are the absolute values instead
    (see the module docstring). The combined contributions added to the reference
    (:func:`add_to_reference`) give the new global adapter.
    """
    clipped = clip_delta(update_delta(update, reference), norm_bound)
    if reference is not None:
        return clipped
    return {k: v if is_lora_b(k) else np.asarray(update[k], dtype=np.float64) for k, v in clipped.items()}


def add_to_reference(
    name: str, combined: np.ndarray, reference: Mapping[str, np.ndarray] | None, dtype: str
) -> np.ndarray:
    """Tensor ``name`` of the new global adapter: ``reference[name] + combined`` (round 1: ``combined``).

    ``combined``: the sites' contributions to that tensor combined (a weighted mean
    or a robust rule); the result is cast to the run's adapter ``dtype``.
    """
    base = 0.0 if reference is None else np.asarray(reference[name], dtype=np.float64)
    return (np.asarray(combined, dtype=np.float64) + base).astype(dtype)
