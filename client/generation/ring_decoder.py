"""A decoder forward pass over a static ring KV cache, built from the model's own modules.

:mod:`client.generation.fast` decodes with this instead of calling the
transformers model: the projections, norms, MLPs, rotary embedding and LM
head are the model's own modules (so a merged LoRA adapter and any RoPE
scaling are used as they are), but the attention, the cache and the masks are
ours. That removes two problems of going through ``model(..., cache=...)``:

- **Version plumbing.** The cache keyword (``past_key_values`` before
  transformers 5.25, ``cache`` after) and the output field holding it change
  between releases; nothing here depends on either.
- **Grouped-query attention.** With a 4-D mask, transformers' SDPA path under
  ``torch.compile`` expands K/V to every query head (``repeat_kv``), reading
  ``n_heads / n_kv_heads`` times the K/V bytes. :func:`attend` instead groups
  the query heads that share a K/V head (``[B, H_kv, n_rep * S, d]``), so each
  K/V head is read once.

The ring: keys/values of every layer live in one tensor ``kv`` of shape
``[layers, 2, slots + 1, H_kv, L, d]`` (row ``slots`` is scratch, the target
of padded prefill rows). Keys are stored already rotated, so the column order
of the ring does not matter to attention; a row attends to the columns its
mask allows. Families: llama, qwen2, qwen3 (full attention only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

FAMILIES = ("llama", "qwen2", "qwen3")


@dataclass(frozen=True)
class Parts:
    """The modules and head geometry a ring forward pass needs."""

    embed: Any
    layers: tuple[Any, ...]
    norm: Any
    lm_head: Any
    rotary: Any
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float
    qk_norm: bool


def parts_problem(model: Any) -> str | None:
    """Why :func:`model_parts` cannot take ``model`` apart (``None`` when it can)."""
    config = getattr(model, "config", None)
    if config is None:
        return f"{type(model).__name__} has no config"
    types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if types != {"full_attention"}:
        return f"layer types {sorted(types)} (only full-attention layers fit the ring cache)"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "sliding-window attention"
    kind = getattr(config, "model_type", None)
    if kind not in FAMILIES:
        return f"model type {kind!r} (the ring decoder knows {', '.join(FAMILIES)})"
    inner = getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    missing = [n for n in needed if not hasattr(inner, n)]
    if missing or not hasattr(model, "lm_head"):
        return f"{type(model).__name__} lacks {missing or ['lm_head']}"
    attn = ("q_proj", "k_proj", "v_proj", "o_proj")
    for layer in inner.layers:
        sa = getattr(layer, "self_attn", None)
        if sa is None or not all(hasattr(sa, n) for n in attn):
            return f"{type(layer).__name__} has no q/k/v/o projections"
    return None


def model_parts(model: Any) -> Parts:
    """The modules of a plain transformers model of a family in :data:`FAMILIES`."""
    problem = parts_problem(model)
    if problem is not None:
        raise ValueError(f"the ring decoder cannot run this model: {problem}")
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    first = model.model.layers[0].self_attn
    return Parts(
        embed=model.model.embed_tokens,
        layers=tuple(model.model.layers),
        norm=model.model.norm,
        lm_head=model.lm_head,
        rotary=model.model.rotary_emb,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        scaling=float(getattr(first, "scaling", head_dim**-0.5)),
        qk_norm=hasattr(first, "q_norm") and hasattr(first, "k_norm"),
    )


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _qkv(parts: Parts, layer: Any, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    # h: [n, S, hidden] -> q [n, H, S, d], k and v [n, H_kv, S, d], q and k rotated.
    n, s, _ = h.shape
    sa = layer.self_attn
    q = sa.q_proj(h).view(n, s, parts.heads, parts.head_dim)
    k = sa.k_proj(h).view(n, s, parts.kv_heads, parts.head_dim)
    v = sa.v_proj(h).view(n, s, parts.kv_heads, parts.head_dim).transpose(1, 2)
    if parts.qk_norm:  # qwen3: RMS norm over each head, before RoPE
        q, k = sa.q_norm(q), sa.k_norm(k)
    return _rotate(q.transpose(1, 2), cos, sin), _rotate(k.transpose(1, 2), cos, sin), v


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Grouped-query attention reading each K/V head once.

    ``q`` ``[n, H, S, d]``; ``k``, ``v`` ``[n, H_kv, T, d]``; ``mask`` ``[n, S, T]``
    bool (True: attend; every row needs one True). Query head ``h`` uses K/V
    head ``h // (H / H_kv)``, as ``repeat_kv`` does; the query heads of a group
    are stacked along the query axis, so SDPA sees ``H_kv`` heads, not ``H``.
    Returns ``[n, H, S, d]``.
    """
    n, heads, s, d = q.shape
    rep = heads // k.shape[1]
    grouped = q.reshape(n, k.shape[1], rep * s, d)
    m = mask[:, None] if rep == 1 else mask[:, None].repeat(1, 1, rep, 1)
    out = torch.nn.functional.scaled_dot_product_attention(
        grouped, k, v, attn_mask=m, scale=scaling
    )
    return out.reshape(n, heads, s, d)


def _block(parts: Parts, layer: Any, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    n, s, _ = x.shape
    x = x + layer.self_attn.o_proj(attn_out.transpose(1, 2).reshape(n, s, -1))
    return x + layer.mlp(layer.post_attention_layernorm(x))


def decode(
    parts: Parts,
    kv: torch.Tensor,
    ids: torch.Tensor,
    positions: torch.Tensor,
    column: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """One token per row: logits ``[B, V]``; writes each row's K/V at ring ``column``.

    ``ids``, ``positions``: ``[B]`` (rows ``0..B-1`` of the ring); ``column``:
    ``[1]`` long; ``mask``: ``[B, L]`` bool, the ring columns each row attends to
    (the written column included).
    """
    b = ids.shape[0]
    x = parts.embed(ids[:, None])
    cos, sin = parts.rotary(x, positions[:, None])
    cos, sin = cos[:, None], sin[:, None]
    mask = mask[:, None, :]
    for i, layer in enumerate(parts.layers):
        q, k, v = _qkv(parts, layer, layer.input_layernorm(x), cos, sin)
        keys, values = kv[i, 0, :b], kv[i, 1, :b]
        keys.index_copy_(2, column, k)
        values.index_copy_(2, column, v)
        x = _block(parts, layer, x, attend(q, keys, values, mask, parts.scaling))
    return parts.lm_head(parts.norm(x))[:, 0]


def prefill(
    parts: Parts,
    kv: torch.Tensor,
    ids: torch.Tensor,
    lengths: torch.Tensor,
    rows: torch.Tensor,
    columns: torch.Tensor,
) -> torch.Tensor:
    """Left-padded prompts ``ids`` ``[n, W]``: last-token logits ``[n, V]``.

    Row ``i`` holds ``lengths[i]`` real tokens at its right end. Its keys/values
    (all ``W``, pads included: the decode mask never reaches them) are written
    to ring row ``rows[i]`` at ``columns`` ``[W]``, all layers in one scatter.
    Padded query positions also attend to themselves, so no softmax row is empty.
    """
    n, w = ids.shape
    pos = torch.arange(w, device=ids.device)
    real = pos[None, :] >= (w - lengths)[:, None]  # [n, W]
    positions = (pos[None, :] - (w - lengths)[:, None]).clamp(min=0)
    x = parts.embed(ids)
    cos, sin = parts.rotary(x, positions)
    cos, sin = cos[:, None], sin[:, None]
    causal = pos[None, :] <= pos[:, None]
    mask = (causal[None] & real[:, None, :]) | torch.eye(w, dtype=torch.bool, device=ids.device)
    fresh = []
    for layer in parts.layers:
        q, k, v = _qkv(parts, layer, layer.input_layernorm(x), cos, sin)
        fresh.append(torch.stack((k, v)))
        x = _block(parts, layer, x, attend(q, k, v, mask, parts.scaling))
    # [layers, 2, n, H_kv, W, d] -> ring rows x columns, one scatter for every layer.
    stacked = torch.stack(fresh).permute(2, 4, 0, 1, 3, 5)
    kv.permute(2, 4, 0, 1, 3, 5).index_put_((rows[:, None], columns[None, :]), stacked)
    return parts.lm_head(parts.norm(x[:, -1]))
