"""The number rules of the wire contract (:mod:`shared.wire`): digits, bounds, buckets.

A number is a covert channel as wide as its free bits: a float64 carries 8 bytes, an
int64 as much. So every number that crosses is rounded or bounded: floats to
:data:`SIG_DIGITS` significant digits (the site rounds, both sides check), ints to
ranges (and, as metrics or privacy numbers, to the same six digits), and counts to
buckets of 10. Pure functions, no Flower types; none of them raises on any input.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

SIG_DIGITS = 6
"""Significant digits of every float on the wire (a full float64 is an 8-byte covert channel)."""
MAX_STEPS = 1_000_000  # DP-SGD steps per round
MAX_PATIENTS_BUCKET = 10_000_000  # training patients, rounded down to a multiple of 10
MAX_METRIC_ABS = 1e9  # no whitelisted metric comes near; bounds the exponent as a channel
MAX_COUNT_BUCKET = 10_000_000  # count.* metrics: multiples of 10 up to this
PRIVACY_REAL_KEYS = frozenset({"epsilon", "epsilon_round", "delta", "noise_multiplier", "sample_rate",
                               "max_grad_norm"})
"""Privacy scalars that are real numbers: six digits and a magnitude in [MIN_PRIVACY_ABS, MAX_PRIVACY_ABS]
(or 0), so the exponent is no free channel either; no honest value comes near the bounds."""
MIN_PRIVACY_ABS = 1e-20
MAX_PRIVACY_ABS = 1e6
MAX_ABS_INT = 2**63  # ints beyond int64 are refused before any float conversion (OverflowError)
_MAX_SIX_DIGIT_INT = 10**15  # six significant digits, and well inside float64's exact ints

# Privacy floats that bound the guarantee are rounded UP: the site never reports
# less epsilon (or delta) than it spent. The others are rounded to nearest.
_ROUND_UP = frozenset({"epsilon", "epsilon_round", "delta"})


def is_int(v: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v: Any) -> bool:
    """A finite float or an int within int64 (not a bool)."""
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return -MAX_ABS_INT <= v <= MAX_ABS_INT  # math.isfinite(10**400) raises OverflowError
    return isinstance(v, float) and math.isfinite(v)


def round_sig(v: float) -> float:
    """``v`` rounded to :data:`SIG_DIGITS` significant digits (non-finite values unchanged)."""
    return float(f"{v:.{SIG_DIGITS}g}") if math.isfinite(v) else v


def round_sig_up(v: float) -> float:
    """The smallest float with :data:`SIG_DIGITS` significant digits that is >= ``v``."""
    r = round_sig(v)
    if not math.isfinite(v) or r >= v:
        return r
    step = 10.0 ** (math.floor(math.log10(abs(r) if r else abs(v))) - (SIG_DIGITS - 1))
    while r < v:
        r = round_sig(r + step)
    return r


def six_digits(v: Any) -> bool:
    """A finite number with at most six significant digits (ints too: an int is no freer channel)."""
    if not is_num(v):
        return False
    if isinstance(v, int):
        return abs(v) <= _MAX_SIX_DIGIT_INT and int(round_sig(float(v))) == v
    return round_sig(v) == v


def is_count_bucket(v: Any) -> bool:
    """A count as the wire carries it: a whole number, a multiple of 10, in [0, MAX_COUNT_BUCKET]."""
    return is_num(v) and float(v).is_integer() and 0 <= v <= MAX_COUNT_BUCKET and int(v) % 10 == 0


def count_bucket(v: Any) -> Any:
    """A raw count floored to its bucket (a multiple of 10); anything else unchanged, for the check."""
    return int(v // 10 * 10) if is_num(v) and v >= 0 else v


def round_privacy(privacy: Mapping[str, float | int | str | bool]) -> dict[str, float | int | str | bool]:
    """Privacy scalars as they go on the wire: floats to :data:`SIG_DIGITS` significant digits.

    epsilon, epsilon_round and delta round up (conservative: never below what the
    ledger spent); the other floats round to nearest. Rounding is monotone, so
    ``epsilon_round <= epsilon`` survives it. Ints, strings and bools are unchanged.
    """
    out: dict[str, float | int | str | bool] = {}
    for k, v in privacy.items():
        if isinstance(v, float):
            v = round_sig_up(v) if k in _ROUND_UP else round_sig(v)
        out[k] = v
    return out
