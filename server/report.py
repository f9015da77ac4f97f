"""The coordinator's trust outputs: its signed audit log and the signed consortium report.

Under the run directory (``FEDSYNTH_COORD_RUN_DIR/<run-name>/``)::

    audit.jsonl                     run_start, config, per-site update_accepted /
                                    update_rejected, round, report_issued, run_end
    consortium-report.json(.sig)    the ConsortiumReport (shared.report schema)
    consortium-report.html          the same for people (never what is verified)

Both are signed with the coordinator's Ed25519 key (``FEDSYNTH_COORD_SIGNING_KEY``)
when one is configured; without a key they are written unsigned and
``fedsynth-verify`` will refuse them.

Sites are named by the name their SuperNode was registered under when it is a
valid site name (:mod:`server.site_names`), else ``node-<id>``; ``site_key`` is the identity the budget anchor uses (the SuperNode
public key's sha256 when Flower exposes it). The per-round privacy numbers are
exactly what each site sent with its update (the site's own ledger-recomputed
cumulative ε); beside them, per site, the report shows the ledger position the
coordinator anchored (``ledger_seq``/``ledger_head``) and ``epsilon_recomputed``:
the ε the coordinator recomputed from every (σ, q, steps) it accepted from that
site (:mod:`server.site_budget`), a lower bound the site's own ε may not go below.

Refusals are recorded by kind, typed codes and a short sha256 of the refused
content (:func:`refusal_record`), never by what the site sent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from server.site_budget import BudgetRefusal
from shared.audit import MAX_STRING, AuditLog
from shared.report import SITE_ID_PATTERN
from shared.report_consortium import (
    Aggregation,
    Checkpoint,
    ConsortiumReport,
    Participation,
    RoundMetrics,
    SitePrivacySummary,
    SiteRoundPrivacy,
)
from shared.report_html import render_html
from shared.report_io import IssuedReport, issue_report, software_versions
from shared.run_config import RunConfig, config_hash
from shared.signing import sha256_file
from shared.verdict import consortium_verdict

log = logging.getLogger("fedsynth.coordinator")

ACTOR = "coordinator"
AUDIT_NAME = "audit.jsonl"
REPORT_NAME = "consortium-report.json"
CHECKPOINT_WEIGHTS = "adapter_model.safetensors"  # as server.checkpoint.WEIGHTS_NAME
SITE_NAME = re.compile(SITE_ID_PATTERN)


def open_audit(run_dir: Path, *, key: Ed25519PrivateKey | None) -> AuditLog:
    """The coordinator's audit log for this run (continued, not restarted, on resume)."""
    return AuditLog(Path(run_dir) / AUDIT_NAME, key=key, actor=ACTOR)


def refusal_record(kind: str, digest: str, problems: int, codes: tuple[str, ...] = ()) -> dict[str, Any]:
    """How a refused reply is recorded (summary, audit log): a type, a hash, a count; no content.

    ``kind``: ``wire`` (the wire contract), ``ledger`` (the site-budget anchor,
    with its typed ``codes``), ``layout`` (adapter layout differs from the other
    sites'), ``too_few`` (SecAgg+: too few contributions to unmask safely).
    ``digest``: :func:`shared.wire.refusal_digest` of the refused content.
    """
    out: dict[str, Any] = {"kind": kind, "sha256": digest, "problems": int(problems)}
    if codes:
        out["codes"] = list(codes)
    return out


def wire_refusal(node: int, what: str, content: Any, exc: Exception) -> dict[str, Any]:
    """Log and record a reply the wire checks refused (``exc``: WireError, or anything they
    raised): a hash of the content and a problem count; only typed codes' text is logged."""
    from shared import wire, wire_version
    from shared.errors import WireError

    digest = wire.refusal_digest(content)
    count = len(exc.problems) if isinstance(exc, WireError) else 1
    codes = wire_version.refusal_codes(exc)
    if codes:  # the one refusal whose text is safe to log: it quotes only bounded ints
        log.warning("site %d: %s", node, exc.problems[0].reason)  # type: ignore[attr-defined]
    log.warning("site %d: %s reply refused by the wire contract (%d problems, sha256 %s)",
                node, what, count, digest)
    return refusal_record("wire", digest, count, codes)


def ledger_refusal(node: int, what: str, content: Any, refusal: BudgetRefusal) -> dict[str, Any]:
    """Log and record an update the site-budget anchor refused (:mod:`server.site_budget`):
    its typed codes and a hash of the content, never the content."""
    from shared import wire

    digest = wire.refusal_digest(content)
    log.warning("site %d: %s update refused by the site-budget anchor: %s (sha256 %s)",
                node, what, ",".join(refusal.codes), digest)
    return refusal_record("ledger", digest, len(refusal.problems), refusal.codes)


def _short(text: str) -> str:
    clean = "".join(c if c.isprintable() else " " for c in str(text))
    return clean[:MAX_STRING]


def _refusal_reason(refusal: Any) -> str:
    """``refused (<kind>[: codes]) sha256 <digest>``: never the refused content.

    Old summaries recorded a list of problem strings (which could echo what the
    site sent); those are hashed here, not copied.
    """
    if isinstance(refusal, Mapping) and isinstance(refusal.get("sha256"), str):
        kind = str(refusal.get("kind", "wire"))
        codes = refusal.get("codes") or []
        typed = f"{kind}: {','.join(str(c) for c in codes)}" if codes else kind
        return f"refused ({typed}) sha256 {refusal['sha256']}"
    digest = hashlib.sha256(json.dumps(refusal, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"refused (wire) sha256 {digest}"


def audit_round(audit: AuditLog, record: Mapping[str, Any], *, registry_sha256: str | None = None,
                names: Mapping[str, str] | None = None) -> None:
    """One entry per site asked to train (accepted or rejected, with a short reason), then ``round``.

    An accepted update carries the site's reported cumulative ε and the ledger
    position and recomputed ε the coordinator anchored; a rejected one its kind,
    typed codes and a hash of the refused content. Each entry names the site
    (``site``: its registered name, :mod:`server.site_names`, or ``node-<id>``)
    beside its node id. ``registry_sha256`` (the
    site-budget registry after this round) goes into the ``round`` entry, so the
    signed audit log pins the anchor's state.
    """
    rnd = int(record["round"])
    train = record.get("train") or {}
    privacy = record.get("privacy") or {}
    weights = record.get("weights") or {}
    anchored = record.get("site_budget") or {}
    for node in train.get("accepted", []):
        p = privacy.get(str(node), {})
        data: dict[str, Any] = {"round": rnd, "node": str(node), "site": _site_label(node, names)}
        if "epsilon" in p:
            data["epsilon"] = float(p["epsilon"])
        if str(node) in weights:
            data["weight"] = float(weights[str(node)])
        a = anchored.get(str(node)) or {}
        for k in ("ledger_seq", "ledger_head", "epsilon_recomputed", "site_key"):
            if k in a:
                data[k] = a[k]
        audit.append("update_accepted", data)
    rejected: list[tuple[Any, str]] = []
    rejected += [(n, f"declined: {r}") for n, r in (train.get("declined") or {}).items()]
    rejected += [(n, _refusal_reason(p)) for n, p in (train.get("refused") or {}).items()]
    rejected += [(n, "failed: error reply") for n in train.get("failed", [])]
    rejected += [(n, "missing: no reply before the timeout") for n in train.get("missing", [])]
    for node, reason in rejected:
        audit.append("update_rejected", {"round": rnd, "node": str(node), "site": _site_label(node, names),
                                         "reason": _short(reason)})
    ev = record.get("evaluate") or {}
    entry: dict[str, Any] = {
        "round": rnd,
        "sent": len(train.get("sent", [])),
        "accepted": len(train.get("accepted", [])),
        "aggregated": bool(record.get("aggregated", False)),
        "checkpoint": str(record.get("checkpoint", "")),
        "evaluated": len(ev.get("accepted", [])),
    }
    if registry_sha256 is not None:
        entry["site_budget_sha256"] = registry_sha256
    audit.append("round", entry)


def _site_label(node: Any, names: Mapping[str, str] | None) -> str:
    """The site's name (registered, validated by server.site_names) or ``node-<id>``."""
    name = (names or {}).get(str(node))
    return name if isinstance(name, str) and SITE_NAME.fullmatch(name) else f"node-{node}"


def _site_rounds(summary: Mapping[str, Any]) -> list[SitePrivacySummary]:
    names = summary.get("site_names") or {}
    by_node: dict[str, list[SiteRoundPrivacy]] = {}
    anchors: dict[str, dict[str, Any]] = {}  # node -> the latest anchored position (last round wins)
    for rec in summary.get("rounds", []):
        for node, a in (rec.get("site_budget") or {}).items():
            anchors[str(node)] = {**a, "round": int(rec["round"])}
        for node, p in (rec.get("privacy") or {}).items():
            a = (rec.get("site_budget") or {}).get(str(node)) or {}
            fields = {**p, **({"epsilon_recomputed": a["epsilon_recomputed"]}
                              if "epsilon_recomputed" in a else {})}
            try:
                point = SiteRoundPrivacy(round=int(rec["round"]), **{
                    k: fields[k] for k in SiteRoundPrivacy.model_fields if k != "round" and k in fields
                })
            except (KeyError, ValidationError) as exc:
                # Only checked replies reach the summary: this means a summary edited by hand.
                log.warning("round %s node %s: privacy scalars left out of the report: %s",
                            rec.get("round"), node, exc)
                continue
            by_node.setdefault(str(node), []).append(point)
    out = []
    for node in sorted(set(by_node) | set(anchors)):
        a = anchors.get(node) or {}
        try:
            out.append(SitePrivacySummary(
                site_id=_site_label(node, names), rounds=by_node.get(node, []),
                site_key=a.get("site_key"), epsilon=a.get("epsilon"),
                epsilon_recomputed=a.get("epsilon_recomputed"),
                ledger_seq=a.get("ledger_seq"), ledger_head=a.get("ledger_head"),
            ))
        except ValidationError as exc:
            log.warning("node %s: anchored budget left out of the report: %s", node, exc)
            out.append(SitePrivacySummary(site_id=_site_label(node, names), rounds=by_node.get(node, [])))
    return out


def _checkpoints(summary: Mapping[str, Any], run_dir: Path) -> list[Checkpoint]:
    out = []
    for rec in summary.get("rounds", []):
        name = rec.get("checkpoint")
        if not name:
            continue
        rel = f"checkpoints/{name}/{CHECKPOINT_WEIGHTS}"
        path = Path(run_dir) / rel
        if not path.is_file():
            log.warning("round %s: checkpoint %s missing; left out of the report", rec.get("round"), path)
            continue
        out.append(Checkpoint(round=int(rec["round"]), path=rel, sha256=sha256_file(path)))
    return out


_TRAIN_STATUS = {"accepted": "trained", "declined": "declined", "refused": "refused",
                 "failed": "failed", "missing": "missing"}


def _phase_status(phase: Mapping[str, Any] | None, node: str, done: str) -> str:
    if not phase:
        return "not sampled"
    for key, status in _TRAIN_STATUS.items():
        if node in {str(n) for n in (phase.get(key) or [])}:
            return done if key == "accepted" else status
    return "not sampled"


def participation(summary: Mapping[str, Any]) -> list[Participation]:
    """Site x round: trained / declined / refused / failed / missing / not sampled, per phase.

    Read from the summary's per-round ``train``/``evaluate`` records (server.app): a site
    counts as trained in a round only when its update was accepted.
    """
    rounds = [r for r in summary.get("rounds", []) if isinstance(r, Mapping) and "round" in r]
    nodes: set[str] = set()
    for rec in rounds:
        for phase in ("train", "evaluate"):
            p = rec.get(phase) or {}
            for key in _TRAIN_STATUS:
                nodes |= {str(n) for n in (p.get(key) or [])}
            nodes |= {str(n) for n in (p.get("sent") or [])}
    out = []
    for rec in rounds:
        for node in sorted(nodes, key=lambda n: (len(n), n)):
            out.append(Participation(
                round=int(rec["round"]), site_id=_site_label(node, summary.get("site_names")),
                train=_phase_status(rec.get("train"), node, "trained"),  # type: ignore[arg-type]
                evaluate=_phase_status(rec.get("evaluate"), node, "evaluated"),  # type: ignore[arg-type]
            ))
    return out


def build_consortium_report(
    summary: Mapping[str, Any], *, run: RunConfig, run_dir: Path, created: datetime | None = None,
    audit_position: tuple[int, str] | None = None,
) -> ConsortiumReport:
    """The ConsortiumReport for ``summary`` (the consortium-summary.json content).

    Per site: the privacy scalars it sent each round it was aggregated; per round:
    the unweighted mean of the evaluating sites' metric summaries; the aggregation
    settings; every checkpoint's sha256 (hashed now, from disk).
    """
    metrics = [
        RoundMetrics(round=int(rec["round"]), metrics=dict(rec["evaluate"]["mean"]))
        for rec in summary.get("rounds", [])
        if (rec.get("evaluate") or {}).get("mean")
    ]
    bound = float(summary.get("update_norm_bound", run.update_norm_bound) or 0.0)
    status = str(summary.get("status", "completed"))
    failed = status.startswith("failed")
    report = ConsortiumReport(
        run_id=str(summary.get("run_name", run.run_name)),
        rounds=int(summary.get("last_round", 0)),
        status="failed" if failed else "completed",
        status_reason=_short(status.removeprefix("failed:").strip())[:200] or None if failed else None,
        created=created or datetime.now(UTC),
        sites=_site_rounds(summary),
        metrics=metrics,
        aggregation=Aggregation(
            method=str(summary.get("aggregation", run.aggregation)),
            weighting=str(summary.get("weighting", run.weighting)),
            norm_bound=bound if bound > 0 else None,
            secure_aggregation=bool(summary.get("secagg", run.secagg)),
        ),
        checkpoints=_checkpoints(summary, run_dir),
        software=software_versions(),
        config_hash=config_hash(run),
        audit_seq=audit_position[0] if audit_position else None,
        audit_head=audit_position[1] if audit_position else None,
        participation=participation(summary),
    )
    return report.model_copy(update={"verdict": consortium_verdict(report)})


def write_consortium_report(
    report: ConsortiumReport, run_dir: Path, *, key: Ed25519PrivateKey | None
) -> IssuedReport[ConsortiumReport]:
    """Write ``consortium-report.json`` (+ ``.sig`` with ``key``) and ``.html`` into ``run_dir``."""
    return issue_report(report, Path(run_dir) / REPORT_NAME, key=key, html=render_html(report))


def issue_consortium_report(
    summary: Mapping[str, Any], *, run: RunConfig, run_dir: Path, audit: AuditLog
) -> IssuedReport[ConsortiumReport]:
    """Build, sign (with the audit log's key), write and audit the consortium report."""
    report = build_consortium_report(summary, run=run, run_dir=run_dir, audit_position=audit.head())
    issued = write_consortium_report(report, run_dir, key=audit.key)
    audit.append("report_issued", {
        "report": REPORT_NAME,
        "report_sha256": sha256_file(issued.json_path),
        "rounds": report.rounds,
        "sites": len(report.sites),
        "signed": issued.signature is not None,
    })
    return issued
