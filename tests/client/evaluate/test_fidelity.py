"""Fidelity metrics on well-separated Gaussian 'embeddings' per code (known answers)."""

import math

import numpy as np
import pytest

from client.evaluate.fidelity import (
    centroid_similarity,
    frechet_distance,
    frechet_per_code,
    length_distribution,
    real_classifier_f1,
    tstr_trtr,
)
from shared.errors import InputError

CODES = ("F20", "F32", "F41.1")
DIM = 32


def sample(rng, per_code, centres, spread=0.5, codes=CODES):
    labels = [c for c in codes for _ in range(per_code)]
    emb = np.stack([centres[c] + spread * rng.normal(size=DIM) for c in labels]).astype(np.float32)
    return emb, labels


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(42)
    centres = {c: 3.0 * rng.normal(size=DIM) for c in CODES}
    real, real_codes = sample(rng, 20, centres)
    test, test_codes = sample(rng, 15, centres)
    synth, synth_codes = sample(rng, 12, centres)
    return rng, centres, (real, real_codes), (test, test_codes), (synth, synth_codes)


def mislabel(codes):
    """Reports of each code labelled as the next code."""
    shift = {c: CODES[(i + 1) % len(CODES)] for i, c in enumerate(CODES)}
    return [shift[c] for c in codes]


def test_centroid_similarity_good_and_mislabelled(data):
    _, _, (real, rc), _, (synth, sc) = data
    good = centroid_similarity(real, rc, synth, sc)
    assert good.own_nearest_share == 1.0 and good.margin_mean > 0.2 and good.cosine_mean > 0.8
    bad = centroid_similarity(real, rc, synth, mislabel(sc))
    assert bad.own_nearest_share == 0.0 and bad.margin_mean < 0
    assert bad.cosine_mean < good.cosine_mean - 0.5
    assert good.cosine.shape == (len(sc),)
    assert set(good.cells()) == {
        "fidelity.centroid_cosine_mean", "fidelity.centroid_margin_mean", "fidelity.own_code_nearest_share",
    }


def test_centroid_skips_codes_without_real_notes(data):
    _, _, (real, rc), _, (synth, sc) = data
    res = centroid_similarity(real, rc, synth, sc[:-1] + ["F99"])
    assert res.skipped_codes == ("F99",) and res.n_scored == len(sc) - 1


def test_real_classifier_f1_collapses_when_mislabelled(data):
    _, _, (real, rc), _, (synth, sc) = data
    assert real_classifier_f1(real, rc, synth, sc).macro_f1 == pytest.approx(1.0)
    assert real_classifier_f1(real, rc, synth, mislabel(sc)).macro_f1 == pytest.approx(0.0)


def test_real_classifier_excludes_unknown_codes_and_says_so(data):
    _, _, (real, rc), _, (synth, sc) = data
    res = real_classifier_f1(real, rc, synth, ["F99"] * 3 + sc[3:])
    assert res.excluded_codes == ("F99",) and res.n_scored == len(sc) - 3 and "not scored" in res.note


def test_tstr_equals_trtr_when_synthetic_is_held_out_real(data):
    rng, centres, (real, rc), (test, tc), _ = data
    heldout, hc = sample(rng, 20, centres)  # another draw of "real" notes playing synthetic
    res = tstr_trtr(real, rc, test, tc, heldout, hc)
    assert res.trtr_macro_f1 > 0.9
    assert res.ratio == pytest.approx(1.0, abs=0.05)
    assert res.note == "" and res.dropped == {}
    bad = tstr_trtr(real, rc, test, tc, heldout, mislabel(hc))
    assert bad.ratio < 0.1


def test_tstr_restricts_to_shared_codes(data):
    _, _, (real, rc), (test, tc), (synth, sc) = data
    keep = [i for i, c in enumerate(sc) if c != "F20"]
    res = tstr_trtr(real, rc, test, tc, synth[keep], [sc[i] for i in keep])
    assert res.shared_codes == ("F32", "F41.1")
    assert res.dropped == {"real_train": ("F20",), "real_test": ("F20",)}
    assert "F20" in res.note and res.n_real_test == 30
    one = [i for i, c in enumerate(sc) if c == "F32"]
    none = tstr_trtr(real, rc, test, tc, synth[one], [sc[i] for i in one])
    assert math.isnan(none.ratio) and none.cells() == {}


def test_frechet_zero_to_itself_and_grows_with_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(40, 16))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shifts = [frechet_distance(a, a + s) for s in (0.0, 0.5, 1.0, 2.0)]
    assert shifts == sorted(shifts)
    # Pure mean shift by s in every one of 16 dims adds 16 s^2.
    assert shifts[3] == pytest.approx(16 * 4.0, rel=1e-6)
    # Few points in high dimension (rank-deficient covariances) still give a finite, ~0 self-distance.
    b = rng.normal(size=(5, 384))
    assert frechet_distance(b, b) == pytest.approx(0.0, abs=1e-4)


def test_frechet_known_gaussian_answer():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(20000, 2))
    b = rng.normal(size=(20000, 2)) * 2.0
    # N(0, I) vs N(0, 4I): 2 * (1 + 4 - 2*2) = 2.
    assert frechet_distance(a, b) == pytest.approx(2.0, abs=0.1)


def test_frechet_per_code_skips_small_codes(data):
    _, _, (real, rc), _, (synth, sc) = data
    res = frechet_per_code(real, rc, synth[:13], sc[:13])  # F32 has 1 synthetic row
    assert set(res.per_code) == {"F20"} and res.skipped_codes == ("F32", "F41.1") and res.n_skipped == 2
    full = frechet_per_code(real, rc, synth, sc)
    shifted = frechet_per_code(real, rc, synth + 1.0, sc)
    assert full.mean < shifted.mean


def test_length_distribution():
    real = ["one two three four."] * 10
    res = length_distribution(real, ["one two three four five six seven eight"] * 10)
    assert res.ratio == pytest.approx(2.0) and res.ks == pytest.approx(1.0)
    same = length_distribution(real, real)
    assert same.ratio == 1.0 and same.ks == 0.0


def test_input_validation_lists_every_problem():
    good = np.zeros((3, 4))
    with pytest.raises(InputError) as err:
        centroid_similarity(np.full((3, 4), np.nan), ["A", "B", "C"], np.zeros((2, 5)), ["A"])
    assert len(err.value.problems) == 3  # NaN, label count, width mismatch
    with pytest.raises(InputError):
        frechet_distance(good[:1], good)
