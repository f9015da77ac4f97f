"""Aggregation rules with known answers."""

import numpy as np
import pytest

from server import strategy
from shared import adapter_delta
from shared.errors import ConfigError

A = "m.layers.0.q_proj.lora_A.weight"
B = "m.layers.0.q_proj.lora_B.weight"


def ad(a, b):
    return {A: np.full((1, 2), a, np.float32), B: np.full((2, 1), b, np.float32)}


def test_weights():
    assert strategy.site_weights([10, 30], scheme="patients") == [0.25, 0.75]
    assert strategy.site_weights([10, 1000], scheme="patients", cap=10) == [0.5, 0.5]
    assert strategy.site_weights([0, 0], scheme="patients") == [0.5, 0.5]
    assert strategy.site_weights([10, 30, 60], scheme="uniform") == pytest.approx([1 / 3] * 3)
    with pytest.raises(ConfigError):
        strategy.site_weights([10], scheme="votes")


def test_fedavg_weighted_with_reference():
    ref = ad(1.0, 1.0)
    out = strategy.aggregate([ad(2.0, 3.0), ad(4.0, 5.0)], weights=[0.25, 0.75], reference=ref)
    np.testing.assert_allclose(out[A], 3.5)  # 0.25*2 + 0.75*4
    np.testing.assert_allclose(out[B], 4.5)
    assert out[A].dtype == np.float32


def test_first_round_without_reference_is_plain_weighted_mean():
    out = strategy.aggregate([ad(2.0, 3.0), ad(4.0, 5.0)], weights=[0.5, 0.5], reference=None)
    np.testing.assert_allclose(out[A], 3.0)
    np.testing.assert_allclose(out[B], 4.0)


def test_norm_bound_clips_each_delta():
    ref = ad(0.0, 0.0)
    big = {A: np.array([[3.0, 4.0]]), B: np.zeros((2, 1))}  # delta norm 5
    small = {A: np.array([[0.3, 0.4]]), B: np.zeros((2, 1))}  # norm 0.5, untouched
    out = strategy.aggregate([big, small], weights=[0.5, 0.5], reference=ref, norm_bound=1.0)
    np.testing.assert_allclose(out[A], [[(0.6 + 0.3) / 2, (0.8 + 0.4) / 2]], rtol=1e-6)
    clipped = adapter_delta.clip_delta(big, 1.0)
    assert adapter_delta.update_norm(clipped) == pytest.approx(1.0)


@pytest.mark.parametrize("reference", [None, "global"])
def test_fedavg_is_the_weighted_mean_of_what_secagg_sites_contribute(reference):
    """One maths for both paths: a SecAgg+ round (sites send shared.wire_secagg.secagg_contribution,
    the coordinator adds the weighted mean to the global adapter) gives the plain round's aggregate."""
    from shared import wire_secagg
    from shared.run_config import RunConfig

    rng = np.random.default_rng(0)
    ref = None if reference is None else {A: rng.normal(size=(1, 2)), B: rng.normal(size=(2, 1))}
    updates = [{A: rng.normal(size=(1, 2)), B: rng.normal(size=(2, 1)) * 3} for _ in range(3)]
    weights = [0.2, 0.3, 0.5]
    run = RunConfig.from_flower({"update-norm-bound": 1.5, "secagg-clipping-range": 100.0, "secagg": True})
    plain = strategy.aggregate(updates, weights=weights, reference=ref, norm_bound=1.5, dtype="float64")
    contributions = [wire_secagg.secagg_contribution(u, ref, run)[0] for u in updates]
    for name in (A, B):
        mean = sum(w * c[name] for w, c in zip(weights, contributions, strict=True))
        secure = adapter_delta.add_to_reference(name, mean, ref, "float64")
        np.testing.assert_allclose(secure, plain[name], rtol=1e-12)


def test_median_and_trimmed_mean_resist_an_outlier():
    ups = [ad(1.0, 1.0), ad(2.0, 2.0), ad(3.0, 3.0), ad(4.0, 4.0), ad(1000.0, -1000.0)]
    w = [0.2] * 5
    med = strategy.aggregate(ups, weights=w, reference=ad(0, 0), method="median")
    np.testing.assert_allclose(med[A], 3.0)
    np.testing.assert_allclose(med[B], 2.0)
    tm = strategy.aggregate(ups, weights=w, reference=ad(0, 0), method="trimmed-mean", trim_fraction=0.2)
    np.testing.assert_allclose(tm[A], 3.0)  # drop 1 and 1000 -> mean(2,3,4)
    np.testing.assert_allclose(tm[B], 2.0)  # drop -1000 and 4 -> mean(1,2,3)
    avg = strategy.aggregate(ups, weights=w, reference=ad(0, 0))
    assert float(avg[A][0, 0]) == pytest.approx(202.0)


def test_trim_must_leave_a_site_and_layouts_must_match():
    with pytest.raises(ConfigError):
        strategy.combine([np.zeros(1)] * 2, method="trimmed-mean", weights=[1, 1], trim_fraction=0.5)
    with pytest.raises(ConfigError, match="layout"):
        strategy.aggregate([ad(1, 1), {A: np.zeros((1, 2))}], weights=[1, 1], reference=None)


def test_lora_product_approximation_is_real():
    # Averaging A and B separately is not averaging B@A (documented approximation).
    a1, b1 = np.array([[1.0]]), np.array([[1.0]])
    a2, b2 = np.array([[3.0]]), np.array([[3.0]])
    mean_of_products = (b1 @ a1 + b2 @ a2) / 2
    product_of_means = ((b1 + b2) / 2) @ ((a1 + a2) / 2)
    assert mean_of_products[0, 0] == 5.0 and product_of_means[0, 0] == 4.0
