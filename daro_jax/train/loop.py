"""The RL loop, top to bottom in the order of the work (big_vision's order).

`build(config)`: config checks (every config error before anything loads) → mesh → data →
model (each tensor placed on its shard as it loads) → abstract state and its shardings →
jitted init → the jitted programs (update with the state donated, logprob passes, sampler).

`run_step(run, s, pool)`, one RL step of B prompts × K responses: rollout (`collect`: this
process's prompts, K samples each with key fold_in(fold_in(seed, s), round), rewards from
the verifier pool, DAPO's dynamic sampling in `daro_jax.train.rollout`) → advantages and
pass-rate groups over the global batch → old/reference log-probs when needed (one update
per step is on-policy: ρ = 1 exactly) → ppo_epochs × minibatches updates over whole prompts
(`learn`) → the step's metrics.

`train(config, workdir)`: the steps with TensorBoard, console lines, periodic evaluation,
checkpoints (every `train.ckpt_every` steps, at the end, on SIGTERM) and resumption.
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
from absl import logging
from etils import epath
from jax.sharding import Mesh
from tqdm import tqdm

from daro_jax import checkpoint, data, evaluation, hosts, metrics, models, rewards, sharding
from daro_jax.algo import losses, presets
from daro_jax.models import lora
from daro_jax.plan import chips
from daro_jax.train import checks, jitted, rollout, state, update


@dataclasses.dataclass
class Run:
    """Everything one run holds (`build`); `state` is replaced by every update."""

    config: object
    mesh: Mesh
    spec: presets.AlgoSpec
    model: models.Model  # config (with remat), tokenizer and mesh; params live in `state`
    base: dict | None  # LoRA: the frozen base params (the state trains the adapters); else None
    base_meta: dict | None  # LoRA: the base's path and digest, in every checkpoint's meta
    examples: list[dict]
    iterator: data.PromptIterator
    state: dict
    ref_params: dict | None
    programs: jitted.StepPrograms  # sampler, logprob pass, update and their settings
    advantages: Callable
    kl_penalty: Callable  # the KL in the reward (`losses.kl_reward_penalty`)
    rollout_key: Callable
    n_params: int

    @property
    def train_flops_per_token(self) -> float:
        """`chips.train_flops_per_token` of the model, its LoRA base frozen (the MFU's)."""
        frozen = sum(x.size for x in jax.tree.leaves(self.base))
        return chips.train_flops_per_token(self.n_params, frozen)


def build(config) -> Run:
    """A run of `config`, ready for its first step (module docstring)."""
    t = config.train
    # Mesh and config checks.
    mesh = sharding.make_mesh(config.mesh.shape)
    checks.check_config(config, mesh, jax.process_count())
    spec = presets.resolve(config.algo, max_response_len=config.sampler.max_new_tokens)
    # Data: the problems (a bad path or column mapping fails here, before the model loads).
    problems = data.load_train_set_of(config.data, config.seed)
    # Model, then the problems' prompts with its tokenizer.
    model = models.from_config(config.model, mesh, seed=config.seed)
    examples = data.prepare_train_prompts(
        model.tokenizer, problems, config.data, config.sampler.max_prompt_tokens
    )
    iterator = data.PromptIterator(
        examples, t.batch_prompts, config.seed, jax.process_index(), jax.process_count()
    )
    # The step's jitted programs (`jitted.build`, which the plan compiles too): abstract state
    # and its shardings, update (state donated), logprob passes, sampler; the jitted init
    # places the state on the abstract state's shardings.
    prompt_len = max(len(e["prompt_ids"]) for e in examples)
    stop_ids = jitted.stop_token_ids(config.model.path, model.config, model.tokenizer)
    programs = jitted.build(config, model.config, spec, mesh, prompt_len, stop_ids)
    cfg = programs.cfg
    base, trained = state.frozen(cfg, model.params), state.trained(cfg, model.params)
    n_params = sum(x.size for x in jax.tree.leaves(model.params))
    ref_params = None
    if spec.kl_beta > 0:  # the initial policy; with LoRA the base is shared, not copied
        ref_params = lora.combine(base, jax.tree.map(jnp.copy, trained))
    train_state = state.init_state(trained, spec, programs.tx, programs.abstract)
    return Run(
        config=config,
        mesh=mesh,
        spec=spec,
        model=dataclasses.replace(model, config=cfg, params=None),
        base=base,
        base_meta=None if base is None else lora.base_meta(config.model.path, base),
        examples=examples,
        iterator=iterator,
        state=train_state,
        ref_params=ref_params,
        programs=programs,
        advantages=jax.jit(functools.partial(rollout.flat_advantages, spec=spec)),
        kl_penalty=jax.jit(functools.partial(losses.kl_reward_penalty, spec=spec)),
        rollout_key=rollout.jit_rollout_key(config.seed, mesh),
        n_params=n_params,
    )


def policy(run: Run) -> dict:
    """The current policy's params: the trained params, or with LoRA the base and the
    adapters together (`lora.combine`: no copy)."""
    return lora.combine(run.base, run.state["params"]["model"])


def collect(run: Run, step: int, pool, timers: dict):
    """Rewards [b, K], rollouts [b, K, ...] of this process's prompts, and the dynamic-
    sampling metrics (`rollout.collect`; the rollout is None when no prompt was kept).
    Adds the seconds spent to timers["sampler_s"] and timers["reward_s"]."""

    def draw(attempt: int):
        examples, key = next(run.iterator), run.rollout_key(step, attempt)
        params, tokenizer, sample = policy(run), run.model.tokenizer, run.programs.sample
        return rollout.sample_and_score(sample, params, examples, key, tokenizer, pool, timers)

    process = (jax.process_index(), jax.process_count())
    return rollout.collect(draw, run.spec, run.config.train.batch_prompts, process)


def learn(run: Run, step: int, scores: np.ndarray, drawn: dict) -> tuple[list[dict], dict]:
    """Advantages, the logprob passes and the step's ppo_epochs × minibatches updates over
    whole prompts (`run.state` replaced); returns the updates' outputs and the advantages'
    stats, on the host."""
    t, k, mesh, spec = run.config.train, run.spec.k, run.mesh, run.spec
    batch, host = update.step_inputs(drawn, mesh, spec)
    p = run.programs
    s, blocks, rows = p.settings, p.blocks, p.block_rows
    if p.passes:
        everything = update.packed_batch(host, np.arange(t.batch_prompts), blocks, rows, mesh)
    for name in p.passes:
        params = run.ref_params if name == jitted.REF else policy(run)
        batch[name] = p.logprobs(params, everything, s=s)
    penalty = None
    if spec.kl_in_reward:
        mask = drawn["mask"].reshape(-1, drawn["mask"].shape[-1]).astype(np.float32)
        mask = hosts.to_global(mask, mesh)
        penalty = run.kl_penalty(batch[jitted.OLD], batch[jitted.REF], mask)
    batch["advantages"], batch["group_ids"], stats = run.advantages(
        hosts.to_global(scores, mesh, "rewards"), hosts.to_global(drawn["lengths"], mesh), penalty
    )
    outs = []
    for prompts in update.minibatch_prompts(run.config.seed, step, t):
        minibatch = dict(batch)
        if t.minibatches > 1:
            rows_of = (prompts[:, None] * k + np.arange(k)).reshape(-1)
            minibatch = p.take_rows(batch, jnp.asarray(rows_of))
        minibatch |= update.packed_batch(host, prompts, blocks, rows, mesh)
        run.state, out = p.update(run.state, minibatch, tx=p.tx, s=s, base=run.base)
        outs.append(out)
    return jax.device_get(outs), jax.device_get(stats)


def run_step(run: Run, step: int, pool) -> dict[str, float]:
    """One RL step (module docstring); returns its metrics as host floats."""
    t_start = time.perf_counter()
    timers = {"sampler_s": 0.0, "reward_s": 0.0}
    scores, drawn, out = collect(run, step, pool, timers)
    out |= {f"verifier/{n}": v for n, v in pool.pop_stats().items()}
    if drawn is None:
        logging.warning("step %d: no prompt with 0 < mu < 1 in any round; no update", step)
        return out | {f"time/{name}": v for name, v in timers.items()}
    t_update = time.perf_counter()
    updates, stats = learn(run, step, scores, drawn)
    timers["update_s"] = time.perf_counter() - t_update
    metrics.check_finite(step, updates)
    minibatches, daro = run.config.train.minibatches, run.state["params"]["daro"]
    out |= metrics.step_metrics(
        updates, stats, drawn, daro, run.spec, minibatches, timers, run.train_flops_per_token
    )
    return out | {"time/step_s": time.perf_counter() - t_start}


def train(config, workdir: str, *, on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Run (or resume) the RL loop of `config` in `workdir`; returns the last step's metrics.

    `on_step(step, metrics)` is called after every step, with the periodic evaluation's
    metrics when it ran at that step (tests and the study use it). Prints the start-up
    summary, one line per logged step and a closing line (process 0). A workdir whose
    checkpoint is already at train.steps is left as it is: one line says so, returns {}.
    SIGTERM saves and stops the run while it trains (`checkpoint.handling_sigterm`; the
    previous handler is back when train returns).
    """
    t, r, last = config.train, config.reward, {}
    saved = json.loads(config.to_json())
    with checkpoint.Checkpointer(workdir, keep=t.keep_checkpoints, every=t.ckpt_every) as ckpt:
        if (meta := ckpt.restore_meta()) is not None and meta["step"] >= t.steps:
            checkpoint.check_compatible(meta["config"], saved)
            metrics.console(
                f"{workdir}: already at step {meta['step']} of {t.steps}; nothing to do"
            )
            return {}
        epath.Path(workdir).mkdir(parents=True, exist_ok=True)
        run = build(config)
        shape = dict(run.mesh.shape)
        for line in metrics.startup_lines(config, workdir, run.n_params, shape, len(run.examples)):
            metrics.console(line)
        evaluator = evaluation.PeriodicEval(config, workdir)
        with (
            metrics.Writer(workdir) as writer,
            checkpoint.handling_sigterm(),
            rewards.RewardPool(r.num_workers, r.timeout_s, fallback=r.fallback) as pool,
        ):
            start = done = resume(run, ckpt, saved)
            quiet = jax.process_index() != 0
            bar = tqdm(range(start, t.steps), initial=start, total=t.steps, disable=quiet)
            for step in bar:
                last = run_step(run, step, pool)
                if evaluated := evaluator.due(step + 1):
                    current = dataclasses.replace(run.model, params=policy(run))
                    last |= evaluator.run(current, step + 1, pool)
                if on_step is not None:
                    on_step(step, last)
                if evaluated or (step + 1) % t.log_every == 0 or step + 1 == t.steps:
                    writer.write(step + 1, last)
                    bar.write(metrics.summary_line(step + 1, last))
                stop = checkpoint.any_process_preempted()
                done = step + 1
                meta = {"step": done, "data_position": run.iterator.state(), "config": saved}
                meta |= {} if run.base_meta is None else {"base": run.base_meta}
                ckpt.save(done, run.state, meta, force=stop or done == t.steps)
                if stop:
                    logging.warning("SIGTERM: saved step %d, exiting", done)
                    break
    metrics.console(metrics.closing_line(done, t.steps, last, workdir))
    return last


def resume(run: Run, ckpt: checkpoint.Checkpointer, config: dict) -> int:
    """Restore `run`'s state and data position from the workdir's latest checkpoint
    (`state.restore`: onto the state's shardings, its config checked against `config`);
    returns the step to start at (0 without a checkpoint)."""
    restored = state.restore(ckpt, run.state, config, run.base_meta)
    if restored is None:
        return 0
    run.state, meta = restored
    run.iterator.restore(meta["data_position"])
    metrics.console(f"resumed from the checkpoint of step {meta['step']} in {ckpt.directory}")
    return int(meta["step"])
