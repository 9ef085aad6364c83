"""Answer extraction, reference answers and equivalence on model output in GSM8K, MATH and AIME styles.

Each row is one rule of `fastmem.voting` (see its docstrings) with the right value. Rows marked
``# fault`` were wrong before issue 11 (bare LaTeX handed to math-verify, thousands separators read
as two numbers, the Unicode minus dropped).
"""
import pytest

from fastmem.voting import answers_equivalent, extract_answer, majority_vote, normalize_answer

EXTRACTIONS = [
    # boxed (MATH / instruct models): the last non-empty box counts, whatever surrounds it
    ("So \\boxed{\\frac{1}{2}} is it.", "\\frac{1}{2}"),
    ("First \\boxed{3}, but wait, that's wrong: \\boxed{4}.", "4"),
    ("Thus the total is \\boxed{9{,}500}.", "9500"),                                       # fault
    ("In polar form: \\boxed{\\left(3, \\frac{\\pi}{2}\\right)}", "(3, \\frac{\\pi}{2})"),
    ("The roots are \\boxed{\\pm 2021}.", "\\pm 2021"),
    ("$\\boxed{\\dfrac{3}{4}}$", "\\frac{3}{4}"),
    ("\\boxed{\\tfrac{5}{8}}", "\\frac{5}{8}"),
    ("The side is \\boxed{5\\text{ cm}}.", "5"),
    ("\\boxed{18 \\text{ dollars}}", "18"),
    ("\\boxed{\\$18.50}", "18.50"),
    ("\\boxed{x = 5}", "5"),
    ("\\boxed{30^\\circ}", "30"),
    ("\\boxed{25\\%}", "25"),
    ("\\boxed{\\text{(B)}}", "(B)"),
    ("\\boxed{\\{1, 2, 3\\}}", "\\{1, 2, 3\\}"),
    ("\\boxed{[2, 5)}", "[2, 5)"),
    ("\\boxed{}  and then the answer 5", "5"),
    ("\\fbox{12}", "12"),
    # markers: Minerva / MATH "The final answer is $…$", GSM8K "#### N", plain "The answer is", built-in "=>"
    ("Final Answer: The final answer is $\\dfrac{3}{4}$. I hope it is correct.", "\\frac{3}{4}"),
    ("Final Answer: The final answer is $(-\\infty, 3)$. I hope it is correct.", "(-\\infty, 3)"),
    ("The answer is 42.", "42"),
    ("The answer is: 1,000,000!", "1000000"),
    ("The answer is 1 - \\sqrt{2}.", "1 - \\sqrt{2}"),
    ("The answer is $1 - \\sqrt{2}$.", "1 - \\sqrt{2}"),
    ("The answer is \\(0.75\\).", "0.75"),
    ("The answer is \\left( 3, \\frac{\\pi}{2} \\right).", "(3, \\frac{\\pi}{2})"),
    ("The answer is 25%.", "25"),
    ("The answer is **72**.", "72"),
    ("**Answer:** 18", "18"),
    ("The answer is B.", "B"),
    ("Answer: \\text{Monday}", "Monday"),
    ("answer: 3/4", "3/4"),
    ("She has 3 + 4 = 7 apples.\n#### 7", "7"),
    ("Natalia sold 48/2 = 24 clips in May.\n#### 1,234", "1234"),
    (" 1:3,2:5 => 7", "7"),
    ("The answer is 12 apples. Check: 3 * 4 = 12, and 12 > 10.", "12"),
    # nothing boxed or marked: the last $…$ span or bare number, whichever comes last
    ("$9{,}500$", "9500"),                                                                  # fault
    ("We find $x = 5$.", "5"),
    ("We have $3 + 4 = 7$ apples.", "7"),
    ("So the angle is $30^\\circ$.", "30"),
    ("The interval is $[2, 5)$.", "[2, 5)"),
    ("The solutions form $\\{1, 2, 3\\}$", "\\{1, 2, 3\\}"),
    ("\\[ \\frac{1}{2} \\]", "\\frac{1}{2}"),
    ("First $a = 2$, so the result is 14.", "14"),
    ("She earns $1,000 per month.", "1000"),
    ("He pays $5 and gets $3 back, so 2 dollars remain.", "2"),
    ("x=3 then 1,234 apples", "1234"),
    ("The total is \u22123.", "-3"),                                                        # fault
    ("x = \u22127", "-7"),                                                                  # fault
    ("The answer is \u2212\\frac{1}{2}", "-\\frac{1}{2}"),                                  # fault
    ("The change is -4.5 degrees.", "-4.5"),
    ("Then 7 - 3 = 4", "4"),
    ("It costs 12.50.", "12.50"),
    ("So 1/3 of them remain.", "1/3"),
    ("no number here", None),
    ("", None),
    (None, None),
]


@pytest.mark.parametrize("text, answer", EXTRACTIONS)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


REFERENCES = [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72", "72"),       # GSM8K solution
    ("#### 1,234", "1234"),                          # GSM8K thousands separator (read raw before issue 11)
    ("#### -5", "-5"),
    ("Thus the area is $\\boxed{\\dfrac{3}{4}}$.", "\\frac{3}{4}"),      # MATH solution
    ("so $r = \\boxed{3}$ and $\\theta = \\boxed{\\frac{\\pi}{2}}$", "\\frac{\\pi}{2}"),
    ("42", "42"),
    (42, "42"),
    ("\\frac{1}{2}", "\\frac{1}{2}"),
    ("\\$1,500", "1500"),
    (None, None),
    ("", None),
]


@pytest.mark.parametrize("text, answer", REFERENCES)
def test_reference_answer(text, answer):
    """A data set's reference (read by fastmem.data.files with extract_answer), normalized as answers are."""
    reference_answer = pytest.importorskip("fastmem.data.files").reference_answer
    got = reference_answer(text)
    assert got == answer if answer is None else normalize_answer(got) == answer


EQUIVALENCES = [
    # the measured faults
    ("1 - \\sqrt{2}", "1", False),                                        # fault
    ("\\dfrac{3}{4}", "0.75", True),                                      # fault
    ("9{,}500", "9", False),                                              # fault
    ("9{,}500", "9500", True),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "3", False),                  # fault
    ("\\left(3, \\frac{\\pi}{2}\\right)", "3", False),
    ("\\left(3, \\frac{\\pi}{2}\\right)", "(3, \\frac{\\pi}{2})", True),
    ("\\pm 2021", "2021", False),                                         # fault
    ("\\pm 2021", "-2021, 2021", True),
    ("\u22123", "-3", True),                                              # fault
    ("\u22123", "3", False),
    # fractions and decimals
    ("\\tfrac{3}{4}", "3/4", True),
    ("1/2", "0.5", True),
    ("0.5", "$\\frac{1}{2}$", True),
    ("1.5", "3/2", True),
    ("-\\frac{1}{2}", "-0.5", True),
    ("\\frac{-1}{2}", "-0.5", True),
    ("\\frac{1}{2}", "\\frac{1}{3}", False),
    ("0.333", "1/3", False),
    ("0.50", "0.5", True),
    ("42.0", "42", True),
    # radicals, pi, expressions
    ("10\\sqrt{2}", "\\sqrt{200}", True),
    ("3\\sqrt{2}", "3\\sqrt{3}", False),
    ("2\\pi", "6.283185", True),
    ("x^2+1", "1+x^2", True),
    ("x^2+1", "x^2-1", False),
    ("\\infty", "-\\infty", False),
    # thousands separators, units, degrees, percent, currency, markdown, punctuation
    ("1,000", "1000", True),
    ("1,000", "1", False),
    ("1001", "1000", False),
    ("5\\text{ cm}", "5", True),
    ("18 dollars", "18", True),
    ("\\$18.50", "18.5", True),
    ("30^\\circ", "30", True),
    ("30\u00b0", "30", True),
    ("50\\%", "50", True),
    ("50\\%", "0.5", False),
    ("**42**", "42", True),
    ("42.", "42", True),
    # equations, intervals, sets, tuples
    ("x = 5", "5", True),
    ("x = 5", "6", False),
    ("[2,5)", "[2, 5)", True),
    ("[2, 5)", "(2, 5)", False),
    ("(-\\infty, 3)", "(-\\infty, 3]", False),
    ("\\{1,2,3\\}", "\\{3,2,1\\}", True),
    ("\\{1,2,3\\}", "\\{1,2,4\\}", False),
    ("(3, 5)", "(5, 3)", False),
    # words and choices
    ("Paris", "paris", True),
    ("Paris", "Rome", False),
    ("Monday", "dayMon", False),
    ("\\text{(B)}", "B", True),
    ("B", "C", False),
    ("42", " 42 ", True),
    ("42", "43", False),
]


@pytest.mark.parametrize("first, second, same", EQUIVALENCES)
def test_answers_equivalent(first, second, same):
    assert answers_equivalent(first, second) is same
    assert answers_equivalent(second, first) is same


def test_table_size():
    assert len(EXTRACTIONS) + len(REFERENCES) + len(EQUIVALENCES) >= 60


@pytest.mark.parametrize("answer", sorted({a for a, _, _ in EQUIVALENCES} | {b for _, b, _ in EQUIVALENCES}))
def test_normalization_is_idempotent(answer):
    assert normalize_answer(normalize_answer(answer)) == normalize_answer(answer)


def test_extracted_answers_vote_together():
    """Real-looking samples: the group of 9500 wins; 9 and 500 (the old misreadings) stay apart."""
    samples = ["So the total is \\boxed{9{,}500}.", "The answer is 9,500.", "#### 9500", "$9{,}500$",
               "\\boxed{9}", "The answer is 500.", None]
    vote = majority_vote([extract_answer(text) for text in samples])
    assert vote.answer == "9500" and vote.share == pytest.approx(4 / 7)
    assert vote.agrees == (True, True, True, True, False, False, False)


def test_vote_never_merges_answers_that_differ():
    """With an equivalence that is not transitive (a~b, b~c, not a~c), a and c never share a group."""
    linked = {frozenset("ab"), frozenset("bc")}
    vote = majority_vote(["b", "a", "c", "c"], equivalent=lambda x, y: x == y or frozenset(x + y) in linked)
    assert vote.answer == "b" and vote.share == 0.5 and vote.agrees == (True, True, False, False)


def test_vote_compares_each_pair_of_distinct_answers_once():
    calls = []

    def counting(first, second):
        calls.append((first, second))
        return answers_equivalent(first, second)

    vote = majority_vote(["1/2", "0.5", "3", "1/2", "\\frac{1}{2}", "3"] * 10, equivalent=counting)
    assert vote.answer == "1/2" and vote.share == pytest.approx(4 / 6)
    assert len(calls) == len(set(calls)) <= 6


@pytest.mark.parametrize("first, second, same", EQUIVALENCES)
def test_numeric_shortcut_agrees_with_math_verify(first, second, same, monkeypatch):
    """The 1e-4 numeric pre-check only skips work: math-verify alone gives the same result."""
    from fastmem import voting

    monkeypatch.setattr(voting, "_clearly_different", lambda a, b: False)
    a, b = sorted((normalize_answer(first), normalize_answer(second)))
    assert voting._equivalent_normalized.__wrapped__(a, b) is same
