"""The wire contract: everything that may leave a site, by name, and its checks.

This is the only door out of a site. Every ClientApp reply goes through
:func:`check_reply` before it is sent, and the ServerApp applies the same check
on receipt; what a site receives goes through :func:`check_instruction`. Each
check fails closed and raises one :class:`~shared.errors.WireError` listing
every violation.

What may cross (see the record layout below):

- ``adapter``: LoRA tensors only, names and shapes exactly the run's adapter
  spec, finite values, the run's wire dtype, canonical numpy bytes;
- ``privacy``: exactly :data:`PRIVACY_KEYS`, scalar types and ranges checked;
- ``metrics``: names in :data:`METRIC_NAMES`, finite scalars with at most six
  significant digits (a float is otherwise an 8-byte covert channel);
- ``decline``: a typed reason from :data:`DECLINE_REASONS`;
- ``wire``: ``{"version": WIRE_VERSION}`` in every reply (instructions carry
  ``wire_version``): a peer speaking another version is refused with a message
  naming both versions, before anything else is read.

Numbers: every float that crosses (privacy scalars, metrics) has at most six
significant digits (:func:`round_sig`; the site rounds before sending and both
sides refuse more), every int is bounded, metric ints obey the same six-digit
rule, and ``count.*`` metrics are buckets (multiples of 10).

Nothing else: no free strings, no note ids, no generated text, no extra records.

Every check is total: whatever it is given (wrong types, nesting, huge or NaN
numbers, odd unicode), it returns or raises :class:`~shared.errors.WireError`,
never another exception, so one site's malformed reply is a typed refusal of
that reply and never ends the run (:func:`fail_closed`).

The record layout and its packers: :mod:`shared.wire_pack`; the adapter record:
:mod:`shared.wire_adapter`; number rules: :mod:`shared.wire_numbers`; the version:
:mod:`shared.wire_version`.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from shared.adapter_spec import AdapterSpec
from shared.errors import Problem, WireError
from shared.privacy_scalars import PRIVACY_KEYS, PrivacyScalars
from shared.whitelist import ACCOUNTANTS, METRIC_NAMES
from shared.wire_adapter import check_adapter_record
from shared.wire_numbers import (
    MAX_COUNT_BUCKET,
    MAX_METRIC_ABS,
    MAX_PATIENTS_BUCKET,
    MAX_PRIVACY_ABS,
    MAX_STEPS,
    MIN_PRIVACY_ABS,
    PRIVACY_REAL_KEYS,
    SIG_DIGITS,
    is_count_bucket,
    is_int,
    is_num,
    six_digits,
)
from shared.wire_pack import ADAPTER_KEY, DECLINE_KEY, DECLINE_REASONS, METRICS_KEY, PRIVACY_KEY
from shared.wire_version import INSTRUCTION_KEY, WIRE_KEY, WIRE_VERSION_FIELD, version_problem

if TYPE_CHECKING:
    from shared.run_config import RunConfig

REPLY_KINDS = ("train", "evaluate")
_MAX_ROUND = 1_000_000
_MAX_LEDGER_SEQ = 10**12
_LEDGER_HEAD_RE = re.compile(r"[0-9a-f]{64}")  # used with fullmatch: no trailing newline
INTERNAL_FAILURE = "check failed on malformed input"
"""Reason of the fallback refusal :func:`fail_closed` gives when a check itself raised."""


@dataclass(frozen=True)
class Reply:
    """A reply that passed :func:`check_reply`; exactly one layout is filled."""

    kind: str
    adapter: dict[str, np.ndarray] | None = None
    privacy: PrivacyScalars | None = None  # checked and typed (shared.privacy_scalars)
    metrics: dict[str, float] | None = None
    decline: str | None = None


@dataclass(frozen=True)
class Instruction:
    """What a site received from the coordinator, after :func:`check_instruction`."""

    round_id: int
    adapter: dict[str, np.ndarray] | None


# ---- checking --------------------------------------------------------------

_F = TypeVar("_F", bound=Callable[..., Any])


def fail_closed(what: str) -> Callable[[_F], _F]:
    """Make a check total: any exception other than WireError becomes a WireError.

    The checks are written not to raise on any input (the fuzz tests in
    tests/shared/test_wire_fuzz.py assert this fallback is never reached); this is
    the safety net so that one site's malformed reply can only ever be refused.
    The exception's message is dropped: it could quote what the site sent.
    """

    def deco(fn: _F) -> _F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except WireError:
                raise
            except Exception as exc:  # noqa: BLE001 - fail closed on anything
                raise WireError(f"{what} refused", [
                    Problem("content", f"{INTERNAL_FAILURE} ({type(exc).__name__})")]) from None

        return wrapper  # type: ignore[return-value]

    return deco


def refusal_digest(content: Any) -> str:
    """A short sha256 (16 hex) naming what was refused, for logs and audit entries.

    Refusals are recorded by this digest, never by content: a refused reply may
    carry anything, including text a site must not send. Flower's content id
    (sha256 of the serialized records) when it can be computed, else a hash of
    the object's repr.
    """
    try:
        oid = str(content.object_id)
    except Exception:  # noqa: BLE001 - any content, however malformed, gets a digest
        try:
            oid = repr(content)
        except Exception:  # noqa: BLE001
            oid = type(content).__name__
    return hashlib.sha256(oid.encode("utf-8", "replace")).hexdigest()[:16]


@fail_closed("reply")
def check_reply(content: RecordDict, *, kind: str, spec: AdapterSpec | None, run: RunConfig) -> Reply:
    """Check one ClientApp reply against the wire contract; fail closed.

    Called by the site on what it is about to send and by the coordinator on
    what it received. ``spec`` is the exact adapter layout expected (the site's
    own, or the coordinator's run spec from round 1: server.app.run_adapter_spec);
    ``None`` (evaluate replies, or a caller with no spec) checks LoRA structure and
    rank ``run.lora.r`` only. A peer of another :data:`WIRE_VERSION` is refused
    before anything else is read. Raises :class:`WireError` listing every violation.
    """
    problems: list[Problem] = []
    if kind not in REPLY_KINDS:
        raise WireError("reply refused", [Problem("kind", f"unknown reply kind {kind!r}")])
    if not isinstance(content, RecordDict):
        raise WireError("reply refused", [Problem("content", "not a RecordDict")])
    version = version_problem(content, side="reply")
    if version is not None:  # nothing else is read from a peer of another version
        raise WireError("reply refused: wire version mismatch", [version])
    keys = set(content.keys()) - {WIRE_KEY}
    if keys == {DECLINE_KEY}:
        reason = check_decline(content[DECLINE_KEY], problems)
        _raise(problems)
        return Reply(kind=kind, decline=reason)
    allowed = {ADAPTER_KEY, PRIVACY_KEY} if kind == "train" else {METRICS_KEY}
    for key in sorted(keys - allowed):
        problems.append(Problem(f"record[{key!r:.60}]", f"not allowed in a {kind} reply"))
    for key in sorted(allowed - keys):
        problems.append(Problem(f"record[{key!r}]", f"missing from the {kind} reply"))
    if kind == "train":
        adapter = privacy = None
        if ADAPTER_KEY in content:
            adapter = check_adapter_record(content[ADAPTER_KEY], spec, run, problems, ADAPTER_KEY)
        if PRIVACY_KEY in content:
            privacy = check_privacy(content[PRIVACY_KEY], run, problems)
        _raise(problems)
        return Reply(kind=kind, adapter=adapter,
                     privacy=PrivacyScalars.from_record(privacy) if privacy is not None else None)
    metrics = _check_metrics(content[METRICS_KEY], problems) if METRICS_KEY in content else None
    _raise(problems)
    return Reply(kind=kind, metrics=metrics)


@fail_closed("instruction")
def check_instruction(content: RecordDict, *, spec: AdapterSpec, run: RunConfig) -> Instruction:
    """Check what a site received (untrusted): only a round number and an adapter of ``spec``."""
    problems: list[Problem] = []
    if not isinstance(content, RecordDict):
        raise WireError("instruction refused", [Problem("content", "not a RecordDict")])
    version = version_problem(content, side="instruction")
    if version is not None:
        raise WireError("instruction refused: wire version mismatch", [version])
    for key in sorted(set(content.keys()) - {INSTRUCTION_KEY, ADAPTER_KEY}):
        problems.append(Problem(f"record[{key!r:.60}]", "not allowed in an instruction"))
    round_id = 0
    rec = content.get(INSTRUCTION_KEY)
    if not isinstance(rec, ConfigRecord):
        problems.append(Problem(f"record[{INSTRUCTION_KEY!r}]", "missing or not a ConfigRecord"))
    else:
        extra = sorted(set(rec.keys()) - {"round", WIRE_VERSION_FIELD})
        if extra:
            problems.append(Problem("instruction", f"unexpected keys {extra!r:.120}"))
        value = rec.get("round")
        if not is_int(value) or not 1 <= value <= _MAX_ROUND:
            problems.append(Problem("instruction['round']", f"must be an int in [1, {_MAX_ROUND}]"))
        else:
            round_id = value
    adapter = None
    if ADAPTER_KEY in content:
        adapter = check_adapter_record(content[ADAPTER_KEY], spec, run, problems, ADAPTER_KEY)
    if problems:
        raise WireError("instruction refused by the wire contract", problems)
    return Instruction(round_id=round_id, adapter=adapter)


def _raise(problems: list[Problem]) -> None:
    if problems:
        raise WireError("reply refused by the wire contract", problems)



def check_privacy(record: Any, run: RunConfig, problems: list[Problem]) -> dict | None:
    """A reply's privacy scalars checked against ``run``: the record, or None with ``problems`` appended.

    Shared by the plain and the SecAgg+ reply checks (:mod:`shared.wire_secagg`).
    """
    if not isinstance(record, ConfigRecord):
        problems.append(Problem(f"record[{PRIVACY_KEY!r}]", "must be a ConfigRecord"))
        return None
    keys = set(record.keys())
    for key in sorted(keys - PRIVACY_KEYS):
        problems.append(Problem(f"privacy[{key!r:.60}]", "not a privacy key"))
    for key in sorted(PRIVACY_KEYS - keys):
        problems.append(Problem(f"privacy[{key!r}]", "missing"))
    v = {k: record[k] for k in keys & PRIVACY_KEYS}

    def need(key: str, ok: bool, why: str) -> None:
        if key in v and not ok:
            problems.append(Problem(f"privacy[{key!r}]", f"{why} (got {v[key]!r:.40})"))

    num = {k: is_num(v[k]) for k in v}
    # ledger_seq is a counter the anchor checks for monotonicity (server/site_budget.py): an
    # exact int in [1, 10^12], not a measurement; every other number has six digits at most.
    for key in sorted(k for k in v if num[k] and k != "ledger_seq" and not six_digits(v[k])):
        problems.append(Problem(f"privacy[{key!r}]", f"more than {SIG_DIGITS} significant digits"))
    for key in sorted(k for k in v if num[k] and k in PRIVACY_REAL_KEYS and v[k] != 0
                      and not MIN_PRIVACY_ABS <= abs(v[k]) <= MAX_PRIVACY_ABS):
        problems.append(Problem(f"privacy[{key!r}]", f"magnitude outside [{MIN_PRIVACY_ABS:g}, "
                                                     f"{MAX_PRIVACY_ABS:g}] (or 0)"))
    need("epsilon", num.get("epsilon", False) and v["epsilon"] >= 0, "must be a finite number >= 0")
    need("epsilon_round", num.get("epsilon_round", False) and v["epsilon_round"] >= 0,
         "must be a finite number >= 0")
    need("delta", num.get("delta", False) and 0 < v["delta"] < 1, "must be in (0, 1)")
    need("noise_multiplier", num.get("noise_multiplier", False) and v["noise_multiplier"] > 0,
         "must be > 0 (zero noise is not DP)")
    need("sample_rate", num.get("sample_rate", False) and 0 < v["sample_rate"] <= 1,
         "must be in (0, 1]")
    need("steps", is_int(v.get("steps")) and 1 <= v["steps"] <= MAX_STEPS,
         f"must be an int in [1, {MAX_STEPS}]")
    need("max_grad_norm", num.get("max_grad_norm", False) and v["max_grad_norm"] > 0, "must be > 0")
    accountant = v.get("accountant") if isinstance(v.get("accountant"), str) else None
    need("accountant", accountant in ACCOUNTANTS, f"must be one of {sorted(ACCOUNTANTS)}")
    need("secure_mode", isinstance(v.get("secure_mode"), bool), "must be a boolean")
    bucket_ok = (is_int(v.get("patients_bucket")) and 0 <= v["patients_bucket"] <= MAX_PATIENTS_BUCKET
                 and v["patients_bucket"] % 10 == 0)
    need("patients_bucket", bucket_ok, f"must be an int in [0, {MAX_PATIENTS_BUCKET}], a multiple of 10")
    need("ledger_seq", is_int(v.get("ledger_seq")) and 1 <= v["ledger_seq"] <= _MAX_LEDGER_SEQ,
         f"must be an int in [1, {_MAX_LEDGER_SEQ}]")
    need("ledger_head", isinstance(v.get("ledger_head"), str)
         and _LEDGER_HEAD_RE.fullmatch(v["ledger_head"]) is not None, "must be 64 lowercase hex chars")
    if num.get("epsilon") and num.get("epsilon_round") and v["epsilon_round"] > v["epsilon"] * (1 + 1e-9):
        problems.append(Problem("privacy['epsilon_round']", "larger than the cumulative epsilon"))
    # delta is derived from the bucketed patient count: delta << 1/n_patients. A delta
    # of 1/(10 * bucket) or more (bucket floored at 10) is refused.
    if num.get("delta") and bucket_ok and v["delta"] >= 1 / (10 * max(v["patients_bucket"], 10)):
        problems.append(Problem("privacy['delta']", "must be < 1/(10 * max(patients_bucket, 10))"))
    # The accountant is the run's: the coordinator recomputes epsilon with it and the
    # report compares sites by it. (Both are valid; a per-site choice is not offered.)
    if accountant in ACCOUNTANTS and accountant != run.train.accountant:
        problems.append(Problem("privacy['accountant']", f"differs from the run's {run.train.accountant!r}"))
    # A site may be stricter than the run (secure noise when the run does not ask for
    # it), never looser: False is refused only when the run says True.
    if v.get("secure_mode") is False and run.train.secure_mode is True:
        problems.append(Problem("privacy['secure_mode']", "False, but the run's train.secure-mode is true"))
    return v


def _check_metrics(record: Any, problems: list[Problem]) -> dict[str, float] | None:
    if not isinstance(record, MetricRecord):
        problems.append(Problem(f"record[{METRICS_KEY!r}]", "must be a MetricRecord"))
        return None
    out: dict[str, float] = {}
    for name, value in sorted(record.items()):
        loc = f"metrics[{name!r:.60}]"
        if name not in METRIC_NAMES:
            problems.append(Problem(loc, "not a whitelisted metric name"))
        elif not is_num(value):
            problems.append(Problem(loc, f"must be a finite scalar number (got {type(value).__name__})"))
        elif not six_digits(value):
            problems.append(Problem(loc, f"more than {SIG_DIGITS} significant digits"))
        elif abs(value) > MAX_METRIC_ABS:
            problems.append(Problem(loc, f"magnitude above {MAX_METRIC_ABS:g}"))
        elif name.startswith("count.") and not is_count_bucket(value):
            problems.append(Problem(loc, f"a count is a bucket: a multiple of 10 in [0, {MAX_COUNT_BUCKET}]"))
        else:
            out[name] = float(value)
    return out


def check_decline(record: Any, problems: list[Problem]) -> str | None:
    """A site's typed decline: its reason, or None with ``problems`` appended (plain and SecAgg+ replies)."""
    if not isinstance(record, ConfigRecord) or set(record.keys()) != {"reason"}:
        problems.append(Problem(f"record[{DECLINE_KEY!r}]", "must be a ConfigRecord with only 'reason'"))
        return None
    reason = record["reason"]
    if not isinstance(reason, str) or reason not in DECLINE_REASONS:
        problems.append(Problem("decline['reason']", f"must be one of {sorted(DECLINE_REASONS)}"))
        return None
    return reason

