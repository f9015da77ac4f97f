"""The wire contract's version (:mod:`shared.wire`): carried by every message, checked first.

Every reply holds a ``wire`` record ``{"version": WIRE_VERSION}``; every instruction's
``instruction`` record holds ``wire_version``. A peer that speaks another version is
refused before anything else it sent is read, with a message naming both versions
and the side to upgrade.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ConfigRecord, RecordDict

from shared.errors import Problem, WireError
from shared.wire_numbers import is_int

WIRE_VERSION = 2
"""Version of the wire contract. Both sides refuse a peer with another one.

v1: unversioned (before issue #13). v2: versioned records, six-digit privacy floats,
bounded ints, bucketed counts, the ``wire_version`` decline, the adapter spec known
from round 1. Bump it with every change to what a record may hold or how it is
packed (dtype, layout, number rules).
"""
WIRE_KEY = "wire"  # the reply record holding {"version": WIRE_VERSION}
INSTRUCTION_KEY = "instruction"  # the instruction's record (shared.wire's layout)
WIRE_VERSION_FIELD = "wire_version"  # its key holding WIRE_VERSION
VERSION_WHERE = "wire version"  # Problem.where of a version refusal
_MAX_VERSION = 1_000_000


def wire_record() -> ConfigRecord:
    """The ``wire`` record every reply carries: this side's :data:`WIRE_VERSION`."""
    return ConfigRecord({"version": WIRE_VERSION})


def refusal_codes(exc: BaseException) -> tuple[str, ...]:
    """Typed codes of a refusal for the coordinator's records: ``("wire_version",)`` or ``()``.

    Only codes, never problem text: the text may name what the site sent.
    """
    if isinstance(exc, WireError) and any(p.where == VERSION_WHERE for p in exc.problems):
        return ("wire_version",)
    return ()


def version_problem(content: Any, *, side: str) -> Problem | None:
    """None when ``content`` speaks :data:`WIRE_VERSION`; else the Problem naming both versions.

    ``side``: ``"reply"`` (the peer is a site) or ``"instruction"`` (the peer is the
    coordinator). The peer's version is quoted only as a bounded int, never as sent.
    """
    peer = "site" if side == "reply" else "coordinator"
    got: Any = None
    present = False  # a version record/key is there (however malformed): not a v1 peer
    try:
        if side == "reply":
            rec = content.get(WIRE_KEY) if isinstance(content, RecordDict) else None
            present = rec is not None
            ok_keys = isinstance(rec, ConfigRecord) and set(rec.keys()) == {"version"}
            got = rec.get("version") if ok_keys else None
        else:
            rec = content.get(INSTRUCTION_KEY) if isinstance(content, RecordDict) else None
            present = isinstance(rec, ConfigRecord) and WIRE_VERSION_FIELD in rec
            got = rec.get(WIRE_VERSION_FIELD) if present else None
    except Exception:  # noqa: BLE001 - malformed content: an unreadable version
        got, present = None, True
    if is_int(got) and got == WIRE_VERSION:
        return None
    if not present:
        theirs = "v1 (unversioned)"
    elif is_int(got) and 0 <= got <= _MAX_VERSION:
        theirs = f"v{got}"
    else:
        theirs = "an unreadable version"
    older = not is_int(got) or got < WIRE_VERSION
    upgrade = "the site" if older == (side == "reply") else "the coordinator"
    return Problem(VERSION_WHERE, f"the {peer} speaks wire {theirs}, this side v{WIRE_VERSION}: "
                                  f"upgrade {upgrade} so both run the same fedsynth wire version")
