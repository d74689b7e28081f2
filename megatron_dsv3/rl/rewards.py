"""Tasks and rewards: what GRPO asks the policy, and how an answer is scored.

A reward function is a plain callable
    reward(completions: list[str], problems: list[Problem]) -> list[float]
one finite number per completion; `completions[i]` is the decoded text of the new tokens of
completion i, its stop token's text included when it emitted one ("\\n" or "<|endoftext|>" for
the arithmetic task: a completion without one ran out of --max-new-tokens), `problems[i]` the
problem it answers (the G completions of one problem are consecutive). Two rule-based
verifiers ship here:
  exact_answer   1 when the completion (up to its stop) is the problem's answer
  answer_format  1 when the completion is one integer and then a stop ("  42\\n"), nothing else
and `weighted_sum` adds them (the CLI's default: exact + 0.1 x format, so that a policy that
cannot yet add is still pulled towards answering in the right shape).

A reward model plugs in as the same callable: a class that holds the model and scores the
(prompt, completion) pairs in `__call__`, e.g.

    class RewardModel:
        def __init__(self, path):
            self.tok = AutoTokenizer.from_pretrained(path)
            self.rm = AutoModelForSequenceClassification.from_pretrained(path).eval()
        @torch.no_grad()
        def __call__(self, completions, problems):
            batch = self.tok([p.prompt + c for p, c in zip(problems, completions)],
                             return_tensors="pt", padding=True)
            return self.rm(**batch).logits[:, 0].float().tolist()

and `python -m megatron_dsv3.rl --reward my_module:make_reward` imports `make_reward` and
calls it with no argument to get the callable (`load_reward`). Every data-parallel rank calls
the reward on its own completions only; it runs outside the policy's autograd graph.

The arithmetic task draws problems on the fly from (seed, step, index): the same problem for
the same index on every rank and on a resumed run, no dataset file.
"""

from __future__ import annotations

import dataclasses
import importlib
import random
import re
from pathlib import Path
from typing import Callable, Sequence

STOP_TEXTS = ("\n", "<|endoftext|>")


@dataclasses.dataclass(frozen=True)
class Problem:
    """A prompt and its reference answer (what the verifiers compare against)."""

    prompt: str
    answer: str


RewardFn = Callable[[list[str], list[Problem]], list[float]]


# Word problems: (operator, template) -- the story around the same two operands
_NAMES = ("Ann", "Bob", "Cy", "Dee", "Eli", "Fay")
_THINGS = ("apples", "cards", "coins", "pens", "shells", "stamps")
_STORIES = {"+": "{name} has {a} {things} and gets {b} more. How many {things} now? ",
            "-": "{name} has {a} {things} and gives away {b}. How many {things} now? "}
STYLES = ("equation", "word")


@dataclasses.dataclass(frozen=True)
class ArithmeticTask:
    """Additions and subtractions of non-negative integers up to `max_operand` (a >= b for
    subtraction: the answers are never negative); the answer is the integer's decimal
    digits. style "equation": `"{a}+{b}="` / `"{a}-{b}="` (short: what the example learns in
    minutes); "word": a one-sentence story ("Ann has 7 coins and gets 5 more. How many coins
    now? "), the name and the object drawn with the operands."""

    max_operand: int = 9
    operators: str = "+-"
    seed: int = 0
    style: str = "equation"

    def __post_init__(self):
        if not self.max_operand >= 1:
            raise ValueError(f"max_operand={self.max_operand!r} is invalid: it must be >= 1")
        if not self.operators or set(self.operators) - set("+-"):
            raise ValueError(f"operators={self.operators!r} is invalid: use '+', '-' or '+-'")
        if self.style not in STYLES:
            raise ValueError(f"style={self.style!r} is invalid: choose 'equation' (a+b=) or "
                             "'word' (a one-sentence story)")

    def problem(self, step: int, index: int) -> Problem:
        """Problem `index` of step `step` (a pure function of seed, step and index)."""
        rng = random.Random(f"{self.seed}/{step}/{index}")
        a, b = rng.randint(0, self.max_operand), rng.randint(0, self.max_operand)
        op = rng.choice(self.operators)
        if op == "-":
            a, b = max(a, b), min(a, b)
        answer = str(a + b if op == "+" else a - b)
        if self.style == "word":
            return Problem(_STORIES[op].format(name=rng.choice(_NAMES), a=a, b=b,
                                               things=rng.choice(_THINGS)), answer)
        return Problem(f"{a}{op}{b}=", answer)

    def problems(self, step: int, start: int, count: int) -> list[Problem]:
        return [self.problem(step, index) for index in range(start, start + count)]

    def corpus_lines(self) -> list[str]:
        """Every problem with its answer, one line each (`a+b=c`, or the story then the
        answer): what a model pre-trained by the main job reads to learn the format
        (examples/grpo_arithmetic.py); the word style's names and objects cycle."""
        lines = []
        for a in range(self.max_operand + 1):
            for b in range(self.max_operand + 1):
                for op in self.operators:
                    if op == "-" and a < b:
                        continue
                    answer = a + b if op == "+" else a - b
                    if self.style == "word":
                        k = len(lines)
                        story = _STORIES[op].format(name=_NAMES[k % len(_NAMES)], a=a, b=b,
                                                    things=_THINGS[k // len(_NAMES)
                                                                   % len(_THINGS)])
                        lines.append(f"{story}{answer}")
                    else:
                        lines.append(f"{a}{op}{b}={answer}")
        return lines


_INTEGER = re.compile(r"\s*(-?\d+)\s*")
_ONE_INTEGER = re.compile(r"\s*-?\d+\s*(" + "|".join(re.escape(t) for t in STOP_TEXTS) + ")")


def write_character_tokenizer(folder: str | Path) -> Path:
    """`folder`/tokenizer.json for the arithmetic task trained from scratch: a byte-level BPE
    without merges (the 256 byte symbols + data.EOS_TOKEN), one token per character, so that
    every digit of an answer is its own token. Returns the file's path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from ..data import EOS_TOKEN

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=257, special_tokens=[EOS_TOKEN],
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["0123456789+-=\n"], trainer=trainer)
    path = Path(folder) / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def exact_answer(completions: list[str], problems: list[Problem]) -> list[float]:
    """1.0 where the completion, up to its stop, is one integer equal to the problem's answer
    (nothing after it: "7+1" earns nothing for 7, so trailing text cannot ride along)."""
    _check_lengths(completions, problems)
    out = []
    for text, problem in zip(completions, problems, strict=True):
        for stop in STOP_TEXTS:
            text = text.removesuffix(stop)
        match = _INTEGER.fullmatch(text)
        out.append(1.0 if match and int(match[1]) == int(problem.answer) else 0.0)
    return out


def answer_format(completions: list[str], problems: list[Problem]) -> list[float]:
    """1.0 where the completion is one integer followed by a stop ("\\n" or end-of-text)
    and nothing else, whatever its value."""
    _check_lengths(completions, problems)
    return [1.0 if _ONE_INTEGER.fullmatch(text) else 0.0 for text in completions]


def weighted_sum(*terms: tuple[RewardFn, float]) -> RewardFn:
    """The reward sum_k weight_k * reward_k(completions, problems)."""
    if not terms:
        raise ValueError("weighted_sum needs at least one (reward, weight) pair")

    def reward(completions: list[str], problems: list[Problem]) -> list[float]:
        total = [0.0] * len(completions)
        for fn, weight in terms:
            for i, value in enumerate(fn(completions, problems)):
                total[i] += weight * value
        return total

    reward.__name__ = " + ".join(f"{w:g}*{getattr(fn, '__name__', fn)}" for fn, w in terms)
    return reward


def arithmetic_reward(format_weight: float = 0.1) -> RewardFn:
    """exact_answer + format_weight * answer_format: the CLI's default reward."""
    return weighted_sum((exact_answer, 1.0), (answer_format, format_weight))


def load_reward(spec: str) -> RewardFn:
    """'arithmetic' (the default reward), or 'module:function' whose function, called with no
    argument, returns a reward callable (e.g. one wrapping a reward model)."""
    if spec == "arithmetic":
        return arithmetic_reward()
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--reward {spec!r} is invalid: pass 'arithmetic' or "
                         "'module:function' (a function of no argument returning the reward "
                         "callable)")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"--reward {spec!r}: cannot import it ({err}); the module must be on "
                         "PYTHONPATH and define the function") from err
    reward = factory()
    if not callable(reward):
        raise ValueError(f"--reward {spec!r}: {attr}() returned a {type(reward).__name__}, "
                         "not a callable reward(completions, problems) -> list[float]")
    return reward


def score(reward: RewardFn, completions: list[str], problems: Sequence[Problem]
          ) -> list[float]:
    """reward(completions, problems), checked: one finite float per completion."""
    values = list(reward(list(completions), list(problems)))
    if len(values) != len(completions):
        raise ValueError(f"the reward {getattr(reward, '__name__', reward)} returned "
                         f"{len(values)} values for {len(completions)} completions: it must "
                         "return one per completion")
    values = [float(v) for v in values]
    bad = [v for v in values if v != v or v in (float("inf"), float("-inf"))]
    if bad:
        raise ValueError(f"the reward {getattr(reward, '__name__', reward)} returned "
                         f"{bad[0]}: rewards must be finite")
    return values


def _check_lengths(completions, problems) -> None:
    if len(completions) != len(problems):
        raise ValueError(f"{len(completions)} completions for {len(problems)} problems: pass "
                         "one problem per completion (repeat a problem for its group)")
