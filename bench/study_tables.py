"""The study's tables: reading each site's evaluation, one row per setting, markdown and figures.

Pure file reading and formatting (no site or coordinator code): ``collect``
reads the last evaluated round of every site of an arm, ``write_outputs``
renders ``study.md`` (the ε table, one table per column group, and canary
exposure minus the zero-shot model's) and the PNG figures. ``load_results``
reads a finished ``study.json`` back, so a study can be re-rendered.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.errors import FedsynthError

CANARY_REPETITIONS = (1, 5, 10)  # canaries per site, each shared by this many training patients

# (column, metric cell name) read from each site's last-round evaluation.json.
METRICS: tuple[tuple[str, str], ...] = (
    ("centroid_margin", "fidelity.centroid_margin_mean"),
    ("real_classifier_f1", "fidelity.real_classifier_macro_f1"),
    ("tstr_trtr_ratio", "fidelity.tstr_trtr_ratio"),
    ("distinct_2", "diversity.distinct_2"),
    ("self_bleu_4", "diversity.self_bleu_4"),
    ("vendi", "diversity.vendi"),
    ("mode_collapse_ratio", "diversity.mode_collapse_ratio"),
    ("verbatim_rate_13", "privacy.verbatim_rate_13"),
    ("verbatim_unique_13", "privacy.verbatim_unique_rate_13"),
    ("rouge_l_p95", "privacy.rouge_l_p95"),
    ("dcr_train_closer_share", "privacy.dcr_train_closer_share"),
    ("phi_echo_rate", "privacy.phi_echo_rate"),
    ("mia_auc", "privacy.mia_auc"),
    ("mia_tpr_at_1fpr", "privacy.mia_tpr_at_1fpr"),
    ("mia_auc_calibrated", "privacy.mia_auc_calibrated"),
)
# Canary exposure columns: planted r times (r in CANARY_REPETITIONS) and never planted (0).
EXPOSURE_COLUMNS = tuple(f"exposure_rep{r}" for r in (*CANARY_REPETITIONS, 0))
COLUMNS = tuple(c for c, _ in METRICS) + EXPOSURE_COLUMNS
DISPLAY_ORDER = ("zero-shot", "eps-1", "eps-4", "eps-8", "no-dp", "no-dp-long")  # most to least private


# ---- collecting --------------------------------------------------------------


@dataclass
class SettingResult:
    """One row: per-site values of every column, and their mean/min/max over sites."""

    setting: str
    label: str
    private: bool
    epsilon_target: float | None  # whole-run ε asked for (None: zero-shot / no DP)
    epsilon_per_round: float | None
    epsilon_achieved: dict[str, float] = field(default_factory=dict)  # per site, from the replies
    per_site: dict[str, dict[str, float]] = field(default_factory=dict)
    mean: dict[str, float] = field(default_factory=dict)
    min: dict[str, float] = field(default_factory=dict)
    max: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0


def site_row(evaluation: dict[str, Any]) -> dict[str, float]:
    """The study's columns from one site's ``evaluation.json`` (NaN where a metric is absent)."""
    cells = evaluation.get("cells", {})
    row = {}
    for column, name in METRICS:
        value = (cells.get(name) or {}).get("value")
        row[column] = float(value) if isinstance(value, int | float) else math.nan
    canaries = evaluation.get("canaries") or []
    for r, column in zip((*CANARY_REPETITIONS, 0), EXPOSURE_COLUMNS, strict=True):
        values = [float(c["exposure"]) for c in canaries
                  if int(c.get("repetitions", -1)) == r and bool(c.get("reference", False)) == (r == 0)]
        row[column] = sum(values) / len(values) if values else math.nan
    return row


def collect(result: SettingResult, sites_dir: Path) -> SettingResult:
    """Fill ``result`` from the last evaluated round of every site under ``sites_dir``."""
    problems = []
    for site_dir in sorted(d for d in sites_dir.iterdir() if (d / "notes.jsonl").is_file()):
        rounds = sorted((site_dir / "output" / "evaluation").glob("round-*/evaluation.json"),
                        key=lambda p: int(p.parent.name.removeprefix("round-")))
        if not rounds:
            problems.append(site_dir.name)
            continue
        result.per_site[site_dir.name] = site_row(json.loads(rounds[-1].read_text()))
    if problems or not result.per_site:
        raise FedsynthError(f"{result.setting}: no evaluation from {', '.join(problems) or 'any site'}")
    for column in COLUMNS:
        values = [row[column] for row in result.per_site.values() if math.isfinite(row[column])]
        result.mean[column] = sum(values) / len(values) if values else math.nan
        result.min[column] = min(values) if values else math.nan
        result.max[column] = max(values) if values else math.nan
    return result


def _achieved_epsilon(summary: dict[str, Any]) -> dict[str, float]:
    last = (summary.get("rounds") or [{}])[-1]
    return {str(k): float(v["epsilon"]) for k, v in (last.get("privacy") or {}).items()}


# ---- reporting ---------------------------------------------------------------


def _fmt(result: SettingResult, column: str) -> str:
    nan = math.nan
    m, lo, hi = result.mean.get(column, nan), result.min.get(column, nan), result.max.get(column, nan)
    if not math.isfinite(m):  # absent (an older study) or not computed
        return "—"
    return f"{m:.3f} [{lo:.3f}, {hi:.3f}]"


# The table's column groups, in order; together exactly COLUMNS.
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Fidelity (higher is better)", ("centroid_margin", "real_classifier_f1", "tstr_trtr_ratio")),
    ("Diversity", ("distinct_2", "self_bleu_4", "vendi", "mode_collapse_ratio")),
    ("Privacy / memorization", ("verbatim_rate_13", "verbatim_unique_13", "rouge_l_p95", "dcr_train_closer_share",
                                "phi_echo_rate", "mia_auc", "mia_tpr_at_1fpr", "mia_auc_calibrated")),
    ("Canary exposure (bits; 8 = ranked first of 256; rep0 = never planted)", EXPOSURE_COLUMNS),
)


def table_markdown(results: list[SettingResult]) -> str:
    """The study tables: ε per setting, then one table per column group (mean over sites [min, max])."""
    lines = ["| setting | ε achieved (max over sites) |", "|---|---|"]
    for r in results:
        eps = (f"{max(r.epsilon_achieved.values()):.3f} (per round {r.epsilon_per_round:.3f})"
               if r.epsilon_achieved else ("∞ (no DP)" if not r.private else "— (no training)"))
        lines.append(f"| {r.label} | {eps} |")
    for title, columns in GROUPS:
        lines += ["", f"**{title}**", "", "| setting | " + " | ".join(columns) + " |",
                  "|" + "---|" * (len(columns) + 1)]
        lines += ["| " + " | ".join([r.label, *(_fmt(r, c) for c in columns)]) + " |" for r in results]
    return "\n".join(lines) + "\n"


def exposure_lift_markdown(results: list[SettingResult]) -> str:
    """Canary exposure minus the base model's for the same secrets, site by site.

    The same secrets are scored against the same alternatives in every arm, so
    this paired difference removes how much the base model happens to like a
    given digit string (which varies by several bits from secret to secret).
    Empty when there is no zero-shot row.
    """
    base = next((r for r in results if r.setting == "zero-shot"), None)
    if base is None:
        return ""
    head = ["setting", *EXPOSURE_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if r is base:
            continue
        cells = []
        for column in EXPOSURE_COLUMNS:
            lifts = [row[column] - base.per_site[site][column] for site, row in r.per_site.items()
                     if site in base.per_site and math.isfinite(row[column])
                     and math.isfinite(base.per_site[site][column])]
            cells.append(f"{sum(lifts) / len(lifts):+.2f} [{min(lifts):+.2f}, {max(lifts):+.2f}]" if lifts else "—")
        lines.append("| " + " | ".join([r.label, *cells]) + " |")
    return "\n".join(lines) + "\n"


def load_results(study_json: Path) -> list[SettingResult]:
    """The rows of a finished study (``DIR/study.json``), to re-render its tables and figures."""
    record = json.loads(study_json.read_text())
    nan = float("nan")
    rows = []
    for s in record["settings"]:
        fix = {k: (v if v is not None else nan) for k, v in s.items() if k in ("mean", "min", "max")}
        rows.append(SettingResult(**{**s, **{k: {c: (x if x is not None else nan) for c, x in v.items()}
                                             for k, v in fix.items()},
                                     "per_site": {site: {c: (x if x is not None else nan) for c, x in row.items()}
                                                  for site, row in s["per_site"].items()}}))
    return rows


def write_outputs(results: list[SettingResult], out_dir: Path) -> str:
    """Write ``study.md`` (the table, then the exposure lift) and the figures; return the markdown."""
    text = table_markdown(results)
    lift = exposure_lift_markdown(results)
    if lift:
        text += "\nCanary exposure minus the zero-shot base model's, same secrets (bits):\n\n" + lift
    (out_dir / "study.md").write_text(text)
    plot(results, out_dir)
    return text


def plot(results: list[SettingResult], out_dir: Path) -> list[Path]:
    """Privacy–utility curve and canary exposure figures (small PNGs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r.setting for r in results]
    x = list(range(len(results)))
    paths = []
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for ax, (cols, title) in zip(axes, (
        (("centroid_margin", "real_classifier_f1", "tstr_trtr_ratio"), "fidelity"),
        (("distinct_2", "self_bleu_4", "mode_collapse_ratio"), "diversity"),
        (("mia_auc", "mia_auc_calibrated", "dcr_train_closer_share", "verbatim_rate_13", "verbatim_unique_13",
          "rouge_l_p95"), "privacy"),
    ), strict=True):
        for col in (c for c in cols if all(c in r.mean for r in results)):  # older studies lack some
            mean = [r.mean[col] for r in results]
            # max(0, .): a mean of equal values can exceed their max by one rounding error
            err_lo = [max(0.0, r.mean[col] - r.min[col]) for r in results]
            err_hi = [max(0.0, r.max[col] - r.mean[col]) for r in results]
            ax.errorbar(x, mean, yerr=[err_lo, err_hi], marker="o", capsize=3, label=col)
        ax.set_xticks(x, labels, rotation=30, fontsize=8)
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.suptitle("Privacy–utility: mean over 3 sites (bars: min–max), by setting")
    fig.tight_layout()
    paths.append(out_dir / "results-privacy-utility.png")
    fig.savefig(paths[-1], dpi=80)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.2))
    width = 0.8 / len(EXPOSURE_COLUMNS)
    for i, col in enumerate(EXPOSURE_COLUMNS):
        rep = col.removeprefix("exposure_rep")
        name = "never planted" if rep == "0" else f"shared by {rep} patient(s)"
        ax.bar([v + (i - 1.5) * width for v in x], [r.mean[col] for r in results], width=width, label=name)
    ax.set_xticks(x, labels, rotation=30, fontsize=8)
    ax.set_ylabel("exposure (bits, max 8)")
    ax.set_title("Canary exposure by repetition (mean over 3 sites)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out_dir / "results-canaries.png")
    fig.savefig(paths[-1], dpi=80)
    plt.close(fig)
    return paths


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value
