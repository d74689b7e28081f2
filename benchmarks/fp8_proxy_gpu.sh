#!/usr/bin/env bash
# Issue 12's end-to-end comparison on one GPU in one call (the device session; `.whl/` carried
# with torchao's wheel in `.whl/extra/`, and the peers' folder `.peers/` carried: anchor_hf.py,
# anchor_torchtitan.py and torchtitan's wheels):
#
#   bash benchmarks/fp8_proxy_gpu.sh                 # bench, steps, then convergence
#   bash benchmarks/fp8_proxy_gpu.sh steps convergence   # some of them
#
# bench_proxy.py on the proxy preset (bf16 parameters, compiled modules with CUDA graphs, 4,096
# tokens): ours in BF16 with torchtitan compiled in BF16 and with torchao's rowwise float8
# (TT_FP8=rowwise), then ours in FP8 (--fp8 deepseek; proxy's 10944-wide dense FFN in BF16),
# and once more with the routed experts in BF16 (--fp8-layers attention,shared_experts,dispatch).
# Results: $OUT/bf16.json, fp8.json, fp8_dense.json (bf16 and fp8 with "kernel_breakdown": one
# profiled forward + backward's GPU time by kernel category), their logs and the profiler tables
# (prof_*.log) packed into logs.tgz (./gpu_out/fp8_proxy without $OUT).
# layers: bench_proxy.py with --compile layers (each decoder layer one graph: norms and residual
# adds inside it) in BF16 and FP8; results $OUT/layers_bf16.json, layers_fp8.json (compare with
# bench's bf16.json / fp8.json, compiled by modules, in the same call).
# steps: the training job itself (benchmarks/bench_train_step.py, proxy with MTP, 8 micro-batches
# of 4,096 tokens per step, FP8 weights quantized once per step) in BF16 and in FP8 (--fp8-layers
# FP8_LAYERS, proxy's dense FFN in BF16); results $OUT/steps_bf16.json, steps_fp8.json.
# STEPS_ARGS: more flags for bench_train_step.py (a CPU rehearsal: STEPS_ARGS="--device cpu
# --preset tiny --seq-len 64 --steps 1 --warmup 1 --grad-accum 2" FP8_LAYERS=dispatch).
# convergence: benchmarks/fp8_convergence.py, the main job on proxy in BF16 and in FP8 (and BF16
# with --seed 1, the run-to-run yardstick) for
# CONVERGENCE_STEPS (300) steps of 2 x 4,096 tokens from the same seed: both loss curves in
# $OUT/convergence/fp8_convergence.png, the last 50 steps' relative distance and each run's
# tokens/s in fp8_convergence.json.
set -uo pipefail
cd "$(dirname "$0")/.."
DIR=${OUT:-gpu_out/fp8_proxy}
mkdir -p "$DIR"
. benchmarks/carried_wheels.sh
use_carried_wheels
PEERS=()
if [ -f .peers/anchor_torchtitan.py ]; then  # the peers' own site: torchtitan and torchao
  install_wheels .peers/.site .peers/*.whl .whl/extra/torchao-*.whl
  PEERS=(--peers-dir .peers --peers torchtitan --peer-fp8 rowwise)
fi
FP8_LAYERS=${FP8_LAYERS:-attention,shared_experts,routed_experts,dispatch}
for part in ${*:-bench steps convergence}; do
  case $part in
    bench)
      start=$SECONDS
      timeout 420 python3 benchmarks/bench_proxy.py --steps 10 --warmup 4 "${PEERS[@]}" \
        --profile "$DIR/prof_bf16.log" --json-out "$DIR/bf16.json" > "$DIR/bf16.log" 2>&1
      echo "== bf16 (+ peers): rc=$? in $((SECONDS - start)) s"; grep -E "^ours|^torchtitan" "$DIR/bf16.log"
      start=$SECONDS
      timeout 240 python3 benchmarks/bench_proxy.py --steps 10 --warmup 4 --fp8 deepseek \
        --profile "$DIR/prof_fp8.log" --json-out "$DIR/fp8.json" > "$DIR/fp8.log" 2>&1
      echo "== fp8: rc=$? in $((SECONDS - start)) s"; grep -E "^ours|Error" "$DIR/fp8.log" | tail -n 3
      start=$SECONDS  # the routed experts in BF16 (our grouped FP8 GEMM is slower than BF16's)
      timeout 240 python3 benchmarks/bench_proxy.py --steps 10 --warmup 4 --fp8 deepseek \
        --fp8-layers attention,shared_experts,dispatch --json-out "$DIR/fp8_dense.json" \
        > "$DIR/fp8_dense.log" 2>&1
      echo "== fp8, routed experts bf16: rc=$? in $((SECONDS - start)) s"
      grep -E "^ours|Error" "$DIR/fp8_dense.log" | tail -n 3
      ;;
    layers)  # each decoder layer one compiled graph (norms, residual adds inside), BF16 and FP8
      for precision in bf16 fp8; do
        start=$SECONDS
        flags=(); [ $precision = fp8 ] && flags=(--fp8 deepseek)
        timeout 240 python3 benchmarks/bench_proxy.py --steps 10 --warmup 4 --compile layers \
          "${flags[@]}" --json-out "$DIR/layers_$precision.json" > "$DIR/layers_$precision.log" 2>&1
        echo "== layers, $precision: rc=$? in $((SECONDS - start)) s"
        grep -E "^ours|Error" "$DIR/layers_$precision.log" | tail -n 3
      done ;;
    steps)  # the training job's step: 8 micro-batches, FP8 weights quantized once per step
      for precision in bf16 fp8; do
        start=$SECONDS
        flags=""; [ $precision = fp8 ] && flags="--fp8 deepseek --fp8-layers $FP8_LAYERS"
        timeout 240 python3 benchmarks/bench_train_step.py --skip-baseline --job-args "$flags" \
          ${STEPS_ARGS:-} --json-out "$DIR/steps_$precision.json" > "$DIR/steps_$precision.log" 2>&1
        echo "== job, $precision: rc=$? in $((SECONDS - start)) s"
        grep -E "^job:|Error" "$DIR/steps_$precision.log" | tail -n 3
      done ;;
    convergence)
      start=$SECONDS
      timeout "${CONVERGENCE_TIMEOUT:-540}" python3 benchmarks/fp8_convergence.py --preset proxy \
        --steps "${CONVERGENCE_STEPS:-300}" --extra=--seq-len=4096 --extra=--micro-batch-size=1 \
        --extra=--grad-accum=2 --noise-seed 1 --out-dir "$DIR/convergence" \
        --runs-dir /tmp/fp8_convergence \
        > "$DIR/convergence.log" 2>&1
      echo "== convergence: rc=$? in $((SECONDS - start)) s"; tail -n 3 "$DIR/convergence.log" ;;
    *) echo "unknown part $part: choose from bench layers steps convergence" >&2; exit 2 ;;
  esac
done
pack_logs "$DIR"
