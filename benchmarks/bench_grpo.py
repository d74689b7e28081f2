"""GRPO speed and memory: our trainer (rl/) against TRL's GRPOTrainer on the equivalent
Hugging Face model, and GRPO's memory against a PPO layout with a critic.

    python benchmarks/bench_grpo.py --preset tiny --device cpu      # a logic check (minutes)
    python benchmarks/bench_grpo.py --preset proxy --device cuda --max-new-tokens 256 \\
        --prompts 16 --group-size 8 --json-out benchmarks/results/grpo.json   (not run yet)

What it measures, after --warmup steps, over --steps steps:
  ours   rollout tokens/s (new tokens over the time of rl.rollout.sample_rollouts: one
         batched inference.generate through the latent cache) and the time of a whole GRPO
         step (rollouts + reward + the policy update with the reference's log-probs);
  trl    the same for trl.GRPOTrainer (1.16) on transformers' DeepseekV3ForCausalLM holding
         the same weights (checkpoint.hf.dsv3_to_hf): its step time from the Trainer's own
         step callbacks, its rollout tokens/s from the time spent in the model's `generate`;
         the same prompts, G, completion length, beta, loss ("bnpo" = our "token"), lr;
  memory peak device memory of one GRPO step (policy + frozen reference + AdamW), and of the
         PPO layout of the same step: a critic (a second copy of the model with a scalar value
         head, trained with its own AdamW on the returns) added. On CPU peak device memory
         does not exist: the bytes of parameters, gradients and AdamW state held are reported
         instead (what the layouts differ by).
Prompts are random token ids (--prompt-len), the reward a deterministic function of the
completion's tokens with spread (so that the update is not a zero-advantage no-op), and
generation never stops early (no stop token): both trainers generate exactly
--max-new-tokens per completion.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import (emit_json, peak_gib, prepare_rank_device,  # noqa: E402
                               reset_peak, result_header)


def token_reward(completions, problems):
    """A reward with spread among random completions: the completion's characters' code
    points summed, mod 7 (deterministic, cheap, different across a group)."""
    return [float(sum(map(ord, text)) % 7) for text in completions]


class IdTokenizer:
    """Token ids as text ('12 7 40'): what both trainers' reward sees, no vocabulary needed."""

    eos_id = 0

    def encode(self, text):
        return [int(t) for t in text.split()]

    def decode(self, ids):
        return " ".join(str(int(i)) for i in ids)


class RandomPromptTask:
    """Problems of random prompt ids (the reward ignores the problem)."""

    def __init__(self, vocab_size: int, prompt_len: int, seed: int):
        self.vocab_size, self.prompt_len, self.seed = vocab_size, prompt_len, seed

    def problems(self, step, start, count):
        from megatron_dsv3.rl.rewards import Problem

        g = torch.Generator().manual_seed(self.seed * 1000 + step)
        ids = torch.randint(1, self.vocab_size, (start + count, self.prompt_len), generator=g)
        return [Problem(" ".join(map(str, row.tolist())), "") for row in ids[start:]]


def state_bytes(modules, optimizers) -> int:
    """Bytes of the parameters, their gradients and the optimizers' state tensors."""
    total = 0
    for module in modules:
        for p in module.parameters():
            total += p.numel() * p.element_size()
            if p.grad is not None:
                total += p.grad.numel() * p.grad.element_size()
    for optimizer in optimizers:
        for state in optimizer.state.values():
            total += sum(t.numel() * t.element_size() for t in state.values()
                         if isinstance(t, torch.Tensor))
    return total


def build_ours(cfg, device, seed):
    from megatron_dsv3.config import to_megatron_config
    from megatron_dsv3.model import build_model

    torch.manual_seed(seed)
    return build_model(cfg, megatron_config=to_megatron_config(
        cfg, use_cpu_initialization=True)).to(device).eval()


def bench_ours(args, cfg, device, pg) -> dict:
    from megatron_dsv3.rl.objective import GRPOLossConfig
    from megatron_dsv3.rl.trainer import GRPOConfig, GRPOTrainer

    policy = build_ours(cfg, device, args.seed)
    reference = build_ours(cfg, device, args.seed)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, betas=(0.9, 0.95))
    gcfg = GRPOConfig(prompts_per_step=args.prompts, group_size=args.group_size,
                      max_new_tokens=args.max_new_tokens, micro_batch_size=args.micro_batch_size,
                      loss=GRPOLossConfig(beta=args.beta))
    trainer = GRPOTrainer(policy, reference, optimizer, pg, gcfg,
                          RandomPromptTask(cfg.vocab_size, args.prompt_len, args.seed),
                          token_reward, IdTokenizer(), stop_tokens=[])
    step_s, rollout = [], []
    reset_peak(device)
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        rollouts, _ = trainer.collect(step)
        trainer.optimize(rollouts)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            step_s.append(time.perf_counter() - start)
            rollout.append(int(rollouts.completion_lengths_B.sum()) / rollouts.generate_s)
    grpo_peak = peak_gib(device) if device.type == "cuda" else None
    grpo_bytes = state_bytes([policy, reference], [optimizer])
    ppo = ppo_layout(args, cfg, device, trainer, rollouts)
    return {"step_s": sum(step_s) / len(step_s),
            "rollout_tokens_per_s": sum(rollout) / len(rollout),
            "grpo_peak_gib": grpo_peak, "grpo_state_gib": grpo_bytes / 2**30, **ppo}


def ppo_layout(args, cfg, device, trainer, rollouts) -> dict:
    """The same step with a critic: a third model (the policy's architecture + a scalar
    value head on the final hidden state) and its AdamW, trained on the rewards as returns."""
    critic = build_ours(cfg, device, args.seed + 1)
    head = torch.nn.Linear(cfg.hidden_size, 1).to(device)
    critic_opt = torch.optim.AdamW(list(critic.parameters()) + list(head.parameters()),
                                   lr=args.lr)
    hidden = {}
    hook = critic.decoder.final_layernorm.register_forward_hook(
        lambda module, inputs, output: hidden.__setitem__("h", output))
    reset_peak(device)
    trainer.optimize(rollouts)  # the policy's part of the step, as in GRPO
    ids = rollouts.input_ids_BS.to(device)
    critic(ids, None, None, labels=rollouts.labels_BS.to(device))  # final hidden [s, b, d]
    values_BS = head(hidden["h"]).squeeze(-1).transpose(0, 1)
    returns_B1 = rollouts.rewards_B.to(device).unsqueeze(1)
    mask_BS = rollouts.mask_BS.to(device)
    ((values_BS - returns_B1) ** 2 * mask_BS).sum().div(mask_BS.sum()).backward()
    critic_opt.step()
    hook.remove()
    if device.type == "cuda":
        torch.cuda.synchronize()
    peak = peak_gib(device) if device.type == "cuda" else None
    ppo_bytes = state_bytes([trainer.policy, trainer.reference, critic, head],
                            [trainer.optimizer, critic_opt])
    return {"ppo_peak_gib": peak, "ppo_state_gib": ppo_bytes / 2**30}


def bench_trl(args, cfg, device, policy_state) -> dict:
    """trl.GRPOTrainer on DeepseekV3ForCausalLM with our initial weights."""
    import tempfile

    import transformers
    from datasets import Dataset
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer as TRLTrainer

    from megatron_dsv3.checkpoint.hf import dsv3_to_hf, hf_config_from_model_config

    hf_cfg = hf_config_from_model_config(cfg, attn_implementation="eager")
    model = transformers.DeepseekV3ForCausalLM(hf_cfg)
    hf_state = {k: v for k, v in dsv3_to_hf(policy_state, cfg).items()
                if not k.startswith("model.layers." + str(cfg.num_layers))}  # no MTP in HF
    model.load_state_dict(hf_state, strict=False)
    tokenizer = _trl_tokenizer(cfg.vocab_size)
    task = RandomPromptTask(cfg.vocab_size, args.prompt_len, args.seed)
    prompts = [p.prompt for step in range(args.warmup + args.steps)
               for p in task.problems(step, 0, args.prompts)]
    times, generate_s, new_tokens = [], [0.0], [0]

    class StepTimes(transformers.TrainerCallback):
        def on_step_begin(self, a, s, c, **k):
            self.start = time.perf_counter()

        def on_step_end(self, a, s, c, **k):
            times.append((time.perf_counter() - self.start, generate_s[0], new_tokens[0]))

    with tempfile.TemporaryDirectory() as out:
        # TRL builds its reference model from the policy's path: the model goes there first
        model.save_pretrained(f"{out}/model")
        tokenizer.save_pretrained(f"{out}/model")
        config = TRLConfig(
            output_dir=f"{out}/run", per_device_train_batch_size=args.prompts * args.group_size,
            num_generations=args.group_size, max_completion_length=args.max_new_tokens,
            max_steps=args.warmup + args.steps, learning_rate=args.lr, beta=args.beta,
            loss_type="bnpo", temperature=1.0, report_to=[], logging_steps=1,
            save_strategy="no", use_cpu=device.type == "cpu", bf16=False,
            gradient_accumulation_steps=1, shuffle_dataset=False, seed=args.seed,
            generation_kwargs={"min_new_tokens": args.max_new_tokens},
            model_init_kwargs={"dtype": torch.float32, "attn_implementation": "eager"})
        trainer = TRLTrainer(model=f"{out}/model", reward_funcs=token_reward_trl, args=config,
                             train_dataset=Dataset.from_dict({"prompt": prompts}),
                             processing_class=tokenizer, callbacks=[StepTimes()])
        original_generate = trainer.model.generate

        def timed_generate(*a, **k):
            start = time.perf_counter()
            out_ids = original_generate(*a, **k)
            generate_s[0] += time.perf_counter() - start
            prompt_len = (k.get("input_ids") if k.get("input_ids") is not None else a[0]).shape[1]
            new_tokens[0] += out_ids.shape[0] * (out_ids.shape[1] - prompt_len)
            return out_ids

        trainer.model.generate = timed_generate
        trainer.train()
    measured = times[args.warmup:]
    first_gen, first_tok = (times[args.warmup - 1][1:] if args.warmup else (0.0, 0))
    gen_s, tokens = measured[-1][1] - first_gen, measured[-1][2] - first_tok
    return {"trl_step_s": sum(t for t, _, _ in measured) / len(measured),
            "trl_rollout_tokens_per_s": tokens / gen_s}


def token_reward_trl(prompts, completions, **unused):
    return token_reward(completions, None)


def _trl_tokenizer(vocab_size: int):
    """A fast tokenizer whose tokens are the ids as words ('12 7 40'), eos = 0: prompts of
    random ids encode to exactly those ids, as for our trainer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {str(i): i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # ids joined by spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="0", pad_token="0")
    fast.padding_side = "left"
    return fast


def main(argv=None) -> dict:
    from megatron_dsv3.config import preset
    from megatron_dsv3.parallel import init_distributed

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--num-layers", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--micro-batch-size", type=int, default=64)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-trl", action="store_true")
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args(argv)
    device = torch.device(prepare_rank_device(args.device))
    cfg = preset(args.preset).replace(linear_backend="local", params_dtype="float32")
    if args.num_layers is not None:
        cfg = cfg.replace(num_layers=args.num_layers)
    pg = init_distributed(tensor_parallel_size=1)
    results = {**result_header(device), "preset": cfg.name, "prompts": args.prompts,
               "group_size": args.group_size, "prompt_len": args.prompt_len,
               "max_new_tokens": args.max_new_tokens, "ours": bench_ours(args, cfg, device, pg)}
    if not args.skip_trl:
        initial = build_ours(cfg, torch.device("cpu"), args.seed).state_dict()
        results["trl"] = bench_trl(args, cfg, device, initial)
    emit_json(results, args.json_out)
    return results


if __name__ == "__main__":
    main()
