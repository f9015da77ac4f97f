"""Crash-safe file writes: after a crash (kill -9, power loss) a path holds its old bytes or its new ones.

One home for the pattern every durable rewrite uses (reports, checkpoints, keys, the
ledger's rotate-key / recover / migration rewrites, the coordinator's registries):

1. write the new bytes to a temporary file *in the same directory* (``os.replace`` is only
   atomic within one file system), created with the final file's mode so a private file is
   never readable by others, not even briefly;
2. ``fsync`` the temporary file, so its bytes are on disk before its name is;
3. ``os.replace`` it over the target (atomic: readers see the old file or the new one);
4. ``fsync`` the directory, so the rename itself survives a power cut.

A crash before step 3 leaves the old file and a stray ``.<name>.<random>.tmp`` beside it
(``fedsynth-verify`` skips ``*.tmp``); a crash after it leaves the new file. Never a torn one.

Append-only logs (the privacy ledger, the audit log) do not use this: they append one
``write`` per record and repair a torn last line on open. This module is for whole-file
rewrites only.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterable
from pathlib import Path

__all__ = ["fsync_dir", "write_atomic", "write_new", "replace_dir"]

#: Mode of a file nobody but its owner may read (keys, ledgers, private caches).
PRIVATE = 0o600


def fsync_dir(path: Path) -> None:
    """Flush directory ``path``'s entries (a rename or a new name in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_fd(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
    os.fsync(fd)


def write_atomic(path: Path, data: bytes | str, *, mode: int = 0o644) -> Path:
    """Replace ``path`` by ``data`` atomically and durably; returns ``path``.

    ``data`` as ``str`` is written UTF-8. ``mode`` is the new file's permission bits at
    creation (less the process umask, which can only remove bits): pass ``PRIVATE``
    (0o600) for anything that holds a secret or personal data. The parent directory must
    exist. On any error the temporary file is removed and the old ``path`` is untouched.
    """
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            _write_fd(fd, raw)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_new(path: Path, data: bytes, *, mode: int = PRIVATE) -> Path:
    """Create ``path`` holding ``data`` (fsynced, name fsynced); FileExistsError if it exists.

    For files set aside once and never rewritten (a torn ledger tail, a pre-migration
    backup): exclusive creation means an earlier copy is never overwritten.
    """
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        _write_fd(fd, bytes(data))
    finally:
        os.close(fd)
    fsync_dir(path.parent)
    return path


def replace_dir(tmp: Path, final: Path, files: Iterable[str]) -> Path:
    """Publish the folder ``tmp`` as ``final``: fsync ``files`` in it, swap it in, fsync the parent.

    ``tmp`` must be a sibling of ``final`` (same file system). An existing ``final`` (a rerun
    of the same round) is removed first; a crash between that and the rename leaves no
    ``final`` (callers treat a missing folder as "not written yet"), never a half-written one.
    """
    for name in files:
        fd = os.open(Path(tmp) / name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    return final
