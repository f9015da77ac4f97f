"""The metric summary: the only form in which evaluation results may leave a site.

Every metric module produces :class:`Cell` values (a scalar plus the number of
reports/notes it aggregates). :func:`build_summary` turns them into the flat
``{name: float}`` mapping that goes on the wire, and enforces:

- names: only those in :data:`shared.whitelist.METRIC_NAMES` (``dp.*`` Gaussian-mechanism
  releases and synthetic-only metrics; see :mod:`client.evaluate.dp_metrics`);
- values: finite scalars only (no arrays, strings, NaN/inf, booleans);
- small cells: a value aggregating fewer than ``k_min`` items is left out
  (suppressed). For ``dp.*`` cells ``n`` is the noisy number of private
  patients behind the value (so k counts patients, and the suppression is
  post-processing of DP output); for synthetic-only cells it counts reports;
- counts (``count.reports``): rounded down to a multiple of 10;
- precision: values are rounded to ``digits`` significant digits, which bounds
  what repeated runs on nearly the same notes can reveal by differencing.

Per-report values never enter: a :class:`Cell` holds one float.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from shared.errors import ConfigError, Problem, WireError
from shared.whitelist import METRIC_NAMES

COUNT_NAMES = frozenset({"count.reports", "count.notes"})
COUNT_BUCKET = 10


@dataclass(frozen=True)
class Cell:
    """One aggregate metric value; ``n`` is the number of reports/notes it aggregates."""

    value: float
    n: int


def _is_scalar_number(value: object) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return False
    return isinstance(value, (numbers.Real, np.floating, np.integer)) and not isinstance(value, np.ndarray)


def _check(cells: Mapping[str, Cell]) -> list[Problem]:
    problems: list[Problem] = []
    for name, cell in cells.items():
        where = f"metrics[{name!r}]" if isinstance(name, str) else "metrics"
        if not isinstance(name, str) or name not in METRIC_NAMES:
            problems.append(Problem(where, f"metric name {name!r} is not in the wire whitelist"))
            continue
        if not isinstance(cell, Cell):
            problems.append(Problem(where, f"expected a Cell, got {type(cell).__name__}"))
            continue
        if not _is_scalar_number(cell.value):
            problems.append(Problem(where, f"value must be one real number, got {type(cell.value).__name__}"))
        elif not math.isfinite(float(cell.value)):
            problems.append(Problem(where, f"value must be finite, got {float(cell.value)!r}"))
        elif name in COUNT_NAMES and (float(cell.value) < 0 or float(cell.value) != int(cell.value)):
            problems.append(Problem(where, f"a count must be a non-negative integer, got {cell.value!r}"))
        if isinstance(cell.n, (bool, np.bool_)) or not isinstance(cell.n, (int, np.integer)) or cell.n < 0:
            problems.append(Problem(where, f"n must be a non-negative integer, got {cell.n!r}"))
    return problems


def _check_k_min(k_min: int) -> None:
    if isinstance(k_min, bool) or not isinstance(k_min, int) or k_min < 1:
        raise ConfigError(f"k_min must be a positive integer, got {k_min!r}")


def _round_significant(value: float, digits: int) -> float:
    if value == 0.0:
        return 0.0
    return float(f"{value:.{digits}g}")


def build_summary(cells: Mapping[str, Cell], *, k_min: int = 10, digits: int = 4) -> dict[str, float]:
    """The wire-ready summary: whitelisted names, finite floats, small cells left out, counts bucketed.

    ``k_min`` is the smallest number of reports/notes a value may aggregate
    (privacy knob; default 10). ``digits`` is the number of significant digits
    kept. Raises :class:`WireError` listing every unknown name, non-scalar or
    non-finite value and bad ``n`` — nothing is dropped silently except cells
    with ``n < k_min``; :func:`suppressed_names` lists those for the local report.
    """
    _check_k_min(k_min)
    if isinstance(digits, bool) or not isinstance(digits, int) or not 1 <= digits <= 17:
        raise ConfigError(f"digits must be an integer in 1..17, got {digits!r}")
    if not isinstance(cells, Mapping):
        raise WireError(f"metrics must be a mapping of name to Cell, got {type(cells).__name__}")
    problems = _check(cells)
    if problems:
        raise WireError(f"metric summary refused ({len(problems)} problems)", problems)
    out: dict[str, float] = {}
    for name in sorted(cells):
        cell = cells[name]
        if cell.n < k_min:
            continue
        value = float(cell.value)
        if name in COUNT_NAMES:
            out[name] = float(int(value) // COUNT_BUCKET * COUNT_BUCKET)
        else:
            out[name] = _round_significant(value, digits)
    return out


def suppressed_names(cells: Mapping[str, Cell], *, k_min: int = 10) -> list[str]:
    """Names of the cells :func:`build_summary` leaves out for aggregating fewer than ``k_min`` items.

    For the site's local report; the names are fixed whitelist strings, so the
    list says only which metrics were too small to release.
    """
    _check_k_min(k_min)
    return sorted(
        name for name, cell in cells.items()
        if isinstance(cell, Cell) and isinstance(cell.n, (int, np.integer)) and cell.n < k_min
    )
