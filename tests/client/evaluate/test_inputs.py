"""client.evaluate.inputs: the one corpus check the metrics share."""

from __future__ import annotations

import pytest

from client.evaluate.inputs import MAX_LISTED, check_texts, text_problems
from shared.errors import InputError


def test_a_corpus_passes_as_a_list():
    assert text_problems(("a", "b"), "synthetic") == []
    assert check_texts(("a", "b"), "texts", min_n=2) == ["a", "b"]


@pytest.mark.parametrize("bad", ["one string", None, 3, {"a": 1}.keys()])
def test_not_a_sequence_of_strings(bad):
    problems = text_problems(bad, "synthetic")
    assert [p.where for p in problems] == ["synthetic"] and "sequence of strings" in problems[0].reason


def test_each_bad_item_is_named_by_index_never_by_content():
    problems = text_problems(["ok", 3, "Anna Smith", None], "private")
    assert [p.where for p in problems] == ["private[1]", "private[3]"]
    assert all("Anna" not in p.reason for p in problems)


def test_many_bad_items_are_counted_not_listed():
    problems = text_problems([1] * (MAX_LISTED + 5), "texts")
    assert len(problems) == MAX_LISTED + 1 and "5 more" in problems[-1].reason


def test_too_few_texts_raise_once_with_every_problem():
    with pytest.raises(InputError) as err:
        check_texts([3], "texts", min_n=2)
    assert [p.where for p in err.value.problems] == ["texts[0]", "texts"]
    assert "at least 2" in err.value.problems[-1].reason
