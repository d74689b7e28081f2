"""GPU fast paths against their references (skipped without CUDA; CI has no GPU).

  * SDPA (cuDNN / flash) attention core vs the plain reference, bf16;
  * the whole model compiled (`compile_model`, with and without CUDA graphs) vs eager, fp32,
    over two optimizer steps, so that graph replays see the updated weights;
  * the Triton kernels (kernels/) vs PyTorch, bit for bit.
"""

import pytest
import torch

from helpers.tolerance import BF16, FP32_REORDER, HOPPER_FP8_ACCUMULATION, assert_close

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_sdpa_attention_matches_reference_in_bf16():
    from megatron_dsv3.attention.core import reference_attention, sdpa_attention

    torch.manual_seed(0)
    q, k = (torch.randn(2, 4, 256, 192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(2, 4, 256, 128, device="cuda", dtype=torch.bfloat16)
    scale = 192 ** -0.5
    assert_close(sdpa_attention(q, k, v, scale).float(), reference_attention(q, k, v, scale).float(),
                 BF16, "bf16 outputs; the fused kernels keep the softmax in fp32 like the reference")


def _small_gpu_config():
    from megatron_dsv3.config import tiny

    return tiny().replace(hidden_size=256, mla__num_heads=4, moe__num_experts=16,
                          moe__num_groups=4, moe__topk_groups=2, moe__top_k=4)


def _train_two_steps(model, cfg, input_ids, labels):
    from megatron_dsv3.mtp import mtp_loss

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses, grads = [], None
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        out = model(input_ids, None, None, labels=labels)
        loss = out.lm_loss.mean() + mtp_loss(out.mtp_losses, out.mtp_valid, 0.3)
        loss.backward()
        losses.append(loss.detach().clone())
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        optimizer.step()
    return torch.stack(losses), grads


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_compiled_model_matches_eager_over_two_steps(dist_single, mode):
    from megatron_dsv3.config import to_megatron_config
    from megatron_dsv3.model import build_model, compile_model
    from megatron_dsv3.moe.balance import set_balance_loss_scale

    cfg = _small_gpu_config()
    torch.manual_seed(0)
    megatron_cfg = to_megatron_config(cfg, use_cpu_initialization=True)
    eager = build_model(cfg, pg_collection=dist_single, megatron_config=megatron_cfg).cuda()
    compiled = build_model(cfg, pg_collection=dist_single, megatron_config=megatron_cfg).cuda()
    compiled.load_state_dict(eager.state_dict())
    for model in (eager, compiled):
        set_balance_loss_scale(model, 1.0)  # one micro-batch per step
    compile_model(compiled, scope="modules", **({"mode": mode} if mode else {}))
    input_ids = torch.randint(0, cfg.vocab_size, (2, 64), device="cuda")
    labels = torch.randint(0, cfg.vocab_size, (2, 64), device="cuda")

    loss_e, grads_e = _train_two_steps(eager, cfg, input_ids, labels)
    loss_c, grads_c = _train_two_steps(compiled, cfg, input_ids, labels)
    why = "fp32; inductor fuses and reorders the elementwise work around the same GEMMs"
    assert_close(loss_c, loss_e, FP32_REORDER, why, "losses")
    for name, grad in grads_e.items():
        assert_close(grads_c[name], grad, 1e-4, why + " (gradients after an update: 1e-4)",
                     name)


def test_tracer_times_ops_on_the_device_without_synchronizing():
    """The GPU tracer records CUDA events: spans come back ordered, within the step, each as
    long as its kernels (a 16k^2 matmul chain takes milliseconds; the host returns from
    `span` long before), and a deliberate host sleep between ops shows up as idle time."""
    import time

    from megatron_dsv3.pipeline.trace import FORWARD, ScheduledOp, Tracer

    tracer = Tracer()
    x = torch.randn(8192, 8192, device="cuda")
    y = x @ x                     # cuBLAS initialised before the timed spans
    torch.cuda.synchronize()
    tracer.begin(None, torch.device("cuda"), schedule="test", rank=0)
    host = []
    for k in range(3):
        start = time.perf_counter()
        with tracer.span(ScheduledOp(FORWARD, 0, k)):
            for _ in range(4):
                y = x @ x
        host.append(time.perf_counter() - start)
        torch.cuda.synchronize()
        time.sleep(0.02)          # the device idles here
    tracer.finish()
    events = tracer.events
    assert [e.microbatch for e in events] == [0, 1, 2]
    assert all(0 <= a.start < a.end <= b.start for a, b in zip(events, events[1:]))
    assert events[-1].end <= tracer.duration()
    durations = [e.end - e.start for e in events]
    assert min(durations) > 1e-3 and max(host) < min(durations), (durations, host)
    assert tracer.bubble_fraction() * tracer.duration() > 2 * 0.02
    del y


def test_grad_accumulate_kernel_is_bit_identical_to_torch_add():
    from megatron_dsv3.kernels.grad_accumulate import add_into_fp32_, uses_kernel

    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    for shape, dtype in (((64, 2816, 2048), torch.bfloat16), ((3000, 2801), torch.float16)):
        total = torch.randn(shape, device="cuda") * 100
        grad = torch.randn(shape, device="cuda").to(dtype)
        assert uses_kernel(total, grad)
        expected = total.clone().add_(grad)
        assert torch.equal(add_into_fp32_(total, grad), expected)
        assert torch.equal(add_into_fp32_(total, grad, store=True), grad.float())


@pytest.mark.parametrize("moments", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_adamw_kernel_matches_its_reference(moments):
    from megatron_dsv3.kernels.adamw import adamw_reference, launch_adamw, uses_kernel

    seed = int(torch.randint(0, 2**31 - 1, ()))
    torch.manual_seed(seed)
    n = 3 * 2**20 + 17
    tensors = [torch.randn(n, device="cuda"), torch.randn(n, device="cuda"),
               (torch.randn(n, device="cuda") * 0.1).to(moments),
               (torch.rand(n, device="cuda") * 0.01).to(moments),
               torch.zeros(n, device="cuda", dtype=torch.bfloat16)]
    copies = [t.clone() for t in tensors]
    assert uses_kernel(tensors)
    hyper = dict(step=3, lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1,
                 grad_scale=torch.tensor(2.5, device="cuda"))
    launch_adamw(*tensors, **hyper)
    adamw_reference(*copies, **hyper)
    if moments == torch.float32:
        for i, name in ((0, "param"), (2, "exp_avg"), (3, "exp_avg_sq")):
            a, b = tensors[i], copies[i]
            assert_close(a, b, FP32_REORDER, f"fused-multiply-add grouping (seed {seed})", name)
    else:  # a moment one fp32 ulp off may round to the next bf16 value (rarely); the update
        # then uses a moment one bf16 step apart (2^-8 relative), which on an element with a
        # large m / sqrt(v) moves the parameter by more than any fixed bound: compare the
        # parameters where both stored the same moments
        same = (tensors[2] == copies[2]) & (tensors[3] == copies[3])
        assert (~same).double().mean() < 1e-3, f"seed {seed}: {int((~same).sum())} moments"
        assert_close(tensors[0][same], copies[0][same], FP32_REORDER,
                     f"fused-multiply-add grouping, same stored moments (seed {seed})", "param")
    assert not tensors[1].any()
    assert torch.equal(tensors[4], tensors[0].to(torch.bfloat16))


@pytest.mark.parametrize("segments,accumulate", [(1, True), (3, False)])
def test_grouped_wgrad_kernel_matches_fp64_in_bf16(segments, accumulate):
    """One segment added into the sum (--expert-wgrad in-gemm) and three micro-batches' rows
    stored (--expert-wgrad step), expert 3 without rows in any."""
    from megatron_dsv3.kernels.grouped_wgrad import grouped_wgrad_segments, uses_kernel

    seed = int(torch.randint(0, 2**31 - 1, ()))
    torch.manual_seed(seed)
    counts = torch.randint(0, 700, (segments, 16))
    counts[:, 3] = 0
    ends = counts.cumsum(1).to(torch.int32).cuda()
    rows = int(counts.sum(1).max()) + 5
    grad_y = torch.randn(segments, rows, 2816, device="cuda").to(torch.bfloat16)
    x = torch.randn(segments, rows, 1408, device="cuda").to(torch.bfloat16)
    start = torch.randn(16, 2816, 1408, device="cuda")
    total = start.clone()
    assert uses_kernel(grad_y, x, total)
    grouped_wgrad_segments(grad_y, x, ends, total, accumulate=accumulate)
    expected = start.double() if accumulate else torch.zeros_like(start, dtype=torch.float64)
    for s in range(segments):
        begin = 0
        for e, end in enumerate(ends[s].tolist()):
            expected[e] += grad_y[s, begin:end].double().t() @ x[s, begin:end].double()
            begin = end
    assert_close(total, expected, FP32_REORDER, f"fp32 accumulation (seed {seed})")
    assert torch.equal(total[3], start[3] if accumulate else torch.zeros_like(start[3]))


@pytest.mark.parametrize("tiling", ["1x128", "128x1", "128x128"])
def test_fp8_quantize_kernels_are_bit_identical_to_the_references_in_bf16(tiling):
    """The one-pass Triton quantizers on bf16 activations (the interpreter on the CPU cannot
    run bf16): data and scales bit for bit, a partial tile included."""
    from megatron_dsv3.fp8 import quantize
    from megatron_dsv3.kernels import fp8_quantize

    torch.manual_seed(0)
    x = (torch.randn(4096 + 64, 2048 + 72, device="cuda") * 3).to(torch.bfloat16)
    name = {"1x128": "quantize_1x128", "128x1": "quantize_128x1", "128x128": "quantize_128x128"}
    fused = getattr(fp8_quantize, f"{name[tiling]}_fused")(x)
    reference = getattr(quantize, name[tiling])(x)
    assert fp8_quantize.uses_kernel(x)
    assert torch.equal(fused.scales, reference.scales)
    assert torch.equal(fused.data.view(torch.uint8), reference.data.view(torch.uint8))


@pytest.mark.parametrize("gemm", ["forward", "input grad", "weight grad"])
def test_fp8_gemm_on_cublas_matches_the_emulation(gemm):
    """cuBLASLt's blockwise-scaled GEMM (F.scaled_mm, DeepSeek's 1x128 / 128x128 scaling) on
    the linear's three operand pairs against fp8/gemm.py's emulation of the same FP8 operands:
    both promote every 128 elements of K to fp32; they differ in the tensor cores' narrower
    accumulator inside each block (tolerance.HOPPER_FP8_ACCUMULATION) and the order of sums."""
    from megatron_dsv3.fp8.gemm import (fp8_gemm, fp8_gemm_emulated, transposed_blocks,
                                        uses_scaled_mm)
    from megatron_dsv3.fp8.quantize import quantize_1x128, quantize_128x1, quantize_128x128

    torch.manual_seed(0)
    m, k, n = 1024, 2048, 1408
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16) * 1e-3
    a, b = {"forward": lambda: (quantize_1x128(x), quantize_128x128(w)),
            "input grad": lambda: (quantize_1x128(dy), transposed_blocks(quantize_128x128(w))),
            "weight grad": lambda: (quantize_128x1(dy), quantize_128x1(x))}[gemm]()
    assert uses_scaled_mm(a, b)
    assert_close(fp8_gemm(a, b), fp8_gemm_emulated(a, b), HOPPER_FP8_ACCUMULATION,
                 "the same FP8 products and scales, Hopper's FP8 accumulator within a block")


def test_cross_entropy_kernels_match_torchs_fp32_cross_entropy_on_bf16_logits():
    """The model's cross-entropy on a GPU (kernels/cross_entropy.py) on the proxy preset's
    logits, 4,096 x 32,768 bf16: the loss as torch's fp32 cross-entropy of the same logits (what
    Megatron's computes), the gradient its bf16 rounding."""
    import torch.nn.functional as F

    from megatron_dsv3.kernels.cross_entropy import cross_entropy, uses_kernel

    seed = int(torch.randint(0, 2**31 - 1, ()))
    torch.manual_seed(seed)
    logits = (torch.randn(4096, 32768, device="cuda") * 3).to(torch.bfloat16)
    target = torch.randint(0, 32768, (4096,), device="cuda")
    grad_loss = torch.rand(4096, device="cuda")
    assert uses_kernel(logits)
    leaf = logits.clone().requires_grad_()
    loss = cross_entropy(leaf, target)
    loss.backward(grad_loss)
    ref_leaf = logits.float().requires_grad_()
    F.cross_entropy(ref_leaf, target, reduction="none").backward(grad_loss)
    ref = F.cross_entropy(logits.float(), target, reduction="none")
    assert_close(loss, ref, FP32_REORDER, f"fp32 sums in another order (seed {seed})", "loss")
    assert leaf.grad.dtype == torch.bfloat16
    assert_close(leaf.grad.float(), ref_leaf.grad, 2.0**-8,
                 f"one rounding of the fp32 gradient to bf16 (seed {seed})", "gradient")
