"""Fast batched decoding: a static ring KV cache, continuous refill, cheap exact sampling.

Plain ``model.generate`` (the default path of :mod:`client.generate`) spends
most of a sampled decode step sorting the whole vocabulary for top-p, grows its
KV cache every step, and keeps finished rows in the batch until the longest one
ends. This path instead:

- **Static ring cache.** Keys/values live in preallocated ``[B, heads, L, dim]``
  tensors, ``L = longest prompt + max_new_tokens``. Every step writes one shared
  column ``t`` (mod ``L``) for all rows; each row attends only to its own last
  ``w_b`` columns (a per-row mask), and RoPE positions are per row. Keys are
  stored already rotated, so their column order does not matter to attention.
- **Continuous refill.** When a row ends (EOS or ``max_new_tokens``) its slot
  takes the next pending prompt: the new prompts are prefilled together (plain
  forward, left padded) and their keys/values copied into the slot's columns
  just behind ``t``. Rows never wait for the longest row of a batch.
- **Compiled step.** On CUDA the decode step (model forward + mask) is wrapped
  in ``torch.compile(mode="reduce-overhead")`` (CUDA graphs); on CPU it runs
  eagerly.
- **Sampling without a full sort.** See :func:`client.sampling.sample_next`:
  ``torch.topk`` on ``K`` candidates, then top-p inside them; exact top-p (a
  row whose nucleus does not fit in ``K`` is redone with a full sort).
- **Merged LoRA.** A PEFT adapter is merged into the base weights for the run
  (no extra LoRA matmuls per layer) and the caller's exact weights are restored
  afterwards (:func:`merged_lora`).

Families: llama, qwen2, qwen3 (full attention, ``sdpa`` or ``eager``
attention). Qwen3.5's linear-attention layers keep a recurrent state that a
ring cache cannot hold, and sliding-window layers are not handled:
:func:`unsupported_reason` says why, and :mod:`client.generate` falls back to
plain ``model.generate`` for them.

Reproducibility: the same prompts, seed and batch size give the same tokens.
Outputs are not bit-identical to plain ``generate`` under sampling (different
random streams); greedy decoding gives the same tokens up to float rounding.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from transformers.cache_utils import Cache, StaticLayer

from client.sampling import DEFAULT_CANDIDATES, apply_repetition_penalty, sample_next

_MASKS = ("sdpa", "eager")


def unsupported_reason(model: Any) -> str | None:
    """Why the fast path cannot run ``model`` (``None`` when it can)."""
    model = _unwrap_all(model)
    config = getattr(model, "config", None)
    if config is None:
        return f"{type(model).__name__} has no config"
    types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if types != {"full_attention"}:
        return f"layer types {sorted(types)} (only full-attention layers fit the ring cache)"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "sliding-window attention"
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl not in _MASKS:
        return f"attention implementation {impl!r} (needs one of {_MASKS}: a custom 4D mask)"
    return None


def _unwrap_all(model: Any) -> Any:
    # Opacus' GradSampleModule -> PeftModel -> the transformers model.
    while hasattr(model, "_module"):
        model = model._module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


@contextlib.contextmanager
def merged_lora(model: Any) -> Iterator[Any]:
    """Yield the transformers model to generate with, LoRA merged into its weights.

    For a PEFT model every LoRA layer's base weight is copied, the adapter is
    merged (``merge_adapter``), and on exit it is unmerged and the copies are
    written back, so the caller's model ends exactly as it was (bitwise, not
    just up to the rounding of ``W + BA - BA``) and still unmerged. Costs one
    extra copy of the adapted weights (q/k/v/o by default) while it runs. A
    model without an adapter, or one already merged, is yielded as is.
    """
    while hasattr(model, "_module"):
        model = model._module
    if not hasattr(model, "merge_adapter"):
        yield model
        return
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    if not layers or any(m.merged for m in layers):
        yield model.get_base_model()
        return
    with torch.no_grad():
        saved = [
            (m.get_base_layer().weight, m.get_base_layer().weight.detach().clone()) for m in layers
        ]
        model.merge_adapter()
    try:
        yield model.get_base_model()
    finally:
        with torch.no_grad():
            model.unmerge_adapter()
            for weight, original in saved:
                weight.copy_(original)


class _RingLayer(StaticLayer):
    """A static layer that writes the new token at a shared ring column."""

    def __init__(self, max_cache_len: int, column: torch.Tensor) -> None:
        super().__init__(max_cache_len=max_cache_len)
        self.column = column

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ):
        self.keys.index_copy_(2, self.column, key_states)
        self.values.index_copy_(2, self.column, value_states)
        return self.keys, self.values


def _ring_cache(model: Any, batch: int, length: int, device: torch.device, dtype: torch.dtype):
    config = model.config.get_text_config(decoder=True)
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    column = torch.zeros(1, dtype=torch.long, device=device)
    layers = [_RingLayer(length, column) for _ in range(config.num_hidden_layers)]
    probe = torch.zeros(batch, heads, 1, head_dim, dtype=dtype, device=device)
    for layer in layers:
        layer.lazy_initialization(probe, probe)
    return Cache(layers=layers), layers, column


@torch.inference_mode()
def generate_token_ids(
    model: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    compile: bool | None = None,
    candidates: int = DEFAULT_CANDIDATES,
    on_done: Callable[[int], None] | None = None,
    stats: dict[str, int] | None = None,
) -> list[list[int]]:
    """Generate new token ids for each prompt (token-id lists), in prompt order.

    ``batch_size`` is the number of decode slots; a slot whose row ends (an
    EOS id, kept in the output, or ``max_new_tokens`` tokens) is refilled with
    the next pending prompt. ``compile=None`` compiles the decode step on CUDA
    only. ``on_done(n)`` is called with the number of finished prompts whenever
    it grows. ``stats`` (optional) receives ``steps`` (decode steps),
    ``prefills`` and ``full_sort_rows``. The model must be a plain transformers
    model (see :func:`merged_lora`) of a family :func:`unsupported_reason` accepts.
    """
    reason = unsupported_reason(model)
    if reason is not None:
        raise ValueError(f"fast generation does not support this model: {reason}")
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    eos = torch.tensor(
        []
        if eos_token_id is None
        else [eos_token_id]
        if isinstance(eos_token_id, int)
        else list(eos_token_id),
        dtype=torch.long,
        device=device,
    )
    slots = min(batch_size, len(prompts))
    length = max(len(p) for p in prompts) + max_new_tokens
    cache, layers, column = _ring_cache(model, slots, length, device, dtype)
    vocab = model.get_output_embeddings().weight.shape[0]
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    stats = stats if stats is not None else {}
    stats.update(steps=0, prefills=0, full_sort_rows=stats.get("full_sort_rows", 0))
    eager_mask = (getattr(model.config, "_attn_implementation", None) or "eager") == "eager"
    cols = torch.arange(length, device=device)

    def step(ids: torch.Tensor, window: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # window[b]: tokens of row b in the cache after this step; the row attends to
        # the `window` columns ending at t (mod length), nothing older.
        column.copy_(t)
        valid = torch.remainder(t - cols, length)[None, :] < window[:, None]
        mask = valid[:, None, None, :]
        if eager_mask:
            mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(
                ~mask, torch.finfo(dtype).min
            )
        out = model(
            input_ids=ids[:, None],
            position_ids=(window - 1)[:, None],
            attention_mask=mask,
            cache=cache,
            use_cache=True,
        )
        return out.logits[:, -1, :]

    use_compile = device.type == "cuda" if compile is None else compile
    if use_compile:
        # Tensors the compiled step reads or writes in place keep fixed addresses
        # (CUDA graphs replay them without copies).
        torch._dynamo.mark_static_address(column)
        torch._dynamo.mark_static_address(cols)
    decode = torch.compile(step, mode="reduce-overhead", dynamic=False) if use_compile else step
    penalty = float(repetition_penalty)
    seen = torch.zeros(slots, vocab, dtype=torch.bool, device=device) if penalty != 1.0 else None

    def pick(logits: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        logits = logits.float()
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen if rows is None else seen[rows], penalty)
        return sample_next(
            logits,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            generator=generator,
            candidates=candidates,
            stats=stats,
        )

    pending = deque(range(len(prompts)))
    job = [-1] * slots  # prompt index held by each slot, -1 when empty
    outputs: list[list[int]] = [[] for _ in prompts]
    cur = torch.full((slots,), pad_token_id, dtype=torch.long, device=device)
    window = torch.zeros(slots, dtype=torch.long, device=device)
    t = 0  # the ring column the next decode step writes
    eos_ids = set(eos.tolist())

    def record(rows: list[int], tokens: list[int]) -> list[int]:
        # Append each row's new token; return the rows that ended with it.
        ended = []
        for s, tok in zip(rows, tokens, strict=True):
            outputs[job[s]].append(tok)
            if len(outputs[job[s]]) >= max_new_tokens or tok in eos_ids:
                ended.append(s)
        return ended

    def refill(free: list[int]) -> list[int]:
        # Prefill the next prompts together, copy their keys/values into the free
        # slots' columns just behind t, and sample each slot's first new token.
        take = [pending.popleft() for _ in free[: len(pending)]]
        free = free[: len(take)]
        width = max(len(prompts[j]) for j in take)
        ids = torch.full((len(take), width), pad_token_id, dtype=torch.long)
        att = torch.zeros((len(take), width), dtype=torch.long)
        for i, j in enumerate(take):
            ids[i, width - len(prompts[j]) :] = torch.tensor(list(prompts[j]))
            att[i, width - len(prompts[j]) :] = 1
        ids, att = ids.to(device), att.to(device)
        out = model(
            input_ids=ids,
            attention_mask=att,
            position_ids=(att.cumsum(-1) - 1).clamp(min=0),
            use_cache=True,
            logits_to_keep=1,
        )
        rows = torch.tensor(free, dtype=torch.long, device=device)
        where = torch.remainder(t - width + torch.arange(width, device=device), length)
        for ring, fresh in zip(layers, out.cache.layers, strict=True):
            ring.keys.transpose(1, 2).index_put_(
                (rows[:, None], where[None, :]), fresh.keys.transpose(1, 2)
            )
            ring.values.transpose(1, 2).index_put_(
                (rows[:, None], where[None, :]), fresh.values.transpose(1, 2)
            )
        if seen is not None:
            seen[rows] = False
            for i, j in enumerate(take):
                seen[free[i], torch.tensor(list(prompts[j]), device=device)] = True
        window[rows] = att.sum(-1)
        first = pick(out.logits[:, -1, :], rows)
        cur[rows] = first
        if seen is not None:
            seen[rows, first] = True
        for s, j in zip(free, take, strict=True):
            job[s] = j
        stats["prefills"] += 1
        return record(free, first.tolist())

    done = 0
    ended = refill(list(range(slots)))
    while True:
        while ended:
            for s in ended:
                job[s] = -1
            done += len(ended)
            if on_done is not None:
                on_done(done)
            ended = refill(ended) if pending else []
        live = [s for s in range(slots) if job[s] >= 0]
        if not live:
            break
        active = torch.tensor([j >= 0 for j in job], device=device)
        # Empty slots still run (static shapes) on a one-column window; their tokens are ignored.
        window = torch.where(active, window + 1, torch.ones_like(window))
        logits = decode(cur, window, torch.tensor([t], device=device))
        t = (t + 1) % length
        stats["steps"] += 1
        cur = pick(logits)
        if seen is not None:
            seen[torch.arange(slots, device=device), cur] = True
        tokens = cur.tolist()
        ended = record(live, [tokens[s] for s in live])
    return outputs


def generate_texts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    sampling: Any,
    batch_size: int,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Decoded new text (special tokens skipped) for each prompt string, in order.

    ``sampling`` is a :class:`client.generate.SamplingConfig`; a PEFT adapter
    on ``model`` is merged for the run and the caller's weights restored
    (:func:`merged_lora`). ``progress(done, total)`` counts finished prompts.
    """
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    total = len(prompts)
    was_training = model.training
    model.eval()
    try:
        with merged_lora(model) as plain:
            new = generate_token_ids(
                plain,
                ids,
                max_new_tokens=sampling.max_new_tokens,
                temperature=float(sampling.temperature),
                top_p=float(sampling.top_p),
                top_k=sampling.top_k,
                repetition_penalty=float(sampling.repetition_penalty),
                seed=sampling.seed,
                batch_size=batch_size,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                on_done=None if progress is None else (lambda done: progress(done, total)),
            )
    finally:
        if was_training:
            model.train()
    return tokenizer.batch_decode(new, skip_special_tokens=True)
