"""Drawing the next token from logits: greedy, temperature, top-k, exact top-p; repetition penalty.

Used by the fast decode loop (:mod:`client.generation.fast`). :func:`draw` avoids
sorting the whole vocabulary on every step: ``torch.topk`` on ``K``
candidates, then top-p inside them, and an inverse-CDF draw from uniforms the
caller supplies, so it runs inside a compiled graph with no host sync. It
flags the rows whose nucleus does not fit in ``K``; :func:`redraw_rows` redoes
those with a full sort, so the result is always exact top-p
(:func:`sample_next` does both, eagerly). These functions only shape the
distribution a token is drawn from; they add no privacy protection (the DP
guarantee comes from training, see :mod:`client.train`).
"""

from __future__ import annotations

import torch

# Candidates kept by the top-k prefilter when top_k is off. 256 covers the
# nucleus of a trained LM at top-p 0.95 on almost every step (it is usually a
# few to a few dozen tokens); a row whose nucleus is wider is redone exactly with
# a full sort, so K trades speed only, never correctness.
DEFAULT_CANDIDATES = 256


def _nucleus(
    vals: torch.Tensor, norm: torch.Tensor, top_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    # vals: [B, K] logits sorted descending; norm: [B, 1] log of the distribution's total mass.
    p = torch.exp(vals - norm)
    cum = torch.cumsum(p, dim=-1)
    if top_p < 1:
        # A token stays if the mass strictly before it is below top_p (HF's rule: the
        # smallest prefix reaching top_p, the token that crosses it included).
        keep = (cum - p) < top_p
        keep[:, 0] = True
        p = p * keep
    return p, cum[:, -1] >= top_p


def draw(
    logits: torch.Tensor,
    uniforms: torch.Tensor,
    *,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    candidates: int = DEFAULT_CANDIDATES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row of ``logits`` ``[B, V]`` by inverse CDF, without a host sync.

    ``uniforms`` ``[B]`` in ``[0, 1)`` (drawn by the caller from its generator,
    so this function can run inside a compiled graph). Returns ``(tokens [B]
    int64, exact [B] bool)``. ``exact[b]`` is False only for a top-p row (top-k
    off) whose nucleus does not fit in the ``candidates`` best tokens: its token
    was drawn from the candidates alone and must be redrawn
    (:func:`sample_next` does, with a full sort). The rules are those of
    :func:`sample_next`.
    """
    rows = logits.shape[0]
    exact = torch.ones(rows, dtype=torch.bool, device=logits.device)
    if temperature == 0:
        return logits.argmax(dim=-1), exact
    scaled = logits.float() / temperature
    vocab = scaled.shape[-1]
    idx = None
    if top_k > 0:
        vals, idx = torch.topk(scaled, min(top_k, vocab), dim=-1)
        p, _ = _nucleus(vals, torch.logsumexp(vals, dim=-1, keepdim=True), top_p)
    elif top_p < 1:
        if candidates < vocab:
            vals, idx = torch.topk(scaled, candidates, dim=-1)
        else:
            vals, idx = torch.sort(scaled, dim=-1, descending=True)
        p, exact = _nucleus(vals, torch.logsumexp(scaled, dim=-1, keepdim=True), top_p)
        exact = exact | (candidates >= vocab)
    else:  # plain temperature sampling over the whole vocabulary
        p = torch.softmax(scaled, dim=-1)
    # Inverse CDF: the first index whose cumulative mass exceeds u * total.
    cum = torch.cumsum(p, dim=-1)
    target = uniforms.to(cum.dtype)[:, None] * cum[:, -1:]
    choice = (cum <= target).sum(dim=-1).clamp(max=p.shape[-1] - 1)
    tokens = choice if idx is None else idx.gather(1, choice[:, None]).squeeze(1)
    return tokens, exact


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
    candidates: int = DEFAULT_CANDIDATES,
    stats: dict[str, int] | None = None,
) -> torch.Tensor:
    """Draw one token id per row of ``logits`` ``[B, V]`` (returns ``[B]``, int64).

    ``temperature=0`` is greedy (argmax). Otherwise the logits are divided by
    ``temperature``; ``top_k > 0`` keeps the ``top_k`` best (renormalised over
    them, as in HF); ``top_p < 1`` keeps the smallest set of best tokens whose
    probability reaches ``top_p``. Only ``K = top_k`` (or ``candidates`` when
    top-k is off) tokens are ranked, with ``torch.topk``; the probabilities are
    still normalised over the whole vocabulary (``logsumexp``, no sort). The
    result is exact top-p whenever the nucleus fits in the ``K`` candidates,
    i.e. their total probability reaches ``top_p``; rows where it does not are
    redone with a full sort, so the distribution is always exact top-p.
    ``stats["full_sort_rows"]`` counts those rows. Eager helper: it reads one
    flag on the host to decide on the redo; the decode loop calls :func:`draw`
    in its graph and redoes rows with :func:`redraw_rows` only when needed.
    """
    uniforms = torch.rand(logits.shape[0], generator=generator, device=logits.device)
    tokens, exact = draw(
        logits, uniforms, temperature=temperature, top_p=top_p, top_k=top_k, candidates=candidates
    )
    if not bool(exact.all()):
        rows = (~exact).nonzero().squeeze(1)
        tokens[rows] = redraw_rows(logits[rows], temperature=temperature, top_p=top_p,
                                   generator=generator, stats=stats)  # fmt: skip
    return tokens


def redraw_rows(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None = None,
    stats: dict[str, int] | None = None,
) -> torch.Tensor:
    """Exact top-p draw with a full sort, for the rows :func:`draw` flagged (``[R, V]`` -> ``[R]``)."""
    if stats is not None:
        stats["full_sort_rows"] = stats.get("full_sort_rows", 0) + int(logits.shape[0])
    uniforms = torch.rand(logits.shape[0], generator=generator, device=logits.device)
    tokens, _ = draw(
        logits, uniforms, temperature=temperature, top_p=top_p, candidates=logits.shape[-1]
    )
    return tokens


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """``logits`` ``[B, V]`` with the logits of ``seen`` (``[B, V]`` bool) tokens penalised.

    HF's rule: a seen token's logit is divided by ``penalty`` if positive,
    multiplied by it if negative (``penalty > 1`` discourages repeats).
    """
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)
