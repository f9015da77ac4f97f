"""The array + manifest cache: reused only when intact and made for this key; manifest written last."""

from __future__ import annotations

import json
import stat

import numpy as np

from client.evaluate.array_cache import load_cached, save_cached


def _valid(a: np.ndarray) -> bool:
    return a.dtype == np.float64 and a.shape == (3,)


def test_round_trip_and_owner_only(tmp_path) -> None:
    npy, manifest = tmp_path / "x.npy", tmp_path / "x.json"
    save_cached(npy, manifest, np.array([1.0, 2.0, 3.0]), {"key": "k", "n": 3})
    assert load_cached(npy, manifest, key_field="key", key="k", n=3, valid=_valid).tolist() == [1.0, 2.0, 3.0]
    assert list(json.loads(manifest.read_text())) == ["key", "n", "npy_sha256"]
    assert stat.S_IMODE(npy.stat().st_mode) == stat.S_IMODE(manifest.stat().st_mode) == 0o600


def test_other_key_count_altered_file_bad_shape_or_nan_is_a_miss(tmp_path) -> None:
    npy, manifest = tmp_path / "x.npy", tmp_path / "x.json"
    save_cached(npy, manifest, np.array([1.0, 2.0, 3.0]), {"key": "k", "n": 3})
    assert load_cached(npy, manifest, key_field="key", key="other", n=3, valid=_valid) is None
    assert load_cached(npy, manifest, key_field="key", key="k", n=4, valid=_valid) is None
    assert load_cached(npy, manifest, key_field="content_hash", key="k", n=3, valid=_valid) is None
    assert load_cached(npy, manifest, key_field="key", key="k", n=3, valid=lambda a: a.ndim == 2) is None
    npy.write_bytes(npy.read_bytes()[:-8])  # truncated after the manifest was written
    assert load_cached(npy, manifest, key_field="key", key="k", n=3, valid=_valid) is None
    save_cached(npy, manifest, np.array([1.0, np.nan, 3.0]), {"key": "k", "n": 3})
    assert load_cached(npy, manifest, key_field="key", key="k", n=3, valid=_valid) is None
    manifest.write_text("{not json")
    assert load_cached(npy, manifest, key_field="key", key="k", n=3, valid=_valid) is None
    assert load_cached(tmp_path / "missing.npy", tmp_path / "missing.json", key_field="key", key="k", n=3,
                       valid=_valid) is None
