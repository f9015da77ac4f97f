"""Ed25519 keys and detached file signatures an auditor can check offline.

A site signs its privacy reports with its own key; the coordinator signs the
consortium report with its key. A signature lives beside the file as
``<file>.sig``: a one-line canonical JSON object

    {"algorithm":"ed25519","format":"fedsynth-sig/1","key_id":...,"sha256":...,"signature":...}

where ``signature`` is Ed25519 over the canonical JSON of every other field, so
every byte of the ``.sig`` file is covered (the file must also be exactly in
canonical form, so even whitespace edits fail). Keys are matched by
``key_id`` (a fingerprint of the public key), never by name: a name only says
whose key it is.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.atomic import PRIVATE, write_atomic, write_new
from shared.errors import ConfigError, InputError, Problem, VerificationError

SIG_FORMAT = "fedsynth-sig/1"
ALGORITHM = "ed25519"
_SIG_FIELDS = frozenset({"algorithm", "format", "key_id", "sha256", "signature"})


def public_key_path(private_key_path: Path) -> Path:
    """Where :func:`generate_key` puts the public half: ``<path>.pub``."""
    return private_key_path.with_name(private_key_path.name + ".pub")


def signature_path(path: Path) -> Path:
    """Where :func:`sign_file` puts the detached signature: ``<path>.sig``."""
    return path.with_name(path.name + ".sig")


def generate_key(path: Path, *, overwrite: bool = False) -> Path:
    """Write a new Ed25519 private key (PEM, PKCS#8, mode 0600) and ``<path>.pub`` (PEM).

    Returns the public key path. Refuses (ConfigError) when either file exists,
    unless ``overwrite``: replacing a site key silently would orphan every
    signature made with the old one.
    """
    path = Path(path)
    pub = public_key_path(path)
    existing = [p for p in (path, pub) if p.exists()]
    if existing and not overwrite:
        raise ConfigError(
            "refusing to overwrite an existing key (pass overwrite=True to replace it)",
            [Problem(str(p), "already exists") for p in existing],
        )
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    if overwrite and path.exists():
        path.unlink()
    # O_EXCL + mode at creation: the private key is never readable by others, not even briefly.
    write_new(path, private_pem, mode=PRIVATE)
    os.chmod(path, 0o600)  # umask may have removed bits, never added: make it exact
    write_atomic(pub, public_pem)
    return pub


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Load an Ed25519 private key (PEM or OpenSSH format, unencrypted).

    InputError when missing or not an Ed25519 key; ConfigError when the file is
    readable or writable by group/others (the message says how to fix it).
    """
    path = Path(path)
    try:
        st = path.stat()
        data = path.read_bytes()
    except OSError as exc:
        raise InputError("cannot read private key", [Problem(str(path), exc.strerror or str(exc))]) from None
    if os.name == "posix" and st.st_mode & 0o077:
        raise ConfigError(
            "private key permissions are too open",
            [
                Problem(
                    str(path),
                    f"mode {stat.S_IMODE(st.st_mode):04o} lets group/others read it; "
                    f"fix with: chmod 600 {path}",
                )
            ],
        )
    key: Any = None
    for loader in (serialization.load_pem_private_key, serialization.load_ssh_private_key):
        try:
            key = loader(data, password=None)
            break
        except (ValueError, TypeError, binascii.Error, UnsupportedAlgorithm):
            continue
    if not isinstance(key, Ed25519PrivateKey):
        raise InputError(
            "not an Ed25519 private key",
            [Problem(str(path), "expected an unencrypted PEM (PKCS#8) or OpenSSH Ed25519 key")],
        )
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Load an Ed25519 public key: PEM, OpenSSH (``ssh-ed25519 ...``) or base64 of the 32 raw bytes."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError("cannot read public key", [Problem(str(path), exc.strerror or str(exc))]) from None
    key: Any = None
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        try:
            key = serialization.load_ssh_public_key(data.strip())
        except (ValueError, TypeError, binascii.Error, UnsupportedAlgorithm):
            try:
                raw = base64.b64decode(data.strip(), validate=True)
                if len(raw) == 32:
                    key = Ed25519PublicKey.from_public_bytes(raw)
            except (ValueError, binascii.Error):
                key = None
    if not isinstance(key, Ed25519PublicKey):
        raise InputError(
            "not an Ed25519 public key",
            [Problem(str(path), "expected PEM, OpenSSH 'ssh-ed25519 ...' or base64 of 32 raw bytes")],
        )
    return key


def key_id(public_key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """Fingerprint of a key: first 16 hex digits of sha256 over the 32 raw public-key bytes."""
    if isinstance(public_key, Ed25519PrivateKey):
        public_key = public_key.public_key()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _check_finite(obj: Any, where: str = "$") -> None:
    if isinstance(obj, float) and not math.isfinite(obj):
        raise InputError("cannot encode as canonical JSON", [Problem(where, f"non-finite number {obj!r}")])
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise InputError("cannot encode as canonical JSON", [Problem(where, f"non-string key {k!r}")])
            _check_finite(v, f"{where}.{k}")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            _check_finite(v, f"{where}[{i}]")


def canonical_json(obj: Any) -> bytes:
    """The one byte encoding that is hashed and signed: sorted keys, no whitespace, UTF-8.

    NaN and infinities are refused (InputError): JSON has no spelling for them
    and two encoders would disagree.
    """
    _check_finite(obj)
    try:
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InputError("cannot encode as canonical JSON", [Problem("$", str(exc))]) from None
    return text.encode("utf-8")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sign_file(path: Path, key: Ed25519PrivateKey) -> Path:
    """Sign ``path`` with ``key``; write and return ``<path>.sig``."""
    path = Path(path)
    meta = {
        "algorithm": ALGORITHM,
        "format": SIG_FORMAT,
        "key_id": key_id(key),
        "sha256": sha256_file(path),
    }
    signature = key.sign(canonical_json(meta))
    sig = {**meta, "signature": base64.b64encode(signature).decode("ascii")}
    out = signature_path(path)
    write_atomic(out, canonical_json(sig) + b"\n")
    return out


def decode_b64_strict(text: Any) -> bytes | None:
    """Base64 decode that accepts only the canonical spelling (None otherwise).

    Plain b64decode ignores the unused low bits of the last character, so two
    spellings decode alike; re-encoding and comparing makes every byte count.
    """
    if not isinstance(text, str):
        return None
    try:
        raw = base64.b64decode(text, validate=True)
    except (ValueError, binascii.Error):
        return None
    return raw if base64.b64encode(raw).decode("ascii") == text else None


def _fail(path: Path, what: str) -> VerificationError:
    return VerificationError("signature verification failed", [Problem(str(path), what)])


def verify_file(path: Path, public_keys: Mapping[str, Ed25519PublicKey]) -> str:
    """Check ``<path>.sig`` against ``path``; return the signer's key_id.

    ``public_keys`` maps a name (e.g. a site id) to a key; the signer is found
    by fingerprint. Raises VerificationError naming the file and what is wrong:
    missing or malformed signature, unknown key, bad signature, or a file whose
    content changed after signing (hash mismatch).
    """
    path = Path(path)
    sig_path = signature_path(path)
    if not sig_path.exists():
        raise _fail(path, f"missing signature file {sig_path.name}")
    try:
        raw = sig_path.read_bytes()
    except OSError as exc:
        raise _fail(sig_path, f"cannot read signature: {exc.strerror or exc}") from None
    try:
        sig = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _fail(sig_path, "signature file is not valid JSON") from None
    if not isinstance(sig, dict) or set(sig) != _SIG_FIELDS:
        raise _fail(sig_path, f"signature file must have exactly the fields {sorted(_SIG_FIELDS)}")
    try:
        canonical = canonical_json(sig) + b"\n"
    except InputError:
        canonical = b""
    if raw != canonical:
        raise _fail(sig_path, "signature file is not in canonical form (edited after signing)")
    if sig["format"] != SIG_FORMAT or sig["algorithm"] != ALGORITHM:
        raise _fail(sig_path, f"unsupported signature format/algorithm {sig['format']!r}/{sig['algorithm']!r}")
    by_id = {key_id(k): (name, k) for name, k in public_keys.items()}
    if sig["key_id"] not in by_id:
        known = ", ".join(f"{n}={i}" for i, (n, _) in sorted(by_id.items())) or "none"
        raise _fail(sig_path, f"signed by unknown key {sig['key_id']!r} (known keys: {known})")
    signature = decode_b64_strict(sig["signature"])
    if signature is None or len(signature) != 64:
        raise _fail(sig_path, "signature is not canonical base64 of 64 bytes")
    meta = {k: v for k, v in sig.items() if k != "signature"}
    try:
        by_id[sig["key_id"]][1].verify(signature, canonical_json(meta))
    except InvalidSignature:
        raise _fail(sig_path, f"bad signature (key {sig['key_id']})") from None
    try:
        actual = sha256_file(path)
    except OSError as exc:
        raise _fail(path, f"cannot read signed file: {exc.strerror or exc}") from None
    if actual != sig["sha256"]:
        raise _fail(
            path,
            f"hash mismatch: content changed after signing (sha256 {actual[:16]}..., signed {str(sig['sha256'])[:16]}...)",
        )
    return str(sig["key_id"])


def key_names(public_keys: Mapping[str, Ed25519PublicKey]) -> dict[str, str]:
    """key_id -> name, for messages and for checking who signed what."""
    return {key_id(k): name for name, k in public_keys.items()}
