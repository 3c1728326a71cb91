"""Shared test helpers: compile with flashfuse, read the report, compare with the eager and float64 results."""

from __future__ import annotations

import copy

import torch

import flashfuse
from flashfuse import report as _report

EPS = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-10}


def compile_and_report(fn, *args, inductor: bool = False, **options):
    """``(output, report)`` of ``fn(*args)`` compiled with flashfuse (Inductor skipped unless asked)."""
    torch._dynamo.reset()
    mark = _report.collect()
    compiled = torch.compile(fn, backend="flashfuse", options={"inductor": inductor, **options})
    out = compiled(*args)
    return out, _report.last_report(since=mark)


def to64(x):
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.detach().double()
    return x


def assert_matches_eager(fn, args, out, *, ref_args=None):
    """The numerics rule: flashfuse's error vs float64 is at most 2x eager's error in the same dtype, + eps."""
    eager = fn(*args)
    fn64 = copy.deepcopy(fn).double() if isinstance(fn, torch.nn.Module) else fn
    ref = fn64(*(ref_args if ref_args is not None else [to64(a) for a in args]))
    assert out.shape == eager.shape, (out.shape, eager.shape)
    assert out.dtype == eager.dtype, (out.dtype, eager.dtype)
    nan_out, nan_ref = torch.isnan(out), torch.isnan(ref)
    assert torch.equal(nan_out, nan_ref), "NaN positions differ from the original code"
    o, e, r = (t.double().nan_to_num() for t in (out, eager, ref))
    err = (o - r).abs().max().item()
    err_eager = (e - r).abs().max().item()
    eps = EPS[out.dtype] * max(1.0, r.abs().max().item())
    assert err <= 2 * err_eager + eps, f"max error {err:.3g} vs eager's {err_eager:.3g} (eps {eps:.3g})"
    mean_err = (o - r).abs().mean().item()
    mean_eager = (e - r).abs().mean().item()
    assert mean_err <= 2 * mean_eager + eps, f"mean error {mean_err:.3g} vs eager's {mean_eager:.3g}"


def qkv(B=2, H=4, S=24, D=16, Hkv=None, Sk=None, dtype=torch.float32, device="cpu", layout="bhsd"):
    """Random q, k, v in ``[B, H, S, D]`` (``layout='bshd'``: made as [B, S, H, D] then transposed)."""
    Hkv = Hkv or H
    Sk = Sk or S

    def make(h, s):
        if layout == "bshd":
            return torch.randn(B, s, h, D, dtype=dtype, device=device).transpose(1, 2)
        return torch.randn(B, h, s, D, dtype=dtype, device=device)

    return make(H, S), make(Hkv, Sk), make(Hkv, Sk)


def only_site(report):
    assert report.total >= 1, str(report)
    return report.sites[0]


__all__ = ["compile_and_report", "assert_matches_eager", "qkv", "only_site", "to64", "flashfuse"]
