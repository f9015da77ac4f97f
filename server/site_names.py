"""Which site is which: the names the coordinator shows for Flower node ids.

Flower addresses a SuperNode by a random 64-bit node id, which says nothing to a
person reading a report and changes when a SuperNode re-registers. Flower 1.39's
``Grid.get_nodes()`` returns, per node, the ``name`` the SuperNode was registered
under (``flwr supernode register … --name``) and, with node authentication, its
``public_key``. This module turns those into a directory node id -> :class:`SiteName`
that the coordinator uses in its progress lines, summary, audit log, consortium
report and ε plot.

A registered name is text the coordinator did not choose (whoever registered the
node typed it), so it must match :data:`NAME_PATTERN` (the pattern of a site id)
to be shown; anything else, or no name, falls back to ``node-<id>``. When two
nodes claim the same name, only the lowest node id keeps it and the others fall
back to ``node-<id>``, so a name in a report always denotes exactly one node.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from shared.audit import AuditLog

log = logging.getLogger("fedsynth.coordinator")

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # as SiteSettings.site_id


@dataclass(frozen=True)
class SiteName:
    """One node's identity as the coordinator shows it.

    ``name``: the registered name when valid, else ``node-<id>``. ``registered``:
    whether ``name`` came from the registration. ``public_key_sha256``: sha256 (hex)
    of the node's public key as Flower stores it, or None without node authentication.
    """

    node_id: int
    name: str
    registered: bool
    public_key_sha256: str | None


def fallback_name(node_id: int) -> str:
    """The name of a node that registered no usable name."""
    return f"node-{int(node_id)}"


def valid_name(value: Any) -> str | None:
    """``value`` when it is a usable site name, else None (never echoed: it is untrusted)."""
    return value if isinstance(value, str) and NAME_PATTERN.fullmatch(value) else None


def registered_nodes(grid: Any) -> list[tuple[int, bytes, Any]]:
    """(node id, public key bytes or b"", claimed name, untrusted) of every node the grid lists.

    Flower 1.39's ``Grid.get_nodes()`` returns NodeInfo records (``public_key`` set when
    SuperNode authentication is on). A grid that cannot list nodes, or a malformed
    record, gives nothing: callers fall back to node ids.
    """
    try:
        infos = list(grid.get_nodes())
    except Exception:  # noqa: BLE001 - identity and names fall back to node ids
        return []
    out = []
    for info in infos:
        try:
            out.append((int(info.node_id), bytes(getattr(info, "public_key", b"") or b""),
                        getattr(info, "name", None)))
        except (TypeError, ValueError, AttributeError):
            continue
    return out


def site_directory(grid: Any, node_ids: Iterable[int] = ()) -> dict[int, SiteName]:
    """Node id -> :class:`SiteName` for every node ``grid.get_nodes()`` lists, plus ``node_ids``.

    A grid without ``get_nodes`` (or one that fails) gives ``node-<id>`` names.
    Names claimed by more than one node are dropped for all but the lowest node id.
    """
    raw: dict[int, tuple[str | None, str | None]] = {}
    for node, pk, claimed in registered_nodes(grid):
        name = valid_name(claimed)
        if claimed and name is None:
            log.warning("node %d registered a name that is not a valid site name; shown as %s",
                        node, fallback_name(node))
        raw[node] = (name, hashlib.sha256(pk).hexdigest() if pk else None)
    for node in node_ids:
        raw.setdefault(int(node), (None, None))
    out: dict[int, SiteName] = {}
    taken: set[str] = set()
    for node in sorted(raw):
        name, pk = raw[node]
        if name is not None and (name in taken or name.startswith("node-")):
            log.warning("node %d: site name already taken (or reserved); shown as %s",
                        node, fallback_name(node))
            name = None
        if name is not None:
            taken.add(name)
        out[node] = SiteName(node, name or fallback_name(node), name is not None, pk)
    return out


def label(node: int | str, names: Mapping[str, str]) -> str:
    """The name to show for ``node`` given a ``{str(node_id): name}`` map."""
    return names.get(str(node)) or fallback_name(int(node))


def labels(nodes: Iterable[int | str], names: Mapping[str, str]) -> str:
    """Comma-separated names of ``nodes`` (``-`` when empty), for progress lines."""
    shown = [label(n, names) for n in nodes]
    return ", ".join(shown) if shown else "-"


def register_sites(grid: Any, nodes: Iterable[int], known: Mapping[str, str], audit: AuditLog) -> dict[str, str]:
    """``known`` plus a name for each connected node not named yet; each new one audited.

    Returns a new ``{str(node_id): name}`` map; a node already in ``known`` keeps its
    name. The audit entry ``site_registered`` holds the node, its name, whether the
    name was registered, and the sha256 of its public key (never the key itself).
    """
    names = dict(known)
    for node, site in site_directory(grid, nodes).items():
        if str(node) in names:
            continue
        names[str(node)] = site.name
        audit.append("site_registered", {"node": str(node), "site": site.name, "named": site.registered,
                                         "public_key_sha256": site.public_key_sha256})
    return names
