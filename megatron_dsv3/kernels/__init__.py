"""GPU kernels (Triton) with their plain PyTorch reference beside each; the reference runs
where Triton or a GPU is missing.

  grad_accumulate.py  a bf16 gradient added into its fp32 sum at memory speed
  adamw.py            AdamW on an fp32 master that also writes its bf16 copy and zeroes its
                      gradient, in one pass
  grouped_wgrad.py    the routed experts' weight gradients added into fp32 sums inside the
                      grouped GEMM (a torch custom op)
  grouped_gemm.py     the routed experts' bf16 grouped GEMM for the forward and input
                      gradient (experts_impl='triton'; a torch custom op with autograd); the
                      reference is torch matmuls per expert
  cross_entropy.py    cross-entropy over the whole vocabulary in one read of the logits
                      forward and one read and write backward (the model's on a GPU without
                      tensor parallelism); the reference is Megatron's
  fp8_quantize.py     FP8 quantization in one pass per tile (1x128, 128x1 transposed,
                      128x128); the references are fp8/quantize.py
  fp8_grouped_gemm.py the routed experts' grouped FP8 GEMM (rows sorted by expert, per-expert
                      128x128 weight blocks, FP32 promotion per 128-wide K block); the
                      reference is fp8/grouped_gemm.py's emulation
"""
