"""The privacy scalars of one training round: one type, its wire form, its key set.

A site sends these with every adapter update (the ``privacy`` record of a train
reply, :mod:`shared.wire`); :func:`shared.wire.check_reply` validates the record
into a :class:`PrivacyScalars`, the coordinator anchors and reports from it, and
the site's signed privacy report is built from one
(:meth:`shared.report.Privacy.from_scalars`). No dependencies beyond the
standard library: auditor tools import it.

Privacy meaning (per patient, at ``delta``):

- ``epsilon``: cumulative over every round in the site's ledger (recomputed from
  the whole ledger); ``epsilon_round``: this round alone;
- ``noise_multiplier`` sigma (noise std / ``max_grad_norm``), ``sample_rate`` q
  (Poisson, per patient per step), ``steps`` (noisy steps this round),
  ``max_grad_norm`` C (per-patient clipping bound), ``accountant`` (prv or rdp),
  ``secure_mode`` (noise from a CSPRNG keyed from ``os.urandom``);
- ``patients_bucket``: training patients rounded down to a multiple of 10 (the
  exact count never leaves the site); None where it is not known (a report built
  from the ledger alone) — the wire refuses None;
- ``ledger_seq``/``ledger_head``: this round's reservation in the site's ledger
  (its seq and chain hash; 0 and 64 zeros when nothing was reserved). The
  coordinator records them per site, so a ledger later lowered, restored or
  forked is noticed outside the site (docs/privacy-model.md).

The non-private study baseline reports epsilon = +inf, sigma = 0, C = +inf and
accountant "none": the wire refuses every one of them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

NO_LEDGER_HEAD = "0" * 64
"""``ledger_head`` when nothing was reserved (the non-private baseline)."""

Scalar = float | int | str | bool


@dataclass(frozen=True, kw_only=True)
class PrivacyScalars:
    """What one round cost at one site (module docstring: the meaning of each field)."""

    epsilon: float
    epsilon_round: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    accountant: str
    secure_mode: bool
    patients_bucket: int | None
    ledger_seq: int = 0
    ledger_head: str = NO_LEDGER_HEAD

    def to_record(self) -> dict[str, Scalar | None]:
        """The wire form: exactly :data:`PRIVACY_KEYS`, plain scalars (rounding: ``wire_pack.pack_train_reply``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_record(cls, record: Mapping[str, Scalar]) -> PrivacyScalars:
        """A record with exactly :data:`PRIVACY_KEYS`, typed; the caller has checked it
        (:func:`shared.wire.check_reply`): this only converts ints and floats, it validates nothing."""
        return cls(**{name: convert(record[name]) for name, convert in _FROM_RECORD.items()})

    @property
    def private(self) -> bool:
        """False for the non-private baseline (no noise, unbounded epsilon)."""
        return self.noise_multiplier > 0 and math.isfinite(self.epsilon)


# Field annotation -> how a checked wire value becomes it (``patients_bucket`` is an int on the wire).
_CONVERT: dict[str, type] = {"float": float, "int": int, "str": str, "bool": bool, "int | None": int}
_FROM_RECORD = {f.name: _CONVERT[f.type] for f in dataclasses.fields(PrivacyScalars)}  # KeyError: a new type

PRIVACY_KEYS: frozenset[str] = frozenset(f.name for f in dataclasses.fields(PrivacyScalars))
"""The keys of a train reply's ``privacy`` record: exactly the fields of :class:`PrivacyScalars`."""
