"""How the three command lines end on an expected error: one clear line, the error's exit code.

Expected errors are the :class:`shared.errors.FedsynthError` family (bad notes, a refused
budget, a bad setting, a failed run ...): each carries its exit code (docs/hospital-it.md),
and the user gets its message on stderr without a traceback. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console

from shared.errors import FedsynthError

F = TypeVar("F", bound=Callable[..., Any])


def expected_errors(fn: F) -> F:
    """Wrap a typer command: a FedsynthError prints ``error: <message>`` to stderr and exits with its code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FedsynthError as exc:
            Console(stderr=True).print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
            raise typer.Exit(exc.exit_code) from None

    return wrapper  # type: ignore[return-value]
