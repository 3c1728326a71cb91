"""Host time of one op call on the cuDNN path, next to SDPA's own, and what short calls then run at.

    python bench/op_host.py            # GPU, ~20 s

Two measurements per case, bf16, no mask:

* ``host us/call``: CPU time of one call with the GPU never the bottleneck (batches of 50 calls, a device sync
  between batches, the median batch): ``F.scaled_dot_product_attention`` with only the cuDNN backend allowed,
  ``torch.ops.flashfuse.attention`` (what Inductor's code calls; its hot path serves every call after the first),
  and the op with the hot path turned off (``ops._cudnn_known`` answering None: every call runs the checks).
* ``TFLOP/s``: ``triton.testing.do_bench`` of back-to-back calls for the same three, for shapes whose GPU time is
  close to the host time (causal S = 512, B = 32, H = 16, D = 128: ~26 us of cuDNN on an H100), where a slower
  host path shows up as a slower call (bench/RESULTS.md, session 4: the op's 288 vs cuDNN's 333 TFLOP/s there).
  do_bench flushes the L2 before each call (a memset), which hides part of the host time; a last column times
  ``aten._scaled_dot_product_cudnn_attention`` with ``compute_log_sumexp=True`` (what the op asks for: its lse is
  the backward's) -- SDPA's inference call asks for none -- to tell the host time from the kernel cuDNN picks.
"""

from __future__ import annotations

import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

CASES = (  # B, H, S, D, causal
    (1, 16, 128, 64, False),
    (32, 16, 512, 128, True),
    (32, 16, 512, 128, False),
    (16, 16, 1024, 128, True),
)


def _host_us(fn, batches: int = 20, calls: int = 50) -> float:
    per = []
    for _ in range(batches):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        per.append((time.perf_counter() - start) / calls * 1e6)
    torch.cuda.synchronize()
    return statistics.median(per)


def main() -> None:
    import triton.testing

    from flashfuse import ops

    print(f"# {torch.cuda.get_device_name(0)} | torch {torch.__version__} | bf16, no mask", flush=True)
    print("| case | SDPA cuDNN host us | op host us | op, no hot path, host us | SDPA cuDNN TFLOP/s | op TFLOP/s "
          "| op, no hot path TFLOP/s | op / SDPA | aten cuDNN with lse TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    known = ops._cudnn_known
    for B, H, S, D, causal in CASES:
        q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        band = 0 if causal else None

        def sdpa():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        def op():
            return torch.ops.flashfuse.attention(q, k, v, None, None, None, band, -math.inf, 0.0)

        def op_cold():
            ops._cudnn_known = lambda key: None
            try:
                return op()
            finally:
                ops._cudnn_known = known

        def aten_lse():
            return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False,
                                                                       scale=D ** -0.5)

        with torch.no_grad():
            ref = sdpa()
            assert (op()[0] - ref).abs().max().item() < 2e-2  # the same kernel: equal up to its nondeterminism
            host = [_host_us(fn) for fn in (sdpa, op, op_cold)]
            flops = 4 * B * H * S * S * D / (2 if causal else 1)
            tf = [flops / (triton.testing.do_bench(fn, warmup=25, rep=200) * 1e-3) / 1e12
                  for fn in (sdpa, op, op_cold, aten_lse)]
        name = f"{'causal' if causal else 'full'} B{B} H{H} S{S} D{D}"
        print(f"| {name} | {host[0]:.1f} | {host[1]:.1f} | {host[2]:.1f} | {tf[0]:.0f} | {tf[1]:.0f} | {tf[2]:.0f} "
              f"| {tf[1] / tf[0]:.2f} | {tf[3]:.0f} |", flush=True)


if __name__ == "__main__":
    main()
