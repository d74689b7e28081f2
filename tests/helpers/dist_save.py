"""Megatron's torch_dist writer in a test process without its spawn.

At a process's first `dist_checkpointing.save`, Megatron's writer starts a multiprocessing
Manager with the 'spawn' method to collect its results: a fresh interpreter that imports the
parent's main module, ~5 s of CPU per rank on this machine (on 2 cores, 10 s of a 4-rank
test's 15). `results_queue_by_fork()` makes that queue with a forked Manager instead (the
same queue type, ~50 ms); the save is otherwise Megatron's own. Megatron keeps the queue in a
module global; a release without it is left to its own spawn.
"""

from __future__ import annotations


def results_queue_by_fork() -> None:
    import multiprocessing

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", "absent") is None:
        filesystem_async._results_queue = multiprocessing.get_context("fork").Manager().Queue()
