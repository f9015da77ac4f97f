"""The coordinator's Flower ServerApp: rounds of train -> aggregate -> checkpoint -> evaluate.

Thin wiring over :mod:`server.strategy`, :mod:`server.checkpoint` and
:mod:`shared.wire`. Per round: wait for ``min-sites`` connected sites, sample
``fraction-train`` of them, send the global adapter, check every reply with
:func:`shared.wire.check_reply`, aggregate the accepted ones (at least
``min-sites``, else the global adapter is left unchanged), checkpoint, then ask
``fraction-evaluate`` of the sites for metric summaries. Sites that time out,
fail, decline (out of budget) or send something the wire contract refuses are
recorded and the round goes on without them: any malformed reply is a typed
refusal, never an exception that ends the run. A refusal is recorded by a short
sha256 of what was refused (:func:`shared.wire.refusal_digest`), never its content.

Every train update is also checked against the coordinator's per-site budget
anchor (:mod:`server.site_budget`, ``<FEDSYNTH_COORD_RUN_DIR>/site-budgets.json``,
shared by every run): a rolled-back or forked ledger, a cumulative epsilon that
went down, or one below what the coordinator recomputes from the site's own
reported runs is refused like a wire violation.

With ``secagg = true`` the train phase is SecAgg+ instead (:mod:`server.secagg`):
the coordinator checks each site's clear scalars and learns only the weighted
mean of the updates; evaluation and checkpoints are unchanged.

Output (``FEDSYNTH_COORD_RUN_DIR/<run-name>/``): ``checkpoints/`` (PEFT adapters
+ state.json), ``consortium-summary.json``, the audit log ``audit.jsonl`` and, at
the end, ``consortium-report.json`` (+ ``.sig``, ``.html``): both signed with
``FEDSYNTH_COORD_SIGNING_KEY`` when set (:mod:`server.report`). A restarted
coordinator resumes after the last complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
import time
from collections.abc import Callable
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Context, Message, MessageType
from flwr.serverapp import Grid, ServerApp

from server import checkpoint, report, secagg, site_budget, site_names, strategy
from shared import adapter_spec, wire
from shared.audit import AuditLog
from shared.errors import ConfigError, Problem
from shared.privacy_scalars import PrivacyScalars
from shared.run_config import RunConfig
from shared.settings import CoordinatorSettings, load_settings
from shared.signing import load_private_key, sha256_file

log = logging.getLogger("fedsynth.coordinator")
from flwr.common.logger import log as flwr_log  # noqa: E402  (streamed by `flwr run --stream`)

SUMMARY_NAME = "consortium-summary.json"

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run = RunConfig.from_flower(dict(context.run_config))
    settings = load_settings(CoordinatorSettings)
    key = load_private_key(settings.signing_key) if settings.signing_key else None
    run_federation(grid, run, run_dir=settings.run_dir / run.run_name, key=key,
                   spec=run_adapter_spec(run, settings))


def run_adapter_spec(run: RunConfig, settings: CoordinatorSettings | None = None) -> wire.AdapterSpec:
    """The run's adapter spec (tensor name -> shape, wire dtype), known from round 1.

    From the base model's ``config.json`` (``FEDSYNTH_COORD_BASE_MODEL_CONFIG``; unset: the
    embedded default model) and the run's ``lora.r``/``lora.targets``/``lora.dtype``
    (:mod:`shared.adapter_spec`, the derivation the sites use). Every adapter a site
    sends must have exactly these names and shapes: nothing else fits through.
    ConfigError when the config is missing or describes no model.
    """
    settings = settings if settings is not None else load_settings(CoordinatorSettings)
    config = (adapter_spec.load_model_config(settings.base_model_config)
              if settings.base_model_config is not None else adapter_spec.EMBEDDED_MODEL_CONFIG)
    spec = adapter_spec.spec_from_config(config, r=run.lora.r, targets=run.lora.targets or None,
                                         dtype=run.lora.dtype)
    problems = wire.check_lora_structure(spec, r=run.lora.r) if spec else [Problem("spec", "no tensors")]
    if problems:
        raise ConfigError("the run's adapter spec is not a LoRA adapter", problems)
    return spec


def run_federation(
    grid: Grid, run: RunConfig, *, run_dir: Path, sleep: Callable[[float], None] = time.sleep,
    key: Ed25519PrivateKey | None = None, state_dir: Path | None = None,
    spec: wire.AdapterSpec | None = None,
) -> dict[str, Any]:
    """Run (or resume) the federation; returns the consortium summary also written to run_dir.

    ``key`` signs the coordinator's audit log and consortium report (:mod:`server.report`).
    ``state_dir`` holds the per-site budget anchor shared by every run of this
    coordinator (:mod:`server.site_budget`); default: ``run_dir``'s parent, i.e.
    ``FEDSYNTH_COORD_RUN_DIR``. ``spec``: the run's adapter spec; default
    :func:`run_adapter_spec` from the coordinator's settings. Every round's replies,
    the first included, are checked against it.
    """
    spec = spec if spec is not None else run_adapter_spec(run)
    budget = site_budget.SiteBudgetRegistry.open(state_dir if state_dir is not None else run_dir.parent)
    ckpt_root = run_dir / "checkpoints"
    latest = checkpoint.load_latest(ckpt_root)
    start, global_adapter = latest if latest is not None else (0, None)
    shapes = {name: tuple(shape) for name, (shape, _dtype) in spec.items()}
    if global_adapter is not None and {k: s for k, (s, _d) in wire.spec_of(global_adapter).items()} != shapes:
        raise ConfigError("cannot resume", [Problem(str(ckpt_root), "the checkpoint's adapter does not "
                                                    "match the run's adapter spec (another base model or LoRA)")])
    summary = _load_summary(run_dir / SUMMARY_NAME, run, start)
    audit = report.open_audit(run_dir, key=key)
    audit.append("run_start", {"run": run.run_name, "num_rounds": run.num_rounds, "resume_after": start,
                               "signed": key is not None})
    audit.append("config", {"config_hash": report.config_hash(run)})
    if start:
        log.info("resuming after round %d", start)
    for rnd in range(start + 1, run.num_rounds + 1):
        _progress("round %d/%d: waiting for %d sites (up to %.0f s)", rnd, run.num_rounds, run.min_sites,
                  run.timeout_wait_sites)
        nodes = _wait_for_sites(grid, run.min_sites, run.timeout_wait_sites, sleep)
        names = _register_sites(grid, nodes, summary, audit)
        if len(nodes) < run.min_sites:
            summary["status"] = (f"failed: {len(nodes)} sites connected within {run.timeout_wait_sites:g} s "
                                 f"in round {rnd}, min-sites is {run.min_sites}")
            _progress("%s", summary["status"])
            return _finish(run_dir, summary, run, audit)
        record: dict[str, Any] = {"round": rnd}
        t_round = time.monotonic()
        _progress("round %d/%d: %d sites connected: %s", rnd, run.num_rounds, len(nodes),
                  site_names.labels(nodes, names))
        train_nodes = _sample(nodes, run.fraction_train, run.min_sites, seed=rnd)
        anchor = _Anchor(budget, site_budget.site_keys(grid), run.run_name, rnd)
        if run.secagg:
            _progress("round %d: train (SecAgg+) on %d sites: %s", rnd, len(train_nodes),
                      site_names.labels(train_nodes, names))
            new = secagg.train_round(grid, run, nodes=train_nodes, round_id=rnd, spec=spec,
                                     global_adapter=global_adapter, record=record, anchor=anchor.admit)
            record["site_budget"] = anchor.admitted
            _progress_train(rnd, record, names, t_round)
            if new is not None:
                global_adapter = new
                checkpoint.save_round(ckpt_root, rnd, global_adapter, lora=run.lora)
                record["checkpoint"] = checkpoint.round_dir_name(rnd)
            _evaluate(grid, nodes, rnd, global_adapter, run, record, names)
            report.audit_round(audit, record, registry_sha256=budget.digest(), names=names)
            summary["rounds"].append(record)
            summary["last_round"] = rnd
            _write_summary(run_dir, summary)
            _progress("round %d/%d done in %.0f s", rnd, run.num_rounds, time.monotonic() - t_round)
            continue
        _progress("round %d: train on %d sites: %s", rnd, len(train_nodes), site_names.labels(train_nodes, names))
        replies = _send(grid, train_nodes, MessageType.TRAIN, rnd, global_adapter, run.timeout_train)
        outcome = _classify(replies, train_nodes, kind="train", spec=spec, run=run, anchor=anchor.admit)
        accepted = outcome["accepted"]
        record["train"] = outcome["record"]
        record["site_budget"] = anchor.admitted
        _progress_train(rnd, record, names, t_round)
        if len(accepted) >= run.min_sites:
            global_adapter = _aggregate(accepted, global_adapter, run, record)
            checkpoint.save_round(ckpt_root, rnd, global_adapter, lora=run.lora)
            record["checkpoint"] = checkpoint.round_dir_name(rnd)
        else:
            record["aggregated"] = False
            log.warning("round %d: %d accepted updates < min-sites; global unchanged", rnd, len(accepted))
        _evaluate(grid, nodes, rnd, global_adapter, run, record, names)
        report.audit_round(audit, record, registry_sha256=budget.digest(), names=names)
        summary["rounds"].append(record)
        summary["last_round"] = rnd
        _write_summary(run_dir, summary)
        _progress("round %d/%d done in %.0f s: %d updates aggregated", rnd, run.num_rounds,
                  time.monotonic() - t_round, len(record.get("train", {}).get("accepted", [])))
    summary["status"] = run_status(summary)
    _progress("run %s: %s", run.run_name, summary["status"])
    return _finish(run_dir, summary, run, audit)


def run_status(summary: dict[str, Any]) -> str:
    """``completed`` when at least one round aggregated site updates, else ``failed: <why>``.

    A run in which no site's update reached the global adapter produced nothing:
    it is a failed run, whatever the reason (every site declined, was refused,
    failed or timed out), and the status says which, counted over all rounds.
    """
    rounds = summary.get("rounds", [])
    if any(r.get("aggregated") for r in rounds):
        return "completed"
    counts: dict[str, int] = {}
    for r in rounds:
        train = r.get("train") or {}
        for reason in (train.get("declined") or {}).values():
            counts[f"declined ({reason})"] = counts.get(f"declined ({reason})", 0) + 1
        for key in ("refused", "failed", "missing"):
            n = len(train.get(key) or [])
            if n:
                counts[key] = counts.get(key, 0) + n
        if not train and r.get("secagg") is not None:
            counts["secure aggregate not produced"] = counts.get("secure aggregate not produced", 0) + 1
    why = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "no replies"
    return f"failed: no site's update was aggregated in {len(rounds)} rounds ({why})"[:200]


def _progress(fmt: str, *args: Any) -> None:
    """One progress line, streamed to ``flwr run --stream`` (and the coordinator's own log)."""
    flwr_log(INFO, "fedsynth " + fmt, *args)


def _progress_train(rnd: int, record: dict[str, Any], names: dict[str, str], t0: float) -> None:
    """The train phase's outcome by site name, with each accepted site's reported cumulative ε."""
    train = record.get("train") or {}
    eps = {n: a.get("epsilon") for n, a in (record.get("site_budget") or {}).items()}
    accepted = [f"{site_names.label(n, names)} (ε={eps[str(n)]:.3g})" if eps.get(str(n)) is not None
                else site_names.label(n, names) for n in train.get("accepted", [])]
    declined = [f"{site_names.label(n, names)} ({r})" for n, r in (train.get("declined") or {}).items()]
    _progress("round %d: train done after %.0f s: accepted %s; declined %s; refused %s; failed %s; "
              "missing %s", rnd, time.monotonic() - t0, ", ".join(accepted) or "-",
              ", ".join(declined) or "-", site_names.labels(train.get("refused") or {}, names),
              site_names.labels(train.get("failed") or [], names),
              site_names.labels(train.get("missing") or [], names))


def _register_sites(grid: Grid, nodes: list[int], summary: dict[str, Any], audit: AuditLog) -> dict[str, str]:
    """Name the connected nodes; audit each node seen for the first time (name, public key hash).

    Returns (and keeps in ``summary["site_names"]``) the ``{str(node_id): name}`` map.
    """
    known: dict[str, str] = summary.setdefault("site_names", {})
    for node, site in site_names.site_directory(grid, nodes).items():
        if str(node) in known:
            continue
        known[str(node)] = site.name
        audit.append("site_registered", {"node": str(node), "site": site.name, "named": site.registered,
                                         "public_key_sha256": site.public_key_sha256})
    return known


def _finish(run_dir: Path, summary: dict[str, Any], run: RunConfig, audit: AuditLog) -> dict[str, Any]:
    """Write the summary, then the signed consortium report, then close the audit trail."""
    _write_summary(run_dir, summary)
    issued = report.issue_consortium_report(summary, run=run, run_dir=run_dir, audit=audit)
    audit.append("run_end", {"status": str(summary["status"])[:200], "rounds": int(summary["last_round"]),
                             "report_sha256": sha256_file(issued.json_path)})
    return summary


# ---- one round's pieces ----------------------------------------------------


class _Anchor:
    """This round's view of the site-budget registry: admit one site's privacy record."""

    def __init__(self, registry: site_budget.SiteBudgetRegistry, keys: dict[int, str],
                 run_name: str, round_id: int) -> None:
        self._registry, self._keys, self._run, self._round = registry, keys, run_name, round_id
        self.admitted: dict[str, dict[str, Any]] = {}

    def admit(self, node: int, privacy: PrivacyScalars) -> site_budget.BudgetRefusal | None:
        """None when the update is anchored; else the typed refusal (nothing recorded)."""
        key = site_budget.key_for(node, self._keys)
        got = self._registry.admit(key, privacy, run_name=self._run, round_id=self._round, node=node)
        if isinstance(got, site_budget.BudgetRefusal):
            return got
        self.admitted[str(node)] = {
            "site_key": got.site_key, "ledger_seq": got.ledger_seq, "ledger_head": got.ledger_head,
            "epsilon": got.epsilon, "epsilon_recomputed": got.epsilon_recomputed,
        }
        return None


def _evaluate(
    grid: Grid, nodes: list[int], rnd: int, global_adapter: dict | None, run: RunConfig, record: dict,
    names: dict[str, str] | None = None,
) -> None:
    if global_adapter is None:
        _progress("round %d: no global adapter yet; evaluation skipped", rnd)
        return
    eval_nodes = _sample(nodes, run.fraction_evaluate, run.min_sites, seed=10_000 + rnd)
    t0 = time.monotonic()
    _progress("round %d: evaluate on %d sites: %s", rnd, len(eval_nodes), site_names.labels(eval_nodes, names or {}))
    ev = _send(grid, eval_nodes, MessageType.EVALUATE, rnd, global_adapter, run.timeout_evaluate)
    ev_out = _classify(ev, eval_nodes, kind="evaluate", spec=None, run=run)
    record["evaluate"] = ev_out["record"]
    record["evaluate"]["mean"] = _mean_metrics([r.metrics for r in ev_out["accepted"].values()])
    _progress("round %d: evaluate done after %.0f s: %d of %d sites reported", rnd, time.monotonic() - t0,
              len(ev_out["record"]["accepted"]), len(eval_nodes))


def _wait_for_sites(grid: Grid, need: int, timeout: float, sleep: Callable[[float], None]) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(int(n) for n in grid.get_node_ids())
        if len(nodes) >= need or time.monotonic() >= deadline:
            return nodes
        sleep(1.0)


def _sample(nodes: list[int], fraction: float, min_sites: int, *, seed: int) -> list[int]:
    k = min(len(nodes), max(min_sites, int(np.ceil(fraction * len(nodes)))))
    return sorted(random.Random(seed).sample(nodes, k))


def _send(
    grid: Grid, nodes: list[int], kind: str, rnd: int, adapter: dict | None, timeout: float
) -> list[Message]:
    messages = [
        Message(wire.pack_instruction(round_id=rnd, adapter=adapter), dst_node_id=n,
                message_type=kind, group_id=str(rnd))
        for n in nodes
    ]
    return list(grid.send_and_receive(messages, timeout=timeout))


def _classify(
    replies: list[Message], sent: list[int], *, kind: str, spec: wire.AdapterSpec | None, run: RunConfig,
    anchor: Callable[[int, PrivacyScalars], site_budget.BudgetRefusal | None] | None = None,
) -> dict[str, Any]:
    """Sort replies into accepted / declined / refused / failed / missing (by node id).

    ``anchor`` (train replies): the site-budget check of :class:`_Anchor`; a refusal
    there is recorded like a wire refusal (kind ``ledger``, with its typed codes).
    """
    accepted: dict[int, wire.Reply] = {}
    rec: dict[str, Any] = {"sent": sent, "accepted": [], "declined": {}, "refused": {}, "failed": []}
    seen: set[int] = set()
    for msg in replies:
        node = int(msg.metadata.src_node_id)
        if node not in sent or node in seen:
            continue  # not asked, or a duplicate: ignore
        seen.add(node)
        if msg.has_error():
            rec["failed"].append(node)
            continue
        try:
            reply = wire.check_reply(msg.content, kind=kind, spec=spec, run=run)
        except Exception as exc:  # noqa: BLE001 - WireError, or anything: a refusal, never a crash
            rec["refused"][str(node)] = report.wire_refusal(node, kind, msg.content, exc)
            continue
        if reply.privacy is not None and anchor is not None:
            refusal = anchor(node, reply.privacy)
            if refusal is not None:
                digest = wire.refusal_digest(msg.content)
                log.warning("site %d: train update refused by the site-budget anchor: %s (sha256 %s)",
                            node, ",".join(refusal.codes), digest)
                rec["refused"][str(node)] = report.refusal_record("ledger", digest, len(refusal.problems),
                                                           refusal.codes)
                continue
        if reply.decline is not None:
            rec["declined"][str(node)] = reply.decline
        else:
            accepted[node] = reply
            rec["accepted"].append(node)
    rec["accepted"].sort()
    rec["missing"] = [n for n in sent if n not in seen]
    return {"accepted": accepted, "record": rec}


def _aggregate(
    accepted: dict[int, wire.Reply], global_adapter: dict | None, run: RunConfig, record: dict
) -> dict[str, np.ndarray]:
    nodes = sorted(accepted)
    updates = [accepted[n].adapter for n in nodes]
    weights = strategy.site_weights(
        [accepted[n].privacy.patients_bucket for n in nodes],
        scheme=run.weighting, cap=run.weight_cap,
    )
    norms = [strategy.update_norm(strategy.update_delta(u, global_adapter)) for u in updates]
    new = strategy.aggregate(
        updates, weights=weights, reference=global_adapter, method=run.aggregation,
        trim_fraction=run.trim_fraction, norm_bound=run.update_norm_bound, dtype=run.lora.dtype,
    )
    record["aggregated"] = True
    record["weights"] = {str(n): w for n, w in zip(nodes, weights, strict=True)}
    record["update_norms"] = {str(n): v for n, v in zip(nodes, norms, strict=True)}
    record["privacy"] = {str(n): accepted[n].privacy.to_record() for n in nodes}
    return new


def _mean_metrics(summaries: list[dict[str, float] | None]) -> dict[str, float]:
    """Unweighted mean over sites of each metric that at least one site reported."""
    acc: dict[str, list[float]] = {}
    for s in summaries:
        for k, v in (s or {}).items():
            acc.setdefault(k, []).append(v)
    return {k: float(np.mean(v)) for k, v in sorted(acc.items())}


# ---- the summary file ------------------------------------------------------


def _load_summary(path: Path, run: RunConfig, start: int) -> dict[str, Any]:
    summary: dict[str, Any] = {"run_name": run.run_name, "num_rounds": run.num_rounds, "rounds": []}
    if start and path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            summary["rounds"] = [r for r in old.get("rounds", []) if int(r["round"]) <= start]
            summary["site_names"] = {str(k): str(v) for k, v in (old.get("site_names") or {}).items()}
        except (ValueError, KeyError, TypeError):
            log.warning("unreadable %s; starting a fresh summary", path)
    summary.update(
        aggregation=run.aggregation, weighting=run.weighting, update_norm_bound=run.update_norm_bound,
        secagg=run.secagg,
        min_sites=run.min_sites, status="running", last_round=start,
    )
    return summary


def _write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / SUMMARY_NAME
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=f".{SUMMARY_NAME}.")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(_site_epsilons(summary), fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _site_epsilons(summary: dict[str, Any]) -> dict[str, Any]:
    """Add each site's latest reported cumulative epsilon (from its ledger) to the summary."""
    eps: dict[str, float] = {}
    for r in summary["rounds"]:
        for node, p in r.get("privacy", {}).items():
            eps[node] = max(eps.get(node, 0.0), float(p["epsilon"]))
    return {**summary, "site_epsilon": eps}
