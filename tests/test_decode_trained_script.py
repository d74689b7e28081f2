"""benchmarks/bench_decode_trained.py (decode_gpu.sh's `trained` part; its numbers are the
GPU's): the training job's command line it builds (no checkpoint, no periodic evaluation, the
flags it is given), the held-out prompts (evenly spaced over the validation split, the first
and last windows included), the first differing token; and, under `-m extended`, the script
end to end on the tiny preset (a few steps, two prompts: ~40 s on 2 cores), whose speculative
tokens must equal greedy's (fp32 on the CPU), decoded eager with its phases stamped."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_decode_trained.py"


def _module():
    spec = importlib.util.spec_from_file_location("bench_decode_trained", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_job_trains_without_checkpoints_with_the_given_flags(tmp_path):
    module = _module()
    args = Namespace(preset="tiny", device="cpu", train_steps=7, lr=1e-3, min_lr=1e-4,
                     warmup_steps=2, micro_batch_size=2, grad_accum=3, eval_batches=1,
                     seed=5, seq_len=64, job_args="--clip-grad 0.5")
    argv = module.job_argv(args, tmp_path)
    from megatron_dsv3.train.args import parse_args

    job_args, cfg = parse_args(argv)
    assert (job_args.steps, job_args.lr, job_args.grad_accum, job_args.seq_len) == (7, 1e-3, 3, 64)
    assert job_args.save_interval == 0 and job_args.eval_interval == 0 and job_args.no_wandb
    assert job_args.clip_grad == 0.5 and job_args.out_dir == tmp_path and cfg.name == "tiny"
    assert "--seq-len" not in module.job_argv(Namespace(**{**vars(args), "seq_len": None}),
                                              tmp_path)


def test_prompts_are_evenly_spaced_over_the_held_out_split():
    module = _module()
    val = torch.arange(100)
    prompts = module.held_out_prompts(val, 3, 10)
    assert [start for start, _ in prompts] == [0, 45, 90]
    assert prompts[-1][1] == list(range(90, 100)) and all(len(ids) == 10 for _, ids in prompts)
    assert module.held_out_prompts(val, 1, 10)[0][0] == 0
    with pytest.raises(SystemExit, match="--prompt-len 100: the validation split holds 100"):
        module.held_out_prompts(val, 2, 100)


def test_first_difference():
    module = _module()
    assert module.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert module.first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert module.first_difference([1, 2], [1, 2, 3]) == 2


@pytest.mark.extended
def test_the_script_trains_then_decodes_greedy_and_speculative_alike(tmp_path):
    out = tmp_path / "trained.json"
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--preset", "tiny", "--train-steps",
         "4", "--micro-batch-size", "2", "--grad-accum", "1", "--seq-len", "64",
         "--warmup-steps", "1", "--eval-batches", "1", "--prompts", "2", "--prompt-len", "16",
         "--new-tokens", "9", "--json-out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["complete"] and result["bench"] == "decode-trained"
    training = result["training"]
    assert training["steps"] == 4 and training["stopped_by"] == "steps"
    assert len(training["loss"]) == 4 and training["val_mtp_ce"] > 0
    rows = [row for row in result["cases"] if row["impl"] == "greedy+speculative"]
    assert [row["prompt"] for row in rows] == [0, 1]
    assert all(row["identical"] and 0 <= row["acceptance_rate"] <= 1 for row in rows), rows
    summary = result["summary"]
    assert summary["identical_prompts"] == 2 and summary["drafted"] >= summary["accepted"]
    assert "target (>= 80% accepted, >= 1.5x)" in done.stderr
    # decoded eager, the phases after training stamped on stderr
    assert result["decode_stance"] == "force_eager" and not result["skipped"]
    assert set(result["inference_setup"]) == {"build_s", "load_s", "free_s"}
    for stamp in ("inference model: built", "inference model: trained weights loaded",
                  "training run freed", "warm-up: greedy", "prompt 1: speculative",
                  "prompt 1: done", "decoding done"):
        assert f" s] {stamp}" in done.stderr, stamp
