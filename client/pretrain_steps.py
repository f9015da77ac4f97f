"""Training steps of the embedded model's build: weighted loss, learning-rate schedule, batches.

Used by :func:`client.pretrain.build_embedded` (public text only, no DP: the
base weights never see a site's notes). ``weights`` in a batch up-weight the
tokens of a report's code and title.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence

import torch


def weighted_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
    """(weighted loss to optimise, plain mean token cross-entropy to report)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2).float(), labels, ignore_index=-100, reduction="none"
    )
    valid = (labels != -100).float()
    weights = batch["weights"][:, 1:] * valid
    return (ce * weights).sum() / weights.sum(), float((ce.detach() * valid).sum() / valid.sum())


def lr_at(step: int, planned: int, *, lr: float, warmup_steps: int, min_lr_ratio: float) -> float:
    """Learning rate at ``step``: linear warmup to ``lr`` over ``warmup_steps``, then cosine decay
    to ``min_lr_ratio * lr`` at ``planned`` steps (flat after)."""
    warm, floor = warmup_steps, min_lr_ratio
    if step < warm:
        return lr * (step + 1) / warm
    frac = min(1.0, (step - warm) / max(1, planned - warm))
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac)))


def collate(examples: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """One right-padded batch: ``input_ids``, ``labels`` (-100 on padding), ``attention_mask`` and
    per-token loss ``weights`` (1.0 where an example has none, 0 on padding)."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    weights = torch.zeros((len(examples), width), dtype=torch.float32)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
        weights[i, :n] = torch.tensor(e.get("weights", [1.0] * n))
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "weights": weights}


def batches(
    examples: list[dict[str, list[int]]], batch_size: int, rng: random.Random
) -> Iterator[list[dict[str, list[int]]]]:
    """Endless full batches: each pass over ``examples`` in a fresh ``rng`` order, a short tail dropped."""
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield [examples[j] for j in order[i : i + batch_size]]
