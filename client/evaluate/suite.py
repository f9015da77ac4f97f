"""Evaluate one batch of synthetic reports against the site's private notes.

This is the one place the metric modules are put together. Everything computed
here stays at the site (``cells``, per-code and per-report values, the HTML
report) except ``summary``, the wire summary, which holds only:

- metrics over private notes as one Gaussian mechanism on bounded per-patient
  contributions (:mod:`client.evaluate.dp_metrics`; names ``dp.*``), which the
  caller has charged to the privacy ledger first;
- when the reports' codes are public (the run config named them), metrics of
  the synthetic reports alone (``count.reports``, ``diversity.*`` without any
  real-note reference): post-processing of the DP adapter and public inputs.

No max/min over notes and no un-noised value computed from a private note
goes into ``summary`` (see docs/metrics.md).

Which notes play which role:

- private corpus for lexical memorization and PHI echo: train + held-out notes
  (both are private);
- real reference for fidelity and diversity: training notes; TSTR/TRTR test set:
  held-out notes;
- distance to closest record: every report against every training note, read against
  held-out notes' own distance to the training notes (ideal train-closer share ≈ 0.5);
- memorization contrast and release gate: reports vs training notes, read against held-out
  patients' notes vs training notes (:mod:`client.evaluate.heldout`);
- membership inference (when a model is given): the model's loss on training
  patients' notes vs held-out patients' notes.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from client.evaluate import diversity, dp_metrics, fidelity, membership
from client.evaluate.base_losses import base_note_losses
from client.evaluate.dcr import dcr_contrast
from client.evaluate.embeddings import Embedder, embed_cached
from client.evaluate.heldout import contrast_cells, heldout_reference
from client.evaluate.masking import mask_all
from client.evaluate.ngram_index import PrivateIndex
from client.evaluate.privacy import (
    canary_exposure,
    lexical_privacy,
    phi_echo,
    privacy_cells,
)
from client.evaluate.release import GateConfig, GateResult, release_gate
from client.evaluate.summary import Cell, build_summary, suppressed_names
from client.evaluate.tokens import word_tokens
from client.generation.reports import SyntheticReport
from client.notes import Note
from shared.dp_defaults import DEFAULT_EVAL_NOISE_MULTIPLIER
from shared.errors import InputError, Problem

# Alternatives scored per canary: exposure is resolved up to log2(CANARY_ALTERNATIVES + 1) bits.
CANARY_ALTERNATIVES = 255
# Never-planted reference canaries scored as the "unseen" baseline (each costs as much as a planted one).
REFERENCE_CANARIES_SCORED = 10
# Noise multiplier of the metric release when a caller gives none (the site setting's default).
# Wire cells over synthetic reports only (no real-note reference): they leave un-noised when the
# reports' codes are public.
SYNTHETIC_ONLY_NAMES = frozenset({
    "count.reports", "diversity.distinct_1", "diversity.distinct_2", "diversity.distinct_3",
    "diversity.self_bleu_4", "diversity.mtld", "diversity.vendi",
    "diversity.exact_duplicate_rate", "diversity.near_duplicate_rate",
})


@dataclass
class SiteEvaluation:
    """Everything one evaluation produced. Only ``summary`` may leave the site.

    ``dp_release``: the noisy vectors behind the ``dp.*`` names (site-only copy of
    what was released); ``patient_tables``: the exact per-patient rows (site-only).
    """

    summary: dict[str, float]
    suppressed: list[str]
    cells: dict[str, Cell]
    real_reference: dict[str, float]  # the same diversity metrics on real notes (site-only)
    per_code: dict[str, dict[str, float]]  # site-only
    per_report: list[dict[str, Any]]  # site-only
    gate: GateResult | None = None
    mia: dict[str, float] | None = None
    canaries: list[dict[str, Any]] = field(default_factory=list)
    dp_release: dp_metrics.DPRelease | None = None
    patient_tables: dict[str, dp_metrics.PatientTable] = field(default_factory=dict)


def _codes_texts(notes: Sequence[Note]) -> tuple[list[str], list[str]]:
    return [n.primary_code for n in notes], [n.text for n in notes]


def _diversity_cells(texts: Sequence[str], emb: np.ndarray, *, budget: int | None, seed: int) -> dict[str, Cell]:
    """Diversity of one corpus; distinct-n only with a token budget, Self-BLEU only for ≥ 2 texts."""
    cells: dict[str, Cell] = {}
    if budget is not None:
        cells.update(diversity.distinct_n(texts, token_budget=budget, seed=seed).cells())
    if len(texts) >= 2:
        cells.update(diversity.self_bleu(texts, subset_size=diversity.SELF_BLEU_SUBSET, seed=seed).cells())
    cells.update(diversity.mtld(texts).cells())
    cells["diversity.vendi"] = Cell(float(diversity.vendi_score(emb)), len(texts))
    cells.update(diversity.duplicate_rates(texts).cells())
    return cells


def load_canaries(path: Path) -> list[dict[str, Any]]:
    """Canaries of ``canaries.json`` (demo data or an audit run); [] when absent.

    The planted canaries first, then up to :data:`REFERENCE_CANARIES_SCORED` of the file's
    never-planted ``references`` (same generator, never in any note), marked
    ``"reference": True`` with ``repetitions`` 0: their exposure is what "not
    memorized" looks like for this model, the baseline planted canaries are read against.
    """
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        planted = [{**c, "reference": False} for c in data["canaries"]]
        refs = [{**c, "repetitions": 0, "reference": True}
                for c in list(data.get("references", []))[:REFERENCE_CANARIES_SCORED]]
        return planted + refs
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError("cannot read canaries", [Problem(str(path), f"not a canaries file: {exc}")]) from None


def _canary_exposures(model: Any, tokenizer: Any, canaries: Sequence[dict[str, Any]], *, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for c in canaries:
        secret, prefix, suffix = c["secret"], c["prefix"], c.get("suffix", "")
        width = len(secret.split())
        alts: set[str] = set()
        while len(alts) < CANARY_ALTERNATIVES:
            cand = " ".join(str(rng.randrange(10)) for _ in range(width))
            if cand != secret:
                alts.add(cand)
        candidates = [secret, *sorted(alts)]
        lp = membership.sequence_logprob(model, tokenizer, prefix, [s + suffix for s in candidates])
        out.append({"repetitions": int(c.get("repetitions", 0)), "exposure": canary_exposure(lp, 0),
                    "exposure_possible": float(np.log2(len(candidates))),
                    "reference": bool(c.get("reference", False))})
    return out


def evaluate_site(
    reports: Sequence[SyntheticReport],
    train: Sequence[Note],
    heldout: Sequence[Note],
    *,
    embedder: Embedder,
    cache_dir: Path,
    k_min: int,
    model: Any = None,
    tokenizer: Any = None,
    canaries: Sequence[dict[str, Any]] = (),
    gate: GateConfig | None = None,
    seed: int = 0,
    noise_multiplier: float = DEFAULT_EVAL_NOISE_MULTIPLIER,
    public_codes: bool = False,
) -> SiteEvaluation:
    """Every metric of docs/metrics.md for ``reports``; see the module docstring for roles.

    ``noise_multiplier``: σ of the Gaussian release of the ``dp.*`` metrics (the
    caller charges it to the ledger before calling). ``public_codes``: the
    reports' codes came from the run config, not from the site's notes, so the
    synthetic-only metrics may leave un-noised. ``k_min`` applies to patients
    (noisy counts) for ``dp.*`` cells and to reports for synthetic-only cells.
    """
    problems = []
    if not reports:
        problems.append(Problem("reports", "no synthetic reports to evaluate"))
    if not train or not heldout:
        problems.append(Problem("notes", "need both training and held-out notes"))
    # A report without words (a generation that came back empty) is never evaluated or
    # released: it is set aside, counted, and reported as removed by the gate ("empty").
    all_reports = list(reports)
    all_tokens = [len(word_tokens(r.text)) for r in all_reports]
    if reports and not any(all_tokens):
        problems.append(Problem("reports", f"all {len(all_reports)} reports are empty (no words)"))
    if problems:
        raise InputError("cannot evaluate", problems)
    evaluated = [i for i, k in enumerate(all_tokens) if k > 0]
    reports = [all_reports[i] for i in evaluated]
    report_tokens = [all_tokens[i] for i in evaluated]

    synth_texts = [r.text for r in reports]
    synth_codes = [r.code for r in reports]
    train_codes, train_texts = _codes_texts(train)
    held_codes, held_texts = _codes_texts(heldout)
    private = train_texts + held_texts
    identifiers = sorted({i for n in (*train, *heldout) for i in n.identifiers})

    synth_emb = embedder.embed(synth_texts)
    train_emb = embed_cached(embedder, train_texts, cache_dir=cache_dir, name="train-notes")
    held_emb = embed_cached(embedder, held_texts, cache_dir=cache_dir, name="heldout-notes")
    # Fidelity reads texts with every code, title and synonym masked (client/evaluate/masking.py):
    # the prompt names the code and its title, so unmasked a report that copies them "fits" its
    # code without any clinical content. The cache keys on the masked texts (own names).
    synth_fid = embedder.embed(mask_all(synth_texts))
    train_fid = embed_cached(embedder, mask_all(train_texts), cache_dir=cache_dir, name="train-notes-masked")
    held_fid = embed_cached(embedder, mask_all(held_texts), cache_dir=cache_dir, name="heldout-notes-masked")

    cells: dict[str, Cell] = {}
    n_rep = len(reports)
    cells["count.reports"] = Cell(float(n_rep), n_rep)
    cells["count.notes"] = Cell(float(len(private)), len(private))
    n_empty = len(all_reports) - n_rep
    if n_empty:
        cells["count.empty_reports"] = Cell(float(n_empty), len(all_reports))

    # Fidelity
    centroid = fidelity.centroid_similarity(train_fid, train_codes, synth_fid, synth_codes)
    cells.update(centroid.cells())
    cells.update(fidelity.real_classifier_f1(train_fid, train_codes, synth_fid, synth_codes, seed=seed).cells())
    cells.update(
        fidelity.tstr_trtr(train_fid, train_codes, held_fid, held_codes, synth_fid, synth_codes, seed=seed).cells()
    )
    cells.update(fidelity.frechet_per_code(train_fid, train_codes, synth_fid, synth_codes).cells())
    cells.update(fidelity.length_distribution(train_texts, synth_texts).cells())

    # Diversity, on token-count-matched samples of synthetic and real: as many real notes as
    # reports, sampled; the budget is computed over those same notes (never exceeds either side).
    ref = diversity.matched_reference(
        report_tokens, [len(word_tokens(t)) for t in train_texts], seed=seed
    )
    cells.update(_diversity_cells(synth_texts, synth_emb, budget=ref.token_budget, seed=seed))
    real_div = {
        k: c.value
        for k, c in _diversity_cells(
            [train_texts[i] for i in ref.indices], train_emb[ref.indices], budget=ref.token_budget, seed=seed
        ).items()
    }
    cells.update(diversity.mode_collapse_ratio(train_emb, train_codes, synth_emb, synth_codes).cells())

    # Privacy / memorization
    # groups = patient ids: a copied span found in one patient's notes only is memorization of a person
    index = PrivateIndex(private, groups=[n.patient_id for n in (*train, *heldout)])
    lex = lexical_privacy(synth_texts, private, index=index)
    cells.update(lex.cells())
    echoes = phi_echo(synth_texts, identifiers)
    cells.update(privacy_cells(echoes=echoes))
    dcr = dcr_contrast(synth_emb, train_emb, held_emb, synthetic_texts=synth_texts, train_texts=train_texts)
    cells.update(dcr.cells())
    # The held-out baseline: every memorization metric of the reports against the training
    # notes, next to the same metric of held-out patients' notes (never trained on).
    baseline = heldout_reference(
        train_texts, [n.patient_id for n in train], held_texts, train_emb=train_emb, heldout_emb=held_emb,
        seed=seed,
    )
    lex_train = lexical_privacy(synth_texts, [], index=baseline.train_index)
    cells.update(contrast_cells(lex_train, baseline))

    mia = None
    canary_results: list[dict[str, Any]] = []
    loss_gain: dict[str, np.ndarray] = {}  # group -> per-note base loss minus adapter loss
    if model is not None and tokenizer is not None:
        member_notes = list(zip(train_codes, train_texts, strict=True))
        nonmember_notes = list(zip(held_codes, held_texts, strict=True))
        member = membership.per_note_losses(model, tokenizer, member_notes)
        nonmember = membership.per_note_losses(model, tokenizer, nonmember_notes)
        mia_result = membership.membership_inference(member, nonmember)
        cells.update(mia_result.cells())
        mia = {"auc": float(mia_result.auc), "tpr_at_1fpr": float(mia_result.tpr_at_fpr)}
        if hasattr(model, "disable_adapter"):  # a PEFT model: its base model is the reference
            # The base model and the notes rarely change between rounds: cached at the site.
            base_member = base_note_losses(model, tokenizer, member_notes, cache_dir=cache_dir,
                                           name="mia-base-train")
            base_nonmember = base_note_losses(model, tokenizer, nonmember_notes, cache_dir=cache_dir,
                                              name="mia-base-heldout")
            calibrated = membership.membership_inference(
                membership.calibrated_scores(member, base_member),
                membership.calibrated_scores(nonmember, base_nonmember),
                calibrated=True,
            )
            cells.update(calibrated.cells())
            loss_gain = {"train": base_member - member, "heldout": base_nonmember - nonmember}
            mia |= {"auc_calibrated": float(calibrated.auc), "tpr_at_1fpr_calibrated": float(calibrated.tpr_at_fpr)}
        if canaries:
            canary_results = _canary_exposures(model, tokenizer, canaries, seed=seed)
            planted = [c["exposure"] for c in canary_results if not c["reference"]]
            if planted:  # reference (never-planted) canaries are the baseline, not a leak
                cells.update(privacy_cells(exposures=planted))

    # The wire: DP-noised per-patient statistics, plus synthetic-only cells when codes are public.
    tables = {
        group: dp_metrics.patient_table(
            group, notes, report_codes=synth_codes, report_texts=synth_texts, note_emb=emb,
            report_emb=synth_fid, loss_gain=loss_gain.get(group),
        )  # the centroid statistic is fidelity: masked embeddings (verbatim/PHI read raw texts)
        for group, notes, emb in (("train", train, train_fid), ("heldout", heldout, held_fid))
    }
    release = dp_metrics.gaussian_release(tables, noise_multiplier=noise_multiplier)
    wire_cells = release.cells()
    if public_codes:
        own = _diversity_cells(synth_texts, synth_emb, budget=sum(report_tokens), seed=seed)
        own["count.reports"] = cells["count.reports"]
        wire_cells.update({k: c for k, c in own.items() if k in SYNTHETIC_ONLY_NAMES})

    gate_result = None
    if gate is not None:
        gate_result = release_gate(synth_texts, private, identifiers, config=gate, index=index,
                                   heldout=baseline, synthetic_emb=synth_emb)
        if n_empty:  # indices back to the caller's order; empty reports count as removed
            gate_result = dataclasses.replace(
                gate_result, kept=[evaluated[i] for i in gate_result.kept],
                removed={**gate_result.removed, "empty": n_empty}, total=len(all_reports),
            )
        cells.update(gate_result.cells())

    # Centroid arrays cover only reports whose code has real notes (scored_index).
    cos = np.full(n_rep, np.nan)
    margin = np.full(n_rep, np.nan)
    own = np.full(n_rep, np.nan)
    cos[centroid.scored_index] = centroid.cosine
    margin[centroid.scored_index] = centroid.margin
    own[centroid.scored_index] = centroid.own_nearest
    per_code: dict[str, dict[str, float]] = {}
    for code in sorted(set(synth_codes)):
        idx = [i for i, c in enumerate(synth_codes) if c == code]
        per_code[code] = {
            "reports": float(len(idx)),
            "centroid_cosine_mean": float(np.nanmean(cos[idx])) if np.isfinite(cos[idx]).any() else float("nan"),
            "centroid_margin_mean": float(np.nanmean(margin[idx])) if np.isfinite(margin[idx]).any() else float("nan"),
            "own_code_nearest_share": float(np.nanmean(own[idx])) if np.isfinite(own[idx]).any() else float("nan"),
            "verbatim_rate_13": float(np.mean(lex.verbatim_13[idx])),
            "verbatim_unique_rate_13": float(np.mean(lex.verbatim_unique_13[idx])),
            "rouge_l_max": float(np.max(lex.rouge_l_max[idx])),
        }
    kept = {evaluated[i] for i in range(n_rep)} if gate_result is None else set(gate_result.kept)
    per_report = [
        {
            "report_id": r.report_id,
            "code": r.code,
            "centroid_cosine": float(cos[i]),
            "centroid_margin": float(margin[i]),
            "overlap_8": float(lex.overlap_8[i]),
            "overlap_13": float(lex.overlap_13[i]),
            "verbatim_13": bool(lex.verbatim_13[i]),
            "verbatim_unique_13": bool(lex.verbatim_unique_13[i]),
            "lcs_tokens": int(lex.lcs_tokens[i]),
            "rouge_l_max": float(lex.rouge_l_max[i]),
            "phi_echo": len(echoes[i]),
            "dcr_train": float(dcr.d_train[i]),
            "lcs_tokens_train": int(lex_train.lcs_tokens[i]),
            "rouge_l_max_train": float(lex_train.rouge_l_max[i]),
            "released": evaluated[i] in kept,
        }
        for i, r in enumerate(reports)
    ]
    if n_empty:  # rows in the caller's order, the empty reports marked as such
        rows = dict(zip(evaluated, per_report, strict=True))
        per_report = [rows.get(i) or {"report_id": r.report_id, "code": r.code, "empty": True, "released": False}
                      for i, r in enumerate(all_reports)]
    return SiteEvaluation(
        summary=build_summary(wire_cells, k_min=k_min),
        suppressed=suppressed_names(wire_cells, k_min=k_min),
        cells=cells,
        real_reference=real_div,
        per_code=per_code,
        per_report=per_report,
        gate=gate_result,
        mia=mia,
        canaries=canary_results,
        dp_release=release,
        patient_tables=tables,
    )
