"""The patient-level train/held-out split of a site's notes.

The unit of privacy is the patient: every split here is by ``patient_id`` and
never puts one patient's notes on both sides. Held-out patients are never
trained on; membership and distance-to-closest-record metrics compare against
them. The split depends only on the set of patients and the seed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from client.notes import Note
from shared.errors import ConfigError, InputError


@dataclass(frozen=True)
class PatientSplit:
    """Notes split by patient: no patient has notes on both sides."""

    train: list[Note]
    heldout: list[Note]


def group_by_patient(notes: Iterable[Note]) -> dict[str, list[Note]]:
    """Notes per ``patient_id``, patients in first-seen order, notes in input order."""
    groups: dict[str, list[Note]] = {}
    for note in notes:
        groups.setdefault(note.patient_id, []).append(note)
    return groups


def _patient_rank(seed: int, patient_id: str) -> str:
    return hashlib.sha256(f"{seed}\x00{patient_id}".encode()).hexdigest()


def split_by_patient(
    notes: Sequence[Note], *, heldout_fraction: float = 0.2, seed: int = 0
) -> PatientSplit:
    """Split notes into train and held-out sets by patient.

    Patients are ordered by sha256(seed, patient_id) and the first
    ``round(heldout_fraction * n_patients)`` (at least 1, at most n-1) are held
    out, so the split depends only on the set of patients and the seed, not on
    note order. Held-out patients are never trained on: membership and
    distance-to-closest-record metrics compare against them.
    """
    if isinstance(heldout_fraction, bool) or not isinstance(heldout_fraction, (int, float)) or not (
        0 < heldout_fraction < 1
    ):
        raise ConfigError(f"heldout_fraction must be in (0, 1), got {heldout_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"split seed must be an integer, got {seed!r}")
    heldout = heldout_patients(group_by_patient(notes), heldout_fraction=heldout_fraction, seed=seed)
    return PatientSplit(
        train=[n for n in notes if n.patient_id not in heldout],
        heldout=[n for n in notes if n.patient_id in heldout],
    )


def heldout_patients(
    patient_ids: Iterable[str], *, heldout_fraction: float = 0.2, seed: int = 0
) -> set[str]:
    """The patients :func:`split_by_patient` holds out (needs at least 2 patients)."""
    patients = sorted(set(patient_ids), key=lambda p: _patient_rank(seed, p))
    if len(patients) < 2:
        raise InputError(
            f"cannot split {len(patients)} patient(s) into train and held-out sets: need at least 2"
        )
    n_heldout = min(max(round(heldout_fraction * len(patients)), 1), len(patients) - 1)
    return set(patients[:n_heldout])
