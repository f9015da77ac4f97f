"""One federated round's steps on the coordinator, as plain functions returning typed values.

:func:`play_round` runs one round over the connected sites: sample
``fraction-train`` of them, the train phase (:func:`train_phase`: plain, or
SecAgg+ through :mod:`server.secagg`), a checkpoint when a new global adapter
came out of it, then the evaluate phase (:func:`evaluate_phase`). Every reply is
checked (:func:`shared.wire.check_reply`, and train updates against the
coordinator's per-site budget anchor, :mod:`server.site_budget`); a site that
times out, fails, declines or sends something refused is recorded in the round's
:class:`~server.round_state.PhaseReplies` and the round goes on without it. A
refusal is recorded by a short sha256 of what was refused, never its content.

Progress lines (the site names of :mod:`server.site_names`) go to
``flwr run --stream`` and the coordinator's log.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from server import checkpoint, report, secagg, site_names, strategy
from server.round_state import Adapter, EvaluateOutcome, PhaseReplies, RoundRecord, TrainOutcome
from server.site_budget import Anchor, BudgetRefusal
from shared import adapter_delta, adapter_spec, wire, wire_pack
from shared.run_config import RunConfig

log = logging.getLogger("fedsynth.coordinator")
from flwr.common.logger import log as flwr_log  # noqa: E402  (streamed by `flwr run --stream`)


def progress(fmt: str, *args: Any) -> None:
    """One progress line, streamed to ``flwr run --stream`` (and the coordinator's own log)."""
    flwr_log(INFO, "fedsynth " + fmt, *args)


def play_round(
    grid: Grid, run: RunConfig, *, round_id: int, nodes: list[int], names: Mapping[str, str],
    global_adapter: Adapter | None, spec: adapter_spec.AdapterSpec, anchor: Anchor, ckpt_root: Path,
) -> RoundRecord:
    """Train (plain or SecAgg+), checkpoint a new global adapter, evaluate: the round's record.

    ``nodes``: the connected sites; ``spec``: the run's adapter spec every update
    must match; ``anchor``: this round's site-budget check. The new global adapter,
    if any, is ``record.train.adapter`` (saved under ``ckpt_root`` first).
    """
    t0 = time.monotonic()
    train_nodes = sample(nodes, run.fraction_train, run.min_sites, seed=round_id)
    train = train_phase(grid, run, nodes=train_nodes, round_id=round_id, spec=spec,
                        global_adapter=global_adapter, anchor=anchor, names=names)
    _progress_train(round_id, train, names, t0)
    saved = None
    if train.adapter is not None:
        global_adapter = train.adapter
        checkpoint.save_round(ckpt_root, round_id, global_adapter, lora=run.lora)
        saved = checkpoint.round_dir_name(round_id)
    evaluated = evaluate_phase(grid, nodes, round_id, global_adapter, run, names)
    return RoundRecord(round=round_id, train=train, checkpoint=saved, evaluate=evaluated)


def train_phase(
    grid: Grid, run: RunConfig, *, nodes: list[int], round_id: int, spec: adapter_spec.AdapterSpec,
    global_adapter: Adapter | None, anchor: Anchor, names: Mapping[str, str],
) -> TrainOutcome:
    """Ask ``nodes`` to train on the global adapter; aggregate what is accepted.

    Plain: at least ``min-sites`` accepted updates are aggregated
    (:func:`aggregate`), else the global adapter stays unchanged. SecAgg+
    (``secagg = true``): :func:`server.secagg.train_round`.
    """
    if run.secagg:
        progress("round %d: train (SecAgg+) on %d sites: %s", round_id, len(nodes),
                 site_names.labels(nodes, names))
        return secagg.train_round(grid, run, nodes=nodes, round_id=round_id, spec=spec,
                                  global_adapter=global_adapter, anchor=anchor)
    progress("round %d: train on %d sites: %s", round_id, len(nodes), site_names.labels(nodes, names))
    replies = send(grid, nodes, MessageType.TRAIN, round_id, global_adapter, run.timeout_train)
    got = classify(replies, nodes, kind="train", spec=spec, run=run, anchor=anchor)
    if len(got.accepted) >= run.min_sites:
        return aggregate(got, global_adapter, run)
    log.warning("round %d: %d accepted updates < min-sites; global unchanged", round_id, len(got.accepted))
    return TrainOutcome(replies=got.replies, site_budget=got.anchored)


def evaluate_phase(
    grid: Grid, nodes: list[int], round_id: int, global_adapter: Adapter | None, run: RunConfig,
    names: Mapping[str, str],
) -> EvaluateOutcome | None:
    """Ask ``fraction-evaluate`` of the sites for metric summaries of the global adapter (None: none yet)."""
    if global_adapter is None:
        progress("round %d: no global adapter yet; evaluation skipped", round_id)
        return None
    eval_nodes = sample(nodes, run.fraction_evaluate, run.min_sites, seed=10_000 + round_id)
    t0 = time.monotonic()
    progress("round %d: evaluate on %d sites: %s", round_id, len(eval_nodes),
             site_names.labels(eval_nodes, names))
    replies = send(grid, eval_nodes, MessageType.EVALUATE, round_id, global_adapter, run.timeout_evaluate)
    got = classify(replies, eval_nodes, kind="evaluate", spec=None, run=run)
    progress("round %d: evaluate done after %.0f s: %d of %d sites reported", round_id,
             time.monotonic() - t0, len(got.replies.accepted), len(eval_nodes))
    return EvaluateOutcome(replies=got.replies,
                           mean=mean_metrics([r.metrics for r in got.accepted.values()]))


def wait_for_sites(grid: Grid, need: int, timeout: float, sleep: Callable[[float], None]) -> list[int]:
    """The connected node ids (sorted) once ``need`` are connected, or whatever is there after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(int(n) for n in grid.get_node_ids())
        if len(nodes) >= need or time.monotonic() >= deadline:
            return nodes
        sleep(1.0)


def sample(nodes: list[int], fraction: float, min_sites: int, *, seed: int) -> list[int]:
    """``ceil(fraction * n)`` of ``nodes`` (at least ``min_sites``, at most all), seeded, sorted."""
    k = min(len(nodes), max(min_sites, int(np.ceil(fraction * len(nodes)))))
    return sorted(random.Random(seed).sample(nodes, k))


def send(grid: Grid, nodes: list[int], kind: str, round_id: int, adapter: Adapter | None,
         timeout: float) -> list[Message]:
    """Send this round's instruction (the global adapter, None in round 1) to ``nodes``; the replies."""
    messages = [
        Message(wire_pack.pack_instruction(round_id=round_id, adapter=adapter), dst_node_id=n,
                message_type=kind, group_id=str(round_id))
        for n in nodes
    ]
    return list(grid.send_and_receive(messages, timeout=timeout))


@dataclass(frozen=True)
class Classified:
    """One phase's replies sorted: the record, the accepted replies by node, the anchored budgets."""

    replies: PhaseReplies
    accepted: Mapping[int, wire.Reply]
    anchored: Mapping[str, Mapping[str, Any]]


def classify(
    replies: list[Message], sent: list[int], *, kind: str, spec: adapter_spec.AdapterSpec | None, run: RunConfig,
    anchor: Anchor | None = None,
) -> Classified:
    """Sort replies into accepted / declined / refused / failed / missing (by node id).

    A reply from a node not asked, or a second one, is ignored. ``anchor`` (train
    replies): the site-budget check; a refusal there is recorded like a wire
    refusal (kind ``ledger``, with its typed codes). Never raises for what a site sent.
    """
    accepted: dict[int, wire.Reply] = {}
    anchored: dict[str, dict[str, Any]] = {}
    declined: dict[int, str] = {}
    refused: dict[int, dict[str, Any]] = {}
    failed: list[int] = []
    seen: set[int] = set()
    for msg in replies:
        node = int(msg.metadata.src_node_id)
        if node not in sent or node in seen:
            continue  # not asked, or a duplicate: ignore
        seen.add(node)
        if msg.has_error():
            failed.append(node)
            continue
        try:
            reply = wire.check_reply(msg.content, kind=kind, spec=spec, run=run)
        except Exception as exc:  # noqa: BLE001 - WireError, or anything: a refusal, never a crash
            refused[node] = report.wire_refusal(node, kind, msg.content, exc)
            continue
        if reply.privacy is not None and anchor is not None:
            got = anchor(node, reply.privacy)
            if isinstance(got, BudgetRefusal):
                refused[node] = report.ledger_refusal(node, "train", msg.content, got)
                continue
            anchored[str(node)] = dataclasses.asdict(got)
        if reply.decline is not None:
            declined[node] = reply.decline
        else:
            accepted[node] = reply
    record = PhaseReplies(sent=tuple(sent), accepted=tuple(sorted(accepted)), declined=declined,
                          refused=refused, failed=tuple(failed), missing=tuple(n for n in sent if n not in seen))
    return Classified(replies=record, accepted=accepted, anchored=anchored)


def aggregate(got: Classified, global_adapter: Adapter | None, run: RunConfig) -> TrainOutcome:
    """The plain path's new global adapter from the accepted updates (:func:`server.strategy.aggregate`).

    Weights from each site's patients bucket (``aggregation.weighting``); the record
    keeps each site's weight, update-delta L2 norm and privacy scalars.
    """
    nodes = sorted(got.accepted)
    updates = [got.accepted[n].adapter for n in nodes]
    weights = strategy.site_weights(
        [got.accepted[n].privacy.patients_bucket for n in nodes],
        scheme=run.weighting, cap=run.weight_cap,
    )
    norms = [adapter_delta.update_norm(adapter_delta.update_delta(u, global_adapter)) for u in updates]
    new = strategy.aggregate(
        updates, weights=weights, reference=global_adapter, method=run.aggregation,
        trim_fraction=run.trim_fraction, norm_bound=run.update_norm_bound, dtype=run.lora.dtype,
    )
    return TrainOutcome(
        replies=got.replies, site_budget=got.anchored, adapter=new,
        weights={str(n): w for n, w in zip(nodes, weights, strict=True)},
        update_norms={str(n): v for n, v in zip(nodes, norms, strict=True)},
        privacy={str(n): got.accepted[n].privacy.to_record() for n in nodes},
    )


def mean_metrics(summaries: list[dict[str, float] | None]) -> dict[str, float]:
    """Unweighted mean over sites of each metric that at least one site reported."""
    acc: dict[str, list[float]] = {}
    for s in summaries:
        for k, v in (s or {}).items():
            acc.setdefault(k, []).append(v)
    return {k: float(np.mean(v)) for k, v in sorted(acc.items())}


def _progress_train(round_id: int, train: TrainOutcome, names: Mapping[str, str], t0: float) -> None:
    """The train phase's outcome by site name, with each accepted site's reported cumulative ε."""
    r = train.replies
    eps = {n: a.get("epsilon") for n, a in train.site_budget.items()}
    accepted = [f"{site_names.label(n, names)} (ε={eps[str(n)]:.3g})" if eps.get(str(n)) is not None
                else site_names.label(n, names) for n in r.accepted]
    declined = [f"{site_names.label(n, names)} ({why})" for n, why in r.declined.items()]
    progress("round %d: train done after %.0f s: accepted %s; declined %s; refused %s; failed %s; "
             "missing %s", round_id, time.monotonic() - t0, ", ".join(accepted) or "-",
             ", ".join(declined) or "-", site_names.labels(r.refused, names),
             site_names.labels(r.failed, names), site_names.labels(r.missing, names))
