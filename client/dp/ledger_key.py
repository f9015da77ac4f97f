"""The site's ledger secret: 32 random bytes that authenticate every privacy-ledger record.

Each ledger record carries ``mac`` = HMAC-SHA256(secret, record hash), so a
person or process that can edit the ledger file but cannot read this key cannot
rewrite the ledger into a smaller spend that still verifies (recomputing a plain
checksum is no longer enough). The key file holds one line: 64 lowercase hex
characters. It is created on first use with mode 0600 (``O_EXCL``: never
readable by others, not even briefly) — but only for a ledger that holds no
authenticated record yet: a missing key next to a MAC'd ledger is an error,
never a silent re-key (see :mod:`client.dp.ledger`).

Where it lives: ``FEDSYNTH_SITE_LEDGER_KEY``, else ``ledger.key`` beside the
ledger. Keep it out of the backups of the output directory if those are less
protected than the site itself, and back it up with the signing key; rotation is
``fedsynth-site ledger rotate-key`` (docs/hospital-it.md).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

from shared.atomic import PRIVATE, fsync_dir, write_new
from shared.errors import LedgerError, Problem

KEY_BYTES = 32
_HEX = re.compile(r"^[0-9a-f]{64}$")


def default_key_path(ledger_path: Path) -> Path:
    """``ledger.key`` in the ledger's directory (``<output_dir>/ledger.key`` by default)."""
    return Path(ledger_path).parent / "ledger.key"


def key_id(key: bytes) -> str:
    """A public 16-hex-digit name for ``key`` (goes into audit entries; reveals nothing of it)."""
    return hashlib.sha256(b"fedsynth-ledger-key-id\0" + key).hexdigest()[:16]


def mac(key: bytes, record_hash: str) -> str:
    """HMAC-SHA256 of a record's hash (hex) under the site's ledger key, hex."""
    return hmac.new(key, b"fedsynth-ledger-v2\0" + bytes.fromhex(record_hash), hashlib.sha256).hexdigest()


def mac_ok(key: bytes, record_hash: str, tag: str) -> bool:
    """Constant-time check of ``tag`` against :func:`mac`."""
    return hmac.compare_digest(mac(key, record_hash), tag)


def read_key(path: Path) -> bytes:
    """The key in ``path``; LedgerError naming the file when it is unreadable or malformed."""
    try:
        text = Path(path).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not an ASCII key file"
        raise LedgerError(f"cannot read the ledger key {path}: {reason}",
                          [Problem(str(path), reason)]) from None
    if not _HEX.match(text):
        raise LedgerError(f"ledger key {path} is malformed (expected 64 lowercase hex characters)",
                          [Problem(str(path), "malformed ledger key")])
    return bytes.fromhex(text)


def write_new_key(path: Path) -> bytes:
    """Create ``path`` with a fresh random key (mode 0600, fsynced); FileExistsError if present.

    The key is written to a private temporary file and hard-linked into place, so a
    concurrent reader sees either no key file or the whole key, never an empty one.
    """
    key = secrets.token_bytes(KEY_BYTES)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    write_new(tmp, key.hex().encode("ascii") + b"\n", mode=PRIVATE)
    try:
        os.link(tmp, path)  # fails with FileExistsError when another process won the race
    finally:
        tmp.unlink()
    fsync_dir(path.parent)
    return key
