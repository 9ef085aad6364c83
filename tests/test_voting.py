"""Answer equivalence and majority vote."""
import pytest

from fastmem.voting import answers_equivalent, extract_answer, majority_vote


@pytest.mark.parametrize("first, second, same", [
    ("1/2", "0.5", True),
    ("1/2", "\\frac{1}{2}", True),
    ("0.5", "$\\frac{1}{2}$", True),
    ("42", " 42 ", True),
    ("42", "43", False),
    ("Paris", "paris", True),
    ("Paris", "Rome", False),
])
def test_answers_equivalent(first, second, same):
    assert answers_equivalent(first, second) is same


def test_majority_groups_equivalent_answers():
    vote = majority_vote(["0.5", "3", "1/2", None, "\\frac{1}{2}", "3"])
    assert vote.answer == "0.5"
    assert vote.share == pytest.approx(3 / 6)
    assert vote.agrees == (True, False, True, False, True, False)


def test_tie_goes_to_first_seen_and_no_answers_give_none():
    assert majority_vote(["7", "8", "8", "7"]).answer == "7"
    empty = majority_vote([None, None])
    assert empty.answer is None and empty.share == 0.0 and empty.agrees == (False, False)


def test_custom_equivalence():
    vote = majority_vote(["a1", "b1", "a2"], equivalent=lambda x, y: x[0] == y[0])
    assert vote.answer == "a1" and vote.agrees == (True, False, True)


@pytest.mark.parametrize("text, answer", [
    (" 1:3,2:5 => 7", "7"),
    ("so \\boxed{\\frac{1}{2}} done", "\\frac{1}{2}"),
    ("The answer is 42.", "42"),
    ("x=3 then 1,234 apples", "1234"),
    ("answer: 3/4", "3/4"),
    ("no number here", None),
    ("", None),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer
