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

Node-config keys (``flower-supernode --node-config "data-dir='/srv/site'"``):
``data-dir`` (notes at ``<data-dir>/notes.jsonl``, output under
``<data-dir>/output``), ``site-id``, ``notes-path``, ``model-dir``,
``output-dir``, ``ledger-path``, ``epsilon-ceiling``, ``k-min``, ``device``.
The node config arrives over the SuperNode's local runtime API, so it may only
tighten the environment's settings: ``epsilon-ceiling`` only lower, ``k-min`` only
higher, ``ledger-path`` not other than a set ``FEDSYNTH_SITE_LEDGER_PATH``
(:func:`client.policy.node_config_problems`; a looser value is refused).

Site floors: every path (train, SecAgg+ train, evaluate) tightens the run config
to the site's settings with :func:`floored_run` (:mod:`client.policy`) before the
site functions see it; SecAgg+ stage parameters are checked by
:mod:`client.secagg_guard` before Flower's ``secaggplus_mod`` acts on them.
Simulation only: Flower sets ``partition-id``/``num-partitions``; then, unless
``data-dir`` is given, partition i uses the i-th (sorted by name) subdirectory of
``$FEDSYNTH_SIM_ROOT`` that holds a ``notes.jsonl``, and the site id is that
directory's name (site-a, site-b, ...): simulated sites never share a ledger.
There, ``<dir>/signing.key`` (when present and no key is configured) is the
site's signing key for its audit log and privacy reports.

Secure aggregation (``secagg = true``): the train message then carries Flower's
SecAgg+ protocol and :func:`train` runs it through ``secaggplus_mod``. The mod
calls :func:`secagg_train_reply` once per round; that function applies the same
fail-closed checks as the plain path (instruction, :func:`shared.wire.check_reply`
on the adapter and privacy scalars) BEFORE the mod masks anything, then turns the
adapter into this site's contribution (delta against the global adapter, L2 norm
bounded here at ``update-norm-bound`` because the coordinator no longer can, every
coordinate clipped to ``secagg-clipping-range``) and checks that too
(:func:`shared.wire_secagg.check_secagg_reply`).

Site policy ``require_secagg`` (``FEDSYNTH_SITE_REQUIRE_SECAGG=true``): a plain
train message is declined (``secagg_required``) right after the site's settings
are read — before the run config, the instruction, training or the privacy
ledger — whatever the coordinator's run config says; the refusal is logged and
written to the site's audit log. SecAgg+ rounds are unaffected, and so are
evaluate messages (metric summaries of the global adapter, which are sent in the
clear under SecAgg+ too).
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp

from client import policy, secagg_guard
from shared import wire, wire_secagg
from shared.errors import (
    BudgetExceededError,
    ConfigError,
    EvaluationBudgetError,
    Problem,
)
from shared.run_config import RunConfig
from shared.settings import SiteSettings, load_settings

log = logging.getLogger("fedsynth.site")

app = ClientApp()

# node-config key -> SiteSettings field
_NODE_KEYS = {
    "site-id": "site_id",
    "notes-path": "notes_path",
    "model-dir": "model_dir",
    "output-dir": "output_dir",
    "ledger-path": "ledger_path",
    "epsilon-ceiling": "epsilon_ceiling",
    "k-min": "k_min",
    "device": "device",
}
_SIM_KEYS = ("partition-id", "num-partitions")


def _site() -> ModuleType:
    # Imported at call time: the site functions are heavy (torch, transformers),
    # and tests substitute a fake module through sys.modules.
    return importlib.import_module("client.site")


def site_settings(node_config: dict[str, Any]) -> SiteSettings:
    """The site's settings: environment + node config (ConfigError lists every bad key)."""
    problems: list[Problem] = []
    overrides: dict[str, Any] = {}
    data_dir: Path | None = None
    sim_key: Path | None = None
    for key, value in node_config.items():
        if key in _NODE_KEYS:
            overrides[_NODE_KEYS[key]] = value
        elif key == "data-dir":
            data_dir = Path(str(value))
        elif key not in _SIM_KEYS:
            problems.append(Problem(f"node-config {key!r}", "unknown key"))
    if "partition-id" in node_config and data_dir is None:
        root = os.environ.get("FEDSYNTH_SIM_ROOT")
        if not root:
            problems.append(
                Problem("FEDSYNTH_SIM_ROOT", "simulation needs a root with one site-<id> dir per node")
            )
        else:
            pid = node_config["partition-id"]
            sites = sorted(d for d in Path(root).iterdir() if (d / "notes.jsonl").is_file()) \
                if Path(root).is_dir() else []
            if not isinstance(pid, int) or isinstance(pid, bool) or not 0 <= pid < len(sites):
                problems.append(Problem(
                    "FEDSYNTH_SIM_ROOT",
                    f"partition {pid!r} needs at least {pid + 1 if isinstance(pid, int) else '?'} "
                    f"site dirs with a notes.jsonl under the simulation root; found {len(sites)}",
                ))
            else:
                data_dir = sites[pid]
                overrides.setdefault("site_id", data_dir.name)
                # Simulated sites share one environment, so each one's key sits in its own dir.
                sim_key = data_dir / "signing.key"
    if any(f in overrides for f in ("epsilon_ceiling", "k_min", "ledger_path")):
        # Node config comes over the SuperNode's local API: it may only tighten (client/policy.py).
        problems += policy.node_config_problems(
            overrides, load_settings(SiteSettings), keys={v: k for k, v in _NODE_KEYS.items()})
    if problems:
        raise ConfigError("invalid site node config", problems)
    if data_dir is not None:
        overrides.setdefault("notes_path", data_dir / "notes.jsonl")
        overrides.setdefault("output_dir", data_dir / "output")
    settings = load_settings(SiteSettings, **overrides)
    if sim_key is not None and settings.signing_key is None and sim_key.is_file():
        settings = load_settings(SiteSettings, **overrides, signing_key=sim_key)
    return settings


def _spec(settings: SiteSettings, run: RunConfig) -> wire.AdapterSpec:
    raw = _site().adapter_spec(settings, run)
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
    record = message.content.config_records.get(wire.INSTRUCTION_KEY)
    value = record.get("round") if record is not None else None
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 1_000_000:
        return value
    return None


def _audit_log(settings: SiteSettings) -> Any:
    try:
        return _site().audit_log(settings)
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
        _site().audit_log(settings).append("update_rejected", data)
    except Exception:  # the decline stands; the warning above is the record of last resort
        log.exception("could not write the secagg_required refusal to the site's audit log")
    return wire.pack_decline("secagg_required")


def version_decline(content: RecordDict, *, phase: str) -> str | None:
    """``"wire_version"`` when the coordinator speaks another wire version, logged; else None.

    Checked before anything else: nothing is trained or evaluated for a peer whose
    messages this site cannot read with certainty (:data:`shared.wire.WIRE_VERSION`).
    """
    problem = wire.version_problem(content, side="instruction")
    if problem is None:
        return None
    log.warning("%s round declined (wire_version): %s", phase, problem.reason)
    return "wire_version"


def train_reply(message: Message, context: Context) -> RecordDict:
    """Run one DP training round at this site and return the checked reply content.

    This is the plain (non-SecAgg+) path: a site with ``require_secagg`` declines here.
    """
    if version_decline(message.content, phase="train"):
        return wire.pack_decline("wire_version")
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
        site = _site()
        try:
            adapter, privacy = site.site_train(
                settings, run, global_adapter=got.adapter, round_id=got.round_id
            )
        except BudgetExceededError as exc:
            log.warning("round %d declined: %s", got.round_id, exc)
            return wire.pack_decline("budget_exceeded")
        content = wire.pack_train_reply(_to_wire_dtype(adapter, run.lora.dtype), privacy)
        reply = wire.check_reply(content, kind="train", spec=spec, run=run)
        # Only now is the update leaving: the ledger's "released" record comes after the check.
        site.release_update(settings, reply.privacy)
        return content
    except Exception:  # fail closed: no exception text may reach the coordinator
        log.exception("train failed at this site; replying with a typed decline")
        return wire.pack_decline("site_error")


class SiteDeclinedError(Exception):
    """Raised inside the SecAgg+ protocol when this site cannot even send a zero contribution.

    Its text is fixed (Flower forwards exception text to the coordinator); the
    coordinator sees this site drop out of the round.
    """

    def __init__(self) -> None:
        super().__init__("site_error")


def secagg_contribution(
    adapter: dict[str, np.ndarray], global_adapter: dict[str, np.ndarray] | None, run: RunConfig
) -> dict[str, np.ndarray]:
    """What this site puts into the secure sum (float64), mirroring server/strategy.aggregate.

    Delta against the global adapter; in round 1 (no global) lora_B against its
    zero init and lora_A as absolute values (the seeded init the coordinator never
    sees). The delta (A excluded in round 1) is scaled to L2 norm <= update-norm-bound
    (0 = off) — here, because the coordinator only sees the sum — and every
    coordinate is clipped to ±secagg-clipping-range (SecAgg+ quantises in that range).
    """
    out = {k: np.asarray(v, dtype=np.float64) for k, v in adapter.items()}
    if global_adapter is not None:
        bounded = {k: v - np.asarray(global_adapter[k], dtype=np.float64) for k, v in out.items()}
    else:
        bounded = {k: v for k, v in out.items() if k.endswith(".lora_B.weight")}
    bound = run.update_norm_bound
    norm = float(np.sqrt(sum(float(np.sum(v * v)) for v in bounded.values())))
    if bound > 0 and norm > bound:
        bounded = {k: v * (bound / norm) for k, v in bounded.items()}
    out.update(bounded)
    limit = run.secagg_clipping_range
    clipped = sum(int(np.count_nonzero(np.abs(v) > limit)) for v in out.values())
    if clipped:
        # Logged here only: the count is not on the wire whitelist.
        log.warning("secagg: %d coordinates outside ±%g clipped (raise secagg-clipping-range?)",
                    clipped, limit)
    return {k: np.clip(v, -limit, limit) for k, v in out.items()}


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
        if version_decline(RecordDict({wire.INSTRUCTION_KEY: cfg if cfg is not None else ConfigRecord()}),
                           phase="secagg train"):
            return _checked_secagg(wire_secagg.pack_secagg_reply(zeros, weight=0, decline="wire_version"),
                                   spec, run)
        got = wire_secagg.unpack_secagg_instruction(message.content, spec=spec, run=run)
        try:
            adapter, privacy = _site().site_train(
                settings, run, global_adapter=got.adapter, round_id=got.round_id
            )
        except BudgetExceededError as exc:
            log.warning("round %d declined: %s", got.round_id, exc)
            return _checked_secagg(wire_secagg.pack_secagg_reply(zeros, weight=0, decline="budget_exceeded"),
                                   spec, run)
        adapter = _to_wire_dtype(adapter, run.lora.dtype)
        reply = wire.check_reply(wire.pack_train_reply(adapter, privacy), kind="train", spec=spec, run=run)
        contribution = secagg_contribution(reply.adapter, got.adapter, run)
        weight = wire_secagg.secagg_weight(reply.privacy.patients_bucket, run)
        content = _checked_secagg(
            wire_secagg.pack_secagg_reply(contribution, weight=weight, privacy=reply.privacy.to_record()),
            spec, run
        )
        _site().release_update(settings, reply.privacy)  # after every check, as on the plain path
        return content
    except Exception:  # fail closed: no exception text may reach the coordinator
        log.exception("secagg train failed at this site; sending a zero, weight-0 decline")
        try:
            return _checked_secagg(wire_secagg.pack_secagg_reply(zeros, weight=0, decline="site_error"), spec, run)
        except Exception as exc:
            raise SiteDeclinedError() from exc


def _checked_secagg(content: RecordDict, spec: wire.AdapterSpec, run: RunConfig) -> RecordDict:
    wire_secagg.check_secagg_reply(content, spec=spec, run=run, masked=False)
    return content


def _secagg_train(message: Message, context: Context) -> Message:
    return Message(secagg_train_reply(message, context), reply_to=message)


def evaluate_reply(message: Message, context: Context) -> RecordDict:
    """Generate and evaluate at this site; return the checked metric summary."""
    if version_decline(message.content, phase="evaluate"):
        return wire.pack_decline("wire_version")
    try:
        settings = site_settings(dict(context.node_config))
        run = floored_run(RunConfig.from_flower(dict(context.run_config)), settings,
                          phase="evaluate", message=message)
        spec = _spec(settings, run)
        got = wire.check_instruction(message.content, spec=spec, run=run)
        try:
            metrics = _site().site_evaluate(settings, run, global_adapter=got.adapter, round_id=got.round_id)
        except (BudgetExceededError, EvaluationBudgetError) as exc:  # the metric release is a DP spend
            log.warning("evaluate round %d declined: %s", got.round_id, exc)
            return wire.pack_decline(
                "evaluation_budget" if isinstance(exc, EvaluationBudgetError) else "budget_exceeded"
            )
        content = wire.pack_evaluate_reply(metrics)
        wire.check_reply(content, kind="evaluate", spec=None, run=run)
        return content
    except Exception:
        log.exception("evaluate failed at this site; replying with a typed decline")
        return wire.pack_decline("site_error")


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
