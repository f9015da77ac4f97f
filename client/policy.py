"""Site floors: the run config and the node config may only TIGHTEN the site's own settings.

Who chooses what (docs/privacy-model.md, "Site floors"):

* The run config is the coordinator's (``context.run_config``), and the bundle pin
  (:mod:`client.bundle_trust`) covers code, not these values.
* The node config (``flower-supernode --node-config``) reaches the ClientApp over the
  SuperNode's local runtime API; a local process that binds that port first can feed
  any node config. It is treated as untrusted too.
* :class:`~shared.settings.SiteSettings` from the site's environment / .env / secrets
  are the site's decisions and set the floors.

So every privacy-relevant knob is checked here, in one place, before anything is
trained, generated or sent:

==========================  ================================================  ==============
knob                        site setting (``FEDSYNTH_SITE_*``)                looser value
==========================  ================================================  ==============
train.secure-mode           ``REQUIRE_SECURE_NOISE`` (default true)           forced true
train.noise-multiplier      ``MIN_NOISE_MULTIPLIER`` (0.5)                    raised
train.epsilon-per-round     ``MAX_EPSILON_PER_ROUND`` (2.0)                   lowered
(either mode, other floor)  both, at the round's real sampling rate           :func:`floor_dp`
generate.temperature        ``MIN_EVAL_TEMPERATURE`` (0.7)                    raised
generate.top-p / top-k      ``MIN_EVAL_TOP_P`` (0.9) / ``MIN_EVAL_TOP_K`` (50)  raised (top-k 0 = off)
evaluate.k-min              ``K_MIN`` (10)                                    raised
min-sites                   ``MIN_SITES`` (2)                                 round refused
secagg-reconstruction-      ``MIN_SECAGG_THRESHOLD`` (0.6, > 1/2)             round refused
threshold (secagg = true)
SecAgg+ stage parameters    ``MIN_SECAGG_THRESHOLD``, ``MIN_SECAGG_GROUP_SIZE``  refused
                            (:mod:`client.secagg_guard`)
node config epsilon-ceiling ``EPSILON_CEILING`` (8)                           only lower
node config k-min           ``K_MIN``                                         only higher
node config ledger-path     ``LEDGER_PATH`` when set                          refused
==========================  ================================================  ==============

A knob the site applies itself (noise, secure mode, temperature, k_min) is
tightened and the change is reported (logged, and written to the site's audit log
as ``policy_tightened``). A knob only the coordinator acts on (how many sites it
aggregates, its SecAgg+ threshold) cannot be tightened at the site, so a looser
value refuses the round (:class:`~shared.errors.PrivacyError`). A node config that
would loosen a floor is refused (:class:`~shared.errors.ConfigError`): a local
process can at worst stop this site from taking part (which holding the port
already allows), never weaken what it sends.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from shared.accounting import compute_epsilon
from shared.dp_defaults import sample_rate_for
from shared.errors import PrivacyError, Problem
from shared.run_config import RunConfig, TrainConfig
from shared.settings import SiteSettings

if TYPE_CHECKING:
    from shared.audit import AuditLog

log = logging.getLogger("fedsynth.site.policy")


def apply_site_floors(run: RunConfig, settings: SiteSettings) -> tuple[RunConfig, list[str]]:
    """The run config tightened to this site's floors, and one line per knob that was tightened.

    Pure: nothing is logged or written (callers use :func:`report_tightened`).
    Raises :class:`PrivacyError`, listing every problem, when a knob that only the
    coordinator acts on is looser than the site allows (``min-sites``; with
    ``secagg = true`` the SecAgg+ reconstruction threshold).
    """
    refused: list[Problem] = []
    if run.min_sites < settings.min_sites:
        refused.append(Problem("min-sites", f"{run.min_sites} is below this site's floor "
                                            f"FEDSYNTH_SITE_MIN_SITES={settings.min_sites}"))
    if run.secagg and run.secagg_threshold < settings.min_secagg_threshold:
        refused.append(Problem(
            "secagg-reconstruction-threshold",
            f"{run.secagg_threshold:g} is below this site's floor "
            f"FEDSYNTH_SITE_MIN_SECAGG_THRESHOLD={settings.min_secagg_threshold:g}"))
    if refused:
        raise PrivacyError("the run config is looser than this site's floors", refused)

    tightened: list[str] = []
    t, g = run.train, run.generate
    train: dict[str, Any] = {}
    if settings.require_secure_noise and not t.secure_mode:
        train["secure_mode"] = True
        tightened.append("train.secure-mode false -> true (FEDSYNTH_SITE_REQUIRE_SECURE_NOISE)")
    if 0 < t.noise_multiplier < settings.min_noise_multiplier:
        train["noise_multiplier"] = settings.min_noise_multiplier
        tightened.append(f"train.noise-multiplier {t.noise_multiplier:g} -> "
                         f"{settings.min_noise_multiplier:g} (FEDSYNTH_SITE_MIN_NOISE_MULTIPLIER)")
    if t.epsilon_per_round > settings.max_epsilon_per_round:
        train["epsilon_per_round"] = settings.max_epsilon_per_round
        tightened.append(f"train.epsilon-per-round {t.epsilon_per_round:g} -> "
                         f"{settings.max_epsilon_per_round:g} (FEDSYNTH_SITE_MAX_EPSILON_PER_ROUND)")
    generate: dict[str, Any] = {}
    if g.temperature < settings.min_eval_temperature:
        generate["temperature"] = settings.min_eval_temperature
        tightened.append(f"generate.temperature {g.temperature:g} -> "
                         f"{settings.min_eval_temperature:g} (FEDSYNTH_SITE_MIN_EVAL_TEMPERATURE)")
    if g.top_p < settings.min_eval_top_p:
        generate["top_p"] = settings.min_eval_top_p
        tightened.append(f"generate.top-p {g.top_p:g} -> {settings.min_eval_top_p:g} "
                         "(FEDSYNTH_SITE_MIN_EVAL_TOP_P)")
    if 0 < g.top_k < settings.min_eval_top_k:
        generate["top_k"] = settings.min_eval_top_k
        tightened.append(f"generate.top-k {g.top_k} -> {settings.min_eval_top_k} (FEDSYNTH_SITE_MIN_EVAL_TOP_K)")
    top: dict[str, Any] = {}
    if run.evaluate_k_min < settings.k_min:
        top["evaluate_k_min"] = settings.k_min
        tightened.append(f"evaluate.k-min {run.evaluate_k_min} -> {settings.k_min} (FEDSYNTH_SITE_K_MIN)")
    if train:
        top["train"] = dataclasses.replace(t, **train)
    if generate:
        top["generate"] = dataclasses.replace(g, **generate)
    return (dataclasses.replace(run, **top) if top else run), tightened


def floor_run(run: RunConfig, settings: SiteSettings, *, phase: str, round_id: int | str | None,
              audit: Callable[[], AuditLog | None]) -> RunConfig:
    """``run`` tightened to the site's floors (:func:`apply_site_floors`), reported: the one place.

    Every round a site runs goes through here before the site functions see its
    run config: the ClientApp's train, SecAgg+ train and evaluate paths
    (``client/app.py``) and ``fedsynth-site train`` (``client/cli.py``). What it
    tightened is logged and written to the audit log (``policy_tightened``); a run
    the site refuses (:class:`PrivacyError`) is written as ``update_rejected``
    (reason ``site_floor``) and the error re-raised. ``audit`` returns the site's
    audit log, or None when it is not available (best effort: the log line stays).
    """
    try:
        floored, tightened = apply_site_floors(run, settings)
    except PrivacyError as exc:
        log.warning("%s round %s refused by this site's floors: %s", phase,
                    "?" if round_id is None else round_id, exc)
        log_ = audit()
        if log_ is not None:
            data: dict[str, Any] = {"phase": phase, "reason": "site_floor",
                                    "problems": [str(p)[:200] for p in exc.problems]}
            if round_id is not None:
                data["round"] = round_id
            try:
                log_.append("update_rejected", data)
            except Exception:
                log.exception("could not write the refusal to the site's audit log")
        raise
    if tightened:
        report_tightened(tightened, phase=phase, round_id=round_id, audit=audit())
    return floored


def floor_dp(
    train: TrainConfig, settings: SiteSettings, *, n_patients: int, delta: float
) -> tuple[TrainConfig, list[str]]:
    """``train`` tightened to the site's noise floors at this round's real sampling rate.

    Used by every training path (:func:`client.site.train_local_round`, which the
    ClientApp and ``fedsynth-site train`` both reach). Besides what
    :func:`apply_site_floors` does in run terms, it enforces the floor of the OTHER
    mode, which needs the patient count:

    * sigma given: if ``steps`` Poisson-subsampled Gaussian steps at that sigma cost
      more than ``max_epsilon_per_round`` (at ``delta``), the round is run at that
      epsilon instead (Opacus solves a larger sigma);
    * epsilon given: if the solved sigma would be below ``min_noise_multiplier``, the
      round is run at that sigma instead (a smaller epsilon).

    The sampling rate is :func:`client.dp.sampling.sample_rate_for`, as
    :func:`client.train.train_dp` charges it. A round whose epsilon target is unreachable
    is left for ``train_dp`` to refuse, and so is one that sets neither sigma nor epsilon.
    """
    changes: dict[str, Any] = {}
    tightened: list[str] = []
    if settings.require_secure_noise and not train.secure_mode:
        changes["secure_mode"] = True
        tightened.append("train.secure-mode false -> true (FEDSYNTH_SITE_REQUIRE_SECURE_NOISE)")
    sigma, target = train.noise_multiplier, train.epsilon_per_round  # 0 = not set
    if 0 < sigma < settings.min_noise_multiplier:
        sigma = settings.min_noise_multiplier
        tightened.append(f"train.noise-multiplier {train.noise_multiplier:g} -> {sigma:g} "
                         "(FEDSYNTH_SITE_MIN_NOISE_MULTIPLIER)")
    if target > settings.max_epsilon_per_round:
        target = settings.max_epsilon_per_round
        tightened.append(f"train.epsilon-per-round {train.epsilon_per_round:g} -> {target:g} "
                         "(FEDSYNTH_SITE_MAX_EPSILON_PER_ROUND)")
    if n_patients >= 1 and train.expected_batch_size >= 1 and (sigma > 0) != (target > 0):
        q = sample_rate_for(n_patients, train.expected_batch_size)
        if sigma > 0:
            eps = compute_epsilon([(sigma, q, train.steps)], delta=delta, accountant=train.accountant)
            if eps > settings.max_epsilon_per_round:
                tightened.append(f"train.noise-multiplier {sigma:g} costs epsilon {eps:.3g} per round -> "
                                 f"train.epsilon-per-round {settings.max_epsilon_per_round:g} "
                                 "(FEDSYNTH_SITE_MAX_EPSILON_PER_ROUND)")
                sigma, target = 0.0, settings.max_epsilon_per_round
        else:
            solved = _sigma_for(target, q, train.steps, delta=delta, accountant=train.accountant)
            if solved is not None and solved < settings.min_noise_multiplier:
                tightened.append(f"train.epsilon-per-round {target:g} needs noise multiplier {solved:.3g} -> "
                                 f"train.noise-multiplier {settings.min_noise_multiplier:g} "
                                 "(FEDSYNTH_SITE_MIN_NOISE_MULTIPLIER)")
                sigma, target = settings.min_noise_multiplier, 0.0
    if (sigma, target) != (train.noise_multiplier, train.epsilon_per_round):
        changes.update(noise_multiplier=sigma, epsilon_per_round=target)
    return (dataclasses.replace(train, **changes) if changes else train), tightened


def _sigma_for(target: float, q: float, steps: int, *, delta: float, accountant: str) -> float | None:
    from opacus.accountants.utils import get_noise_multiplier

    try:
        return float(get_noise_multiplier(target_epsilon=target, target_delta=delta, sample_rate=q,
                                          steps=steps, accountant=accountant))
    except ValueError:  # unreachable target: train_dp refuses it with the full reason
        return None


# node-config key -> (SiteSettings field, direction a node config may move it)
NODE_FLOORS = {"epsilon-ceiling": ("epsilon_ceiling", "lower"), "k-min": ("k_min", "higher")}


def node_config_problems(
    overrides: Mapping[str, Any], base: SiteSettings, *, keys: Mapping[str, str]
) -> list[Problem]:
    """Every node-config value that would loosen the site's environment settings (empty = fine).

    ``overrides`` maps SiteSettings fields to the node config's values, ``keys``
    maps those fields back to node-config keys (for the message), ``base`` is
    the settings from the environment alone. ``epsilon-ceiling`` may only be
    lowered, ``k-min`` only raised, and ``ledger-path`` may not move a ledger the
    environment sets (``FEDSYNTH_SITE_LEDGER_PATH``): a fresh ledger file would
    reset the epsilon spent. Values that are not numbers are left for the
    settings' own validation to refuse.
    """
    problems: list[Problem] = []
    for key, (field, direction) in NODE_FLOORS.items():
        if field not in overrides:
            continue
        value, floor = _number(overrides[field]), getattr(base, field)
        if value is None:
            continue
        if (direction == "lower" and value > floor) or (direction == "higher" and value < floor):
            env = f"FEDSYNTH_SITE_{field.upper()}"
            problems.append(Problem(f"node-config {keys.get(field, key)!r}",
                                    f"{overrides[field]!r:.40} would loosen this site's {env}={floor!r}; "
                                    f"the node config may only make it {direction}"))
    if "ledger_path" in overrides and "ledger_path" in base.model_fields_set:
        if str(overrides["ledger_path"]) != str(base.ledger_path):
            problems.append(Problem(f"node-config {keys.get('ledger_path', 'ledger-path')!r}",
                                    "FEDSYNTH_SITE_LEDGER_PATH is set; the node config may not move "
                                    "the privacy ledger (a fresh file would reset the epsilon spent)"))
    return problems


def _number(value: Any) -> float | None:
    # The settings would accept "1000" as 1000.0, so a string is compared as its number.
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, int | float) and math.isfinite(value):
        return value
    return None


def report_tightened(tightened: list[str], *, phase: str, round_id: int | str | None,
                     audit: AuditLog | None) -> None:
    """Log what a floor changed and, best effort, append it to the site's audit log.

    Audit entry: kind ``policy_tightened``, data ``{"phase", "round", "knobs": [...]}``
    (short lines naming the knob, both values and the setting; no private data).
    """
    if not tightened:
        return
    log.warning("%s round %s: site floors tightened the run: %s", phase,
                "?" if round_id is None else round_id, "; ".join(tightened))
    if audit is None:
        return
    data: dict[str, Any] = {"phase": phase, "knobs": [t[:200] for t in tightened]}
    if round_id is not None:
        data["round"] = round_id
    try:
        audit.append("policy_tightened", data)
    except Exception:  # the warning above is the record of last resort
        log.exception("could not write policy_tightened to the site's audit log")
