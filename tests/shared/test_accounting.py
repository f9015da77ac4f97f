"""shared.accounting: the one epsilon computation the site ledger and the coordinator share."""

import pytest

from shared.accounting import compute_epsilon, epsilon_lower_bound, epsilon_tolerance


def test_compute_epsilon_composes_and_merges_equal_runs():
    one = compute_epsilon([(1.0, 0.1, 50)], delta=1e-5, accountant="rdp")
    two = compute_epsilon([(1.0, 0.1, 50), (1.0, 0.1, 50)], delta=1e-5, accountant="rdp")
    assert two == pytest.approx(compute_epsilon([(1.0, 0.1, 100)], delta=1e-5, accountant="rdp"))
    assert 0 < one < two
    assert compute_epsilon([], delta=1e-5, accountant="prv") == 0.0
    for bad in ([(0.0, 0.1, 1)], [(1.0, 0.0, 1)], [(1.0, 1.5, 1)], [(1.0, 0.1, 0)], [(float("nan"), 0.1, 1)]):
        with pytest.raises(ValueError):
            compute_epsilon(bad, delta=1e-5, accountant="rdp")
    with pytest.raises(ValueError):
        compute_epsilon([(1.0, 0.1, 1)], delta=1e-5, accountant="gdp")
    with pytest.raises(ValueError):
        compute_epsilon([(1.0, 0.1, 1)], delta=1.0, accountant="rdp")


def test_lower_bound_is_exact_for_few_runs_and_never_above_for_many():
    few = [(1.0, 0.1, 50), (1.2, 0.05, 20)]
    assert epsilon_lower_bound(few, delta=1e-5, accountant="rdp") == pytest.approx(
        compute_epsilon(few, delta=1e-5, accountant="rdp"))
    many = [(1.0 + 0.05 * i, 0.1 - 0.002 * i, 20) for i in range(20)]
    exact = compute_epsilon(many, delta=1e-5, accountant="rdp")
    bound = epsilon_lower_bound(many, delta=1e-5, accountant="rdp", max_groups=4)
    assert bound <= exact and bound > 0.5 * exact  # a bound, and not a useless one
    assert epsilon_tolerance(10.0) == pytest.approx(0.11)
