"""Book-keeping (BK) DP-SGD for LoRA adapters: per-patient clipping in one backward pass.

Opacus' ``hooks`` mode wraps the whole model in a ``GradSampleModule`` (hooks on
every module, frozen ones included); its ``ghost`` mode needs a second backward
pass. For a PEFT LoRA model neither is needed: every trainable tensor is the
weight of a small ``nn.Linear`` (``lora_A[...]``: r x d_in, ``lora_B[...]``:
d_out x r), and the per-sample gradient of a Linear weight for row ``i`` is
``G_i = sum_t g_{i,t} a_{i,t}^T`` (``a``: the layer's input, ``g``: the
gradient at its output). So :class:`LoraBookkeeping` hooks only those Linears,
records ``a`` in the forward pass and ``g`` in the ONE backward pass, and builds
per-sample norms and the clipped sum from them -- no second backward, no
per-sample gradients of frozen weights.

Inside the context the LoRA weights are set ``requires_grad=False`` and each
LoRA Linear's output is made to require grad instead: autograd then still
delivers ``g`` to the hooks and the input gradients to earlier layers, but never
computes the (non-private) summed weight gradient, so ``p.grad`` holds only what
:meth:`LoraBookkeeping.accumulate_clipped` writes. The flags are restored on
exit, exceptions included.

Scaling (the privacy-critical convention): backpropagate ``per_patient.sum()``
where ``per_patient[i]`` is row ``i``'s own loss (the mean over its report
tokens). Rows of a transformer batch do not interact, so ``G_i`` is then exactly
the gradient of patient ``i``'s loss -- the same per-sample gradient Opacus
clips (it rescales a mean loss by the batch size). Backpropagating a MEAN would
shrink every ``G_i`` by the physical batch size and silently raise the
effective clipping bound to ``B * max_grad_norm``; nothing here can detect that.

Clipping matches Opacus 1.6 ``DPOptimizer.clip_and_accumulate`` (flat): the
per-patient norm is the L2 norm over all LoRA tensors together and the clip
factor is ``min(1, C / (norm + 1e-6))``. Noise matches ``add_noise`` +
``scale_grad`` (``loss_reduction="mean"``): ``N(0, (sigma*C)^2)`` per coordinate
on the clipped sum, drawn from the round's secret source
(:class:`client.dp.noise.GaussianNoise`, the same one the Opacus paths use) in
parameter order, then a division by the expected (not the realised) logical
batch size.

Per layer, ``G_i`` is either materialised or its norm is taken with the ghost
identity ``||G_i||^2 = sum_{t,s} (a_t.a_s)(g_t.g_s)`` (see :func:`_use_ghost`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, TypedDict, Unpack

import torch

from client.dp.noise import GaussianNoise
from shared.errors import ConfigError, Problem, TrainingError

Strategy = Literal["auto", "materialize", "ghost"]
STRATEGIES = ("auto", "materialize", "ghost")
_EPS = 1e-6  # Opacus' flat clipping: C / (norm + 1e-6)


def _use_ghost(tokens: int, d_in: int, d_out: int) -> bool:
    """Per-layer choice, by retained memory per row (in elements).

    Materialising keeps ``G_i``: ``d_in * d_out``. The ghost norm needs the
    Gram matrices (``T^2``) and, because BK builds the clipped sum from the same
    pass, must keep ``a`` and ``g`` until clipping: ``T * (d_in + d_out)``.
    Ghost is chosen only when that is smaller. In flops ghost never wins (its
    clipped sum costs the same ``T*d_in*d_out`` as materialising, plus the Gram
    matrices), so for LoRA (one side is r) materialising is used unless the
    sequence is about as short as r.
    """
    return tokens * (d_in + d_out) + tokens * tokens < d_in * d_out


@dataclass
class _Layer:
    """Records of one LoRA Linear for the current physical batch."""

    name: str
    module: torch.nn.Linear
    ghost: bool | None = None  # decided at its first call in a physical batch
    grad_sample: torch.Tensor | None = None  # (B, d_out, d_in), materialised path
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # ghost (a, g)

    def reset(self) -> None:
        self.ghost, self.grad_sample, self.pairs = None, None, []


class LoraBookkeeping:
    """Context manager: per-patient LoRA gradient norms and clipped sums, one backward.

    ``model`` is a PEFT LoRA model whose only trainable tensors are the weights
    of its ``lora_A``/``lora_B`` Linears; anything else trainable (biases,
    DoRA magnitudes, embeddings, ...) is refused with :class:`ConfigError`.
    ``strategy`` forces the per-layer norm method ("auto": :func:`_use_ghost`).

    Use per physical batch: forward, ``per_patient.sum().backward()``, then
    :meth:`accumulate_clipped`; after the logical batch, :func:`noisy_step`.
    """

    def __init__(self, model: torch.nn.Module, *, strategy: Strategy = "auto") -> None:
        problems = []
        if strategy not in STRATEGIES:
            problems.append(Problem("strategy", f"must be one of {STRATEGIES}, got {strategy!r}"))
        layers: list[_Layer] = []
        owned: set[int] = set()
        for name, module in model.named_modules():
            parts = name.split(".")
            if not (isinstance(module, torch.nn.Linear) and len(parts) >= 2):
                continue
            if parts[-2] in ("lora_A", "lora_B") and module.weight.requires_grad:
                layers.append(_Layer(name, module))
                owned.add(id(module.weight))
        for name, p in model.named_parameters():
            if p.requires_grad and id(p) not in owned:
                problems.append(
                    Problem(
                        name,
                        "trainable but not a lora_A/lora_B Linear weight (BK clips only those)",
                    )
                )
        if not layers:
            problems.append(Problem("model", "has no trainable lora_A/lora_B Linear weights"))
        if problems:
            raise ConfigError("model cannot be trained with book-keeping DP clipping", problems)
        self.model = model
        self.strategy = strategy
        self.layers = layers
        self._handles: list[Any] = []
        self._flags: list[bool] = []

    @property
    def params(self) -> list[torch.nn.Parameter]:
        """The LoRA weights, in the model's module order (the order noise is drawn in)."""
        return [layer.module.weight for layer in self.layers]

    # -- hooks ---------------------------------------------------------------

    def __enter__(self) -> LoraBookkeeping:
        if self._handles:
            raise TrainingError("LoraBookkeeping is already active (nested use of one instance)")
        try:
            for layer in self.layers:
                self._handles.append(
                    layer.module.register_forward_hook(partial(self._on_forward, layer))
                )
            self._flags = [p.requires_grad for p in self.params]
            for p in self.params:
                p.requires_grad_(False)
        except BaseException:
            self._detach()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._detach()

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for p, flag in zip(self.params, self._flags, strict=False):
            p.requires_grad_(flag)
        self._flags = []
        for layer in self.layers:
            layer.reset()

    def _on_forward(self, layer: _Layer, module: torch.nn.Module, args: tuple, output: Any) -> None:
        # Recorded whenever autograd is on (train or eval mode: eval only turns
        # dropout off); under no_grad / inference_mode nothing is recorded.
        if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor)):
            return
        if not output.requires_grad:
            output.requires_grad_()  # a leaf: lets g reach us although the weight needs no grad
        activation = args[0].detach()
        output.register_hook(partial(self._on_grad, layer, activation))

    def _on_grad(self, layer: _Layer, activation: torch.Tensor, grad: torch.Tensor) -> None:
        a, g = activation, grad.detach()
        if a.dim() == 2:  # (B, d): one token per row
            a, g = a.unsqueeze(1), g.unsqueeze(1)
        if a.dim() != 3:
            raise TrainingError(
                f"{layer.name}: expected a (batch, tokens, features) input, got {tuple(a.shape)}"
            )
        w = layer.module.weight
        a, g = a.to(w.dtype), g.to(w.dtype)
        if layer.ghost is None:
            layer.ghost = {
                "auto": _use_ghost(a.shape[1], a.shape[2], g.shape[2]),
                "ghost": True,
                "materialize": False,
            }[self.strategy]
        if layer.ghost:
            layer.pairs.append((a, g))
        else:
            gs = torch.einsum("bto,bti->boi", g, a)
            layer.grad_sample = gs if layer.grad_sample is None else layer.grad_sample + gs

    # -- norms and clipping --------------------------------------------------

    def _batch_size(self) -> int:
        sizes = {
            layer.grad_sample.shape[0] for layer in self.layers if layer.grad_sample is not None
        }
        sizes |= {a.shape[0] for layer in self.layers for a, _ in layer.pairs}
        if not sizes:
            raise TrainingError(
                "no per-sample gradients recorded: run the forward pass in training mode inside the "
                "LoraBookkeeping context and call per_patient.sum().backward() before clipping"
            )
        if len(sizes) > 1:
            raise TrainingError(
                f"LoRA layers saw different batch sizes {sorted(sizes)} in one physical batch"
            )
        return sizes.pop()

    def per_sample_norms(self) -> torch.Tensor:
        """L2 norm of each row's whole LoRA gradient (all tensors together), shape (B,), float32.

        Computed from private data without noise: for clipping and local
        diagnostics only, never to be released.
        """
        batch = self._batch_size()
        device = self.params[0].device
        squared = torch.zeros(batch, dtype=torch.float32, device=device)
        for layer in self.layers:
            if layer.grad_sample is not None:
                squared += layer.grad_sample.float().reshape(batch, -1).pow(2).sum(1)
            elif layer.pairs:
                # Several calls of one layer add their tokens: concatenate along T.
                a = torch.cat([a for a, _ in layer.pairs], dim=1).float()
                g = torch.cat([g for _, g in layer.pairs], dim=1).float()
                squared += torch.einsum("bts,bts->b", a @ a.transpose(1, 2), g @ g.transpose(1, 2))
        return squared.clamp(min=0).sqrt()

    def accumulate_clipped(self, *, max_grad_norm: float) -> torch.Tensor:
        """Add ``sum_i c_i G_i`` (``c_i = min(1, C / (norm_i + 1e-6))``) to each LoRA ``p.grad``.

        ``max_grad_norm`` is C, the per-patient L2 bound of the whole adapter
        gradient (the DP sensitivity). Accumulates across the physical batches
        of one logical batch; clears this batch's records. Returns the
        per-patient norms before clipping (local diagnostics only).
        """
        problems = _check_positive("max_grad_norm", max_grad_norm)
        if problems:
            raise ConfigError("invalid clipping bound", problems)
        norms = self.per_sample_norms()
        factors = (max_grad_norm / (norms + _EPS)).clamp(max=1.0)
        for layer in self.layers:
            w = layer.module.weight
            c = factors.to(w.dtype)
            if layer.grad_sample is not None:
                clipped = torch.einsum("b,boi->oi", c, layer.grad_sample)
            elif layer.pairs:
                clipped = sum(
                    torch.einsum("bto,bti->oi", g * c[:, None, None], a) for a, g in layer.pairs
                )
            else:  # this layer did not reach the loss: zero gradient
                clipped = torch.zeros_like(w)
            w.grad = clipped if w.grad is None else w.grad + clipped
            layer.reset()
        return norms.detach()


def _check_positive(
    name: str, value: Any, *, zero_ok: bool = False, integer: bool = False
) -> list[Problem]:
    kind = int if integer else (int, float)
    ok = (
        not isinstance(value, bool)
        and isinstance(value, kind)
        and math.isfinite(value)
        and (value >= 0 if zero_ok else value > 0)
    )
    if ok:
        return []
    what = f"a finite {'integer' if integer else 'number'} {'>= 0' if zero_ok else '> 0'}"
    return [Problem(name, f"must be {what}, got {value!r}")]


def add_noise(
    params: Sequence[torch.nn.Parameter],
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: int,
    noise: GaussianNoise,
) -> None:
    """Turn each ``p.grad`` (the clipped sum; ``None`` = empty batch = zeros) into the DP gradient.

    ``p.grad <- (clipped_sum + N(0, (noise_multiplier * max_grad_norm)^2)) / expected_batch_size``,
    the noise being this step's draw from ``noise`` (the round's secret source,
    built for ``params`` in this order with std ``noise_multiplier * max_grad_norm``).
    The divisor is the expected logical batch in patients, never the realised
    one (which would leak the batch size).
    """
    problems = _check_positive("noise_multiplier", noise_multiplier, zero_ok=True)
    problems += _check_positive("max_grad_norm", max_grad_norm)
    problems += _check_positive("expected_batch_size", expected_batch_size, integer=True)
    if not params:
        problems.append(Problem("params", "no parameters to step"))
    if not problems:
        std = float(noise_multiplier) * float(max_grad_norm)
        if not math.isclose(noise.std, std, rel_tol=1e-12, abs_tol=0.0):
            problems.append(Problem("noise", f"draws std {noise.std!r}, not sigma * C = {std!r}"))
        if [p.shape for p in params] != noise.shapes:
            problems.append(Problem("noise", "was built for other parameter shapes"))
    if problems:
        raise ConfigError("invalid DP noise settings", problems)
    for p, z in zip(params, noise.draw(), strict=True):
        summed = p.grad if p.grad is not None else torch.zeros_like(p)
        p.grad = (summed + z.to(summed.dtype)).view_as(p) / expected_batch_size


class NoiseKnobs(TypedDict):
    """:func:`add_noise`'s keyword arguments, as :func:`noisy_step` passes them on."""

    noise_multiplier: float  # sigma
    max_grad_norm: float  # C, the per-patient clipping bound
    expected_batch_size: int  # the divisor, in patients
    noise: GaussianNoise  # the round's secret source, std sigma * C


def noisy_step(
    optimizer: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter], **knobs: Unpack[NoiseKnobs]
) -> None:
    """End one logical batch: :func:`add_noise` (with ``knobs``), ``optimizer.step()``, then clear ``p.grad``.

    Works for an empty Poisson batch too (no ``p.grad``: an all-noise step).
    The caller charges the accountant once per call (``accountant.step``).
    """
    add_noise(params, **knobs)
    optimizer.step()
    for p in params:
        p.grad = None
