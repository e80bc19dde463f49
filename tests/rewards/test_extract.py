"""Answer extraction (boxes, fallbacks, caps), the reasons `score_item` reports, and DAPO's
overlong shaping."""

import jax.numpy as jnp
import numpy as np
import pytest

from daro_jax.rewards import VerifierConfig, extract_answer, math_reward, overlong_penalty
from daro_jax.rewards.extract import answer_is, last_boxed, last_number
from daro_jax.rewards.verify import score_item


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so $\\boxed{5}$.", "5"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\fbox{3}", "3"),
        ("\\boxed{4} then \\boxed{7}", "7"),
        ("\\boxed{\\boxed{9}}", "9"),
        ("\\boxed {12}", "12"),
        ("\\boxed 5 apples", "5"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
        ("\\boxed{\\left\\{ 1 \\right\\}}", "\\left\\{ 1 \\right\\}"),
        ("\\boxed{5} then \\boxed{6", None),
        ("\\boxedanswer{3}", None),
        ("no box here 42", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is 42.", "42"),
        ("The final answer is $\\frac{1}{2}$. I hope it is correct.", "\\frac{1}{2}"),
        ("**Answer:** 7", "7"),
        ("Answer: **73**", "73"),
        ("So the answer is: x = 5\nDone.", "x = 5"),
        ("The answer is 3.5.", "3.5"),
        ("the answer is \\(2\\pi\\) radians", "2\\pi"),
        ("first the answer is 3, no wait, the answer is 4.", "4"),
        ("nothing to see", None),
    ],
)
def test_answer_is(text, expected):
    assert answer_is(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5 + 3 = 8.", "8"),
        ("x = -12", "-12"),
        ("We get 1,234 apples", "1234"),
        ("It takes 3.5 hours", "3.5"),
        ("**73**", "73"),
        ("the ratio is 3/4", "3/4"),
        ("5-3=2", "2"),
        ("temperature \u221212", "-12"),
        ("12,34", "34"),
        ("variables x2 and y3", None),
        ("no digits", None),
    ],
)
def test_last_number(text, expected):
    assert last_number(text) == expected


def test_fallback_modes():
    text = "Adding, 5 + 3 = 8."
    assert math_reward(text, "8") == 0.0
    assert math_reward(text, "8", fallback="answer_is") == 0.0
    assert math_reward(text, "8", fallback="last_number") == 1.0
    said = "The answer is **73**. Check: 70 + 3 = 73, not 74"
    assert math_reward(said, "73", fallback="answer_is") == 1.0
    assert math_reward(said, "73", fallback="last_number") == 1.0
    assert math_reward("so 1,234 in total", "1234", fallback="last_number") == 1.0
    assert math_reward("the box wins: \\boxed{6}; 7", "6", fallback="last_number") == 1.0
    with pytest.raises(ValueError, match="fallback"):
        math_reward(text, "8", fallback="first_number")


def test_caps():
    box = "\\boxed{" + "1+" * 600 + "1}"
    assert extract_answer(box).reason == "too_long"
    assert extract_answer(box, max_answer_chars=2000).answer.startswith("1+1+")
    early = "\\boxed{5}" + " filler" * 1000
    assert extract_answer(early).reason == "no_answer"
    assert extract_answer(early, max_chars=10_000).answer == "5"


@pytest.mark.parametrize(
    ("completion", "gold", "expected"),
    [
        ("\\boxed{5}", "5", (1.0, "correct")),
        ("\\boxed{6}", "5", (0.0, "wrong")),
        ("no box", "5", (0.0, "no_answer")),
        ("\\boxed{" + "x" * 1200 + "}", "5", (0.0, "too_long")),
        ("\\boxed{" + "(" * 60 + "1" + ")" * 60 + "}", "1", (0.0, "prescreened")),
        ("\\boxed{9^{9^{9^{9}}}}", "5", (0.0, "prescreened")),
        ("\\boxed{\\frac{1}{}}", "5", (0.0, "parse_failures")),
        ("\\boxed{5}", "  ", (0.0, "gold_failures")),
    ],
)
def test_score_item_reasons(completion, gold, expected):
    assert score_item(completion, gold, VerifierConfig()) == expected


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="timeout_s"):
        VerifierConfig(timeout_s=0.0)
    with pytest.raises(ValueError, match="fallback"):
        VerifierConfig(fallback="last")


def _dapo_reference(length, max_len, cache_len, penalty):
    start = max_len - cache_len
    if length <= start:
        return 0.0
    if length <= max_len:
        return penalty * (start - length) / cache_len
    return -penalty


@pytest.mark.parametrize("penalty", [1.0, 0.5])
def test_overlong_penalty_matches_dapo(penalty):
    lengths = np.array([0, 100, 767, 768, 769, 900, 1023, 1024, 1025, 4000])
    expected = [_dapo_reference(n, 1024, 256, penalty) for n in lengths]
    np.testing.assert_allclose(overlong_penalty(lengths, 1024, 256, penalty), expected)
    jax_out = overlong_penalty(jnp.asarray(lengths), 1024, 256, penalty)
    np.testing.assert_allclose(np.asarray(jax_out), expected, rtol=1e-6)


def test_overlong_penalty_errors():
    with pytest.raises(ValueError, match="cache_len"):
        overlong_penalty(np.array([1]), 100, 0)
    with pytest.raises(ValueError, match="cache_len"):
        overlong_penalty(np.array([1]), 100, 200)
    with pytest.raises(ValueError, match="penalty"):
        overlong_penalty(np.array([1]), 100, 10, -1.0)
