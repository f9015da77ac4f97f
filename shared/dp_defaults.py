"""A site's DP defaults as pure formulas: patients bucket, Poisson rate q, default δ, evaluation σ.

One definition for the site (``client/dp/sampling.py``, ``client/site.py`` import
these) and for planning tools that must not import the site
(:mod:`shared.planning`, ``fedsynth-coordinator plan``). Pure arithmetic: no
torch, no Opacus.
"""

from __future__ import annotations

import math

PATIENTS_BUCKET = 10
"""Patient counts leave a site only rounded down to a multiple of this."""

DEFAULT_DELTA_CAP = 1e-5  # the default δ is never above this, whatever the site's size

DEFAULT_EVAL_NOISE_MULTIPLIER = 5.0
"""The site setting ``eval_noise_multiplier``'s default: σ of each evaluation release
(one Gaussian mechanism, sample rate 1, one step; :mod:`client.evaluate.eval_policy`)."""


def patients_bucket(n_patients: int) -> int:
    """``n_patients`` rounded down to a multiple of :data:`PATIENTS_BUCKET` (what may leave)."""
    return (n_patients // PATIENTS_BUCKET) * PATIENTS_BUCKET


def sample_rate_for(n_patients: int, expected_batch_size: int) -> float:
    """Poisson sampling rate q per patient per step, from the BUCKETED patient count only.

    q = B / max(b, 10) with b = ``patients_bucket(n_patients)``, capped at 1. q goes
    out with every update and the coordinator recomputes ε from it, so it must not
    depend on the exact count (Opacus' ``1/ceil(n/B)`` pins n to within B). Since
    b ≤ n, the expected batch q·n is B or slightly more; the accountant is charged
    with exactly this q, which is what the sampler uses.
    """
    return min(1.0, expected_batch_size / max(patients_bucket(n_patients), PATIENTS_BUCKET))


def default_delta(bucket: int) -> float:
    """The default δ for a site whose patients bucket is ``bucket``: min(1e-5, 1/(10·b·ln b)).

    A function of the bucket only, so the δ sent with every update reveals no more
    than ``patients_bucket`` does. For b >= 10 and any n in [b, b + 9],
    10·b·ln b > 10·n, so the default is always below 1/(10·n); below 10 patients
    (b = 0) it is 1e-5.
    """
    if bucket < 10:
        return DEFAULT_DELTA_CAP
    return min(DEFAULT_DELTA_CAP, 1.0 / (10 * bucket * math.log(bucket)))
