"""Membership inference on the adapter, and sequence log-likelihoods for canary exposure.

The attack is the simplest strong baseline (Yeom et al. 2018): a note the
model was trained on tends to get a lower loss. Given the model's per-note
losses on notes of TRAINING patients (members) and of HELD-OUT patients
(non-members), the attacker's success is summarised by the ROC AUC and the
true-positive rate at 1% false-positive rate. Privacy meaning: AUC 0.5 and
TPR@1%FPR ≈ 0.01 mean the loss reveals nothing about membership; DP-SGD bounds
how far above that an attacker can get (TPR ≤ e^ε·FPR + δ).

Losses come from :func:`per_note_losses`, which scores each note under the same
prompt as training (:func:`client.prompt.training_example`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import rankdata

from client.evaluate.summary import Cell
from client.prompt import training_example
from shared.errors import InputError, Problem


def _losses(values: Sequence[float] | np.ndarray, where: str) -> tuple[np.ndarray, list[Problem]]:
    arr = np.asarray(values, dtype=np.float64) if not isinstance(values, str) else np.zeros(0)
    problems = []
    if arr.ndim != 1 or arr.size == 0:
        problems.append(Problem(where, "expected a non-empty 1-d sequence of losses"))
    elif not np.isfinite(arr).all():
        problems.append(Problem(where, "contains NaN or infinite losses"))
    return arr, problems


@dataclass(frozen=True)
class MiaResult:
    """Loss-threshold membership inference: AUC (0.5 = chance) and TPR at ``fpr`` false-positive rate.

    ``fpr_resolution`` = 1 / n_nonmembers: with fewer than 100 held-out notes
    the 1% operating point means "no false positive at all".
    """

    auc: float
    tpr_at_fpr: float
    fpr: float
    n_members: int
    n_nonmembers: int
    calibrated: bool = False  # scores are losses minus the base model's (see :func:`calibrated_scores`)

    @property
    def fpr_resolution(self) -> float:
        return 1.0 / self.n_nonmembers

    def cells(self) -> dict[str, Cell]:
        # The smaller side bounds how much either value can say about single notes.
        n = min(self.n_members, self.n_nonmembers)
        suffix = "_calibrated" if self.calibrated else ""
        out = {f"privacy.mia_auc{suffix}": Cell(self.auc, n)}
        if math.isclose(self.fpr, 0.01):
            out[f"privacy.mia_tpr_at_1fpr{suffix}"] = Cell(self.tpr_at_fpr, n)
        return out


def mia_auc(member_losses: Sequence[float], nonmember_losses: Sequence[float]) -> float:
    """P(a member's loss < a non-member's loss), ties counting 1/2 (exact Mann–Whitney AUC)."""
    m, p1 = _losses(member_losses, "member_losses")
    h, p2 = _losses(nonmember_losses, "nonmember_losses")
    if p1 + p2:
        raise InputError("invalid membership-inference input", p1 + p2)
    ranks = rankdata(-np.concatenate([m, h]))  # higher score = lower loss = "member"
    return float((ranks[: m.size].sum() - m.size * (m.size + 1) / 2) / (m.size * h.size))


def tpr_at_fpr(member_losses: Sequence[float], nonmember_losses: Sequence[float], *, fpr: float = 0.01) -> float:
    """Largest share of members flagged (loss < τ) over thresholds τ that flag at most ``fpr`` of non-members.

    With k = ⌊fpr · n_nonmembers⌋ false positives allowed, τ is the (k+1)-th
    smallest non-member loss (strictly below it, so ties are not counted as
    caught): TPR = #{member loss < τ} / n_members. No interpolation.
    """
    m, p1 = _losses(member_losses, "member_losses")
    h, p2 = _losses(nonmember_losses, "nonmember_losses")
    if not 0.0 <= fpr < 1.0:
        p2.append(Problem("fpr", f"must be in [0, 1), got {fpr}"))
    if p1 + p2:
        raise InputError("invalid membership-inference input", p1 + p2)
    k = math.floor(fpr * h.size + 1e-9)
    if k >= h.size:
        return 1.0
    tau = np.sort(h)[k]
    return float((m < tau).mean())


def membership_inference(
    member_losses: Sequence[float],
    nonmember_losses: Sequence[float],
    *,
    fpr: float = 0.01,
    calibrated: bool = False,
) -> MiaResult:
    """AUC and TPR at ``fpr`` of the loss-threshold attack (members = training patients' notes).

    ``calibrated=True`` only names the result: pass :func:`calibrated_scores` as the losses.
    """
    auc = mia_auc(member_losses, nonmember_losses)
    tpr = tpr_at_fpr(member_losses, nonmember_losses, fpr=fpr)
    return MiaResult(auc, tpr, fpr, len(member_losses), len(nonmember_losses), calibrated)


def calibrated_scores(losses: Sequence[float], reference_losses: Sequence[float]) -> np.ndarray:
    """Each note's loss minus the base (reference) model's loss on it, in nats per token.

    The reference-calibrated attack (Watson et al. 2022; the "reference model"
    of Carlini et al. 2022): a note that is simply easy or hard to predict is
    so under both models, so subtracting the base model's loss removes what the
    content of member and non-member notes differs in and leaves what training
    changed. Lower = more member-like, as for plain losses. The site has the
    base model (the adapter switched off), so this attack costs one more scoring
    pass.
    """
    a, p1 = _losses(losses, "losses")
    b, p2 = _losses(reference_losses, "reference_losses")
    if not (p1 + p2) and a.shape != b.shape:
        p2.append(Problem("reference_losses", f"{b.size} values for {a.size} losses"))
    if p1 + p2:
        raise InputError("invalid calibration input", p1 + p2)
    return a - b


def _device(model: Any) -> Any:
    return next(model.parameters()).device


def _pad_id(tokenizer: Any) -> int:
    for cand in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if cand is not None:
            return int(cand)
    return 0


def _token_logprobs(model: Any, rows: list[tuple[list[int], list[int]]], pad_id: int) -> list[Any]:
    """Per-row log-probabilities of each labelled position (labels -100 ignored), one padded batch."""
    import torch

    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (row_ids, row_labels) in enumerate(rows):
        ids[r, : len(row_ids)] = torch.tensor(row_ids)
        labels[r, : len(row_labels)] = torch.tensor(row_labels)
        mask[r, : len(row_ids)] = 1
    dev = _device(model)
    logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits
    # Position t predicts token t+1; log-softmax in float32 so bf16 models score alike.
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    target = labels[:, 1:].to(dev)
    valid = target != -100
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return [picked[r][valid[r]].cpu() for r in range(len(rows))]


def _check_batching(batch_size: int, max_length: int | None) -> list[Problem]:
    problems = []
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        problems.append(Problem("batch_size", f"must be a positive integer, got {batch_size!r}"))
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2):
        problems.append(Problem("max_length", f"must be an integer ≥ 2, got {max_length!r}"))
    return problems


def _scored_rows(
    model: Any, rows: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int,
    reduce: Callable[[Any], float],
) -> np.ndarray:
    """One float per (input_ids, labels) row: ``reduce`` of its label tokens' log-probabilities
    (natural log), scored ``batch_size`` rows at a time in eval mode without gradients."""
    import torch

    model.eval()
    out = np.zeros(len(rows), dtype=np.float64)
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            for j, lp in enumerate(_token_logprobs(model, rows[start : start + batch_size], pad_id)):
                out[start + j] = reduce(lp)
    return out


def per_note_losses(
    model: Any,
    tokenizer: Any,
    notes_codes_texts: Sequence[tuple[str, str]],
    *,
    batch_size: int = 8,
    max_length: int = 1024,
) -> np.ndarray:
    """Mean token negative log-likelihood (nats/token) of each note's report tokens under ``model``.

    ``notes_codes_texts`` holds (ICD-10 code, note text) pairs. Each is built
    with :func:`client.prompt.training_example` — the training prompt and
    truncation — so the loss is the one the model was trained to lower; prompt
    tokens are not scored. Any HF causal LM (PEFT-wrapped or not) works; the
    model is put in eval mode and run without gradients. Raises
    :class:`InputError` when a note has no report token left after truncation.
    """

    problems = _check_batching(batch_size, max_length)
    if isinstance(notes_codes_texts, str) or not isinstance(notes_codes_texts, Sequence):
        problems.append(Problem("notes_codes_texts", "expected a sequence of (code, text) pairs"))
    else:
        problems += [
            Problem(f"notes_codes_texts[{i}]", "expected a (code, text) pair of strings")
            for i, item in enumerate(notes_codes_texts)
            if not (isinstance(item, tuple | list) and len(item) == 2 and all(isinstance(x, str) for x in item))
        ]
    if problems:
        raise InputError("invalid per-note loss input", problems)
    examples = [training_example(code, text, tokenizer, max_length=max_length) for code, text in notes_codes_texts]
    empty = [
        Problem(f"notes_codes_texts[{i}]", f"no report token left within max_length={max_length}")
        for i, ex in enumerate(examples)
        if sum(1 for x in ex["labels"][1:] if x != -100) == 0
    ]
    if empty:
        raise InputError("notes cannot be scored (the prompt fills max_length)", empty)
    rows = [(ex["input_ids"], ex["labels"]) for ex in examples]
    return _scored_rows(model, rows, _pad_id(tokenizer), batch_size, lambda lp: float(-lp.double().mean()))


def sequence_logprob(
    model: Any,
    tokenizer: Any,
    prefix: str,
    continuations: Sequence[str],
    *,
    batch_size: int = 16,
) -> np.ndarray:
    """Total log-likelihood (natural log) of each continuation's tokens following ``prefix``.

    Prefix and continuation are tokenized separately (no special tokens) and
    joined, as training joins prompt and report — put any separating space in
    the continuation consistently across candidates. For canary exposure:
    score the true secret and the random candidates with the same prefix and
    hand the array to the exposure computation (higher = more likely).
    """

    problems = _check_batching(batch_size, None)
    if not isinstance(prefix, str):
        problems.append(Problem("prefix", "expected a string"))
    if isinstance(continuations, str) or not isinstance(continuations, Sequence) or not continuations:
        problems.append(Problem("continuations", "expected a non-empty sequence of strings"))
    elif not all(isinstance(c, str) for c in continuations):
        problems.append(Problem("continuations", "every continuation must be a string"))
    if problems:
        raise InputError("invalid sequence log-likelihood input", problems)
    prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    if not prefix_ids:
        # The first continuation token needs something to be predicted from.
        prefix_ids = [bos if bos is not None else _pad_id(tokenizer)]
    rows = []
    empty = []
    for i, cont in enumerate(continuations):
        cont_ids = tokenizer(cont, add_special_tokens=False)["input_ids"]
        if not cont_ids:
            empty.append(Problem(f"continuations[{i}]", "tokenizes to nothing"))
        rows.append((prefix_ids + cont_ids, [-100] * len(prefix_ids) + cont_ids))
    if empty:
        raise InputError("invalid continuations", empty)
    return _scored_rows(model, rows, _pad_id(tokenizer), batch_size, lambda lp: float(lp.double().sum()))
