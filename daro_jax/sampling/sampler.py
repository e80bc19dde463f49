"""Rollout generation: prefill each prompt once, then decode K samples that share its cache.

One jitted function per static shape (prompt length bucket P, max new tokens N, K):

1. prefill: the B left-padded prompts run once through the decoder (`decoder.prefill`);
   the logits of each prompt's last position give its K samples' first tokens;
2. rows r = b·K + j (sample j of prompt b, prompt-major) decode with `models.kv_cache`:
   each prompt's keys and values held once and read by its K rows, beside each row's N
   own slots (B·P + B·K·N cache slots);
3. decode in stages of halving row counts R = B·K, R/2, … ≥ `min_rows` (`stage_sizes`,
   multiples of the S data × fsdp row shards): a `lax.while_loop` feeds token i − 1 (own
   slot i − 1) and draws token i while i < N and some shard has more live rows than its
   share of the next stage; then each shard's live rows, in row order, are gathered with
   their caches (inside the shard) into the next stage's smaller arrays, so the steps after
   most rows stopped cost what the remaining rows cost. Nothing returns to the host;
4. inside each row stage, one loop per slot stage (`Sampler.slot_stages`: N/4, N/2, N own
   slots): the loop of length S runs the steps i ≤ S and reads only the first S own slots
   of the cache (static slices), so early steps do not read the empty slots.

Completion conventions (what the trainer relies on):
- `tokens[r, i]` is the i-th completion token; the stop token is part of the completion
  (mask 1); every slot after it is padding: token `PAD_ID`, mask 0, logprob 0;
- `lengths[r] = Σ_i mask[r, i]`; `truncated[r]`: no stop token within N tokens;
- `logprobs[r, i] = log p(tokens[r, i])` under the distribution it was drawn from
  (`selection`: with T = 1 and no top-k/top-p, the training forward's log π_θ); greedy
  (T = 0) returns the model's log softmax(logits)[argmax]; `logprobs_full[r, i]`: the same
  token under the untruncated softmax(logits / T), the distribution the trainer scores
  (equal to `logprobs` without top-p / top-k; padding 0).

Randomness: token i of each row is drawn at that row's entry of uniform(fold_in(rng, i),
(B·K,)), whatever the stage or the mesh, so a seed gives the same samples up to XLA's
rounding of reductions at another row count or sharding (a draw within ulps of a CDF
boundary may then pick the neighbouring token).

Entry points: `make_sampler` (a `Sampler`), `stage_sizes`. The host side (tokenising,
left padding, stop ids, prompt buckets, `generate`) is `daro_jax.sampling.completions`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from daro_jax import sharding
from daro_jax.models import decoder, kv_cache
from daro_jax.models.config import ModelConfig
from daro_jax.models.model import param_shardings
from daro_jax.sampling.selection import select_both

PAD_ID = 0
MIN_STAGE_ROWS = 8  # default smallest decode stage: max(8, B·K / 8), at most 4 stages
SLOT_TILE = 128  # slot stages are multiples of a TPU tile's 128 lanes


def _check(cfg, k, new, prompt, temperature, top_p, top_k, min_rows, min_slots, stop) -> None:
    """A ValueError naming the first sampler setting out of its range."""
    bad = [t for t in stop if not 0 <= t < cfg.vocab_size]
    checks = (
        (k >= 1, f"k={k} must be ≥ 1"),
        (new >= 1, f"max_new_tokens={new} must be ≥ 1"),
        (prompt >= 1, f"prompt_len={prompt} must be ≥ 1"),
        (temperature >= 0, f"temperature={temperature} must be ≥ 0 (0 = greedy)"),
        (0 < top_p <= 1, f"top_p={top_p} must be in (0, 1] (1 = off)"),
        (top_k >= 0, f"top_k={top_k} must be ≥ 0 (0 = off)"),
        (min_rows is None or min_rows >= 1, f"min_rows={min_rows} must be ≥ 1"),
        (min_slots is None or min_slots >= 1, f"min_slots={min_slots} must be ≥ 1"),
        (not bad, f"stop_token_ids {bad} are outside the vocabulary [0, {cfg.vocab_size})"),
    )
    for ok, message in checks:
        if not ok:
            raise ValueError(f"sampler: {message}.")


def stage_sizes(rows: int, min_rows: int, shards: int = 1) -> tuple[int, ...]:
    """The row counts of the decode stages: `rows`, then repeatedly half of the previous
    count rounded up to a multiple of `shards`, as long as that is smaller and ≥ min_rows
    (the slot stages' lengths too, longest first: `Sampler.slot_stages`)."""
    sizes = [rows]
    half = -(-rows // (2 * shards)) * shards
    while min_rows <= half < sizes[-1]:
        sizes.append(half)
        half = -(-half // (2 * shards)) * shards
    return tuple(sizes)


def _by_row(x: jnp.ndarray) -> jnp.ndarray:
    return sharding.constrain(x, ("batch",) + (None,) * (x.ndim - 1))


class Sampler:
    """A compiled rollout function for one static shape; build it with `make_sampler`.

    `sampler(params, prompt_tokens [B, P], prompt_mask [B, P], rng)` returns a dict of
    device arrays over the B·K rows (prompt-major): tokens [B·K, N] int32, mask [B·K, N]
    int32, logprobs and logprobs_full [B·K, N] float32, lengths [B·K] int32, truncated
    [B·K] bool. Prompts
    are left-padded (mask 1 on real tokens, each row with at least one). New params,
    prompts and keys of the same shapes reuse the compiled function; a new B compiles once.
    Stop tokens end a row (none: always N tokens); `min_rows`: the smallest decode stage
    (`stage_sizes`; ≥ B·K: one stage; None: max(8, B·K / 8), at most four stages, each of
    which compiles its own decode loop); `min_slots`: the shortest slot stage
    (`slot_stages`; ≥ N: one stage).
    """

    def __init__(
        self,
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
        min_rows: int | None = None,
        min_slots: int | None = None,
    ):
        settings = (max_new_tokens, prompt_len, temperature, top_p, top_k, min_rows, min_slots)
        _check(cfg, k, *settings, stop_token_ids)
        self.cfg = cfg
        self.k = k
        self.max_new_tokens = max_new_tokens
        self.prompt_len = prompt_len
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.top_k = int(top_k)
        self.stop_token_ids = tuple(int(t) for t in stop_token_ids)
        self.mesh = mesh
        self.min_rows = min_rows
        self.min_slots = min_slots
        self.param_shardings = None if mesh is None else param_shardings(cfg, mesh)
        self.row_shards = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]  # S
        self.jitted = jax.jit(sharding.on_mesh(self._decode, mesh))

    def __call__(self, params, prompt_tokens, prompt_mask, rng) -> dict[str, jax.Array]:
        b, p = np.shape(prompt_tokens)
        if p != self.prompt_len or np.shape(prompt_mask) != (b, p):
            raise ValueError(
                f"sampler: prompt_tokens {np.shape(prompt_tokens)} and prompt_mask "
                f"{np.shape(prompt_mask)} must both be [B, prompt_len={self.prompt_len}]; "
                "pad the prompts (on the left) to the sampler's prompt_len."
            )
        prompts = (jnp.asarray(prompt_tokens, jnp.int32), jnp.asarray(prompt_mask, jnp.int32))
        if self.mesh is not None:
            spec = sharding.logical_spec(
                ("batch", "length"), (b, p), self.mesh, what="prompts", replicate_indivisible=True
            )
            params = jax.device_put(params, self.param_shardings)
            prompts = jax.device_put(prompts, NamedSharding(self.mesh, spec))
            rng = jax.device_put(rng, NamedSharding(self.mesh, PartitionSpec()))
        return self.jitted(params, *prompts, rng)

    def stage_sizes(self, rows: int) -> tuple[int, ...]:
        """The decode stages' row counts for B·K = `rows` (`stage_sizes`), in multiples of
        the row shards."""
        smallest = self.min_rows or max(MIN_STAGE_ROWS, -(-rows // 8))
        return stage_sizes(rows, smallest, self.row_shards)

    def slot_stages(self) -> tuple[int, ...]:
        """The own slots each decode loop reads, shortest first: `stage_sizes` of N in
        multiples of SLOT_TILE down to `min_slots` (None: max(SLOT_TILE, N / 4), at most
        three stages, each a decode loop compiled per row stage), reversed. The loop of
        length S runs the steps i ≤ S (token i − 1 goes to slot i − 1 < S), so a step reads
        at most twice its valid slots beyond the smallest stage; over a whole decode of N
        steps, with three stages, 0.69 N slots on average where 0.5 N are valid."""
        n = self.max_new_tokens
        smallest = self.min_slots or max(SLOT_TILE, -(-n // 4))
        return stage_sizes(n, smallest, SLOT_TILE)[::-1]

    def decode_trips(self, rows: int) -> tuple[int, ...]:
        """The steps each decode loop runs, in the order they run, when no row stops: the
        first row stage's slot stages share the N − 1 steps, later row stages run none."""
        n, ends = self.max_new_tokens, [1]
        ends += [min(read + 1, n) for read in self.slot_stages()]
        first = tuple(int(d) for d in np.diff(ends))
        return first + (0,) * (len(first) * (len(self.stage_sizes(rows)) - 1))

    def _select(self, logits, rng, step, ids, rows):
        """Tokens of one step for the rows `ids` of all `rows`, with their logprobs and full
        logprobs (`selection.select_both`): each row's whole logits on one device and the
        row's uniform of `uniform(fold_in(rng, step), (rows,))`. The logits are first pinned
        split over "vocab" as the split output matrix gives them, so that it is the rows'
        [R, V] logits that are gathered: unpinned, libtpu for v5e gathered the whole output
        matrix (1 GiB for the 7B) at every decode step instead (bench/RESULTS.md)."""
        uniforms = None
        if self.temperature != 0:
            uniforms = jax.random.uniform(jax.random.fold_in(rng, step), (rows,), jnp.float32)
            uniforms = uniforms[ids]
        split = sharding.constrain(logits, ("batch", "vocab"))
        return select_both(
            sharding.constrain(split, ("batch", None)),
            uniforms,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
        )

    def _decode(self, params, prompt_tokens, prompt_mask, rng):
        """Prefill, the first token, then the decode stages: for each row stage (the first
        one all rows, the next ones the live rows gathered, `_shrink`), one loop per slot
        stage (`_run_stage`); the rows' buffers written back after each row stage."""
        cfg, k, n_new = self.cfg, self.k, self.max_new_tokens
        rows = prompt_tokens.shape[0] * k
        hidden, prompt_kv = decoder.prefill(params, cfg, prompt_tokens, prompt_mask)
        logits = jnp.repeat(decoder.lm_logits(params, cfg, hidden[:, -1]), k, axis=0)
        dparams, cache = kv_cache.start(params, cfg, prompt_kv, prompt_mask, k, n_new)
        rows_in = {
            "ids": _by_row(jnp.arange(rows, dtype=jnp.int32)),
            "position": _by_row(jnp.repeat(jnp.sum(prompt_mask, axis=-1), k)),
        }
        empty = _empty_buffers(rows, n_new)
        drawn = self._select(logits, rng, 0, rows_in["ids"], rows)
        state = self._record(empty, 0, *drawn) | {"cache": cache, "step": jnp.int32(1)}
        out = {name: empty[name] for name in WRITTEN}
        shards = self.row_shards if rows % self.row_shards == 0 else 1  # else: one stage
        sizes = self.stage_sizes(rows)
        for size, next_size in zip(sizes, (*sizes[1:], 0), strict=True):
            if size < rows:
                out = _write_back(out, state, rows_in)
                state, rows_in = _shrink(state, rows_in, size, shards)
            for read in self.slot_stages():
                run = (dparams, rng, rows, rows_in, next_size // shards, shards, read)
                state = self._run_stage(state, *run)
        out = _write_back(out, state, rows_in)
        return {
            "tokens": out["tokens"],
            "mask": out["mask"],
            "logprobs": out["logprobs"],
            "logprobs_full": out["logprobs_full"],
            "lengths": jnp.sum(out["mask"], axis=-1),
            "truncated": ~out["done"],
        }

    def _run_stage(self, state, dparams, rng, rows, rows_in, next_live, shards, read):
        """Decode the stage's rows while the step i < N reads own slots < `read` (i ≤
        read) and some shard has more than `next_live` live rows: step i feeds token i − 1
        (own slot i − 1) and draws token i."""
        last_step = min(read + 1, self.max_new_tokens)

        def go_on(state):
            live = jnp.sum(~state["done"].reshape(shards, -1), axis=1)
            return (state["step"] < last_step) & (jnp.max(live) > next_live)

        def one_step(state):
            step = state["step"]
            positions = rows_in["position"] + step - 1
            logits, cache = kv_cache.step(
                dparams, self.cfg, state["cache"], state["last"], positions, step - 1, read
            )
            drawn = self._select(logits, rng, step, rows_in["ids"], rows)
            return self._record(state, step, *drawn) | {"cache": cache, "step": step + 1}

        return lax.while_loop(go_on, one_step, state)

    def _record(self, state, step, tokens, logp, logp_full):
        """Write the step's tokens (padding on rows already stopped) into the buffers."""
        live = ~state["done"]
        tokens = jnp.where(live, tokens, PAD_ID)
        stop = jnp.isin(tokens, jnp.asarray(self.stop_token_ids, jnp.int32))
        column = lambda buf, x: lax.dynamic_update_slice_in_dim(buf, x[:, None], step, 1)  # noqa: E731
        return state | {
            "tokens": column(state["tokens"], tokens),
            "logprobs": column(state["logprobs"], jnp.where(live, logp, 0.0)),
            "logprobs_full": column(state["logprobs_full"], jnp.where(live, logp_full, 0.0)),
            "mask": column(state["mask"], live.astype(jnp.int32)),
            "done": state["done"] | (live & stop),
            "last": tokens,
        }


# The row buffers the rollout returns.
WRITTEN = ("tokens", "logprobs", "logprobs_full", "mask", "done")


def _empty_buffers(rows: int, n_new: int) -> dict:
    """The rows' buffers before the first token: all padding, none done."""
    empty = {
        "tokens": jnp.full((rows, n_new), PAD_ID, jnp.int32),
        "logprobs": jnp.zeros((rows, n_new), jnp.float32),
        "logprobs_full": jnp.zeros((rows, n_new), jnp.float32),
        "mask": jnp.zeros((rows, n_new), jnp.int32),
        "done": jnp.zeros((rows,), bool),
        "last": jnp.zeros((rows,), jnp.int32),
    }
    return {name: _by_row(x) for name, x in empty.items()}


def _write_back(out: dict, state: dict, rows_in: dict) -> dict:
    """The full [B·K, ..] buffers with the stage's rows written at their ids."""
    return {name: out[name].at[rows_in["ids"]].set(state[name]) for name in WRITTEN}


def _shrink(state: dict, rows_in: dict, size: int, shards: int) -> tuple[dict, dict]:
    """The first size / S rows of each of the S row shards, the live ones first (in row
    order), with their caches; the gathers stay inside each shard (`kv_cache.take_local`)."""
    done = state["done"].reshape(shards, -1)
    keep = jnp.argsort(done.astype(jnp.int32), axis=1, stable=True)[:, : size // shards]
    keep = keep + done.shape[1] * jnp.arange(shards)[:, None]
    take = lambda x: _by_row(kv_cache.take_local(x, keep))  # noqa: E731
    buffers = (*WRITTEN, "last")
    state = {name: take(state[name]) for name in buffers} | {
        "cache": kv_cache.take_rows(state["cache"], keep),
        "step": state["step"],
    }
    return state, {name: take(x) for name, x in rows_in.items()}


@functools.lru_cache(maxsize=32)
def make_sampler(cfg: ModelConfig, **settings) -> Sampler:
    """The (cached) compiled `Sampler` of `cfg` for these static settings (its keyword
    arguments). Under a mesh, params are placed with the decoder's logical-axis shardings
    (a no-op when they already are), rows split over ("data", "fsdp") and key/value heads
    over "tensor"."""
    return Sampler(cfg, **settings)
