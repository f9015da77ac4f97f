"""Plan a run before spending budget: σ, ε per round, noise-to-signal, and what the study measured.

A coordinator or a hospital types the numbers (patients a site trains on, the
whole-run ε target, rounds, steps, batch); nothing here reads a site's data,
and a site's real count never needs to leave it. The formulas are the site's own
(:mod:`shared.dp_defaults`: bucketed q, default δ, evaluation σ) and the
accountant is the one the ledger uses (:func:`shared.accounting.compute_epsilon`),
so the plan is what the sites will charge, to the accountant's 0.01-ε tolerance.

Privacy meaning of the numbers: ε and δ are patient-level (the unit of privacy
is the patient), for one site, over the whole run, training and the evaluation
releases together.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.accounting import compute_epsilon
from shared.dp_defaults import (
    DEFAULT_EVAL_NOISE_MULTIPLIER,
    default_delta,
    patients_bucket,
    sample_rate_for,
)
from shared.errors import ConfigError, PrivacyError, Problem
from shared.run_config import LoraConfig, TrainConfig
from shared.whitelist import ACCOUNTANTS

MEASURED_PATH = Path(__file__).with_name("measured_fidelity.json")
"""The study's measured fidelity per arm (docs/results.md), shared by the docs and ``plan``."""

NEAR_FACTOR = 2.0
"""A measurement is "near" when ε, patients, total steps and batch are each within this factor."""

DEFAULT_STEPS = TrainConfig().steps  # the run config's defaults: one definition (shared/run_config.py)
DEFAULT_LORA_R = LoraConfig().r
MAX_ROWS = 10  # rounds shown in the per-round table (evenly spaced, the last one always)


@dataclass(frozen=True)
class RoundRow:
    """Cumulative ε after ``round`` rounds: training alone, and with the evaluation releases."""

    round: int
    epsilon_training: float
    epsilon_total: float


@dataclass(frozen=True)
class Measurement:
    """One arm of the study (``docs/results.md``) and how far its setting is from the plan's."""

    name: str
    epsilon: float
    setting: dict[str, Any]
    fidelity: dict[str, float]
    distance: float  # sum over knobs of |ln(plan / measured)|
    near: bool


@dataclass(frozen=True)
class Plan:
    """What a run with these knobs costs one site, and what it buys.

    ``sigma``: the DP-SGD noise multiplier whose ``rounds·steps`` steps cost the
    whole-run target alone (Opacus' ``get_noise_multiplier``). ``epsilon_per_round``:
    one round's training cost at that σ — the value for ``train.epsilon-per-round``.
    ``epsilon_eval``: one evaluation release alone (σ_eval, q = 1, one step).
    ``noise_to_signal``: σ·C·√d / (B·C) = σ·√d / B, the norm of one step's noise over
    the largest possible norm of the summed clipped gradients of an expected batch
    (d adapter parameters, B expected batch): a lower bound on the real ratio, as
    per-patient gradients rarely align. ``noise_to_signal_run``: the same over the whole
    run, σ·√d / (B·√(rounds·steps)): a gradient direction that holds from step to
    step adds up rounds·steps times, independent noise only √(rounds·steps) times, so
    this is the ratio that compares plans of different batch and step counts.
    """

    patients: int
    bucket: int
    epsilon_target: float
    rounds: int
    steps: int
    batch: int
    delta: float
    accountant: str
    q: float
    expected_batch: float
    sigma: float
    epsilon_per_round: float
    eval_sigma: float
    evaluations_per_round: int
    epsilon_eval: float
    adapter_params: int
    noise_to_signal: float
    rows: tuple[RoundRow, ...]
    measurement: Measurement | None

    @property
    def noise_to_signal_run(self) -> float:
        return self.noise_to_signal / math.sqrt(self.rounds * self.steps)

    @property
    def epsilon_total(self) -> float:
        return self.rows[-1].epsilon_total

    @property
    def over_target(self) -> bool:
        """True when the evaluations push the whole run above the target."""
        return self.epsilon_total > self.epsilon_target


def embedded_adapter_params(r: int = DEFAULT_LORA_R) -> int:
    """Trainable LoRA parameters of the embedded default model at rank ``r`` (family default targets)."""
    from shared.adapter_spec import EMBEDDED_MODEL_CONFIG, spec_from_config

    spec = spec_from_config(EMBEDDED_MODEL_CONFIG, r=r, targets=None, dtype="float32")
    return sum(math.prod(shape) for shape, _ in spec.values())


def _problems(**kv: Any) -> list[Problem]:
    p: list[Problem] = []

    def positive_int(name: str, value: Any, low: int = 1) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            p.append(Problem(name, f"must be an integer >= {low}, got {value!r}"))

    positive_int("patients", kv["patients"])
    positive_int("rounds", kv["rounds"])
    positive_int("steps", kv["steps"])
    positive_int("batch", kv["batch"])
    positive_int("adapter_params", kv["adapter_params"])
    positive_int("evaluations_per_round", kv["evaluations_per_round"], low=0)
    eps = kv["epsilon"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        p.append(Problem("epsilon", f"must be a finite number > 0, got {eps!r}"))
    delta = kv["delta"]
    if delta is not None and (isinstance(delta, bool) or not isinstance(delta, (int, float))
                              or not 0 < delta < 1):
        p.append(Problem("delta", f"must be in (0, 1), got {delta!r}"))
    if kv["accountant"] not in ACCOUNTANTS:
        p.append(Problem("accountant", f"must be one of {sorted(ACCOUNTANTS)}, got {kv['accountant']!r}"))
    sigma = kv["eval_noise_multiplier"]
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma >= 0.5:
        p.append(Problem("eval_noise_multiplier", f"must be >= 0.5 (the site's floor), got {sigma!r}"))
    if not p and kv["rounds"] * kv["steps"] > 1_000_000:
        p.append(Problem("rounds × steps", "more than 1,000,000 steps"))
    return p


def _shown_rounds(rounds: int) -> list[int]:
    if rounds <= MAX_ROWS:
        return list(range(1, rounds + 1))
    return sorted({max(1, round(rounds * i / MAX_ROWS)) for i in range(1, MAX_ROWS + 1)})


def load_measurements(path: Path = MEASURED_PATH) -> dict[str, Any]:
    """The measured study table (``shared/measured_fidelity.json``)."""
    return json.loads(path.read_text(encoding="utf-8"))


def nearest_measurement(
    *, epsilon: float, patients: int, rounds: int, steps: int, batch: int, data: dict[str, Any] | None = None
) -> Measurement | None:
    """The measured DP arm closest to this setting; ``near`` False when any knob is off by > 2×.

    Compared knobs: whole-run ε (achieved), training patients per site, total
    steps (rounds × steps) and expected batch; distance = Σ |ln(plan/measured)|.
    An arm's own ``setting`` (a proxy-site measurement) overrides the table's.
    None when the table has no DP arm.
    """
    data = load_measurements() if data is None else data
    best: Measurement | None = None
    for arm in data["arms"]:
        s = {**data["setting"], **arm.get("setting", {})}  # an arm may be measured elsewhere (the proxy)
        eps = arm["epsilon"]
        if not isinstance(eps, (int, float)) or not math.isfinite(eps):
            continue  # zero-shot and no-DP are references, not settings to plan for
        ratios = (epsilon / eps, patients / s["train_patients"],
                  rounds * steps / (s["rounds"] * s["steps"]), batch / s["batch"])
        distance = sum(abs(math.log(r)) for r in ratios)
        near = all(abs(math.log(r)) <= math.log(NEAR_FACTOR) for r in ratios)
        m = Measurement(arm["name"], float(eps), dict(s), {k: float(arm[k]) for k in data["metrics"]},
                        distance, near)
        if best is None or m.distance < best.distance:
            best = m
    return best


def plan_run(
    *,
    patients: int,
    epsilon: float,
    rounds: int,
    batch: int,
    steps: int = DEFAULT_STEPS,
    delta: float | None = None,
    accountant: str = "prv",
    adapter_params: int,
    eval_noise_multiplier: float = DEFAULT_EVAL_NOISE_MULTIPLIER,
    evaluations_per_round: int = 1,
) -> Plan:
    """The plan for one site training on ``patients`` patients (see :class:`Plan`).

    ``epsilon``: whole-run target (patient-level, this site). ``delta``: None =
    the site default for the patients bucket. Raises :class:`ConfigError` listing
    every bad input, :class:`PrivacyError` when no σ reaches the target.
    """
    problems = _problems(patients=patients, epsilon=epsilon, rounds=rounds, batch=batch, steps=steps,
                         delta=delta, accountant=accountant, adapter_params=adapter_params,
                         eval_noise_multiplier=eval_noise_multiplier,
                         evaluations_per_round=evaluations_per_round)
    if problems:
        raise ConfigError("cannot plan this run", problems)
    from opacus.accountants.utils import get_noise_multiplier

    bucket = patients_bucket(patients)
    delta = default_delta(bucket) if delta is None else float(delta)
    q = sample_rate_for(patients, batch)
    try:
        sigma = float(get_noise_multiplier(target_epsilon=float(epsilon), target_delta=delta, sample_rate=q,
                                           steps=rounds * steps, accountant=accountant))
    except ValueError as exc:
        raise PrivacyError(f"ε = {epsilon:g} is unreachable at δ = {delta:.3g}, q = {q:.4g}, "
                           f"{rounds * steps} steps: {exc}") from None
    eval_sigma = float(eval_noise_multiplier)

    def eps_of(k: int, with_eval: bool) -> float:
        history = [(sigma, q, steps * k)]
        if with_eval and evaluations_per_round:
            history.append((eval_sigma, 1.0, evaluations_per_round * k))
        return compute_epsilon(history, delta=delta, accountant=accountant)

    rows = tuple(RoundRow(k, eps_of(k, False), eps_of(k, True)) for k in _shown_rounds(rounds))
    eval_eps = (compute_epsilon([(eval_sigma, 1.0, 1)], delta=delta, accountant=accountant)
                if evaluations_per_round else 0.0)
    expected_batch = q * patients
    return Plan(
        patients=patients, bucket=bucket, epsilon_target=float(epsilon), rounds=rounds, steps=steps,
        batch=batch, delta=delta, accountant=accountant, q=q, expected_batch=expected_batch, sigma=sigma,
        epsilon_per_round=rows[0].epsilon_training if rows[0].round == 1 else eps_of(1, False),
        eval_sigma=eval_sigma, evaluations_per_round=evaluations_per_round, epsilon_eval=eval_eps,
        adapter_params=adapter_params,
        noise_to_signal=sigma * math.sqrt(adapter_params) / expected_batch,
        rows=rows,
        measurement=nearest_measurement(epsilon=float(epsilon), patients=patients, rounds=rounds,
                                        steps=steps, batch=batch),
    )


def plan_lines(plan: Plan) -> list[str]:
    """The plan as plain text lines (what ``fedsynth-coordinator plan`` prints)."""
    p = plan
    out = [
        f"Plan for one site: {p.patients} training patients (bucket {p.bucket}), target ε = "
        f"{p.epsilon_target:g} over {p.rounds} rounds × {p.steps} steps, expected batch {p.batch}",
        f"  δ = {p.delta:.3g}   accountant = {p.accountant}   q = {p.q:.4g} (expected batch "
        f"{p.expected_batch:.1f} patients)",
        f"  σ (noise multiplier)        = {p.sigma:.4g}",
        f"  ε per round (training)      = {p.epsilon_per_round:.4g}   "
        f"-> run config train.epsilon-per-round = {p.epsilon_per_round:.4g}",
    ]
    if p.evaluations_per_round:
        out.append(f"  ε per evaluation release   = {p.epsilon_eval:.4g}   (σ_eval = {p.eval_sigma:g}, "
                   f"q = 1, 1 step; {p.evaluations_per_round} per round)")
    out.append(f"  noise-to-signal per step    = {p.noise_to_signal:.3g}   (σ·√d / B, d = "
               f"{p.adapter_params:,} adapter parameters)")
    out.append(f"  noise-to-signal over the run = {p.noise_to_signal_run:.3g}   (σ·√d / (B·√(rounds·steps)): "
               "compare plans of other batch and step counts with this)")
    out += ["", "  round   cumulative ε (training)   cumulative ε (training + evaluations)"]
    out += [f"  {r.round:>5}   {r.epsilon_training:>23.4g}   {r.epsilon_total:>37.4g}" for r in p.rows]
    if p.over_target:
        out.append(f"  WARNING: with the evaluation releases the run costs ε = {p.epsilon_total:.4g}, "
                   f"above the target {p.epsilon_target:g}: evaluate less often, raise σ_eval, or "
                   "lower the training target.")
    out.append("")
    m = p.measurement
    if m is None or not m.near:
        out.append("  Measured fidelity: no measurement near this setting (the study: "
                   "docs/results.md; ε, patients, total steps and batch must each be within 2×).")
    else:
        s = m.setting
        metrics = ", ".join(f"{k} {v:.3g}" for k, v in m.fidelity.items())
        out.append(f"  Measured fidelity nearest this setting: '{m.name}' (ε {m.epsilon:g}, "
                   f"{s['train_patients']} patients/site, {s['rounds']}×{s['steps']} steps, batch "
                   f"{s['batch']}): {metrics}")
        out.append(f"    ({s.get('source', 'docs/results.md')}; tiny embedded model: an order of magnitude, "
                   "not a promise)")
    return out
