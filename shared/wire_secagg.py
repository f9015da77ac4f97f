"""Secure aggregation (SecAgg+) message layouts and their checks.

Split from :mod:`shared.wire` (the same contract, in Flower's legacy FitRes
layout that ``secaggplus_mod`` requires). Every check fails closed with one
:class:`~shared.errors.WireError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from shared.adapter_delta import site_contribution
from shared.adapter_spec import AdapterSpec
from shared.errors import Problem, WireError
from shared.privacy_scalars import PrivacyScalars
from shared.wire import Instruction, check_decline, check_instruction, check_privacy, fail_closed
from shared.wire_adapter import check_lora_structure, pack_adapter
from shared.wire_numbers import is_int
from shared.wire_pack import ADAPTER_KEY
from shared.wire_version import INSTRUCTION_KEY, WIRE_KEY, version_problem, wire_record

if TYPE_CHECKING:
    from shared.run_config import RunConfig

# ---- secure aggregation (SecAgg+) ------------------------------------------
# With ``secagg = true`` a train reply takes Flower's legacy FitRes layout, because
# Flower's secaggplus_mod only reads that layout (with any other it sends nothing
# and the run "completes" with the global adapter unchanged). Before the mod masks
# it the reply holds, and is checked with check_secagg_reply(masked=False):
#   "fitres.parameters"   ArrayRecord: the site's CONTRIBUTION (float64, one array per
#                         tensor, in sorted tensor-name order), every value in
#                         [-secagg-clipping-range, +secagg-clipping-range]
#   "fitres.num_examples" MetricRecord {"num_examples": secagg_weight(...)}   (clear)
#   "fitres.metrics"      ConfigRecord: exactly PRIVACY_KEYS, or {"decline": reason}
#                         with weight 0 and an all-zero contribution        (clear)
#   "fitres.status"       ConfigRecord {"code": 0, "message": "Success"}   (clear)
#   "layout"              ConfigRecord {"names": sorted tensor names}      (clear)
#   "wire"                ConfigRecord {"version": WIRE_VERSION}           (clear)
# The mod then empties "fitres.parameters" and adds "secaggplus_configs" with the
# masked vectors; the coordinator checks that (masked=True) before unmasking.
SECAGG_CONFIGS_KEY = "secaggplus_configs"  # flwr.common.secure_aggregation RECORD_KEY_CONFIGS
SECAGG_MASKED_KEY = "masked_params"  # flwr Key.MASKED_PARAMETERS
SECAGG_LAYOUT_KEY = "layout"
SECAGG_DECLINE = "decline"
FITRES_PARAMETERS = "fitres.parameters"
FITRES_NUM_EXAMPLES = "fitres.num_examples"
FITRES_METRICS = "fitres.metrics"
FITRES_STATUS = "fitres.status"
_FITRES_OK = {"code": 0, "message": "Success"}
SECAGG_DEFAULT_MAX_WEIGHT = 1000


@dataclass(frozen=True)
class SecAggReply:
    """The clear parts of a SecAgg+ train reply, after :func:`check_secagg_reply`."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    weight: int
    privacy: PrivacyScalars | None = None  # checked and typed (shared.privacy_scalars)
    decline: str | None = None
    contribution: dict[str, np.ndarray] | None = None  # site side (masked=False) only


def secagg_max_weight(run: RunConfig) -> int:
    """SecAgg+ ``max_weight``: the largest weight a site may claim (uniform: 1; patients: the cap or 1000).

    The masked sum is quantised relative to this, so a smaller value gives a finer
    aggregate; weights above it would overflow, so they are clamped to it.
    """
    if run.weighting == "uniform":
        return 1
    return int(run.weight_cap) if run.weight_cap > 0 else SECAGG_DEFAULT_MAX_WEIGHT


def secagg_weight(patients_bucket: int, run: RunConfig) -> int:
    """A site's FedAvg weight under SecAgg+: its patients bucket floored at 1, clamped to the max weight."""
    if run.weighting == "uniform":
        return 1
    return min(max(1, int(patients_bucket)), secagg_max_weight(run))


def secagg_contribution(
    adapter: Mapping[str, np.ndarray], global_adapter: Mapping[str, np.ndarray] | None, run: RunConfig
) -> tuple[dict[str, np.ndarray], int]:
    """What a site puts into the secure sum (float64), and how many coordinates were range-clipped.

    :func:`shared.adapter_delta.site_contribution` (the value the coordinator's
    :func:`server.strategy.aggregate` combines on a plain round: the delta against
    the global adapter bounded to L2 norm ``update-norm-bound``, 0 = off; round 1:
    ``lora_A`` absolute), computed at the site because the coordinator only sees the
    sum, then every coordinate clipped to ±``secagg-clipping-range`` (SecAgg+
    quantises in that range). The count is for the site's own log only: it is not on
    the wire whitelist.
    """
    out = site_contribution(adapter, global_adapter, norm_bound=run.update_norm_bound)
    limit = run.secagg_clipping_range
    clipped = sum(int(np.count_nonzero(np.abs(v) > limit)) for v in out.values())
    return {k: np.clip(v, -limit, limit) for k, v in out.items()}, clipped


def pack_secagg_reply(
    contribution: Mapping[str, np.ndarray],
    *,
    weight: int,
    privacy: Mapping[str, float | int | str | bool] | None = None,
    decline: str | None = None,
) -> RecordDict:
    """Legacy FitRes layout for secaggplus_mod (check with :func:`check_secagg_reply`)."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import fitres_to_recorddict

    names = sorted(contribution)
    metrics = dict(privacy) if decline is None else {SECAGG_DECLINE: decline}
    fitres = FitRes(
        status=Status(code=Code.OK, message=_FITRES_OK["message"]),
        parameters=ndarrays_to_parameters([np.asarray(contribution[n]) for n in names]),
        num_examples=int(weight),
        metrics=metrics or {},
    )
    content = fitres_to_recorddict(fitres, keep_input=False)
    content[SECAGG_LAYOUT_KEY] = ConfigRecord({"names": names})
    content[WIRE_KEY] = wire_record()
    return content


@fail_closed("secagg reply")
def check_secagg_reply(
    content: RecordDict, *, spec: AdapterSpec | None, run: RunConfig, masked: bool
) -> SecAggReply:
    """Check a SecAgg+ train reply; fail closed with one WireError listing every violation.

    ``masked=False`` (the site, before secaggplus_mod masks it): the contribution must be
    float64, finite, within ±``secagg-clipping-range``, canonical bytes, shaped like
    ``spec``. ``masked=True`` (the coordinator, before unmasking): the clear values must
    be gone, and the masked vectors must have the layout's shapes (``spec`` is the
    current global adapter, or None in round 1: LoRA structure only). Either way the
    clear scalars (weight, privacy or decline) are checked as in :func:`check_reply`,
    and the weight must be what :func:`secagg_weight` gives for the site's bucket.
    """
    from flwr.common import bytes_to_ndarray, ndarray_to_bytes

    problems: list[Problem] = []
    if not isinstance(content, RecordDict):
        raise WireError("secagg reply refused", [Problem("content", "not a RecordDict")])
    version = version_problem(content, side="reply")
    if version is not None:  # nothing else is read from a peer of another version
        raise WireError("secagg reply refused: wire version mismatch", [version])
    allowed = {FITRES_PARAMETERS, FITRES_NUM_EXAMPLES, FITRES_METRICS, FITRES_STATUS, SECAGG_LAYOUT_KEY,
               WIRE_KEY}
    if masked:
        allowed.add(SECAGG_CONFIGS_KEY)
    keys = set(content.keys())
    for key in sorted(keys - allowed):
        problems.append(Problem(f"record[{key!r:.60}]", "not allowed in a secagg train reply"))
    for key in sorted(allowed - keys):
        problems.append(Problem(f"record[{key!r}]", "missing from the secagg train reply"))
    if problems:
        raise WireError("secagg reply refused by the wire contract", problems)

    status = content[FITRES_STATUS]
    if not isinstance(status, ConfigRecord) or dict(status) != _FITRES_OK:
        problems.append(Problem(f"record[{FITRES_STATUS!r}]", f"must be exactly {_FITRES_OK}"))
    weight = -1
    rec = content[FITRES_NUM_EXAMPLES]
    if not isinstance(rec, MetricRecord) or set(rec.keys()) != {"num_examples"} or not (
        is_int(rec["num_examples"]) and 0 <= rec["num_examples"] <= secagg_max_weight(run)
    ):
        problems.append(Problem("fitres.num_examples",
                                f"must be {{'num_examples': int in [0, {secagg_max_weight(run)}]}}"))
    else:
        weight = int(rec["num_examples"])
    privacy = decline = None
    metrics = content[FITRES_METRICS]
    if isinstance(metrics, ConfigRecord) and set(metrics.keys()) == {SECAGG_DECLINE}:
        decline = check_decline(ConfigRecord({"reason": metrics[SECAGG_DECLINE]}), problems)
        if weight != 0:
            problems.append(Problem("fitres.num_examples", "a decline must carry weight 0"))
    else:
        privacy = check_privacy(metrics, run, problems)
        bucket = (privacy or {}).get("patients_bucket")
        if is_int(bucket) and weight >= 0 and weight != secagg_weight(bucket, run):
            problems.append(Problem("fitres.num_examples",
                                    f"{weight} != secagg_weight(patients_bucket={bucket})"))
    names: tuple[str, ...] = ()
    layout = content[SECAGG_LAYOUT_KEY]
    raw = layout.get("names") if isinstance(layout, ConfigRecord) else None
    if (not isinstance(layout, ConfigRecord) or set(layout.keys()) != {"names"}
            or not isinstance(raw, list) or not raw or not all(isinstance(n, str) for n in raw)):
        problems.append(Problem(f"record[{SECAGG_LAYOUT_KEY!r}]", "must be {'names': [str, ...]}"))
    elif raw != sorted(set(raw)):
        problems.append(Problem("layout['names']", "must be sorted and unique"))
    else:
        names = tuple(raw)
    if spec is not None and names and names != tuple(sorted(spec)):
        problems.append(Problem("layout['names']", "differ from the adapter spec"))

    params = content[FITRES_PARAMETERS]
    arrays: list[np.ndarray] = []
    if not isinstance(params, ArrayRecord):
        problems.append(Problem(f"record[{FITRES_PARAMETERS!r}]", "must be an ArrayRecord"))
    elif masked and len(params):
        problems.append(Problem(FITRES_PARAMETERS, "clear values present: the reply was not masked"))
    elif masked:
        cfg = content[SECAGG_CONFIGS_KEY]
        blobs = cfg.get(SECAGG_MASKED_KEY) if isinstance(cfg, ConfigRecord) else None
        if (not isinstance(cfg, ConfigRecord) or set(cfg.keys()) != {SECAGG_MASKED_KEY}
                or not isinstance(blobs, list) or not all(isinstance(b, bytes) for b in blobs)):
            problems.append(Problem(f"record[{SECAGG_CONFIGS_KEY!r}]", "must hold only the masked vectors"))
        else:
            arrays = _decode_all(blobs, bytes_to_ndarray, problems, "masked")
            # the first masked array is SecAgg+'s weight factor
            if arrays and (arrays[0].shape != (1,) or not np.issubdtype(arrays[0].dtype, np.integer)):
                problems.append(Problem("masked[0]", "must be the 1-element integer weight factor"))
            arrays = arrays[1:]
            for i, a in enumerate(arrays):
                if not np.issubdtype(a.dtype, np.integer):
                    problems.append(Problem(f"masked[{i + 1}]", "masked vectors are integers"))
    else:
        blobs = [arr.data for arr in params.values()]
        if list(params.keys()) != [str(i) for i in range(len(blobs))]:
            problems.append(Problem(FITRES_PARAMETERS, "keys must be '0'..'n-1'"))
        arrays = _decode_all(blobs, bytes_to_ndarray, problems, "contribution")
        bound = run.secagg_clipping_range
        for name, a, blob in zip(names, arrays, blobs, strict=False):
            loc = f"contribution[{name!r:.120}]"
            if a.dtype != np.float64:
                problems.append(Problem(loc, f"dtype {a.dtype} != float64"))
            elif ndarray_to_bytes(a) != blob:
                problems.append(Problem(loc, "payload bytes are not the canonical encoding"))
            elif not np.isfinite(a).all():
                problems.append(Problem(loc, "non-finite values (NaN/Inf)"))
            elif np.abs(a).max(initial=0.0) > bound:
                problems.append(Problem(loc, f"values outside ±secagg-clipping-range ({bound})"))
            elif decline is not None and np.any(a):
                problems.append(Problem(loc, "a decline must send an all-zero contribution"))
    shapes = tuple(tuple(int(d) for d in a.shape) for a in arrays)
    if names and arrays and len(arrays) != len(names):
        problems.append(Problem("layout['names']", f"{len(names)} names for {len(arrays)} arrays"))
    elif names and arrays:
        got = {n: (s, run.lora.dtype) for n, s in zip(names, shapes, strict=True)}
        if spec is None:
            problems.extend(check_lora_structure(got, r=run.lora.r))
        else:
            for n in names:
                if n in spec and got[n][0] != tuple(spec[n][0]):
                    problems.append(Problem(f"layout[{n!r:.120}]", f"shape {got[n][0]} != {spec[n][0]}"))
    elif names and not problems:
        problems.append(Problem(FITRES_PARAMETERS, "no arrays"))
    if problems:
        raise WireError("secagg reply refused by the wire contract", problems)
    contribution = None if masked else dict(zip(names, arrays, strict=True))
    return SecAggReply(names=names, shapes=shapes, weight=weight, decline=decline,
                       privacy=PrivacyScalars.from_record(privacy) if privacy is not None else None,
                       contribution=contribution)


def _decode_all(blobs: list[bytes], decode: Any, problems: list[Problem], what: str) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    for i, blob in enumerate(blobs):
        try:
            out.append(np.asarray(decode(blob)))
        except Exception as exc:  # any decoding failure is a refusal, not a crash
            problems.append(Problem(f"{what}[{i}]", f"cannot decode ({type(exc).__name__})"))
    return out


@fail_closed("secagg instruction")
def unpack_secagg_instruction(content: RecordDict, *, spec: AdapterSpec, run: RunConfig) -> Instruction:
    """The legacy FitIns a site receives under SecAgg+, checked as :func:`check_instruction`.

    The coordinator's instruction arrives as ``fitins.parameters`` (the global adapter
    as arrays in sorted tensor-name order, or none in round 1) and ``fitins.config``
    (``{"round": int}``), beside Flower's ``secaggplus_configs``. It is re-labelled
    with this site's own tensor names and then checked exactly like a plain one.
    """
    from flwr.common import bytes_to_ndarray

    problems: list[Problem] = []
    keys = set(content.keys()) if isinstance(content, RecordDict) else set()
    want = {"fitins.parameters", "fitins.config", SECAGG_CONFIGS_KEY}
    if keys != want:
        raise WireError("secagg instruction refused",
                        [Problem("content", f"records must be exactly {sorted(want)}")])
    params, cfg = content["fitins.parameters"], content["fitins.config"]
    if not isinstance(params, ArrayRecord) or not isinstance(cfg, ConfigRecord):
        raise WireError("secagg instruction refused", [Problem("content", "wrong record types")])
    plain = RecordDict({INSTRUCTION_KEY: ConfigRecord(dict(cfg))})
    # Flower's legacy Parameters -> ArrayRecord: keys "0".."n-1", or one "_empty" marker.
    keys_in = list(params.keys())
    if keys_in == ["_empty"] and not params["_empty"].data:
        keys_in = []
    elif keys_in != [str(i) for i in range(len(keys_in))]:
        problems.append(Problem("fitins.parameters", "keys must be '0'..'n-1'"))
    if keys_in and not problems:
        names = sorted(spec)
        arrays = _decode_all([params[k].data for k in keys_in], bytes_to_ndarray, problems, "fitins")
        if len(arrays) != len(names):
            problems.append(Problem("fitins.parameters", f"{len(arrays)} arrays for {len(names)} tensors"))
        else:
            plain[ADAPTER_KEY] = pack_adapter(dict(zip(names, arrays, strict=True)))
    if problems:
        raise WireError("secagg instruction refused", problems)
    return check_instruction(plain, spec=spec, run=run)
