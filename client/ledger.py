"""The per-site privacy ledger: append-only, fsynced, crash-safe; epsilon from the whole history.

Every DP-SGD run appends a ``reserve`` record (noise multiplier sigma, Poisson
sample rate q, number of steps) *before* training starts, and the record is
flushed and fsynced before :meth:`Ledger.reserve` returns. A reserved spend
always counts, even if training crashed or the update never left; a
``released`` record is appended afterwards for the audit trail only.

Epsilon is never stored: it is recomputed from every ``reserve`` record ever
written (all rounds, all restarts) with an Opacus accountant (PRV or RDP), as
patient-level (epsilon, delta)-DP of the Poisson-subsampled Gaussian mechanism.

On disk: one JSON object per line with a sequence number (1, 2, ...), the
site id and a sha256 checksum of the line's canonical JSON. A kill -9 during an
append can only tear the *last* line (one ``write`` per line, fsync after): on
open such a tail is copied to ``<ledger>.torn-<time>`` and cut off, and since
it was never fsynced-and-returned, training never started on it. Anything
else that does not verify (a bad line before the last, a sequence gap, a
checksum mismatch, another site's ledger) raises :class:`LedgerError`:
the ledger is never silently read as a smaller spend.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal

from shared.errors import BudgetExceededError, ConfigError, LedgerError, Problem

__all__ = ["LedgerEntry", "Ledger", "ACCOUNTANTS"]

ACCOUNTANTS = ("prv", "rdp")
_ENTRY_KEYS = ("seq", "kind", "round_id", "noise_multiplier", "sample_rate", "steps", "delta", "accountant", "time")
_LINE_KEYS = {*_ENTRY_KEYS, "site_id", "ref", "sha256"}  # ref: seq of the reserve a release closes


@dataclass(frozen=True)
class LedgerEntry:
    """One ledger record. ``noise_multiplier`` sigma (noise std / clipping norm),
    ``sample_rate`` q (Poisson sampling probability of a patient per step),
    ``steps`` (optimizer steps), ``delta`` the run's target delta, ``time`` UTC ISO-8601,
    ``noise_source`` where the DP noise came from (``client.dp_noise``; "unspecified"
    on records written before it was recorded)."""

    seq: int
    kind: Literal["reserve", "released"]
    round_id: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    accountant: str
    time: str
    noise_source: str = "unspecified"


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _value_problems(
    *, noise_multiplier: Any, sample_rate: Any, steps: Any, delta: Any, accountant: Any
) -> list[str]:
    out = []
    if not (_is_num(noise_multiplier) and noise_multiplier > 0):
        out.append(f"noise_multiplier must be a finite number > 0, got {noise_multiplier!r}")
    if not (_is_num(sample_rate) and 0 < sample_rate <= 1):
        out.append(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        out.append(f"steps must be an integer >= 1, got {steps!r}")
    if not (_is_num(delta) and 0 < delta < 1):
        out.append(f"delta must be in (0, 1), got {delta!r}")
    if accountant not in ACCOUNTANTS:
        out.append(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")
    return out


def _check_query(delta: Any, accountant: Any) -> None:
    problems = [
        Problem(name, reason)
        for name, reason in (
            ("delta", None if _is_num(delta) and 0 < delta < 1 else f"must be in (0, 1), got {delta!r}"),
            ("accountant", None if accountant in ACCOUNTANTS else f"must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}"),
        )
        if reason
    ]
    if problems:
        raise ConfigError("invalid privacy accounting query", problems)


def compute_epsilon(history: list[tuple[float, float, int]], *, delta: float, accountant: str) -> float:
    """Epsilon of the composition of ``history`` ((sigma, q, steps) runs) at ``delta``.

    Runs with the same (sigma, q) are merged into one run of summed steps first:
    composition is commutative, so this is the same mechanism (Opacus's own
    ``step()`` merges consecutive equal runs) and keeps the PRV accountant fast.
    """
    if not history:
        return 0.0
    from opacus.accountants import PRVAccountant, RDPAccountant  # torch import only when needed

    merged: dict[tuple[float, float], int] = {}
    for sigma, q, steps in history:
        merged[(sigma, q)] = merged.get((sigma, q), 0) + steps
    acc = PRVAccountant() if accountant == "prv" else RDPAccountant()
    acc.history = [(sigma, q, steps) for (sigma, q), steps in merged.items()]
    return max(0.0, float(acc.get_epsilon(delta=delta)))


def _checksum(record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Ledger:
    """The privacy ledger of one site at ``path`` (a JSON-lines file).

    Every method re-reads and verifies the whole file under an exclusive
    ``flock``, so several processes of the same site see each other's appends
    and never interleave them.
    """

    def __init__(self, path: Path, *, site_id: str = "site") -> None:
        if not isinstance(site_id, str) or not site_id.strip():
            raise ConfigError(f"ledger site_id must be a non-empty string, got {site_id!r}")
        self.path = Path(path)
        self.site_id = site_id
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            created = False
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass
            else:
                os.fsync(fd)
                os.close(fd)
                created = True
            if created:
                _fsync_dir(self.path.parent)
        except OSError as exc:
            raise LedgerError(f"cannot create privacy ledger {self.path}: {exc.strerror}") from None
        self.entries()  # verify now: a corrupt ledger should stop a site at start-up

    # ------------------------------------------------------------------ file access

    @contextmanager
    def _locked(self) -> Iterator[IO[bytes]]:
        try:
            fh = self.path.open("a+b")
        except OSError as exc:
            raise LedgerError(f"cannot open privacy ledger {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            yield fh
        finally:
            fh.close()  # closing releases the flock

    def _fail(self, line: int, reason: str) -> LedgerError:
        return LedgerError(
            f"privacy ledger {self.path} is corrupt at line {line}: {reason}; refusing to "
            "account from it (restore it from backup; never delete it to reset the budget)",
            [Problem(str(self.path), reason, line)],
        )

    def _parse(self, raw: bytes, line: int, expected_seq: int) -> LedgerEntry | str:
        """The entry on one line, or why it does not verify."""
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "not valid JSON"
        if not isinstance(rec, dict) or set(rec) - {"noise_source"} != _LINE_KEYS:
            return "not a ledger record (unexpected fields)"
        if rec["sha256"] != _checksum(rec):
            return "checksum mismatch"
        if rec["site_id"] != self.site_id:
            return f"record belongs to site {rec['site_id']!r}, not {self.site_id!r}"
        if rec["seq"] != expected_seq:
            return f"sequence gap: expected seq {expected_seq}, found {rec['seq']!r}"
        bad = _value_problems(**{k: rec[k] for k in ("noise_multiplier", "sample_rate", "steps", "delta", "accountant")})
        if rec["kind"] not in ("reserve", "released"):
            bad.append(f"unknown kind {rec['kind']!r}")
        if not isinstance(rec["round_id"], str) or not isinstance(rec["time"], str):
            bad.append("round_id and time must be strings")
        if not isinstance(rec.get("noise_source", "unspecified"), str) or not rec.get("noise_source", "-"):
            bad.append("noise_source must be a non-empty string")
        ref = rec["ref"]
        if rec["kind"] == "reserve" and ref is not None:
            bad.append("a reserve record must not reference another record")
        if rec["kind"] == "released" and (
            isinstance(ref, bool) or not isinstance(ref, int) or not 1 <= ref < rec["seq"]
        ):
            bad.append(f"a released record must reference an earlier reserve, got ref {ref!r}")
        if bad:
            return "; ".join(bad)
        return LedgerEntry(**{k: rec[k] for k in _ENTRY_KEYS},
                           noise_source=rec.get("noise_source", "unspecified"))

    def _read(self, fh: IO[bytes]) -> list[LedgerEntry]:
        """Verify the whole file (lock held); move a torn last line aside."""
        fh.seek(0)
        data = fh.read()
        lines = data.split(b"\n")
        tail_open = lines[-1] != b""  # the last line has no newline: an append was cut short
        if not tail_open:
            lines.pop()
        entries: list[LedgerEntry] = []
        offset = 0
        for i, raw in enumerate(lines):
            number, last = i + 1, i == len(lines) - 1
            parsed = self._parse(raw, number, len(entries) + 1)
            if isinstance(parsed, LedgerEntry):
                entries.append(parsed)
                if last and tail_open:
                    # Complete record, only the newline missing: it counts (never lower the spend).
                    fh.write(b"\n")
                    fh.flush()
                    os.fsync(fh.fileno())
            elif last and (tail_open or parsed == "not valid JSON"):
                self._move_aside(fh, offset, data[offset:])
            else:
                raise self._fail(number, parsed)
            offset += len(raw) + 1
        return entries

    @staticmethod
    def _released_refs(fh: IO[bytes]) -> set[int]:
        """Seqs of reserves already released (file verified by the caller under the lock)."""
        fh.seek(0)
        return {
            rec["ref"] for raw in fh.read().splitlines() if raw.strip()
            for rec in [json.loads(raw)] if rec["kind"] == "released"
        }

    def _move_aside(self, fh: IO[bytes], offset: int, tail: bytes) -> None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        torn = self.path.with_name(f"{self.path.name}.torn-{stamp}")
        with torn.open("xb") as out:
            out.write(tail)
            out.flush()
            os.fsync(out.fileno())
        _fsync_dir(self.path.parent)
        fh.truncate(offset)
        fh.flush()
        os.fsync(fh.fileno())

    def _append(self, fh: IO[bytes], entry: LedgerEntry, *, ref: int | None = None) -> None:
        rec = {**asdict(entry), "site_id": self.site_id, "ref": ref}
        rec["sha256"] = _checksum(rec)
        line = json.dumps(rec, sort_keys=True, separators=(",", ":")).encode() + b"\n"
        fh.seek(0, os.SEEK_END)
        fh.write(line)  # one write per record: a crash can tear only this last line
        fh.flush()
        os.fsync(fh.fileno())

    # ------------------------------------------------------------------ public API

    def entries(self) -> list[LedgerEntry]:
        """Every verified record, oldest first."""
        with self._locked() as fh:
            return self._read(fh)

    def history(self) -> list[tuple[float, float, int]]:
        """(noise_multiplier, sample_rate, steps) of every reserve record: what epsilon is computed from."""
        return [(e.noise_multiplier, e.sample_rate, e.steps) for e in self.entries() if e.kind == "reserve"]

    def epsilon(self, *, delta: float, accountant: str = "prv") -> float:
        """Cumulative epsilon of everything ever reserved, at ``delta`` (0.0 for an empty ledger)."""
        _check_query(delta, accountant)
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
        reasons = _value_problems(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta, accountant=accountant)
        problems = [Problem("privacy", r) for r in reasons]
        if "round_id" in more and (not isinstance(more["round_id"], str) or not more["round_id"].strip()):
            problems.append(Problem("round_id", f"must be a non-empty string, got {more['round_id']!r}"))
        if "ceiling" in more and not (_is_num(more["ceiling"]) and more["ceiling"] > 0):
            problems.append(Problem("epsilon_ceiling", f"must be a finite number > 0, got {more['ceiling']!r}"))
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
    ) -> LedgerEntry:
        """Record a DP-SGD run before it starts; refuse it if it would cross ``epsilon_ceiling``.

        The check and the append happen under one lock, so two processes cannot
        both squeeze under the ceiling. Raises :class:`BudgetExceededError`
        (nothing written) when the projected cumulative epsilon at ``delta``
        exceeds the ceiling. Returns once the record is fsynced. ``noise_source``
        names the DP noise generator (recorded for the privacy report).
        """
        self._check_run(noise_multiplier, sample_rate, steps, delta, accountant,
                        round_id=round_id, ceiling=epsilon_ceiling)
        with self._locked() as fh:
            entries = self._read(fh)
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
            entry = LedgerEntry(
                seq=len(entries) + 1,
                kind="reserve",
                round_id=round_id,
                noise_multiplier=float(noise_multiplier),
                sample_rate=float(sample_rate),
                steps=steps,
                delta=float(delta),
                accountant=accountant,
                time=datetime.now(UTC).isoformat(timespec="microseconds"),
                noise_source=str(noise_source),
            )
            self._append(fh, entry)
            return entry

    def mark_released(self, entry: LedgerEntry) -> None:
        """Record that the update trained under ``entry`` has left the site (audit only; epsilon unchanged)."""
        with self._locked() as fh:
            entries = self._read(fh)
            if entry.kind != "reserve" or entry not in entries:
                raise LedgerError(f"{self.path}: no such reserve record to release (seq {entry.seq}, round {entry.round_id!r})")
            if entry.seq in self._released_refs(fh):
                raise LedgerError(f"{self.path}: round {entry.round_id!r} (seq {entry.seq}) was already released")
            released = LedgerEntry(
                **{**asdict(entry), "seq": len(entries) + 1, "kind": "released",
                   "time": datetime.now(UTC).isoformat(timespec="microseconds")}
            )
            self._append(fh, released, ref=entry.seq)
