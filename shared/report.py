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
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Annotated, Generic, Literal, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from shared.accounting import epsilon_tolerance
from shared.atomic import write_atomic
from shared.errors import InputError, Problem
from shared.privacy_scalars import PrivacyScalars
from shared.signing import sign_file, signature_path
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

_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)
Hex64 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
ShortText = Annotated[str, Field(min_length=1, max_length=200)]
NonNeg = Annotated[float, Field(ge=0)]
Share = Annotated[float, Field(ge=0, le=1)]


def _utc(v: datetime) -> datetime:
    if v.tzinfo is None:
        raise ValueError("timestamp must carry a timezone (UTC)")
    return v.astimezone(UTC)


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

    model_config = _STRICT
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
        if problems:
            raise ValueError("; ".join(problems))
        return self


class ReleaseGate(BaseModel):
    """Counts from the release gate. ``removed`` counts by check; a report failing several counts in each."""

    model_config = _STRICT
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

    model_config = _STRICT
    auc: Share
    tpr_at_1fpr: Share


class Canaries(BaseModel):
    """Secret-Sharer canaries planted in audit runs; exposure in bits (max = log2 of candidates)."""

    model_config = _STRICT
    planted: int = Field(ge=0)
    exposure_mean: NonNeg
    exposure_max: NonNeg
    exposure_possible: NonNeg = Field(description="log2(number of candidate secrets)")
    extracted_verbatim: int = Field(ge=0, description="canaries reproduced verbatim in generated text")


class Software(BaseModel):
    model_config = _STRICT
    fedsynth: ShortText
    torch: ShortText
    transformers: ShortText
    peft: ShortText
    opacus: ShortText
    flwr: ShortText


class ModelInfo(BaseModel):
    model_config = _STRICT
    id: ShortText
    family: ShortText
    identity_hash: Hex64


class HistoryPoint(BaseModel):
    model_config = _STRICT
    round: int = Field(ge=0)
    epsilon: NonNeg
    metrics: Metrics = Field(default_factory=dict)

class VerdictCheck(BaseModel):
    """One release criterion: a value beside its stated threshold (and held-out baseline, if any)."""

    model_config = _STRICT
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

    model_config = _STRICT
    outcome: Literal["release", "hold", "incomplete"]
    checks: list[VerdictCheck]


class Participation(BaseModel):
    """What one site did in one round, as the coordinator saw it (rounds count from 1)."""

    model_config = _STRICT
    round: int = Field(ge=0)
    site_id: str = Field(pattern=SITE_ID_PATTERN)
    train: Literal["trained", "declined", "refused", "failed", "missing", "not sampled"]
    evaluate: Literal["evaluated", "declined", "refused", "failed", "missing", "not sampled"]


class SiteRoundReport(BaseModel):
    """One site's privacy report for one round."""

    model_config = _STRICT
    report_type: Literal["site_round"] = "site_round"
    schema_version: Literal[1] = SCHEMA_VERSION
    site_id: str = Field(pattern=SITE_ID_PATTERN)
    run_id: ShortText
    round: int = Field(ge=0)
    created: datetime
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

    @field_validator("created")
    @classmethod
    def _created_utc(cls, v: datetime) -> datetime:
        return _utc(v)
    @model_validator(mode="after")
    def _history(self) -> SiteRoundReport:
        rounds = [h.round for h in self.history]
        if rounds != sorted(set(rounds)) or (rounds and rounds[-1] >= self.round):
            raise ValueError("history rounds must be strictly increasing and before this round")
        eps = [h.epsilon for h in self.history] + [self.privacy.epsilon]
        if any(b < a - 1e-9 for a, b in zip(eps, eps[1:], strict=False)):
            raise ValueError("cumulative epsilon decreases over history")
        return self


class SiteRoundPrivacy(BaseModel):
    """One site's accounting for one round, as the coordinator received it."""

    model_config = _STRICT
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

    model_config = _STRICT
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
        if problems:
            raise ValueError("; ".join(problems))
        return self


class RoundMetrics(BaseModel):
    model_config = _STRICT
    round: int = Field(ge=0)
    metrics: Metrics

class Aggregation(BaseModel):
    model_config = _STRICT
    method: ShortText
    weighting: ShortText
    norm_bound: float | None = Field(None, gt=0)
    secure_aggregation: bool


class Checkpoint(BaseModel):
    model_config = _STRICT
    round: int = Field(ge=0)
    path: ShortText
    sha256: Hex64


class ConsortiumReport(BaseModel):
    """The coordinator's report over a whole run (all sites, all rounds)."""

    model_config = _STRICT
    report_type: Literal["consortium"] = "consortium"
    schema_version: Literal[1] = SCHEMA_VERSION
    run_id: ShortText
    rounds: int = Field(ge=0, description="number of completed rounds")
    status: Literal["completed", "failed"] = Field(
        "completed", description="failed: no site's update reached the global adapter (see status_reason)")
    status_reason: ShortText | None = None
    created: datetime
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

    @field_validator("created")
    @classmethod
    def _created_utc(cls, v: datetime) -> datetime:
        return _utc(v)

    @model_validator(mode="after")
    def _unique_sites(self) -> ConsortiumReport:
        ids = [s.site_id for s in self.sites]
        if len(ids) != len(set(ids)):
            raise ValueError("duplicate site_id in sites")
        return self


REPORT_TYPES: dict[str, type[BaseModel]] = {
    "site_round": SiteRoundReport,
    "consortium": ConsortiumReport,
}
Report = TypeVar("Report", SiteRoundReport, ConsortiumReport)


def software_versions() -> Software:
    """Installed versions of the libraries a report depends on ("not installed" when absent)."""
    def v(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    return Software(
        fedsynth=v("fedsynth"), torch=v("torch"), transformers=v("transformers"),
        peft=v("peft"), opacus=v("opacus"), flwr=v("flwr"),
    )


def write_schemas(directory: Path) -> list[Path]:
    """Export the JSON Schemas (``<report_type>.schema.json``) auditors can validate against."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for name, cls in REPORT_TYPES.items():
        path = directory / f"{name.replace('_', '-')}-report.schema.json"
        schema = cls.model_json_schema(mode="serialization")
        schema["$id"] = f"https://fedsynth.invalid/schemas/{path.name}"
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        out.append(path)
    return out


def write_report(report: BaseModel, path_json: Path, *, key: Ed25519PrivateKey | None = None) -> Path:
    """Write ``report`` as JSON (atomically, fsynced); with ``key`` also ``<path>.sig``."""
    path_json = Path(path_json)
    path_json.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path_json, report.model_dump_json(indent=2) + "\n")
    if key is not None:
        sign_file(path_json, key)
    return path_json


@dataclass(frozen=True)
class IssuedReport(Generic[Report]):
    """Where a report was written: JSON, its ``.sig`` (None without a key) and its HTML page."""

    report: Report
    json_path: Path
    signature: Path | None
    html_path: Path


def issue_report(
    report: Report, path_json: Path, *, key: Ed25519PrivateKey | None, html: str
) -> IssuedReport[Report]:
    """Write ``report`` (JSON, signed with ``key``) and its ``html`` page beside it, each atomically.

    Without a key a ``.sig`` left by an earlier write of the same path is removed: it would
    no longer match the new bytes and the trail would fail verification.
    """
    path = write_report(report, path_json, key=key)
    sig = signature_path(path)
    if key is None:
        sig.unlink(missing_ok=True)
    html_path = write_atomic(path.with_suffix(".html"), html)
    return IssuedReport(report, path, sig if key is not None else None, html_path)


def _problems(path: Path, exc: ValidationError) -> list[Problem]:
    return [
        Problem(f"{path}: {'.'.join(str(p) for p in err['loc']) or '<root>'}", err["msg"])
        for err in exc.errors()
    ]


def parse_report(path: Path, data: bytes, cls: type[Report] | None = None) -> Report:
    """Validate JSON ``data`` (read from ``path``) as ``cls``, or as the type its report_type names."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputError("report is not valid JSON", [Problem(str(path), str(exc))]) from None
    if cls is None:
        rtype = obj.get("report_type") if isinstance(obj, dict) else None
        if rtype not in REPORT_TYPES:
            raise InputError(
                "unknown report type",
                [Problem(f"{path}: report_type", f"{rtype!r} not one of {sorted(REPORT_TYPES)}")],
            )
        cls = REPORT_TYPES[rtype]  # type: ignore[assignment]
    try:
        return cls.model_validate(obj)  # type: ignore[union-attr]
    except ValidationError as exc:
        raise InputError(f"{path}: not a valid {cls.__name__}", _problems(path, exc)) from None


def read_report(path: Path, cls: type[Report]) -> Report:
    """Read and validate a report; InputError listing file and field paths on failure."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError("cannot read report", [Problem(str(path), exc.strerror or str(exc))]) from None
    return parse_report(path, data, cls)
