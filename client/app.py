"""The site's Flower ClientApp: thin wiring from Flower messages to client/site.py.

Trust model: the coordinator chooses the run config and sends the global
adapter; both are untrusted here (:meth:`RunConfig.from_flower`,
:func:`shared.wire.check_instruction`). The site's own settings come from its
environment (``FEDSYNTH_SITE_*``, .env, secrets dir) and its SuperNode's
``--node-config`` — never from the coordinator. Every reply passes
:func:`shared.wire.check_reply` before it leaves.

Failures never leave as text: Flower would send an exception's message to the
coordinator, and a message can quote private data (a bad note's line, a path).
So every exception is logged locally and replaced by a typed decline
(``budget_exceeded`` or ``site_error``); the round goes on without this site.

Node-config keys (``flower-supernode --node-config "data-dir='/srv/site'"``):
``data-dir`` (notes at ``<data-dir>/notes.jsonl``, output under
``<data-dir>/output``), ``site-id``, ``notes-path``, ``model-dir``,
``output-dir``, ``ledger-path``, ``epsilon-ceiling``, ``k-min``, ``device``.
Simulation only: Flower sets ``partition-id``/``num-partitions``; then
``$FEDSYNTH_SIM_ROOT/site-<partition-id>`` is the data dir unless ``data-dir``
is given, so simulated sites never share a ledger.
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from shared import wire
from shared.errors import BudgetExceededError, ConfigError, Problem
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
            data_dir = Path(root) / f"site-{pid}"
            overrides.setdefault("site_id", f"site-{pid}")
    if problems:
        raise ConfigError("invalid site node config", problems)
    if data_dir is not None:
        overrides.setdefault("notes_path", data_dir / "notes.jsonl")
        overrides.setdefault("output_dir", data_dir / "output")
    return load_settings(SiteSettings, **overrides)


def _spec(settings: SiteSettings, run: RunConfig) -> wire.AdapterSpec:
    raw = _site().adapter_spec(settings, run)
    return {str(k): (tuple(int(d) for d in shape), str(dtype)) for k, (shape, dtype) in raw.items()}


def _to_wire_dtype(adapter: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    # Cast float tensors only: anything else is left as is for check_reply to refuse.
    return {
        k: np.asarray(v).astype(dtype) if np.issubdtype(np.asarray(v).dtype, np.floating) else v
        for k, v in adapter.items()
    }


def train_reply(message: Message, context: Context) -> RecordDict:
    """Run one DP training round at this site and return the checked reply content."""
    try:
        settings = site_settings(dict(context.node_config))
        run = RunConfig.from_flower(dict(context.run_config))
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
        wire.check_reply(content, kind="train", spec=spec, run=run)
        return content
    except Exception:  # fail closed: no exception text may reach the coordinator
        log.exception("train failed at this site; replying with a typed decline")
        return wire.pack_decline("site_error")


def evaluate_reply(message: Message, context: Context) -> RecordDict:
    """Generate and evaluate at this site; return the checked metric summary."""
    try:
        settings = site_settings(dict(context.node_config))
        run = RunConfig.from_flower(dict(context.run_config))
        spec = _spec(settings, run)
        got = wire.check_instruction(message.content, spec=spec, run=run)
        metrics = _site().site_evaluate(settings, run, global_adapter=got.adapter, round_id=got.round_id)
        content = wire.pack_evaluate_reply(metrics)
        wire.check_reply(content, kind="evaluate", spec=None, run=run)
        return content
    except Exception:
        log.exception("evaluate failed at this site; replying with a typed decline")
        return wire.pack_decline("site_error")


@app.train()
def train(message: Message, context: Context) -> Message:
    return Message(train_reply(message, context), reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    return Message(evaluate_reply(message, context), reply_to=message)
