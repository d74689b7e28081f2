"""The shipped verifiers and the arithmetic task (rl/rewards.py) on hand-written cases."""

from __future__ import annotations

import re

import pytest

from megatron_dsv3.rl.rewards import (ArithmeticTask, Problem, answer_format,
                                      arithmetic_reward, exact_answer, load_reward, score,
                                      weighted_sum)

SEVEN = Problem("3+4=", "7")


@pytest.mark.parametrize("text,exact,form", [
    ("7\n", 1.0, 1.0),
    (" 7<|endoftext|>", 1.0, 1.0),
    ("7", 1.0, 0.0),          # ran out of tokens: right, but no stop
    ("77\n", 0.0, 1.0),       # a well-formed wrong answer
    ("7+1\n", 0.0, 0.0),      # a right start with more after it earns nothing
    ("8\n", 0.0, 1.0),
    ("\n", 0.0, 0.0),
    ("x7\n", 0.0, 0.0),
    ("-7\n", 0.0, 1.0),
])
def test_verifiers_on_hand_written_completions(text, exact, form):
    assert exact_answer([text], [SEVEN]) == [exact]
    assert answer_format([text], [SEVEN]) == [form]
    assert arithmetic_reward()([text], [SEVEN]) == [pytest.approx(exact + 0.1 * form)]


def test_weighted_sum_adds_each_term():
    reward = weighted_sum((exact_answer, 2.0), (answer_format, -1.0))
    assert reward(["7\n", "7", "9\n"], [SEVEN] * 3) == [1.0, 2.0, -1.0]


def test_task_is_a_pure_function_of_seed_step_and_index():
    task = ArithmeticTask(max_operand=9, seed=5)
    first = task.problems(step=3, start=0, count=8)
    assert task.problems(step=3, start=4, count=4) == first[4:]  # a DP rank's share
    assert ArithmeticTask(max_operand=9, seed=5).problems(3, 0, 8) == first
    assert task.problems(step=4, start=0, count=8) != first
    for p in task.problems(step=0, start=0, count=200):
        a, op, b = int(p.prompt[0]), p.prompt[1], int(p.prompt[2:-1])
        assert p.prompt.endswith("=") and int(p.answer) == (a + b if op == "+" else a - b)
        assert int(p.answer) >= 0


def test_word_problems_tell_the_same_arithmetic():
    words = ArithmeticTask(max_operand=9, seed=5, style="word").problems(2, 0, 50)
    equations = ArithmeticTask(max_operand=9, seed=5).problems(2, 0, 50)
    for word, equation in zip(words, equations):
        a, b = (int(n) for n in re.findall(r"\d+", word.prompt))
        op = "+" if "more" in word.prompt else "-"
        assert equation.prompt == f"{a}{op}{b}=" and word.answer == equation.answer
    with pytest.raises(ValueError, match="style"):
        ArithmeticTask(style="story")


def test_corpus_lines_are_every_problem_with_its_answer():
    lines = ArithmeticTask(max_operand=2).corpus_lines()
    assert len(lines) == 9 + 6  # 3 x 3 additions, a >= b subtractions
    assert "2-1=1" in lines and "1+2=3" in lines and "1-2=-1" not in lines


def test_reward_plug_in_and_its_errors():
    assert load_reward("arithmetic")(["7\n"], [SEVEN]) == [pytest.approx(1.1)]
    with pytest.raises(ValueError, match="module:function"):
        load_reward("not-a-spec")
    with pytest.raises(ValueError, match="cannot import"):
        load_reward("no_such_module_here:make")
    with pytest.raises(ValueError, match="one per completion"):
        score(lambda c, p: [1.0], ["a", "b"], [SEVEN, SEVEN])
    with pytest.raises(ValueError, match="finite"):
        score(lambda c, p: [float("nan")], ["a"], [SEVEN])
