"""Padded prompts → the compiled sampler → completions on the host, decoded to text.

The one sample-then-decode path of training (each process samples and scores its own rows
of the global batch), evaluation and `sampler.generate` (every process passes the same
prompts and reads every row): `sample_and_decode`. `decode` turns completion tokens into
text (token i of row r is part of the completion for i < lengths[r]; special tokens are
dropped).
"""

from __future__ import annotations

import jax
import numpy as np

from daro_jax import hosts


def decode(tokenizer, tokens: np.ndarray, lengths: np.ndarray) -> list[str]:
    """Text of each row's first lengths[r] tokens, without special tokens."""
    return tokenizer.batch_decode(
        [row[:n].tolist() for row, n in zip(tokens, lengths, strict=True)],
        skip_special_tokens=True,
    )


def sample_and_decode(
    sample,
    params,
    prompt_tokens: np.ndarray,
    prompt_mask: np.ndarray,
    rng: jax.Array,
    tokenizer,
    *,
    per_process: bool,
) -> dict[str, np.ndarray | list[str]]:
    """K completions of each prompt by `sample` (a `sampler.Sampler`), on the host, with
    their text.

    prompt_tokens, prompt_mask [b, P]: the prompts left-padded to `sample.prompt_len`
    (`sampler.left_pad`). per_process=True: they are this process's rows of the global
    batch (rows [p·b, (p+1)·b) of process p) and the result is this process's rows;
    per_process=False: every process passes the same prompts and gets every row.

    Returns NumPy arrays over the b·K rows, prompt-major (row i·K + j is sample j of
    prompt i): tokens, mask, logprobs, logprobs_full [b·K, N], lengths, truncated [b·K] (see
    `sampler.Sampler`), and texts, the b·K completions decoded (`decode`).
    """
    if per_process:
        prompt_tokens = hosts.to_global(prompt_tokens, sample.mesh, "prompt_tokens")
        prompt_mask = hosts.to_global(prompt_mask, sample.mesh, "prompt_mask")
    fetch = hosts.local_rows if per_process else hosts.to_host
    out = {n: fetch(x) for n, x in sample(params, prompt_tokens, prompt_mask, rng).items()}
    return out | {"texts": decode(tokenizer, out["tokens"], out["lengths"])}
