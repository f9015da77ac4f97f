"""Self-contained HTML for privacy reports: inline CSS, plots as base64 PNG.

The page makes no network request (a Content-Security-Policy forbids it and
any script), and every string taken from a report is HTML-escaped: a report is
data from a site or coordinator, which the reader need not trust.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Sequence

# Figure + the Agg canvas directly: headless, and no pyplot global state to leak between reports.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from shared.report import SiteRoundReport, Verdict
from shared.report_consortium import ConsortiumReport

# Metrics plotted over rounds (all present metrics are listed in the table).
HEADLINE_METRICS: tuple[str, ...] = (
    "dp.train.centroid_cosine_mean",
    "dp.train.verbatim_13_rate",
    "dp.heldout.verbatim_13_rate",
    "dp.train.phi_echo_rate",
    "dp.train.loss_drop_mean",
    "dp.heldout.loss_drop_mean",
    "diversity.distinct_2",
    "diversity.self_bleu_4",
)
GROUP_MEANING = {
    "count": "how many synthetic reports the other numbers were computed over, rounded down to a "
    "multiple of 10 (the release gate's counts are exact, so they may be higher)",
    "dp": "per-patient statistics over private notes, Gaussian noise charged to the ε ledger; "
    "compare train with held-out patients (train well above held-out = memorisation)",
    "diversity": "how varied the synthetic reports are (collapse and duplicates are bad)",
    "release": "what share of synthetic reports passed the release gate",
}
# Direction of every metric name (shared.whitelist.METRIC_NAMES), by the part after the group.
_DIRECTIONS = {
    "reports": "a count: no better direction",
    "patients": "a noisy count: no better direction",
    "verbatim_13_rate": "lower is safer (train should not exceed held-out)",
    "verbatim_26_rate": "lower is safer (train should not exceed held-out)",
    "phi_echo_rate": "lower is safer (train should not exceed held-out)",
    "centroid_cosine_mean": "higher = closer to the patients' notes; train well above held-out = memorisation",
    "loss_drop_mean": "train well above held-out = memorisation; lower gap is safer",
    "distinct_1": "higher = more varied", "distinct_2": "higher = more varied",
    "distinct_3": "higher = more varied", "mtld": "higher = more varied", "vendi": "higher = more varied",
    "self_bleu_4": "lower = more varied",
    "exact_duplicate_rate": "lower is better (copies of each other)",
    "near_duplicate_rate": "lower is better (near-copies of each other)",
}


def metric_direction(name: str) -> str:
    """Which way is better for metric ``name`` ("" when unknown)."""
    return _DIRECTIONS.get(name.rsplit(".", 1)[-1], "")
CSS = """
body{font:15px/1.45 system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#1b1b1b}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.box{border:2px solid #2a6;background:#f2fbf5;padding:.8em 1em;border-radius:6px}
.warn{border-color:#c80;background:#fff8ec}img{max-width:100%}code{font-size:.92em}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _num(value: float | int | None) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool) or isinstance(value, int):
        return _e(value)
    return _e(f"{value:.4g}")


def _label(text: str) -> str:
    """Plot text: escape ``$`` so matplotlib never parses report strings as mathtext."""
    return text.replace("$", r"\$")


def _png(fig: Figure) -> str:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="plot" src="data:image/png;base64,{data}">'


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """``rows`` cells must already be escaped (numbers via _num, text via _e)."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _td(text: str, num: bool = False) -> str:
    return f'<td class="num">{text}</td>' if num else f"<td>{text}</td>"


def _epsilon_plot(series: dict[str, tuple[list[int], list[float]]], ceilings: dict[str, float | None]) -> str:
    fig = Figure(figsize=(7, 3.2))
    ax = fig.add_subplot()
    for i, (name, (rounds, eps)) in enumerate(series.items()):
        color = f"C{i % 10}"
        ax.plot(rounds, eps, marker="o", color=color, label=_label(f"ε {name}"))
        ceiling = ceilings.get(name)
        if ceiling is not None:
            ax.axhline(ceiling, color=color, linestyle="--", linewidth=1, label=_label(f"ceiling {name}"))
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("cumulative ε (patient-level)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return _png(fig)


def _metrics_plot(points: list[tuple[int, dict[str, float]]]) -> str:
    names = [m for m in HEADLINE_METRICS if any(m in p for _, p in points)]
    if not names:
        return "<p>No headline metrics to plot.</p>"
    cols = 3
    rows = (len(names) + cols - 1) // cols
    fig = Figure(figsize=(9, 2.2 * rows))
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        xs = [r for r, p in points if name in p]
        ax.plot(xs, [p[name] for _, p in points if name in p], marker="o")
        ax.set_title(_label(name), fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def _gate_plot(kept: int, removed: dict[str, int]) -> str:
    fig = Figure(figsize=(6, 2.6))
    ax = fig.add_subplot()
    labels = ["kept", *[_label(f"removed: {k}") for k in removed]]
    ax.barh(labels, [kept, *removed.values()], color=["C2"] + ["C3"] * len(removed))
    ax.set_xlabel("synthetic reports")
    ax.tick_params(labelsize=8)
    fig.tight_layout()
    return _png(fig)


def _metrics_table(metrics: dict[str, float]) -> str:
    rows = [
        [_td(_e(k)), _td(_num(v), True), _td(_e(metric_direction(k))),
         _td(_e(GROUP_MEANING.get(k.split(".")[0], "")))]
        for k, v in sorted(metrics.items())
    ]
    return (_table(["metric", "value", "direction", "what it shows"], rows) if rows
            else "<p>No metrics reported.</p>")


_OUTCOME_TEXT = {
    "release": "RELEASE: every check passed its stated threshold",
    "hold": "HOLD: at least one check failed; do not release this output",
    "incomplete": "INCOMPLETE: the release gate or the train/held-out comparison was not measured; "
    "this output cannot be called safe to release",
}


def _verdict_html(verdict: Verdict | None) -> str:
    """The verdict box: outcome, then each number beside its threshold and held-out baseline."""
    if verdict is None:
        return '<div class="box warn"><h2 style="margin-top:0">Verdict</h2><p>This report carries ' \
            "no verdict (written before verdicts existed).</p></div>"
    rows = [[
        _td(_e(c.name)), _td(_num(c.value), True), _td(_e(f"{c.direction} {c.threshold:.4g}")),
        _td(_num(c.baseline), True),
        _td("—" if c.passed is None else ("pass" if c.passed else "<b>FAIL</b>")), _td(_e(c.meaning)),
    ] for c in verdict.checks]
    cls = "box" if verdict.outcome == "release" else "box warn"
    return (
        f'<div class="{cls}" id="verdict"><h2 style="margin-top:0">Verdict: {_e(verdict.outcome)}</h2>'
        f"<p><b>{_e(_OUTCOME_TEXT[verdict.outcome])}</b>.</p>"
        + _table(["check", "value", "threshold", "held-out baseline", "result", "meaning"], rows)
        + "<p>Thresholds are screening limits (defence in depth); the privacy guarantee is ε.</p></div>"
    )


def _participation_html(r: ConsortiumReport) -> str:
    if not r.participation:
        return "<p>No participation recorded.</p>"
    sites = sorted({p.site_id for p in r.participation})
    rounds = sorted({p.round for p in r.participation})
    cell = {(p.round, p.site_id): p for p in r.participation}
    rows = []
    for rnd in rounds:
        row = [_td(_num(rnd), True)]
        for site in sites:
            p = cell.get((rnd, site))
            row.append(_td(_e(f"{p.train} / {p.evaluate}" if p else "—")))
        rows.append(row)
    return (_table(["round", *sites], rows)
            + "<p>Each cell: training / evaluation. Rounds count from 1. Only <i>trained</i> "
            "updates went into the global adapter.</p>")


def _plain_box(unit: str, covers: str, not_covered: Sequence[str], metrics_mode: str | None) -> str:
    items = "".join(f"<li>{_e(t)}</li>" for t in not_covered)
    mode = ""
    if metrics_mode is not None:
        mode = (
            f"<p>Metric summaries mode: <b>{_e(metrics_mode)}</b>. "
            + (
                "Metric summaries were computed from private notes and are <b>not</b> covered by DP-SGD; "
                "they are coarse aggregates with small cells suppressed."
                if metrics_mode != "dp-noised"
                else "Metric summaries carry calibrated noise charged to the same ε ledger."
            )
            + "</p>"
        )
    return (
        '<div class="box"><h2 style="margin-top:0">What ε means here</h2>'
        f"<p>Unit of privacy: <b>{_e(unit)}</b>. {_e(covers)}</p>"
        "<p>Smaller ε is stronger privacy. ε composes over rounds: the figure shown is the "
        "total so far, not a per-round amount.</p>"
        f"<p><b>Not covered by ε:</b></p><ul>{items}</ul>{mode}"
        "<p>Release-gate filtering is defence in depth, <b>not</b> differential privacy.</p></div>"
    )


def _page(title: str, body: str) -> str:
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
    return (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>{body}</body></html>\n"
    )


def _kv(pairs: Sequence[tuple[str, str]]) -> str:
    return _table(["", ""], [[_td(_e(k)), _td(v)] for k, v in pairs])


def _site_html(r: SiteRoundReport) -> str:
    p = r.privacy
    parts = [
        f"<h1>Privacy report — site {_e(r.site_id)}, run {_e(r.run_id)}, round {_num(r.round)}</h1>",
        _verdict_html(r.verdict),
        f"<p>Created {_e(r.created.isoformat())}. Verify this report's signature with "
        "<code>fedsynth-verify</code> before relying on it.</p>",
        _plain_box(p.unit_of_privacy, p.what_epsilon_covers, p.what_epsilon_does_not_cover, r.metrics_mode),
        "<h2>Privacy accounting</h2>",
        _kv([
            ("ε (cumulative, all rounds)", _num(p.epsilon)),
            ("ε this round (increment)", _num(p.epsilon_round)),
            ("δ", _num(p.delta)),
            ("ε ceiling (set by the site)", _num(p.epsilon_ceiling)),
            ("ε remaining", _num(p.epsilon_remaining)),
            ("noise multiplier σ", _num(p.noise_multiplier)),
            ("sample rate q", _num(p.sample_rate)),
            ("steps", _num(p.steps)),
            ("clipping norm C", _num(p.max_grad_norm)),
            ("accountant", _e(p.accountant)),
            ("secure mode", _e(p.secure_mode)),
            ("noise source", _e(p.noise_source)),
        ]),
    ]
    rounds = [h.round for h in r.history] + [r.round]
    eps = [h.epsilon for h in r.history] + [p.epsilon]
    parts += ["<h2>ε spent vs ceiling</h2>", _epsilon_plot({r.site_id: (rounds, eps)}, {r.site_id: p.epsilon_ceiling})]
    parts += ["<h2>Metric summaries</h2>", _metrics_table(r.metrics)]
    points = [(h.round, h.metrics) for h in r.history] + [(r.round, r.metrics)]
    parts.append(_metrics_plot(points))
    parts.append("<h2>Release gate</h2>")
    if r.release_gate is None:
        parts.append("<p>No release-gate run this round.</p>")
    else:
        g = r.release_gate
        parts.append(_table(
            ["checked", "kept", *[f"removed: {k}" for k in g.removed]],
            [[_td(_num(g.checked), True), _td(_num(g.kept), True), *[_td(_num(v), True) for v in g.removed.values()]]],
        ))
        if g.thresholds:
            parts.append("<p>Thresholds: " + ", ".join(
                f"{_e(k)} {_num(v)}" for k, v in sorted(g.thresholds.items())) + ". A report at or past "
                "any of them was removed; only kept reports are released.</p>")
        parts.append(_gate_plot(g.kept, g.removed))
    if r.membership is not None:
        parts += ["<h2>Membership inference on the adapter</h2>",
                  _kv([("AUC (0.5 = no signal)", _num(r.membership.auc)),
                       ("TPR at 1% FPR (≈0.01 = no signal)", _num(r.membership.tpr_at_1fpr))])]
    if r.canaries is not None:
        c = r.canaries
        parts += ["<h2>Canaries</h2>", _kv([
            ("planted", _num(c.planted)), ("exposure mean (bits)", _num(c.exposure_mean)),
            ("exposure max (bits)", _num(c.exposure_max)), ("max possible (bits)", _num(c.exposure_possible)),
            ("extracted verbatim", _num(c.extracted_verbatim)),
        ])]
    parts += ["<h2>Provenance</h2>", _kv([
        ("model", _e(f"{r.model.id} ({r.model.family})")),
        ("model identity hash", f"<code>{_e(r.model.identity_hash)}</code>"),
        ("config hash", f"<code>{_e(r.config_hash)}</code>"),
        *[(name, _e(ver)) for name, ver in r.software.model_dump().items()],
    ])]
    return _page(f"fedsynth privacy report {r.site_id} round {r.round}", "".join(parts))


def _consortium_html(r: ConsortiumReport) -> str:
    parts = [
        f"<h1>Consortium report — run {_e(r.run_id)}, {_num(r.rounds)} rounds</h1>",
        _verdict_html(r.verdict),
        f"<p>Created {_e(r.created.isoformat())}.</p>",
        *([f"<p><strong>This run failed: {_e(r.status_reason or 'no site trained')}.</strong></p>"]
          if r.status == "failed" else []),
        "<h2>Participation</h2>",
        _participation_html(r),
        _plain_box("patient", r.what_epsilon_covers, r.what_epsilon_does_not_cover, None),
        "<h2>ε spent per site</h2>",
    ]
    series = {s.site_id: ([x.round for x in s.rounds], [x.epsilon for x in s.rounds]) for s in r.sites}
    parts.append(_epsilon_plot(series, {s.site_id: s.epsilon_ceiling for s in r.sites}) if series else
                 "<p>No site's update was aggregated in this run.</p>")
    rows = []
    for s in r.sites:
        last = s.rounds[-1] if s.rounds else None
        rows.append([
            _td(_e(s.site_id)), _td(_num(len(s.rounds)), True),
            _td(_num(last.epsilon if last else None), True), _td(_num(last.delta if last else None), True),
            _td(_num(s.epsilon_ceiling), True), _td(_e(last.accountant if last else "—")),
            _td(_e(last.secure_mode if last else "—")),
            _td(_num(s.epsilon_recomputed), True),
            _td(_e(f"{s.ledger_seq} / {s.ledger_head[:16]}…" if s.ledger_seq and s.ledger_head else "—")),
        ])
    parts.append(_table(["site", "rounds trained", "ε (latest)", "δ", "ceiling", "accountant", "secure mode",
                         "ε recomputed by the coordinator", "ledger seq / head (anchored)"], rows))
    parts.append("<h2>Aggregated metric summaries</h2>")
    if r.metrics:
        parts.append(_metrics_table(r.metrics[-1].metrics))
        parts.append(_metrics_plot([(m.round, m.metrics) for m in r.metrics]))
    else:
        parts.append("<p>No metrics reported.</p>")
    a = r.aggregation
    parts += ["<h2>Aggregation</h2>", _kv([
        ("method", _e(a.method)), ("weighting", _e(a.weighting)),
        ("update norm bound", _num(a.norm_bound)), ("secure aggregation", _e(a.secure_aggregation)),
    ])]
    parts += ["<h2>Checkpoints</h2>", _table(
        ["round", "path", "sha256"],
        [[_td(_num(c.round), True), _td(_e(c.path)), _td(f"<code>{_e(c.sha256)}</code>")] for c in r.checkpoints],
    )]
    parts += ["<h2>Provenance</h2>", _kv([
        ("config hash", f"<code>{_e(r.config_hash)}</code>"),
        *[(name, _e(ver)) for name, ver in r.software.model_dump().items()],
    ])]
    return _page(f"fedsynth consortium report {r.run_id}", "".join(parts))


def render_html(report: SiteRoundReport | ConsortiumReport) -> str:
    """A self-contained HTML page for ``report`` (no network, no script, every string escaped)."""
    if isinstance(report, SiteRoundReport):
        return _site_html(report)
    if isinstance(report, ConsortiumReport):
        return _consortium_html(report)
    raise TypeError(f"cannot render {type(report).__name__}")
