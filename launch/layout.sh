# Shared by the launchers (sourced): check a parallel layout, naming the variable to change.
#
#   check_layout COUNT WORLD TP PP EP   -> sets DP, or prints the problem and exits 2
#
# WORLD processes = TP x PP x DP (Megatron's layout); EP is carved out of DP (it must divide
# DP); every size a positive integer. COUNT names where WORLD comes from in the messages
# ("NPROC", "NNODES * GPUS_PER_NODE").
check_layout() {
  local count=$1 world=$2 tp=$3 pp=$4 ep=$5 name value
  for name in TP PP EP; do
    case $name in TP) value=$tp ;; PP) value=$pp ;; EP) value=$ep ;; esac
    if ! [[ "$value" =~ ^[1-9][0-9]*$ ]]; then
      echo "$name=$value must be a positive integer" >&2; exit 2
    fi
  done
  if (( world % (tp * pp) != 0 )); then
    echo "TP * PP = $(( tp * pp )) must divide $count=$world (data parallelism is $count /" \
         "(TP * PP)): change one of them" >&2
    exit 2
  fi
  DP=$(( world / (tp * pp) ))
  if (( DP % ep != 0 )); then
    echo "EP=$ep must divide the data-parallel size $count / (TP * PP) = $DP (expert" \
         "parallelism is carved out of DP): change $count, TP, PP or EP" >&2
    exit 2
  fi
}
