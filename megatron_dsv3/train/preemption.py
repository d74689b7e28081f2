"""Stopping the job cleanly on a signal: SIGTERM (SLURM preemption or time limit, torchrun
shutting its workers down, `kill`) and SIGINT (Ctrl-C).

The first such signal only records itself (`StopSignals.received`, its number). The training loop
passes it into the next optimizer step, whose one all-reduce of flags tells every rank (step.py,
step 4), so that all of them finish the same step, save the same checkpoint and exit with the
same status, `exit_status(signal)` = 128 + the signal (143 for SIGTERM, 130 for SIGINT): what a
shell reports for a process the signal ended, so that a wrapper or a `train && next` chain sees an
interrupted run, not a finished one; the checkpoint makes it resumable (`--resume auto`), and
SLURM's requeue does not depend on it.

Later signals are ignored while the job stops: a worker usually gets the signal twice, once from
SLURM (which signals every process of the step) or the terminal (Ctrl-C reaches the whole
foreground group) and once more from torchrun, which forwards the signal it got to its workers.
Were the second one to end the process, the save would never happen under torchrun. To stop at
once, send SIGKILL, or SIGQUIT (Ctrl-\\), whose default Python leaves in place.

Why SIGINT too: a checkpoint of the last step is what an interactive user wants as well, and
under torchrun a Ctrl-C reaches the workers as SIGINT.

Time: the save starts after the step in flight (and after the next one, when the signal arrives
in the short interval between a step's flag exchange and its end), then the checkpoint is
written. SLURM's KillWait (30 s by default; `sbatch --signal=TERM@<seconds>` sends it earlier)
and torchrun's 30 s before SIGKILL must cover that.

Before the training loop (during set-up) and after it, the default handlers apply: the process
ends at once, with nothing to save yet, or with everything saved. Signal handlers can only be
installed from the main thread; elsewhere `StopSignals` installs none and the job stops as it did
before these handlers existed.
"""

from __future__ import annotations

import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_status(signum: int) -> int:
    """The exit status of a job stopped by signal `signum`: 128 + signum, the shell's own."""
    return 128 + signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class StopSignals:
    """Context manager: while inside, the first SIGTERM/SIGINT sets `received` (its number, 0
    until then) instead of ending the process, and later ones are ignored. The previous
    handlers are restored on exit."""

    def __init__(self, signals: tuple = STOP_SIGNALS):
        self.signals = signals
        self.received = 0
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _handle(self, signum: int, frame) -> None:
        if not self.received:  # a repeat, often the launcher forwarding it: already stopping
            self.received = signum

    def _restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}


__all__ = ["STOP_SIGNALS", "StopSignals", "exit_status", "signal_name"]
