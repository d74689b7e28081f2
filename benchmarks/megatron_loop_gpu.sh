#!/usr/bin/env bash
# Issue 11 on one GPU in one call (the device session; `.whl/` carried): Megatron-LM's own
# training loop (`python -m megatron_dsv3.pretrain`) with our model, against our main job.
#
#   bash benchmarks/megatron_loop_gpu.sh               # every part
#   bash benchmarks/megatron_loop_gpu.sh tiny resume   # some of them
#
# Parts (each under its own `timeout`; their logs packed into $OUT/logs.tgz at the end,
# ./gpu_out/megatron_loop without $OUT):
#   tiny     the tiny preset, 20 of 30 iterations (--exit-interval 20) with Megatron's
#            distributed optimizer, a distributed checkpoint saved at iteration 10 and 20
#   resume   (after tiny) the same command again with --train-iters 30: resumes at 20
#   straight the same 30 iterations in one run, no checkpoint: its losses of iterations 21-30
#            against resume's (printed side by side)
#   nan      tiny with --lr 1e6: Megatron's NaN check must stop it with an error (pretrain's
#            default --rerun-mode disabled: at once, naming the iteration)
#   corrupt  (after resume) 4 KiB of random bytes written into the newest checkpoint's largest
#            file, then a resume: it must stop with an error, not train on
#   proxy    the proxy preset with MTP, 8 micro-batches of 4,096 tokens per iteration (our job's
#            step), Megatron's per-iteration time (pretrain's GPU defaults: compiled modules,
#            the experts' weight gradients summed inside the GEMM, --expert-wgrad auto)
#   job      our main job on the same preset and step (its GPU defaults): the ratio's baseline
#   fp8      the tiny preset with every FP8 width a multiple of 128, 30 iterations with
#            Megatron's --fp8-format e4m3 --fp8-recipe blockwise (our DeepSeek FP8 without TE),
#            and the same in bf16: their losses side by side
#   dualpipev (2 GPUs: the nvidia-h200-x2 kind) the tiny preset with 4 layers at PP=2 under
#            --pipeline-schedule dualpipev, 20 iterations, a checkpoint at 10 and 20, then the
#            same command with --train-iters 30 resuming from it
# Every Megatron run: bf16 parameters, Megatron's distributed optimizer (fp32 main parameters and
# gradients) with our AdamW's bf16 moments (--adam-moments-dtype auto with --bf16).
# MEGATRON_ARGS: more flags for every Megatron run.
set -uo pipefail
PARTS=${*:-tiny resume straight nan corrupt proxy job}
cd "$(dirname "$0")/.."
DIR=${OUT:-gpu_out/megatron_loop}
WORK=${WORK:-/tmp/megatron_loop}
mkdir -p "$DIR" "$WORK"

. benchmarks/carried_wheels.sh
use_carried_wheels
export CUDA_DEVICE_MAX_CONNECTIONS=1  # Megatron's requirement for its TP/SP overlap

if [ ! -f "$WORK/plays_text_document.idx" ] && [ ! -f "$WORK/plays.idx" ]; then
  python3 -m megatron_dsv3.indexed_data --input examples/data --output-prefix "$WORK/plays" \
    > "$DIR/indexed_data.log" 2>&1 || { echo "indexed_data failed"; tail "$DIR/indexed_data.log"; }
fi

megatron() {  # megatron NAME TIMEOUT_S PRESET ARGS...
  local name=$1 limit=$2 preset=$3
  shift 3
  local start=$SECONDS
  timeout "$limit" python3 -m torch.distributed.run --standalone --nnodes 1 \
    --nproc-per-node "${NPROC:-1}" \
    -m megatron_dsv3.pretrain --preset "$preset" \
    --transformer-impl local \
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model examples/data \
    --data-path "$WORK/plays" --split 80,20,0 \
    --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 2 \
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 \
    --bf16 --use-distributed-optimizer --log-interval 1 --eval-interval 1000 --eval-iters 1 \
    --log-throughput "$@" ${MEGATRON_ARGS:-} > "$DIR/$name.log" 2>&1
  echo "== $name: rc=$? in $((SECONDS - start)) s"
  grep -E 'iteration +[0-9]+/|Error|error:|saved checkpoint|loaded checkpoint' "$DIR/$name.log" \
    | tail -n 6
}

for p in $PARTS; do
  case $p in
    tiny) rm -rf "$WORK/ckpt_tiny"
          # stops at 20 of a 30-iteration schedule (Megatron refuses a resume whose
          # --train-iters changed the learning-rate schedule)
          megatron tiny 200 tiny --seq-length 128 --micro-batch-size 4 --global-batch-size 8 \
            --train-iters 30 --exit-interval 20 --save "$WORK/ckpt_tiny" \
            --load "$WORK/ckpt_tiny" --save-interval 10 ;;
    resume) megatron resume 180 tiny --seq-length 128 --micro-batch-size 4 \
            --global-batch-size 8 --train-iters 30 --save "$WORK/ckpt_tiny" \
            --load "$WORK/ckpt_tiny" --save-interval 10 ;;
    straight) megatron straight 180 tiny --seq-length 128 --micro-batch-size 4 \
            --global-batch-size 8 --train-iters 30
          python3 - "$DIR/resume.log" "$DIR/straight.log" <<'PY'
import re, sys
def losses(path):
    found = {}
    for line in open(path, errors="replace"):
        m = re.search(r"iteration +(\d+)/.*?lm loss: ([0-9.E+-]+)", line)
        if m:
            found[int(m.group(1))] = float(m.group(2))
    return found
resumed, straight = losses(sys.argv[1]), losses(sys.argv[2])
# Megatron's training_log prints a run's first iteration without resetting its sums
# (should_reset = not is_first_iteration), so with --log-interval 1 the next report is the mean
# of both: the resumed run's second report is compared with the straight run's mean of the two
first = min(resumed)
for it in sorted(set(resumed) & set(straight)):
    expected = (straight[it] + straight[it - 1]) / 2 if it == first + 1 else straight[it]
    note = f" (Megatron reports the mean of {it - 1} and {it} here)" if it == first + 1 else ""
    print(f"iteration {it}: resumed {resumed[it]:.6E} straight {expected:.6E} "
          f"diff {resumed[it] - expected:+.2E}{note}")
PY
          ;;
    nan) megatron nan 120 tiny --seq-length 128 --micro-batch-size 4 --global-batch-size 8 \
            --train-iters 10 --lr 1e6 --min-lr 1e5
         grep -iE "nan|inf" "$DIR/nan.log" | grep -vE "^ +[a-z_]+ \.+" | tail -n 4 ;;
    corrupt) newest=$(cat "$WORK/ckpt_tiny/latest_checkpointed_iteration.txt")
             file=$(ls -S "$WORK"/ckpt_tiny/iter_$(printf %07d "$newest")/*.distcp | head -n 1)
             size=$(stat -c %s "$file")
             python3 - "$file" "$size" <<'PY'
import os, sys
path, size = sys.argv[1], int(sys.argv[2])
with open(path, "r+b") as f:
    f.seek(size // 2)
    f.write(os.urandom(4096))
print(f"wrote 4096 random bytes at offset {size // 2} of {path} ({size} bytes)")
PY
             megatron corrupt 120 tiny --seq-length 128 --micro-batch-size 4 \
               --global-batch-size 8 --train-iters 30 --save "$WORK/ckpt_tiny" \
               --load "$WORK/ckpt_tiny" --save-interval 10
             grep -E "CorruptCheckpoint|Error" "$DIR/corrupt.log" | tail -n 3 ;;
    proxy) megatron proxy 300 proxy --seq-length 4096 --micro-batch-size 1 \
            --global-batch-size 8 --train-iters 8 ;;
    job) start=$SECONDS
         timeout 300 python3 -m megatron_dsv3.train --preset proxy --seq-len 4096 \
           --micro-batch-size 1 --grad-accum 8 --steps 8 --warmup-steps 2 --no-wandb \
           --out-dir "$WORK/job" > "$DIR/job.log" 2>&1
         echo "== job: rc=$? in $((SECONDS - start)) s"; tail -n 6 "$DIR/job.log"
         # the ratio (issue 11: Megatron's loop at >= 0.9x our job's tokens/s), when both ran
         python3 - "$DIR/proxy.log" "$WORK/job/metrics.jsonl" "$DIR/compare.json" <<'PY'
import json, re, sys
from pathlib import Path
megatron_log, job_metrics, out = map(Path, sys.argv[1:])
if not (megatron_log.is_file() and job_metrics.is_file()):
    sys.exit("compare: run the proxy and job parts first")
iters = {int(m.group(1)): float(m.group(2)) for m in re.finditer(
    r"iteration +(\d+)/.*?elapsed time per iteration \(ms\): ([0-9.]+)",
    megatron_log.read_text(errors="replace"))}
steps = {r["step"]: 1e3 * r["step_time_s"] for r in map(json.loads, job_metrics.open())
         if "step_time_s" in r}
# the first two of each are compilation and CUDA-graph recording
megatron_ms = [v for k, v in sorted(iters.items()) if k > 2]
job_ms = [v for k, v in sorted(steps.items()) if k > 2]
if not megatron_ms or not job_ms:
    sys.exit(f"compare: too few timed steps (Megatron {sorted(iters)}, job {sorted(steps)})")
result = {"megatron_ms_per_iteration": sum(megatron_ms) / len(megatron_ms),
          "job_ms_per_step": sum(job_ms) / len(job_ms),
          "megatron_iterations": len(megatron_ms), "job_steps": len(job_ms)}
result["megatron_tokens_per_s_over_job"] = round(
    result["job_ms_per_step"] / result["megatron_ms_per_iteration"], 3)
out.write_text(json.dumps(result, indent=1))
print(json.dumps(result))
PY
         ;;
    fp8) widths="--num-attention-heads 2 --q-lora-rank 128 --kv-lora-rank 128 --qk-head-dim 48
                 --qk-pos-emb-head-dim 16 --v-head-dim 16 --moe-shared-expert-intermediate-size 128
                 --moe-ffn-hidden-size 128"
         # shellcheck disable=SC2086
         megatron fp8 240 tiny $widths --seq-length 128 --micro-batch-size 4 \
           --global-batch-size 8 --train-iters 30 --fp8-format e4m3 --fp8-recipe blockwise
         # shellcheck disable=SC2086
         megatron fp8_bf16 240 tiny $widths --seq-length 128 --micro-batch-size 4 \
           --global-batch-size 8 --train-iters 30
         python3 - "$DIR/fp8.log" "$DIR/fp8_bf16.log" <<'PY'
import re, sys
def losses(path):
    return {int(m.group(1)): float(m.group(2)) for m in re.finditer(
        r"iteration +(\d+)/.*?lm loss: ([0-9.E+-]+)", open(path, errors="replace").read())}
fp8, bf16 = losses(sys.argv[1]), losses(sys.argv[2])
for it in sorted(set(fp8) & set(bf16)):
    print(f"iteration {it}: fp8 {fp8[it]:.5f} bf16 {bf16[it]:.5f} "
          f"rel {(fp8[it] - bf16[it]) / bf16[it]:+.2%}")
PY
         ;;
    dualpipev) rm -rf "$WORK/ckpt_dualpipev"
          for iters in 20 30; do
            NPROC=2 megatron "dualpipev_$iters" 240 tiny --num-layers 4 \
              --moe-layer-freq "[0,1,1,1]" --pipeline-model-parallel-size 2 \
              --pipeline-schedule dualpipev --seq-length 128 --micro-batch-size 2 \
              --global-batch-size 8 --train-iters "$iters" --save "$WORK/ckpt_dualpipev" \
              --load "$WORK/ckpt_dualpipev" --save-interval 10
          done ;;
    *) echo "unknown part $p: choose from tiny resume straight nan corrupt proxy job fp8 dualpipev" >&2
       exit 2 ;;
  esac
done
pack_logs "$DIR"
