"""The privacy ledger's record format: fields, hash chain, MAC'd lines, value checks, epsilon.

A record (format 2) is one JSON line holding :data:`RECORD_KEYS`, ``hash`` =
sha256 of the canonical JSON of those keys (``prev``, the previous record's hash,
included: a hash chain) and ``mac`` = HMAC-SHA256 of the hash under the site's
ledger secret (:mod:`client.dp.ledger_key`). The hash does not depend on the key,
so audit-log anchors (which carry whole records and their hashes) stay valid
across a key rotation. Format 1 (a plain sha256 per line) is read only to
migrate it (:mod:`client.dp.ledger_v1`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from client.dp.ledger_key import mac
from shared.errors import ConfigError, Problem
from shared.whitelist import ACCOUNTANTS

GENESIS = "0" * 64
V1_ENTRY_KEYS = ("seq", "kind", "round_id", "noise_multiplier", "sample_rate", "steps", "delta",
                  "accountant", "time")
_ENTRY_KEYS = (*V1_ENTRY_KEYS, "noise_source")
V1_LINE_KEYS = {*V1_ENTRY_KEYS, "site_id", "ref", "sha256"}  # ref: seq of the reserve a release closes
RECORD_KEYS = frozenset({*_ENTRY_KEYS, "site_id", "ref", "prev"})  # what ``hash`` covers; what an anchor carries
LINE_KEYS = {*RECORD_KEYS, "hash", "mac"}
NOISE_SOURCE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
ROUND_ID_MAX = 120  # round ids go into audit anchors, which take short strings only
NOT_JSON = "not valid JSON"
AuditSink = Callable[[str, Mapping[str, Any]], Any]
"""Where a ledger reports what it wrote: (audit kind, data), e.g. ``AuditLog.append``."""


@dataclass(frozen=True)
class LedgerEntry:
    """One ledger record. ``noise_multiplier`` sigma (noise std / clipping norm),
    ``sample_rate`` q (Poisson sampling probability of a patient per step),
    ``steps`` (optimizer steps), ``delta`` the run's target delta, ``time`` UTC ISO-8601,
    ``noise_source`` where the noise came from (recorded, not trusted), ``ref`` the seq
    of the reserve a ``released`` record closes, ``hash`` the record's chain hash (the
    ledger head right after it)."""

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
    ref: int | None = None
    hash: str = ""


def is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def value_problems(
    *, noise_multiplier: Any, sample_rate: Any, steps: Any, delta: Any, accountant: Any
) -> list[str]:
    out = []
    if not (is_num(noise_multiplier) and noise_multiplier > 0):
        out.append(f"noise_multiplier must be a finite number > 0, got {noise_multiplier!r}")
    if not (is_num(sample_rate) and 0 < sample_rate <= 1):
        out.append(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        out.append(f"steps must be an integer >= 1, got {steps!r}")
    if not (is_num(delta) and 0 < delta < 1):
        out.append(f"delta must be in (0, 1), got {delta!r}")
    if accountant not in ACCOUNTANTS:
        out.append(f"accountant must be one of {', '.join(sorted(ACCOUNTANTS))}, got {accountant!r}")
    return out


def check_query(delta: Any, accountant: Any) -> None:
    problems = [
        Problem(name, reason)
        for name, reason in (
            ("delta", None if is_num(delta) and 0 < delta < 1 else f"must be in (0, 1), got {delta!r}"),
            ("accountant", None if accountant in ACCOUNTANTS else f"must be one of {', '.join(sorted(ACCOUNTANTS))}, got {accountant!r}"),
        )
        if reason
    ]
    if problems:
        raise ConfigError("invalid privacy accounting query", problems)


def compute_epsilon(history: list[tuple[float, float, int]], *, delta: float, accountant: str) -> float:
    """Epsilon of the composition of ``history`` ((sigma, q, steps) runs) at ``delta``:
    :func:`shared.accounting.compute_epsilon`, the one the coordinator recomputes with."""
    from shared.accounting import compute_epsilon as shared_epsilon

    return shared_epsilon(history, delta=delta, accountant=accountant)


def record_hash(record: Mapping[str, Any]) -> str:
    """sha256 hex of the canonical JSON of the record's :data:`RECORD_KEYS` (``prev`` included)."""
    body = {k: record[k] for k in RECORD_KEYS}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def record_problems(rec: Mapping[str, Any], *, site_id: str, seq: int, prev: str) -> list[str]:
    """Why ``rec`` (its :data:`RECORD_KEYS` and ``hash``) is not record ``seq`` of ``site_id``'s
    chain after ``prev`` (empty when it is). The MAC is checked by the caller."""
    if set(RECORD_KEYS) - set(rec) or "hash" not in rec:
        return ["not a ledger record (missing fields)"]
    if rec["hash"] != record_hash(rec):
        return ["hash mismatch: the record was edited after it was written"]
    if rec["site_id"] != site_id:
        return [f"record belongs to site {rec['site_id']!r}, not {site_id!r}"]
    if rec["seq"] != seq:
        return [f"sequence gap: expected seq {seq}, found {rec['seq']!r}"]
    if rec["prev"] != prev:
        return ["chain broken: prev is not the hash of the record before it (a record was removed, "
                "replaced or reordered)"]
    bad = value_problems(**{k: rec[k] for k in ("noise_multiplier", "sample_rate", "steps", "delta", "accountant")})
    if rec["kind"] not in ("reserve", "released"):
        bad.append(f"unknown kind {rec['kind']!r}")
    if not isinstance(rec["round_id"], str) or not isinstance(rec["time"], str):
        bad.append("round_id and time must be strings")
    if not isinstance(rec["noise_source"], str) or not NOISE_SOURCE.match(rec["noise_source"]):
        bad.append(f"noise_source must match {NOISE_SOURCE.pattern}")
    ref = rec["ref"]
    if rec["kind"] == "reserve" and ref is not None:
        bad.append("a reserve record must not reference another record")
    if rec["kind"] == "released" and (
        isinstance(ref, bool) or not isinstance(ref, int) or not 1 <= ref < rec["seq"]
    ):
        bad.append(f"a released record must reference an earlier reserve, got ref {ref!r}")
    return bad


def entry_from(rec: Mapping[str, Any]) -> LedgerEntry:
    return LedgerEntry(**{k: rec[k] for k in (*_ENTRY_KEYS, "ref", "hash")})


def entry_record(entry: LedgerEntry, *, site_id: str, prev: str) -> dict[str, Any]:
    """The record (:data:`RECORD_KEYS` + ``hash``) of ``entry``: what an anchor carries."""
    rec = {k: v for k, v in asdict(entry).items() if k != "hash"}
    return {**rec, "site_id": site_id, "prev": prev, "hash": entry.hash}


def record_line(record: Mapping[str, Any], key: bytes) -> bytes:
    """One authenticated ledger line (hash recomputed, MAC under ``key``)."""
    rec = {k: record[k] for k in RECORD_KEYS}
    rec["hash"] = record_hash(rec)
    rec["mac"] = mac(key, rec["hash"])
    return json.dumps(rec, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")


def request_problems(sigma: Any, q: Any, steps: Any, delta: Any, accountant: Any, **more: Any) -> list[Problem]:
    """What is wrong with a ledger request: its privacy values (noise multiplier ``sigma``, sample
    rate ``q``, ``steps``, ``delta``, ``accountant``) and, when given, ``round_id``, ``ceiling``
    (the epsilon ceiling) and ``noise_source``; empty when it may be recorded."""
    reasons = value_problems(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta, accountant=accountant)
    problems = [Problem("privacy", r) for r in reasons]
    if "round_id" in more and (
        not isinstance(more["round_id"], str) or not more["round_id"].strip()
        or len(more["round_id"]) > ROUND_ID_MAX or not more["round_id"].isprintable()
    ):
        problems.append(Problem("round_id", f"must be a non-empty printable string of at most "
                                f"{ROUND_ID_MAX} characters, got {more['round_id']!r:.140}"))
    if "ceiling" in more and not (is_num(more["ceiling"]) and more["ceiling"] > 0):
        problems.append(Problem("epsilon_ceiling", f"must be a finite number > 0, got {more['ceiling']!r}"))
    source = more.get("noise_source", "unspecified")
    if not isinstance(source, str) or not NOISE_SOURCE.match(source):
        problems.append(Problem("noise_source", f"must match {NOISE_SOURCE.pattern}, got {source!r:.80}"))
    return problems
