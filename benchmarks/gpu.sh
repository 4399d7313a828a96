#!/usr/bin/env bash
# The GPU figures issues 15 and 19 ask for, as one prepared script for a lent GPU whose time is short:
#
#   bash benchmarks/gpu.sh OUT PTB [PART...]   # OUT: the folder for the JSON and logs; PTB: a folder with
#                                              # ptb.{train,valid,test}.txt (the ptb parts only)
# Parts, in the order given, each killed at its limit (a killed benchmark writes nothing, the others keep theirs):
#   rnn           step times of the RNN supernet at the paper's batch 256, every mode, and the projected 50-epoch
#                 search (benchmarks.step_time): at most 240 s
#   rnn-compiled  plain and first order eager and with the cell's time step in CUDA graphs (the search's
#                 compile=reduce-overhead), in the same rounds: at most 240 s
#   cnn           the CNN supernet at the paper's batch 64, plain, first and second order: at most 240 s
#   cnn-compiled  its plain step eager and with its cells in CUDA graphs: at most 300 s
#   ptb-first     the PTB search at the paper's configuration, batch 256, first order, one epoch (104 steps): the
#   ptb-second    valid perplexity curve (benchmarks.search_quality) beside the original's 8144 after its first
#                 epoch; second order likewise: at most 240 s and 480 s
# Without PART: rnn rnn-compiled. Each part leaves two files in OUT (JSON and log), plus gpu.txt once.
set -u
[ $# -ge 2 ] || { echo "usage: bash benchmarks/gpu.sh OUT PTB [PART...]" >&2; exit 2; }
out=$(realpath -m "$1")
ptb=$(realpath -m "$2")
shift 2
cd "$(dirname "$0")/.." || exit 1
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(rnn rnn-compiled)
for part in "${parts[@]}"; do
  case $part in
    rnn|rnn-compiled|cnn|cnn-compiled|ptb-first|ptb-second) ;;
    *) echo "gpu.sh: unknown part '$part'; the parts: rnn rnn-compiled cnn cnn-compiled ptb-first ptb-second" >&2
       exit 2 ;;
  esac
done
mkdir -p "$out"
export PYTHONUNBUFFERED=1

run() {  # run SECONDS NAME MODULE ARGS...: one benchmark, its JSON and log in $out
  local limit=$1 name=$2
  shift 2
  local started=$SECONDS
  timeout -k 10 "$limit" python3 -m "$@" --json "$out/$name.json" > "$out/$name.log" 2>&1
  echo "$name: exit $? after $((SECONDS - started)) s (limit $limit s)"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } > "$out/gpu.txt" 2>&1
# Few rounds (GPU times hardly vary) and no collapse measurement: 20 double-backward products each, minutes
timing=(--device cuda --warmup 1 --steps-timed 4 --hessian-repeats 0)
compiled=(--compile reduce-overhead)
quality=(benchmarks.search_quality --device cuda --batch 256 --steps 104 --eval-every 26 --data-dir "$ptb")
for part in "${parts[@]}"; do
  case $part in
    rnn) run 240 rnn-b256 benchmarks.step_time --task rnn --batch 256 "${timing[@]}" ;;
    rnn-compiled) run 240 rnn-b256-compiled benchmarks.step_time --task rnn --batch 256 --modes plain,first \
      "${timing[@]}" "${compiled[@]}" ;;
    cnn) run 240 cnn-b64 benchmarks.step_time --task cnn --batch 64 --modes plain,first,second "${timing[@]}" ;;
    cnn-compiled) run 300 cnn-b64-compiled benchmarks.step_time --task cnn --batch 64 --modes plain "${timing[@]}" \
      "${compiled[@]}" ;;
    ptb-first) run 240 ptb-b256-first "${quality[@]}" --orders first ;;
    ptb-second) run 480 ptb-b256-second "${quality[@]}" --orders second ;;
  esac
done
