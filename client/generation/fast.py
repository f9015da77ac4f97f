"""Fast batched decoding: a static ring KV cache, continuous refill, cheap exact sampling.

Plain ``model.generate`` (the default path of :mod:`client.generation.generate`) spends
most of a sampled decode step sorting the whole vocabulary for top-p, grows its
KV cache every step, and keeps finished rows in the batch until the longest one
ends. This path instead:

- **Static ring cache.** Keys/values of all layers live in one preallocated
  tensor (:mod:`client.generation.ring_decoder`), ``L`` columns per row (longest prompt
  and ``max_new_tokens``, bucketed). Every step writes one shared column ``t``
  (mod ``L``) for all rows; each row attends only to its own last ``w_b``
  columns (a per-row mask), and RoPE positions are per row. Keys are stored
  already rotated, so their column order does not matter to attention.
- **Own forward pass.** The model's modules are called directly
  (:mod:`client.generation.ring_decoder`), not ``model(..., cache=...)``: no dependence
  on the transformers version's cache keyword, and grouped-query attention
  reads each K/V head once (no ``repeat_kv`` to all query heads).
- **Continuous refill, in groups.** When rows end (EOS or ``max_new_tokens``)
  their slots take the next pending prompts: one prefill for all of them
  (left padded, group size and width bucketed) and one scatter of every
  layer's keys/values into the slots' columns just behind ``t``.
- **State on the device.** Tokens, windows, the ring column and the
  repetition-penalty mask stay on the device; the sampler
  (:func:`client.generation.sampling.draw`, top-k-prefiltered exact top-p, uniforms from
  a seeded generator) runs inside the step. A step costs one device-to-host
  copy (tokens and "exact" flags); a rare row whose nucleus is wider than the
  candidates is redrawn with a full sort.
- **Compiled, cached.** On CUDA the step is compiled with
  ``mode="reduce-overhead"`` (CUDA graphs) and the prefill with the default
  mode; both, and the ring, are cached on the model across calls
  (:func:`release_engines` drops them). On CPU they run eagerly.
- **Merged LoRA.** A PEFT adapter is merged into the base weights for the run
  (no extra LoRA matmuls per layer) and the caller's exact weights are restored
  afterwards (:func:`merged_lora`).

Families: llama, qwen2, qwen3 (full attention). Qwen3.5's linear-attention
layers keep a recurrent state that a ring cache cannot hold, and
sliding-window layers are not handled: :func:`unsupported_reason` says why,
and :mod:`client.generation.generate` falls back to plain ``model.generate`` for them.

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

from client.generation.decode_engine import (
    RING_BUCKET,
    WIDTH_BUCKET,
    Engine,
    cached_engine,
    group_size,
    release_engines,
    round_up,
)
from client.generation.ring_decoder import parts_problem
from client.generation.sampling import DEFAULT_CANDIDATES, redraw_rows
from client.model import eos_token_ids
from shared.run_config import GenerateConfig

__all__ = ["generate_texts", "generate_token_ids", "merged_lora", "release_engines",
           "unsupported_reason"]  # fmt: skip


def unsupported_reason(model: Any) -> str | None:
    """Why the fast path cannot run ``model`` (``None`` when it can)."""
    return parts_problem(_unwrap_all(model))


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
    the next pending prompt, all slots freed by one step in one prefill.
    ``compile=None`` compiles the decode step and prefill on CUDA only; the
    compiled graphs and the ring are cached on ``model`` across calls with the
    same slots, bucketed ring length and sampling settings (see
    :func:`release_engines`). ``on_done(n)`` is called with the number of
    finished prompts whenever it grows. ``stats`` (optional) receives ``steps``
    (decode steps), ``prefills`` (refill groups), ``refill_rows``,
    ``full_sort_rows`` and ``engine_reused`` (1 when the cached graphs were
    used). The model must be a plain transformers model (see
    :func:`merged_lora`) of a family :func:`unsupported_reason` accepts.
    """
    reason = unsupported_reason(model)
    if reason is not None:
        raise ValueError(f"fast generation does not support this model: {reason}")
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = next(model.parameters()).device
    slots = min(batch_size, len(prompts))
    length = round_up(round_up(max(len(p) for p in prompts), WIDTH_BUCKET) + max_new_tokens,
                       RING_BUCKET)  # fmt: skip
    sampler = dict(temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
                   candidates=int(candidates))  # fmt: skip
    penalty = float(repetition_penalty)
    use_compile = device.type == "cuda" if compile is None else bool(compile)
    key = (slots, length, tuple(sorted(sampler.items())), penalty, use_compile, device,
           next(model.parameters()).dtype)  # fmt: skip
    engine, reused = cached_engine(
        model, key, lambda: Engine(model, slots, length, sampler, penalty, use_compile)
    )
    engine.reset()
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    stats = stats if stats is not None else {}
    stats.update(steps=0, prefills=0, refill_rows=0, engine_reused=int(reused),
                 full_sort_rows=stats.get("full_sort_rows", 0))  # fmt: skip
    eos_ids = set([] if eos_token_id is None else
                  [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))  # fmt: skip
    pin = device.type == "cuda"
    host = torch.zeros(2, slots, dtype=torch.long, pin_memory=pin)

    def fetch(packed: torch.Tensor, scores: torch.Tensor, rows: list[int], n: int) -> list[int]:
        # The one device-to-host copy of a step (or refill): tokens and exact flags.
        out = host[:, :n]
        out.copy_(packed[:, :n], non_blocking=True)
        if pin:
            torch.cuda.current_stream(device).synchronize()
        tokens, exact = out[0].tolist(), out[1].tolist()
        redo = [i for i in range(n) if not exact[i]]
        if redo:  # rare: a nucleus wider than the candidates, redrawn exactly with a full sort
            fixed = redraw_rows(scores[redo], temperature=sampler["temperature"],
                                top_p=sampler["top_p"], generator=generator, stats=stats)  # fmt: skip
            engine.cur[torch.tensor([rows[i] for i in redo], device=device)] = fixed
            for i, tok in zip(redo, fixed.tolist(), strict=True):
                tokens[i] = tok
        return tokens

    pending = deque(range(len(prompts)))
    job = [-1] * slots  # prompt index held by each slot, -1 when empty
    outputs: list[list[int]] = [[] for _ in prompts]

    def record(rows: list[int], tokens: list[int]) -> list[int]:
        # Append each row's new token; return the rows that ended with it.
        ended = []
        for s, tok in zip(rows, tokens, strict=True):
            outputs[job[s]].append(tok)
            if len(outputs[job[s]]) >= max_new_tokens or tok in eos_ids:
                ended.append(s)
        return ended

    def refill(free: list[int]) -> list[int]:
        # One prefill for every free slot (group padded to a bucket, extra entries aimed
        # at the scratch row), one scatter of all layers' keys/values into the ring.
        take = [pending.popleft() for _ in free[: len(pending)]]
        free = free[: len(take)]
        group = group_size(len(take), slots)
        width = round_up(max(len(prompts[j]) for j in take), WIDTH_BUCKET)
        entries = [[p[0]] * (width - len(p)) + list(p) + [s, len(p)]
                   for s, p in ((s, prompts[j]) for s, j in zip(free, take, strict=True))]  # fmt: skip
        entries += [[pad_token_id] * width + [slots, 1]] * (group - len(take))
        packed = torch.tensor(entries, dtype=torch.long, pin_memory=pin)
        engine.uniforms[:group].uniform_(generator=generator)
        out, scores = engine.prefill(packed.to(device, non_blocking=True))
        for s, j in zip(free, take, strict=True):
            job[s] = j
        stats["prefills"] += 1
        stats["refill_rows"] += len(take)
        return record(free, fetch(out, scores, free, len(take)))

    done = 0
    ended = refill(list(range(slots)))
    while True:
        while ended:
            for s in ended:
                job[s] = -1
            done += len(ended)
            if on_done is not None:
                on_done(done)
            refilled = refill(ended) if pending else []
            idle = [s for s in ended if job[s] < 0]
            if idle:
                engine.active[torch.tensor(idle, device=device)] = False
            ended = refilled
        live = [s for s in range(slots) if job[s] >= 0]
        if not live:
            break
        engine.uniforms[:slots].uniform_(generator=generator)
        if engine.compiled:
            torch.compiler.cudagraph_mark_step_begin()
        packed, scores = engine.step()
        stats["steps"] += 1
        tokens = fetch(packed, scores, list(range(slots)), slots)
        ended = record(live, [tokens[s] for s in live])
    return outputs


def generate_texts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    sampling: GenerateConfig,
    batch_size: int,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Decoded new text (special tokens skipped) for each prompt string, in order.

    ``sampling`` is the run's :class:`shared.run_config.GenerateConfig`; a PEFT adapter
    on ``model`` is merged for the run and the caller's weights restored
    (:func:`merged_lora`). ``progress(done, total)`` counts finished prompts.
    """
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    total = len(prompts)
    was_training = model.training
    model.eval()
    try:
        with merged_lora(model) as plain:
            try:
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
                    eos_token_id=eos_token_ids(model, tokenizer),  # generation_config's list too
                    pad_token_id=tokenizer.pad_token_id,
                    on_done=None if progress is None else (lambda done: progress(done, total)),
                )
            except BaseException:
                release_engines(plain)  # a failed run must not keep its ring and graphs alive
                raise
    finally:
        if was_training:
            model.train()
    return tokenizer.batch_decode(new, skip_special_tokens=True)
