#!/usr/bin/env bash
# The GPU figures issues 15 and 19 ask for, as one prepared script for a lent GPU whose time is short:
#
#   bash benchmarks/gpu.sh OUT PTB [PART...]   # OUT: the folder for the JSON and logs; PTB: a folder with
#                                              # ptb.{train,valid,test}.txt; PART: any of the parts below, in order
# Parts, each with its own time limit (so one that fails or runs long leaves the others' figures):
#   rnn           step times of the RNN supernet at the paper's batch 256, every mode, and the projected 50-epoch
#                 search (benchmarks.step_time): at most 150 s
#   rnn-compiled  plain and first order eager and with the cell's time step compiled with CUDA graphs
#                 (torch.compile mode reduce-overhead), in the same rounds: at most 200 s
#   cnn           the CNN supernet at the paper's batch 64, every mode: at most 150 s
#   cnn-compiled  its plain step eager and with its cells compiled, as rnn-compiled: at most 240 s
#   ptb-first     the PTB search at the paper's configuration, batch 256, first order, one epoch (104 steps),
#   ptb-second    second order: the valid perplexity curve (benchmarks.search_quality), to set beside the
#                 original's 8144 after its first epoch: at most 200 s and 400 s
# Without PART: rnn, rnn-compiled, cnn (at most 500 s).
set -u
out=$1
ptb=$2
shift 2
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(rnn rnn-compiled cnn)
mkdir -p "$out"
export PYTHONUNBUFFERED=1

run() {  # run SECONDS NAME MODULE ARGS...: one benchmark, its JSON and log in $out
  local limit=$1 name=$2
  shift 2
  local started=$SECONDS
  timeout "$limit" python3 -m "$@" --json "$out/$name.json" > "$out/$name.log" 2>&1
  echo "$name: exit $? after $((SECONDS - started)) s (limit $limit s)"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } > "$out/gpu.txt" 2>&1
timing=(--device cuda --warmup 2 --steps-timed 5)
compiled=(--compile reduce-overhead)
quality=(benchmarks.search_quality --device cuda --batch 256 --steps 104 --eval-every 26 --data-dir "$ptb")
for part in "${parts[@]}"; do
  case $part in
    rnn) run 150 rnn-b256 benchmarks.step_time --task rnn --batch 256 "${timing[@]}" ;;
    rnn-compiled) run 200 rnn-b256-compiled benchmarks.step_time --task rnn --batch 256 --modes plain,first \
      "${timing[@]}" "${compiled[@]}" ;;
    cnn) run 150 cnn-b64 benchmarks.step_time --task cnn --batch 64 "${timing[@]}" ;;
    cnn-compiled) run 240 cnn-b64-compiled benchmarks.step_time --task cnn --batch 64 --modes plain "${timing[@]}" \
      "${compiled[@]}" ;;
    ptb-first) run 200 ptb-b256-first "${quality[@]}" --orders first ;;
    ptb-second) run 400 ptb-b256-second "${quality[@]}" --orders second ;;
    *) echo "gpu.sh: unknown part '$part'; the parts: rnn rnn-compiled cnn cnn-compiled ptb-first ptb-second" >&2
       exit 2 ;;
  esac
done
