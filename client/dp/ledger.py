"""The per-site privacy ledger: append-only, fsynced, crash-safe, authenticated; epsilon from the whole history.

Every DP-SGD run appends a ``reserve`` record (noise multiplier sigma, Poisson
sample rate q, number of steps) *before* training starts, and the record is
flushed and fsynced before :meth:`Ledger.reserve` returns. A reserved spend
always counts, even if training crashed or the update never left; a
``released`` record is appended once the update passed the wire check, for the
audit trail only.

Epsilon is never stored: it is recomputed from every ``reserve`` record ever
written (all rounds, all restarts) with an Opacus accountant (PRV or RDP), as
patient-level (epsilon, delta)-DP of the Poisson-subsampled Gaussian mechanism.

On disk: one JSON object per line (format 2) with a sequence number (1, 2, ...),
the site id, ``prev`` (the previous record's hash; 64 zeros for the first),
``hash`` (sha256 of the record's canonical JSON, ``prev`` included: a hash
chain whose last hash is the ledger *head*) and ``mac`` (HMAC-SHA256 of the
hash under the site's ledger secret, :mod:`client.dp.ledger_key`). Recomputing a
checksum after an edit no longer verifies; only the key holder can write
records. The head is also anchored outside the file: every record goes, whole,
into the site's signed audit log (``ledger_anchor`` entries, through the
``audit`` sink :func:`client.dp.ledger_anchor.open_site_ledger` wires up), and every
privacy report and update carries (seq, head); :mod:`client.dp.ledger_anchor`
checks them against each other at start-up and rebuilds a lost ledger from them.

Crashes: a kill -9 during an append can only tear the *last* line (one
``write`` per line, fsync after). On open, a last line without its newline, or
one that is not JSON at all, is copied to ``<ledger>.torn-<time>`` and cut off —
unless its record was already confirmed (anchored, or seen by this process):
then it was complete, and a complete record is never set aside. Anything else
that does not verify (a bad line before the last, a sequence gap, a hash, chain
or MAC mismatch, another site's ledger, fewer records than were confirmed)
raises :class:`LedgerError`: the ledger is never silently read as a smaller spend.

Format 1 ledgers (a plain sha256 per line, no MAC) are migrated on first open:
every verified record is rewritten authenticated with the same sigma, q and
steps (epsilon unchanged), the old file is kept as ``<ledger>.pre-mac`` and the
migration is audited (:mod:`client.dp.ledger_v1`).
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from client.dp.ledger_key import default_key_path, key_id, mac_ok, read_key, write_new_key
from client.dp.ledger_records import (
    GENESIS,
    LINE_KEYS,
    NOT_JSON,
    RECORD_KEYS,
    V1_LINE_KEYS,
    AuditSink,
    LedgerEntry,
    check_query,
    compute_epsilon,
    entry_from,
    entry_record,
    record_hash,
    record_line,
    record_problems,
    request_problems,
    stamp,
)
from client.dp.ledger_v1 import migrate_v1
from shared.atomic import PRIVATE, write_new
from shared.errors import BudgetExceededError, ConfigError, LedgerError, Problem

__all__ = ["LedgerEntry", "Ledger", "GENESIS", "RECORD_KEYS", "compute_epsilon", "record_hash"]


class Ledger:
    """The privacy ledger of one site at ``path`` (a JSON-lines file).

    Every method re-reads and verifies the whole file under an exclusive
    ``flock``, so several processes of the same site see each other's appends
    and never interleave them. ``key_path`` is the ledger secret
    (default ``ledger.key`` beside the ledger). ``audit`` receives a
    ``ledger_anchor`` entry for every record written (and ``ledger_migrated``);
    ``anchored_seq`` is the highest seq confirmed outside the file (the audit log):
    fewer records, or a damaged record at or below it, is an error, never a torn write.
    ``migrate`` False refuses a format-1 file instead of migrating it (once records
    are anchored, a format-1 file can only be an old copy or a forgery).
    """

    def __init__(
        self,
        path: Path,
        *,
        site_id: str = "site",
        key_path: Path | None = None,
        audit: AuditSink | None = None,
        anchored_seq: int = 0,
        anchored_where: str = "the audit log",
        migrate: bool = True,
    ) -> None:
        if not isinstance(site_id, str) or not site_id.strip():
            raise ConfigError(f"ledger site_id must be a non-empty string, got {site_id!r}")
        self.path = Path(path)
        self.site_id = site_id
        self.key_path = Path(key_path) if key_path is not None else default_key_path(self.path)
        self._audit = audit
        self._seen = (int(anchored_seq), None)  # (seq, hash) this object has confirmed
        self._anchored_where = anchored_where
        self._migrate = migrate
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                write_new(self.path, b"", mode=PRIVATE)
            except FileExistsError:
                pass
        except OSError as exc:
            raise LedgerError(f"cannot create privacy ledger {self.path}: {exc.strerror}") from None
        with self._locked() as fh:
            self._key = self._load_key(fh)
            migrated = migrate_v1(self, fh)
        if not migrated:
            self.entries()  # verify now: a corrupt ledger should stop a site at start-up
        else:
            entries = self.entries()
            self._emit("ledger_migrated", {
                "from_format": "v1-sha256", "entries": len(entries), "seq": len(entries),
                "head": entries[-1].hash if entries else GENESIS, "backup": migrated,
                "key_id": self.key_id,
            })

    @property
    def key_id(self) -> str:
        """Public name of the ledger secret in use (:func:`client.dp.ledger_key.key_id`)."""
        return key_id(self._key)

    # ------------------------------------------------------------------ file access

    @contextmanager
    def _locked(self) -> Iterator[IO[bytes]]:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR)  # never O_CREAT: a deleted ledger is not an empty one
            except FileNotFoundError:
                raise LedgerError(
                    f"privacy ledger {self.path} is missing (deleted or moved while the site ran); "
                    "refusing to account from nothing — restore it or run `fedsynth-site ledger recover`",
                    [Problem(str(self.path), "missing")],
                ) from None
            except OSError as exc:
                raise LedgerError(f"cannot open privacy ledger {self.path}: {exc.strerror}") from None
            fh = os.fdopen(fd, "r+b")
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                same = os.stat(self.path).st_ino == os.fstat(fh.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            fh.close()  # replaced (migration, recovery, key rotation) while we waited: reopen
        try:
            yield fh
        finally:
            fh.close()  # closing releases the flock

    def _fail(self, line: int, reason: str) -> LedgerError:
        return LedgerError(
            f"privacy ledger {self.path} is corrupt at line {line}: {reason}; refusing to "
            "account from it (restore the newest backup, or rebuild it from the signed audit log "
            "with `fedsynth-site ledger recover`; never delete it to reset the budget)",
            [Problem(str(self.path), reason, line)],
        )

    def _load_key(self, fh: IO[bytes]) -> bytes:
        if self.key_path.exists():
            return read_key(self.key_path)
        fh.seek(0)
        if b'"mac"' in fh.read():
            raise LedgerError(
                f"the ledger key {self.key_path} is missing but {self.path} holds authenticated "
                "records: restore the key from the site's key backup (a new key would make every "
                "record fail its check; the ledger is never re-keyed silently)",
                [Problem(str(self.key_path), "missing ledger key")],
            )
        try:
            return write_new_key(self.key_path)
        except FileExistsError:  # another process of the site created it just now
            return read_key(self.key_path)
        except OSError as exc:
            raise LedgerError(f"cannot create the ledger key {self.key_path}: {exc.strerror}") from None

    def _parse(self, raw: bytes, expected_seq: int, prev: str) -> LedgerEntry | str:
        """The entry on one line, or why it does not verify."""
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return NOT_JSON
        if not isinstance(rec, dict):
            return NOT_JSON
        if set(rec) == V1_LINE_KEYS:
            return "a format-1 record (plain checksum, no MAC) inside an authenticated ledger"
        if set(rec) != LINE_KEYS:
            return "not a ledger record (unexpected fields)"
        bad = record_problems(rec, site_id=self.site_id, seq=expected_seq, prev=prev)
        if bad:
            return "; ".join(bad)
        if not isinstance(rec["mac"], str) or not mac_ok(self._key, rec["hash"], rec["mac"]):
            return (f"MAC mismatch: the record was edited, or {self.key_path} (key id "
                    f"{self.key_id}) is not this ledger's key")
        return entry_from(rec)

    def _read(self, fh: IO[bytes]) -> list[LedgerEntry]:
        """Verify the whole file (lock held); move a torn, unconfirmed last line aside."""
        fh.seek(0)
        data = fh.read()
        lines = data.split(b"\n")
        tail_open = lines[-1] != b""  # the last line has no newline: an append was cut short
        if not tail_open:
            lines.pop()
        confirmed, confirmed_hash = self._seen
        entries: list[LedgerEntry] = []
        prev, offset = GENESIS, 0
        for i, raw in enumerate(lines):
            number, last = i + 1, i == len(lines) - 1
            parsed = self._parse(raw, number, prev)
            if isinstance(parsed, LedgerEntry):
                entries.append(parsed)
                prev = parsed.hash
                if last and tail_open:
                    # Complete record, only the newline missing: it counts (never lower the spend).
                    fh.seek(0, os.SEEK_END)
                    fh.write(b"\n")
                    fh.flush()
                    os.fsync(fh.fileno())
            elif last and (tail_open or parsed == NOT_JSON):
                if number <= confirmed:
                    raise self._fail(number, f"{parsed}; record {number} was confirmed (anchored in "
                                     f"{self._anchored_where}) when it was written, so this is an edit "
                                     "or disk damage, not a torn write")
                self._move_aside(fh, offset, data[offset:])
            else:
                raise self._fail(number, parsed)
            offset += len(raw) + 1
        if len(entries) < confirmed:
            raise LedgerError(
                f"privacy ledger {self.path} holds {len(entries)} records but record {confirmed} was "
                f"confirmed (anchored in {self._anchored_where}): it was truncated, emptied or replaced "
                "by an older copy; training is refused — restore the newest backup or run "
                "`fedsynth-site ledger recover` (rebuilds it from the signed audit log, never lower)",
                [Problem(str(self.path), f"{len(entries)} records < confirmed {confirmed}")],
            )
        if confirmed and confirmed_hash is not None and entries[confirmed - 1].hash != confirmed_hash:
            raise self._fail(confirmed, "record differs from the one this process wrote or read before "
                             "(the ledger was rewritten)")
        self._seen = (len(entries), prev) if entries else (0, None)
        return entries

    def _move_aside(self, fh: IO[bytes], offset: int, tail: bytes) -> None:
        torn = self.path.with_name(f"{self.path.name}.torn-{stamp()}")
        write_new(torn, tail)
        fh.truncate(offset)
        fh.flush()
        os.fsync(fh.fileno())

    def _append(self, fh: IO[bytes], entries: list[LedgerEntry], fields: dict[str, Any],
                *, cause: str, extra: Mapping[str, Any] | None = None) -> LedgerEntry:
        prev = entries[-1].hash if entries else GENESIS
        rec = {**fields, "seq": len(entries) + 1, "site_id": self.site_id, "prev": prev,
               "time": datetime.now(UTC).isoformat(timespec="microseconds")}
        line = record_line(rec, self._key)
        fh.seek(0, os.SEEK_END)
        fh.write(line)  # one write per record: a crash can tear only this last line
        fh.flush()
        os.fsync(fh.fileno())
        rec["hash"] = record_hash(rec)
        self._seen = (rec["seq"], rec["hash"])
        # Anchored while the lock is held, before the caller may train on (or send) anything.
        self._emit("ledger_anchor", {**rec, "cause": cause, **(extra or {})})
        return entry_from(rec)

    def _emit(self, kind: str, data: Mapping[str, Any]) -> None:
        if self._audit is not None:
            self._audit(kind, data)

    # ------------------------------------------------------------------ public API

    def entries(self) -> list[LedgerEntry]:
        """Every verified record, oldest first."""
        with self._locked() as fh:
            return self._read(fh)

    def head(self) -> tuple[int, str]:
        """(seq, hash) of the last record: (0, 64 zeros) for an empty ledger."""
        entries = self.entries()
        return (len(entries), entries[-1].hash) if entries else (0, GENESIS)

    def records(self) -> list[dict[str, Any]]:
        """Every verified record with ``site_id``, ``prev`` and ``hash`` (what anchors carry)."""
        out, prev = [], GENESIS
        for e in self.entries():
            out.append(entry_record(e, site_id=self.site_id, prev=prev))
            prev = e.hash
        return out

    def history(self) -> list[tuple[float, float, int]]:
        """(noise_multiplier, sample_rate, steps) of every reserve record: what epsilon is computed from."""
        return [(e.noise_multiplier, e.sample_rate, e.steps) for e in self.entries() if e.kind == "reserve"]

    def epsilon(self, *, delta: float, accountant: str = "prv") -> float:
        """Cumulative epsilon of everything ever reserved, at ``delta`` (0.0 for an empty ledger)."""
        check_query(delta, accountant)
        return compute_epsilon(self.history(), delta=delta, accountant=accountant)

    def projected_epsilon(
        self, *, noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "prv"
    ) -> float:
        """Cumulative epsilon if a run with these knobs were added now (nothing is written)."""
        self._check_run(noise_multiplier, sample_rate, steps, delta, accountant)
        return compute_epsilon(
            [*self.history(), (noise_multiplier, sample_rate, steps)], delta=delta, accountant=accountant
        )

    def _check_run(self, sigma: Any, q: Any, steps: Any, delta: Any, accountant: Any, **more: Any) -> None:
        problems = request_problems(sigma, q, steps, delta, accountant, **more)
        if problems:
            raise ConfigError("invalid privacy ledger request", problems)

    def reserve(
        self,
        *,
        round_id: str,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        delta: float,
        accountant: str,
        epsilon_ceiling: float,
        noise_source: str = "unspecified",
        precheck: Callable[[Sequence[LedgerEntry]], None] | None = None,
    ) -> LedgerEntry:
        """Record a DP-SGD run before it starts; refuse it if it would cross ``epsilon_ceiling``.

        The check and the append happen under one lock, so two processes cannot
        both squeeze under the ceiling. Raises :class:`BudgetExceededError`
        (nothing written) when the projected cumulative epsilon at ``delta``
        exceeds the ceiling. Returns once the record is fsynced and anchored.
        ``noise_source`` names where the run's noise comes from (e.g. ``csprng``);
        it is recorded and authenticated, not interpreted. ``precheck`` is called
        with the current entries under the same lock, before the ε check; what it
        raises propagates and nothing is written (a per-run count, for example,
        that two processes must not both pass).
        """
        self._check_run(noise_multiplier, sample_rate, steps, delta, accountant,
                        round_id=round_id, ceiling=epsilon_ceiling, noise_source=noise_source)
        with self._locked() as fh:
            entries = self._read(fh)
            if precheck is not None:
                precheck(entries)
            spent_history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in entries if e.kind == "reserve"]
            projected = compute_epsilon(
                [*spent_history, (noise_multiplier, sample_rate, steps)], delta=delta, accountant=accountant
            )
            if projected > epsilon_ceiling:
                spent = compute_epsilon(spent_history, delta=delta, accountant=accountant)
                raise BudgetExceededError(
                    f"round {round_id!r} refused before training: cumulative epsilon would be "
                    f"{projected:.4f} > ceiling {epsilon_ceiling:g} (already spent {spent:.4f}; "
                    f"delta={delta:g}, accountant={accountant}, sigma={noise_multiplier:g}, "
                    f"q={sample_rate:g}, steps={steps}); nothing was recorded",
                    projected_epsilon=projected,
                    ceiling=float(epsilon_ceiling),
                )
            fields = {
                "kind": "reserve", "round_id": round_id, "noise_multiplier": float(noise_multiplier),
                "sample_rate": float(sample_rate), "steps": steps, "delta": float(delta),
                "accountant": accountant, "noise_source": noise_source, "ref": None,
            }
            return self._append(fh, entries, fields, cause="reserve", extra={"epsilon": projected})

    def mark_released(self, entry: LedgerEntry) -> LedgerEntry:
        """Record that the update trained under ``entry`` passed the wire check and is leaving the
        site (audit only; epsilon unchanged). Returns the ``released`` record."""
        with self._locked() as fh:
            entries = self._read(fh)
            if entry.kind != "reserve" or entry not in entries:
                raise LedgerError(f"{self.path}: no such reserve record to release (seq {entry.seq}, round {entry.round_id!r})")
            if any(e.kind == "released" and e.ref == entry.seq for e in entries):
                raise LedgerError(f"{self.path}: round {entry.round_id!r} (seq {entry.seq}) was already released")
            fields = {k: v for k, v in asdict(entry).items() if k not in ("seq", "time", "hash")}
            return self._append(fh, entries, {**fields, "kind": "released", "ref": entry.seq}, cause="release")


