"""Secret DP randomness: Gaussian noise and Poisson sampling that nothing in a run can seed.

DP-SGD's guarantee assumes the noise added to each clipped gradient sum, and
which patients each step samples, are unknown to whoever sees the update. A
generator seeded from configuration (or from torch's global RNG, which
:mod:`client.site` seeds with the run's ``lora.init-seed``) is known to anyone
with the source and the run config: they can regenerate and subtract the
noise, and the formal epsilon is infinite. So every round here draws its keys
from ``os.urandom`` and owns its generators; no run config, site setting or
:class:`~shared.run_config.TrainConfig` field reaches them, and torch's, numpy's
and Python's global RNGs are never used.

Two noise sources (named in the ledger entry, the privacy report and
``docs/privacy-model.md``):

- ``"chacha20-gaussian"`` (``secure=True``, the default): a ChaCha20 keystream
  (RFC 8439; 256-bit key and 96-bit nonce fresh from ``os.urandom`` per round)
  read as 53-bit uniforms on (0, 1] and turned into N(0, 1) by Box-Muller in
  float64, with the floating-point attack mitigation of Opacus' secure mode
  (``opacus.optimizers.optimizer._generate_noise``, ``secure_mode=True``): per
  tensor one draw is thrown away, then four N(0, std^2) draws are summed and
  halved (against attacks on the float representation of a single Gaussian
  sample; https://arxiv.org/abs/2107.10138 section 5.1 with n = 2). The keystream
  for step t+1 is generated in a background thread while step t computes, by
  the system OpenSSL through ctypes (which releases the GIL during each call;
  ``cryptography``, the fallback, holds it, so it is fed 1 MiB chunks to let the
  training thread in between). On a GPU the same thread copies it to the device
  on a side stream and the cheap Box-Muller transform runs on the device at the
  step; on the CPU the thread does the transform too.
- ``"torch-urandom-seeded"`` (``secure=False``): torch's own generator on the
  parameters' device (Philox on CUDA, MT19937 on CPU), seeded per round with 64
  bits from ``os.urandom``, through Opacus' plain ``_generate_noise``. Fresh and
  unpredictable from the source, but not a CSPRNG and without the mitigation.

Poisson sampling (:mod:`client.dp.sampling`) draws from the same kind of
stream (a ChaCha20 keystream of its own, or an ``os.urandom``-seeded torch
generator); :func:`note_window_rng` picks a sampled patient's note and window.

:func:`deterministic_for_tests` is the only way to make any of it repeatable. It
is a context manager for tests (like the non-private baseline switch, nothing in
a run can reach it: no config key, setting, environment variable or file).
"""

from __future__ import annotations

import hashlib
import math
import os
import queue
import random
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from opacus.optimizers.optimizer import _check_processed_flag, _generate_noise, _mark_as_processed

from client.dp.chacha20 import CHUNK, OpenSSLChaCha20, libcrypto
from shared.errors import ConfigError, Problem, TrainingError

SECURE_SOURCE = "chacha20-gaussian"
FRESH_SOURCE = "torch-urandom-seeded"
NOISE_SOURCES = (SECURE_SOURCE, FRESH_SOURCE)
_CHUNK = CHUNK
_WORD = 8  # keystream bytes per uniform (53 of its 64 bits are used)


def noise_source_name(*, secure: bool) -> str:
    """The name recorded for the noise a round with this ``secure_mode`` draws."""
    return SECURE_SOURCE if secure else FRESH_SOURCE


# --- entropy ----------------------------------------------------------------------------

_test_seed: bytes | None = None  # set only by deterministic_for_tests
_test_counter = [0]
_test_lock = threading.Lock()


def _entropy(n: int) -> bytes:
    """``n`` secret bytes: ``os.urandom``, except inside :func:`deterministic_for_tests`."""
    if _test_seed is None:
        return os.urandom(n)
    with _test_lock:
        _test_counter[0] += 1
        digest = hashlib.sha256(_test_seed + _test_counter[0].to_bytes(8, "little")).digest()
    return (digest * (n // len(digest) + 1))[:n]


@contextmanager
def deterministic_for_tests(seed: int) -> Iterator[None]:
    """TESTS ONLY: every key, nonce and seed drawn inside comes from ``seed``, in call order.

    Two blocks with the same seed and the same sequence of draws get the same
    noise and batches (e.g. to check that two clipping paths agree exactly).
    Never call it outside tests: inside it the noise is known to anyone who
    knows ``seed``, i.e. there is no privacy. Nothing in a run (config, site
    settings, environment) can enter it.
    """
    global _test_seed
    if _test_seed is not None:
        raise RuntimeError("deterministic_for_tests does not nest")
    _test_seed, _test_counter[0] = hashlib.sha256(b"fedsynth-test-%d" % seed).digest(), 0
    try:
        yield
    finally:
        _test_seed = None


def note_window_rng() -> random.Random:
    """The RNG that picks a patient's note and window when the patient is sampled.

    Which note is drawn is part of the sampling the DP analysis assumes secret:
    a SystemRandom (``os.urandom``) in a run, a seeded Random inside
    :func:`deterministic_for_tests`.
    """
    if _test_seed is None:
        return random.SystemRandom()
    return random.Random(_entropy(16))


def _torch_generator(device: torch.device | str) -> torch.Generator:
    seed = int.from_bytes(_entropy(8), "little") & ((1 << 63) - 1)
    return torch.Generator(device=device).manual_seed(seed)


class _KeyStream:
    """A ChaCha20 keystream under a fresh 256-bit key and 96-bit nonce (RFC 8439 layout:
    32-bit block counter starting at 0, so 256 GiB before it would wrap).

    Generated by the system OpenSSL through ctypes when there is one (GIL released),
    else by ``cryptography`` (same cipher, same keystream; holds the GIL, so chunks
    of 1 MiB let the training thread in between). ``backend`` forces one (tests).
    """

    def __init__(self, *, backend: str | None = None) -> None:
        key, iv = _entropy(32), bytes(4) + _entropy(12)
        lib = libcrypto() if backend in (None, "openssl") else None
        if backend == "openssl" and lib is None:
            raise TrainingError("no system OpenSSL with ChaCha20")
        self.backend = "openssl" if lib is not None else "cryptography"
        self._openssl = OpenSSLChaCha20(lib, key, iv) if lib is not None else None
        self._enc = (
            None if lib is not None
            else Cipher(algorithms.ChaCha20(key, iv), mode=None).encryptor()
        )
        self._zeros = bytes(_CHUNK) if lib is None else b""
        self.bytes_used = 0

    def words(self, n: int, *, pin: bool = False) -> torch.Tensor:
        """The next ``8 * n`` keystream bytes as ``n`` int64 words (CPU; pinned if asked)."""
        out = torch.empty(n * _WORD, dtype=torch.uint8, pin_memory=pin)
        view = memoryview(out.numpy()) if self._enc is not None else None
        for start in range(0, n * _WORD, _CHUNK):
            stop = min(start + _CHUNK, n * _WORD)
            if self._openssl is not None:
                self._openssl.fill(out.data_ptr() + start, stop - start)
            else:
                self._enc.update_into(self._zeros[: stop - start], view[start:stop])
        self.bytes_used += n * _WORD
        return out.view(torch.int64)


def uniforms(words: torch.Tensor) -> torch.Tensor:
    """Keystream words -> float64 uniforms on (0, 1]: (the top 53 bits + 1) * 2^-53,
    exact in float64 (all 2^53 values equally likely; never 0, so log is finite)."""
    top = (words >> 11) & ((1 << 53) - 1)  # arithmetic shift: the mask drops the sign bits
    return (top.to(torch.float64) + 1.0) * (2.0**-53)


def box_muller(u: torch.Tensor) -> torch.Tensor:
    """``2m`` uniforms in (0, 1] -> ``2m`` independent N(0, 1) draws (float64).

    First half radii, second half angles: z = sqrt(-2 ln u1) * (cos, sin)(2 pi u2).
    Works in place on ``u`` (overwritten) so that a step's noise needs two
    float64 buffers, not five.
    """
    half = u.numel() // 2
    radius = u[:half].log_().mul_(-2.0).sqrt_()
    angle = u[half : 2 * half].mul_(2.0 * torch.pi)
    z = torch.empty(2 * half, dtype=u.dtype, device=u.device)
    torch.cos(angle, out=z[:half]).mul_(radius)
    torch.mul(angle.sin_(), radius, out=z[half:])
    return z


def mitigated(z: torch.Tensor, numel: int, *, std: float) -> torch.Tensor:
    """Opacus' secure-mode combine for one tensor of ``numel`` coordinates.

    ``z`` holds ``1 + 4 * numel`` standard normals: the first is thrown away (as
    Opacus throws away its first (1, 1) draw), the next four blocks of ``numel``
    are four N(0, std^2) draws whose sum halved is again N(0, std^2).
    """
    draws = z[1 : 1 + 4 * numel].view(4, numel) * std
    return draws.sum(0) / 2


# --- noise --------------------------------------------------------------------------------


class GaussianNoise:
    """Per-round DP noise for a fixed list of tensors: ``N(0, std^2)`` per coordinate.

    ``shapes`` (and ``dtypes``) are the parameters' in the order noise is added;
    ``std`` is ``noise_multiplier * max_grad_norm`` (in gradient units, the same
    scaling as Opacus' ``add_noise``); ``steps`` the number of noisy steps this
    round -- one :meth:`draw` per step, one more is a :class:`TrainingError`.
    ``secure`` picks the source (module docstring). Use as a context manager or
    call :meth:`close` so the prefetch thread stops.
    """

    def __init__(
        self,
        shapes: Sequence[torch.Size | tuple[int, ...]],
        *,
        std: float,
        steps: int,
        device: torch.device | str,
        dtypes: Sequence[torch.dtype] | None = None,
        secure: bool = True,
    ) -> None:
        problems = []
        if isinstance(std, bool) or not isinstance(std, (int, float)) or not math.isfinite(std) or std < 0:
            problems.append(Problem("std", f"must be a finite number >= 0, got {std!r}"))
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            problems.append(Problem("steps", f"must be an integer >= 0, got {steps!r}"))
        if dtypes is not None and len(dtypes) != len(shapes):
            problems.append(Problem("dtypes", f"{len(dtypes)} dtypes for {len(shapes)} shapes"))
        if problems:
            raise ConfigError("invalid DP noise source", problems)
        self.shapes = [torch.Size(s) for s in shapes]
        self.dtypes = list(dtypes) if dtypes is not None else [torch.float32] * len(self.shapes)
        self.std, self.steps, self.device = float(std), int(steps), torch.device(device)
        self.secure = bool(secure)
        self.name = noise_source_name(secure=self.secure)
        self.drawn = 0
        self._numels = [s.numel() for s in self.shapes]
        self._words = sum(1 + 4 * n for n in self._numels)
        self._words += self._words % 2  # Box-Muller makes normals in pairs
        self._stop = threading.Event()
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=1)
        self._thread: threading.Thread | None = None
        self._stream: _KeyStream | None = None
        self._generator: torch.Generator | None = None
        if not self.secure:
            self._generator = _torch_generator(self.device)
        elif self.std > 0 and self.steps > 0:
            self._stream = _KeyStream()  # key drawn here, in the caller's thread
            self._thread = threading.Thread(target=self._prefetch, name="dp-noise", daemon=True)
            self._thread.start()

    def _prefetch(self) -> None:
        # On a GPU the thread makes the keystream in pinned memory and copies it on a
        # side stream (so the copy overlaps compute too); the device transforms it at
        # draw(). On the CPU the thread does both (torch releases the GIL).
        cuda = self.device.type == "cuda"
        try:
            copy_stream = torch.cuda.Stream(device=self.device) if cuda else None
            for _ in range(self.steps):
                item = self._stream.words(self._words, pin=cuda)
                if cuda:
                    with torch.cuda.device(self.device), torch.cuda.stream(copy_stream):
                        on_device = item.to(self.device, non_blocking=True)
                        copied = torch.cuda.Event()
                        copied.record(copy_stream)
                    item = (on_device, copied)
                else:
                    item = self._transform(item)
                if not self._offer(item):
                    return
        except BaseException as exc:  # surfaced by draw(), never swallowed
            self._offer(exc)

    def _offer(self, item: Any) -> bool:
        """Queue ``item`` for :meth:`draw`; False once :meth:`close` was called."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def draw(self) -> list[torch.Tensor]:
        """This step's noise: one tensor per shape, on ``device``, in ``dtypes``."""
        if self.drawn >= self.steps:
            raise TrainingError(f"noise for more than the {self.steps} reserved steps was drawn")
        self.drawn += 1
        if self.std == 0:
            return [torch.zeros(s, device=self.device, dtype=d) for s, d in zip(self.shapes, self.dtypes, strict=True)]
        if not self.secure:
            return [
                _generate_noise(
                    std=self.std,
                    reference=torch.empty(s, device=self.device, dtype=d),
                    generator=self._generator,
                    secure_mode=False,
                )
                for s, d in zip(self.shapes, self.dtypes, strict=True)
            ]
        item = self._next_words()
        if isinstance(item, BaseException):
            raise TrainingError(f"secure noise generation failed: {item!r}") from item
        if isinstance(item, tuple):  # keystream copied to the GPU on the side stream
            words, copied = item
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(copied)
            words.record_stream(stream)  # allocated on the side stream, used on this one
            return self._transform(words)
        return item

    def _transform(self, words: torch.Tensor) -> list[torch.Tensor]:
        """One step's keystream -> the mitigated N(0, std^2) noise of every tensor."""
        z = box_muller(uniforms(words.to(self.device, non_blocking=True)))
        out, start = [], 0
        for shape, dtype, numel in zip(self.shapes, self.dtypes, self._numels, strict=True):
            block = z[start : start + 1 + 4 * numel]
            out.append(mitigated(block, numel, std=self.std).view(shape).to(dtype))
            start += 1 + 4 * numel
        return out

    def _next_words(self) -> Any:
        while True:
            try:
                return self._queue.get(timeout=0.1)
            except queue.Empty:
                if self._thread is None or not self._thread.is_alive():
                    if self._queue.empty():
                        raise TrainingError("the noise source was closed before this draw") from None

    def close(self) -> None:
        """Stop the prefetch thread (safe to call twice)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> GaussianNoise:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def use_noise(optimizer: Any, noise: GaussianNoise) -> None:
    """Make this Opacus ``DPOptimizer`` (flat or ghost) add ``noise`` instead of its own draw.

    Mirrors ``DPOptimizer.add_noise`` (``p.grad = summed_grad + noise``, the
    processed-flag checks) with the noise taken from ``noise``, whose shapes
    must be the optimizer's ``params`` in order; scaling by the expected batch
    size stays Opacus' (``scale_grad``). Opacus' own generator is never used.
    """
    params = list(optimizer.params)
    if [p.shape for p in params] != noise.shapes:
        raise TrainingError("noise source shapes differ from the DP optimizer's parameters")

    def add_noise() -> None:
        for p, z in zip(params, noise.draw(), strict=True):
            _check_processed_flag(p.summed_grad)
            p.grad = (p.summed_grad + z).view_as(p)
            _mark_as_processed(p.summed_grad)

    optimizer.add_noise = add_noise  # instance attribute: shadows the class method
