#!/usr/bin/env bash
# Issue 12 on one GPU in one call (the device session; `.whl/` carried, torchao's wheel in
# `.whl/extra/` for the baseline):
#
#   bash benchmarks/fp8_gpu.sh              # the GPU tests of fp8, then bench_fp8.py
#   bash benchmarks/fp8_gpu.sh bench        # some of them: tests bench
#
# tests  python -m pytest tests/test_gpu.py -k fp8 and tests/test_gpu_fp8_grouped.py (kernels
#        bit-identical to the references in bf16, cuBLASLt's blockwise GEMM and the grouped
#        FP8 GEMM kernel against the emulation)
# bench  benchmarks/bench_fp8.py at DeepSeek-V3's shapes (16,384 tokens): quantizers against a
#        bf16 copy, our FP8 linear against bf16 nn.Linear and torchao's blockwise FP8 linear
# grouped  benchmarks/bench_fp8_grouped.py: the grouped FP8 expert GEMM against bf16
#        torch._grouped_mm (64 experts x 384 tokens 2048 -> 1408, 32 x 1024 7168 -> 2048)
# bf16grouped  tests/test_gpu_grouped_gemm.py, then benchmarks/bench_grouped_gemm.py: our bf16
#        grouped GEMM (kernels/grouped_gemm.py) against torch._grouped_mm, forward and dgrad
#        (proxy fc1 2048 -> 2816 and fc2 1408 -> 2048 at 64 x 384; 32 x 1024 7168 -> 2048);
#        BENCH_ARGS="--tune --repeat 10" sweeps its launch configs first (~5 minutes)
# experts  bench_proxy.py (proxy, BF16, compiled modules, 4,096 tokens) with --experts
#        grouped_mm and with --experts triton, each profiled: forward + backward tokens/s and
#        the grouped GEMM's ms by kernel category (experts_grouped_mm.json / experts_triton.json)
# profile  bench_fp8.py --profile: torch.profiler over the eager FP8 linear at PROFILE_SHAPE
#        (2048x7168): its kernels by device time, the device's busy time against the wall time
# BENCH_ARGS: more flags for the bench, grouped and bf16grouped scripts (--tune, --repeat N);
# BENCH_TIMEOUT (300 s; bf16grouped 420 s).
# Results: bench_fp8.json, bench_fp8_grouped.json, bench_grouped_gemm.json, experts_*.json and
# the parts' logs packed into logs.tgz, in
# $OUT (./gpu_out/fp8 without $OUT).
set -uo pipefail
PARTS=${*:-tests bench grouped}
cd "$(dirname "$0")/.."
DIR=${OUT:-gpu_out/fp8}
mkdir -p "$DIR"

. benchmarks/carried_wheels.sh
use_carried_wheels
if ls .whl/extra/torchao-*.whl > /dev/null 2>&1; then  # the baseline only, not on the path above
  install_wheels /tmp/ao_site .whl/extra/torchao-*.whl
  AO_PATH=/tmp/ao_site
fi

for p in $PARTS; do
  start=$SECONDS
  case $p in
    tests) timeout 300 python3 -m pytest -q tests/test_gpu.py tests/test_gpu_fp8_grouped.py -k fp8 \
             > "$DIR/tests.log" 2>&1 ;;
    bench) PYTHONPATH=${PYTHONPATH:-}:${AO_PATH:-} timeout "${BENCH_TIMEOUT:-300}" \
             python3 benchmarks/bench_fp8.py --json-out "$DIR/bench_fp8.json" ${BENCH_ARGS:-} \
             > "$DIR/bench.log" 2>&1 ;;
    profile) timeout 120 python3 benchmarks/bench_fp8.py --profile "${PROFILE_SHAPE:-2048x7168}" \
               --json-out "$DIR/profile.json" > "$DIR/profile.log" 2>&1 ;;
    grouped) timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/bench_fp8_grouped.py \
               --json-out "$DIR/bench_fp8_grouped.json" ${BENCH_ARGS:-} > "$DIR/grouped.log" 2>&1 ;;
    bf16grouped) {  # the JSON line only in the file: the log keeps the tables
                   timeout 200 python3 -m pytest -q tests/test_gpu_grouped_gemm.py
                   timeout "${BENCH_TIMEOUT:-420}" python3 benchmarks/bench_grouped_gemm.py \
                     --json-out "$DIR/bench_grouped_gemm.json" ${BENCH_ARGS:-} 2>&1 > /dev/null
                 } > "$DIR/bf16grouped.log" 2>&1 ;;
    experts) for impl in grouped_mm triton; do
               timeout 240 python3 benchmarks/bench_proxy.py --steps 10 --warmup 4 \
                 --experts $impl --profile "$DIR/prof_experts_$impl.log" \
                 --json-out "$DIR/experts_$impl.json" > "$DIR/experts_$impl.log" 2>&1
               echo "== experts $impl: rc=$?"
               grep -E "^ours|[Gg]rouped|Error" "$DIR/experts_$impl.log" | tail -n 5
             done > "$DIR/experts.log" 2>&1 ;;
    *) echo "unknown part $p"; continue ;;
  esac
  echo "== $p: rc=$? in $((SECONDS - start)) s"
  tail -n 14 "$DIR/$p.log"
done
pack_logs "$DIR"
