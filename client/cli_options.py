"""What the ``fedsynth-site`` commands share: the consoles, the progress bar, the site's
settings with the command line's overrides, and the options several commands take.

Reports and tables go to stdout (:data:`console`); progress and warnings to stderr
(:data:`err_console`), so ``--json`` output stays machine-readable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from shared.settings import SiteSettings, load_settings

console = Console()
err_console = Console(stderr=True)

NotesOpt = Annotated[Path | None, typer.Option("--notes", help="Notes file (JSONL or CSV).")]
OutOpt = Annotated[Path | None, typer.Option("--output-dir", help="Site output directory.")]
ModelOpt = Annotated[
    Path | None, typer.Option("--model-dir", help="Local HF model directory (default: embedded).")
]


def progress_bar() -> Progress:
    """A progress bar on stderr: description, done/total, a free ``info`` field, elapsed and left."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
    )


def cli_settings(**overrides: Any) -> SiteSettings:
    """The site's settings (``FEDSYNTH_SITE_*``, ``.env``, secrets directory), options given win.

    An override left ``None`` (an option not given) keeps the setting's value.
    """
    return load_settings(SiteSettings, **overrides)
