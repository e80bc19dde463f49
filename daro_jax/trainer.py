"""The RL loop: sample → verify → group → update, laid out in big_vision's order.

One RL step s (B prompts per global batch, K responses each):

1. prompts: this process's slice of the global batch (`data.PromptIterator`);
2. rollouts: the jitted sampler, K per prompt from one prefill, key fold_in(seed, s);
3. rewards: the verifier process pool on the decoded texts (beside the accelerator);
4. pass-rate groups and advantages (`advantages.group_advantages`, on the global batch);
   with DAPO's dynamic sampling (`daro_jax.rollout`), prompts with μ ∈ {0, 1} are
   dropped, agreed by every process, and more are drawn until the batch is full, up to
   `algo.dynamic_sampling_max_tries` rounds; free rows are then padding (mask 0);
5. old-policy logprobs are recomputed only when the step makes several updates
   (ppo_epochs × minibatches > 1); with one update the step is on-policy and
   old_logp = stop_gradient(logp) exactly, so the importance ratio is exactly 1.
   Reference logprobs are computed when the KL term is on;
6. ppo_epochs × minibatches jitted updates (donated state), each accumulating the
   gradient over micro-batches of packed rows in a loop; the loss normalisers come from
   the whole minibatch (losses.token_batch), so micro-batching is exact;
7. metrics to TensorBoard (process 0) and the console; a checkpoint every
   `train.ckpt_every` steps, at the end, and on SIGTERM.

Log-probabilities in the update use logits / T with the sampling temperature T, exactly as
the sampler does. The prompts of a minibatch (left-padded to a fixed length P for the
whole run) are forwarded once, in G blocks; their completions, packed back to back into
rows of N = max_new_tokens positions (`daro_jax.packing`, completions of several prompts
sharing a row), attend to their own prompt's cache (`models.packed`). The update loops
over micro-batches of R packed rows per block with a traced trip count, so every array
keeps one shape for the whole run and the update compiles once; the prompts' share of the
gradient is pulled back through their forward once per update (`update_gradients`).
Per-token arrays of the loss stay [B·K, N].
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from etils import epath
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
    presets,
    rewards,
    rollout,
    sampler,
    sharding,
)
from daro_jax.models import packed
from daro_jax.models.config import ModelConfig

# ---------------------------------------------------------------------------------------
# Global arrays over the mesh (multi-host: each process holds its rows).


def batch_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    names = ("batch",) + (None,) * (len(shape) - 1)
    spec = sharding.logical_spec(names, shape, mesh, what="batch", replicate_indivisible=True)
    return NamedSharding(mesh, spec)


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
    """Static settings of the compiled update and logprob functions (the shapes of the
    packed chunks come from the arrays; `daro_jax.packing`)."""

    cfg: ModelConfig
    spec: presets.AlgoSpec
    temperature: float
    on_policy: bool


CHUNK_INPUTS = packing.CHUNK_INPUTS


def to_rows(x: jax.Array, chunk: dict, k: int, g: int, rows: int) -> jax.Array:
    """A chunk's per-token values [G, R, C] scattered to the update's rollout layout
    [rows, C] (row block·g·K + segment, column offset); 0 where the chunk has no token."""
    segments, offsets = chunk["chunk_segments"], chunk["chunk_offsets"]
    c = segments.shape[-1]
    row = jnp.arange(segments.shape[0])[:, None, None] * (g * k) + segments
    flat = jnp.where(segments >= 0, row * c + offsets, rows * c)
    out = jnp.zeros(rows * c, x.dtype).at[flat.reshape(-1)].set(x.reshape(-1), mode="drop")
    return out.reshape(rows, c)


def _chunk_logprobs(model_params, last, cache, prompt_mask, chunk: dict, s: UpdateSettings):
    """`packed.chunk_logprobs` of one chunk at the settings' temperature."""
    return packed.chunk_logprobs(
        model_params, s.cfg, last, cache, prompt_mask, chunk, s.spec.k, s.temperature
    )


def _chunk(batch: dict, i) -> dict:
    """Loop iteration i's chunk [G, R, C] of the packed arrays [G, S, R, C]."""
    return {n: lax.dynamic_index_in_dim(batch[n], i, axis=1, keepdims=False) for n in CHUNK_INPUTS}


def _blocks(batch: dict) -> tuple[int, int]:
    """(G, g): prompt blocks of the packed arrays and prompts per block."""
    blocks = batch["chunk_tokens"].shape[0]
    return blocks, batch["prompt_tokens"].shape[0] // blocks


def batch_logprobs(model_params, batch: dict, s: UpdateSettings) -> jax.Array:
    """Completion logprobs [b·K, C] of a packed batch (prompt_tokens, prompt_mask, the
    chunk arrays, n_chunks), rows prompt-major, 0 past each completion."""
    blocks, g = _blocks(batch)
    rows, c = batch["prompt_tokens"].shape[0] * s.spec.k, batch["chunk_tokens"].shape[-1]
    last, cache = packed.prompt_blocks(
        model_params, s.cfg, batch["prompt_tokens"], batch["prompt_mask"], blocks
    )

    def body(i, out):
        chunk = _chunk(batch, i)
        logp = _chunk_logprobs(model_params, last, cache, batch["prompt_mask"], chunk, s)[0]
        return out + to_rows(logp, chunk, s.spec.k, g, rows)

    return lax.fori_loop(0, batch["n_chunks"], body, jnp.zeros((rows, c), jnp.float32))


def update_gradients(params, batch: dict, tb: losses.TokenBatch, s: UpdateSettings):
    """∇ of Σ_chunks microbatch_loss and the metric sums (`losses.microbatch_loss`).

    The prompts are forwarded once (`packed.prompt_blocks`, under `jax.vjp`); each chunk's
    gradient w.r.t. the parameters, the prompts' last hidden states and their caches is
    accumulated over the `n_chunks` loop iterations, and the prompts' part is pulled back
    through their forward at the end: ∇ = Σ_i ∂L_i/∂θ + vjp_prompts(Σ_i ∂L_i/∂(h, cache)),
    the chain rule of L = Σ_i L_i(θ, prompts(θ)).
    """
    blocks, g = _blocks(batch)
    rows = batch["prompt_tokens"].shape[0] * s.spec.k

    def prompts(model_params):
        return packed.prompt_blocks(
            model_params, s.cfg, batch["prompt_tokens"], batch["prompt_mask"], blocks
        )

    (last, cache), pull_back = jax.vjp(prompts, params["model"])

    def loss_fn(p, last, cache, chunk):
        logp, entropy = _chunk_logprobs(p["model"], last, cache, batch["prompt_mask"], chunk, s)
        inside = to_rows(jnp.ones(logp.shape, jnp.float32), chunk, s.spec.k, g, rows)
        logp, entropy = (to_rows(x, chunk, s.spec.k, g, rows) for x in (logp, entropy))
        part = tb._replace(mask=tb.mask * inside)
        if s.on_policy:
            part = part._replace(old_logp=lax.stop_gradient(logp))
        return losses.microbatch_loss(p["daro"], logp, part, s.spec, lax.stop_gradient(entropy))

    grad_fn = jax.grad(loss_fn, argnums=(0, 1, 2), has_aux=True)

    def f32_zeros(tree):
        return jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), tree)

    def body(i, carry):
        grads, sums = carry
        new, s_i = grad_fn(params, last, cache, _chunk(batch, i))
        grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, new)
        return grads, losses.accumulate_metrics(sums, s_i)

    init = (
        (f32_zeros(params), f32_zeros(last), f32_zeros(cache)),
        losses.empty_metrics(s.spec, tb, entropy=True),
    )
    (grads, d_last, d_cache), sums = lax.fori_loop(0, batch["n_chunks"], body, init)
    cotangent = jax.tree.map(lambda d, x: d.astype(x.dtype), (d_last, d_cache), (last, cache))
    (d_model,) = pull_back(cotangent)
    grads["model"] = jax.tree.map(
        lambda a, b, x: (a + b.astype(jnp.float32)).astype(x.dtype),
        grads["model"],
        d_model,
        params["model"],
    )
    grads["daro"] = grads["daro"].astype(params["daro"].dtype)
    return grads, sums


UPDATE_SCALARS = ("loss", "grad_norm", "grad_norm_daro")  # per update; checked finite


def update_step(state: dict, batch: dict, tx: optax.GradientTransformation, s: UpdateSettings):
    """One optimizer update on a minibatch; returns (new state, its outputs).

    batch: prompt_tokens, prompt_mask [b, P] and the packed completions chunk_tokens,
    chunk_segments, chunk_offsets [G, S, R, C] with n_chunks (`packing.pack_blocks`);
    loss_mask, old_logp, sampler_logp [b·K, C]; advantages, group_ids [b·K]; optional
    ref_logp [b·K, C]. Rows are prompt-major (row i·K + j is completion j of prompt i).

    Outputs: loss; grad_norm and grad_norm_daro, the global norms of the model's and of the
    DARO weights' gradients; "sums", the metric sums of `losses.microbatch_loss` (they add
    over minibatches); "daro", the DARO parameters the update used; finite. If the loss or
    either gradient norm is not finite, the state is returned unchanged and finite is 0.
    """
    params = state["params"]
    tb = losses.token_batch(
        batch["old_logp"],
        batch["loss_mask"],
        batch["advantages"],
        batch["group_ids"],
        s.spec,
        ref_logp=batch.get("ref_logp"),
        sampler_logp=batch["sampler_logp"],
    )
    grads, sums = update_gradients(params, batch, tb, s)
    out = {
        "loss": sums["loss"],
        "grad_norm": optax.tree.norm(grads["model"]),
        "grad_norm_daro": optax.tree.norm(grads["daro"]),
        "sums": sums,
        "daro": params["daro"],
    }
    updates, opt_state = tx.update(grads, state["opt"], params)
    new = {"params": optax.apply_updates(params, updates), "opt": opt_state}
    finite = jnp.all(jnp.isfinite(jnp.stack([out[name] for name in UPDATE_SCALARS])))
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
    out["finite"] = finite.astype(jnp.float32)
    return new, out


def take_rows(batch: dict, rows: jax.Array) -> dict:
    """The rows `rows` of every per-rollout array of a step: one minibatch's."""
    return {n: x[rows] for n, x in batch.items()}


def on_mesh(fn: Callable, mesh: Mesh) -> Callable:
    """`fn` traced under `sharding.use_mesh(mesh)`, so its activation constraints apply."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with sharding.use_mesh(mesh):
            return fn(*args, **kwargs)

    return wrapped


def jit_update(mesh: Mesh, state_shardings) -> Callable:
    """The jitted `update_step` on `mesh`: the state donated and returned with
    `state_shardings`, so that it compiles once (daro_jax.plan compiles this too)."""
    return jax.jit(
        on_mesh(update_step, mesh),
        static_argnames=("tx", "s"),
        donate_argnums=(0,),
        out_shardings=(state_shardings, None),
    )


def jit_logprobs(mesh: Mesh) -> Callable:
    """The jitted `batch_logprobs` on `mesh` (old-policy and reference passes)."""
    return jax.jit(on_mesh(batch_logprobs, mesh), static_argnames=("s",))


def rollout_key(seed: int, step, attempt) -> jax.Array:
    """The sampling key of a step's attempt: fold_in(fold_in(key(seed), step), attempt)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), attempt)


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
        max_bad_fraction=d.max_bad_fraction,
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


def _check_batch(config, mesh: Mesh, processes: int) -> None:
    """Batch sizes must split evenly over processes, shards, minibatches and micro-batches.
    With several processes, each supplies only its own rows of the global arrays, which
    must therefore be sharded, not replicated, over the data shards."""
    t = config.train
    rows = t.batch_prompts * config.algo.k
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if t.batch_prompts % processes:
        raise ValueError(
            f"train.batch_prompts={t.batch_prompts} must be divisible by the number of "
            f"processes ({processes})."
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
    per_mb = t.batch_prompts // t.minibatches
    if t.prompt_blocks < 0 or t.block_rows < 1:
        raise ValueError(
            f"train.prompt_blocks={t.prompt_blocks} must be ≥ 0 (0: one per data shard) and "
            f"train.block_rows={t.block_rows} ≥ 1."
        )
    blocks, _ = sharding.update_blocks(t, mesh)
    if per_mb % blocks or blocks % processes:
        raise ValueError(
            f"train.prompt_blocks={blocks} must divide the {per_mb} prompts of a minibatch "
            f"and be a multiple of the {processes} processes."
        )
    if processes > 1 and (per_mb % shards or blocks % shards):
        raise ValueError(
            f"with {processes} processes, the {per_mb} prompts of a minibatch (train."
            f"batch_prompts / train.minibatches) and train.prompt_blocks={blocks} must be "
            f"multiples of the {shards} data shards (data × fsdp of mesh.shape="
            f"{tuple(config.mesh.shape)}): each process holds only its own rows."
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
        _check_batch(config, self.mesh, jax.process_count())
        self.spec = presets.resolve(config.algo, max_response_len=config.sampler.max_new_tokens)
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
        self.blocks, self.chunk_rows = sharding.update_blocks(t, self.mesh)
        self.settings = UpdateSettings(
            self.cfg,
            self.spec,
            float(config.sampler.temperature),
            on_policy=self.updates_per_step == 1,
        )
        self.update = jit_update(self.mesh, shardings)
        self.logprobs = jit_logprobs(self.mesh)
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
        self.advantages = jax.jit(functools.partial(rollout.flat_advantages, spec=self.spec))
        self.rollout_key = jax.jit(
            functools.partial(rollout_key, config.seed), out_shardings=replicated
        )
        self.take_rows = jax.jit(take_rows)
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
        """Rewards [b, K], rollouts [b, K, ...] of this process's prompts and extra metrics
        (`rollout.collect`: with dynamic sampling, this process's rows of the kept prompts,
        padded with empty rows; None when no prompt was kept)."""

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

        process = (jax.process_index(), jax.process_count())
        return rollout.collect(sample_fn, self.spec, self.config.train.batch_prompts, process)

    def _packed(self, rollout: dict, prompts: np.ndarray) -> dict:
        """Global prompt and packed chunk arrays of the step's `prompts` (global indices,
        sorted): they split into `self.blocks` blocks, this process packs its own."""
        per = len(prompts) // jax.process_count()
        mine = prompts[jax.process_index() * per : (jax.process_index() + 1) * per]
        local = packing.pack_blocks(
            rollout["tokens"][mine],
            rollout["lengths"][mine],
            self.blocks // jax.process_count(),
            self.chunk_rows,
        )
        n_chunks = self._global_max(local.pop("n_chunks"))
        local["prompt_tokens"] = rollout["prompt_tokens"][mine]
        local["prompt_mask"] = rollout["prompt_mask"][mine]
        packed = {name: to_global(x, self.mesh) for name, x in local.items()}
        replicated = NamedSharding(self.mesh, PartitionSpec())
        packed["n_chunks"] = jax.device_put(np.int32(n_chunks), replicated)
        return packed

    def _update_batch(self, rollout: dict, groups) -> tuple[dict, dict]:
        """The step's per-rollout arrays (global, [B·K, ...]) and the rollouts of every
        process on the host (packing a minibatch may need another process's prompts)."""
        b, k, n = rollout["tokens"].shape
        local = {
            "loss_mask": rollout["mask"].reshape(b * k, n).astype(np.float32),
            "sampler_logp": rollout["logprobs"].reshape(b * k, n),
        }
        batch = {name: to_global(x, self.mesh) for name, x in local.items()}
        batch["advantages"], batch["group_ids"] = groups
        names = ("tokens", "lengths", "prompt_tokens", "prompt_mask")
        host = {name: rollout[name] for name in names}
        if jax.process_count() > 1:
            host = multihost_utils.process_allgather(host, tiled=True)
        everything = np.arange(b * jax.process_count())
        if self.settings.on_policy and self.ref_params is None:
            return batch, host
        packed = self._packed(host, everything)
        if not self.settings.on_policy:
            batch["old_logp"] = self.logprobs(
                self.state["params"]["model"], packed, s=self.settings
            )
        if self.ref_params is not None:
            batch["ref_logp"] = self.logprobs(self.ref_params, packed, s=self.settings)
        return batch, host

    @staticmethod
    def _global_max(value: int) -> int:
        """The largest `value` over the processes (each packs its own prompts)."""
        if jax.process_count() == 1:
            return value
        return int(np.max(multihost_utils.process_allgather(np.int32(value))))

    def _updates(self, step: int, batch: dict, host: dict) -> list[dict]:
        """ppo_epochs passes of `minibatches` updates over whole prompts; their metrics."""
        t, k = self.config.train, self.spec.k
        per = t.batch_prompts // t.minibatches
        if "old_logp" not in batch:
            batch["old_logp"] = jnp.zeros_like(batch["sampler_logp"])
        outs = []
        for epoch in range(t.ppo_epochs):
            order = np.random.default_rng([self.config.seed, step, epoch]).permutation(
                t.batch_prompts
            )
            for i in range(t.minibatches):
                prompts = np.sort(order[i * per : (i + 1) * per])
                if t.minibatches == 1:
                    minibatch = dict(batch)
                else:
                    rows = (prompts[:, None] * k + np.arange(k)).reshape(-1)
                    minibatch = self.take_rows(batch, jnp.asarray(rows))
                minibatch |= self._packed(host, prompts)
                self.state, out = self.update(self.state, minibatch, tx=self.tx, s=self.settings)
                outs.append(out)
        return jax.device_get(outs)

    def _update_metrics(self, updates: list[dict]) -> dict[str, float]:
        """Metrics of the step's updates. The per-group metrics and token means cover the
        whole batch: the metric sums of the first epoch's minibatches (each prompt once),
        with the DARO weights of the first update. loss, grad_norm, grad_norm_daro: the
        first update's (the on-policy one); the last update's under last_update/. With
        several DARO updates, the weights each used: daro/w_update<i>/<k>of<K>."""
        k, first, last = self.spec.k, updates[0], updates[-1]
        epoch = [u["sums"] for u in updates[: self.config.train.minibatches]]
        whole = losses.finalize_metrics(
            functools.reduce(losses.accumulate_metrics, epoch), first["daro"], self.spec
        )
        out = metrics.flatten(whole, k)
        last_means = losses.finalize_metrics(last["sums"], last["daro"], self.spec)
        for name in UPDATE_SCALARS:
            out[name] = float(first[name])
            out[f"last_update/{name}"] = float(last[name])
        for name in ("ratio_mean", "clip_frac_low", "clip_frac_high"):
            out[f"last_update/{name}"] = float(last_means[name])
        if self.spec.uses_daro_weights and len(updates) > 1:
            for i, u in enumerate(updates):
                w = np.asarray(losses.daro_weights(jnp.asarray(u["daro"]), self.spec))
                out |= {f"daro/w_update{i}/{g}of{k}": float(v) for g, v in enumerate(w, 1)}
        return out

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
        batch, host = self._update_batch(rollout, (advantages, group_ids))
        updates = self._updates(step, batch, host)
        update_s = time.perf_counter() - t_update
        for i, m in enumerate(updates):
            if not m["finite"]:
                scalars = {name: float(m[name]) for name in UPDATE_SCALARS}
                bad = metrics.first_nonfinite(scalars, UPDATE_SCALARS)
                raise FloatingPointError(
                    f"step {step} (update {i}): non-finite {bad}; the update was not applied "
                    "and nothing was saved for this step (the last checkpoint is intact). "
                    "Lower optim.lr, check the data, or use model.dtype=float32."
                )
        out |= self._update_metrics(updates)
        lengths = rollout["lengths"]
        real = lengths > 0
        n_proc = jax.process_count()
        sampled = float(lengths.sum()) * n_proc
        trained = float(rollout["prompt_mask"].sum() + lengths.sum()) * n_proc
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
        metrics.console(f"resumed from the checkpoint of step {meta['step']} in {ckpt.directory}")
        return int(meta["step"])


def train(config, workdir: str, *, on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Run (or resume) the RL loop of `config` in `workdir`; returns the last step's metrics.

    `on_step(step, metrics)` is called after every step, with the periodic evaluation's
    metrics when it ran at that step (tests and the study use it). Prints the start-up
    summary, one line per logged step and a closing line (process 0). A workdir whose
    checkpoint is already at train.steps is left as it is: one line says so, returns {}.
    """
    t = config.train
    with checkpoint.Checkpointer(workdir, keep=t.keep_checkpoints, every=t.ckpt_every) as ckpt:
        meta = ckpt.restore_meta()
    if meta is not None and meta["step"] >= t.steps:
        checkpoint.check_compatible(meta["config"], json.loads(config.to_json()))
        metrics.console(f"{workdir}: already at step {meta['step']} of {t.steps}; nothing to do")
        return {}
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    trainer = Trainer(config)
    for line in metrics.startup_lines(
        config, workdir, trainer.n_params, dict(trainer.mesh.shape), len(trainer.examples)
    ):
        metrics.console(line)
    writer = metrics.Writer(workdir)
    evaluator = evaluation.PeriodicEval(config, workdir)
    checkpoint.install_sigterm_handler()
    last: dict = {}
    with (
        checkpoint.Checkpointer(workdir, keep=t.keep_checkpoints, every=t.ckpt_every) as ckpt,
        rewards.RewardPool(
            config.reward.num_workers, config.reward.timeout_s, fallback=config.reward.fallback
        ) as pool,
    ):
        start = done = trainer.restore(ckpt)
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
            done = step + 1
            if stop:
                logging.warning("SIGTERM: saved step %d, exiting", step + 1)
                break
        else:
            ckpt.save(t.steps, trainer.state, trainer.meta(t.steps), force=True)
    writer.close()
    metrics.console(metrics.closing_line(done, t.steps, last, workdir))
    return last
