"""Packing completions into rows (daro_jax/train/packing.py), checked against direct re-derivations:
every token lands once, in its own completion's segment at its own offset, rows never
overflow, and first-fit decreasing needs no more rows than it must."""

from __future__ import annotations

import numpy as np
import pytest

from daro_jax.train import packing


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


def test_first_fit_known_case():
    # 6, 5, 4, 3, 2 into rows of 8: FFD gives [6, 2], [5, 3], [4] → 3 rows.
    row, start = packing.first_fit(np.array([2, 6, 4, 5, 3]), 8)
    assert row.tolist() == [0, 0, 2, 1, 1] and start.tolist() == [6, 0, 0, 0, 5]
    with pytest.raises(ValueError, match="exceeds the row width 8"):
        packing.first_fit(np.array([9]), 8)


@pytest.mark.parametrize("blocks,rows", [(1, 1), (1, 2), (2, 1), (3, 2)])
def test_pack_blocks_puts_each_token_at_its_segment_and_offset(blocks, rows):
    """Every token of every completion lies once in its own block's chunks, in one row,
    consecutive, with its completion's index (prompt · K + j) and its offset; the chunks a
    block needs are at most n_chunks; the rest is padding (token 0, segment −1)."""
    rng = np.random.default_rng(blocks * 10 + rows)
    g, k, c = 2, 4, 10
    b = blocks * g
    lengths = rng.integers(0, c + 1, (b, k))
    lengths[0, 0] = 0  # a padding rollout is not placed
    tokens = rng.integers(1, 1000, (b, k, c)) * (np.arange(c) < lengths[..., None])
    out = packing.pack_blocks(tokens, lengths, blocks, rows)
    slots = packing.chunk_slots(g, k, rows)
    assert slots == -(-g * k // rows)
    for name in ("chunk_tokens", "chunk_segments", "chunk_offsets"):
        assert out[name].shape == (blocks, slots, rows, c)
    for block in range(blocks):
        seg, tok, off = (
            out[n][block].reshape(-1, c)
            for n in ("chunk_segments", "chunk_tokens", "chunk_offsets")
        )  # [S·R rows, C]
        for j in range(g * k):
            prompt, sample = block * g + j // k, j % k
            n = lengths[prompt, sample]
            where = np.argwhere(seg == j)
            assert len(where) == n
            if n == 0:
                continue
            row = where[:, 0]
            assert (row == row[0]).all() and np.all(np.diff(where[:, 1]) == 1)
            assert row[0] // rows < out["n_chunks"]
            np.testing.assert_array_equal(tok[seg == j], tokens[prompt, sample, :n])
            np.testing.assert_array_equal(off[seg == j], np.arange(n))
        assert (tok[seg < 0] == 0).all() and (off[seg < 0] == 0).all()
    needed = max(
        packing.first_fit(lengths[i * g : (i + 1) * g].reshape(-1), c)[0].max() + 1
        for i in range(blocks)
    )
    assert out["n_chunks"] == -(-needed // rows)


def test_pack_blocks_refuses_uneven_blocks():
    with pytest.raises(ValueError, match="3 prompts do not split into 2 blocks"):
        packing.pack_blocks(np.ones((3, 2, 4), np.int32), np.ones((3, 2), np.int32), 2, 1)
