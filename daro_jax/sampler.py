"""Rollout generation: prefill each prompt once, then decode K samples from its KV cache.

One jitted function per static shape (prompt length bucket P, max new tokens N, K) does:

1. prefill: the B left-padded prompts run once through the decoder into a [L, B, P, KV, Dh]
   cache; the logits of each prompt's last position give the first sampled token;
2. rows r = b·K + j (sample j of prompt b: prompt-major) get room for N new tokens: on
   accelerators the cache is padded to S = P + N slots and repeated K times on the batch
   axis; on CPU (`models.decode`) the prompt part stays one per prompt, read once for its
   K rows, beside each row's own N slots (cache slot P + i − 1 below is own slot i − 1);
3. decode, in stages of static, halving row counts R = B·K, R/2, R/4, … down to `min_rows`
   (`stage_sizes`; multiples of the mesh's row shards; on CPU only, one stage elsewhere):
   stage j runs a `lax.while_loop` that feeds the token sampled at step i − 1 (position
   n_r + i − 1, cache slot P + i − 1, n_r = number of real prompt tokens of the row) and
   samples token i from the new logits,
   while i < N and more rows are live (no stop token yet) than the next stage holds (the
   last stage: while any is live). Between stages the live rows, in row order, are gathered
   with their cache, last token, prompt mask and original row ids into the next stage's
   smaller arrays (the rows left out are finished), so the decode steps after most rows
   stopped cost what the remaining rows cost. Each stage's token buffers are written into
   the full [R, N] buffers at its rows' ids when it ends. The loop state (cache, token
   buffers) is carried in place; nothing returns to the host until the last stage ends.

Completion conventions (what the trainer relies on):
- `tokens[r, i]` is the i-th completion token; the stop token itself is part of the
  completion (mask 1); every slot after it is padding: token `PAD_ID`, mask 0, logprob 0;
- `lengths[r] = Σ_i mask[r, i]`; `truncated[r]` is true when no stop token was emitted
  within N tokens;
- `logprobs[r, i] = log p(tokens[r, i])` under the distribution the token was drawn from:
  p = softmax(logits / T) restricted to the top-k and then the top-p nucleus and
  renormalised (so with T = 1 and no top-k/top-p it equals the training forward's
  log π_θ). For greedy decoding (T = 0) the distribution used is a point mass (log-prob 0),
  so the untempered model log-probability log softmax(logits)[argmax] is returned instead.

Randomness: token i of every row is drawn by inverse-CDF sampling with one uniform per row
from `fold_in(rng, i)` (one uniform per row instead of V Gumbel variables: threefry for
[B·K, V] numbers costs more than the rest of the selection on CPU). The R uniforms are drawn
for all rows at every step and each stage takes those of its rows, so a row's draws do not
depend on the stages. With JAX's partitionable threefry the uniforms do not depend on how
the rows are sharded, and each row's selection runs on one device (vocab gathered), so the
same seed gives the same samples on one device and on a mesh. The stages and meshes change
no operation of a row, but XLA may round a reduction differently at another row count or
sharding (ulps of the logits and CDF): a draw whose uniform lies within such ulps of a CDF
boundary then picks the neighbouring token.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding

from daro_jax import sharding
from daro_jax.models import decode, decoder
from daro_jax.models.config import ModelConfig

PAD_ID = 0
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>")
MIN_PROMPT_BUCKET = 16
SAMPLE_BLOCK = 256
# The smallest decode stage by default. SmolLM2-135M on 2 CPU cores: a decode step costs
# about 285/160/122/99 ms at 32/16/8/4 rows (reading the weights dominates below 8 rows).
MIN_STAGE_ROWS = 8


def _first_argmax(x: jnp.ndarray) -> jnp.ndarray:
    """argmax over the last axis (first index on ties), as max + min-index reductions
    (XLA on CPU runs these far faster than its two-operand argmax reduction)."""
    top = jnp.max(x, axis=-1, keepdims=True)
    index = lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where(x == top, index, x.shape[-1]), axis=-1)


def _last_positive(x: jnp.ndarray) -> jnp.ndarray:
    """The last index along the last axis where x > 0 (−1 if none)."""
    index = lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.max(jnp.where(x > 0, index, -1), axis=-1)


def _inverse_cdf(weights: jnp.ndarray, u: jnp.ndarray) -> jnp.ndarray:
    """Index i with c_{i−1} ≤ u < c_i, c = cumsum(weights) over the last axis (u ≥ 0).

    Rounding can only push the answer past the end: it is capped at the last positive
    weight, so a zero-weight index is never returned.
    """
    below = jnp.sum(jnp.cumsum(weights, axis=-1) <= u[..., None], axis=-1)
    return jnp.minimum(below, _last_positive(weights)).astype(jnp.int32)


def _sample(z: jnp.ndarray, uniforms: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """A draw from softmax(z) per row of z [N, V] (−∞ = excluded) and its log-probability.

    Inverse-CDF sampling at the uniform u ~ U[0, 1) of each row (`uniforms` [N]), in two
    levels so that no length-V scan is needed: w = exp(z − max z) in blocks of SAMPLE_BLOCK
    tokens; pick the block where the cumulative block mass passes u·Σw, then the token
    inside that block where the cumulative mass passes the remainder.
    log p = z_i − max z − log Σw.
    """
    n, vocab = z.shape
    top = jnp.max(z, axis=-1, keepdims=True)
    weights = jnp.exp(z - top)
    blocks = jnp.pad(weights, ((0, 0), (0, -vocab % SAMPLE_BLOCK))).reshape(n, -1, SAMPLE_BLOCK)
    block_mass = jnp.sum(blocks, axis=-1)
    total = jnp.sum(block_mass, axis=-1)
    u = uniforms * total
    block = _inverse_cdf(block_mass, u)
    before = jnp.sum(jnp.where(jnp.arange(block_mass.shape[1]) < block[:, None], block_mass, 0), -1)
    inside = jnp.take_along_axis(blocks, block[:, None, None], axis=1)[:, 0]
    tokens = block * SAMPLE_BLOCK + _inverse_cdf(inside, jnp.maximum(u - before, 0.0))
    chosen = jnp.take_along_axis(z, tokens[:, None], axis=-1)[:, 0]
    return tokens, chosen - top[:, 0] - jnp.log(total)


def select_tokens(
    logits: jnp.ndarray,
    key: jax.Array,
    *,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Draw one token per row of `logits` [N, V]; returns (tokens [N] int32, logprobs [N]).

    `select_with_uniforms` with the uniforms `jax.random.uniform(key, (N,))` (`key` is
    unused, and may be None, when T = 0).
    """
    uniforms = None
    if temperature != 0:
        uniforms = jax.random.uniform(key, (logits.shape[0],), jnp.float32)
    return select_with_uniforms(logits, uniforms, temperature=temperature, top_p=top_p, top_k=top_k)


def select_with_uniforms(
    logits: jnp.ndarray,
    uniforms: jnp.ndarray | None,
    *,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """One token per row of `logits` [N, V] by inverse CDF at the row's uniform in
    `uniforms` [N] ~ U[0, 1); returns (tokens [N] int32, logprobs [N]).

    z = logits / T; top-k keeps z_v ≥ the k-th largest z; top-p then keeps the smallest set
    of highest-probability tokens whose mass reaches top_p (token v is kept when the mass of
    the tokens strictly more likely than it is < top_p; ties at the threshold are kept);
    the token is drawn from softmax(z̃), z̃ = z on kept tokens and −∞ elsewhere, and its
    logprob is z̃_v − logsumexp(z̃). T = 0 is greedy (`uniforms` unused, may be None): the
    first argmax of the logits, with logprob under softmax(logits) (see the module
    docstring).
    """
    logits = logits.astype(jnp.float32)
    if temperature == 0:
        tokens = _first_argmax(logits)
        chosen = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
        return tokens, chosen - jax.nn.logsumexp(logits, axis=-1)
    z = logits / temperature
    vocab = z.shape[-1]
    ranked = None
    if 0 < top_k < vocab:
        ranked = lax.top_k(z, top_k)[0]
        z = jnp.where(z >= ranked[:, -1:], z, -jnp.inf)
    if top_p < 1.0:
        if ranked is None:
            ranked = -jnp.sort(-z, axis=-1)
        probs = jax.nn.softmax(ranked, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)
        threshold = jnp.take_along_axis(ranked, kept - 1, axis=-1)
        z = jnp.where(z >= threshold, z, -jnp.inf)
    return _sample(z, uniforms)


def prompt_bucket(length: int) -> int:
    """The static prompt length used for `length` real tokens: the next power of two ≥ 16."""
    return max(MIN_PROMPT_BUCKET, 1 << max(0, int(length) - 1).bit_length())


def _check_sampling_args(k, max_new_tokens, prompt_len, temperature, top_p, top_k) -> None:
    checks = (
        (k >= 1, f"k={k} must be ≥ 1"),
        (max_new_tokens >= 1, f"max_new_tokens={max_new_tokens} must be ≥ 1"),
        (prompt_len >= 1, f"prompt_len={prompt_len} must be ≥ 1"),
        (temperature >= 0, f"temperature={temperature} must be ≥ 0 (0 = greedy)"),
        (0 < top_p <= 1, f"top_p={top_p} must be in (0, 1] (1 = off)"),
        (top_k >= 0, f"top_k={top_k} must be ≥ 0 (0 = off)"),
    )
    for ok, message in checks:
        if not ok:
            raise ValueError(f"sampler: {message}.")


def stage_sizes(rows: int, min_rows: int, shards: int = 1) -> tuple[int, ...]:
    """The row counts of the decode stages: `rows`, then repeatedly half of the previous
    count rounded up to a multiple of `shards`, as long as that is smaller and ≥ min_rows."""
    sizes = [rows]
    half = -(-rows // (2 * shards)) * shards
    while min_rows <= half < sizes[-1]:
        sizes.append(half)
        half = -(-half // (2 * shards)) * shards
    return tuple(sizes)


def _constrain_cache(c: jnp.ndarray) -> jnp.ndarray:
    """Pin a stacked [L, B, KV, S, Dh] cache to the mesh."""
    return sharding.constrain(c, decoder.CACHE_LOGICAL_AXES)


class Sampler:
    """A compiled rollout function for one static shape; build it with `make_sampler`.

    `sampler(params, prompt_tokens [B, P], prompt_mask [B, P], rng)` returns a dict of
    device arrays over the B·K rows (prompt-major): tokens [B·K, N] int32, mask [B·K, N]
    int32, logprobs [B·K, N] float32, lengths [B·K] int32, truncated [B·K] bool. Prompts
    are left-padded (mask 1 on real tokens, each row with at least one). New params,
    prompts and keys of the same shapes reuse the compiled function; a new B compiles once.
    The decode runs in stages down to `min_rows` rows (see the module docstring and
    `stage_sizes`); min_rows ≥ B·K decodes all rows in one stage.

    On CPU the decode loop runs `decode.step` on the weights and cache in its layout
    (`decode.decode_params`: unstacked layers, matrices [out, in], keys slot-last; one copy
    of the weights per call), which streams them faster than the training layout. On
    accelerators `decoder.forward` scans the stacked layers (no second weight copy).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        k: int,
        max_new_tokens: int,
        prompt_len: int,
        temperature: float,
        top_p: float,
        top_k: int,
        stop_token_ids: tuple[int, ...],
        mesh: Mesh | None,
        min_rows: int = MIN_STAGE_ROWS,
    ):
        _check_sampling_args(k, max_new_tokens, prompt_len, temperature, top_p, top_k)
        if min_rows < 1:
            raise ValueError(f"sampler: min_rows={min_rows} must be ≥ 1.")
        bad = [t for t in stop_token_ids if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(
                f"sampler: stop_token_ids {bad} are outside the vocabulary [0, {cfg.vocab_size})."
            )
        self.cfg = cfg
        self.k = k
        self.max_new_tokens = max_new_tokens
        self.prompt_len = prompt_len
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.top_k = int(top_k)
        self.stop_token_ids = tuple(stop_token_ids)
        self.mesh = mesh
        self.min_rows = int(min_rows)
        self.param_shardings = None
        if mesh is not None:
            self.param_shardings = sharding.tree_shardings(
                decoder.param_logical_axes(cfg), decoder.param_shapes(cfg), mesh
            )
        devices = jax.devices()[:1] if mesh is None else mesh.devices.flat
        self.cpu_layout = all(d.platform == "cpu" for d in devices)
        self.jitted = jax.jit(self._rollout)

    def __call__(self, params, prompt_tokens, prompt_mask, rng) -> dict[str, jax.Array]:
        b, p = np.shape(prompt_tokens)
        if p != self.prompt_len or np.shape(prompt_mask) != (b, p):
            raise ValueError(
                f"sampler: prompt_tokens {np.shape(prompt_tokens)} and prompt_mask "
                f"{np.shape(prompt_mask)} must both be [B, prompt_len={self.prompt_len}]; "
                "pad the prompts (on the left) to the sampler's prompt_len."
            )
        prompt_tokens = jnp.asarray(prompt_tokens, jnp.int32)
        prompt_mask = jnp.asarray(prompt_mask, jnp.int32)
        if self.mesh is not None:
            batch = NamedSharding(
                self.mesh, sharding.logical_spec(("batch", "length"), (b, p), self.mesh)
            )
            params = jax.device_put(params, self.param_shardings)
            prompt_tokens, prompt_mask = jax.device_put((prompt_tokens, prompt_mask), batch)
            rng = jax.device_put(rng, NamedSharding(self.mesh, jax.sharding.PartitionSpec()))
        return self.jitted(params, prompt_tokens, prompt_mask, rng)

    def stage_sizes(self, rows: int) -> tuple[int, ...]:
        """The decode stages' row counts for B·K = `rows` (see `stage_sizes`): multiples of
        the number of shards the mesh splits `rows` rows into. One stage off CPU: the gain
        there is unmeasured, and the memory plan models one stage's cache."""
        if not self.cpu_layout:
            return (rows,)
        shards = 1
        if self.mesh is not None:
            axes = sharding.logical_spec(("batch",), (rows,), self.mesh)[0]
            axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
            shards = math.prod(self.mesh.shape[a] for a in axes)
        return stage_sizes(rows, self.min_rows, shards)

    def _rollout(self, params, prompt_tokens, prompt_mask, rng):
        if self.mesh is None:
            return self._decode(params, prompt_tokens, prompt_mask, rng)
        with sharding.use_mesh(self.mesh):
            return self._decode(params, prompt_tokens, prompt_mask, rng)

    def _select(self, logits, rng, step, ids, rows):
        """Tokens of one step for the rows `ids` of all `rows`: each row's whole logits on
        one device and the row's uniform of `uniform(fold_in(rng, step), (rows,))`."""
        uniforms = None
        if self.temperature != 0:
            uniforms = jax.random.uniform(jax.random.fold_in(rng, step), (rows,), jnp.float32)
            uniforms = uniforms[ids]
        return select_with_uniforms(
            sharding.constrain(logits, ("batch", None)),
            uniforms,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
        )

    def _decode(self, params, prompt_tokens, prompt_mask, rng):
        cfg, k, n_new, p = self.cfg, self.k, self.max_new_tokens, self.prompt_len
        rows = prompt_tokens.shape[0] * k
        hidden, cache = decoder.prefill(params, cfg, prompt_tokens, prompt_mask)
        logits = decoder.lm_logits(params, cfg, hidden[:, -1])

        if self.cpu_layout:
            params = decode.decode_params(params, cfg)
            cache = decode.decode_cache(cache, prompt_mask, k, n_new)
        else:
            expand = lambda c: _constrain_cache(decoder.repeat_cache(c, k, n_new))  # noqa: E731
            cache = jax.tree.map(expand, cache)
        logits = jnp.repeat(logits, k, axis=0)
        stop_ids = jnp.asarray(self.stop_token_ids, jnp.int32)
        by_row = lambda x: sharding.constrain(x, ("batch",) + (None,) * (x.ndim - 1))  # noqa: E731

        def record(state, step, tokens, logp):
            """Write the step's tokens (padding on rows already stopped) into the buffers."""
            live = ~state["done"]
            tokens = jnp.where(live, tokens, PAD_ID)
            column = lambda buf, x: lax.dynamic_update_slice_in_dim(buf, x[:, None], step, 1)  # noqa: E731
            return state | {
                "tokens": column(state["tokens"], tokens),
                "logprobs": column(state["logprobs"], jnp.where(live, logp, 0.0)),
                "mask": column(state["mask"], live.astype(jnp.int32)),
                "done": state["done"] | (live & jnp.isin(tokens, stop_ids)),
                "last": tokens,
            }

        def next_logits(cache, last, positions, mask, step):
            """The logits after token `step` − 1 (`last` [R], at `positions`) and the cache
            with its key and value written (new slot step − 1; `mask`: the prompt mask)."""
            if self.cpu_layout:
                hidden, cache = decode.step(params, cfg, last, positions, cache, step - 1)
                return decode.logits(params, hidden), cache
            new = jnp.broadcast_to(jnp.arange(n_new) < step, (mask.shape[0], n_new))
            hidden, cache = decoder.forward(
                params, cfg, last[:, None], positions[:, None], jnp.concatenate([mask, new], 1),
                cache, p + step - 1,
            )  # fmt: skip
            return decoder.lm_logits(params, cfg, hidden[:, 0]), jax.tree.map(
                _constrain_cache, cache
            )

        def run_stage(state, rows_in, next_size):
            """Decode the stage's rows while steps remain and more than `next_size` live."""
            ids, mask, position = rows_in["ids"], rows_in["prompt_mask"], rows_in["position"]

            def cond(state):
                return (state["step"] < n_new) & (jnp.sum(~state["done"]) > next_size)

            def body(state):
                step = state["step"]
                logits, cache = next_logits(
                    state["cache"], state["last"], position + step - 1, mask, step
                )
                tokens, logp = self._select(logits, rng, step, ids, rows)
                new = record(state, step, tokens, logp)
                return new | {"cache": cache, "step": step + 1}

            return lax.while_loop(cond, body, state)

        written = ("tokens", "logprobs", "mask", "done")

        def write_back(out, state, rows_in):
            """The full [B·K, ..] buffers with the stage's rows written at their ids."""
            return {name: out[name].at[rows_in["ids"]].set(state[name]) for name in written}

        def shrink(state, rows_in, size):
            """The first `size` rows of the stage, the live ones first (in row order)."""
            keep = jnp.argsort(state["done"].astype(jnp.int32), stable=True)[:size]
            state = {name: by_row(state[name][keep]) for name in empty} | {
                "cache": decode.take_rows(state["cache"], keep),
                "step": state["step"],
            }
            return state, {name: by_row(x[keep]) for name, x in rows_in.items()}

        empty = {
            "tokens": jnp.full((rows, n_new), PAD_ID, jnp.int32),
            "logprobs": jnp.zeros((rows, n_new), jnp.float32),
            "mask": jnp.zeros((rows, n_new), jnp.int32),
            "done": jnp.zeros((rows,), bool),
            "last": jnp.zeros((rows,), jnp.int32),
        }
        empty = {name: by_row(x) for name, x in empty.items()}
        prompt_mask = jnp.repeat(prompt_mask, k, axis=0)
        rows_in = {
            "ids": by_row(jnp.arange(rows, dtype=jnp.int32)),
            "prompt_mask": prompt_mask,
            "position": jnp.sum(prompt_mask, axis=-1),
        }
        tokens, logp = self._select(logits, rng, 0, rows_in["ids"], rows)
        state = record(empty, 0, tokens, logp) | {"cache": cache, "step": jnp.int32(1)}
        out = {name: empty[name] for name in written}
        sizes = self.stage_sizes(rows)
        for size, next_size in zip(sizes, (*sizes[1:], 0), strict=True):
            if size < rows:
                out = write_back(out, state, rows_in)
                state, rows_in = shrink(state, rows_in, size)
            state = run_stage(state, rows_in, next_size)
        out = write_back(out, state, rows_in)
        return {
            "tokens": out["tokens"],
            "mask": out["mask"],
            "logprobs": out["logprobs"],
            "lengths": jnp.sum(out["mask"], axis=-1),
            "truncated": ~out["done"],
        }


@functools.lru_cache(maxsize=32)
def make_sampler(
    cfg: ModelConfig,
    *,
    k: int,
    max_new_tokens: int,
    prompt_len: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_token_ids: tuple[int, ...] = (),
    mesh: Mesh | None = None,
    min_rows: int = MIN_STAGE_ROWS,
) -> Sampler:
    """The (cached) compiled sampler for these static settings; see `Sampler`.

    `min_rows`: the smallest decode stage (`stage_sizes`). Under `mesh`, params are placed
    with the decoder's logical-axis shardings (a no-op when they already are), rows are
    split over ("data", "fsdp") and heads over "tensor", and the KV cache follows
    `decoder.CACHE_LOGICAL_AXES`.
    """
    return Sampler(
        cfg,
        k=k,
        max_new_tokens=max_new_tokens,
        prompt_len=prompt_len,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        stop_token_ids=tuple(int(t) for t in stop_token_ids),
        mesh=mesh,
        min_rows=min_rows,
    )


@dataclasses.dataclass(frozen=True)
class Rollouts:
    """B·K completions, prompt-major (the K samples of prompt 0 first); NumPy arrays.

    tokens, mask, logprobs [B·K, N]; lengths, truncated [B·K]; texts: the completions
    decoded without special tokens; prompt_tokens, prompt_mask [B·K, P]: each row's prompt,
    left-padded, so concatenate(prompt_tokens, tokens) with concatenate(prompt_mask, mask)
    is the full sequence the trainer scores (positions = cumsum(mask) − 1).
    """

    tokens: np.ndarray
    mask: np.ndarray
    logprobs: np.ndarray
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
    header appended), or the raw text with the tokenizer's special tokens."""
    if isinstance(prompts, str):
        raise TypeError("generate: prompts must be a list of strings, not one string.")
    ids = []
    for i, prompt in enumerate(prompts):
        if chat_template:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
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

    `model` has .config, .params, .tokenizer and .mesh (daro_jax.models.load). Prompts are padded
    to a power-of-two bucket (≥ 16) so that few shapes are compiled. Stop tokens default to
    `default_stop_token_ids`; pass [] to always generate max_new_tokens. The run uses
    `model.mesh` (None: one device).
    """
    tokenizer, cfg = model.tokenizer, model.config
    rows = encode_prompts(tokenizer, prompts, chat_template)
    prompt_tokens, prompt_mask = left_pad(rows, prompt_bucket(max(len(r) for r in rows)))
    if stop_token_ids is None:
        stop_token_ids = default_stop_token_ids(tokenizer, cfg)
    sampler = make_sampler(
        cfg,
        k=k,
        max_new_tokens=max_new_tokens,
        prompt_len=prompt_tokens.shape[1],
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=int(top_k),
        stop_token_ids=tuple(int(t) for t in stop_token_ids),
        mesh=model.mesh,
    )
    out = jax.device_get(sampler(model.params, prompt_tokens, prompt_mask, jax.random.key(seed)))
    texts = [
        tokenizer.decode(row[:n].tolist(), skip_special_tokens=True)
        for row, n in zip(out["tokens"], out["lengths"], strict=True)
    ]
    return Rollouts(
        tokens=out["tokens"],
        mask=out["mask"],
        logprobs=out["logprobs"],
        lengths=out["lengths"],
        truncated=out["truncated"],
        texts=texts,
        prompt_tokens=np.repeat(prompt_tokens, k, axis=0),
        prompt_mask=np.repeat(prompt_mask, k, axis=0),
    )
