"""The diversity reference (#14 §1): sampled real notes and a token budget both corpora can meet."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from client.evaluate.diversity import distinct_n, matched_reference
from shared.errors import InputError

counts = st.integers(min_value=1, max_value=2000)


@settings(max_examples=200, deadline=None)
@given(
    reports=st.lists(counts, min_size=1, max_size=500),
    notes=st.lists(counts, min_size=1, max_size=5000),
    seed=st.integers(0, 2**32 - 1),
)
def test_budget_never_exceeds_either_side(reports, notes, seed):
    ref = matched_reference(reports, notes, seed=seed)
    idx = ref.indices
    assert len(idx) == min(len(reports), len(notes))
    assert len(np.unique(idx)) == len(idx) and (0 <= idx).all() and (idx < len(notes)).all()
    sampled = sum(notes[i] for i in idx)
    assert ref.token_budget is not None and 1 <= ref.token_budget
    assert ref.token_budget == min(sum(reports), sampled)  # both sides can supply it


@settings(max_examples=40, deadline=None)
@given(
    reports=st.lists(st.integers(1, 60), min_size=1, max_size=30),
    notes=st.lists(st.integers(1, 60), min_size=1, max_size=120),
    seed=st.integers(0, 1000),
)
def test_distinct_n_accepts_the_budget_on_both_corpora(reports, notes, seed):
    """The suite's two distinct-n calls with the shared budget never raise (the crash of §1)."""
    def corpus(sizes, tag):
        return [" ".join(f"{tag}{(i * 7 + j) % 23}" for j in range(k)) for i, k in enumerate(sizes)]

    synth, real = corpus(reports, "s"), corpus(notes, "r")
    ref = matched_reference(reports, notes, seed=seed)
    a = distinct_n(synth, token_budget=ref.token_budget, seed=seed)
    b = distinct_n([real[i] for i in ref.indices], token_budget=ref.token_budget, seed=seed)
    assert a.tokens_used == b.tokens_used == ref.token_budget


def test_reference_is_a_sample_not_the_file_head():
    notes = [10] * 1000
    picks = [set(matched_reference([5] * 50, notes, seed=s).indices.tolist()) for s in range(5)]
    assert all(p != set(range(50)) for p in picks)
    assert len(set.union(*picks)) > 200  # spread over the whole file
    # every note is equally likely: a note's position does not matter
    hits = np.zeros(1000)
    for s in range(400):
        hits[matched_reference([5] * 50, notes, seed=1000 + s).indices] += 1
    assert hits[:500].sum() == pytest.approx(hits[500:].sum(), rel=0.1)


def test_zero_tokens_and_bad_counts():
    assert matched_reference([0, 0], [3, 4], seed=0).token_budget is None
    with pytest.raises(InputError):
        matched_reference([], [1], seed=0)
    with pytest.raises(InputError):
        matched_reference([1, -2], ["3"], seed=0)
