"""Problems from a local file (JSONL, JSON, CSV, Parquet) or a built-in stream, for ``python -m fastmem run``.

Files are read with the ``datasets`` library's local loaders (``load_dataset("json" / "csv" /
"parquet", data_files=...)``). Each row gives a question (``question_field``) and, optionally, a
reference (``answer_field``): a bare answer (``42``, ``\\frac{1}{2}``), a GSM8K solution ending
``#### 42`` or a MATH solution holding ``\\boxed{...}``; `reference_answer` reads the final answer off it.
References are used only to report accuracy.
"""
from __future__ import annotations

import os
from pathlib import Path

FORMATS = {".jsonl": "json", ".json": "json", ".ndjson": "json", ".csv": "csv", ".parquet": "parquet",
           ".pq": "parquet"}
BUILTIN = {"synthetic": "the built-in synthetic multi-step problems (fastmem.data.stream)",
           "words": "natural-language arithmetic word problems, GSM8K style (fastmem.data.words)"}


class DataError(ValueError):
    """A data spec or file that gives no usable problems; the message is one line and names the file."""


def reference_answer(text) -> str | None:
    """The final answer a reference states: after GSM8K's ``####``, inside MATH's last ``\\boxed{}``, else
    the whole (stripped) text. None for a missing or empty reference."""
    if text is None:
        return None
    text = str(text).strip()
    if "####" in text or "\\boxed" in text or "\\fbox" in text:   # a worked solution: its final answer
        from fastmem.voting import extract_answer

        return extract_answer(text)
    return text or None


def check_data_spec(spec: str | None) -> None:
    """DataError unless ``spec`` is None, a built-in name, or an existing file of a known format."""
    if spec is None or (spec in BUILTIN and not Path(spec).exists()):
        return
    path = Path(spec).expanduser()
    if not path.is_file():
        names = ", ".join(BUILTIN)
        raise DataError(f"{spec}: no such file (and not a built-in stream: {names})")
    if path.suffix.lower() not in FORMATS:
        raise DataError(f"{spec}: unknown file type {path.suffix or '(none)'}; expected one of "
                        f"{', '.join(sorted(FORMATS))}")


def read_problems(spec: str | None, *, question_field: str = "question", answer_field: str | None = "answer",
                  limit: int | None = None, seed: int = 0) -> list[dict]:
    """``[{"question", "answer"}]`` (``answer``: the reference's final answer, or None) from ``spec``.

    spec: None or "synthetic" (the built-in stream of ``seed``), "words" (word problems of ``seed``), or a
    path to a .jsonl / .json / .csv / .parquet file. question_field / answer_field: the columns to read
    (a missing answer column means no references). Raises `DataError` naming the file and row.
    """
    check_data_spec(spec)
    if spec is None or spec == "synthetic" and not Path(spec).exists():
        from fastmem.data.problems import stream

        return [{"question": p["question"], "answer": p["answer"]} for p in stream(seed, limit)]
    if spec == "words" and not Path(spec).exists():
        from fastmem.data.words import word_problems

        return [{"question": p["question"], "answer": reference_answer(p["answer"])}
                for p in word_problems(seed, limit)]
    rows = _load_rows(Path(spec).expanduser())
    columns = set(rows.column_names)
    if question_field not in columns:
        raise DataError(f"{spec}: no column {question_field!r} for the questions (--question-field); columns: "
                        f"{', '.join(sorted(columns))}")
    if answer_field is not None and answer_field not in columns:
        answer_field = None
    problems = []
    for number, row in enumerate(rows, 1):
        if limit is not None and len(problems) >= limit:
            break
        question = row[question_field]
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{spec}: row {number}: {question_field!r} must be a non-empty string; got {question!r}")
        answer = None if answer_field is None else row[answer_field]
        if answer is not None and not isinstance(answer, (str, int, float)):
            raise DataError(f"{spec}: row {number}: {answer_field!r} must be a string or a number; got {answer!r}")
        problems.append({"question": question, "answer": reference_answer(answer)})
    if not problems:
        raise DataError(f"{spec}: no rows")
    return problems


def _load_rows(path: Path):
    import datasets

    builder = FORMATS[path.suffix.lower()]
    progress, verbosity = datasets.utils.logging.is_progress_bar_enabled(), datasets.logging.get_verbosity()
    datasets.utils.logging.disable_progress_bar()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)   # a parse error is raised below, in one line
    try:
        return datasets.load_dataset(builder, data_files=os.fspath(path), split="train")
    except Exception as error:  # noqa: BLE001 - whatever the loader says, one line naming the file
        cause = error
        while cause.__cause__ is not None:  # datasets wraps the parser's error; its message says more
            cause = cause.__cause__
        lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
        raise DataError(f"{path}: cannot read it as {builder} ({type(cause).__name__}: "
                        f"{lines[0] if lines else 'no message'})") from None
    finally:
        datasets.logging.set_verbosity(verbosity)
        if progress:
            datasets.utils.logging.enable_progress_bar()
