"""Built-in data: seeded problem stream, answer extraction, tokenizer, and the shipped default model."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from fastmem.data import (ANSWER_MARKER, FAMILIES, build_tokenizer, default_model_path, extract_answer,
                          generate_solutions, load_default_model, majority_answer, sampled_accuracy, save_tokenizer,
                          stream)
from fastmem.data.tokenizer import PORTABLE_TOKENIZER_CLASS


@pytest.fixture(scope="module")
def default_model():
    torch.manual_seed(0)
    return load_default_model()


def test_stream_is_deterministic_by_seed():
    assert list(stream(3, 50)) == list(stream(3, 50))
    assert list(stream(3, 50)) != list(stream(4, 50))
    assert list(stream(3, 10)) == list(stream(3, 50))[:10]


def test_stream_covers_every_family_and_can_be_restricted():
    assert {problem["family"] for problem in stream(0, 200)} == set(FAMILIES)
    assert {problem["family"] for problem in stream(0, 50, families=["linear"])} == {"linear"}


def test_solutions_are_multi_step_and_end_with_the_answer():
    for problem in stream(1, 200):
        trace, answer = problem["solution"].rsplit(ANSWER_MARKER, 1)
        assert answer == problem["answer"] == extract_answer(problem["solution"])
        assert trace.count(",") >= 2, problem


def test_linear_solutions_are_correct():
    for problem in stream(2, 50, families=["linear"]):
        left, right = problem["question"].rstrip("?").split("=")
        x = int(problem["answer"])
        assert eval(left.replace("x", f"*{x}")) == eval(right.replace("x", f"*{x}"))


@pytest.mark.parametrize("text, expected", [
    (" 12+7=19,19-5=14 => 14", "14"),
    ("x=-3 => -3", "-3"),
    ("=> 5 then => 7", "7"),
    (" 12+7=19,19-5=14", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_majority_answer_ignores_unanswered_samples():
    assert majority_answer(["=> 3", "=> 4", "no answer", "=> 4"]) == "4"
    assert majority_answer(["no answer"]) is None


def test_toy_scores_use_the_learners_answer_equivalence():
    """``07`` and ``7`` are one answer here as in `python -m fastmem run` (plain string equality said no)."""
    assert majority_answer(["=> 07", "=> 3", "=> 7"]) == "07"
    scores = sampled_accuracy([{"answer": "7"}, {"answer": "3"}], [["=> 07", "=> 3", "=> 7", "none"],
                                                                   ["=> 4", "=> 4", "=> 3", "=> 03"]])
    assert scores == {"pass@1": (2 / 4 + 2 / 4) / 2, "maj@4": 1 / 2}
    exact = sampled_accuracy([{"answer": "7"}], [["=> 07", "=> 07", "=> 3"]], equivalent=str.__eq__)
    assert exact == {"pass@1": 0.0, "maj@3": 0.0}


def test_tokenizer_round_trip_and_special_tokens(tmp_path):
    save_tokenizer(build_tokenizer(), tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    for problem in stream(5, 50):
        text = problem["question"] + problem["solution"]
        ids = tokenizer(text).input_ids
        assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
        assert len(ids) == len(text) + 1
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len({tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}) == 3


@pytest.mark.parametrize("directory", ["shipped", "saved"])
def test_tokenizer_config_names_a_class_transformers_4_knows(directory, tmp_path):
    """setup.py allows transformers >= 4.56, which has no "TokenizersBackend" (the name 5.x saves); loading
    the shipped model there failed with "Tokenizer class TokenizersBackend does not exist"."""
    if directory == "saved":
        save_tokenizer(build_tokenizer(), tmp_path)
    path = default_model_path() if directory == "shipped" else tmp_path
    config = json.loads((path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == PORTABLE_TOKENIZER_CLASS == "PreTrainedTokenizerFast"
    assert config["padding_side"] == "left"


def test_shipped_tokenizer_matches_builder():
    shipped = AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)
    assert shipped.get_vocab() == build_tokenizer().get_vocab()


def test_default_model_is_small_and_matches_tokenizer(default_model):
    model, tokenizer = default_model
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.vocab_size == len(tokenizer)
    assert sum(parameter.numel() for parameter in model.parameters()) < 2_000_000


def test_default_model_answers_in_format_and_beats_chance(default_model):
    model, tokenizer = default_model
    problems = list(stream(0, 30))
    completions = generate_solutions(model, tokenizer, [problem["question"] for problem in problems], do_sample=False)
    assert sum(extract_answer(texts[0]) is not None for texts in completions) >= 27
    assert sampled_accuracy(problems, completions)["pass@1"] > 0.1


# ---- natural-language word problems (fastmem.data.words) ----------------------------------------

def test_word_problems_are_seeded_and_cover_one_to_three_steps():
    from fastmem.data.words import TEMPLATES, word_problems

    assert list(word_problems(3, 40)) == list(word_problems(3, 40))
    assert list(word_problems(3, 40)) != list(word_problems(4, 40))
    problems = list(word_problems(0, 300))
    assert {p["steps"] for p in problems} == {1, 2, 3}
    assert {p["template"] for p in problems} == {name for names in TEMPLATES.values() for name in names}


def test_word_problem_solutions_are_right_and_end_like_gsm8k():
    import re

    from fastmem.data.files import reference_answer
    from fastmem.data.words import word_problems

    for problem in word_problems(1, 300):
        lines = problem["answer"].splitlines()
        assert len(lines) == problem["steps"] + 1 and lines[-1].startswith("#### ")
        answer = int(lines[-1][5:])
        results = []
        for line in lines[:-1]:
            left, right = re.search(r"(\d+(?: [-+*/] \d+)+) = (\d+)", line).groups()
            assert eval(left) == int(right), line          # every step's arithmetic holds
            results.append(int(right))
        assert results[-1] == answer > 0
        assert reference_answer(problem["answer"]) == str(answer)
        assert problem["question"].endswith("?")


def test_word_problems_write_to_jsonl_and_read_back(tmp_path):
    from fastmem.data.files import read_problems
    from fastmem.data.words import word_problems, write_jsonl

    path = write_jsonl(tmp_path / "words.jsonl", seed=2, n=5)
    read = read_problems(str(path))
    expected = list(word_problems(2, 5))
    assert [p["question"] for p in read] == [p["question"] for p in expected]
    assert [p["answer"] for p in read] == [p["answer"].rsplit("#### ", 1)[1] for p in expected]
    assert read_problems("words", limit=5, seed=2) == read
