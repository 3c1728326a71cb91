#!/usr/bin/env bash
# One GPU session's whole check, in one command (device time is scarce):
#   GPU kernel tests, the pass tests on CUDA tensors, the quickstart, the forward benchmark table.
# Usage (on the GPU machine, repo root): bash bench/gpu_check.sh [OUTDIR]
set -uo pipefail
OUT="${1:-${OUT:-/tmp/flashfuse-out}}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
python3 - <<'PY' | tee "$OUT/env.txt"
import torch, triton, datetime
print(f"{datetime.date.today()} | {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
PY
status=0
echo "== GPU kernel tests"
timeout 900 python3 -m pytest -q -x tests/kernels -m gpu -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt" || status=1
echo "== pass tests with CUDA tensors"
FLASHFUSE_TEST_DEVICE=cuda timeout 900 python3 -m pytest -q tests/passes tests/test_ops.py -p no:cacheprovider 2>&1 | tail -8 | tee "$OUT/pass_tests.txt" || status=1
echo "== quickstart"
timeout 600 python3 examples/quickstart.py 2>&1 | tail -8 | tee "$OUT/quickstart.txt" || status=1
echo "== forward benchmark"
timeout 1200 python3 bench/attention.py ${BENCH_ARGS:-} --csv "$OUT/attention.csv" 2>&1 | tee "$OUT/bench.txt" || status=1
exit $status
