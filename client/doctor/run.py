"""``fedsynth-site doctor``: check a site's prerequisites before its first round.

Each check returns a :class:`client.doctor.checks.Check` saying what was found
and, when something is wrong, the one thing to do about it. The checks
themselves live by what they look at: :mod:`client.doctor.site` (GPU, model, notes, privacy ledger, disk),
:mod:`client.doctor.federation` (root CA, SuperNode key, signing key, SecAgg
policy, coordinator TLS) and :mod:`client.doctor.deploy` (the launcher's pin, the
site id against the signing key). This module runs them in order and prints the report.
Nothing here trains, loads weights or sends site data.

A check is ``ok`` or failed; an ``ok`` check may carry ``warning=True`` when
the site can run but an operator should look (a CPU-only host, unsigned
reports, notes readable by other accounts, plain train rounds allowed).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from client.doctor.checks import Check, fail_check
from client.doctor.deploy import check_pin, check_site_identity
from client.doctor.federation import (
    check_auth_key,
    check_coordinator,
    check_root_cert,
    check_secagg,
    check_signing_key,
)
from client.doctor.site import check_disk, check_gpu, check_ledger, check_model, check_notes
from shared.errors import FedsynthError
from shared.settings import SiteSettings


def _opt(flag: str, envvar: str | None, help_text: str) -> Any:
    return typer.Option(flag, envvar=envvar, help=help_text)


def run_doctor(
    settings: SiteSettings,
    *,
    coordinator: str | None,
    root_cert: Path | None,
    auth_key: Path | None,
    min_free_gb: float = 5.0,
    timeout: float = 5.0,
    pin: Path | None = None,
    install_dir: Path | None = None,
    deploy_site_id: str | None = None,
    configured_site_id: str | None = None,
) -> list[Check]:
    """Every check, in the order an operator fixes them. ``timeout`` (s) bounds the TLS check."""
    return [
        check_gpu(settings),
        check_model(settings),
        check_notes(settings),
        check_root_cert(root_cert),
        check_auth_key(auth_key),
        check_signing_key(settings),
        check_site_identity(settings, deploy_site_id, configured_site_id),
        check_pin(pin, install_dir),
        check_secagg(settings),
        check_coordinator(coordinator, root_cert, timeout=timeout),
        check_ledger(settings),
        check_disk(settings, min_free_gb=min_free_gb),
    ]


def doctor_command(
    coordinator: Annotated[str | None, _opt("--coordinator", "FEDSYNTH_SUPERLINK",
                                            "Fleet API HOST:PORT of the coordinator.")] = None,
    root_cert: Annotated[Path | None, _opt("--root-cert", "FEDSYNTH_CA_CERT",
                                           "The consortium ca.crt.")] = None,
    auth_key: Annotated[Path | None, _opt("--auth-key", "FEDSYNTH_DEPLOY_KEY",
                                          "This site's SuperNode private key.")] = None,
    data_dir: Annotated[Path | None, _opt("--data-dir", "FEDSYNTH_DATA_DIR",
                                          "The SuperNode's data-dir (notes.jsonl, output/).")] = None,
    site_id: Annotated[str | None, _opt("--site-id", "FEDSYNTH_DEPLOY_SITE_ID",
                                        "The SuperNode's site-id.")] = None,
    min_free_gb: Annotated[float, _opt("--min-free-gb", None, "Free disk needed (GB).")] = 5.0,
    timeout: Annotated[float, _opt("--timeout", None, "Seconds for the TLS check.")] = 5.0,
    pin: Annotated[Path | None, _opt("--pin", "FEDSYNTH_PIN", "The launcher's pin file.")] = None,
    install_dir: Annotated[Path | None, _opt("--install-dir", "FEDSYNTH_INSTALL_DIR",
                                             "The installed, pinned release.")] = None,
) -> None:
    """Check this site's prerequisites (GPU, model, notes, keys, SecAgg policy, coordinator, ledger, disk).

    Settings are those the ClientApp will see: ``FEDSYNTH_SITE_*`` plus the
    node config deploy/site.sh passes (``data-dir``, ``site-id``). Exits 1 when
    any check failed.
    """
    from rich.console import Console
    from rich.table import Table

    from client.node_config import site_settings

    node_config = {k: str(v) for k, v in (("data-dir", data_dir), ("site-id", site_id)) if v}
    console = Console()
    try:
        settings = site_settings(node_config)
    except FedsynthError as exc:
        checks = [fail_check("settings", str(exc), "fix the listed FEDSYNTH_SITE_* values")]
    else:
        checks = [Check("settings", True, f"site {settings.site_id}, device {settings.device}")]
        configured = os.environ.get("FEDSYNTH_SITE_SITE_ID")
        checks += run_doctor(settings, coordinator=coordinator, root_cert=root_cert,
                             auth_key=auth_key, min_free_gb=min_free_gb, timeout=timeout,
                             pin=pin, install_dir=install_dir, deploy_site_id=site_id,
                             configured_site_id=configured)
    table = Table(title="fedsynth site doctor", show_lines=True)
    for column in ("check", "status", "detail", "fix"):
        table.add_column(column, overflow="fold")
    for c in checks:
        status = "[red]FAIL[/]" if not c.ok else "[yellow]WARN[/]" if c.warning else "[green]OK[/]"
        table.add_row(c.name, status, c.detail, c.fix if (c.warning or not c.ok) else "")
    console.print(table)
    failed = [c.name for c in checks if not c.ok]
    if failed:
        console.print(f"[red]{len(failed)} check(s) failed:[/] {', '.join(failed)}")
        raise typer.Exit(1)
    console.print("[green]all checks passed[/]")
