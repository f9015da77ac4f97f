"""Operator commands on the privacy ledger: rebuild it from the signed record, rotate its key.

``fedsynth-site ledger recover`` (:func:`recover_ledger`): every ledger record
was written, whole, into the site's signed audit log as a ``ledger_anchor``
entry before the call that wrote it returned. Recovery replays those records:
each must hash to its anchored head and chain onto the one before, so the
rebuilt ledger is the original one record for record (same hashes, so every
report and coordinator anchor still matches) and its epsilon is exactly the
anchored epsilon — never lower. Records the old file holds beyond the last
anchor are kept when they verify (MAC and chain). Recovery refuses, changing
nothing, when the audit log lacks a record's anchor or is behind a signed
report (then the local signed record is incomplete: restore the newest backups;
the coordinator's per-site anchor still holds the site's cumulative epsilon).
The old file is kept as ``<ledger>.replaced-<time>`` and the recovery is audited
(``ledger_recovered``).

``fedsynth-site ledger rotate-key`` (:func:`rotate_key`): re-authenticate every
record under a fresh ledger key. Hashes (and so every anchor) are unchanged; the
old key is kept as ``<key>.retired-<time>``; audited as ``ledger_rekeyed``. An
interrupted rotation leaves records and key disagreeing; ``recover`` repairs it.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.dp.ledger import GENESIS, RECORD_KEYS, compute_epsilon
from client.dp.ledger_anchor import (
    ANCHOR_KIND,
    audit_anchors,
    disagreements,
    ledger_files,
    open_site_ledger,
    report_anchors,
)
from client.dp.ledger_key import key_id, mac_ok, read_key, write_new_key
from client.dp.ledger_records import entry_record, record_line, record_problems, stamp
from shared.atomic import PRIVATE, write_atomic
from shared.audit import AuditLog
from shared.errors import LedgerError, Problem
from shared.settings import SiteSettings
from shared.signing import load_private_key


@dataclass(frozen=True)
class Recovered:
    """What :func:`recover_ledger` wrote. ``epsilon`` at ``delta`` with ``accountant`` (those of
    the last reservation); ``previous`` is where the old file went (None: there was none)."""

    path: Path
    records: int
    from_anchors: int
    epsilon: float
    delta: float | None
    accountant: str | None
    previous: Path | None


def site_audit_log(settings: SiteSettings) -> AuditLog:
    """The site's audit log (as :func:`client.site.audit_log`, without importing torch)."""
    key = load_private_key(settings.signing_key) if settings.signing_key else None
    return AuditLog(Path(settings.output_dir) / "audit.jsonl", key=key, actor=settings.site_id)


def _refuse(reason: str, problems: list[Problem]) -> LedgerError:
    return LedgerError(f"ledger recovery refused, nothing changed: {reason}", problems)


def anchored_records(settings: SiteSettings, audit: AuditLog) -> list[dict[str, Any]]:
    """The ledger records 1..n replayed from the audit log's anchors, verified as a chain."""
    by_seq: dict[int, Mapping[str, Any]] = {}
    problems = []
    for a in audit_anchors(audit):
        if a.record is None:
            continue
        if a.seq in by_seq and by_seq[a.seq]["hash"] != a.head:
            problems.append(Problem(a.where, f"anchors a second, different record {a.seq}"))
        by_seq.setdefault(a.seq, a.record)
    n = max(by_seq, default=0)
    missing = [s for s in range(1, n + 1) if s not in by_seq]
    if missing:
        problems.append(Problem(str(audit.path), f"no anchor for ledger records {missing[:10]}"
                                f"{' ...' if len(missing) > 10 else ''}"))
    records, prev = [], GENESIS
    for s in range(1, n + 1):
        if s not in by_seq:
            break
        rec = {k: by_seq[s][k] for k in (*RECORD_KEYS, "hash") if k in by_seq[s]}
        bad = record_problems(rec, site_id=settings.site_id, seq=s, prev=prev)
        if bad:
            problems.append(Problem(f"{audit.path.name} anchor of record {s}", "; ".join(bad)))
            break
        records.append(rec)
        prev = rec["hash"]
    if problems:
        raise _refuse("the audit log does not hold every ledger record", problems)
    return records


def _verified_tail(path: Path, key: bytes | None, records: list[dict[str, Any]], site_id: str) -> list[dict]:
    """Records of the old file that continue the rebuilt chain and verify under ``key``."""
    if key is None or not path.exists():
        return []
    tail: list[dict] = []
    prev = records[-1]["hash"] if records else GENESIS
    for raw in path.read_bytes().split(b"\n"):
        try:
            rec = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("seq"), int):
            continue
        if rec["seq"] != len(records) + len(tail) + 1:
            continue
        if record_problems(rec, site_id=site_id, seq=rec["seq"], prev=prev) or \
                not isinstance(rec.get("mac"), str) or not mac_ok(key, rec["hash"], rec["mac"]):
            break
        tail.append({k: rec[k] for k in (*RECORD_KEYS, "hash")})
        prev = rec["hash"]
    return tail


def _epsilon(records: list[Mapping[str, Any]]) -> tuple[float, float | None, str | None]:
    reserves = [r for r in records if r["kind"] == "reserve"]
    if not reserves:
        return 0.0, None, None
    delta, accountant = reserves[-1]["delta"], reserves[-1]["accountant"]
    history = [(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in reserves]
    return compute_epsilon(history, delta=delta, accountant=accountant), delta, accountant


def recover_ledger(settings: SiteSettings) -> Recovered:
    """Rebuild the site's ledger from its signed audit log (see the module docstring)."""
    path, key_path = ledger_files(settings)
    audit = site_audit_log(settings)
    records = anchored_records(settings, audit)
    problems = disagreements(records, report_anchors(settings.output_dir))
    if problems:
        raise _refuse("the audit log is behind the site's signed privacy reports (it was cut short "
                      "or restored); restore the newest backups of the audit log and ledger — the "
                      "coordinator's per-site anchor still holds the site's cumulative epsilon", problems)
    key = read_key(key_path) if key_path.exists() else None
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a running site process waits, then reopens the new file
        tail = _verified_tail(path, key, records, settings.site_id)
        anchored = len(records)
        records += tail
        epsilon, delta, accountant = _epsilon(records)
        old = os.pread(fd, os.fstat(fd).st_size, 0)
        previous = None
        if old:
            previous = path.with_name(f"{path.name}.replaced-{stamp()}")
            write_atomic(previous, old, mode=PRIVATE)
        if key is None:
            key = write_new_key(key_path)  # the old key is gone: the rebuilt records get a new one
        write_atomic(path, b"".join(record_line(r, key) for r in records), mode=PRIVATE)
    finally:
        os.close(fd)
    for rec in tail:
        audit.append(ANCHOR_KIND, {**rec, "cause": "recovery"})
    audit.append("ledger_recovered", {
        "seq": len(records), "head": records[-1]["hash"] if records else GENESIS,
        "from_anchors": anchored, "kept_from_file": len(tail),
        "epsilon": round(epsilon, 6), "delta": delta, "accountant": accountant,
        "previous": previous.name if previous else None, "key_id": key_id(key),
    })
    return Recovered(path, len(records), anchored, epsilon, delta, accountant, previous)


def rotate_key(settings: SiteSettings) -> tuple[str, str]:
    """Re-authenticate the (verified) ledger under a fresh key; (old key id, new key id)."""
    audit = site_audit_log(settings)
    ledger = open_site_ledger(settings, audit)  # refuses a ledger that disagrees with its anchors
    _, key_path = ledger_files(settings)
    with ledger._locked() as fh:  # the same lock every ledger writer takes
        records, prev = [], GENESIS
        for entry in ledger._read(fh):
            records.append(entry_record(entry, site_id=settings.site_id, prev=prev))
            prev = entry.hash
        old_id = ledger.key_id
        fresh = key_path.with_name(f"{key_path.name}.new-{stamp()}")
        new = write_new_key(fresh)
        retired = key_path.with_name(f"{key_path.name}.retired-{stamp()}")
        os.replace(key_path, retired)
        os.replace(fresh, key_path)
        write_atomic(ledger.path, b"".join(record_line(r, new) for r in records), mode=PRIVATE)
    audit.append("ledger_rekeyed", {
        "seq": len(records), "head": records[-1]["hash"] if records else GENESIS,
        "old_key_id": old_id, "new_key_id": key_id(new), "retired": retired.name,
    })
    return old_id, key_id(new)
