"""Privacy report schema (pydantic) with a published JSON Schema.

Two documents: a site's per-round :class:`SiteRoundReport` (signed by the
site) and the coordinator's :class:`ConsortiumReport` (signed by the
coordinator). Each carries ``report_type`` and ``schema_version`` so a
verifier knows which schema a JSON file claims. Every float is finite; unknown
fields are refused.

Privacy meaning of the numbers: ``epsilon``/``delta`` are patient-level
(epsilon, delta)-DP of the LoRA adapter with respect to one patient's notes at
one site, composed over every round that site trained (recomputed from its
ledger). With ``metrics_mode`` ``dp-noised`` (what sites issue) the metric
summaries computed from private notes are Gaussian mechanisms charged to the
same ledger, so ``epsilon`` includes them (``metrics_epsilon``: one release alone).

This module holds the types both documents share and the site's report; the
coordinator's is :mod:`shared.report_consortium`; writing, signing and reading
either: :mod:`shared.report_io`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from shared.privacy_scalars import PrivacyScalars
from shared.whitelist import ACCOUNTANTS, METRIC_NAMES

SCHEMA_VERSION = 1
SITE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # as shared.settings.SiteSettings.site_id

EPSILON_COVERS = (
    "The trained LoRA adapter (and anything generated from it) is (epsilon, delta)-"
    "differentially private with respect to all notes of any one patient at this site, "
    "composed over every round this site has trained."
)
EPSILON_DOES_NOT_COVER: tuple[str, ...] = (
    "Metric summaries in suppressed-aggregates mode (dp-noised summaries are Gaussian mechanisms "
    "charged to the same ledger and included in epsilon); the site's local evaluation report, "
    "which never leaves the site.",
    "Release-gate filtering of synthetic reports: it uses private notes and is defence in "
    "depth, not differential privacy.",
    "The base model and its pretraining data (the embedded model is trained on public text only).",
    "Side channels: timing, the fact that a site took part, the number of patients (sent rounded "
    "down to a multiple of 10).",
    "A person under several patient ids, or at several sites, is protected per id and per site: "
    "their epsilons add up.",
)

STRICT = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)
Hex64 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
ShortText = Annotated[str, Field(min_length=1, max_length=200)]
NonNeg = Annotated[float, Field(ge=0)]
Share = Annotated[float, Field(ge=0, le=1)]


def _utc(v: datetime) -> datetime:
    if v.tzinfo is None:
        raise ValueError("timestamp must carry a timezone (UTC)")
    return v.astimezone(UTC)


#: A report's ``created`` time: timezone-aware, normalised to UTC.
UtcTime = Annotated[datetime, AfterValidator(_utc)]


def refuse_problems(problems: list[str]) -> None:
    """A model validator's verdict: every collected problem in one ValueError, or nothing."""
    if problems:
        raise ValueError("; ".join(problems))


def _check_metric_names(v: dict[str, float]) -> dict[str, float]:
    unknown = sorted(set(v) - METRIC_NAMES)
    if unknown:
        raise ValueError(f"unknown metric names {unknown} (see shared.whitelist.METRIC_NAMES)")
    return v


#: Metric values by name; only names in shared.whitelist.METRIC_NAMES (what may leave a site).
Metrics = Annotated[dict[str, float], AfterValidator(_check_metric_names)]


class Privacy(BaseModel):
    """Patient-level DP-SGD accounting for one site, cumulative up to this round.

    Built from the round's :class:`~shared.privacy_scalars.PrivacyScalars`
    (:meth:`from_scalars`) plus what only the site knows: its ceiling and the noise
    source. The patients bucket is not part of the report.
    """

    model_config = STRICT
    unit_of_privacy: Literal["patient"] = "patient"
    epsilon: NonNeg = Field(description="cumulative epsilon over every round this site trained")
    epsilon_round: NonNeg = Field(description="this round's increment (composition is not additive)")
    delta: float = Field(gt=0, lt=1, description="delta; at most 1/n_patients")
    epsilon_ceiling: float = Field(gt=0, description="the site's own ceiling; training past it is refused")
    epsilon_remaining: NonNeg = Field(description="epsilon_ceiling - epsilon, floored at 0")
    noise_multiplier: NonNeg = Field(description="sigma: Gaussian noise std / max_grad_norm")
    sample_rate: float = Field(gt=0, le=1, description="q: Poisson sampling probability per patient per step")
    steps: int = Field(ge=0, description="DP-SGD steps this round")
    max_grad_norm: float = Field(gt=0, description="per-patient gradient clipping norm C")
    accountant: str = Field(description="privacy accountant: prv or rdp")
    secure_mode: bool = Field(description="noise from a CSPRNG keyed from os.urandom (ChaCha20)")
    noise_source: str = Field(
        default="unspecified", min_length=1, max_length=64,
        description="the DP noise generator of this round's training (docs/privacy-model.md); "
        "'unspecified' in reports from before it was recorded",
    )
    ledger_seq: int | None = Field(None, ge=0, description="records in the site's privacy ledger that "
                                   "epsilon was computed from (absent in older reports)")
    ledger_head: Hex64 | None = Field(None, description="hash of the ledger's last record: an anchor a "
                                      "later, lowered or rewritten ledger cannot match")
    what_epsilon_covers: Annotated[str, Field(min_length=1, max_length=2000)] = EPSILON_COVERS
    what_epsilon_does_not_cover: list[str] = Field(default_factory=lambda: list(EPSILON_DOES_NOT_COVER))

    @classmethod
    def from_scalars(cls, scalars: PrivacyScalars, *, epsilon_ceiling: float, noise_source: str) -> Privacy:
        """The report's accounting: ``scalars`` (epsilon, delta, sigma, q, steps, C, accountant,
        secure mode, ledger position) with the site's ``epsilon_ceiling`` and ``noise_source``;
        ``epsilon_remaining`` is derived. Validated like any report (pydantic ValidationError)."""
        return cls(
            epsilon=scalars.epsilon,
            epsilon_round=scalars.epsilon_round,
            delta=scalars.delta,
            epsilon_ceiling=epsilon_ceiling,
            epsilon_remaining=max(0.0, epsilon_ceiling - scalars.epsilon),
            noise_multiplier=scalars.noise_multiplier,
            sample_rate=scalars.sample_rate,
            steps=scalars.steps,
            max_grad_norm=scalars.max_grad_norm,
            accountant=scalars.accountant,
            secure_mode=scalars.secure_mode,
            noise_source=noise_source,
            ledger_seq=scalars.ledger_seq,
            ledger_head=scalars.ledger_head,
        )

    @model_validator(mode="after")
    def _consistent(self) -> Privacy:
        problems = []
        if self.accountant not in ACCOUNTANTS:
            problems.append(f"accountant {self.accountant!r} not one of {sorted(ACCOUNTANTS)}")
        if self.epsilon_round > self.epsilon + 1e-9:
            problems.append("epsilon_round exceeds the cumulative epsilon")
        if abs(self.epsilon_remaining - max(0.0, self.epsilon_ceiling - self.epsilon)) > 1e-6:
            problems.append("epsilon_remaining != max(0, epsilon_ceiling - epsilon)")
        refuse_problems(problems)
        return self


class ReleaseGate(BaseModel):
    """Counts from the release gate. ``removed`` counts by check; a report failing several counts in each."""

    model_config = STRICT
    checked: int = Field(ge=0)
    kept: int = Field(ge=0)
    removed: dict[Annotated[str, Field(pattern=r"^[a-z0-9_.-]{1,64}$")], Annotated[int, Field(ge=0)]]
    thresholds: dict[Annotated[str, Field(pattern=r"^[a-z0-9_.-]{1,64}$")], float] | None = Field(
        None, description="the gate's thresholds (max_ngram tokens, max_rouge_l F1, min_dcr cosine "
        "distance): a report at or past any of them was removed")

    @model_validator(mode="after")
    def _counts(self) -> ReleaseGate:
        dropped = self.checked - self.kept
        if dropped < 0:
            raise ValueError("kept exceeds checked")
        if dropped and sum(self.removed.values()) < dropped:
            raise ValueError("removed counts do not account for every removed report")
        if any(n > dropped for n in self.removed.values()):
            raise ValueError("a removed count exceeds checked - kept")
        return self


class Membership(BaseModel):
    """Membership inference on the adapter: train vs held-out patients (0.5 AUC = no signal)."""

    model_config = STRICT
    auc: Share
    tpr_at_1fpr: Share


class Canaries(BaseModel):
    """Secret-Sharer canaries planted in audit runs; exposure in bits (max = log2 of candidates)."""

    model_config = STRICT
    planted: int = Field(ge=0)
    exposure_mean: NonNeg
    exposure_max: NonNeg
    exposure_possible: NonNeg = Field(description="log2(number of candidate secrets)")
    extracted_verbatim: int = Field(ge=0, description="canaries reproduced verbatim in generated text")


class Software(BaseModel):
    model_config = STRICT
    fedsynth: ShortText
    torch: ShortText
    transformers: ShortText
    peft: ShortText
    opacus: ShortText
    flwr: ShortText


class ModelInfo(BaseModel):
    model_config = STRICT
    id: ShortText
    family: ShortText
    identity_hash: Hex64


class HistoryPoint(BaseModel):
    model_config = STRICT
    round: int = Field(ge=0)
    epsilon: NonNeg
    metrics: Metrics = Field(default_factory=dict)


class VerdictCheck(BaseModel):
    """One release criterion: a value beside its stated threshold (and held-out baseline, if any)."""

    model_config = STRICT
    name: ShortText
    value: float | None = Field(description="the measured value; None when not measured")
    threshold: float = Field(description="the stated limit the value is compared with")
    direction: Literal["at most", "at least"] = Field(description="value must be at most / at least threshold")
    baseline: float | None = Field(None, description="the same statistic on held-out patients (never trained on)")
    baseline_margin: float | None = Field(None, ge=0, description="value may exceed the baseline by at most this")
    passed: bool | None = Field(description="None when not measured")
    meaning: ShortText


class Verdict(BaseModel):
    """Is this output safe to release? ``release`` only when every check passed."""

    model_config = STRICT
    outcome: Literal["release", "hold", "incomplete"]
    checks: list[VerdictCheck]


class SiteRoundReport(BaseModel):
    """One site's privacy report for one round."""

    model_config = STRICT
    report_type: Literal["site_round"] = "site_round"
    schema_version: Literal[1] = SCHEMA_VERSION
    site_id: str = Field(pattern=SITE_ID_PATTERN)
    run_id: ShortText
    round: int = Field(ge=0)
    created: UtcTime
    privacy: Privacy
    metrics: Metrics
    metrics_mode: Literal["suppressed-aggregates", "dp-noised"]
    metrics_epsilon: NonNeg | None = Field(
        None, description="epsilon of this round's metric release alone (dp-noised); included in privacy.epsilon"
    )
    release_gate: ReleaseGate | None = None
    membership: Membership | None = None
    canaries: Canaries | None = None
    software: Software
    model: ModelInfo
    config_hash: Hex64
    history: list[HistoryPoint] = Field(default_factory=list, description="earlier rounds, oldest first")
    audit_seq: int | None = Field(None, ge=0, description="entries in the site's audit log when this "
                                  "report was written; its report_issued entry comes after them")
    audit_head: Hex64 | None = Field(None, description="hash of the audit log's entry audit_seq - 1 "
                                     "(64 zeros when the log was empty): a cut or swapped log cannot match it")
    verdict: Verdict | None = Field(None, description="the release gate's outcome against its thresholds")

    @model_validator(mode="after")
    def _history(self) -> SiteRoundReport:
        rounds = [h.round for h in self.history]
        if rounds != sorted(set(rounds)) or (rounds and rounds[-1] >= self.round):
            raise ValueError("history rounds must be strictly increasing and before this round")
        eps = [h.epsilon for h in self.history] + [self.privacy.epsilon]
        if any(b < a - 1e-9 for a, b in zip(eps, eps[1:], strict=False)):
            raise ValueError("cumulative epsilon decreases over history")
        return self


