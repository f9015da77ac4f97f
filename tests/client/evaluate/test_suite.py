"""load_canaries (planted canaries, then never-planted references) and the patient-unique verbatim wiring."""

import hashlib
import json

import numpy as np
import pytest

from client.evaluate.suite import REFERENCE_CANARIES_SCORED, evaluate_site, load_canaries
from client.generation.reports import SyntheticReport
from client.notes import Note
from shared.errors import InputError


def entry(secret: str) -> dict:
    return {"text": f"code {secret}.", "prefix": "code ", "secret": secret, "suffix": "."}


def test_references_follow_planted_with_repetitions_zero(tmp_path):
    path = tmp_path / "canaries.json"
    refs = [entry(f"9 9 9 9 9 {i % 10}") for i in range(REFERENCE_CANARIES_SCORED + 5)]
    path.write_text(json.dumps({
        "canaries": [{**entry("1 2 3 4 5 6"), "repetitions": 5, "patient_id": "p1"}],
        "references": refs,
    }))
    got = load_canaries(path)
    assert len(got) == 1 + REFERENCE_CANARIES_SCORED  # references capped: each costs a scoring pass
    assert got[0]["reference"] is False and got[0]["repetitions"] == 5
    assert all(c["reference"] is True and c["repetitions"] == 0 for c in got[1:])
    assert [c["secret"] for c in got[1:]] == [r["secret"] for r in refs[:REFERENCE_CANARIES_SCORED]]


def test_file_without_references_and_missing_file(tmp_path):
    path = tmp_path / "canaries.json"
    path.write_text(json.dumps({"canaries": [{**entry("1 2 3 4 5 6"), "repetitions": 1}]}))
    assert [c["reference"] for c in load_canaries(path)] == [False]
    assert load_canaries(tmp_path / "absent.json") == []


class _BagOfWordsEmbedder:
    """Deterministic hashed bag-of-words vectors: the lexical metrics under test ignore embeddings."""

    identity = "bag-of-words-test"

    def embed(self, texts):
        out = np.full((len(texts), 32), 1e-3, dtype=np.float32)
        for i, t in enumerate(texts):
            for w in t.split():
                out[i, int(hashlib.sha256(w.encode()).hexdigest(), 16) % 32] += 1
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_unique_verbatim_uses_patient_ids(tmp_path):
    """A span in two notes of ONE patient is unique (patient ids reach the index); boilerplate is not."""
    rng = np.random.default_rng(0)
    codes = ["F32.1", "F41.1", "F20.0"]
    vocab = [f"u{j}" for j in range(3000)]

    def note(i, pid, extra=""):
        return Note(note_id=f"n{i}", patient_id=pid, icd10=(codes[i % 3],),
                    text=" ".join(rng.choice(vocab, 60)) + extra)

    span = " ".join(f"own{j}" for j in range(25))
    boiler = " ".join(f"tpl{j}" for j in range(25))
    train = [note(i, f"p{i // 2}", f" {span}" if i < 2 else f" {boiler}" if i in (2, 4) else "")
             for i in range(30)]
    held = [note(100 + i, f"h{i}", f" {boiler}" if i == 0 else "") for i in range(15)]

    def report(i, text):
        return SyntheticReport(f"r{i}", codes[i % 3], text, "fine-tuned", "m", None, {}, 0)

    other = [f"s{j}" for j in range(500)]
    reports = [report(i, " ".join(rng.choice(other, 50))) for i in range(20)]
    reports[0] = report(0, "noted " + " ".join(span.split()[3:23]) + " today")
    reports[1] = report(1, "noted " + " ".join(boiler.split()[2:22]) + " today")
    ev = evaluate_site(reports, train, held, embedder=_BagOfWordsEmbedder(), cache_dir=tmp_path, k_min=5)
    assert [r["verbatim_13"] for r in ev.per_report[:3]] == [True, True, False]
    assert [r["verbatim_unique_13"] for r in ev.per_report] == [True] + [False] * 19
    # the local cells keep the report-level rates; the wire summary carries none of them
    assert ev.cells["privacy.verbatim_unique_rate_13"].value == 0.05
    assert ev.cells["privacy.verbatim_rate_13"].value == 0.1
    assert not any(name.startswith(("privacy.", "fidelity.")) for name in ev.summary)
    # per patient: p0's own span came back in a report of p0's code (F32.1)
    table = ev.patient_tables["train"]
    row = table.scores[table.patients.index("p0")]
    assert row[table.stats.index("verbatim_13_rate")] == 1.0
    # p2's boilerplate (F41.1) came back too, and so it did for held-out h0: the contrast is the signal
    hits = table.scores[:, table.stats.index("verbatim_13_rate")]
    assert [table.patients[i] for i in np.nonzero(hits)[0]] == ["p0", "p2"]
    held_table = ev.patient_tables["heldout"]
    held_hits = held_table.scores[:, held_table.stats.index("verbatim_13_rate")]
    assert [held_table.patients[i] for i in np.nonzero(held_hits)[0]] == ["h0"]
    assert ev.per_code["F32.1"]["verbatim_unique_rate_13"] == 1 / 7


def test_long_reports_against_short_notes_do_not_crash(tmp_path):
    """#14 §1 end to end: reports hold more tokens than the matched real notes; Self-BLEU on 100."""
    from client.evaluate.diversity import SELF_BLEU_SUBSET

    rng = np.random.default_rng(5)
    codes = ["I10", "E11.9"]
    words = [f"v{j}" for j in range(800)]
    # short notes first in file order, long ones later: the old head-of-file budget overran
    train = [Note(note_id=f"n{i}", patient_id=f"p{i}", icd10=(codes[i % 2],),
                  text=" ".join(rng.choice(words, 5 if i < 150 else 120))) for i in range(200)]
    held = [Note(note_id=f"h{i}", patient_id=f"h{i}", icd10=(codes[i % 2],),
                 text=" ".join(rng.choice(words, 40))) for i in range(20)]
    reports = [SyntheticReport(f"r{i}", codes[i % 2], " ".join(rng.choice(words, 150)), "adapter", "m", None, {}, 0)
               for i in range(120)]
    ev = evaluate_site(reports, train, held, embedder=_BagOfWordsEmbedder(), cache_dir=tmp_path, k_min=5)
    assert ev.cells["diversity.self_bleu_4"].n == SELF_BLEU_SUBSET
    assert {"diversity.distinct_1", "diversity.distinct_2"} <= set(ev.cells)
    assert {"diversity.distinct_1", "diversity.self_bleu_4"} <= set(ev.real_reference)


def test_empty_reports_are_never_evaluated_or_released(tmp_path):
    """A generation that came back empty is set aside and counted as removed, in the caller's order."""
    from client.evaluate.release import GateConfig
    from client.evaluate.write import write_evaluation
    from tests.client.evaluate.second_generator import make_notes

    train, held = make_notes(30, seed=1, prefix="t"), make_notes(8, seed=2, prefix="h")
    fresh = make_notes(3, seed=3, prefix="u", notes_per_patient=1)
    texts = [fresh[0].text, "", fresh[1].text, "  \n", fresh[2].text]
    reports = [SyntheticReport(f"r{i}", "I10", t, "adapter", "m", None, {}, 0) for i, t in enumerate(texts)]
    ev = evaluate_site(reports, train, held, embedder=_BagOfWordsEmbedder(), cache_dir=tmp_path, k_min=2,
                       gate=GateConfig())
    assert ev.gate.total == 5 and ev.gate.removed["empty"] == 2
    assert 1 not in ev.gate.kept and 3 not in ev.gate.kept and set(ev.gate.kept) <= {0, 2, 4}
    assert [r["report_id"] for r in ev.per_report] == [f"r{i}" for i in range(5)]
    assert [r.get("empty", False) for r in ev.per_report] == [False, True, False, True, False]
    assert not ev.per_report[1]["released"] and ev.cells["count.reports"].value == 3
    assert ev.cells["count.empty_reports"].value == 2
    assert ev.cells["release.kept_share"].value == len(ev.gate.kept) / 5
    write_evaluation(ev, tmp_path / "out", title="t")  # the local report copes with the empty rows
    with pytest.raises(InputError, match="cannot evaluate"):
        evaluate_site(reports[1:2], train, held, embedder=_BagOfWordsEmbedder(), cache_dir=tmp_path, k_min=2)
