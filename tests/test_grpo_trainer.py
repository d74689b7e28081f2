"""The GRPO step (rl/trainer.py, rl/rollout.py) on the small model: rollouts and their masks,
log-probs that are the generator's, DP = 2 on gloo against one process, beta = 0 without a
reference model."""

from __future__ import annotations

import pytest
import torch
from helpers.gloo import run_gloo
from helpers.small_model import small_config
from helpers.tolerance import FP32_REORDER, assert_close, assert_equal

from megatron_dsv3.rl.objective import GRPOLossConfig
from megatron_dsv3.rl.rewards import ArithmeticTask, arithmetic_reward
from megatron_dsv3.rl.rollout import pack, token_logps
from megatron_dsv3.rl.trainer import GRPOConfig, GRPOTrainer

CHARS = "0123456789+-=\n"


class CharTokenizer:
    """Id 0 is end-of-text, then one id per character of CHARS (fits the small model's 64)."""

    eos_id = 0

    def encode(self, text):
        return [CHARS.index(c) + 1 for c in text]

    def decode(self, ids):
        return "".join("<|endoftext|>" if i == 0 else CHARS[i - 1] if i <= len(CHARS) else "?"
                       for i in ids)


def _model(seed=0):
    from megatron_dsv3.config import to_megatron_config
    from megatron_dsv3.model import build_model

    torch.manual_seed(seed)
    cfg = small_config(max_seq_len=24)
    return build_model(cfg, megatron_config=to_megatron_config(
        cfg, use_cpu_initialization=True)).eval()


def distinct_characters(completions, problems):
    """A reward that varies among an untrained model's completions (the arithmetic reward is 0
    for all of them): how many different characters a completion holds."""
    return [float(len(set(text))) for text in completions]


def _trainer(pg, cfg: GRPOConfig, policy=None, reference=None, reward=None):
    policy = policy if policy is not None else _model()
    if cfg.loss.beta > 0 and reference is None:
        reference = _model()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2, betas=(0.9, 0.95))
    return GRPOTrainer(policy, reference, optimizer, pg, cfg, ArithmeticTask(seed=3),
                       reward or arithmetic_reward(), CharTokenizer(),
                       stop_tokens=[0, CHARS.index("\n") + 1])


CONFIG = GRPOConfig(prompts_per_step=4, group_size=4, max_new_tokens=3, num_iterations=2,
                    micro_batch_size=4, seed=5, loss=GRPOLossConfig(beta=0.05))


def test_pack_masks_prompt_and_padding():
    rollouts = pack([[5, 6, 7], [8, 9]], [[1, 2], [3, 4, 0]], group_size=2, pad_id=0)
    assert rollouts.input_ids_BS.tolist() == [[5, 6, 7, 1, 2], [8, 9, 3, 4, 0]]
    assert rollouts.labels_BS.tolist() == [[6, 7, 1, 2, 0], [9, 3, 4, 0, 0]]
    # labels that are completion tokens: row 0 labels 2-3 (1, 2); row 1 labels 1-3 (3, 4, eos)
    assert rollouts.mask_BS.tolist() == [[0, 0, 1, 1, 0], [0, 1, 1, 1, 0]]
    assert rollouts.completion_lengths_B.tolist() == [2, 3]


def test_rollout_logps_are_the_generators_distribution(dist_single):
    """The training forward's log-prob of each sampled token equals the log-softmax of the
    logits the cached generator drew it from (prefill + decode steps, absorbed attention)."""
    from megatron_dsv3.inference import decode_step, new_cache, prefill

    trainer = _trainer(dist_single, CONFIG)
    rollouts, _ = trainer.collect(step=0)
    logp_BS = token_logps(trainer.policy, rollouts.input_ids_BS, rollouts.labels_BS, 16)
    model = trainer.policy
    for row in (0, 5):
        mask = rollouts.mask_BS[row].bool()
        start = int(mask.nonzero()[0])  # the label index of the first completion token
        prompt = rollouts.input_ids_BS[row, :start + 1]
        completion = rollouts.labels_BS[row][mask]
        cache = new_cache(model, 1, 24)
        logits = prefill(model, cache, [prompt])[0, -1]
        expected = []
        for token in completion.tolist():
            expected.append(torch.log_softmax(logits.float(), -1)[token])
            logits = decode_step(model, cache, torch.tensor([token]))[0]
        assert_close(logp_BS[row][mask], torch.stack(expected), FP32_REORDER,
                     "absorbed cached attention vs the training forward: fp32, other GEMM "
                     "order and the absorbed W^UK / W^UV products (1.1e-7 measured)")


def test_rewards_and_advantages_of_a_collected_step(dist_single):
    trainer = _trainer(dist_single, CONFIG)
    rollouts, problems = trainer.collect(step=0)
    assert rollouts.batch_size == 16 and len(problems) == 16
    expected = arithmetic_reward()(rollouts.completions, problems)
    assert rollouts.rewards_B.tolist() == pytest.approx(expected)
    group = rollouts.advantages_B.view(4, 4)
    assert torch.all(group.sum(1).abs() < 1e-5)  # centred per group


def test_beta_zero_trains_without_a_reference(dist_single):
    """beta = 0: the trainer takes no reference (and refuses one), its KL is exactly 0. That
    the job then builds only the policy: tests/test_grpo_job.py."""
    cfg = GRPOConfig(prompts_per_step=2, group_size=4, max_new_tokens=2,
                     loss=GRPOLossConfig(beta=0.0))
    trainer = _trainer(dist_single, cfg, reward=distinct_characters)
    assert trainer.reference is None
    metrics = trainer.step(0)
    assert metrics.kl == 0.0 and metrics.grad_norm > 0
    with pytest.raises(ValueError, match="beta=0.0 with reference a model"):
        _trainer(dist_single, cfg, reference=_model())
    with pytest.raises(ValueError, match="beta=0.05 with reference None"):
        GRPOTrainer(_model(), None, trainer.optimizer, dist_single, CONFIG,
                    ArithmeticTask(), arithmetic_reward(), CharTokenizer())


def test_non_finite_update_is_refused_before_it_is_applied(dist_single):
    from megatron_dsv3.rl.trainer import NonFiniteUpdate

    trainer = _trainer(dist_single, CONFIG, reward=distinct_characters)
    rollouts, _ = trainer.collect(step=0)
    rollouts.advantages_B[0] = float("nan")  # e.g. a reward model returning garbage
    before = {k: v.detach().clone() for k, v in trainer.policy.named_parameters()}
    with pytest.raises(NonFiniteUpdate, match="not applied"):
        trainer.optimize(rollouts)
    for name, value in trainer.policy.named_parameters():
        assert_equal(value.detach(), before[name], name)
    assert not trainer.optimizer.state  # AdamW never stepped


def _optimize_rank(rank, world, rollouts, cfg):
    """Rank `rank` of `world` DP ranks optimizes its contiguous share of the rollouts."""
    from megatron_dsv3.parallel import init_distributed

    pg = init_distributed(tensor_parallel_size=1)
    trainer = _trainer(pg, cfg)
    share = rollouts.batch_size // world
    stats = trainer.optimize(rollouts.rows(rank * share, (rank + 1) * share))
    params = dict(trainer.policy.named_parameters())
    return ({k: v.detach().clone() for k, v in params.items()},
            {k: v.grad.clone() for k, v in params.items() if v.grad is not None}, stats)


@pytest.mark.multiprocess
def test_dp2_update_equals_one_process(dist_single):
    """Two optimizer steps (num_iterations = 2, beta > 0, micro-batches of 4) on 16 rollouts:
    one process with all of them against DP = 2 with 8 each."""
    rollouts, _ = _trainer(dist_single, CONFIG, reward=distinct_characters).collect(step=0)
    assert rollouts.advantages_B.abs().sum() > 0, "a step without signal proves nothing"
    (single, single_grads, single_stats), = run_gloo(_optimize_rank, 1, rollouts, CONFIG)
    ranks = run_gloo(_optimize_rank, 2, rollouts, CONFIG)
    initial = dict(_model().named_parameters())
    moved = 0
    for name, value in single.items():
        assert_equal(ranks[0][0][name], ranks[1][0][name], f"{name}: DP ranks differ")
        if not torch.equal(value, initial[name]):
            moved += 1
        # gradients summed over two halves instead of one pass (fp32 order: 5e-7 measured,
        # below); AdamW's g / (sqrt(v) + eps) amplifies it in near-zero gradient elements:
        # 5.2e-6 of the weights measured after two steps, 20x margin
        assert_close(ranks[0][0][name], value, 1e-4, "fp32 order through AdamW", name)
    assert moved > 10
    # the last iteration's gradients (after the DP reduction and clipping): AdamW hides a
    # wrong gradient scale in the parameters, not here
    assert single_grads.keys() == ranks[0][1].keys() and len(single_grads) > 10
    for name, grad in single_grads.items():
        assert_close(ranks[0][1][name], grad, FP32_REORDER, "fp32 summation order", name)
    assert ranks[0][2] == ranks[1][2]
    assert ranks[0][2]["tokens"] == single_stats["tokens"]
    assert abs(ranks[0][2]["kl_sum"] - single_stats["kl_sum"]) <= 1e-6


def _tp_step(rank, world, tp, grpo_cfg=CONFIG):
    """One GRPO step (collect + two updates) with the policy split over `tp` ranks; rollouts
    from the TP = 1 replica when tp > 1. Returns the update of the full weights, the rollout
    tokens and the rewards."""
    from megatron_dsv3.parallel import init_distributed
    from megatron_dsv3.rl.job import _whole_model
    from megatron_dsv3.rl.trainer import RolloutReplica, full_state_dict
    from megatron_dsv3.train.build import build_initial_model

    pg = init_distributed(tensor_parallel_size=tp)
    cfg = small_config(max_seq_len=24)
    cpu = torch.device("cpu")
    policy = build_initial_model(cfg, pg, 7, cpu).eval()
    reference = build_initial_model(cfg, pg, 7, cpu)
    replica = (RolloutReplica(lambda groups: _whole_model(cfg, groups, cpu), pg)
               if tp > 1 else None)
    initial = full_state_dict(policy, pg)
    # SGD: the update is -lr x the (clipped) gradient, so comparing updates compares
    # gradients (AdamW's g / sqrt(v) would amplify the order noise of near-zero elements)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.1)
    trainer = GRPOTrainer(policy, reference, optimizer, pg, grpo_cfg, ArithmeticTask(seed=3),
                          distinct_characters, CharTokenizer(), stop_tokens=[0],
                          rollout_replica=replica)
    rollouts, _ = trainer.collect(0)
    with torch.no_grad():
        logp_BS = token_logps(policy, rollouts.input_ids_BS, rollouts.labels_BS, 16)
    trainer.optimize(rollouts)
    update = {k: v - initial[k] for k, v in full_state_dict(policy, pg).items()}
    return update, rollouts.input_ids_BS, rollouts.rewards_B, logp_BS * rollouts.mask_BS


@pytest.mark.multiprocess
def test_tp2_step_equals_tp1():
    """TP = 2 (one DP replica): the replica samples the TP = 1 model's rollouts exactly (the
    same weights, gathered), the policy's log-probs and the update match TP = 1's."""
    (single, single_ids, single_rewards, single_logp), = run_gloo(_tp_step, 1, 1)
    ranks = run_gloo(_tp_step, 2, 2)
    assert single_rewards.unique().numel() > 1, "rewards without spread prove nothing"
    moved = [name for name, value in single.items() if value.abs().max() > 0]
    assert len(moved) > 10
    for update, ids, rewards, logp in ranks:
        assert_equal(ids, single_ids, "rollout tokens")
        assert_equal(rewards, single_rewards, "rewards")
        # TP splits GEMM reductions and the vocab-parallel cross-entropy (fp32 order)
        assert_close(logp, single_logp, FP32_REORDER, "fp32 order under TP", "log-probs")
        for name in moved:
            # SGD: the update is the gradient. A GRPO gradient is a difference: each group's
            # advantages sum to zero, so its elements are small against the per-completion
            # terms that cancel in them, and those terms' fp32 order differences (FP32_REORDER
            # of their size) remain: up to 1.6e-4 of the result measured (layer 0's
            # linear_q_down, the routers). A TP error (a missing reduction, a wrong shard) is
            # off by O(1).
            assert_close(update[name], single[name], 1e-3,
                         "fp32 order under TP, amplified by the advantages' cancellation",
                         name)
