"""What the kernel tests share: dtypes, tolerances, poisoned allocations, inputs and the numerics rule.

The rule (STYLE.md): against a float64 reference, the kernel's error is at most 2x that of the same math run
eagerly in the input's precision (``attention_ref(upcast=False)``), plus ``EPS[dtype]`` (max) or
``EPS / 8`` (mean: a bias shows up there first); NaN and -inf lse positions are exactly the reference's.
"""

from __future__ import annotations

import pytest
import torch

FP16, BF16, FP32, FP64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
FP32_MIN = torch.finfo(torch.float32).min
# slack on top of 2x eager's error: 1e-5 in fp32, about half an ulp at 1.0 for the 16-bit types
EPS = {FP32: 1e-5, FP16: 2.0**-11, BF16: 2.0**-8}
LSE_EPS = 1e-5

# The interpreter runs the kernels in numpy, which warns where the GPU is silent: 0 / 0 and log2(0) on rows
# with nothing kept (NaN / -inf on purpose, checked), exp2 overflow inside tanh (saturates on purpose).
INTERPRETER_WARNINGS = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning"),
]


def seed_and_poison(monkeypatch, *, empty_like: bool = False) -> None:
    """Seed 0, and make ``torch.empty`` (and ``empty_like``) return NaN-filled float tensors, so that an output
    element a kernel never writes shows up as NaN."""
    torch.manual_seed(0)
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(real_empty(*a, **kw)))
    if empty_like:
        monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(real_empty_like(*a, **kw)))


def qkv(B, Hq, Hkv, Sq, Sk, D, dtype, device, layout="bhsd", Dv=None):
    """Fresh N(0, 1) inputs in ``dtype``; ``bshd`` makes ``[B, S, H, D]`` and views it as ``[B, H, S, D]``."""
    Dv = D if Dv is None else Dv

    def make(H, S, d):
        if layout == "bshd":
            return torch.randn(B, S, H, d, dtype=dtype, device=device).transpose(1, 2)
        return torch.randn(B, H, S, d, dtype=dtype, device=device)

    return make(Hq, Sq, D), make(Hkv, Sk, D), make(Hkv, Sk, Dv)


def assert_forward_rule(out, lse, ref, ref_lse, low, low_lse, dtype) -> None:
    """NaN / -inf patterns as the reference's, then the 2x-eager rule on ``out`` (max and mean) and ``lse``."""
    assert torch.equal(out.isnan(), ref.isnan()), "NaN pattern differs from the reference"
    assert torch.equal(lse.isneginf(), ref_lse.isneginf()), "-inf lse pattern differs from the reference"
    assert not lse.isnan().any()
    keep = ~ref.isnan()
    if keep.any():
        err = (out.double() - ref)[keep].abs()
        eager = (low.double() - ref)[keep].abs()
        eps = EPS[dtype]
        assert err.max() <= 2 * eager.max() + eps, f"max error {err.max():.3e} vs eager {eager.max():.3e}"
        assert err.mean() <= 2 * eager.mean() + eps / 8, f"mean error {err.mean():.3e} vs eager {eager.mean():.3e}"
    fin = ref_lse.isfinite()
    if fin.any():
        lerr = (lse.double() - ref_lse.double())[fin].abs().max()
        leager = (low_lse.double() - ref_lse.double())[fin].abs().max()
        assert lerr <= 2 * leager + LSE_EPS, f"lse error {lerr:.3e} vs eager {leager:.3e}"


# bands every kernel test sweeps: (window_left, window_right)
WINDOWS = {"full": (None, None), "causal": (None, 0), "window7": (7, 0)}


def shape_id(s) -> str:
    """pytest id of a ``(B, Hq, Hkv, Sq, Sk, D, dtype, layout)`` case."""
    B, Hq, Hkv, Sq, Sk, D, dtype, layout = s
    return f"B{B}-H{Hq}/{Hkv}-Sq{Sq}-Sk{Sk}-D{D}-{str(dtype)[6:]}-{layout}"
