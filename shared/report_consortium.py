"""The coordinator's :class:`ConsortiumReport` over a whole run (all sites, all rounds).

Signed by the coordinator (server/report.py writes it). Per site it carries the
accounting each round's train reply reported (:class:`SiteRoundPrivacy`) and the
coordinator's own anchor of the site's ledger and its recomputed epsilon
(:class:`SitePrivacySummary`); epsilons mean what :mod:`shared.report` says:
patient-level (epsilon, delta)-DP at that one site. Types shared with the site's
report (strictness, metrics, software, verdict): :mod:`shared.report`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, model_validator

from shared.accounting import epsilon_tolerance
from shared.report import (
    EPSILON_DOES_NOT_COVER,
    SCHEMA_VERSION,
    SITE_ID_PATTERN,
    STRICT,
    Hex64,
    Metrics,
    NonNeg,
    ShortText,
    Software,
    UtcTime,
    Verdict,
    refuse_problems,
)


class Participation(BaseModel):
    """What one site did in one round, as the coordinator saw it (rounds count from 1)."""

    model_config = STRICT
    round: int = Field(ge=0)
    site_id: str = Field(pattern=SITE_ID_PATTERN)
    train: Literal["trained", "declined", "refused", "failed", "missing", "not sampled"]
    evaluate: Literal["evaluated", "declined", "refused", "failed", "missing", "not sampled"]



class SiteRoundPrivacy(BaseModel):
    """One site's accounting for one round, as the coordinator received it."""

    model_config = STRICT
    round: int = Field(ge=0)
    epsilon: NonNeg
    epsilon_round: NonNeg
    delta: float = Field(gt=0, lt=1)
    noise_multiplier: NonNeg
    sample_rate: float = Field(gt=0, le=1)
    steps: int = Field(ge=0)
    max_grad_norm: float = Field(gt=0)
    accountant: str
    secure_mode: bool
    # Optional: absent from reports written before the coordinator anchored site ledgers.
    ledger_seq: int | None = Field(None, ge=1, description="records in the site's ledger after this round")
    ledger_head: Hex64 | None = Field(None, description="the site ledger's HMAC head after this round")
    epsilon_recomputed: NonNeg | None = Field(
        None, description="epsilon the coordinator recomputed from every (sigma, q, steps) it accepted "
        "from this site up to this round, at this round's delta")


class SitePrivacySummary(BaseModel):
    """One site over the run; the cumulative fields are the coordinator's anchor after its last update."""

    model_config = STRICT
    site_id: str = Field(pattern=SITE_ID_PATTERN)
    unit_of_privacy: Literal["patient"] = "patient"
    epsilon_ceiling: float | None = Field(None, gt=0, description="when the site chose to disclose it")
    rounds: list[SiteRoundPrivacy]
    # Optional: absent from reports written before the coordinator anchored site ledgers.
    site_key: Annotated[str, Field(pattern=r"^(pubkey:[0-9a-f]{64}|node:[0-9]{1,20})$")] | None = Field(
        None, description="the identity the coordinator anchors the budget under")
    epsilon: NonNeg | None = Field(None, description="cumulative epsilon the site last reported (its ledger)")
    epsilon_recomputed: NonNeg | None = Field(
        None, description="cumulative epsilon the coordinator recomputed from the site's reported runs; "
        "a lower bound: the site's ledger may hold runs the coordinator never saw")
    ledger_seq: int | None = Field(None, ge=1, description="the site ledger's length last anchored")
    ledger_head: Hex64 | None = Field(None, description="the site ledger's HMAC head last anchored")

    @model_validator(mode="after")
    def _anchored(self) -> SitePrivacySummary:
        # What the coordinator refuses to accept cannot appear in its report either.
        problems = []
        seqs = [r.ledger_seq for r in self.rounds if r.ledger_seq is not None]
        if any(b <= a for a, b in zip(seqs, seqs[1:], strict=False)):
            problems.append("ledger_seq must increase from round to round")
        if seqs and self.ledger_seq is not None and self.ledger_seq < seqs[-1]:
            problems.append("anchored ledger_seq is below a round's ledger_seq")
        points = [(r.epsilon, r.epsilon_recomputed) for r in self.rounds]
        points.append((self.epsilon, self.epsilon_recomputed))
        for eps, recomputed in points:
            if eps is not None and recomputed is not None and eps + epsilon_tolerance(recomputed) < recomputed:
                problems.append("a site's epsilon is below the coordinator's recomputation")
                break
        refuse_problems(problems)
        return self


class RoundMetrics(BaseModel):
    model_config = STRICT
    round: int = Field(ge=0)
    metrics: Metrics


class Aggregation(BaseModel):
    model_config = STRICT
    method: ShortText
    weighting: ShortText
    norm_bound: float | None = Field(None, gt=0)
    secure_aggregation: bool


class Checkpoint(BaseModel):
    model_config = STRICT
    round: int = Field(ge=0)
    path: ShortText
    sha256: Hex64


class ConsortiumReport(BaseModel):
    """The coordinator's report over a whole run (all sites, all rounds)."""

    model_config = STRICT
    report_type: Literal["consortium"] = "consortium"
    schema_version: Literal[1] = SCHEMA_VERSION
    run_id: ShortText
    rounds: int = Field(ge=0, description="number of completed rounds")
    status: Literal["completed", "failed"] = Field(
        "completed", description="failed: no site's update reached the global adapter (see status_reason)")
    status_reason: ShortText | None = None
    created: UtcTime
    sites: list[SitePrivacySummary]
    metrics: list[RoundMetrics] = Field(description="aggregated site metric summaries per round")
    aggregation: Aggregation
    checkpoints: list[Checkpoint]
    software: Software
    config_hash: Hex64
    audit_seq: int | None = Field(None, ge=0, description="entries in the coordinator's audit log when "
                                  "this report was written; its report_issued entry comes after them")
    audit_head: Hex64 | None = Field(None, description="hash of the coordinator log's entry audit_seq - 1")
    verdict: Verdict | None = Field(None, description="release outcome of the run against its thresholds")
    participation: list[Participation] = Field(
        default_factory=list, description="which site did what in which round (rounds count from 1)")
    what_epsilon_covers: str = (
        "The global adapter is, for each site, (epsilon, delta)-DP with respect to one patient's "
        "notes at that site, with that site's epsilon; generating from it is post-processing."
    )
    what_epsilon_does_not_cover: list[str] = Field(default_factory=lambda: list(EPSILON_DOES_NOT_COVER))

    @model_validator(mode="after")
    def _unique_sites(self) -> ConsortiumReport:
        ids = [s.site_id for s in self.sites]
        if len(ids) != len(set(ids)):
            raise ValueError("duplicate site_id in sites")
        return self
