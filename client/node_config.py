"""A site's settings from its environment plus its SuperNode's ``--node-config``.

Node-config keys (``flower-supernode --node-config "data-dir='/srv/site'"``):
``data-dir`` (notes at ``<data-dir>/notes.jsonl``, output under
``<data-dir>/output``), ``site-id``, ``notes-path``, ``model-dir``,
``output-dir``, ``ledger-path``, ``epsilon-ceiling``, ``k-min``, ``device``.
The node config arrives over the SuperNode's local runtime API, so it may only
tighten the environment's settings: ``epsilon-ceiling`` only lower, ``k-min`` only
higher, ``ledger-path`` not other than a set ``FEDSYNTH_SITE_LEDGER_PATH``
(:func:`client.policy.node_config_problems`; a looser value is refused).

Simulation only: Flower sets ``partition-id``/``num-partitions``; then, unless
``data-dir`` is given, partition i uses the i-th (sorted by name) subdirectory of
``$FEDSYNTH_SIM_ROOT`` that holds a ``notes.jsonl``, and the site id is that
directory's name (site-a, site-b, ...): simulated sites never share a ledger.
There, ``<dir>/signing.key`` (when present and no key is configured) is the
site's signing key for its audit log and privacy reports.

Never from the coordinator: the run config it sends cannot name the site's data,
ledger, ceiling or key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from client import policy
from shared.errors import ConfigError, Problem
from shared.settings import SiteSettings, load_settings

# node-config key -> SiteSettings field
NODE_KEYS = {
    "site-id": "site_id",
    "notes-path": "notes_path",
    "model-dir": "model_dir",
    "output-dir": "output_dir",
    "ledger-path": "ledger_path",
    "epsilon-ceiling": "epsilon_ceiling",
    "k-min": "k_min",
    "device": "device",
}
SIM_KEYS = ("partition-id", "num-partitions")
SIM_ROOT_ENV = "FEDSYNTH_SIM_ROOT"


def site_settings(node_config: Mapping[str, Any]) -> SiteSettings:
    """The site's settings: environment + node config (ConfigError lists every bad key).

    Privacy meaning: a node-config value may only tighten the environment's
    ε ceiling, ``k_min`` and ledger path; a looser one is refused, not applied.
    """
    problems: list[Problem] = []
    overrides: dict[str, Any] = {}
    data_dir: Path | None = None
    sim_key: Path | None = None
    for key, value in node_config.items():
        if key in NODE_KEYS:
            overrides[NODE_KEYS[key]] = value
        elif key == "data-dir":
            data_dir = Path(str(value))
        elif key not in SIM_KEYS:
            problems.append(Problem(f"node-config {key!r}", "unknown key"))
    if "partition-id" in node_config and data_dir is None:
        found = _simulated_site_dir(node_config["partition-id"], problems)
        if found is not None:
            data_dir = found
            overrides.setdefault("site_id", data_dir.name)
            # Simulated sites share one environment, so each one's key sits in its own dir.
            sim_key = data_dir / "signing.key"
    if any(f in overrides for f in ("epsilon_ceiling", "k_min", "ledger_path")):
        # Node config comes over the SuperNode's local API: it may only tighten (client/policy.py).
        problems += policy.node_config_problems(
            overrides, load_settings(SiteSettings), keys={v: k for k, v in NODE_KEYS.items()})
    if problems:
        raise ConfigError("invalid site node config", problems)
    if data_dir is not None:
        overrides.setdefault("notes_path", data_dir / "notes.jsonl")
        overrides.setdefault("output_dir", data_dir / "output")
    settings = load_settings(SiteSettings, **overrides)
    if sim_key is not None and settings.signing_key is None and sim_key.is_file():
        settings = load_settings(SiteSettings, **overrides, signing_key=sim_key)
    return settings


def _simulated_site_dir(partition: Any, problems: list[Problem]) -> Path | None:
    """Partition i -> the i-th (by name) dir of ``$FEDSYNTH_SIM_ROOT`` with a notes.jsonl; else a problem."""
    root = os.environ.get(SIM_ROOT_ENV)
    if not root:
        problems.append(Problem(SIM_ROOT_ENV, "simulation needs a root with one site-<id> dir per node"))
        return None
    sites = sorted(d for d in Path(root).iterdir() if (d / "notes.jsonl").is_file()) \
        if Path(root).is_dir() else []
    if not isinstance(partition, int) or isinstance(partition, bool) or not 0 <= partition < len(sites):
        problems.append(Problem(
            SIM_ROOT_ENV,
            f"partition {partition!r} needs at least {partition + 1 if isinstance(partition, int) else '?'} "
            f"site dirs with a notes.jsonl under the simulation root; found {len(sites)}",
        ))
        return None
    return sites[partition]
