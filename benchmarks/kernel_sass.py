#!/usr/bin/env python3
"""Our FP8 Triton kernels compiled for Hopper (sm_90) on this machine, no GPU needed: registers,
local memory (spills), shared memory, SASS instruction count and mix, and for the GEMMs how
many tensor-core results each K step waits for (`warp_group_dot_wait ... pendings`: 0 means
the promotion's FP32 math runs only after the step's wgmma finished).

The bf16 grouped GEMM too (kernels/grouped_gemm.py: bf16_grouped_gemm, bf16_grouped_dgrad).

  python benchmarks/kernel_sass.py                  # every kernel at its default launch config
  python benchmarks/kernel_sass.py --kernel 128x1 --config '{"BLOCK_K": 32, "num_warps": 4}'

A static view to choose what to measure on a GPU, not a measurement: the operands are
specialised as the JIT specialises contiguous torch tensors (unit inner strides, 16-byte
aligned pointers and row strides). Uses the ptxas, cuobjdump and nvdisasm that ship with
Triton.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from megatron_dsv3.kernels import (fp8_grouped_gemm, fp8_grouped_wgrad, fp8_quantize,  # noqa: E402
                                   fp8_transpose, grouped_gemm)

_TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"

_ACTIVATION = {"x_ptr": "*bf16", "data_ptr": "*fp8e4nv", "data_t_ptr": "*fp8e4nv",
               "scales_ptr": "*fp32"}


def _kernels() -> dict:
    """name -> (jit function, default launch config, constexprs besides the config, pointer
    types, 16-divisible integer arguments, unit-stride arguments)."""
    q, g = fp8_quantize, fp8_grouped_gemm
    quantize = ("M", "K", "stride_xm")
    bf16_grouped = {"E_POW2": 64, "EVEN_K": True, "EVEN_N": True}
    bf16_pointers = {"a_ptr": "*bf16", "b_ptr": "*bf16", "ends_ptr": "*i32", "out_ptr": "*bf16"}
    return {
        "1x128": (q._quantize_1x128_kernel, q.LAUNCH_CONFIG["1x128"],
                  {"POW2_SCALES": False, "TILE": 128}, _ACTIVATION, quantize, ("stride_xk",)),
        "128x1": (q._quantize_128x1_kernel, q.LAUNCH_CONFIG["128x1"],
                  {"POW2_SCALES": False, "TILE": 128}, _ACTIVATION, quantize, ("stride_xk",)),
        "128x128": (q._quantize_128x128_kernel, q.LAUNCH_CONFIG["128x128"],
                    {"POW2_SCALES": False, "TILE": 128},
                    {"w_ptr": "*bf16", "data_ptr": "*fp8e4nv", "scales_ptr": "*fp32"},
                    ("N", "K", "stride_wn"), ("stride_wk",)),
        "grouped_gemm": (g._fp8_grouped_gemm_kernel, g.LAUNCH_CONFIG,
                         {"TILE": 128, "E_POW2": 64},
                         {"a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "a_scales_ptr": "*fp32",
                          "b_scales_ptr": "*fp32", "ends_ptr": "*i32", "out_ptr": "*bf16"},
                         ("N", "K", "stride_am", "stride_be", "stride_bn", "stride_om"),
                         ("stride_ak", "stride_ask", "stride_bk", "stride_bsk", "stride_on")),
        "grouped_wgrad": (fp8_grouped_wgrad._fp8_grouped_wgrad_kernel,
                          fp8_grouped_wgrad.LAUNCH_CONFIG["wgrad"],
                          {"TILE": 128, "ACCUMULATE": True},
                          {"dy_ptr": "*fp8e4nv", "x_ptr": "*fp8e4nv", "dy_scales_ptr": "*fp32",
                           "x_scales_ptr": "*fp32", "ends_ptr": "*i32", "out_ptr": "*fp32"},
                          ("O", "I", "stride_dyo", "stride_xi", "stride_dyso", "stride_xsi",
                           "stride_oe", "stride_oo"),
                          ("stride_dyst", "stride_xst", "stride_oi")),
        # the bf16 grouped GEMM (kernels/grouped_gemm.py): forward (W [E, N, K] read as
        # W^T: unit stride along K) and input gradient (W as stored: unit stride along N)
        "bf16_grouped_gemm": (grouped_gemm._grouped_gemm_kernel, grouped_gemm.LAUNCH_CONFIG,
                              bf16_grouped, bf16_pointers,
                              ("N", "K", "stride_am", "stride_be", "stride_bn", "stride_om"),
                              ("stride_ak", "stride_bk", "stride_on")),
        "bf16_grouped_dgrad": (grouped_gemm._grouped_gemm_kernel, grouped_gemm.LAUNCH_CONFIG,
                               bf16_grouped, bf16_pointers,
                               ("N", "K", "stride_am", "stride_be", "stride_bk", "stride_om"),
                               ("stride_ak", "stride_bn", "stride_on")),
        "transpose": (fp8_transpose._transpose_bytes_kernel, fp8_transpose.LAUNCH_CONFIG, {},
                      {"src_ptr": "*u8", "dst_ptr": "*u8"}, ("R", "C"), ()),
    }


def report(name: str, config: dict | None = None) -> dict:
    kernel, defaults, constexprs, pointers, aligned, unit = _kernels()[name]
    launch = {**defaults, **(config or {})}
    options = {key: launch.pop(key) for key in ("num_warps", "num_stages") if key in launch}
    if "SCHEDULE" in launch:  # the grouped GEMM's launch option is its PER_EXPERT constexpr
        launch["PER_EXPERT"] = launch.pop("SCHEDULE") == "experts"
    constexprs = {**constexprs, **launch, **dict.fromkeys(unit, 1)}
    names = list(kernel.arg_names)
    signature = {arg: "constexpr" if arg in constexprs else pointers.get(arg, "i32")
                 for arg in names}
    attrs = {(names.index(arg),): [["tt.divisibility", 16]] for arg in (*pointers, *aligned)
             if arg in names}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs,
                                        attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.TemporaryDirectory() as folder:
        cubin = os.path.join(folder, "kernel.cubin")
        Path(cubin).write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([_TOOLS / "cuobjdump", "--dump-resource-usage", cubin],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_TOOLS / "nvdisasm", "-c", cubin], capture_output=True,
                              text=True, check=True).stdout
    ops = collections.Counter()
    for line in sass.splitlines():
        if re.match(r"\s+/\*[0-9a-f]{4}\*/", line):
            words = line.split()[1:]
            opcode = words[1] if words[0].startswith("@") else words[0]
            ops[opcode.split(".")[0].rstrip(";")] += 1
    resources = dict(re.findall(r"(REG|LOCAL|SHARED):(\d+)", usage))
    return {"kernel": name, "config": {**defaults, **(config or {})},
            "registers": int(resources.get("REG", 0)),
            "local_bytes": int(resources.get("LOCAL", 0)),
            "shared_bytes": compiled.metadata.shared, "sass_instructions": sum(ops.values()),
            "top_instructions": dict(ops.most_common(10)),
            "wgmma_waits": re.findall(r"pendings = (\d+)", compiled.asm["ttgir"])}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernel", choices=sorted(_kernels()), action="append")
    parser.add_argument("--config", type=json.loads, default=None,
                        help="launch parameters over the kernel's defaults, as JSON")
    args = parser.parse_args(argv)
    rows = [report(name, args.config) for name in args.kernel or sorted(_kernels())]
    for row in rows:
        print(json.dumps(row))
    return rows


if __name__ == "__main__":
    main()
