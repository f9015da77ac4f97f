"""Secret Poisson sampling: each patient independently with probability q, fresh every round."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

from client.dp.noise import deterministic_for_tests
from client.dp.sampling import SecretPoissonSampler, poisson_loader


@pytest.mark.parametrize("secure", [True, False])
def test_poisson_sampler_is_what_the_accountant_assumes(secure):
    """Each patient independently with probability q per batch; batch size varies
    and may be 0; two samplers built alike draw different batches."""
    n, q, batches = 40, 0.1, 2000
    sampler = SecretPoissonSampler(num_samples=n, sample_rate=q, batches=batches, secure=secure)
    assert isinstance(sampler, UniformWithReplacementSampler) and len(sampler) == batches
    drawn = list(sampler)
    assert len(drawn) == batches
    sizes = np.array([len(b) for b in drawn])
    assert (sizes == 0).any() and len(set(sizes)) > 5
    assert abs(sizes.mean() - n * q) < 5 * math.sqrt(n * q * (1 - q) / batches)
    per_patient = np.bincount(np.concatenate([b for b in drawn if b]), minlength=n) / batches
    assert np.all(np.abs(per_patient - q) < 6 * math.sqrt(q * (1 - q) / batches))
    assert all(len(set(b)) == len(b) for b in drawn)
    again = list(SecretPoissonSampler(num_samples=n, sample_rate=q, batches=50, secure=secure))
    assert again != drawn[:50]


def test_poisson_loader_collates_empty_batches_to_zero_rows_even_first():
    """An empty first batch (Opacus' own empty-batch collate cannot build one for
    dict batches) is ``[]``: the step loops treat it as a noise-only step."""
    data = [{"x": i} for i in range(3)]
    calls = []

    def collate(batch):
        calls.append(len(batch))
        return {"x": torch.tensor([e["x"] for e in batch])}

    loader = poisson_loader(data, sample_rate=1 / 3, collate_fn=collate, secure=True)
    assert loader.batch_sampler.sample_rate == 1 / 3 and len(loader) == 3
    first_empty = 0
    for seed in range(40):  # fixed keys; about 30% of them draw an empty first batch
        with deterministic_for_tests(seed):
            loader = poisson_loader(data, sample_rate=1 / 3, collate_fn=collate, secure=True)
            batches = list(loader)
        assert len(batches) == 3
        assert all(b == [] or isinstance(b, dict) and len(b["x"]) for b in batches)
        first_empty += batches[0] == []
    assert first_empty > 0
    assert 0 not in calls  # collate never sees an empty batch


def test_sample_rate_depends_on_the_bucketed_patient_count_only():
    """#12 §4: q goes out with every update; 1/ceil(n/B) pinned n to within B."""
    from client.dp.sampling import patients_bucket, sample_rate_for

    for batch in (4, 8, 16, 64):
        for bucket in (10, 90, 640, 1500):
            rates = {sample_rate_for(n, batch) for n in range(bucket, bucket + 10)}
            assert rates == {min(1.0, batch / bucket)}
            assert all(patients_bucket(n) == bucket for n in range(bucket, bucket + 10))
    assert sample_rate_for(7, 4) == 0.4  # below one bucket: q = B / 10, never from n itself
    assert sample_rate_for(15, 64) == 1.0
