"""The fictional demo consortium: determinism, non-IID sites, identifiers, canaries, public split."""

from __future__ import annotations

import itertools
import json
import random
import re
from collections import Counter, defaultdict
from datetime import date
from pathlib import Path

import pytest

from client.demo.data import (
    CANARY_CANDIDATES,
    CANARY_PREFIX,
    CODES,
    FICTIONAL_MARKER,
    SITE_IDS,
    STYLE_MARKERS,
    public_texts,
    stand_in_codes,
    styled_public_texts,
    write_demo,
)
from client.demo.text import CODE_VOCAB
from client.evaluate.tokens import word_tokens
from client.patient_split import heldout_patients
from shared import icd10
from shared.errors import ConfigError

REPS = (1, 5, 10)
FIELDS = {"note_id": str, "patient_id": str, "icd10": list, "text": str, "date": str, "identifiers": list}


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    manifest = write_demo(tmp_path_factory.mktemp("demo"), seed=7, canary_repetitions=REPS)
    sites = {site: _read(path) for site, path in manifest.sites.items()}
    canaries = {site: json.loads(path.read_text()) for site, path in manifest.canaries.items()}
    return manifest, sites, _read(manifest.public), canaries


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    a = write_demo(tmp_path / "a", seed=3, patients_per_site=40, canary_repetitions=(1, 4), public_reports=50)
    b = write_demo(tmp_path / "b", seed=3, patients_per_site=40, canary_repetitions=(1, 4), public_reports=50)
    c = write_demo(tmp_path / "c", seed=4, patients_per_site=40, canary_repetitions=(1, 4), public_reports=50)
    files_a, files_b, files_c = _all_files(a.root), _all_files(b.root), _all_files(c.root)
    assert files_a == files_b
    assert set(files_a) == set(files_c)
    for name in ("site-a/notes.jsonl", "site-b/notes.jsonl", "site-c/notes.jsonl", "public/notes.jsonl",
                 "site-a/canaries.json"):
        assert files_a[name] != files_c[name], name
    # The global random state is neither used nor disturbed.
    random.seed(123)
    before = random.random()
    random.seed(123)
    write_demo(tmp_path / "d", seed=3, patients_per_site=5, public_reports=13)
    assert random.random() == before


def test_layout_fields_and_fictional_marking(demo):
    manifest, sites, public, _ = demo
    assert set(manifest.sites) == set(SITE_IDS) == set(manifest.canaries)
    assert manifest.public == manifest.root / "public" / "notes.jsonl"
    for folder in [manifest.root, manifest.public.parent, *(p.parent for p in manifest.sites.values())]:
        assert "FICTIONAL" in (folder / "README-FICTIONAL.txt").read_text()
    for record in [r for notes in sites.values() for r in notes] + public:
        assert set(record) == set(FIELDS)
        for key, kind in FIELDS.items():
            assert isinstance(record[key], kind), key
        assert record["text"].startswith(FICTIONAL_MARKER)
        assert record["icd10"] and all(icd10.normalize(c) == c for c in record["icd10"])
        date.fromisoformat(record["date"])


def test_no_canary_file_without_canaries(tmp_path):
    manifest = write_demo(tmp_path, seed=1, patients_per_site=20, public_reports=13)
    assert manifest.canaries == {}
    assert not list(tmp_path.rglob("canaries.json"))
    assert CANARY_PREFIX not in "".join(p.read_text() for p in manifest.sites.values())


def test_ids_unique_and_patients_consistent(demo):
    _, sites, public, canaries = demo
    all_notes = [r for notes in sites.values() for r in notes] + public
    assert len({r["note_id"] for r in all_notes}) == len(all_notes)
    for site, notes in sites.items():
        by_patient = defaultdict(list)
        for r in notes:
            assert r["patient_id"].startswith(site + "-")
            by_patient[r["patient_id"]].append(r)
        for recs in by_patient.values():
            assert 1 <= len(recs) <= 4  # canary holders too: a canary adds no notes
            assert len({tuple(r["icd10"]) for r in recs}) == 1  # follow-ups keep the codes
            dates = [r["date"] for r in recs]
            assert dates == sorted(dates) and len(set(dates)) == len(dates)
            union = {s for r in recs for s in r["identifiers"]}
            assert len(union) == 5  # name, record number, address, phone, date of birth
        assert max(len(v) for v in by_patient.values()) >= 2
    assert all(r["patient_id"].startswith("public-") and r["identifiers"] == [] for r in public)


def test_identifiers_occur_in_their_note_and_nowhere_else(demo):
    _, sites, _, _ = demo
    owner = {}
    for notes in sites.values():
        for r in notes:
            assert len(r["identifiers"]) >= 3  # name, record number, date of birth always
            for ident in r["identifiers"]:
                assert ident in r["text"]
                assert owner.setdefault(ident, r["patient_id"]) == r["patient_id"]


def test_at_least_13_codes_and_sites_are_non_iid(demo):
    _, sites, public, _ = demo
    assert len(CODES) >= 13
    dists = {}
    for site, notes in sites.items():
        primary = {r["patient_id"]: r["icd10"][0] for r in notes}
        counts = Counter(primary.values())
        assert set(counts) == set(CODES)  # every code present at every site
        dists[site] = {c: counts[c] / len(primary) for c in CODES}
    consortium = {c for notes in sites.values() for r in notes for c in r["icd10"]}
    assert len(consortium) >= 13
    for a, b in itertools.combinations(SITE_IDS, 2):
        tv = 0.5 * sum(abs(dists[a][c] - dists[b][c]) for c in CODES)
        assert tv > 0.2, (a, b, tv)
    assert {r["icd10"][0] for r in public} == set(CODES)


def test_each_site_has_its_own_style(demo):
    _, sites, _, _ = demo
    for site, notes in sites.items():
        header = STYLE_MARKERS[site][0]
        assert all(header in r["text"] for r in notes)
        for other in SITE_IDS:
            if other != site:
                assert not any(STYLE_MARKERS[other][0] in r["text"] for r in notes)


def test_public_split_leaks_nothing_site_specific(demo):
    manifest, sites, public, canaries = demo
    public_bytes = manifest.public.read_text(encoding="utf-8")
    secrets = [c["text"] for doc in canaries.values() for c in doc["canaries"] + doc["references"]]
    identifiers = {s for notes in sites.values() for r in notes for s in r["identifiers"]}
    markers = [m for ms in STYLE_MARKERS.values() for m in ms]
    assert len(identifiers) == 3 * 120 * 5
    for needle in [*identifiers, *secrets, *markers, CANARY_PREFIX]:
        assert needle not in public_bytes, needle
    # No code-specific symptom language either (phrases without per-note placeholders).
    specific = [p for v in CODE_VOCAB.values() for slot in ("complaint", "symptoms", "mood", "thought")
                for p in v[slot] if "{" not in p]
    assert len(specific) > 150
    leaked = [p for p in specific if p in public_bytes]
    assert leaked == []
    # ...while the site notes do use it (the test would catch a vocabulary that never appears).
    site_bytes = "".join(r["text"] for notes in sites.values() for r in notes)
    assert sum(p in site_bytes for p in specific) > 0.8 * len(specific)


def test_public_diagnosis_has_code_and_who_title(demo):
    _, _, public, _ = demo
    for r in public:
        code = r["icd10"][0]
        diagnosis = r["text"].split("\nDiagnosis\n", 1)[1].split("\n\n", 1)[0]
        assert f"{code} {icd10.describe(code)}" in diagnosis
        for heading in ("Reason for referral", "History", "Mental status examination", "Risk assessment", "Plan"):
            assert f"\n\n{heading}\n" in r["text"]


def test_public_texts_matches_written_split_and_covers_all_codes(demo):
    manifest, _, public, _ = demo
    assert public_texts(seed=manifest.seed, n=len(public)) == [(r["icd10"][0], r["text"]) for r in public]
    assert {code for code, _ in public_texts(seed=5, n=len(CODES))} == set(CODES)
    assert public_texts(seed=1, n=30) != public_texts(seed=2, n=30)


def test_canaries_planted_exactly_repetitions_times(demo):
    _, sites, public, canaries = demo
    seen_secrets = []
    for site, doc in canaries.items():
        assert doc["fictional"] is True and doc["candidate_space"] == CANARY_CANDIDATES == 10**6
        assert doc["template"] == CANARY_PREFIX + "{secret}."
        assert sorted(c["repetitions"] for c in doc["canaries"]) == sorted(REPS)
        assert len(doc["references"]) >= 10
        for c in doc["canaries"] + doc["references"]:
            assert re.fullmatch(r"\d( \d){5}", c["secret"])
            assert c["text"] == c["prefix"] + c["secret"] + c["suffix"] and c["prefix"] == CANARY_PREFIX
            seen_secrets.append(c["secret"])
        heldout = heldout_patients({r["patient_id"] for r in sites[site]})  # the default split's
        holders_of_all = [c["patient_ids"] for c in doc["canaries"]]
        assert len({p for h in holders_of_all for p in h}) == sum(REPS)  # no patient holds two canaries
        for c in doc["canaries"]:
            holders = [r["note_id"] for r in sites[site] if c["text"] in r["text"]]
            total = sum(r["text"].count(c["text"]) for r in sites[site])
            assert total == c["repetitions"] == len(c["note_ids"])
            assert sorted(holders) == sorted(c["note_ids"])
            # once per patient, in r different patients, all of them trained on
            holder_patients = [r["patient_id"] for r in sites[site] if r["note_id"] in holders]
            assert sorted(holder_patients) == sorted(c["patient_ids"]) and len(set(holder_patients)) == c["repetitions"]
            assert not set(holder_patients) & heldout
            for other, notes in sites.items():
                if other != site:
                    assert not any(c["text"] in r["text"] for r in notes)
        for ref in doc["references"]:
            assert not any(ref["text"] in r["text"] for notes in sites.values() for r in notes + public)
    assert len(seen_secrets) == len(set(seen_secrets))


def _grams(text: str, n: int = 8) -> set[tuple[str, ...]]:
    words = word_tokens(text)
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def _shared(a: str, b: str) -> float:
    ga, gb = _grams(a), _grams(b)
    return len(ga & gb) / min(len(ga), len(gb))


def test_reports_of_one_code_differ_a_lot(demo):
    _, sites, _, _ = demo
    assert _shared(sites["site-a"][0]["text"], sites["site-a"][0]["text"]) == 1.0  # the measure can fail
    rng = random.Random(0)
    for site, notes in sites.items():
        by_code = defaultdict(list)
        for r in notes:
            by_code[r["icd10"][0]].append(r)
        for code, recs in by_code.items():
            pairs = [(a, b) for a, b in itertools.combinations(recs, 2) if a["patient_id"] != b["patient_id"]]
            for a, b in rng.sample(pairs, min(30, len(pairs))):
                assert _shared(a["text"], b["text"]) < 0.6, (site, code, a["note_id"], b["note_id"])


def test_lengths_are_report_like(demo):
    _, sites, public, _ = demo
    for site, notes in sites.items():
        words = sorted(len(r["text"].split()) for r in notes)
        assert 150 <= words[len(words) // 2] <= 300, site
        assert words[0] >= 100 and words[-1] <= 400, site
    assert all(80 <= len(r["text"].split()) <= 300 for r in public)


def test_invalid_requests_list_every_problem(tmp_path):
    with pytest.raises(ConfigError) as err:
        write_demo(tmp_path, seed=0, patients_per_site=0, canary_repetitions=(0, 2), public_reports=3)
    wheres = {p.where for p in err.value.problems}
    assert wheres == {"patients_per_site", "canary_repetitions[0]", "public_reports"}
    assert not list(tmp_path.iterdir())  # nothing written
    with pytest.raises(ConfigError):
        public_texts(n=len(CODES) - 1)
    with pytest.raises(ConfigError):
        write_demo(tmp_path, seed="1")  # type: ignore[arg-type]


def test_written_files_load_with_zero_problems(demo):
    from client import notes  # the project's own module: a broken import fails, never skips
    manifest, sites, public, _ = demo
    for path, expected in [*((manifest.sites[s], len(sites[s])) for s in SITE_IDS), (manifest.public, len(public))]:
        loaded = notes.load_notes(path, mode="strict")
        assert list(loaded.problems) == []
        assert len(loaded.notes) == expected


def test_too_many_canary_holders_refused(tmp_path):
    # 10 patients: the default split trains on 8, so (5, 5) cannot be planted in 10 trained patients
    with pytest.raises(ConfigError) as err:
        write_demo(tmp_path, seed=0, patients_per_site=10, canary_repetitions=(5, 5), public_reports=13)
    assert [p.where for p in err.value.problems] == ["canary_repetitions"]
    write_demo(tmp_path / "ok", seed=0, patients_per_site=10, canary_repetitions=(3, 5), public_reports=13)


def test_stand_in_codes_avoid_every_demo_category_and_bind_each_demo_vocabulary():
    bindings = stand_in_codes()
    assert bindings == stand_in_codes()  # fixed and public, the same for every seed
    demo_categories = {c.split(".")[0] for c in CODES}
    assert not {c.split(".")[0] for c in bindings} & demo_categories
    assert set(bindings) <= set(icd10.chapter_f_codes())
    assert set(bindings.values()) == set(CODES)


def test_styled_public_texts_teach_layouts_not_site_data(demo):
    _, sites, public, canaries = demo
    texts = styled_public_texts(seed=7, n=30)
    assert texts == styled_public_texts(seed=7, n=30) and texts != styled_public_texts(seed=8, n=30)
    for i, (code, text) in enumerate(texts):
        site = SITE_IDS[i % 3]
        assert STYLE_MARKERS[site][0] in text, (i, site)  # styles rotate a, b, c
        assert text.startswith(FICTIONAL_MARKER) and code in stand_in_codes()
        assert icd10.describe(code) in text  # the note is written for its stand-in code
        assert "locker combination" not in text  # no canaries
        assert "Tel:" not in text and "Telephone:" not in text and "telephone" not in text
    identifiers = {s for notes in sites.values() for r in notes for s in r["identifiers"]}
    names = {s for s in identifiers if re.fullmatch(r"[A-Z][a-z]+ [A-Z][a-z]+", s)}
    assert names  # site names have no middle initial at this size ...
    joined = "\n".join(t for _, t in styled_public_texts(seed=7, n=300))
    assert not any(name in joined for name in names)  # ... styled names always do
    # content follows the requested code (the stand-in's bound wording) ...
    many = styled_public_texts(seed=7, n=300)
    bindings = stand_in_codes()
    bound = sum(any(s in t for s in CODE_VOCAB[bindings[code]]["symptoms"]) for code, t in many)
    assert bound >= 0.9 * len(many)
    # ... but no demo code or title is ever paired with symptoms: that is learnt only from site notes
    assert not any(c in t or icd10.describe(c) in t for _, t in many for c in CODES)
    with pytest.raises(ConfigError):
        styled_public_texts(n=0)
