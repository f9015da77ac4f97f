"""Tiny random checkpoints on disk, shaped like the releases hospitals stage.

Each builder writes what a real release ships: ``config.json`` + weights,
``generation_config.json`` with the release's bos/eos ids (a *list* where the
release lists several), and tokenizer files (``tokenizer.json`` with the
release's special tokens and BOS post-processor, ``tokenizer_config.json`` with
its bos/eos/pad tokens and chat template). Token ids are those of a tiny BPE
vocabulary, not the release's, but every id the release names by token is the
id of that token here.

:func:`script_model` turns a tiny Llama/Qwen2 into a deterministic
next-token table, so a test can make a model emit ``<|eot_id|>`` or an
unclosed ``</think>`` trace on purpose.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
R1_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '<｜User｜>' + message['content'] }}{% endif %}{% if message['role'] == 'assistant' %}"
    "{{ '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\n' }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Qwen3's template: with enable_thinking=false the assistant turn opens with an empty trace.
QWEN3_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\n\n</think>\n\n' }}{% endif %}{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}"
    "{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eot_id|>"]
R1_SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MISTRAL_SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]


@dataclass(frozen=True)
class Release:
    """How one family's release ships its tokenizer and generation config."""

    name: str
    arch: str  # client.model family used for the config class
    specials: list[str]
    bos: str | None
    eos: str  # the tokenizer's (single) eos
    pad: str | None
    gen_eos: list[str]  # generation_config.json eos_token_id (several: a list)
    template: str | None
    adds_bos: bool  # the tokenizer's post-processor prepends bos
    added: list[str] = field(default_factory=list)  # added non-special tokens (<think>)


RELEASES = {
    "llama3-instruct": Release("llama3-instruct", "llama", LLAMA3_SPECIALS, "<|begin_of_text|>",
                               "<|eot_id|>", None, ["<|end_of_text|>", "<|eot_id|>"],
                               LLAMA3_TEMPLATE, True),
    "llama3-base": Release("llama3-base", "llama", LLAMA3_SPECIALS, "<|begin_of_text|>",
                           "<|end_of_text|>", None, ["<|end_of_text|>"], None, True),
    # OpenBioLLM-Llama3: the tokenizer names <|end_of_text|>, the chat turn ends with <|eot_id|>.
    "openbiollm": Release("openbiollm", "llama", LLAMA3_SPECIALS, "<|begin_of_text|>",
                          "<|end_of_text|>", None, ["<|end_of_text|>", "<|eot_id|>"],
                          LLAMA3_TEMPLATE, True),
    "r1-distill-llama": Release("r1-distill-llama", "llama", R1_SPECIALS, "<｜begin▁of▁sentence｜>",
                                "<｜end▁of▁sentence｜>", "<｜end▁of▁sentence｜>",
                                ["<｜end▁of▁sentence｜>"], R1_TEMPLATE, True, ["<think>", "</think>"]),
    "r1-distill-qwen": Release("r1-distill-qwen", "qwen2", R1_SPECIALS, "<｜begin▁of▁sentence｜>",
                               "<｜end▁of▁sentence｜>", "<｜end▁of▁sentence｜>",
                               ["<｜end▁of▁sentence｜>"], R1_TEMPLATE, True, ["<think>", "</think>"]),
    "qwen2.5": Release("qwen2.5", "qwen2", QWEN_SPECIALS, None, "<|im_end|>", "<|endoftext|>",
                       ["<|im_end|>", "<|endoftext|>"], CHATML_TEMPLATE, False),
    "qwen3": Release("qwen3", "qwen3", QWEN_SPECIALS, None, "<|im_end|>", "<|endoftext|>",
                     ["<|im_end|>", "<|endoftext|>"], QWEN3_TEMPLATE, False, ["<think>", "</think>"]),
    "qwen3.5": Release("qwen3.5", "qwen3_5", QWEN_SPECIALS, None, "<|im_end|>", "<|endoftext|>",
                       ["<|im_end|>", "<|endoftext|>"], QWEN3_TEMPLATE, False, ["<think>", "</think>"]),
    "qwen3-next": Release("qwen3-next", "qwen3_next", QWEN_SPECIALS, None, "<|im_end|>",
                          "<|endoftext|>", ["<|im_end|>", "<|endoftext|>"], CHATML_TEMPLATE, False),
    "mistral": Release("mistral", "mistral", MISTRAL_SPECIALS, "<s>", "</s>", None, ["</s>"],
                       MISTRAL_TEMPLATE, True),
}

_TEXTS = [
    "Write a psychiatric evaluation report for a patient with ICD-10 code F32.1 "
    "(Moderate depressive episode). Use the sections: Reason for referral, History, "
    "Mental status examination, Risk assessment, Diagnosis, Plan. assistant user system",
    "The patient reports low mood, poor sleep and anxiety. No suicidal ideation.",
]


def _tokenizer(release: Release) -> Any:
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=list(release.specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_TEXTS, trainer=trainer)
    if release.added:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in release.added])
    if release.adds_bos:
        bos_id = tok.token_to_id(release.bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{release.bos} $A", pair=f"{release.bos} $A {release.bos} $B",
            special_tokens=[(release.bos, bos_id)],
        )
    kwargs = {"bos_token": release.bos, "eos_token": release.eos}
    if release.pad:
        kwargs["pad_token"] = release.pad
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    if release.template:
        fast.chat_template = release.template
    return fast


def write_release(name: str, out: Path, *, seed: int = 0) -> Path:
    """Write a tiny random checkpoint of release ``name`` (see :data:`RELEASES`) into ``out``."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    from client.model_build import family_config

    release = RELEASES[name]
    tokenizer = _tokenizer(release)
    config = family_config(
        release.arch, tokenizer, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )
    config.tie_word_embeddings = False  # separate lm_head, as the 7B/8B releases ship
    gen_eos = [tokenizer.convert_tokens_to_ids(t) for t in release.gen_eos]
    config.eos_token_id = gen_eos if len(gen_eos) > 1 else gen_eos[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if release.arch == "qwen3_5":
            # Qwen3.5 ships as the multimodal wrapper (model_type "qwen3_5", weights under
            # model.language_model.* and model.visual.*); the site loads its text model.
            from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

            wrapper = Qwen3_5Config(
                text_config=config.to_dict(),
                vision_config={"depth": 1, "hidden_size": 32, "intermediate_size": 64,
                               "num_heads": 2, "out_hidden_size": config.hidden_size},
                tie_word_embeddings=False,
            )
            wrapper.eos_token_id = config.eos_token_id
            model = Qwen3_5ForConditionalGeneration(wrapper)
        else:
            model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=gen_eos if len(gen_eos) > 1 else gen_eos[0],
        do_sample=True, temperature=0.6, top_p=0.9,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # The release's tokenizer_config.json fields (what AutoTokenizer reads back).
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg.update({"bos_token": release.bos, "eos_token": release.eos, "tokenizer_class": "PreTrainedTokenizerFast"})
    if release.pad:
        cfg["pad_token"] = release.pad
    if release.template:
        cfg["chat_template"] = release.template
    if release.name == "mistral":
        cfg.update({"add_bos_token": True, "add_eos_token": False})
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")
    if release.arch == "qwen3_5":
        assert json.loads((out / "config.json").read_text())["model_type"] == "qwen3_5"
    gen = json.loads((out / "generation_config.json").read_text(encoding="utf-8"))
    assert gen["eos_token_id"] == config.eos_token_id  # the file carries the release's list
    return out


def _layers(model: Any) -> Any:
    return model.get_base_model().model.layers if hasattr(model, "get_base_model") else model.model.layers


@torch.no_grad()
def script_model(model: Any, transitions: dict[int, int]) -> None:
    """Make a tiny Llama/Qwen2 greedily emit ``transitions[last_token]`` next.

    Every layer's output projections are zeroed, so the residual stream is the
    current token's embedding; each scripted token gets its own basis direction
    and the lm_head row of its successor points along it. Unscripted tokens keep
    their random (small) logits.
    """
    for layer in _layers(model):
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    tokens = list(dict.fromkeys([*transitions, *transitions.values()]))
    if len(tokens) > emb.shape[1]:
        raise ValueError("more scripted tokens than hidden dimensions")
    for i, t in enumerate(tokens):
        emb[t].zero_()
        emb[t, i] = 1.0
    for cur, nxt in transitions.items():
        head[nxt] += 50.0 * torch.nn.functional.one_hot(
            torch.tensor(tokens.index(cur)), emb.shape[1]
        ).to(head.dtype)
