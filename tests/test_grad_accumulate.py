"""kernels/grad_accumulate.py: the Triton kernel that adds a bf16/fp16 gradient into an fp32
sum, run by Triton's interpreter on the CPU (a fresh process: the interpreter is chosen when
the kernel is defined), against PyTorch's add_ on fresh random inputs: bit-identical, the same
widening and one fp32 addition. On a GPU the compiled kernel is checked in test_gpu.py."""

from __future__ import annotations

import textwrap

import torch

from helpers.tolerance import assert_equal
from helpers.triton_interpreter import assert_ok_in_triton_interpreter
from megatron_dsv3.kernels import grad_accumulate
from megatron_dsv3.kernels.grad_accumulate import add_into_fp32_, uses_kernel

_INTERPRETED = textwrap.dedent("""
    import torch
    from megatron_dsv3.kernels.grad_accumulate import launch_add_into
    seed = int(torch.randint(0, 2**31 - 1, ()))
    torch.manual_seed(seed)
    # sizes: below one block, not a multiple of it, exactly two blocks, empty
    for n, dtype in ((1000, torch.bfloat16), (4096 * 2 + 77, torch.float16),
                     (8192, torch.bfloat16), (0, torch.bfloat16)):
        total = torch.randn(n) * 100
        grad = (torch.randn(n) * 1e-3).to(dtype)
        expected = total.clone().add_(grad)
        launch_add_into(total, grad)
        assert torch.equal(total, expected), (n, dtype, seed, (total - expected).abs().max())
        launch_add_into(total, grad, True)  # store: the gradient widened, the sum not read
        assert torch.equal(total, grad.float()), (n, dtype, seed, "store")
    print("ok")
""")


def test_kernel_in_triton_interpreter_is_bit_identical_to_torch_add():
    assert_ok_in_triton_interpreter(_INTERPRETED)


def test_cpu_and_mismatched_tensors_take_torch_add():
    total = torch.randn(64) * 10
    grad = torch.randn(64).to(torch.bfloat16)
    assert not uses_kernel(total, grad), "no kernel on the CPU"
    expected = total.clone().add_(grad)
    assert_equal(add_into_fp32_(total, grad), expected, "reference path")
    assert_equal(add_into_fp32_(total, grad, store=True), grad.float(), "reference store")
    # not the kernel's case even on a GPU: an fp32 gradient, a strided sum
    if grad_accumulate.triton is not None:
        assert not uses_kernel(total, grad.float())
        assert not uses_kernel(torch.zeros(8, 8).t(), torch.zeros(8, 8, dtype=torch.bfloat16))
