"""The trainer's detector plumbing for issue 13: quantile candidates are every position above
the row's quantile (no cap at C)."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from topd_jax.algorithms.topd import candidate_slots, quantile_slot_count


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), length=st.integers(1, 40), q=st.sampled_from([0.0, 0.3, 0.8, 0.95, 1.0]),
       levels=st.sampled_from([2, 1000]))
def test_quantile_slot_count_bounds_the_positions_above_the_quantile(seed, length, q, levels):
    rng = np.random.default_rng(seed)
    for n in range(1, length + 1):
        x = rng.integers(0, levels, n).astype(np.float64)
        assert (x > np.quantile(x, q)).sum() <= quantile_slot_count(length, q)


def test_quantile_candidates_are_every_position_above_the_row_quantile():
    rng = np.random.default_rng(0)
    loss = rng.random((3, 30)).astype(np.float32)
    mask = np.ones((3, 30), bool)
    mask[1, 20:] = False
    cand, pos, valid, _ = candidate_slots(loss, mask, mode="quantile", num=2, min_separation=8, quantile=0.8,
                                          rollback=1)
    cand = np.asarray(cand)
    for r in range(3):
        above = mask[r] & (loss[r] > np.quantile(loss[r][mask[r]], 0.8))
        np.testing.assert_array_equal(cand[r], above)
        got = sorted(np.asarray(pos)[r][np.asarray(valid)[r]].tolist())
        assert got == np.flatnonzero(above).tolist()
    assert cand[0].sum() == 6 > 2  # more than num: no cap at C
