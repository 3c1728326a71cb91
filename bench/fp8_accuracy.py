"""FP8 accuracy (issue 6), on any machine: the FP8 kernel's arithmetic emulated in torch (flashfuse/fp8.py)
against a float64 reference, next to bf16 eager. Relative RMS error ||out - ref|| / ||ref||.

    python bench/fp8_accuracy.py
"""

from __future__ import annotations

import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from flashfuse.fp8 import fp8_attention_emulated, relative_rms_error  # noqa: E402
from flashfuse.testing import attention_ref  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    B, H, S, D = 2, 4, 512, 128
    q, k, v = (torch.randn(B, H, S, D) for _ in range(3))
    qo, ko, vo = q.clone(), k.clone(), v.clone()
    for t in (qo, ko, vo):
        t[..., :4] *= 100  # four outlier channels, 100x
    print(f"B={B} H={H} S={S} D={D}, non-causal; relative RMS error vs float64")
    print("| inputs | FP8: per-block Q/K, per-channel V | FP8: one scale per head | bf16 eager |")
    print("|---|---|---|---|")
    for name, (a, b, c) in (("Gaussian", (q, k, v)), ("4 outlier channels x100", (qo, ko, vo))):
        ref, _ = attention_ref(a.double(), b.double(), c.double(), scale=D**-0.5)
        bf, _ = attention_ref(a.bfloat16(), b.bfloat16(), c.bfloat16(), scale=D**-0.5, upcast=False)
        fine = relative_rms_error(fp8_attention_emulated(a, b, c, qk_block=128, v_per_channel=True), ref)
        coarse = relative_rms_error(fp8_attention_emulated(a, b, c, qk_block=None, v_per_channel=False), ref)
        print(f"| {name} | {fine:.2e} | {coarse:.2e} | {relative_rms_error(bf, ref):.2e} |")


if __name__ == "__main__":
    main()
