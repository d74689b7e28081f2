#!/usr/bin/env bash
# The main job on one machine with several processes (torchrun, --standalone rendezvous).
#
#   NPROC=2 TP=2 launch/torchrun_local.sh --steps 50      # tensor parallel over 2 processes
#   NPROC=2 TP=1 launch/torchrun_local.sh --steps 50      # data parallel over 2 processes
#   NPROC=8 TP=2 launch/torchrun_local.sh --preset proxy  # 8 GPUs: TP=2 x DP=4
#   NPROC=4 EP=2 launch/torchrun_local.sh --steps 50      # DP=4, experts sharded over EP=2
#   NPROC=4 PP=2 EP=2 launch/torchrun_local.sh --num-layers 4 --grad-accum 4 \
#       --pipeline-schedule dualpipev                      # DualPipeV over 2 ranks x EP=2
#
# NPROC: processes (default: the number of GPUs, or 2 without one); TP: tensor-parallel size
# (default 1); PP: pipeline-parallel size (default 1; needs --pipeline-schedule); data
# parallelism is NPROC / (TP * PP); EP: expert-parallel size (default 1), carved out of DP (it
# must divide NPROC / (TP * PP); the routed experts are split over EP ranks, their gradients
# reduced over the DP / EP expert-data-parallel replicas). Every other argument goes to
# megatron_dsv3.train.
# Without a GPU the processes use gloo and share the cores (OMP_NUM_THREADS = cores / NPROC).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
GPUS=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
if [ "$GPUS" -gt 0 ]; then NPROC=${NPROC:-$GPUS}; else NPROC=${NPROC:-2}; fi
TP=${TP:-1}
EP=${EP:-1}
PP=${PP:-1}

if ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
  echo "NPROC=$NPROC must be a positive integer" >&2; exit 2
fi
source launch/layout.sh
check_layout NPROC "$NPROC" "$TP" "$PP" "$EP"  # sets DP
if [ "$GPUS" -gt 0 ] && (( NPROC > GPUS )); then
  echo "NPROC=$NPROC exceeds the $GPUS visible GPUs: lower NPROC (one process per GPU)" >&2
  exit 2
fi
if [ "$GPUS" -eq 0 ]; then
  export TORCHDYNAMO_DISABLE=${TORCHDYNAMO_DISABLE:-1}  # Megatron's jit_fuser: no gain on CPU
  CORES=$(nproc)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CORES / NPROC > 0 ? CORES / NPROC : 1 ))}
fi

echo "torchrun: $NPROC processes, TP=$TP, PP=$PP, DP=$DP, EP=$EP" >&2
exec "$PYTHON" -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node "$NPROC" \
  -m megatron_dsv3.train --tensor-parallel-size "$TP" --expert-parallel-size "$EP" \
  --pipeline-parallel-size "$PP" "$@"
