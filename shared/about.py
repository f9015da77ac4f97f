"""What ``--version`` prints for the three command lines (fedsynth-site, -coordinator, -verify).

The version is the installed ``fedsynth`` distribution's (``pyproject.toml``);
a source tree that was never installed says so instead of guessing. Flower's
version is printed beside it because sites and coordinator must run the same
Flower release (the deployment pins it).
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

DIST = "fedsynth"


def package_version() -> str:
    """The installed fedsynth version, or ``"unknown (not installed)"``."""
    try:
        return metadata.version(DIST)
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def version_line(program: str) -> str:
    """``<program> <version> (flwr <version>)``: one line, for ``--version``."""
    try:
        flwr = metadata.version("flwr")
    except metadata.PackageNotFoundError:
        flwr = "not installed"
    return f"{program} {package_version()} (flwr {flwr})"


def version_option(program: str) -> Any:
    """A typer ``--version`` option (eager) that prints :func:`version_line` and exits 0."""
    import typer

    def show(value: bool) -> None:
        if value:
            print(version_line(program))
            raise typer.Exit(0)

    return typer.Option("--version", callback=show, is_eager=True, help="Print the version and exit.")
