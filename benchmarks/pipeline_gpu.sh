#!/usr/bin/env bash
# Issue 3's GPU measurements on one host in one call (the device session; `.whl/` carried):
#
#   bash benchmarks/pipeline_gpu.sh 2          # 2 H200s: EP=2 overlap, PP=2 schedules, ablation
#   bash benchmarks/pipeline_gpu.sh 4 pp       # 4 H200s: the PP=4 part only (ep, pp, eppp, ablation)
#
# Parts (default all; each under its own `timeout`, so that one call stays under 10 minutes):
#   ep        benchmarks/pipeline_ep_overlap.py, EP = N, proxy widths, 4 MoE layers
#   pp        benchmarks/pipeline_schedules.py --schedule all, PP = N, micro-batches 4,8,16
#             (N = 2) or 8,16 (N > 2); DualPipe(V) traces and timelines
#   balanced  DualPipeV alone on 9 layers split 2,3,2,2 (rank 0 holds the embedding and the
#             head, so it gets one layer less; at PP=2 only): the bubble against the paper's
#             formula without the stage imbalance of the even split
#   eppp      (N = 4) PP=2 x EP=2, proxy 8 layers: every schedule, DualPipe(V) with the MoE F&B
#             pieces (_ovl) and without (_seq), Megatron's 1F1B / interleaved with EP; the fraction
#             of the all-to-all hidden inside the pipeline (`--moe-overlap both`)
#   eppp_sym  (N = 4) DualPipeV at PP=2 x EP=2 on 9 layers split 3,2,2,2: every chunk holds 2 MoE
#             layers (layer 0 is dense), so the two chunks of an F&B step pair MoE layer with MoE
#             layer (with 8 layers rank 0 pairs 1 MoE layer with 2, and the extra layer's
#             all-to-alls have nothing left to hide behind)
#   ep_cg     the ep part with a third pass: the count exchanges over a duplicate EP group on their
#             own stream (`--count-group separate`, overlapped_cg)
#   ep_wgrad  the ep part with a third pass: B's weight gradients deferred and run after each of
#             its segments, behind its own exchange (`--defer-wgrad`, overlapped_wgrad)
#   ep_asym   ep_wgrad on an asymmetric step: the backward through 4 MoE layers, the forward through
#             2 (`--forward-layers 2`), so that B's last segments have no forward left to hide
#             behind (what the 8-layer DualPipeV's rank 0 pairs)
#   wgrad     (N = 4) the eppp DualPipeV rows (8 layers: rank 0 pairs 1 MoE layer with 2) with and
#             without B's weight gradients run behind B's own exchanges (`--defer-wgrad both`,
#             rows _ovl and _ovl_w), and _seq
#   cg        (N = 4) the eppp DualPipe(V) rows once more with the pieces' count exchanges also
#             over a duplicate EP group on their own stream (_ovl_cg; `--count-group both`)
#   ctas      (N = 4) the eppp DualPipeV rows (M = 8, _ovl and _seq, profiled: compute kernels'
#             summed and busy time, NCCL's) once per NCCL_MAX_CTAS in ${CTAS:-default 16 8 4}:
#             does NCCL sharing the SMs slow the overlapped pieces' compute?
#   ablation  DualPipeV again with the MoE F&B pieces forced on (`--moe-overlap on`; the
#             default runs the plain layer loop without EP): inside a pipeline without EP there
#             is no all-to-all to hide, so this measures the pieces' overhead
# Results: $OUT/ (./gpu_out/n<N>/ without $OUT): <part>.json; traces.tgz (<part>.log, traces).
# EP_ARGS / PP_ARGS: more arguments for the EP script / both pipeline parts (e.g.
# PP_ARGS=--optimizer, or a CPU rehearsal: PP_ARGS="--preset tiny --layers 4 --seq-len 32").
set -uo pipefail
N=${1:?usage: pipeline_gpu.sh NUM_GPUS [ep] [ep_cg] [ep_wgrad] [ep_asym] [pp] [eppp] [eppp_sym] [cg] [wgrad] [ctas] [balanced] [ablation]}
shift
if [ "$N" -eq 2 ]; then PARTS=${*:-ep pp balanced ablation}; else PARTS=${*:-ep pp eppp eppp_sym ablation}; fi
cd "$(dirname "$0")/.."
DIR=${OUT:-gpu_out/n$N}  # the device fetches folders at most two levels under $OUT
mkdir -p "$DIR"

. benchmarks/carried_wheels.sh
[ -d .whl ] && use_carried_wheels \
  || { echo "installing the megatron-core wheel from .whl/ failed: carry .whl" >&2; exit 2; }
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'GPUs', torch.cuda.device_count())"
RUN="python3 -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node $N"
if [ "$N" -eq 2 ]; then MB=${MICROBATCHES:-4,8,16}; else MB=${MICROBATCHES:-8,16}; fi

part() {  # part NAME TIMEOUT_S SCRIPT ARGS...
  local name=$1 limit=$2 script=$3
  shift 3
  local start=$SECONDS
  timeout "$limit" $RUN "benchmarks/$script" "$@" --json-out "$DIR/$name.json" \
    > "$DIR/$name.log" 2>&1
  echo "== $name: rc=$? in $((SECONDS - start)) s ($DIR/$name.log)"
  grep -v -i -E 'warn|deprecat|OMP_NUM_THREADS|^\*+$|^W[0-9]{4} |Evict LRU|^ *$|^\{' \
    "$DIR/$name.log" | tail -n 14
}

for p in $PARTS; do
  case $p in
    ep) part ep 150 pipeline_ep_overlap.py --trace-dir "$DIR/ep" ${EP_ARGS:-} ;;
    ep_wgrad) part ep_wgrad 200 pipeline_ep_overlap.py --defer-wgrad --trace-dir "$DIR/ep_wgrad" \
          ${EP_ARGS:-} ;;
    ep_asym) part ep_asym 200 pipeline_ep_overlap.py --defer-wgrad --moe-layers 4 \
          --forward-layers 2 --trace-dir "$DIR/ep_asym" ${EP_ARGS:-} ;;
    ep_cg) part ep_cg 200 pipeline_ep_overlap.py --count-group separate --trace-dir "$DIR/ep_cg" \
          ${EP_ARGS:-} ;;
    pp) part pp 330 pipeline_schedules.py --schedule all --microbatches "$MB" \
          --trace-dir "$DIR/pp" ${PP_ARGS:-} ;;
    eppp) part eppp 300 pipeline_schedules.py --expert-parallel-size 2 --schedule all \
          --moe-overlap both --microbatches "$MB" --trace-dir "$DIR/eppp" ${PP_ARGS:-} ;;
    eppp_sym) part eppp_sym 200 pipeline_schedules.py --expert-parallel-size 2 \
          --schedule dualpipev --layers 9 --stage-layers 3,2,2,2 --moe-overlap both \
          --microbatches "$MB" --trace-dir "$DIR/eppp_sym" ${PP_ARGS:-} ;;
    cg) part cg 300 pipeline_schedules.py --expert-parallel-size 2 --schedule dualpipev,dualpipe \
          --moe-overlap both --count-group both --microbatches "$MB" --trace-dir "$DIR/cg" \
          ${PP_ARGS:-} ;;
    wgrad) part wgrad 300 pipeline_schedules.py --expert-parallel-size 2 --schedule dualpipev \
          --moe-overlap both --defer-wgrad both --microbatches "$MB" --trace-dir "$DIR/wgrad" \
          ${PP_ARGS:-} ;;
    ctas) for c in ${CTAS:-default 16 8 4}; do
            if [ "$c" = default ]; then unset NCCL_MAX_CTAS; else export NCCL_MAX_CTAS=$c; fi
            part "ctas_$c" 150 pipeline_schedules.py --expert-parallel-size 2 \
              --schedule dualpipev --moe-overlap both --microbatches 8 --profile \
              --trace-dir "$DIR/ctas_$c" ${PP_ARGS:-}
          done; unset NCCL_MAX_CTAS ;;
    balanced) part balanced 100 pipeline_schedules.py --schedule dualpipev --layers 9 \
          --stage-layers 2,3,2,2 --microbatches "$MB" --trace-dir "$DIR/balanced" \
          ${PP_ARGS:-} ;;
    ablation) part ablation 100 pipeline_schedules.py --schedule dualpipev --moe-overlap on \
          --microbatches "$MB" --trace-dir "$DIR/ablation" ${PP_ARGS:-} ;;
    *) echo "unknown part '$p': use ep, ep_cg, ep_wgrad, ep_asym, pp, eppp, eppp_sym, cg, wgrad, ctas, balanced or ablation" >&2; exit 2 ;;
  esac
done
# the device returns a few files per call: traces and logs travel as one archive
(cd "$DIR" && tar czf traces.tgz --remove-files \
  $(ls -d ep ep_cg ep_wgrad ep_asym pp eppp eppp_sym cg wgrad ctas_* balanced ablation ./*.log 2>/dev/null)) && echo "traces, logs: $DIR/traces.tgz"
