"""Training examples for DP-LoRA: one item per patient, right-padded batches, per-patient loss.

Privacy unit = the patient. The dataset Opacus samples from has one item per
patient; each time a patient is drawn, one of their notes is picked at random
and becomes one training example, so a patient with 50 notes adds at most one
per-sample gradient to any step, the same as a patient with one note.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from client.prompt import prompt_and_body

if TYPE_CHECKING:
    from client.notes import Note

IGNORE_INDEX = -100  # label value cross-entropy skips: prompt and padding positions


class PatientExamples(Dataset):
    """One item per patient; reading an item draws one of that patient's notes.

    Item ``i`` is ``{"input_ids", "labels", "patient": i}``: one training
    example from a note picked uniformly among patient ``i``'s notes, with its
    primary ICD-10 code as the conditioning prompt. A note longer than
    ``max_length`` tokens contributes a window of its body drawn uniformly at
    random behind the full prompt, so every part of a long note can be learned
    over the steps; still one example per sampled patient per step.
    """

    def __init__(
        self,
        patients: Sequence[Sequence[Note]],
        tokenizer: Any,
        *,
        max_length: int,
        rng: random.Random,
    ) -> None:
        self.patients = [list(notes) for notes in patients]
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.rng = rng
        self._cache: dict[tuple[int, int], tuple[list[int], list[int]]] = {}

    def __len__(self) -> int:
        return len(self.patients)

    def __getitem__(self, index: int) -> dict[str, Any]:
        notes = self.patients[index]
        pick = self.rng.randrange(len(notes))
        key = (index, pick)
        if key not in self._cache:
            note = notes[pick]
            self._cache[key] = prompt_and_body(note.primary_code, note.text, self.tokenizer)
        prompt, body = self._cache[key]
        room = max(1, self.max_length - len(prompt))
        start = self.rng.randrange(len(body) - room + 1) if len(body) > room else 0
        window = body[start : start + room]
        ids = (prompt + window)[: self.max_length]
        labels = ([IGNORE_INDEX] * len(prompt) + window)[: self.max_length]
        return {"input_ids": ids, "labels": labels, "patient": index}


def collate(examples: Sequence[dict[str, Any]], *, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a physical batch; padding gets label -100 and attention 0."""
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[row, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.tensor(e["labels"], dtype=torch.long)
        attention[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token logits and targets, flattened for cross-entropy: ``(B*T, V)`` and ``(B*T,)``."""
    logits = logits[:, :-1, :]
    targets = labels[:, 1:]
    return logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1)


def per_patient_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's loss, ``(B,)`` in nats per token: the mean over its report tokens.

    A long note therefore weighs no more than a short one before clipping.
    """
    flat_logits, flat_targets = token_losses(logits, labels)
    token_loss = F.cross_entropy(
        flat_logits, flat_targets, ignore_index=IGNORE_INDEX, reduction="none"
    ).view(labels.shape[0], -1)
    counted = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    return token_loss.sum(dim=1) / counted
