"""Training problems from local .jsonl / .json / .parquet files, a local folder or a Hugging
Face hub id (through `datasets`, imported only then), with a problem/answer column mapping.

A column key may name a value nested inside a column: "reward_model.ground_truth" (a key of
a struct / dict column), "prompt.-1.content" (the last element of a list column, then a
key); `cell` reads it.

Malformed rows are skipped with a WARNING naming the source, their count and their first
line numbers (row numbers outside .jsonl files); when they are more than `max_bad_fraction`
of the rows, `load_train_set` refuses the source with that message instead.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from daro_jax.data.generated import GENERATED_TRAIN_SIZE, generate_problems
from daro_jax.errors import PathError, UserError
from daro_jax.rewards.extract import last_boxed

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
SHOWN_POSITIONS = 5  # positions of malformed rows named in the warning


def _as_text(value: Any) -> str | None:
    """A cell as stripped text, or None when it cannot be a problem or an answer.

    Accepted: non-empty strings; integers (not bools); finite floats (integral ones written
    as integers, since public AMC copies store 27 as 27.0); a one-element list of those
    (OlympiadBench's `final_answer`). Anything else is malformed.
    """
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            return None
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def column_of(key: str, present: Sequence[str] = ()) -> str:
    """The column a key reads: the key itself when it is a column of `present`, else the
    part before its first "." (a nested key)."""
    return key if key in present else key.split(".", 1)[0]


def cell(row: dict, key: str) -> Any:
    """row[key], or the value a nested key names (module docstring): each part after the
    column is a dict key, or an integer index (negative from the end) into a list; None
    when a part is missing."""
    if key in row:
        return row[key]
    value, *path = key.split(".")
    value = row.get(value)
    for part in path:
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, (list, tuple)) and part.lstrip("-").isdigit():
            index = int(part)
            value = value[index] if -len(value) <= index < len(value) else None
        else:
            return None
    return value


def check_columns(origin: object, present: Sequence[str], problem_key: str, answer_key: str):
    """Raise ValueError naming the missing column and the columns present, if one is missing
    (a nested key needs its column, `column_of`)."""
    for field, key in (("problem_key", problem_key), ("answer_key", answer_key)):
        if column_of(key, present) not in present:
            raise UserError(
                f"{origin}: no column {key!r} (the {field} of the column mapping); "
                f"columns present: {sorted(present)}"
            )


def read_file(path: Path, columns: tuple[str, str] | None = None) -> tuple[list, list[int]]:
    """Rows of a .jsonl (one object per line; undecodable lines become None rows), .json
    (a list of objects or an object of equal-length column lists) or .parquet file, and the
    1-based position of each: its line number in a .jsonl file (blank lines are no rows),
    its row number otherwise.

    With `columns` (problem, answer), a parquet file is checked for them and only they are
    read; other formats are read whole and checked by `rows_to_examples`.
    """
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        if columns is not None:
            present = pq.read_schema(path).names
            check_columns(path, present, *columns)
            columns = list(dict.fromkeys(column_of(key, present) for key in columns))
        return _numbered(pq.read_table(path, columns=columns).to_pylist())
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows, lines = [], []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    rows.append(None)
                lines.append(number)
        return rows, lines
    data = json.loads(text)
    if isinstance(data, list):
        return _numbered(data)
    lists = isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values())
    if lists and len({len(v) for v in data.values()}) == 1:
        cells = zip(*data.values(), strict=True)
        return _numbered([dict(zip(data, row, strict=True)) for row in cells])
    raise UserError(
        f"{path}: expected a JSON list of objects or an object of equal-length column lists"
    )


def _numbered(rows: list) -> tuple[list, list[int]]:
    return rows, list(range(1, len(rows) + 1))


def _looks_like_path(source: str) -> bool:
    return source.endswith(FILE_SUFFIXES) or source.startswith(("/", ".", "~")) or "\\" in source


def _load_hf(source: str, split: str, subset: str | None, columns: tuple[str, str]) -> list[Any]:
    """The two `columns` of a local folder or hub dataset, through `datasets.load_dataset`."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            f"reading {source!r} needs the `datasets` package: pip install -r requirements.txt"
        ) from err
    try:
        table = datasets.load_dataset(source, name=subset, split=split)
    except Exception as err:
        raise UserError(
            f"data source {source!r} is neither a local .jsonl/.json/.parquet file nor a "
            f"dataset that `datasets.load_dataset` could load (split={split!r}, "
            f"subset={subset!r}): {err}"
        ) from err
    present = table.column_names
    check_columns(source, present, *columns)
    return table.select_columns(
        list(dict.fromkeys(column_of(k, present) for k in columns))
    ).to_list()


def _read_rows(
    source: str, split: str, subset: str | None, columns: tuple[str, str]
) -> tuple[list, list[int]]:
    """Rows of `source` and their positions (`read_file`; row numbers for a data set)."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix not in FILE_SUFFIXES:
            raise UserError(f"{path}: unsupported file type; use one of {FILE_SUFFIXES}")
        return read_file(path, columns)
    if path.is_dir() or not _looks_like_path(source):
        return _numbered(_load_hf(source, split, subset, columns))
    raise PathError(
        f"data file {source!r} does not exist; set data.source to an existing "
        f".jsonl/.json/.parquet file, a hub dataset id, or 'generated'"
    )


def rows_to_examples(
    rows: Sequence[Any],
    problem_key: str,
    answer_key: str,
    answer_from_boxed: bool = False,
    origin: str = "data",
) -> tuple[list[dict[str, str]], list[int]]:
    """Examples from raw rows and the indices (0-based) of the malformed rows skipped.

    Raises ValueError (`check_columns`) when no row has `problem_key` or `answer_key`. A row
    is malformed when it is not an object, lacks a column, or a cell fails `_as_text`; with
    `answer_from_boxed` the answer is the last `\\boxed{}` of the answer cell (e.g. a
    MATH/Minerva solution) and a cell without one is malformed too.
    """
    if rows:
        present = {key for row in rows if isinstance(row, dict) for key in row}
        check_columns(origin, present, problem_key, answer_key)
    examples, malformed = [], []
    for i, row in enumerate(rows):
        problem = answer = None
        if isinstance(row, dict):
            problem, answer = _as_text(cell(row, problem_key)), _as_text(cell(row, answer_key))
            if answer is not None and answer_from_boxed:
                answer = last_boxed(answer)
                answer = answer.strip() if answer and answer.strip() else None
        if problem is None or answer is None:
            malformed.append(i)
        else:
            examples.append({"problem": problem, "answer": answer})
    return examples, malformed


def load_examples(
    source: str,
    *,
    split: str = "train",
    problem_key: str = "problem",
    answer_key: str = "answer",
    subset: str | None = None,
    answer_from_boxed: bool = False,
) -> tuple[list[dict[str, str]], list[int]]:
    """Examples of a local .jsonl/.json/.parquet file, a local folder or a hub id, and the
    positions of the malformed rows skipped (see `rows_to_examples`): 1-based line numbers
    in a .jsonl file, row numbers otherwise.

    A local folder or a hub id (e.g. "open-r1/OpenR1-Math-220k", needs network) goes through
    `datasets.load_dataset(source, name=subset, split=split)`; `split` is ignored for files.
    A path that does not exist (one ending in a data suffix or starting with /, ., ~) raises
    FileNotFoundError.
    """
    rows, positions = _read_rows(source, split, subset, (problem_key, answer_key))
    examples, malformed = rows_to_examples(
        rows, problem_key, answer_key, answer_from_boxed, origin=source
    )
    return examples, [positions[i] for i in malformed]


def malformed_message(
    source: str, positions: list[int], rows: int, problem_key: str, answer_key: str
) -> str:
    """One line on the malformed rows of `source`: their count and first positions."""
    unit = "line" if source.endswith(".jsonl") else "row"
    shown = ", ".join(str(p) for p in positions[:SHOWN_POSITIONS])
    more = ", …" if len(positions) > SHOWN_POSITIONS else ""
    return (
        f"data {source}: {len(positions)} of {rows} rows malformed and skipped ({unit}"
        f"{'s' if len(positions) > 1 else ''} {shown}{more}): not a JSON object, or no "
        f"usable {problem_key!r} or {answer_key!r} value"
    )


def load_train_set(
    source: str,
    *,
    seed: int,
    split: str = "train",
    problem_key: str = "problem",
    answer_key: str = "answer",
    generated_kind: str = "arithmetic",
    generated_difficulty: int = 1,
    num_generated: int = GENERATED_TRAIN_SIZE,
    subset: str | None = None,
    answer_from_boxed: bool = False,
    max_bad_fraction: float = 0.01,
) -> list[dict[str, str]]:
    """The training problems of config section `data`: "generated" gives `num_generated`
    problems of the train split; anything else goes to `load_examples`.

    Malformed rows are a WARNING (`malformed_message`), or a ValueError with that message
    when they are more than `max_bad_fraction` of the rows; a source without any usable
    problem is a ValueError too."""
    if source == "generated":
        return generate_problems(generated_kind, generated_difficulty, seed, num_generated)
    examples, malformed = load_examples(
        source,
        split=split,
        problem_key=problem_key,
        answer_key=answer_key,
        subset=subset,
        answer_from_boxed=answer_from_boxed,
    )
    rows = len(examples) + len(malformed)
    if not examples:
        what = f"all {rows} rows malformed" if rows else "it holds no rows"
        raise UserError(f"data source {source!r} has no usable problem ({what})")
    if not malformed:
        return examples
    message = malformed_message(source, malformed, rows, problem_key, answer_key)
    if len(malformed) > max_bad_fraction * rows:
        raise UserError(
            f"{message}. That is more than data.max_bad_fraction={max_bad_fraction:g} of its "
            "rows, so the run does not start: fix the file, or raise "
            "--config.data.max_bad_fraction to train on the rest."
        )
    logging.warning(message)
    return examples


def load_train_set_of(d, seed: int) -> list[dict[str, str]]:
    """`load_train_set` with the fields of a config's `data` section `d` (subset "" = none)."""
    return load_train_set(
        d.source,
        seed=seed,
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
