"""One round on the coordinator as typed, frozen values, and the JSON record each becomes.

The round's steps (:mod:`server.rounds`, :mod:`server.secagg`) return these
values; nothing is mutated once built. :meth:`RoundRecord.to_json` gives the
round's record in ``consortium-summary.json`` (the form :mod:`server.report`
reads back, also from older summaries): node ids are JSON keys as strings.

Privacy meaning: a record holds only what the wire contract lets a site send
(the whitelisted privacy scalars, typed decline reasons, metric summaries) and
what the coordinator derives (weights, norms, anchored ledger positions). A
refused reply is recorded as a kind, a short sha256 and a problem count
(:func:`server.report.refusal_record`), never its content.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Adapter = dict[str, np.ndarray]


@dataclass(frozen=True)
class PhaseReplies:
    """Who was asked in one phase (train or evaluate) and what became of each, by node id.

    ``accepted``: sorted. ``declined``: node -> typed reason (``budget_exceeded``, ...).
    ``refused``: node -> refusal record (kind, sha256, problem count, typed codes).
    ``failed``: error replies. ``missing``: no reply before the timeout.
    """

    sent: tuple[int, ...]
    accepted: tuple[int, ...] = ()
    declined: Mapping[int, str] = field(default_factory=dict)
    refused: Mapping[int, Mapping[str, Any]] = field(default_factory=dict)
    failed: tuple[int, ...] = ()
    missing: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The phase's record: node lists, and node-keyed maps with string keys."""
        return {
            "sent": list(self.sent),
            "accepted": list(self.accepted),
            "declined": {str(n): r for n, r in self.declined.items()},
            "refused": {str(n): dict(p) for n, p in self.refused.items()},
            "failed": list(self.failed),
            "missing": list(self.missing),
        }


@dataclass(frozen=True)
class TrainOutcome:
    """The train phase of one round, plain or SecAgg+.

    ``adapter``: the new global adapter, None when nothing was aggregated (the
    global adapter stays unchanged). ``site_budget``: node -> the ledger position
    and epsilons the coordinator's budget anchor admitted (:mod:`server.site_budget`).
    ``weights``/``privacy``: node -> FedAvg weight / the site's privacy scalars
    (cumulative ε from its ledger, δ, σ, q, steps, ...), set when the phase got
    that far; ``update_norms``: per-site L2 norm of the update delta (plain path
    only: under SecAgg+ the coordinator never sees one site's update).
    ``secagg``: the SecAgg+ protocol parameters, None on a plain round.
    """

    replies: PhaseReplies
    site_budget: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    adapter: Adapter | None = None
    weights: Mapping[str, float] | None = None
    update_norms: Mapping[str, float] | None = None
    privacy: Mapping[str, Mapping[str, Any]] | None = None
    secagg: Mapping[str, Any] | None = None

    @property
    def aggregated(self) -> bool:
        """True when the sites' updates produced a new global adapter this round."""
        return self.adapter is not None

    @property
    def aggregated_count(self) -> int:
        """How many sites' updates the new global adapter holds (0 when not aggregated)."""
        return len(self.replies.accepted) if self.aggregated else 0


@dataclass(frozen=True)
class EvaluateOutcome:
    """The evaluate phase: who reported, and the unweighted mean over sites of each metric."""

    replies: PhaseReplies
    mean: Mapping[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {**self.replies.to_json(), "mean": dict(self.mean)}


@dataclass(frozen=True)
class RoundRecord:
    """One finished round: its train phase, the checkpoint written (if any), its evaluation (if any)."""

    round: int
    train: TrainOutcome
    checkpoint: str | None = None
    evaluate: EvaluateOutcome | None = None

    def to_json(self) -> dict[str, Any]:
        """The round's record in ``consortium-summary.json`` (and for :func:`server.report.audit_round`)."""
        out: dict[str, Any] = {"round": self.round}
        t = self.train
        if t.secagg is not None:
            out["secagg"] = dict(t.secagg)
        out["train"] = t.replies.to_json()
        out["site_budget"] = {n: dict(a) for n, a in t.site_budget.items()}
        out["aggregated"] = t.aggregated
        if t.weights is not None:
            out["weights"] = dict(t.weights)
        if t.update_norms is not None:
            out["update_norms"] = dict(t.update_norms)
        if t.privacy is not None:
            out["privacy"] = {n: dict(p) for n, p in t.privacy.items()}
        if self.checkpoint is not None:
            out["checkpoint"] = self.checkpoint
        if self.evaluate is not None:
            out["evaluate"] = self.evaluate.to_json()
        return out
