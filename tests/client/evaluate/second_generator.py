"""A second notes generator, written for the tests only (the project's demo data never uses it).

Another layout (SOAP headings), another population (adult primary care:
hypertension, type 2 diabetes, asthma, reflux, low back pain), another
vocabulary, and other identifier formats ("Surname, Given" names,
``MRN QX-48213-7`` record numbers, ``dd.mm.yyyy`` dates). Notes are heavily
templated, as real clinic notes are: every patient's notes share long stock
sentences (so absolute lexical metrics flag held-out patients who were never
trained on), and each note carries patient-specific facts (vitals, doses,
identifiers) that a memorizing model would copy.

Deterministic for a given seed (``random.Random``): a known-answer fixture, not noise.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.notes import Note

CODES = ("I10", "E11.9", "J45.9", "K21.9", "M54.5")
_SURNAMES = ("Okafor", "Lindqvist", "Haddad", "Moreau", "Tanaka", "Petrov", "Achebe", "Novak",
             "Iyer", "Delacroix", "Brennan", "Kowalczyk", "Saarinen", "Mbeki", "Quispe", "Varga")
_GIVEN = ("Ngozi", "Astrid", "Karim", "Elodie", "Hiro", "Dmitri", "Chinua", "Milena",
          "Anil", "Renee", "Siobhan", "Tomasz", "Aino", "Thabo", "Rosa", "Bela")
_COMPLAINT = {
    "I10": ("occasional morning headaches", "no chest pain", "home readings around {sbp}/{dbp}"),
    "E11.9": ("increased thirst", "no hypoglycaemic episodes", "fasting glucose near {glu} mmol/l"),
    "J45.9": ("night-time cough", "wheeze on exertion", "reliever use {puffs} times a week"),
    "K21.9": ("heartburn after meals", "no dysphagia", "symptoms {puffs} nights a week"),
    "M54.5": ("lower back pain", "no leg weakness", "pain score {pain} out of ten"),
}
_PLAN = {
    "I10": "continue amlodipine {dose} mg once daily and recheck blood pressure",
    "E11.9": "continue metformin {dose} mg twice daily and repeat HbA1c",
    "J45.9": "step up to budesonide {dose} micrograms twice daily and review inhaler technique",
    "K21.9": "start omeprazole {dose} mg before breakfast and review in the clinic",
    "M54.5": "naproxen {dose} mg as needed with physiotherapy referral",
}
# Stock sentences every clinician at this practice pastes (> 13 tokens each).
_STOCK = (
    "Patient seen in the family practice clinic today for a scheduled review of a chronic condition .",
    "Medication reconciliation completed with the patient and the pharmacy list was updated accordingly .",
    "Red flag symptoms were discussed and the patient knows to attend urgent care if they occur .",
    "Lifestyle advice given on diet , exercise , alcohol and smoking with written information provided .",
)
_SAFETY = (
    "Follow up in the practice in three months or sooner if symptoms worsen .",
    "Follow up in the practice in six weeks or sooner if symptoms worsen .",
)


@dataclass(frozen=True)
class Patient:
    patient_id: str
    name: str  # "Surname-Surname, Given"
    mrn: str  # "MRN QX-48213-7"
    dob: str  # dd.mm.yyyy
    code: str


def _patient(rng: random.Random, i: int, prefix: str) -> Patient:
    # double-barrelled surnames: 16 x 16 x 16 names, so two test populations rarely share one
    surname = f"{rng.choice(_SURNAMES)}-{rng.choice(_SURNAMES)}"
    given = rng.choice(_GIVEN)
    mrn = f"MRN QX-{rng.randrange(10000, 99999)}-{rng.randrange(10)}"
    dob = f"{rng.randrange(1, 29):02d}.{rng.randrange(1, 13):02d}.{rng.randrange(1940, 2000)}"
    return Patient(f"{prefix}{i:04d}", f"{surname}, {given}", mrn, dob, rng.choice(CODES))


def _note_text(rng: random.Random, p: Patient, visit: int) -> str:
    facts = {"sbp": rng.randrange(128, 176), "dbp": rng.randrange(78, 104), "glu": rng.randrange(6, 14),
             "puffs": rng.randrange(2, 7), "pain": rng.randrange(3, 9), "dose": rng.choice((5, 10, 20, 40, 500))}
    complaint = [c.format(**facts) for c in _COMPLAINT[p.code]]
    rng.shuffle(complaint)
    stock = list(_STOCK)
    rng.shuffle(stock)
    return "\n".join([
        f"S: {p.name} ({p.mrn}, born {p.dob}) attends visit {visit}. Reports {', '.join(complaint)}.",
        f"{stock[0]} {stock[1]}",
        f"O: BP {facts['sbp']}/{facts['dbp']} mmHg, pulse {rng.randrange(58, 96)} bpm, "
        f"weight {rng.randrange(52, 118)} kg, SpO2 {rng.randrange(94, 100)} %.",
        f"A: {p.code} stable on current regimen; {stock[2]}",
        f"P: {_PLAN[p.code].format(**facts)}. {stock[3]} {rng.choice(_SAFETY)}",
    ])


def make_notes(n_patients: int, *, seed: int, prefix: str = "q", notes_per_patient: int = 2) -> list[Note]:
    """``n_patients`` patients with ``notes_per_patient`` SOAP notes each (identifiers filled in)."""
    rng = random.Random(seed)
    notes = []
    for i in range(n_patients):
        p = _patient(rng, i, prefix)
        for v in range(notes_per_patient):
            notes.append(Note(
                note_id=f"{p.patient_id}-v{v}", patient_id=p.patient_id, icd10=(p.code,),
                text=_note_text(rng, p, v + 1), identifiers=(p.name, p.mrn, p.dob),
            ))
    return notes


def write_notes(notes: list[Note], path: Path) -> Path:
    """The notes as a site notes file (JSONL, the project's ingestion format)."""
    with path.open("w", encoding="utf-8") as f:
        for n in notes:
            f.write(json.dumps({"note_id": n.note_id, "patient_id": n.patient_id, "icd10": list(n.icd10),
                                "text": n.text, "identifiers": list(n.identifiers)}) + "\n")
    return path


def write_plain_reports(texts_codes: list[tuple[str, str]], path: Path) -> Path:
    """Reports in the plain ``{"icd10": code, "text": text}`` format (no provenance fields)."""
    with path.open("w", encoding="utf-8") as f:
        for code, text in texts_codes:
            f.write(json.dumps({"icd10": code, "text": text}) + "\n")
    return path


class BagOfWordsEmbedder:
    """Deterministic hashed bag-of-words vectors (no model to load): an ``Embedder`` stand-in."""

    identity = "bag-of-words-second-generator"

    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.full((len(texts), 64), 1e-3, dtype=np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, int(hashlib.sha256(w.encode()).hexdigest(), 16) % 64] += 1
        return out / np.linalg.norm(out, axis=1, keepdims=True)
