"""Site-local caches of one numpy array plus a JSON manifest that says what it was computed from.

Used for per-note base-model losses (:mod:`client.evaluate.base_losses`) and text
embeddings (:mod:`client.evaluate.embeddings`). The manifest holds the cache key,
the row count and the array file's sha256; it is written after the array, so a
crash between the two writes leaves a manifest that does not match, and the
cache is recomputed. Both files hold derivatives of private notes: they are
written owner-only and must stay at the site.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from shared.atomic import PRIVATE, write_atomic
from shared.signing import sha256_file


def load_cached(
    npy: Path, manifest: Path, *, key_field: str, key: str, n: int, valid: Callable[[np.ndarray], bool]
) -> np.ndarray | None:
    """The cached array when present, intact (its sha256 matches the manifest), made for exactly
    ``key`` (the manifest's ``key_field``) and ``n`` rows, ``valid`` (dtype, shape) and finite; else None."""
    try:
        meta = json.loads(manifest.read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or meta.get(key_field) != key or meta.get("n") != n:
            return None
        if meta.get("npy_sha256") != sha256_file(npy):
            return None  # truncated or altered after it was written
        arr = np.load(npy, allow_pickle=False)
    except (OSError, ValueError, json.JSONDecodeError):
        return None
    if not valid(arr) or not np.isfinite(arr).all():
        return None
    return arr


def save_cached(npy: Path, manifest: Path, arr: np.ndarray, meta: Mapping[str, Any]) -> None:
    """Write ``arr`` to ``npy`` and then ``meta`` plus the array file's sha256 to ``manifest``
    (owner-only, each atomically)."""
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    write_atomic(npy, buf.getvalue(), mode=PRIVATE)
    # Manifest last: a crash between the two writes leaves a manifest that does not match.
    body = {**meta, "npy_sha256": sha256_file(npy)}
    write_atomic(manifest, json.dumps(body, indent=1).encode("utf-8"), mode=PRIVATE)
