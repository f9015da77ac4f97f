import random

import pytest

from client.notes import Note
from client.patient_split import split_by_patient
from shared.errors import ConfigError, InputError


def _notes(n_patients, per_patient=2):
    return [
        Note(f"n{p}-{k}", f"p{p}", ("F32.1",), f"text {p} {k}")
        for p in range(n_patients)
        for k in range(per_patient)
    ]


def test_split_is_by_patient_disjoint_and_deterministic():
    notes = _notes(50, per_patient=3)
    split = split_by_patient(notes, heldout_fraction=0.2, seed=7)
    train_p = {n.patient_id for n in split.train}
    held_p = {n.patient_id for n in split.heldout}
    assert not train_p & held_p and len(held_p) == 10 and len(train_p) == 40
    assert len(split.train) + len(split.heldout) == len(notes)
    # a patient's notes all land on one side
    assert all(len([n for n in split.heldout if n.patient_id == p]) == 3 for p in held_p)

    shuffled = list(notes)
    random.Random(1).shuffle(shuffled)
    again = split_by_patient(shuffled, heldout_fraction=0.2, seed=7)
    assert {n.note_id for n in again.heldout} == {n.note_id for n in split.heldout}
    other = split_by_patient(notes, heldout_fraction=0.2, seed=8)
    assert {n.patient_id for n in other.heldout} != held_p


def test_split_needs_two_patients_and_a_valid_fraction():
    with pytest.raises(InputError, match="need at least 2"):
        split_by_patient(_notes(1, per_patient=5))
    small = split_by_patient(_notes(2), heldout_fraction=0.01)
    assert len({n.patient_id for n in small.heldout}) == 1 and len({n.patient_id for n in small.train}) == 1
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(ConfigError):
            split_by_patient(_notes(5), heldout_fraction=bad)
