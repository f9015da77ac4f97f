"""Training steps of the embedded model's build: weighted loss, learning-rate schedule, batches, threads.

Used by :func:`client.pretrain.build_embedded` (public text only, no DP: the
base weights never see a site's notes). ``weights`` in a batch up-weight the
tokens of a report's code and title; the thread count is picked by timing.
"""

from __future__ import annotations

import math
import random
import time
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


def _fwd_bwd_seconds(model: torch.nn.Module, batch: dict[str, torch.Tensor], threads: int) -> float:
    torch.set_num_threads(threads)
    t0 = time.monotonic()
    weighted_loss(model, batch)[0].backward()
    seconds = time.monotonic() - t0
    model.zero_grad(set_to_none=True)
    return seconds


def choose_threads(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """The faster torch thread count for training, 1 or the default.

    On a CPU shared with other busy processes one thread is often several times
    faster than two (OpenMP threads waiting on each other); on an idle machine
    the default wins. Timed on a throwaway forward/backward of one batch of the
    size the build trains on: no weight changes.
    """
    default = torch.get_num_threads()
    if default == 1:
        return 1
    _fwd_bwd_seconds(model, batch, 1)  # warm-up (allocator, kernels)
    one = _fwd_bwd_seconds(model, batch, 1)
    many = _fwd_bwd_seconds(model, batch, default)
    return 1 if one < many else default
