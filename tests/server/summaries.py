"""TEST-ONLY sample of a finished run's consortium summary, for the report and site-budget tests."""

import numpy as np

from server import checkpoint
from shared.run_config import RunConfig

RUN = RunConfig.from_flower({"run-name": "r1", "num-rounds": 2, "lora.r": 2, "update-norm-bound": 0.0})
PRIV = dict(epsilon_round=0.5, delta=1e-5, noise_multiplier=1.0, sample_rate=0.1, steps=10,
            max_grad_norm=1.0, accountant="prv", secure_mode=False, patients_bucket=40)


def sample_summary(run_dir):
    """A two-round consortium summary as server/app.py writes it, with real checkpoints under ``run_dir``."""
    adapter = {"a.lora_A.weight": np.ones((2, 4), np.float32), "a.lora_B.weight": np.zeros((4, 2), np.float32)}
    rounds = []
    for rnd in (1, 2):
        checkpoint.save_round(run_dir / "checkpoints", rnd, {k: v * rnd for k, v in adapter.items()}, lora=RUN.lora)
        rounds.append({
            "round": rnd,
            "train": {"sent": [7, 8, 9], "accepted": [7, 8], "declined": {"9": "budget_exceeded"},
                      "refused": {}, "failed": [], "missing": []},
            "aggregated": True, "weights": {"7": 0.5, "8": 0.5},
            "privacy": {"7": {**PRIV, "epsilon": 0.5 * rnd}, "8": {**PRIV, "epsilon": 0.7 * rnd}},
            "checkpoint": checkpoint.round_dir_name(rnd),
            "evaluate": {"sent": [7, 8, 9], "accepted": [7, 8, 9], "declined": {}, "refused": {}, "failed": [],
                         "missing": [], "mean": {"diversity.distinct_2": 0.4 + 0.1 * rnd}},
        })
    return {"run_name": "r1", "num_rounds": 2, "rounds": rounds, "aggregation": "fedavg",
            "weighting": "patients", "update_norm_bound": 0.0, "secagg": False, "status": "completed",
            "last_round": 2}
