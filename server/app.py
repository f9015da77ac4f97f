"""The coordinator's Flower ServerApp: rounds of train -> aggregate -> checkpoint -> evaluate.

Thin wiring over :mod:`server.rounds` (one round's steps, typed values from
:mod:`server.round_state`), :mod:`server.run_summary`, :mod:`server.report` and
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

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server import checkpoint, report, rounds, site_budget, site_names
from server.rounds import progress
from server.run_summary import SUMMARY_NAME, RunSummary, run_status, start_summary, write_summary
from shared import adapter_spec, wire_adapter
from shared.audit import AuditLog
from shared.errors import ConfigError, Problem
from shared.run_config import RunConfig
from shared.settings import CoordinatorSettings, load_settings
from shared.signing import load_private_key, sha256_file

log = logging.getLogger("fedsynth.coordinator")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run = RunConfig.from_flower(dict(context.run_config))
    settings = load_settings(CoordinatorSettings)
    key = load_private_key(settings.signing_key) if settings.signing_key else None
    run_federation(grid, run, run_dir=settings.run_dir / run.run_name, key=key,
                   spec=run_adapter_spec(run, settings))


def run_adapter_spec(run: RunConfig, settings: CoordinatorSettings | None = None) -> adapter_spec.AdapterSpec:
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
    problems = wire_adapter.check_lora_structure(spec, r=run.lora.r) if spec else [Problem("spec", "no tensors")]
    if problems:
        raise ConfigError("the run's adapter spec is not a LoRA adapter", problems)
    return spec


def run_federation(
    grid: Grid, run: RunConfig, *, run_dir: Path, sleep: Callable[[float], None] = time.sleep,
    key: Ed25519PrivateKey | None = None, state_dir: Path | None = None,
    spec: adapter_spec.AdapterSpec | None = None,
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
    if global_adapter is not None and {k: s for k, (s, _d) in wire_adapter.spec_of(global_adapter).items()} != shapes:
        raise ConfigError("cannot resume", [Problem(str(ckpt_root), "the checkpoint's adapter does not "
                                                    "match the run's adapter spec (another base model or LoRA)")])
    summary = start_summary(run_dir / SUMMARY_NAME, run, start)
    audit = report.open_audit(run_dir, key=key)
    audit.append("run_start", {"run": run.run_name, "num_rounds": run.num_rounds, "resume_after": start,
                               "signed": key is not None})
    audit.append("config", {"config_hash": report.config_hash(run)})
    if start:
        log.info("resuming after round %d", start)
    for rnd in range(start + 1, run.num_rounds + 1):
        progress("round %d/%d: waiting for %d sites (up to %.0f s)", rnd, run.num_rounds, run.min_sites,
                 run.timeout_wait_sites)
        nodes = rounds.wait_for_sites(grid, run.min_sites, run.timeout_wait_sites, sleep)
        names = site_names.register_sites(grid, nodes, summary.site_names or {}, audit)
        summary = dataclasses.replace(summary, site_names=names)
        if len(nodes) < run.min_sites:
            summary = dataclasses.replace(summary, status=(
                f"failed: {len(nodes)} sites connected within {run.timeout_wait_sites:g} s "
                f"in round {rnd}, min-sites is {run.min_sites}"))
            progress("%s", summary.status)
            return _finish(run_dir, summary, run, audit)
        t_round = time.monotonic()
        progress("round %d/%d: %d sites connected: %s", rnd, run.num_rounds, len(nodes),
                 site_names.labels(nodes, names))
        anchor = site_budget.round_anchor(budget, site_budget.site_keys(grid), run_name=run.run_name,
                                          round_id=rnd)
        record = rounds.play_round(grid, run, round_id=rnd, nodes=nodes, names=names,
                                   global_adapter=global_adapter, spec=spec, anchor=anchor, ckpt_root=ckpt_root)
        if record.train.adapter is not None:
            global_adapter = record.train.adapter
        # One tail for plain and SecAgg+ rounds: audit, summary, progress.
        report.audit_round(audit, record.to_json(), registry_sha256=budget.digest(), names=names)
        summary = summary.with_round(record.to_json())
        write_summary(run_dir, summary)
        progress("round %d/%d done in %.0f s: %d updates aggregated", rnd, run.num_rounds,
                 time.monotonic() - t_round, record.train.aggregated_count)
    summary = dataclasses.replace(summary, status=run_status(summary))
    progress("run %s: %s", run.run_name, summary.status)
    return _finish(run_dir, summary, run, audit)


def _finish(run_dir: Path, summary: RunSummary, run: RunConfig, audit: AuditLog) -> dict[str, Any]:
    """Write the summary, then the signed consortium report, then close the audit trail."""
    write_summary(run_dir, summary)
    issued = report.issue_consortium_report(summary.to_json(), run=run, run_dir=run_dir, audit=audit)
    audit.append("run_end", {"status": summary.status[:200], "rounds": summary.last_round,
                             "report_sha256": sha256_file(issued.json_path)})
    return summary.to_json()
