"""What one site does in a round, as plain functions over its own settings.

The ClientApp (``client/app.py``) and the site CLI (``client/cli.py``) both call
these, so a round can be run by hand at a site exactly as the federation runs
it. Everything here reads the site's own :class:`~shared.settings.SiteSettings`
(paths, ε ceiling, δ, k_min): a coordinator's run config can choose knobs such
as the number of steps, but never the data, the ceiling or the ledger.

Site output layout (all of it stays at the site)::

    <output_dir>/privacy-ledger.jsonl        the ε ledger (unless ledger_path is set)
    <output_dir>/adapters/round-<n>.safetensors   the adapter this site trained in round n
    <output_dir>/reports/round-<n>/synthetic.jsonl  generated reports (never sent)
    <output_dir>/evaluation/round-<n>/         per-report results, summary, HTML
    <output_dir>/privacy-reports/report-round-<n>.{json,json.sig,html}  signed privacy report
    <output_dir>/audit.jsonl                   hash-chained audit log (signed with signing_key)
    <output_dir>/cache/                        private-note embedding cache
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from client.ledger import Ledger
from client.model import (
    adapter_hash,
    adapter_state,
    add_lora,
    causal_lm_from_config,
    load_adapter_state,
    load_model,
)
from client.notes import Note, NotesLoad, group_by_patient, load_notes, split_by_patient
from client.train import DPConfig, TrainResult, train_dp
from shared.audit import AuditLog
from shared.errors import BudgetExceededError, PrivacyError
from shared.run_config import RunConfig
from shared.settings import SiteSettings
from shared.signing import load_private_key


@dataclass(frozen=True, kw_only=True)
class LoraParams:
    """LoRA shape knobs (a run-config choice; the same for every site in a run)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    targets: tuple[str, ...] | None = None  # None: the family default


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
    """δ for this site: the setting, or 1/(10·n) when unset; δ > 1/n is refused.

    Privacy meaning: δ bounds the probability that the ε guarantee fails for a
    patient; with δ ≥ 1/n a mechanism could publish one patient's data outright.
    """
    if n_patients < 1:
        raise PrivacyError("no training patients at this site")
    delta = settings.delta if settings.delta is not None else 1.0 / (10 * n_patients)
    if delta > 1.0 / n_patients:
        raise PrivacyError(
            f"delta {delta:g} is larger than 1/n_patients = 1/{n_patients} = {1.0 / n_patients:g}; "
            "lower FEDSYNTH_SITE_DELTA or add patients"
        )
    return delta


def open_ledger(settings: SiteSettings) -> Ledger:
    """The site's privacy ledger (created on first use)."""
    path = settings.ledger_path or settings.output_dir / "privacy-ledger.jsonl"
    return Ledger(path, site_id=settings.site_id)


def build_site_model(
    settings: SiteSettings,
    *,
    lora: LoraParams,
    global_adapter: Mapping[str, np.ndarray | torch.Tensor] | None = None,
):
    """Base model on the site's device, LoRA on top, then the global adapter (if any).

    The model is built on its target device before PEFT and Opacus wrap it.
    """
    model, tokenizer = load_model(settings.model_dir, device=settings.resolved_device())
    peft_model = add_lora(
        model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, targets=lora.targets
    )
    if global_adapter is not None:
        load_adapter_state(peft_model, global_adapter)
    return peft_model, tokenizer


def adapter_path(settings: SiteSettings, round_id: int | str) -> Path:
    return settings.output_dir / "adapters" / f"round-{round_id}.safetensors"


def train_local_round(
    settings: SiteSettings,
    *,
    dp: DPConfig,
    lora: LoraParams,
    round_id: int | str,
    global_adapter: Mapping[str, np.ndarray | torch.Tensor] | None = None,
    data: SiteData | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> TrainResult:
    """One DP-LoRA round on this site's training patients.

    The ledger reservation happens inside :func:`client.train.train_dp` before the
    first step; the trained adapter is saved under ``adapters/`` at the site.
    """
    data = data or load_site_data(settings)
    delta = site_delta(settings, data.train_patients)
    model, tokenizer = build_site_model(settings, lora=lora, global_adapter=global_adapter)
    result = train_dp(
        model,
        tokenizer,
        data.train,
        config=dp,
        ledger=open_ledger(settings),
        round_id=str(round_id),
        delta=delta,
        epsilon_ceiling=settings.epsilon_ceiling,
        progress=progress,
    )
    path = adapter_path(settings, round_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in result.adapter.items()}, str(tmp))
    tmp.replace(path)
    return result


def adapter_numpy(model) -> dict[str, np.ndarray]:
    """The model's LoRA tensors as float32 numpy arrays (the wire's form)."""
    return {k: v.detach().to(torch.float32).cpu().numpy() for k, v in adapter_state(model).items()}


# --- one federated round, as the ClientApp calls it -------------------------------------


def lora_params(run: RunConfig) -> LoraParams:
    """The run's LoRA shape (validated by RunConfig; targets () = family default)."""
    return LoraParams(
        r=run.lora.r,
        alpha=run.lora.alpha,
        dropout=run.lora.dropout,
        targets=tuple(run.lora.targets) or None,
    )


def dp_config(run: RunConfig) -> DPConfig:
    """The run's DP-SGD knobs. Exactly one of noise multiplier / ε per round is set (> 0).

    Always private: a run config (the coordinator's choice) can never switch DP
    off. The non-private baseline (``DPConfig(private=False)``) exists only for
    the privacy-utility study, which builds it itself and never sends it.
    """
    t = run.train
    return DPConfig(
        private=True,
        noise_multiplier=t.noise_multiplier if t.noise_multiplier > 0 else None,
        target_epsilon=t.epsilon_per_round if t.epsilon_per_round > 0 else None,
        max_grad_norm=t.max_grad_norm,
        expected_batch_size=t.expected_batch_size,
        max_physical_batch_size=t.max_physical_batch_size,
        steps=t.steps,
        learning_rate=t.learning_rate,
        max_length=t.max_length,
        accountant=t.accountant,
        secure_mode=t.secure_mode,
        clipping=t.clipping,
    )


def audit_log(settings: SiteSettings) -> AuditLog:
    """The site's hash-chained audit log, signed when a signing key is configured."""
    key = load_private_key(settings.signing_key) if settings.signing_key else None
    return AuditLog(settings.output_dir / "audit.jsonl", key=key, actor=settings.site_id)


@functools.lru_cache(maxsize=8)
def _spec_for(model_dir: str | None, lora: LoraParams, dtype: str) -> dict[str, tuple[tuple[int, ...], str]]:
    from transformers import AutoConfig

    from client.pretrain import ensure_embedded_model

    path = Path(model_dir) if model_dir else ensure_embedded_model()
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with torch.device("meta"):  # shapes only: no weights are read or allocated
        model = add_lora(
            causal_lm_from_config(config),
            r=lora.r, alpha=lora.alpha, dropout=lora.dropout, targets=lora.targets,
        )
    return {name: (tuple(t.shape), dtype) for name, t in _lora_named(model).items()}


def _lora_named(model) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return dict(sorted(get_peft_model_state_dict(model).items()))


def adapter_spec(settings: SiteSettings, run: RunConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, wire dtype) of this run's LoRA adapter on this site's model."""
    return _spec_for(
        str(settings.model_dir) if settings.model_dir else None, lora_params(run), run.lora.dtype
    )


def site_train(
    settings: SiteSettings,
    run: RunConfig,
    *,
    global_adapter: Mapping[str, np.ndarray] | None,
    round_id: int,
) -> tuple[dict[str, np.ndarray], dict[str, float | int | str | bool]]:
    """One federated training round: (adapter tensors, privacy scalars) to send.

    Round 1 (no global adapter) initialises LoRA from the run's ``lora.init-seed``
    so every site starts from the same A matrices. Raises
    :class:`~shared.errors.BudgetExceededError` (nothing trained) when the round
    would take the site past its ε ceiling.
    """
    log = audit_log(settings)
    torch.manual_seed(run.lora.init_seed)
    try:
        result = train_local_round(
            settings, dp=dp_config(run), lora=lora_params(run), round_id=round_id,
            global_adapter=global_adapter,
        )
    except BudgetExceededError as exc:
        log.append("budget_refusal", {"round": round_id, "projected_epsilon": round(exc.projected_epsilon, 4),
                                      "ceiling": exc.ceiling})
        raise
    privacy = result.privacy.as_dict()
    open_ledger(settings).mark_released(result.ledger_entry)
    log.append("round", {"round": round_id, "phase": "train", "epsilon": round(result.privacy.epsilon, 6),
                         "adapter_sha256": adapter_hash(result.adapter)})
    adapter = {k: v.detach().to(torch.float32).cpu().numpy() for k, v in result.adapter.items()}
    return adapter, privacy


def site_codes(data: SiteData, run: RunConfig) -> list[str]:
    """Codes to generate for: the run's list, else every primary code in the site's training notes."""
    return list(run.generate.codes) or sorted({n.primary_code for n in data.train})


def site_evaluate(
    settings: SiteSettings,
    run: RunConfig,
    *,
    global_adapter: Mapping[str, np.ndarray] | None,
    round_id: int,
) -> dict[str, float]:
    """Generate reports with the global adapter (zero-shot without one), evaluate them
    against this site's notes, keep everything at the site, return the summary."""
    from client.evaluate.embeddings import Embedder
    from client.evaluate.suite import evaluate_site, load_canaries
    from client.evaluate.write import write_evaluation
    from client.generate import SamplingConfig, generate_reports, write_reports
    from client.privacy_report import issue_round_report
    from client.release import GateConfig

    data = load_site_data(settings)
    torch.manual_seed(run.lora.init_seed)
    model, tokenizer = build_site_model(settings, lora=lora_params(run), global_adapter=global_adapter)
    model.eval()
    g = run.generate
    sampling = SamplingConfig(
        temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
        max_new_tokens=g.max_new_tokens, seed=g.seed + int(round_id),
    )
    reports = generate_reports(
        model, tokenizer, site_codes(data, run), n_per_code=g.reports_per_code, sampling=sampling,
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
    )
    write_evaluation(evaluation, settings.output_dir / "evaluation" / f"round-{round_id}",
                     title=f"{settings.site_id} — round {round_id}")
    # The signed privacy report (privacy-reports/) and its report_issued audit entry.
    issue_round_report(settings, run, round_id=round_id, evaluation=evaluation,
                       ledger=open_ledger(settings), audit=audit_log(settings),
                       texts=[r.text for r in reports], canaries=canaries)
    return evaluation.summary
