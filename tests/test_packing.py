"""Packing completions into rows (daro_jax/packing.py), checked against direct re-derivations:
every token lands once, in its own completion's segment at its own offset, rows never
overflow, and first-fit decreasing needs no more rows than it must."""

from __future__ import annotations

import numpy as np
import pytest

from daro_jax import packing


def test_rows_bucket_is_the_next_power_of_two_or_one_and_a_half_times_one():
    grid = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32]
    for needed in range(1, 33):
        assert packing.rows_bucket(needed, 64) == min(g for g in grid if g >= needed)
    assert packing.rows_bucket(5, 5) == 5  # capped at q
    assert packing.rows_bucket(7, 8) == 8


def test_first_fit_decreasing_places_every_completion_without_overlap():
    rng = np.random.default_rng(0)
    for _ in range(200):
        width = int(rng.integers(1, 40))
        lengths = rng.integers(0, width + 1, int(rng.integers(1, 12)))
        row, start = packing.first_fit(lengths, width)
        used = np.zeros((len(lengths), width), int)
        for j, n in enumerate(lengths):
            assert start[j] + n <= width
            used[row[j], start[j] : start[j] + n] += 1
        assert used.max(initial=0) <= 1
        # Never more rows than completions, and never two rows that one could hold.
        rows = row.max() + 1
        fill = np.bincount(row, weights=lengths, minlength=rows)
        assert rows <= len(lengths)
        assert all(fill[a] + fill[b] > width for a in range(rows) for b in range(a + 1, rows))


def test_first_fit_known_case_and_rows_needed():
    # 6, 5, 4, 3, 2 into rows of 8: FFD gives [6, 2], [5, 3], [4] → 3 rows.
    row, start = packing.first_fit(np.array([2, 6, 4, 5, 3]), 8)
    assert row.tolist() == [0, 0, 2, 1, 1] and start.tolist() == [6, 0, 0, 0, 5]
    assert packing.rows_needed(np.array([[2, 6, 4, 5, 3], [8, 0, 0, 0, 0]]), 8) == 3
    with pytest.raises(ValueError, match="exceeds the row width 8"):
        packing.first_fit(np.array([9]), 8)


def test_pack_puts_each_token_at_its_index_segment_and_offset():
    rng = np.random.default_rng(1)
    u, q, c = 3, 4, 10
    lengths = rng.integers(0, c + 1, (u, q))
    tokens = rng.integers(1, 1000, (u, q, c)) * (np.arange(c) < lengths[..., None])
    rows = packing.rows_needed(lengths, c)
    out = packing.pack(tokens, lengths, rows)
    assert out["unit_tokens"].shape == (u, rows, c) and out["packed_index"].shape == (u * q, c)
    index = out["packed_index"].reshape(u, q, c)
    for i in range(u):
        flat = {n: out[n][i].reshape(-1) for n in ("unit_tokens", "unit_segments", "unit_offsets")}
        for j in range(q):
            n = lengths[i, j]
            at = index[i, j, :n]
            np.testing.assert_array_equal(flat["unit_tokens"][at], tokens[i, j, :n])
            np.testing.assert_array_equal(flat["unit_segments"][at], j)
            np.testing.assert_array_equal(flat["unit_offsets"][at], np.arange(n))
            assert (index[i, j, n:] == -1).all()
            # Consecutive tokens of a completion are adjacent in one row.
            assert np.all(np.diff(at) == 1) and len(set(at // c)) <= 1
        # Padding: everything not indexed is segment −1, token 0.
        free = np.setdiff1d(np.arange(rows * c), index[i][index[i] >= 0])
        assert (flat["unit_segments"][free] == -1).all() and (flat["unit_tokens"][free] == 0).all()


def test_pack_refuses_too_few_rows():
    lengths = np.array([[5, 5, 5]])
    with pytest.raises(ValueError, match="unit 0 needs 3 rows of 8; only 1 given"):
        packing.pack(np.ones((1, 3, 8), np.int32), lengths, 1)
