"""The embedded default model: cached build, atomic write, determinism, and (integration) quality."""

from __future__ import annotations

import json
import re

import pytest
import torch

from client import pretrain
from client.demo.data import public_texts
from client.generation.generate import generate_reports
from client.model import load_model
from client.prompt import SECTIONS
from shared import icd10
from shared.errors import ConfigError, UnknownCodeError
from shared.run_config import GenerateConfig


def test_build_is_cached_and_described(tmp_path):
    steps = []
    path = pretrain.ensure_embedded_model(
        cache=tmp_path, max_seconds=5, progress=lambda s, p, loss: steps.append((s, p, loss))
    )
    assert path.parent == tmp_path and path.name.startswith("embedded-")
    assert steps and steps[0][0] == 1
    build = json.loads((path / "BUILD.json").read_text())
    assert build["steps"] == steps[-1][0] >= 1
    assert build["seed"] == 0 and build["recipe"] == pretrain.RECIPE
    assert "never a site's notes" in build["trained_on"]
    assert build["final_loss"] > 0 and build["parameters"] < 10_000_000
    # Nothing but the finished model and its lock is left in the cache.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, f"{path.name}.lock"])

    again = []
    assert pretrain.ensure_embedded_model(cache=tmp_path, max_seconds=5, progress=lambda *a: again.append(a)) == path
    assert again == []  # the second call did not train

    model, tok = load_model(path)
    assert model.config.model_type == "llama" and tok.chat_template
    assert tok.eos_token_id is not None and tok.pad_token_id is not None and tok.bos_token_id is not None
    # Different seed, different build directory.
    assert pretrain._recipe_hash(1, 5.0) != pretrain._recipe_hash(0, 5.0)


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(pretrain, "build_embedded", boom)
    with pytest.raises(RuntimeError):
        pretrain.ensure_embedded_model(cache=tmp_path, max_seconds=5)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_same_step_count_same_weights(tmp_path):
    public = public_texts(seed=0, n=40)
    # A tiny time budget stops after the first step: same steps, same seed -> same weights.
    a = pretrain.build_embedded(public, tmp_path / "a", max_seconds=1e-3, seed=0)
    b = pretrain.build_embedded(public, tmp_path / "b", max_seconds=1e-3, seed=0)
    assert a["steps"] == b["steps"] == 1 and a["corpus_sha256"] == b["corpus_sha256"]
    ma, _ = load_model(tmp_path / "a")
    mb, _ = load_model(tmp_path / "b")
    for (n, x), (_, y) in zip(ma.state_dict().items(), mb.state_dict().items(), strict=True):
        assert torch.equal(x, y), n
    assert a["first_loss"] == b["first_loss"] > 0


def test_settings_validated(tmp_path):
    with pytest.raises(ConfigError) as err:
        pretrain.ensure_embedded_model(cache=tmp_path, max_seconds=0, seed=-1)
    assert {p.where for p in err.value.problems} == {"max_seconds", "seed"}


@pytest.mark.integration
def test_default_model_writes_reports():
    path = pretrain.ensure_embedded_model()
    build = json.loads((path / "BUILD.json").read_text())
    assert build["final_loss"] < build["first_loss"] / 2
    model, tok = load_model(path)
    codes = ["F32", "F20", "F10.2"]
    reports = generate_reports(
        model,
        tok,
        codes,
        n_per_code=2,
        sampling=GenerateConfig(temperature=0.7, max_new_tokens=320, seed=0),
        setting="zero-shot",
        model_id="embedded",
    )
    for r in reports:
        present = [s for s in SECTIONS if s in r.text]
        assert len(present) >= 5, (present, r.text)
    # Some diagnosis section names a chapter V code with its exact WHO title (the layout
    # and the code/title pairing were learnt; a model that had not learnt them: ~0). Which code: since the corpus also teaches the
    # sites' layouts, copying the prompt's code is build-dependent (a 369-step build named
    # it in 5 of 6 reports, a 280-step build in 0 of 6), so it is not asserted here.
    named = [r for r in reports if _names_a_code_with_its_title(r.text)]
    assert named, [r.text for r in reports]  # 1 of 6 (324 steps) to 3 of 6 (280 steps) in CI builds


def _names_a_code_with_its_title(text: str) -> bool:
    for code in re.findall(r"F\d\d(?:\.\d)?", text):
        try:
            title = icd10.describe(code)
        except UnknownCodeError:
            continue
        if f"{code} {title}" in text:
            return True
    return False


def _tokens_per_word(tokenizer, texts):
    tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    return tokens / sum(len(t.split()) for t in texts)


def test_tokenizer_shreds_another_generators_notes_less():
    # Notes from a generator the build never reads (other layout, specialty and vocabulary).
    from client.model import build_tokenizer
    from client.prompt import build_prompt
    from tests.client.evaluate.second_generator import make_notes

    public = pretrain._public_corpus(0)
    new = pretrain.embedded_tokenizer(public)
    # The tokenizer as built before: the demo's own text only, 3,072 tokens.
    texts = [t for _, t in public]
    old = build_tokenizer(
        texts + pretrain._title_texts() + list(SECTIONS) + [build_prompt(c, None) for c, _ in public[:200]],
        vocab_size=3072,
    )
    other = [n.text for n in make_notes(40, seed=0)]
    old_rate, new_rate = _tokens_per_word(old, other), _tokens_per_word(new, other)
    # Measured: old 2.27, new 2.19 tokens per word (WHO titles cover disease words; the rest of
    # these notes is general English and drug names, which a 4k vocabulary cannot all hold).
    assert old_rate > 2.23 > new_rate, (old_rate, new_rate)
    # The demo's own text is not split any finer (so the build's sequences are no longer).
    demo = texts[:300]
    assert _tokens_per_word(new, demo) <= _tokens_per_word(old, demo) + 0.005
