"""Secret Poisson sampling of patients: what Opacus' accountant assumes, from fresh keys.

Each step every patient is drawn independently with probability q (so the
batch size varies and a batch may be empty -- a noise-only step that is still
charged), exactly like Opacus' ``UniformWithReplacementSampler``, but the
uniforms come from a ChaCha20 keystream keyed from ``os.urandom`` for this
round (secure mode) or from an ``os.urandom``-seeded torch generator -- never
from a configured seed or torch's global RNG (:mod:`client.dp.noise`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader, Dataset

from client.dp.noise import _KeyStream, _torch_generator, uniforms
from shared.dp_defaults import patients_bucket, sample_rate_for  # noqa: F401  (re-exported: train, bench)


class SecretPoissonSampler(UniformWithReplacementSampler):
    """Poisson sampling of patients: each of ``num_samples`` independently with
    probability ``sample_rate`` per batch, ``batches`` batches per pass (empty
    ones included) -- Opacus' ``UniformWithReplacementSampler`` with secret randomness.

    ``secure``: uniforms from a fresh ChaCha20 stream; otherwise ``torch.rand``
    with an ``os.urandom``-seeded generator (exactly Opacus' draw).
    """

    def __init__(self, *, num_samples: int, sample_rate: float, batches: int, secure: bool) -> None:
        super().__init__(num_samples=num_samples, sample_rate=sample_rate, steps=batches)
        self.secure = bool(secure)
        self._stream = _KeyStream() if self.secure else None
        self.generator = None if self.secure else _torch_generator("cpu")

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            if self._stream is not None:
                u = uniforms(self._stream.words(self.num_samples))
            else:
                u = torch.rand(self.num_samples, generator=self.generator)
            yield (u < self.sample_rate).nonzero(as_tuple=False).reshape(-1).tolist()


class _EmptyAsList:
    """Collate non-empty batches with ``collate_fn``; an empty Poisson batch becomes ``[]``.

    (Opacus' ``wrap_collate_with_empty`` cannot build an empty batch of dicts
    when the very first batch is empty; the step loops treat any non-dict batch
    as zero rows: an all-noise step.)
    """

    def __init__(self, collate_fn: Any) -> None:
        self.collate_fn = collate_fn

    def __call__(self, batch: list[Any]) -> Any:
        return self.collate_fn(batch) if batch else []


def poisson_loader(
    dataset: Dataset, *, sample_rate: float, collate_fn: Any, secure: bool
) -> DataLoader:
    """A Poisson loader like Opacus' ``DPDataLoader.from_data_loader`` (each patient drawn
    with probability ``sample_rate``, ceil(1/q) batches per pass, empty batches allowed)
    over a :class:`SecretPoissonSampler`. An empty batch is collated to ``[]``."""
    batches = max(1, math.ceil(1 / sample_rate))
    sampler = SecretPoissonSampler(
        num_samples=len(dataset), sample_rate=sample_rate, batches=batches, secure=secure
    )
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=_EmptyAsList(collate_fn))
