"""The privacy ledger's anchors outside its own file, and the start-up check that all agree.

A ledger that only checks itself can be lowered by removing it: deleting or
emptying it, pointing ``ledger_path`` at a new file, cutting lines off its end
or restoring an older copy all leave a file that verifies. So the ledger's
position — (seq, head), head = the hash of record ``seq`` — is written to places
the ledger cannot rewrite:

- the site's signed, hash-chained audit log (``<output_dir>/audit.jsonl``): one
  ``ledger_anchor`` entry per record, carrying the whole record, written before
  :meth:`~client.dp.ledger.Ledger.reserve` returns (so before training starts);
- every signed privacy report (``privacy.ledger_seq``/``ledger_head``);
- every update sent to the coordinator (the privacy scalars ``ledger_seq``/
  ``ledger_head``), which records them per site key outside the site.

:func:`open_site_ledger` (what every round uses) refuses to hand out a ledger
that disagrees with any local anchor: missing, emptied, truncated, forked
(rewritten) or re-keyed ledgers all raise :class:`LedgerError` naming the anchor
that disagrees and the way back (``fedsynth-site ledger recover``,
:mod:`client.dp.ledger_recovery`). What local anchors cannot stop — an operator who
deletes or restores *all* of the site's state at once (ledger, audit log,
reports) — is what the coordinator's per-site anchor is for (docs/privacy-model.md).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.dp.ledger import Ledger
from shared.audit import AuditLog, verify_log
from shared.errors import ConfigError, FedsynthError, LedgerError, Problem
from shared.settings import SiteSettings

SITE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # as SiteSettings.site_id

log = logging.getLogger("fedsynth.site")

ANCHOR_KIND = "ledger_anchor"
# Audit kinds whose data name a ledger position (seq, head) the ledger must still contain.
POSITION_KINDS = ("ledger_anchor", "ledger_migrated", "ledger_recovered", "ledger_rekeyed")
RECOVER_HINT = ("run `fedsynth-site ledger recover` to rebuild the ledger from the signed audit log "
                "(epsilon is never lowered), or restore the newest backup of the ledger and its key")


@dataclass(frozen=True)
class Anchor:
    """A ledger position recorded outside the ledger. ``where`` names it for people;
    ``record`` is the whole ledger record (``ledger_anchor`` audit entries only)."""

    seq: int
    head: str
    where: str
    record: Mapping[str, Any] | None = None


def ledger_files(settings: SiteSettings) -> tuple[Path, Path]:
    """(ledger, ledger key) of a site: the settings, else ``<output_dir>/{privacy-ledger.jsonl,ledger.key}``."""
    out = Path(settings.output_dir)
    return (Path(settings.ledger_path or out / "privacy-ledger.jsonl"),
            Path(settings.ledger_key or out / "ledger.key"))


def _check_actor(path: Path, actor: str) -> None:
    """A ConfigError (not "corrupt, restore from backup") when the log was written by another site id.

    The usual cause is a command run without the site's ``FEDSYNTH_SITE_SITE_ID``
    (default ``site``): the log is fine, the settings are not. Only the first
    entry is read; its actor is a site id the site itself wrote.
    """
    try:
        with path.open("rb") as fh:
            first = json.loads(fh.readline(64 * 1024) or b"{}")
    except (OSError, ValueError):
        return  # unreadable: verify_log reports it
    written_by = first.get("actor") if isinstance(first, dict) else None
    if isinstance(written_by, str) and written_by != actor and SITE_ID.fullmatch(written_by):
        raise ConfigError(
            f"the site's audit log {path} was written by site id {written_by!r}, but this command "
            f"runs as {actor!r}: set FEDSYNTH_SITE_SITE_ID={written_by} (the site's .env or unit file); "
            "the ledger and audit log are not damaged",
            [Problem(str(path), "site id differs from the settings", 1)],
        )


def audit_anchors(audit: AuditLog) -> list[Anchor]:
    """Every ledger position in the site's audit log, oldest first, after verifying its chain
    (and, with a signing key, the site's signatures). LedgerError when it does not verify."""
    path = audit.path
    if not path.exists() or path.stat().st_size == 0:
        return []
    _check_actor(path, audit.actor)
    keys = {audit.actor: audit.key.public_key()} if audit.key is not None else {}
    try:
        verify_log(path, keys, allow_unsigned=True)
    except FedsynthError as exc:
        raise LedgerError(
            f"the site's audit log {path} does not verify, so the privacy ledger cannot be checked "
            f"against it: {exc.message}; run fedsynth-verify on it and restore it from backup",
            list(getattr(exc, "problems", [])),
        ) from None
    out = []
    for line in path.read_bytes().splitlines():
        entry = json.loads(line)
        data = entry.get("data") or {}
        if entry.get("kind") not in POSITION_KINDS:
            continue
        seq, head = data.get("seq"), data.get("hash") if entry["kind"] == ANCHOR_KIND else data.get("head")
        if isinstance(seq, int) and not isinstance(seq, bool) and isinstance(head, str):
            out.append(Anchor(seq, head, f"{path.name} entry {entry['seq']} ({entry['kind']})",
                              data if entry["kind"] == ANCHOR_KIND else None))
    return out


def report_anchors(output_dir: Path) -> list[Anchor]:
    """Ledger positions named by the site's privacy reports (reports without them are older)."""
    out = []
    for path in sorted((Path(output_dir) / "privacy-reports").glob("report-round-*.json")):
        try:
            privacy = json.loads(path.read_text(encoding="utf-8")).get("privacy") or {}
        except (OSError, ValueError, AttributeError):
            log.warning("ledger check: skipping unreadable privacy report %s", path)
            continue
        seq, head = privacy.get("ledger_seq"), privacy.get("ledger_head")
        if isinstance(seq, int) and not isinstance(seq, bool) and isinstance(head, str):
            out.append(Anchor(seq, head, f"privacy-reports/{path.name}"))
    return out


def disagreements(records: list[Mapping[str, Any]], anchors: list[Anchor]) -> list[Problem]:
    """Every anchor the ledger ``records`` do not contain (empty when all agree)."""
    problems = []
    for a in anchors:
        if a.seq == 0:
            continue
        if a.seq > len(records):
            problems.append(Problem(a.where, f"anchors ledger record {a.seq} (head {a.head[:16]}…) but the "
                                    f"ledger holds {len(records)} records: it was deleted, emptied, cut "
                                    "short, replaced (ledger_path changed?) or restored from an older copy"))
        elif records[a.seq - 1]["hash"] != a.head:
            problems.append(Problem(a.where, f"anchors ledger record {a.seq} with head {a.head[:16]}… but the "
                                    f"ledger's record {a.seq} has head {records[a.seq - 1]['hash'][:16]}…: "
                                    "the ledger was rewritten (a fork)"))
    return problems


def raise_disagreement(path: Path, records: list[Mapping[str, Any]], problems: list[Problem]) -> None:
    """One LedgerError for ``problems`` (the first five listed, the rest counted)."""
    shown = problems[:5]
    more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
    raise LedgerError(
        f"privacy ledger {path} ({len(records)} records) disagrees with the site's signed record: "
        + "; ".join(f"{p.where}: {p.reason}" for p in shown) + more
        + f". Training is refused until they agree: {RECOVER_HINT}",
        problems,
    )


class _Sink:
    """The ledger's audit sink: appends to the audit log, remembers the highest anchored seq."""

    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit
        self.anchored = 0

    def __call__(self, kind: str, data: Mapping[str, Any]) -> None:
        self.audit.append(kind, data)
        if kind == ANCHOR_KIND:
            self.anchored = max(self.anchored, int(data["seq"]))


def open_site_ledger(settings: SiteSettings, audit: AuditLog) -> Ledger:
    """The site's ledger, checked against its audit-log and report anchors; LedgerError if not.

    Records the audit log has not anchored yet (a crash between the ledger's fsync and its
    anchor) are anchored now, so the audit log always ends up holding every record.
    """
    path, key = ledger_files(settings)
    from_audit = audit_anchors(audit)
    anchors = [*from_audit, *report_anchors(settings.output_dir)]
    top = max(anchors, key=lambda a: a.seq, default=None)
    if top is not None and top.seq > 0 and not path.exists():
        raise LedgerError(
            f"privacy ledger {path} is missing, but {top.where} anchors its record {top.seq} "
            f"(head {top.head[:16]}…): the ledger was deleted or ledger_path points at a new file. "
            f"Training is refused: {RECOVER_HINT}",
            [Problem(str(path), "missing"), Problem(top.where, f"anchors record {top.seq}")],
        )
    sink = _Sink(audit)
    ledger = Ledger(path, site_id=settings.site_id, key_path=key, audit=sink,
                    anchored_seq=top.seq if top is not None else 0,
                    anchored_where=top.where if top is not None else "the audit log",
                    migrate=top is None)
    records = ledger.records()
    problems = disagreements(records, anchors)
    if problems:
        raise_disagreement(path, records, problems)
    done = max([sink.anchored, *(a.seq for a in from_audit if a.record is not None)], default=0)
    for rec in records[done:]:
        sink(ANCHOR_KIND, {**rec, "cause": "catch-up"})
    return ledger
