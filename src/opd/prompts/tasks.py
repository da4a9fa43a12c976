"""Built-in tasks: prompt generators with programmatic verifiers.

`arith`: multi-digit addition written out digit by digit, least significant first, with the
carry in and a two-digit sum in every step, then the answer, also least significant digit first
(zero-padded to one digit more than the operands; 47213 + 38581 = 85794 is written 497580).
Every step has the same width, so a small model can learn where to look, and writing the answer
in step order keeps it a local read-out (Lee et al. 2023, "Teaching arithmetic to small
transformers": reversed outputs make addition learnable for small models):

    prompt      "47213+38581="
    completion  "3+1+0=04,1+8+0=09,2+5+0=07,7+8+0=15,4+3+1=08|497580"

A slip in a step need not be fatal: the carry into the next step and every answer digit can be
recomputed from the digits the steps show (x + y + c), so a model that has learned to recover
continues correctly after one; a model that copies a slip forward spoils the later steps and the
answer, so errors compound. The built-in teacher has learned to recover: `corrupt()` plants slips
in its training text, masked out of its loss. A student imitating clean teacher text never sees a
slip, while an on-policy student sees its own slips and the teacher's recovery from them; that is
where the two loops differ.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from opd.types import Prompt


@dataclass(frozen=True)
class ArithTask:
    name: str = "arith"
    min_digits: int = 5
    max_digits: int = 5

    def sample(self, rng: np.random.Generator) -> Prompt:
        a = self._number(rng)
        b = self._number(rng)
        text = f"{a}+{b}="
        return Prompt(text=text, source=self.name, answer=self.final_answer(self.solution(text)), task=self.name)

    def _number(self, rng: np.random.Generator) -> int:
        n = int(rng.integers(self.min_digits, self.max_digits + 1))
        return int(rng.integers(10 ** (n - 1), 10**n))

    @staticmethod
    def operands(prompt_text: str) -> tuple[int, int]:
        m = re.fullmatch(r"(\d+)\+(\d+)=", prompt_text.strip())
        if m is None:
            raise ValueError(f"not an arith prompt: {prompt_text!r}")
        return int(m.group(1)), int(m.group(2))

    @classmethod
    def solution(cls, prompt_text: str) -> str:
        """The reference completion (without EOS)."""
        a, b = cls.operands(prompt_text)
        da, db = str(a)[::-1], str(b)[::-1]
        steps, carry = [], 0
        for i in range(max(len(da), len(db))):
            x = int(da[i]) if i < len(da) else 0
            y = int(db[i]) if i < len(db) else 0
            s = x + y + carry
            steps.append(f"{x}+{y}+{carry}={s:02d}")
            carry = s // 10
        return ",".join(steps) + "|" + f"{a + b:0{len(steps) + 1}d}"[::-1]

    @staticmethod
    def final_answer(completion: str) -> str | None:
        if "|" not in completion:
            return None
        return completion.rsplit("|", 1)[1].strip()

    @classmethod
    def corrupt(cls, prompt_text: str, rng: np.random.Generator, rate: float = 0.15) -> tuple[str, list[bool]]:
        """The reference completion with slips planted: each step, with probability `rate`, gets one
        wrong digit in its carry-in or its sum; what follows stays the true computation. Returns the
        text and which characters are planted (they are masked out of the teacher's loss, so it learns
        to recover from slips without learning to make them)."""
        text = list(cls.solution(prompt_text))
        planted = [False] * len(text)
        pos = 0
        for step in cls.segments(cls.solution(prompt_text))[:-1]:
            if rng.random() < rate:
                # "x+y+c=ss": the carry-in at offset 4, the two sum digits at 6 and 7
                j = pos + int(rng.choice([4, 6, 7]))
                text[j] = str((int(text[j]) + int(rng.integers(1, 10))) % 10)
                planted[j] = True
            pos += len(step) + 1
        return "".join(text), planted

    @classmethod
    def verify(cls, prompt: Prompt, completion: str) -> bool:
        return cls.final_answer(completion) == cls.final_answer(cls.solution(prompt.text))

    @staticmethod
    def segments(text: str) -> list[str]:
        """The written steps, then the final answer: the positions of the error-by-position analysis."""
        steps, _, answer = text.partition("|")
        return steps.split(",") + [answer]

    @classmethod
    def step_errors(cls, prompt: Prompt, completion: str) -> list[bool]:
        """Per segment (each step, then the answer): is it wrong?"""
        ref = cls.segments(cls.solution(prompt.text))
        got = cls.segments(completion)
        return [i >= len(got) or got[i] != r for i, r in enumerate(ref)]

    @classmethod
    def plant_error(cls, prompt_text: str, rng: np.random.Generator) -> tuple[str, int]:
        """A prefix of the reference solution with one wrong digit in the result of a written step, cut right
        after that step: (prefix text, index of the corrupted step). Written against solution() and segments()
        only: the result is what follows the step's last "=" (the whole step if it has none)."""
        solution = cls.solution(prompt_text)
        steps = cls.segments(solution)[:-1]  # the last segment is the final answer, not a step
        if not steps:
            raise ValueError(f"{prompt_text!r}: the solution has no intermediate step to corrupt")
        i = int(rng.integers(len(steps)))
        pos = 0
        for seg in steps[:i]:  # walk past the earlier steps to find where step i sits in the text
            pos = solution.index(seg, pos) + len(seg)
        start, step = solution.index(steps[i], pos), steps[i]
        result_from = step.rfind("=") + 1
        digits = [j for j in range(result_from, len(step)) if step[j].isdigit()]
        j = digits[int(rng.integers(len(digits)))]
        wrong = str((int(step[j]) + int(rng.integers(1, 10))) % 10)  # any digit but the right one
        return solution[:start] + step[:j] + wrong + step[j + 1 :], i


TASKS: dict[str, ArithTask] = {
    "arith": ArithTask(),
    "arith-short": ArithTask(name="arith-short", min_digits=3, max_digits=3),
    "arith-long": ArithTask(name="arith-long", min_digits=8, max_digits=8),
    "arith-mixed": ArithTask(name="arith-mixed", min_digits=3, max_digits=6),
}


def get_task(name: str) -> ArithTask:
    if name not in TASKS:
        raise KeyError(f"unknown built-in task {name!r}; available: {', '.join(sorted(TASKS))}")
    return TASKS[name]


# A number: thousands separated by commas (1,234,567) or not, an optional decimal part, and a minus sign unless a
# word or number comes right before it, where it is a hyphen ("5-7" is a range; "x = -7", "\\boxed{-7}", "**-7**",
# "<answer>-7" and "-7" are negative).
_NUMBER = re.compile(r"(?<![\w.,])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\d,]\d)")


def verify(prompt: Prompt, completion: str) -> bool | None:
    """True/False when the prompt can be checked (a built-in task or a reference answer), else None."""
    if prompt.task is not None and prompt.task in TASKS:
        return TASKS[prompt.task].verify(prompt, completion)
    if prompt.answer is None:
        return None
    ans, text = _plain_minus(prompt.answer.strip()), _plain_minus(completion.strip())
    if text == ans:
        return True
    if _NUMBER.fullmatch(ans):
        nums = [m.group(0) for m in _NUMBER.finditer(text)]
        return bool(nums) and _value(nums[-1]) == _value(ans)
    return False


def _plain_minus(text: str) -> str:
    return text.replace("\u2212", "-")  # the unicode minus sign


def _value(number: str) -> float:
    return float(number.replace(",", ""))
