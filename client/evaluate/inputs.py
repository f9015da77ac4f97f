"""The one check of a corpus of texts every evaluation metric takes (synthetic reports, private notes).

Two forms of one contract, so a caller can collect problems across several arguments
and raise once (:func:`text_problems`), or check one argument and go on with a list
(:func:`check_texts`). A corpus is a sequence of ``str`` — not a single ``str``, which
is a sequence of characters and would be scored letter by letter — with at least
``min_n`` items. Problems name the argument and the item's index and type, never
the text itself (it may hold patient data).
"""

from __future__ import annotations

from collections.abc import Sequence

from shared.errors import InputError, Problem

#: Non-string items listed one by one; past this many, one line counts the rest.
MAX_LISTED = 10


def text_problems(texts: object, name: str, *, min_n: int = 0) -> list[Problem]:
    """Problems with ``texts`` as a corpus named ``name`` (empty when it is one)."""
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        return [Problem(name, f"must be a sequence of strings, got {type(texts).__name__}")]
    bad = [
        Problem(f"{name}[{i}]", f"is {type(t).__name__}, not str") for i, t in enumerate(texts) if not isinstance(t, str)
    ]
    if len(bad) > MAX_LISTED:
        bad = [*bad[:MAX_LISTED], Problem(name, f"{len(bad) - MAX_LISTED} more items are not str")]
    if len(texts) < min_n:
        bad.append(Problem(name, f"needs at least {min_n} texts, got {len(texts)}"))
    return bad


def check_texts(texts: object, name: str, *, min_n: int = 0) -> list[str]:
    """``texts`` as a list of strings; :class:`InputError` listing every problem at once otherwise."""
    problems = text_problems(texts, name, min_n=min_n)
    if problems:
        raise InputError(f"{name}: not a corpus of at least {min_n} texts" if min_n else f"{name}: not a corpus of texts",
                         problems)
    return list(texts)  # type: ignore[arg-type]  # a Sequence of str, checked above
