"""ICD-10-conditioned generation of synthetic reports (zero-shot or with an adapter).

The prompt is :func:`client.prompt.build_prompt`, the same one DP fine-tuning
trains on. Generation is batched with left padding and the KV cache, only the
new tokens are decoded, and DeepSeek-R1 style ``<think>`` traces are removed.

Synthetic reports stay on the site: they carry their provenance (model,
adapter hash, sampling settings, seed) and are written to local JSONL by
:mod:`client.generation.reports`; they never cross the wire, only metric
summaries computed from them do.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from client.generation.reports import SETTINGS, SyntheticReport
from client.model import eos_token_ids
from client.prompt import build_prompt, opens_reasoning
from shared import icd10
from shared.errors import ConfigError, Problem
from shared.run_config import MAX_NEW_TOKENS, GenerateConfig

_log = logging.getLogger(__name__)

MAX_NEW_TOKENS_LIMIT = MAX_NEW_TOKENS  # the run config's range, one definition


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# The provenance written with each report: how its tokens were drawn (GenerateConfig's
# sampling fields; reports_per_code and codes describe the request, not the draw).
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens", "seed")


def check_sampling(sampling: GenerateConfig) -> None:
    """Raise one :class:`ConfigError` listing every sampling knob generation cannot use.

    ``temperature=0`` means greedy decoding; ``top_p`` is nucleus mass in (0, 1];
    ``top_k=0`` disables top-k; ``repetition_penalty`` > 1 discourages repeats
    (1 = off); ``max_new_tokens`` bounds each report's length in tokens; ``seed``
    makes a run reproducible for a given batch size. These are generation's own
    limits: a site-drawn evaluation seed may exceed the run config's seed range.
    """
    s = sampling
    problems = []
    if not _is_number(s.temperature) or not 0 <= s.temperature <= 100:
        problems.append(Problem("temperature", f"must be a number in [0, 100], got {s.temperature!r}"))
    if not _is_number(s.top_p) or not 0 < s.top_p <= 1:
        problems.append(Problem("top_p", f"must be in (0, 1], got {s.top_p!r}"))
    if not _is_int(s.top_k) or s.top_k < 0:
        problems.append(Problem("top_k", f"must be an integer >= 0, got {s.top_k!r}"))
    if not _is_number(s.repetition_penalty) or not 0 < s.repetition_penalty <= 10:
        problems.append(Problem("repetition_penalty", f"must be in (0, 10], got {s.repetition_penalty!r}"))
    if not _is_int(s.max_new_tokens) or not 1 <= s.max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
        problems.append(Problem(
            "max_new_tokens", f"must be an integer in [1, {MAX_NEW_TOKENS_LIMIT}], got {s.max_new_tokens!r}"
        ))
    if not _is_int(s.seed) or not 0 <= s.seed < 2**63:
        problems.append(Problem("seed", f"must be an integer in [0, 2**63), got {s.seed!r}"))
    if problems:
        raise ConfigError("invalid sampling settings", problems)


_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)


def strip_reasoning(text: str) -> str:
    """Remove ``<think>...</think>`` reasoning traces and surrounding whitespace.

    Also handles a trace whose opening tag was part of the prompt (text starts
    inside the trace and only ``</think>`` appears) and an unterminated
    leading ``<think>`` (generation cut off mid-trace: nothing is left).
    """
    text = _THINK_BLOCK.sub("", text)
    close = text.find("</think>")
    if close != -1 and "<think>" not in text[:close]:
        text = text[close + len("</think>") :]
    open_at = text.find("<think>")
    if open_at != -1:
        # A trace that never closed (generation cut off) is reasoning, not report.
        text = text[:open_at]
    return text.strip()


def report_after_reasoning(text: str) -> str | None:
    """The report in the output of a prompt that opened a ``<think>`` block.

    Only what follows the closing ``</think>`` is report; ``None`` when the
    trace never closed (cut off at ``max_new_tokens``): a half-finished trace
    is reasoning, never a report.
    """
    close = text.find("</think>")
    if close == -1:
        return None
    return strip_reasoning(text[close + len("</think>") :])


def _report_id(model_id: str, adapter_hash: str | None, setting: str, seed: int, code: str, k: int) -> str:
    digest = hashlib.sha256(
        json.dumps([model_id, adapter_hash, setting, seed, code, k]).encode()
    ).hexdigest()[:12]
    return f"{code}-{k:04d}-{digest}"


def _validate_request(
    codes: Sequence[str], n_per_code: int, batch_size: int, setting: str, model_id: str, adapter_hash: str | None
) -> list[str]:
    problems = []
    canon: list[str] = []
    if isinstance(codes, str) or not codes:
        problems.append(Problem("codes", "must be a non-empty sequence of ICD-10 codes"))
    else:
        for code in codes:
            if icd10.is_code(code):
                canon.append(icd10.normalize(code))
            else:
                problems.append(Problem("codes", f"unknown ICD-10 code {code!r}"))
    if not _is_int(n_per_code) or n_per_code < 1:
        problems.append(Problem("n_per_code", f"must be an integer >= 1, got {n_per_code!r}"))
    if not _is_int(batch_size) or batch_size < 1:
        problems.append(Problem("batch_size", f"must be an integer >= 1, got {batch_size!r}"))
    if setting not in SETTINGS:
        problems.append(Problem("setting", f"must be one of {SETTINGS}, got {setting!r}"))
    if setting == "adapter" and not adapter_hash:
        problems.append(Problem("adapter_hash", "required for the 'adapter' setting"))
    if setting == "zero-shot" and adapter_hash is not None:
        problems.append(Problem("adapter_hash", "must be None for the 'zero-shot' setting"))
    if not isinstance(model_id, str) or not model_id:
        problems.append(Problem("model_id", "must be a non-empty string"))
    if problems:
        raise ConfigError("invalid generation request", problems)
    return canon


GPU_BATCH_SIZE = 64  # decode slots on CUDA: decode is weight-read bound up to ~64 rows
CPU_BATCH_SIZE = 16


def generation_batch_size(configured: int | None, device: str) -> int:
    """Decode slots for site generation: the site's setting, else a default for ``device``.

    ``configured`` is ``SiteSettings.generation_batch_size`` (``None``: not set);
    ``device`` is the resolved device (``"cuda"`` or ``"cpu"``).
    """
    if configured is not None:
        return configured
    return GPU_BATCH_SIZE if device == "cuda" else CPU_BATCH_SIZE


def _model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def generate_reports(
    model: Any,
    tokenizer: Any,
    codes: Sequence[str],
    *,
    n_per_code: int,
    sampling: GenerateConfig,
    batch_size: int | None = 16,
    setting: Literal["zero-shot", "adapter"],
    model_id: str,
    adapter_hash: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    fast: bool = False,
) -> list[SyntheticReport]:
    """Generate ``n_per_code`` reports for each code, in code order.

    ``sampling`` is the run's :class:`GenerateConfig` (its ``codes`` and
    ``reports_per_code`` are not read here: ``codes`` and ``n_per_code`` are);
    invalid knobs raise one :class:`ConfigError` (:func:`check_sampling`).

    Each batch reseeds a forked RNG with ``sampling.seed`` and the batch index,
    so a run is reproducible for a given seed and batch size without touching
    the caller's RNG state. ``progress(done, total)`` is called after each batch.

    ``batch_size`` is the number of prompts decoded at once (the fast path's
    slots); ``None`` picks :func:`generation_batch_size`'s default for the
    model's device (64 on CUDA, 16 on CPU).

    ``fast=True`` uses :mod:`client.generation.fast` (static ring KV cache,
    continuous refill of ``batch_size`` slots, compiled decode step on CUDA,
    top-k-prefiltered exact top-p, LoRA merged for the run): same prompts and
    settings, reproducible for a given seed and batch size, but a different
    random stream than the plain path. Models it cannot run (Qwen3.5's
    linear-attention layers, sliding windows) fall back to the plain path with
    a warning, and so does any exception the fast path raises (logged with its
    traceback): a fast-path bug or an incompatible library version never
    takes site generation down.

    Generation stops at any end id of the release (``generation_config.json``'s
    list as well as the tokenizer's eos). When the prompt opens a ``<think>``
    block (DeepSeek-R1-Distill), a report is only what follows ``</think>``; a
    trace still open at ``max_new_tokens`` is regenerated once with twice the
    room, and if it still does not close the report counts as failed: it is
    left out of the returned list (so fewer than ``n_per_code`` reports come
    back for that code) and a warning says how many.
    """
    check_sampling(sampling)
    batch_size = generation_batch_size(batch_size, _model_device(model).type)
    canon = _validate_request(codes, n_per_code, batch_size, setting, model_id, adapter_hash)
    if tokenizer.pad_token_id is None:
        raise ConfigError("tokenizer has no pad token", [Problem("tokenizer", "set pad_token (e.g. to eos)")])
    jobs = [(code, k) for code in canon for k in range(n_per_code)]
    prompts = {code: build_prompt(code, tokenizer) for code in dict.fromkeys(canon)}
    sampling_dict = {name: getattr(sampling, name) for name in SAMPLING_FIELDS}
    texts = _generate_texts(
        model, tokenizer, [prompts[code] for code, _ in jobs],
        sampling=sampling, batch_size=batch_size, progress=progress, fast=fast,
    )
    # R1-Distill templates open a <think> block in the prompt: the report is what follows
    # its close. A trace cut off at max_new_tokens gets one more try with twice the room;
    # still open, the report counts as failed (dropped, with a warning), never kept.
    reasoning = [i for i, (code, _) in enumerate(jobs) if opens_reasoning(prompts[code])]
    bodies: dict[int, str | None] = {i: report_after_reasoning(texts[i]) for i in reasoning}
    retry = [i for i in reasoning if bodies[i] is None]
    if retry and sampling.max_new_tokens < MAX_NEW_TOKENS_LIMIT:
        roomier = dataclasses.replace(
            sampling, max_new_tokens=min(2 * sampling.max_new_tokens, MAX_NEW_TOKENS_LIMIT)
        )
        again = _generate_texts(
            model, tokenizer, [prompts[jobs[i][0]] for i in retry],
            sampling=roomier, batch_size=batch_size, progress=None, fast=fast,
        )
        for i, text in zip(retry, again, strict=True):
            bodies[i] = report_after_reasoning(text)
    failed = [i for i in reasoning if bodies[i] is None]
    if failed:
        message = (
            f"{len(failed)} of {len(jobs)} reports failed: the model's reasoning trace did not "
            f"close (</think>) within max_new_tokens={sampling.max_new_tokens} nor on a retry "
            "with twice the room; they are left out (raise --max-new-tokens)"
        )
        _log.warning(message)
        warnings.warn(message, stacklevel=2)
    reports: list[SyntheticReport] = []
    for i, (code, k) in enumerate(jobs):
        text = bodies[i] if i in bodies else strip_reasoning(texts[i])
        if text is None:
            continue
        reports.append(
            SyntheticReport(
                report_id=_report_id(model_id, adapter_hash, setting, sampling.seed, code, k),
                code=code,
                text=text,
                setting=setting,
                model_id=model_id,
                adapter_hash=adapter_hash,
                sampling=dict(sampling_dict),
                seed=sampling.seed,
            )
        )
    return reports


def _generate_texts(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    *,
    sampling: GenerateConfig,
    batch_size: int,
    progress: Callable[[int, int], None] | None,
    fast: bool,
) -> list[str]:
    """Raw decoded continuations of ``prompts`` (special tokens skipped), in order."""
    if fast:
        from client.generation import fast as fast_generate

        reason = fast_generate.unsupported_reason(model)
        if reason is None:
            try:
                return fast_generate.generate_texts(
                    model, tokenizer, prompts, sampling=sampling, batch_size=batch_size, progress=progress
                )
            except Exception as exc:  # noqa: BLE001  never let the fast path take generation down
                # The message names the exception type and torch/transformers' own text; the
                # prompts are ICD-10 codes, never note text.
                reason = f"failed with {type(exc).__name__}: {exc}"
                _log.warning("fast generation %s; using plain generate", reason, exc_info=True)
        warnings.warn(f"fast generation unavailable ({reason}); using plain generate", stacklevel=3)
    device = _model_device(model)
    greedy = sampling.temperature == 0
    gen_kwargs: dict[str, Any] = {
        "max_new_tokens": sampling.max_new_tokens,
        "do_sample": not greedy,
        "repetition_penalty": float(sampling.repetition_penalty),
        "pad_token_id": tokenizer.pad_token_id,
        # every end id of the release (generation_config.json), not only the tokenizer's one
        "eos_token_id": eos_token_ids(model, tokenizer) or None,
        "use_cache": True,
    }
    if not greedy:
        gen_kwargs.update(
            temperature=float(sampling.temperature), top_p=float(sampling.top_p), top_k=sampling.top_k
        )
    was_training = model.training
    model.eval()
    texts: list[str] = []
    try:
        for b, start in enumerate(range(0, len(prompts), batch_size)):
            batch = prompts[start : start + batch_size]
            enc = tokenizer(
                batch,
                return_tensors="pt",
                padding=True,
                padding_side="left",
                add_special_tokens=False,  # the prompt format (and training) adds none
            ).to(device)
            fork_devices = [device] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=fork_devices):
                torch.manual_seed(sampling.seed * 1_000_003 + b)
                out = model.generate(
                    input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **gen_kwargs
                )
            new_tokens = out[:, enc["input_ids"].shape[1] :].cpu()
            texts += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            if progress is not None:
                progress(len(texts), len(prompts))
    finally:
        if was_training:
            model.train()
    return texts
