"""Each site's privacy budget, anchored at the coordinator (issue #12 §2).

A site's ledger is authenticated with the site's own secret, so it cannot stop
the site's operator from deleting all state or restoring an old backup and
signing afresh. This registry is the anchor outside the site: per site key it
keeps the last ledger position (``ledger_seq``, ``ledger_head``) and cumulative
epsilon the site reported, and every (sigma, q, steps) run the coordinator has
accepted from it. A train update is refused (typed, the round goes on without
that site) when

- ``ledger_seq`` is not above the last one seen (``rollback``: a restored backup;
  ``fork``: same position, different head; ``replay``: the same ledger state
  again, i.e. no reservation for this round);
- the reported cumulative epsilon is below the last one seen (``epsilon_decreased``);
- the reported cumulative epsilon is below what the coordinator recomputes from
  every run it accepted from that site, this one included, with the reported
  delta and accountant (``epsilon_below_recomputed``; tolerance:
  :func:`shared.accounting.epsilon_tolerance`). The recomputation is
  :func:`shared.accounting.epsilon_lower_bound`: exact for up to 6 distinct
  (sigma, q) runs, a lower bound beyond, so its cost stays bounded whatever
  numbers a site sends.

What it cannot see: a fork at a *higher* sequence number (the coordinator has no
MAC key to verify the chain), rounds the site trained for another coordinator,
or a site that comes back under a new identity. The identity is the SuperNode's
public key when Flower exposes it (node authentication), else the Flower node id,
which a SuperNode that re-registers loses: run with node authentication.

Stored as JSON under the coordinator's state directory (shared by every run of
that coordinator), written temp + fsync + rename after every admitted update, so
a crash leaves the previous or the new state, never a torn file. A file that is
unreadable or whose checksum does not match stops the coordinator: silently
starting afresh would forget every site's position, which is the rollback this
registry exists to catch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from server.site_names import registered_nodes
from shared.accounting import epsilon_lower_bound, epsilon_tolerance
from shared.atomic import PRIVATE, write_atomic
from shared.errors import LedgerError, Problem
from shared.privacy_scalars import PrivacyScalars

STATE_NAME = "site-budgets.json"
FORMAT_VERSION = 1

REFUSAL_CODES = ("rollback", "fork", "replay", "epsilon_decreased", "epsilon_below_recomputed",
                 "accounting_failed")


@dataclass(frozen=True)
class BudgetRefusal:
    """Why an update was refused: typed codes, and problems that quote only numbers we checked."""

    codes: tuple[str, ...]
    problems: tuple[Problem, ...]


@dataclass(frozen=True)
class Admitted:
    """An admitted update: the site's new anchored position and the coordinator's epsilon."""

    site_key: str
    ledger_seq: int
    ledger_head: str
    epsilon: float
    epsilon_recomputed: float


Anchor = Callable[[int, PrivacyScalars], "Admitted | BudgetRefusal"]
"""One round's budget check: (node id, its wire-checked privacy scalars) -> admitted or refused."""


def round_anchor(registry: SiteBudgetRegistry, keys: Mapping[int, str], *, run_name: str,
                 round_id: int) -> Anchor:
    """This round's view of ``registry``: admit one node's privacy record under its site key.

    An admitted update is recorded (and saved) in the registry; a refused one is not.
    """
    def admit(node: int, privacy: PrivacyScalars) -> Admitted | BudgetRefusal:
        return registry.admit(key_for(node, keys), privacy, run_name=run_name, round_id=round_id, node=node)

    return admit


def site_keys(grid: Any) -> dict[int, str]:
    """Node id -> site key for the connected nodes: ``pubkey:<sha256>`` or ``node:<id>``.

    Flower 1.39's ``Grid.get_nodes()`` returns NodeInfo records whose ``public_key``
    is set when SuperNode authentication is on; that key survives a re-registration,
    a node id does not. A grid that cannot list nodes gives node ids only.
    """
    return {node: f"pubkey:{hashlib.sha256(pk).hexdigest()}" if pk else f"node:{node}"
            for node, pk, _name in registered_nodes(grid)}


def key_for(node: int, keys: Mapping[int, str]) -> str:
    """The site key of ``node`` (its node id when the grid gave no better identity)."""
    return keys.get(int(node), f"node:{int(node)}")


class SiteBudgetRegistry:
    """The persistent per-site anchor; see the module docstring."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.sites: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            self.sites = _load(self.path)

    @classmethod
    def open(cls, state_dir: Path) -> SiteBudgetRegistry:
        """The registry in ``state_dir`` (created empty on first use)."""
        return cls(Path(state_dir) / STATE_NAME)

    def get(self, site_key: str) -> dict[str, Any] | None:
        """A copy of what is anchored for ``site_key`` (None if never seen)."""
        rec = self.sites.get(site_key)
        return json.loads(json.dumps(rec)) if rec is not None else None

    def admit(
        self, site_key: str, privacy: PrivacyScalars, *, run_name: str, round_id: int, node: int
    ) -> Admitted | BudgetRefusal:
        """Check one wire-checked privacy record against the anchor; on success record and save it.

        ``privacy`` passed :func:`shared.wire.check_reply` (types and ranges are
        known good). Nothing is recorded for a refused update.
        """
        seq, head, eps = privacy.ledger_seq, privacy.ledger_head, privacy.epsilon
        prev = self.sites.get(site_key)
        codes: list[str] = []
        problems: list[Problem] = []
        if prev is not None:
            if seq == prev["ledger_seq"] and head == prev["ledger_head"]:
                codes.append("replay")
                problems.append(Problem("privacy['ledger_seq']",
                                        f"ledger state {seq} was already anchored (no new reservation)"))
            elif seq == prev["ledger_seq"]:
                codes.append("fork")
                problems.append(Problem("privacy['ledger_head']",
                                        f"ledger {seq} has a different head than anchored: a fork"))
            elif seq < prev["ledger_seq"]:
                codes.append("rollback")
                problems.append(Problem("privacy['ledger_seq']",
                                        f"{seq} < anchored {prev['ledger_seq']}: ledger rolled back"))
            if eps < float(prev["epsilon"]):
                codes.append("epsilon_decreased")
                problems.append(Problem("privacy['epsilon']",
                                        f"{eps:.6g} < anchored {float(prev['epsilon']):.6g}"))
        history = [tuple(h) for h in (prev or {}).get("history", [])]
        history.append((privacy.noise_multiplier, privacy.sample_rate, privacy.steps))
        try:
            recomputed = epsilon_lower_bound(history, delta=privacy.delta, accountant=privacy.accountant)
        except Exception as exc:  # noqa: BLE001 - an accountant failure refuses, never crashes
            codes.append("accounting_failed")
            problems.append(Problem("privacy", f"epsilon recomputation failed ({type(exc).__name__})"))
            recomputed = float("nan")
        else:
            if eps + epsilon_tolerance(recomputed) < recomputed:
                codes.append("epsilon_below_recomputed")
                problems.append(Problem("privacy['epsilon']", f"{eps:.6g} < {recomputed:.6g} recomputed "
                                        "from the runs this site reported"))
        if codes:
            return BudgetRefusal(tuple(codes), tuple(problems))
        nodes = sorted({*(prev or {}).get("nodes", []), int(node)})
        self.sites[site_key] = {
            "ledger_seq": seq, "ledger_head": head, "epsilon": eps, "epsilon_recomputed": recomputed,
            "delta": privacy.delta, "accountant": privacy.accountant,
            "history": [list(h) for h in history], "nodes": nodes[-16:],
            "last_run": str(run_name)[:200], "last_round": int(round_id),
            "updated": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        self.save()
        return Admitted(site_key, seq, head, eps, recomputed)

    def digest(self) -> str:
        """sha256 of the registry's canonical content (anchored in the coordinator's audit log)."""
        return _checksum(self.sites)

    def snapshot(self, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Per site key: anchored seq/head, reported and recomputed epsilon (no run history)."""
        out = {}
        for k in sorted(set(keys)):
            rec = self.sites.get(k)
            if rec is not None:
                out[k] = {f: rec[f] for f in ("ledger_seq", "ledger_head", "epsilon",
                                              "epsilon_recomputed", "delta", "accountant")}
        return out

    def save(self) -> None:
        """Write the registry crash-safely: temp file, fsync, rename, fsync the directory."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = {"format": FORMAT_VERSION, "sites": self.sites, "sha256": _checksum(self.sites)}
        write_atomic(self.path, json.dumps(body, indent=1, sort_keys=True), mode=PRIVATE)


def _checksum(sites: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(sites, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _load(path: Path) -> dict[str, dict[str, Any]]:
    where = str(path)
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LedgerError("coordinator site-budget registry unreadable",
                          [Problem(where, f"cannot read ({type(exc).__name__}); not starting afresh")]) from None
    problems: list[Problem] = []
    if not isinstance(body, dict) or body.get("format") != FORMAT_VERSION:
        problems.append(Problem(where, f"not a format-{FORMAT_VERSION} registry"))
    elif not isinstance(body.get("sites"), dict) or body.get("sha256") != _checksum(body["sites"]):
        problems.append(Problem(where, "checksum mismatch: edited or damaged"))
    else:
        for key, rec in body["sites"].items():
            ok = (isinstance(rec, dict) and isinstance(rec.get("ledger_seq"), int)
                  and isinstance(rec.get("ledger_head"), str)
                  and isinstance(rec.get("epsilon"), int | float) and isinstance(rec.get("history"), list))
            if not ok:
                problems.append(Problem(f"{where}: sites[{key!r:.80}]", "malformed entry"))
    if problems:
        raise LedgerError("coordinator site-budget registry refused", problems)
    return body["sites"]
