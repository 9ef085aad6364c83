"""Majority vote over sampled answers, with mathematical answer equivalence (math-verify).

`answers_equivalent("1/2", "0.5")` and `("1/2", "\\frac{1}{2}")` hold. Strings math-verify cannot
parse are compared after whitespace and case normalization. No labels are involved: the vote is the
self-made reward of the online loop.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

from math_verify import parse, verify


_MARKED = re.compile(r"(?:=>|[Aa]nswer(?: is)?\s*[:=]?)\s*(-?[\d.,/]*\d)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def extract_answer(text: str | None) -> str | None:
    """A sample's final answer: the last ``\\boxed{...}``, else the number after the last ``=>`` or
    "answer is", else the last number in the text; None when there is none."""
    if not text:
        return None
    boxed = text.rfind("\\boxed{")
    if boxed >= 0:
        depth, start = 0, boxed + len("\\boxed{")
        for position in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[position], 0)
            if depth < 0:
                return text[start:position].strip() or None
    for pattern in (_MARKED, _NUMBER):
        found = pattern.findall(text)
        if found:
            return found[-1].replace(",", "") if pattern is _NUMBER else found[-1]
    return None


@lru_cache(maxsize=65_536)
def _parsed(answer: str):
    return tuple(parse(answer))


def _normalized(answer: str) -> str:
    return " ".join(answer.split()).lower()


def answers_equivalent(first: str, second: str) -> bool:
    """True when the two final answers mean the same (math-verify, else normalized text)."""
    if _normalized(first) == _normalized(second):
        return True
    parsed_first, parsed_second = _parsed(first), _parsed(second)
    if not parsed_first or not parsed_second:
        return False
    return bool(verify(list(parsed_first), list(parsed_second)))


@dataclass(frozen=True)
class Vote:
    """The majority answer (None when no sample gave one), its share of all samples, and which agree."""
    answer: str | None
    share: float
    agrees: tuple[bool, ...]


def majority_vote(answers: Sequence[str | None],
                  equivalent: Callable[[str, str], bool] = answers_equivalent) -> Vote:
    """Group ``answers`` (one per sample, None = no answer extracted) by ``equivalent`` and pick the largest.

    Ties go to the group seen first; a group is represented by its first answer. The share counts
    every sample, answered or not, in the denominator.
    """
    groups: list[list[int]] = []
    for position, answer in enumerate(answers):
        if answer is None:
            continue
        for group in groups:
            if equivalent(answers[group[0]], answer):
                group.append(position)
                break
        else:
            groups.append([position])
    if not groups:
        return Vote(None, 0.0, tuple(False for _ in answers))
    winner = max(groups, key=len)   # max keeps the first of equal-sized groups
    members = set(winner)
    return Vote(answers[winner[0]], len(winner) / len(answers),
                tuple(position in members for position in range(len(answers))))
