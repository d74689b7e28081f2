"""Running a Triton kernel's check on the CPU, in Triton's interpreter.

The interpreter is chosen when a kernel is defined (at import of its module), so a check runs
in a process started with TRITON_INTERPRET=1 in which no kernel module was imported before;
it prints "ok" when every assertion held.

Why a worker: each check in its own fresh interpreter paid ~3.7 s of importing torch and Triton
on the suite's 2 cores, five checks ~18 s. One worker process (TRITON_INTERPRET=1) imports
torch and Triton once and forks a child per check: the child imports the kernel modules and
runs the script, so a check still starts from a process in which no other check ran (patches
of Triton's interpreter, imported kernels, RNG state stay in that child).
"""

from __future__ import annotations

import atexit
import os
import struct
import subprocess
import sys
from typing import Optional

import pytest

# The worker: reads (timeout, script) frames from stdin, runs each script in a forked child
# with its stdout and stderr captured, answers (exit code, output).
_WORKER = r'''
import os, signal, struct, sys, traceback
import torch, triton  # noqa: F401  the imports every check shares, under TRITON_INTERPRET=1
import triton.runtime.interpreter  # noqa: F401
source, sink = sys.stdin.buffer, sys.stdout.buffer
while True:
    header = source.read(12)
    if len(header) < 12:
        break
    timeout_s, length = struct.unpack("<iQ", header)
    script = source.read(length).decode()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        os.dup2(write_end, 1)
        os.dup2(write_end, 2)
        signal.alarm(timeout_s)  # SIGALRM ends a check that hangs
        code = 0
        try:
            exec(compile(script, "<triton interpreter check>", "exec"), {"__name__": "__main__"})
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    os.close(write_end)
    chunks = []
    while True:
        chunk = os.read(read_end, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read_end)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    output = b"".join(chunks)
    sink.write(struct.pack("<iQ", code, len(output)) + output)
    sink.flush()
'''

_worker: Optional[subprocess.Popen] = None


def _running_worker() -> subprocess.Popen:
    global _worker
    if _worker is None or _worker.poll() is not None:
        _worker = subprocess.Popen([sys.executable, "-c", _WORKER], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE,
                                   env={**os.environ, "TRITON_INTERPRET": "1"})
        atexit.register(_worker.kill)
    return _worker


def _read(stream, length: int) -> bytes:
    data = b""
    while len(data) < length:
        chunk = stream.read(length - len(data))
        if not chunk:
            raise RuntimeError("the Triton interpreter worker exited mid-answer")
        data += chunk
    return data


def assert_ok_in_triton_interpreter(script: str, timeout_s: int = 120) -> None:
    """Run `script` (Python source ending in print("ok")) in Triton's interpreter; fail with
    its output unless it exits 0 having printed "ok" (a check outliving `timeout_s` is ended by
    SIGALRM and fails). Skipped without Triton."""
    pytest.importorskip("triton")
    worker = _running_worker()
    body = script.encode()
    worker.stdin.write(struct.pack("<iQ", timeout_s, len(body)) + body)
    worker.stdin.flush()
    code, length = struct.unpack("<iQ", _read(worker.stdout, 12))
    output = _read(worker.stdout, length).decode(errors="replace")
    lines = output.strip().splitlines()
    assert code == 0 and lines and lines[-1] == "ok", f"exit code {code}\n{output}"
