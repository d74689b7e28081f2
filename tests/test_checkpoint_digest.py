"""Digest manifests of Megatron's checkpoint folders (checkpoint/digest.py, pretrain.py's hooks
around Megatron's save and load): Megatron's loader checks no checksum, and 4 KiB of random
bytes written into a saved tensor file loaded without a word.

  * a folder's manifest, then each kind of damage named: changed bytes, a truncated file, a
    missing file, an unreadable manifest; no manifest is "unverifiable", not damage;
  * on 2 gloo ranks, our model saved by Megatron's dist_checkpointing at TP=2 in Megatron's
    folder layout: the manifest the save hook writes (every rank hashing a share) verifies;
    after random bytes in the largest file every rank refuses the load with the same
    CorruptCheckpoint naming that file and --ckpt-step; --ckpt-step picks the folder checked;
  * the wrappers around the save and load Megatron's loop calls run the hooks at the right
    moment, once however often they are installed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers.dist_save import results_queue_by_fork
from helpers.gloo import run_gloo
from megatron_dsv3.checkpoint.digest import (MANIFEST, verify_folder_manifest,
                                             write_folder_manifest)


def _write_random(path: Path, size: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(torch.randint(0, 256, (size,), generator=g, dtype=torch.uint8).numpy()
                     .tobytes())


def _overwrite(path: Path, offset: int, count: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        original = f.read(count)
        f.seek(offset)
        f.write(bytes(b ^ 0x5A for b in original))  # every byte changed


def test_a_folders_manifest_names_each_kind_of_damage(tmp_path):
    folder = tmp_path / "iter_0000007"
    for i, name in enumerate(["__0_0.distcp", "__1_0.distcp", "common.pt", "sub/extra.bin"]):
        _write_random(folder / name, 10_000 + 977 * i, seed=i)
    assert verify_folder_manifest(folder) is None  # no manifest: unverifiable, not damaged
    write_folder_manifest(folder)
    listed = json.loads((folder / MANIFEST).read_text())["files"]
    assert sorted(listed) == ["__0_0.distcp", "__1_0.distcp", "common.pt", "sub/extra.bin"]
    assert verify_folder_manifest(folder) == []

    _overwrite(folder / "__1_0.distcp", 5_000, 4096)
    os.truncate(folder / "common.pt", 100)
    (folder / "sub" / "extra.bin").unlink()
    assert verify_folder_manifest(folder) == [
        "__1_0.distcp does not match its digest (its bytes changed since the save)",
        "common.pt has 100 bytes, 11954 when saved",
        "sub/extra.bin is missing"]
    (folder / MANIFEST).write_text("{not json")
    (problem,) = verify_folder_manifest(folder)
    assert problem.startswith(f"{MANIFEST} is unreadable")


def _save_corrupt_and_load(rank: int, world_size: int, root: str):
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from helpers.small_model import small_config
    from megatron_dsv3.config import to_megatron_config
    from megatron_dsv3.model import build_model
    from megatron_dsv3.parallel import init_distributed
    from megatron_dsv3.pretrain import (CorruptCheckpoint, manifest_after_save,
                                        verify_before_load)

    torch.cuda.synchronize = lambda *args, **kwargs: None  # Megatron's torch_dist writer
    torch.cuda.current_device = lambda: "cpu"  # assumes CUDA (this process only)
    pg = init_distributed(tensor_parallel_size=2, backend="gloo")
    results_queue_by_fork()
    cfg = small_config()
    torch.manual_seed(0)
    model = build_model(cfg, pg_collection=pg, megatron_config=to_megatron_config(
        cfg, use_cpu_initialization=True))
    args = SimpleNamespace(save=root, load=root, async_save=False, ckpt_step=None)
    for iteration in (10, 20):
        folder = Path(root) / f"iter_{iteration:07d}"
        if rank == 0:
            folder.mkdir(parents=True)
        dist.barrier()
        dist_checkpointing.save(model.sharded_state_dict(), str(folder))
        manifest_after_save(args, iteration, non_persistent=False)
        if rank == 0:
            (Path(root) / "latest_checkpointed_iteration.txt").write_text(str(iteration))
        dist.barrier()
    verify_before_load(args, "load")  # intact

    largest = max((p for p in (Path(root) / "iter_0000020").iterdir() if p.name != MANIFEST),
                  key=lambda p: p.stat().st_size)
    if rank == 0:
        _overwrite(largest, largest.stat().st_size // 2, 4096)
    dist.barrier()
    with pytest.raises(CorruptCheckpoint) as refused:
        verify_before_load(args, "load")
    verify_before_load(SimpleNamespace(**{**vars(args), "ckpt_step": 10}), "load")  # intact
    return str(refused.value), largest.name


@pytest.mark.multiprocess
def test_megatron_checkpoints_are_verified_on_every_rank_before_a_load(tmp_path):
    (message, largest), (other, _) = run_gloo(_save_corrupt_and_load, 2, str(tmp_path / "ckpt"))
    assert message == other  # every rank stops, with the same reason
    assert message == (
        f"--load {tmp_path / 'ckpt'}: iter_0000020 does not match the digest manifest written "
        f"when it was saved: {largest} does not match its digest (its bytes changed since the "
        "save). Resume from an earlier checkpoint with --ckpt-step ITERATION (its iter_* "
        "folder), or restore the folder")


def test_the_hooks_run_around_the_save_and_load_megatrons_loop_calls(monkeypatch):
    from megatron.training import training

    from megatron_dsv3.megatron_compat import around_megatron_checkpointing

    calls = []
    monkeypatch.setattr(training, "save_checkpoint",
                        lambda iteration, *a, **k: calls.append(("save", iteration)) or "saved")
    monkeypatch.setattr(training, "load_checkpoint",
                        lambda *a, **k: calls.append(("load", k.get("load_arg"))) or (5, 0.0))
    for _ in range(2):  # installed twice: each hook still runs once
        around_megatron_checkpointing(
            lambda it, local, opt: calls.append(("after", it, local, opt)),
            lambda load_arg: calls.append(("before", load_arg)),
            lambda load_arg, opt: calls.append(("loaded", load_arg, opt)))
    assert training.save_checkpoint(20, "model", "opt", None, 0.0,
                                    non_persistent_ckpt=True) == "saved"
    assert training.load_checkpoint("model", "opt", None) == (5, 0.0)
    training.load_checkpoint("model", None, None, load_arg="pretrained_checkpoint")
    assert calls == [("save", 20), ("after", 20, True, "opt"), ("before", "load"),
                     ("load", None), ("loaded", "load", "opt"),
                     ("before", "pretrained_checkpoint"), ("load", "pretrained_checkpoint"),
                     ("loaded", "pretrained_checkpoint", None)]


def test_each_iterations_schedule_runs_inside_the_context(monkeypatch):
    """around_forward_backward (pretrain: FP8 weights quantized once per iteration): every
    call of the schedule Megatron's loop gets runs inside the context, installed twice still
    once, around whichever schedule was installed before it (DualPipeV's)."""
    from contextlib import contextmanager

    from megatron.training import training

    from megatron_dsv3.megatron_compat import around_forward_backward

    events = []
    monkeypatch.setattr(training, "get_forward_backward_func",
                        lambda *a, **k: lambda **kw: events.append(("schedule", kw["n"])) or 7)

    @contextmanager
    def context():
        events.append("enter")
        yield
        events.append("exit")

    for _ in range(2):
        around_forward_backward(context)
    schedule = training.get_forward_backward_func()
    assert schedule(n=1) == 7 and schedule(n=2) == 7
    assert events == ["enter", ("schedule", 1), "exit", "enter", ("schedule", 2), "exit"]
