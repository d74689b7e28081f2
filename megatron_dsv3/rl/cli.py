"""`python -m megatron_dsv3.rl`: GRPO post-training from a checkpoint of the main job.

    python -m megatron_dsv3.rl --init-from runs/arith/checkpoints/step_300 \\
        --out-dir runs/arith-grpo --steps 40 --no-wandb
    torchrun --nproc-per-node 4 -m megatron_dsv3.rl --tensor-parallel-size 2 ...   (DP = 2)

--init-from: a training-job step folder (run without TP, EP or PP), a file of `python -m
megatron_dsv3.checkpoint.convert hf-to-dsv3`, or a GRPO step folder. The tokenizer is the
one of the --data-dir the checkpoint was trained on (examples/data's otherwise, or
--tokenizer). Outputs in --out-dir: metrics.jsonl, checkpoints/step_<N>/ (read by the
inference CLI and --init-from like the main job's), and the W&B run unless --no-wandb
(offline without an API key). Problems with the options or the files exit with status 2 and
one line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from ..train.args import DIST_TIMEOUT_S, TrainError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m megatron_dsv3.rl",
        description="GRPO post-training of a megatron_dsv3 checkpoint on generated "
                    "arithmetic problems (or your reward: --reward module:function).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("--init-from", type=Path, required=True,
        help="the policy's (and the reference's) initial weights: a training-job step folder "
             "or rank file (no TP/EP/PP), a converted file, or a GRPO step folder")
    add("--out-dir", type=Path, required=True, help="run folder")
    add("--resume", default=None, help="'auto' (the newest intact checkpoint in --out-dir, "
                                       "or a fresh start) or a step folder")
    add("--steps", type=int, default=40, help="GRPO steps (each: rollouts + updates)")
    add("--prompts-per-step", type=int, default=16, help="prompts per step over all DP ranks")
    add("--group-size", type=int, default=8, help="G: completions sampled per prompt")
    add("--max-new-tokens", type=int, default=4, help="longest completion")
    add("--temperature", type=float, default=1.0, help="rollout sampling temperature")
    add("--top-p", type=float, default=1.0, help="rollout nucleus")
    add("--stop-text", default="\n", help="a one-token text that ends a completion besides "
                                          "end-of-text ('' for end-of-text only)")
    add("--num-iterations", type=int, default=1,
        help="mu: optimizer steps per batch of rollouts (> 1 stores the old policy's "
             "log-probs; the ratio then departs from 1 and clipping acts)")
    add("--micro-batch-size", type=int, default=64, help="completions per forward/backward")
    add("--lr", type=float, default=1e-4, help="AdamW learning rate (constant)")
    add("--weight-decay", type=float, default=0.0, help="AdamW decay on matrices")
    add("--clip-grad", type=float, default=1.0, help="max global gradient norm (0: none)")
    add("--beta", type=float, default=0.04,
        help="KL weight to the frozen reference (0: no KL term, no reference model)")
    add("--epsilon", type=float, default=0.2, help="ratio clipping range (low side)")
    add("--epsilon-high", type=float, default=None,
        help="high side of the clipping range (default: --epsilon; DAPO: 0.28)")
    add("--loss-type", default="token", choices=("token", "sequence"),
        help="token: mean over all completion tokens (DAPO, TRL bnpo/dapo); sequence: per "
             "completion, then over completions (GRPO paper, TRL grpo)")
    add("--reward", default="arithmetic",
        help="'arithmetic' (exact answer + 0.1 x format) or module:function returning a "
             "reward(completions, problems) -> list[float] callable")
    add("--max-operand", type=int, default=9, help="arithmetic problems' largest operand")
    add("--operators", default="+-", help="arithmetic problems' operators: +, - or +-")
    add("--problem-style", default="equation", choices=("equation", "word"),
        help="equation: '7+5='; word: 'Ann has 7 coins and gets 5 more. How many coins now? '")
    add("--tokenizer", type=Path, default=None,
        help="tokenizer.json (default: the --init-from run's --data-dir, else examples/data)")
    add("--tensor-parallel-size", type=int, default=1,
        help="TP size; data parallelism is WORLD_SIZE / TP")
    add("--seed", type=int, default=1234, help="problems and rollout sampling")
    add("--save-interval", type=int, default=20, help="checkpoint every N steps and at the "
                                                      "end (0: never)")
    add("--wandb-project", default="megatron-dsv3-grpo", help="Weights & Biases project")
    add("--no-wandb", action="store_true", help="do not log to Weights & Biases")
    add("--device", default="auto", choices=("auto", "cpu", "cuda"))
    add("--dist-timeout-s", type=float, default=DIST_TIMEOUT_S,
        help="seconds a collective waits for the other ranks")
    return p


def main(argv: Optional[list[str]] = None) -> dict:
    """Parse, set up, run; a TrainError or a bad option becomes one line and status 2."""
    from ..checkpoint.hf import ConversionError
    from ..config import ConfigError
    from ..data import DataError
    from ..parallel import shutdown_distributed
    from .job import run, setup
    from .trainer import NonFiniteUpdate

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.resume is None and args.init_from is not None and (
                args.out_dir / "metrics.jsonl").is_file():
            raise TrainError(f"--out-dir {args.out_dir} holds a run: pass --resume auto to "
                             "continue it, or a new --out-dir")
        return run(setup(args))
    except (TrainError, ConversionError, ConfigError, DataError, FileNotFoundError,
            ValueError, NonFiniteUpdate) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    finally:
        shutdown_distributed()


def cli() -> None:
    main()
