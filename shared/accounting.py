"""DP-SGD privacy accounting shared by the site (its ledger) and the coordinator (its check).

The site's ledger composes every (sigma, q, steps) run it has reserved; the
coordinator recomputes the same composition from the runs sites *reported*, so
a site cannot claim a cumulative epsilon below what its own reports imply
(:mod:`server.site_budget`). Both must use this one function so that they agree
to within the accountant's numerical error (:data:`EPSILON_TOLERANCE`).

Opacus is imported only when an epsilon is computed (it imports torch), so
auditor tools that import :mod:`shared` stay light.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from functools import lru_cache

from shared.whitelist import ACCOUNTANTS

EPSILON_ABS_TOLERANCE = 0.01
"""Absolute slack, in epsilon, when comparing two computations of the same composition.

Opacus' PRV accountant reports an upper bound computed to within ``eps_error``
(0.01 by default), and a ledger that holds more runs than the coordinator saw is
composed over a different discretisation grid; 0.01 plus :data:`EPSILON_REL_TOLERANCE`
of the value covers both without letting a site hide a round (one DP-SGD round
adds far more than 1%)."""
EPSILON_REL_TOLERANCE = 0.01


def epsilon_tolerance(epsilon: float) -> float:
    """Slack allowed below a recomputed ``epsilon`` before a reported value is called too low."""
    return EPSILON_ABS_TOLERANCE + EPSILON_REL_TOLERANCE * max(0.0, epsilon)


def compute_epsilon(
    history: Iterable[tuple[float, float, int]], *, delta: float, accountant: str
) -> float:
    """Epsilon of the composition of ``history`` ((sigma, q, steps) runs) at ``delta``.

    ``sigma`` is the noise multiplier (noise std / clipping norm), ``q`` the Poisson
    sampling rate of one patient per step, ``steps`` the DP-SGD steps; the result is
    patient-level epsilon at ``delta`` under ``accountant`` ("prv" or "rdp"). Runs
    with the same (sigma, q) are merged into one run of summed steps first:
    composition is commutative, so this is the same mechanism and keeps the PRV
    accountant fast. Raises ValueError on inputs that are not a DP mechanism.
    """
    merged: dict[tuple[float, float], int] = {}
    for sigma, q, steps in history:
        sigma, q, steps = float(sigma), float(q), int(steps)
        if not (math.isfinite(sigma) and sigma > 0 and 0 < q <= 1 and steps >= 1):
            raise ValueError("each run needs sigma > 0, q in (0, 1] and steps >= 1")
        merged[(sigma, q)] = merged.get((sigma, q), 0) + steps
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {sorted(ACCOUNTANTS)}")
    if not 0 < float(delta) < 1:
        raise ValueError("delta must be in (0, 1)")
    if not merged:
        return 0.0
    return _epsilon(tuple(sorted(merged.items())), float(delta), accountant)


def epsilon_lower_bound(
    history: Iterable[tuple[float, float, int]], *, delta: float, accountant: str, max_groups: int = 6
) -> float:
    """A lower bound on :func:`compute_epsilon` of ``history`` that costs at most ``max_groups`` runs.

    The PRV accountant's cost grows with the number of distinct (sigma, q) runs
    (about a second each), and a site chooses those numbers. Runs are sorted by
    sigma and cut into at most ``max_groups`` contiguous groups; each group is
    replaced by one run with the group's largest sigma, smallest q and summed
    steps. Epsilon decreases in sigma and increases in q, so the result is never
    above the exact composition: a reported epsilon below it is an under-report.
    """
    merged: dict[tuple[float, float], int] = {}
    for sigma, q, steps in history:
        merged[(float(sigma), float(q))] = merged.get((float(sigma), float(q)), 0) + int(steps)
    runs = sorted(merged.items())
    if len(runs) > max_groups >= 1:
        size = -(-len(runs) // max_groups)  # ceil
        coarse = []
        for i in range(0, len(runs), size):
            chunk = runs[i:i + size]
            coarse.append(((max(k[0] for k, _ in chunk), min(k[1] for k, _ in chunk)),
                           sum(n for _, n in chunk)))
        runs = coarse
    return compute_epsilon([(sg, q, n) for (sg, q), n in runs], delta=delta, accountant=accountant)


@lru_cache(maxsize=1024)
def _epsilon(runs: tuple[tuple[tuple[float, float], int], ...], delta: float, accountant: str) -> float:
    from opacus.accountants import PRVAccountant, RDPAccountant  # torch import only when needed

    acc = PRVAccountant() if accountant == "prv" else RDPAccountant()
    acc.history = [(sigma, q, steps) for (sigma, q), steps in runs]
    with warnings.catch_warnings():
        # PRV at q = 1 (an evaluation release: the plain Gaussian mechanism) takes log(1 - q)
        # = log 0 on a branch np.where then discards; the result is exact, the warning noise.
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="opacus")
        return max(0.0, float(acc.get_epsilon(delta=delta)))
