"""The optimizer state a Megatron resume restores, checked against the fingerprint written at
the save (checkpoint/state_fingerprint.py, pretrain.check_resumed_optimizer).

Our AdamW (the one Megatron's loop builds) after three steps; its fingerprint written with the
checkpoint folder: the same state passes; one moment element changed, the step counter moved,
or a parameter's state missing each raise ResumeMismatch naming the state and the parameter;
a checkpoint without fingerprints, --no-load-optim and a load of another argument are not
checked, nor one saved under another parallel layout. Fresh random values each run."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from megatron_dsv3.optimizer import MegatronAdamW


def _trained_optimizer(seed: int) -> MegatronAdamW:
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(5))]
    optimizer = MegatronAdamW(params, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape)
        optimizer.step()
    return optimizer


def _saved(tmp_path: Path, optimizer) -> SimpleNamespace:
    from megatron_dsv3.pretrain import manifest_after_save

    # iteration 0: Megatron's loop sets args.iteration only when load_checkpoint has returned,
    # after the check (a check that waited for it never ran on the GPU)
    args = SimpleNamespace(save=str(tmp_path), load=str(tmp_path), async_save=False,
                           ckpt_step=None, iteration=0, no_load_optim=False, finetune=False,
                           tensor_model_parallel_size=1)
    (tmp_path / "iter_0000020").mkdir()
    (tmp_path / "iter_0000020" / "weights.bin").write_bytes(b"...")
    manifest_after_save(args, 20, False, SimpleNamespace(optimizer=optimizer))
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("20")
    return args


def test_the_restored_state_must_equal_the_saved_one(tmp_path):
    from megatron_dsv3.pretrain import ResumeMismatch, check_resumed_optimizer

    seed = int(torch.randint(0, 2**31 - 1, ()))
    optimizer = _trained_optimizer(seed)
    args = _saved(tmp_path, optimizer)
    assert (tmp_path / "iter_0000020" / "state_fingerprint.rank0.json").is_file()
    megatron = SimpleNamespace(optimizer=optimizer)  # Megatron's wrapper around it
    check_resumed_optimizer(args, "load", megatron)  # restored as saved
    first = optimizer.param_groups[0]["params"][0]
    state = optimizer.state[first]
    state["exp_avg"].view(-1)[5] += 2**-6
    with pytest.raises(ResumeMismatch, match=r"optimizer 0 exp_avg: 1 of 2 parameters \(first: "
                                             r"parameter 0"):
        check_resumed_optimizer(args, "load", megatron)
    state["exp_avg"].view(-1)[5] -= 2**-6
    check_resumed_optimizer(args, "load", megatron)
    step = state["step"]
    state["step"] = step + 1
    with pytest.raises(ResumeMismatch, match="optimizer 0 step: 1 of 2"):
        check_resumed_optimizer(args, "load", megatron)
    state["step"] = step
    del optimizer.state[optimizer.param_groups[0]["params"][1]]
    with pytest.raises(ResumeMismatch, match="optimizer 0 exp_avg: 2 parameters saved, 1 "
                                             "restored"):
        check_resumed_optimizer(args, "load", megatron)
    # not checked: no optimizer state loaded, another argument's checkpoint, another layout
    check_resumed_optimizer(SimpleNamespace(**{**vars(args), "no_load_optim": True}), "load",
                            megatron)
    check_resumed_optimizer(args, "pretrained_checkpoint", megatron)
    check_resumed_optimizer(SimpleNamespace(**{**vars(args), "tensor_model_parallel_size": 2}),
                            "load", megatron)


def test_a_fresh_start_is_not_checked(tmp_path):
    from megatron_dsv3.pretrain import check_resumed_optimizer

    args = SimpleNamespace(save=str(tmp_path), load=str(tmp_path / "none"), async_save=False,
                           ckpt_step=None, iteration=0, no_load_optim=False, finetune=False)
    check_resumed_optimizer(args, "load", SimpleNamespace(optimizer=_trained_optimizer(0)))


def test_a_checkpoint_without_fingerprints_is_not_checked(tmp_path):
    from megatron_dsv3.pretrain import check_resumed_optimizer

    optimizer = _trained_optimizer(0)
    args = _saved(tmp_path, optimizer)
    (tmp_path / "iter_0000020" / "state_fingerprint.rank0.json").unlink()
    optimizer.state.clear()
    check_resumed_optimizer(args, "load", SimpleNamespace(optimizer=optimizer))
