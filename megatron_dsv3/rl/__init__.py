"""GRPO post-training of the DeepSeek-V3 model (docs/grpo.md; issue 14).

  objective.py  group-normalised advantages, the clipped token loss with the k3 KL
  rewards.py    the arithmetic task drawn on the fly, rule-based verifiers, reward plug-in
  rollout.py    G completions per prompt through inference.generate, packed for training;
                the policy's per-token log-probs
  trainer.py    one GRPO step: rollouts sharded over DP, rewards, num_iterations updates
  job.py        the run: model, reference, optimizer, W&B / metrics.jsonl, checkpoints
  cli.py        python -m megatron_dsv3.rl

Layering: rl/ imports the model, inference/ and train/ (checkpoints, metrics log); nothing
below imports rl/.
"""

from .objective import GRPOLossConfig, group_advantages, grpo_loss
from .rewards import ArithmeticTask, Problem, answer_format, exact_answer, weighted_sum
from .trainer import GRPOConfig, GRPOTrainer

__all__ = ["ArithmeticTask", "GRPOConfig", "GRPOLossConfig", "GRPOTrainer", "Problem",
           "answer_format", "exact_answer", "group_advantages", "grpo_loss", "weighted_sum"]
