"""client/evaluate/base_losses.py: the base model's per-note losses, cached at the site."""

import stat

import numpy as np
import pytest
import torch

from client.evaluate import base_losses
from client.evaluate.base_losses import base_model_hash, base_note_losses
from client.evaluate.membership import per_note_losses
from client.model import add_lora, tiny_random_model
from shared.errors import InputError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NOTES = [
    ("F32", "Presenting complaint\nLow mood for six weeks, poor sleep, withdrawn from friends."),
    ("F41.1", "Presenting complaint\nWorry most days, restless, tense, trouble concentrating."),
    ("F20", "Presenting complaint\nHears voices commenting, believes neighbours watch him."),
]


@pytest.fixture
def peft_model():
    model, tok = tiny_random_model("llama", seed=0)
    peft = add_lora(model, r=4, alpha=8)
    with torch.no_grad():  # a non-zero adapter, so adapter-on and adapter-off losses differ
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return peft, tok


def _uncached(model, tok, notes):
    with model.disable_adapter():
        return per_note_losses(model, tok, notes)


def test_cached_equals_uncached_and_is_read_back(peft_model, tmp_path, monkeypatch):
    model, tok = peft_model
    first = base_note_losses(model, tok, NOTES, cache_dir=tmp_path, name="base")
    np.testing.assert_array_equal(first, _uncached(model, tok, NOTES))
    assert not np.allclose(first, per_note_losses(model, tok, NOTES))  # the adapter is off for these

    def fail(*a, **k):
        raise AssertionError("recomputed although the cache matches")

    monkeypatch.setattr(base_losses, "per_note_losses", fail)
    again = base_note_losses(model, tok, NOTES, cache_dir=tmp_path, name="base")
    np.testing.assert_array_equal(again, first)
    assert again.dtype == np.float64


def test_training_the_adapter_keeps_the_cache_valid(peft_model, tmp_path, monkeypatch):
    model, tok = peft_model
    h = base_model_hash(model)
    base_note_losses(model, tok, NOTES, cache_dir=tmp_path, name="base")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.add_(1.0)
    assert base_model_hash(model) == h
    monkeypatch.setattr(base_losses, "per_note_losses", lambda *a, **k: pytest.fail("recomputed"))
    base_note_losses(model, tok, NOTES, cache_dir=tmp_path, name="base")


def test_changed_base_weights_invalidate(peft_model, tmp_path):
    model, tok = peft_model
    before = base_note_losses(model, tok, NOTES, cache_dir=tmp_path, name="base")
    h = base_model_hash(model)
    with torch.no_grad():
        model.get_base_model().model.embed_tokens.weight[5, 0] += 1.0  # one base weight
    assert base_model_hash(model) != h
    after = base_note_losses(model, tok, NOTES, cache_dir=tmp_path, name="base")
    np.testing.assert_array_equal(after, _uncached(model, tok, NOTES))
    assert not np.array_equal(after, before)


@pytest.mark.parametrize("change", ["text", "code", "order", "drop"])
def test_changed_notes_invalidate(peft_model, tmp_path, change):
    model, tok = peft_model
    base_note_losses(model, tok, NOTES, cache_dir=tmp_path, name="base")
    notes = list(NOTES)
    if change == "text":
        notes[1] = (notes[1][0], notes[1][1] + " Sleeps poorly.")
    elif change == "code":
        notes[0] = ("F33", notes[0][1])
    elif change == "order":
        notes = notes[::-1]
    else:
        notes = notes[:2]
    got = base_note_losses(model, tok, notes, cache_dir=tmp_path, name="base")
    np.testing.assert_array_equal(got, _uncached(model, tok, notes))


def test_corrupt_cache_is_recomputed(peft_model, tmp_path):
    model, tok = peft_model
    first = base_note_losses(model, tok, NOTES, cache_dir=tmp_path, name="base")
    npy = tmp_path / "base.npy"
    npy.write_bytes(npy.read_bytes()[:-8])
    np.testing.assert_array_equal(base_note_losses(model, tok, NOTES, cache_dir=tmp_path, name="base"), first)


def test_cache_files_are_owner_only_in_the_site_cache(peft_model, tmp_path):
    model, tok = peft_model
    cache = tmp_path / "output" / "cache"
    base_note_losses(model, tok, NOTES, cache_dir=cache, name="mia-base-train")
    assert sorted(p.name for p in cache.iterdir()) == ["mia-base-train.json", "mia-base-train.npy"]
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    for p in cache.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert "Presenting" not in (cache / "mia-base-train.json").read_text()  # hashes only, no note text


def test_input_validated(peft_model, tmp_path):
    model, tok = peft_model
    with pytest.raises(InputError) as err:
        base_note_losses(model.get_base_model(), tok, "notes", cache_dir=tmp_path, name="../x")
    assert {p.where for p in err.value.problems} == {"model", "name", "notes_codes_texts"}
