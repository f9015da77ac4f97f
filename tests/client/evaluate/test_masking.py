"""Masking of ICD-10 codes, titles and synonyms before fidelity (#15 item 0)."""

import hashlib

import numpy as np
import pytest

from client.evaluate import dp_metrics, fidelity
from client.evaluate.masking import CODE_TOKEN, TITLE_TOKEN, mask_all, mask_codes, title_phrases
from client.evaluate.suite import evaluate_site
from client.generation.reports import SyntheticReport
from client.notes import Note
from shared import icd10


@pytest.mark.parametrize("text, expected", [
    ("Diagnosis: F32.1 Moderate depressive episode.", f"Diagnosis: {CODE_TOKEN} {TITLE_TOKEN}."),
    ("Dx F321 (moderate depressive episode)", f"Dx {CODE_TOKEN} ({TITLE_TOKEN})"),
    ("F41.1 generalized anxiety disorder", f"{CODE_TOKEN} {TITLE_TOKEN}"),
    ("Generalised Anxiety Disorder", TITLE_TOKEN),  # British spelling, any case
    ("posttraumatic stress disorder", TITLE_TOKEN),  # hyphen or none
    ("post traumatic stress disorder, i.e. PTSD", f"{TITLE_TOKEN}, i.e. {TITLE_TOKEN}"),
    ("Mental and behavioral disorders due to use of alcohol : dependence syndrome", TITLE_TOKEN),
    ("alcohol dependence", TITLE_TOKEN),
    ("mood disorder", TITLE_TOKEN),  # block title "Mood [affective] disorders", bracket dropped, singular
    ("Vascular dementia", TITLE_TOKEN),  # head of "Vascular dementia, unspecified"
    ("history of depression", f"history of {TITLE_TOKEN}"),
    ("codes F20.0 and E11.9 and F43.10", f"codes {CODE_TOKEN} and {CODE_TOKEN} and {CODE_TOKEN}"),
    ("F32.1.", f"{CODE_TOKEN}."),
])
def test_masks_codes_titles_and_synonyms(text, expected):
    assert mask_codes(text) == expected


@pytest.mark.parametrize("text", [
    "F1 score 0.6 and F2 0.4",  # not codes
    "vitamin B12 low; B12 given",  # B12 is not a WHO category
    "vitamin B12 and vitamin D3",
    "seen 2023-01-05 at 14:30, dose 20 mg twice daily",
    "He wants to add more. The gad fly.",  # abbreviations match in upper case only
    "Patient reports low mood, poor sleep and worry about work.",
    "room F3 on level 2",
    "ref AF32.1X",  # inside a longer token
])
def test_no_false_positives(text):
    assert mask_codes(text) == text


def test_every_chapter_f_code_and_title_is_masked():
    for code in icd10.chapter_f_codes():
        masked = mask_codes(f"{code} {icd10.describe(code)}")
        assert masked == f"{CODE_TOKEN} {TITLE_TOKEN}", (code, masked)
        assert mask_codes(code.replace(".", "")) == CODE_TOKEN


def test_idempotent_and_types():
    text = "F32.1 Moderate depressive episode with PTSD"
    assert mask_codes(mask_codes(text)) == mask_codes(text)
    assert mask_all([text, "x"]) == [mask_codes(text), "x"]
    assert len(title_phrases()) > 400
    with pytest.raises(TypeError):
        mask_codes(None)  # type: ignore[arg-type]


class _Hashed:
    """Hashed bag-of-words vectors: a stand-in embedder that reads words, as a sentence model does."""

    identity = "hashed-bow-test"

    def embed(self, texts):
        out = np.full((len(texts), 256), 1e-3, dtype=np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().replace(".", " ").replace(":", " ").split():
                out[i, int(hashlib.sha256(w.encode()).hexdigest(), 16) % 256] += 1
        return out / np.linalg.norm(out, axis=1, keepdims=True)


CODES = ["F32.1", "F41.1", "F20.0", "F43.1"]
CONTENT = {  # clinical content words of each code's real notes (the prompt never gives these)
    "F32.1": "low mood anhedonia early waking guilt",
    "F41.1": "worry restlessness tension palpitations",
    "F20.0": "voices persecutory beliefs thought insertion",
    "F43.1": "flashbacks nightmares hypervigilance avoidance",
}


def _notes(n_per_code, rng, prefix):
    notes = []
    for i in range(n_per_code * len(CODES)):
        code = CODES[i % len(CODES)]
        words = CONTENT[code].split() + [f"w{j}" for j in rng.integers(0, 300, 20)]
        body = " ".join(rng.permutation(words))
        text = f"History {body}.\nDiagnosis\n{code} {icd10.describe(code)}."
        notes.append(Note(note_id=f"{prefix}{i}", patient_id=f"{prefix}p{i}", icd10=(code,), text=text))
    return notes


def _copy_only_reports(n_per_code, rng):
    """Reports that copy the prompt's code and title and say nothing of the disorder."""
    out = []
    for i in range(n_per_code * len(CODES)):
        code = CODES[i % len(CODES)]
        filler = " ".join(f"w{j}" for j in rng.integers(0, 300, 15))
        out.append(SyntheticReport(f"r{i}", code, f"Note {filler}. Diagnosis {code} {icd10.describe(code)}.",
                                   "base", "m", None, {}, 0))
    return out


def test_copying_the_prompt_scores_high_unmasked_and_chance_masked():
    """The fidelity functions on texts: the copied code and title carry the whole score."""
    rng = np.random.default_rng(0)
    real = _notes(10, rng, "t")
    reports = _copy_only_reports(10, rng)
    emb = _Hashed()
    real_codes = [n.primary_code for n in real]
    synth_codes = [r.code for r in reports]

    def f1(transform):
        r = emb.embed(transform([n.text for n in real]))
        s = emb.embed(transform([x.text for x in reports]))
        return (fidelity.real_classifier_f1(r, real_codes, s, synth_codes).macro_f1,
                fidelity.centroid_similarity(r, real_codes, s, synth_codes).own_nearest_share)

    raw_f1, raw_nearest = f1(list)
    masked_f1, masked_nearest = f1(mask_all)
    assert raw_f1 > 0.9 and raw_nearest > 0.9  # the leak the issue measured
    chance = 1 / len(CODES)
    assert masked_f1 < chance + 0.15 and masked_nearest < chance + 0.15


def test_suite_scores_fidelity_on_masked_texts(tmp_path):
    """evaluate_site: copy-only reports get chance fidelity, locally and in the DP centroid statistic."""
    rng = np.random.default_rng(1)
    train, held = _notes(8, rng, "t"), _notes(3, rng, "h")
    reports = _copy_only_reports(6, rng)
    ev = evaluate_site(reports, train, held, embedder=_Hashed(), cache_dir=tmp_path, k_min=2)
    chance = 1 / len(CODES)
    assert ev.cells["fidelity.real_classifier_macro_f1"].value < chance + 0.15
    assert ev.cells["fidelity.own_code_nearest_share"].value < chance + 0.15
    # the DP centroid statistic reads masked embeddings: equal to the masked recomputation, and
    # well below what the copied titles give unmasked
    table = ev.patient_tables["train"]
    col = table.scores[:, table.stats.index("centroid_cosine_mean")]

    def recomputed(transform):
        t = dp_metrics.patient_table(
            "train", train, report_codes=[r.code for r in reports], report_texts=[r.text for r in reports],
            note_emb=_Hashed().embed(transform([n.text for n in train])),
            report_emb=_Hashed().embed(transform([r.text for r in reports])),
        )
        return t.scores[:, t.stats.index("centroid_cosine_mean")]

    np.testing.assert_allclose(col, recomputed(mask_all), atol=1e-6)
    assert col.mean() < recomputed(list).mean() - 0.02
    # the private-note cache keys on the masked texts under their own names
    assert (tmp_path / "train-notes-masked.npy").exists() and (tmp_path / "train-notes.npy").exists()
