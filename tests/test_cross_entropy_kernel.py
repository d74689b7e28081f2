"""The cross-entropy kernels (kernels/cross_entropy.py) in Triton's interpreter against
torch's cross-entropy in fp64: the loss, and the logits' gradient for a per-position loss
gradient, on a vocabulary that is not a multiple of the kernel's block, with extreme logits.
(On a GPU, tests/test_gpu.py compares them with Megatron's vocab-parallel cross-entropy in bf16,
the model's path.) Fresh random inputs each run.
"""

from __future__ import annotations

import textwrap

from helpers.triton_interpreter import assert_ok_in_triton_interpreter

_INTERPRETED = textwrap.dedent("""
    import torch
    import torch.nn.functional as F
    from megatron_dsv3.kernels import cross_entropy as ce
    seed = int(torch.randint(0, 2**31 - 1, ()))
    torch.manual_seed(seed)
    ce.BLOCK_V = 64  # several blocks per row, the last one partial
    for rows, vocab in ((5, 150), (3, 64)):
        logits = torch.randn(rows, 2, vocab) * 4
        logits[0, 0, 7] = 60.0  # one dominant logit: the online max must carry it
        target = torch.randint(0, vocab, (rows, 2))
        target[1, 1] = vocab - 1  # the last column
        grad_loss = torch.randn(rows, 2)
        leaf = logits.clone().requires_grad_()
        loss = ce.cross_entropy(leaf, target)
        loss.backward(grad_loss)
        ref_leaf = logits.double().requires_grad_()
        ref = F.cross_entropy(ref_leaf.reshape(-1, vocab), target.reshape(-1),
                              reduction="none").view(rows, 2)
        ref.backward(grad_loss.double())
        assert loss.dtype == torch.float32 and loss.shape == target.shape
        err = (loss.double() - ref).abs().max().item()
        assert err < 1e-5, (seed, "loss", err)
        # relative to the largest gradient (up to |grad_loss| ~ 4): fp32's exp and sums round
        # a few ulps (6e-8 each); an absolute 1e-6 failed once at 1.005e-6
        err = ((leaf.grad.double() - ref_leaf.grad).abs().max()
               / ref_leaf.grad.abs().max()).item()
        assert err < 1e-6, (seed, "gradient, relative", err)
    print("ok")
""")


def test_kernels_in_triton_interpreter_match_fp64():
    assert_ok_in_triton_interpreter(_INTERPRETED, timeout_s=300)
