"""The main job: train a preset end to end on the bundled corpus (`python -m megatron_dsv3.train`,
or the `dsv3-train` script; `main(argv)` from Python).

  args.py         the command line: flags, their checks, the model config (a preset's, an
                  --init-from file's or the resumed run's); TrainError
  build.py        the device, the data (checked before the model is built), the initial model
                  (the same weights at any TP/EP size: drawn from the seed, or --init-from's
                  checked and sliced), the parameters' dtype, AdamW
  master_weights.py  bf16 parameters trained through fp32 masters and fp32 gradient sums
  step.py         one optimizer step (what it does, in six steps; a non-finite one is refused
                  before it is applied), evaluation, the metrics
  preemption.py   SIGTERM / SIGINT: every rank finishes the same step, saves it, exits 128 + signal
  pipeline.py     PP > 1: this rank's two stages and their DualPipe / DualPipeV schedule
  checkpoint.py   per-rank checkpoints with a manifest of digests, published atomically; the
                  intact one to resume from; what a resume and a run folder must match
  metrics_log.py  rank 0's outputs: metrics.jsonl, Weights & Biases, the plots
  plots.py        the two figures (matplotlib)
  job.py          set-up, the training loop, main

Reproducibility. Every random draw after initialisation is keyed or checkpointed: batches are a
pure function of (seed, step, micro-batch, dp_rank); the checkpoint holds the weights (with the
routers' `expert_bias`), the AdamW state, step, tokens seen and every RNG state. A resumed run
therefore repeats an uninterrupted one bit for bit on CPU. The initial weights are drawn as the
full TP=1 model and each TP/EP rank keeps its slice, so a seed gives the same model at any TP
and EP size.

Deviations from Megatron's own `pretrain()`: no Megatron DDP or distributed optimizer (they
assume CUDA streams; DP here is a plain all-reduce of the gradients, and each rank keeps a full
AdamW state for its TP/EP slice; the gradient rules are `megatron_dsv3.gradients`); bf16
parameters with fp32 masters on GPU (`--params-dtype`), our own rather than Megatron's
`Float16OptimizerWithFloat16Params`; pipeline parallelism only through DualPipe/DualPipeV; checkpoints are plain
per-rank torch files, not Megatron's distributed checkpoints.

Outputs in --out-dir: checkpoints/step_<N>/, metrics.jsonl, loss_curve.png, expert_load.png,
expert_load.json and (unless --no-wandb) the W&B run under wandb/ (offline without an API key).
"""

from .job import cli, main

__all__ = ["cli", "main"]
