"""Final answers: extraction from model output, normalization, equivalence, and the majority vote.

The vote is the self-made reward of the online loop (no labels): extraction or equivalence that is
wrong silently rewards wrong traces, so the rules are explicit and each one is a row of
``tests/test_answers.py``.

- `extract_answer(text)`: a sample's final answer (rules in its docstring: last ``\\boxed{}``, else
  the last "answer is" / ``####`` / ``=>`` marker, else the last ``$…$`` span or bare number).
- References (GSM8K ``#### 1,234``, a MATH solution's ``\\boxed{}``) are read by
  `fastmem.data.files.reference_answer`, which hands them to `extract_answer`.
- `normalize_answer(answer)`: the one normalization done here rather than by math-verify.
- `answers_equivalent(a, b)`: math-verify's ``verify`` on both normalized answers, each parsed as
  ``$…$`` LaTeX (math-verify's LaTeX extractor reads LaTeX only inside math delimiters: a bare
  ``1 - \\sqrt{2}`` parses as ``1``); words are compared as text.
- `majority_vote(answers)`: groups equivalent answers; deterministic; never merges two answers
  that are not equivalent.

Parses and pair results are cached per string (LRU), so a vote over 64 samples parses each
distinct answer once.
"""
from __future__ import annotations

import re
import threading
import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

import sympy
from math_verify import parse, verify


# ---------------------------------------------------------------------------------------------
# Normalization

_UNICODE = {
    "\u2212": "-", "\u2012": "-", "\u2013": "-", "\u2014": "-", "\ufe63": "-", "\uff0d": "-",  # minus signs
    "\u00b1": "\\pm ", "\u221e": "\\infty ", "\u03c0": "\\pi ", "\u00d7": "\\times ", "\u00b7": "\\cdot ",
    "\u00a0": " ", "\u2009": " ", "\u202f": " ", "\u2007": " ",  # non-breaking and thin spaces
    "\u00b0": "",  # degree sign: degrees are dropped (below)
}
_UNICODE_PATTERN = re.compile("|".join(map(re.escape, _UNICODE)))
_DELIMITED = re.compile(r"^(?:\$\$(.*)\$\$|\$(.*)\$|\\\((.*)\\\)|\\\[(.*)\\\])$", re.S)
_BOLD = re.compile(r"^(?:\*\*(.*)\*\*|__(.*)__|\*(.*)\*)$", re.S)
_WRAPPER = re.compile(r"^\\(?:boxed|fbox|text|textbf|textrm|textnormal|mathrm|mbox)\s*\{(.*)\}$", re.S)
_TRAILING = re.compile(r"[\s.,;:!?]+$")
_DIGIT_GROUP = re.compile(r"(?<=\d)(?:\{,\}|\\,|\\!)(?=\d{3}(?!\d))")
_THOUSANDS = re.compile(r"(?<![\d.,])\d{1,3}(?:,\d{3})+(?![\d,])(?:\.\d+)?")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ\b|\\degree\b|\^\s*\{\s*\\text\{\s*o\s*\}\s*\}")
_PERCENT = re.compile(r"\\?%")
_UNIT = re.compile(r"(?<=[\d}])\s*\\(?:text|mbox|mathrm|textrm|textnormal)\s*\{\s*[A-Za-z][A-Za-z .]*\}"
                   r"(?:\s*\^\s*\{?\d\}?)?")
_WORD_UNITS = re.compile(r"^(-?[\d.,/]*\d)\s*(?:[A-Za-z]{2,}\.?\s*)+$")
_ASSIGNMENT = re.compile(r"^[A-Za-z](?:_\{?\w+\}?)?\s*=\s*([^=]+)$")
_SPACING = re.compile(r"\\[,;:! ]|\\q?quad\b|\\displaystyle\b")
_WORDS = re.compile(r"^[A-Za-z]*[A-Za-z]{2}[A-Za-z' -]*$")


def _unwrap(answer: str) -> str:
    """Strip what surrounds the whole answer until nothing changes: whitespace, trailing
    punctuation, math delimiters, markdown bold/italic, ``\\boxed{}`` / ``\\text{}``, a leading ``=``."""
    while True:
        before = answer
        answer = _TRAILING.sub("", answer.strip()).lstrip("= ")
        for pattern in (_DELIMITED, _BOLD, _WRAPPER):
            match = pattern.match(answer)
            if match and _balanced(inner := next(g for g in match.groups() if g is not None)):
                answer = inner
        if answer == before:
            return answer


def _balanced(text: str) -> bool:
    depth = 0
    for char in text:
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth < 0:
            return False
    return depth == 0


@lru_cache(maxsize=65_536)
def normalize_answer(answer: str) -> str:
    """The canonical form of one final answer: what math-verify does not normalize itself.

    Rules, in order (each a row of tests/test_answers.py):
    1. Unicode: minus signs (U+2212, dashes) become ``-``; ``±`` ``\\pm``; ``∞`` ``π`` ``×`` ``·``
       their LaTeX; non-breaking and thin spaces a space; the degree sign is dropped.
    2. Wrappers around the whole answer are removed: ``$…$``, ``$$…$$``, ``\\(…\\)``, ``\\[…\\]``,
       markdown ``**bold**`` / ``*italic*``, ``\\boxed{}``, ``\\text{}``, trailing ``.,;:!?``.
    3. ``\\left`` / ``\\right``, spaces just inside brackets, ``\\displaystyle`` and spacing
       commands go; ``\\dfrac`` and ``\\tfrac`` become ``\\frac``.
    4. Thousands separators go (GSM8K writes ``1,234``; LaTeX ``9{,}500`` or ``9\\,500``): a
       comma is a separator only in a strict ``d,ddd,ddd`` group, so the list ``1,2,3`` stays.
    5. Degrees (``^\\circ``), percent (``\\%``: GSM8K's answer to "what percent" is the number of
       percent, so ``50\\%`` equals ``50``, not ``0.5``) and currency (``\\$``) are dropped.
    6. Units: a ``\\text{…}`` of words after a number (``5\\text{ cm}^2``), and plain words after a
       lone number (``18 dollars``), are dropped.
    7. A lone variable's assignment ``x = 5`` becomes ``5`` (MATH writes answers either way).
    8. Whitespace runs become one space.
    """
    answer = _UNICODE_PATTERN.sub(lambda m: _UNICODE[m.group()], answer)
    answer = _unwrap(answer)
    answer = re.sub(r"\\(?:left|right)\b\s*", "", answer)
    answer = re.sub(r"(?<=[([{])\s+|\s+(?=[)\]}])", "", answer)
    answer = re.sub(r"\\[dt]frac\b", r"\\frac", answer)
    answer = _DIGIT_GROUP.sub("", answer)
    answer = _SPACING.sub(" ", answer)
    answer = _THOUSANDS.sub(lambda m: m.group().replace(",", ""), answer)
    answer = _DEGREES.sub("", answer)
    answer = _PERCENT.sub("", answer)
    answer = answer.replace("\\$", "")
    answer = _UNIT.sub("", answer)
    answer = _unwrap(" ".join(answer.split()))
    for pattern in (_WORD_UNITS, _ASSIGNMENT):
        match = pattern.match(answer)
        if match:
            answer = _unwrap(match.group(1))
    return answer


# ---------------------------------------------------------------------------------------------
# Extraction

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_MARKER = re.compile(r"(?:\banswer\s*(?:is\b|:|=)|####|=>)\s*:?", re.I)
_NUMBER = re.compile(r"(?:(?<![\w)\]}.])-\s?)?(?:\d{1,3}(?:,\d{3})+(?![\d,])|\d+)(?:\.\d+)?(?:/\d+)?(?:\s?\\?%)?")
_MATH_SPAN = re.compile(r"\$\$(.+?)\$\$|\\\[(.+?)\\\]|\\\((.+?)\\\)", re.S)
_PROSE = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{3,}")
_BOLD_SPAN = re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*|__(?=\S)(.+?)(?<=\S)__")
_SENTENCE_END = re.compile(r"\n|\.(?=\s|$)")


def _boxed_contents(text: str) -> list[tuple[int, str]]:
    """Each ``\\boxed{…}`` / ``\\fbox{…}`` with balanced braces: (position, content)."""
    found = []
    for match in _BOXED.finditer(text):
        depth, start = 0, match.end()
        for position in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[position], 0)
            if depth < 0:
                found.append((match.start(), text[start:position]))
                break
    return found


def _is_math(content: str) -> bool:
    """Whether a ``$…$`` pair encloses math rather than prose between two currency signs: no
    plain word of three letters or more outside ``\\text{}``, no space just inside the closing sign."""
    stripped = re.sub(r"\\(?:text|mathrm|mbox|textbf)\s*\{[^{}]*\}", "", content)
    return bool(content.strip()) and not content[-1].isspace() and not _PROSE.search(stripped)


def _math_spans(text: str) -> list[tuple[int, int, str]]:
    """The math spans of `text`, (start, end, content): ``$$…$$``, ``\\[…\\]``, ``\\(…\\)`` and
    ``$…$``. An escaped ``\\$`` is not a delimiter; a ``$`` whose pair holds prose is a currency
    sign and pairing restarts at the next ``$``."""
    spans = [(m.start(), m.end(), next(g for g in m.groups() if g is not None)) for m in _MATH_SPAN.finditer(text)]
    masked = _mask(text, spans)
    dollars = [m.start() for m in re.finditer(r"(?<!\\)\$", masked)]
    index = 0
    while index + 1 < len(dollars):
        start, end = dollars[index], dollars[index + 1] + 1
        if _is_math(masked[start + 1:end - 1]):
            spans.append((start, end, masked[start + 1:end - 1]))
            index += 2
        else:
            index += 1
    return sorted(spans)


def _mask(text: str, spans: list[tuple[int, int, str]]) -> str:
    """`text` with each span blanked out (so numbers inside spans are not read twice)."""
    for start, end, _ in spans:
        text = text[:start] + " " * (end - start) + text[end:]
    return text


def _numbers(text: str) -> list[tuple[int, str]]:
    return [(m.start(), m.group()) for m in _NUMBER.finditer(text)]


def _result_side(content: str) -> str:
    """An unmarked span's answer: the right side of its last ``=`` (``$3 + 4 = 7$`` gives 7)."""
    return content.rsplit("=", 1)[-1] if "=" in content else content


def _after_marker(segment: str) -> str | None:
    """The answer that follows an "answer is" / ``####`` / ``=>`` marker: a math span opening the
    segment, else the sentence if it is math, else its first number, else a short text (``B``)."""
    segment = segment.lstrip()
    opening = [content for start, _, content in _math_spans(segment) if start == 0]
    if opening:
        return normalize_answer(opening[0]) or None
    sentence = _SENTENCE_END.split(segment, 1)[0]
    answer = normalize_answer(sentence)
    if answer and (not _PROSE.search(answer) or _WORDS.match(answer) and len(answer.split()) <= 1):
        return answer
    numbers = _numbers(sentence)
    if numbers:
        return normalize_answer(numbers[0][1])
    return None


def extract_answer(text: str | None) -> str | None:
    """A sample's final answer, normalized by `normalize_answer`; None when there is none.

    Rules, first that applies (conventions of MATH / Minerva "The final answer is $…$", GSM8K
    ``#### N``, and this package's built-in ``=> N``):
    1. The last non-empty ``\\boxed{…}`` (or ``\\fbox{…}``): several boxed answers, the last counts.
    2. After the last marker ("answer is", "answer:", ``####``, ``=>``; markdown bold removed
       first): a ``$…$`` span opening it, else the rest of its sentence when that is math, else the
       first number in that sentence, else one word (``B``).
    3. The last of: a math span (``$…$``, ``\\(…\\)``, ``\\[…\\]``; for ``a = b`` the right side)
       and a bare number (thousands separators, decimals, ``a/b``, percent, a leading minus).
    """
    if not text:
        return None
    text = _UNICODE_PATTERN.sub(lambda m: _UNICODE[m.group()], text)
    for _, content in reversed(_boxed_contents(text)):
        answer = normalize_answer(content)
        if answer:
            return answer
    text = _BOLD_SPAN.sub(lambda m: m.group(1) or m.group(2), text)
    for marker in reversed(list(_MARKER.finditer(text))):
        answer = _after_marker(text[marker.end():])
        if answer:
            return answer
    spans = _math_spans(text)
    candidates = [(start, _result_side(content)) for start, _, content in spans] + _numbers(_mask(text, spans))
    for _, candidate in sorted(candidates, reverse=True):
        answer = normalize_answer(candidate)
        if answer:
            return answer
    return None


# ---------------------------------------------------------------------------------------------
# Equivalence

def _timeout() -> int | None:
    """math-verify's timeouts use SIGALRM, which only the main thread may set."""
    return 5 if threading.current_thread() is threading.main_thread() else None


@lru_cache(maxsize=65_536)
def _parsed(answer: str) -> tuple:
    return tuple(parse(f"${answer}$", parsing_timeout=_timeout()))


def _number(expr) -> complex | None:
    """A sympy expression's value, its free symbols set to fixed values drawn from their names."""
    if not isinstance(expr, sympy.Expr):
        return None
    if expr.free_symbols:
        expr = expr.subs({symbol: sympy.Rational(zlib.crc32(symbol.name.encode()) % 997 + 1009, 1013)
                          for symbol in expr.free_symbols})
    try:
        value = complex(expr.evalf(20))
    except (TypeError, ValueError, OverflowError, ArithmeticError, AttributeError):
        return None
    return value if value == value and abs(value) != float("inf") else None


@lru_cache(maxsize=65_536)
def _values(answer: str) -> tuple[complex, ...] | None:
    """The sorted numeric values an answer consists of (one number; the elements of a tuple, set
    or list; an interval's finite endpoints), or None when they cannot all be computed. Two answers
    math-verify calls equal have the same values."""
    parsed = _parsed(answer)
    if not parsed:
        return None
    expr = parsed[0]
    if isinstance(expr, (sympy.Tuple, sympy.FiniteSet, list, tuple)):
        elements = list(expr)
    elif isinstance(expr, sympy.Interval) and expr.start.is_finite and expr.end.is_finite:
        elements = [expr.start, expr.end]
    else:
        elements = [expr]
    values = [_number(element) for element in elements]
    return None if None in values else tuple(sorted(values, key=lambda v: (round(v.real, 6), round(v.imag, 6))))


def _clearly_different(first: str, second: str) -> bool:
    """Whether the answers' numeric values differ by more than 1e-4 (relative): then math-verify
    (which rounds to 6 places) cannot call them equal, and its symbolic check is skipped."""
    values_first, values_second = _values(first), _values(second)
    if values_first is None or values_second is None:
        return False
    return len(values_first) != len(values_second) or any(
        abs(a - b) > 1e-4 * max(1.0, abs(a), abs(b)) for a, b in zip(values_first, values_second))


def _key(answer: str) -> str:
    return "".join(answer.split()).casefold()


@lru_cache(maxsize=262_144)
def _equivalent_normalized(first: str, second: str) -> bool:
    if _key(first) == _key(second):
        return True
    if not first or not second or _WORDS.match(first) or _WORDS.match(second):
        return False
    if re.fullmatch(r"-?\d+", first) and re.fullmatch(r"-?\d+", second):
        return int(first) == int(second)
    parsed_first, parsed_second = _parsed(first), _parsed(second)
    if not parsed_first or not parsed_second:
        return False
    if _clearly_different(first, second):
        return False   # skips verify's symbolic simplification (10-200 ms a pair)
    timeout = _timeout()
    return bool(verify(list(parsed_first), list(parsed_second), timeout_seconds=timeout)
                and verify(list(parsed_second), list(parsed_first), timeout_seconds=timeout))


def answers_equivalent(first: str, second: str) -> bool:
    """True when two final answers mean the same.

    Both are normalized (`normalize_answer`); equal text (ignoring case and spaces) is equal;
    words (two letters or more, no LaTeX: ``Paris``) are compared only as text; two integers by
    value; answers whose numbers (elements of tuples, sets, intervals; expressions evaluated with
    their symbols set to fixed values) differ by more than 1e-4 (relative) are different without
    asking math-verify (its symbolic check of ``3\\sqrt{5}`` against ``4\\sqrt{7}`` costs 10-200 ms);
    anything else by math-verify's ``verify`` (both directions, so the relation is
    symmetric) on each answer parsed as ``$…$`` LaTeX: ``\\dfrac{3}{4}`` = ``0.75`` = ``3/4``,
    ``\\pm 2021`` = ``-2021, 2021``, intervals by their endpoints and brackets, sets unordered,
    tuples ordered, decimals to 6 places. An answer math-verify cannot parse equals only itself.
    """
    first, second = normalize_answer(first), normalize_answer(second)
    if first > second:
        first, second = second, first
    return _equivalent_normalized(first, second)


# ---------------------------------------------------------------------------------------------
# Vote

@dataclass(frozen=True)
class Vote:
    """The majority answer (None when no sample gave one), its share of all samples, and which agree."""
    answer: str | None
    share: float
    agrees: tuple[bool, ...]


def majority_vote(answers: Sequence[str | None],
                  equivalent: Callable[[str, str], bool] = answers_equivalent) -> Vote:
    """Group ``answers`` (one per sample, None = no answer extracted) by ``equivalent`` and pick the largest.

    Identical strings share a group; a new distinct answer joins the first group (in order of
    first appearance) all of whose distinct answers are equivalent to it, else starts a group, so
    two answers that are not equivalent never share a group even where an equivalence is not
    transitive. Ties go to the group seen first; a group is represented by its first answer. The
    share counts every sample, answered or not, in the denominator. Each pair of distinct answers
    is compared at most once.
    """
    groups: list[list[str]] = []        # distinct answers, in order of first appearance
    group_of: dict[str, int] = {}
    for answer in answers:
        if answer is None or answer in group_of:
            continue
        for index, group in enumerate(groups):
            if all(equivalent(member, answer) for member in group):
                group.append(answer)
                group_of[answer] = index
                break
        else:
            group_of[answer] = len(groups)
            groups.append([answer])
    if not groups:
        return Vote(None, 0.0, tuple(False for _ in answers))
    counts = [0] * len(groups)
    for answer in answers:
        if answer is not None:
            counts[group_of[answer]] += 1
    winner = max(range(len(groups)), key=counts.__getitem__)   # max keeps the first of equal counts
    return Vote(groups[winner][0], counts[winner] / len(answers),
                tuple(answer is not None and group_of[answer] == winner for answer in answers))
