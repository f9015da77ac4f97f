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


def build_prompt(code: str, tokenizer: Any, *, outline: bool = True) -> str:
    """The full prompt string (chat-templated when the tokenizer has a template)."""
    user = instruction(code, outline=outline)
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
