"""Equivalence verdicts of `math_reward` on boxed answers, grouped by kind (written for this
project), the documented fixes of math-verify's false positives / negatives, and the fast
paths' agreement with the full SymPy comparison; every CHAMP gold against itself."""

import pytest
from math_verify import parse, verify

from daro_jax import data
from daro_jax.rewards import VerifierConfig, math_reward
from daro_jax.rewards.verify import _compare, normalize, parse_gold, score_item

# Every CHAMP answer (as `data.champ_answer` reduces it), boxed, is judged equal to itself;
# at least this many of the 270 also parse to SymPy (265 measured by
# bench/verifier_coverage.py; the others, e.g. "sum_(k=1)^n 1/k", compare as strings).
CHAMP_MIN_PARSED = 260

# kind -> [(gold, boxed answer, expected verdict)]
CASES = {
    "integers with separators": [
        ("1234", "1,234", True),
        ("1,234", "1234", True),
        ("1234567", "1{,}234{,}567", True),
        ("1234567", "1\\,234\\,567", True),
        ("10,\\!080", "10080", True),
        ("10,\\!080", "10,080", True),
        ("11,\\! 111,\\! 111,\\! 100", "11111111100", True),
        ("\\$32,\\!348", "32348", True),
        ("58,500", "58500", True),
        ("1234", "1,243", False),
        ("1000000", "1,000,001", False),
    ],
    "decimals vs fractions": [
        ("0.5", "\\frac{1}{2}", True),
        ("\\frac{1}{2}", "0.5", True),
        ("\\frac{3}{8}", "0.375", True),
        ("\\frac{1}{3}", "0.333333", True),
        ("\\frac{1}{3}", "0.33", False),
        ("\\frac{14}{3}", "14/3", True),
        ("\\frac43", "\\frac{4}{3}", True),
        ("\\frac 59", "5/9", True),
        ("\\frac9{19}", "\\frac{9}{19}", True),
        ("\\dfrac{33}{100}", "0.33", True),
        ("0.15", "\\frac{3}{20}", True),
        ("1.25", "\\frac{5}{4}", True),
        ("1.25", "1.250", True),
        ("1.25", "1.26", False),
        ("\\frac{2}{4}", "\\frac{1}{2}", True),
        ("\\frac{3}{56}", "\\frac{3}{65}", False),
        (".0000672", "0.0000672", True),
        (".0000672", "6.72\\times10^{-5}", True),
    ],
    "percent": [
        ("25\\%", "25", True),
        ("25\\%", "0.25", True),
        ("25\\%", "25\\%", True),
        ("0.25", "25\\%", True),
        ("0.15", "15\\%", True),
        ("12.5\\%", "12.5", True),
        ("25\\%", "26\\%", False),
        ("25\\%", "0.26", False),
    ],
    "radicals": [
        ("2\\sqrt{2}", "\\sqrt{8}", True),
        ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", True),
        ("3\\sqrt{3}", "\\sqrt{27}", True),
        ("2\\sqrt{113}", "\\sqrt{452}", True),
        ("3\\sqrt{13}", "3 \\sqrt{13}", True),
        ("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}", True),
        ("\\frac{\\sqrt{3}}{3}", "\\sqrt{3}/3", True),
        ("11\\sqrt2", "11\\sqrt{2}", True),
        ("\\sqrt{2}+\\sqrt{3}", "\\sqrt{3}+\\sqrt{2}", True),
        ("2", "\\sqrt[3]{8}", True),
        ("2\\sqrt{3}", "3\\sqrt{2}", False),
        ("\\frac{\\sqrt{3}}{3}", "\\sqrt{3}", False),
        ("\\sqrt{53}", "\\sqrt{35}", False),
    ],
    "pi": [
        ("2\\pi", "2 \\pi", True),
        ("\\frac{\\pi}{2}", "\\pi/2", True),
        ("4\\pi", "12.566370614", True),
        ("\\frac{3\\pi}{4}", "\\frac{3}{4}\\pi", True),
        ("-\\frac{\\pi}{6}", "-\\pi/6", True),
        ("18+2\\pi", "2\\pi+18", True),
        ("\\frac{20000}{\\pi}", "20000/\\pi", True),
        ("2\\pi", "6.28", False),
        ("288 \\pi", "288", False),
        ("7\\pi", "7", False),
    ],
    "intervals": [
        ("(-\\infty, 3)", "(-\\infty,3)", True),
        ("[1, 5)", "[1,5)", True),
        ("(-\\infty, -2] \\cup [2, \\infty)", "(-\\infty,-2]\\cup[2,\\infty)", True),
        ("(0,9) \\cup (9,36)", "(0,9)\\cup(9,36)", True),
        ("\\left(\\frac{3}{5},\\frac{8}{3}\\right]", "(0.6, \\frac{8}{3}]", True),
        ("x \\in [-2,7]", "[-2,7]", True),
        ("[-2,7]", "x \\in [-2,7]", True),
        ("[1, 5)", "(1,5)", False),
        ("[1, 5)", "[1,5]", False),
        ("(0,9) \\cup (9,36)", "(0,36)", False),
    ],
    "sets": [
        ("\\{1,2\\}", "\\{2,1\\}", True),
        ("1, 2", "\\{1,2\\}", True),
        ("1, 2", "2, 1", True),
        ("3, 5, 7", "7, 5, 3", True),
        ("1 \\pm \\sqrt{19}", "1+\\sqrt{19}, 1-\\sqrt{19}", True),
        ("\\{-1, 3\\}", "3, -1", True),
        ("3, 5, 7", "3, 5", False),
        ("1 \\pm \\sqrt{19}", "1+\\sqrt{19}", False),
        ("\\{1,2\\}", "\\{1,3\\}", False),
    ],
    "tuples": [
        ("(1,2)", "\\left(1, 2\\right)", True),
        ("(6,31,-1)", "(6, 31, -1)", True),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\frac{\\pi}{2})", True),
        ("(15,-29)", "\\left(15,-29\\right)", True),
        ("(1,2)", "(2,1)", False),
        ("(6,31,-1)", "(6, -1, 31)", False),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\pi)", False),
    ],
    "matrices": [
        ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", True),
        (
            "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}",
            "\\begin{bmatrix} 1 & 2 \\\\ 3 & 4 \\end{bmatrix}",
            True,
        ),
        (
            "\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}",
            "\\begin{pmatrix} -\\frac{1}{3} \\\\ \\frac{2}{3} \\\\ \\frac{5}{3} \\end{pmatrix}",
            True,
        ),
        (
            "\\begin{pmatrix} -1 & 0 \\\\ 0 & -1 \\end{pmatrix}",
            "\\begin{pmatrix} -1 & 0 \\\\ 0 & -1 \\end{pmatrix}",
            True,
        ),
        ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}2\\\\1\\end{pmatrix}", False),
        (
            "\\begin{pmatrix} -1 & 0 \\\\ 0 & -1 \\end{pmatrix}",
            "\\begin{pmatrix} 1 & 0 \\\\ 0 & 1 \\end{pmatrix}",
            False,
        ),
    ],
    "equations x=3 vs 3": [
        ("3", "x=3", True),
        ("x=3", "3", True),
        ("x=5", "x = 5", True),
        ("-41", "x = -41", True),
        ("2.5", "t = \\frac{5}{2}", True),
        ("y = 2x+1", "y=1+2x", True),
        ("5x - 7y + 11z + 4 = 0", "-5x+7y-11z-4=0", True),
        ("3", "x=4", False),
        ("y = 2x+1", "y=2x-1", False),
        ("x=5", "x=2", False),
    ],
    "inequalities": [
        ("x > 3", "x>3", True),
        ("x \\ge 3", "3 \\le x", True),
        ("x > 3", "(3, \\infty)", True),
        ("(3, \\infty)", "x > 3", True),
        ("(-\\infty, 0]", "x \\le 0", True),
        ("x > 3", "x \\ge 3", False),
        ("x > 3", "x < 3", False),
    ],
    "choices": [
        ("\\text{(C)}", "C", True),
        ("\\text{(C)}", "(C)", True),
        ("\\text{(C)}", "\\text{(C)}", True),
        ("\\text{(C)}", "\\textbf{(C)}", True),
        ("\\text{(E)}", "\\text{E}", True),
        ("\\text{(B)}", "B", True),
        ("\\text{(C)}", "D", False),
        ("\\text{(C)}", "\\text{(D)}", False),
        ("\\text{(B)}", "(E)", False),
    ],
    "units": [
        ("5", "5 \\text{ cm}", True),
        ("5\\text{ cm}", "5", True),
        ("12", "12\\text{ inches}", True),
        ("864 \\mbox{ inches}^2", "864", True),
        ("5.4 \\text{ cents}", "5.4", True),
        ("\\$18.90", "18.90", True),
        ("18.90", "\\$18.90", True),
        ("\\frac{270}7\\text{ degrees}", "\\frac{270}{7}", True),
        ("5\\text{ cm}", "6\\text{ cm}", False),
        ("\\$18.90", "\\$19.80", False),
    ],
    "degrees": [
        ("90^\\circ", "90", True),
        ("90", "90^\\circ", True),
        ("45^{\\circ}", "45", True),
        ("120^\\circ", "120^{\\circ}", True),
        ("30^\\circ", "40^\\circ", False),
        ("145^\\circ", "154", False),
    ],
    "scientific notation": [
        ("1.5\\times10^{3}", "1500", True),
        ("3 \\times 10^{8}", "300000000", True),
        ("6.02 \\times 10^{23}", "6.02\\times 10^{23}", True),
        ("0.0012", "1.2 \\times 10^{-3}", True),
        ("2.5 \\cdot 10^{4}", "25000", True),
        ("3 \\times 10^{8}", "3 \\times 10^{9}", False),
        ("1.5\\times10^{3}", "150", False),
    ],
    "negative numbers": [
        ("-12", "-12", True),
        ("-\\frac{1}{2}", "\\frac{-1}{2}", True),
        ("-\\frac{1}{2}", "-0.5", True),
        ("-\\frac{35}{9}", "\\frac{-35}{9}", True),
        ("-\\sqrt{3}", "-\\sqrt{3}", True),
        ("0", "-0", True),
        ("-12", "12", False),
        ("-\\frac{24}{25}", "\\frac{24}{25}", False),
        ("-13x+3", "13x-3", False),
    ],
    "mixed numbers": [
        ("2\\frac{1}{2}", "2.5", True),
        ("2\\frac{1}{2}", "\\frac52", True),
        ("3\\frac{1}{4}", "\\frac{13}{4}", True),
        ("1\\frac{4}{5}", "1.8", True),
        ("\\frac{14}{3}", "4\\frac{2}{3}", True),
        ("3\\frac{1}{4}", "\\frac{3}{4}", False),
        ("1\\frac{4}{5}", "1.45", False),
    ],
    "number bases": [
        ("52_8", "52_8", True),
        ("52_8", "52_{8}", True),
        ("4210_{5}", "4210_5", True),
        ("40_9", "40_3", False),
        ("2516_8", "2516_9", False),
    ],
    "expressions": [
        ("p - q", "p-q", True),
        ("3+4i", "4i+3", True),
        ("6 - 5i", "6-5i", True),
        ("x^2+2x+1", "(x+1)^2", True),
        ("2k+2", "2(k+1)", True),
        ("(a+5)(b+2)", "(b+2)(a+5)", True),
        ("\\cot x", "\\frac{\\cos x}{\\sin x}", True),
        ("1-\\frac{1}{e}", "\\frac{e-1}{e}", True),
        ("e^{2}", "e^2", True),
        ("\\text{Devon}", "Devon", True),
        ("\\text{even}", "\\text{Even}", True),
        ("3+4i", "3-4i", False),
        ("(a+5)(b+2)", "(a+2)(b+5)", False),
        ("\\text{even}", "\\text{odd}", False),
    ],
    "wrong answers that look close": [
        ("999999", "1000000", False),
        ("1000000", "1000001", False),
        ("0", "0.001", False),
        ("10^{-10}", "0", False),
        ("\\frac{1}{6}", "\\frac{1}{7}", False),
        ("\\frac{9}{256}", "\\frac{9}{265}", False),
        ("2^{100}", "2^{101}", False),
        ("\\frac{1}{2^{99}}", "2^{-99}", True),
        ("2^{100}", "1267650600228229401496703205376", True),
        ("\\frac{1}{2004!}", "\\frac{1}{2004!}", True),
        ("3\\sqrt{13}", "3\\sqrt{31}", False),
        ("0.0000672", "0.0000673", False),
        ("0.001234", "0.001235", False),
    ],
}

# Documented fixes: (gold, boxed answer, our verdict, plain math-verify's verdict)
FIXES = [
    # tiny magnitudes collapse under evalf(chop=True) / 6-decimal rounding
    ("\\frac{1}{2004!}", "\\frac{1}{2006!}", False, True),
    ("1+\\frac{1}{2004!}", "1+\\frac{1}{2006!}", False, True),  # no tiny magnitude: 30 digits
    ("\\frac{1}{2^{99}}", "\\frac{1}{2^{98}}", False, True),
    ("\\frac{1}{2^{99}}", "0.0", False, True),
    ("0.0000672", "0.0000673", False, True),
    # a set literal is not the pair / open interval (1, 2)
    ("\\{1,2\\}", "(1,2)", False, True),
    ("(1,2)", "\\{1,2\\}", False, True),
    # markdown bold inside the box
    ("73", "**73**", True, False),
    # thousands groups with a LaTeX thin space read as a product
    ("1234", "1\\,234", True, False),
    # a sentence-final period inside the box
    ("3", "3.", True, False),
    # relation answer against an interval gold
    ("(3, \\infty)", "x > 3", True, False),
    # a base subscript is dropped by the parser: 40_3 read as 40_9
    ("40_9", "40_3", False, True),
    # a percentage with a non-integer value (math-verify accepts 25 for 25% only)
    ("12.5\\%", "12.5", True, False),
    ("12.5", "12.5\\%", True, False),
]

FLAT = [(kind, *case) for kind, cases in CASES.items() for case in cases]


def test_case_count():
    assert len(FLAT) >= 150, len(FLAT)
    assert sum(expected for *_, expected in FLAT) > 50
    assert sum(not expected for *_, expected in FLAT) > 50


@pytest.mark.parametrize(("kind", "gold", "answer", "expected"), FLAT)
def test_equivalence(kind, gold, answer, expected):
    completion = f"Working through the steps, the result is $\\boxed{{{answer}}}$."
    assert math_reward(completion, gold) == float(expected), (kind, gold, answer)


@pytest.mark.parametrize(("kind", "gold", "answer", "expected"), FLAT)
def test_fast_paths_agree_with_full_comparison(kind, gold, answer, expected):
    normalized, parsed_gold = normalize(answer), parse_gold(gold)
    full = _compare(normalized, parsed_gold, fast=False)
    assert _compare(normalized, parsed_gold, fast=True) == full


NUMBER_FORMS = [
    "7",
    "-7",
    "1,234",
    "1234",
    "1,234.5",
    "1234.50",
    "3/4",
    "\\frac{3}{4}",
    "\\dfrac{6}{8}",
    "0.75",
]
NUMBER_FORMS += [
    "-0.75",
    "2.50",
    "2.5",
    "0",
    "-0",
    "0.0",
    "x = 7",
    "y=-7",
    "n = 0.75",
    "e = 7",
    "I = 7",
]


@pytest.mark.parametrize("gold", ["7", "-7", "1234", "1234.5", "\\frac{3}{4}", "0.75", "2.5", "0"])
@pytest.mark.parametrize("answer", NUMBER_FORMS)
def test_rational_fast_path_matches_full_comparison(gold, answer):
    normalized, parsed_gold = normalize(answer), parse_gold(gold)
    assert _compare(normalized, parsed_gold, fast=True) == _compare(
        normalized, parsed_gold, fast=False
    )


@pytest.mark.parametrize(("gold", "answer", "ours", "plain"), FIXES)
def test_documented_fixes(gold, answer, ours, plain):
    plain_verdict = verify(parse(f"${gold}$"), parse(f"$\\boxed{{{answer}}}$"))
    assert plain_verdict == plain, "the library's behaviour this fix addresses changed"
    assert math_reward(f"so $\\boxed{{{answer}}}$", gold) == float(ours)


def test_bare_prefix_extraction_false_positive_is_not_repeated():
    # Plain math-verify reads the leading number of an unboxed answer: `1+1/e` becomes 1, the
    # same as a bare gold `1-1/e`. We read the whole answer after "answer is".
    assert verify(parse("1-1/e"), parse("The answer is 1+1/e"))
    assert math_reward("The answer is 1+1/e", "1-1/e", fallback="answer_is") == 0.0
    assert math_reward("The answer is 1-1/e", "1-1/e", fallback="answer_is") == 1.0


def test_last_of_several_boxes_counts():
    completion = "First guess $\\boxed{4}$, but rechecking, the answer is $\\boxed{5}$."
    assert math_reward(completion, "5") == 1.0
    assert math_reward(completion, "4") == 0.0


def test_champ_golds_equal_themselves_boxed():
    """Every CHAMP gold normalizes and matches itself boxed; at least CHAMP_MIN_PARSED parse
    to SymPy (with the reward's parser). (Loading CHAMP: tests/data/test_data.py.)"""
    from math_verify.parser import parse_latex_cached

    champ = data.load_benchmark("champ", None)
    config = VerifierConfig(fallback="none")
    parsed = 0
    for e in champ:
        text = parse_gold(e["answer"]).text
        assert text, e["answer"]
        try:
            parse_latex_cached(text)
            parsed += 1
        except Exception:
            pass
        assert score_item(f"\\boxed{{{e['answer']}}}", e["answer"], config) == (
            1.0,
            "correct",
        ), e["answer"]
    assert parsed >= CHAMP_MIN_PARSED
