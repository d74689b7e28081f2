#!/usr/bin/env bash
# Issue 10's speed measurement on one GPU in one call (the device session; `.whl/` carried):
#
#   bash benchmarks/train_step_gpu.sh                 # every part, ~6 minutes on one H200
#   bash benchmarks/train_step_gpu.sh default merged  # some of them
#
# Parts (each `benchmarks/bench_train_step.py` under its own `timeout`; proxy with MTP, 8
# micro-batches of 4,096 tokens per step):
#   default        the benchmark's forward + backward (the baseline) and the job with its GPU
#                  defaults (CUDA graphs over its compiled modules, bf16 parameters with fp32
#                  masters, the experts' weight gradients summed inside the grouped GEMM), in
#                  one run: the ratio the issue asks for; a kernel profile
#   no_graphs      the job without CUDA graphs (--compile-mode default)
#   merged         the job with the experts' weight gradients once per step (--expert-wgrad step)
#   layers         baseline and job with whole TransformerLayers compiled (--compile layers, one
#                  graph each since the graph-break fix) instead of our modules
#   micro_batch    the job with autograd's bf16 expert weight gradients added into the fp32
#                  sums after each micro-batch (--expert-wgrad micro-batch); profiled
# JOB_ARGS: more flags for every job run; BENCH_ARGS: for bench_train_step.py (a CPU rehearsal:
# BENCH_ARGS="--device cpu --preset tiny --seq-len 64 --steps 1 --warmup 1 --grad-accum 2").
# Results: $OUT/<part>.json and .log (./gpu_out/train_step without $OUT); prof_default.txt,
# prof_merged.txt, prof_micro_batch.txt.
set -uo pipefail
PARTS=${*:-default micro_batch layers no_graphs merged}
cd "$(dirname "$0")/.."
DIR=${OUT:-gpu_out/train_step}
mkdir -p "$DIR"

. benchmarks/carried_wheels.sh
use_carried_wheels
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
python3 -c "import torch; print('torch', torch.__version__)"

part() {  # part NAME TIMEOUT_S BENCH_ARGS...
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" python3 benchmarks/bench_train_step.py "$@" ${BENCH_ARGS:-} \
    --json-out "$DIR/$name.json" > "$DIR/$name.log" 2>&1
  echo "== $name: rc=$? in $((SECONDS - start)) s"
  grep -E '^(job|ours):|Error|error:' "$DIR/$name.log" | tail -n 4
}

for p in $PARTS; do
  case $p in
    default) part default 240 --profile "$DIR/prof_default.txt" --job-args "${JOB_ARGS:-}" ;;
    no_graphs) part no_graphs 150 --skip-baseline \
          --job-args "--compile-mode default ${JOB_ARGS:-}" ;;
    merged) part merged 180 --skip-baseline --profile "$DIR/prof_merged.txt" \
          --job-args "--expert-wgrad step ${JOB_ARGS:-}" ;;
    layers) part layers 240 --baseline-args "--compile layers" \
          --job-args "--compile layers ${JOB_ARGS:-}" ;;
    micro_batch) part micro_batch 180 --skip-baseline --profile "$DIR/prof_micro_batch.txt" \
          --job-args "--expert-wgrad micro-batch ${JOB_ARGS:-}" ;;
    *) echo "unknown part $p: choose from default no_graphs merged layers micro_batch" >&2
       exit 2 ;;
  esac
done
