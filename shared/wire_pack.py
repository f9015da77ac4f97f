"""The wire's record layout and its packers: what a site sends and what the coordinator instructs.

Packing only builds the layout (rounding numbers by :mod:`shared.wire_numbers`'
rules); it decides nothing. Whatever is packed goes through :mod:`shared.wire`'s
checks before it is sent and again on receipt.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from shared.wire_adapter import pack_adapter
from shared.wire_numbers import count_bucket, round_privacy, round_sig
from shared.wire_version import (
    INSTRUCTION_KEY,
    WIRE_KEY,
    WIRE_VERSION,
    WIRE_VERSION_FIELD,
    wire_record,
)

# ---- record layout ---------------------------------------------------------
# A reply's RecordDict holds exactly one of these layouts, nothing else:
#   train    : {"adapter": ArrayRecord, "privacy": ConfigRecord}
#   evaluate : {"metrics": MetricRecord}
#   either   : {"decline": ConfigRecord{"reason": one of DECLINE_REASONS}}
# and every reply also {"wire": ConfigRecord{"version": WIRE_VERSION}}.
# An instruction (coordinator -> site) holds
# {"instruction": ConfigRecord{"round": int, "wire_version": WIRE_VERSION}}
# and, once a global adapter exists, {"adapter": ArrayRecord}.
ADAPTER_KEY = "adapter"
PRIVACY_KEY = "privacy"
METRICS_KEY = "metrics"
DECLINE_KEY = "decline"
# INSTRUCTION_KEY, WIRE_KEY, WIRE_VERSION(_FIELD): shared.wire_version (the version check)

# Why a site did not send an update: a typed flag, never free text. "site_error"
# replaces any exception message, which could quote private data; "secagg_required":
# the site's policy (FEDSYNTH_SITE_REQUIRE_SECAGG) refuses a plain, unmasked train round;
# "evaluation_budget": the run has used the site's FEDSYNTH_SITE_MAX_EVALUATIONS_PER_RUN;
# "wire_version": the coordinator's instruction speaks another wire version.
DECLINE_REASONS: frozenset[str] = frozenset(
    {"budget_exceeded", "evaluation_budget", "secagg_required", "site_error", "wire_version"}
)


def pack_train_reply(
    adapter: Mapping[str, np.ndarray], privacy: Mapping[str, float | int | str | bool]
) -> RecordDict:
    """The train reply layout, privacy floats rounded (check it with :func:`shared.wire.check_reply` before sending).

    ``privacy`` is the scalars' wire form (:meth:`PrivacyScalars.to_record`).
    """
    return RecordDict({ADAPTER_KEY: pack_adapter(adapter), PRIVACY_KEY: ConfigRecord(round_privacy(privacy)),
                       WIRE_KEY: wire_record()})


def pack_evaluate_reply(metrics: Mapping[str, float]) -> RecordDict:
    """The evaluate reply; floats rounded to 6 significant digits, ``count.*`` floored to a multiple of 10.

    Both limit covert bandwidth: the check refuses anything else.
    """
    packed: dict[str, Any] = {}
    for k, v in metrics.items():
        if k.startswith("count."):
            v = count_bucket(v)
        elif isinstance(v, float):
            v = round_sig(v)
        packed[k] = v
    return RecordDict({METRICS_KEY: MetricRecord(packed), WIRE_KEY: wire_record()})


def pack_decline(reason: str) -> RecordDict:
    """A typed decline (``reason`` in DECLINE_REASONS); the round goes on without this site."""
    return RecordDict({DECLINE_KEY: ConfigRecord({"reason": reason}), WIRE_KEY: wire_record()})


def pack_instruction(*, round_id: int, adapter: Mapping[str, np.ndarray] | None) -> RecordDict:
    """Coordinator -> site: the round number, the wire version and, when one exists, the global adapter."""
    content = RecordDict({INSTRUCTION_KEY: ConfigRecord(
        {"round": int(round_id), WIRE_VERSION_FIELD: WIRE_VERSION})})
    if adapter is not None:
        content[ADAPTER_KEY] = pack_adapter(adapter)
    return content
