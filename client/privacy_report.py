"""A site's signed privacy report for one round, built from its ledger and its evaluation.

Each evaluated round leaves, at the site, under ``<output_dir>/privacy-reports/``::

    report-round-<n>.json       the SiteRoundReport (shared.report schema)
    report-round-<n>.json.sig   its Ed25519 signature (when the site has a signing key)
    report-round-<n>.html       the same report for people (never what is verified)

and one ``report_issued`` entry in the site's audit log carrying the report's
sha256, so the log and the report anchor each other.

Privacy meaning of the numbers: ``epsilon`` is recomputed here from *every*
``reserve`` record in the site's ledger (all rounds, all runs, all restarts) at
the δ of the latest reservation — never copied from a training result — so a
report cannot show less than the ledger has spent. ``epsilon_round`` is this
round's reservations alone. The metric summaries are the ones the site sent;
they are not covered by ε.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client.dp.ledger import Ledger, LedgerEntry, compute_epsilon
from client.model import model_identity
from shared.audit import AuditLog
from shared.errors import InputError, PrivacyError
from shared.privacy_scalars import PrivacyScalars
from shared.report import (
    Canaries,
    HistoryPoint,
    Membership,
    ModelInfo,
    Privacy,
    ReleaseGate,
    SiteRoundReport,
)
from shared.report_html import render_html
from shared.report_io import IssuedReport, issue_report, read_report, software_versions
from shared.run_config import RunConfig, config_hash
from shared.settings import SiteSettings
from shared.signing import sha256_file
from shared.verdict import site_verdict

log = logging.getLogger("fedsynth.site")

REPORT_DIR = "privacy-reports"


def report_path(output_dir: Path, round_id: int) -> Path:
    return Path(output_dir) / REPORT_DIR / f"report-round-{int(round_id)}.json"


def ledger_privacy(
    entries: Sequence[LedgerEntry],
    *,
    round_id: int | str,
    epsilon_ceiling: float,
    max_grad_norm: float,
    secure_mode: bool,
) -> Privacy:
    """Patient-level accounting after ``round_id``, from the whole ledger.

    ε covers every reserve record (a reservation counts even if training then
    failed); ε_round composes only this round's reservations. σ, q and steps are
    this round's (steps summed over its reservations); when the site did not
    train this round, steps is 0 and σ, q are those of its last reservation.
    The ledger does not record C or secure mode: they come from the run config
    the site trained with; the noise source is the ledger's (this round's
    reservation, else the last one). ``ledger_seq``/``ledger_head`` name the ledger's last
    record, so the signed report anchors the ledger: a later ledger that lacks
    that record is refused at start-up (:mod:`client.dp.ledger_anchor`).
    PrivacyError when the ledger holds no reservation (nothing was trained, so
    there is no ε to report).
    """
    reserves = [e for e in entries if e.kind == "reserve"]
    head = entries[-1] if entries else None
    if not reserves:
        raise PrivacyError("no privacy report: the ledger holds no training reservation")
    # σ, q shown are training's; evaluation releases (round_id "eval-...") count in ε only
    last = next((e for e in reversed(reserves) if not e.round_id.startswith("eval-")), reserves[-1])
    delta, accountant = last.delta, last.accountant
    this_round = [e for e in reserves if e.round_id == str(round_id)]
    history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in reserves]
    epsilon = compute_epsilon(history, delta=delta, accountant=accountant)
    epsilon_round = compute_epsilon(
        [(e.noise_multiplier, e.sample_rate, e.steps) for e in this_round], delta=delta, accountant=accountant
    ) if this_round else 0.0
    shown = this_round[-1] if this_round else last
    scalars = PrivacyScalars(
        epsilon=epsilon,
        epsilon_round=min(epsilon_round, epsilon),  # accountant round-off only
        delta=delta,
        noise_multiplier=shown.noise_multiplier,
        sample_rate=shown.sample_rate,
        steps=sum(e.steps for e in this_round),
        max_grad_norm=max_grad_norm,
        accountant=accountant,
        secure_mode=secure_mode,
        patients_bucket=None,  # the ledger does not record it, and the report does not show it
        ledger_seq=head.seq,
        ledger_head=head.hash,
    )
    return Privacy.from_scalars(scalars, epsilon_ceiling=epsilon_ceiling, noise_source=shown.noise_source)


def release_gate_counts(gate: Any) -> ReleaseGate | None:
    """The gate's counts (``client.evaluate.release.GateResult``: kept, removed, total), or None."""
    if gate is None:
        return None
    config = getattr(gate, "config", None)
    thresholds = None if config is None else {
        k: float(v) for k, v in (("max_ngram", config.max_ngram), ("max_rouge_l", config.max_rouge_l),
                                 ("min_dcr", config.min_dcr)) if v is not None}
    return ReleaseGate(checked=int(gate.total), kept=len(gate.kept),
                       removed={str(k): int(v) for k, v in gate.removed.items()}, thresholds=thresholds)


def membership_result(mia: Mapping[str, float] | None) -> Membership | None:
    if not mia:
        return None
    return Membership(auc=float(mia["auc"]), tpr_at_1fpr=float(mia["tpr_at_1fpr"]))


def canary_results(
    exposures: Sequence[Mapping[str, Any]], secrets: Sequence[str], texts: Sequence[str]
) -> Canaries | None:
    """Exposure summary of the planted canaries; ``extracted_verbatim`` counts secrets
    that appear verbatim in any generated text. None when nothing was planted.
    Never-planted reference canaries (``reference``) are baselines, not counted here."""
    exposures = [c for c in exposures if not c.get("reference")]
    if not exposures:
        return None
    values = [max(0.0, float(c["exposure"])) for c in exposures]
    return Canaries(
        planted=len(exposures),
        exposure_mean=sum(values) / len(values),
        exposure_max=max(values),
        exposure_possible=max(float(c.get("exposure_possible", 0.0)) for c in exposures),
        extracted_verbatim=sum(1 for s in secrets if s and any(s in t for t in texts)),
    )


def model_info(model_dir: Path | None) -> ModelInfo:
    """Identity of the base model (for the embedded model, its cached build)."""
    if model_dir is None:
        from client.pretrain import ensure_embedded_model

        path, name = ensure_embedded_model(), "embedded"
    else:
        path, name = Path(model_dir), Path(model_dir).name or str(model_dir)
    try:
        family = str(json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type") or "unknown")
    except (OSError, ValueError):
        family = "unknown"
    return ModelInfo(id=name[:200], family=family[:200], identity_hash=model_identity(path))


def read_history(report_dir: Path, *, run_id: str, before_round: int) -> list[HistoryPoint]:
    """Earlier rounds of this run from the reports already on disk, oldest first.

    A report that no longer parses is skipped with a warning (fedsynth-verify
    will flag it); reports of other runs in the same output directory are ignored.
    """
    points: dict[int, HistoryPoint] = {}
    for path in sorted(Path(report_dir).glob("report-round-*.json")):
        try:
            old = read_report(path, SiteRoundReport)
        except InputError as exc:
            log.warning("skipping unreadable earlier report %s: %s", path, exc.message)
            continue
        if old.run_id == run_id and old.round < before_round:
            points[old.round] = HistoryPoint(round=old.round, epsilon=old.privacy.epsilon, metrics=old.metrics)
    return [points[r] for r in sorted(points)]


def build_site_report(
    *,
    site_id: str,
    run_id: str,
    round_id: int,
    privacy: Privacy,
    metrics: Mapping[str, float],
    model: ModelInfo,
    config_hash: str,
    release_gate: ReleaseGate | None = None,
    membership: Membership | None = None,
    canaries: Canaries | None = None,
    history: Sequence[HistoryPoint] = (),
    created: datetime | None = None,
    metrics_epsilon: float | None = None,
    audit_position: tuple[int, str] | None = None,
) -> SiteRoundReport:
    """Assemble and validate a SiteRoundReport (InputError-free: pydantic raises on bad numbers).

    Its ``verdict`` (shared.verdict) is computed from the report's own numbers."""
    report = SiteRoundReport(
        site_id=site_id,
        run_id=run_id,
        round=int(round_id),
        created=created or datetime.now(UTC),
        privacy=privacy,
        metrics={k: float(v) for k, v in sorted(metrics.items())},
        # every metric a site sends is dp.* (Gaussian mechanism) or synthetic-only (docs/metrics.md)
        metrics_mode="dp-noised",
        metrics_epsilon=metrics_epsilon,
        release_gate=release_gate,
        membership=membership,
        canaries=canaries,
        software=software_versions(),
        model=model,
        config_hash=config_hash,
        history=list(history),
        audit_seq=audit_position[0] if audit_position else None,
        audit_head=audit_position[1] if audit_position else None,
    )
    return report.model_copy(update={"verdict": site_verdict(report)})


def write_site_report(
    report: SiteRoundReport, output_dir: Path, *, key: Ed25519PrivateKey | None
) -> IssuedReport[SiteRoundReport]:
    """Write JSON (+ ``.sig`` with ``key``) and HTML under ``<output_dir>/privacy-reports/``."""
    return issue_report(report, report_path(output_dir, report.round), key=key, html=render_html(report))


def issue_round_report(
    settings: SiteSettings,
    run: RunConfig,
    *,
    round_id: int,
    evaluation: Any,
    ledger: Ledger,
    audit: AuditLog,
    texts: Sequence[str] = (),
    canaries: Sequence[Mapping[str, Any]] = (),
    metrics_epsilon: float | None = None,
) -> IssuedReport | None:
    """Build, sign (with the audit log's key), write and audit this round's report.

    ``evaluation`` is a ``client.evaluate.suite.SiteEvaluation`` (summary, gate,
    mia, canaries); ``texts`` the generated reports and ``canaries`` the planted
    canary records (their ``secret`` checks verbatim extraction). Returns None,
    with a warning, when the ledger holds no reservation (nothing trained here).
    """
    try:
        privacy = ledger_privacy(
            ledger.entries(), round_id=round_id, epsilon_ceiling=settings.epsilon_ceiling,
            max_grad_norm=run.train.max_grad_norm, secure_mode=run.train.secure_mode,
        )
    except PrivacyError as exc:
        log.warning("round %s: %s", round_id, exc)
        return None
    out = Path(settings.output_dir)
    digest = config_hash(run)
    report = build_site_report(
        site_id=settings.site_id,
        run_id=run.run_name,
        round_id=round_id,
        privacy=privacy,
        metrics=evaluation.summary,
        model=model_info(settings.model_dir),
        config_hash=digest,
        release_gate=release_gate_counts(evaluation.gate),
        membership=membership_result(evaluation.mia),
        canaries=canary_results(evaluation.canaries, [str(c.get("secret", "")) for c in canaries if not c.get("reference")], texts),
        history=read_history(out / REPORT_DIR, run_id=run.run_name, before_round=int(round_id)),
        metrics_epsilon=metrics_epsilon,
        # the log's position before report_issued goes in: a log later cut below it cannot match
        audit_position=audit.head(),
    )
    issued = write_site_report(report, out, key=audit.key)
    audit.append("report_issued", {
        "round": int(round_id),
        "phase": "evaluate",
        "metrics": len(report.metrics),
        "epsilon": round(privacy.epsilon, 6),
        "config_hash": digest,
        "report": f"{REPORT_DIR}/{issued.json_path.name}",
        "report_sha256": sha256_file(issued.json_path),
        "signed": issued.signature is not None,
    })
    return issued
