"""The train phase under secure aggregation (SecAgg+): the coordinator learns only a weighted sum.

Flower implements SecAgg+ only through its legacy interfaces, so one round here
is :class:`flwr.server.workflow.SecAggPlusWorkflow` run on a
:class:`~flwr.server.compat.LegacyContext` whose legacy strategy
(:class:`_RoundStrategy`) only hands out this round's instructions and collects
the unmasked result. Sites answer with Flower's legacy FitRes layout
(:func:`shared.wire_secagg.pack_secagg_reply`), which secaggplus_mod masks.

What the coordinator still checks, per site, before it unmasks anything
(:class:`_CheckedGrid` sits between the workflow and the grid): the clear parts
of each masked reply (:func:`shared.wire_secagg.check_secagg_reply` with
``masked=True``: no clear values, masked shapes = the layout, privacy scalars on
the whitelist, the weight = what the site's patients bucket gives). A refused
reply is dropped before the workflow sees it, so SecAgg+ treats that site as a
dropout and removes its pairwise masks; its own value never enters the sum. If
fewer than ``max(min-sites, 2)`` contributions with weight > 0 remain, every
reply is dropped and the protocol halts before unmasking: unmasking a "sum" of
one site would reveal that site's update.

What it can no longer do: per-site update norms, norm bounding (moved to the
sites: :func:`shared.wire_secagg.secagg_contribution` bounds each contribution
before masking), robust aggregation (refused by RunConfig), the round-1 majority-layout vote beyond refusing sites whose
layout differs from the first one checked.

Weighting (FedAvg): SecAgg+ sums ``[q_i, q_i * x_i]`` where x_i is site i's
contribution (delta against the global adapter; round 1: lora_B absolute,
lora_A absolute) and q_i = round(w_i / max_weight * 2^22) its quantised weight,
w_i = :func:`shared.wire_secagg.secagg_weight` (patients bucket, floored at 1, clamped
to the weight cap or 1000; uniform: 1). Unmasking gives sum(q_i x_i) / sum(q_i),
i.e. FedAvg with weights w_i / sum(w) — the same as the plain path's
``site_weights`` up to the clamp. New global = reference + that mean.

Quantisation error: each site's q_i x_i / 2^22 is rounded stochastically on a
grid of step 2R / 2^22 (R = ``secagg-clipping-range``, default 1.0), so each
coordinate of the mean is off by at most n * (2R / 2^22) / sum(q_i / 2^22) —
about 5e-7 * n / sum(w_i / max_weight) for R = 1, unbiased.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat import LegacyContext
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from server.report import ledger_refusal, refusal_record, wire_refusal
from server.round_state import Adapter, PhaseReplies, TrainOutcome
from server.site_budget import Anchor, BudgetRefusal
from shared import adapter_spec, wire_adapter, wire_secagg, wire_version
from shared.adapter_delta import add_to_reference
from shared.errors import Problem, WireError
from shared.run_config import RunConfig

log = logging.getLogger("fedsynth.coordinator")
from flwr.common.logger import log as flwr_log  # noqa: E402  (streamed by `flwr run --stream`)


def train_round(
    grid: Grid,
    run: RunConfig,
    *,
    nodes: list[int],
    round_id: int,
    global_adapter: Adapter | None,
    anchor: Anchor | None = None,
    spec: adapter_spec.AdapterSpec | None = None,
) -> TrainOutcome:
    """One SecAgg+ train round over ``nodes``: the train phase's outcome, with the new global
    adapter, or None (unchanged), as its ``adapter``.

    Recorded like the plain path (replies: sent/accepted/declined/refused/failed/
    missing; ``weights``; ``privacy``; the anchored ``site_budget``) plus ``secagg``
    (protocol parameters). Never raises for a site's misbehaviour. ``anchor`` is the
    coordinator's site-budget check (:func:`server.site_budget.round_anchor`): the
    privacy scalars travel in the clear beside the masked vector, so a site whose
    ledger was rolled back or forked, or whose epsilon is too low, is refused before
    unmasking, like a wire violation (a dropout for SecAgg+). ``spec``: the run's
    adapter spec (server.app.run_adapter_spec), which every round's layout and masked
    shapes must match, round 1 included; None only for callers without one (the global
    adapter's own spec, or LoRA structure only in round 1).
    """
    if spec is None:
        spec = wire_adapter.spec_of(global_adapter) if global_adapter is not None else None
    names = sorted(global_adapter) if global_adapter is not None else []
    params = ndarrays_to_parameters([global_adapter[n] for n in names]) if global_adapter is not None \
        else Parameters(tensors=[], tensor_type="numpy.ndarray")
    strategy = _RoundStrategy(grid, nodes, params, round_id)
    checked = _CheckedGrid(grid, run, spec, nodes, anchor, round_id)
    context = LegacyContext(
        Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        config=ServerConfig(num_rounds=1), strategy=strategy, client_manager=SimpleClientManager(),
    )
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: round_id})
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(params, True)
    workflow = SecAggPlusWorkflow(
        num_shares=float(run.secagg_num_shares),
        reconstruction_threshold=float(run.secagg_threshold),
        max_weight=float(wire_secagg.secagg_max_weight(run)),
        clipping_range=float(run.secagg_clipping_range),
        timeout=run.timeout_train,
    )
    try:
        workflow(checked, context)
    except Exception:  # a protocol failure leaves the global adapter unchanged
        log.exception("round %d: SecAgg+ protocol failed", round_id)
    new = _new_global(strategy, checked, global_adapter, run)
    if new is None:
        log.warning("round %d: no secure aggregate; global adapter unchanged", round_id)
    accepted = sorted(checked.accepted.items())
    return TrainOutcome(
        replies=checked.replies(), site_budget=dict(checked.anchored), adapter=new,
        weights={str(n): r.weight for n, r in accepted},
        privacy={str(n): r.privacy.to_record() if r.privacy is not None else {} for n, r in accepted},
        secagg={"clipping_range": run.secagg_clipping_range, "max_weight": wire_secagg.secagg_max_weight(run),
                "num_shares": run.secagg_num_shares, "reconstruction_threshold": run.secagg_threshold},
    )


def _new_global(
    strategy: _RoundStrategy, checked: _CheckedGrid, global_adapter: Adapter | None, run: RunConfig
) -> Adapter | None:
    if strategy.mean is None or not checked.accepted:
        return None
    # Every site that entered the sum must be one we accepted (or a weight-0 decline).
    if not strategy.contributors <= set(checked.accepted) | set(checked.declined):
        log.error("secure aggregate covers sites that were not checked: discarded")
        return None
    layout = checked.layout
    if layout is None or len(strategy.mean) != len(layout[0]):
        log.error("secure aggregate does not match the checked layout: discarded")
        return None
    new: Adapter = {}
    for name, shape, mean in zip(*layout, strategy.mean, strict=True):
        mean = np.asarray(mean, dtype=np.float64)
        if mean.shape != shape or not np.isfinite(mean).all():
            log.error("secure aggregate for %s is malformed: discarded", name)
            return None
        new[name] = add_to_reference(name, mean, global_adapter, run.lora.dtype)
    return new


class _CheckedGrid:
    """The grid as the SecAgg+ workflow sees it: masked train replies are checked on receipt.

    Only ``send_and_receive`` is intercepted; in the masked-vector stage each
    reply's clear part must pass :func:`shared.wire_secagg.check_secagg_reply`, else it is
    dropped (SecAgg+ then treats the site as a dropout). If too few contributions
    remain, all are dropped so the protocol halts before unmasking.
    """

    def __init__(self, grid: Grid, run: RunConfig, spec: adapter_spec.AdapterSpec | None, sent: list[int],
                 anchor: Anchor | None = None, round_id: int | None = None):
        self._grid, self._run, self._spec, self._sent = grid, run, spec, sent
        self._anchor = anchor
        self.anchored: dict[str, dict[str, Any]] = {}  # node -> admitted by the budget anchor
        self.accepted: dict[int, wire_secagg.SecAggReply] = {}
        self.declined: dict[int, str] = {}
        self.refused: dict[int, dict[str, Any]] = {}
        self.failed: set[int] = set()
        self.replied: set[int] = set()
        self.layout: tuple[tuple[str, ...], tuple[tuple[int, ...], ...]] | None = None
        self.stage = 0  # SecAgg+ stages so far (progress lines only)
        self._round = round_id

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        self.stage += 1
        t0 = time.monotonic()
        flwr_log(INFO, "fedsynth round %s: SecAgg+ stage %d: %d messages sent", self._round,
                 self.stage, len(messages))
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        flwr_log(INFO, "fedsynth round %s: SecAgg+ stage %d: %d replies after %.0f s", self._round,
                 self.stage, len(replies), time.monotonic() - t0)
        if not any(_is_masked_reply(m) for m in replies):
            return replies
        return self._check_masked(replies)

    def _check_masked(self, replies: list[Message]) -> list[Message]:
        keep: list[Message] = []
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            if node not in self._sent or node in self.replied:
                continue
            self.replied.add(node)
            if msg.has_error():
                self.failed.add(node)
                continue
            try:
                got = wire_secagg.check_secagg_reply(msg.content, spec=self._spec, run=self._run, masked=True)
                if self.layout is None:
                    self.layout = (got.names, got.shapes)
                elif (got.names, got.shapes) != self.layout:
                    raise WireError("layout", [Problem("layout", "differs from the other sites'")])
            except Exception as exc:  # noqa: BLE001 - WireError, or anything: a refusal, never a crash
                self.refused[node] = wire_refusal(node, "secagg", msg.content, exc)
                continue
            if got.privacy is not None and got.decline is None and self._anchor is not None:
                admitted = self._anchor(node, got.privacy)
                if isinstance(admitted, BudgetRefusal):
                    self.refused[node] = ledger_refusal(node, "secagg", msg.content, admitted)
                    continue
                self.anchored[str(node)] = dataclasses.asdict(admitted)
            if got.decline is not None:
                self.declined[node] = got.decline
            else:
                self.accepted[node] = got
            keep.append(msg)
        need = max(self._run.min_sites, 2)
        if len(self.accepted) < need:
            log.warning("%d checked contributions < %d: halting before unmasking", len(self.accepted), need)
            too_few = hashlib.sha256(b"too few contributions to unmask safely").hexdigest()[:16]
            self.refused.update({n: refusal_record("too_few", too_few, 1) for n in self.accepted})
            self.accepted, self.layout = {}, None
            return []
        return keep

    def replies(self) -> PhaseReplies:
        """What became of each site asked, once the protocol is over."""
        return PhaseReplies(
            sent=tuple(self._sent),
            accepted=tuple(sorted(self.accepted)),
            declined=dict(sorted(self.declined.items())),
            refused=dict(sorted(self.refused.items())),
            failed=tuple(sorted(self.failed)),
            missing=tuple(n for n in self._sent if n not in self.replied),
        )


def _is_masked_reply(msg: Message) -> bool:
    return msg.has_content() and wire_secagg.FITRES_METRICS in msg.content.config_records


class _RoundStrategy(Strategy):
    """A legacy strategy for exactly one SecAgg+ round: fixed sites in, the unmasked mean out."""

    def __init__(self, grid: Grid, nodes: list[int], parameters: Parameters, round_id: int):
        self._proxies = [GridClientProxy(n, grid, run_id=0) for n in nodes]
        self._fitins = FitIns(parameters, {"round": int(round_id),
                                               wire_version.WIRE_VERSION_FIELD: wire_version.WIRE_VERSION})
        self.mean: list[np.ndarray] | None = None
        self.contributors: set[int] = set()

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        return [(p, self._fitins) for p in self._proxies]

    def aggregate_fit(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list[Any]
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        # SecAgg+ sets every result's parameters to the same unmasked weighted mean.
        if results:
            self.mean = parameters_to_ndarrays(results[0][1].parameters)
            self.contributors = {int(p.node_id) for p, _ in results}
        return None, {}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []

    def aggregate_evaluate(
        self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]], failures: list[Any]
    ) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        return None

