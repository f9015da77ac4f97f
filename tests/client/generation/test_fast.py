"""Fast generation path: equivalence with plain HF generate, refill, adapter merge (sampler: test_sampling.py)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from client.generation.fast import generate_token_ids, merged_lora, unsupported_reason
from client.generation.generate import generate_reports
from client.model import add_lora, tiny_random_model
from client.prompt import build_prompt
from shared.run_config import GenerateConfig

CODES = ["F32.1", "F20", "F41.1", "F31", "F10.2"]


def _sharp(family: str):
    """A tiny model whose greedy output depends on the context (default init is
    near-uniform and repeats one token, which would make equality vacuous)."""
    model, tok = tiny_random_model(family, seed=1)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model, tok


def _ids(tok, codes=CODES):
    return [tok(build_prompt(c, tok), add_special_tokens=False)["input_ids"] for c in codes]


def _hf_alone(model, prompt, *, eos, n):
    out = model.generate(
        torch.tensor([prompt]), do_sample=False, max_new_tokens=n, pad_token_id=0, eos_token_id=eos
    )[0, len(prompt) :].tolist()
    return out[: out.index(eos) + 1] if eos in out else out


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_greedy_equals_hf_generate_batched(family):
    model, tok = _sharp(family)
    prompts = [build_prompt(c, tok) for c in CODES[:3]]
    enc = tok(
        prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
    )
    ref = model.generate(
        **enc, do_sample=False, max_new_tokens=12, pad_token_id=tok.pad_token_id, eos_token_id=None
    )
    ref = ref[:, enc["input_ids"].shape[1] :].tolist()
    assert len({tuple(r) for r in ref}) == 3 and all(
        len(set(r)) > 3 for r in ref
    )  # not a degenerate model
    ours = generate_token_ids(
        model, _ids(tok, CODES[:3]), max_new_tokens=12, temperature=0, batch_size=3
    )
    assert ours == ref


def test_refill_matches_each_prompt_alone():
    model, tok = _sharp("qwen3")
    ids = _ids(tok)
    free_run = [_hf_alone(model, p, eos=-1, n=16) for p in ids]
    # An "EOS" that some greedy continuations hit early, so rows end at different steps.
    eos = Counter(t for r in free_run for t in r[:6]).most_common(1)[0][0]
    alone = [_hf_alone(model, p, eos=eos, n=16) for p in ids]
    lengths = [len(r) for r in alone]
    assert min(lengths) < 16 and max(lengths) == 16  # rows end at different steps
    stats: dict[str, int] = {}
    ours = generate_token_ids(
        model, ids, max_new_tokens=16, temperature=0, batch_size=2, eos_token_id=eos, stats=stats
    )
    assert ours == alone
    assert stats["prefills"] >= 3  # slots were refilled mid-run, not only at the start
    assert stats["steps"] < sum(lengths)  # two slots worked in parallel


def test_sampled_same_seed_same_tokens_and_refill_keeps_counts():
    model, tok = _sharp("llama")
    kw = dict(max_new_tokens=10, temperature=0.8, top_p=0.9, top_k=0, batch_size=2, eos_token_id=5)
    a = generate_token_ids(model, _ids(tok), seed=3, **kw)
    b = generate_token_ids(model, _ids(tok), seed=3, **kw)
    c = generate_token_ids(model, _ids(tok), seed=4, **kw)
    assert a == b and a != c
    assert all(1 <= len(x) <= 10 for x in a)
    assert all(5 not in x[:-1] for x in a)  # nothing after an EOS


def test_adapter_merged_for_generation_and_caller_model_unchanged():
    base, tok = _sharp("llama")
    peft = add_lora(base, r=4, alpha=8)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    before = {k: v.clone() for k, v in peft.state_dict().items()}
    ids = _ids(tok, CODES[:2])
    with_adapter = [_hf_alone(peft, p, eos=-1, n=10) for p in ids]  # plain PEFT forward, unmerged
    with peft.disable_adapter():
        without = [_hf_alone(peft, p, eos=-1, n=10) for p in ids]
    assert with_adapter != without  # the adapter matters
    with merged_lora(peft) as plain:
        assert unsupported_reason(plain) is None
        ours = generate_token_ids(plain, ids, max_new_tokens=10, temperature=0, batch_size=2)
    assert ours == with_adapter
    after = peft.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)  # bitwise, not just close
    assert not any(getattr(m, "merged", False) for m in peft.modules())


def test_generate_reports_fast_switch_and_fallback():
    model, tok = _sharp("qwen2")
    kw = dict(n_per_code=2, setting="zero-shot", model_id="tiny", batch_size=3)
    greedy = GenerateConfig(temperature=0, max_new_tokens=8)
    seen = []
    fast = generate_reports(
        model,
        tok,
        CODES[:3],
        sampling=greedy,
        fast=True,
        progress=lambda d, t: seen.append((d, t)),
        **kw,
    )
    plain = generate_reports(model, tok, CODES[:3], sampling=greedy, **kw)
    assert fast == plain  # same texts, ids, provenance
    assert seen[-1] == (6, 6) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    sampled = GenerateConfig(max_new_tokens=8, seed=1)
    a = generate_reports(model, tok, CODES[:3], sampling=sampled, fast=True, **kw)
    assert a == generate_reports(model, tok, CODES[:3], sampling=sampled, fast=True, **kw)
    assert [r.text for r in a] != [r.text for r in fast]

    hybrid, htok = tiny_random_model("qwen3_5", seed=1)
    assert "linear_attention" in unsupported_reason(hybrid)
    with pytest.warns(UserWarning, match="fast generation unavailable"):
        fell_back = generate_reports(hybrid, htok, ["F32.1"], sampling=greedy, fast=True, **kw)
    assert fell_back == generate_reports(hybrid, htok, ["F32.1"], sampling=greedy, **kw)


def test_attention_reads_kv_heads_once_and_greedy_unchanged(monkeypatch):
    """Grouped-query attention: every SDPA call gets the 2 K/V heads of the tiny GQA
    model (4 query heads), not K/V expanded to the query heads; tokens equal HF's."""
    model, tok = _sharp("llama")
    config = model.config
    assert config.num_attention_heads == 4 and config.num_key_value_heads == 2
    ids = _ids(tok, CODES[:3])
    ref = [_hf_alone(model, p, eos=-1, n=8) for p in ids]
    real = torch.nn.functional.scaled_dot_product_attention
    calls = []

    def spy(q, k, v, *args, **kwargs):
        calls.append((tuple(q.shape), tuple(k.shape), tuple(v.shape)))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    ours = generate_token_ids(model, ids, max_new_tokens=8, temperature=0, batch_size=3)
    assert ours == ref
    head_dim = config.hidden_size // config.num_attention_heads
    decode = [c for c in calls if c[0][2] == 2]  # one query token x 2 query heads per K/V head
    assert len(decode) == 7 * config.num_hidden_layers  # 7 decode steps after the prefill
    for q, k, v in calls:
        assert k[1] == v[1] == 2 and q[1] == 2, (q, k)  # K/V heads, queries grouped onto them
        assert q[3] == k[3] == head_dim
    assert all(q[0] == 3 for q, _, _ in decode)


def test_fast_path_never_calls_the_model_forward():
    """Item 2: the fast path does not go through model(..., cache=...), whose keyword and
    output field change across transformers versions (5.17 ignores cache= and has no
    out.cache); a model whose forward raises still decodes."""
    model, tok = _sharp("qwen2")
    ids = _ids(tok, CODES[:2])
    ref = generate_token_ids(model, ids, max_new_tokens=6, temperature=0, batch_size=2)

    def broken(*args, **kwargs):
        raise AttributeError("'CausalLMOutputWithPast' object has no attribute 'cache'")

    model.forward = broken
    assert generate_token_ids(model, ids, max_new_tokens=6, temperature=0, batch_size=2) == ref


def test_group_refill_pads_to_a_bucket_and_matches_each_prompt_alone():
    """7 prompts, 4 slots, no EOS: the 4 first rows end on the same step and the 3 next
    prompts are prefilled together (group padded to 4: one entry aims at the scratch row)."""
    model, tok = _sharp("qwen3")
    codes = CODES + ["F43.1", "F60.3"]
    ids = _ids(tok, codes)
    assert len({len(p) for p in ids}) > 1  # left padding is exercised
    alone = [_hf_alone(model, p, eos=-1, n=6) for p in ids]
    stats: dict[str, int] = {}
    ours = generate_token_ids(model, ids, max_new_tokens=6, temperature=0, batch_size=4, stats=stats)
    assert ours == alone
    assert stats["prefills"] == 2 and stats["refill_rows"] == 7


def test_engine_is_cached_across_calls_and_buckets_lengths():
    model, tok = _sharp("llama")
    ids = _ids(tok, CODES[:3])
    kw = dict(max_new_tokens=6, temperature=0.8, top_p=0.9, batch_size=3, seed=5)
    first: dict[str, int] = {}
    a = generate_token_ids(model, ids, stats=first, **kw)
    again: dict[str, int] = {}
    b = generate_token_ids(model, ids, stats=again, **kw)
    assert a == b  # the reused ring and state were reset
    assert first["engine_reused"] == 0 and again["engine_reused"] == 1
    shorter: dict[str, int] = {}
    generate_token_ids(model, [p[:-1] for p in ids], stats=shorter, **kw)
    assert shorter["engine_reused"] == 1  # a new prompt length in the same bucket: same graphs
    other: dict[str, int] = {}
    generate_token_ids(model, ids, stats=other, **{**kw, "batch_size": 2})
    assert other["engine_reused"] == 0


def test_repetition_penalty_greedy_equals_hf():
    # Each prompt alone: in a left-padded HF batch the pad token counts as seen. The
    # default init (near-uniform, repeats one token) makes the penalty change the output.
    model, tok = tiny_random_model("llama", seed=1)
    ids = _ids(tok, CODES[:3])
    ref = [
        model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=10, pad_token_id=0,
                       eos_token_id=None, repetition_penalty=3.0)[0, len(p) :].tolist()
        for p in ids
    ]  # fmt: skip
    plain = generate_token_ids(model, ids, max_new_tokens=10, temperature=0, batch_size=3)
    ours = generate_token_ids(model, ids, max_new_tokens=10, temperature=0, batch_size=2,
                              repetition_penalty=3.0)  # fmt: skip
    assert ours == ref
    assert ours != plain  # the penalty matters


def test_wide_nucleus_rows_are_redrawn_with_a_full_sort():
    model, tok = _sharp("llama")
    stats: dict[str, int] = {}
    kw = dict(max_new_tokens=6, temperature=1.0, top_p=0.99, batch_size=3, seed=1)
    out = generate_token_ids(model, _ids(tok, CODES[:3]), candidates=2, stats=stats, **kw)
    assert stats["full_sort_rows"] > 0
    assert out == generate_token_ids(model, _ids(tok, CODES[:3]), candidates=2, **kw)


@pytest.mark.integration
def test_compiled_path_equals_eager_and_second_call_compiles_nothing():
    """torch.compile on CPU (inductor; CUDA graphs only apply on a GPU): the compiled step
    and dynamic-shape prefill give the eager path's tokens, with no graph break, and a
    second call with new prompt lengths and refill groups compiles no new graph."""
    from torch._dynamo.utils import counters

    model, tok = _sharp("qwen3")
    ids = _ids(tok, CODES + ["F43.1", "F60.3", "F32.0", "F33.1", "F40.1"])
    kw = dict(max_new_tokens=8, temperature=0.8, top_p=0.9, batch_size=4, seed=2,
              eos_token_id=list(range(5, 60)), repetition_penalty=1.2)  # fmt: skip
    eager = generate_token_ids(model, ids, compile=False, **kw)
    counters.clear()
    assert generate_token_ids(model, ids, compile=True, **kw) == eager
    assert not counters["graph_break"]
    before = counters["stats"]["unique_graphs"]
    stats: dict[str, int] = {}
    shorter = [p[1:] for p in ids[::-1]]
    again = generate_token_ids(model, shorter, compile=True, stats=stats, **kw)
    assert again == generate_token_ids(model, shorter, compile=False, **kw)
    assert stats["engine_reused"] == 1 and stats["prefills"] >= 2
    assert counters["stats"]["unique_graphs"] == before


def test_dynamo_traced_step_attends_over_kv_heads():
    """The graph torch.compile captures for the decode step (what inductor and CUDA graphs
    run) calls SDPA with K/V of H_kv = 2 heads and queries grouped onto them: no repeat_kv
    expansion to the 4 query heads. Traced with a recording backend, run eagerly."""
    from client.generation.decode_engine import Engine

    model, _ = _sharp("llama")
    sampler = dict(temperature=0.8, top_p=0.9, top_k=0, candidates=64)
    engine = Engine(model, 3, 64, sampler, 1.0, compile=False)
    engine.reset()
    engine.active[:3] = True
    engine.window[:3] = 2
    shapes = []

    def record(gm, example_inputs):
        for node in gm.graph.nodes:
            if "scaled_dot_product_attention" in str(node.target):
                q, k, v = (a.meta["example_value"].shape for a in node.args[:3])
                shapes.append((tuple(q), tuple(k), tuple(v)))
        return gm.forward

    with torch.inference_mode():
        packed, scores = torch.compile(engine._step, backend=record, dynamic=False)()
    assert packed.shape == (2, 3) and scores.shape == (3, model.config.vocab_size)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    assert shapes == [((3, 2, 2, head_dim), (3, 2, 64, head_dim), (3, 2, 64, head_dim))] * 2
