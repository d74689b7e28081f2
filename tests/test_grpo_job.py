"""`python -m megatron_dsv3.rl` end to end on the small model (each run in a fresh gloo
process: the job initialises and shuts down torch.distributed itself): metrics.jsonl and W&B
hold the step metrics, a checkpoint reads back through read_dsv3_checkpoint, a resumed run
repeats an uninterrupted one bit for bit, NaN weights are not saved."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.gloo import run_gloo
from helpers.small_model import small_config
from helpers.tolerance import assert_equal

pytestmark = pytest.mark.multiprocess

METRICS = ("reward_mean", "reward_std", "kl", "clip_fraction", "response_length",
           "tokens_per_s", "rollout_tokens_per_s")


def _write_start(folder):
    """A converted-style start file of the small model (vocab 320) and a character-level
    tokenizer.json (256 bytes + end-of-text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from megatron_dsv3.checkpoint.state_file import write_state_file
    from megatron_dsv3.config import to_megatron_config
    from megatron_dsv3.model import build_model

    cfg = small_config(vocab_size=320, max_seq_len=24)
    torch.manual_seed(0)
    model = build_model(cfg, megatron_config=to_megatron_config(cfg,
                                                                use_cpu_initialization=True))
    write_state_file(model.state_dict(), cfg, folder / "start.pt", "test")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(["0123456789+-=\n"], trainer=trainers.BpeTrainer(
        vocab_size=257, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.save(str(folder / "tokenizer.json"))


def _main(rank, world, argv):
    from megatron_dsv3.rl.cli import main

    summary = main([str(a) for a in argv])
    return summary["records"]


def distinct_characters_reward():
    """A plug-in reward (--reward test_grpo_job:distinct_characters_reward) that varies among
    an untrained model's completions, which all score 0 on arithmetic."""
    return lambda completions, problems: [float(len(set(text))) for text in completions]


def _argv(folder, out, steps, *extra):
    return ["--init-from", folder / "start.pt", "--tokenizer", folder / "tokenizer.json",
            "--out-dir", out, "--steps", steps, "--prompts-per-step", 2, "--group-size", 4,
            "--max-new-tokens", 3, "--num-iterations", 2, "--lr", 1e-2, "--save-interval", 1,
            "--device", "cpu", "--reward", "test_grpo_job:distinct_characters_reward", *extra]


@pytest.fixture(scope="module")
def start(tmp_path_factory, dist_single):
    folder = tmp_path_factory.mktemp("grpo_start")
    _write_start(folder)
    return folder


def _final_weights(out, step):
    from megatron_dsv3.checkpoint.convert import read_dsv3_checkpoint

    state, config = read_dsv3_checkpoint(out / "checkpoints" / f"step_{step}")
    return state, config


def test_run_logs_metrics_and_resumes_bit_for_bit(start, tmp_path):
    from megatron_dsv3.train.metrics_log import wandb_history

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    records = run_gloo(_main, 1, _argv(start, straight, 2))[0]
    assert [r["step"] for r in records] == [1, 2]
    logged = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert logged == records
    for name in METRICS:
        assert all(isinstance(r[name], float) for r in records), name
    (wandb_file,) = straight.glob("wandb/offline-run-*/run-*.wandb")
    history = wandb_history(wandb_file)
    assert [row["_step"] for row in history] == [1, 2]
    assert history[1]["reward_mean"] == records[1]["reward_mean"]
    assert history[1]["kl"] == records[1]["kl"]

    run_gloo(_main, 1, _argv(start, resumed, 1, "--no-wandb"))
    again = run_gloo(_main, 1, _argv(start, resumed, 2, "--no-wandb", "--resume", "auto"))[0]
    assert [r["step"] for r in again] == [2]
    for key in ("reward_mean", "kl", "clip_fraction", "response_length"):
        assert again[0][key] == records[1][key], key
    a, config = _final_weights(straight, 2)
    b, _ = _final_weights(resumed, 2)
    assert config["vocab_size"] == 320
    for name in a:  # CPU, same ops: the resumed run repeats the uninterrupted one
        assert_equal(b[name], a[name], name)
    initial = torch.load(start / "start.pt", weights_only=False)["model"]
    assert any(not torch.equal(a[n], initial[n]) for n in a), "GRPO changed no weight"


def _save_nan(rank, world, out):
    import argparse

    from megatron_dsv3.rl import state
    from megatron_dsv3.train.args import TrainError

    cfg = small_config()
    weights = {"w": torch.tensor([1.0, float("nan")])}
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    args = argparse.Namespace(tensor_parallel_size=1, init_from="x")
    try:
        state.save(out, 3, policy_state=weights, optimizer=optimizer, cfg=cfg, args=args,
                   tokens_seen=0, wandb_id=None)
    except TrainError as err:
        return str(err)
    return None


def test_nan_policy_is_not_saved(tmp_path):
    message = run_gloo(_save_nan, 1, tmp_path)[0]
    assert message is not None and "model.w" in message and "NaN" in message
    assert not (tmp_path / "checkpoints" / "latest").exists()


def _models_after_setup(rank, world, argv):
    """How many DeepSeekV3Models exist after the job's set-up, and its reference."""
    import gc

    from megatron_dsv3.model import DeepSeekV3Model
    from megatron_dsv3.rl.cli import build_parser
    from megatron_dsv3.rl.job import setup

    job = setup(build_parser().parse_args([str(a) for a in argv]))
    gc.collect()
    alive = sum(isinstance(o, DeepSeekV3Model) for o in gc.get_objects())
    return alive, job.trainer.reference is None


@pytest.mark.parametrize("beta,models", [(0.0, 1), (0.04, 2)])
def test_beta_zero_builds_no_reference_model(start, tmp_path, beta, models):
    alive, no_reference = run_gloo(_models_after_setup, 1,
                                   _argv(start, tmp_path, 1, "--beta", beta))[0]
    assert (alive, no_reference) == (models, beta == 0)
