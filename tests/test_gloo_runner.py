"""helpers.gloo.run_gloo, the multi-rank tests' runner: results in rank order from processes in
which no earlier call has run, and a failure on any rank reported with what every rank did
(raised, exited without a word, still running) instead of a hung or silent test."""

import os
import time

import pytest
import torch

from helpers import gloo
from helpers.gloo import run_gloo

pytestmark = pytest.mark.multiprocess

_CALLS_SEEN: list[int] = []  # each call appends its rank: a fresh process finds only its own


def _all_reduce_rank(rank: int, world: int) -> dict:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    _CALLS_SEEN.append(rank)
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)
    dist.destroy_process_group()
    return {"rank": rank, "total": total, "seen": list(_CALLS_SEEN),
            "threads": torch.get_num_threads(), "cuda": os.environ["CUDA_VISIBLE_DEVICES"]}


def test_results_come_back_in_rank_order_from_fresh_single_threaded_processes():
    for _ in range(2):
        results = run_gloo(_all_reduce_rank, 3)
        assert [r["rank"] for r in results] == [0, 1, 2]
        for rank, result in enumerate(results):
            assert result["total"].item() == 1 + 2 + 3
            assert result["seen"] == [rank], "a rank saw what an earlier call left behind"
            assert (result["threads"], result["cuda"]) == (1, "")


def _rank_1_raises(rank: int, world: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    if rank == 1:
        raise ValueError("rank 1 fails on purpose")
    dist.barrier()  # waits for a peer that is gone


def _rank_0_exits_rank_1_sleeps(rank: int, world: int) -> None:
    if rank == 0:
        os._exit(3)
    time.sleep(60)


def _rank_0_sleeps(rank: int, world: int) -> None:
    if rank == 0:
        time.sleep(60)


def test_a_failing_rank_fails_the_call_naming_every_rank(monkeypatch):
    monkeypatch.setattr(gloo, "GRACE_S", 0.5)
    with pytest.raises(RuntimeError) as err:
        run_gloo(_rank_1_raises, 2)
    message = str(err.value)
    assert "rank 1 raised" in message and "ValueError: rank 1 fails on purpose" in message
    assert "rank 0 " in message, message  # its own error, or killed after the grace period

    start = time.monotonic()
    with pytest.raises(RuntimeError) as err:
        run_gloo(_rank_0_exits_rank_1_sleeps, 2)
    message = str(err.value)
    assert "rank 0 exited with code 3 without reporting" in message, message
    # the other rank is killed after the grace period, its stack quoted from faulthandler
    assert "rank 1 still running" in message and "in _rank_0_exits_rank_1_sleeps" in message
    assert time.monotonic() - start < 10


def test_a_call_outliving_its_timeout_is_killed_with_the_hung_ranks_stack():
    start = time.monotonic()
    with pytest.raises(RuntimeError) as err:
        run_gloo(_rank_0_sleeps, 2, timeout_s=1.0)
    message = str(err.value)
    assert "rank 0 still running after timeout_s=1 (killed)" in message, message
    assert "in _rank_0_sleeps" in message and "rank 1: ok" in message
    assert time.monotonic() - start < 10
