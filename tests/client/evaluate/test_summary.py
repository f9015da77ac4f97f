"""The summary builder: only whitelisted, finite, large-enough aggregates leave a site."""

import math

import numpy as np
import pytest

from client.evaluate.summary import Cell, build_summary, suppressed_names
from shared.errors import ConfigError, WireError
from shared.whitelist import METRIC_NAMES


def test_small_cells_are_suppressed_and_listed():
    cells = {
        "diversity.vendi": Cell(3.25, 50),
        "diversity.mtld": Cell(80.0, 9),
        "dp.train.loss_drop_mean": Cell(0.51, 10),
    }
    out = build_summary(cells, k_min=10)
    assert out == {"diversity.vendi": 3.25, "dp.train.loss_drop_mean": 0.51}
    assert suppressed_names(cells, k_min=10) == ["diversity.mtld"]
    assert build_summary(cells, k_min=60) == {}


def test_counts_are_bucketed_down_to_tens():
    out = build_summary({"count.reports": Cell(137, 137)})
    assert out == {"count.reports": 130.0}
    assert build_summary({"count.reports": Cell(9, 9)}) == {}


@pytest.mark.parametrize("name", [
    "privacy.lcs_max", "privacy.rouge_l_max", "privacy.canary_exposure_max", "privacy.phi_echo_rate",
    "privacy.verbatim_unique_rate_13", "privacy.ngram_overlap_13", "privacy.mia_auc",
    "fidelity.centroid_cosine_mean", "count.notes", "release.kept_share",
])
def test_metrics_computed_in_the_clear_from_private_notes_never_leave(name):
    """#12 §3: max/min over notes and un-noised private-note aggregates are not on the wire."""
    with pytest.raises(WireError):
        build_summary({name: Cell(1.0, 1000)})


def test_unknown_names_are_refused_all_at_once():
    cells = {
        "diversity.vendi": Cell(2.0, 100),
        "note text: patient John Doe": Cell(1.0, 100),
        "privacy.secret": Cell(1.0, 100),
    }
    with pytest.raises(WireError) as err:
        build_summary(cells)
    assert len(err.value.problems) == 2
    assert "John Doe" in str(err.value)  # the message is local; nothing was returned


@pytest.mark.parametrize(
    "value",
    [math.nan, math.inf, -math.inf, "0.5", np.array([0.1, 0.2]), [0.1], True, None],
)
def test_non_finite_and_non_scalar_values_are_refused(value):
    with pytest.raises(WireError):
        build_summary({"diversity.vendi": Cell(value, 100)})


def test_refuses_bad_n_and_non_cells_and_bad_counts():
    for cells in (
        {"diversity.vendi": Cell(1.0, -1)},
        {"diversity.vendi": Cell(1.0, 2.5)},
        {"diversity.vendi": 1.0},
        {"count.reports": Cell(12.5, 100)},
        {"count.reports": Cell(-10, 100)},
    ):
        with pytest.raises(WireError):
            build_summary(cells)


def test_k_min_must_be_positive():
    with pytest.raises(ConfigError):
        build_summary({}, k_min=0)


def test_values_are_plain_floats_rounded_to_significant_digits():
    out = build_summary({"dp.train.centroid_cosine_mean": Cell(np.float32(0.123456789), 20)}, digits=4)
    assert type(out["dp.train.centroid_cosine_mean"]) is float
    assert out["dp.train.centroid_cosine_mean"] == 0.1235
    assert build_summary({"diversity.mtld": Cell(np.int64(87), 20)}) == {"diversity.mtld": 87.0}


def test_every_whitelisted_name_passes():
    cells = {name: Cell(20.0, 20) for name in METRIC_NAMES}
    assert set(build_summary(cells)) == set(METRIC_NAMES)
