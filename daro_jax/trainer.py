"""The RL loop: sample → verify → group → update, laid out in big_vision's order.

One RL step s (B prompts per global batch, K responses each):

1. prompts: this process's slice of the global batch (`data.PromptIterator`);
2. rollouts: the jitted sampler, K per prompt from one prefill, key fold_in(seed, s);
3. rewards: the verifier process pool on the decoded texts (beside the accelerator);
4. pass-rate groups and advantages (`losses.group_advantages`, on the global batch);
   with DAPO's dynamic sampling, prompts with μ ∈ {0, 1} are dropped and more are drawn,
   up to `algo.dynamic_sampling_max_tries` batches; free rows are padding (mask 0);
5. old-policy logprobs are recomputed only when the step makes several updates
   (ppo_epochs × minibatches > 1); with one update the step is on-policy and
   old_logp = stop_gradient(logp) exactly, so the importance ratio is exactly 1.
   Reference logprobs are computed when the KL term is on;
6. ppo_epochs × minibatches jitted updates (donated state), each accumulating the
   gradient over micro-batches with `lax.scan`; the loss normalisers come from the whole
   minibatch (losses.token_batch), so micro-batching is exact;
7. metrics to TensorBoard (process 0) and the console; a checkpoint every
   `train.ckpt_every` steps, at the end, and on SIGTERM.

Log-probabilities in the update use logits / T with the sampling temperature T, exactly as
the sampler does. Each prompt (left-padded to a fixed length P for the whole run) is
forwarded once into a KV cache; its completions, packed back to back into rows of N =
max_new_tokens positions (`daro_jax.packing`), attend to it. Only the number of packed rows
per unit changes from step to step (a bucket of 1, 2, 3, 4, 6, 8, … rows), so the update
compiles at most 2·log2(q) + 1 times; per-token arrays of the loss stay [B·K, N].
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from daro_jax import (
    checkpoint,
    data,
    evaluation,
    losses,
    metrics,
    models,
    optim,
    packing,
    rewards,
    sampler,
    sharding,
)
from daro_jax.models import decoder
from daro_jax.models.config import ModelConfig

# ---------------------------------------------------------------------------------------
# Global arrays over the mesh (multi-host: each process holds its rows).


def batch_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    names = ("batch",) + (None,) * (len(shape) - 1)
    return NamedSharding(mesh, sharding.logical_spec(names, shape, mesh))


def to_global(local: np.ndarray, mesh: Mesh) -> jax.Array:
    """The global array whose rows are every process's `local` rows, in process order."""
    local = np.asarray(local)
    shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
    return jax.make_array_from_process_local_data(batch_sharding(mesh, shape), local, shape)


def to_local(x: jax.Array) -> np.ndarray:
    """This process's rows of a global row-sharded array (all of it on one process)."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    shards = {s.index[0].start or 0: s for s in x.addressable_shards}
    rows = np.concatenate([np.asarray(shards[start].data) for start in sorted(shards)])
    if rows.shape[0] == x.shape[0]:  # replicated rows: take this process's slice
        n = x.shape[0] // jax.process_count()
        rows = rows[jax.process_index() * n : (jax.process_index() + 1) * n]
    return rows


# ---------------------------------------------------------------------------------------
# The jitted update.


@dataclasses.dataclass(frozen=True)
class UpdateSettings:
    """Static settings of the compiled update and logprob functions.

    The update computes each prompt once and lets its completions attend to the prompt's
    KV cache: a micro-batch holds `micro_prompts` units of one prompt with
    `completions_per_unit` (q) of its K completions (see `sharding.completions_per_unit`),
    packed into rows (`daro_jax.packing`).
    """

    cfg: ModelConfig
    spec: losses.AlgoSpec
    temperature: float
    micro_prompts: int  # units per micro-batch
    completions_per_unit: int  # q, a divisor of K
    on_policy: bool


def _microbatches(x: jax.Array, size: int) -> jax.Array:
    """[N, ...] → [N / size, size, ...], micro-batch j holding rows j, j + N/size, …

    Strided, so that each micro-batch stays spread over the batch-sharded devices.
    """
    n = x.shape[0]
    return x.reshape(size, n // size, *x.shape[1:]).swapaxes(0, 1)


def _row_units(x: jax.Array, s: UpdateSettings) -> jax.Array:
    """A row array [N, ...] → [n_mb, micro_prompts, q, ...]: unit u holds rows u·q … u·q+q−1
    (q completions of prompt u // (K/q)), micro-batches strided over the units."""
    q = s.completions_per_unit
    return _microbatches(x.reshape(x.shape[0] // q, q, *x.shape[1:]), s.micro_prompts)


def _unit_microbatches(batch: dict, s: UpdateSettings, k: int) -> dict:
    """`_row_units` of the row arrays; prompt arrays [N / K, P] → [n_mb, micro_prompts, P],
    each prompt repeated for its K/q units; unit arrays ("unit_*", [N / q, ...]) →
    [n_mb, micro_prompts, ...]."""
    repeats = k // s.completions_per_unit

    def split(name, x):
        if name.startswith("prompt_"):
            return _microbatches(jnp.repeat(x, repeats, axis=0), s.micro_prompts)
        if name.startswith("unit_"):
            return _microbatches(x, s.micro_prompts)
        return _row_units(x, s)

    return {name: split(name, x) for name, x in batch.items()}


def _from_microbatches(x: jax.Array) -> jax.Array:
    """Inverse of the row part of `_unit_microbatches`: [n_mb, m, q, C] → [N, C]."""
    return x.swapaxes(0, 1).reshape(-1, x.shape[-1])


_MODEL_INPUTS = (
    "prompt_tokens",
    "prompt_mask",
    "unit_tokens",
    "unit_segments",
    "unit_offsets",
    "packed_index",
)


def sequence_logprobs(params, inputs: dict, s: UpdateSettings):
    """log π(o_t | prompt, o_<t) and entropy of softmax(logits / T) at every completion
    position.

    inputs (`_MODEL_INPUTS`): prompt_tokens, prompt_mask [m, P] (left-padded); each prompt's
    q completions packed into r rows of W positions, unit_tokens, unit_segments,
    unit_offsets [m, r, W], and packed_index [m, q, C] (`packing.pack`). Each prompt is
    forwarded once into a KV cache, repeated for its r rows; packed token i of completion j
    sits at position n_prompt + offset_i and attends to the prompt and to the tokens of
    completion j before it (gradients flow through the cache to the prompt's forward),
    which equals the forward of each [prompt | completion] sequence alone. Token i is
    predicted by the hidden state before it in its completion, or the prompt's last one
    for the first token. Returns two [m, q, C] arrays, 0 past each completion's length.
    """
    cfg = s.cfg
    tokens, segments, offsets = (
        inputs[n] for n in ("unit_tokens", "unit_segments", "unit_offsets")
    )
    prompt_mask, index = inputs["prompt_mask"], inputs["packed_index"]
    m, r, w = tokens.shape
    hidden_p, cache = decoder.prefill(params, cfg, inputs["prompt_tokens"], prompt_mask)
    cache = jax.tree.map(lambda x: decoder.repeat_cache(x, r, w), cache)
    tokens, segments, offsets = (x.reshape(m * r, w) for x in (tokens, segments, offsets))
    prompt_rows = jnp.repeat(prompt_mask.astype(bool), r, 0)
    own = (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] >= 0)
    own &= jnp.tril(jnp.ones((w, w), bool))
    allowed = jnp.concatenate(
        [jnp.broadcast_to(prompt_rows[:, None], (m * r, w, prompt_rows.shape[1])), own], 2
    )
    positions = jnp.sum(prompt_rows, axis=1, keepdims=True) + offsets
    hidden_c, _ = decoder.forward(
        params, cfg, tokens, positions, allowed, cache, prompt_mask.shape[1]
    )
    before = jnp.concatenate([jnp.repeat(hidden_p[:, -1:], r, 0), hidden_c[:, :-1]], 1)
    source = jnp.where(offsets > 0, jnp.arange(w), 0)
    hidden = jnp.take_along_axis(before, source[..., None], axis=1)
    logp, entropy = decoder.token_logprobs(params, cfg, hidden, tokens, s.temperature)

    def unpack(x):
        flat = index.reshape(m, -1)
        x = jnp.take_along_axis(x.reshape(m, r * w), jnp.maximum(flat, 0), axis=1)
        return jnp.where(flat >= 0, x, 0.0).reshape(index.shape)

    return unpack(logp), unpack(entropy)


def batch_logprobs(model_params, batch: dict, s: UpdateSettings) -> jax.Array:
    """Completion logprobs [N, C] of a whole batch (`_MODEL_INPUTS` of an update batch),
    micro-batch by micro-batch, rows in the original order."""
    k = batch["packed_index"].shape[0] // batch["prompt_tokens"].shape[0]
    xs = _unit_microbatches({n: batch[n] for n in _MODEL_INPUTS}, s, k)

    def one(mb):
        return sequence_logprobs(model_params, mb, s)[0]

    return _from_microbatches(lax.map(one, xs))


def update_step(state: dict, batch: dict, tx: optax.GradientTransformation, s: UpdateSettings):
    """One optimizer update on a minibatch; returns (new state, metrics).

    batch: prompt_tokens, prompt_mask [N / K, P]; the packed completions unit_tokens,
    unit_segments, unit_offsets [N / q, r, C] and packed_index [N, C] (`packing.pack`);
    loss_mask, old_logp, sampler_logp [N, C]; advantages, group_ids [N]; optional ref_logp
    [N, C]. Rows are prompt-major (row i·K + j is completion j of prompt i). If the loss
    or the gradient norm is not finite, the state is returned unchanged and
    metrics["finite"] is 0.
    """
    params = state["params"]
    k = batch["packed_index"].shape[0] // batch["prompt_tokens"].shape[0]
    tb = losses.token_batch(
        batch["old_logp"],
        batch["loss_mask"],
        batch["advantages"],
        batch["group_ids"],
        s.spec,
        ref_logp=batch.get("ref_logp"),
    )

    def loss_fn(p, mb):
        logp, entropy = sequence_logprobs(p["model"], mb, s)
        logp, entropy = logp.reshape(-1, logp.shape[-1]), entropy.reshape(-1, logp.shape[-1])
        rows = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), mb["tb"])
        if s.on_policy:
            rows = rows._replace(old_logp=lax.stop_gradient(logp))
        loss, sums = losses.microbatch_loss(
            p["daro"], logp, rows, s.spec, lax.stop_gradient(entropy)
        )
        gap = jnp.abs(lax.stop_gradient(logp) - mb["sampler_logp"].reshape(logp.shape))
        return loss, (sums, (gap * rows.mask).sum())

    grad_fn = jax.grad(loss_fn, has_aux=True)

    def body(carry, mb):
        grads, sums, gap = carry
        g, (s_mb, gap_mb) = grad_fn(params, mb)
        grads = jax.tree.map(jnp.add, grads, g)
        return (grads, losses.accumulate_metrics(sums, s_mb), gap + gap_mb), None

    inputs = {n: batch[n] for n in (*_MODEL_INPUTS, "sampler_logp")}
    xs = _unit_microbatches(inputs, s, k)
    xs["tb"] = jax.tree.map(lambda x: _row_units(x, s), tb)
    init = (
        jax.tree.map(jnp.zeros_like, params),
        losses.empty_metrics(s.spec, kl=tb.ref_logp is not None, entropy=True),
        jnp.zeros((), jnp.float32),
    )
    (grads, sums, gap), _ = lax.scan(body, init, xs)
    out = losses.finalize_metrics(sums, params["daro"], s.spec)
    out["grad_norm"] = optax.tree.norm(grads["model"])
    out["sampler_logp_gap"] = gap / jnp.maximum(sums["tokens"], 1.0)
    updates, opt_state = tx.update(grads, state["opt"], params)
    new = {"params": optax.apply_updates(params, updates), "opt": opt_state}
    finite = jnp.isfinite(out["loss"]) & jnp.isfinite(out["grad_norm"])
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
    out["finite"] = finite.astype(jnp.float32)
    return new, out


def select_minibatch(batch: dict, rows: jax.Array, prompts: jax.Array) -> dict:
    """The minibatch of `prompts` (their rows `rows`, their units) of an update batch."""
    per = batch["unit_tokens"].shape[0] // batch["prompt_tokens"].shape[0]
    units = (prompts[:, None] * per + jnp.arange(per)).reshape(-1)

    def take(name, x):
        if name.startswith("prompt_"):
            return x[prompts]
        return x[units] if name.startswith("unit_") else x[rows]

    return {n: take(n, x) for n, x in batch.items()}


def on_mesh(fn: Callable, mesh: Mesh) -> Callable:
    """`fn` traced under `sharding.use_mesh(mesh)`, so its activation constraints apply."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with sharding.use_mesh(mesh):
            return fn(*args, **kwargs)

    return wrapped


def rollout_key(seed: int, step, attempt) -> jax.Array:
    """The sampling key of a step's attempt: fold_in(fold_in(key(seed), step), attempt)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), attempt)


def flat_advantages(rewards, lengths, spec: losses.AlgoSpec):
    """Advantages and group ids flattened to rollout rows [B·K], and the rollout stats."""
    groups = losses.group_advantages(rewards, lengths, spec)
    return groups.advantages.reshape(-1), groups.group_ids.reshape(-1), groups.stats


# ---------------------------------------------------------------------------------------
# Rollouts and rewards of one batch of prompts (this process's rows).


def _sample_and_score(
    rollout_fn, params, examples, rng, mesh, tokenizer, pool, prompt_len, timers: dict
) -> tuple[np.ndarray, dict]:
    """Rollouts of `examples` (this process's rows, [b, K, ...]) and their rewards [b, K];
    adds the seconds spent to timers["sampler_s"] and timers["reward_s"]."""
    prompt_tokens, prompt_mask = sampler.left_pad([e["prompt_ids"] for e in examples], prompt_len)
    t0 = time.perf_counter()
    out = rollout_fn(params, to_global(prompt_tokens, mesh), to_global(prompt_mask, mesh), rng)
    out = {name: to_local(value) for name, value in out.items()}
    t1 = time.perf_counter()
    b = len(examples)
    k = out["tokens"].shape[0] // b
    texts = tokenizer.batch_decode(
        [row[:n].tolist() for row, n in zip(out["tokens"], out["lengths"], strict=True)],
        skip_special_tokens=True,
    )
    golds = [e["answer"] for e in examples for _ in range(k)]
    scores = pool.score(texts, golds).reshape(b, k)
    timers["sampler_s"] += t1 - t0
    timers["reward_s"] += time.perf_counter() - t1
    rollout = {name: out[name].reshape(b, k, *out[name].shape[1:]) for name in out}
    rollout["prompt_tokens"], rollout["prompt_mask"] = prompt_tokens, prompt_mask
    return scores, rollout


def _pad_prompts(tree, n: int):
    """Pad every leaf to n rows with copies of row 0 whose lengths and masks are zero."""
    have = jax.tree.leaves(tree)[0].shape[0]
    if have == n:
        return tree
    idx = np.concatenate([np.arange(have), np.zeros(n - have, np.int64)])
    tree = jax.tree.map(lambda x: x[idx], tree)
    for name in ("mask", "lengths", "truncated"):
        tree[name][have:] = 0
    return tree


# ---------------------------------------------------------------------------------------
# The run.


def _load_problems(config) -> list[dict]:
    """The training problems of config.data (fails fast on a bad path or column mapping)."""
    d = config.data
    return data.load_train_set(
        d.source,
        seed=config.seed,
        split=d.split,
        problem_key=d.problem_key,
        answer_key=d.answer_key,
        generated_kind=d.generated_kind,
        generated_difficulty=d.generated_difficulty,
        num_generated=d.generated_size,
        subset=d.subset or None,
        answer_from_boxed=d.answer_from_boxed,
    )


def _templated(config, tokenizer, problems: list[dict]) -> list[dict]:
    """Problems with their templated prompt ids (data.prepare_prompts logs the number
    dropped for length)."""
    d = config.data
    examples, _ = data.prepare_prompts(
        tokenizer,
        problems,
        instruction=d.instruction,
        max_prompt_tokens=config.sampler.max_prompt_tokens,
        system_prompt=d.system_prompt,
        chat_template=d.chat_template,
    )
    if not examples:
        raise ValueError(
            f"every prompt is longer than sampler.max_prompt_tokens="
            f"{config.sampler.max_prompt_tokens}; raise it."
        )
    return examples


def _check_batch(config, mesh: Mesh) -> None:
    """Batch sizes must split evenly over processes, shards, minibatches and micro-batches."""
    t = config.train
    rows = t.batch_prompts * config.algo.k
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if t.batch_prompts % jax.process_count():
        raise ValueError(
            f"train.batch_prompts={t.batch_prompts} must be divisible by the number of "
            f"processes ({jax.process_count()})."
        )
    if rows % shards:
        raise ValueError(
            f"train.batch_prompts × algo.k = {rows} rollouts must be divisible by the "
            f"{shards} data shards of mesh.shape={tuple(config.mesh.shape)} (data × fsdp)."
        )
    if t.minibatches < 1 or t.batch_prompts % t.minibatches:
        raise ValueError(
            f"train.minibatches={t.minibatches} must divide train.batch_prompts="
            f"{t.batch_prompts} (minibatches hold whole prompts)."
        )
    per_mb = rows // t.minibatches
    if t.microbatch_size < 0 or (t.microbatch_size and per_mb % t.microbatch_size):
        raise ValueError(
            f"train.microbatch_size={t.microbatch_size} must divide the {per_mb} rollouts of "
            "a minibatch (or be 0 for the whole minibatch)."
        )
    if t.ppo_epochs < 1 or t.steps < 1:
        raise ValueError("train.ppo_epochs and train.steps must be ≥ 1.")
    if config.sampler.temperature <= 0:
        raise ValueError(
            f"sampler.temperature={config.sampler.temperature}: RL training samples, so it "
            "must be > 0 (greedy decoding is for evaluation)."
        )


class Trainer:
    """Everything one run holds: model, jitted functions, data, verifier, checkpoints."""

    def __init__(self, config):
        self.config = config
        # Mesh, algorithm and data first: their errors come before the model loads.
        self.mesh = sharding.make_mesh(config.mesh.shape)
        _check_batch(config, self.mesh)
        self.spec = losses.resolve(config.algo, max_response_len=config.sampler.max_new_tokens)
        problems = _load_problems(config)
        # Model.
        m = config.model
        model = models.load(
            m.path,
            m.dtype,
            self.mesh,
            param_dtype=m.param_dtype,
            random_init=m.init_random,
            seed=config.seed,
            overrides=m.arch_overrides.to_dict(),
        )
        self.cfg = model.config.replace(remat=m.remat)
        self.tokenizer = model.tokenizer
        self.examples = _templated(config, self.tokenizer, problems)
        self.prompt_len = int(max(len(e["prompt_ids"]) for e in self.examples))
        self.iterator = data.PromptIterator(
            self.examples,
            config.train.batch_prompts,
            config.seed,
            jax.process_index(),
            jax.process_count(),
        )
        # Train state and optimizer (shardings of params and Adam moments follow the model).
        t = config.train
        self.updates_per_step = t.ppo_epochs * t.minibatches
        state = optim.init_train_state(model.params, self.spec)
        state["daro"] = jax.device_put(state["daro"], NamedSharding(self.mesh, PartitionSpec()))
        self.tx = optim.make_optimizer(
            config.optim, state, t.steps * self.updates_per_step, self.spec
        )
        state = jax.device_put(state, jax.tree.map(self._named, state))
        param_shardings = jax.tree.map(lambda x: x.sharding, state)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        opt_shardings = optim.mirror_shardings(
            jax.eval_shape(self.tx.init, state), state, param_shardings, replicated
        )
        opt_state = jax.jit(self.tx.init, out_shardings=opt_shardings)(state)
        self.state = {"params": state, "opt": opt_state}
        self.ref_params = jax.tree.map(jnp.copy, model.params) if self.spec.kl_beta > 0 else None
        shardings = jax.tree.map(lambda x: x.sharding, self.state)
        micro_rows = sharding.microbatch_rows(t, self.spec.k)
        q = sharding.completions_per_unit(
            self.spec.k, micro_rows, self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        )
        self.settings = UpdateSettings(
            self.cfg,
            self.spec,
            float(config.sampler.temperature),
            micro_prompts=micro_rows // q,
            completions_per_unit=q,
            on_policy=self.updates_per_step == 1,
        )
        self.update = jax.jit(
            on_mesh(update_step, self.mesh),
            static_argnames=("tx", "s"),
            donate_argnums=(0,),
            out_shardings=(shardings, None),
        )
        self.logprobs = jax.jit(on_mesh(batch_logprobs, self.mesh), static_argnames=("s",))
        s = config.sampler
        self.sample = sampler.make_sampler(
            self.cfg,
            k=self.spec.k,
            max_new_tokens=s.max_new_tokens,
            prompt_len=self.prompt_len,
            temperature=float(s.temperature),
            top_p=float(s.top_p),
            top_k=int(s.top_k),
            stop_token_ids=sampler.default_stop_token_ids(self.tokenizer, self.cfg),
            mesh=self.mesh,
        )
        self.advantages = jax.jit(functools.partial(flat_advantages, spec=self.spec))
        self.rollout_key = jax.jit(
            functools.partial(rollout_key, config.seed), out_shardings=replicated
        )
        self.take_rows = jax.jit(select_minibatch)
        self.n_params = sum(x.size for x in jax.tree.leaves(model.params))
        self.peak = metrics.peak_flops(jax.devices()[0])

    def _named(self, x: jax.Array) -> NamedSharding:
        """x's sharding as a NamedSharding on the mesh (replicated when it has none), so
        the update's input and output shardings are identical and it compiles once."""
        if isinstance(x.sharding, NamedSharding):
            return x.sharding
        return NamedSharding(self.mesh, PartitionSpec())

    # -- one RL step ----------------------------------------------------------------------

    def _collect(self, step: int, pool, timers: dict):
        """Rewards [b, K], rollouts [b, K, ...] of this process's prompts and extra metrics;
        with dynamic sampling, the kept prompts padded to b with empty rows (None when no
        prompt was kept)."""

        def sample_fn(attempt: int):
            return _sample_and_score(
                self.sample,
                self.state["params"]["model"],
                next(self.iterator),
                self.rollout_key(step, attempt),
                self.mesh,
                self.tokenizer,
                pool,
                self.prompt_len,
                timers,
            )

        if not self.spec.dynamic_sampling:
            scores, rollout = sample_fn(0)
            return scores, rollout, {}
        if jax.process_count() > 1:
            raise NotImplementedError(
                "algo.dynamic_sampling with several processes is not supported: each process "
                "would draw a different number of batches. Set "
                "--config.algo.dynamic_sampling=False or run on one host."
            )
        b = self.config.train.batch_prompts
        scores, rollout, info = losses.dynamic_sampling(
            sample_fn, b, self.spec.dynamic_sampling_max_tries
        )
        extra = {
            "dynamic/tries": info.tries,
            "dynamic/kept_prompts": info.kept_prompts,
            "dynamic/sampled_prompts": info.sampled_prompts,
            "dynamic/batch_full": float(info.full),
            "dynamic/sampled_accuracy": info.sampled_accuracy,
        }
        if info.kept_prompts == 0:
            return scores, None, extra
        pad = b - info.kept_prompts
        scores = np.concatenate([scores, np.zeros((pad, self.spec.k), scores.dtype)])
        return scores, _pad_prompts(rollout, b), extra

    def _update_batch(self, rollout: dict, groups) -> dict:
        """Global update arrays of the step, each prompt's completions packed into rows."""
        b, k, n = rollout["tokens"].shape
        q = self.settings.completions_per_unit
        units = rollout["lengths"].reshape(b * k // q, q)
        rows = packing.rows_bucket(self._global_max(packing.rows_needed(units, n)), q)
        local = {
            "prompt_tokens": rollout["prompt_tokens"],
            "prompt_mask": rollout["prompt_mask"],
            **packing.pack(rollout["tokens"].reshape(-1, q, n), units, rows),
            "loss_mask": rollout["mask"].reshape(b * k, n).astype(np.float32),
            "sampler_logp": rollout["logprobs"].reshape(b * k, n),
        }
        batch = {name: to_global(x, self.mesh) for name, x in local.items()}
        batch["advantages"], batch["group_ids"] = groups
        model_inputs = {n: batch[n] for n in _MODEL_INPUTS}
        if self.settings.on_policy:
            batch["old_logp"] = jnp.zeros_like(batch["sampler_logp"])
        else:
            batch["old_logp"] = self.logprobs(
                self.state["params"]["model"], model_inputs, s=self.settings
            )
        if self.ref_params is not None:
            batch["ref_logp"] = self.logprobs(self.ref_params, model_inputs, s=self.settings)
        return batch

    @staticmethod
    def _global_max(value: int) -> int:
        """The largest `value` over the processes (each packs its own prompts)."""
        if jax.process_count() == 1:
            return value
        return int(np.max(multihost_utils.process_allgather(np.int32(value))))

    def _updates(self, step: int, batch: dict) -> list[dict]:
        """ppo_epochs passes of `minibatches` updates over whole prompts; their metrics."""
        t, k = self.config.train, self.spec.k
        per = t.batch_prompts // t.minibatches
        outs = []
        for epoch in range(t.ppo_epochs):
            order = np.random.default_rng([self.config.seed, step, epoch]).permutation(
                t.batch_prompts
            )
            for i in range(t.minibatches):
                if t.minibatches == 1:
                    minibatch = batch
                else:
                    prompts = np.sort(order[i * per : (i + 1) * per])
                    rows = (prompts[:, None] * k + np.arange(k)).reshape(-1)
                    minibatch = self.take_rows(batch, jnp.asarray(rows), jnp.asarray(prompts))
                self.state, out = self.update(self.state, minibatch, tx=self.tx, s=self.settings)
                outs.append(out)
        return jax.device_get(outs)

    def step(self, step: int, pool) -> dict[str, float]:
        """One RL step; returns its metrics as host floats."""
        t_start = time.perf_counter()
        timers = {"sampler_s": 0.0, "reward_s": 0.0}
        scores, rollout, extra = self._collect(step, pool, timers)
        out = {**extra, **{f"verifier/{n}": v for n, v in pool.pop_stats().items()}}
        out |= {f"time/{name}": v for name, v in timers.items()}
        if rollout is None:
            logging.warning("step %d: no prompt with 0 < mu < 1 in any try; no update", step)
            return out
        advantages, group_ids, stats = self.advantages(
            to_global(scores, self.mesh), to_global(rollout["lengths"], self.mesh)
        )
        t_update = time.perf_counter()
        updates = self._updates(step, self._update_batch(rollout, (advantages, group_ids)))
        update_s = time.perf_counter() - t_update
        for i, m in enumerate(updates):
            if not m["finite"]:
                flat = metrics.flatten(m, self.spec.k)
                bad = metrics.first_nonfinite(flat, ("loss", "grad_norm")) or "loss/grad_norm"
                raise FloatingPointError(
                    f"step {step} (update {i}): non-finite {bad}; the update was not applied "
                    "and nothing was saved for this step (the last checkpoint is intact). "
                    "Lower optim.lr, check the data, or use model.dtype=float32."
                )
        first, last = updates[0], updates[-1]
        out |= metrics.flatten(first, self.spec.k)
        for name in ("loss", "grad_norm", "ratio_mean", "clip_frac_low", "clip_frac_high"):
            out[f"last_update/{name}"] = float(last[name])
        lengths = rollout["lengths"]
        real = lengths > 0
        n_proc = jax.process_count()
        sampled = float(lengths.sum()) * n_proc
        units_per_prompt = self.spec.k // self.settings.completions_per_unit
        trained = float(rollout["prompt_mask"].sum() * units_per_prompt + lengths.sum()) * n_proc
        stats = jax.device_get(stats)
        out |= {
            "reward": float(stats["reward"]),
            "accuracy": float(stats["accuracy"]),
            "length_mean": float(lengths[real].mean()) if real.any() else 0.0,
            "length_correct": float(stats["length_correct"]),
            "length_incorrect": float(stats["length_incorrect"]),
            "truncated_frac": float(rollout["truncated"][real].mean()) if real.any() else 0.0,
            "time/update_s": update_s,
            "time/step_s": time.perf_counter() - t_start,
            "throughput/sampler_tokens_per_s": sampled / max(timers["sampler_s"], 1e-9),
            "throughput/update_tokens_per_s": trained * self.updates_per_step / update_s,
        }
        if self.spec.uses_daro_weights:
            w = np.asarray(
                jax.device_get(losses.daro_weights(self.state["params"]["daro"], self.spec))
            )
            for g, v in enumerate(w, start=1):
                out[f"daro/w_after_update/{g}of{self.spec.k}"] = float(v)
        if self.peak:
            flops = 6.0 * self.n_params * trained * self.updates_per_step
            out["throughput/update_mfu"] = flops / (update_s * self.peak * jax.device_count())
        return out

    # -- checkpoints ----------------------------------------------------------------------

    def meta(self, step: int) -> dict:
        return {
            "step": step,
            "data_position": self.iterator.state(),
            "config": json.loads(self.config.to_json()),
        }

    def restore(self, ckpt: checkpoint.Checkpointer) -> int:
        """Resume from the workdir's latest checkpoint; returns the step to start at."""
        meta = ckpt.restore_meta()
        if meta is None:
            return 0
        checkpoint.check_compatible(meta["config"], json.loads(self.config.to_json()))
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.state
        )
        self.state, meta = ckpt.restore(target)
        self.iterator.restore(meta["data_position"])
        logging.info("resumed from %s at step %d", ckpt.directory, meta["step"])
        return int(meta["step"])


def train(config, workdir: str, *, on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Run (or resume) the RL loop of `config` in `workdir`; returns the last step's metrics.

    `on_step(step, metrics)` is called after every step, with the periodic evaluation's
    metrics when it ran at that step (tests and the study use it).
    """
    os.makedirs(workdir, exist_ok=True)
    trainer = Trainer(config)
    writer = metrics.Writer(workdir)
    evaluator = evaluation.PeriodicEval(config, workdir)
    checkpoint.install_sigterm_handler()
    t = config.train
    last: dict = {}
    with (
        checkpoint.Checkpointer(workdir, keep=t.keep_checkpoints, every=t.ckpt_every) as ckpt,
        rewards.RewardPool(
            config.reward.num_workers, config.reward.timeout_s, fallback=config.reward.fallback
        ) as pool,
    ):
        start = trainer.restore(ckpt)
        bar = tqdm(
            range(start, t.steps),
            initial=start,
            total=t.steps,
            desc="RL steps",
            disable=jax.process_index() != 0,
        )
        step = start
        for step in bar:
            last = trainer.step(step, pool)
            evaluated = evaluator.due(step + 1)
            if evaluated:
                policy = models.Model(
                    trainer.cfg, trainer.state["params"]["model"], trainer.tokenizer, trainer.mesh
                )
                last |= evaluator.run(policy, step + 1)
            if on_step is not None:
                on_step(step, last)
            if evaluated or (step + 1) % t.log_every == 0 or step + 1 == t.steps:
                writer.write(step + 1, last)
                bar.write(metrics.summary_line(step + 1, last))
            stop = checkpoint.any_process_preempted()
            ckpt.save(step + 1, trainer.state, trainer.meta(step + 1), force=stop)
            if stop:
                logging.warning("SIGTERM: saved step %d, exiting", step + 1)
                break
        else:
            ckpt.save(t.steps, trainer.state, trainer.meta(t.steps), force=True)
    writer.close()
    return last
