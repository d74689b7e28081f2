"""Checkpoints and run folders under faults (issue 10): damaged or truncated files, a crash at any
point of a save, non-finite weights, a reused --out-dir, a resume of another config, and the W&B
history after a `kill -9`.

Most tests drive train/checkpoint.py's functions on small payload dicts in this process (a world
of one, no torch.distributed); one runs them on 2 gloo ranks (the ranks must agree); the job tests
run the tiny job through `main` on one gloo rank (`run_gloo`: the job initialises and tears down
torch.distributed itself), 3 steps of 2 x 32 tokens, checkpointed after each.

What a fault looks like on disk: `_damage` writes 4 KiB of random bytes into the middle of a
file (a disk or copy error: same size, other contents), `_truncate` cuts it in half (a copy or a
write that stopped); a crash is an OSError raised by the k-th os.replace / shutil.rmtree of a
save (or an rmtree that stops half-way), for every k.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from helpers.gloo import run_gloo
from helpers.tolerance import assert_equal

TINY_JOB = ["--seq-len", "32", "--micro-batch-size", "2", "--grad-accum", "1", "--steps", "3",
            "--save-interval", "1", "--eval-interval", "0", "--warmup-steps", "1"]
PAYLOAD_FLOATS = 4096    # 16 KiB per tensor: a 4 KiB damage lands inside the tensor data


def _payload(step: int, tag: str) -> dict:
    """A rank file's payload as the job writes it, with small tensors; `tag` tells copies
    apart."""
    weights = torch.full((PAYLOAD_FLOATS,), float(step))
    return {"format": 1, "step": step, "tokens_seen": 64 * step, "tag": tag,
            "model": {"layer.weight": weights},
            "optimizer": {"state": {0: {"step": torch.tensor(float(step)),
                                        "exp_avg": torch.zeros(PAYLOAD_FLOATS)}},
                          "param_groups": [{"lr": 1e-3, "params": [0]}]},
            "model_config": {}, "train_args": {}, "world_size": 1}


def _damage(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = os.urandom(4096)
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _tag(step_dir: Path) -> str:
    return torch.load(step_dir / "rank_00000.pt", weights_only=False)["tag"]


def _saved_run(tmp_path: Path, steps=(1, 2, 3)) -> Path:
    """A run folder whose checkpoints/ holds step_<s> for each step (latest: the last)."""
    from megatron_dsv3.train.checkpoint import save_checkpoint

    for step in steps:
        save_checkpoint(tmp_path / "checkpoints", step, _payload(step, f"step {step}"))
    return tmp_path


# ----------------------------------------------------------------------------------------------
# 1. damaged checkpoints: verified on load, the newest intact one taken
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fault, reason", [
    (lambda ckpt: _damage(ckpt / "step_3" / "rank_00000.pt"), "contents differ"),
    (lambda ckpt: _truncate(ckpt / "step_3" / "rank_00000.pt"), "truncated"),
    (lambda ckpt: (ckpt / "step_3" / "manifest.json").unlink(), "no manifest.json"),
    (lambda ckpt: shutil.rmtree(ckpt / "step_3"), "missing, though 'latest' names it"),
], ids=["4KiB-overwritten", "truncated", "no-manifest", "folder-gone"])
def test_resume_auto_skips_a_damaged_latest_for_the_newest_intact_checkpoint(fault, reason,
                                                                            tmp_path, capsys):
    from megatron_dsv3.train.checkpoint import find_checkpoint

    run = _saved_run(tmp_path)
    fault(run / "checkpoints")
    assert find_checkpoint("auto", run) == run / "checkpoints" / "step_2"
    assert find_checkpoint(str(run), None) == run / "checkpoints" / "step_2"  # a run folder
    err = capsys.readouterr().err
    assert f"skipped {run / 'checkpoints' / 'step_3'}" in err and reason in err, err
    assert f"resuming from {run / 'checkpoints' / 'step_2'}" in err, err


def test_a_damaged_checkpoint_named_explicitly_is_an_error_naming_it_and_the_fault(tmp_path):
    from megatron_dsv3.train.args import TrainError
    from megatron_dsv3.train.checkpoint import find_checkpoint

    step_dir = _saved_run(tmp_path) / "checkpoints" / "step_2"
    _damage(step_dir / "rank_00000.pt")
    with pytest.raises(TrainError) as err:
        find_checkpoint(str(step_dir), None)
    message = str(err.value)
    for expected in (str(step_dir), "rank_00000.pt", "contents differ", "older step folder"):
        assert expected in message, message


def test_no_intact_checkpoint_is_an_error_listing_each_and_why(tmp_path):
    from megatron_dsv3.train.args import TrainError
    from megatron_dsv3.train.checkpoint import find_checkpoint

    run = _saved_run(tmp_path, steps=(1, 2))
    _damage(run / "checkpoints" / "step_2" / "rank_00000.pt")
    _truncate(run / "checkpoints" / "step_1" / "meta.json")
    with pytest.raises(TrainError) as err:
        find_checkpoint("auto", run)
    message = str(err.value)
    assert "no intact checkpoint" in message, message
    assert "step_2: rank_00000.pt: its contents differ" in message, message
    assert "step_1: meta.json is truncated" in message, message


def test_steps_newer_than_the_one_latest_names_are_not_fallbacks(tmp_path, capsys):
    """After a resume from step 1 re-saved step 2, step_3 is a left-over of the older attempt."""
    from megatron_dsv3.train.checkpoint import find_checkpoint, save_checkpoint

    run = _saved_run(tmp_path)
    save_checkpoint(run / "checkpoints", 2, _payload(2, "resumed at 1"))
    _damage(run / "checkpoints" / "step_2" / "rank_00000.pt")
    assert find_checkpoint("auto", run) == run / "checkpoints" / "step_1"


def test_a_checkpoint_without_manifest_from_before_digests_loads_with_a_warning(tmp_path,
                                                                                capsys):
    from megatron_dsv3.train.checkpoint import find_checkpoint

    step_dir = _saved_run(tmp_path, steps=(1,)) / "checkpoints" / "step_1"
    (step_dir / "manifest.json").unlink()  # what the code before manifests wrote
    meta = json.loads((step_dir / "meta.json").read_text())
    del meta["manifest_format"]
    (step_dir / "meta.json").write_text(json.dumps(meta))
    assert find_checkpoint("auto", tmp_path) == step_dir
    err = capsys.readouterr().err
    assert "has no manifest.json" in err and "cannot be verified" in err, err


def test_load_refuses_a_checkpoint_holding_nan_naming_the_file_and_tensor(tmp_path):
    """The last check, for files no digest protects (written before manifests, or NaN already
    when hashed): every floating tensor of the model and AdamW state must be finite."""
    from megatron_dsv3.train.args import TrainError
    from megatron_dsv3.train.checkpoint import load_checkpoint
    from megatron_dsv3.train.step import Run

    step_dir = tmp_path / "step_1"
    step_dir.mkdir()
    payload = _payload(1, "nan")
    payload["optimizer"]["state"][0]["exp_avg"][7] = float("inf")
    torch.save(payload, step_dir / "rank_00000.pt")
    model = torch.nn.Linear(2, 2)
    run = Run(args=None, cfg=None, pg=None, device=torch.device("cpu"), model=model,
              optimizer=torch.optim.AdamW(model.parameters()), corpus=None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TrainError) as err:
        load_checkpoint(run, step_dir)
    message = str(err.value)
    assert str(step_dir / "rank_00000.pt") in message and "optimizer.state.0.exp_avg" in message
    assert run.step == 0
    for key, tensor in model.state_dict().items():
        assert_equal(tensor, before[key], key)


# ----------------------------------------------------------------------------------------------
# 2. non-finite weights are never saved
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where, name", [
    (lambda p: p["model"]["layer.weight"].__setitem__(5, float("nan")), "model.layer.weight"),
    (lambda p: p["optimizer"]["state"][0]["exp_avg"].__setitem__(0, float("-inf")),
     "optimizer.state.0.exp_avg"),
], ids=["nan-weight", "inf-adam-state"])
def test_save_refuses_non_finite_state_and_leaves_latest(where, name, tmp_path):
    from megatron_dsv3.train.args import TrainError
    from megatron_dsv3.train.checkpoint import save_checkpoint

    checkpoints = _saved_run(tmp_path, steps=(1,)) / "checkpoints"
    payload = _payload(2, "diverged")
    where(payload)
    with pytest.raises(TrainError) as err:
        save_checkpoint(checkpoints, 2, payload)
    message = str(err.value)
    assert "step 2" in message and name in message and "NaN or Inf" in message, message
    assert (checkpoints / "latest").read_text().strip() == "step_1"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_1"]


def _two_ranks(rank: int, world: int, out: str):
    """On 2 gloo ranks: a checkpoint damaged on rank 1 only, then a NaN on rank 1 only."""
    import torch.distributed as dist

    from megatron_dsv3.train.args import TrainError
    from megatron_dsv3.train.checkpoint import find_checkpoint, save_checkpoint

    dist.init_process_group("gloo")
    try:
        checkpoints = Path(out) / "checkpoints"
        for step in (1, 2):
            save_checkpoint(checkpoints, step, _payload(step, f"rank {rank}"), rank=rank)
        if rank == 1:
            _damage(checkpoints / "step_2" / "rank_00001.pt")
        dist.barrier()
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            chosen = find_checkpoint("auto", Path(out))
        payload = _payload(3, "diverged")
        if rank == 1:
            payload["model"]["layer.weight"][0] = float("nan")
        try:
            save_checkpoint(checkpoints, 3, payload, rank=rank)
            refused = None
        except TrainError as error:
            refused = str(error)
        return {"chosen": chosen, "stderr": err.getvalue(), "refused": refused,
                "latest": (checkpoints / "latest").read_text().strip(),
                "folders": sorted(p.name for p in checkpoints.iterdir())}
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_ranks_agree_on_the_fallback_and_on_refusing_a_nan_seen_by_one_rank(tmp_path):
    """Rank 0's files are intact: it must still leave step_2 with rank 1 (each rank checks its
    own file); and rank 1's NaN must stop rank 0's save too (no rank left waiting)."""
    results = run_gloo(_two_ranks, 2, str(tmp_path))
    for rank, result in enumerate(results):
        assert result["chosen"] == tmp_path / "checkpoints" / "step_1", (rank, result)
        assert result["refused"] and "rank 1's model.layer.weight" in result["refused"], result
        assert result["latest"] == "step_2" and result["folders"] == ["latest", "step_1",
                                                                       "step_2"], result
    assert "rank_00001.pt: its contents differ" in results[0]["stderr"], results[0]["stderr"]
    assert results[1]["stderr"] == ""  # warnings come from rank 0 only


# ----------------------------------------------------------------------------------------------
# 3. a crash at any point of a save leaves a complete checkpoint to resume from
# ----------------------------------------------------------------------------------------------
class _CrashAt:
    """Stands in for os.replace / shutil.rmtree: the k-th call raises (an rmtree first deletes
    one file of the tree, as a crash half-way through would)."""

    def __init__(self, real, k: int):
        self.real, self.k, self.calls = real, k, 0

    def __call__(self, path, *args, **kwargs):
        self.calls += 1
        if self.calls == self.k:
            if self.real is shutil.rmtree and Path(path).is_dir():
                for file in sorted(Path(path).iterdir())[:1]:
                    file.unlink()
            raise OSError(f"injected crash at call {self.k} of {self.real.__name__}({path})")
        return self.real(path, *args, **kwargs)


@pytest.mark.parametrize("target", ["os.replace", "shutil.rmtree"])
@pytest.mark.parametrize("step, allowed", [
    (2, {"step 2", "step 2 again"}),    # a re-save of the step `latest` names
    (3, {"step 2", "step 3"}),          # a new step, over the staging folder of a crashed save
], ids=["re-save-latest", "new-step"])
def test_a_crash_at_any_point_of_a_save_leaves_a_complete_checkpoint(target, step, allowed,
                                                                      tmp_path, monkeypatch):
    from megatron_dsv3.train.checkpoint import (find_checkpoint, save_checkpoint,
                                                verify_checkpoint)

    module, name = target.split(".")
    real = getattr({"os": os, "shutil": shutil}[module], name)
    for k in range(1, 20):
        run = _saved_run(tmp_path / f"crash_{k}", steps=(1, 2))
        if step == 3:
            (run / "checkpoints" / "step_3.tmp").mkdir()
            (run / "checkpoints" / "step_3.tmp" / "rank_00000.partial").write_bytes(b"half")
        crash = _CrashAt(real, k)
        monkeypatch.setattr(f"{target}", crash)
        try:
            save_checkpoint(run / "checkpoints", step, _payload(step, f"step {step}"
                                                                + (" again" if step == 2 else "")))
            crashed = False
        except OSError:
            crashed = True
        finally:
            monkeypatch.setattr(f"{target}", real)
        if not crashed:
            assert k > crash.calls >= 1, (k, crash.calls)
            break
        with contextlib.redirect_stderr(io.StringIO()):
            chosen = find_checkpoint("auto", run)
        assert verify_checkpoint(chosen) == [], (k, chosen)
        assert _tag(chosen) in allowed, (target, k, chosen, _tag(chosen))
        # the resumed run saves the same step again: it completes and cleans up
        save_checkpoint(run / "checkpoints", step, _payload(step, "resumed"))
        assert find_checkpoint("auto", run) == run / "checkpoints" / f"step_{step}"
        assert _tag(run / "checkpoints" / f"step_{step}") == "resumed"
        assert not list((run / "checkpoints").glob("*.tmp")), k
    else:
        pytest.fail(f"the save never completed: {target} raised at every call up to 19")


# ----------------------------------------------------------------------------------------------
# 4. a run folder holds one run
# ----------------------------------------------------------------------------------------------
def _metrics(out: Path, steps: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n"
                                               for s in range(1, steps + 1)))


@pytest.mark.parametrize("held, expected", [
    (lambda out: _metrics(out, 12), "metrics.jsonl with 12 steps"),
    (lambda out: _saved_run(out, steps=(4,)), "checkpoints/ with latest, step_4"),
], ids=["metrics", "checkpoints"])
def test_a_folder_holding_a_run_is_refused_without_resume(held, expected, tmp_path):
    from megatron_dsv3.train.args import TrainError
    from megatron_dsv3.train.checkpoint import check_out_dir

    held(tmp_path)
    with pytest.raises(TrainError) as err:
        check_out_dir(tmp_path, None, None)
    message = str(err.value)
    for part in (str(tmp_path), expected, "--resume auto", "new --out-dir"):
        assert part in message, message


def test_resume_auto_in_a_folder_with_run_files_but_no_checkpoint_is_refused(tmp_path):
    from megatron_dsv3.train.args import TrainError
    from megatron_dsv3.train.checkpoint import check_out_dir, find_checkpoint

    _metrics(tmp_path, 3)
    assert find_checkpoint("auto", tmp_path) is None
    with pytest.raises(TrainError) as err:
        check_out_dir(tmp_path, "auto", None)
    message = str(err.value)
    assert "metrics.jsonl with 3 steps" in message and "no checkpoint" in message, message
    assert "new --out-dir" in message, message


@pytest.mark.parametrize("folder", ["missing", "empty", "stopped-before-step-1"])
def test_resume_auto_in_an_empty_or_missing_folder_starts_fresh(folder, tmp_path):
    """What a requeued job's first start meets; `--resume auto` there starts from step 0."""
    from megatron_dsv3.train.checkpoint import check_out_dir, find_checkpoint

    out = tmp_path / "run"
    if folder != "missing":
        out.mkdir()
    if folder == "stopped-before-step-1":
        (out / "metrics.jsonl").write_text("")
        (out / "checkpoints").mkdir()
    assert find_checkpoint("auto", out) is None
    check_out_dir(out, "auto", None)
    check_out_dir(out, None, None)


def test_resuming_another_folders_checkpoint_into_a_run_folder_is_refused(tmp_path):
    from megatron_dsv3.train.args import TrainError
    from megatron_dsv3.train.checkpoint import check_out_dir, find_checkpoint

    source = _saved_run(tmp_path / "a", steps=(1,))
    _metrics(tmp_path / "b", 2)
    step_dir = find_checkpoint(str(source), None)
    check_out_dir(source, str(source), step_dir)           # continuing its own run: fine
    check_out_dir(tmp_path / "c", str(source), step_dir)   # into a new folder: fine
    with pytest.raises(TrainError) as err:
        check_out_dir(tmp_path / "b", str(source), step_dir)
    assert "another folder" in str(err.value) and "--resume auto" in str(err.value)


# ----------------------------------------------------------------------------------------------
# The job: items 1, 3, 4, 5 and 6 through main()
# ----------------------------------------------------------------------------------------------
def _job(rank: int, world: int, argv: list[str], forbid_work: bool) -> dict:
    """main(argv) on this rank; its exit code and what it wrote to stderr. forbid_work: reading
    the corpus or building the model fails the test (a refusal must come before them)."""
    from megatron_dsv3.train import job

    if forbid_work:
        def work(*args, **kwargs):
            raise AssertionError("the job read the corpus or built the model before refusing")

        job.load_data = job.build_initial_model = work
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return {"code": 0, "summary": job.main(argv), "stderr": err.getvalue()}
        except SystemExit as stop:
            return {"code": stop.code, "summary": None, "stderr": err.getvalue()}


def _run_job(corpus: Path, out: Path, *flags: str, forbid_work: bool = False) -> dict:
    argv = TINY_JOB + ["--data-dir", str(corpus), "--out-dir", str(out), *flags]
    return run_gloo(_job, 1, argv, forbid_work)[0]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, corpus) -> Path:
    """3 steps of the tiny job, checkpointed after each, W&B offline. Tests work on copies."""
    out = tmp_path_factory.mktemp("tiny_run")
    result = _run_job(corpus, out)
    assert result["code"] == 0, result["stderr"]
    return out


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to, symlinks=True)
    return to


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.multiprocess
def test_job_resumes_past_a_damaged_latest_and_repeats_the_run_bit_for_bit(tiny_run, corpus,
                                                                           tmp_path):
    """step_3 damaged: the job resumes from step_2 with a warning, trains step 3 again to the
    same loss and re-saves step_3 (the step `latest` names) bit for bit as the first time."""
    run = _copy(tiny_run, tmp_path / "run")
    _damage(run / "checkpoints" / "step_3" / "rank_00000.pt")
    result = _run_job(corpus, run, "--resume", "auto", "--no-wandb")
    assert result["code"] == 0, result["stderr"]
    assert f"skipped {run / 'checkpoints' / 'step_3'}" in result["stderr"], result["stderr"]
    assert result["summary"]["steps"] == [3]
    assert result["summary"]["losses"] == [_records(tiny_run)[2]["loss"]]
    expected = torch.load(tiny_run / "checkpoints" / "step_3" / "rank_00000.pt",
                          weights_only=False)
    actual = torch.load(run / "checkpoints" / "step_3" / "rank_00000.pt", weights_only=False)
    for key, tensor in expected["model"].items():
        if isinstance(tensor, torch.Tensor):
            assert_equal(actual["model"][key], tensor, key)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_3"


@pytest.mark.multiprocess
def test_job_refuses_to_start_over_a_run_folder_before_any_work(tiny_run, corpus, tmp_path):
    run = _copy(tiny_run, tmp_path / "run")
    before = (run / "metrics.jsonl").read_text()
    result = _run_job(corpus, run, "--no-wandb", forbid_work=True)
    assert result["code"] == 2, result["stderr"]
    for part in (f"--out-dir {run} holds a run", "metrics.jsonl with 3 steps", "--resume auto",
                 "new --out-dir"):
        assert part in result["stderr"], result["stderr"]
    assert "Traceback" not in result["stderr"]
    assert (run / "metrics.jsonl").read_text() == before
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_3"


@pytest.mark.multiprocess
def test_job_refuses_another_config_from_meta_json_before_building_the_model(tiny_run, corpus):
    result = _run_job(corpus, tiny_run, "--resume", "auto", "--num-layers", "2", "--no-wandb",
                      forbid_work=True)
    assert result["code"] == 2, result["stderr"]
    assert "it was written by a different run" in result["stderr"], result["stderr"]
    assert "'num_layers': checkpoint 3, now 2" in result["stderr"], result["stderr"]


def _wandb_files(run: Path) -> list[Path]:
    return sorted(p for p in (run / "wandb").glob("*/run-*.wandb")
                  if not p.parent.is_symlink())


@pytest.mark.multiprocess
def test_wandb_history_is_complete_after_a_kill_and_resume(tiny_run, corpus, tmp_path):
    """kill -9 leaves the .wandb file a prefix of its records (measured: whole 32 KiB blocks;
    here cut after step 1's history record). The resumed run (offline: a new .wandb file of the
    same W&B run) logs steps 2 and 3 again from metrics.jsonl before its own 4 and 5, so the
    run's files together hold each step once, with the values of metrics.jsonl. Read back with
    the reader of wandb's file format in metrics_log (wandb 0.31 has no offline reader; the
    reader is checked here against the complete file of the first run)."""
    from megatron_dsv3.train.metrics_log import history_row, read_wandb_log, wandb_history

    (first,) = _wandb_files(tiny_run)
    expected = {r["step"]: r["loss"] for r in _records(tiny_run)}
    assert {row["_step"]: row["loss"] for row in wandb_history(first)} == expected

    run = _copy(tiny_run, tmp_path / "run")
    (killed,) = _wandb_files(run)
    cut = next(end for end, record in read_wandb_log(killed)
               if record.WhichOneof("record_type") == "history"
               and history_row(record)["_step"] == 1)
    killed.write_bytes(killed.read_bytes()[:cut])
    assert [row["_step"] for row in wandb_history(killed)] == [1]

    result = _run_job(corpus, run, "--resume", "auto", "--steps", "5")
    assert result["code"] == 0, result["stderr"]
    assert "logged steps 2-3 again" in result["stderr"], result["stderr"]
    rows = [row for path in _wandb_files(run) for row in wandb_history(path)]
    assert sorted(row["_step"] for row in rows) == [1, 2, 3, 4, 5]
    records = {r["step"]: r["loss"] for r in _records(run)}
    assert {row["_step"]: row["loss"] for row in rows} == records
    assert {step: records[step] for step in (1, 2, 3)} == expected
