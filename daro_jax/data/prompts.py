"""Prompt templating (chat template plus an instruction) and the deterministic, resumable,
multi-host prompt order."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging

from daro_jax.errors import UserError


def uses_chat_template(tokenizer: Any, chat_template: bool) -> bool:
    """Whether `build_prompt` goes through the tokenizer's chat template."""
    return bool(chat_template and getattr(tokenizer, "chat_template", None))


def build_prompt(
    tokenizer: Any,
    problem: str,
    instruction: str,
    system_prompt: str | None = None,
    chat_template: bool = True,
) -> str:
    """The prompt text for one problem.

    User message: `problem`, then a blank line and `instruction` when it is not empty.
    With a chat template (and `chat_template` on): the template applied to
    [system_prompt (if any), user message] with the generation prompt (the assistant turn's
    opening) appended. Otherwise the plain format
    `"{system_prompt}\\n\\n" (if any) + "Question: {user message}\\nAnswer:"`.
    """
    user = f"{problem}\n\n{instruction}" if instruction else problem
    if not uses_chat_template(tokenizer, chat_template):
        head = f"{system_prompt}\n\n" if system_prompt else ""
        return f"{head}Question: {user}\nAnswer:"
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": user})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prepare_prompts(
    tokenizer: Any,
    examples: Sequence[dict[str, str]],
    *,
    instruction: str,
    max_prompt_tokens: int,
    system_prompt: str | None = None,
    chat_template: bool = True,
) -> tuple[list[dict[str, Any]], int]:
    """Examples with "prompt" (str) and "prompt_ids" (int32 array) added, and the number of
    prompts dropped for having more than `max_prompt_tokens` tokens.

    Templated prompts are tokenized without the tokenizer's own special tokens (the template
    already holds them); plain ones with them (e.g. a base model's BOS).
    """
    if max_prompt_tokens < 1:
        raise UserError(f"sampler.max_prompt_tokens={max_prompt_tokens} must be >= 1")
    prompts = [
        build_prompt(tokenizer, e["problem"], instruction, system_prompt, chat_template)
        for e in examples
    ]
    add_special = not uses_chat_template(tokenizer, chat_template)
    ids = tokenizer(prompts, add_special_tokens=add_special)["input_ids"] if prompts else []
    kept = [
        {**example, "prompt": prompt, "prompt_ids": np.asarray(tokens, np.int32)}
        for example, prompt, tokens in zip(examples, prompts, ids, strict=True)
        if len(tokens) <= max_prompt_tokens
    ]
    dropped = len(examples) - len(kept)
    logging.info(
        "prompts: %d kept, %d dropped (longer than %d tokens)",
        len(kept),
        dropped,
        max_prompt_tokens,
    )
    return kept, dropped


def prepare_train_prompts(tokenizer, problems, d, max_prompt_tokens: int) -> list[dict]:
    """`prepare_prompts` of the training `problems` in the format of a config's `data`
    section `d` (instruction, system_prompt, chat_template); an error when every prompt is
    longer than `max_prompt_tokens` (sampler.max_prompt_tokens)."""
    examples, _ = prepare_prompts(
        tokenizer,
        problems,
        instruction=d.instruction,
        max_prompt_tokens=max_prompt_tokens,
        system_prompt=d.system_prompt,
        chat_template=d.chat_template,
    )
    if not examples:
        raise UserError(
            f"every prompt is longer than sampler.max_prompt_tokens={max_prompt_tokens}; raise it."
        )
    return examples


# ---------------------------------------------------------------------------------------------
# The resumable order.


class PromptIterator:
    """Endless batches of examples in a seeded order, resumable from a small state dict.

    Epoch e visits the examples in the order `permutation(n)` of a NumPy generator seeded by
    SeedSequence([seed, e]); the position is (epoch, index into that order). A global batch is
    the next `global_batch_size` positions, running on into the next epoch when one ends.
    Process p of P takes rows [p·B/P, (p+1)·B/P) of every global batch, so the P processes
    together see exactly the one-process batch.
    """

    def __init__(
        self,
        examples: Sequence[dict[str, Any]],
        global_batch_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if not examples:
            raise UserError("no training examples to iterate over")
        if global_batch_size < 1 or global_batch_size % process_count:
            raise UserError(
                f"global batch of {global_batch_size} prompts (train.batch_prompts) must be a "
                f"positive multiple of the number of processes ({process_count})"
            )
        if not 0 <= process_index < process_count:
            raise UserError(f"process_index={process_index} not in [0, {process_count})")
        if seed < 0:
            raise UserError(f"seed={seed} must be >= 0")
        self._examples = examples
        self._batch = global_batch_size
        self._seed = seed
        self._rows = slice(
            process_index * global_batch_size // process_count,
            (process_index + 1) * global_batch_size // process_count,
        )
        self._epoch = self._index = 0
        self._cached: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != epoch:
            rng = np.random.default_rng(np.random.SeedSequence([self._seed, epoch]))
            self._cached = (epoch, rng.permutation(len(self._examples)))
        return self._cached[1]

    def __iter__(self) -> PromptIterator:
        return self

    def __next__(self) -> list[dict[str, Any]]:
        n, positions = len(self._examples), []
        while len(positions) < self._batch:
            take = min(self._batch - len(positions), n - self._index)
            positions.extend(self._order(self._epoch)[self._index : self._index + take])
            self._index += take
            if self._index == n:
                self._epoch, self._index = self._epoch + 1, 0
        return [self._examples[i] for i in positions[self._rows]]

    def state(self) -> dict[str, int]:
        """The position, JSON-serialisable: {"epoch", "index", "num_examples", "seed"}."""
        return {
            "epoch": self._epoch,
            "index": self._index,
            "num_examples": len(self._examples),
            "seed": self._seed,
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from `state()` of an earlier iterator over the same examples and seed."""
        mine = self.state()
        for key in ("num_examples", "seed"):
            if int(state[key]) != mine[key]:
                raise UserError(
                    f"checkpointed data position has {key}={int(state[key])}, this run has "
                    f"{mine[key]}: the training set or seed changed since the checkpoint"
                )
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index < mine["num_examples"]:
            raise UserError(f"invalid data position epoch={epoch} index={index}")
        self._epoch, self._index = epoch, index
