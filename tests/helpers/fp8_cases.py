"""What the FP8 tests share: a fresh seed for each run, the routed experts' group ends, and,
for the scripts run in Triton's interpreter, the patch that casts to E4M3 as the GPU does."""

from __future__ import annotations

import textwrap

import torch


def fresh_seed() -> int:
    """A new seed, set as torch's; tests put it in their failure messages."""
    seed = int(torch.randint(0, 2**31 - 1, ()))
    torch.manual_seed(seed)
    return seed


def group_ends(counts) -> torch.Tensor:
    """The int32 end row of each expert's group of `counts` rows."""
    return torch.tensor(counts).cumsum(0).to(torch.int32)


# The first lines of an interpreted script that casts fp32 to E4M3: the interpreter's own cast
# rounds the mantissa without carrying into the exponent (31.6 becomes 16, not 32), so it is
# replaced by torch's, round-to-nearest-even like the GPU's cvt.rn.
E4M3_CAST_LIKE_THE_GPU = textwrap.dedent("""
    import numpy as np
    import torch
    import triton.language as tl
    import triton.runtime.interpreter as interpreter

    _interpreter_convert = interpreter._convert_float

    def _cast_like_the_gpu(values, from_dtype, to_dtype, rounding):
        if from_dtype == tl.float32 and to_dtype == tl.float8e4nv:
            return torch.from_numpy(np.ascontiguousarray(values)).to(
                torch.float8_e4m3fn).view(torch.uint8).numpy()
        return _interpreter_convert(values, from_dtype, to_dtype, rounding)

    interpreter._convert_float = _cast_like_the_gpu
""")
