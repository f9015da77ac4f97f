"""#12 §3: evaluation is not an oracle on single patients.

The adversary is the coordinator: it chooses the adapter, so it can make every
synthetic report say the same thing — here a guessed record number of one
training patient — and read the site's reply. These tests play that game on the
released vector and check the Gaussian mechanism's claims (sensitivity, noise
scale, fresh noise, k counting patients).
"""

import hashlib
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from client.evaluate import dp_metrics
from client.evaluate.dp_metrics import (
    GROUPS,
    LEXICAL_STATS,
    gaussian_release,
    patient_table,
    sensitivity,
    standard_normal,
)
from client.evaluate.suite import evaluate_site
from client.evaluate.summary import build_summary
from client.generation.reports import SyntheticReport
from client.notes import Note
from client.patient_split import split_by_patient
from shared.errors import ConfigError, InputError
from shared.whitelist import METRIC_NAMES

CODES = ("F32.1", "F41.1", "F20.0")
TRUE_MRN = "MRN 4471-2290"
WRONG_MRN = "MRN 9912-0077"


def _embed(texts):
    out = np.full((len(texts), 32), 1e-3)
    for i, t in enumerate(texts):
        for w in t.split():
            out[i, int(hashlib.sha256(w.encode()).hexdigest(), 16) % 32] += 1
    return out / np.linalg.norm(out, axis=1, keepdims=True)


class _BagOfWordsEmbedder:
    identity = "bag-of-words-test"

    def embed(self, texts):
        return _embed(texts).astype(np.float32)


def _patients(n: int, *, prefix: str = "p", seed: int = 0) -> list[Note]:
    rng = np.random.default_rng(seed)
    vocab = [f"w{j}" for j in range(2000)]
    notes = []
    for i in range(n):
        for j in range(2):  # two notes per patient: k must count patients, not notes
            notes.append(Note(
                note_id=f"{prefix}{i}-{j}", patient_id=f"{prefix}{i}", icd10=(CODES[i % 3],),
                text=" ".join(rng.choice(vocab, 40)),
                identifiers=(f"MRN {1000 + i:04d}-{i:04d}",),
            ))
    return notes


def _target(notes: list[Note]) -> list[Note]:
    """p0 (code F32.1) gets the record number the coordinator will guess."""
    return [
        Note(note_id=n.note_id, patient_id=n.patient_id, icd10=n.icd10, text=n.text,
             identifiers=(TRUE_MRN,)) if n.patient_id == "p0" else n
        for n in notes
    ]


def _crafted(guess: str, n: int = 15) -> tuple[list[str], list[str]]:
    """What a coordinator's crafted adapter produces: n identical reports quoting the guess."""
    return [CODES[0]] * n, [f"Seen today, record number {guess}, no change."] * n


def _tables(train, heldout, codes, texts):
    emb = _embed(texts)
    return {
        g: patient_table(g, notes, report_codes=codes, report_texts=texts, note_emb=_embed([x.text for x in notes]),
                         report_emb=emb)
        for g, notes in (("train", train), ("heldout", heldout))
    }


def _exact(tables) -> np.ndarray:
    return np.concatenate([tables[g].sums() for g in GROUPS])


def test_the_record_number_oracle_cannot_tell_true_from_wrong_guess():
    train, heldout = _target(_patients(30)), _patients(10, prefix="h", seed=1)
    true_t = _tables(train, heldout, *_crafted(TRUE_MRN))
    wrong_t = _tables(train, heldout, *_crafted(WRONG_MRN))
    # Without noise the oracle works: the true guess lights up p0's PHI-echo score, and only that.
    diff = _exact(true_t) - _exact(wrong_t)
    assert np.count_nonzero(diff) == 1 and diff.max() == 1.0
    assert np.linalg.norm(diff) <= sensitivity(len(LEXICAL_STATS))

    # With the mechanism: the attacker knows both exact vectors and uses the optimal (linear) test.
    sigma, draws = 5.0, 3000
    direction = diff / np.linalg.norm(diff)
    mid = float(direction @ (_exact(true_t) + _exact(wrong_t)) / 2)

    def projected(tables):
        return np.array([
            direction @ np.concatenate([r.noisy[g] for g in GROUPS])
            for r in (gaussian_release(tables, noise_multiplier=sigma) for _ in range(draws))
        ])

    hits = (projected(true_t) > mid).sum() + (projected(wrong_t) <= mid).sum()
    accuracy = hits / (2 * draws)
    bound = scipy_stats.norm.cdf(np.linalg.norm(diff) / (2 * sigma * sensitivity(len(LEXICAL_STATS))))
    assert bound < 0.52  # what DP promises here: barely better than a coin
    assert accuracy < bound + 0.035  # 3.9 standard errors of 6000 trials
    # Nor do the released rates (what the coordinator actually reads) separate the two.
    rates = {
        name: [gaussian_release(t, noise_multiplier=sigma).cells()["dp.train.phi_echo_rate"].value
               for _ in range(400)]
        for name, t in (("true", true_t), ("wrong", wrong_t))
    }
    assert scipy_stats.ks_2samp(rates["true"], rates["wrong"]).pvalue > 1e-3


def test_the_wire_summary_of_the_oracle_holds_no_private_note_metric_in_the_clear(tmp_path):
    train, heldout = _target(_patients(30)), _patients(12, prefix="h", seed=1)
    codes, texts = _crafted(TRUE_MRN)
    reports = [SyntheticReport(f"r{i}", c, t, "adapter", "m", None, {}, 0)
               for i, (c, t) in enumerate(zip(codes, texts, strict=True))]
    ev = evaluate_site(reports, train, heldout, embedder=_BagOfWordsEmbedder(), cache_dir=tmp_path,
                       k_min=10, public_codes=True)
    assert ev.cells["privacy.phi_echo_rate"].value == 1.0  # the local report sees the echo...
    assert set(ev.summary) <= METRIC_NAMES  # ...the wire carries only dp.* and synthetic-only names
    private = [n for n in ev.summary if not n.startswith("dp.")]
    assert private and all(n == "count.reports" or n.startswith("diversity.") for n in private)
    assert "diversity.mode_collapse_ratio" not in ev.summary
    cells = ev.dp_release.cells()
    for g in ("train", "heldout"):  # k counts (noisy) patients: rates leave only above k_min
        assert (f"dp.{g}.phi_echo_rate" in ev.summary) == (cells[f"dp.{g}.patients"].n >= 10)
    assert ev.dp_release is not None and ev.dp_release.noise_multiplier == 5.0  # noised by default
    # codes from the site's own notes: not even the synthetic-only metrics leave
    ev = evaluate_site(reports, train, heldout, embedder=_BagOfWordsEmbedder(), cache_dir=tmp_path, k_min=10)
    assert all(n.startswith("dp.") for n in ev.summary)


def test_one_added_patient_moves_the_exact_vector_by_at_most_the_sensitivity():
    """Δ covers the new patient's row and a patient pushed across the train/held-out boundary."""
    texts = [" ".join([f"Seen today, record number MRN {1000 + j:04d}-{j:04d}, no change."] * 3)
             for j in range(12)]
    codes = [CODES[j % 3] for j in range(12)]

    def patient(pid: str, i: int, code: str | None = None) -> Note:
        # scores high on everything: the note quotes a report of its own code (unless code is unreported)
        return Note(note_id=pid, patient_id=pid, icd10=(code or codes[i % 12],), text=texts[i % 12],
                    identifiers=(f"MRN {1000 + i % 12:04d}-{i % 12:04d}",))

    base = [patient(f"p{i}", i) for i in range(29)]
    m = len(LEXICAL_STATS)

    def vector(notes):
        split = split_by_patient(notes, heldout_fraction=0.2, seed=0)
        return _exact(_tables(split.train, split.heldout, codes, texts))

    before = vector(base)
    held_before = {n.patient_id for n in split_by_patient(base, heldout_fraction=0.2, seed=0).heldout}
    moved, worst = 0, 0.0
    for k in range(40):
        # half the newcomers score all zeros: pushing a full row across the boundary then counts twice
        newcomer = patient(f"new{k}", k, code="F99" if k % 2 else None)
        after = vector([*base, newcomer])
        split = split_by_patient([*base, newcomer], heldout_fraction=0.2, seed=0)
        moved += ({n.patient_id for n in split.heldout} - {newcomer.patient_id}) != held_before
        worst = max(worst, float(np.linalg.norm(after - before)))
    assert moved > 0  # the boundary shift really happens among these newcomers
    assert worst <= sensitivity(m) + 1e-9
    assert worst > math.sqrt(m + 1) + 0.5  # a bound on the new row alone would have been wrong


def test_noise_has_standard_deviation_sigma_times_delta_and_is_fresh():
    train, heldout = _target(_patients(30)), _patients(10, prefix="h", seed=1)
    tables = _tables(train, heldout, *_crafted(TRUE_MRN))
    exact = _exact(tables)
    sigma = 3.0
    samples = np.array([
        np.concatenate([r.noisy[g] for g in GROUPS])
        for r in (gaussian_release(tables, noise_multiplier=sigma) for _ in range(4000))
    ])
    std = sigma * sensitivity(len(LEXICAL_STATS))
    assert gaussian_release(tables, noise_multiplier=sigma).noise_std == pytest.approx(std)
    np.testing.assert_allclose(samples.std(axis=0), std, rtol=0.06)
    assert np.all(np.abs(samples.mean(axis=0) - exact) < 5 * std / math.sqrt(4000))
    corr = np.corrcoef(samples.T)
    assert np.max(np.abs(corr - np.eye(len(exact)))) < 0.08  # independent coordinates
    z = standard_normal(20001)
    assert len(z) == 20001 and scipy_stats.kstest(z, "norm").pvalue > 1e-4
    assert not np.array_equal(standard_normal(8), standard_normal(8))  # fresh key every call


def test_k_counts_patients_not_notes_or_reports():
    """3 training patients with 2 notes each and 60 reports of their codes: a cell of 3 patients."""
    train = _patients(3)
    heldout = _patients(40, prefix="h", seed=1)
    codes = list(CODES) * 20
    texts = [f"report {i} about nothing in particular today" for i in range(60)]
    release = gaussian_release(_tables(train, heldout, codes, texts), noise_multiplier=1e-9)
    cells = release.cells()
    assert cells["dp.train.patients"].n == 3 and cells["dp.train.patients"].value == 3.0
    assert cells["dp.heldout.patients"].n == 40
    out = build_summary(cells, k_min=10)
    assert not any(name.startswith("dp.train.") for name in out)  # 3 patients < k_min
    assert out["dp.heldout.patients"] == 40.0 and "dp.heldout.verbatim_13_rate" in out


def test_scores_are_bounded_and_read_only_reports_of_the_patients_codes():
    train = _target(_patients(6))
    # the guess sits in reports of F41.1, not p0's code F32.1: p0 is not echoed
    codes, texts = ["F41.1"] * 5, [f"record {TRUE_MRN}"] * 5
    table = _tables(train, _patients(3, prefix="h"), codes, texts)["train"]
    assert table.scores.min() >= 0 and table.scores.max() <= 1
    assert table.scores[:, table.stats.index("phi_echo_rate")].sum() == 0
    covered = {table.patients[i] for i in np.nonzero(table.covered)[0]}
    assert covered == {"p1", "p4"}  # the F41.1 patients; the others contribute nothing at all
    assert not table.scores[table.covered == 0].any()
    gain = np.array([5.0, -5.0] * 6)  # saturates both ways
    t = patient_table("train", train, report_codes=codes, report_texts=texts,
                      note_emb=_embed([n.text for n in train]), report_emb=_embed(texts), loss_gain=gain)
    assert t.stats[-1] == "loss_drop_mean" and 0 <= t.scores.min() and t.scores.max() <= 1


def test_bad_inputs_are_refused_listing_every_problem():
    train = _patients(4)
    with pytest.raises(InputError) as err:
        patient_table("neither", train, report_codes=["F32.1"], report_texts=[], note_emb=np.zeros((1, 2)),
                      report_emb=np.zeros((0, 2)), loss_gain=np.array([np.nan]))
    assert len(err.value.problems) == 4
    tables = _tables(train, _patients(2, prefix="h"), ["F32.1"], ["x"])
    for bad in (0.0, -1.0, math.nan, math.inf, True, "5"):
        with pytest.raises(ConfigError):
            gaussian_release(tables, noise_multiplier=bad)
    with pytest.raises(ConfigError):
        gaussian_release({"train": tables["train"]}, noise_multiplier=5.0)


def test_every_released_name_is_whitelisted():
    names = dp_metrics.wire_names((*LEXICAL_STATS, dp_metrics.LOSS_STAT))
    assert set(names) <= METRIC_NAMES
    assert {n for n in METRIC_NAMES if n.startswith("dp.")} == set(names)
