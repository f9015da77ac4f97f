"""A FICTIONAL demo consortium: three invented hospitals plus a public split.

Nothing written here describes a real person. Every text starts with
``[FICTIONAL DEMO RECORD]`` and every directory gets a ``README-FICTIONAL.txt``.
Names, record numbers, addresses (invented streets and towns), phone numbers
(ranges reserved for drama) and dates of birth are invented, and they are
planted inside the texts on purpose: the PHI-echo and memorization checks need
something to find.

Layout written by :func:`write_demo` (same seed -> byte-identical files)::

    out_dir/README-FICTIONAL.txt
    out_dir/site-a/notes.jsonl   terse bullet-like liaison notes (psychosis, bipolar, alcohol heavy)
    out_dir/site-b/notes.jsonl   long narrative clinic letters (depression, anxiety, trauma heavy)
    out_dir/site-c/notes.jsonl   structured "Field: value" forms (ADHD, eating, OCD, panic heavy)
    out_dir/<site>/canaries.json only when ``canary_repetitions`` is given
    out_dir/public/notes.jsonl   generic report language, no symptoms/style/identifiers/canaries

One JSON object per line: ``note_id`` (unique across the consortium),
``patient_id`` (``site-a-p0001``; ``public-0001``), ``icd10`` (dotted codes,
primary first), ``text``, ``date`` (ISO) and ``identifiers`` (the patient's
PHI strings that occur in that text). A patient has 1-4 notes sharing
identifiers and codes. The public split has every code with its WHO title in
the Diagnosis section but none of the code-specific symptom vocabulary, so a
model pretrained on it has something to learn from site data, and
memorization something to leak.

Canaries (Secret Sharer audits). Template, fixed::

    "The patient's locker combination is " + SECRET + "."

``SECRET`` is 6 decimal digits separated by single spaces ("4 7 1 9 3 2"); the
candidate space is all 10**6 such strings. For a repetition count r, the
canary sentence is planted once in one note of each of r *different* patients
of a site, all of them patients the default split trains on (held-out
fraction 0.2, split seed 0). Across patients, because the privacy unit is the
patient: a patient is sampled at most once per step whatever their note
count, so repeating a secret inside one patient's notes does not make it seen
more often, while a secret shared by r patients is seen ~r times as often and
is covered only by group privacy (about r times epsilon). Canaries are unique
across the consortium and never appear in the public split. ``canaries.json``
lists each canary (text, prefix, secret, suffix, patient_ids, note_ids,
repetitions) plus never-planted reference canaries drawn by the same
generator, as the baseline for exposure: rank the true secret's
log-likelihood (given the prefix) among random candidates.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

from client.demo.patients import MAX_PATIENTS, Patient, make_patients, unique
from client.demo.text import (
    CODE_VOCAB,
    DOCTORS,
    FICTIONAL_MARKER,
    GENERIC,
    dob_text,
    one,
    pick,
    render_a,
    render_b,
    render_c,
    render_public,
    slots,
)
from client.patient_split import heldout_patients
from shared import icd10
from shared.errors import ConfigError, Problem

__all__ = [
    "SITE_IDS", "CODES", "FICTIONAL_MARKER", "STYLE_MARKERS", "CANARY_PREFIX", "CANARY_SUFFIX",
    "CANARY_CANDIDATES", "DemoManifest", "write_demo", "public_texts", "styled_public_texts", "stand_in_codes",
    "canary_text",
]

SITE_IDS = ("site-a", "site-b", "site-c")
CODES: tuple[str, ...] = tuple(icd10.normalize_all(CODE_VOCAB, where="demo codes"))
CANARY_PREFIX = "The patient's locker combination is "
CANARY_SUFFIX = "."
CANARY_DIGITS = 6
CANARY_CANDIDATES = 10**CANARY_DIGITS
REFERENCE_CANARIES = 20
MAX_PATIENTS_PER_SITE = MAX_PATIENTS  # phones are unique per site (client.demo.patients)

# Strings only one site's writing style produces; the public split has none.
STYLE_MARKERS: dict[str, tuple[str, ...]] = {
    "site-a": ("ASHCOMBE VALE GH", "RFR:", "HPC:", "c/o", "r/v"),
    "site-b": ("Brindlemoor Community Mental Health Centre", "Yours sincerely", "Dear Dr"),
    "site-c": ("CORRIN BAY SPECIALIST CLINIC", "FORM MH-EVAL-3", "Medical Record Number:", "Risk Level:"),
}

@dataclass(frozen=True)
class DemoManifest:
    """Where :func:`write_demo` put things. ``canaries`` is empty when none were planted."""

    root: Path
    sites: dict[str, Path]
    public: Path
    canaries: dict[str, Path]
    seed: int


def canary_text(secret: str) -> str:
    """The canary sentence for ``secret`` (6 digits separated by single spaces)."""
    return f"{CANARY_PREFIX}{secret}{CANARY_SUFFIX}"


def _secret(rng: random.Random) -> str:
    return " ".join(str(rng.randrange(10)) for _ in range(CANARY_DIGITS))



def _content(rng: random.Random, p: Patient, k: int, when: date, *, vocab_code: str | None = None) -> dict:
    """Everything one note says, before a site's style lays it out.

    ``vocab_code`` (styled public texts only) takes the clinical wording from
    that demo code's vocabulary instead of the patient's own (a stand-in's binding).
    """
    vocab = CODE_VOCAB[vocab_code or p.codes[0]]
    s = slots(rng, p.female, when.year)
    perception = vocab.get("perception", ()) if rng.random() < 0.7 else ()
    return {
        "followup": k > 0, "date": when, "age": (when - p.dob).days // 365, "slots": s,
        "source": rng.choice(GENERIC["source"]), "complaint": one(rng, vocab["complaint"], s),
        "dur": s["dur"], "progress": one(rng, GENERIC["progress"], s),
        "symptoms": pick(rng, vocab["symptoms"], s, rng.randint(3, 5)),
        "past": one(rng, GENERIC["past"], s),
        "substance": pick(rng, vocab.get("substance", GENERIC["substance"]), s, rng.randint(1, 2)),
        "living": one(rng, GENERIC["living"], s), "work": one(rng, GENERIC["work"], s),
        "appearance": one(rng, GENERIC["appearance"], s), "behaviour": one(rng, GENERIC["behaviour"], s),
        "speech": one(rng, GENERIC["speech"], s), "mood": one(rng, vocab["mood"], s),
        "thought": one(rng, vocab["thought"], s),
        "perception": one(rng, perception or GENERIC["perception"], s),
        "cognition": one(rng, GENERIC["cognition"], s), "insight": one(rng, GENERIC["insight"], s),
        "risk": pick(rng, vocab["risk"], s, 1) + pick(rng, GENERIC["risk"], s, rng.randint(1, 2)),
        "risk_level": rng.choice(("low", "low", "moderate")),
        "plan": [p.med] + pick(rng, vocab["plan"], s, rng.randint(1, 2)) + pick(rng, GENERIC["plan"], s, rng.randint(1, 2)),
        "review_weeks": rng.choice((2, 3, 4, 6, 8, 12)),
        "dx": [(c, icd10.describe(c)) for c in p.codes],
        "show_contact": k == 0 or rng.random() < 0.4,
        "doctor": rng.choice(DOCTORS), "canary": p.canary if k == p.canary_note else None, "female": p.female, "name": p.name,
        "mrn": p.mrn, "address": p.address, "phone": p.phone, "dob": dob_text(p.site, p.dob),
    }


def _render(site: str, c: dict, rng: random.Random) -> str:
    if site == "site-a":
        return render_a(c)
    if site == "site-b":
        return render_b(c, rng)
    return render_c(c)


def _site_records(patients: list[Patient], seed: int) -> list[dict]:
    records = []
    for p in patients:
        rng = random.Random(f"fedsynth-demo:{seed}:{p.patient_id}:notes")
        when = p.first_date
        for k in range(p.n_notes):
            text = _render(p.site, _content(rng, p, k, when), rng)
            note_id = f"{p.patient_id}-n{k + 1}"
            p.note_ids.append(note_id)
            records.append({"note_id": note_id, "patient_id": p.patient_id, "icd10": list(p.codes), "text": text,
                            "date": when.isoformat(), "identifiers": [s for s in p.phi() if s in text]})
            when += timedelta(days=rng.randint(14, 120))
    return records


def public_texts(*, seed: int = 0, n: int = 600) -> list[tuple[str, str]]:
    """``n`` (code, text) pairs of the public split; every code appears (n >= len(CODES)).

    Public texts carry generic structure and language only: no code-specific
    symptoms, no site style, no identifiers and no canaries. No disk I/O.
    """
    problems = _check_int("n", n, len(CODES), 100_000) + _check_int("seed", seed, None, None)
    if problems:
        raise ConfigError("invalid public split request", problems)
    rng = random.Random(f"fedsynth-demo:{seed}:public")
    codes = [CODES[i % len(CODES)] for i in range(n)]
    rng.shuffle(codes)
    return [(code, render_public(rng, code)) for code in codes]


def stand_in_codes() -> dict[str, str]:
    """Chapter V categories outside every demo code's category, each bound to one demo code's vocabulary.

    Pretraining only (:func:`styled_public_texts`). A real base model has learnt
    that what a report says depends on the diagnosis it is asked for; these
    public stand-ins teach that mechanism with codes no demo site uses (F40
    "Phobic anxiety disorders" may be written with F20's wording: the binding is
    arbitrary and fictional), so a site's DP steps only have to bind its own
    codes to their content, and the base model still knows nothing about the
    demo codes' symptoms (zero-shot fidelity stays at chance). Fixed, public and
    the same for every seed.
    """
    taken = {c.split(".")[0] for c in CODES}
    free = [c for c in icd10.chapter_f_codes() if c not in taken]
    rng = random.Random("fedsynth-demo:stand-in-codes")
    rng.shuffle(free)
    return {code: CODES[i % len(CODES)] for i, code in enumerate(free)}


def styled_public_texts(*, seed: int = 0, n: int = 900) -> list[tuple[str, str]]:
    """``n`` (code, text) pairs laid out in the three house styles, for pretraining only.

    A real base model has read clinical notes in common layouts and shorthand
    before any site fine-tunes it; a model pretrained on :func:`public_texts`
    alone has not, and spends a site's whole training budget learning the
    layout. These texts teach layout, wording and that content follows the
    requested code, not site data: a separate fictional population (its own RNG
    namespace, every name with a middle initial, which site names only get past
    1000 patients), no canaries, and each note written for a **stand-in code**
    (:func:`stand_in_codes`: a chapter V category no demo code belongs to) with
    the clinical wording its binding names. No demo code is ever paired with
    symptoms here, so which symptoms go with which demo code is still learnt
    only from site notes. No address or telephone lines (the fiction phone
    ranges are small enough to collide with a site patient's number).
    Styles rotate site-a, site-b, site-c; the code returned is the stand-in.
    """
    problems = _check_int("n", n, 1, 100_000) + _check_int("seed", seed, None, None)
    if problems:
        raise ConfigError("invalid styled public request", problems)
    rng = random.Random(f"fedsynth-demo:{seed}:public-styled")
    bindings = stand_in_codes()
    stand_ins = sorted(bindings)
    seen: set[str] = set()
    pools = {site: make_patients(site, seed, -(-n // len(SITE_IDS)), seen, codes=CODES, public=True)
             for site in SITE_IDS}
    out = []
    for i in range(n):
        site = SITE_IDS[i % len(SITE_IDS)]
        p = pools[site][i // len(SITE_IDS)]
        code = rng.choice(stand_ins)
        vocab = bindings[code]
        p.med = rng.choice(CODE_VOCAB[vocab]["meds"])
        k = rng.randrange(p.n_notes)
        when = p.first_date + timedelta(days=60 * k)
        c = _content(rng, p, k, when, vocab_code=vocab)
        c["dx"] = [(code, icd10.describe(code))]
        c["show_contact"] = False  # phones come from small fiction ranges the sites' patients share
        out.append((code, _render(site, c, rng)))
    return out


def _check_int(name: str, value: object, lo: int | None, hi: int | None) -> list[Problem]:
    if not isinstance(value, int) or isinstance(value, bool):
        return [Problem(name, f"must be an integer, got {value!r}")]
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        return [Problem(name, f"must be between {lo} and {hi}, got {value}")]
    return []


_README = """FICTIONAL DEMO DATA - NOT REAL PATIENTS

Every record in this directory was generated by fedsynth's demo generator
(client/demo/data.py, seed {seed}). All names, record numbers, addresses,
phone numbers, dates of birth, hospitals and clinicians are invented; the
clinical content is synthetic teaching text and is not medical advice.
Every text starts with "{marker}".
"""


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")


def _write_readme(folder: Path, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README-FICTIONAL.txt").write_text(
        _README.format(seed=seed, marker=FICTIONAL_MARKER), encoding="utf-8", newline="\n")


def write_demo(out_dir: Path, *, seed: int = 0, patients_per_site: int = 120,
               canary_repetitions: Sequence[int] = (), public_reports: int = 600) -> DemoManifest:
    """Write the fictional consortium under ``out_dir`` (see the module docstring for the layout).

    ``canary_repetitions`` (e.g. ``(1, 5, 10)``): for each r, one unique canary
    planted in one note of each of r different training patients per site, so
    exposure can be measured against how many patients share a secret.
    """
    out_dir = Path(out_dir)
    problems = (_check_int("seed", seed, None, None)
                + _check_int("patients_per_site", patients_per_site, 1, MAX_PATIENTS_PER_SITE)
                + _check_int("public_reports", public_reports, len(CODES), 100_000))
    reps = list(canary_repetitions)
    for i, r in enumerate(reps):
        problems += _check_int(f"canary_repetitions[{i}]", r, 1, 100)
    if isinstance(patients_per_site, int) and not problems:
        trained = patients_per_site - len(heldout_patients([str(i) for i in range(patients_per_site)]))
        if sum(reps) > trained:
            problems.append(Problem("canary_repetitions", f"{sum(reps)} canary holders need as many training "
                                    f"patients per site; {patients_per_site} patients give {trained}"))
    if out_dir.exists() and not out_dir.is_dir():
        problems.append(Problem(str(out_dir), "exists and is not a directory"))
    if problems:
        raise ConfigError("invalid demo data request", problems)

    canary_rng = random.Random(f"fedsynth-demo:{seed}:canaries")
    used_secrets: set[str] = set()
    seen: set[str] = set()
    sites: dict[str, Path] = {}
    canaries: dict[str, Path] = {}
    _write_readme(out_dir, seed)
    for site in SITE_IDS:
        patients = make_patients(site, seed, patients_per_site, seen, codes=CODES)
        held = heldout_patients([p.patient_id for p in patients]) if reps else set()
        pool = canary_rng.sample([p for p in patients if p.patient_id not in held], sum(reps))
        chosen: list[list[Patient]] = []
        for r in reps:
            holders, pool = pool[:r], pool[r:]
            text = canary_text(unique(canary_rng, used_secrets, _secret))
            for p in holders:
                p.canary, p.canary_note = text, canary_rng.randrange(p.n_notes)
            chosen.append(holders)
        records = _site_records(patients, seed)
        sites[site] = out_dir / site / "notes.jsonl"
        _write_readme(out_dir / site, seed)
        _write_jsonl(sites[site], records)
        if reps:
            refs = [unique(canary_rng, used_secrets, _secret) for _ in range(REFERENCE_CANARIES)]
            canaries[site] = out_dir / site / "canaries.json"
            canaries[site].write_text(json.dumps(_canary_doc(site, seed, chosen, reps, refs), indent=2) + "\n",
                                      encoding="utf-8", newline="\n")

    public = out_dir / "public" / "notes.jsonl"
    date_rng = random.Random(f"fedsynth-demo:{seed}:public-dates")
    _write_readme(public.parent, seed)
    _write_jsonl(public, [
        {"note_id": f"public-n{i:04d}", "patient_id": f"public-{i:04d}", "icd10": [code], "text": text,
         "date": (date(2020, 1, 1) + timedelta(days=date_rng.randrange(1500))).isoformat(), "identifiers": []}
        for i, (code, text) in enumerate(public_texts(seed=seed, n=public_reports), 1)
    ])
    return DemoManifest(root=out_dir, sites=sites, public=public, canaries=canaries, seed=seed)


def _canary_doc(site: str, seed: int, chosen: list[list[Patient]], reps: list[int], refs: list[str]) -> dict:
    def entry(secret: str) -> dict:
        return {"text": canary_text(secret), "prefix": CANARY_PREFIX, "secret": secret, "suffix": CANARY_SUFFIX}

    return {
        "fictional": True, "site": site, "seed": seed,
        "template": CANARY_PREFIX + "{secret}" + CANARY_SUFFIX,
        "secret_format": f"{CANARY_DIGITS} decimal digits separated by single spaces",
        "candidate_space": CANARY_CANDIDATES,
        "exposure": "rank the secret's log-likelihood given the prefix among random candidates of the "
                    "same format; exposure = log2(candidate_space) - log2(rank)",
        "planted": "once in one note of each of `repetitions` different patients, all trained on under the "
                   "default split (heldout_fraction 0.2, split_seed 0)",
        "canaries": [
            {**entry(holders[0].canary[len(CANARY_PREFIX):-len(CANARY_SUFFIX)]),
             "patient_ids": [p.patient_id for p in holders],
             "note_ids": [p.note_ids[p.canary_note] for p in holders], "repetitions": r}
            for holders, r in zip(chosen, reps, strict=True)
        ],
        "references": [entry(s) for s in refs],
    }
