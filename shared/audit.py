"""Append-only, hash-chained, signed audit log (one JSON object per line).

Every entry is ``{seq, time, actor, kind, data, prev, key_id, hash, sig}``:
``hash`` is sha256 over the canonical JSON of the entry without ``hash`` and
``sig``; ``prev`` is the previous entry's ``hash`` (64 zeros for the first);
``sig`` is Ed25519 over the 32 hash bytes. Editing, deleting or reordering an
entry breaks the chain at that entry, so :func:`verify_log` names the first bad
one. (Cutting entries off the *end* leaves a valid shorter chain; compare the
entry count and last hash :func:`verify_log` reports with an outside anchor,
e.g. the numbers in a signed report.)

Crash safety: each append is one ``write`` of a whole line followed by
``fsync``, under an exclusive ``flock`` so concurrent writers interleave whole
entries. A crash can leave at most a torn last line (no final newline); the next writer
moves it aside to ``<log>.torn-<time>`` and continues the chain from the last
good entry, so a crash never breaks the chain. A *complete* last line that does
not parse is not what a crash leaves: the writer refuses to append after it
rather than set evidence of an edit aside.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.atomic import write_new
from shared.errors import InputError, Problem, VerificationError
from shared.signing import canonical_json, decode_b64_strict, key_id, key_names

GENESIS = "0" * 64
KINDS: frozenset[str] = frozenset(
    {
        "run_start",
        "run_end",
        "site_registered",  # the coordinator saw a node: its node id, site name, public key sha256
        "round",
        "update_accepted",
        "update_rejected",  # data must carry a short "reason"
        "budget_refusal",
        "report_issued",
        "config",  # data carries the config hash
        "policy_tightened",  # a site floor overrode the run/node config (client/policy.py)
        "ledger_anchor",  # a whole privacy-ledger record (seq, hash, ...): the ledger's outside anchor
        "ledger_migrated",  # a format-1 ledger rewritten authenticated (seq, head, backup)
        "ledger_recovered",  # a ledger rebuilt from the anchors (fedsynth-site ledger recover)
        "ledger_rekeyed",  # the ledger re-authenticated under a new ledger key (old/new key ids)
    }
)
ENTRY_FIELDS = frozenset({"seq", "time", "actor", "kind", "data", "prev", "key_id", "hash", "sig"})
MAX_STRING = 200  # short reasons and ids only: the log must never carry note text
MODE = 0o600  # audit logs: owner read/write only (site ids, node ids, ledger positions)
_KEY_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _check_scalar(value: Any, where: str, problems: list[Problem]) -> None:
    if value is None or isinstance(value, bool | int):
        return
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            problems.append(Problem(where, "non-finite number"))
        return
    if isinstance(value, str):
        if len(value) > MAX_STRING:
            problems.append(Problem(where, f"string longer than {MAX_STRING} characters (no free text)"))
        if any(ord(c) < 32 for c in value):
            problems.append(Problem(where, "control characters/newlines are not allowed"))
        return
    problems.append(Problem(where, f"{type(value).__name__} is not a JSON scalar"))


def validate_data(kind: str, data: Mapping[str, Any]) -> list[Problem]:
    """Every reason ``(kind, data)`` may not go into the log (empty when fine).

    Values may be scalars, lists of scalars or dicts of scalars; strings are
    short and single-line; keys are identifier-like.
    """
    problems: list[Problem] = []
    if kind not in KINDS:
        problems.append(Problem("kind", f"{kind!r} is not one of {sorted(KINDS)}"))
    if not isinstance(data, Mapping):
        return [*problems, Problem("data", "must be a mapping")]
    for k, v in data.items():
        where = f"data.{k}"
        if not isinstance(k, str) or not _KEY_RE.match(k):
            problems.append(Problem(where, "key must match [A-Za-z0-9_.-]{1,64}"))
            continue
        if isinstance(v, list | tuple):
            for i, item in enumerate(v):
                _check_scalar(item, f"{where}[{i}]", problems)
        elif isinstance(v, Mapping):
            for k2, item in v.items():
                if not isinstance(k2, str) or not _KEY_RE.match(k2):
                    problems.append(Problem(f"{where}.{k2}", "key must match [A-Za-z0-9_.-]{1,64}"))
                else:
                    _check_scalar(item, f"{where}.{k2}", problems)
        else:
            _check_scalar(v, where, problems)
    if kind == "update_rejected" and not isinstance(data.get("reason"), str):
        problems.append(Problem("data.reason", "update_rejected needs a short string reason"))
    if kind == "config" and not (isinstance(data.get("config_hash"), str)):
        problems.append(Problem("data.config_hash", "config entries carry the config hash"))
    return problems


def entry_hash(entry: Mapping[str, Any]) -> str:
    """sha256 hex of the canonical JSON of ``entry`` without ``hash`` and ``sig``."""
    body = {k: v for k, v in entry.items() if k not in ("hash", "sig")}
    return hashlib.sha256(canonical_json(body)).hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _last_line(fd: int) -> tuple[int, bytes]:
    """(offset, bytes) of the last line of the open file, including a missing-newline tail."""
    size = os.fstat(fd).st_size
    if size == 0:
        return 0, b""
    # Skip the final newline (if any), then look backwards for the previous one.
    end = size - 1 if os.pread(fd, 1, size - 1) == b"\n" else size
    pos, chunk = end, 1 << 16
    while pos > 0:
        start = max(0, pos - chunk)
        block = os.pread(fd, pos - start, start)
        nl = block.rfind(b"\n")
        if nl >= 0:
            offset = start + nl + 1
            return offset, os.pread(fd, size - offset, offset)
        pos = start
    return 0, os.pread(fd, size, 0)


def _line_number(fd: int, offset: int) -> int:
    """1-based line number of the line starting at byte ``offset`` (error messages only)."""
    return os.pread(fd, offset, 0).count(b"\n") + 1


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        obj = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


class AuditLog:
    """Writer for one audit log file. Safe for several processes appending at once.

    ``key`` signs each entry (required for logs an auditor should trust; an
    unsigned log only detects accidents). ``actor`` names who writes (a site
    id or ``coordinator``); the verifier checks it against the signing key's name.
    """

    def __init__(self, path: Path, *, key: Ed25519PrivateKey | None = None, actor: str) -> None:
        problems: list[Problem] = []
        _check_scalar(actor, "actor", problems)
        if not actor or not _KEY_RE.match(actor):
            problems.append(Problem("actor", "must match [A-Za-z0-9_.-]{1,64}"))
        if problems:
            raise InputError("invalid audit log actor", problems)
        self.path = Path(path)
        self.key = key
        self.actor = actor
        self.key_id = key_id(key) if key is not None else None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked() as fd:
            self._repair_tail(fd)

    def _locked(self) -> _Locked:
        return _Locked(self.path)

    def _repair_tail(self, fd: int) -> tuple[int, str]:
        """Move a torn last line aside; return (next seq, prev hash) from the last good entry."""
        offset, line = _last_line(fd)
        if not line:
            return 0, GENESIS
        if line.endswith(b"\n"):
            entry = _parse(line)
            if entry is None:  # a crash cannot leave a whole line that does not parse: an edit did
                raise InputError(
                    "audit log's last line is complete but not a valid entry (edited or corrupted, "
                    "not a crash); nothing was appended; run fedsynth-verify on it",
                    [Problem(str(self.path), "unparsable complete last line", line=_line_number(fd, offset))],
                )
        else:
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
            aside = self.path.with_name(f"{self.path.name}.torn-{stamp}")
            write_new(aside, line, mode=MODE)
            os.ftruncate(fd, offset)
            os.fsync(fd)
            offset, line = _last_line(fd)
            if not line:
                return 0, GENESIS
            entry = _parse(line)
            if entry is None:
                raise InputError(
                    "audit log is corrupt before its last line; run fedsynth-verify on it",
                    [Problem(str(self.path), "unparsable entry after moving a torn line aside")],
                )
        seq, prev = entry.get("seq"), entry.get("hash")
        if not isinstance(seq, int) or not isinstance(prev, str):
            raise InputError(
                "audit log's last entry lacks seq/hash; run fedsynth-verify on it",
                [Problem(str(self.path), "last entry malformed")],
            )
        return seq + 1, prev

    def head(self) -> tuple[int, str]:
        """(entries so far, hash of the last one; GENESIS when empty): the anchor a report carries.

        A signed report names the log position it was issued at (``audit_seq``/``audit_head``);
        a log cut short below it, or swapped for another log, cannot match it.
        """
        with self._locked() as fd:
            return self._repair_tail(fd)

    def append(self, kind: str, data: Mapping[str, Any]) -> dict[str, Any]:
        """Append one entry (validated, chained, signed, fsynced) and return it."""
        problems = validate_data(kind, data)
        if problems:
            raise InputError(f"refusing audit entry of kind {kind!r}", problems)
        with self._locked() as fd:
            seq, prev = self._repair_tail(fd)
            entry: dict[str, Any] = {
                "seq": seq,
                "time": _now(),
                "actor": self.actor,
                "kind": kind,
                "data": json.loads(canonical_json(dict(data))),
                "prev": prev,
                "key_id": self.key_id,
            }
            entry["hash"] = entry_hash(entry)
            entry["sig"] = (
                None
                if self.key is None
                else _b64(self.key.sign(bytes.fromhex(entry["hash"])))
            )
            line = canonical_json(entry) + b"\n"
            os.lseek(fd, 0, os.SEEK_END)
            written = os.write(fd, line)
            if written != len(line):  # a short write is a torn line: let the next open repair it
                raise OSError(f"short write to audit log {self.path}")
            os.fsync(fd)
        return entry


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


class _Locked:
    """Open the log read/write and hold an exclusive flock for the block."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = -1

    def __enter__(self) -> int:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, MODE)
        if os.fstat(self.fd).st_mode & 0o077:  # an older log (0644): readable by its owner only
            os.fchmod(self.fd, MODE)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self.fd

    def __exit__(self, *exc: object) -> None:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)


def _bad(path: Path, line: int, what: str) -> VerificationError:
    return VerificationError("audit log verification failed", [Problem(str(path), what, line)])


def verify_log(
    path: Path,
    public_keys: Mapping[str, Ed25519PublicKey],
    *,
    allow_unsigned: bool = False,
) -> int:
    """Verify a whole audit log; return its number of entries.

    Checks, entry by entry: valid canonical JSON, exactly the expected fields,
    ``seq`` = 0, 1, 2, ... (a gap or reordering means a deleted or moved entry),
    ``prev`` = the previous entry's hash, ``hash`` recomputed, the signature by a
    known key, and (when the actor is one of the key names) that the signer is
    the actor. Raises VerificationError naming file, line and the first bad
    entry. ``public_keys`` maps names (site ids, ``coordinator``) to keys.
    """
    path = Path(path)
    by_id = {key_id(k): k for k in public_keys.values()}
    names = key_names(public_keys)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError("cannot read audit log", [Problem(str(path), exc.strerror or str(exc))]) from None
    if raw and not raw.endswith(b"\n"):
        n = raw.count(b"\n") + 1
        raise _bad(path, n, "torn last line (no newline): a crash while appending, or an edit; "
                   "the next writer moves it aside")
    prev, count = GENESIS, 0
    for lineno, line in enumerate(raw.split(b"\n")[:-1], start=1):
        entry = _parse(line)
        if entry is None:
            raise _bad(path, lineno, "entry is not valid JSON")
        seq = entry.get("seq")
        label = f"entry seq={seq!r}"
        if set(entry) != ENTRY_FIELDS:
            raise _bad(path, lineno, f"{label}: fields must be exactly {sorted(ENTRY_FIELDS)}")
        try:
            canonical = canonical_json(entry)
        except InputError:
            canonical = b""
        if canonical != line:
            raise _bad(path, lineno, f"{label}: not in canonical form (edited after writing)")
        types_ok = (
            isinstance(entry["actor"], str)
            and isinstance(entry["time"], str)
            and isinstance(entry["kind"], str)
            and entry["kind"] in KINDS
            and isinstance(entry["data"], dict)
        )
        if not types_ok:
            raise _bad(path, lineno, f"{label}: actor/time/kind/data of the wrong type or unknown kind")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq != count:
            raise _bad(path, lineno, f"{label}: expected seq {count} (an entry was deleted, "
                       "inserted or reordered here)")
        if entry["prev"] != prev:
            raise _bad(path, lineno, f"{label}: broken chain (prev does not match the hash of "
                       "the entry before it: an entry was deleted, inserted or reordered)")
        if not isinstance(entry["hash"], str) or not _HEX64.match(entry["hash"]) \
                or entry_hash(entry) != entry["hash"]:
            raise _bad(path, lineno, f"{label}: bad hash (entry content changed after writing)")
        kid = entry["key_id"]
        if kid is None or entry["sig"] is None:
            if not (allow_unsigned and kid is None and entry["sig"] is None):
                raise _bad(path, lineno, f"{label}: entry is not signed")
        else:
            if kid not in by_id:
                raise _bad(path, lineno, f"{label}: signed by unknown key {kid!r}")
            sig = decode_b64_strict(entry["sig"])
            if sig is None or len(sig) != 64:
                raise _bad(path, lineno, f"{label}: signature is not canonical base64 of 64 bytes")
            try:
                by_id[kid].verify(sig, bytes.fromhex(entry["hash"]))
            except InvalidSignature:
                raise _bad(path, lineno, f"{label}: bad signature (key {kid})") from None
            actor = entry["actor"]
            if actor in public_keys and names[kid] != actor:
                raise _bad(path, lineno, f"{label}: actor {actor!r} but signed with the key of "
                           f"{names[kid]!r}")
        prev = entry["hash"]
        count += 1
    return count


def last_hash(path: Path) -> str:
    """Hash of the last entry (GENESIS when empty): the anchor to publish or compare."""
    fd = os.open(path, os.O_RDONLY)
    try:
        _, line = _last_line(fd)
    finally:
        os.close(fd)
    entry = _parse(line) if line else None
    return str(entry["hash"]) if entry and "hash" in entry else GENESIS
