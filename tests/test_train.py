"""The training job (`python -m megatron_dsv3.train`) end to end, on CPU with gloo processes.

One run per layout: the tiny preset with 4 decoder layers, sequences of 32 tokens, 4
micro-batches of 2 per step and data-parallel rank, 2 steps (the plain run 6), on the first
100 kB of the bundled corpus (every rank tokenizes its corpus: 1.5 s for the whole 2 MB). Each
runs through `run_gloo` (the job initialises and tears down torch.distributed itself, which
must not disturb the pytest process's own world), once however many tests read it, and is
compared with the run that computes the same steps without its parallelism: the same weights
(every layout draws the full model and keeps its slice) and the same batches (keyed by step,
micro-batch and DP rank, so runs of equal DP see equal data).

  layout         processes                  compared with  also
  plain          1                          -              the loss falls, every output is
                                                           written; resumed at step 3
  bf16           1: bf16 parameters,        plain (bf16)   fp32 masters in its checkpoints;
                    --expert-wgrad step                    resumed at step 2; resumes plain's
  wgrad-step     1: --expert-wgrad step     plain
  tp2            2: TP=2                    plain
  pp2-dualpipev  2: PP=2, DualPipeV         plain
  pp2-dualpipe   2: PP=2, DualPipe          plain          its mirror copies stay identical
  dp2            2: DP=2                    -              its replicas stay identical
  ep2            2: EP=2 (DP=2)             dp2            extended: pp2-ep2 repeats it with PP
  pp2-ep2        4: PP=2 x EP=2, DualPipeV  dp2            resumed at step 1, on every rank

What each layout computes is proven piece by piece by the module-level parity tests
(test_tensor_parallel, test_expert_parallel, test_pipeline_model,
test_pipeline_parallel_compose); these runs show that the job puts the pieces together: its data
feeding, gradient reduction and norm, AdamW, metrics and checkpoints.

Tolerances:
  * exact for a resumed run against the uninterrupted one (same operations in the same order on
    the same CPU, every random draw keyed or checkpointed); for DP replicas and DualPipe's mirror
    copies (the same AdamW updates from the same reduced gradients); for DualPipeV's step-1
    next-token and MTP losses and router loads against the plain run (every stage runs the whole
    model's operations; the last stage, on rank 0, sums the micro-batches in order);
  * FP32_REORDER for the other comparisons, each layout saying why: the same fp32 math summed in
    another order. Step-2 numbers follow one AdamW step on those gradients.
"""

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import pytest
import torch

from helpers.gloo import run_gloo
from helpers.tolerance import FP32_REORDER, assert_close, assert_equal

pytestmark = pytest.mark.multiprocess

SMALL = ["--seq-len", "32", "--micro-batch-size", "2", "--grad-accum", "4", "--num-layers", "4",
         "--warmup-steps", "2", "--lr", "3e-3", "--eval-batches", "4", "--eval-interval", "2",
         "--steps", "2", "--save-interval", "2"]
TOKENS_PER_RANK_AND_STEP = 32 * 2 * 4  # --seq-len x --micro-batch-size x --grad-accum
PLAIN_STEPS, PLAIN_SAVE_AT = 6, 3
NUM_EXPERTS = 8                                      # the tiny preset's
TIMINGS = ("time_s", "step_time_s", "tokens_per_s", "model_tflops_per_gpu")  # metrics that differ between equal runs

PIPELINE = ("--pipeline-parallel-size", "2", "--pipeline-schedule")
WHY_TP = "TP=2 splits GEMM reductions and the vocab-parallel log-sum-exp"
WHY_PP = ("the balance loss summed per stage, gradient squares per pipeline rank, the "
          "embedding's two uses per micro-batch accumulated apart")
WHY_EP = "an expert's weight gradient summed over rows grouped by source rank"


@dataclass(frozen=True)
class Layout:
    """One run of the job, and what it must reproduce of the `reference` layout's run."""
    processes: int
    flags: tuple[str, ...] = ()
    reference: Optional[str] = None
    exact: tuple[str, ...] = ()                   # step-1 metrics ("moe/": every load statistic)
    close: tuple[tuple[int, str], ...] = ()       # (step, metric) within FP32_REORDER
    why: str = ""                                 # what reorders the fp32 sums
    dp_groups: tuple[tuple[int, ...], ...] = ()   # ranks holding the same stages
    ep: int = 1                                   # EP > 1: those ranks hold different experts
    mirrors: tuple[tuple[int, int], ...] = ()     # DualPipe: rank a's chunk c = rank b's 1 - c
    resume_at: Optional[int] = None               # a resumed run starts from this checkpoint
    wandb: bool = False                           # W&B offline (else --no-wandb)
    extended: bool = False                        # a repetition: left out of the default run


LAYOUTS = {
    "plain": Layout(1, ("--steps", str(PLAIN_STEPS), "--save-interval", str(PLAIN_SAVE_AT)),
                    resume_at=PLAIN_SAVE_AT, wandb=True),
    # (extended: TP=2's numerics are test_tensor_parallel's, the job at TP=2
    # test_train_init_from's)
    "tp2": Layout(2, ("--tensor-parallel-size", "2"), "plain",
                  close=((1, "loss"), (1, "grad_norm"), (2, "loss")), why=WHY_TP,
                  extended=True),
    "pp2-dualpipev": Layout(
        2, PIPELINE + ("dualpipev",), "plain",
        exact=("lm_loss", "mtp_loss", "mtp_ce", "tokens_seen", "moe/"),
        close=((1, "loss"), (1, "balance_loss"), (1, "grad_norm"), (2, "loss"), (2, "val_loss")),
        why=WHY_PP),
    # The micro-batches' losses are the plain run's bit for bit (test_pipeline_model), but each
    # direction's last stage sums its half of them: their mean is another association of the
    # sum (measured: mtp_ce 1 ulp apart).
    "pp2-dualpipe": Layout(
        2, PIPELINE + ("dualpipe",), "plain", exact=("tokens_seen", "moe/"),
        close=((1, "lm_loss"), (1, "mtp_loss"), (1, "mtp_ce"), (1, "loss"), (1, "balance_loss"),
               (1, "grad_norm"), (2, "loss"), (2, "val_loss")),
        why=WHY_PP + "; the two directions' losses summed apart", mirrors=((0, 1),),
        extended=True),  # DualPipe's order: test_dualpipe; the job's pipeline: pp2-dualpipev
    # bf16 parameters with fp32 masters (--params-dtype auto's choice on cuda), with the
    # experts' weight gradients once per step; on the CPU without autocast the whole forward
    # runs in bf16
    # (extended: the masters in the checkpoint are test_bf16_parameters_..._fp32_masters's, the
    # bit-for-bit resume plain's and pp2-ep2's)
    "bf16": Layout(1, ("--params-dtype", "bfloat16", "--expert-wgrad", "step", "--steps", "3",
                       "--save-interval", "2"), resume_at=2, extended=True),
    # the routed experts' weight gradients of a step in one GEMM per projection; the forward
    # and the step-1 losses are untouched
    "wgrad-step": Layout(1, ("--expert-wgrad", "step"), "plain",
                         exact=("loss", "lm_loss", "mtp_loss", "mtp_ce", "balance_loss", "moe/"),
                         close=((1, "grad_norm"), (2, "loss"), (2, "val_loss")),
                         why="an expert's weight gradient summed over all the step's rows at "
                             "once instead of per micro-batch",
                         extended=True),  # the merged GEMM's sums: test_expert_wgrad
    "dp2": Layout(2, dp_groups=((0, 1),)),
    "ep2": Layout(2, ("--expert-parallel-size", "2"), "dp2",
                  close=((1, "loss"), (1, "grad_norm"), (2, "loss"), (2, "grad_norm")),
                  why=WHY_EP, dp_groups=((0, 1),), ep=2, extended=True),
    # pipelines {0, 2} and {1, 3}; the ranks of a stage {0, 1} and {2, 3} (DP = EP = 2)
    "pp2-ep2": Layout(
        4, PIPELINE + ("dualpipev", "--expert-parallel-size", "2", "--save-interval", "1"), "dp2",
        exact=("tokens_seen",),
        close=((1, "loss"), (1, "lm_loss"), (1, "mtp_loss"), (1, "balance_loss"),
               (1, "grad_norm"), (2, "loss"), (2, "val_loss")),
        why=f"{WHY_PP}; {WHY_EP}; the DP mean of per-rank means", dp_groups=((0, 1), (2, 3)),
        ep=2, resume_at=1),
}


def _layouts(wanted) -> list:
    """The layouts with `wanted(layout)`, as parameters (the extended ones marked)."""
    return [pytest.param(name, marks=[pytest.mark.extended] if layout.extended else [])
            for name, layout in LAYOUTS.items() if wanted(layout)]


def _main(rank, world, argv):
    from megatron_dsv3.train import main

    return main(argv)


def _argv(layout: Layout, data_dir: Path, out_dir: Path) -> list[str]:
    return (SMALL + list(layout.flags) + ([] if layout.wandb else ["--no-wandb"])
            + ["--data-dir", str(data_dir), "--out-dir", str(out_dir)])


@dataclass(frozen=True)
class Job:
    out: Path
    summary: dict  # rank 0's return of main()

    def records(self) -> list[dict]:
        return [json.loads(line)
                for line in (self.out / "metrics.jsonl").read_text().splitlines()]

    def checkpoint(self, step: int, rank: int = 0) -> dict:
        return torch.load(self.out / "checkpoints" / f"step_{step}" / f"rank_{rank:05d}.pt",
                          weights_only=False)

    @property
    def last_step(self) -> int:
        return self.summary["steps"][-1]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, corpus):
    """jobs(name): the run of LAYOUTS[name], started on first use."""
    done: dict[str, Job] = {}

    def job(name: str) -> Job:
        if name not in done:
            layout, out = LAYOUTS[name], tmp_path_factory.mktemp(name)
            summary = run_gloo(_main, layout.processes, _argv(layout, corpus, out))[0]
            done[name] = Job(out, summary)
        return done[name]

    return job


def _tensors(state: dict):
    return [(name, value) for name, value in state.items() if isinstance(value, torch.Tensor)]


def _is_expert(name: str) -> bool:
    return name.endswith(("experts.fc1", "experts.fc2"))


def _untimed(record: dict) -> dict:
    return {key: value for key, value in record.items() if key not in TIMINGS}


# ----------------------------------------------------------------------------------------------
# (a) a short run learns and leaves its outputs
# ----------------------------------------------------------------------------------------------
def test_short_run_loss_falls_and_every_output_is_written(jobs):
    job = jobs("plain")
    out, losses = job.out, job.summary["losses"]
    assert len(losses) == PLAIN_STEPS
    # ln(2048) = 7.6 next-token + 0.3 * 7.6 MTP at init; 6 steps of lr 3e-3 learn the unigram
    # statistics and take about 1.0 off (measured); 0.5 leaves room for other CPUs' BLAS.
    assert losses[-1] < losses[0] - 0.5, losses
    records = job.records()
    assert [r["step"] for r in records] == list(range(1, PLAIN_STEPS + 1))
    first = records[0]
    for key in ("loss", "lm_loss", "mtp_loss", "mtp_ce", "mtp_ce_depth1", "mtp_lambda",
                "balance_loss", "lr",
                "grad_norm", "tokens_per_s", "model_tflops_per_gpu", "tokens_seen",
                "moe/L1/imbalance", "moe/L1/max_over_min", "moe/L1/bias_spread",
                "moe/L1/bias_norm", "moe/mtp0/imbalance"):
        assert key in first, key
    assert first["mtp_lambda"] == 0.3 and first["tokens_seen"] == TOKENS_PER_RANK_AND_STEP
    assert first["loss"] == pytest.approx(first["lm_loss"] + first["mtp_loss"]
                                          + first["balance_loss"], rel=1e-6)
    assert first["mtp_ce_depth1"] == first["mtp_ce"]  # one depth: its CE is the mean
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(val) == PLAIN_STEPS // 2 and val[-1] < val[0], val
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{PLAIN_STEPS}"
    for name in ("loss_curve.png", "expert_load.png", "expert_load.json"):
        assert (out / name).stat().st_size > 0, name
    wandb_dir = Path(job.summary["wandb_dir"])
    assert wandb_dir.parent == out / "wandb" and list(wandb_dir.glob("run-*.wandb"))
    # W&B has every metric of metrics.jsonl, and the load heatmap at each evaluation
    from megatron_dsv3.train.metrics_log import wandb_history

    rows = wandb_history(next(wandb_dir.glob("run-*.wandb")))
    assert [row["_step"] for row in rows] == [r["step"] for r in records]
    for row, record in zip(rows, records):
        assert {key: row[key] for key in record if key != "step"} == {
            key: value for key, value in record.items() if key != "step"}
        image = row.get("moe/expert_load/_type")  # W&B stores an image as nested fields
        assert image == ("image-file" if "val_loss" in record else None), row["_step"]
    images = list(wandb_dir.glob("files/media/images/moe/expert_load_*.png"))
    assert len(images) == len(val), images


# ----------------------------------------------------------------------------------------------
# (b) resume
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", _layouts(lambda layout: layout.resume_at))
def test_resumed_run_repeats_the_uninterrupted_one_bit_for_bit(name, jobs, corpus, tmp_path):
    """Weights (router biases included), AdamW state, tokens seen and every metric on every
    rank; the history before the resume is carried over, so the plots cover the whole run."""
    layout, job = LAYOUTS[name], jobs(name)
    step = layout.resume_at
    resumed = Job(tmp_path, run_gloo(_main, layout.processes, _argv(layout, corpus, tmp_path) + [
        "--resume", str(job.out / "checkpoints" / f"step_{step}"), "--no-wandb"])[0])
    for key in ("steps", "losses", "grad_norms"):
        assert resumed.summary[key] == job.summary[key][step:], key
    assert resumed.summary["val_loss"] == job.summary["val_loss"]
    assert [_untimed(r) for r in resumed.records()] == [_untimed(r) for r in job.records()]

    biases = []
    for rank in range(layout.processes):
        expected, actual = job.checkpoint(job.last_step, rank), resumed.checkpoint(
            job.last_step, rank)
        assert actual["tokens_seen"] == expected["tokens_seen"]
        for key, tensor in _tensors(expected["model"]):
            assert_equal(actual["model"][key], tensor, f"{name} rank {rank} {key}")
            if key.endswith("expert_bias"):
                biases.append(tensor)
        for index, state in expected["optimizer"]["state"].items():
            for key, tensor in state.items():
                assert_equal(actual["optimizer"]["state"][index][key], tensor,
                             f"{name} rank {rank} adam {index}.{key}")
    assert biases and any(bias.abs().sum() > 0 for bias in biases), "no bias moved"


def test_bf16_parameters_train_like_fp32_and_checkpoints_hold_fp32_masters(jobs, corpus,
                                                                          tmp_path):
    """--params-dtype bfloat16: the losses of the fp32 run within bf16 rounding, checkpoints
    whose weights are fp32 (the masters) and whose AdamW moments are bf16 (--adam-moments-dtype
    auto, DeepSeek-V3's), and either kind of run resumes the other's checkpoint: the fp32 run's
    step 3 continued with bf16 parameters gives its step 4."""
    plain, bf16 = jobs("plain"), jobs("bf16")
    # measured: at most 4e-6 relative over the 3 steps (the forward in bf16, fp32 updates)
    assert bf16.summary["losses"] == pytest.approx(plain.summary["losses"][:3], rel=1e-3)
    saved = bf16.checkpoint(bf16.last_step)
    assert {t.dtype for _, t in _tensors(saved["model"]) if t.is_floating_point()} \
        == {torch.float32}
    assert {key: t.dtype for state in saved["optimizer"]["state"].values()
            for key, t in state.items()} == {"step": torch.float32, "exp_avg": torch.bfloat16,
                                             "exp_avg_sq": torch.bfloat16}
    resumed = Job(tmp_path, run_gloo(_main, 1, _argv(LAYOUTS["plain"], corpus, tmp_path) + [
        "--resume", str(plain.out / "checkpoints" / f"step_{PLAIN_SAVE_AT}"), "--steps",
        str(PLAIN_SAVE_AT + 1), "--params-dtype", "bfloat16", "--no-wandb"])[0])
    assert resumed.summary["steps"] == [PLAIN_SAVE_AT + 1]
    assert resumed.summary["losses"] == pytest.approx(
        plain.summary["losses"][PLAIN_SAVE_AT:PLAIN_SAVE_AT + 1], rel=1e-3)


def test_resume_refuses_another_model_config_or_parallel_layout(jobs):
    from megatron_dsv3.config import tiny
    from megatron_dsv3.train.args import build_parser
    from megatron_dsv3.train.checkpoint import check_resumable

    job = jobs("plain")
    saved = job.checkpoint(PLAIN_SAVE_AT)
    args = build_parser().parse_args(SMALL + ["--tensor-parallel-size", "2", "--seed", "7"])
    args.seq_len = 32
    other = SimpleNamespace(cfg=tiny().replace(num_layers=4, moe__top_k=3), args=args)
    with pytest.raises(ValueError) as err:
        check_resumable(saved, other.cfg, other.args, job.out)
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
# (c) parallel layouts
# ----------------------------------------------------------------------------------------------
def _metric_names(keys: tuple[str, ...], record: dict) -> list[str]:
    """The metrics `keys` name in `record`, a key ending in "/" standing for all it starts."""
    names = []
    for key in keys:
        matching = sorted(m for m in record if m.startswith(key)) if key.endswith("/") else [key]
        assert matching, f"no metric {key}* in {sorted(record)}"
        names += matching
    return names


@pytest.mark.parametrize("name", _layouts(lambda layout: layout.reference))
def test_layout_repeats_the_steps_of_the_run_without_its_parallelism(name, jobs):
    layout = LAYOUTS[name]
    records, expected = jobs(name).records(), jobs(layout.reference).records()
    exact = _metric_names(layout.exact, expected[0])
    assert exact == _metric_names(layout.exact, records[0]), name
    for key in exact:
        assert records[0][key] == expected[0][key], (
            f"{name} step-1 {key}: {records[0][key]} != {expected[0][key]} ({layout.reference})")
    for step, key in layout.close:
        why = layout.why + ("" if step == 1 else "; after one AdamW step on those gradients")
        assert_close(torch.tensor(records[step - 1][key]), torch.tensor(expected[step - 1][key]),
                     FP32_REORDER, why, f"{name} step-{step} {key}")


@pytest.mark.parametrize("name", _layouts(lambda layout: layout.dp_groups or layout.mirrors))
def test_checkpoints_keep_replicas_and_mirror_copies_identical(name, jobs):
    """The ranks of a stage (DP replicas) hold the same tensors, router biases included, but
    for the experts that EP shards among them; DualPipe's two copies of a stage are equal."""
    layout, job = LAYOUTS[name], jobs(name)
    saved = [job.checkpoint(job.last_step, rank) for rank in range(layout.processes)]
    dp = len(layout.dp_groups[0]) if layout.dp_groups else 1
    assert saved[0]["tokens_seen"] == job.last_step * dp * TOKENS_PER_RANK_AND_STEP
    models = [s["model"] for s in saved]
    for group in layout.dp_groups:
        first = models[group[0]]
        assert any(_is_expert(key) for key in first), f"{name}: no experts on rank {group[0]}"
        for rank in group[1:]:
            assert models[rank].keys() == first.keys(), f"{name}: ranks {group}"
            for key, tensor in _tensors(first):
                if layout.ep > 1 and _is_expert(key):
                    assert tensor.shape[0] == NUM_EXPERTS // layout.ep, (name, key, tensor.shape)
                    assert not torch.equal(models[rank][key], tensor), (
                        f"{name}: ranks {group[0]} and {rank} hold the same experts {key}")
                else:
                    assert_equal(models[rank][key], tensor,
                                 f"{name} DP replicas {group[0]}, {rank}: {key}")
    for rank, mirror in layout.mirrors:
        for key, tensor in _tensors(models[rank]):
            chunk, _, rest = key.partition(".")
            assert_equal(models[mirror][f"{1 - int(chunk)}.{rest}"], tensor,
                         f"{name} mirror copies on ranks {rank}, {mirror}: {key}")


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
    (["--expert-wgrad", "in-gemm", "--device", "cpu"], "in-gemm adds into the fp32 sums of "
     "bf16 parameters on a GPU: it needs --device cuda"),
    (["--adam-moments-dtype", "bfloat16", "--params-dtype", "float32"],
     "--adam-moments-dtype bfloat16 is invalid: needs bf16 parameters with fp32 masters"),
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


def _environment_changed_by_importing_the_job(rank: int, world_size: int) -> list[str]:
    import os
    import sys

    assert "megatron_dsv3.train" not in sys.modules, "the import under test already ran"
    os.environ.pop("TORCHDYNAMO_DISABLE", None)  # run_gloo's ranks get it; the job must not
    # Megatron-Core sets TORCHINDUCTOR_CACHE_DIR when imported: the baseline is taken after it
    import megatron.core.models.gpt  # noqa: F401
    import megatron.core.pipeline_parallel  # noqa: F401
    before = dict(os.environ)
    import megatron_dsv3.train  # noqa: F401
    import megatron_dsv3.train.job  # noqa: F401
    import megatron_dsv3.train.step  # noqa: F401
    return sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))


def test_importing_the_job_sets_no_environment_variable():
    """Importing megatron_dsv3.train (its modules and what they import) leaves the process's
    environment as it was: the job switches off torch.compile on CPU at set-up, for its own
    process only, instead of exporting TORCHDYNAMO_DISABLE to whoever imports it. (In a
    process of its own, forked before anything of megatron_dsv3 was imported.)"""
    assert run_gloo(_environment_changed_by_importing_the_job, 1) == [[]]


def test_gpu_defaults_resolve_per_device_and_layout():
    """--compile-mode / --params-dtype auto: CUDA graphs and bf16 parameters with fp32 masters
    where they hold (cuda, one stage, no TP/EP collectives inside the graphs), the safe choice
    elsewhere; an explicit value is kept."""
    from megatron_dsv3.train.args import parse_args
    from megatron_dsv3.train.build import compile_mode, params_dtype, uses_cuda_graphs

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")

    def args(*flags):
        return parse_args(["--preset", "tiny", "--device", "cpu", *flags])[0]

    assert compile_mode(args(), cuda) == "reduce-overhead" and uses_cuda_graphs(args(), cuda)
    assert compile_mode(args(), cpu) == "default" and not uses_cuda_graphs(args(), cpu)
    for size in ("tensor_parallel_size", "expert_parallel_size", "pipeline_parallel_size"):
        parallel = args()
        setattr(parallel, size, 2)  # (parse_args checks sizes against the processes launched)
        assert compile_mode(parallel, cuda) == "default", size
    assert compile_mode(args("--compile-mode", "default"), cuda) == "default"
    assert not uses_cuda_graphs(args("--compile", "none"), cuda)
    assert params_dtype(args(), cuda) == torch.bfloat16  # auto autocast: bf16 on cuda
    assert params_dtype(args(), cpu) == torch.float32
    piped = args()
    piped.pipeline_parallel_size = 2
    assert params_dtype(piped, cuda) == torch.float32


def test_in_gemm_expert_gradients_need_fp32_sums_on_a_gpu():
    """--expert-wgrad in-gemm where --device auto found no GPU (or the parameters are fp32):
    a TrainError naming the flag before any step, not a failure inside the backward."""
    from megatron_dsv3.train.args import TrainError, parse_args
    from megatron_dsv3.train.build import sum_expert_grads_in_gemm_if_asked

    args = parse_args(["--preset", "tiny", "--expert-wgrad", "in-gemm"])[0]
    with pytest.raises(TrainError, match="--expert-wgrad in-gemm .* no GPU"):
        sum_expert_grads_in_gemm_if_asked(torch.nn.Linear(2, 2), args, None,
                                          torch.device("cpu"))
    with pytest.raises(TrainError, match="fp32 parameters"):
        sum_expert_grads_in_gemm_if_asked(torch.nn.Linear(2, 2), args, None,
                                          torch.device("cuda", 0))
    assert not sum_expert_grads_in_gemm_if_asked(
        torch.nn.Linear(2, 2), parse_args(["--preset", "tiny"])[0], None, torch.device("cpu"))


def test_bf16_moments_where_auto_found_fp32_parameters_name_the_flag():
    """--adam-moments-dtype bfloat16 with --params-dtype auto on a machine without a GPU (fp32
    parameters, torch's AdamW): a TrainError naming the flag; auto gives torch's fp32 AdamW."""
    from megatron_dsv3.train.args import TrainError, parse_args
    from megatron_dsv3.train.build import build_optimizer

    params = [torch.nn.Parameter(torch.zeros(2, 2))]
    args = parse_args(["--preset", "tiny", "--adam-moments-dtype", "bfloat16"])[0]
    with pytest.raises(TrainError, match="--adam-moments-dtype bfloat16 .* fp32 parameters"):
        build_optimizer(params, args)
    optimizer = build_optimizer(params, parse_args(["--preset", "tiny"])[0])
    assert type(optimizer) is torch.optim.AdamW


def test_validation_runs_eager_under_cuda_graphs(monkeypatch):
    """Measured on an H200: the proxy job's first evaluation replayed the training CUDA graphs
    without grad and failed ("accessing tensor output of CUDAGraphs that has been
    overwritten"); validation now runs eager whenever the modules are CUDA graphs."""
    import argparse

    from megatron_dsv3.train.step import eval_stance

    stances = []
    monkeypatch.setattr(torch.compiler, "set_stance", lambda stance: stances.append(stance)
                        or contextlib.nullcontext())
    graphs = argparse.Namespace(compile="modules", compile_mode="reduce-overhead")
    with eval_stance(SimpleNamespace(args=graphs, device=torch.device("cuda"))):
        pass
    assert stances == ["force_eager"]
    for args, device in ((graphs, torch.device("cpu")),
                         (argparse.Namespace(compile="none", compile_mode="auto"),
                          torch.device("cuda")),
                         (argparse.Namespace(compile="modules", compile_mode="default"),
                          torch.device("cuda"))):
        with eval_stance(SimpleNamespace(args=args, device=device)):
            pass
    assert stances == ["force_eager"]


def test_only_expert_wgrad_step_attaches_a_merger():
    """--expert-wgrad step hands the routed experts' weight gradients to a merger; micro-batch
    and in-gemm attach none (in-gemm with one attached ran the merged path instead of its
    own)."""
    from megatron_dsv3.moe.experts import RoutedExperts
    from megatron_dsv3.train.args import parse_args
    from megatron_dsv3.train.build import expert_grad_merger

    from megatron_dsv3.config import preset

    for mode, attached in (("micro-batch", False), ("in-gemm", False), ("step", True)):
        experts = RoutedExperts(2, 8, 4, tp_group=None, dtype=torch.float32, impl="loop")
        merger = expert_grad_merger(experts, parse_args(["--preset", "tiny", "--expert-wgrad",
                                                         mode])[0], preset("tiny"))
        assert (merger is not None) == attached, mode
        assert (experts.weight_grad_merger is not None) == attached, mode


def test_expert_wgrad_auto_is_in_gemm_only_for_bf16_parameters_on_a_gpu_without_a_pipeline():
    from megatron_dsv3.config import preset
    from megatron_dsv3.train.args import parse_args
    from megatron_dsv3.train.build import expert_wgrad_mode

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    cfg = preset("tiny")
    args = parse_args(["--preset", "tiny"])[0]
    assert args.expert_wgrad == "auto"
    assert expert_wgrad_mode(args, cfg, torch.bfloat16, cuda) == "in-gemm"
    assert expert_wgrad_mode(args, cfg, torch.float32, cuda) == "micro-batch"
    assert expert_wgrad_mode(args, cfg, torch.bfloat16, cpu) == "micro-batch"
    looped = cfg.replace(moe__experts_impl="loop")  # in-gemm needs the grouped GEMM
    assert expert_wgrad_mode(args, looped, torch.bfloat16, cuda) == "micro-batch"
    args.pipeline_parallel_size = 2
    assert expert_wgrad_mode(args, cfg, torch.bfloat16, cuda) == "micro-batch"
    assert expert_wgrad_mode(parse_args(["--preset", "tiny", "--expert-wgrad", "step"])[0],
                             cfg, torch.bfloat16, cuda) == "step"
