#!/usr/bin/env python3
"""Speculative decoding with the MTP layer on a trained model (issue 13: at least 1.5x tokens/s
where acceptance is at least 80%), greedy decoding beside it, at batch 1.

  python benchmarks/bench_decode_trained.py          # proxy, one H200: <= 140 s of training,
                                                     # then 8 held-out prompts (~4.5 min)
  python benchmarks/bench_decode_trained.py --device cpu --preset tiny --train-steps 150 \
      --micro-batch-size 16 --grad-accum 2 --lr 3e-3 --min-lr 3e-4 --warmup-steps 30 \
      --prompt-len 48 --new-tokens 64 --prompts 4    # logic check on the CPU (~3 min)

Random weights draft noise (bench_decode.py: acceptance ~0%), so the model is trained first,
in this process, by the training job itself (`megatron_dsv3.train`'s `parse_args`, `setup`
and `train_step`: the bundled corpus, its MTP loss, bf16 parameters with fp32 masters and
compiled modules on a GPU), for `--train-steps` optimizer steps or until `--train-budget-s`
seconds of steps (compilation included) or `--train-until-s` seconds since the process began,
whichever comes first; no checkpoint is written (a proxy checkpoint with AdamW's state is
~60 GB). The job's own `evaluate` then gives the held-out next-token CE and the MTP layer's
CE (of the token after the next): that the MTP head learned something is read there.

The trained weights (`Run.model_state_dict`) are loaded into a model built for inference
(`--dtype`, eval mode, not compiled: the training modules are compiled as CUDA graphs for
training shapes; built on the device itself: on the CPU its throw-away initial draw of
proxy's 4.9 B weights is serial, most likely what took the H200 runs of 12-03 past their
timeout), the run is dropped with dynamo's caches and CUDA-graph trees
(`torch._dynamo.reset`), and every decode runs under `torch.compiler.set_stance("force_eager")`
(JSON `decode_stance`: greedy and speculative alike). On `--prompts` held-out prompts
(`--prompt-len` tokens each, evenly spaced over the job's validation split, the corpus' tail)
each decodes `--new-tokens` tokens at batch 1, no stop token:
  greedy       `generate(temperature=0, attention="absorbed")`
  speculative  `generate_speculative` (the MTP layer drafts, the main model verifies)
each timed from its first token (a stamp where the prefill ends: greedy's first
`decode_step`, speculative's first `choose_drafts`) to its last: tokens/s over the tokens
after the first. Per prompt: both rates, the acceptance, tokens per main forward, and whether
the speculative tokens equal greedy's (bf16 on a GPU can flip a near-tie: the first differing
index is recorded). The summary sums over the prompts done (rewritten after each);
`speedup` = speculative / greedy tokens/s. `ours-absorbed-loop` is bench_decode.py's bare
decode loop (no host copy per step) on the first prompt, the rate the other parts of
decode_gpu.sh report. The first prompt is decoded once untimed by each first (the allocator,
the libraries' first calls). A prompt that would end after `--decode-until-s` (250 s since the
process began; decode_gpu.sh's timeout is 270 s) is not started, and listed under "skipped".

Prints the table and one JSON line; `--json-out` is rewritten after training, once the
inference model is ready (`inference_setup`: build, load and free seconds) and after every
case ("complete": false until the end), so a run cut short keeps what it finished. Time
stamps on stderr ("[  s] ...", seconds since the process began) mark the phases after
training: model built, weights loaded, run freed, each warm-up, each prompt's greedy and
speculative start and end.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # --train-until-s counts from here (imports included)

import argparse  # noqa: E402
import gc  # noqa: E402
import importlib  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import (emit_json, empty_cache, peak_gib,  # noqa: E402
                               resolve_device, result_header, sync, write_json)


# ----------------------------------------------------------------------------------------------
# Training, through the job's own API
# ----------------------------------------------------------------------------------------------
def job_argv(args, out_dir: Path) -> list[str]:
    """The training job's command line for this run (no checkpoints, no periodic evaluation,
    no W&B)."""
    argv = ["--preset", args.preset, "--device", args.device, "--steps", str(args.train_steps),
            "--lr", str(args.lr), "--min-lr", str(args.min_lr), "--warmup-steps",
            str(args.warmup_steps), "--micro-batch-size", str(args.micro_batch_size),
            "--grad-accum", str(args.grad_accum), "--eval-batches", str(args.eval_batches),
            "--seed", str(args.seed), "--save-interval", "0", "--eval-interval", "0",
            "--no-wandb", "--out-dir", str(out_dir)]
    if args.seq_len:
        argv += ["--seq-len", str(args.seq_len)]
    return argv + shlex.split(args.job_args)


def train(args, results: dict, save) -> object:
    """The job's set-up, then `train_step` until the steps, the budget or the deadline; the
    job's `evaluate` at the end. Returns the Run (its model trained)."""
    from megatron_dsv3.train.args import TrainError, parse_args
    from megatron_dsv3.train.job import setup
    from megatron_dsv3.train.step import evaluate, train_step

    argv = job_argv(args, Path(tempfile.mkdtemp(prefix="bench_decode_trained_")))
    job_args, cfg = parse_args(argv)
    setup_start = time.perf_counter()
    run, _ = setup(job_args, cfg)
    training = {"argv": argv, "setup_s": round(time.perf_counter() - setup_start, 2),
                "tokens_per_step": run.tokens_per_step, "steps": 0, "stopped_by": None,
                "loss": [], "lm_loss": [], "mtp_ce": [], "step_s": []}
    results["training"] = training
    start = time.perf_counter()
    deadline = min(start + args.train_budget_s, STARTED + args.train_until_s)
    while True:
        if run.step >= job_args.steps:
            training["stopped_by"] = "steps"
            break
        if run.step > 0 and time.perf_counter() >= deadline:
            training["stopped_by"] = ("--train-budget-s" if start + args.train_budget_s
                                      <= STARTED + args.train_until_s else "--train-until-s")
            break
        step_start = time.perf_counter()
        try:
            metrics = train_step(run)[0]
        except TrainError as err:  # a non-finite step: nothing of it applied
            training["stopped_by"] = f"error: {err}"[:500]
            print(f"training stopped: {err}", file=sys.stderr)
            break
        training["step_s"].append(round(time.perf_counter() - step_start, 4))
        training["steps"] = run.step
        for key, name in (("loss", "loss"), ("lm_loss", "lm_loss"), ("mtp_ce", "mtp_ce")):
            if name in metrics:
                training[key].append(round(metrics[name], 4))
        if run.step % 10 == 0 or run.step == 1:
            print(f"train step {run.step}: loss {metrics['loss']:.4f} "
                  f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    sync(run.device)
    training["train_s"] = round(time.perf_counter() - start, 2)
    steady = training["step_s"][2:]  # the first steps compile and record CUDA graphs
    if steady:
        training["tok_per_s"] = round(run.tokens_per_step * len(steady) / sum(steady), 1)
    training["peak_gib"] = round(peak_gib(run.device), 2)
    eval_start = time.perf_counter()
    training.update({k: round(v, 4) for k, v in evaluate(run).items()})
    training["eval_s"] = round(time.perf_counter() - eval_start, 2)
    save()
    return run


def phase(message: str) -> None:
    """A time stamp on stderr (seconds since the process began): a run cut short shows where
    its time went."""
    print(f"[{time.perf_counter() - STARTED:6.1f} s] {message}", file=sys.stderr, flush=True)


def inference_model(run, dtype: str, results: dict):
    """The run's trained weights (its fp32 masters, or fp32 parameters) in a model built for
    decoding: `dtype` parameters, eval mode, not compiled. Built on the run's device: our
    modules draw their initial weights whatever `perform_initialization` says, and on the CPU
    that draw is serial (80-160 M values/s measured: 30-60 s or more for proxy's 4.9 B, in
    silence after Megatron's "GPTModel IS DEPRECATED", where both H200 runs of 12-03 stopped
    printing); on a GPU it takes milliseconds, and the weights are overwritten anyway."""
    from megatron_dsv3.checkpoint.hf import load_dsv3_state_dict
    from megatron_dsv3.config import to_megatron_config
    from megatron_dsv3.model import build_model

    cfg = run.cfg.replace(params_dtype=dtype)
    start = time.perf_counter()
    phase("inference model: building")
    model = build_model(cfg, pg_collection=run.pg, megatron_config=to_megatron_config(
        cfg, use_cpu_initialization=run.device.type != "cuda",
        perform_initialization=False)).to(run.device)
    sync(run.device)
    built = time.perf_counter()
    phase(f"inference model: built in {built - start:.1f} s")
    state = {k: v for k, v in run.model_state_dict().items() if isinstance(v, torch.Tensor)}
    load_dsv3_state_dict(model, state)
    sync(run.device)
    loaded = time.perf_counter()
    phase(f"inference model: trained weights loaded in {loaded - built:.1f} s")
    results["inference_setup"] = {"build_s": round(built - start, 2),
                                  "load_s": round(loaded - built, 2)}
    return cfg, model.eval()


def free_training(device: torch.device, results: dict) -> None:
    """After the Run's last reference is dropped: its optimizer state, masters and model go,
    and with dynamo's caches its compiled modules and CUDA-graph trees (as in a fresh
    process)."""
    start = time.perf_counter()
    gc.collect()
    torch._dynamo.reset()
    gc.collect()
    empty_cache(device)
    held = (f", {torch.cuda.memory_allocated(device) / 2**30:.2f} GiB still allocated"
            if device.type == "cuda" else "")
    results["inference_setup"]["free_s"] = round(time.perf_counter() - start, 2)
    phase(f"training run freed in {time.perf_counter() - start:.1f} s{held}")


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------
def held_out_prompts(val: torch.Tensor, count: int, length: int) -> list[tuple[int, list[int]]]:
    """`count` prompts of `length` tokens at evenly spaced starts of the validation split:
    (start, ids)."""
    if val.numel() < length + 1:
        raise SystemExit(f"--prompt-len {length}: the validation split holds {val.numel()} "
                         "tokens; lower it")
    last = val.numel() - length
    starts = [round(i * last / max(1, count - 1)) for i in range(count)] if count > 1 else [0]
    return [(s, val[s:s + length].tolist()) for s in starts]


class _FirstStamp:
    """Wraps a function of the decoding loop: the time of its first call (after a device
    sync when `synchronise`: the loop has not waited for the GPU there yet), then plain."""

    def __init__(self, fn, device: torch.device, synchronise: bool):
        self.fn, self.device, self.synchronise, self.time = fn, device, synchronise, None

    def __call__(self, *args, **kwargs):
        if self.time is None and not self.synchronise:
            self.time = time.perf_counter()  # greedy's decode_step: its .cpu() just waited
        out = self.fn(*args, **kwargs)
        if self.time is None:
            sync(self.device)
            self.time = time.perf_counter()
        return out


def timed_greedy(model, prompt: list[int], new_tokens: int, device: torch.device):
    """generate(greedy, absorbed) -> (tokens, decode seconds after the first token)."""
    from megatron_dsv3.inference import generate

    module = importlib.import_module("megatron_dsv3.inference.generate")
    original = module.decode_step
    stamp = _FirstStamp(original, device, synchronise=False)
    module.decode_step = stamp
    try:
        sync(device)
        tokens = generate(model, [prompt], max_new_tokens=new_tokens, attention="absorbed")[0]
        sync(device)
        end = time.perf_counter()
    finally:
        module.decode_step = original
    return tokens, end - stamp.time


def timed_speculative(model, prompt: list[int], new_tokens: int, device: torch.device):
    """generate_speculative -> (tokens, stats, decode seconds after the first token)."""
    from megatron_dsv3.inference import speculative

    original = speculative.choose_drafts
    stamp = _FirstStamp(original, device, synchronise=True)
    speculative.choose_drafts = stamp
    try:
        sync(device)
        (tokens,), stats = speculative.generate_speculative(model, [prompt],
                                                            max_new_tokens=new_tokens)
        sync(device)
        end = time.perf_counter()
    finally:
        speculative.choose_drafts = original
    return tokens, stats, end - stamp.time


def timed_loop(model, prompt: list[int], new_tokens: int, device: torch.device) -> dict:
    """bench_decode.py's bare absorbed decode loop from this prompt's prefill."""
    from benchmarks.bench_decode import decode
    from megatron_dsv3.inference import new_cache, prefill

    cache = new_cache(model, 1, len(prompt) + new_tokens + 1)
    logits_BSV = prefill(model, cache, [torch.tensor(prompt)])
    first_B = logits_BSV[:, -1].float().argmax(dim=-1)
    sync(device)
    start = time.perf_counter()
    decode(model, cache, first_B, new_tokens, "absorbed")
    sync(device)
    seconds = time.perf_counter() - start
    return {"impl": "ours-absorbed-loop", "decode_s": round(seconds, 4),
            "ms_per_step": round(1e3 * seconds / new_tokens, 3),
            "tok_per_s": round(new_tokens / seconds, 1)}


def first_difference(a: list[int], b: list[int]):
    """The first index where two token lists differ (None if equal)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def decode_prompts(args, cfg, model, prompts, device, results: dict, log) -> None:
    """The per-prompt rows and the summary (module docstring). A prompt that would end past
    `--decode-until-s` (judged by the longest so far) is not started: the run ends with its
    table and a complete JSON instead of a timeout."""
    greedy_s = spec_s = longest = 0.0
    greedy_n = spec_n = drafted = accepted = forwards = identical = 0
    for index, (start, prompt) in enumerate(prompts):
        if time.perf_counter() + longest > STARTED + args.decode_until_s:
            results["skipped"].append(f"prompts {index}-{len(prompts) - 1}: not started, "
                                      f"--decode-until-s {args.decode_until_s:g} reached")
            phase(results["skipped"][-1])
            break
        row = {"impl": "greedy+speculative", "prompt": index, "start": start,
               "prompt_len": len(prompt), "new_tokens": args.new_tokens}
        prompt_start = time.perf_counter()
        try:
            phase(f"prompt {index}: greedy")
            greedy, g_s = timed_greedy(model, prompt, args.new_tokens, device)
            phase(f"prompt {index}: speculative")
            spec, stats, s_s = timed_speculative(model, prompt, args.new_tokens, device)
            phase(f"prompt {index}: done")
            longest = max(longest, time.perf_counter() - prompt_start)
        except Exception as e:  # noqa: BLE001 - recorded, the other prompts still run
            traceback.print_exc()
            row["skipped"] = f"error: {type(e).__name__}: {e}"[:500]
            log(row)
            continue
        diff = first_difference(greedy, spec)
        row.update(greedy_tok_per_s=round((len(greedy) - 1) / g_s, 1),
                   speculative_tok_per_s=round((len(spec) - 1) / s_s, 1),
                   speedup=round((len(spec) - 1) / s_s / ((len(greedy) - 1) / g_s), 3),
                   acceptance_rate=round(stats.acceptance_rate, 4), drafted=stats.drafted,
                   accepted=stats.accepted, main_forwards=stats.main_forwards,
                   tokens_per_forward=round(stats.tokens_per_forward, 3),
                   identical=diff is None, first_difference=diff)
        greedy_s, greedy_n = greedy_s + g_s, greedy_n + len(greedy) - 1
        spec_s, spec_n = spec_s + s_s, spec_n + len(spec) - 1
        drafted, accepted = drafted + stats.drafted, accepted + stats.accepted
        forwards, identical = forwards + stats.main_forwards, identical + (diff is None)
        if index == 0 and args.tokenizer is not None:
            row["greedy_text"] = args.tokenizer.decode(greedy)[:400]
        done = sum(1 for r in results["cases"] if "identical" in r) + 1
        greedy_rate, spec_rate = greedy_n / greedy_s, spec_n / spec_s
        acceptance = accepted / drafted if drafted else 0.0
        speedup = spec_rate / greedy_rate
        # over the prompts so far: a run cut short keeps the summary of what it finished
        results["summary"] = {
            "prompts": done, "greedy_tok_per_s": round(greedy_rate, 1),
            "greedy_ms_per_token": round(1e3 / greedy_rate, 3),
            "speculative_tok_per_s": round(spec_rate, 1), "speedup": round(speedup, 3),
            "acceptance_rate": round(acceptance, 4), "drafted": drafted, "accepted": accepted,
            "main_forwards": forwards,
            "ms_per_round": round(1e3 * spec_s / max(1, forwards - done), 3),
            "identical_prompts": identical,
            "target_met": acceptance >= 0.8 and speedup >= 1.5}
        log(row)


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
def print_table(results: dict) -> None:
    out = sys.stderr
    t = results.get("training", {})
    print(f"trained model: {results['preset']}, {t.get('steps')} steps of "
          f"{t.get('tokens_per_step')} tokens in {t.get('train_s')} s (stopped by "
          f"{t.get('stopped_by')}; {t.get('tok_per_s', '-')} tok/s after 2 steps, set-up "
          f"{t.get('setup_s')} s); last loss {(t.get('loss') or ['-'])[-1]}; held out: "
          f"next-token CE {t.get('val_loss', '-')}, MTP CE {t.get('val_mtp_ce', '-')}",
          file=out)
    header = (f"{'impl':<20}{'prompt':>7}{'greedy tok/s':>14}{'spec tok/s':>12}"
              f"{'speedup':>9}{'accept':>8}{'tok/fwd':>9}  identical")
    print(header, file=out)
    print("-" * len(header), file=out)
    for row in results["cases"]:
        if row["impl"] == "ours-absorbed-loop":
            print(f"{row['impl']:<20}{0:>7}{row.get('tok_per_s', '-'):>14}{'-':>12}{'-':>9}"
                  f"{'-':>8}{'-':>9}  {row.get('skipped', '')}", file=out)
            continue
        if "skipped" in row:
            print(f"{row['impl']:<20}{row['prompt']:>7}  {row['skipped']}", file=out)
            continue
        same = "yes" if row["identical"] else f"no (from token {row['first_difference']})"
        print(f"{'greedy/speculative':<20}{row['prompt']:>7}{row['greedy_tok_per_s']:>14}"
              f"{row['speculative_tok_per_s']:>12}{row['speedup']:>9}"
              f"{100 * row['acceptance_rate']:>7.1f}%{row['tokens_per_forward']:>9}  {same}",
              file=out)
    s = results.get("summary")
    if s:
        print(f"{'all prompts':<20}{s['prompts']:>7}{s['greedy_tok_per_s']:>14}"
              f"{s['speculative_tok_per_s']:>12}{s['speedup']:>9}"
              f"{100 * s['acceptance_rate']:>7.1f}%{'':>9}  {s['identical_prompts']} of "
              f"{s['prompts']}; target (>= 80% accepted, >= 1.5x): "
              f"{'met' if s['target_met'] else 'NOT met'}", file=out)
    for skip in results.get("skipped", []):
        print(f"skipped: {skip}", file=out)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--preset", default="proxy")
    add("--device", default="auto", choices=["auto", "cpu", "cuda"])
    add("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
        help="the decoding model's parameters (auto: bfloat16 on a GPU, float32 on the CPU)")
    add("--train-steps", type=int, default=400,
        help="the job's --steps (the cosine's length; training may stop before)")
    add("--train-budget-s", type=float, default=140.0,
        help="seconds of training steps (compilation included) after which training stops")
    add("--train-until-s", type=float, default=170.0,
        help="seconds since the process began after which training stops (a slow set-up "
             "shortens training, not the measurement)")
    add("--decode-until-s", type=float, default=250.0,
        help="seconds since the process began by which the last prompt must end (one not "
             "started is listed under skipped; decode_gpu.sh's timeout is 270 s)")
    add("--lr", type=float, default=6e-4)
    add("--min-lr", type=float, default=6e-5)
    add("--warmup-steps", type=int, default=30)
    add("--micro-batch-size", type=int, default=1)
    add("--grad-accum", type=int, default=4)
    add("--seq-len", type=int, default=None, help="default: the preset's max_seq_len")
    add("--eval-batches", type=int, default=4, help="validation micro-batches after training")
    add("--job-args", default="", help="more flags for the training job")
    add("--prompts", type=int, default=8, help="held-out prompts, each decoded at batch 1")
    add("--prompt-len", type=int, default=256)
    add("--new-tokens", type=int, default=128)
    add("--seed", type=int, default=1234)
    add("--tf32", action="store_true", help="let fp32 matmuls use TF32 (as bench_decode.py)")
    add("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    args.device = resolve_device(args.device)
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # Megatron's jit_fuser on CPU
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    dtype = args.dtype if args.dtype != "auto" else (
        "bfloat16" if device.type == "cuda" else "float32")
    results = {**result_header(device), "bench": "decode-trained", "preset": args.preset,
               "dtype": dtype, "cases": [], "skipped": [], "complete": False}

    def save():
        if args.json_out:
            write_json(args.json_out, results)

    def log(row):
        results["cases"].append(row)
        print(f"case: {row}", file=sys.stderr, flush=True)
        save()

    run = train(args, results, save)
    phase("training done")
    cfg, model = inference_model(run, dtype, results)
    if args.prompt_len + args.new_tokens > cfg.max_seq_len:
        raise SystemExit(f"--prompt-len {args.prompt_len} + --new-tokens {args.new_tokens} "
                         f"exceed the preset's max_seq_len={cfg.max_seq_len}; lower them")
    prompts = held_out_prompts(run.corpus.val, args.prompts, args.prompt_len)
    try:
        from megatron_dsv3.data import TOKENIZER_FILE, Tokenizer

        args.tokenizer = Tokenizer.load(Path(run.args.data_dir) / TOKENIZER_FILE)
    except Exception:  # noqa: BLE001 - the sample text is a nicety
        args.tokenizer = None
    run = None  # the optimizer state, the masters and the compiled training modules
    free_training(device, results)
    results.update(params=sum(p.numel() for p in model.parameters()),
                   max_seq_len=cfg.max_seq_len, decode_stance="force_eager")
    save()

    # Every decode (warm-up, loop, greedy, speculative) eager: nothing on the decode path is
    # compiled (a CPU run with dynamo on compiles no frame there), and none can recompile for
    # a new sequence length or pick up the training's compiled state
    with torch.compiler.set_stance("force_eager"):
        warm = prompts[0][1]  # the allocator, the libraries' first calls
        phase("warm-up: greedy")
        timed_greedy(model, warm, min(8, args.new_tokens), device)
        phase("warm-up: speculative")
        timed_speculative(model, warm, min(8, args.new_tokens), device)
        phase("warm-up: decode loop")
        try:
            log({**timed_loop(model, warm, args.new_tokens, device), "prompt": 0})
        except Exception as e:  # noqa: BLE001 - recorded, the prompts still run
            traceback.print_exc()
            log({"impl": "ours-absorbed-loop", "prompt": 0,
                 "skipped": f"error: {type(e).__name__}: {e}"[:500]})
        decode_prompts(args, cfg, model, prompts, device, results, log)
    phase("decoding done")
    results["peak_gib"] = round(peak_gib(device), 2)
    results["complete"] = True
    print_table(results)
    emit_json(results, args.json_out)
    return results


if __name__ == "__main__":
    main()
