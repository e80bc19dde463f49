"""Evaluation benchmarks: the six sets of the DARO paper from local files, the CHAMP problems
of the `champ-dataset` package, and the generated held-out split."""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

from absl import logging

from daro_jax.data.generated import GENERATED_HELDOUT_SIZE, heldout_problems
from daro_jax.data.sources import FILE_SUFFIXES, read_file, rows_to_examples
from daro_jax.errors import UserError

PAPER_BENCHMARKS = ("aime24", "aime25", "amc23", "math500", "minerva_math", "olympiadbench")
BENCHMARKS = (*PAPER_BENCHMARKS, "champ", "generated_heldout")


class Columns(NamedTuple):
    """Where a benchmark file keeps the problem and the answer."""

    problem: str
    answer: str
    answer_from_boxed: bool = False


# Tried in order; the first mapping whose two columns exist in the file is used.
BENCHMARK_COLUMNS: dict[str, tuple[Columns, ...]] = {
    "aime24": (Columns("problem", "answer"), Columns("Problem", "Answer")),
    "aime25": (Columns("problem", "answer"), Columns("question", "answer")),
    "amc23": (Columns("problem", "answer"), Columns("question", "answer")),
    "math500": (Columns("problem", "answer"), Columns("problem", "solution", True)),
    "minerva_math": (
        Columns("problem", "answer"),
        Columns("question", "answer"),
        Columns("problem", "solution", True),
    ),
    "olympiadbench": (Columns("problem", "answer"), Columns("question", "final_answer")),
}

_CHAMP_FINAL = (  # (pattern over CHAMP's answer text, group holding the final answer)
    (re.compile(r"^.*?,? or equivalently (.+)$"), 1),
    (re.compile(r"^(.+?),? or (?:approximately|an equivalent form such as) .+$"), 1),
    (re.compile(r"^(.+?) is the only possible value$"), 1),
    (
        re.compile(
            r"^The (?:limit exists and is equal to|only possible value for the limit is) (.+)$"
        ),
        1,
    ),
    (re.compile(r"^(.+?)\s+\((?:i\.e\.|none |no ).*\)$"), 1),
)


def champ_answer(text: str) -> str:
    """The final answer inside one of CHAMP's answer sentences (its `@@` math marks already
    removed): "A, or equivalently B" → B; "A, or approximately …" / "A, or an equivalent
    form such as …" → A; "A is the only possible value" → A; "The limit exists and is equal
    to A" → A; "A (i.e., …)" → A; any other text is returned unchanged (e.g. "No")."""
    for pattern, group in _CHAMP_FINAL:
        if match := pattern.match(text):
            return match.group(group).strip()
    return text


def load_champ() -> list[dict[str, str]]:
    """The 270 CHAMP problems (Mao et al. 2024) of the `champ-dataset` package, offline, in
    the package's order, answers reduced by `champ_answer`."""
    import champ_dataset

    problems = champ_dataset.load("v0").problems.values()
    return [{"problem": p.text.strip(), "answer": champ_answer(p.answer.strip())} for p in problems]


def load_benchmark(
    name: str,
    directory: str | None,
    *,
    columns: Columns | None = None,
    max_problems: int = 0,
    seed: int = 0,
    generated_kind: str = "arithmetic",
    generated_difficulty: int = 1,
    num_generated: int = GENERATED_HELDOUT_SIZE,
) -> list[dict[str, str]] | None:
    """A benchmark as a list of {"problem", "answer"}, or None (with one logged line naming
    the file) when its file is missing, so the caller skips it.

    Names: the six sets of the DARO paper, read from the first of `<directory>/<name>.jsonl`,
    `.json`, `.parquet` that exists; "champ" (`load_champ`, no directory needed); and
    "generated_heldout" (up to `num_generated` distinct problems of the generated held-out
    split, never seen in training). `max_problems` > 0 keeps the first ones.

    Column mapping: `columns` if given, else the first of `BENCHMARK_COLUMNS[name]` whose
    columns the file has. These cover the usual public copies: every set as `problem`/
    `answer` (e.g. HuggingFaceH4/MATH-500, HuggingFaceH4/aime_2024, AI-MO/aimo-validation-amc,
    the copies in this project's shared data); AIME 2024 as `Problem`/`Answer`
    (Maxwell-Jia/AIME_2024); AIME 2025, AMC 2023 and Minerva as `question`/`answer`
    (opencompass/AIME2025, math-ai/amc23, math-ai/minervamath); MATH and the original Minerva
    OCW release as `problem`/`solution`, the answer being the solution's last `\\boxed{}`;
    OlympiadBench (Hothan/OlympiadBench, OE_TO_maths_en_COMP) as `question`/`final_answer`,
    a one-element list. Numeric answers (AIME ints, AMC floats such as 27.0) become integer
    text. Malformed rows are skipped and counted in the log.
    """
    if name == "champ":
        examples, skipped = load_champ(), 0
    elif name == "generated_heldout":
        examples = heldout_problems(generated_kind, generated_difficulty, seed, num_generated)
        skipped = 0
    elif name in PAPER_BENCHMARKS:
        paths = [Path(directory or "", name + suffix) for suffix in FILE_SUFFIXES]
        path = next((p for p in paths if directory and p.is_file()), None)
        if path is None:
            logging.warning(
                "benchmark %s skipped: no file %s (eval.benchmarks_dir=%r)",
                name,
                Path(directory or "<unset>", name + ".{jsonl,json,parquet}"),
                directory,
            )
            return None
        rows, _ = read_file(path)
        present = {key for row in rows if isinstance(row, dict) for key in row}
        candidates = (columns,) if columns else BENCHMARK_COLUMNS[name]
        mapping = next((c for c in candidates if {c.problem, c.answer} <= present), candidates[0])
        examples, malformed = rows_to_examples(rows, *mapping, origin=str(path))
        skipped = len(malformed)
    else:
        raise UserError(f"unknown benchmark {name!r}; known: {BENCHMARKS}")
    if max_problems > 0:
        examples = examples[:max_problems]
    logging.info(
        "benchmark %s: %d problems, %d malformed rows skipped", name, len(examples), skipped
    )
    return examples
