"""Membership inference: exact AUC / TPR known answers, and per-note losses on a tiny Llama."""

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from client.evaluate.membership import (
    calibrated_scores,
    membership_inference,
    mia_auc,
    per_note_losses,
    sequence_logprob,
    tpr_at_fpr,
)
from client.prompt import build_prompt, training_example
from shared.errors import InputError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_auc_separated_equal_and_ties():
    assert mia_auc([0.1, 0.2, 0.3], [1.0, 2.0]) == 1.0
    assert mia_auc([1.0, 2.0], [0.1, 0.2, 0.3]) == 0.0
    assert mia_auc([1.0, 1.0], [1.0, 1.0, 1.0]) == 0.5
    # pairs: (1 vs 1) tie -> .5, (1 vs 2) win, (3 vs 1) loss, (3 vs 2) loss -> 1.5 / 4
    assert mia_auc([1.0, 3.0], [1.0, 2.0]) == pytest.approx(0.375)


def test_auc_same_distribution_is_about_half():
    rng = np.random.default_rng(0)
    auc = mia_auc(rng.normal(size=2000), rng.normal(size=2000))
    assert auc == pytest.approx(0.5, abs=0.03)


def test_tpr_at_1pct_fpr_known_case():
    non = np.arange(1, 201, dtype=float)  # 200 non-members: 2 false positives allowed -> tau = 3
    members = np.array([0.5, 1.5, 2.5, 2.99, 3.0, 10.0, 50.0, 100.0, 150.0, 300.0])
    assert tpr_at_fpr(members, non) == pytest.approx(0.4)  # 0.5, 1.5, 2.5, 2.99 < 3
    # fewer than 100 non-members: no false positive allowed at all
    assert tpr_at_fpr([0.1, 0.2, 5.0], [1.0] * 50) == pytest.approx(2 / 3)
    res = membership_inference(members, non)
    assert res.tpr_at_fpr == pytest.approx(0.4) and res.fpr_resolution == 1 / 200
    assert set(res.cells()) == {"privacy.mia_auc", "privacy.mia_tpr_at_1fpr"}
    assert res.cells()["privacy.mia_auc"].n == 10


def test_calibration_removes_content_difficulty_and_keeps_what_training_changed():
    # Members' notes are intrinsically harder (base loss 3 vs 1), which hides membership from
    # the plain attack; training lowered members' loss by 0.5 more than non-members'.
    rng = np.random.default_rng(1)
    base_m, base_n = 3.0 + rng.normal(0, 0.1, 200), 1.0 + rng.normal(0, 0.1, 200)
    trained_m, trained_n = base_m - 1.0, base_n - 0.5
    assert mia_auc(trained_m, trained_n) == 0.0  # plain: members look like non-members
    m, n = calibrated_scores(trained_m, base_m), calibrated_scores(trained_n, base_n)
    res = membership_inference(m, n, calibrated=True)
    assert res.auc == 1.0
    assert set(res.cells()) == {"privacy.mia_auc_calibrated", "privacy.mia_tpr_at_1fpr_calibrated"}
    # an adapter that changes nothing: every score 0, AUC exactly chance
    same = calibrated_scores(base_m, base_m)
    assert mia_auc(same, calibrated_scores(base_n, base_n)) == 0.5
    with pytest.raises(InputError) as err:
        calibrated_scores([1.0, 2.0], [1.0])
    assert err.value.problems[0].where == "reference_losses"


def test_invalid_losses_are_refused():
    with pytest.raises(InputError) as err:
        mia_auc([], [float("nan")])
    assert len(err.value.problems) == 2


NOTES = [
    ("F32", "low mood poor sleep no appetite tearful plan sertraline review"),
    ("F41.1", "constant worry tension restless poor sleep plan therapy review"),
    ("F20", "hears voices paranoid ideas flat affect plan antipsychotic review"),
    ("F31", "elevated mood little sleep spending grandiose plan lithium review"),
    ("F32", "hopeless tired withdrawn poor focus plan therapy weekly review"),
    ("F41.1", "panic attacks palpitations sweating avoidance plan therapy review"),
]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    words = set()
    for code, text in NOTES:
        words |= set(build_prompt(code, None).split()) | set(text.split())
    words |= {"secret", "is", "1234", "5678", "9999", "0000"}
    vocab = {"[UNK]": 0, "[PAD]": 1, "</s>": 2}
    for w in sorted(words):
        vocab.setdefault(w, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>")
    cfg = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        pad_token_id=1, eos_token_id=2, bos_token_id=None,
    )
    return LlamaForCausalLM(cfg), tok


def reference_loss(model, tok, code, text, max_length):
    ex = training_example(code, text, tok, max_length=max_length)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ex["input_ids"]]), labels=torch.tensor([ex["labels"]]))
    return float(out.loss)


def test_per_note_losses_match_unbatched_reference(tiny):
    model, tok = tiny
    got = per_note_losses(model, tok, NOTES, batch_size=4, max_length=64)
    ref = [reference_loss(model, tok, c, t, 64) for c, t in NOTES]
    assert got == pytest.approx(ref, rel=1e-4)
    # Padding must not change a note's loss: batch of 1 and batch of 6 agree.
    assert per_note_losses(model, tok, NOTES, batch_size=1, max_length=64) == pytest.approx(got, rel=1e-5)


def test_per_note_losses_refuses_notes_truncated_away(tiny):
    model, tok = tiny
    with pytest.raises(InputError):
        per_note_losses(model, tok, NOTES[:2], batch_size=2, max_length=5)


def test_sequence_logprob_matches_manual_and_is_padding_invariant(tiny):
    model, tok = tiny
    conts = [" secret is 1234", " 5678", " secret is 9999 0000"]
    got = sequence_logprob(model, tok, "plan review", conts, batch_size=3)
    one = sequence_logprob(model, tok, "plan review", conts, batch_size=1)
    assert got == pytest.approx(one, rel=1e-5)
    ids = tok("plan review", add_special_tokens=False)["input_ids"] + tok(" 5678", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    assert got[1] == pytest.approx(float(logp[1, ids[2]]), rel=1e-5)


def test_training_on_members_gives_auc_one_and_ranks_the_canary(tiny):
    _, tok = tiny
    torch.manual_seed(1)
    model = LlamaForCausalLM(tiny[0].config)
    members = NOTES[:3] + [("F32", "plan review secret is 1234")]
    nonmembers = NOTES[3:]
    exs = [training_example(c, t, tok, max_length=64) for c, t in members]
    width = max(len(e["input_ids"]) for e in exs)
    ids = torch.tensor([e["input_ids"] + [1] * (width - len(e["input_ids"])) for e in exs])
    labels = torch.tensor([e["labels"] + [-100] * (width - len(e["labels"])) for e in exs])
    mask = (torch.arange(width)[None, :] < torch.tensor([len(e["input_ids"]) for e in exs])[:, None]).long()
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    model.train()
    for _ in range(40):  # one full batch per step: overfit the members
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    m = per_note_losses(model, tok, members, batch_size=4, max_length=64)
    h = per_note_losses(model, tok, nonmembers, batch_size=4, max_length=64)
    assert mia_auc(m, h) == 1.0
    scores = sequence_logprob(model, tok, "plan review secret is", ["1234", "5678", "9999", "0000"])
    assert int(np.argmax(scores)) == 0
