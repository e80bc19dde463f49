"""The host side of sampling: text or token-id prompts → left-padded buckets → the
compiled sampler (`sampler.make_sampler`) → completions on the host, decoded to text.

- `encode_prompts`, `left_pad`, `prompt_bucket`, `default_stop_token_ids`: tokenising,
  left padding with `sampler.PAD_ID`, the power-of-two prompt lengths (≥ 16) that keep the
  compiled shapes few, and a model's stop tokens;
- `sample_and_decode`: the one sample-then-decode path of training (each process samples
  and scores its own rows of the global batch), evaluation and `generate` (every process
  passes the same prompts and reads every row); `decode` turns completion tokens into text
  (token i of row r is part of the completion for i < lengths[r]; special tokens dropped);
- `sample_prompts`: token-id prompts of any lengths padded to their bucket and sampled by
  the model's cached sampler (evaluation's batches and `generate`);
- `generate`: K completions of each text prompt (`Rollouts`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from daro_jax import hosts
from daro_jax.data.prompts import build_prompt
from daro_jax.models.config import ModelConfig
from daro_jax.sampling.sampler import PAD_ID, make_sampler

END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>")
MIN_PROMPT_BUCKET = 16


def prompt_bucket(length: int) -> int:
    """The static prompt length used for `length` real tokens: the next power of two ≥ 16."""
    return max(MIN_PROMPT_BUCKET, 1 << max(0, int(length) - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class Rollouts:
    """B·K completions, prompt-major (the K samples of prompt 0 first); NumPy arrays.

    tokens, mask, logprobs, logprobs_full [B·K, N]; lengths, truncated [B·K]; texts: the
    completions decoded without special tokens; prompt_tokens, prompt_mask [B·K, P]: each
    row's prompt, left-padded, so concatenate(prompt_tokens, tokens) with
    concatenate(prompt_mask, mask) is the full sequence the trainer scores (positions =
    cumsum(mask) − 1).
    """

    tokens: np.ndarray
    mask: np.ndarray
    logprobs: np.ndarray
    logprobs_full: np.ndarray
    lengths: np.ndarray
    truncated: np.ndarray
    texts: list[str]
    prompt_tokens: np.ndarray
    prompt_mask: np.ndarray


def default_stop_token_ids(tokenizer, cfg: ModelConfig) -> tuple[int, ...]:
    """The model's EOS ids, the tokenizer's EOS and any chat end-of-turn token it knows.

    End-of-turn tokens: SmolLM2 and Qwen `<|im_end|>` (and `<|endoftext|>`), Llama 3
    `<|eot_id|>` (and `<|end_of_text|>`).
    """
    ids = set(cfg.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    ids.update(vocab[name] for name in END_OF_TURN_TOKENS if name in vocab)
    return tuple(sorted(ids))


def encode_prompts(tokenizer, prompts: Sequence[str], chat_template: bool) -> list[list[int]]:
    """Token ids of each prompt: as one user turn of the chat template (with the assistant
    header appended; `data.build_prompt`, the templating training uses), or the raw text
    with the tokenizer's special tokens."""
    if isinstance(prompts, str):
        raise TypeError("generate: prompts must be a list of strings, not one string.")
    ids = []
    for i, prompt in enumerate(prompts):
        if chat_template:
            text = build_prompt(tokenizer, prompt, instruction="")
            row = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            row = tokenizer(prompt)["input_ids"]
        if not row:
            raise ValueError(f"generate: prompt {i} encodes to no tokens; give a non-empty prompt.")
        ids.append(list(row))
    return ids


def left_pad(rows: Sequence[Sequence[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
    """[B, length] int32 tokens (PAD_ID on the left) and the mask of real tokens."""
    tokens = np.full((len(rows), length), PAD_ID, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        if len(row) > length:
            raise ValueError(f"prompt {i} has {len(row)} tokens, more than length={length}.")
        tokens[i, length - len(row) :] = row
        mask[i, length - len(row) :] = 1
    return tokens, mask


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
    (`left_pad`). per_process=True: they are this process's rows of the global
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


def sample_prompts(
    model,
    prompt_ids: Sequence[Sequence[int]],
    rng: jax.Array,
    *,
    stop_token_ids: Sequence[int] | None = None,
    **settings,
) -> tuple[dict, np.ndarray, np.ndarray]:
    """`sample_and_decode` of token-id prompts, every process passing the same ones: they
    are left-padded to the `prompt_bucket` of the longest, and sampled by the cached
    `sampler.make_sampler` of `model` (.config, .params, .tokenizer, .mesh; None: one
    device) with `settings` (k, max_new_tokens, temperature, top_p, top_k) and
    `stop_token_ids` (default: `default_stop_token_ids`; [] = always max_new_tokens).
    Returns (its outputs, prompt_tokens, prompt_mask [b, P])."""
    tokenizer, cfg = model.tokenizer, model.config
    prompt_tokens, prompt_mask = left_pad(
        prompt_ids, prompt_bucket(max(len(ids) for ids in prompt_ids))
    )
    if stop_token_ids is None:
        stop_token_ids = default_stop_token_ids(tokenizer, cfg)
    sample = make_sampler(
        cfg,
        prompt_len=prompt_tokens.shape[1],
        stop_token_ids=tuple(int(t) for t in stop_token_ids),
        mesh=model.mesh,
        **settings,
    )
    out = sample_and_decode(
        sample, model.params, prompt_tokens, prompt_mask, rng, tokenizer, per_process=False
    )
    return out, prompt_tokens, prompt_mask


def generate(
    model,
    prompts: list[str],
    *,
    k: int = 1,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    chat_template: bool = True,
    stop_token_ids: Sequence[int] | None = None,
) -> Rollouts:
    """K sampled completions of each prompt (temperature 0 = greedy); see `Rollouts`.

    `model` has .config, .params, .tokenizer and .mesh (daro_jax.models.load). Prompts are
    padded to a power-of-two bucket (≥ 16) so that few shapes are compiled. Stop tokens
    default to `default_stop_token_ids`; pass [] to always generate max_new_tokens. The run
    uses `model.mesh` (None: one device).
    """
    rows = encode_prompts(model.tokenizer, prompts, chat_template)
    out, prompt_tokens, prompt_mask = sample_prompts(
        model,
        rows,
        jax.random.key(seed),
        stop_token_ids=stop_token_ids,
        k=k,
        max_new_tokens=max_new_tokens,
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=int(top_k),
    )
    return Rollouts(
        **out,
        prompt_tokens=np.repeat(prompt_tokens, k, axis=0),
        prompt_mask=np.repeat(prompt_mask, k, axis=0),
    )
