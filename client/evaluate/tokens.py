"""The one word-level tokenization every lexical metric uses.

Lower-cased; words are runs of letters/digits (apostrophes kept inside words);
each other non-space character is its own token. Model tokenizers differ
between families, so lexical privacy and diversity metrics never use them:
the same text gets the same tokens whatever model produced it.
"""

from __future__ import annotations

import re

_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*|[^\sa-z0-9]")


def word_tokens(text: str) -> list[str]:
    """Lower-cased word/punctuation tokens of ``text``."""
    return _TOKEN.findall(text.lower())
