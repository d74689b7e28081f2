#!/usr/bin/env bash
# Issue 13's decoding measurement on one GPU in one call (the device session, one H200;
# `.whl/` carried: megatron-core; transformers is the GPU image's own):
#
#   bash benchmarks/decode_gpu.sh                   # short long1 long32, ~8 minutes at most
#   bash benchmarks/decode_gpu.sh short long1       # some of them
#   bash benchmarks/decode_gpu.sh trained           # the trained model's speculative decoding
#                                                   # (~4.5 minutes; not in the default list:
#                                                   # a device call has 10 minutes)
#
# benchmarks/bench_decode.py on the proxy preset (random weights, bf16 parameters, eval mode,
# TP=1, MTP kept): our absorbed and plain decode through megatron_dsv3.inference after a
# chunked prefill, Hugging Face transformers' DeepseekV3ForCausalLM.generate with the same
# weights (sdpa, grouped_mm experts, its default cache), speculative decoding with the MTP
# layer on batch 1 (random weights: ~0% acceptance, reported as such), the KV cache's bytes per
# token per layer; NEW_TOKENS (64) timed decode steps per case. Each part is its own process
# under its own `timeout`, the largest last; a part's JSON is rewritten after every case, so a
# part cut short keeps what it finished ("complete": false):
#   short    context 4,096 (SHORT_CONTEXT), batch 1 and 32 (BIG_BATCH): absorbed, plain,
#            transformers, speculative                                      (timeout 140 s)
#   long1    context 32,768 (LONG_CONTEXT), batch 1: absorbed, plain, transformers,
#            speculative (skipped by the script when its one-forward prefill's [1, h, s, s]
#            fp32 scores cannot fit)                                        (timeout 110 s)
#   long32   context 32,768, batch 32: absorbed, plain, transformers (our prefill: 512
#            chunks of 64 tokens, fp32 attention, est. 1.5-2.5 min; transformers prefills the
#            1M tokens in one forward: an out-of-memory is recorded)      (timeout 260 s)
#   trained  benchmarks/bench_decode_trained.py: issue 13's target on a model whose MTP head
#            has learned: the training job trains proxy with its MTP layer on the bundled
#            corpus in the script's own process (16,384 tokens a step, lr 6e-4; at most 140 s
#            of steps, and none after 170 s of the process; no checkpoint), then on 8 held-out
#            prompts of 256 tokens at batch 1, NEW_TOKENS (here 128) each: greedy absorbed
#            `generate` and `generate_speculative` tokens/s, the acceptance, whether both emit
#            the same tokens (no prompt started that would end after 250 s; time stamps
#            "[  s] ..." on its log mark each phase); TRAINED_ARGS: more flags for it
#                                                                        (timeout 270 s)
# DECODE_ARGS: more flags for every part (e.g. --tf32 for our fp32 attention einsums on TF32,
# if long32's prefill runs out of time). A CPU rehearsal (~2 minutes on 2 cores):
#   SHORT_CONTEXT=64 LONG_CONTEXT=96 BIG_BATCH=2 NEW_TOKENS=4 \
#     DECODE_ARGS="--device cpu --preset tiny" bash benchmarks/decode_gpu.sh
# and of trained (~2.5 minutes on 2 cores: 150 steps of the tiny preset, 4 prompts):
#   NEW_TOKENS=64 DECODE_ARGS="--device cpu --preset tiny" TRAINED_ARGS="--train-steps 150 \
#     --micro-batch-size 16 --grad-accum 2 --lr 3e-3 --min-lr 3e-4 --warmup-steps 30 \
#     --prompt-len 48 --prompts 4" bash benchmarks/decode_gpu.sh trained
# Results: $OUT/short.json, long1.json, long32.json, trained.json, their logs packed into
# $OUT/logs.tgz (./gpu_out/decode without $OUT); each part's table and errors on stdout.
set -uo pipefail
PARTS=${*:-short long1 long32}
cd "$(dirname "$0")/.."
DIR=${OUT:-gpu_out/decode}
mkdir -p "$DIR"

. benchmarks/carried_wheels.sh
use_carried_wheels
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', \
transformers.__version__)" 2>&1 | tail -n 1
export PYTHONUNBUFFERED=1
# the big cases' transient tensors come and go: fewer fragmented blocks after an out-of-memory
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

SHORT=${SHORT_CONTEXT:-4096}
LONG=${LONG_CONTEXT:-32768}
BIG=${BIG_BATCH:-32}
NEW=${NEW_TOKENS:-64}
BENCH=benchmarks/bench_decode.py

part() {  # part NAME TIMEOUT_S SCRIPT BENCH_ARGS...
  local name=$1 limit=$2 script=$3
  shift 3
  local start=$SECONDS
  timeout "$limit" python3 "$script" "$@" ${DECODE_ARGS:-} --json-out "$DIR/$name.json" \
    > "$DIR/$name.log" 2>&1
  echo "== $name: rc=$? in $((SECONDS - start)) s"
  # the table (from its header on), else the cases finished before a timeout, and errors
  if grep -q '^impl ' "$DIR/$name.log"; then
    sed -n '/^KV cache per token\|^trained model:/,/^{/p' "$DIR/$name.log" | grep -v '^{'
  else  # (trained: also how far its training got, and its last phase)
    grep -E '^train step' "$DIR/$name.log" | tail -n 1
    grep -E '^\[ *[0-9.]+ s\] ' "$DIR/$name.log" | tail -n 1
    grep -E '^case:' "$DIR/$name.log" | cut -c1-400
  fi
  grep -E 'Error|error:' "$DIR/$name.log" | grep -v Warning | tail -n 4
}

for p in $PARTS; do
  case $p in
    short) part short 140 "$BENCH" --new-tokens "$NEW" --context "$SHORT" --batch "1,$BIG" ;;
    long1) part long1 110 "$BENCH" --new-tokens "$NEW" --context "$LONG" --batch 1 ;;
    long32) part long32 260 "$BENCH" --new-tokens "$NEW" --context "$LONG" --batch "$BIG" \
      --modes absorbed,plain,hf ;;
    trained) part trained 270 benchmarks/bench_decode_trained.py \
      --new-tokens "${NEW_TOKENS:-128}" ${TRAINED_ARGS:-} ;;
    *) echo "unknown part $p: choose from short long1 long32 trained" >&2
       exit 2 ;;
  esac
done
pack_logs "$DIR"
