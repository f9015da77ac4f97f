"""TEST-ONLY stand-in for client/site.py, copied into a temporary app bundle by the e2e test.

Site k (site id ``site-a`` -> 0, ``site-b`` -> 1, ...; ``site-<k>`` also works)
returns the global adapter plus (k + 1) and reports patients bucket 10 (k + 1);
it never touches notes or models. Never shipped: it only exists under tests/.

Kill-site variant (tests/e2e/test_kill_site.py): a site whose environment sets
``FEDSYNTH_E2E_HANG_IN_TRAIN=<path>`` writes that file when it enters training
and then hangs there, so the test can SIGKILL the site mid-train.
"""

import os
import time

import numpy as np

A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def adapter_spec(settings, run):
    return {A: ((run.lora.r, 4), run.lora.dtype), B: ((4, run.lora.r), run.lora.dtype)}


def site_train(settings, run, *, global_adapter, round_id):
    marker = os.environ.get("FEDSYNTH_E2E_HANG_IN_TRAIN")
    if marker:  # only the site the kill test is about to SIGKILL has this set
        with open(marker, "w") as fh:
            fh.write(settings.site_id)
        time.sleep(3600)
    suffix = settings.site_id.rsplit("-", 1)[-1]
    k = int(suffix) if suffix.isdigit() else ord(suffix) - ord("a")
    base = global_adapter or {
        A: np.zeros((run.lora.r, 4), np.float32),
        B: np.zeros((4, run.lora.r), np.float32),
    }
    adapter = {n: v + (k + 1) for n, v in base.items()}
    privacy = dict(epsilon=0.5 * round_id, epsilon_round=0.5, delta=1e-5, noise_multiplier=1.0,
                   sample_rate=0.1, steps=run.train.steps, max_grad_norm=1.0,
                   accountant=run.train.accountant, secure_mode=run.train.secure_mode,
                   patients_bucket=10 * (k + 1), ledger_seq=round_id, ledger_head=f"{k:x}" * 64)
    return adapter, privacy


def release_update(settings, privacy):
    pass  # no ledger here: the real one marks the reservation released after the wire check


def site_evaluate(settings, run, *, global_adapter, round_id):
    return {"diversity.distinct_1": 0.5}
