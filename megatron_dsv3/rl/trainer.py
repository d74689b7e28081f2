"""The GRPO step: sample groups, score them, and take several clipped policy steps on them.

What one GRPO step does (each rank):
  1. prompts: the step's `prompts_per_step` problems, a contiguous share of
     prompts_per_step / DP of them per data-parallel rank (TP ranks of one replica take the
     same share); each rank samples all G completions of its own prompts, so a group never
     spans ranks and its statistics need no communication;
  2. rollouts through `inference.generate` (latent cache, one batched call) from the current
     policy; with TP > 1 from the policy's TP = 1 replica (`RolloutReplica`, the full weights
     gathered from the TP shards after every update: the cached decoder runs at TP = 1), with
     the same generator seed on the TP ranks of a replica, so they hold the same rollouts;
  3. rewards (rewards.py) and the group-normalised advantages (objective.group_advantages);
  4. without gradients: the old policy's log-probs (only when num_iterations > 1; with one
     iteration the ratio is 1 and logp.detach() stands in, as in TRL) and the frozen
     reference's (only when beta > 0: with beta = 0 no reference model exists at all);
  5. num_iterations optimizer steps on the same rollouts: per micro-batch the policy's
     log-probs, `objective.grpo_loss` with the whole step's normalizer (tokens or completions
     over every DP rank), backward; the gradients summed over DP (`gradients.reduce_gradients`
     averages, so each rank's loss is scaled by the DP size first), clipped to `clip_grad`,
     AdamW.

DP = 2 with half the rollouts on each rank gives the parameters of one process with all of
them (tests/test_grpo_trainer.py): each rank's loss is its share of the one batch's loss.

Deviations and choices: the policy stays in eval mode throughout (what the cached generator
needs; the model has no dropout). Eval mode also leaves the MoE routers' expert biases fixed
and the sequence-wise balance loss out: the bias update is pre-training's load balancing
(train/step.py), GRPO's few steps change the routing through the router weights' policy
gradient only. The policy is fp32 (autocast is not applied). The MTP head is not trained
(its losses are computed by the forward and ignored: GRPO scores the main head's tokens).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist

from ..gradients import clip_gradients, reduce_gradients
from .objective import GRPOLossConfig, batch_normalizer, group_advantages, grpo_loss
from .rewards import ArithmeticTask, Problem, RewardFn, score
from .rollout import Rollouts, sample_rollouts, token_logps


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """prompts_per_step: prompts of one step over all DP ranks; group_size: G completions per
    prompt; num_iterations: optimizer steps per batch of rollouts (DeepSeekMath's mu);
    micro_batch_size: completions per forward/backward."""

    prompts_per_step: int = 8
    group_size: int = 8
    max_new_tokens: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    num_iterations: int = 1
    micro_batch_size: int = 64
    clip_grad: float = 1.0
    seed: int = 0
    loss: GRPOLossConfig = GRPOLossConfig()

    def __post_init__(self):
        for name in ("prompts_per_step", "num_iterations", "micro_batch_size",
                     "max_new_tokens"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name}={value!r} is invalid: it must be an int >= 1")
        if not (isinstance(self.group_size, int) and self.group_size >= 2):
            raise ValueError(f"group_size={self.group_size!r} is invalid: GRPO compares a "
                             "prompt's completions with each other, so it needs at least 2")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature!r} is invalid: rollouts must be "
                             "sampled (> 0; 1.0 samples the policy whose ratio is optimised)")
        if not self.clip_grad >= 0:
            raise ValueError(f"clip_grad={self.clip_grad!r} is invalid: it must be >= 0 (0: "
                             "no clipping)")

    def prompts_per_rank(self, dp_size: int) -> int:
        if self.prompts_per_step % dp_size:
            raise ValueError(f"prompts_per_step={self.prompts_per_step} does not split over "
                             f"{dp_size} data-parallel ranks: make it a multiple of {dp_size}")
        return self.prompts_per_step // dp_size


class NonFiniteUpdate(RuntimeError):
    """A GRPO update whose gradient norm is NaN or Inf: refused before AdamW applies it."""


def rollout_seed(seed: int, step: int, dp_rank: int) -> int:
    """The rollout generator's seed: a pure function of (seed, step, DP rank), the same on the
    TP ranks of a replica and on a resumed run."""
    return ((seed * 1_000_003 + step) * 65_537 + dp_rank) % 2**63


class RolloutReplica:
    """A TP = 1 copy of the policy for the cached generator when the policy is split over TP
    ranks: `build_model_fn(groups)` builds the whole model on one-rank groups, `refresh`
    copies the policy's full weights into it (every rank of the policy's TP and EP groups
    calls it). Costs one more model's memory on each rank, for TP > 1 only."""

    def __init__(self, build_model_fn: Callable, pg):
        import copy

        # every rank creates every one-rank group, in the same order (torch.distributed's rule)
        solo_groups = [dist.new_group([r]) for r in range(dist.get_world_size())]
        solo = copy.copy(pg)
        solo.tp = solo.ep = solo.dp = solo.expt_dp = solo_groups[dist.get_rank()]
        self.model = build_model_fn(solo).eval().requires_grad_(False)

    def refresh(self, policy: torch.nn.Module, pg) -> torch.nn.Module:
        """The replica holding the policy's current weights."""
        missing, unexpected = self.model.load_state_dict(full_state_dict(policy, pg),
                                                         strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]  # TE's, no weights
        if missing or unexpected:
            raise ValueError(f"the rollout replica is not the policy's model: missing "
                             f"{missing}, unexpected {unexpected}; build it with the "
                             "policy's config")
        return self.model


def full_state_dict(model: torch.nn.Module, pg) -> dict:
    """The whole TP = 1, EP = 1 state dict of a model split over `pg.tp` / `pg.ep` (every rank
    of both groups calls it): parameters gathered, buffers (replicated) as they are."""
    from ..parallel import gather_state_dict

    state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    gathered = gather_state_dict(model, pg.tp, ep_group=pg.ep)
    state.update(gathered)
    return state


@dataclasses.dataclass
class StepMetrics:
    """What a step logs (every value a mean over all DP ranks' completions or tokens)."""

    reward_mean: float
    reward_std: float
    kl: float
    clip_fraction: float
    clip_low: float
    clip_high: float
    ratio_mean: float
    response_length: float
    grad_norm: float
    rollout_tokens_per_s: float
    tokens_per_s: float
    step_s: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class GRPOTrainer:
    """GRPO over a Megatron-built policy (module docstring). `reference` is None iff
    cfg.loss.beta == 0; `tokenizer` has encode / decode / eos_id; `stop_tokens` end a
    completion (default: the tokenizer's end-of-text)."""

    def __init__(self, policy: torch.nn.Module, reference: Optional[torch.nn.Module],
                 optimizer: torch.optim.Optimizer, pg, cfg: GRPOConfig, task: ArithmeticTask,
                 reward: RewardFn, tokenizer, stop_tokens=None,
                 rollout_replica: Optional[RolloutReplica] = None):
        if (reference is None) != (cfg.loss.beta == 0):
            raise ValueError(f"beta={cfg.loss.beta} with reference "
                             f"{'None' if reference is None else 'a model'}: pass the frozen "
                             "reference model iff beta > 0 (beta = 0 keeps none in memory)")
        if pg.tp.size() > 1 and rollout_replica is None:
            raise ValueError(f"the policy is split over {pg.tp.size()} tensor-parallel ranks: "
                             "the cached generator runs at TP = 1, pass a RolloutReplica")
        self.policy, self.reference, self.optimizer = policy.eval(), reference, optimizer
        if reference is not None:
            reference.eval().requires_grad_(False)
        self.pg, self.cfg, self.task, self.reward = pg, cfg, task, reward
        self.tokenizer = tokenizer
        self.stop_tokens = list(stop_tokens if stop_tokens is not None else [tokenizer.eos_id])
        self.replica = rollout_replica
        self.prompts_per_rank = cfg.prompts_per_rank(pg.dp.size())

    # ------------------------------------------------------------------------------------------
    # Steps 1-3: prompts, rollouts, rewards and advantages
    # ------------------------------------------------------------------------------------------
    def problems(self, step: int) -> list[Problem]:
        """This DP rank's share of step `step`'s problems."""
        return self.task.problems(step, self.pg.dp.rank() * self.prompts_per_rank,
                                  self.prompts_per_rank)

    def collect(self, step: int) -> tuple[Rollouts, list[Problem]]:
        problems = self.problems(step)
        # on the policy's device: sampling stays there (a CPU generator would copy each decode
        # step's probabilities [B, V] to the host and draw there)
        generator = torch.Generator(next(self.policy.parameters()).device).manual_seed(
            rollout_seed(self.cfg.seed, step, self.pg.dp.rank()))
        sampler = (self.policy if self.replica is None
                   else self.replica.refresh(self.policy, self.pg))
        rollouts = sample_rollouts(
            sampler, [self.tokenizer.encode(p.prompt) for p in problems],
            group_size=self.cfg.group_size, max_new_tokens=self.cfg.max_new_tokens,
            stop_tokens=self.stop_tokens, decode=self.tokenizer.decode,
            temperature=self.cfg.temperature, top_p=self.cfg.top_p, generator=generator,
            pad_id=self.tokenizer.eos_id)
        grouped = [p for p in problems for _ in range(self.cfg.group_size)]
        self.score(rollouts, grouped)
        return rollouts, grouped

    def score(self, rollouts: Rollouts, problems: list[Problem]) -> None:
        """Rewards and advantages of the rollouts, in place."""
        rollouts.rewards_B = torch.tensor(score(self.reward, rollouts.completions, problems))
        rollouts.advantages_B = group_advantages(rollouts.rewards_B, rollouts.group_size,
                                                 self.cfg.loss.std_eps)

    # ------------------------------------------------------------------------------------------
    # Steps 4-5: the policy update
    # ------------------------------------------------------------------------------------------
    def optimize(self, rollouts: Rollouts) -> dict:
        """num_iterations optimizer steps on this rank's rollouts (every DP rank calls it with
        its own); returns the DP-summed loss statistics and the last gradient norm."""
        cfg, mb = self.cfg, self.cfg.micro_batch_size
        with torch.no_grad():
            if cfg.num_iterations > 1:
                rollouts.old_logp_BS = token_logps(self.policy, rollouts.input_ids_BS,
                                                   rollouts.labels_BS, mb)
            if self.reference is not None:
                rollouts.ref_logp_BS = token_logps(self.reference, rollouts.input_ids_BS,
                                                   rollouts.labels_BS, mb)
        normalizer = self._dp_sum(batch_normalizer(rollouts.mask_BS, cfg.loss.loss_type))
        sums = torch.zeros(5, dtype=torch.float64)  # tokens, kl, clipped low, high, ratio
        params = [p for p in self.policy.parameters() if p.requires_grad]
        device = next(self.policy.parameters()).device
        for _ in range(cfg.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            for start in range(0, rollouts.batch_size, mb):
                piece = rollouts.rows(start, start + mb)
                logp_BS = token_logps(self.policy, piece.input_ids_BS, piece.labels_BS, mb)
                old_BS = logp_BS.detach() if piece.old_logp_BS is None else piece.old_logp_BS
                ref_BS = piece.ref_logp_BS
                terms = grpo_loss(logp_BS, old_BS.to(device),
                                  None if ref_BS is None else ref_BS.to(device),
                                  piece.advantages_B.to(device), piece.mask_BS.to(device),
                                  cfg.loss, normalizer.to(device))
                # reduce_gradients averages over DP: scale so that the ranks' shares add up
                (terms.loss * self.pg.dp.size()).backward()
                sums += torch.stack([t.detach().double().cpu() for t in terms[1:]])
            trained = [p for p in params if p.grad is not None]
            reduce_gradients(trained, self.pg)
            grad_norm = clip_gradients(trained, cfg.clip_grad, self.pg, optimizer=self.optimizer)
            if not bool(torch.isfinite(grad_norm)):  # the global norm: every rank alike
                self.optimizer.zero_grad(set_to_none=True)
                raise NonFiniteUpdate(
                    f"the GRPO update's gradient norm is {float(grad_norm)} (a NaN or Inf in "
                    "the log-probs, rewards or weights): the update was not applied; resume "
                    "from the last checkpoint, e.g. with a lower --lr or --clip-grad")
            self.optimizer.step()
        sums = self._dp_sum(sums)
        return {"tokens": sums[0].item(), "kl_sum": sums[1].item(),
                "clipped_low": sums[2].item(), "clipped_high": sums[3].item(),
                "ratio_sum": sums[4].item(), "grad_norm": float(grad_norm)}

    def step(self, step: int) -> StepMetrics:
        """One GRPO step (the module docstring's 1-5); metrics are means over every rank."""
        start = time.perf_counter()
        rollouts, _ = self.collect(step)
        update = self.optimize(rollouts)
        elapsed = time.perf_counter() - start
        rewards = rollouts.rewards_B.double()
        local = torch.tensor([rollouts.batch_size, rewards.sum(), (rewards ** 2).sum(),
                              rollouts.completion_lengths_B.sum(), rollouts.generate_s],
                             dtype=torch.float64)
        n, r_sum, r_sq, new_tokens, generate_s = self._dp_sum(local).tolist()
        mean = r_sum / n
        tokens = update["tokens"]  # completion tokens, summed over every iteration and rank
        return StepMetrics(
            reward_mean=mean, reward_std=max(r_sq / n - mean * mean, 0.0) ** 0.5,
            kl=update["kl_sum"] / tokens,
            clip_fraction=(update["clipped_low"] + update["clipped_high"]) / tokens,
            clip_low=update["clipped_low"] / tokens, clip_high=update["clipped_high"] / tokens,
            ratio_mean=update["ratio_sum"] / tokens,
            response_length=new_tokens / n, grad_norm=update["grad_norm"],
            # new tokens over the ranks' mean generation time (they generate at once)
            rollout_tokens_per_s=new_tokens / (generate_s / self.pg.dp.size()),
            tokens_per_s=new_tokens / elapsed, step_s=elapsed)

    def _dp_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over the DP group of a small host tensor, on the host (it travels through
        the parameters' device: NCCL reduces only GPU tensors)."""
        if self.pg.dp.size() > 1:
            device = next(self.policy.parameters()).device
            tensor = tensor.to(device, copy=True)
            dist.all_reduce(tensor, group=self.pg.dp)
            tensor = tensor.cpu()
        return tensor
