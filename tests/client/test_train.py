"""DP-LoRA recipe: what moves, what is charged, what is refused.

Tiny random models, a handful of steps, short sequences: the point is the
privacy mechanics (patient = unit, Poisson + clipping + noise, ledger first),
not the learning.
"""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch
from opacus.accountants import create_accountant

import client.train as train_mod
from client.dp.ledger import Ledger
from client.dp.noise import deterministic_for_tests
from client.model import FAMILIES, adapter_state, add_lora, tiny_random_model
from client.notes import Note
from client.train import noise_multiplier_for, train_dp
from shared.errors import BudgetExceededError, ConfigError, PrivacyError
from shared.privacy_scalars import PRIVACY_KEYS
from shared.run_config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXT = "The patient reports low mood and poor sleep for two months. Plan: review in two weeks."


def make_notes(n_patients: int, *, heavy_notes: int = 1) -> list[Note]:
    """``n_patients`` patients with one note each, except p0 with ``heavy_notes`` notes."""
    notes = []
    for p in range(n_patients):
        for k in range(heavy_notes if p == 0 else 1):
            notes.append(
                Note(
                    note_id=f"n{p}-{k}",
                    patient_id=f"p{p}",
                    icd10=("F32.1",) if p % 2 else ("F41.1",),
                    text=f"Note {k} of patient {p}. {TEXT}",
                    date=None,
                    identifiers=(),
                    source="test",
                    line=len(notes) + 1,
                )
            )
    return notes


def lora_model(family: str = "llama"):
    model, tokenizer = tiny_random_model(family, seed=0)
    return add_lora(model, r=4, alpha=8), tokenizer


def config(**overrides) -> TrainConfig:
    knobs = dict(
        noise_multiplier=1.0,
        expected_batch_size=2,
        max_physical_batch_size=2,
        steps=2,
        max_length=64,  # the prompt alone is ~50 tokens with the tiny tokenizer
        accountant="rdp",  # cheaper to evaluate than PRV; PRV is covered below
        learning_rate=1e-2,
    )
    knobs.update(overrides)
    return TrainConfig(**knobs)


def independent_epsilon(history, *, delta: float, accountant: str) -> float:
    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)
    return acc.get_epsilon(delta=delta)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture
def ledger(tmp_path) -> Ledger:
    return Ledger(tmp_path / "privacy-ledger.jsonl", site_id="site-a")


def assert_opacus_gone(model) -> None:
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())


def test_only_lora_moves_and_epsilon_accumulates_over_rounds(ledger):
    """Round 1 flat clipping, round 2 ghost, round 3 book-keeping: same model, same ledger."""
    model, tok = lora_model()
    notes = make_notes(8)  # B=2, n=8 (bucket 0 -> 10): q = 2/10 (client.dp.sampling.sample_rate_for)
    delta = 1e-3
    rounds = [
        ("r1", config(clipping="flat")),
        ("r2", config(clipping="ghost", noise_multiplier=2.0, steps=3)),
        ("r3", config(clipping="bk", noise_multiplier=1.5, steps=2)),
    ]
    history = []
    for round_id, cfg in rounds:
        before = snapshot(model)
        seen: list[tuple[int, int, float]] = []
        result = train_dp(
            model,
            tok,
            notes,
            config=cfg,
            ledger=ledger,
            round_id=round_id,
            delta=delta,
            epsilon_ceiling=100.0,
            progress=lambda step, total, loss, seen=seen: seen.append((step, total, loss)),
        )
        after = snapshot(model)
        lora = [n for n in before if "lora_" in n]
        base = [n for n in before if "lora_" not in n]
        assert lora and base
        assert all(not torch.equal(before[n], after[n]) for n in lora), cfg.clipping
        assert all(torch.equal(before[n], after[n]) for n in base), cfg.clipping  # bit-identical
        # adapter: plain PEFT names (no Opacus "_module."), equal to the live weights
        live = adapter_state(model)
        assert set(result.adapter) == set(live) and not any("_module" in n for n in live)
        assert all(torch.equal(result.adapter[n], t) for n, t in live.items())
        assert [s[:2] for s in seen] == [(i + 1, cfg.steps) for i in range(cfg.steps)]
        assert all(math.isfinite(s[2]) for s in seen) and math.isfinite(result.mean_loss)
        assert_opacus_gone(model)  # so the next round can wrap it again

        p = result.privacy
        assert set(p.to_record()) == PRIVACY_KEYS
        assert (p.noise_multiplier, p.sample_rate, p.steps) == (
            cfg.noise_multiplier,
            0.2,
            cfg.steps,
        )
        assert (p.delta, p.accountant, p.secure_mode, p.patients_bucket) == (delta, "rdp", True, 0)
        # every clipping path draws ChaCha20 noise by default, and says so in the ledger
        assert result.noise_source == "chacha20-gaussian" == result.ledger_entry.noise_source
        this_round = (cfg.noise_multiplier, 0.2, cfg.steps)
        history.append(this_round)
        assert p.epsilon_round == pytest.approx(
            independent_epsilon([this_round], delta=delta, accountant="rdp")
        )
        assert p.epsilon == pytest.approx(
            independent_epsilon(history, delta=delta, accountant="rdp")
        )
    assert p.epsilon > p.epsilon_round


def test_one_sample_per_patient_per_step(ledger, monkeypatch):
    # p0 has 50 notes, p1..p9 one each. Were notes the sampling unit, p0 would fill
    # most of every batch; with patients as the unit it appears at most once per step.
    calls: list[list[dict]] = []
    real_collate = train_mod.collate

    def recording_collate(examples, **kw):
        calls.append(list(examples))
        return real_collate(examples, **kw)

    monkeypatch.setattr(train_mod, "collate", recording_collate)
    per_step: list[list[list[dict]]] = []

    def close_step(step, total, loss):
        per_step.append(calls[:])
        calls.clear()

    model, tok = lora_model()
    steps = 8
    with deterministic_for_tests(0):  # fixed draws: p0 is sampled more than once
        result = train_dp(
            model,
            tok,
            make_notes(10, heavy_notes=50),
            config=config(expected_batch_size=4, steps=steps, accountant="prv"),
            ledger=ledger,
            round_id="r1",
            delta=0.05,
            epsilon_ceiling=100.0,
            progress=close_step,
        )
    assert len(per_step) == steps
    heavy_examples = set()
    for physical_batches in per_step:
        assert all(len(b) <= 2 for b in physical_batches)  # BatchMemoryManager bound
        counts = defaultdict(int)
        for batch in physical_batches:
            for example in batch:
                counts[example["patient"]] += 1
                if example["patient"] == 0:
                    heavy_examples.add(tuple(example["input_ids"]))
        assert all(c <= 1 for c in counts.values()), counts
    assert len(heavy_examples) >= 2  # p0 drawn as different notes (one random note per draw)

    # n=10, B=4: each patient is sampled at q = B/bucket(n) = 4/10 (a function of the
    # bucketed count only, #12 §4) and the accountant is charged for that q (PRV)
    p = result.privacy
    assert p.sample_rate == pytest.approx(0.4) and p.patients_bucket == 10
    expected = independent_epsilon([(1.0, 0.4, steps)], delta=0.05, accountant="prv")
    assert p.epsilon_round == pytest.approx(expected)
    assert p.epsilon == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("clipping", ["flat", "bk"])
def test_empty_poisson_batches_are_still_noisy_charged_steps(ledger, monkeypatch, clipping):
    # 4 patients at q = 1/10 (B=1 over the bucket floor 10): most steps draw nobody. Those steps
    # still add noise and are charged; the recipe must not skip or miscount them.
    collated = [0]
    real_collate = train_mod.collate

    def counting_collate(examples, **kw):
        collated[0] += 1
        return real_collate(examples, **kw)

    monkeypatch.setattr(train_mod, "collate", counting_collate)
    examples_per_step = []

    def close_step(step, total, loss):
        examples_per_step.append(collated[0])
        collated[0] = 0

    model, tok = lora_model()
    steps = 10
    with deterministic_for_tests(0):  # fixed draws with both empty and non-empty steps
        result = train_dp(
            model,
            tok,
            make_notes(4),
            config=config(expected_batch_size=1, max_physical_batch_size=1, steps=steps, clipping=clipping),
            ledger=ledger,
            round_id="r1",
            delta=0.1,
            epsilon_ceiling=1000.0,
            progress=close_step,
        )
    assert len(examples_per_step) == steps
    assert 0 in examples_per_step and any(examples_per_step)  # both kinds of step happened
    assert result.privacy.steps == steps
    assert result.privacy.epsilon_round == pytest.approx(
        independent_epsilon([(1.0, 0.1, steps)], delta=0.1, accountant="rdp")
    )


@pytest.mark.parametrize("sigma,clip", [(0.7, 1.0), (1.3, 0.05)])
def test_bookkeeping_trains_exactly_like_opacus_flat_clipping(ledger, tmp_path, sigma, clip):
    """Same keys (the test-only hook), same Poisson batches, same noise stream:
    book-keeping clipping (one backward pass, our hooks) must give the adapter
    Opacus' flat clipping gives -- with a bound nothing reaches and with one that
    clips every patient."""
    adapters = {}
    for clipping in ("flat", "bk"):
        torch.manual_seed(0)  # PEFT draws lora_A from the global RNG
        model, tok = lora_model()
        with deterministic_for_tests(3):
            result = train_dp(
                model,
                tok,
                make_notes(8),
                config=config(
                    clipping=clipping, noise_multiplier=sigma, max_grad_norm=clip, steps=3,
                    expected_batch_size=4, max_physical_batch_size=2,
                ),
                ledger=Ledger(tmp_path / f"{clipping}.jsonl", site_id="site-a"),
                round_id="r1",
                delta=1e-3,
                epsilon_ceiling=100.0,
            )
        adapters[clipping] = result.adapter
        assert result.privacy.noise_multiplier == sigma and result.privacy.steps == 3
        assert_opacus_gone(model)
    for name, flat in adapters["flat"].items():
        torch.testing.assert_close(adapters["bk"][name], flat, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("clipping", ["flat", "ghost", "bk"])
def test_secure_mode_off_still_draws_fresh_noise_and_says_so(ledger, clipping):
    """secure_mode=False (every path, bk included): an os.urandom-seeded torch
    generator -- not a CSPRNG, but still different every run -- named as such."""
    adapters = []
    for round_id in ("r1", "r2"):
        torch.manual_seed(0)
        model, tok = lora_model()
        result = train_dp(
            model, tok, make_notes(8), config=config(clipping=clipping, secure_mode=False),
            ledger=ledger, round_id=round_id, delta=1e-3, epsilon_ceiling=100.0,
        )
        assert result.noise_source == "torch-urandom-seeded" == result.ledger_entry.noise_source
        assert result.privacy.secure_mode is False
        adapters.append(result.adapter)
    assert all(not torch.equal(adapters[0][n], adapters[1][n]) for n in adapters[0])


def test_ceiling_refused_before_training(ledger, monkeypatch):
    model, tok = lora_model()
    before = snapshot(model)
    monkeypatch.setattr(
        train_mod, "PrivacyEngine", lambda **kw: pytest.fail("training started despite refusal")
    )
    with pytest.raises(BudgetExceededError) as info:
        train_dp(
            model,
            tok,
            make_notes(8),
            config=config(steps=50),
            ledger=ledger,
            round_id="r1",
            delta=1e-3,
            epsilon_ceiling=0.5,
        )
    assert info.value.projected_epsilon > 0.5
    after = snapshot(model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert ledger.entries() == []  # nothing reserved


def test_delta_above_one_over_patients_refused(ledger):
    model, tok = lora_model()
    with pytest.raises(PrivacyError) as info:
        train_dp(
            model,
            tok,
            make_notes(8),
            config=config(),
            ledger=ledger,
            round_id="r1",
            delta=0.2,
            epsilon_ceiling=10.0,
        )
    assert "0.2" in str(info.value) and "1/8" in str(info.value)
    assert ledger.entries() == []  # nothing reserved


def test_too_few_patients_refused(ledger):
    model, tok = lora_model()
    with pytest.raises(PrivacyError, match="too few"):
        train_dp(
            model,
            tok,
            make_notes(3),
            config=config(expected_batch_size=2),
            ledger=ledger,
            round_id="r1",
            delta=1e-3,
            epsilon_ceiling=10.0,
        )


def test_all_config_problems_listed_at_once(ledger):
    model, tok = lora_model()
    bad = TrainConfig(
        noise_multiplier=1.0,
        epsilon_per_round=2.0,
        steps=0,
        max_grad_norm=-1.0,
        accountant="gdp",
        clipping="per_layer",
    )
    with pytest.raises(ConfigError) as info:
        train_dp(
            model,
            tok,
            make_notes(8),
            config=bad,
            ledger=ledger,
            round_id="",
            delta=1.5,
            epsilon_ceiling=10.0,
        )
    where = {p.where for p in info.value.problems}
    assert {
        "noise_multiplier/epsilon_per_round",
        "steps",
        "max_grad_norm",
        "accountant",
        "clipping",
        "delta",
        "round_id",
    } <= where
    assert ledger.entries() == []  # nothing reserved


@pytest.mark.parametrize("target", [3.0])
def test_target_epsilon_derives_sigma_reaching_it(target):
    sigma = noise_multiplier_for(
        target_epsilon=target, delta=1e-3, sample_rate=0.25, steps=2, accountant="rdp"
    )
    reached = independent_epsilon([(sigma, 0.25, 2)], delta=1e-3, accountant="rdp")
    assert target - 0.011 <= reached <= target


@pytest.mark.integration  # the search doubles sigma up to 1e6 before giving up: slow
def test_unreachable_target_epsilon_refused():
    with pytest.raises(PrivacyError, match="unreachable"):
        noise_multiplier_for(
            target_epsilon=1e-9, delta=1e-3, sample_rate=0.5, steps=1000, accountant="rdp"
        )


@pytest.mark.integration
def test_train_with_target_epsilon(ledger):
    model, tok = lora_model()
    result = train_dp(
        model,
        tok,
        make_notes(8),
        config=config(noise_multiplier=0.0, epsilon_per_round=3.0, accountant="prv"),
        ledger=ledger,
        round_id="r1",
        delta=1e-3,
        epsilon_ceiling=10.0,
    )
    assert 3.0 - 0.05 <= result.privacy.epsilon_round <= 3.0


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_trains(family, ledger):
    model, tok = lora_model(family)
    before = {n: t.clone() for n, t in adapter_state(model).items()}
    result = train_dp(
        model,
        tok,
        make_notes(4),
        config=config(steps=1),
        ledger=ledger,
        round_id="r1",
        delta=0.1,
        epsilon_ceiling=100.0,
    )
    assert set(result.adapter) == set(before)
    assert all(not torch.equal(before[n], result.adapter[n]) for n in before)


def test_nonprivate_baseline_trains_without_ledger_and_is_refused_on_the_wire(ledger):
    """The study's no-DP arm: LoRA moves, nothing is reserved, and the wire refuses the result."""
    import numpy as np

    from shared import wire, wire_adapter, wire_pack
    from shared.errors import WireError
    from shared.run_config import RunConfig

    model, tok = lora_model()
    before = snapshot(model)
    cfg = config(noise_multiplier=0.0, steps=3)
    result = train_dp(
        model, tok, make_notes(8), config=cfg, ledger=ledger, round_id="r1", delta=1e-3,
        epsilon_ceiling=1.0, private=False,
    )
    after = snapshot(model)
    assert all(not torch.equal(before[n], after[n]) for n in before if "lora_" in n)
    assert all(torch.equal(before[n], after[n]) for n in before if "lora_" not in n)
    assert_opacus_gone(model)
    assert result.ledger_entry is None and ledger.history() == []
    p = result.privacy
    assert not p.private and math.isinf(p.epsilon) and p.noise_multiplier == 0.0
    assert (p.accountant, p.sample_rate, p.steps) == ("none", 0.2, 3)

    adapter = {k: v.numpy().astype(np.float32) for k, v in result.adapter.items()}
    run = RunConfig.from_flower({"lora.r": 4, "train.accountant": "rdp"})
    with pytest.raises(WireError) as refused:
        wire.check_reply(
            wire_pack.pack_train_reply(adapter, p.to_record()), kind="train", spec=wire_adapter.spec_of(adapter), run=run
        )
    refused_keys = {pr.where for pr in refused.value.problems}
    assert {"privacy['epsilon']", "privacy['noise_multiplier']", "privacy['accountant']"} <= refused_keys

    # A private round of the same knobs is the control: the same reply shape passes.
    private = train_dp(
        model, tok, make_notes(8), config=config(steps=1), ledger=ledger, round_id="r2", delta=1e-3,
        epsilon_ceiling=100.0,
    )
    adapter = {k: v.numpy().astype(np.float32) for k, v in private.adapter.items()}
    wire.check_reply(
        wire_pack.pack_train_reply(adapter, private.privacy.to_record()), kind="train",
        spec=wire_adapter.spec_of(adapter), run=run,
    )
    assert private.privacy.private and len(ledger.history()) == 1


def test_nonprivate_baseline_refuses_noise_knobs(ledger):
    model, tok = lora_model()
    for knobs in ({"noise_multiplier": 1.0}, {"noise_multiplier": 0.0, "epsilon_per_round": 1.0}):
        with pytest.raises(ConfigError, match="invalid DP training settings") as exc:
            train_dp(model, tok, make_notes(8), config=config(**knobs), ledger=ledger,
                     round_id="r1", delta=1e-3, epsilon_ceiling=1.0, private=False)
        assert any(p.where == "private" for p in exc.value.problems)


def test_long_notes_train_on_random_windows_covering_the_whole_note():
    import random

    from client.dp.examples import IGNORE_INDEX, PatientExamples
    from client.prompt import prompt_and_body

    _, tokenizer = tiny_random_model("llama", seed=0)
    text = " ".join(f"word{i} sleep mood" for i in range(30))  # ~200 tokens: longer than max_length
    note = Note(note_id="n1", patient_id="p1", icd10=("F32",), text=text)
    prompt, body = prompt_and_body("F32", text, tokenizer)
    max_length = len(prompt) + 40
    ds = PatientExamples([[note]], tokenizer, max_length=max_length, rng=random.Random(0))
    windows = set()
    for _ in range(3000):  # ~160 possible windows: each is drawn with near certainty
        item = ds[0]
        assert len(item["input_ids"]) == max_length
        assert item["input_ids"][: len(prompt)] == prompt
        assert item["labels"][: len(prompt)] == [IGNORE_INDEX] * len(prompt)
        window = item["input_ids"][len(prompt):]
        assert any(body[s : s + 40] == window for s in range(len(body) - 39)), "not a slice of the note"
        windows.add(tuple(window))
    # both ends of the note are reached (its last tokens and EOS too), not just its head
    assert tuple(body[:40]) in windows and tuple(body[-40:]) in windows
    assert len(windows) > 20
