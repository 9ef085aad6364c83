"""Options as data: a dataclass field that carries its own help text and allowed values.

`option` declares a field of a frozen settings dataclass (`fastmem.learner.LearnerConfig`); `check_options`
checks an instance against its fields (called from ``__post_init__``); `fastmem.cli` builds the command
line's options from the same fields. Defaults, types, allowed values and help text are written once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields


@dataclass(frozen=True)
class Range:
    """The allowed values of a number option: ``low`` to ``high`` (None: unbounded), each end open or closed."""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = self.low is None or (self.low < value if self.low_open else self.low <= value)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        """``> 0``, ``>= 0`` or ``in (0, 1]``."""
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
UNIT = Range(0, 1)
COSINE = Range(-1, 1)
_KIND_NAMES = {bool: "a bool", int: "an int", float: "a number", str: "a string"}


def option(default, help: str, group: str, *, allowed: Range | tuple | None = None, flags: tuple[str, ...] = ()):
    """A settings field: ``default`` (its type is the field's: bool, int, float, str, or a tuple of non-empty
    strings), ``help`` (one line, for ``--help`` and the docs), ``group`` (the command line's option group),
    ``allowed`` (a `Range` for numbers, a tuple of choices for strings), ``flags`` (the command line's
    spellings; default ``--name-with-dashes``)."""
    return field(default=default, metadata=dict(help=help, group=group, allowed=allowed, flags=flags))


def flags_of(item) -> tuple[str, ...]:
    """A settings field's command-line spellings."""
    return item.metadata["flags"] or ("--" + item.name.replace("_", "-"),)


def check_options(settings) -> None:
    """ValueError naming the first field of ``settings`` (a dataclass built from `option` fields) whose value
    has the wrong type or lies outside its allowed values. A float field takes an int too; a tuple field
    takes None, one string or any iterable of strings, stored as a tuple (frozen dataclasses included)."""
    for item in fields(settings):
        value, kind, allowed = getattr(settings, item.name), type(item.default), item.metadata["allowed"]
        if kind is tuple:
            value = (value,) if isinstance(value, str) else tuple(value or ())
            if not all(isinstance(text, str) and text for text in value):
                raise ValueError(f"{item.name} must be non-empty strings; got {value!r}")
            object.__setattr__(settings, item.name, value)
            continue
        wanted = (int, float) if kind is float else kind
        if not isinstance(value, wanted) or (kind is not bool and isinstance(value, bool)):
            raise ValueError(f"{item.name} must be {_KIND_NAMES[kind]}; got {value!r}")
        if kind is float and not math.isfinite(value):
            raise ValueError(f"{item.name} must be a finite number; got {value!r}")
        if isinstance(allowed, Range) and value not in allowed:
            raise ValueError(f"{item.name} must be {allowed}; got {value!r}")
        if isinstance(allowed, tuple) and value not in allowed:
            raise ValueError(f"{item.name} must be one of {', '.join(allowed)}; got {value!r}")
