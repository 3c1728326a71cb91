#!/usr/bin/env bash
# A two-GPU device call in one command (<= ~560 s): independent lanes run at once, one GPU each where timing
# matters, so one call does the work of several (the device time is what a session is short of).
#
# PLAN=tune (the first call of session 3):
#   lane A (GPU 0, alone):  bench/tune_bwd.py            the backward sweep (timings: nothing else on GPU 0)
#                           then torchrun bench/distributed.py --quick on both GPUs (FSDP2; GPU 1 is shared with
#                           lane B's small models while it runs: step times are an upper bound)
#   lane B (GPU 1):         pytest tests/distributed/test_gpu_nccl.py  (world 1 on GPU 1, then world 2)
#   lane C (GPU 1):         pytest tests/models/test_training.py -m gpu, then tests/kernels/test_flash_decode.py -m gpu
# PLAN=verify (default):
#   lane A (GPU 0, alone):  fwd+bwd table (D=128, S=4k: causal, full, GQA causal), models.py --quick, then
#                           torchrun bench/distributed.py --quick: FSDP2, then DDP (both GPUs)
#   lane B (GPU 1):         GPU tests: test_ops, test_mask_probe, kernels (bwd, sm90, dropout), training
#   lane C (GPU 1):         NCCL tests world 1, then world 2 (both GPUs)
#
# PLAN=final: lane A (GPU 0) fwd+bwd table with the op's row, FP8 rows (two schemes), decode bandwidth,
#   models.py --quick, then FSDP2 on both GPUs; lanes B and C (GPU 1): GPU tests (ops, training, bwd; fp8, decode).
#
# Usage on the device: PLAN=verify bash bench/gpu_x2.sh  (OUT receives the logs and summary.txt; at most 8 files
# come back). Knobs: TUNE_ARGS, TUNE_BUDGET_S (240), DIST_ARGS, FWDBWD_ARGS, MODELS_ARGS.
set -uo pipefail
OUT="${OUT:-/tmp/flashfuse-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FLASHFUSE_SM90_AUTOTUNE=0
# the device notes: NVLink multicast stays off on these machines
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
SECONDS=0
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
python3 -c 'import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__,
  [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])' | tee "$OUT/summary.txt"

pytest_count() { grep -E "[0-9]+ (passed|failed|error|skipped)" "$1" | tail -1 | sed 's/=//g; s/^ *//'; }

lane_a() {
  CUDA_VISIBLE_DEVICES=0 timeout -k 10 $((${TUNE_BUDGET_S:-240} + 45)) \
    python3 bench/tune_bwd.py --budget-s "${TUNE_BUDGET_S:-240}" ${TUNE_ARGS:-} >"$OUT/tune_bwd.txt" 2>&1
  echo "tune_bwd rc=$? at ${SECONDS}s" >>"$OUT/lanes.txt"
  timeout -k 10 $((540 - SECONDS)) python3 -m torch.distributed.run --nproc-per-node 2 \
    bench/distributed.py --quick ${DIST_ARGS:-} >"$OUT/dist_bench.txt" 2>&1
  echo "dist_bench rc=$? at ${SECONDS}s" >>"$OUT/lanes.txt"
}

lane_b() {
  CUDA_VISIBLE_DEVICES=1 timeout -k 10 240 python3 -m pytest -v -p no:cacheprovider \
    tests/distributed/test_gpu_nccl.py -k world1 >"$OUT/nccl.txt" 2>&1
  echo "nccl world1 rc=$? at ${SECONDS}s" >>"$OUT/lanes.txt"
  timeout -k 10 200 python3 -m pytest -v -p no:cacheprovider tests/distributed/test_gpu_nccl.py \
    -k "world2 and not compiled_blocks" >>"$OUT/nccl.txt" 2>&1
  echo "nccl world2 rc=$? at ${SECONDS}s" >>"$OUT/lanes.txt"
}

lane_c() {
  CUDA_VISIBLE_DEVICES=1 timeout -k 10 400 python3 -m pytest -v -p no:cacheprovider \
    tests/models/test_training.py -m gpu >"$OUT/training.txt" 2>&1
  echo "training rc=$? at ${SECONDS}s" >>"$OUT/lanes.txt"
  CUDA_VISIBLE_DEVICES=1 timeout -k 10 $((530 - SECONDS)) python3 -m pytest -q -p no:cacheprovider \
    tests/kernels/test_flash_decode.py -m gpu >"$OUT/decode.txt" 2>&1
  echo "decode tests rc=$? at ${SECONDS}s" >>"$OUT/lanes.txt"
}

verify_a() {
  CUDA_VISIBLE_DEVICES=0 timeout -k 10 150 python3 -m flashfuse.bench --mode fwdbwd --dtypes bf16 --dims 128 \
    --seqs 4096 --cases causal,full,gqa_causal --budget-s 110 --csv "$OUT/fwdbwd.csv" ${FWDBWD_ARGS:-} \
    >"$OUT/bench.txt" 2>&1
  echo "fwdbwd rc=$? at ${SECONDS}s" >>"$OUT/lanes.txt"
  CUDA_VISIBLE_DEVICES=0 timeout -k 10 170 python3 bench/models.py --quick --budget-s 130 ${MODELS_ARGS:-} \
    >>"$OUT/bench.txt" 2>&1
  echo "models rc=$? at ${SECONDS}s" >>"$OUT/lanes.txt"
  for wrap in --fsdp --ddp; do
    timeout -k 10 $(( (545 - SECONDS) / 2 > 60 ? (545 - SECONDS) / 2 : 60 )) python3 -m torch.distributed.run \
      --nproc-per-node 2 bench/distributed.py --quick $wrap ${DIST_ARGS:-} >>"$OUT/dist_bench.txt" 2>&1
    echo "dist_bench $wrap rc=$? at ${SECONDS}s" >>"$OUT/lanes.txt"
  done
}

verify_b() {
  CUDA_VISIBLE_DEVICES=1 timeout -k 10 500 python3 -m pytest -v -p no:cacheprovider -m gpu \
    tests/test_ops.py tests/test_mask_probe.py tests/kernels/test_flash_bwd.py tests/kernels/test_flash_fwd_sm90.py \
    tests/kernels/test_dropout.py tests/models/test_training.py >"$OUT/gpu_tests.txt" 2>&1
  echo "gpu tests rc=$? at ${SECONDS}s" >>"$OUT/lanes.txt"
}

verify_c() {
  CUDA_VISIBLE_DEVICES=1 timeout -k 10 300 python3 -m pytest -v -p no:cacheprovider \
    tests/distributed/test_gpu_nccl.py -k world1 >"$OUT/nccl.txt" 2>&1
  echo "nccl world1 rc=$? at ${SECONDS}s" >>"$OUT/lanes.txt"
  timeout -k 10 $((540 - SECONDS)) python3 -m pytest -v -p no:cacheprovider tests/distributed/test_gpu_nccl.py \
    -k "world2 and not compiled_blocks" >>"$OUT/nccl.txt" 2>&1
  echo "nccl world2 rc=$? at ${SECONDS}s" >>"$OUT/lanes.txt"
}

final_a() {  # timings, GPU 0 alone (lane B/C's tests use GPU 1); every step bounded so the lane ends by ~520 s
  CUDA_VISIBLE_DEVICES=0 timeout -k 10 130 python3 -m flashfuse.bench --mode fwdbwd --dtypes bf16 --dims 128 \
    --seqs 4096 --cases causal,gqa_causal,full --methods flashfuse,flashfuse_op,sdpa_cudnn,sdpa_flash,flex,torch_compile \
    --budget-s 100 --csv "$OUT/fwdbwd.csv" >"$OUT/bench.txt" 2>&1
  echo "fwdbwd rc=$? at ${SECONDS}s" >>"$OUT/lanes.txt"
  for scheme in int8qk fp8; do
    CUDA_VISIBLE_DEVICES=0 FLASHFUSE_FP8_SCHEME=$scheme timeout -k 10 75 python3 -m flashfuse.bench --dtypes bf16 \
      --dims 128 --seqs 4096,16384 --cases full,causal --methods flashfuse,flashfuse_fp8,sdpa_cudnn --budget-s 55 \
      >>"$OUT/bench.txt" 2>&1
    echo "fp8 bench $scheme rc=$? at ${SECONDS}s" >>"$OUT/lanes.txt"
  done
  CUDA_VISIBLE_DEVICES=0 timeout -k 10 70 bash -c 'python3 bench/decode.py --quick && python3 bench/decode.py --host' \
    >>"$OUT/bench.txt" 2>&1
  echo "decode bench rc=$? at ${SECONDS}s" >>"$OUT/lanes.txt"
  CUDA_VISIBLE_DEVICES=0 timeout -k 10 $(( 450 - SECONDS > 60 ? 450 - SECONDS : 60 )) python3 bench/models.py --quick \
    --budget-s $(( 410 - SECONDS > 40 ? 410 - SECONDS : 40 )) >>"$OUT/bench.txt" 2>&1
  echo "models rc=$? at ${SECONDS}s" >>"$OUT/lanes.txt"
  timeout -k 10 $(( 550 - SECONDS > 30 ? 550 - SECONDS : 30 )) python3 -m torch.distributed.run --nproc-per-node 2 \
    bench/distributed.py --quick --fsdp >"$OUT/dist_bench.txt" 2>&1
  echo "dist_bench --fsdp rc=$? at ${SECONDS}s" >>"$OUT/lanes.txt"
}

final_b() {
  CUDA_VISIBLE_DEVICES=1 timeout -k 10 520 python3 -m pytest -v -p no:cacheprovider -m gpu tests/test_ops.py \
    tests/models/test_training.py tests/kernels/test_flash_bwd.py >"$OUT/gpu_tests.txt" 2>&1
  echo "gpu tests (ops, training, bwd) rc=$? at ${SECONDS}s" >>"$OUT/lanes.txt"
}

final_c() {
  CUDA_VISIBLE_DEVICES=1 timeout -k 10 300 python3 -m pytest -v -p no:cacheprovider -m gpu \
    tests/kernels/test_flash_fwd_fp8.py tests/test_fp8_option.py >"$OUT/gpu_tests2.txt" 2>&1
  echo "gpu tests (fp8) rc=$? at ${SECONDS}s" >>"$OUT/lanes.txt"
  CUDA_VISIBLE_DEVICES=1 timeout -k 10 150 python3 -m pytest -v -s \
    -p no:cacheprovider -m gpu tests/kernels/test_flash_decode.py >>"$OUT/gpu_tests2.txt" 2>&1
  echo "gpu tests (decode) rc=$? at ${SECONDS}s" >>"$OUT/lanes.txt"
  # tokens/s of transformers generate (GPU 1 is shared with lane B's tests: an upper bound on the times)
  CUDA_VISIBLE_DEVICES=1 timeout -k 10 $(( 535 - SECONDS > 30 ? 535 - SECONDS : 30 )) python3 bench/generate.py \
    --layers 4 --batch 1 16 --new-tokens 32 --reps 2 >"$OUT/generate.txt" 2>&1
  echo "generate rc=$? at ${SECONDS}s" >>"$OUT/lanes.txt"
}

if [[ ${PLAN:-verify} == final ]]; then
  final_a & final_b & final_c &
  wait
  LOGS="gpu_tests gpu_tests2"
elif [[ ${PLAN:-verify} == tune ]]; then
  lane_a & lane_b & lane_c &
  wait
  LOGS="nccl training decode"
else
  verify_a & verify_b & verify_c &
  wait
  LOGS="gpu_tests nccl"
fi
{
  cat "$OUT/lanes.txt"
  for f in $LOGS; do echo "$f: $(grep -cE 'PASSED' "$OUT/$f.txt") passed, \
$(grep -cE ' (FAILED|ERROR)' "$OUT/$f.txt") failed/error; $(pytest_count "$OUT/$f.txt")"; done
  for f in $LOGS; do grep -E "^(FAILED|ERROR) " "$OUT/$f.txt" | head -12; done
  if [[ ${PLAN:-verify} == tune ]]; then echo "== tune_bwd (tail)"; tail -30 "$OUT/tune_bwd.txt"; else
    echo "== benchmarks"; grep -E "^\||^summary|^#|TFLOP|GB/s" "$OUT/bench.txt" | tail -60; fi
  echo "== distributed bench"; grep -E "^\||^fsdp|^ddp|consistency" "$OUT/dist_bench.txt" | tail -14
  [[ -f "$OUT/generate.txt" ]] && { echo "== generate"; grep -E "^\||^#|flash_decode|speed" "$OUT/generate.txt" | tail -14; }
  echo "wall ${SECONDS}s"
} | tee -a "$OUT/summary.txt"
