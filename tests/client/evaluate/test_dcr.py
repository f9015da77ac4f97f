"""DCR against every training note, read against held-out notes (#14 §2)."""

import numpy as np
import pytest

from client.evaluate.dcr import dcr_contrast, dcr_train_closer_share
from shared.errors import InputError


def test_dcr_train_copies_and_heldout_like() -> None:
    rng = np.random.default_rng(4)
    train, heldout = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    assert dcr_train_closer_share(train[:200] + 1e-6, train, heldout) == 1.0
    assert dcr_train_closer_share(rng.normal(size=(4000, 16)), train, heldout) == pytest.approx(
        0.5, abs=0.04
    )
    # every training note is compared; heldout-like synthetic data stays ~0.5 however many there are
    big_train = rng.normal(size=(4000, 16))
    assert dcr_train_closer_share(
        rng.normal(size=(4000, 16)), big_train, heldout
    ) == pytest.approx(0.5, abs=0.04)


def test_dcr_ties_count_half() -> None:
    x = np.eye(3)
    assert dcr_train_closer_share(x[:1], x[1:2], x[2:3]) == 0.5


def test_dcr_finds_every_verbatim_copy_among_many_training_notes() -> None:
    """#14 §2: 46 exact copies out of 2,000 training notes (held-out 300) are all found."""
    rng = np.random.default_rng(7)
    train, heldout = rng.normal(size=(2000, 16)), rng.normal(size=(300, 16))
    texts = [f"note {i} " + " ".join(f"w{j}" for j in rng.integers(0, 500, 30)) for i in range(2000)]
    pick = rng.choice(2000, 46, replace=False)
    got = dcr_contrast(train[pick], train, heldout, synthetic_texts=[texts[i] for i in pick], train_texts=texts)
    assert got.train_closer_share == 1.0 and got.below_heldout_p05_share == 1.0
    assert got.exact_copy_rate == 1.0 and got.near_copy_rate == 1.0
    assert got.quantiles()[0.5] == pytest.approx(0.0, abs=1e-9)
    assert np.all(got.heldout_d_train > 0.01)
    # the whole training set offered as "synthetic"
    whole = dcr_contrast(train, train, heldout, synthetic_texts=texts, train_texts=texts)
    assert whole.train_closer_share == 1.0 and whole.exact_copy_rate == 1.0
    # unseen data of the same population: ~0.5 / ~0.05, no copies
    fresh = dcr_contrast(rng.normal(size=(3000, 16)), train, heldout)
    assert fresh.train_closer_share == pytest.approx(0.5, abs=0.05)
    assert fresh.below_heldout_p05_share == pytest.approx(0.05, abs=0.03)
    assert fresh.exact_copy_rate == 0.0 and fresh.near_copy_rate == 0.0
    cells = got.cells()
    assert {"privacy.dcr_train_q05", "privacy.dcr_train_q50", "privacy.dcr_exact_copy_rate",
            "privacy.heldout.dcr_train_q05"} <= set(cells)


def test_dcr_contrast_refuses_bad_input() -> None:
    with pytest.raises(InputError):
        dcr_contrast(np.zeros((0, 3)), np.eye(3), np.eye(3))
    with pytest.raises(InputError):
        dcr_contrast(np.eye(3), np.eye(3), np.eye(3), synthetic_texts=["a"])
