"""GPU kernels (Triton) with their plain PyTorch reference beside each; the reference runs
where Triton or a GPU is missing."""
