"""The training job (`python -m megatron_dsv3.train`) against faults: each becomes a clear error or
a clean stop, not a silent NaN run, a lost allocation or a 30-minute hang.

  fault                                what the job does                          tests
  a non-finite loss or gradient norm   stops before the step is applied (no       huge --lr; NaN
                                       AdamW step, no bias update, no             weight on one
                                       checkpoint), naming the step, the value,   DP rank
                                       the checkpoint to resume from, the fix
  SIGTERM / SIGINT (preemption)        every rank finishes the same step, saves   a real process;
                                       it, exits 128 + signal; repeats (torchrun  one rank of two;
                                       forwarding it) are ignored                 StopSignals
  a rank that hangs                    the others fail after --dist-timeout-s,    Megatron's DP
                                       on Megatron's groups too                   group; the job
  a data problem                       a TrainError at set-up, before the model   binary .txt,
                                       is built, naming the file or the flag      broken tokenizer,
                                                                                  splits too small

The jobs run in gloo ranks (`run_gloo`: the job initialises and tears down torch.distributed
itself), except the SIGTERM one, which needs a process of its own to signal. Every run uses the
tiny preset on sequences of 32 tokens and the first 100 kB of the bundled corpus.
"""

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest
import torch

from helpers.gloo import run_gloo

pytestmark = pytest.mark.multiprocess

TINY = ["--seq-len", "32", "--micro-batch-size", "2", "--grad-accum", "1", "--warmup-steps", "1",
        "--eval-interval", "0", "--no-wandb"]
HUNG_TIMEOUT_S = 2.0  # --dist-timeout-s of the hung-rank tests
# How long a rank may take to notice a hung peer: the timeout, plus what a loaded 2-core machine
# adds to a gloo wait (measured: 2.0-2.1 s for a 2 s timeout), far below Megatron's 30 minutes.
HUNG_DETECTED_WITHIN_S = HUNG_TIMEOUT_S + 8.0


def _argv(corpus: Path, out: Path, *flags: str) -> list[str]:
    return TINY + ["--data-dir", str(corpus), "--out-dir", str(out), *flags]


def _checkpoints(out: Path) -> tuple[list[str], str]:
    """(step folders, the `latest` marker's target or '') in out/checkpoints."""
    folder = out / "checkpoints"
    steps = sorted((p.name for p in folder.glob("step_*") if p.name[5:].isdigit()),
                   key=lambda name: int(name[5:]))
    latest = folder / "latest"
    return steps, latest.read_text().strip() if latest.exists() else ""


def _logged_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def _main(rank, world, argv):
    from megatron_dsv3.train import main

    return main(argv)


def _main_error(rank, world, argv, patches=()):
    """main(argv) expected to fail: (exit status, what it printed to stderr). `patches`: names
    of the job module set to `_refuse` (what must not run)."""
    from megatron_dsv3.train import job

    for name in patches:
        setattr(job, name, _refuse(name))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            job.main(argv)
        except SystemExit as exit_:
            return exit_.code, err.getvalue()
    raise AssertionError(f"main({argv}) returned instead of exiting")


def _refuse(name):
    def refuse(*args, **kwargs):
        raise AssertionError(f"{name} ran: the job should have stopped before it")
    return refuse


# ----------------------------------------------------------------------------------------------
# 1. a non-finite loss or gradient norm
# ----------------------------------------------------------------------------------------------
def _train_until_non_finite(rank, world, argv, nan_parameter_on_rank1=None):
    """Set up and train until the job refuses a step; returns its error and whether the model,
    AdamW state and expert biases are still those of the last completed step."""
    from megatron_dsv3.train import job
    from megatron_dsv3.train.args import TrainError, parse_args

    args, cfg = parse_args(argv)
    run, step_dir = job.setup(args, cfg)
    if nan_parameter_on_rank1 is not None and rank == 1:
        with torch.no_grad():
            dict(run.model.named_parameters())[nan_parameter_on_rank1].fill_(float("nan"))
    before = {}  # the state before the latest step, to compare with the state at the error
    real_step = job.train_step

    def remember_then_step(run_, stop_signal=None):
        before.update(step=run_.step, model=_clone(run_.model.state_dict()),
                      adam=_clone(run_.optimizer.state_dict()["state"]))
        return real_step(run_, stop_signal)

    job.train_step = remember_then_step
    try:
        job.train(run, step_dir)
    except TrainError as err:
        unchanged = (run.step == before["step"]
                     and _same(run.model.state_dict(), before["model"])
                     and _same(run.optimizer.state_dict()["state"], before["adam"]))
        return {"message": str(err), "failed_step": err.__cause__.step, "step": run.step,
                "unchanged": unchanged}
    raise AssertionError("the run finished: no step was refused")


def _clone(tree):
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return {k: _clone(v) for k, v in tree.items()}
    return tree


def _same(a, b) -> bool:
    """Equal trees of tensors (NaN equal to NaN: a weight set to NaN stays NaN)."""
    if isinstance(a, torch.Tensor):
        return torch.equal(torch.nan_to_num(a, nan=7.0), torch.nan_to_num(b, nan=7.0))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def test_huge_lr_stops_before_the_first_non_finite_step_naming_the_checkpoint(corpus, tmp_path):
    """--lr 1e6 without warm-up: step 1 is finite, its update blows the weights up (measured:
    the gradient norm is NaN at step 3). The job refuses that step: nothing of it is applied
    (weights, AdamW moments and router biases as after the previous step), no checkpoint or
    `latest` for it, no metrics line; the error names the step, the value, the fix and the
    last checkpoint."""
    argv = _argv(corpus, tmp_path, "--steps", "6", "--warmup-steps", "0", "--lr", "1e6",
                 "--save-interval", "1")
    (result,) = run_gloo(_train_until_non_finite, 1, argv)
    failed = result["failed_step"]
    assert 2 <= failed <= 6, result["message"]
    message = result["message"]
    assert message.startswith(f"step {failed} is not finite: "), message
    assert "gradient norm nan" in message or "loss nan" in message or "inf" in message, message
    for expected in ("Nothing of step", "no optimizer step, no expert-bias update, no checkpoint",
                     "Lower --lr (now 1e+06", "--warmup-steps", "--data-dir",
                     f"--resume {tmp_path / 'checkpoints' / f'step_{failed - 1}'}"):
        assert expected in message, (expected, message)
    assert result["step"] == failed - 1 and result["unchanged"], result
    steps, latest = _checkpoints(tmp_path)
    assert steps == [f"step_{s}" for s in range(1, failed)] and latest == f"step_{failed - 1}"
    assert _logged_steps(tmp_path) == list(range(1, failed))


def test_nan_weight_on_one_dp_rank_stops_every_rank_at_the_same_step(corpus, tmp_path):
    """A NaN in rank 1's copy of one weight (DP = 2): both ranks refuse step 1 with the same
    message, which names that parameter and rank, and that no checkpoint exists yet."""
    argv = _argv(corpus, tmp_path, "--steps", "3", "--save-interval", "1")
    results = run_gloo(_train_until_non_finite, 2, argv, "decoder.final_layernorm.weight")
    assert results[0]["message"] == results[1]["message"], results
    message = results[0]["message"]
    for expected in ("step 1 is not finite: ", "it arose in the forward pass",
                     "parameters holding NaN/Inf: rank 1: decoder.final_layernorm.weight",
                     "This run wrote no checkpoint before it"):
        assert expected in message, (expected, message)
    assert all(r["failed_step"] == 1 and r["step"] == 0 and r["unchanged"] for r in results)
    assert _checkpoints(tmp_path) == ([], "") and _logged_steps(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# 2. SIGTERM / SIGINT
# ----------------------------------------------------------------------------------------------
def test_sigterm_saves_the_step_in_flight_exits_143_and_resume_auto_continues(corpus, tmp_path):
    """A real job process: once it has logged a step, SIGTERM. It finishes the step in flight,
    saves it (with --save-interval 0), says so and exits with 143 within seconds (measured:
    0.3 s to the saved checkpoint, 2 s to the exit, most of it the interpreter's teardown);
    `--resume auto` continues from that step. The job starts alone with MASTER_PORT (left by
    another job) naming a port in use: it picks a free port instead of failing with
    EADDRINUSE (one process serves both checks: its interpreter start is most of their time)."""
    import socket

    argv = _argv(corpus, tmp_path, "--steps", "200", "--save-interval", "0")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    # A world of its own, not the pytest process's, with a stale port
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(taken.getsockname()[1]),
               TORCHDYNAMO_DISABLE="1")
    job = subprocess.Popen([sys.executable, "-m", "megatron_dsv3.train", *argv], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not _logged_steps(tmp_path):
            if job.poll() is not None or time.monotonic() > deadline:
                job.kill()
                raise AssertionError(f"the job logged no step (exit {job.wait()}):\n"
                                     + job.communicate()[1][-3000:])
            time.sleep(0.05)
        job.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        _, err = job.communicate(timeout=30)
        took = time.monotonic() - signalled
    finally:
        taken.close()
        if job.poll() is None:
            job.kill()
            job.wait()
    assert job.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert took < 15, f"{took:.1f} s from SIGTERM to exit"
    stopped_at = _logged_steps(tmp_path)[-1]
    assert f"SIGTERM: stopped after step {stopped_at} of 200, saved " in err, err[-3000:]
    assert "--resume auto" in err and "Traceback" not in err, err[-3000:]
    assert _checkpoints(tmp_path) == ([f"step_{stopped_at}"], f"step_{stopped_at}")

    (summary,) = run_gloo(_main, 1, argv[:-4] + ["--steps", str(stopped_at + 2), "--save-interval",
                                                 "0", "--resume", "auto"])
    assert summary["steps"] == [stopped_at + 1, stopped_at + 2], summary
    assert _logged_steps(tmp_path) == list(range(1, stopped_at + 3))


def _signal_rank1_at_step(rank, world, argv, signal_at_step):
    """main(argv) where rank 1 (only) receives SIGTERM twice (as from SLURM, then torchrun) while
    it computes step `signal_at_step`."""
    from megatron_dsv3.train import job

    real_step = job.train_step

    def step(run, stop_signal=None):
        if rank == 1 and run.step + 1 == signal_at_step:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(run, stop_signal)

    job.train_step = step
    return job.main(argv)


def test_sigterm_on_one_rank_stops_every_rank_after_the_same_step(corpus, tmp_path):
    """DP = 2, SIGTERM to rank 1 alone during step 2: the step's flag exchange tells rank 0, both
    finish step 2, save it (one file each) and report the stop; the repeated signal does not
    end rank 1 before its save."""
    argv = _argv(corpus, tmp_path, "--steps", "5", "--save-interval", "0")
    summaries = run_gloo(_signal_rank1_at_step, 2, argv, 2)
    for rank, summary in enumerate(summaries):
        assert summary["stopped_by"] == "SIGTERM" and summary["steps"] == [1, 2], (rank, summary)
    assert _checkpoints(tmp_path) == (["step_2"], "step_2")
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "step_2").glob("rank_*.pt")) == [
        "rank_00000.pt", "rank_00001.pt"]
    assert _logged_steps(tmp_path) == [1, 2]


def test_first_signal_is_recorded_repeats_are_ignored_and_handlers_are_restored():
    """The first SIGINT / SIGTERM sets `received` and nothing else; later ones (torchrun
    forwarding what its worker already got) change nothing and end nothing; on exit the
    previous handlers are back. (SIGTERM's default would end the test process: if a handler
    were missing, this test would not report at all.)"""
    from megatron_dsv3.train.preemption import StopSignals, exit_status

    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    with StopSignals() as signals:
        assert signals.received == 0
        signal.raise_signal(signal.SIGINT)
        assert signals.received == signal.SIGINT
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGTERM)
        assert signals.received == signal.SIGINT
    assert {signum: signal.getsignal(signum) for signum in previous} == previous
    assert exit_status(signal.SIGTERM) == 143 and exit_status(signal.SIGINT) == 130


# ----------------------------------------------------------------------------------------------
# 3. a rank that hangs
# ----------------------------------------------------------------------------------------------
def _all_reduce_with_rank1_hung(rank, world, done_file):
    """Rank 0 all-reduces over Megatron's DP group while rank 1 sleeps (until rank 0 is done):
    rank 0's (seconds waited, error)."""
    import torch.distributed as dist

    from megatron_dsv3.parallel import init_distributed

    pg = init_distributed(backend="gloo", timeout_s=HUNG_TIMEOUT_S)
    if rank == 1:
        deadline = time.monotonic() + 120
        while not Path(done_file).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return None
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(4), group=pg.dp)
        error = None
    except RuntimeError as err:
        error = str(err)
    Path(done_file).touch()
    return time.monotonic() - start, error


def test_hung_rank_becomes_an_error_on_megatron_groups_within_the_timeout(tmp_path):
    """init_distributed(timeout_s=2) reaches Megatron's groups (their own default: 30 min): a
    DP all-reduce whose peer never joins fails after ~2 s instead of waiting."""
    results = run_gloo(_all_reduce_with_rank1_hung, 2, str(tmp_path / "done"), timeout_s=90)
    waited, error = results[0]
    assert error is not None and "timed out" in error.lower(), error
    assert HUNG_TIMEOUT_S * 0.9 <= waited < HUNG_DETECTED_WITHIN_S, waited


def _job_with_rank1_hung(rank, world, argv, done_file):
    """main(argv) where rank 1 hangs in its first step until rank 0 has failed: rank 0's (exit
    status, stderr, seconds from its first step to the exit)."""
    from megatron_dsv3.train import job

    real_step, started = job.train_step, []

    def step(run, stop_signal=None):
        started.append(time.monotonic())
        if rank == 1:
            while not Path(done_file).exists():
                time.sleep(0.05)
            raise SystemExit(0)  # rank 0 is gone: leave without another collective
        return real_step(run, stop_signal)

    job.train_step = step
    code, err = _main_error(rank, world, argv)
    if rank == 0:
        Path(done_file).touch()
    return code, err, time.monotonic() - started[0]


def test_job_turns_a_hung_rank_into_an_error_naming_dist_timeout_s(corpus, tmp_path):
    """--dist-timeout-s 2 with rank 1 stuck in its first step: rank 0 exits with status 1 and
    a message naming the flag and the fix within seconds, not a traceback after 30 minutes."""
    argv = _argv(corpus, tmp_path / "out", "--steps", "2", "--dist-timeout-s",
                 str(HUNG_TIMEOUT_S))
    results = run_gloo(_job_with_rank1_hung, 2, argv, str(tmp_path / "done"), timeout_s=90)
    code, err, took = results[0]
    assert code == 1, err[-3000:]
    assert "error: rank 0 waited more than --dist-timeout-s 2 for the other ranks" in err, err
    assert "raise --dist-timeout-s" in err and "Traceback" not in err, err
    assert took < HUNG_DETECTED_WITHIN_S, took


# ----------------------------------------------------------------------------------------------
# 4. data problems, at set-up
# ----------------------------------------------------------------------------------------------
def _data_dir(folder: Path, tokenizer: Optional[bytes] = None, **files: bytes) -> Path:
    from megatron_dsv3.data import DEFAULT_DATA_DIR, TOKENIZER_FILE

    folder.mkdir()
    if tokenizer is None:
        shutil.copy(DEFAULT_DATA_DIR / TOKENIZER_FILE, folder / TOKENIZER_FILE)
    else:
        (folder / TOKENIZER_FILE).write_bytes(tokenizer)
    for stem, data in files.items():
        (folder / f"{stem}.txt").write_bytes(data)
    return folder


TEXT = "To be, or not to be, that is the question. " * 40  # ~500 tokens
BINARY = bytes(range(256))  # 0x80 at offset 128 is no UTF-8 start byte


def test_load_corpus_names_a_corpus_file_that_is_not_utf8(tmp_path):
    from megatron_dsv3.data import DataError, load_corpus

    folder = _data_dir(tmp_path / "data", a=TEXT.encode(), b=BINARY)
    with pytest.raises(DataError) as err:
        load_corpus(folder)
    assert isinstance(err.value, ValueError)
    assert f"corpus file {folder / 'b.txt'} is not UTF-8 text (byte 0x80 at offset 128)" in str(
        err.value)
    assert "convert it to UTF-8, or move it out of the folder" in str(err.value)


@pytest.mark.parametrize("content", [b'{"version": "1.0", "trunc', b"{}", BINARY])
def test_load_corpus_names_a_broken_tokenizer_json(tmp_path, content):
    from megatron_dsv3.data import DataError, load_corpus

    folder = _data_dir(tmp_path / "data", tokenizer=content, a=TEXT.encode())
    with pytest.raises(DataError, match=rf"tokenizer file {folder / 'tokenizer.json'} cannot be "
                                        r"read as a `tokenizers` tokenizer\.json \(.+\): replace"):
        load_corpus(folder)


@pytest.mark.parametrize("case", ["binary corpus file", "broken tokenizer", "tiny val split",
                                  "tiny train split", "missing folder"])
def test_job_reports_a_data_problem_before_building_the_model(case, corpus, tmp_path):
    """Exit status 2 and one line naming the file or the flag, the sizes and the fix; the
    model is never built (job.build_initial_model refuses to run)."""
    flags, expected = [], []
    if case == "binary corpus file":
        data = _data_dir(tmp_path / "data", a=TEXT.encode(), b=BINARY)
        expected = [f"error: --data-dir {data}: corpus file {data / 'b.txt'} is not UTF-8"]
    elif case == "broken tokenizer":
        data = _data_dir(tmp_path / "data", tokenizer=b"{}", a=TEXT.encode())
        expected = [f"error: --data-dir {data}: tokenizer file {data / 'tokenizer.json'} cannot"]
    elif case == "tiny val split":
        data, flags = corpus, ["--val-fraction", "0.0005", "--eval-interval", "5"]
        expected = ["error: --val-fraction 0.0005 holds out ",
                    "fewer than one validation sequence of --seq-len + 1 = 33",
                    "--eval-batches 8 x --micro-batch-size 2", "Raise --val-fraction to ",
                    "or pass --eval-interval 0"]
    elif case == "tiny train split":
        data = _data_dir(tmp_path / "data", a=b"To be, or not to be.")
        flags = ["--val-fraction", "0.2"]
        expected = [f"error: --data-dir {data} holds ",
                    ("fewer than one sequence of --seq-len + 1 = 33: lower --seq-len or "
                     "--val-fraction, or use a bigger corpus")]
    else:
        data = tmp_path / "nowhere"
        expected = [f"error: --data-dir {data}: data folder {data} does not exist"]
    argv = _argv(data, tmp_path / "out", "--steps", "2", *flags)
    ((code, err),) = run_gloo(_main_error, 1, argv, ("build_initial_model",))
    assert code == 2 and "Traceback" not in err, err
    for text in expected:
        assert text in err, (text, err)
    if case == "tiny val split":  # the fraction it suggests is enough
        suggested = float(err.split("Raise --val-fraction to ")[1].split()[0])
        total = int(err.split(" of the ")[1].split()[0])
        assert int(total * suggested) >= 33 > int(total * 0.0005), err


def test_dist_timeout_must_be_positive(capsys, monkeypatch):
    from megatron_dsv3.train.args import parse_args

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit):
        parse_args(["--dist-timeout-s", "0"])
    assert "--dist-timeout-s 0.0 is invalid: must be > 0 seconds" in capsys.readouterr().err


