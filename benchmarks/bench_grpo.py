"""GRPO speed and memory (issue 14): our trainer (rl/) against TRL's GRPOTrainer on the
equivalent Hugging Face model, and GRPO's memory against a PPO layout with a critic.

    python benchmarks/bench_grpo.py --preset tiny --device cpu      # a logic check (minutes)
    bash benchmarks/grpo_gpu.sh                                      # proxy on one H200

Parts (`--parts`, comma-separated; benchmarks/grpo_gpu.sh runs `ours,ppo` and `trl` as two
processes), all on the same prompts, G, prompt and completion lengths, parameter dtype
(`--dtype`, bf16 by default: parameters, gradients and AdamW moments in bf16 on both sides,
no fp32 master weights), optimizer (torch's AdamW, fused on GPU, betas 0.9 / 0.999, eps 1e-8,
no weight decay, constant lr, gradients clipped to norm 1), beta (the reference model held
on both sides when > 0) and loss (our "token" = TRL's "bnpo"), one forward / backward over
all the step's completions (`--micro-batch-size` defaults to prompts x G, what TRL's
per-device batch does):
  ours  `--warmup` untimed steps then `--steps` timed ones of rl.GRPOTrainer: rollout
        tokens/s (new tokens over the time of `inference.generate` through the latent
        cache), the step (rollouts + reward + the update), the update alone (loss + backward
        + clipping + AdamW: `optimize` less the reference's no-grad log-probs, timed apart),
        peak device memory over the timed steps;
  ppo   memory: the peak of one GRPO update (policy + frozen reference + AdamW, on the last
        step's rollouts), then the same update with a PPO critic added (a third model of the
        policy's architecture + a scalar value head on its final hidden state, its own AdamW,
        trained on the rewards as returns after the policy's update): both peaks MEASURED,
        beside the parameter + gradient + AdamW-state bytes of each model (what the layouts
        differ by; on CPU, where no peak exists, only those);
  trl   trl.GRPOTrainer (1.16; use_vllm off: transformers' own `generate`) on
        DeepseekV3ForCausalLM built from the same config with the same initial weights
        (bench_decode.build_hf: dsv3_to_hf, sdpa attention, grouped_mm experts on GPU; the MTP
        layer, which transformers does not build, left out), its reference a copy of the same
        model in memory (TRL would load it again from the policy's path: the same weights).
        Its timers, synchronised: the step from the Trainer's step callbacks, TRL's own
        profiling contexts (`_prepare_inputs`: generation, reward and the reference's
        log-probs; `transformers.generate`) recorded instead of sent to W&B; update = step -
        `_prepare_inputs`; new tokens from its logged `completions/mean_length`. bf16 on GPU
        is TRL's default `bf16=True` (autocast over the bf16 parameters); TRL's default
        gradient checkpointing is off as ours has none (`--trl-gradient-checkpointing`).
Prompts: rl.rewards.ArithmeticTask (`--problem-style`, `--max-operand`; the equations of
single digits are 4 characters), tokenized by a character-level tokenizer (256 bytes +
end-of-text, examples/grpo_arithmetic.py's), TRL's dataset holding the same problems in the
same order (shuffle off). Generation never stops early (no stop token on our side,
`min_new_tokens` on TRL's): both generate exactly --max-new-tokens per completion. The weights
are random, so the reward is the arithmetic reward plus a deterministic spread (the decoded
completion's code points mod 7, / 7) that keeps the advantages non-zero. Prints one JSON line
(`--json-out`: rewritten after each part, "complete": false until the end).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import (emit_json, free_memory, peak_gib,  # noqa: E402
                               prepare_rank_device, reset_peak, result_header,
                               seed_megatron_cuda_rng, sync, write_json)

PARTS = ("ours", "ppo", "trl")


# ----------------------------------------------------------------------------------------------
# What both sides share: the tokenizer, the problems, the reward, the optimizer settings
# ----------------------------------------------------------------------------------------------
def make_task(args):
    from megatron_dsv3.rl.rewards import ArithmeticTask

    return ArithmeticTask(max_operand=args.max_operand, seed=args.seed, style=args.problem_style)


def bench_reward(completions, problems):
    """The arithmetic reward (exact answer + 0.1 x format) plus a spread that random weights'
    completions need to have non-zero advantages: the text's code points summed mod 7, / 7."""
    from megatron_dsv3.rl.rewards import arithmetic_reward

    base = arithmetic_reward()(completions, problems)
    return [r + (sum(map(ord, text)) % 7) / 7 for r, text in zip(base, completions, strict=True)]


def adamw(params, args, device: torch.device) -> torch.optim.AdamW:
    """torch's AdamW as TRL's `optim="adamw_torch_fused"` (GPU) / "adamw_torch" makes it."""
    return torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                             fused=device.type == "cuda")


def model_bytes(module, optimizer=None) -> dict:
    """GiB of a model's parameters, their gradients and its optimizer's state tensors."""
    params = list(module.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    state = 0
    for p in params:
        if optimizer is not None and p in optimizer.state:
            state += sum(t.numel() * t.element_size() for t in optimizer.state[p].values()
                         if isinstance(t, torch.Tensor))
    return {"params_gib": sum(p.numel() * p.element_size() for p in params) / 2**30,
            "grads_gib": grads / 2**30, "optimizer_gib": state / 2**30}


def _total(parts: dict) -> float:
    return sum(v for value in parts.values() for v in value.values())


# ----------------------------------------------------------------------------------------------
# Ours
# ----------------------------------------------------------------------------------------------
def build_ours(cfg, device, seed, pg):
    """Our model as bench_decode builds it: initialised on the device (Megatron's CUDA RNG
    seeded), so the same seed gives the same weights in every part."""
    from megatron_dsv3.config import to_megatron_config
    from megatron_dsv3.model import build_model

    torch.manual_seed(seed)
    seed_megatron_cuda_rng(seed, device)
    megatron_cfg = to_megatron_config(cfg, use_cpu_initialization=device.type != "cuda")
    return build_model(cfg, pg_collection=pg, megatron_config=megatron_cfg).to(device).eval()


def make_ours(args, cfg, device, pg, tokenizer):
    from megatron_dsv3.rl.objective import GRPOLossConfig
    from megatron_dsv3.rl.trainer import GRPOConfig, GRPOTrainer

    policy = build_ours(cfg, device, args.seed, pg)
    reference = build_ours(cfg, device, args.seed, pg) if args.beta > 0 else None
    gcfg = GRPOConfig(prompts_per_step=args.prompts, group_size=args.group_size,
                      max_new_tokens=args.max_new_tokens, micro_batch_size=args.micro_batch_size,
                      seed=args.seed, loss=GRPOLossConfig(beta=args.beta, loss_type="token"))
    return GRPOTrainer(policy, reference, adamw(policy.parameters(), args, device), pg, gcfg,
                       make_task(args), bench_reward, tokenizer, stop_tokens=[])


class NoGradTimer:
    """Wraps rl.trainer's `token_logps`: the synchronised time of its no-grad calls (the
    reference's, and the old policy's with num_iterations > 1), so that the update can be
    timed without them (TRL computes them in `_prepare_inputs`, before its update)."""

    def __init__(self, device):
        import megatron_dsv3.rl.trainer as trainer_module

        self.module, self.device, self.seconds = trainer_module, device, 0.0
        self.original = trainer_module.token_logps
        trainer_module.token_logps = self

    def __call__(self, *args, **kwargs):
        if torch.is_grad_enabled():
            return self.original(*args, **kwargs)
        sync(self.device)
        start = time.perf_counter()
        out = self.original(*args, **kwargs)
        sync(self.device)
        self.seconds += time.perf_counter() - start
        return out

    def close(self):
        self.module.token_logps = self.original


def bench_ours(args, trainer, device) -> tuple[dict, object]:
    """--warmup + --steps GRPO steps; the timed steps' means and peak memory; the last
    step's rollouts (for the ppo part)."""
    timer = NoGradTimer(device)
    rows = []
    try:
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                reset_peak(device)
            sync(device)
            start = time.perf_counter()
            rollouts, _ = trainer.collect(step)
            sync(device)
            collected = time.perf_counter()
            timer.seconds = 0.0
            trainer.optimize(rollouts)
            sync(device)
            end = time.perf_counter()
            new_tokens = int(rollouts.completion_lengths_B.sum())
            rows.append({"step_s": end - start, "generate_s": rollouts.generate_s,
                         "new_tokens": new_tokens, "reference_logp_s": timer.seconds,
                         "update_s": end - collected - timer.seconds,
                         "reward_mean": float(rollouts.rewards_B.mean())})
            print(f"ours step {step}: {rows[-1]}", flush=True)
    finally:
        timer.close()
    timed = rows[args.warmup:]
    out = _means(timed)
    out["rollout_tokens_per_s"] = (sum(r["new_tokens"] for r in timed)
                                   / sum(r["generate_s"] for r in timed))
    out["peak_gib"] = peak_gib(device) if device.type == "cuda" else None
    out["steps"] = rows
    return out, rollouts


def _means(rows: list[dict]) -> dict:
    keys = ("step_s", "generate_s", "reference_logp_s", "update_s")
    return {k: sum(r[k] for r in rows) / len(rows) for k in keys if all(k in r for r in rows)}


def bench_ppo(args, cfg, device, pg, trainer, rollouts) -> dict:
    """Peak memory of one GRPO update on `rollouts`, then of the same update with a PPO critic
    (module docstring)."""
    out = {"method": "measured: torch.cuda.max_memory_allocated over one update (after the "
                     "speed steps: AdamW states exist), GRPO alone, then with the critic added"}
    free_memory(device)
    reset_peak(device)
    trainer.optimize(rollouts)
    sync(device)
    out["grpo_update_peak_gib"] = peak_gib(device) if device.type == "cuda" else None
    layout = {"policy": model_bytes(trainer.policy, trainer.optimizer)}
    if trainer.reference is not None:
        layout["reference"] = model_bytes(trainer.reference)
    out["grpo_state_gib"] = _total(layout)

    critic = build_ours(cfg, device, args.seed + 1, pg)
    head = torch.nn.Linear(cfg.hidden_size, 1, dtype=cfg.torch_dtype, device=device)
    critic_opt = adamw(list(critic.parameters()) + list(head.parameters()), args, device)
    hidden = {}
    hook = critic.decoder.final_layernorm.register_forward_hook(
        lambda module, inputs, output: hidden.__setitem__("h", output))
    free_memory(device)
    reset_peak(device)
    trainer.optimize(rollouts)  # the policy's part of the step, as in GRPO
    ids = rollouts.input_ids_BS.to(device)
    critic(ids, None, None, labels=rollouts.labels_BS.to(device))  # final hidden [s, b, d]
    values_BS = head(hidden.pop("h")).squeeze(-1).transpose(0, 1).float()
    returns_B1 = rollouts.rewards_B.to(device).unsqueeze(1)
    mask_BS = rollouts.mask_BS.to(device)
    ((values_BS - returns_B1) ** 2 * mask_BS).sum().div(mask_BS.sum()).backward()
    critic_opt.step()
    sync(device)
    hook.remove()
    out["ppo_update_peak_gib"] = peak_gib(device) if device.type == "cuda" else None
    critic_bytes = model_bytes(critic, critic_opt)
    head_bytes = model_bytes(head, critic_opt)
    layout["critic"] = {k: critic_bytes[k] + head_bytes[k] for k in critic_bytes}
    out["ppo_state_gib"] = _total(layout)
    out["layout_gib"] = layout
    if out["grpo_update_peak_gib"] is not None:
        out["peak_saving_gib"] = out["ppo_update_peak_gib"] - out["grpo_update_peak_gib"]
        out["peak_saving_fraction"] = out["peak_saving_gib"] / out["ppo_update_peak_gib"]
    out["state_saving_fraction"] = 1 - out["grpo_state_gib"] / out["ppo_state_gib"]
    return out


# ----------------------------------------------------------------------------------------------
# TRL
# ----------------------------------------------------------------------------------------------
class TRLTimers:
    """TRL's profiling contexts (`profiling/Time taken: GRPOTrainer.<name>`, which it sends only
    to W&B / MLflow / Trackio) recorded here as (global step, name, seconds), the device
    synchronised at both ends."""

    def __init__(self, device):
        from trl.extras import profiling

        self.cls, self.device, self.records = profiling.ProfilingContext, device, []
        self.saved = self.cls.__enter__, self.cls.__exit__
        timers, original_enter, original_exit = self, *self.saved

        def enter(context):
            sync(timers.device)
            return original_enter(context)

        def exit_(context, *exc):
            sync(timers.device)
            timers.records.append((context.step, context.name.split(".", 1)[-1],
                                   time.perf_counter() - context._start_time))
            return original_exit(context, *exc)

        self.cls.__enter__, self.cls.__exit__ = enter, exit_

    def seconds(self, step: int, name: str) -> float:
        return sum(s for k, n, s in self.records if k == step and n == name)

    def close(self):
        self.cls.__enter__, self.cls.__exit__ = self.saved


def trl_tokenizer(path: Path):
    from transformers import PreTrainedTokenizerFast

    from megatron_dsv3.data import EOS_TOKEN

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token=EOS_TOKEN,
                                        pad_token=EOS_TOKEN)
    tokenizer.padding_side = "left"
    return tokenizer


def bench_trl(args, cfg, device, pg, tokenizer_path: Path) -> dict:
    """trl.GRPOTrainer on DeepseekV3ForCausalLM with our initial weights (module docstring)."""
    import transformers
    import trl
    import trl.trainer.grpo_trainer as grpo_module
    from datasets import Dataset

    from benchmarks.bench_decode import build_hf

    ours = build_ours(cfg, device, args.seed, pg)
    state = {k: v.detach() for k, v in ours.state_dict().items() if isinstance(v, torch.Tensor)}
    hf, info = build_hf(SimpleNamespace(hf_attention="sdpa", hf_experts=args.hf_experts), cfg, state,
                        device)
    del ours, state
    free_memory(device)
    task = make_task(args)
    problems = [p for step in range(args.warmup + args.steps)
                for p in task.problems(step, 0, args.prompts)]
    dataset = Dataset.from_list([{"prompt": p.prompt, "answer": p.answer} for p in problems])
    steps, timers = [], TRLTimers(device)

    class StepTimes(transformers.TrainerCallback):
        def on_step_begin(self, a, state, c, **k):
            if state.global_step == args.warmup:
                reset_peak(device)
            sync(device)
            self.start = time.perf_counter()

        def on_step_end(self, a, state, c, **k):
            sync(device)
            steps.append(time.perf_counter() - self.start)
            print(f"trl step {len(steps) - 1} done in {steps[-1]:.3f} s", flush=True)

    on_gpu = device.type == "cuda"
    config = trl.GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_grpo_trl_"),
        per_device_train_batch_size=args.prompts * args.group_size,
        gradient_accumulation_steps=1, num_generations=args.group_size,
        max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0,
        generation_kwargs={"min_new_tokens": args.max_new_tokens},
        max_steps=args.warmup + args.steps, learning_rate=args.lr,
        lr_scheduler_type="constant", optim="adamw_torch_fused" if on_gpu else "adamw_torch",
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.0,
        max_grad_norm=1.0, beta=args.beta, loss_type="bnpo", epsilon=0.2,
        bf16=on_gpu and cfg.torch_dtype == torch.bfloat16, use_cpu=not on_gpu,
        shuffle_dataset=False, seed=args.seed, report_to=[], logging_steps=1,
        gradient_checkpointing=args.trl_gradient_checkpointing, save_strategy="no",
        disable_tqdm=True, log_completions=False)
    # TRL builds its reference with create_model_from_path(the policy's path): the same weights
    # as a copy in memory instead of a save_pretrained + load round trip
    original_create = grpo_module.create_model_from_path
    grpo_module.create_model_from_path = lambda *a, **k: copy.deepcopy(hf)
    try:
        trainer = trl.GRPOTrainer(
            model=hf, reward_funcs=trl_reward, args=config, train_dataset=dataset,
            processing_class=trl_tokenizer(tokenizer_path), callbacks=[StepTimes()])
    finally:
        grpo_module.create_model_from_path = original_create
    try:
        trainer.train()
    finally:
        timers.close()
    logs = [entry for entry in trainer.state.log_history if "completions/mean_length" in entry]
    rows = []
    for step, step_s in enumerate(steps):
        prepare_s = timers.seconds(step, "_prepare_inputs")
        generate_s = timers.seconds(step, "transformers.generate")
        new_tokens = round(logs[step]["completions/mean_length"]
                           * args.prompts * args.group_size)
        rows.append({"step_s": step_s, "generate_s": generate_s, "new_tokens": new_tokens,
                     "prepare_inputs_s": prepare_s, "update_s": step_s - prepare_s,
                     "reward_mean": logs[step].get("reward")})
        print(f"trl step {step}: {rows[-1]}", flush=True)
    timed = rows[args.warmup:]
    out = _means(timed)
    out["prepare_inputs_s"] = sum(r["prepare_inputs_s"] for r in timed) / len(timed)
    out["rollout_tokens_per_s"] = (sum(r["new_tokens"] for r in timed)
                                   / sum(r["generate_s"] for r in timed))
    out["peak_gib"] = peak_gib(device) if on_gpu else None
    out["steps"] = rows
    out["trl"], out["hf"] = trl.__version__, info
    out["gradient_checkpointing"] = args.trl_gradient_checkpointing
    out["modules_from"] = {name: getattr(sys.modules.get(name), "__file__", None)
                           for name in ("datasets", "pandas", "pyarrow", "accelerate")}
    out["policy_state_gib"] = model_bytes(trainer.model, trainer.optimizer)
    return out


def trl_reward(prompts, completions, answer, **unused):
    from megatron_dsv3.rl.rewards import Problem

    return bench_reward(completions, [Problem(p, a) for p, a in zip(prompts, answer,
                                                                   strict=True)])


# ----------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    from megatron_dsv3.config import preset
    from megatron_dsv3.data import Tokenizer
    from megatron_dsv3.parallel import init_distributed

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default=",".join(PARTS), help="which of ours, ppo, trl to run "
                   "(ppo needs ours)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--num-layers", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--problem-style", default="equation", choices=["equation", "word"])
    p.add_argument("--max-operand", type=int, default=9)
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="completions per forward / backward of ours (default: prompts x G, "
                        "one forward per update as TRL's per-device batch)")
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hf-experts", default=None,
                   help="transformers' experts_implementation for TRL's model (default: "
                        "grouped_mm on GPU, eager on CPU)")
    p.add_argument("--trl-gradient-checkpointing", action="store_true",
                   help="TRL's GRPOConfig default (recompute activations in the backward); "
                        "off by default: ours keeps its activations")
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args(argv)
    parts = [x for x in args.parts.split(",") if x]
    if set(parts) - set(PARTS):
        p.error(f"--parts {args.parts}: choose from {','.join(PARTS)}")
    if "ppo" in parts and "ours" not in parts:
        p.error("--parts ppo measures our trainer's update: run it with ours (ours,ppo)")
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be >= 1")
    args.micro_batch_size = args.micro_batch_size or args.prompts * args.group_size
    device = torch.device(prepare_rank_device(args.device))
    cfg = preset(args.preset).replace(linear_backend="local", params_dtype=args.dtype)
    if args.num_layers is not None:
        cfg = cfg.replace(num_layers=args.num_layers)
    pg = init_distributed(tensor_parallel_size=1)
    results = {**result_header(device), "bench": "grpo", "preset": cfg.name,
               "dtype": args.dtype, "prompts": args.prompts, "group_size": args.group_size,
               "max_new_tokens": args.max_new_tokens, "problem_style": args.problem_style,
               "beta": args.beta, "lr": args.lr, "micro_batch_size": args.micro_batch_size,
               "warmup": args.warmup, "steps": args.steps, "random_weights": True,
               "skipped": [], "complete": False}

    def save():
        if args.json_out:
            write_json(args.json_out, results)

    def attempt(name, fn, *fn_args):
        """fn's result under results[name]; an out-of-memory or other error recorded instead."""
        try:
            results[name] = fn(*fn_args)
            return results[name]
        except Exception as e:  # noqa: BLE001 (recorded, the other parts still run)
            traceback.print_exc()
            results["skipped"].append(f"{name}: {type(e).__name__}: "
                                      f"{str(e).splitlines()[0][:300] if str(e) else ''}")
            return None
        finally:
            save()

    from megatron_dsv3.rl.rewards import write_character_tokenizer

    with tempfile.TemporaryDirectory() as folder:
        tokenizer_path = write_character_tokenizer(folder)
        results["prompt_len"] = len(Tokenizer.load(tokenizer_path).encode(
            make_task(args).problem(0, 0).prompt))
        if "ours" in parts:
            trainer = make_ours(args, cfg, device, pg, Tokenizer.load(tokenizer_path))
            last = {}

            def ours():
                out, last["rollouts"] = bench_ours(args, trainer, device)
                return out

            if attempt("ours", ours) is not None and "ppo" in parts:
                attempt("ppo", bench_ppo, args, cfg, device, pg, trainer, last["rollouts"])
            del trainer
            free_memory(device)
        if "trl" in parts:
            attempt("trl", bench_trl, args, cfg, device, pg, tokenizer_path)
    ours, trl = results.get("ours"), results.get("trl")
    if ours and trl:
        results["ours_speedup"] = {  # > 1: ours faster
            "rollout_tokens_per_s": ours["rollout_tokens_per_s"] / trl["rollout_tokens_per_s"],
            "step_s": trl["step_s"] / ours["step_s"],
            "update_s": trl["update_s"] / ours["update_s"]}
    results["complete"] = not results["skipped"]
    emit_json(results, args.json_out)
    return results


if __name__ == "__main__":
    main()
