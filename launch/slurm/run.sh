#!/usr/bin/env bash
# The body of a SLURM training job (the *.sbatch scripts exec it; it also runs inside salloc):
# derives the rendezvous from SLURM, checks the parallel layout, then starts one torchrun per
# node with srun (launch/slurm/node.sh). Every argument goes to the training entry point.
#
# Variables (environment; defaults in brackets):
#   NNODES          nodes [SLURM_JOB_NUM_NODES]
#   GPUS_PER_NODE   processes per node, one per GPU [SLURM_GPUS_ON_NODE, else the GPUs
#                   nvidia-smi lists, else 1]
#   MASTER_ADDR     rendezvous host [the first node of SLURM_JOB_NODELIST]
#   MASTER_PORT     rendezvous port [20000 + SLURM_JOB_ID % 20000: two jobs sharing a first
#                   node do not collide]
#   TP, PP, EP      tensor-, pipeline- and expert-parallel sizes [1, 1, 1]; data parallelism
#                   is NNODES * GPUS_PER_NODE / (TP * PP), EP carved out of it
#   PIPELINE_SCHEDULE  dualpipev | dualpipe, with PP > 1 [dualpipev]
#   ENTRY           the Python module to run [megatron_dsv3.train]
#   PYTHON          the interpreter on the nodes [python3]
#   REPO            this repository on the nodes (shared file system) [SLURM_SUBMIT_DIR]
#   CONTAINER_IMAGE run inside this image through pyxis/enroot (srun --container-image)
#                   [none]; CONTAINER_MOUNTS (srun --container-mounts) [REPO:REPO]
#   NCCL_DEBUG [WARN], TORCH_NCCL_ASYNC_ERROR_HANDLING [1: a failed rank aborts the others
#                   instead of a hang]; NCCL_SOCKET_IFNAME, NCCL_IB_HCA, NCCL_IB_GID_INDEX and
#                   any other NCCL_* reach the processes as set (unset: NCCL's own choice)
#   OMP_NUM_THREADS [SLURM_CPUS_ON_NODE / GPUS_PER_NODE]
#   DRY_RUN=1       print the srun and torchrun commands instead of running them
set -euo pipefail

REPO=${REPO:-${SLURM_SUBMIT_DIR:?not inside a SLURM job: submit with sbatch, or set REPO and the SLURM_* variables}}
source "$REPO/launch/layout.sh"

NNODES=${NNODES:-${SLURM_JOB_NUM_NODES:?SLURM_JOB_NUM_NODES is unset: set NNODES}}
if [ -z "${GPUS_PER_NODE:-}" ]; then
  GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)}
  GPUS_PER_NODE=${GPUS_PER_NODE:-1}
  (( GPUS_PER_NODE > 0 )) || GPUS_PER_NODE=1
fi
for name in NNODES GPUS_PER_NODE; do
  if ! [[ "${!name}" =~ ^[1-9][0-9]*$ ]]; then
    echo "$name=${!name} must be a positive integer" >&2; exit 2
  fi
done
if [ -z "${MASTER_ADDR:-}" ]; then
  MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST:?SLURM_JOB_NODELIST is unset: set MASTER_ADDR}" | head -n 1)
fi
MASTER_PORT=${MASTER_PORT:-$(( 20000 + ${SLURM_JOB_ID:-0} % 20000 ))}
TP=${TP:-1}
PP=${PP:-1}
EP=${EP:-1}
PIPELINE_SCHEDULE=${PIPELINE_SCHEDULE:-dualpipev}
ENTRY=${ENTRY:-megatron_dsv3.train}
PYTHON=${PYTHON:-python3}

WORLD=$(( NNODES * GPUS_PER_NODE ))
check_layout "NNODES * GPUS_PER_NODE" "$WORLD" "$TP" "$PP" "$EP"  # sets DP

LAYOUT_ARGS="--tensor-parallel-size $TP --pipeline-parallel-size $PP --expert-parallel-size $EP"
if (( PP > 1 )); then LAYOUT_ARGS+=" --pipeline-schedule $PIPELINE_SCHEDULE"; fi

export REPO NNODES GPUS_PER_NODE MASTER_ADDR MASTER_PORT ENTRY PYTHON LAYOUT_ARGS
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
CPUS=${SLURM_CPUS_ON_NODE:-$(nproc)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CPUS / GPUS_PER_NODE > 0 ? CPUS / GPUS_PER_NODE : 1 ))}

SRUN=(srun --nodes "$NNODES" --ntasks "$NNODES" --ntasks-per-node 1 --kill-on-bad-exit=1)
if [ -n "${CONTAINER_IMAGE:-}" ]; then
  SRUN+=(--container-image "$CONTAINER_IMAGE" --container-mounts "${CONTAINER_MOUNTS:-$REPO:$REPO}"
         --container-workdir "$REPO")
fi

echo "SLURM job ${SLURM_JOB_ID:-?}: $NNODES node(s) x $GPUS_PER_NODE = $WORLD processes, TP=$TP," \
     "PP=$PP, DP=$DP, EP=$EP; rendezvous $MASTER_ADDR:$MASTER_PORT; $ENTRY" >&2
if [ "${DRY_RUN:-0}" = 1 ]; then
  printf '%q ' "${SRUN[@]}" bash "$REPO/launch/slurm/node.sh" "$@"; echo
  DRY_RUN=1 SLURM_NODEID=${SLURM_NODEID:-0} bash "$REPO/launch/slurm/node.sh" "$@"
  exit 0
fi
exec "${SRUN[@]}" bash "$REPO/launch/slurm/node.sh" "$@"
