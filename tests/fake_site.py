"""TEST-ONLY stand-in for client/site.py: the one fake site of the test suite.

Two uses, one behaviour. The e2e and simulation tests copy this file into a temporary
app bundle as ``client/site.py`` (so it imports nothing from ``tests``); the in-process
federation tests (tests/federation.py) set :func:`make_fake_site` as ``client.app.site``.

Site k (site id ``site-a`` -> 0, ``site-b`` -> 1, ...; ``site-<k>`` and ``site<k>`` work
too) returns the global adapter plus (k + 1) and reports patients bucket 10 (k + 1); it
never touches notes or models. Never shipped: it only exists under tests/.

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
    return fake_update(settings, run, global_adapter, spec=adapter_spec(settings, run))


def site_index(site_id):
    """k of ``site-a``/``site-<k>``/``site<k>`` (a -> 0, b -> 1, ...)."""
    suffix = site_id.rsplit("-", 1)[-1].removeprefix("site")
    return int(suffix) if suffix.isdigit() else ord(suffix) - ord("a")


def fake_privacy(settings, run, *, patients_bucket):
    """The privacy scalars an honest site sends with an update (ledger fields from :func:`fake_ledger`)."""
    return dict(delta=1e-5, noise_multiplier=1.0, sample_rate=0.1, steps=run.train.steps,
                max_grad_norm=1.0, accountant=run.train.accountant,
                secure_mode=run.train.secure_mode, patients_bucket=patients_bucket,
                **fake_ledger(settings, run))


def fake_update(settings, run, global_adapter, *, spec):
    """Site k's (adapter, privacy): the global adapter (zeros of ``spec`` in round 1) + (k + 1)."""
    k = site_index(settings.site_id)
    base = global_adapter or {n: np.zeros(shape, np.float32) for n, (shape, _d) in spec.items()}
    adapter = {n: v + (k + 1) for n, v in base.items()}
    return adapter, fake_privacy(settings, run, patients_bucket=10 * (k + 1))


def release_update(settings, privacy):
    pass  # no ledger here: the real one marks the reservation released after the wire check


def site_evaluate(settings, run, *, global_adapter, round_id):
    return {"diversity.distinct_1": 0.5}


# --- the in-process variant ---------------------------------------------------------------

SECRET = "Jane Roe (MRN 998877)"


def fake_spec(run):
    """The in-process fake sites' adapter: LoRA on layer 0's q_proj of TINY_MODEL_CONFIG.

    (= the spec the coordinator derives from TINY_MODEL_CONFIG with lora.targets = q_proj;
    tests/server/test_app_wire.py checks it.)
    """
    return {A: ((run.lora.r, 4), run.lora.dtype), B: ((4, run.lora.r), run.lora.dtype)}


def make_fake_site(calls):
    """A fresh module of this fake site for ``client.app.site``, recording into ``calls``.

    Its adapter is :func:`fake_spec`'s; ``("train"|"evaluate", site_id, round, global_adapter)``
    is appended to ``calls`` per call and ``(site_id, ledger_seq)`` to ``module.released``.
    Two sites fail on purpose: ``site2`` is out of budget (BudgetExceededError) and
    ``site3`` raises an error quoting a patient (:data:`SECRET`), which must not leave it.
    """
    import types

    from shared.errors import BudgetExceededError

    mod = types.ModuleType("client.site")

    def fake_adapter_spec(settings, run):
        return fake_spec(run)

    def fake_site_train(settings, run, *, global_adapter, round_id):
        calls.append(("train", settings.site_id, round_id, global_adapter))
        if settings.site_id == "site2":
            raise BudgetExceededError("ceiling", projected_epsilon=9.0, ceiling=8.0)
        if settings.site_id == "site3":
            raise ValueError(f"bad note for {SECRET}")  # must not leave the site as text
        return fake_update(settings, run, global_adapter, spec=fake_spec(run))

    def fake_release_update(settings, privacy):  # after the site's wire check (kept apart from calls)
        mod.released.append((settings.site_id, privacy.ledger_seq))

    def fake_site_evaluate(settings, run, *, global_adapter, round_id):
        calls.append(("evaluate", settings.site_id, round_id, global_adapter))
        return {"diversity.distinct_1": 0.25 * (site_index(settings.site_id) + 1)}

    mod.adapter_spec, mod.site_train, mod.site_evaluate = fake_adapter_spec, fake_site_train, fake_site_evaluate
    mod.release_update, mod.released = fake_release_update, []
    return mod
