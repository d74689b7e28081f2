#!/usr/bin/env bash
# One node's part of a SLURM training job: torchrun with GPUS_PER_NODE processes, this node's
# rank SLURM_NODEID, the static rendezvous at MASTER_ADDR:MASTER_PORT. srun starts it once per
# node from launch/slurm/run.sh, which sets and checks every variable used here.
set -euo pipefail
cd "$REPO"
CMD=("$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE"
     --node-rank "${SLURM_NODEID:?SLURM_NODEID is unset: start this through srun}"
     --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" --max-restarts 0
     -m "$ENTRY")
read -r -a LAYOUT <<< "$LAYOUT_ARGS"
if [ "${DRY_RUN:-0}" = 1 ]; then
  printf '%q ' "${CMD[@]}" "${LAYOUT[@]}" "$@"; echo
  exit 0
fi
exec "${CMD[@]}" "${LAYOUT[@]}" "$@"
