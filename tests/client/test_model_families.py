"""Model families as hospitals stage them: tiny random checkpoints on disk with the
release's generation_config.json and tokenizer files (tests/client/model_families.py)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from client.generation.generate import generate_reports
from client.model import add_lora, default_lora_targets, eos_token_ids, family_of, load_model
from client.prompt import build_prompt, opens_reasoning
from shared.run_config import GenerateConfig
from tests.client.model_families import RELEASES, script_model, write_release

GREEDY = GenerateConfig(temperature=0, max_new_tokens=6)
EXPECTED_FAMILY = {
    "llama3-instruct": "llama", "llama3-base": "llama", "openbiollm": "llama",
    "r1-distill-llama": "llama", "r1-distill-qwen": "qwen2", "qwen2.5": "qwen2",
    "qwen3": "qwen3", "qwen3.5": "qwen3_5", "qwen3-next": "qwen3_next", "mistral": "mistral",
}


@pytest.fixture(scope="module")
def release_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("releases")
    return {name: write_release(name, root / name) for name in RELEASES}


def _gen(model, tok, **kw):
    args = {"n_per_code": 1, "sampling": GREEDY, "setting": "zero-shot", "model_id": "tiny"}
    return generate_reports(model, tok, ["F32.1"], **{**args, **kw})


@pytest.mark.parametrize("name", list(RELEASES))
def test_release_loads_offline_trains_and_generates(name, release_dirs):
    release = RELEASES[name]
    model, tok = load_model(release_dirs[name])
    assert family_of(model) == EXPECTED_FAMILY[name]
    # the staged weights were loaded (Qwen3.5: out of the multimodal wrapper), not re-initialised
    with safe_open(str(release_dirs[name] / "model.safetensors"), "pt") as f:
        (key,) = [k for k in f.keys() if k.endswith("embed_tokens.weight")]
        assert torch.equal(f.get_tensor(key), model.get_input_embeddings().weight)
    # generation_config.json's eos list is honoured, the tokenizer's eos included.
    gen_eos = [tok.convert_tokens_to_ids(t) for t in release.gen_eos]
    assert eos_token_ids(model, tok)[: len(gen_eos)] == gen_eos
    assert tok.convert_tokens_to_ids(release.eos) in eos_token_ids(model, tok)
    # BOS exactly when the release adds it (and only once).
    ids = tok(build_prompt("F32.1", tok), add_special_tokens=False)["input_ids"]
    if release.adds_bos:
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    else:
        assert tok.bos_token_id is None or tok.bos_token_id not in ids
    # Trainable: default LoRA targets exist and gradients reach only LoRA weights.
    peft = add_lora(model, r=2, alpha=4)
    wrapped = {n.rsplit(".", 1)[-1] for n, m in peft.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == set(default_lora_targets(model))
    batch = torch.tensor([ids[:12]])
    peft.train()
    peft(input_ids=batch, labels=batch).loss.backward()
    grads = [n for n, p in peft.named_parameters() if p.grad is not None]
    assert grads and all("lora_" in n for n in grads)
    peft.eval()
    if opens_reasoning(build_prompt("F32.1", tok)):
        return  # R1-Distill: a random model never closes its trace; scripted tests below
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reports = _gen(peft, tok)
    assert len(reports) == 1 and reports[0].code == "F32.1"


def test_llama3_base_prompt_starts_with_bos(release_dirs):
    _, tok = load_model(release_dirs["llama3-base"])
    assert not tok.chat_template
    prompt = build_prompt("F20", tok)
    assert prompt.startswith("<|begin_of_text|>") and prompt.count("<|begin_of_text|>") == 1


def _scripted(name: str, release_dirs, words: list[str], *, loop: str):
    """The release's model scripted to emit ``words`` after the prompt, then ``loop`` forever."""
    model, tok = load_model(release_dirs[name])
    last = tok(build_prompt("F32.1", tok), add_special_tokens=False)["input_ids"][-1]
    seq = [last] + [tok.convert_tokens_to_ids(w) for w in words]
    loop_id = tok.convert_tokens_to_ids(loop)
    table = dict(zip(seq[:-1], seq[1:], strict=True))
    table.setdefault(seq[-1], loop_id)
    table.setdefault(loop_id, loop_id)
    script_model(model, table)
    return model, tok


def _word(tok, i: int) -> str:
    """The ``i``-th plain word-piece of the vocabulary (ASCII letters, not special)."""
    vocab = tok.get_vocab()
    pieces = sorted((v, t) for t, v in vocab.items() if t.isascii() and t.isalpha() and len(t) >= 2)
    return pieces[i][1]


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("name", ["openbiollm", "llama3-instruct"])
def test_generation_stops_at_eot_listed_in_generation_config(name, fast, release_dirs):
    """OpenBioLLM's tokenizer names <|end_of_text|>; the turn ends with <|eot_id|>,
    which only generation_config.json lists. Generation must stop there."""
    probe = load_model(release_dirs[name])[1]
    a, b, c = _word(probe, 1), _word(probe, 2), _word(probe, 3)
    model, tok = _scripted(name, release_dirs, [a, b, "<|eot_id|>", c], loop=c)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (report,) = _gen(model, tok, sampling=GenerateConfig(temperature=0, max_new_tokens=8), fast=fast)
    expected = tok.convert_tokens_to_string([a, b]).strip()
    assert report.text == expected  # nothing after <|eot_id|>
    assert tok.convert_tokens_to_string([c]).strip() not in report.text


@pytest.mark.parametrize("name", ["r1-distill-llama", "r1-distill-qwen"])
def test_r1_distill_report_is_what_follows_the_closed_think_block(name, release_dirs):
    probe = load_model(release_dirs[name])[1]
    assert opens_reasoning(build_prompt("F32.1", probe))
    think, report = _word(probe, 1), _word(probe, 2)
    model, tok = _scripted(name, release_dirs, [think, "</think>", report, probe.eos_token], loop=report)
    (r,) = _gen(model, tok)
    assert r.text == tok.convert_tokens_to_string([report]).strip()


@pytest.mark.parametrize("name", ["r1-distill-llama", "r1-distill-qwen"])
def test_r1_distill_unclosed_trace_is_a_failed_report_not_a_report(name, release_dirs):
    probe = load_model(release_dirs[name])[1]
    think = _word(probe, 1)
    model, tok = _scripted(name, release_dirs, [think], loop=think)  # never closes
    with pytest.warns(UserWarning, match=r"1 of 1 reports failed: .*did not close"):
        reports = _gen(model, tok)
    assert reports == []


@pytest.fixture
def long_trace(release_dirs):
    probe = load_model(release_dirs["r1-distill-llama"])[1]
    words = [_word(probe, i) for i in range(1, 6)]  # a 5-token trace, then </think>, report
    report = _word(probe, 9)
    model, tok = _scripted(
        "r1-distill-llama", release_dirs, [*words, "</think>", report, probe.eos_token], loop=report
    )
    return model, tok, report


def test_r1_distill_cut_off_trace_gets_twice_the_room(long_trace):
    model, tok, report = long_trace
    # 4 new tokens cut the trace off; the retry with 8 reaches </think> and the report.
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "failed" warning: the retry succeeded
        (r,) = _gen(model, tok, sampling=GenerateConfig(temperature=0, max_new_tokens=4))
    assert r.text == tok.convert_tokens_to_string([report]).strip()


def test_qwen3_thinking_disabled_is_not_an_open_trace(release_dirs):
    _, tok = load_model(release_dirs["qwen3"])
    prompt = build_prompt("F32.1", tok)
    assert "<think>\n\n</think>" in prompt and not opens_reasoning(prompt)
