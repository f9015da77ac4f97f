"""The study's pure parts: per-round ε for a whole-run target, the site split it mirrors."""

import json

import pytest
from opacus.accountants import create_accountant

from bench.study import per_round_epsilon, training_patients


@pytest.mark.filterwarnings("ignore:Optimal order")
def test_per_round_epsilon_composes_to_at_most_the_whole_run_target():
    n, batch, steps, rounds, total = 96, 16, 10, 3, 4.0
    e, achieved = per_round_epsilon(total, n_train=n, batch=batch, steps=steps, rounds=rounds,
                                    accountant="rdp")
    # composition is sub-additive here: each round may spend more than total/rounds
    assert total / rounds < e < total
    assert 0.97 * total < achieved <= total
    # independently: the site's own sigma for e, composed over the rounds as its ledger does
    from opacus.accountants.utils import get_noise_multiplier

    from client.dp.sampling import patients_bucket, sample_rate_for
    from client.site import default_delta

    q, delta = sample_rate_for(n, batch), default_delta(patients_bucket(n))  # what the site uses
    sigma = get_noise_multiplier(target_epsilon=e, target_delta=delta, sample_rate=q, steps=steps,
                                 accountant="rdp")
    acc = create_accountant(mechanism="rdp")
    acc.history = [(sigma, q, steps)] * rounds
    assert acc.get_epsilon(delta=delta) <= total


def test_training_patients_mirrors_the_site_split(tmp_path):
    notes = tmp_path / "notes.jsonl"
    notes.write_text("".join(json.dumps({"patient_id": f"p{i % 7}", "text": "x"}) + "\n" for i in range(20)))
    assert training_patients(notes, heldout_fraction=0.2) == 7 - 1  # round(1.4) = 1 held out
    assert training_patients(notes, heldout_fraction=0.5) == 7 - 4  # round(3.5) = 4


def test_study_config_is_the_defaults_plus_real_overrides():
    """Every key the study sets changes a run-config default (the seeds too, at a non-zero seed)."""
    from bench.study import plan
    from shared.run_config import RunConfig, to_flower, with_overrides

    defaults = to_flower(RunConfig())
    for reduced in (False, True):
        config = plan(reduced=reduced, seed=1).run_config
        with_overrides(RunConfig(), config)  # valid
        assert [k for k, v in config.items() if defaults[k] == v] == []
