"""Final-answer extraction from a completion: pure string functions, no SymPy.

The answer of a completion is, in this order:

1. the content of the last complete `\\boxed{...}` / `\\fbox{...}` (brace-balanced, escaped
   braces `\\{ \\}` do not count; `\\boxed 5` without braces takes the next token), searched in
   the last `max_chars` characters only;
2. with fallback "answer_is" or "last_number": the text after the last "answer is" /
   "answer:" anchor, up to the end of its sentence or math environment;
3. with fallback "last_number": the last number of the text (`-12`, `1,234`, `3.5`, `3/4`,
   `**73**`), thousands separators removed.

Markdown bold around an answer (`**73**`) and a sentence-final period after a digit
(`\\boxed{3.}`) are removed in every mode: math-verify reads both as unparsable strings,
false negatives.
"""

import re
from typing import NamedTuple

FALLBACKS = ("none", "answer_is", "last_number")

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_ANSWER_IS_RE = re.compile(r"(?i)\banswer\b\**\s*(?:is\b\s*:?|:)\**")
_SENTENCE_END_RE = re.compile(r"\.(?:\s|$)|\n")
_MATH_DELIMS = (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$"))
_NUMBER_RE = re.compile(r"(?<![\w.])[-\u2212]?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:/\d+)?")
_BOLD_RE = re.compile(r"^(?:\*\*|__)(.+?)(?:\*\*|__)$", re.DOTALL)
_TRAILING_PUNCT = ".,;:!?"
_FINAL_PERIOD_RE = re.compile(r"\d\.$")
_TOKEN_RE = re.compile(r"[^\s$]+")


class Extraction(NamedTuple):
    """Outcome of `extract_answer`: the answer text, or None and the reason why there is none
    ("no_answer": nothing found; "too_long": the answer is longer than the cap)."""

    answer: str | None
    reason: str | None = None


def _closing_brace(text: str, open_pos: int) -> int:
    """Index of the `}` matching the `{` at `open_pos`, or -1. Linear, non-recursive."""
    depth = 0
    i = open_pos
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return -1


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{..}` / `\\fbox{..}` of `text`, or None.

    The last box is the one that starts last; if it is not closed (a truncated completion),
    there is no answer. `\\boxed 5` (no brace) gives the next whitespace-delimited token.
    """
    starts = [m.end() for m in _BOX_RE.finditer(text)]
    if not starts:
        return None
    pos = starts[-1]
    while pos < len(text) and text[pos].isspace():
        pos += 1
    if pos >= len(text):
        return None
    if text[pos] != "{":
        token = _TOKEN_RE.match(text, pos)
        return token.group(0) if token else None
    end = _closing_brace(text, pos)
    if end < 0:
        return None
    return text[pos + 1 : end]


def _strip_math_delims(s: str) -> str:
    for left, right in _MATH_DELIMS:
        if s.startswith(left):
            end = s.find(right, len(left))
            return s[len(left) : end] if end >= 0 else s[len(left) :]
    return s


def answer_is(text: str) -> str | None:
    """Answer after the last "answer is" / "answer:" anchor (case-insensitive), or None.

    Takes the first math environment right after the anchor when there is one (`$..$`,
    `\\(..\\)`, `\\[..\\]`, `$$..$$`), else the rest of the sentence (cut at ". " or a newline).
    """
    anchors = list(_ANSWER_IS_RE.finditer(text))
    if not anchors:
        return None
    rest = text[anchors[-1].end() :].lstrip(" \t*:")
    if rest.startswith(tuple(left for left, _ in _MATH_DELIMS)):
        candidate = _strip_math_delims(rest)
    else:
        cut = _SENTENCE_END_RE.search(rest)
        candidate = rest[: cut.start()] if cut else rest
    candidate = clean_answer(candidate).rstrip(_TRAILING_PUNCT).strip(" *")
    return candidate or None


def last_number(text: str) -> str | None:
    """The last number of `text` with thousands separators removed, or None.

    Numbers: optional sign (`-` or U+2212), digits with optional `,ddd` groups, optional
    decimals, optional `/digits` (a fraction). Digits glued to letters (`x2`) do not count.
    """
    numbers = _NUMBER_RE.findall(text)
    if not numbers:
        return None
    return numbers[-1].replace(",", "").replace("\u2212", "-")


def clean_answer(answer: str) -> str:
    """Strip whitespace, markdown bold (`**x**`, `__x__`) and one sentence-final period
    after a digit (`\\boxed{3.}`) around an answer."""
    answer = answer.strip()
    bold = _BOLD_RE.match(answer)
    while bold:
        answer = bold.group(1).strip()
        bold = _BOLD_RE.match(answer)
    if _FINAL_PERIOD_RE.search(answer):
        answer = answer[:-1]
    return answer


def extract_answer(
    completion: str, fallback: str = "none", *, max_chars: int = 4000, max_answer_chars: int = 1000
) -> Extraction:
    """The final answer of `completion` (see the module docstring for the rules).

    Only the last `max_chars` characters are searched; an answer longer than
    `max_answer_chars` is refused with reason "too_long".
    """
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback={fallback!r} is not one of {FALLBACKS}.")
    text = completion[-max_chars:]
    answer = last_boxed(text)
    if answer is None and fallback in ("answer_is", "last_number"):
        answer = answer_is(text)
    if answer is None and fallback == "last_number":
        answer = last_number(text)
    if answer is None:
        return Extraction(None, "no_answer")
    answer = clean_answer(answer)
    if not answer:
        return Extraction(None, "no_answer")
    if len(answer) > max_answer_chars:
        return Extraction(None, "too_long")
    return Extraction(answer)
