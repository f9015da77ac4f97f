"""Drawing the next token from logits: greedy, temperature, top-k, exact top-p; repetition penalty.

Used by the fast decode loop (:mod:`client.fast_generate`). :func:`sample_next`
avoids sorting the whole vocabulary on every step: ``torch.topk`` on ``K``
candidates, then top-p inside them, still exact (a row whose nucleus does not
fit in ``K`` is redone with a full sort). These functions only shape the
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
    ``stats["full_sort_rows"]`` counts those rows.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    scaled = logits.float() / temperature
    vocab = scaled.shape[-1]
    if top_k > 0:
        vals, idx = torch.topk(scaled, min(top_k, vocab), dim=-1)
        norm = torch.logsumexp(vals, dim=-1, keepdim=True)
        p, _ = _nucleus(vals, norm, top_p)
    elif top_p < 1:
        vals, idx = torch.topk(scaled, min(candidates, vocab), dim=-1)
        norm = torch.logsumexp(scaled, dim=-1, keepdim=True)
        p, covered = _nucleus(vals, norm, top_p)
        if vals.shape[-1] < vocab and not bool(covered.all()):
            rows = (~covered).nonzero().squeeze(1)
            if stats is not None:
                stats["full_sort_rows"] = stats.get("full_sort_rows", 0) + int(rows.numel())
            full_vals, full_idx = torch.sort(scaled[rows], dim=-1, descending=True)
            full_p, _ = _nucleus(full_vals, norm[rows], top_p)
            pick = torch.multinomial(full_p, 1, generator=generator)
            out = idx.gather(1, torch.multinomial(p, 1, generator=generator)).squeeze(1)
            out[rows] = full_idx.gather(1, pick).squeeze(1)
            return out
    else:  # plain temperature sampling over the whole vocabulary
        return torch.multinomial(torch.softmax(scaled, dim=-1), 1, generator=generator).squeeze(1)
    return idx.gather(1, torch.multinomial(p, 1, generator=generator)).squeeze(1)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """``logits`` ``[B, V]`` with the logits of ``seen`` (``[B, V]`` bool) tokens penalised.

    HF's rule: a seen token's logit is divided by ``penalty`` if positive,
    multiplied by it if negative (``penalty > 1`` discourages repeats).
    """
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)
