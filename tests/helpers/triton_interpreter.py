"""Running a Triton kernel's check on the CPU, in Triton's interpreter.

The interpreter is chosen when a kernel is defined (at import of its module), so the check runs
in a fresh Python process with TRITON_INTERPRET=1; it prints "ok" when every assertion held.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def assert_ok_in_triton_interpreter(script: str, timeout_s: int = 120) -> None:
    """Run `script` (Python source ending in print("ok")) in Triton's interpreter; fail with
    its output unless it exits 0 having printed "ok". Skipped without Triton."""
    pytest.importorskip("triton")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=timeout_s)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr
