"""The site's Flower ClientApp: thin wiring from Flower messages to client/site.py.

Trust model: the coordinator chooses the run config and sends the global
adapter; both are untrusted here (:meth:`RunConfig.from_flower`,
:func:`shared.wire.check_instruction`). The site's own settings come from its
environment (``FEDSYNTH_SITE_*``, .env, secrets dir) and its SuperNode's
``--node-config`` — never from the coordinator. Every reply passes
:func:`shared.wire.check_reply` before it leaves; only then is the update marked
released in the site's privacy ledger (:func:`client.site.release_update`).

Failures never leave as text: Flower would send an exception's message to the
coordinator, and a message can quote private data (a bad note's line, a path).
So every exception is logged locally and replaced by a typed decline
(``budget_exceeded`` or ``site_error``); the round goes on without this site.

The site's settings: its environment plus its SuperNode's ``--node-config``
(:func:`client.node_config.site_settings`: which keys, how they may only tighten
the environment, and the simulation's per-partition site dirs).

Site floors: every path (train, SecAgg+ train, evaluate) tightens the run config
to the site's settings with :func:`floored_run` (:mod:`client.policy`) before the
site functions see it; SecAgg+ stage parameters are checked by
:mod:`client.secagg_guard` before Flower's ``secaggplus_mod`` acts on them.

Secure aggregation (``secagg = true``): the train message then carries Flower's
SecAgg+ protocol and :func:`train` runs it through ``secaggplus_mod``. The mod
calls :func:`secagg_train_reply` once per round; that function applies the same
fail-closed checks as the plain path (instruction, :func:`shared.wire.check_reply`
on the adapter and privacy scalars) BEFORE the mod masks anything, then turns the
adapter into this site's contribution (:func:`shared.wire_secagg.secagg_contribution`:
the coordinator's own aggregation maths, delta against the global adapter, L2 norm
bounded here at ``update-norm-bound`` because the coordinator no longer can, every
coordinate clipped to ``secagg-clipping-range``) and checks that too
(:func:`shared.wire_secagg.check_secagg_reply`).

The site functions are :mod:`client.site`'s, called through this module's
``site`` name (tests swap in a fake site by patching that attribute). Importing
this module imports torch and transformers with them.

Site policy ``require_secagg`` (``FEDSYNTH_SITE_REQUIRE_SECAGG=true``): a plain
train message is declined (``secagg_required``) right after the site's settings
are read — before the run config, the instruction, training or the privacy
ledger — whatever the coordinator's run config says; the refusal is logged and
written to the site's audit log. SecAgg+ rounds are unaffected, and so are
evaluate messages (metric summaries of the global adapter, which are sent in the
clear under SecAgg+ too).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp

from client import policy, secagg_guard, site
from client.node_config import site_settings
from shared import adapter_spec, wire, wire_pack, wire_secagg, wire_version
from shared.errors import (
    BudgetExceededError,
    ConfigError,
    EvaluationBudgetError,
)
from shared.run_config import RunConfig
from shared.settings import SiteSettings

log = logging.getLogger("fedsynth.site")

app = ClientApp()

def _spec(settings: SiteSettings, run: RunConfig) -> adapter_spec.AdapterSpec:
    raw = site.adapter_spec(settings, run)
    return {str(k): (tuple(int(d) for d in shape), str(dtype)) for k, (shape, dtype) in raw.items()}


def _to_wire_dtype(adapter: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    # Cast float tensors only: anything else is left as is for check_reply to refuse.
    return {
        k: np.asarray(v).astype(dtype) if np.issubdtype(np.asarray(v).dtype, np.floating) else v
        for k, v in adapter.items()
    }


def _claimed_round(message: Message) -> int | None:
    # For the local log and audit entry only: the instruction is not checked (no adapter spec
    # is built for a refused round), so anything but a plausible round number is dropped.
    record = message.content.config_records.get(wire_version.INSTRUCTION_KEY)
    value = record.get("round") if record is not None else None
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 1_000_000:
        return value
    return None


def _audit_log(settings: SiteSettings) -> Any:
    try:
        return site.audit_log(settings)
    except Exception:  # best effort: the caller's log line is the record of last resort
        log.exception("the site's audit log is not available")
        return None


def floored_run(run: RunConfig, settings: SiteSettings, *, phase: str, message: Message) -> RunConfig:
    """``run`` tightened to the site's floors (:func:`client.policy.floor_run`, the one place)."""
    return policy.floor_run(run, settings, phase=phase, round_id=_claimed_round(message),
                            audit=lambda: _audit_log(settings))


def refuse_plain_round(message: Message, settings: SiteSettings) -> RecordDict:
    """The ``secagg_required`` decline for a plain train message at a ``require_secagg`` site.

    Privacy meaning: nothing derived from the site's notes is computed or sent — no
    training, no ledger reservation (no epsilon spent). The refusal goes to the local
    log and, best effort, to the site's audit log as ``update_rejected``.
    """
    round_id = _claimed_round(message)
    log.warning("round %s declined (secagg_required): FEDSYNTH_SITE_REQUIRE_SECAGG is true and this "
                "train message is not a SecAgg+ one; nothing was trained or sent",
                "?" if round_id is None else round_id)
    data: dict[str, Any] = {"phase": "train", "reason": "secagg_required"}
    if round_id is not None:
        data["round"] = round_id
    try:
        site.audit_log(settings).append("update_rejected", data)
    except Exception:  # the decline stands; the warning above is the record of last resort
        log.exception("could not write the secagg_required refusal to the site's audit log")
    return wire_pack.pack_decline("secagg_required")


def version_decline(content: RecordDict, *, phase: str) -> str | None:
    """``"wire_version"`` when the coordinator speaks another wire version, logged; else None.

    Checked before anything else: nothing is trained or evaluated for a peer whose
    messages this site cannot read with certainty (:data:`shared.wire_version.WIRE_VERSION`).
    """
    problem = wire_version.version_problem(content, side="instruction")
    if problem is None:
        return None
    log.warning("%s round declined (wire_version): %s", phase, problem.reason)
    return "wire_version"


def _train_within_budget(
    settings: SiteSettings, run: RunConfig, got: wire.Instruction
) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """:func:`client.site.site_train` on the checked instruction; None (logged) when the round
    would pass the site's ε ceiling: nothing was trained or spent, the caller declines."""
    try:
        return site.site_train(settings, run, global_adapter=got.adapter, round_id=got.round_id)
    except BudgetExceededError as exc:
        log.warning("round %d declined: %s", got.round_id, exc)
        return None


def train_reply(message: Message, context: Context) -> RecordDict:
    """Run one DP training round at this site and return the checked reply content.

    This is the plain (non-SecAgg+) path: a site with ``require_secagg`` declines here.
    """
    if version_decline(message.content, phase="train"):
        return wire_pack.pack_decline("wire_version")
    try:
        settings = site_settings(dict(context.node_config))
        if settings.require_secagg:
            return refuse_plain_round(message, settings)
        run = floored_run(RunConfig.from_flower(dict(context.run_config)), settings,
                          phase="train", message=message)
        if run.secagg:
            # The run promises secure aggregation: never send this update in the clear.
            raise ConfigError("secagg = true but the train message is not a SecAgg+ one")
        spec = _spec(settings, run)
        got = wire.check_instruction(message.content, spec=spec, run=run)
        trained = _train_within_budget(settings, run, got)
        if trained is None:
            return wire_pack.pack_decline("budget_exceeded")
        adapter, privacy = trained
        content = wire_pack.pack_train_reply(_to_wire_dtype(adapter, run.lora.dtype), privacy)
        reply = wire.check_reply(content, kind="train", spec=spec, run=run)
        # Only now is the update leaving: the ledger's "released" record comes after the check.
        site.release_update(settings, reply.privacy)
        return content
    except Exception:  # fail closed: no exception text may reach the coordinator
        log.exception("train failed at this site; replying with a typed decline")
        return wire_pack.pack_decline("site_error")


class SiteDeclinedError(Exception):
    """Raised inside the SecAgg+ protocol when this site cannot even send a zero contribution.

    Its text is fixed (Flower forwards exception text to the coordinator); the
    coordinator sees this site drop out of the round.
    """

    def __init__(self) -> None:
        super().__init__("site_error")


def secagg_train_reply(message: Message, context: Context) -> RecordDict:
    """The train function under SecAgg+ (called by secaggplus_mod): checked legacy FitRes content.

    Same checks as :func:`train_reply` on the adapter and privacy scalars before
    anything is masked; a decline (budget, any failure) becomes a zero contribution
    with weight 0 so the protocol completes without this site's data.
    """
    try:
        settings = site_settings(dict(context.node_config))
        run = floored_run(RunConfig.from_flower(dict(context.run_config)), settings,
                          phase="train", message=message)
        spec = _spec(settings, run)
    except Exception as exc:
        log.exception("secagg train: no site settings/adapter spec; dropping out of the round")
        raise SiteDeclinedError() from exc
    zeros = {k: np.zeros(shape, np.float64) for k, (shape, _d) in spec.items()}
    try:
        if not run.secagg:
            raise ConfigError("a SecAgg+ train message but the run config says secagg = false")
        cfg = message.content.config_records.get("fitins.config")
        if version_decline(RecordDict({wire_version.INSTRUCTION_KEY: cfg if cfg is not None else ConfigRecord()}),
                           phase="secagg train"):
            return _checked_secagg(wire_secagg.pack_secagg_reply(zeros, weight=0, decline="wire_version"),
                                   spec, run)
        got = wire_secagg.unpack_secagg_instruction(message.content, spec=spec, run=run)
        trained = _train_within_budget(settings, run, got)
        if trained is None:
            return _checked_secagg(wire_secagg.pack_secagg_reply(zeros, weight=0, decline="budget_exceeded"),
                                   spec, run)
        adapter, privacy = trained
        adapter = _to_wire_dtype(adapter, run.lora.dtype)
        reply = wire.check_reply(wire_pack.pack_train_reply(adapter, privacy), kind="train", spec=spec, run=run)
        contribution, clipped = wire_secagg.secagg_contribution(reply.adapter, got.adapter, run)
        if clipped:  # logged here only: the count is not on the wire whitelist
            log.warning("secagg: %d coordinates outside ±%g clipped (raise secagg-clipping-range?)",
                        clipped, run.secagg_clipping_range)
        weight = wire_secagg.secagg_weight(reply.privacy.patients_bucket, run)
        content = _checked_secagg(
            wire_secagg.pack_secagg_reply(contribution, weight=weight, privacy=reply.privacy.to_record()),
            spec, run
        )
        site.release_update(settings, reply.privacy)  # after every check, as on the plain path
        return content
    except Exception:  # fail closed: no exception text may reach the coordinator
        log.exception("secagg train failed at this site; sending a zero, weight-0 decline")
        try:
            return _checked_secagg(wire_secagg.pack_secagg_reply(zeros, weight=0, decline="site_error"), spec, run)
        except Exception as exc:
            raise SiteDeclinedError() from exc


def _checked_secagg(content: RecordDict, spec: adapter_spec.AdapterSpec, run: RunConfig) -> RecordDict:
    wire_secagg.check_secagg_reply(content, spec=spec, run=run, masked=False)
    return content


def _secagg_train(message: Message, context: Context) -> Message:
    return Message(secagg_train_reply(message, context), reply_to=message)


def evaluate_reply(message: Message, context: Context) -> RecordDict:
    """Generate and evaluate at this site; return the checked metric summary."""
    if version_decline(message.content, phase="evaluate"):
        return wire_pack.pack_decline("wire_version")
    try:
        settings = site_settings(dict(context.node_config))
        run = floored_run(RunConfig.from_flower(dict(context.run_config)), settings,
                          phase="evaluate", message=message)
        spec = _spec(settings, run)
        got = wire.check_instruction(message.content, spec=spec, run=run)
        try:
            metrics = site.site_evaluate(settings, run, global_adapter=got.adapter, round_id=got.round_id)
        except (BudgetExceededError, EvaluationBudgetError) as exc:  # the metric release is a DP spend
            log.warning("evaluate round %d declined: %s", got.round_id, exc)
            return wire_pack.pack_decline(
                "evaluation_budget" if isinstance(exc, EvaluationBudgetError) else "budget_exceeded"
            )
        content = wire_pack.pack_evaluate_reply(metrics)
        wire.check_reply(content, kind="evaluate", spec=None, run=run)
        return content
    except Exception:
        log.exception("evaluate failed at this site; replying with a typed decline")
        return wire_pack.pack_decline("site_error")


@app.train()
def train(message: Message, context: Context) -> Message:
    # secaggplus_mod is applied per message rather than as an app-wide mod: it
    # requires its protocol record and would fail on a plain (secagg = false) round.
    if wire_secagg.SECAGG_CONFIGS_KEY in message.content.config_records:
        # Our check of the SecAgg+ stage parameters runs first: Flower's mod trusts them.
        return secagg_guard.guard_mod(
            message, context, lambda m, c: secaggplus_mod(m, c, _secagg_train),
            settings=lambda c: site_settings(dict(c.node_config)), audit=_audit_log,
            declined=SiteDeclinedError)
    return Message(train_reply(message, context), reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    return Message(evaluate_reply(message, context), reply_to=message)
