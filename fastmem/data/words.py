"""A seeded stream of natural-language arithmetic word problems in GSM8K style (one to three steps).

Each problem is ``{"question", "answer", "steps", "template"}``: ``answer`` is a worked solution that ends
``#### N`` as GSM8K's do (`fastmem.data.files.reference_answer` reads ``N`` off it). Operands are single
digits and every intermediate result is a positive integer below 30: SmolLM2-135M-Instruct already
errs on two-digit subtraction (``23 - 9 = 17``), so larger numbers measure its arithmetic, not the
reading and the steps. ``python -m fastmem run --data words`` uses this stream;
`write_jsonl` writes it out.
"""
from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path

NAMES = ("Ava", "Ben", "Carla", "Dev", "Elena", "Farid", "Grace", "Hugo", "Iris", "Jamal", "Kira", "Leo",
         "Maya", "Noah", "Olga", "Pablo", "Quinn", "Rosa", "Sam", "Tara")
ITEMS = ("apples", "marbles", "stickers", "pencils", "cookies", "books", "cards", "shells", "stamps", "eggs")
CONTAINERS = ("boxes", "bags", "jars", "packs", "baskets")

# (question, solution lines, answer) from a random generator
Template = Callable[[random.Random], tuple[str, list[str], int]]


def _pick(rng: random.Random) -> tuple[str, str, str]:
    name, friend = rng.sample(NAMES, 2)
    return name, friend, rng.choice(ITEMS)


# ---- one step ------------------------------------------------------------------------------------

def _buy_more(rng):
    name, _, items = _pick(rng)
    a, b = rng.randint(2, 9), rng.randint(1, 5)
    return (f"{name} has {a} {items}. {name} buys {b} more {items}. How many {items} does {name} have now?",
            [f"{name} has {a} + {b} = {a + b} {items}."], a + b)


def _give_away(rng):
    name, friend, items = _pick(rng)
    b = rng.randint(1, 5)
    a = b + rng.randint(1, 6)
    return (f"{name} had {a} {items} and gave {b} of them to {friend}. How many {items} does {name} have left?",
            [f"{name} has {a} - {b} = {a - b} {items} left."], a - b)


def _found_more(rng):
    name, _, items = _pick(rng)
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    return (f"{name} found {a} {items} in the morning and {b} {items} in the afternoon. How many {items} did "
            f"{name} find?", [f"{name} found {a} + {b} = {a + b} {items}."], a + b)


# ---- two steps -----------------------------------------------------------------------------------

def _get_then_give(rng):
    name, friend, items = _pick(rng)
    a, b = rng.randint(2, 9), rng.randint(1, 5)
    c = rng.randint(1, min(a + b - 1, 5))
    return (f"{name} has {a} {items}. {friend} gives {name} {b} more {items}. Then {name} loses {c} {items}. "
            f"How many {items} does {name} have now?",
            [f"After the gift {name} has {a} + {b} = {a + b} {items}.",
             f"After losing {c}, {name} has {a + b} - {c} = {a + b - c} {items}."], a + b - c)


def _two_friends(rng):
    name, friend, items = _pick(rng)
    a, more = rng.randint(2, 6), rng.randint(1, 4)
    return (f"{name} has {a} {items}. {friend} has {more} more {items} than {name}. "
            f"How many {items} do they have together?",
            [f"{friend} has {a} + {more} = {a + more} {items}.",
             f"Together they have {a} + {a + more} = {2 * a + more} {items}."], 2 * a + more)


def _packs_then_eat(rng):
    name, _, items = _pick(rng)
    container = rng.choice(CONTAINERS)
    packs, each = rng.randint(2, 3), rng.randint(2, 4)
    total = packs * each
    eaten = rng.randint(1, min(total - 1, 4))
    return (f"{name} buys {packs} {container} of {items} with {each} {items} in each. {name} then gives away "
            f"{eaten} {items}. How many {items} does {name} have left?",
            [f"{name} buys {packs} * {each} = {total} {items}.",
             f"{name} has {total} - {eaten} = {total - eaten} {items} left."], total - eaten)


# ---- three steps ---------------------------------------------------------------------------------

def _three_changes(rng):
    name, friend, items = _pick(rng)
    a, b, c = rng.randint(2, 8), rng.randint(1, 4), rng.randint(1, 4)
    d = rng.randint(1, min(a + b + c - 1, 5))
    return (f"{name} has {a} {items}. {name} buys {b} {items} and finds {c} more. Then {name} gives {d} {items} "
            f"to {friend}. How many {items} does {name} have now?",
            [f"After buying, {name} has {a} + {b} = {a + b} {items}.",
             f"After finding more, {name} has {a + b} + {c} = {a + b + c} {items}.",
             f"After giving {d} away, {name} has {a + b + c} - {d} = {a + b + c - d} {items}."], a + b + c - d)


def _buy_boxes_give(rng):
    name, friend, items = _pick(rng)
    container = rng.choice(CONTAINERS)
    start, boxes, each = rng.randint(2, 6), rng.randint(2, 3), rng.randint(2, 3)
    total = start + boxes * each
    given = rng.randint(1, min(total - 1, 4))
    return (f"{name} has {start} {items}. {name} buys {boxes} {container} with {each} {items} in each, then gives "
            f"{given} {items} to {friend}. How many {items} does {name} have now?",
            [f"The {container} hold {boxes} * {each} = {boxes * each} {items}.",
             f"{name} then has {start} + {boxes * each} = {total} {items}.",
             f"After giving {given} away, {name} has {total} - {given} = {total - given} {items}."], total - given)


def _three_gifts(rng):
    name, friend, items = _pick(rng)
    other = rng.choice([n for n in NAMES if n not in (name, friend)])
    a, b, c = rng.randint(1, 6), rng.randint(1, 6), rng.randint(1, 6)
    return (f"{name} has {a} {items}. {friend} gives {name} {b} {items}, and {other} gives {name} {c} {items}. "
            f"Then {name} buys 1 more. How many {items} does {name} have now?",
            [f"After {friend}'s gift {name} has {a} + {b} = {a + b} {items}.",
             f"After {other}'s gift {name} has {a + b} + {c} = {a + b + c} {items}.",
             f"After buying one, {name} has {a + b + c} + 1 = {a + b + c + 1} {items}."], a + b + c + 1)


TEMPLATES: dict[int, dict[str, Template]] = {
    1: {"buy_more": _buy_more, "give_away": _give_away, "found_more": _found_more},
    2: {"get_then_give": _get_then_give, "two_friends": _two_friends, "packs_then_eat": _packs_then_eat},
    3: {"three_changes": _three_changes, "buy_boxes_give": _buy_boxes_give, "three_gifts": _three_gifts},
}
# how often a problem has 1, 2 or 3 steps, set so that SmolLM2-135M-Instruct's pass@1 lies in 20-60% with
# maj@8 10 points above it (there is something to distill). Measured at temperature 0.4, n = 8, default
# chat prompt, 128 new tokens: pass@1 / maj@8 0.36 / 0.56 on one-step problems (41), 0.14 / 0.13 on
# two-step (23); at temperature 0.7 three-step gave 0.04 / 0.00 (12). The mix: about 0.26 / 0.38.
STEP_WEIGHTS = {1: 0.6, 2: 0.3, 3: 0.1}


def make_word_problem(rng: random.Random, steps: int | None = None) -> dict:
    """One problem ``{"question", "answer", "steps", "template"}`` drawn with ``rng`` (``steps``: 1 to 3,
    None = drawn by `STEP_WEIGHTS`). ``answer`` is the worked solution ending ``#### N``."""
    steps = steps if steps is not None else rng.choices(list(STEP_WEIGHTS), weights=list(STEP_WEIGHTS.values()))[0]
    if steps not in TEMPLATES:
        raise ValueError(f"steps must be 1, 2 or 3; got {steps!r}")
    name = rng.choice(sorted(TEMPLATES[steps]))
    question, lines, answer = TEMPLATES[steps][name](rng)
    return {"question": question, "answer": "\n".join(lines) + f"\n#### {answer}", "steps": steps, "template": name}


def word_problems(seed: int, n: int | None = None) -> Iterator[dict]:
    """Yield ``n`` word problems (forever when None), the same ones for the same ``seed``."""
    rng = random.Random(seed)
    produced = 0
    while n is None or produced < n:
        yield make_word_problem(rng)
        produced += 1


def write_jsonl(path, seed: int, n: int) -> Path:
    """Write ``n`` problems of ``word_problems(seed)`` to ``path`` as JSONL (``question``, ``answer``, ...)."""
    path = Path(path)
    path.write_text("".join(json.dumps(problem) + "\n" for problem in word_problems(seed, n)), encoding="utf-8")
    return path
