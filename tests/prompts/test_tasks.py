"""Built-in tasks: reference solutions, verifiers, per-step errors; verify() for records with answers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opd.prompts import get_task, verify
from opd.prompts.tasks import TASKS, ArithTask
from opd.types import Prompt


def arith(text: str, task: str = "arith") -> Prompt:
    return Prompt(text=text, source=task, task=task)


# Hand-checked: digits least significant first, "x+y+carry=ss" with a two-digit sum, then the answer
# zero-padded to one digit more than the number of steps.
@pytest.mark.parametrize(
    "prompt, solution",
    [
        ("4721+3858=", "1+8+0=09,2+5+0=07,7+8+0=15,4+3+1=08|97580"),
        ("47213+38581=", "3+1+0=04,1+8+0=09,2+5+0=07,7+8+0=15,4+3+1=08|497580"),
        ("95+7=", "5+7+0=12,9+0+1=10|201"),
        ("7+95=", "7+5+0=12,0+9+1=10|201"),
        ("999+1=", "9+1+0=10,9+0+1=10,9+0+1=10|0001"),
        ("0+0=", "0+0+0=00|00"),
        ("10+5=", "0+5+0=05,1+0+0=01|510"),
        ("55555+55555=", "5+5+0=10,5+5+1=11,5+5+1=11,5+5+1=11,5+5+1=11|011111"),
    ],
)
def test_solution_hand_checked(prompt, solution):
    assert ArithTask.solution(prompt) == solution


@pytest.mark.parametrize("bad", ["12+=", "a+b=", "12-3=", "12+3", "", "1+2+3="])
def test_operands_rejects_non_arith_prompts(bad):
    with pytest.raises(ValueError):
        ArithTask.operands(bad)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10**9), st.integers(0, 10**9))
def test_solution_answer_is_the_sum_and_steps_are_consistent(a, b):
    sol = ArithTask.solution(f"{a}+{b}=")
    steps, answer = sol.split("|")
    assert int(answer[::-1]) == a + b  # least significant digit first
    steps = steps.split(",")
    assert len(steps) == max(len(str(a)), len(str(b)))
    assert len(answer) == len(steps) + 1
    carry = 0
    for i, step in enumerate(steps):
        lhs, s = step.split("=")
        x, y, c = map(int, lhs.split("+"))
        assert c == carry and len(s) == 2 and int(s) == x + y + c
        assert x == (a // 10**i) % 10 and y == (b // 10**i) % 10
        carry = int(s) // 10


def test_verify_true_and_false():
    p = arith("4721+3858=")
    assert ArithTask.verify(p, "1+8+0=09,2+5+0=07,7+8+0=15,4+3+1=08|97580")
    assert ArithTask.verify(p, "garbage steps|97580")  # only the final answer counts
    assert ArithTask.verify(p, "...|97580 ")
    assert not ArithTask.verify(p, "1+8+0=09,2+5+0=07,7+8+0=15,4+3+0=07|97570")  # dropped carry
    assert not ArithTask.verify(p, "1+8+0=09,2+5+0=07,7+8+0=15,4+3+1=08")  # no answer
    assert not ArithTask.verify(p, "|08578")
    assert not ArithTask.verify(p, "")


def test_final_answer():
    assert ArithTask.final_answer("a|b|123 ") == "123"
    assert ArithTask.final_answer("no bar") is None


def test_step_errors():
    p = arith("95+7=")
    assert ArithTask.step_errors(p, "5+7+0=12,9+0+1=10|201") == [False, False, False]
    assert ArithTask.step_errors(p, "5+7+0=12,9+0+0=09|099") == [False, True, True]  # dropped carry in step 2
    assert ArithTask.step_errors(p, "5+7+0=11,9+0+1=10|101") == [True, False, True]
    assert ArithTask.step_errors(p, "5+7+0=12,9+0+1=10|210") == [False, False, True]  # steps right, answer wrong
    assert ArithTask.step_errors(p, "5+7+0=12") == [False, True, True]  # missing steps count as wrong
    assert ArithTask.step_errors(p, "") == [True, True, True]


def test_module_verify_uses_the_task_verifier():
    p = arith("95+7=")
    assert verify(p, "5+7+0=12,9+0+1=10|201") is True
    assert verify(p, "5+7+0=12,9+0+0=09|099") is False


def test_verify_with_a_numeric_answer_uses_the_last_number():
    p = Prompt(text="What is 6*7?", source="r", answer="42")
    assert verify(p, "42") is True
    assert verify(p, "The answer is 42.") is True
    assert verify(p, "6*7 = 42") is True
    assert verify(p, "42.0") is True
    assert verify(p, "It is 42, not 41") is False  # the last number counts
    assert verify(p, "41") is False
    assert verify(p, "no idea") is False
    assert verify(p, "") is False
    assert verify(Prompt(text="q", source="r", answer="-3"), "x = -3") is True
    assert verify(Prompt(text="q", source="r", answer="-3"), "x = 3") is False
    assert verify(Prompt(text="q", source="r", answer="2.5"), "so 2.50") is True


@pytest.mark.parametrize("completion", ["\\boxed{-5}", "$-5$", "**-5**", "[-5]", "'-5'", "<answer>-5</answer>",
                                        "####-12 is wrong, -5", "x = -5", "(-5)", "-5"])
def test_a_minus_after_markup_is_the_numbers_sign(completion):
    # Only whitespace, "=", "(" or ":" let a minus count: "\boxed{-5}" read as 5 (right against "5", wrong against "-5")
    assert verify(Prompt(text="q", source="r", answer="-5"), completion) is True
    assert verify(Prompt(text="q", source="r", answer="5"), completion) is False


def test_a_hyphen_after_a_word_or_number_is_no_sign():
    assert verify(Prompt(text="q", source="r", answer="7"), "pages 5-7") is True
    assert verify(Prompt(text="q", source="r", answer="7"), "item-7") is True
    assert verify(Prompt(text="q", source="r", answer="-7"), "1.5-7") is False


def test_verify_with_a_text_answer_needs_an_exact_match():
    p = Prompt(text="Capital of France?", source="r", answer="Paris")
    assert verify(p, " Paris\n") is True
    assert verify(p, "paris") is False
    assert verify(p, "It is Paris") is False


def test_verify_without_an_answer_is_none():
    assert verify(Prompt(text="Write a poem", source="r"), "roses") is None
    assert verify(Prompt(text="Write a poem", source="r", task="not-a-task"), "roses") is None


def test_get_task():
    assert get_task("arith") is TASKS["arith"]
    with pytest.raises(KeyError) as e:
        get_task("calculus")
    assert "calculus" in str(e.value) and "arith" in str(e.value)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_plant_error_corrupts_one_result_digit_of_one_step_and_cuts_after_it(name):
    task = TASKS[name]
    rng = np.random.default_rng(1)
    corrupted_steps = set()
    for _ in range(60):
        p = task.sample(rng)
        solution = task.solution(p.text)
        prefix, step = task.plant_error(p.text, rng)
        clean = solution[: len(prefix)]
        diff = [i for i, (x, y) in enumerate(zip(prefix, clean)) if x != y]
        assert len(diff) == 1 and prefix[diff[0]].isdigit() and clean[diff[0]].isdigit()  # one wrong digit
        got, ref = task.segments(prefix)[:-1], task.segments(solution)[:-1]
        assert len(got) == step + 1 and got[:step] == ref[:step]  # cut right after the corrupted step
        assert got[step] != ref[step] and diff[0] > len(prefix) - len(got[step]) + got[step].rfind("=")  # in its result
        assert task.step_errors(p, prefix)[step]
        corrupted_steps.add(step)
    if task.min_digits == task.max_digits:  # every step of a fixed-width answer is corrupted some of the time
        assert corrupted_steps == set(range(len(task.segments(task.solution(p.text))) - 1))
    assert task.plant_error("47213+38581=", np.random.default_rng(3)) == task.plant_error("47213+38581=", np.random.default_rng(3))


@pytest.mark.parametrize("name", sorted(TASKS))
def test_samples_are_in_range_and_self_verifying(name):
    task = TASKS[name]
    rng = np.random.default_rng(0)
    for _ in range(50):
        p = task.sample(rng)
        a, b = ArithTask.operands(p.text)
        for n in (a, b):
            assert task.min_digits <= len(str(n)) <= task.max_digits
        assert p.task == name and int(p.answer[::-1]) == a + b and len(p.answer) == max(len(str(a)), len(str(b))) + 1
        assert verify(p, ArithTask.solution(p.text)) is True
    # deterministic by rng
    assert task.sample(np.random.default_rng(5)) == task.sample(np.random.default_rng(5))


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 2**32 - 1))
def test_corrupt_plants_single_digit_slips_and_keeps_the_true_continuation(a, b, seed):
    prompt = f"{a}+{b}="
    clean = ArithTask.solution(prompt)
    text, planted = ArithTask.corrupt(prompt, np.random.default_rng(seed), rate=0.5)
    assert len(text) == len(clean) == len(planted)
    for ch, ref, bad in zip(text, clean, planted):
        assert (ch != ref) == bad  # exactly the planted characters differ
        assert ch.isdigit() or not bad
    # at most one slip per step, only in the carry-in or the sum
    pos = 0
    for step in clean.split("|")[0].split(","):
        offs = [i - pos for i in range(pos, pos + len(step)) if planted[i]]
        assert len(offs) <= 1 and set(offs) <= {4, 6, 7}
        pos += len(step) + 1
    assert not any(planted[clean.index("|"):])  # the answer is never planted


def test_corrupt_rate_zero_is_clean():
    text, planted = ArithTask.corrupt("47213+38581=", np.random.default_rng(0), rate=0.0)
    assert text == ArithTask.solution("47213+38581=") and not any(planted)


@pytest.mark.parametrize("answer, completion, right", [
    ("234", "The total is 1,234.", False),  # read as 234 after the comma: a wrong answer rewarded
    ("1234", "The total is 1,234.", True),
    ("1,234", "1234", True),
    ("7", "It lies between 5-7", True),  # a range's hyphen is no minus sign
    ("-5", "x = \u22125", True),  # the unicode minus
    ("-10", "x=-10", True),
    ("10", "x=-10", False),
    ("5", "3,5", False),
    ("12", "I got 12 then 13", False),  # the last number counts
    ("2", "1.2", False),
])
def test_a_reference_answer_is_checked_against_the_last_number_as_written(answer, completion, right):
    from opd.prompts.tasks import verify
    from opd.types import Prompt

    assert verify(Prompt("q", "s", answer=answer), completion) is right
