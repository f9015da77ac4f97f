"""The demo consortium's FICTIONAL patients: invented names, record numbers, addresses, phones, dates.

Each site draws its own population (same seed -> same patients) with non-IID
primary codes (:data:`_SITE_WEIGHTS`) and identifiers in its own formats;
telephone numbers come from ranges reserved for drama. ``seen`` keeps every
identifier unique across the consortium, so a PHI string names one patient.
:mod:`client.demo.data` turns these patients into notes.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from functools import partial

from client.demo.text import AGES, CODE_VOCAB, COMORBID, dob_text
from shared.errors import ConfigError, Problem

# Relative weight of each primary code per site (1 when not listed): non-IID on purpose.
_SITE_WEIGHTS: dict[str, dict[str, int]] = {
    "site-a": {"F20": 9, "F25": 6, "F31": 7, "F10.2": 8},
    "site-b": {"F32": 8, "F33": 7, "F41.1": 6, "F43.1": 6, "F60.3": 5},
    "site-c": {"F90.0": 9, "F50.0": 8, "F42": 6, "F41.0": 6},
}

_FEMALE = ("Aldith", "Brenna", "Carys", "Delphine", "Edda", "Fenella", "Gwenith", "Honora", "Isolde", "Jessamy", "Kerensa", "Linnet", "Maelis", "Nerys", "Oriel", "Perpetua", "Rowenna", "Seren", "Tamsin", "Ursula", "Verity", "Wenna", "Yselda", "Zillah")
_MALE = ("Alaric", "Bartram", "Cadoc", "Dorian", "Emrys", "Fitzroy", "Gawain", "Hollis", "Ivor", "Jago", "Kester", "Lorcan", "Madoc", "Niall", "Osric", "Peregrine", "Quentin", "Rhodri", "Silas", "Tobiah", "Ulric", "Vaughan", "Wystan", "Zeb")
_LAST = ("Ambrosell", "Brackwater", "Corriveau", "Dunhollow", "Eskerby", "Farthingale", "Glenwhistle", "Harrowmont", "Ilsworth", "Juniperry", "Kettleborne", "Larkspurr", "Marrowdyke", "Nettlecombe", "Oakenshaw", "Pennywhistle", "Quillfeather", "Rookhaven", "Saltmarrow", "Thistlegrave", "Underbough", "Vellacott", "Wickensham", "Yarrowby", "Brindlecote", "Coldharbour", "Dewberrow", "Fennimoor", "Gorseway", "Hazelwick", "Inglethorn", "Mossgiel", "Pollendine", "Ravenmere", "Starlingford", "Tumbledown", "Wrenfield", "Ashgrove", "Copperbeech", "Duskwater")
_STREETS = ("Quillby Lane", "Marrowgate Road", "Tansley Close", "Hob Hollow", "Wrenthorpe Street", "Cobble Row", "Fernhallow Avenue", "Lantern Walk", "Gorsebrook Drive", "Pipers Yard", "Kittiwake Crescent", "Oxbow Terrace")
_TOWNS = ("Ashcombe Vale", "Brindlemoor", "Corrin Bay", "Dunmere", "Elsworth Cross", "Fallowmead")


@dataclass
class Patient:
    """One fictional patient: codes (primary first), invented identifiers, note dates; ``canary`` if planted."""

    site: str
    patient_id: str
    female: bool
    codes: list[str]
    name: str
    mrn: str
    address: str
    phone: str
    dob: date
    first_date: date
    n_notes: int
    med: str
    canary: str | None = None
    canary_note: int = 0  # which of the patient's notes carries ``canary``
    note_ids: list[str] = field(default_factory=list)

    def phi(self) -> list[str]:
        """The PHI strings a note of this patient may contain (name, MRN, address, phone, DOB)."""
        return [self.name, self.mrn, self.address, self.phone, dob_text(self.site, self.dob)]


def unique(rng: random.Random, seen: set[str], make: Callable[[random.Random], str]) -> str:
    """A value of ``make(rng)`` not yet in ``seen`` (then added): identifiers and secrets never repeat."""
    while True:
        value = make(rng)
        if value not in seen:
            seen.add(value)
            return value


def _make_name(rng: random.Random, female: bool, attempt: list[int], *, always_middle: bool = False) -> str:
    first = rng.choice(_FEMALE if female else _MALE)
    attempt[0] += 1
    # Past ~1000 draws collisions get likely, so a middle initial widens the space.
    middle = f" {chr(65 + rng.randrange(26))}." if always_middle or attempt[0] > 1000 else ""
    return f"{first}{middle} {rng.choice(_LAST)}"


_MRN = {
    "site-a": lambda r: f"{r.randrange(10, 100)}-{r.randrange(1000, 10000)}-{r.randrange(10)}",
    "site-b": lambda r: f"HB-{r.randrange(100000, 1000000)}",
    "site-c": lambda r: f"CV {r.randrange(100, 1000)} {r.randrange(100, 1000)}",
}
# Telephone numbers come from ranges Ofcom reserves for drama, 1,000 numbers each: a site's
# first 1,000 patients draw from its first range (so smaller populations are unchanged),
# the next 1,000 from its second range, and so on.
_PHONE_RANGES = {
    "site-a": ("07700 900{:03d}", "0113 496 0{:03d}", "0114 496 0{:03d}", "0115 496 0{:03d}",
               "0116 496 0{:03d}", "0117 496 0{:03d}"),
    "site-b": ("01632 960{:03d}", "0118 496 0{:03d}", "0121 496 0{:03d}", "0131 496 0{:03d}",
               "0141 496 0{:03d}", "0151 496 0{:03d}"),
    "site-c": ("+44 20 7946 0{:03d}", "0161 496 0{:03d}", "0191 498 0{:03d}", "029 2018 0{:03d}",
               "0808 157 0{:03d}", "0909 879 0{:03d}"),
}
PHONES_PER_RANGE = 1000
MAX_PATIENTS = PHONES_PER_RANGE * min(len(r) for r in _PHONE_RANGES.values())  # per site: phones are unique


def _phone(rng: random.Random, site: str, index: int) -> str:
    return _PHONE_RANGES[site][index // PHONES_PER_RANGE].format(rng.randrange(PHONES_PER_RANGE))


def _address(rng: random.Random, index: int) -> str:
    # 14,328 street addresses are shared by the whole consortium; past a site's first
    # 1,000 patients flats widen the space so large populations stay unique.
    flat = f"Flat {rng.randrange(1, 10)}, " if index >= PHONES_PER_RANGE else ""
    return f"{flat}{rng.randrange(1, 200)} {rng.choice(_STREETS)}, {rng.choice(_TOWNS)}"


def make_patients(site: str, seed: int, n: int, seen: set[str], *, codes: Sequence[str],
                  public: bool = False) -> list[Patient]:
    """``n`` fictional patients of ``site`` (same ``seed`` -> same patients), identifiers kept unique in ``seen``.

    Primary codes are drawn from ``codes`` with the site's non-IID weights, each
    code at least once when ``n`` allows. ``public`` draws the separate
    styled-public population (its own RNG namespace, every name with a middle
    initial).
    """
    if not 0 <= n <= MAX_PATIENTS:
        raise ConfigError("invalid demo population", [Problem(
            "n", f"must be between 0 and {MAX_PATIENTS} (each patient's phone number is unique), got {n}")])
    rng = random.Random(f"fedsynth-demo:{seed}:{'public-styled:' if public else ''}{site}:patients")
    weights = [_SITE_WEIGHTS[site].get(code, 1) for code in codes]
    # Every code at least once when there is room, so each site can be evaluated on every code.
    primaries = list(codes[:n]) + rng.choices(codes, weights, k=max(0, n - len(codes)))
    rng.shuffle(primaries)
    names_drawn = [0]
    patients = []
    for i, primary in enumerate(primaries):
        female = rng.random() < 0.5
        codes = [primary]
        if rng.random() < 0.25:
            codes.append(rng.choice(COMORBID[primary]))
        first = date(2019, 1, 1) + timedelta(days=rng.randrange(1600))
        lo, hi = AGES[primary]
        dob = first - timedelta(days=rng.randrange(lo * 365 + 1, hi * 365 + 300))
        patients.append(Patient(
            site=site, patient_id=f"{site}-p{i + 1:04d}", female=female, codes=codes,
            name=unique(rng, seen, partial(_make_name, female=female, attempt=names_drawn, always_middle=public)),
            mrn=unique(rng, seen, _MRN[site]), address=unique(rng, seen, partial(_address, index=i)),
            phone=unique(rng, seen, partial(_phone, site=site, index=i)), dob=dob, first_date=first,
            n_notes=rng.choices((1, 2, 3, 4), (45, 30, 15, 10))[0],
            med=rng.choice(CODE_VOCAB[primary]["meds"]),
        ))
    return patients
