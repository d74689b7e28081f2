"""Shared fixtures: a single-process gloo world with Megatron's parallel state (TP=1).

Multi-rank tests start their own processes with `megatron_dsv3.testing.run_gloo`.
"""

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # Megatron's jit_fuser compiles C++ on CPU
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def dist_single():
    """torch.distributed world of one (gloo) + Megatron groups; the ProcessGroupCollection."""
    from megatron_dsv3.parallel import init_distributed

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(key, None)
    return init_distributed(tensor_parallel_size=1, backend="gloo")


@pytest.fixture
def seed():
    torch.manual_seed(1234)
    return 1234
