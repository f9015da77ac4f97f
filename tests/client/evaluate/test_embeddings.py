"""The packaged MiniLM embedder, the site embedding cache, and embedding metrics on real text."""

import json
import stat

import numpy as np
import pytest
import torch

from client.evaluate.diversity import vendi_score
from client.evaluate.embeddings import Embedder, content_hash, default_model_dir, embed_cached
from client.evaluate.fidelity import centroid_similarity, real_classifier_f1
from shared.errors import InputError, ModelError

TEXTS = {
    "F32": [
        "Low mood for months, tearful, no pleasure in anything, early waking and poor appetite.",
        "She feels hopeless and worthless, has lost weight and cannot get out of bed.",
        "Persistent sadness, anhedonia, fatigue and thoughts that life is not worth living.",
        "Depressed mood most of the day with loss of interest and poor concentration.",
    ],
    "F41.1": [
        "Constant worry about everything, muscle tension and restlessness for over a year.",
        "He cannot stop worrying about work and family, feels on edge and sleeps badly.",
        "Excessive anxiety most days, irritability, difficulty controlling the worry.",
        "Generalised nervousness with trembling, sweating and a sense of dread.",
    ],
    "F20": [
        "Hears voices commenting on his actions and believes neighbours control his thoughts.",
        "Paranoid delusions that the television sends her messages, flat affect.",
        "Auditory hallucinations, thought insertion and disorganised speech.",
        "Believes he is being followed by agents and hears them talking about him.",
    ],
}


@pytest.fixture(scope="module")
def embedder():
    # One thread: on a shared CPU, thread hand-off costs more than it buys for a few short texts.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Embedder(batch_size=16)
    torch.set_num_threads(before)


def labelled():
    codes = [c for c, ts in TEXTS.items() for _ in ts]
    texts = [t for ts in TEXTS.values() for t in ts]
    return texts, codes


def test_default_model_is_the_packaged_minilm():
    assert (default_model_dir() / "model.safetensors").is_file()
    with pytest.raises(ModelError):
        Embedder(default_model_dir().parent / "no-such-model")


def test_embed_shape_dtype_and_unit_norm(embedder):
    emb = embedder.embed(["a short note", "another, longer note about sleep"])
    assert emb.dtype == np.float32 and emb.shape == (2, embedder.dimension) == (2, 384)
    assert np.linalg.norm(emb, axis=1) == pytest.approx([1.0, 1.0], abs=1e-5)
    assert embedder.embed([]).shape == (0, 384)
    with pytest.raises(InputError):
        embedder.embed(["ok", 3])


def test_cache_reused_then_invalidated_by_changed_text(embedder, tmp_path, monkeypatch):
    texts = ["note one about mood", "note two about worry"]
    first = embed_cached(embedder, texts, cache_dir=tmp_path, name="private")
    assert stat.S_IMODE((tmp_path / "private.npy").stat().st_mode) == 0o600
    calls = []
    real_embed = embedder.embed
    monkeypatch.setattr(embedder, "embed", lambda t: calls.append(list(t)) or real_embed(t))
    again = embed_cached(embedder, texts, cache_dir=tmp_path, name="private")
    assert calls == [] and np.array_equal(first, again)
    changed = embed_cached(embedder, [texts[0], texts[1] + "!"], cache_dir=tmp_path, name="private")
    assert len(calls) == 1 and not np.array_equal(changed[1], first[1])
    # Order is part of the content: swapped notes are not the same cache.
    embed_cached(embedder, texts[::-1], cache_dir=tmp_path, name="private")
    assert len(calls) == 2
    meta = json.loads((tmp_path / "private.json").read_text())
    assert meta["content_hash"] == content_hash(texts[::-1], embedder.identity)


def test_corrupt_cache_is_recomputed_not_trusted(embedder, tmp_path, monkeypatch):
    texts = ["note one about mood", "note two about worry"]
    good = embed_cached(embedder, texts, cache_dir=tmp_path, name="c")
    # Same shape, different numbers, manifest untouched: caught by the file hash.
    np.save(tmp_path / "c.npy", np.zeros_like(good))
    assert np.array_equal(embed_cached(embedder, texts, cache_dir=tmp_path, name="c"), good)
    (tmp_path / "c.npy").write_bytes(b"not numpy")
    assert np.array_equal(embed_cached(embedder, texts, cache_dir=tmp_path, name="c"), good)
    (tmp_path / "c.json").write_text("{broken")
    assert np.array_equal(embed_cached(embedder, texts, cache_dir=tmp_path, name="c"), good)
    with pytest.raises(InputError):
        embed_cached(embedder, texts, cache_dir=tmp_path, name="../escape")


def test_content_hash_depends_on_model_and_boundaries():
    assert content_hash(["ab", "c"], "m") != content_hash(["a", "bc"], "m")
    assert content_hash(["ab"], "m1") != content_hash(["ab"], "m2")


def test_minilm_centroids_separate_codes_and_mislabels_collapse(embedder):
    texts, codes = labelled()
    emb = embedder.embed(texts)
    # Leave-one-out per text: synthetic = each text, real = the others.
    shares, wrong = [], []
    order = list(TEXTS)
    for i in range(len(texts)):
        keep = [j for j in range(len(texts)) if j != i]
        real, rc = emb[keep], [codes[j] for j in keep]
        shares.append(centroid_similarity(real, rc, emb[i : i + 1], [codes[i]]).own_nearest_share)
        other = order[(order.index(codes[i]) + 1) % 3]
        wrong.append(centroid_similarity(real, rc, emb[i : i + 1], [other]).own_nearest_share)
    assert np.mean(shares) >= 0.9 and np.mean(wrong) <= 0.1
    f1 = real_classifier_f1(emb, codes, emb, codes).macro_f1
    shifted = [order[(order.index(c) + 1) % 3] for c in codes]
    assert f1 > 0.9 and real_classifier_f1(emb, codes, emb, shifted).macro_f1 < 0.1


def test_vendi_of_minilm_embeddings(embedder):
    texts, _ = labelled()
    diverse = vendi_score(embedder.embed(texts))
    repeated = vendi_score(embedder.embed([texts[0]] * 12))
    assert repeated == pytest.approx(1.0, abs=1e-3)
    assert diverse > 3.0
