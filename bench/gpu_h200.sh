#!/usr/bin/env bash
# A one-GPU device call in one command (<= ~560 s), steps in sequence so timings never share the GPU.
#
# PLAN=tune:   the forward sweep (D=128, S=4k, 1k, 16k; with host-descriptor variants), the decode
#              sweep (bench/decode.py --tune), then the sm90 and decode GPU tests.
# PLAN=verify: GPU tests (kernels, op, decode, fp8, probe, transformers models), the D=64/256 forward sweep,
#              decode bandwidth.
# PLAN=final:  the forward table (kernel and op against every peer; D=128 all S, D=64/256 and fp16 at 4k), the
#              fwd+bwd table, then the GPU tests not yet run (sm90 candidates, fp8, probe, decode table, Llama training).
# PLAN=fp8:    the FP8 kernel's GPU tests (host descriptors, every candidate, long sequences), then the FP8 rows
#              autotuned (host-descriptor candidates included: the default since session 6) next to the bf16 kernel
#              and cuDNN.
# PLAN=fp8ab:  FP8 device vs host descriptors (forced configs), backward GPU cases, the 16-layer model (bench/models.py).
# PLAN=generate: bench/generate.py (4 layers, batch 1 and 16; GEN_ARGS replaces the arguments).
# PLAN=infer:  the inference ops (attention_infer, decode_inline; the C++ wrapper default): their tests and the decode GPU tests, the
#              decode op's host time (bench/decode.py --host), then 16-layer generation against torch.compile,
#              interleaved (GEN_ARGS replaces the generate arguments).
# PLAN=bwd:    the backward sweeps (BWD128, BWD64, BWD256: tune_bwd --only lists; the TMA flags are the 9th and
#              10th fields), the backward GPU tests, the fwd+bwd table.
#
# Usage on the device: PLAN=tune bash bench/gpu_h200.sh   ($OUT receives the logs; at most 8 files come back).
# Knobs: FWD_ARGS, DECODE_ARGS, TABLE_ARGS.
set -uo pipefail
OUT="${OUT:-/tmp/flashfuse-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FLASHFUSE_SM90_AUTOTUNE=0
SECONDS=0
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
python3 -c 'import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__,
  torch.cuda.get_device_name(0))' | tee "$OUT/summary.txt"
step() {  # step NAME TIMEOUT_S LOG CMD...: run, log its rc and the elapsed time
  local name=$1 limit=$2 log=$3; shift 3
  local left=$((575 - SECONDS))
  ((limit > left)) && limit=$left
  if ((limit < 20)); then echo "$name skipped (no time left) at ${SECONDS}s" >>"$OUT/summary.txt"; return; fi
  timeout -k 10 "$limit" "$@" >>"$log" 2>&1
  echo "$name rc=$? at ${SECONDS}s" >>"$OUT/summary.txt"
}
pytest_tail() { grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed)" "$1" | tail -12; }

case "${PLAN:-tune}" in
tune)
  step tune_fwd 190 "$OUT/tune_fwd.txt" python3 bench/tune_fwd.py --dims 128 --seqs 4096,1024,16384 \
    --budget-s 165 ${FWD_ARGS:-}
  step decode_tune 265 "$OUT/decode_tune.txt" timeout -s TERM 255 python3 bench/decode.py --tune --budget-s 220 \
    ${DECODE_ARGS:-}
  step gpu_tests 110 "$OUT/gpu_tests.txt" python3 -m pytest -v -p no:cacheprovider -m gpu \
    tests/kernels/test_flash_fwd_sm90.py tests/kernels/test_flash_decode_tuned.py -k "not warp_specialized"
  ;;
verify)
  step gpu_tests 260 "$OUT/gpu_tests.txt" python3 -m pytest -v -p no:cacheprovider -m gpu \
    tests/kernels/test_flash_fwd_sm90.py tests/test_ops.py tests/kernels/test_flash_decode.py \
    tests/kernels/test_flash_decode_tuned.py tests/kernels/test_flash_fwd_fp8.py tests/test_fp8_option.py \
    tests/test_mask_probe.py tests/models/test_training.py -k "not warp_specialized and (not train_gpu or llama)"
  step tune_fwd 160 "$OUT/tune_fwd.txt" python3 bench/tune_fwd.py --dims 64,256 --seqs 4096,1024 --ws off \
    --budget-s 140 ${FWD_ARGS:-}
  step decode 80 "$OUT/decode.txt" python3 bench/decode.py --quick
  ;;
final)
  step fwd_table 150 "$OUT/bench.txt" python3 -m flashfuse.bench --dtypes bf16 --dims 128 \
    --seqs 16384,4096,1024,512 --cases full,causal,gqa_causal,window --rep 60 --budget-s 135 \
    --methods flashfuse,flashfuse_op,flashfuse_fp8,sdpa_cudnn,sdpa_flash,flex,torch_compile \
    --csv "$OUT/fwd.csv" ${TABLE_ARGS:-}
  step fwd_dims 65 "$OUT/bench.txt" python3 -m flashfuse.bench --dtypes bf16,fp16 --dims 64,256 --seqs 4096 \
    --cases full,causal --methods flashfuse,flashfuse_op,sdpa_cudnn,flex --rep 60 --budget-s 50 \
    --csv "$OUT/fwd_dims.csv"
  step fwdbwd 65 "$OUT/bench.txt" python3 -m flashfuse.bench --mode fwdbwd --dtypes bf16 --dims 128 --seqs 4096 \
    --cases causal,gqa_causal --methods flashfuse,flashfuse_op,sdpa_cudnn,flex --budget-s 50
  step gpu_tests 290 "$OUT/gpu_tests.txt" python3 -m pytest -v -p no:cacheprovider -m gpu \
    tests/kernels/test_flash_fwd_fp8.py tests/test_fp8_option.py tests/kernels/test_flash_fwd_sm90.py \
    tests/models/test_training.py \
    -k "candidate or small_calls or (not sm90 and not schemes and (not train or train_gpu_bf16 and llama))"
  ;;
infer)
  step gpu_tests 200 "$OUT/gpu_tests.txt" python3 -m pytest -v -p no:cacheprovider tests/test_infer_op.py \
    tests/kernels/test_flash_decode.py -k "gpu or infer"
  step decode_host 60 "$OUT/decode_host.txt" python3 bench/decode.py --host
  step generate "${GEN_LIMIT:-330}" "$OUT/generate.txt" python3 bench/generate.py \
    ${GEN_ARGS:---layers 16 --interleave --batch 1 16 --new-tokens 32 --reps 5 --methods torch_compile flashfuse}
  ;;
bwd)
  step tune_bwd128 150 "$OUT/tune_bwd.txt" python3 bench/tune_bwd.py --dims 128 --seqs 4096 --masks causal,full \
    --heads 16/16,32/8 --budget-s 120 --only "${BWD128:-64,128,128,64,8,2,8,3;64,128,128,64,8,2,8,3,1}"
  step tune_bwd64 60 "$OUT/tune_bwd.txt" python3 bench/tune_bwd.py --dims 64 --seqs 4096 --masks causal \
    --heads 16/16 --budget-s 40 --only "${BWD64:-64,64,64,64,4,3;64,64,64,64,4,3,0,0,1}"
  step tune_bwd256 80 "$OUT/tune_bwd.txt" python3 bench/tune_bwd.py --dims 256 --seqs 4096 --masks causal \
    --heads 16/16,32/8 --budget-s 60 --only "${BWD256:-64,64,64,64,8,1;64,64,64,64,8,2,0,0,1,1}"
  step bwd_tests 150 "$OUT/gpu_tests.txt" python3 -m pytest -v -p no:cacheprovider -m gpu \
    tests/kernels/test_flash_bwd.py tests/kernels/test_dropout.py
  step fwdbwd 80 "$OUT/bench.txt" python3 -m flashfuse.bench --mode fwdbwd --dtypes bf16 --dims 128 --seqs 4096 \
    --cases causal,gqa_causal,full --methods flashfuse,flashfuse_op,sdpa_cudnn,sdpa_flash,flex --budget-s 65
  ;;
fp8)
  step fp8_tests 200 "$OUT/gpu_tests.txt" python3 -m pytest -v -p no:cacheprovider -m gpu \
    tests/kernels/test_flash_fwd_fp8.py -k "host or candidate or long"
  step fp8_table 200 "$OUT/bench.txt" env FLASHFUSE_FP8_AUTOTUNE=1 FLASHFUSE_FP8_HOST=1 python3 -m flashfuse.bench --dtypes bf16 \
    --dims 128 --seqs 16384,4096,1024 --cases full,causal --methods flashfuse,flashfuse_fp8,sdpa_cudnn --rep 60 \
    --budget-s 180 --csv "$OUT/fp8.csv"
  ;;
fp8ab)  # FP8 device vs host descriptors head to head (forced configs), the unreached backward GPU cases, the
  # full 16-layer model (training and prefill) for flashfuse, plain torch.compile and sdpa + torch.compile
  step fp8_host_tests 120 "$OUT/gpu_tests.txt" python3 -m pytest -v -p no:cacheprovider -m gpu \
    tests/kernels/test_flash_fwd_fp8.py -k "host or long"
  for c in "128,128,8,3" "128,128,8,3,host" "128,128,8,2" "128,128,8,2,host"; do
    step "fp8 $c" 45 "$OUT/bench.txt" env FLASHFUSE_FP8_CONFIG="$c" python3 -m flashfuse.bench --dtypes bf16 \
      --dims 128 --seqs 16384,4096 --cases full,causal --methods flashfuse_fp8 --rep 40 --budget-s 35
  done
  step bwd_tests 90 "$OUT/gpu_tests.txt" python3 -m pytest -v -p no:cacheprovider -m gpu \
    tests/kernels/test_flash_bwd.py -k "long_sequences and dtype1 and causal and not nocausal and (64-1000 or 128 or 256-4096)"
  step models16 240 "$OUT/models.txt" python3 bench/models.py --layers 16 --tasks train,prefill \
    --methods flashfuse,torch_compile,sdpa_compile --budget-s 200
  ;;
generate)
  step generate "${GEN_LIMIT:-200}" "$OUT/generate.txt" python3 bench/generate.py \
    ${GEN_ARGS:---layers 4 --batch 1 16 --new-tokens 32 --reps 2}
  ;;
esac
{
  echo "--- summary (${SECONDS}s)"
  [ -f "$OUT/tune_bwd.txt" ] && grep -E "TFLOP/s|best:|fastest|^#" "$OUT/tune_bwd.txt" | tail -40
  for f in "$OUT"/tune_fwd.txt; do [ -f "$f" ] && grep -E "TFLOP/s|WRONG|FAILED" "$f" | tail -40; done
  [ -f "$OUT/decode_tune.txt" ] && tail -40 "$OUT/decode_tune.txt"
  [ -f "$OUT/decode.txt" ] && tail -12 "$OUT/decode.txt"
  [ -f "$OUT/gpu_tests.txt" ] && pytest_tail "$OUT/gpu_tests.txt"
  [ -f "$OUT/bench.txt" ] && grep -E "^\|" "$OUT/bench.txt" | tail -40
  [ -f "$OUT/generate.txt" ] && grep -E "^\|" "$OUT/generate.txt" | tail -10
  [ -f "$OUT/op_host.txt" ] && grep -E "^\|" "$OUT/op_host.txt"
  [ -f "$OUT/decode_host.txt" ] && grep -E "^\|" "$OUT/decode_host.txt"
  [ -f "$OUT/models.txt" ] && grep -vE "^\s*$" "$OUT/models.txt" | tail -16
} >>"$OUT/summary.txt"
cat "$OUT/summary.txt"
