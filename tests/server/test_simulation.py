"""server/simulation.py: logical CPUs declared to Ray for simulated sites."""

import pytest

from server.simulation import ray_cpus
from shared.errors import ConfigError


@pytest.mark.parametrize(("n_sites", "cpus", "expected"), [
    (3, 2, 3),   # the demo on a 2-core laptop: all three sites at once (was 2, then 1)
    (4, 2, 4),
    (5, 2, 4),   # at most two sites per core
    (1, 2, 2),   # never fewer than the machine has
    (2, 8, 8),
    (20, 3, 6),
])
def test_one_logical_cpu_per_site_up_to_two_per_core(n_sites, cpus, expected):
    assert ray_cpus(n_sites, cpus) == expected


@pytest.mark.parametrize("bad", [0, -1, True, 2.0])
def test_site_count_validated(bad):
    with pytest.raises(ConfigError):
        ray_cpus(bad, 2)
