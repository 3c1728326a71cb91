#!/usr/bin/env bash
# One GPU session's whole check in one command, in at most TOTAL_S (530 s) of wall time:
#   1. GPU kernel tests            pytest tests/kernels -m gpu
#   2. training tests              pytest tests/models/test_training.py -m gpu   (skipped if the file is absent)
#   3. forward table               python -m flashfuse.bench --mode fwd     (most important rows first, --budget-s)
#   4. forward+backward table      python -m flashfuse.bench --mode fwdbwd
#   5. whole model                 python bench/models.py --quick           (Llama ~1B layers, 4 of 16: compiles)
#   then a summary table of every stage, LAST (the end of the output is what a device call returns).
#
# Usage (on the GPU machine, repo root): bash bench/gpu_check.sh [OUTDIR]
# OUTDIR (default $OUT, else /tmp/flashfuse-out) receives at most 8 files (what a device call brings back):
#   gpu_check.log (every stage's whole output), summary.txt, attention_fwd.csv/.png, attention_fwdbwd.csv/.png,
#   models.csv.
#
# Every stage runs under its own `timeout`; its limit is min(its *_MAX_S, time left - what the later stages need
# at least), so the summary always prints. The benchmarks get --budget-s = limit - BENCH_GRACE_S (the row in
# flight and the table must still fit); rows are flushed to the CSV as they are measured.
# Knobs (environment):
#   TOTAL_S=530           whole-script wall budget (a device call allows 600 s, start-up aside)
#   STAGES="kernel training fwd fwdbwd models"     which stages run (also: passes quickstart, off by default)
#   KERNEL_MAX_S=90 TRAINING_MAX_S=70 FWD_MAX_S=130 FWDBWD_MAX_S=100 MODELS_MAX_S=170 (per-stage caps)
#   BENCH_GRACE_S=40      seconds between a benchmark's budget and its timeout
#   FWD_ARGS="" FWDBWD_ARGS="" MODELS_ARGS="--quick"   extra arguments (e.g. FWD_ARGS="--quick", "--dims 128",
#                         MODELS_ARGS="--layers 16" for the full 1B model: give it MODELS_MAX_S=400)
#   PYTEST_ARGS=""        extra pytest arguments for stages 1-2
#   INSTALL=1             0: flashfuse is already installed (or on PYTHONPATH): skip `pip install -e .`
set -uo pipefail
OUT="${1:-${OUT:-/tmp/flashfuse-out}}"
mkdir -p "$OUT"
LOGS="$(mktemp -d)"
: >"$OUT/gpu_check.log"
export PYTHONUNBUFFERED=1
TOTAL_S=${TOTAL_S:-530}
STAGES=${STAGES:-"kernel training fwd fwdbwd models"}
GRACE=${BENCH_GRACE_S:-40}
SECONDS=0

# the least each stage needs; a stage's limit leaves the sum of the later stages' minimums
declare -A MIN=([kernel]=30 [training]=30 [fwd]=60 [fwdbwd]=50 [models]=90 [passes]=30 [quickstart]=30)
declare -A MAX=([kernel]=${KERNEL_MAX_S:-90} [training]=${TRAINING_MAX_S:-70} [fwd]=${FWD_MAX_S:-130}
                [fwdbwd]=${FWDBWD_MAX_S:-100} [models]=${MODELS_MAX_S:-170} [passes]=${PASSES_MAX_S:-120}
                [quickstart]=${QUICKSTART_MAX_S:-60})
ORDER=(kernel training fwd fwdbwd models passes quickstart)
SUMMARY=()

enabled() { [[ " $STAGES " == *" $1 "* ]]; }

limit_for() {  # the seconds stage $1 may take now
  local stage=$1 reserve=5 later=0 s
  for s in "${ORDER[@]}"; do
    if (( later )) && enabled "$s"; then reserve=$((reserve + MIN[$s])); fi
    [[ $s == "$stage" ]] && later=1
  done
  local left=$((TOTAL_S - SECONDS - reserve)) cap=${MAX[$stage]}
  echo $(( left < cap ? left : cap ))
}

run_stage() {  # run_stage STAGE LIMIT TITLE CMD...: output to the screen and $LOGS/STAGE.txt; sets RC, TOOK
  local stage=$1 limit=$2 title=$3; shift 3
  local start=$SECONDS
  echo
  echo "== $title (limit ${limit}s, at ${SECONDS}s of ${TOTAL_S}s)"
  echo "\$ $*"
  timeout -k 15 "$limit" "$@" 2>&1 | tee "$LOGS/$stage.txt"
  RC=${PIPESTATUS[0]}
  TOOK=$((SECONDS - start))
}

verdict() {  # the summary's word for exit status $1
  case $1 in
    0) echo ok ;;
    124|137) echo TIMEOUT ;;
    *) echo "FAIL (rc $1)" ;;
  esac
}

pytest_detail() {  # pytest's last count line ("12 passed, 3 skipped in 40.1s")
  grep -E "[0-9]+ (passed|failed|error|skipped|deselected)|no tests ran" "$1" | tail -1 | sed 's/=//g; s/^ *//'
}

bench_detail() {  # the bench's summary line, else how many rows it printed before it stopped
  local line
  line=$(grep -E "^summary \(" "$1" | tail -1)
  if [[ -n $line ]]; then
    local left
    left=$(grep -oE "[0-9]+ rows not measured" "$1" | tail -1)
    line=${line#summary (*): }
    echo "${line}${left:+; $left (budget)}"
  else
    echo "$(grep -cE '^\[ *[0-9.]+s\]' "$1") rows started, no table (killed?)"
  fi
}

add_summary() { SUMMARY+=("| $1 | $2 | $3 | $4 |"); }

skip_if_no_time() {  # skip_if_no_time STAGE LIMIT: true (and a summary row) when the stage cannot run
  if (( $2 < 20 )); then add_summary "$1" "skipped" 0 "no time left (${2}s)"; return 0; fi
  return 1
}

status=0
{
  echo "== install"
  if [[ ${INSTALL:-1} == 1 ]]; then python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3; fi
  python3 - <<'PY'
import datetime, os, platform, torch, triton
try:
    import transformers; tf = transformers.__version__
except ImportError:
    tf = "-"
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print(f"{datetime.date.today()} | {gpu} | torch {torch.__version__} | triton {triton.__version__}"
      f" | transformers {tf} | python {platform.python_version()} | {os.cpu_count()} CPUs")
PY
} 2>&1 | tee "$LOGS/install.txt"
ENV_LINE=$(tail -1 "$LOGS/install.txt")

if enabled kernel; then
  L=$(limit_for kernel)
  if ! skip_if_no_time "kernel tests" "$L"; then
    run_stage kernel "$L" "GPU kernel tests" \
      python3 -m pytest -q tests/kernels -m gpu -p no:cacheprovider --maxfail=10 ${PYTEST_ARGS:-}
    add_summary "kernel tests" "$(verdict $RC)" "$TOOK" "$(pytest_detail "$LOGS/kernel.txt")"
    (( RC == 0 )) || status=1
  fi
fi

if enabled training; then
  if [[ ! -f tests/models/test_training.py ]]; then
    add_summary "training tests" "absent" 0 "tests/models/test_training.py not in this tree"
  else
    L=$(limit_for training)
    if ! skip_if_no_time "training tests" "$L"; then
      run_stage training "$L" "training tests" \
        python3 -m pytest -q tests/models/test_training.py -m gpu -p no:cacheprovider --maxfail=10 ${PYTEST_ARGS:-}
      # pytest's 5: no test collected (all deselected): not a failure of this check
      (( RC == 5 )) && RC=0
      add_summary "training tests" "$(verdict $RC)" "$TOOK" "$(pytest_detail "$LOGS/training.txt")"
      (( RC == 0 )) || status=1
    fi
  fi
fi

for mode in fwd fwdbwd; do
  enabled $mode || continue
  L=$(limit_for $mode)
  skip_if_no_time "$mode table" "$L" && continue
  args_var=$([[ $mode == fwd ]] && echo "${FWD_ARGS:-}" || echo "${FWDBWD_ARGS:-}")
  budget=$(( L > 2 * GRACE ? L - GRACE : L / 2 ))
  run_stage $mode "$L" "$mode table (--budget-s $budget)" \
    python3 -m flashfuse.bench --mode $mode --budget-s "$budget" --csv "$OUT/attention_$mode.csv" $args_var
  add_summary "$mode table" "$(verdict $RC)" "$TOOK" "$(bench_detail "$LOGS/$mode.txt")"
  (( RC == 0 )) || status=1
done

if enabled models; then
  L=$(limit_for models)
  if ! skip_if_no_time "models" "$L"; then
    budget=$(( L > 2 * GRACE ? L - GRACE : L / 2 ))
    run_stage models "$L" "whole model (--budget-s $budget)" \
      python3 bench/models.py --budget-s "$budget" --csv "$OUT/models.csv" ${MODELS_ARGS-"--quick"}
    detail=$(grep -E "^summary \(models\)" "$LOGS/models.txt" | tail -1)
    add_summary "models" "$(verdict $RC)" "$TOOK" "${detail#summary (models): }"
    (( RC == 0 )) || status=1
  fi
fi

if enabled passes; then
  L=$(limit_for passes)
  if ! skip_if_no_time "pass tests (CUDA tensors)" "$L"; then
    run_stage passes "$L" "pass tests with CUDA tensors" env FLASHFUSE_TEST_DEVICE=cuda \
      python3 -m pytest -q tests/passes tests/test_ops.py -p no:cacheprovider ${PYTEST_ARGS:-}
    add_summary "pass tests (CUDA tensors)" "$(verdict $RC)" "$TOOK" "$(pytest_detail "$LOGS/passes.txt")"
    (( RC == 0 )) || status=1
  fi
fi

if enabled quickstart; then
  L=$(limit_for quickstart)
  if ! skip_if_no_time "quickstart" "$L"; then
    run_stage quickstart "$L" "quickstart" python3 examples/quickstart.py
    add_summary "quickstart" "$(verdict $RC)" "$TOOK" "$(grep -E '^eager .* ms' "$LOGS/quickstart.txt" | tail -1)"
    (( RC == 0 )) || status=1
  fi
fi

# every stage's whole output in one file (a device call brings back at most 8 files)
for f in install "${ORDER[@]}"; do
  [[ -f "$LOGS/$f.txt" ]] || continue
  { echo "===== $f"; cat "$LOGS/$f.txt"; echo; } >>"$OUT/gpu_check.log"
done

{
  echo
  echo "== summary: $ENV_LINE"
  echo "   wall ${SECONDS}s of ${TOTAL_S}s; files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
  echo "| stage | result | s | detail |"
  echo "|---|---|---|---|"
  printf '%s\n' "${SUMMARY[@]}"
} | tee "$OUT/summary.txt"
rm -rf "$LOGS"
exit $status
