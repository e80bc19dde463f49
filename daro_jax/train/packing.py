"""Completions packed into rows for the update (host-side NumPy, before the arrays go to the
devices).

In RL most completions stop long before `max_new_tokens` (C), so a [rollouts, C] layout
computes mostly padding, and any layout whose shape follows the lengths recompiles. The
update instead uses one shape for every step:

- the prompts of an update are split into G blocks of g consecutive prompts (one or more
  blocks per data shard); each block's g·K completions are packed back to back into rows of
  C positions by first-fit decreasing (`first_fit`; a completion is never split, so a
  block never needs more than g·K rows), completions of different prompts sharing rows;
- the rows of block j are cut into chunks of R rows: chunk i of every block forms the
  micro-batch [G, R, C] of loop iteration i, so the arrays are [G, S, R, C] with S =
  ⌈g·K / R⌉ slots (enough for any lengths) and the update loops over the first
  `n_chunks` slots only (a traced loop bound: no recompilation);
- `segments` is the completion's index in its block (prompt · K + sample), −1 on padding;
  `offsets` its token's position in the completion. In the update a token attends to its
  own prompt's KV cache and to the earlier tokens of its own completion, so the packed
  forward equals the forward of each [prompt | completion] sequence alone.
"""

from __future__ import annotations

import numpy as np


def first_fit(lengths: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """First-fit-decreasing placement of completions of `lengths` [n] (each ≤ width) into
    rows of `width`; returns (row [n], start [n]) of every completion."""
    lengths = np.asarray(lengths)
    if lengths.max(initial=0) > width:
        raise ValueError(f"a completion of {lengths.max()} tokens exceeds the row width {width}")
    row = np.zeros(len(lengths), np.int64)
    start = np.zeros(len(lengths), np.int64)
    used: list[int] = []
    for j in np.argsort(-lengths, kind="stable"):
        i = next((i for i, u in enumerate(used) if u + lengths[j] <= width), len(used))
        if i == len(used):
            used.append(0)
        row[j], start[j] = i, used[i]
        used[i] += int(lengths[j])
    return row, start


def chunk_slots(prompts_per_block: int, k: int, rows: int) -> int:
    """S = ⌈g·K / R⌉: chunks of R rows that hold a block of g prompts' K completions each
    in the worst case (one completion per row)."""
    return -(-prompts_per_block * k // rows)


def pack_blocks(tokens: np.ndarray, lengths: np.ndarray, blocks: int, rows: int) -> dict:
    """Pack the completions `tokens` [b, K, C] of `lengths` [b, K] of b = G·g prompts.

    Returns chunk_tokens, chunk_segments, chunk_offsets [G, S, R, C] int32 (padding: token
    0, segment −1, offset 0; S = `chunk_slots`) and n_chunks, the most chunks any block
    fills (≥ 1). Completions of length 0 (padding prompts) are not placed.
    """
    b, k, c = tokens.shape
    if b % blocks:
        raise ValueError(f"{b} prompts do not split into {blocks} blocks")
    g = b // blocks
    slots = chunk_slots(g, k, rows)
    out = {
        "chunk_tokens": np.zeros((blocks, slots * rows * c), np.int32),
        "chunk_segments": np.full((blocks, slots * rows * c), -1, np.int32),
        "chunk_offsets": np.zeros((blocks, slots * rows * c), np.int32),
    }
    used = 1
    for block in range(blocks):
        block_lengths = lengths[block * g : (block + 1) * g].reshape(-1)
        block_tokens = tokens[block * g : (block + 1) * g].reshape(g * k, c)
        row, start = first_fit(block_lengths, c)
        placed = block_lengths > 0
        if placed.any():
            used = max(used, -(-(int(row[placed].max()) + 1) // rows))
        for j in np.flatnonzero(placed):
            n = int(block_lengths[j])
            at = row[j] * c + start[j] + np.arange(n)
            out["chunk_tokens"][block, at] = block_tokens[j, :n]
            out["chunk_segments"][block, at] = j
            out["chunk_offsets"][block, at] = np.arange(n)
    out = {name: x.reshape(blocks, slots, rows, c) for name, x in out.items()}
    out["n_chunks"] = used
    return out
