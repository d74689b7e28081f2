"""GRPO on arithmetic, end to end on CPU in minutes: pre-train briefly, measure, GRPO, measure.

    .venv/bin/python examples/grpo_arithmetic.py [--out runs/grpo-example] [--pretrain-steps N]
                                                  [--grpo-steps N] [--wandb]

1. A data folder for the main job: every problem of the task with its answer ("7+5=12",
   "9-4=5"; one per line, shuffled, repeated) and a character-level tokenizer: a byte-level
   BPE without merges (256 bytes + end-of-text; each character one token, so that an answer
   is a short sequence of digit tokens and the reward is learnable in minutes; the bundled
   Shakespeare BPE would spread digits over merges the model never saw with numbers).
2. `python -m megatron_dsv3.train --preset tiny` on it for 200 steps (lr 3e-3, cosine): a
   model that knows the format and part of the table (a model trained only on the bundled
   corpus scores 0).
3. The reward before: G completions (temperature 1) of held-out problems (another seed than
   training's), and greedy accuracy.
4. `python -m megatron_dsv3.rl --init-from <the step folder>`: GRPO with the arithmetic
   reward (exact answer + 0.1 x format), 80 steps of 32 prompts x 8 completions, lr 2e-4,
   beta 0.04, one update per batch of rollouts.
5. The reward after, on the same problems; a summary line with the wall times.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def write_data(folder: Path, max_operand: int, repeats: int, seed: int) -> None:
    """arithmetic.txt (every problem with its answer, shuffled, `repeats` times) and a
    character-level tokenizer.json."""
    from megatron_dsv3.rl.rewards import ArithmeticTask, write_character_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    lines = ArithmeticTask(max_operand=max_operand).corpus_lines()
    rng = random.Random(seed)
    text = []
    for _ in range(repeats):
        rng.shuffle(lines)
        text += lines
    (folder / "arithmetic.txt").write_text("\n".join(text) + "\n")
    write_character_tokenizer(folder)


def python_m(module: str, *args) -> float:
    """Run `python -m module args` (nice'd: the machine is shared); its wall time."""
    start = time.perf_counter()
    cmd = ["nice", sys.executable, "-m", module, *map(str, args)]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)
    return time.perf_counter() - start


@torch.no_grad()
def measure(checkpoint: Path, tokenizer_path: Path, *, problems: int, group_size: int,
            max_operand: int, seed: int) -> dict:
    """Mean reward and exact-answer rate of `group_size` sampled completions, and the greedy
    exact-answer rate, on `problems` problems of the held-out seed."""
    from megatron_dsv3.inference import generate
    from megatron_dsv3.inference.cli import load_model, load_tokenizer
    from megatron_dsv3.parallel import shutdown_distributed
    from megatron_dsv3.rl.rewards import ArithmeticTask, arithmetic_reward, exact_answer

    model = load_model(checkpoint, "cpu")
    tokenizer = load_tokenizer(tokenizer_path, model.config.dsv3.vocab_size)
    task = ArithmeticTask(max_operand=max_operand, seed=seed)
    held_out = task.problems(step=0, start=0, count=problems)
    stops = [tokenizer.eos_id, tokenizer.encode("\n")[0]]
    prompts = [tokenizer.encode(p.prompt) for p in held_out]
    sampled = generate(model, [p for p in prompts for _ in range(group_size)],
                       max_new_tokens=4, temperature=1.0, stop_tokens=stops,
                       generator=torch.Generator().manual_seed(seed))
    texts = [tokenizer.decode(ids) for ids in sampled]
    grouped = [p for p in held_out for _ in range(group_size)]
    greedy = generate(model, prompts, max_new_tokens=4, stop_tokens=stops)
    shutdown_distributed()
    reward = arithmetic_reward()(texts, grouped)
    return {"reward": sum(reward) / len(reward),
            "sampled_exact": sum(exact_answer(texts, grouped)) / len(texts),
            "greedy_exact": sum(exact_answer([tokenizer.decode(i) for i in greedy],
                                             held_out)) / len(held_out),
            "examples": [f"{p.prompt}{t!r}" for p, t in zip(grouped[:16:4], texts[:16:4])]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "grpo-example")
    parser.add_argument("--max-operand", type=int, default=9)
    parser.add_argument("--pretrain-steps", type=int, default=200)
    parser.add_argument("--grpo-steps", type=int, default=80)
    parser.add_argument("--grpo-lr", type=float, default=2e-4)
    parser.add_argument("--prompts-per-step", type=int, default=32)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--eval-problems", type=int, default=64)
    parser.add_argument("--wandb", action="store_true", help="log both runs to W&B")
    args = parser.parse_args()
    wandb = [] if args.wandb else ["--no-wandb"]

    data, pre, post = args.out / "data", args.out / "pretrain", args.out / "grpo"
    write_data(data, args.max_operand, repeats=40, seed=0)
    pretrain_s = python_m(
        "megatron_dsv3.train", "--preset", "tiny", "--data-dir", data, "--out-dir", pre,
        "--steps", args.pretrain_steps, "--seq-len", 32, "--micro-batch-size", 16,
        "--grad-accum", 1, "--warmup-steps", 10, "--lr", 3e-3,
        "--eval-interval", 0, "--save-interval", args.pretrain_steps, *wandb)
    start_ckpt = pre / "checkpoints" / f"step_{args.pretrain_steps}"
    tokenizer = data / "tokenizer.json"
    # held-out problems: a seed the GRPO run (--seed 1234) never draws from
    eval_kw = dict(problems=args.eval_problems, group_size=8, max_operand=args.max_operand,
                   seed=99)
    before = measure(start_ckpt, tokenizer, **eval_kw)
    print("before GRPO:", json.dumps(before), flush=True)
    grpo_s = python_m(
        "megatron_dsv3.rl", "--init-from", start_ckpt, "--out-dir", post,
        "--steps", args.grpo_steps, "--prompts-per-step", args.prompts_per_step,
        "--group-size", 8, "--max-new-tokens", 4, "--lr", args.grpo_lr, "--beta", args.beta,
        "--max-operand", args.max_operand, "--save-interval", args.grpo_steps, *wandb)
    after = measure(post / "checkpoints" / f"step_{args.grpo_steps}", tokenizer, **eval_kw)
    print("after GRPO:", json.dumps(after), flush=True)
    summary = {"reward_before": before["reward"], "reward_after": after["reward"],
               "sampled_exact_before": before["sampled_exact"],
               "sampled_exact_after": after["sampled_exact"],
               "greedy_exact_before": before["greedy_exact"],
               "greedy_exact_after": after["greedy_exact"],
               "pretrain_s": round(pretrain_s, 1), "grpo_s": round(grpo_s, 1)}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
