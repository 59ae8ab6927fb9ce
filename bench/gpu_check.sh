#!/usr/bin/env bash
# Everything a GPU session must measure (issue 17), in one command that sets nothing up by hand and needs no network:
#
#   bash bench/gpu_check.sh                          # every step, about 8 minutes on an H100/H200
#   bash bench/gpu_check.sh --quick                  # the CUDA tests, llama-1b at 1x256 and the train step
#   bash bench/gpu_check.sh --device cpu --dry-run   # every step at tiny shapes, so the script cannot rot
#
# Writes into $OUT (default ./gpu_check_out): each step's JSON, tests.xml, steps.tsv (name, status, seconds,
# command), gpu_check.log (all output), and summary.md (bench/gpu_summary.py). Every step is time-boxed and the
# whole run stops starting steps after DEADLINE_S, so one hang cannot eat the lease; a failed step is recorded
# and the run goes on. The exit status is 1 when a step failed, timed out or found no time left.
set -uo pipefail

usage="usage: bash bench/gpu_check.sh [--quick] [--dry-run] [--device cuda|cpu|cuda:N]"
quick=0 dry=0 device=cuda invocation="bash bench/gpu_check.sh $*"
while (( $# )); do
  case $1 in
    --quick) quick=1 ;;
    --dry-run) dry=1 ;;
    --device) device=${2:?$usage}; shift ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
  shift
done

OUT=$(mkdir -p "${OUT:-./gpu_check_out}" && cd "${OUT:-./gpu_check_out}" && pwd) || exit 2
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2
WORK=$(mktemp -d) || exit 2
trap 'rm -rf "$WORK"' EXIT
LOG=$OUT/gpu_check.log STEPS=$OUT/steps.tsv
: >"$LOG"
: >"$STEPS"

# src first, so liftft imports even if the offline install below fails (no setuptools there, say); bench/offline
# makes datasets and trl absent, as they are on the GPU machine, so the dry run fails where the GPU run would.
export PYTHONPATH="$ROOT/bench/offline:$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
# The GPU machine may have python3 and no python.
py=python
command -v python >/dev/null || py=python3
DEADLINE_S=480
# A step is not started with less time than this left: it could not finish, and the summary must be written.
MIN_STEP_S=30
QUICK_STEPS=" install tests bench-1b-1x256 fixture train fsdp-plain fsdp fsdp-compare "
failed=0

record() { printf '%s\t%s\t%s\t%s\n' "$@" >>"$STEPS"; }

# run_step NAME LIMIT_S COMMAND...: run COMMAND for at most LIMIT_S seconds (less near the deadline) and record it.
run_step() {
  local name=$1 limit=$2 left=$(( DEADLINE_S - SECONDS )) start=$SECONDS rc=0 status=ok
  shift 2
  # An earlier run's file must not be read as this run's.
  rm -f -- "$OUT/$name.json" "$OUT/$name.xml"
  if (( quick )) && [[ $QUICK_STEPS != *" $name "* ]]; then
    record "$name" "not run (--quick)" 0 "$*"
    return
  fi
  if (( left < MIN_STEP_S )); then
    record "$name" "not run (out of time)" 0 "$*"
    failed=1
    return
  fi
  limit=$(( limit < left ? limit : left ))
  echo "=== $name (at most ${limit}s): $*" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1 || rc=$?
  if (( rc == 124 || rc == 137 )); then
    status="timed out after ${limit}s"
  elif (( rc )); then
    status="failed (exit $rc)"
  fi
  [[ $status == ok ]] || failed=1
  record "$name" "$status" $(( SECONDS - start )) "$*"
  echo "=== $name: $status in $(( SECONDS - start ))s" | tee -a "$LOG"
}

# bench_step NAME LIMIT_S BATCH SEQ_LEN MODEL_CONFIG METHODS [PREFIX...]: `liftft bench` into OUT/NAME.json,
# with PREFIX (e.g. env VAR=1) before the command. The dry run shrinks every shape to 1x32, 2 steps and the
# rank to the train step's, since rank 128 would select every entry of the tiny model's matrices.
bench_step() {
  local name=$1 limit=$2 batch=$3 seq=$4 config=$5 methods=$6 shrink=()
  shift 6
  if (( dry )); then
    batch=1 seq=32 shrink=(--steps 1 --warmup 1 "${ranks[@]}")
  fi
  run_step "$name" "$limit" "$@" "$py" -m liftft bench --model-config "$config" --methods "$methods" \
    --batch-size "$batch" --seq-len "$seq" --gradient-checkpointing --device "$device" "${shrink[@]}" \
    "${bench_extra[@]}" --json "$OUT/$name.json"
}
bench_extra=()

install=("$py" -m pip install --quiet --no-deps --no-build-isolation --no-index -e .)
tests=("$py" -m pytest -q tests/test_kernels.py tests/test_sampled_grad.py tests/test_step_in_backward.py)
fixture=("$py" bench/gpu_fixture.py "$WORK" --device "$device")
model_1b=llama-1b model_8b=llama-8b
# The train step checks the loop, not the budget: rank 8 is sparse on the tiny model too, and filter rank 16 keeps
# its 64-wide matrices on the randomized SVD, as llama-1b's are.
ranks=(--rank 8 --filter-rank 16)
if (( dry )); then
  install+=(--dry-run)  # the dry run leaves the environment it runs in as it is
  tests+=(-k test_backward_and_step_never_wait_for_the_gpu)  # collects every file; the one test skips on a CPU
  fixture+=(--tiny)
  model_1b=tiny model_8b=tiny
fi
lift_methods=floor,full,lora,lift,lift-in-backward

run_step install 60 "${install[@]}"
# test_kernels.py holds the CUDA no-sync test, test_backward_and_step_never_wait_for_the_gpu.
run_step tests 150 "${tests[@]}" --junitxml="$OUT/tests.xml"
bench_step bench-1b-4x1024 150 4 1024 "$model_1b" "$lift_methods"
bench_step bench-1b-1x256 120 1 256 "$model_1b" "$lift_methods"
bench_step bench-torch-step 100 4 1024 "$model_1b" lift env LIFTFT_NO_TRITON=1
run_step fixture 90 "${fixture[@]}"
run_step train 120 "$py" -m liftft train --model "$WORK/base" --data "$WORK/data.json" --output "$WORK/train" \
  "${ranks[@]}" --max-steps 4 --batch-size 2 --grad-accum 2 --max-seq-len 256 --update-interval 2 --save-steps 2 \
  --bf16 --gradient-checkpointing --device "$device" --no-progress
cp "$WORK/train/run.json" "$OUT/train.json" 2>/dev/null
# One process with --fsdp must equal one without (issue 16): no refresh, so both train the entries selected from the
# same base weights, and the full-logits loss on both, as --fsdp computes it.
fsdp_run=("$py" -m liftft train --model "$WORK/base" --data "$WORK/data.json" "${ranks[@]}" --max-steps 4
  --batch-size 2 --grad-accum 2 --max-seq-len 256 --update-interval 0 --loss full --bf16 --device "$device"
  --no-progress)
run_step fsdp-plain 90 "${fsdp_run[@]}" --output "$WORK/fsdp-plain"
run_step fsdp 90 "${fsdp_run[@]}" --output "$WORK/fsdp" --fsdp
run_step fsdp-compare 30 "$py" bench/compare_deltas.py "$WORK/fsdp-plain" "$WORK/fsdp" --json "$OUT/fsdp-compare.json"
# At 8B, lift's timings of every selection variant (exact SVDs of 224 matrices, twice) would take minutes.
bench_extra=(--no-selection-timings)
# The 24 GB question (issue 23): QLIFT against QLoRA on a bitsandbytes 4-bit base; needs bitsandbytes installed.
bench_extra+=(--load-in-4bit)
bench_step bench-8b-4bit-1x2048 150 1 2048 "$model_8b" floor,lora,lift
bench_extra=(--no-selection-timings)
# Last: it takes whatever time is left.
bench_step bench-8b-1x2048 "$DEADLINE_S" 1 2048 "$model_8b" floor,lora,lift

timeout 120 "$py" bench/gpu_summary.py "$OUT" --device "$device" --invocation "$invocation" >>"$LOG" 2>&1 || failed=1
cat "$OUT/summary.md" 2>/dev/null || echo "summary.md was not written; see $LOG"
exit "$failed"
