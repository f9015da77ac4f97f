"""The demo's fictional patients: same seed, same people; identifiers never shared; every code covered."""

from __future__ import annotations

import random

import pytest

from client.demo.data import CODES, SITE_IDS
from client.demo.patients import _PHONE_RANGES, MAX_PATIENTS, make_patients, unique
from shared.errors import ConfigError


def test_same_seed_same_patients_and_identifiers_unique_across_sites() -> None:
    def draw() -> list:
        seen: set[str] = set()
        return [p for site in SITE_IDS for p in make_patients(site, 7, 40, seen, codes=CODES)]

    first, again = draw(), draw()
    assert [p.phi() for p in first] == [p.phi() for p in again]
    ids = [x for p in first for x in (p.name, p.mrn, p.address, p.phone)]
    assert len(ids) == len(set(ids))  # a PHI string names one patient


def test_every_code_is_a_primary_when_there_is_room() -> None:
    patients = make_patients("site-b", 0, len(CODES) + 5, set(), codes=CODES)
    assert {p.codes[0] for p in patients} == set(CODES)
    assert all(1 <= p.n_notes <= 4 and p.dob < p.first_date for p in patients)


def test_public_population_names_carry_a_middle_initial() -> None:
    patients = make_patients("site-a", 0, 12, set(), codes=CODES, public=True)
    assert all(". " in p.name for p in patients)


def test_unique_redraws_until_unseen() -> None:
    seen = {"0", "1"}
    value = unique(random.Random(0), seen, lambda r: str(r.randrange(3)))
    assert value == "2" and seen == {"0", "1", "2"}


def test_largest_sites_keep_identifiers_unique_and_phones_in_drama_ranges() -> None:
    # Three sites at the cap: 18,000 patients, every identifier still names one patient,
    # and every phone number lies in a range reserved for drama (never a real subscriber).
    seen: set[str] = set()
    patients = [p for site in SITE_IDS for p in make_patients(site, 3, MAX_PATIENTS, seen, codes=CODES)]
    ids = [x for p in patients for x in (p.name, p.mrn, p.address, p.phone)]
    assert len(ids) == len(set(ids))
    drama = {fmt.format(0)[:-3] for ranges in _PHONE_RANGES.values() for fmt in ranges}
    assert all(p.phone[:-3] in drama for p in patients)
    assert len({p.phone[:-3] for p in patients}) == len(drama)  # every range used once the first fills



def test_a_population_too_large_for_unique_phones_is_refused():
    with pytest.raises(ConfigError, match="invalid demo population") as err:
        make_patients("site-a", 0, MAX_PATIENTS + 1, set(), codes=CODES)
    assert "unique" in str(err.value.problems[0])
