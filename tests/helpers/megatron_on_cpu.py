"""Megatron-Core's DistributedDataParallel and DistributedOptimizer on the CPU, in a child
process (one rank, gloo).

Megatron-Core 0.19.2 builds them for CUDA only (tensors made with device="cuda", a check of
`param.type()` for "torch.cuda.*", CUDA streams around the gradient reduction); the child runs
them on the CPU under a TorchFunctionMode that moves those tensors to the CPU and with the
stream calls made no-ops. A test gives the body of the child's `main()` (after the prelude:
torch and the distributed group are ready, Megatron's DDP / optimizer classes imported); the
child prints "ok" when every assertion held.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

_PRELUDE = '''
import contextlib, os, sys, tempfile
import torch
from torch.overrides import TorchFunctionMode

class _NoStream:
    def __getattr__(self, name):
        return lambda *args, **kwargs: None

class _OnCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "cuda" in str(kwargs.get("device", "")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if func is torch.Tensor.cuda:
            return args[0]
        return func(*args, **kwargs)

def main():
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.current_stream = lambda *args, **kwargs: _NoStream()
    torch.cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
    _OnCpu().__enter__()
    from megatron.core.distributed import DistributedDataParallel as DDP
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import MegatronModule
    from megatron_dsv3.parallel import init_distributed

    init_distributed(backend="gloo")
'''


def run_megatron_on_cpu(tmp_path: Path, body: str, timeout: int = 300) -> None:
    """Run `body` (the rest of the child's main(), any indentation) after the prelude in a
    fresh process of one rank; fail with its output unless it printed "ok" last."""
    script = tmp_path / "megatron_child.py"
    script.write_text(_PRELUDE + textwrap.indent(textwrap.dedent(body), "    ")
                      + '\n\nif __name__ == "__main__":\n    main()\n')
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0", "RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           # the tests' helpers importable as in the tests (tests/ on the path)
           "PYTHONPATH": os.pathsep.join(filter(None, (str(Path(__file__).parents[1]),
                                                       os.environ.get("PYTHONPATH"))))}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                          timeout=timeout)
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0 and lines and lines[-1] == "ok", done.stdout + done.stderr[-4000:]
