"""Prompts → the compiled sampler → completions on the host, decoded to text.

The one sample-then-decode path of training (each process samples and scores its own rows
of the global batch) and evaluation (every process passes the same prompts and reads every
row): `sample_and_decode`. `decode` turns completion tokens into text (token i of row r is
part of the completion for i < lengths[r]; special tokens are dropped).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from daro_jax import hosts, sampler


def decode(tokenizer, tokens: np.ndarray, lengths: np.ndarray) -> list[str]:
    """Text of each row's first lengths[r] tokens, without special tokens."""
    return tokenizer.batch_decode(
        [row[:n].tolist() for row, n in zip(tokens, lengths, strict=True)],
        skip_special_tokens=True,
    )


def sample_and_decode(
    sample: sampler.Sampler,
    params,
    prompt_ids: Sequence[Sequence[int]],
    rng: jax.Array,
    tokenizer,
    *,
    per_process: bool,
) -> dict:
    """K completions of each prompt by `sample`, on the host, with their text.

    The prompts are left-padded to `sample.prompt_len`. per_process=True: `prompt_ids` are
    this process's rows of the global batch (rows [p·b, (p+1)·b) of process p) and the
    result is this process's rows; per_process=False: every process passes the same
    prompts and gets every row.

    Returns NumPy arrays over the b·K rows, prompt-major (row i·K + j is sample j of
    prompt i): tokens, mask, logprobs [b·K, N], lengths, truncated [b·K] (see
    `sampler.Sampler`); prompt_tokens, prompt_mask [b, P]; and texts, the b·K completions
    decoded (`decode`).
    """
    prompt_tokens, prompt_mask = sampler.left_pad(prompt_ids, sample.prompt_len)
    tokens, mask = prompt_tokens, prompt_mask
    if per_process:
        tokens = hosts.to_global(prompt_tokens, sample.mesh, "prompt_tokens")
        mask = hosts.to_global(prompt_mask, sample.mesh, "prompt_mask")
    fetch = hosts.local_rows if per_process else hosts.to_host
    out = {name: fetch(x) for name, x in sample(params, tokens, mask, rng).items()}
    out["texts"] = decode(tokenizer, out["tokens"], out["lengths"])
    return out | {"prompt_tokens": prompt_tokens, "prompt_mask": prompt_mask}
