"""The training job (`megatron_dsv3.train`) end to end, on CPU with gloo processes.

Every run is the tiny preset shrunk further (sequences of 32 tokens, micro-batches of 4, two
per step, 6 steps) so the file stays well under two minutes on two cores. Runs go through
`run_gloo` (fresh processes): the job initialises and tears down torch.distributed itself, which
must not disturb the pytest process's own world.

Tolerances: a resumed run must repeat the uninterrupted one exactly (same operations in the same
order on the same CPU, every random draw keyed or checkpointed). TP=2 against TP=1 uses
FP32_REORDER: the same fp32 math with row-parallel GEMM reductions and the vocab-parallel
log-sum-exp split over two ranks (the weights themselves are identical: both runs draw the full
TP=1 model).
"""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers.gloo import run_gloo
from helpers.tolerance import FP32_REORDER, assert_close, assert_equal

pytestmark = pytest.mark.multiprocess

STEPS, SAVE_AT = 6, 3
SMALL = ["--steps", str(STEPS), "--seq-len", "32", "--micro-batch-size", "4", "--grad-accum",
         "2", "--warmup-steps", "2", "--lr", "3e-3", "--eval-batches", "2"]


def _main(rank, world, argv):
    from megatron_dsv3.train import main

    return main(argv)


def _records(out_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def _load(out_dir, step, rank=0) -> dict:
    return torch.load(Path(out_dir) / "checkpoints" / f"step_{step}" / f"rank_{rank:05d}.pt",
                      weights_only=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """6 uninterrupted steps, checkpoints at 3 and 6, validation at 3 and 6, W&B offline."""
    out = tmp_path_factory.mktemp("reference")
    summary = run_gloo(_main, 1, SMALL + ["--out-dir", str(out), "--save-interval", str(SAVE_AT),
                                          "--eval-interval", str(SAVE_AT)])[0]
    return out, summary


# ----------------------------------------------------------------------------------------------
# (a) a short run learns and leaves its outputs
# ----------------------------------------------------------------------------------------------
def test_short_run_loss_falls_and_every_output_is_written(reference):
    out, summary = reference
    losses = summary["losses"]
    assert len(losses) == STEPS
    # ln(2048) = 7.6 next-token + 0.3 * 7.6 MTP at init; 6 steps of lr 3e-3 learn the unigram
    # statistics and take about 1.1 off (measured); 0.5 leaves room for other CPUs' BLAS.
    assert losses[-1] < losses[0] - 0.5, losses
    records = _records(out)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    first = records[0]
    for key in ("loss", "lm_loss", "mtp_loss", "mtp_ce", "mtp_lambda", "balance_loss", "lr",
                "grad_norm", "tokens_per_s", "tokens_seen", "moe/L1/imbalance",
                "moe/L1/bias_spread", "moe/mtp0/imbalance"):
        assert key in first, key
    assert first["mtp_lambda"] == 0.3 and first["tokens_seen"] == 4 * 32 * 2
    assert first["loss"] == pytest.approx(first["lm_loss"] + first["mtp_loss"]
                                          + first["balance_loss"], rel=1e-6)
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(val) == 2 and val[1] < val[0], val
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS}"
    for name in ("loss_curve.png", "expert_load.png", "expert_load.json"):
        assert (out / name).stat().st_size > 0, name
    wandb_dir = Path(summary["wandb_dir"])
    assert wandb_dir.parent == out / "wandb" and list(wandb_dir.glob("run-*.wandb"))


# ----------------------------------------------------------------------------------------------
# (b) resume
# ----------------------------------------------------------------------------------------------
def test_resume_at_step_k_repeats_the_uninterrupted_run_bit_for_bit(reference, tmp_path):
    out, summary = reference
    resumed = run_gloo(_main, 1, SMALL + [
        "--out-dir", str(tmp_path), "--resume", str(out / "checkpoints" / f"step_{SAVE_AT}"),
        "--save-interval", str(SAVE_AT), "--eval-interval", str(SAVE_AT), "--no-wandb"])[0]
    assert resumed["steps"] == list(range(SAVE_AT + 1, STEPS + 1))
    assert resumed["losses"] == summary["losses"][SAVE_AT:]
    assert resumed["grad_norms"] == summary["grad_norms"][SAVE_AT:]
    assert resumed["val_loss"] == summary["val_loss"]
    # The history before the resume is carried over, so the plots cover the whole run.
    assert [r["step"] for r in _records(tmp_path)] == list(range(1, STEPS + 1))

    expected, actual = _load(out, STEPS), _load(tmp_path, STEPS)
    assert actual["tokens_seen"] == expected["tokens_seen"]
    biases = [k for k in expected["model"] if k.endswith("expert_bias")]
    assert len(biases) == 3 and any(expected["model"][k].abs().sum() > 0 for k in biases)
    for name, tensor in expected["model"].items():
        if isinstance(tensor, torch.Tensor):
            assert_equal(actual["model"][name], tensor, name)
    for index, state in expected["optimizer"]["state"].items():
        for key, tensor in state.items():
            assert_equal(actual["optimizer"]["state"][index][key], tensor, f"adam {index}.{key}")


def test_resume_refuses_another_model_config_or_parallel_layout(reference):
    from megatron_dsv3.config import tiny
    from megatron_dsv3.train.args import build_parser
    from megatron_dsv3.train.checkpoint import check_resumable

    out, _ = reference
    saved = _load(out, SAVE_AT)
    args = build_parser().parse_args(SMALL + ["--tensor-parallel-size", "2", "--seed", "7"])
    args.seq_len = 32
    other = SimpleNamespace(cfg=tiny().replace(moe__top_k=3), args=args)
    with pytest.raises(ValueError) as err:
        check_resumable(saved, other, out)
    message = str(err.value)
    for expected in ("'moe'", "top_k", "--tensor-parallel-size", "--seed", "start a new"):
        assert expected in message, message


def test_interrupted_save_leaves_latest_on_the_previous_checkpoint(tmp_path, monkeypatch):
    from megatron_dsv3.train import checkpoint

    checkpoint.save_checkpoint(tmp_path, 1, {"step": 1, "tokens_seen": 0, "model_config": {},
                                             "train_args": {}, "world_size": 1})

    def crash(obj, path):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", crash)
    with pytest.raises(OSError):
        checkpoint.save_checkpoint(tmp_path, 2, {"step": 2})
    assert (tmp_path / "latest").read_text().strip() == "step_1"
    assert not (tmp_path / "step_2").exists()
    assert checkpoint.find_checkpoint(str(tmp_path), None) == tmp_path / "step_1"


# ----------------------------------------------------------------------------------------------
# (c) parallel runs
# ----------------------------------------------------------------------------------------------
def test_tp2_first_step_loss_and_grad_norm_match_tp1(reference, tmp_path):
    _, single = reference
    tp2 = run_gloo(_main, 2, SMALL + ["--steps", "2", "--tensor-parallel-size", "2",
                                      "--out-dir", str(tmp_path), "--save-interval", "0",
                                      "--eval-interval", "0", "--no-wandb"])[0]
    why = "fp32; TP=2 splits GEMM reductions and the vocab-parallel log-sum-exp"
    assert_close(torch.tensor(tp2["losses"][0]), torch.tensor(single["losses"][0]),
                 FP32_REORDER, why, "step-1 loss")
    # The norm sums TP-split parameters over both ranks and counts replicated ones once.
    assert_close(torch.tensor(tp2["grad_norms"][0]), torch.tensor(single["grad_norms"][0]),
                 FP32_REORDER, why, "step-1 grad norm")
    # One AdamW step later: the update m / sqrt(v) carries the gradients' 1e-6 differences.
    assert_close(torch.tensor(tp2["losses"][1]), torch.tensor(single["losses"][1]),
                 FP32_REORDER, why + " (after one AdamW step)", "step-2 loss")


def test_dp2_replicas_keep_identical_weights_and_router_biases(tmp_path):
    run_gloo(_main, 2, SMALL + ["--steps", "2", "--out-dir", str(tmp_path), "--save-interval",
                                "2", "--eval-interval", "0", "--no-wandb"])
    rank0, rank1 = _load(tmp_path, 2, 0), _load(tmp_path, 2, 1)
    assert rank0["tokens_seen"] == 2 * (2 * 4 * 32 * 2)  # steps * (DP * batch * seq * accum)
    for name, tensor in rank0["model"].items():
        if isinstance(tensor, torch.Tensor):
            assert_equal(rank1["model"][name], tensor, name)


# ----------------------------------------------------------------------------------------------
# (d) arguments
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, expected", [
    (["--steps", "0"], "--steps 0 is invalid: must be a positive integer"),
    (["--seq-len", "256"], "--seq-len 256 is invalid: preset 'tiny' has max_seq_len=128"),
    (["--tensor-parallel-size", "3"], "must divide the preset's mla.num_heads=4"),
    (["--tensor-parallel-size", "2"], "must divide the number of processes (1)"),
    (["--lr", "1e-3", "--min-lr", "1e-2"], "--min-lr 0.01 is invalid: must lie in [0, --lr"),
    (["--warmup-steps", "500", "--steps", "100"], "must not exceed --steps=100"),
    (["--resume", "auto"], "pass --out-dir of the run to continue"),
    (["--preset", "nope"], "invalid choice: 'nope'"),
])
def test_bad_arguments_exit_with_a_message_naming_the_flag_and_the_fix(argv, expected, capsys,
                                                                       monkeypatch):
    from megatron_dsv3.train.args import parse_args

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err


def test_all_problems_are_reported_at_once(capsys):
    from megatron_dsv3.train.args import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--steps", "-1", "--micro-batch-size", "0", "--clip-grad", "-1"])
    err = capsys.readouterr().err
    assert "--steps -1" in err and "--micro-batch-size 0" in err and "--clip-grad -1" in err


def test_lr_schedule_warms_up_linearly_then_decays_to_min_lr():
    from megatron_dsv3.train.args import build_parser
    from megatron_dsv3.train.step import lr_at

    args = build_parser().parse_args(["--steps", "100", "--warmup-steps", "10", "--lr", "1.0",
                                      "--min-lr", "0.1"])
    assert [lr_at(s, args) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert lr_at(9, args) == pytest.approx(1.0) and lr_at(10, args) == pytest.approx(1.0)
    assert lr_at(55, args) == pytest.approx(0.55)   # half-way down the cosine
    assert lr_at(99, args) == pytest.approx(0.1, abs=1e-3)
