"""Write a site evaluation to disk: JSON for machines, one self-contained HTML page for people.

Everything written here stays at the site (it holds per-report values). Files:
``summary.json`` (the whitelisted aggregates — the only part that may leave),
``evaluation.json`` (every cell with the count it aggregates, suppressed cells,
per-code values, real-note reference values, gate counts, MIA, canaries),
``per-report.jsonl`` and ``evaluation.html`` (plots embedded as PNG, no network).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from client.evaluate.suite import SiteEvaluation  # noqa: E402
from shared.atomic import write_atomic  # noqa: E402


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return '<img alt="plot" src="data:image/png;base64,' + base64.b64encode(buf.getvalue()).decode() + '">'


def _per_code_plot(ev: SiteEvaluation) -> str:
    codes = list(ev.per_code)
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.bar(codes, [ev.per_code[c]["centroid_margin_mean"] for c in codes], color="#4477aa")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel("margin over best other code")
    ax.set_title("Per-code fidelity: cosine to own-code centroid minus best other")
    ax.tick_params(axis="x", rotation=45)
    return _png(fig)


def _diversity_plot(ev: SiteEvaluation) -> str:
    names = [n for n in ev.real_reference if n in ev.cells]
    fig, ax = plt.subplots(figsize=(8, 3))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [ev.cells[n].value for n in names], width=0.4, label="synthetic")
    ax.bar([i + 0.2 for i in x], [ev.real_reference[n] for n in names], width=0.4, label="real (same size)")
    ax.set_xticks(list(x), [n.removeprefix("diversity.") for n in names], rotation=30)
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("Diversity: synthetic vs real notes")
    return _png(fig)


def _distribution_plot(ev: SiteEvaluation) -> str:
    fig, axes = plt.subplots(1, 3, figsize=(10, 2.8))
    for ax, key, label in zip(
        axes,
        ("overlap_8", "rouge_l_max", "centroid_cosine"),
        ("share of 8-grams found in private notes", "max ROUGE-L to private notes", "cosine to code centroid"),
        strict=True,
    ):
        values = [r[key] for r in ev.per_report if r.get(key) is not None and math.isfinite(r[key])]
        ax.hist(values, bins=20, color="#aa3377")
        ax.set_xlabel(label, fontsize=8)
    fig.suptitle("Overlap and distance distributions (per report, site-only)")
    return _png(fig)


def render_evaluation_html(ev: SiteEvaluation, *, title: str) -> str:
    """A self-contained page: summary table, suppressed cells, plots, gate and MIA."""
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(n)}</td><td>{c.value:.4g}</td><td>{c.n}</td>"
        f"<td>{'yes' if n in ev.summary else 'no (site only)'}</td></tr>"
        for n, c in sorted(ev.cells.items())
    )
    sent = "".join(f"<tr><td>{e(n)}</td><td>{v:.4g}</td></tr>" for n, v in sorted(ev.summary.items()))
    dp = ev.dp_release
    dp_note = "" if dp is None else (
        f"<p>dp.* values carry Gaussian noise: σ = {dp.noise_multiplier:g}, sensitivity Δ = "
        f"{dp.sensitivity:.3g}, noise standard deviation {dp.noise_std:.3g} patients on each sum; "
        "charged to the privacy ledger.</p>")
    gate = ""
    if ev.gate is not None:
        removed = ", ".join(f"{e(k)}: {v}" for k, v in sorted(ev.gate.removed.items())) or "none"
        gate = (f"<h2>Release gate</h2><p>{len(ev.gate.kept)} of {ev.gate.total} reports pass; "
                f"removed by check: {removed}. Filtering with private data is defence in depth, "
                "not differential privacy.</p>")
        if ev.gate.calibrated:
            applied = ", ".join(f"{e(k)} {v:.4g}" for k, v in sorted(ev.gate.thresholds.items()))
            gate += (f"<p>Thresholds calibrated on {ev.gate.heldout_notes} notes of held-out patients "
                     f"(never trained on): a report is removed only when it is closer to the training "
                     f"notes than they are. Applied: {applied}.</p>")
    mia = ""
    if ev.mia is not None:
        mia = (f"<h2>Membership inference (loss threshold)</h2><p>AUC {ev.mia['auc']:.3f} "
               f"(0.5 = chance); TPR at 1% FPR {ev.mia['tpr_at_1fpr']:.3f}</p>")
        if "auc_calibrated" in ev.mia:
            mia += (f"<p>Calibrated against the base model (loss minus base-model loss): AUC "
                    f"{ev.mia['auc_calibrated']:.3f}; TPR at 1% FPR {ev.mia['tpr_at_1fpr_calibrated']:.3f}</p>")
    canaries = ""
    if ev.canaries:
        items = "".join(
            f"<li>repeated {c['repetitions']}×: exposure {c['exposure']:.2f} of {c['exposure_possible']:.2f} bits</li>"
            for c in ev.canaries
        )
        canaries = f"<h2>Canaries</h2><ul>{items}</ul>"
    return f"""<!doctype html><html><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<title>{e(title)}</title><style>body{{font-family:sans-serif;max-width:1000px;margin:auto}}
td,th{{padding:2px 8px;border-bottom:1px solid #ddd}}</style></head><body>
<h1>Site evaluation: {e(title)}</h1>
<p>This page stays at the site: it is computed from private notes. What is sent to the
coordinator is the table below it: DP-noised per-patient statistics (dp.*) and, when the run
named the codes, metrics of the synthetic reports alone.</p>
<h2>Sent to the coordinator</h2><table><tr><th>metric</th><th>value</th></tr>{sent}</table>{dp_note}
<h2>Metrics (site only)</h2><table><tr><th>metric</th><th>value</th><th>n</th><th>sent</th></tr>{rows}</table>
{_per_code_plot(ev)}{_diversity_plot(ev)}{_distribution_plot(ev)}{gate}{mia}{canaries}
</body></html>"""


def write_evaluation(ev: SiteEvaluation, out_dir: Path, *, title: str) -> dict[str, Path]:
    """Write the four files into ``out_dir`` (atomically each) and return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "summary": out_dir / "summary.json",
        "evaluation": out_dir / "evaluation.json",
        "per_report": out_dir / "per-report.jsonl",
        "html": out_dir / "evaluation.html",
    }
    write_atomic(paths["summary"], json.dumps(ev.summary, indent=2, sort_keys=True))
    detail = {
        "cells": {n: {"value": c.value, "n": c.n} for n, c in sorted(ev.cells.items())},
        "suppressed": ev.suppressed,
        "real_reference": ev.real_reference,
        "per_code": ev.per_code,
        "release_gate": None if ev.gate is None else {
            "checked": ev.gate.total, "kept": len(ev.gate.kept), "removed": ev.gate.removed,
            "calibrated": ev.gate.calibrated, "heldout_notes": ev.gate.heldout_notes,
            "thresholds": ev.gate.thresholds},
        "membership": ev.mia,
        "canaries": ev.canaries,
        "dp_release": None if ev.dp_release is None else {
            "noise_multiplier": ev.dp_release.noise_multiplier,
            "sensitivity": ev.dp_release.sensitivity,
            "noise_std": ev.dp_release.noise_std,
            "stats": ["patients", *ev.dp_release.stats],
            "noisy": {g: [float(x) for x in v] for g, v in ev.dp_release.noisy.items()},
            "exact": {g: [float(x) for x in t.sums()] for g, t in ev.patient_tables.items()},
        },
    }
    write_atomic(paths["evaluation"], json.dumps(_finite(detail), indent=2, sort_keys=True))
    write_atomic(paths["per_report"], "".join(json.dumps(_finite(r)) + "\n" for r in ev.per_report))
    write_atomic(paths["html"], render_evaluation_html(ev, title=title))
    return paths
