"""The learning-rate schedule: each logical step's rate, on every training path, and ε untouched."""

from __future__ import annotations

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from client.dp.ledger import Ledger
from client.schedule import linear_factor, schedule_learning_rate
from client.train import train_dp
from shared.errors import ConfigError
from tests.client.test_train import config, lora_model, make_notes

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_linear_factor_known_values():
    assert [linear_factor(k, 4) for k in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert linear_factor(9, 4) == 0.0  # never negative


def test_plain_optimizer_follows_the_schedule():
    for schedule, expected in (("constant", [0.1, 0.1, 0.1]), ("linear", [0.1, 0.1 * 2 / 3, 0.1 / 3])):
        w = torch.nn.Parameter(torch.ones(3))
        opt = torch.optim.AdamW([w], lr=0.1)
        schedule_learning_rate(opt, schedule=schedule, steps=3)
        seen = []
        for _ in range(3):
            seen.append(opt.param_groups[0]["lr"])
            w.grad = torch.ones(3)
            opt.step()
        assert seen == pytest.approx(expected), schedule
    with pytest.raises(ConfigError, match="cosine"):
        schedule_learning_rate(torch.optim.AdamW([w], lr=0.1), schedule="cosine", steps=3)


@pytest.mark.parametrize("clipping", ["flat", "ghost", "bk", "non-private"])
def test_every_path_steps_at_the_scheduled_rate_and_is_charged_the_same(tmp_path, request, clipping):
    """Logical steps (virtual steps of a physical batch smaller than B are not steps)
    see lr * (1 - k / steps); the ledger charges the same ε as a constant rate."""
    rates: list[float] = []

    def record(opt, _args, _kwargs):  # every optimizer's step; Opacus' DPOptimizer is not an AdamW
        if isinstance(opt, torch.optim.AdamW):
            rates.append(opt.param_groups[0]["lr"])

    handle = register_optimizer_step_pre_hook(record)
    request.addfinalizer(handle.remove)
    private = clipping != "non-private"
    eps = {}
    for schedule in ("constant", "linear"):
        rates.clear()
        model, tok = lora_model()
        cfg = config(clipping="flat" if not private else clipping, lr_schedule=schedule, steps=4,
                     expected_batch_size=4, max_physical_batch_size=1, learning_rate=0.02,
                     **({} if private else {"noise_multiplier": 0.0}))
        result = train_dp(model, tok, make_notes(8), config=cfg, ledger=Ledger(tmp_path / f"{clipping}-{schedule}.jsonl",
                          site_id="site-a"), round_id="r1", delta=1e-3, epsilon_ceiling=100.0, private=private)
        want = [0.02] * 4 if schedule == "constant" else [0.02, 0.015, 0.01, 0.005]
        assert rates == pytest.approx(want), schedule  # one optimizer step per logical step, empty batches too
        eps[schedule] = result.privacy.epsilon
    assert eps["linear"] == eps["constant"]  # post-processing: the rate never changes ε


def test_unknown_schedule_is_listed_with_the_other_config_problems(tmp_path):
    model, tok = lora_model()
    with pytest.raises(ConfigError) as exc:
        train_dp(model, tok, make_notes(8), config=config(lr_schedule="cosine", steps=0),
                 ledger=Ledger(tmp_path / "l.jsonl", site_id="site-a"), round_id="r1", delta=1e-3,
                 epsilon_ceiling=100.0)
    wheres = {p.where for p in exc.value.problems}
    assert {"lr_schedule", "steps"} <= wheres
