"""The embedded build's step pieces: LR schedule, padded batches, weighted loss, endless batches."""

from __future__ import annotations

import random

import pytest
import torch

from client.pretrain_steps import batches, collate, lr_at, weighted_loss


def test_lr_warms_up_then_decays_to_the_floor() -> None:
    kw = {"lr": 1.0, "warmup_steps": 4, "min_lr_ratio": 0.1}
    assert [lr_at(s, 20, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, 20, **kw) == pytest.approx(1.0)
    assert lr_at(20, 20, **kw) == pytest.approx(0.1) == lr_at(99, 20, **kw)


def test_collate_pads_labels_mask_and_weights() -> None:
    out = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "weights": [1.0, 2.0, 3.0]},
                   {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["weights"].tolist() == [[1.0, 2.0, 3.0], [1.0, 0.0, 0.0]]


def test_batches_are_full_and_cover_each_pass() -> None:
    stream = batches([{"i": [i]} for i in range(7)], 3, random.Random(0))
    first_pass = [next(stream), next(stream)]
    assert all(len(b) == 3 for b in first_pass)
    assert len({e["i"][0] for b in first_pass for e in b}) == 6  # one example dropped per pass


class _Logits(torch.nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, input_ids, attention_mask):  # noqa: ARG002 - the model's call signature
        return type("Out", (), {"logits": self.logits})()


def test_weighted_loss_weights_tokens_but_reports_the_plain_mean() -> None:
    torch.manual_seed(0)
    model = _Logits(torch.randn(1, 3, 5))
    batch = collate([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "weights": [1.0, 1.0, 1.0]}], pad_id=0)
    equal, plain = weighted_loss(model, batch)
    assert float(equal.detach()) == pytest.approx(plain)
    batch["weights"][0, 2] = 10.0
    weighted, plain_again = weighted_loss(model, batch)
    assert plain_again == pytest.approx(plain) and float(weighted.detach()) != pytest.approx(plain)
