"""The small error hierarchy every fedsynth module raises from.

Expected errors (bad input, a refused budget, a failed verification) are
subclasses of :class:`FedsynthError`. The CLIs catch that base class, print the
message without a traceback and exit with the class's ``exit_code``; anything
else is a bug and keeps its traceback.

Validation collects every problem first and raises once, so an error carries a
list of :class:`Problem` (where + why) rather than only the first one found.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an input: where it is and why it is wrong.

    ``where`` is a file path (or a setting / field name), ``line`` is 1-based
    when the input is line-oriented and ``None`` otherwise.
    """

    where: str
    reason: str
    line: int | None = None

    def __str__(self) -> str:
        loc = f"{self.where}:{self.line}" if self.line is not None else self.where
        return f"{loc}: {self.reason}"


class FedsynthError(Exception):
    """Base of every expected fedsynth error. ``exit_code`` is what a CLI exits with."""

    exit_code = 1

    def __init__(self, message: str, problems: Iterable[Problem] = ()) -> None:
        self.problems: list[Problem] = list(problems)
        self.message = message
        super().__init__(self._render())

    def _render(self) -> str:
        if not self.problems:
            return self.message
        lines = [self.message] + [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


class ConfigError(FedsynthError):
    """A setting, run-config value or command-line option is invalid."""

    exit_code = 2


class InputError(FedsynthError):
    """An input file (notes, adapter, report, key) is malformed; problems name file and line."""

    exit_code = 3


class UnknownCodeError(InputError):
    """A string is not a WHO ICD-10 code."""


class ModelError(FedsynthError):
    """A model directory is missing, incomplete or of an unsupported family."""

    exit_code = 4


class PrivacyError(FedsynthError):
    """A privacy precondition does not hold (e.g. delta > 1/n_patients, too few patients)."""

    exit_code = 5


class BudgetExceededError(PrivacyError):
    """Training would take the site's cumulative epsilon past its ceiling; nothing was trained."""

    exit_code = 6

    def __init__(self, message: str, *, projected_epsilon: float, ceiling: float) -> None:
        self.projected_epsilon = projected_epsilon
        self.ceiling = ceiling
        super().__init__(message)


class EvaluationBudgetError(PrivacyError):
    """This run has used the site's evaluations (``max_evaluations_per_run``); nothing was evaluated."""

    exit_code = 6


class LedgerError(FedsynthError):
    """The privacy ledger cannot be read or written safely (corruption, permissions)."""

    exit_code = 7


class TrainingError(FedsynthError):
    """Training ran but its result cannot be trusted (e.g. LoRA weights did not move)."""

    exit_code = 8


class WireError(FedsynthError):
    """A message refused by the wire contract: something not allowed to leave (or enter) a site."""

    exit_code = 9


class VerificationError(FedsynthError):
    """A signature, hash chain or report failed offline verification."""

    exit_code = 10


class RunFailedError(FedsynthError):
    """A federated run ended without any site's update reaching the global adapter."""

    exit_code = 11
