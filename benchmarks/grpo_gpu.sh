#!/usr/bin/env bash
# Issue 14's GRPO measurement on one GPU in one call (the device session, one H200; carry
# `.whl/` (megatron-core, psutil, packaging) and `.trl/` (trl and accelerate, filled by
# benchmarks/trl_wheels.sh); TRL's datasets / pyarrow / pandas imports are answered by the
# stand-ins in benchmarks/trl_stub/, put on PYTHONPATH when no real `datasets` imports):
#
#   bash benchmarks/grpo_gpu.sh             # both parts, ~3-4 minutes, 5 min 50 s at most
#   bash benchmarks/grpo_gpu.sh trl         # one of them
#
# benchmarks/bench_grpo.py on the proxy preset (random weights, bf16 parameters, gradients and
# AdamW moments on both sides, torch's fused AdamW, beta 0.04 with the reference model held
# on both sides), the arithmetic task's prompts (4 tokens), PROMPTS (16) prompts x GROUP (8)
# completions of exactly NEW_TOKENS (128) tokens, one forward / backward over the step's 128
# completions, 1 warm-up step then 2 timed ones. Each part is its own process under its own
# `timeout`; its JSON is rewritten after each measurement ("complete": false until the end):
#   ours   our GRPOTrainer: rollout tokens/s, the step and its update (loss + backward +
#          AdamW) time, peak memory; then the memory of one GRPO update against the same
#          update in a PPO layout (a critic of the policy's size with its AdamW added), both
#          peaks measured                                                 (timeout 130 s)
#   trl    TRL 1.16's GRPOTrainer (transformers' generate, no vLLM) on DeepseekV3ForCausalLM
#          with the same weights: the same quantities from its timers     (timeout 210 s)
# GRPO_ARGS: more flags for every part (e.g. "--hf-experts eager" if transformers' grouped_mm
# experts cannot train; "--trl-gradient-checkpointing" or a smaller PROMPTS if TRL runs out
# of memory). A CPU rehearsal (~40 s on 2 cores, tiny) in an environment of only torch +
# transformers and their dependencies (+ .whl/ and .trl/, installed into GRPO_SITE; the
# stand-ins answer datasets, pandas, pyarrow):
#   bash benchmarks/trl_wheels.sh --cpu-env /tmp/trlenv
#   PATH=/tmp/trlenv/bin:$PATH GRPO_SITE=/tmp/grpo_site PROMPTS=2 GROUP=4 NEW_TOKENS=8 \
#     GRPO_ARGS="--device cpu --preset tiny --num-layers 2" OUT=/tmp/grpo_out \
#     bash benchmarks/grpo_gpu.sh
# Results: $OUT/ours.json, trl.json, their logs packed into $OUT/logs.tgz (./gpu_out/grpo
# without $OUT); each part's summary and errors on stdout.
set -uo pipefail
PARTS=${*:-ours trl}
cd "$(dirname "$0")/.."
DIR=${OUT:-gpu_out/grpo}
SITE=${GRPO_SITE:-/tmp/site}
mkdir -p "$DIR"

. benchmarks/carried_wheels.sh
wheels=(.whl/*.whl .trl/*.whl)
[ -e "${wheels[-1]}" ] || { echo "no .trl/*.whl: run benchmarks/trl_wheels.sh and carry .trl" >&2
                            exit 2; }
install_wheels "$SITE" "${wheels[@]}" || exit
export PYTHONPATH=$SITE:$PWD
if ! python3 -c "import datasets" 2> /dev/null; then
  export PYTHONPATH=$PYTHONPATH:$PWD/benchmarks/trl_stub  # datasets, pandas, pyarrow stand-ins
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
python3 -c "import torch, transformers, trl, datasets; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'trl', trl.__version__, 'datasets from', \
datasets.__file__)" 2>&1 | tail -n 1
export PYTHONUNBUFFERED=1
# no network there: TRL's trainer pings the Hub's telemetry at start, transformers looks up files
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

SIZE=(--prompts "${PROMPTS:-16}" --group-size "${GROUP:-8}" --max-new-tokens "${NEW_TOKENS:-128}")

part() {  # part NAME TIMEOUT_S BENCH_ARGS...
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" python3 benchmarks/bench_grpo.py --preset proxy "${SIZE[@]}" "$@" \
    ${GRPO_ARGS:-} --json-out "$DIR/$name.json" > "$DIR/$name.log" 2>&1
  echo "== $name: rc=$? in $((SECONDS - start)) s"
  grep -E '^(ours|trl) step' "$DIR/$name.log" | cut -c1-300
  python3 - "$DIR/$name.json" <<'PY' 2>&1 | tail -n 12
import json, sys
r = json.load(open(sys.argv[1]))
for key in ("ours", "trl"):
    if key in r:
        print(key, {k: round(v, 4) if isinstance(v, float) else v for k, v in r[key].items()
                    if k in ("step_s", "update_s", "generate_s", "rollout_tokens_per_s",
                             "peak_gib", "prepare_inputs_s", "reference_logp_s")})
if "ppo" in r:
    print("ppo", {k: round(v, 4) if isinstance(v, float) else v for k, v in r["ppo"].items()
                  if k.endswith(("_gib", "fraction")) and k != "layout_gib"})
print("skipped:", r["skipped"], "complete:", r["complete"])
PY
  grep -E 'Error|error:' "$DIR/$name.log" | grep -v Warning | tail -n 4
}

for p in $PARTS; do
  case $p in
    ours) part ours 130 --parts ours,ppo ;;
    trl) part trl 210 --parts trl ;;
    *) echo "unknown part $p: choose from ours trl" >&2
       exit 2 ;;
  esac
done
pack_logs "$DIR"
