"""shared.planning: σ, ε per round and in total, noise-to-signal, nearest measurement (#15 item 3)."""

import math
import re
import warnings
from pathlib import Path

import pytest

from shared import dp_defaults
from shared.errors import ConfigError, PrivacyError
from shared.planning import (
    load_measurements,
    nearest_measurement,
    plan_lines,
    plan_run,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def test_site_defaults_are_the_sites_own():
    """The site imports these formulas (one definition); known answers."""
    from client import site
    from client.dp import sampling as dp_sampling

    assert dp_sampling.sample_rate_for is dp_defaults.sample_rate_for
    assert dp_sampling.patients_bucket is dp_defaults.patients_bucket
    assert site.default_delta is dp_defaults.default_delta
    assert dp_defaults.sample_rate_for(64, 16) == 16 / 60
    assert dp_defaults.sample_rate_for(5, 16) == 1.0
    assert dp_defaults.default_delta(60) == 1e-5
    assert dp_defaults.default_delta(5000) == pytest.approx(1 / (10 * 5000 * math.log(5000)))


def test_known_answers_against_opacus():
    from opacus.accountants import RDPAccountant
    from opacus.accountants.utils import get_noise_multiplier

    p = plan_run(patients=1234, epsilon=3.0, rounds=4, batch=32, steps=20, accountant="rdp",
                 adapter_params=10_000, eval_noise_multiplier=5.0, evaluations_per_round=1)
    q = 32 / 1230
    delta = min(1e-5, 1 / (10 * 1230 * math.log(1230)))
    assert (p.q, p.delta, p.bucket) == (pytest.approx(q), pytest.approx(delta), 1230)
    sigma = get_noise_multiplier(target_epsilon=3.0, target_delta=delta, sample_rate=q, steps=80,
                                 accountant="rdp")
    assert p.sigma == pytest.approx(sigma)

    def eps(history):
        acc = RDPAccountant()
        acc.history = history
        return acc.get_epsilon(delta=delta)

    assert p.epsilon_per_round == pytest.approx(eps([(sigma, q, 20)]), rel=1e-6)
    assert p.epsilon_eval == pytest.approx(eps([(5.0, 1.0, 1)]), rel=1e-6)
    assert [r.round for r in p.rows] == [1, 2, 3, 4]
    assert p.rows[-1].epsilon_training == pytest.approx(eps([(sigma, q, 80)]), rel=1e-6)
    assert p.rows[-1].epsilon_training <= 3.0 + 0.01
    assert p.epsilon_total == pytest.approx(eps([(sigma, q, 80), (5.0, 1.0, 4)]), rel=1e-6)
    assert p.epsilon_total > p.rows[-1].epsilon_training  # evaluations are charged
    assert p.over_target
    assert p.expected_batch == pytest.approx(q * 1234)
    assert p.noise_to_signal == pytest.approx(sigma * 100 / (q * 1234))
    assert p.noise_to_signal_run == pytest.approx(sigma * 100 / (q * 1234 * math.sqrt(80)))
    text = "\n".join(plan_lines(p))
    assert f"noise-to-signal over the run = {p.noise_to_signal_run:.3g}" in text
    assert "WARNING" in text and f"{sigma:.4g}" in text


def test_without_evaluations_the_total_meets_the_target_and_many_rounds_are_sampled():
    p = plan_run(patients=500, epsilon=2.0, rounds=40, batch=25, steps=10, accountant="rdp",
                 adapter_params=100, evaluations_per_round=0)
    assert len(p.rows) == 10 and p.rows[-1].round == 40 and p.rows[0].round == 4
    assert all(r.epsilon_total == r.epsilon_training for r in p.rows)
    assert not p.over_target and p.epsilon_eval == 0.0
    assert [r.epsilon_training for r in p.rows] == sorted(r.epsilon_training for r in p.rows)
    assert p.epsilon_per_round < p.rows[0].epsilon_training  # round 1 alone, not round 4


def test_bad_input_lists_every_problem():
    with pytest.raises(ConfigError) as exc:
        plan_run(patients=0, epsilon=-1.0, rounds=2, batch=16, accountant="gdp", adapter_params=10,
                 delta=2.0, eval_noise_multiplier=0.1)
    where = {p.where for p in exc.value.problems}
    assert where == {"patients", "epsilon", "accountant", "delta", "eval_noise_multiplier"}
    with pytest.raises(ConfigError):
        plan_run(patients=100, epsilon=math.inf, rounds=2, batch=16, adapter_params=10)
    with pytest.raises(PrivacyError, match="unreachable"):
        plan_run(patients=10, epsilon=1e-3, rounds=100, batch=10, steps=10, accountant="rdp",
                 adapter_params=10)


def test_nearest_measurement():
    exact = nearest_measurement(epsilon=4.0, patients=64, rounds=2, steps=30, batch=16)
    assert exact.name == "DP ε = 4" and exact.near
    assert exact.fidelity["real_classifier_f1"] == 0.067
    assert nearest_measurement(epsilon=1.3, patients=64, rounds=2, steps=30, batch=16).name == "DP ε = 1"
    # same ε, but each of these knobs more than 2× away: no measurement near
    for kw in ({"patients": 5000}, {"rounds": 30}, {"batch": 128}, {"epsilon": 50.0}):
        args = {"epsilon": 4.0, "patients": 64, "rounds": 2, "steps": 30, "batch": 16} | kw
        assert not nearest_measurement(**args).near, kw
    assert nearest_measurement(epsilon=4.0, patients=64, rounds=2, steps=30, batch=16,
                               data={"setting": {}, "metrics": [], "arms": []}) is None


def test_the_default_recipe_at_hospital_scale_finds_the_proxy_measurement():
    m = nearest_measurement(epsilon=8.0, patients=800, rounds=3, steps=100, batch=64)
    assert m.name == "proxy: DP ε = 8" and m.near and m.setting["train_patients"] == 800
    p = plan_run(patients=800, epsilon=8.0, rounds=3, batch=64, steps=100, adapter_params=233472)
    assert "proxy site (bench/proxy.py)" in "\n".join(plan_lines(p))


def test_far_setting_says_no_measurement():
    p = plan_run(patients=5000, epsilon=1.0, rounds=3, batch=64, steps=10, accountant="rdp",
                 adapter_params=49152)
    assert "no measurement near this setting" in "\n".join(plan_lines(p))


def test_measured_table_is_the_one_in_results_md():
    """docs/results.md and shared/measured_fidelity.json hold the same numbers."""
    data = load_measurements()
    doc = (ROOT / "docs" / "results.md").read_text(encoding="utf-8")
    head = "| setting | centroid_margin | real_classifier_f1 | tstr_trtr_ratio |"
    assert head in doc
    rows = doc.split(head, 1)[1].split("\n\n", 1)[0].strip().splitlines()[1:]
    table = {}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        table[cells[0]] = [float(re.match(r"-?[\d.]+", c).group()) for c in cells[1:]]
    study = [arm for arm in data["arms"] if "setting" not in arm]
    for arm in study:
        assert table[arm["name"]] == [arm["centroid_margin"], arm["real_classifier_f1"], arm["tstr_trtr_ratio"]]
    for arm in study:
        if isinstance(arm["epsilon"], float):
            assert f"| {arm['epsilon']:.3f} " in doc  # the achieved ε of the ε table
    # the proxy-site arms (bench/proxy.py): their own table, same numbers
    head = "| proxy arm | ε achieved | real_classifier_f1 | tstr_trtr_ratio | centroid_margin |"
    proxy = [arm for arm in data["arms"] if "setting" in arm]
    if proxy:
        rows = doc.split(head, 1)[1].split("\n\n", 1)[0].strip().splitlines()[1:]
        cells = {r.strip("|").split("|")[0].strip(): [c.strip() for c in r.strip("|").split("|")[1:]] for r in rows}
        for arm in proxy:
            eps = "—" if arm["epsilon"] is None else ("∞" if arm["epsilon"] == "inf" else f"{arm['epsilon']:.3f}")
            want = [eps] + [f"{arm[k]:.3f}" for k in ("real_classifier_f1", "tstr_trtr_ratio", "centroid_margin")]
            assert cells[arm["name"]] == want, arm["name"]
    s = data["setting"]
    assert f"{s['rounds']} rounds × {s['steps']} steps" in doc and f"expected batch {s['batch']}" in doc


def test_embedded_adapter_params_is_the_lora_size():
    """4 layers × (4 attention projections 192 → 192, (r·192 + 192·r) each, and 3 MLP projections
    192 ↔ 512, (r·192 + 512·r) each) at r = 8: the family default targets."""
    from shared.planning import embedded_adapter_params

    assert embedded_adapter_params(8) == 4 * (4 * 2 * 192 + 3 * (192 + 512)) * 8 == 116736
    assert embedded_adapter_params() == 2 * 116736  # the run config's default rank, r = 16


def test_planning_imports_no_site_or_coordinator_code():
    import subprocess
    import sys

    code = ("import sys, shared.planning; bad = [m for m in sys.modules if m.split('.')[0] in "
            "('client', 'server')]; print(bad); sys.exit(1 if bad else 0)")
    got = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert got.returncode == 0, got.stdout + got.stderr
