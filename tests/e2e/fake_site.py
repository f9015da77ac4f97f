"""TEST-ONLY stand-in for client/site.py, copied into a temporary app bundle by the e2e test.

Site k (site id ``site-a`` -> 0, ``site-b`` -> 1, ...; ``site-<k>`` also works)
returns the global adapter plus (k + 1) and reports patients bucket 10 (k + 1);
it never touches notes or models. Never shipped: it only exists under tests/.

Kill-site variant (tests/e2e/test_kill_site.py): a site whose environment sets
``FEDSYNTH_E2E_HANG_IN_TRAIN=<path>`` writes that file when it enters training
and then hangs there, so the test can SIGKILL the site mid-train.
"""

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

from shared.accounting import compute_epsilon

A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
# The fake sites' "base model": a 4-wide one-layer llama (no weights). The coordinator
# derives the same spec from it (FEDSYNTH_COORD_BASE_MODEL_CONFIG, see
# write_base_model_config): its default LoRA targets give A/B above plus k/v/o_proj.
TINY_MODEL_CONFIG = {"model_type": "llama", "hidden_size": 4, "intermediate_size": 8,
                     "num_hidden_layers": 1, "num_attention_heads": 1, "num_key_value_heads": 1,
                     "vocab_size": 16}


def write_base_model_config(dst):
    """Write TINY_MODEL_CONFIG to ``dst``/config.json for the coordinator; returns the path."""
    path = Path(dst) / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(TINY_MODEL_CONFIG))
    return path


def fake_ledger(settings, run):
    """Ledger fields an honest site sends: epsilon, epsilon_round, ledger_seq, ledger_head.

    Like a real ledger it lives in the site's output dir and survives restarts and
    runs: every call reserves one more run (sigma 1.0, q 0.1, run.train.steps), the
    sequence number grows, and epsilon is the composition of every run reserved so
    far, so the coordinator's anchor (server/site_budget.py) accepts it.
    """
    path = Path(settings.output_dir) / f"fake-ledger-{settings.site_id}.json"
    state = json.loads(path.read_text()) if path.exists() else {"runs": 0, "seq": 0}
    state["runs"] += 1
    state["seq"] += 1
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state))
    run_ = (1.0, 0.1, run.train.steps)
    return dict(
        epsilon=compute_epsilon([run_] * state["runs"], delta=1e-5, accountant=run.train.accountant),
        epsilon_round=compute_epsilon([run_], delta=1e-5, accountant=run.train.accountant),
        ledger_seq=state["seq"],
        # a real head MACs the records with the site's secret: a re-made ledger has another head
        ledger_head=hashlib.sha256(f"{settings.site_id}:{state['seq']}:".encode() + os.urandom(16)).hexdigest(),
    )


def adapter_spec(settings, run):
    from shared.adapter_spec import spec_from_config

    return spec_from_config(TINY_MODEL_CONFIG, r=run.lora.r, targets=run.lora.targets or None,
                            dtype=run.lora.dtype)


def site_train(settings, run, *, global_adapter, round_id):
    marker = os.environ.get("FEDSYNTH_E2E_HANG_IN_TRAIN")
    if marker:  # only the site the kill test is about to SIGKILL has this set
        with open(marker, "w") as fh:
            fh.write(settings.site_id)
        time.sleep(3600)
    suffix = settings.site_id.rsplit("-", 1)[-1]
    k = int(suffix) if suffix.isdigit() else ord(suffix) - ord("a")
    base = global_adapter or {n: np.zeros(shape, np.float32) for n, (shape, _d) in adapter_spec(settings, run).items()}
    adapter = {n: v + (k + 1) for n, v in base.items()}
    privacy = dict(delta=1e-5, noise_multiplier=1.0, sample_rate=0.1, steps=run.train.steps,
                   max_grad_norm=1.0, accountant=run.train.accountant,
                   secure_mode=run.train.secure_mode, patients_bucket=10 * (k + 1),
                   **fake_ledger(settings, run))
    return adapter, privacy


def release_update(settings, privacy):
    pass  # no ledger here: the real one marks the reservation released after the wire check


def site_evaluate(settings, run, *, global_adapter, round_id):
    return {"diversity.distinct_1": 0.5}
