"""The privacy-budget commands of ``fedsynth-site``: ``budget`` and ``ledger recover`` / ``rotate-key``.

``budget`` recomputes ε from the whole ledger (the unit of privacy is the patient) and
shows what is left under the site's ceiling; ``ledger`` rebuilds a damaged ledger from
the signed audit log's anchors (ε is never lowered) or re-keys it. :mod:`client.cli`
registers them on the ``fedsynth-site`` app.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from client.cli_options import NotesOpt, OutOpt, cli_settings, console
from shared.cli_errors import expected_errors


@expected_errors
def budget(
    output_dir: OutOpt = None,
    notes: NotesOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show ε spent (recomputed from the whole ledger) and what is left under the ceiling."""
    from client.site import load_site_data, open_ledger, site_delta

    settings = cli_settings(notes_path=notes, output_dir=output_dir)
    ledger = open_ledger(settings)
    delta = settings.delta
    if delta is None:
        delta = site_delta(settings, load_site_data(settings).train_patients)
    entries = [e for e in ledger.entries() if e.kind == "reserve"]
    accountant = entries[-1].accountant if entries else "prv"
    eps = ledger.epsilon(delta=delta, accountant=accountant)
    out = {
        "epsilon_spent": eps,
        "epsilon_ceiling": settings.epsilon_ceiling,
        "epsilon_remaining": max(0.0, settings.epsilon_ceiling - eps),
        "delta": delta,
        "rounds": len(entries),
        "accountant": accountant,
        "ledger_seq": ledger.head()[0],  # compare with the coordinator's record of this site
        "ledger_head": ledger.head()[1],
    }
    if as_json:
        console.print_json(json.dumps(out))
        return
    table = Table(title=f"privacy budget of {settings.site_id} (unit: patient)")
    for key in out:
        table.add_column(key)
    table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in out.values()))
    console.print(table)


ledger_app = typer.Typer(
    help="The privacy ledger: rebuild it from the signed audit log, rotate its key.",
    no_args_is_help=True,
)


@ledger_app.command("recover")
@expected_errors
def ledger_recover(output_dir: OutOpt = None) -> None:
    """Rebuild a missing, cut or damaged ledger from the audit log's anchors (ε never lowered; audited)."""
    from client.dp.ledger_recovery import recover_ledger

    r = recover_ledger(cli_settings(output_dir=output_dir))
    eps = f"ε {r.epsilon:.4f} (δ={r.delta:g}, {r.accountant})" if r.delta is not None else "ε 0"
    console.print(f"ledger {r.path}: {r.records} records ({r.from_anchors} from the audit log), {eps}")
    console.print(f"old file kept as {r.previous}" if r.previous else "there was no old ledger file")


@ledger_app.command("rotate-key")
@expected_errors
def ledger_rotate_key(output_dir: OutOpt = None) -> None:
    """Re-authenticate every ledger record under a fresh ledger key (anchors unchanged; audited)."""
    from client.dp.ledger_recovery import rotate_key

    old, new = rotate_key(cli_settings(output_dir=output_dir))
    console.print(f"ledger key rotated: {old} -> {new}; back up the new key now")
