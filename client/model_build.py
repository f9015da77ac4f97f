"""Build a causal LM from nothing: an in-memory BPE tokenizer and a random-init config.

The embedded default model (:mod:`client.pretrain`) and the tests' tiny models
(:func:`client.model.tiny_random_model`) start here; a site's real model is
loaded from disk by :mod:`client.model` instead. Nothing here reads site data:
a tokenizer is trained only on the texts it is given, and weights start random.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from shared.errors import ModelError

# The families a config can be built for, and whose LoRA targets fedsynth knows.
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_5", "qwen3_next")

SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>")
# A minimal chat template: each turn ends with the end-of-sequence token, so a
# generated report stops where a training example (prompt + body + eos) stops.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|eos|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tokenizer(texts: Sequence[str], *, vocab_size: int) -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer trained in memory on ``texts``, with pad/bos/eos
    tokens and :data:`CHAT_TEMPLATE`. Byte-level: any text encodes, nothing is UNK."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def family_config(family: str, tokenizer: PreTrainedTokenizerBase, **sizes: Any) -> Any:
    """A random-init config of ``family`` sized by ``sizes`` (hidden_size,
    intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads,
    max_position_embeddings), with the tokenizer's special token ids."""
    from transformers import (
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
        Qwen3_5TextConfig,
        Qwen3Config,
        Qwen3NextConfig,
    )

    common = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "tie_word_embeddings": True,
        **sizes,
    }
    head_dim = common["hidden_size"] // common["num_attention_heads"]
    if family == "llama":
        return LlamaConfig(**common)
    if family == "mistral":
        return MistralConfig(head_dim=head_dim, **common)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "qwen3":
        return Qwen3Config(head_dim=head_dim, **common)
    n = common["num_hidden_layers"]
    # Hybrid families: alternate linear-attention and full-attention layers, ending on full.
    hybrid = dict(
        head_dim=head_dim,
        linear_key_head_dim=head_dim,
        linear_value_head_dim=head_dim,
        linear_num_key_heads=max(1, common["num_key_value_heads"]),
        linear_num_value_heads=common["num_attention_heads"],
        layer_types=["linear_attention" if i % 2 == 0 and i < n - 1 else "full_attention"
                     for i in range(n)],
    )
    if family == "qwen3_5":
        return Qwen3_5TextConfig(**hybrid, **common)
    if family == "qwen3_next":
        return Qwen3NextConfig(
            **hybrid,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=common["intermediate_size"] // 2,
            shared_expert_intermediate_size=common["intermediate_size"] // 2,
            **common,
        )
    raise ModelError(f"unknown model family {family!r} (known: {', '.join(FAMILIES)})")


def causal_lm_from_config(config: Any) -> PreTrainedModel:
    """A randomly initialised causal LM for ``config`` (current torch RNG)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config)
