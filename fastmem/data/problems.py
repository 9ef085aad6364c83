"""Synthetic multi-step problems: three families, a seeded stream, and answer extraction.

Every problem is a one-line question and a solution: a trace of intermediate results, then
`` => ANSWER``. Each step needs only the previous result(s) and constants named in the question,
so a tiny model learns the steps quickly; chains of 5 to 8 steps then give it many chances to slip
when sampled, so single samples often err while the majority of samples is still right.
"""
from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator

ANSWER_MARKER = " => "
_ANSWER_PATTERN = re.compile(r"=>\s*(-?\d+)")


def _indexed(values: list[int]) -> list[str]:
    """Steps ``1:v1``, ``2:v2``, ...: the index tells a model when the asked number of steps is done."""
    return [f"{index}:{value}" for index, value in enumerate(values, 1)]


def _multiply_mod(rng: random.Random) -> tuple[str, list[str], int]:
    """Multiply by a constant modulo 11, a given number of times: ``4*3 mod 11, 6 times?``."""
    start, factor, times = rng.randint(1, 10), rng.randint(2, 10), rng.randint(5, 8)
    values = [start * factor ** k % 11 for k in range(1, times + 1)]
    return f"{start}*{factor} mod 11, {times} times?", _indexed(values), values[-1]


def _fibonacci_mod(rng: random.Random) -> tuple[str, list[str], int]:
    """Each term the sum of the previous two, modulo 10: ``3,5 fib mod 10, 7 terms?``."""
    first, second, terms = rng.randint(0, 9), rng.randint(0, 9), rng.randint(5, 8)
    question, values = f"{first},{second} fib mod 10, {terms} terms?", []
    for _ in range(terms):
        first, second = second, (first + second) % 10
        values.append(second)
    return question, _indexed(values), values[-1]


def _linear(rng: random.Random) -> tuple[str, list[str], int]:
    """Solve ``ax+b=cx+d`` for integer x by moving terms one at a time: ``5x-3=2x+18?``."""
    x, c = rng.randint(-9, 19), rng.randint(1, 8)
    a = c + rng.randint(1, 5)
    b = rng.randint(-30, 30)
    d = (a - c) * x + b
    steps = [f"{a - c}x{b:+d}={d}", f"{a - c}x={d - b}", f"x={x}"]
    return f"{a}x{b:+d}={c}x{d:+d}?", steps, x


FAMILIES: dict[str, Callable[[random.Random], tuple[str, list[str], int]]] = {
    "multiply_mod": _multiply_mod,
    "fibonacci_mod": _fibonacci_mod,
    "linear": _linear,
}


def make_problem(rng: random.Random, family: str | None = None) -> dict[str, str]:
    """One problem ``{"question", "solution", "answer", "family"}`` drawn with `rng`.

    `solution` is what the model should write after the question: ``" " + trace + " => " + answer``.
    """
    family = family or rng.choice(list(FAMILIES))
    question, steps, answer = FAMILIES[family](rng)
    solution = " " + ",".join(steps) + ANSWER_MARKER + str(answer)
    return {"question": question, "solution": solution, "answer": str(answer), "family": family}


def stream(seed: int, n: int | None = None, families: list[str] | None = None) -> Iterator[dict[str, str]]:
    """Yield `n` problems (forever when `n` is None), the same ones for the same `seed`.

    Families are drawn uniformly from `families` (default: all of `FAMILIES`).
    """
    rng = random.Random(seed)
    names = families or list(FAMILIES)
    produced = 0
    while n is None or produced < n:
        yield make_problem(rng, rng.choice(names))
        produced += 1


def extract_answer(text: str) -> str | None:
    """The integer after the last ``=>`` in `text` (as a string), or None when there is none."""
    matches = _ANSWER_PATTERN.findall(text)
    return matches[-1] if matches else None
