"""Training problems, prompt templates, the resumable prompt order, and evaluation benchmarks.

Every problem is a dict `{"problem": str, "answer": str}`; `prepare_prompts` adds the
templated `"prompt"` and its token ids `"prompt_ids"`.

- `generated`: verifiable problems made from (seed, index) with exact answers, and a
  held-out split that never shares a problem with the training split.
- `sources`: local .jsonl / .json / .parquet files, a local folder or a hub id, with a
  problem/answer column mapping; malformed rows skipped and counted.
- `prompts`: chat-template prompts with an instruction, the over-long ones dropped and
  counted; `PromptIterator`, the seeded per-epoch order whose position goes into checkpoints,
  sliced per process.
- `benchmarks`: the paper's six evaluation sets from a directory, CHAMP, the held-out split.

Typical use (the trainer):

    problems = load_train_set_of(cfg.data, cfg.seed)          # load_train_set(source, ...)
    examples = prepare_train_prompts(tokenizer, problems, cfg.data,
                                     cfg.sampler.max_prompt_tokens)  # prepare_prompts(...)
    it = PromptIterator(examples, cfg.train.batch_prompts, cfg.seed,
                        jax.process_index(), jax.process_count())
    it.restore(meta["data_position"])  # when resuming
    batch = next(it)                    # this process's slice of the global batch
    meta["data_position"] = it.state()
"""

from daro_jax.data.benchmarks import (
    BENCHMARK_COLUMNS,
    BENCHMARKS,
    PAPER_BENCHMARKS,
    Columns,
    champ_answer,
    load_benchmark,
    load_champ,
)
from daro_jax.data.generated import (
    GENERATED_HELDOUT_SIZE,
    GENERATED_TRAIN_SIZE,
    HELDOUT_BUCKETS,
    KINDS,
    arithmetic_shape,
    exact_value,
    generate_problem,
    generate_problems,
    heldout_problems,
    is_heldout,
)
from daro_jax.data.prompts import (
    PromptIterator,
    build_prompt,
    prepare_prompts,
    prepare_train_prompts,
    uses_chat_template,
)
from daro_jax.data.sources import (
    FILE_SUFFIXES,
    load_examples,
    load_train_set,
    load_train_set_of,
    rows_to_examples,
)

__all__ = [
    "BENCHMARKS",
    "BENCHMARK_COLUMNS",
    "FILE_SUFFIXES",
    "GENERATED_HELDOUT_SIZE",
    "GENERATED_TRAIN_SIZE",
    "HELDOUT_BUCKETS",
    "KINDS",
    "PAPER_BENCHMARKS",
    "Columns",
    "PromptIterator",
    "arithmetic_shape",
    "build_prompt",
    "champ_answer",
    "exact_value",
    "generate_problem",
    "generate_problems",
    "heldout_problems",
    "is_heldout",
    "load_benchmark",
    "load_champ",
    "load_examples",
    "load_train_set",
    "load_train_set_of",
    "prepare_prompts",
    "prepare_train_prompts",
    "rows_to_examples",
    "uses_chat_template",
]
