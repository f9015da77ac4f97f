"""The update maths both sides share (shared/adapter_delta.py), with known answers."""

import numpy as np
import pytest

from shared import adapter_delta

A = "m.layers.0.q_proj.lora_A.weight"
B = "m.layers.0.q_proj.lora_B.weight"


def test_delta_against_a_reference_is_a_difference_in_float64():
    ref = {A: np.full((1, 2), 1.0, np.float32), B: np.full((2, 1), 2.0, np.float32)}
    got = adapter_delta.update_delta({A: np.full((1, 2), 1.5, np.float32), B: np.zeros((2, 1))}, ref)
    np.testing.assert_array_equal(got[A], [[0.5, 0.5]])
    np.testing.assert_array_equal(got[B], [[-2.0], [-2.0]])
    assert got[A].dtype == np.float64 and got[B].dtype == np.float64


def test_round_one_delta_is_b_itself_and_zero_for_a():
    got = adapter_delta.update_delta({A: np.full((1, 2), 7.0), B: np.full((2, 1), 3.0)}, None)
    np.testing.assert_array_equal(got[A], np.zeros((1, 2)))
    np.testing.assert_array_equal(got[B], np.full((2, 1), 3.0))


def test_clip_scales_the_global_norm_down_never_up():
    delta = {A: np.array([[3.0, 4.0]]), B: np.zeros((2, 1))}  # norm 5
    assert adapter_delta.update_norm(delta) == pytest.approx(5.0)
    clipped = adapter_delta.clip_delta(delta, 1.0)
    np.testing.assert_allclose(clipped[A], [[0.6, 0.8]])
    assert adapter_delta.update_norm(clipped) == pytest.approx(1.0)
    np.testing.assert_array_equal(adapter_delta.clip_delta(delta, 10.0)[A], delta[A])  # inside the bound
    np.testing.assert_array_equal(adapter_delta.clip_delta(delta, 0.0)[A], delta[A])  # 0 = off
    zero = {A: np.zeros((1, 2))}
    np.testing.assert_array_equal(adapter_delta.clip_delta(zero, 1.0)[A], zero[A])  # no division by 0


def test_contribution_bounds_the_delta_and_in_round_one_sends_a_absolute():
    ref = {A: np.zeros((1, 2)), B: np.zeros((2, 1))}
    upd = {A: np.array([[3.0, 0.0]]), B: np.array([[0.0], [4.0]])}  # delta norm 5
    got = adapter_delta.site_contribution(upd, ref, norm_bound=1.0)
    np.testing.assert_allclose(got[A], [[0.6, 0.0]])
    np.testing.assert_allclose(got[B], [[0.0], [0.8]])
    first = adapter_delta.site_contribution(upd, None, norm_bound=1.0)
    np.testing.assert_array_equal(first[A], [[3.0, 0.0]])  # absolute: its init is not the coordinator's
    np.testing.assert_allclose(first[B], [[0.0], [1.0]])  # the norm is B's alone (A's delta is 0)


def test_add_to_reference_casts_to_the_adapter_dtype():
    ref = {A: np.full((1, 2), 1.0, np.float32)}
    got = adapter_delta.add_to_reference(A, np.full((1, 2), 0.25), ref, "float16")
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, [[1.25, 1.25]])
    np.testing.assert_array_equal(adapter_delta.add_to_reference(A, np.ones((1, 2)), None, "float32"), [[1, 1]])


def test_is_lora_b():
    assert adapter_delta.is_lora_b(B) and not adapter_delta.is_lora_b(A)
