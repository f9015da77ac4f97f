"""What one site does in a round, as plain functions over its own settings.

The ClientApp (``client/app.py``) and the site CLI (``client/cli.py``) both call
these, so a round can be run by hand at a site exactly as the federation runs
it. Everything here reads the site's own :class:`~shared.settings.SiteSettings`
(paths, ε ceiling, δ, k_min): a coordinator's run config can choose knobs such
as the number of steps, but never the data, the ceiling or the ledger.

Site output layout (all of it stays at the site)::

    <output_dir>/privacy-ledger.jsonl        the ε ledger (unless ledger_path is set)
    <output_dir>/ledger.key                  the ledger's HMAC secret (unless ledger_key is set)
    <output_dir>/adapters/round-<n>.safetensors   the adapter this site trained in round n
    <output_dir>/adapters/round-<n>/              the same adapter as a PEFT folder
                                                  (adapter_config.json, adapter_model.safetensors)
    <output_dir>/reports/round-<n>/synthetic.jsonl  generated reports (never sent)
    <output_dir>/evaluation/round-<n>/         per-report results, summary, HTML
    <output_dir>/privacy-reports/report-round-<n>.{json,json.sig,html}  signed privacy report
    <output_dir>/audit.jsonl                   hash-chained audit log (signed with signing_key)
    <output_dir>/cache/                        private-note embedding cache
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes

from client.adapter_files import write_peft_adapter
from client.dp.config import TrainResult
from client.dp.ledger import Ledger
from client.dp.sampling import patients_bucket
from client.model import (
    adapter_hash,
    add_lora,
    load_adapter_state,
    load_model,
)
from client.notes import Note, NotesLoad, load_notes
from client.patient_split import group_by_patient, split_by_patient
from client.policy import floor_dp, report_tightened
from client.train import train_dp
from shared.atomic import write_atomic
from shared.audit import AuditLog
from shared.dp_defaults import default_delta  # noqa: F401  (re-exported: bench, tests)
from shared.errors import BudgetExceededError, LedgerError, PrivacyError
from shared.privacy_scalars import PrivacyScalars
from shared.run_config import LoraConfig, RunConfig
from shared.settings import SiteSettings
from shared.signing import load_private_key


@dataclass(frozen=True)
class SiteData:
    """A site's notes split by patient. ``load`` keeps the ingestion problems (skip mode)."""

    load: NotesLoad
    train: list[Note]
    heldout: list[Note]

    @property
    def train_patients(self) -> int:
        return len(group_by_patient(self.train))


def load_site_data(settings: SiteSettings) -> SiteData:
    """Read and validate the site's notes, then split train / held-out by patient."""
    loaded = load_notes(settings.notes_path, mode=settings.notes_mode)
    split = split_by_patient(
        loaded.notes, heldout_fraction=settings.heldout_fraction, seed=settings.split_seed
    )
    return SiteData(load=loaded, train=split.train, heldout=split.heldout)


def site_delta(settings: SiteSettings, n_patients: int) -> float:
    """δ for this site: the setting, or :func:`default_delta` of the patients bucket when unset.

    Privacy meaning: δ bounds the probability that the ε guarantee fails for a
    patient; with δ ≥ 1/n a mechanism could publish one patient's data outright,
    and δ = 1/(10·n) still allows one patient in ten. A configured δ ≥ 1/(10·n)
    is refused (:class:`PrivacyError`). The default depends on the bucketed count
    only: δ goes out with every update, and δ = 1/(10·n) would tell the
    coordinator the exact patient count.
    """
    if n_patients < 1:
        raise PrivacyError("no training patients at this site")
    if settings.delta is None:
        return default_delta(patients_bucket(n_patients))
    limit = 1.0 / (10 * n_patients)
    if settings.delta >= limit:
        raise PrivacyError(
            f"FEDSYNTH_SITE_DELTA={settings.delta:g} is not below 1/(10 * n_patients) = "
            f"1/(10 * {n_patients}) = {limit:g}; set it far lower (e.g. 1e-5) or leave it unset "
            f"for the default min(1e-5, 1/(10 b ln b))"
        )
    return settings.delta


def open_ledger(settings: SiteSettings) -> Ledger:
    """The site's privacy ledger (created on first use), checked against its anchors.

    Raises :class:`~shared.errors.LedgerError` — and so stops training — when the
    ledger is missing, truncated, edited or forked relative to the site's signed
    audit log or privacy reports (:func:`client.dp.ledger_anchor.open_site_ledger`).
    """
    from client.dp.ledger_anchor import open_site_ledger

    return open_site_ledger(settings, audit_log(settings))


def build_site_model(
    settings: SiteSettings,
    *,
    lora: LoraConfig,
    global_adapter: Mapping[str, np.ndarray | torch.Tensor] | None = None,
):
    """Base model on the site's device, LoRA on top, then the global adapter (if any).

    The model is built on its target device before PEFT and Opacus wrap it.
    ``lora.targets`` () is the family default (attention and MLP projections).
    """
    model, tokenizer = load_model(settings.model_dir, device=settings.resolved_device())
    peft_model = add_lora(
        model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, targets=lora.targets or None
    )
    if global_adapter is not None:
        load_adapter_state(peft_model, global_adapter)
    return peft_model, tokenizer


def adapter_path(settings: SiteSettings, round_id: int | str) -> Path:
    return settings.output_dir / "adapters" / f"round-{round_id}.safetensors"


def adapter_folder(settings: SiteSettings, round_id: int | str) -> Path:
    """The PEFT folder form of round ``round_id``'s adapter (``PeftModel.from_pretrained``-loadable)."""
    return settings.output_dir / "adapters" / f"round-{round_id}"


def train_local_round(
    settings: SiteSettings,
    run: RunConfig,
    *,
    round_id: int | str,
    global_adapter: Mapping[str, np.ndarray | torch.Tensor] | None = None,
    data: SiteData | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    private: bool = True,
) -> TrainResult:
    """One DP-LoRA round of ``run`` on this site's training patients.

    The one training path: the ClientApp (:func:`site_train`) and ``fedsynth-site
    train`` both come here with a :class:`RunConfig` already floored by
    :func:`client.policy.floor_run`; the count-dependent noise floors
    (:func:`client.policy.floor_dp`) are applied here. Round 1 (no global adapter)
    initialises LoRA from the run's ``lora.init-seed``, so every site starts from
    the same A matrices. The ledger reservation happens inside
    :func:`client.train.train_dp` before the first step; the trained adapter is
    saved under ``adapters/`` at the site. ``private=False`` is the study's
    non-private baseline (:mod:`client.dp.baseline`); no run config reaches it.
    """
    data = data or load_site_data(settings)
    delta = site_delta(settings, data.train_patients)
    train = run.train
    if private:  # the non-private baseline is never sent: no noise floor applies to it
        train, tightened = floor_dp(train, settings, n_patients=data.train_patients, delta=delta)
        if tightened:
            report_tightened(tightened, phase="train", round_id=round_id, audit=audit_log(settings))
    torch.manual_seed(run.lora.init_seed)
    model, tokenizer = build_site_model(settings, lora=run.lora, global_adapter=global_adapter)
    result = train_dp(
        model,
        tokenizer,
        data.train,
        config=train,
        ledger=open_ledger(settings),
        round_id=str(round_id),
        delta=delta,
        epsilon_ceiling=settings.epsilon_ceiling,
        progress=progress,
        private=private,
    )
    path = adapter_path(settings, round_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, safetensors_bytes({k: v.contiguous() for k, v in result.adapter.items()}))
    write_peft_adapter(
        adapter_folder(settings, round_id), result.adapter, r=run.lora.r, alpha=run.lora.alpha,
        dropout=run.lora.dropout, base_model=str(settings.model_dir) if settings.model_dir else "embedded",
    )
    return result


# --- one federated round, as the ClientApp calls it -------------------------------------


def audit_log(settings: SiteSettings) -> AuditLog:
    """The site's hash-chained audit log, signed when a signing key is configured."""
    key = load_private_key(settings.signing_key) if settings.signing_key else None
    return AuditLog(settings.output_dir / "audit.jsonl", key=key, actor=settings.site_id)


@functools.lru_cache(maxsize=8)
def _spec_for(model_dir: str | None, lora: LoraConfig, dtype: str) -> dict[str, tuple[tuple[int, ...], str]]:
    # The same derivation as the coordinator's (shared/adapter_spec.py): config.json only.
    from client.pretrain import ensure_embedded_model
    from shared.adapter_spec import load_model_config, spec_from_config

    path = Path(model_dir) if model_dir else ensure_embedded_model()
    return spec_from_config(load_model_config(path), r=lora.r, targets=lora.targets or None, dtype=dtype)


def adapter_spec(settings: SiteSettings, run: RunConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, wire dtype) of this run's LoRA adapter on this site's model."""
    return _spec_for(
        str(settings.model_dir) if settings.model_dir else None, run.lora, run.lora.dtype
    )


def site_train(
    settings: SiteSettings,
    run: RunConfig,
    *,
    global_adapter: Mapping[str, np.ndarray] | None,
    round_id: int,
) -> tuple[dict[str, np.ndarray], dict[str, float | int | str | bool | None]]:
    """One federated training round: (adapter tensors, privacy scalars' wire form) to send.

    Nothing is marked released here: the caller does that with
    :func:`release_update` once the reply passed :func:`shared.wire.check_reply`.
    ``run`` is already floored (:func:`client.policy.floor_run`). Raises
    :class:`~shared.errors.BudgetExceededError` (nothing trained) when the round
    would take the site past its ε ceiling.
    """
    log = audit_log(settings)
    try:
        result = train_local_round(settings, run, round_id=round_id, global_adapter=global_adapter)
    except BudgetExceededError as exc:
        log.append("budget_refusal", {"round": round_id, "projected_epsilon": round(exc.projected_epsilon, 4),
                                      "ceiling": exc.ceiling})
        raise
    entry = result.ledger_entry
    # The reservation's ledger position travels with the update: the coordinator's anchor.
    privacy = dataclasses.replace(result.privacy, ledger_seq=entry.seq, ledger_head=entry.hash).to_record()
    log.append("round", {"round": round_id, "phase": "train", "epsilon": round(result.privacy.epsilon, 6),
                         "adapter_sha256": adapter_hash(result.adapter)})
    adapter = {k: v.detach().to(torch.float32).cpu().numpy() for k, v in result.adapter.items()}
    return adapter, privacy


def release_update(settings: SiteSettings, privacy: PrivacyScalars) -> None:
    """Record that the update with these (checked) privacy scalars is leaving the site.

    Called by the ClientApp only after :func:`shared.wire.check_reply` passed: the
    ``released`` ledger record (and its ``ledger_anchor`` audit entry) then means
    "passed the wire check and was handed to Flower". It names the reservation by
    the ``ledger_seq``/``ledger_head`` the update carries; epsilon is unchanged
    (the reservation already counted). LedgerError when no such reservation exists.
    """
    ledger = open_ledger(settings)
    seq, head = privacy.ledger_seq, privacy.ledger_head
    entry = next((e for e in ledger.entries() if e.kind == "reserve" and (e.seq, e.hash) == (seq, head)), None)
    if entry is None:
        raise LedgerError(f"{ledger.path}: the update names ledger record {seq!r}, which is not a "
                          "reservation of this ledger; nothing marked released")
    ledger.mark_released(entry)


def site_evaluate(
    settings: SiteSettings,
    run: RunConfig,
    *,
    global_adapter: Mapping[str, np.ndarray] | None,
    round_id: int,
) -> dict[str, float]:
    """Generate reports with the global adapter (zero-shot without one), evaluate them
    against this site's notes, keep everything at the site, return the wire summary.

    The metric release is a DP mechanism (docs/metrics.md): the run's evaluation
    budget is checked and the release is reserved in the privacy ledger before
    anything is generated; raises :class:`~shared.errors.EvaluationBudgetError` or
    :class:`~shared.errors.BudgetExceededError` (nothing evaluated, nothing
    charged) when either limit is reached. Sampling uses a site-drawn seed and a
    site-bounded temperature, never the run's seed or greedy decoding.
    """
    from client.evaluate.embeddings import Embedder
    from client.evaluate.eval_policy import charge_evaluation, evaluation_sampling
    from client.evaluate.release import GateConfig
    from client.evaluate.suite import evaluate_site, load_canaries
    from client.evaluate.write import write_evaluation
    from client.generation.generate import generate_reports
    from client.generation.reports import write_reports
    from client.privacy_report import issue_round_report
    from shared.errors import EvaluationBudgetError

    data = load_site_data(settings)
    log = audit_log(settings)
    ledger = open_ledger(settings)
    try:
        charge = charge_evaluation(settings, run, ledger=ledger, round_id=round_id,
                                   delta=site_delta(settings, data.train_patients))
    except (EvaluationBudgetError, BudgetExceededError) as exc:
        log.append("budget_refusal", {"round": round_id, "phase": "evaluate", "reason": type(exc).__name__})
        raise
    torch.manual_seed(run.lora.init_seed)
    model, tokenizer = build_site_model(settings, lora=run.lora, global_adapter=global_adapter)
    model.eval()
    g = run.generate
    # Codes are public (the run's) or every primary code at the site (train and held-out): then
    # adding a patient adds reports only for a code no other patient has (docs/metrics.md).
    codes = list(g.codes) or sorted({n.primary_code for n in (*data.train, *data.heldout)})
    reports = generate_reports(
        model, tokenizer, codes, n_per_code=g.reports_per_code,
        sampling=evaluation_sampling(settings, g),
        setting="adapter" if global_adapter is not None else "zero-shot",
        model_id=str(settings.model_dir or "embedded"),
        adapter_hash=adapter_hash(global_adapter) if global_adapter is not None else None,
        fast=True,  # static ring cache + refill; falls back to HF generate where unsupported
        batch_size=settings.generation_batch_size,  # None: sized for the model's device
    )
    write_reports(reports, settings.output_dir / "reports" / f"round-{round_id}" / "synthetic.jsonl")
    canaries = load_canaries(settings.notes_path.parent / "canaries.json")
    evaluation = evaluate_site(
        reports, data.train, data.heldout,
        embedder=Embedder(device=settings.resolved_device()),
        cache_dir=settings.output_dir / "cache",
        k_min=run.effective_k_min(settings.k_min),
        model=model, tokenizer=tokenizer,
        canaries=canaries,
        gate=GateConfig(),
        seed=g.seed,
        noise_multiplier=charge.noise_multiplier,
        public_codes=bool(g.codes),
    )
    write_evaluation(evaluation, settings.output_dir / "evaluation" / f"round-{round_id}",
                     title=f"{settings.site_id} — round {round_id}")
    ledger.mark_released(charge.entry)
    log.append("round", {"round": round_id, "phase": "evaluate", "metrics_epsilon": round(charge.epsilon, 6),
                         "noise_multiplier": charge.noise_multiplier})
    # The signed privacy report (privacy-reports/) and its report_issued audit entry.
    issue_round_report(settings, run, round_id=round_id, evaluation=evaluation,
                       ledger=ledger, audit=log,
                       texts=[r.text for r in reports], canaries=canaries,
                       metrics_epsilon=charge.epsilon)
    return evaluation.summary
