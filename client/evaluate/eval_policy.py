"""The site's bounds on an evaluation round: sampling, budget, and the ledger charge.

A coordinator chooses an evaluate round's adapter, codes and sampling knobs.
The site decides the rest, whatever the run config says:

- **sampling**: the seed is drawn from OS entropy for every evaluation (the
  run's ``generate.seed`` is ignored), the temperature is at least the site's
  ``min_eval_temperature``, and top-k / top-p cannot shrink the candidate set
  to one token: no greedy, replayable probes;
- **budget**: at most ``max_evaluations_per_run`` evaluations per run (tightened
  to ``num_rounds + 1`` by the run itself), counted from the ledger's
  evaluation records, so a restart does not reset it;
- **charge**: each evaluation is one Gaussian mechanism (noise multiplier
  ``eval_noise_multiplier``, sample rate 1, one step) reserved in the same
  ledger, with the same accountant and ε ceiling as training, *before* any
  metric is computed. A reserved evaluation counts even if it later fails.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from client.dp.ledger import Ledger, LedgerEntry, compute_epsilon
from shared.errors import EvaluationBudgetError
from shared.run_config import GenerateConfig, RunConfig, config_hash
from shared.settings import SiteSettings

# top_k of 1..MIN_EVAL_TOP_K-1 is raised to this; top_p below MIN_EVAL_TOP_P is raised to it.
MIN_EVAL_TOP_K = 20
MIN_EVAL_TOP_P = 0.5
# A repetition penalty below 1 favours repeating tokens already seen (the prompt's included): raised to 1 (off).
MIN_EVAL_REPETITION_PENALTY = 1.0
EVAL_PREFIX = "eval-"
# Bits of OS entropy in an evaluation's sampling seed. Not 63: the HF generation path seeds torch
# with seed * 1_000_003 + batch, which must stay below 2**63 (torch.manual_seed overflows above).
EVAL_SEED_BITS = 40


METRICS_NOISE_SOURCE = "chacha20-gaussian"  # client.evaluate.dp_metrics.standard_normal


def evaluation_sampling(settings: SiteSettings, generate: GenerateConfig) -> GenerateConfig:
    """The sampling an evaluation actually uses: site-drawn seed, site-bounded temperature.

    The run's ``generate`` section with temperature, top-p, top-k and repetition
    penalty raised to the site's bounds; only the length (and the request's codes
    and counts) pass through unchanged. The seed is :data:`EVAL_SEED_BITS` bits
    from :func:`secrets.randbits`, fresh on every call.
    """
    top_k = generate.top_k if generate.top_k == 0 else max(generate.top_k, MIN_EVAL_TOP_K)
    return dataclasses.replace(
        generate,
        temperature=max(float(generate.temperature), settings.min_eval_temperature),
        top_p=max(float(generate.top_p), MIN_EVAL_TOP_P),
        top_k=top_k,
        repetition_penalty=max(float(generate.repetition_penalty), MIN_EVAL_REPETITION_PENALTY),
        seed=secrets.randbits(EVAL_SEED_BITS),
    )


def run_key(run: RunConfig) -> str:
    """A short name for the run in ledger records: the first 16 hex digits of its config hash."""
    return config_hash(run)[:16]


def evaluation_round_id(run: RunConfig, round_id: int | str) -> str:
    """The ledger ``round_id`` of an evaluation: ``eval-<run key>-<round>``."""
    return f"{EVAL_PREFIX}{run_key(run)}-{round_id}"


def evaluations_used(ledger: Ledger, run: RunConfig) -> int:
    """Evaluations this run has reserved at this site (every reserve counts, failed ones too)."""
    return _used(ledger.entries(), run)


def _used(entries: Sequence[LedgerEntry], run: RunConfig) -> int:
    prefix = f"{EVAL_PREFIX}{run_key(run)}-"
    return sum(1 for e in entries if e.kind == "reserve" and e.round_id.startswith(prefix))


def evaluation_budget(settings: SiteSettings, run: RunConfig) -> int:
    """Evaluations allowed for ``run``: the site's limit, tightened to the run's rounds + 1."""
    return min(settings.max_evaluations_per_run, run.num_rounds + 1)


@dataclass(frozen=True)
class EvaluationCharge:
    """What one evaluation cost: its ledger record and ε of the mechanism alone at ``delta``."""

    entry: LedgerEntry
    epsilon: float
    delta: float
    noise_multiplier: float


def charge_evaluation(
    settings: SiteSettings, run: RunConfig, *, ledger: Ledger, round_id: int | str, delta: float
) -> EvaluationCharge:
    """Check the run's evaluation budget, then reserve the metric release in the ledger.

    Raises :class:`EvaluationBudgetError` (nothing written) when the run has used
    its evaluations, :class:`~shared.errors.BudgetExceededError` (nothing
    written) when the release would take the site past its ε ceiling.
    """
    allowed = evaluation_budget(settings, run)

    def within_budget(entries: Sequence[LedgerEntry]) -> None:
        # Counted under the ledger's lock: two processes of one site cannot both take the last one.
        used = _used(entries, run)
        if used >= allowed:
            raise EvaluationBudgetError(
                f"evaluation refused: this run has used {used} of its {allowed} evaluations at this site "
                "(FEDSYNTH_SITE_MAX_EVALUATIONS_PER_RUN, and the run's num-rounds + 1)"
            )

    sigma = float(settings.eval_noise_multiplier)
    accountant = run.train.accountant
    with np.errstate(divide="ignore"):  # PRV at q = 1 takes log(0) on a branch it then discards
        entry = ledger.reserve(
            round_id=evaluation_round_id(run, round_id), noise_multiplier=sigma, sample_rate=1.0,
            steps=1, delta=delta, accountant=accountant, epsilon_ceiling=settings.epsilon_ceiling,
            noise_source=METRICS_NOISE_SOURCE, precheck=within_budget,
        )
        epsilon = compute_epsilon([(sigma, 1.0, 1)], delta=delta, accountant=accountant)
    return EvaluationCharge(entry=entry, epsilon=epsilon, delta=delta, noise_multiplier=sigma)
