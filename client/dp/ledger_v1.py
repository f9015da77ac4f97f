"""Format-1 privacy ledgers (a plain sha256 per line, no MAC): read once, then migrated.

:func:`migrate_v1` runs when :class:`client.dp.ledger.Ledger` opens a format-1
file: every verified record is rewritten authenticated (format 2, hash chain and
MAC, :mod:`client.dp.ledger_records`) with the same sigma, q and steps, so the
epsilon recomputed from the ledger is unchanged; the old file is kept as
``<ledger>.pre-mac`` and every rewritten record is anchored (``cause:
migration``). The torn-tail rule of format 2 applies: only a last line that is
unterminated or not JSON is set aside; any other bad line raises.
"""

from __future__ import annotations

import hashlib
import json
from typing import IO, Any

from client.dp.ledger_records import (
    GENESIS,
    NOT_JSON,
    V1_LINE_KEYS,
    LedgerEntry,
    entry_from,
    entry_record,
    record_hash,
    record_line,
    record_problems,
    stamp,
)
from shared.atomic import PRIVATE, write_atomic, write_new


def _v1_checksum(record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class V1Reader:
    """Reads a format-1 ledger (plain sha256 per line) for migration, with the same torn-tail rule."""

    def __init__(self, ledger: Any) -> None:
        self.ledger = ledger

    def _parse(self, raw: bytes, expected_seq: int) -> LedgerEntry | str:
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return NOT_JSON
        if not isinstance(rec, dict) or set(rec) != V1_LINE_KEYS:
            return "not a format-1 ledger record (unexpected fields)"
        if rec["sha256"] != _v1_checksum(rec):
            return "checksum mismatch"
        rec = {**rec, "noise_source": "unspecified", "prev": GENESIS, "hash": ""}
        rec["hash"] = record_hash(rec)  # placeholder chain: only the values are checked here
        bad = record_problems(rec, site_id=self.ledger.site_id, seq=expected_seq, prev=GENESIS)
        return "; ".join(bad) if bad else entry_from(rec)

    def read(self, fh: IO[bytes]) -> list[LedgerEntry]:
        fh.seek(0)
        data = fh.read()
        lines = data.split(b"\n")
        tail_open = lines[-1] != b""
        if not tail_open:
            lines.pop()
        entries: list[LedgerEntry] = []
        offset = 0
        for i, raw in enumerate(lines):
            number, last = i + 1, i == len(lines) - 1
            parsed = self._parse(raw, len(entries) + 1)
            if isinstance(parsed, LedgerEntry):
                entries.append(parsed)
            elif last and (tail_open or parsed == NOT_JSON):
                self.ledger._move_aside(fh, offset, data[offset:])
            else:
                raise self.ledger._fail(number, f"format-1 record: {parsed}")
            offset += len(raw) + 1
        return entries


def migrate_v1(ledger: Any, fh: IO[bytes]) -> str | None:
    """Rewrite ``ledger``'s format-1 file (open as ``fh``, locked) authenticated, with the same
    sigma, q and steps (epsilon unchanged); the backup's name, or None if it is not format 1."""
    fh.seek(0)
    first = fh.read().split(b"\n", 1)[0]
    try:
        head = json.loads(first)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(head, dict) or set(head) != V1_LINE_KEYS:
        return None
    if not ledger._migrate:
        raise ledger._fail(1, f"a format-1 record (plain checksum, no MAC), but {ledger._anchored_where} "
                         "already anchors authenticated records: an old copy or a forgery, not "
                         "migrated")
    old = V1Reader(ledger).read(fh)
    fh.seek(0)
    backup = ledger.path.with_name(f"{ledger.path.name}.pre-mac")
    if backup.exists():
        backup = ledger.path.with_name(f"{ledger.path.name}.pre-mac-{stamp()}")
    write_new(backup, fh.read())
    records, prev = [], GENESIS
    for entry in old:
        rec = {**entry_record(entry, site_id=ledger.site_id, prev=prev)}
        rec["hash"] = record_hash(rec)
        records.append(rec)
        prev = rec["hash"]
    write_atomic(ledger.path, b"".join(record_line(r, ledger._key) for r in records), mode=PRIVATE)
    for rec in records:
        ledger._emit("ledger_anchor", {**rec, "cause": "migration"})
    return backup.name
