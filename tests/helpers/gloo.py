"""Run fn(rank, world_size, *args) on `world_size` CPU processes joined by gloo.

The multi-rank tests' runner. Each process gets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and a
MASTER_PORT of its own call, one torch thread and no CUDA device; fn initialises its own process
group from them (`parallel.init_distributed`, or `dist.init_process_group("gloo")`) and must be
a module-level function (it is pickled). Results come back in rank order as torch.save bytes:
tensors sent directly would be shared through file descriptors that die with the process.

Why a fork server: a fresh interpreter spends ~6 s of CPU importing torch and Megatron-Core
before fn starts; with dozens of calls of up to 4 processes on two cores that was most of the
suite's time. The processes are forked instead from one server process that imported those modules
once (`PRELOAD`, multiprocessing's "forkserver" start method). Every call still starts from an
interpreter in which no test has run -- nothing one call leaves behind (Megatron's global
groups, torch.distributed, RNG state, patched functions) reaches the next -- and pays a fork
instead of the imports. The server starts with the first call (or `start_server`) and ends with
the pytest process.

Failures: a rank that raises sends its traceback. A rank that exits without a word, or a call
that outlives `timeout_s`, is reported with the tail of that rank's output (for a hung rank,
after faulthandler has written its threads' stacks there). After the first failure the other
ranks get GRACE_S to report their own (a dead peer usually breaks their collectives), then the
remaining ones are killed and RuntimeError names what every rank did. Each rank's stdout and
stderr go to a file that is copied to the caller's stderr, where pytest shows it for a failing
test.
"""

from __future__ import annotations

import atexit
import faulthandler
import gc
import io
import multiprocessing as mp
import os
import signal
import socket
import sys
import tempfile
import time
import traceback
from multiprocessing import forkserver
from multiprocessing.connection import wait
from pathlib import Path
from typing import Callable, Optional

import torch

# What the ranks import that costs seconds: torch, the parts of Megatron-Core the package
# builds on, matplotlib (the training job's plots, the schedules' timelines: ~1 s). The
# package's own modules (0.2 s together) are left to each rank, so that a module that does not
# import fails only the tests that use it, with its own error.
PRELOAD = ["torch", "torch.distributed", "megatron.core.parallel_state",
           "megatron.core.tensor_parallel", "megatron.core.transformer",
           "megatron.core.models.gpt", "megatron.core.pipeline_parallel", "matplotlib.pyplot",
           "pytest"]
RANK_ENV = {"MASTER_ADDR": "127.0.0.1", "CUDA_VISIBLE_DEVICES": "", "TORCHDYNAMO_DISABLE": "1"}
GRACE_S = 5.0       # the other ranks' time to report after one failed
OUTPUT_TAIL = 4000  # characters of a silent or hung rank's output quoted in the error
SERVER_LOG = Path(tempfile.gettempdir()) / f"run_gloo-forkserver-{os.getpid()}.log"

_CONTEXT = mp.get_context("forkserver")
_CONTEXT.set_forkserver_preload(PRELOAD)
atexit.register(SERVER_LOG.unlink, missing_ok=True)


def start_server() -> None:
    """Start the fork server unless it runs: its imports take ~6 s of one core, in the
    background (conftest starts it while pytest collects). Its own output (the imports'
    warnings) goes to SERVER_LOG, not into the output of whichever test is running."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(SERVER_LOG, "a") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
        forkserver.ensure_running()
    finally:
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)


def run_gloo(fn: Callable, world_size: int, *args, timeout_s: float = 600.0) -> list:
    """fn(rank, world_size, *args) on `world_size` processes; their results in rank order."""
    start_server()
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="run_gloo-") as log_dir:
        ranks: list[_Rank] = []
        try:
            for rank in range(world_size):
                ranks.append(_Rank.start(rank, world_size, port, Path(log_dir), fn, args))
            first_failed = _collect(ranks, timeout_s)
        finally:
            for rank in ranks:
                rank.stop()
            for rank in ranks:
                rank.echo_output()
        if first_failed is not None:
            report = "\n".join(rank.report() for rank in ranks)
            raise RuntimeError(f"run_gloo({fn.__name__}, world_size={world_size}): rank "
                               f"{first_failed.rank} {first_failed.status}\n{report}")
    return [torch.load(io.BytesIO(rank.payload), weights_only=False) for rank in ranks]


class _Rank:
    """One process of a call, seen from the caller: its pipe, output file and outcome."""

    def __init__(self, rank: int, process, receiver, log: Path) -> None:
        self.rank, self.process, self.receiver, self.log = rank, process, receiver, log
        self.status: Optional[str] = None   # "ok", "raised", "exited with code ...", ...
        self.payload = None                 # torch.save bytes or the traceback
        self.reported = False

    @classmethod
    def start(cls, rank: int, world_size: int, port: int, log_dir: Path, fn: Callable,
              args: tuple) -> "_Rank":
        receiver, sender = _CONTEXT.Pipe(duplex=False)
        log = log_dir / f"rank{rank}.log"
        process = _CONTEXT.Process(target=_rank_main, name=f"gloo-rank{rank}",
                                   args=(rank, world_size, port, str(log), fn, args, sender))
        try:
            process.start()
        except (OSError, EOFError) as err:  # the server died, e.g. in its imports
            server_output = SERVER_LOG.read_text(errors="replace")[-OUTPUT_TAIL:]
            raise RuntimeError(f"the fork server did not start rank {rank} ({err!r}); its "
                               f"output ({SERVER_LOG}) ends:\n{server_output}") from err
        sender.close()  # the rank holds the only writer: its exit reads as end of file here
        return cls(rank, process, receiver, log)

    def receive(self) -> None:
        """Called when the pipe or the process is ready: a report, or an exit without one."""
        if self.receiver.poll():
            try:
                status, self.payload = self.receiver.recv()
                self.reported = True
                self.status = "ok" if status == "ok" else "raised"
                return
            except EOFError:
                pass
        self.process.join(timeout=1.0)
        self.status = f"exited with code {self.process.exitcode} without reporting"

    def stop(self) -> None:
        """Let a rank that reported exit; kill one that did not, after asking faulthandler
        for its stacks."""
        if not self.reported and self.process.is_alive():
            os.kill(self.process.pid, signal.SIGUSR1)
            self.process.join(timeout=1.0)
        else:
            self.process.join(timeout=GRACE_S)
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.receiver.close()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def echo_output(self) -> None:
        text = self.output()
        if text.strip():
            sys.stderr.write(f"----- run_gloo rank {self.rank} output -----\n{text}")

    def report(self) -> str:
        if self.status == "ok":
            return f"rank {self.rank}: ok"
        if self.status == "raised":
            return f"rank {self.rank} raised:\n{self.payload}"
        return f"rank {self.rank} {self.status}; its output ends:\n{self.output()[-OUTPUT_TAIL:]}"


def _collect(ranks: list[_Rank], timeout_s: float) -> Optional[_Rank]:
    """Wait for every rank's report, after a failure GRACE_S more for the others' reports;
    the rank that failed first, or None."""
    deadline = time.monotonic() + timeout_s
    pending, first_failed = list(ranks), None
    while pending:
        now = time.monotonic()
        if now >= deadline:
            break
        ready = wait([r.receiver for r in pending] + [r.process.sentinel for r in pending],
                     timeout=deadline - now)
        for rank in [r for r in pending if r.receiver in ready or r.process.sentinel in ready]:
            rank.receive()
            pending.remove(rank)
            if rank.status != "ok" and first_failed is None:
                first_failed = rank
                deadline = min(deadline, time.monotonic() + GRACE_S)
    for rank in pending:
        rank.status = (f"still running {GRACE_S:g} s after rank {first_failed.rank} failed "
                       "(killed)" if first_failed is not None
                       else f"still running after timeout_s={timeout_s:g} (killed)")
    return first_failed or (pending[0] if pending else None)


def _rank_main(rank: int, world_size: int, port: int, log: str, fn: Callable, args: tuple,
               sender) -> None:
    with open(log, "w") as out:  # the fork server's stdout / stderr belong to another test
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # stop() asks a hung rank
    # The half million objects of the server's imports live as long as the rank: out of the
    # collector's sight, a full collection (e.g. the benchmarks' gc.collect()) takes 0.1 ms
    # instead of 0.3 s.
    gc.freeze()
    os.environ.update(RANK_ENV, RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        buffer = io.BytesIO()
        torch.save(fn(rank, world_size, *args), buffer)
        sender.send(("ok", buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - the caller raises with every rank's traceback
        sender.send(("error", traceback.format_exc()))
    finally:
        sender.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
