"""The jitted update and logprob passes over a minibatch's packed rollouts.

Log-probabilities use logits / T with the sampling temperature T, exactly as the sampler
does. The prompts of a minibatch (left-padded to a fixed length P for the whole run) are
forwarded once, in G blocks; their completions, packed back to back into rows of
N = max_new_tokens positions (`daro_jax.train.packing`, completions of several prompts sharing a
row), attend to their own prompt's cache (`models.packed`). The update loops over
micro-batches of R packed rows per block with a traced trip count, so every array keeps one
shape for the whole run and the update compiles once; the prompts' share of the gradient is
pulled back through their forward once per update (`update_gradients`). The loss
normalisers come from the whole minibatch (`losses.token_batch`), so micro-batching is
exact. Per-token arrays of the loss stay [B·K, N].

With one update per step the step is on-policy: old_logp = stop_gradient(logp) exactly, so
the importance ratio is exactly 1 and no old-policy pass runs (`UpdateSettings.on_policy`).

Entry points: `jit_update` (`update_step`, the state donated), `jit_logprobs`
(`batch_logprobs`: old-policy and reference passes), `step_inputs` (a step's rollouts as
the per-row arrays of its updates, overlong filtering applied, and every process's
rollouts on the host),
`minibatch_prompts` (the prompts of each update of a step), `packed_batch` (the host's
rollouts of some prompts as the global packed arrays these take).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from daro_jax import hosts, sharding
from daro_jax.algo import loss_sums, losses, optim, presets
from daro_jax.models import lora, packed
from daro_jax.models.config import ModelConfig
from daro_jax.train import packing


@dataclasses.dataclass(frozen=True)
class UpdateSettings:
    """Static settings of the compiled update and logprob functions (the shapes of the
    packed chunks come from the arrays; `daro_jax.train.packing`)."""

    cfg: ModelConfig
    spec: presets.AlgoSpec
    temperature: float
    on_policy: bool
    frozen: tuple[str, ...] = ()  # config.optim.frozen: grad_norm leaves these out


CHUNK_INPUTS = packed.CHUNK_INPUTS


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


def update_gradients(params, batch: dict, tb: losses.TokenBatch, s: UpdateSettings, base=None):
    """∇ of Σ_chunks microbatch_loss and the metric sums (`losses.microbatch_loss`) w.r.t.
    `params` {"model", "daro"}; the policy is `lora.combine(base, params["model"])` (with
    LoRA the frozen base and the adapters; the base gets no gradient).

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
            lora.combine(base, model_params),
            s.cfg,
            batch["prompt_tokens"],
            batch["prompt_mask"],
            blocks,
        )

    (last, cache), pull_back = jax.vjp(prompts, params["model"])

    def loss_fn(p, last, cache, chunk):
        policy = lora.combine(base, p["model"])
        logp, entropy = _chunk_logprobs(policy, last, cache, batch["prompt_mask"], chunk, s)
        inside = to_rows(jnp.ones(logp.shape, jnp.float32), chunk, s.spec.k, g, rows)
        logp, entropy = (to_rows(x, chunk, s.spec.k, g, rows) for x in (logp, entropy))
        part = tb._replace(mask=tb.mask * inside)
        if s.on_policy:
            part = part._replace(old_logp=lax.stop_gradient(logp))
        return losses.microbatch_loss(p["daro"], logp, part, s.spec, entropy)

    grad_fn = jax.grad(loss_fn, argnums=(0, 1, 2), has_aux=True)

    def f32_zeros(tree):
        return jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), tree)

    def body(i, carry):
        grads, sums = carry
        new, s_i = grad_fn(params, last, cache, _chunk(batch, i))
        grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, new)
        return grads, loss_sums.accumulate(sums, s_i)

    init = (
        (f32_zeros(params), f32_zeros(last), f32_zeros(cache)),
        loss_sums.empty(s.spec, tb, entropy=True),
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


def update_step(
    state: dict, batch: dict, tx: optax.GradientTransformation, s: UpdateSettings, base=None
):
    """One optimizer update on a minibatch; returns (new state, its outputs). `base`: the
    frozen base params with LoRA (read, never updated nor copied), None without.

    batch: prompt_tokens, prompt_mask [b, P] and the packed completions chunk_tokens,
    chunk_segments, chunk_offsets [G, S, R, C] with n_chunks (`packing.pack_blocks`);
    loss_mask, sampler_logp, sampler_logp_full [b·K, C]; advantages, group_ids [b·K];
    old_logp [b·K, C] unless on-policy (s.on_policy: the update's own logp, so ρ = 1
    exactly); optional ref_logp [b·K, C]. Rows are prompt-major (row i·K + j is completion
    j of prompt i).

    Outputs: loss; grad_norm and grad_norm_daro, the global norms of the model's trained
    leaves' gradients (not the frozen ones: the norm the optimizer clips) and of the DARO
    weights' gradients; "sums", the metric sums of `losses.microbatch_loss` (they add
    over minibatches); "daro", the DARO parameters the update used; finite. If the loss or
    either gradient norm is not finite, the state is returned unchanged and finite is 0.
    """
    params = state["params"]
    # On-policy the batch has no old_logp (no old-policy pass runs): old_logp =
    # stop_gradient(logp) per chunk (`update_gradients`); the zeros only hold its place.
    old_logp = jnp.zeros_like(batch["sampler_logp"]) if s.on_policy else batch["old_logp"]
    tb = losses.token_batch(
        old_logp,
        batch["loss_mask"],
        batch["advantages"],
        batch["group_ids"],
        s.spec,
        ref_logp=batch.get("ref_logp"),
        sampler_logp=batch["sampler_logp"],
        sampler_logp_full=batch["sampler_logp_full"],
    )
    grads, sums = update_gradients(params, batch, tb, s, base)
    out = {
        "loss": sums["loss"],
        "grad_norm": optim.trained_norm(grads, s.frozen),
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


def jit_update(mesh: Mesh, state_shardings) -> Callable:
    """The jitted `update_step` on `mesh`: the state donated and returned with
    `state_shardings`, so that it compiles once (daro_jax.plan compiles this too)."""
    return jax.jit(
        sharding.on_mesh(update_step, mesh),
        static_argnames=("tx", "s"),
        donate_argnums=(0,),
        out_shardings=(state_shardings, None),
    )


def jit_logprobs(mesh: Mesh) -> Callable:
    """The jitted `batch_logprobs` on `mesh` (old-policy and reference passes)."""
    return jax.jit(sharding.on_mesh(batch_logprobs, mesh), static_argnames=("s",))


PACKED_FROM = ("tokens", "lengths", "prompt_tokens", "prompt_mask")  # `packed_batch`'s rollouts


def step_inputs(rollouts: dict, mesh: Mesh, spec: presets.AlgoSpec) -> tuple[dict, dict]:
    """The inputs of a step's updates from this process's rollouts (tokens, mask, logprobs,
    logprobs_full [b, K, N], lengths, truncated [b, K], prompt_tokens, prompt_mask [b, P]):
    the global per-row arrays over the B·K rows, loss_mask (`losses.loss_mask`: overlong
    filtering), sampler_logp and sampler_logp_full [B·K, N]; and the PACKED_FROM rollouts
    of every process on the host (`hosts.allgather`: a minibatch's blocks may hold another
    process's prompts). The advantages and group ids are added after the logprob passes
    (the KL in the reward needs them)."""
    b, k, n = rollouts["tokens"].shape
    mask = losses.loss_mask(rollouts["mask"].astype(np.float32), rollouts["truncated"], spec)
    rows = {
        "loss_mask": hosts.to_global(mask.reshape(b * k, n), mesh),
        "sampler_logp": hosts.to_global(rollouts["logprobs"].reshape(b * k, n), mesh),
        "sampler_logp_full": hosts.to_global(rollouts["logprobs_full"].reshape(b * k, n), mesh),
    }
    return rows, hosts.allgather({name: rollouts[name] for name in PACKED_FROM})


def minibatch_prompts(seed: int, step: int, train) -> list[np.ndarray]:
    """The prompts (global indices) of each of a step's ppo_epochs × minibatches updates, in
    order: epoch e permutes the B = train.batch_prompts prompts with the generator seeded
    [seed, step, e] and cuts the permutation into train.minibatches consecutive parts of
    B / minibatches prompts, each sorted."""
    per = train.batch_prompts // train.minibatches
    out = []
    for epoch in range(train.ppo_epochs):
        order = np.random.default_rng([seed, step, epoch]).permutation(train.batch_prompts)
        out += [np.sort(order[i * per : (i + 1) * per]) for i in range(train.minibatches)]
    return out


def packed_batch(host: dict, prompts: np.ndarray, blocks: int, chunk_rows: int, mesh: Mesh):
    """The global prompt and packed chunk arrays of the step's prompts `prompts` (global
    indices, sorted) from `host`, the step's rollouts of every process (tokens, lengths
    [B, K, N | ·], prompt_tokens, prompt_mask [B, P]). The prompts split into `blocks`
    blocks of consecutive prompts; each process packs its own share of them
    (`packing.pack_blocks`, `chunk_rows` rows per micro-batch), and n_chunks is the most
    any process needs."""
    per = len(prompts) // jax.process_count()
    mine = prompts[jax.process_index() * per : (jax.process_index() + 1) * per]
    local = packing.pack_blocks(
        host["tokens"][mine], host["lengths"][mine], blocks // jax.process_count(), chunk_rows
    )
    n_chunks = hosts.global_max(local.pop("n_chunks"))
    local["prompt_tokens"] = host["prompt_tokens"][mine]
    local["prompt_mask"] = host["prompt_mask"][mine]
    out = {name: hosts.to_global(x, mesh, name) for name, x in local.items()}
    out["n_chunks"] = jax.device_put(np.int32(n_chunks), NamedSharding(mesh, PartitionSpec()))
    return out
