"""Aggregating LoRA adapters: pure functions over ``dict[str, np.ndarray]``.

Every site update arrives as a full LoRA adapter (tensor name -> array). The
coordinator turns each into its contribution (:mod:`shared.adapter_delta`, the
maths a SecAgg+ site applies itself: the update *delta* against the current
global adapter, its L2 norm optionally bounded), combines the contributions
(weighted mean, coordinate-wise trimmed mean or median) and adds the result back.

Known approximation: LoRA's effective weight change is ``B @ A``; averaging A
and B separately is not the average of the products (mean(B)·mean(A) ≠
mean(B·A)). With a shared starting point and small per-round steps the error is
second order in the update size; docs/federation.md discusses it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from shared.adapter_delta import Adapter, add_to_reference, site_contribution
from shared.errors import ConfigError, Problem


def site_weights(patients_buckets: Sequence[int], *, scheme: str, cap: int = 0) -> list[float]:
    """FedAvg weights, normalised to sum to 1.

    ``"patients"``: proportional to each site's bucketed patient count (what
    FedAvg needs to estimate the pooled objective), floored at 1 so a site with
    fewer than 10 patients is not silently dropped, and capped at ``cap`` (0 =
    no cap) so that one large site cannot dominate the global adapter.
    ``"uniform"``: every site counts the same. Patients are the unit of privacy,
    so weighting by patients (not notes) matches what each site's DP covers.
    """
    if not patients_buckets:
        raise ConfigError("no sites to weight")
    if scheme == "uniform":
        raw = [1.0] * len(patients_buckets)
    elif scheme == "patients":
        raw = [float(max(1, int(b))) for b in patients_buckets]
        if cap > 0:
            raw = [min(w, float(cap)) for w in raw]
    else:
        raise ConfigError("unknown weighting", [Problem("aggregation.weighting", repr(scheme))])
    total = sum(raw)
    return [w / total for w in raw]


def combine(
    stack: Sequence[np.ndarray], *, method: str, weights: Sequence[float], trim_fraction: float
) -> np.ndarray:
    """Combine one tensor across sites.

    ``fedavg``: weighted mean. ``trimmed-mean``: per coordinate, drop the
    ``floor(trim_fraction * n)`` smallest and largest values, average the rest
    (unweighted). ``median``: per-coordinate median (unweighted). The robust
    rules ignore weights on purpose: a weight is a site's own claim.
    """
    arr = np.stack([np.asarray(s, dtype=np.float64) for s in stack])
    n = arr.shape[0]
    if method == "fedavg":
        w = np.asarray(weights, dtype=np.float64).reshape((n,) + (1,) * (arr.ndim - 1))
        return np.sum(arr * w, axis=0) / float(np.sum(weights))
    if method == "median":
        return np.median(arr, axis=0)
    if method == "trimmed-mean":
        k = int(np.floor(trim_fraction * n))
        if n - 2 * k < 1:
            raise ConfigError(f"trim fraction {trim_fraction} leaves no site out of {n}")
        ordered = np.sort(arr, axis=0)
        return ordered[k : n - k].mean(axis=0)
    raise ConfigError("unknown aggregation", [Problem("aggregation", repr(method))])


def aggregate(
    updates: Sequence[Mapping[str, np.ndarray]],
    *,
    weights: Sequence[float],
    reference: Mapping[str, np.ndarray] | None,
    method: str = "fedavg",
    trim_fraction: float = 0.2,
    norm_bound: float = 0.0,
    dtype: str = "float32",
) -> Adapter:
    """New global adapter from site adapters (all with the same names and shapes).

    Each update becomes its contribution (:func:`shared.adapter_delta.site_contribution`:
    the delta against ``reference``, the current global adapter, clipped to
    ``norm_bound``, 0 = off; without a reference ``lora_A`` tensors as absolute
    values), contributions are combined with ``method`` and added back to the
    reference. A SecAgg+ site computes the same contribution before masking.
    """
    if not updates:
        raise ConfigError("nothing to aggregate")
    if len(weights) != len(updates):
        raise ConfigError(f"{len(weights)} weights for {len(updates)} updates")
    names = set(updates[0])
    bad = [i for i, u in enumerate(updates) if set(u) != names]
    if bad or (reference is not None and set(reference) != names):
        raise ConfigError("updates do not share one adapter layout", [Problem("updates", f"sites {bad}")])
    contributions = [site_contribution(u, reference, norm_bound=norm_bound) for u in updates]
    out: Adapter = {}
    for name in sorted(names):
        combined = combine([c[name] for c in contributions], method=method, weights=weights,
                           trim_fraction=trim_fraction)
        out[name] = add_to_reference(name, combined, reference, dtype)
    return out
