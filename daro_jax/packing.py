"""Completions packed into rows for the update (host-side NumPy, before the arrays go to the
devices).

In RL most completions stop long before `max_new_tokens`, so a [rows, max_new_tokens]
layout computes mostly padding. The update instead packs each unit's q completions of one
prompt (`sharding.completions_per_unit`) into r rows of W = max_new_tokens positions:

- first-fit decreasing: the completions, longest first, each go to the first row with room;
  a completion is never split, so r ≤ q and a row holds whole completions back to back;
- every row of a unit attends to that unit's prompt KV cache, and inside a row each token
  attends to the tokens of its own completion before it (`segments`: the completion's index
  j in the unit, −1 on padding; `offsets`: its position inside the completion), so the
  packed forward equals the forward of each [prompt | completion] sequence alone;
- r is the largest count any unit of the step needs, rounded up to `rows_bucket` (1, 2, 3,
  4, 6, 8, 12, …) so that the update compiles for at most 2·log2(q) + 1 shapes;
- `index[u, j, c]` is where completion token c of completion j lies in the unit's flattened
  [r·W] positions (−1 past its length), to bring per-token results back to [rows, C].
"""

from __future__ import annotations

import numpy as np


def rows_bucket(needed: int, limit: int) -> int:
    """The smallest of 1, 2, 3, 4, 6, 8, 12, 16, … (2^i and 3·2^i) that is ≥ `needed`,
    capped at `limit` (the unit's q completions never need more than q rows)."""
    bucket = 1
    while bucket < needed:  # 2^i → 2^i + 2^(i−1) → 2^(i+1)
        bucket = bucket + max(1, bucket // 2) if bucket & (bucket - 1) == 0 else bucket // 3 * 4
    return min(bucket, limit)


def first_fit(lengths: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """First-fit-decreasing placement of one unit's completions of `lengths` [q] (each
    ≤ width) into rows of `width`; returns (row [q], start [q]) of every completion."""
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


def rows_needed(lengths: np.ndarray, width: int) -> int:
    """The most rows any unit of `lengths` [U, q] needs under `first_fit` (≥ 1)."""
    return max([1] + [int(first_fit(unit, width)[0].max(initial=-1)) + 1 for unit in lengths])


def pack(tokens: np.ndarray, lengths: np.ndarray, rows: int) -> dict[str, np.ndarray]:
    """Pack the completions `tokens` [U, q, C] of `lengths` [U, q] into `rows` rows of C.

    Returns unit_tokens, unit_segments, unit_offsets [U, rows, C] int32 (padding: token 0,
    segment −1, offset 0) and packed_index [U·q, C] int32: the flat position in its unit's
    rows of every completion token, −1 past the completion's length.
    """
    u, q, c = tokens.shape
    out = {
        "unit_tokens": np.zeros((u, rows * c), np.int32),
        "unit_segments": np.full((u, rows * c), -1, np.int32),
        "unit_offsets": np.zeros((u, rows * c), np.int32),
    }
    index = np.full((u, q, c), -1, np.int32)
    for i in range(u):
        row, start = first_fit(lengths[i], c)
        if row.max(initial=0) >= rows:
            raise ValueError(f"unit {i} needs {row.max() + 1} rows of {c}; only {rows} given")
        for j in range(q):
            n = int(lengths[i, j])
            at = row[j] * c + start[j] + np.arange(n)
            out["unit_tokens"][i, at] = tokens[i, j, :n]
            out["unit_segments"][i, at] = j
            out["unit_offsets"][i, at] = np.arange(n)
            index[i, j, :n] = at
    out = {name: x.reshape(u, rows, c) for name, x in out.items()}
    out["packed_index"] = index.reshape(u * q, c)
    return out
