"""The state of a fast decode run: ring KV cache, device-side step state, compiled graphs.

:mod:`client.generation.fast` runs the loop; this module holds what one run
needs on the device and what later runs reuse:

- the ring (:mod:`client.generation.ring_decoder`) and per-row state (current token,
  window, active flag, repetition-penalty mask, uniforms for the sampler),
  all at fixed addresses so CUDA graphs replay them without copies;
- the decode step (forward, mask, in-graph sampler, state update) and the
  refill prefill, compiled on CUDA (``reduce-overhead`` for the step, the
  default mode for the prefill), eager on CPU;
- a per-model cache of these engines keyed by slots, bucketed ring length and
  sampling settings, so a second call neither recompiles nor re-records.

Nothing here is private data beyond the prompts being decoded; the sampler
shapes the token distribution and adds no privacy protection.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

from client.generation.ring_decoder import decode, model_parts, prefill
from client.generation.sampling import apply_repetition_penalty, draw

# Shapes are bucketed so that new prompt lengths or refill group sizes reuse compiled
# graphs instead of recompiling (and, past dynamo's recompile limit, silently running eagerly).
WIDTH_BUCKET = 32  # prefill widths: a multiple of this
RING_BUCKET = 64  # ring length L: a multiple of this
_MAX_ENGINES = 2  # cached engines per model (each holds a ring: layers x 2 x B x H_kv x L x d)
_ENGINES: weakref.WeakKeyDictionary[Any, dict[tuple, Engine]] = weakref.WeakKeyDictionary()


def round_up(n: int, step: int) -> int:
    """The smallest multiple of ``step`` that is at least ``n``."""
    return -(-n // step) * step


def group_size(n: int, slots: int) -> int:
    """Rows of a refill prefill for ``n`` prompts: the next power of two, at least 2 (dynamo
    specialises size 1 into a graph of its own), at most ``slots``.

    Padding groups to few sizes keeps the number of prefill shapes small.
    """
    size = 2
    while size < n:
        size *= 2
    return min(size, slots)


def _raise_recompile_limit(limit: int = 64) -> None:
    # One entry per (engine, prefill bucket): more than dynamo's default of 8.
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name) and getattr(config, name) < limit:
            setattr(config, name, limit)


class Engine:
    """Ring, device-side decode state and the (compiled) step/prefill for one shape.

    Cached per model and key (:func:`cached_engine`), so a second call with the same
    slots, ring length and sampling settings reuses the compiled graphs and the
    ring: no compilation, no CUDA graph re-recording. Row ``slots`` of every
    state tensor is scratch (the target of padded refill rows).
    """

    def __init__(self, model: Any, slots: int, length: int, sampler: dict, penalty: float,
                 compile: bool) -> None:  # fmt: skip
        self.parts = parts = model_parts(model)
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        vocab = model.get_output_embeddings().weight.shape[0]
        self.slots, self.length, self.sampler, self.penalty = slots, length, sampler, penalty
        self.device, self.compiled = device, compile
        rows = slots + 1
        shape = (len(parts.layers), 2, rows, parts.kv_heads, length, parts.head_dim)
        self.kv = torch.zeros(shape, dtype=dtype, device=device)
        self.cur = torch.zeros(rows, dtype=torch.long, device=device)
        self.window = torch.zeros(rows, dtype=torch.long, device=device)
        self.active = torch.zeros(rows, dtype=torch.bool, device=device)
        self.column = torch.zeros(1, dtype=torch.long, device=device)
        self.cols = torch.arange(length, device=device)
        self.uniforms = torch.zeros(rows, dtype=torch.float32, device=device)
        self.seen = (
            torch.zeros(rows, vocab, dtype=torch.bool, device=device) if penalty != 1.0 else None
        )
        self.step, self.prefill = self._step, self._prefill
        if compile:
            for t in (self.kv, self.cur, self.window, self.active, self.column, self.cols,
                      self.uniforms, self.seen):  # fmt: skip
                if t is not None:  # fixed addresses: CUDA graphs replay them without copies
                    torch._dynamo.mark_static_address(t)
            _raise_recompile_limit()
            self.step = torch.compile(self._step, mode="reduce-overhead", dynamic=False)
            # Dynamic group size and width: one prefill graph for every refill bucket
            # (a graph per bucket would cost a compile each, 30-60 s at 1B on a GPU).
            self.prefill = torch.compile(self._prefill, dynamic=True)

    def reset(self) -> None:
        self.active.zero_()
        self.window.zero_()
        self.column.zero_()
        if self.seen is not None:
            self.seen.zero_()

    def _scores(self, logits: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
        logits = logits.float()
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, self.penalty)
        return logits

    def _step(self) -> tuple[torch.Tensor, torch.Tensor]:
        # One decode step for rows 0..B-1, all state on the device: returns
        # ([2, B] = tokens, exact flags) and the processed logits (for rare redraws).
        b = self.slots
        cur, window, active = self.cur[:b], self.window[:b], self.active[:b]
        seen = None if self.seen is None else self.seen[:b]
        if seen is not None:  # the previous token (possibly redrawn on the host) is now seen
            seen.scatter_(1, cur[:, None], True)
        # Empty slots still run (static shapes) on a one-column window; their tokens are ignored.
        window.copy_(torch.where(active, window + 1, torch.ones_like(window)))
        mask = torch.remainder(self.column - self.cols, self.length)[None, :] < window[:, None]
        logits = decode(self.parts, self.kv, cur, window - 1, self.column, mask)
        scores = self._scores(logits, seen)
        tokens, exact = draw(scores, self.uniforms[:b], **self.sampler)
        cur.copy_(tokens)
        self.column.copy_(torch.remainder(self.column + 1, self.length))
        return torch.stack((tokens, exact.long())), scores

    def _prefill(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # packed [n, W + 2]: left-padded ids, then ring row and prompt length per entry.
        ids, rows, lengths = packed[:, :-2], packed[:, -2], packed[:, -1]
        width = ids.shape[1]
        columns = torch.remainder(
            self.column - width + torch.arange(width, device=ids.device), self.length
        )
        seen = None
        if self.seen is not None:  # pads repeat the prompt's first token: marking them is exact
            self.seen[rows] = False
            self.seen.index_put_((rows[:, None].expand_as(ids), ids), torch.ones_like(ids, dtype=torch.bool))
            seen = self.seen[rows]
        logits = prefill(self.parts, self.kv, ids, lengths, rows, columns)
        scores = self._scores(logits, seen)
        tokens, exact = draw(scores, self.uniforms[: ids.shape[0]], **self.sampler)
        self.cur[rows] = tokens
        self.window[rows] = lengths
        self.active[rows] = True
        return torch.stack((tokens, exact.long())), scores


def cached_engine(model: Any, key: tuple, build: Callable[[], Engine]) -> tuple[Engine, bool]:
    """The engine cached on ``model`` under ``key`` (built if missing) and whether it was cached.

    At most ``_MAX_ENGINES`` per model, least recently used dropped first; the
    cache holds the model weakly.
    """
    cache = _ENGINES.setdefault(model, {})
    if key in cache:
        cache[key] = cache.pop(key)  # most recently used last
        return cache[key], True
    while len(cache) >= _MAX_ENGINES:
        cache.pop(next(iter(cache)))
    cache[key] = engine = build()
    return engine, False


def release_engines(model: Any) -> None:
    """Drop the cached rings and compiled graphs of ``model`` (frees their memory)."""
    _ENGINES.pop(model, None)
