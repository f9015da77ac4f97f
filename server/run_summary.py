"""The run's consortium summary: a frozen value, loaded on resume, written after every round.

``<run_dir>/consortium-summary.json`` holds the run's settings that shape
aggregation, the site names, every finished round's record
(:meth:`server.round_state.RoundRecord.to_json`), the status and, when written,
each site's latest reported cumulative ε (``site_epsilon``, from its ledger). It
is written crash-safely (temp file, fsync, rename) and read back by a restarted
coordinator, which keeps the rounds up to its last complete checkpoint.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from shared.atomic import PRIVATE, write_atomic
from shared.run_config import RunConfig

log = logging.getLogger("fedsynth.coordinator")

SUMMARY_NAME = "consortium-summary.json"


@dataclass(frozen=True)
class RunSummary:
    """What the coordinator reports about a run so far.

    ``rounds``: finished rounds' records, as persisted (a resumed run's earlier
    rounds are read back from the file). ``site_names``: ``{str(node_id): name}``,
    None until the first round named its sites. ``status``: ``running``,
    ``completed`` or ``failed: <why>``.
    """

    run_name: str
    num_rounds: int
    aggregation: str
    weighting: str
    update_norm_bound: float
    secagg: bool
    min_sites: int
    rounds: tuple[Mapping[str, Any], ...] = ()
    site_names: Mapping[str, str] | None = None
    status: str = "running"
    last_round: int = 0

    def with_round(self, record: Mapping[str, Any]) -> RunSummary:
        """This summary with one more finished round (its record, as written)."""
        return replace(self, rounds=(*self.rounds, record), last_round=int(record["round"]))

    def to_json(self) -> dict[str, Any]:
        """The summary as returned by :func:`server.app.run_federation` and read by :mod:`server.report`."""
        out: dict[str, Any] = {"run_name": self.run_name, "num_rounds": self.num_rounds,
                               "rounds": [dict(r) for r in self.rounds]}
        if self.site_names is not None:
            out["site_names"] = dict(self.site_names)
        out.update(aggregation=self.aggregation, weighting=self.weighting,
                   update_norm_bound=self.update_norm_bound, secagg=self.secagg, min_sites=self.min_sites,
                   status=self.status, last_round=self.last_round)
        return out


def start_summary(path: Path, run: RunConfig, start: int) -> RunSummary:
    """A fresh summary for ``run``; resuming after round ``start``, the rounds and names already in ``path``.

    An unreadable file is logged and a fresh summary started (the checkpoints,
    not the summary, decide where the run resumes).
    """
    rounds: tuple[Mapping[str, Any], ...] = ()
    names: dict[str, str] | None = None
    if start and path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            rounds = tuple(r for r in old.get("rounds", []) if int(r["round"]) <= start)
            names = {str(k): str(v) for k, v in (old.get("site_names") or {}).items()}
        except (ValueError, KeyError, TypeError):
            log.warning("unreadable %s; starting a fresh summary", path)
    return RunSummary(
        run_name=run.run_name, num_rounds=run.num_rounds, aggregation=run.aggregation,
        weighting=run.weighting, update_norm_bound=run.update_norm_bound, secagg=run.secagg,
        min_sites=run.min_sites, rounds=rounds, site_names=names, status="running", last_round=start,
    )


def write_summary(run_dir: Path, summary: RunSummary) -> None:
    """Write ``consortium-summary.json`` (with ``site_epsilon``) crash-safely (``shared.atomic.write_atomic``)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / SUMMARY_NAME
    write_atomic(path, json.dumps({**summary.to_json(), "site_epsilon": site_epsilons(summary)}, indent=2,
                                  sort_keys=True), mode=PRIVATE)


def site_epsilons(summary: RunSummary) -> dict[str, float]:
    """Each site's latest reported cumulative ε (the largest over its rounds' privacy scalars)."""
    eps: dict[str, float] = {}
    for r in summary.rounds:
        for node, p in (r.get("privacy") or {}).items():
            eps[node] = max(eps.get(node, 0.0), float(p["epsilon"]))
    return eps


def run_status(summary: RunSummary) -> str:
    """``completed`` when at least one round aggregated site updates, else ``failed: <why>``.

    A run in which no site's update reached the global adapter produced nothing:
    it is a failed run, whatever the reason (every site declined, was refused,
    failed or timed out), and the status says which, counted over all rounds.
    """
    rounds = summary.rounds
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
