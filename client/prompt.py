"""How an ICD-10 code becomes a prompt, and a note a training example.

Training and generation must see the same prompt, or the adapter learns to
answer a question nobody asks: both call :func:`build_prompt`. When the
tokenizer has a chat template (instruction-tuned families, and the embedded
model) the instruction goes through it; otherwise a plain text prefix is used.
"""

from __future__ import annotations

from typing import Any

from shared import icd10

SECTIONS = (
    "Reason for referral",
    "History",
    "Mental status examination",
    "Risk assessment",
    "Diagnosis",
    "Plan",
)


def instruction(code: str, *, outline: bool = True) -> str:
    """The user instruction for one report conditioned on ``code`` (canonicalised)."""
    canon = icd10.normalize(code)
    text = (
        "Write a psychiatric evaluation report for a patient with ICD-10 code "
        f"{canon} ({icd10.describe(canon)})."
    )
    if outline:
        text += " Use the sections: " + ", ".join(SECTIONS) + "."
    return text


def _release_bos(tokenizer: Any) -> str | None:
    """The BOS token string when the tokenizer's release adds one to every encoding.

    Prompts are tokenized with ``add_special_tokens=False`` (a chat template
    already carries its own specials), so a release that expects BOS at the
    start (Llama 3 base has no chat template, only a post-processor adding
    ``<|begin_of_text|>``) must get it written into the prompt text.
    """
    bos, bos_id = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id", None)
    if not bos or bos_id is None:
        return None
    try:
        ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    except (TypeError, ValueError, KeyError):
        return None
    return bos if ids and ids[0] == bos_id else None


def opens_reasoning(prompt: str) -> bool:
    """Whether the prompt ends inside an open ``<think>`` block (DeepSeek-R1-Distill
    templates end the generation prompt with ``<think>``): the model's output is
    then a reasoning trace, and the report is only what follows ``</think>``."""
    return prompt.rfind("<think>") > prompt.rfind("</think>")


def build_prompt(code: str, tokenizer: Any, *, outline: bool = True) -> str:
    """The full prompt string (chat-templated when the tokenizer has a template),
    starting with the BOS token when the tokenizer's release adds one."""
    prompt = _templated(instruction(code, outline=outline), tokenizer)
    bos = _release_bos(tokenizer)
    if bos is not None and not prompt.startswith(bos):
        prompt = bos + prompt
    return prompt


def _templated(user: str, tokenizer: Any) -> str:
    if getattr(tokenizer, "chat_template", None):
        kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": True}
        try:
            # Qwen3-style templates: ask for no reasoning trace; others ignore the flag.
            return tokenizer.apply_chat_template(
                [{"role": "user", "content": user}], enable_thinking=False, **kwargs
            )
        except TypeError:
            return tokenizer.apply_chat_template([{"role": "user", "content": user}], **kwargs)
    return f"{user}\n\nReport:\n"


def training_example(code: str, text: str, tokenizer: Any, *, max_length: int) -> dict[str, list[int]]:
    """Token ids and labels for one note: loss only on the report, not on the prompt.

    Returns ``input_ids`` and ``labels`` (prompt positions are -100), truncated to
    ``max_length`` tokens with the end-of-sequence token kept when it fits.
    """
    prompt_ids = tokenizer(build_prompt(code, tokenizer), add_special_tokens=False)["input_ids"]
    body_ids = tokenizer(text.strip(), add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = (prompt_ids + body_ids + eos)[:max_length]
    labels = ([-100] * len(prompt_ids) + body_ids + eos)[:max_length]
    return {"input_ids": ids, "labels": labels}


def prompt_and_body(code: str, text: str, tokenizer: Any) -> tuple[list[int], list[int]]:
    """Token ids of the prompt and of the report body (with the end-of-sequence token).

    For notes longer than the training length, :mod:`client.train` draws a random
    window of the body behind the full prompt, so every part of a long note can be
    learned (and, for audits, every planted canary can be reached).
    """
    prompt_ids = tokenizer(build_prompt(code, tokenizer), add_special_tokens=False)["input_ids"]
    body_ids = tokenizer(text.strip(), add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return list(prompt_ids), list(body_ids) + eos
