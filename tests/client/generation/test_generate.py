"""Generation: reproducibility, prompts, reasoning stripping, validation."""

from __future__ import annotations

import pytest
import torch

from client.generation.generate import check_sampling, generate_reports, strip_reasoning
from client.model import tiny_random_model
from client.prompt import build_prompt
from shared.errors import ConfigError
from shared.run_config import GenerateConfig


@pytest.fixture(scope="module")
def tiny():
    return tiny_random_model("llama", seed=1)


def _run(tiny, **kw):
    model, tok = tiny
    args = {
        "n_per_code": 2,
        "sampling": GenerateConfig(max_new_tokens=8, seed=7),
        "setting": "zero-shot",
        "model_id": "tiny-llama",
        "batch_size": 4,
    }
    args.update(kw)
    return generate_reports(model, tok, ["F32.1", "f20"], **args)


def test_same_seed_same_reports_and_rng_untouched(tiny):
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = _run(tiny)
    after = torch.rand(1)
    assert torch.equal(before, after)  # the caller's RNG stream is not consumed
    b = _run(tiny)
    assert a == b
    assert len(a) == 4 and [r.code for r in a] == ["F32.1"] * 2 + ["F20"] * 2
    c = _run(tiny, sampling=GenerateConfig(max_new_tokens=8, seed=8))
    assert [r.text for r in c] != [r.text for r in a]
    assert {r.report_id for r in a}.isdisjoint({r.report_id for r in c})


def test_provenance_and_only_new_tokens(tiny):
    reports = _run(tiny, setting="adapter", adapter_hash="ab" * 32)
    r = reports[0]
    assert r.setting == "adapter" and r.adapter_hash == "ab" * 32 and r.model_id == "tiny-llama"
    assert r.seed == 7 and r.sampling["max_new_tokens"] == 8 and r.sampling["temperature"] == 0.8
    # The prompt (instruction with the code's title) is not echoed back.
    assert all("Write a psychiatric evaluation report" not in x.text for x in reports)
    # Greedy known answer: the report is exactly the decoded continuation of the prompt.
    model, tok = tiny
    [greedy] = _run(tiny, n_per_code=1, sampling=GenerateConfig(temperature=0, max_new_tokens=8))[:1]
    prompt = build_prompt("F32.1", tok)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = model.generate(ids, do_sample=False, max_new_tokens=8, pad_token_id=tok.pad_token_id)
    assert greedy.text == tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
    assert greedy.text != tok.decode(out[0], skip_special_tokens=True).strip()


def test_greedy_is_batch_independent_and_progress_is_reported(tiny):
    seen = []
    greedy = GenerateConfig(temperature=0, max_new_tokens=6)
    a = _run(tiny, sampling=greedy, batch_size=1, progress=lambda d, t: seen.append((d, t)))
    b = _run(tiny, sampling=greedy, batch_size=4)
    assert [x.text for x in a] == [x.text for x in b]
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_sampling_validation_lists_every_problem():
    with pytest.raises(ConfigError) as err:
        check_sampling(
            GenerateConfig(temperature=-1, top_p=0, top_k=-2, repetition_penalty=0, max_new_tokens=0, seed=-1)
        )
    assert {p.where for p in err.value.problems} == {
        "temperature",
        "top_p",
        "top_k",
        "repetition_penalty",
        "max_new_tokens",
        "seed",
    }
    with pytest.raises(ConfigError):
        check_sampling(GenerateConfig(max_new_tokens=True))
    check_sampling(GenerateConfig(temperature=0, top_p=1.0, top_k=50))  # valid edge values
    check_sampling(GenerateConfig(seed=2**40))  # a site-drawn evaluation seed (40 bits) is fine


def test_request_validation(tiny):
    model, tok = tiny
    with pytest.raises(ConfigError) as err:
        generate_reports(
            model,
            tok,
            ["F32.1", "XYZ"],
            n_per_code=0,
            batch_size=0,
            sampling=GenerateConfig(),
            setting="adapter",
            model_id="",
        )
    wheres = sorted(p.where for p in err.value.problems)
    assert wheres == ["adapter_hash", "batch_size", "codes", "model_id", "n_per_code"]
    with pytest.raises(ConfigError, match="adapter_hash"):
        _run(tiny, adapter_hash="abc")  # zero-shot must not claim an adapter


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("<think>plan the report</think>\n\nHistory: low mood.", "History: low mood."),
        ("  History: ok. ", "History: ok."),
        ("<think>a</think>Plan: A.<think>b</think> Done.", "Plan: A. Done."),
        ("reasoning from the prompt's open tag</think>\nDiagnosis: F32.1", "Diagnosis: F32.1"),
        ("<think>cut off mid-trace, never closed", ""),
        ("\n <think>\nstill thinking", ""),
        ("Plan: review.\n<think>trailing unterminated", "Plan: review."),
        ("", ""),
    ],
)
def test_strip_reasoning(raw, clean):
    assert strip_reasoning(raw) == clean


def test_fast_path_failure_falls_back_to_plain_generate(tiny, monkeypatch, caplog):
    """Item 2: a fast path that raises (e.g. transformers 5.17's missing out.cache) must not
    take site generation down: reports come from plain generate, with a warning and a log."""
    from client.generation import fast as fast_generate

    def broken(*args, **kwargs):
        raise AttributeError("'CausalLMOutputWithPast' object has no attribute 'cache'")

    monkeypatch.setattr(fast_generate, "generate_texts", broken)
    greedy = GenerateConfig(temperature=0, max_new_tokens=6)
    with pytest.warns(UserWarning, match="fast generation unavailable .*AttributeError"):
        with caplog.at_level("WARNING", logger="client.generation.generate"):
            reports = _run(tiny, sampling=greedy, fast=True)
    assert reports == _run(tiny, sampling=greedy)
    assert any("AttributeError" in r.getMessage() for r in caplog.records)


def test_generation_batch_size_setting_and_device_default(tiny, monkeypatch):
    from client.generation.generate import CPU_BATCH_SIZE, GPU_BATCH_SIZE, generation_batch_size
    from shared.settings import SiteSettings, load_settings

    assert generation_batch_size(None, "cuda") == GPU_BATCH_SIZE == 64
    assert generation_batch_size(None, "cpu") == CPU_BATCH_SIZE == 16
    assert generation_batch_size(24, "cuda") == 24
    assert SiteSettings().generation_batch_size is None
    monkeypatch.setenv("FEDSYNTH_SITE_GENERATION_BATCH_SIZE", "32")
    assert load_settings(SiteSettings).generation_batch_size == 32
    monkeypatch.setenv("FEDSYNTH_SITE_GENERATION_BATCH_SIZE", "0")
    with pytest.raises(ConfigError, match="invalid SiteSettings") as err:
        load_settings(SiteSettings)
    assert "GENERATION_BATCH_SIZE" in str(err.value.problems)
    # None reaches generate_reports as "the device's default": same reports as batch 16 on CPU.
    assert _run(tiny, batch_size=None) == _run(tiny, batch_size=16)
