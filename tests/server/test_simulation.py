"""server/simulation.py: CPUs reserved per simulated site."""

import pytest

from server.simulation import client_cpus
from shared.errors import FedsynthError


@pytest.mark.parametrize(("n_sites", "cpus"), [(3, 2), (4, 2), (5, 2), (3, 1), (7, 4), (16, 16), (20, 3)])
def test_every_site_runs_at_once_up_to_two_per_cpu(n_sites, cpus):
    share = client_cpus(n_sites, cpus)
    # Flower's Ray backend starts int(CPUs / share) actors: one per site at once, at most 2 per CPU.
    assert int(cpus / share) >= min(n_sites, 2 * cpus)
    assert share <= 1.0


def test_a_whole_cpu_when_cores_suffice():
    assert client_cpus(2, 2) == 1.0
    assert client_cpus(1, 8) == 1.0
    assert client_cpus(3, 2) == 0.66  # the demo: three sites on a 2-core laptop


@pytest.mark.parametrize("bad", [0, -1, True, 2.0])
def test_site_count_validated(bad):
    with pytest.raises(FedsynthError):
        client_cpus(bad, 2)
