"""The adapter record on the wire: LoRA tensors packed into, and checked out of, an ArrayRecord.

Both directions carry the adapter the same way (a site's train reply, the
coordinator's instruction): float tensors named as PEFT names them, sorted,
canonical numpy bytes. :func:`check_adapter_record` is what :mod:`shared.wire`'s
checks run on that record: names and shapes exactly the run's adapter spec
(:data:`shared.adapter_spec.AdapterSpec`), or, without a spec, LoRA structure of
rank ``lora.r``; the run's wire dtype; finite values; nothing after the array.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType

from shared.adapter_spec import AdapterSpec
from shared.errors import Problem

if TYPE_CHECKING:
    from shared.run_config import RunConfig

_LORA_NAME_RE = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*\.lora_[AB]\.weight$")


def pack_adapter(tensors: Mapping[str, np.ndarray]) -> ArrayRecord:
    """numpy dict -> ArrayRecord, names sorted (no casting: the checks decide)."""
    record = ArrayRecord()
    for name in sorted(tensors):
        record[name] = Array(np.ascontiguousarray(tensors[name]))
    return record


def unpack_adapter(record: ArrayRecord) -> dict[str, np.ndarray]:
    """ArrayRecord -> numpy dict, unchecked: use :func:`shared.wire.check_reply`/``check_instruction``."""
    return {name: arr.numpy() for name, arr in record.items()}


def spec_of(tensors: Mapping[str, np.ndarray]) -> AdapterSpec:
    """The spec (name -> (shape, dtype)) an adapter dict has."""
    return {k: (tuple(int(d) for d in v.shape), str(v.dtype)) for k, v in tensors.items()}


def check_lora_structure(spec: AdapterSpec, *, r: int) -> list[Problem]:
    """Problems with a spec as a LoRA adapter of rank ``r``: PEFT names, A/B pairs, 2-D shapes."""
    problems: list[Problem] = []
    for name, (shape, _dtype) in sorted(spec.items()):
        where = f"adapter[{name!r:.120}]"
        if not _LORA_NAME_RE.match(name):
            problems.append(Problem(where, "not a PEFT LoRA tensor name (…lora_A.weight/lora_B.weight)"))
            continue
        base, part = name.rsplit(".lora_", 1)
        other = f"{base}.lora_{'B' if part.startswith('A') else 'A'}.weight"
        if other not in spec:
            problems.append(Problem(where, f"has no matching {other.rsplit('.', 2)[-2]}"))
        if len(shape) != 2:
            problems.append(Problem(where, f"LoRA tensors are 2-D, got shape {shape}"))
        elif part.startswith("A") and shape[0] != r:
            problems.append(Problem(where, f"lora_A must have {r} rows (lora.r), got {shape}"))
        elif part.startswith("B") and shape[1] != r:
            problems.append(Problem(where, f"lora_B must have {r} columns (lora.r), got {shape}"))
    return problems


def check_adapter_record(
    record: Any, spec: AdapterSpec | None, run: RunConfig, problems: list[Problem], where: str
) -> dict[str, np.ndarray] | None:
    """The tensors of an untrusted adapter ``record``, each one checked; violations go to ``problems``.

    ``spec`` is the exact layout expected; ``None`` checks LoRA structure and rank
    ``run.lora.r`` only. Every tensor must be ``run.lora.dtype``, numpy-serialized,
    finite and byte-for-byte its canonical encoding (trailing bytes or an odd header
    would be a side channel). None when ``record`` is not an ArrayRecord.
    """
    if not isinstance(record, ArrayRecord):
        problems.append(Problem(f"record[{where!r}]", "must be an ArrayRecord"))
        return None
    dtype = run.lora.dtype
    got_spec = {k: (tuple(a.shape), a.dtype) for k, a in record.items()}
    if spec is None:
        if not got_spec:
            problems.append(Problem(where, "empty adapter"))
        problems.extend(check_lora_structure(got_spec, r=run.lora.r))
        expected = {k: (s, dtype) for k, (s, _d) in got_spec.items()}
    else:
        for name, (_shape, sdtype) in sorted(spec.items()):
            if sdtype != dtype:
                problems.append(Problem(f"spec[{name!r}]", f"dtype {sdtype} != lora.dtype {dtype}"))
                break
        expected = {k: (tuple(s), dtype) for k, (s, _d) in spec.items()}
        for name in sorted(set(expected) - set(got_spec)):
            problems.append(Problem(f"adapter[{name!r:.120}]", "missing tensor"))
    out: dict[str, np.ndarray] = {}
    for name, arr in sorted(record.items()):
        loc = f"adapter[{name!r:.120}]"
        if name not in expected:
            problems.append(Problem(loc, "unexpected tensor name (not in the run's adapter spec)"))
            continue
        shape, want = expected[name]
        before = len(problems)
        if arr.stype != SType.NUMPY:
            problems.append(Problem(loc, f"serialization {arr.stype!r:.40} is not numpy"))
        if arr.dtype != want:
            problems.append(Problem(loc, f"dtype {arr.dtype!r:.40} != {want}"))
        if tuple(arr.shape) != shape:
            problems.append(Problem(loc, f"shape {tuple(arr.shape)!r:.80} != {shape}"))
        if len(problems) > before:
            continue
        try:
            value = arr.numpy()
        except Exception as exc:  # any decoding failure is a refusal, not a crash
            problems.append(Problem(loc, f"cannot decode ({type(exc).__name__})"))
            continue
        if str(value.dtype) != want or tuple(value.shape) != shape:
            problems.append(Problem(loc, "payload dtype/shape differ from its declared ones"))
            continue
        # Bytes after the array (np.load ignores them) or a non-canonical header
        # would be a side channel: the payload must be exactly what we would write.
        if Array(value).data != arr.data:
            problems.append(Problem(loc, "payload bytes are not the canonical encoding of the array"))
            continue
        if not np.isfinite(value).all():
            problems.append(Problem(loc, "non-finite values (NaN/Inf)"))
            continue
        out[name] = value
    return out
