"""Forward attention speed: flashfuse's kernel against its peers, side by side in one run.

    python bench/attention.py                 # the default table (bf16, D=64/128, S=1k..8k, causal or not)
    python bench/attention.py --quick         # a few rows
    python bench/attention.py --csv out.csv

TFLOP/s = 4*B*H*Sq*Sk*D / time (halved for causal). Peers: SDPA with the cuDNN backend, SDPA with the
flash backend (FlashAttention-2), FlexAttention (compiled), plain ``torch.compile`` (Inductor) on the
naive code. Every flashfuse row is checked against SDPA in the same run (max abs error).
"""

from __future__ import annotations

import argparse
import csv
import platform
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Case:
    dtype: torch.dtype
    B: int
    H: int
    S: int
    D: int
    causal: bool

    @property
    def flops(self) -> float:
        f = 4.0 * self.B * self.H * self.S * self.S * self.D
        return f / 2 if self.causal else f

    def label(self) -> str:
        return (f"{str(self.dtype).replace('torch.', '')} B={self.B} H={self.H} S={self.S} D={self.D} "
                f"{'causal' if self.causal else 'full'}")


def naive(q, k, v, causal: bool):
    s = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if causal:
        T = q.shape[-2]
        keep = torch.arange(T, device=q.device)[:, None] >= torch.arange(T, device=q.device)[None, :]
        s = s.masked_fill(~keep, float("-inf"))
    return s.softmax(-1) @ v


def bench(fn, *args) -> float:
    from triton.testing import do_bench

    return do_bench(lambda: fn(*args), warmup=25, rep=100)


def run_case(case: Case, methods: list[str]) -> dict[str, float | str]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from flashfuse.kernels.flash_fwd import flash_attention_forward

    torch.manual_seed(0)
    q, k, v = (torch.randn(case.B, case.H, case.S, case.D, device="cuda", dtype=case.dtype) for _ in range(3))
    scale = case.D ** -0.5
    row: dict[str, float | str] = {"case": case.label()}

    def ff(q, k, v):
        return flash_attention_forward(q, k, v, scale=scale, window_right=0 if case.causal else None)[0]

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=case.causal)
    out = ff(q, k, v)
    row["max_err"] = (out.float() - ref.float()).abs().max().item()

    for name in methods:
        try:
            if name == "flashfuse":
                ms = bench(ff, q, k, v)
            elif name in ("sdpa_cudnn", "sdpa_flash"):
                backend = SDPBackend.CUDNN_ATTENTION if name == "sdpa_cudnn" else SDPBackend.FLASH_ATTENTION

                def sdpa(q, k, v, backend=backend):
                    with sdpa_kernel([backend]):
                        return F.scaled_dot_product_attention(q, k, v, is_causal=case.causal)

                ms = bench(sdpa, q, k, v)
            elif name == "flex":
                from torch.nn.attention.flex_attention import create_block_mask, flex_attention

                flex = torch.compile(flex_attention)
                block_mask = None
                if case.causal:
                    block_mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, case.S, case.S)
                ms = bench(lambda q, k, v: flex(q, k, v, block_mask=block_mask), q, k, v)
            elif name == "torch_compile":
                if case.S > 8192:
                    raise RuntimeError("skipped: S x S scores too large")
                compiled = torch.compile(lambda q, k, v: naive(q, k, v, case.causal))
                ms = bench(compiled, q, k, v)
            else:
                raise ValueError(name)
            row[name] = case.flops / (ms * 1e-3) / 1e12
        except Exception as exc:  # a peer that cannot run a case gets an empty cell, not a crash
            row[name] = f"n/a ({type(exc).__name__})"
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--csv", default=None)
    parser.add_argument("--methods", default="flashfuse,sdpa_cudnn,sdpa_flash,flex,torch_compile")
    parser.add_argument("--seqs", default=None, help="comma-separated sequence lengths")
    parser.add_argument("--dims", default=None, help="comma-separated head dims")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/attention.py needs a CUDA GPU")
    methods = args.methods.split(",")
    seqs = [1024, 4096] if args.quick else [1024, 2048, 4096, 8192]
    dims = [128] if args.quick else [64, 128]
    if args.seqs:
        seqs = [int(x) for x in args.seqs.split(",")]
    if args.dims:
        dims = [int(x) for x in args.dims.split(",")]
    cases = [Case(torch.bfloat16, max(1, 16384 // S), 16, S, D, causal)
             for D in dims for S in seqs for causal in (False, True)]
    import triton

    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"python {platform.python_version()}")
    rows = []
    for case in cases:
        row = run_case(case, methods)
        rows.append(row)
        print("  " + " | ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
              flush=True)
    header = ["case", *methods, "max_err"]
    print("\nforward TFLOP/s\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        cells = [f"{row[h]:.1f}" if isinstance(row.get(h), float) and h != "max_err" else
                 f"{row[h]:.1e}" if h == "max_err" else str(row.get(h, "")) for h in header]
        print("| " + " | ".join(cells) + " |")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
