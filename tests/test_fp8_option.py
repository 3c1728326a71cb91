"""``options={"fp8": True}``: which sites run the FP8 kernel (``flashfuse::attention_fp8``), and why the others do not.

The decision is made at compile time (``ops.fp8_refusal``) and shown in the report (flags ``fp8`` and
``fp8_refused``). On the CPU the FP8 kernel runs under the Triton interpreter only when a test adds "cpu" to
``ops._FP8_DEVICES`` (users on the CPU always get the regular kernel: the interpreter is for tests).
"""

from __future__ import annotations

import math

import pytest
import torch

from flashfuse import fp8, ops
from flashfuse import report as ff_report


def causal_attention(q, k, v):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    n = q.shape[-2]
    keep = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    s = s.masked_fill(~keep, float("-inf"))
    return torch.softmax(s.float(), dim=-1).to(q.dtype) @ v


def masked_attention(q, k, v, pad):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~pad[:, None, None, :], float("-inf"))
    return torch.softmax(s.float(), dim=-1).to(q.dtype) @ v


def _inputs(requires_grad=False, S=40, D=64):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(1, 2, S, D, generator=g).bfloat16().requires_grad_(requires_grad) for _ in range(3)]


def _compile(fn, *args, fp8_on=True):
    torch._dynamo.reset()
    mark = ff_report.collect()
    out = torch.compile(fn, backend="flashfuse", options={"fp8": fp8_on, "inductor": False})(*args)
    return out, ff_report.last_report(since=mark)


@pytest.fixture
def fp8_on_cpu(monkeypatch):
    monkeypatch.setattr(ops, "_FP8_DEVICES", ("cuda", "cpu"))
    calls = []
    from flashfuse.kernels import flash_fwd_fp8

    real = flash_fwd_fp8.flash_attention_forward_fp8
    monkeypatch.setattr(flash_fwd_fp8, "flash_attention_forward_fp8",
                        lambda *a, **kw: calls.append(a[4] if len(a) > 4 else kw.get("causal")) or real(*a, **kw))
    return calls


def test_an_inference_site_runs_the_fp8_kernel(fp8_on_cpu):
    q, k, v = _inputs()
    with torch.no_grad():
        out, rep = _compile(causal_attention, q, k, v)
    (site,) = [s for s in rep.sites if s.rewritten]
    assert site.flags["fp8"] is True and "fp8_refused" not in site.flags
    assert site.flags["kernel"] == f"flash_fwd_fp8 ({fp8.DEFAULT_SCHEME})"
    assert fp8_on_cpu == [True]  # the kernel ran, causal
    ref = causal_attention(*(t.double() for t in (q, k, v)))
    assert fp8.relative_rms_error(out, ref) <= fp8.SCHEME_BOUNDS[fp8.DEFAULT_SCHEME]


def test_sites_that_cannot_use_fp8_say_why(fp8_on_cpu):
    q, k, v = _inputs(requires_grad=True)
    out, rep = _compile(causal_attention, q, k, v)  # training: needs grad
    (site,) = [s for s in rep.sites if s.rewritten]
    assert site.flags["fp8"] is False and site.flags["fp8_refused"].startswith("needs grad")
    out.float().sum().backward()  # the regular op's backward
    assert q.grad is not None and torch.isfinite(q.grad.float()).all()

    q, k, v = _inputs()
    pad = torch.ones(1, 40, dtype=torch.bool)
    pad[0, :3] = False
    with torch.no_grad():
        _, rep = _compile(masked_attention, q, k, v, pad)
    (site,) = [s for s in rep.sites if s.rewritten]
    assert site.flags["fp8"] is False and site.flags["fp8_refused"].startswith("a mask tensor")

    q, k, v = _inputs(D=32)  # a head dim the FP8 kernel does not have
    with torch.no_grad():
        _, rep = _compile(causal_attention, q, k, v)
    (site,) = [s for s in rep.sites if s.rewritten]
    assert site.flags["fp8"] is False and "head dim 32" in site.flags["fp8_refused"]
    assert fp8_on_cpu == []  # the FP8 kernel never ran


def test_on_the_cpu_fp8_is_accepted_and_refused_with_a_reason():
    q, k, v = _inputs()
    with torch.no_grad():
        out, rep = _compile(causal_attention, q, k, v)
    (site,) = [s for s in rep.sites if s.rewritten]
    assert site.flags["fp8"] is False and site.flags["fp8_refused"] == "device cpu: the FP8 kernel runs on CUDA sm90"
    assert not site.flags["kernel"].startswith("flash_fwd_fp8")


def test_without_the_option_no_fp8_flags():
    q, k, v = _inputs()
    with torch.no_grad():
        _, rep = _compile(causal_attention, q, k, v, fp8_on=False)
    (site,) = [s for s in rep.sites if s.rewritten]
    assert "fp8" not in site.flags and "fp8_refused" not in site.flags


def test_the_op_falls_back_with_a_warning_when_the_kernel_refuses_the_call(monkeypatch):
    q, k, v = _inputs(D=32)  # the FP8 kernel refuses D = 32 at run time
    monkeypatch.setattr(ops, "_FP8_FALLBACK", [])
    with pytest.warns(RuntimeWarning, match="FP8 kernel cannot run this call"):
        out = torch.ops.flashfuse.attention_fp8(q, k, v, None, True)
    want = torch.ops.flashfuse.attention(q, k, v, None, None, None, 0, -math.inf, 0.0)[0]
    assert torch.equal(out, want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                    reason="needs a Hopper GPU")
@pytest.mark.parametrize("gqa", [False, True])
def test_gpu_fp8_through_inductor(gqa):
    """On sm90 through Inductor: the site runs the FP8 kernel, within the scheme's error bound of float64."""
    g = torch.Generator(device="cuda").manual_seed(5)
    q = torch.randn(2, 8, 1024, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(2, 2 if gqa else 8, 1024, 128, device="cuda", dtype=torch.bfloat16, generator=g)
            for _ in range(2))

    def fn(q, k, v):
        if gqa:
            k, v = k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)
        return causal_attention(q, k, v)

    torch._dynamo.reset()
    mark = ff_report.collect()
    with torch.no_grad():
        out = torch.compile(fn, backend="flashfuse", options={"fp8": True})(q, k, v)
    rep = ff_report.last_report(since=mark)
    (site,) = [s for s in rep.sites if s.rewritten]
    assert site.flags["fp8"] is True, site.flags
    ref = fn(q.double(), k.double(), v.double())
    assert fp8.relative_rms_error(out, ref) <= fp8.SCHEME_BOUNDS[fp8.DEFAULT_SCHEME]


def test_a_failing_fp8_kernel_falls_back_with_a_warning(monkeypatch):
    """A compile/launch failure inside the FP8 kernel must not break the model: the regular op computes the call,
    one warning says why, and the kernel is not tried again in the process."""
    from flashfuse.kernels import flash_fwd_fp8

    def broken(*a, **kw):
        raise RuntimeError("ptxas died")

    monkeypatch.setattr(flash_fwd_fp8, "flash_attention_forward_fp8", broken)
    monkeypatch.setattr(ops, "_FP8_FALLBACK", [])
    monkeypatch.setattr(ops, "_FP8_BROKEN", [])
    q, k, v = _inputs()
    with pytest.warns(RuntimeWarning, match="ptxas died"):
        out = torch.ops.flashfuse.attention_fp8(q, k, v, None, True)
    want = torch.ops.flashfuse.attention(q, k, v, None, None, None, 0, -math.inf, 0.0)[0]
    assert torch.equal(out, want) and len(ops._FP8_BROKEN) == 1
    assert torch.equal(torch.ops.flashfuse.attention_fp8(q, k, v, None, True), want)  # no second try


def bmm_causal_attention(q, k, v):
    """The 3-D form (``[B*H, S, D]`` and ``torch.bmm``) some research code writes, K transposed by the caller."""
    s = torch.bmm(q, k.transpose(1, 2)) / math.sqrt(q.shape[-1])
    n = q.shape[-2]
    s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    return torch.bmm(torch.softmax(s.float(), dim=-1).to(q.dtype), v)


def test_the_fp8_decision_sees_the_ops_own_inputs(fp8_on_cpu):
    """Decided on the q, k, v the op receives (lifted to 4-D), not on the site's raw 3-D operands."""
    q, k, v = (t.flatten(0, 1) for t in _inputs())
    with torch.no_grad():
        out, rep = _compile(bmm_causal_attention, q, k, v)
    (site,) = [s for s in rep.sites if s.rewritten]
    assert site.flags["fp8"] is True, site.flags
    assert fp8_on_cpu == [True]
    ref = bmm_causal_attention(*(t.double() for t in (q, k, v)))
    assert fp8.relative_rms_error(out, ref) <= fp8.SCHEME_BOUNDS[fp8.DEFAULT_SCHEME]


def _compile_verify(fn, *args):
    torch._dynamo.reset()
    mark = ff_report.collect()
    out = torch.compile(fn, backend="flashfuse", options={"fp8": True, "verify": True, "inductor": False})(*args)
    return out, ff_report.last_report(since=mark)


def test_verify_checks_the_fp8_op_against_its_scheme_bound(fp8_on_cpu):
    """``verify=True`` with ``fp8=True``: the side-by-side graph runs the FP8 op (the kernel runs twice: the check,
    then the compiled graph) and compares it by relative RMS with the scheme's bound."""
    q, k, v = _inputs()
    with torch.no_grad():
        out, rep = _compile_verify(causal_attention, q, k, v)
    (site,) = [s for s in rep.sites if s.rewritten]
    assert site.flags["fp8"] is True and site.flags["verified"] is True
    assert fp8_on_cpu == [True, True]
    ref = causal_attention(*(t.double() for t in (q, k, v)))
    assert fp8.relative_rms_error(out, ref) <= fp8.SCHEME_BOUNDS[fp8.DEFAULT_SCHEME]


def test_verify_fails_an_fp8_kernel_past_its_bound(fp8_on_cpu, monkeypatch):
    """An FP8 kernel 10% off (relative RMS) fails verify, and the graph runs unrewritten; 1% off passes (an
    elementwise bf16 tolerance would judge neither by the scheme's own accuracy)."""
    from flashfuse.kernels import flash_fwd_fp8

    real = flash_fwd_fp8.flash_attention_forward_fp8
    noise = {"level": 0.1}

    def off(*a, **kw):
        out = real(*a, **kw)
        g = torch.Generator().manual_seed(11)
        bump = torch.randn(out.shape, generator=g) * out.float().pow(2).mean().sqrt() * noise["level"]
        return (out.float() + bump).to(out.dtype)

    monkeypatch.setattr(flash_fwd_fp8, "flash_attention_forward_fp8", off)
    q, k, v = _inputs()
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="verify failed"):
        out, rep = _compile_verify(causal_attention, q, k, v)
    (site,) = rep.sites
    assert not site.rewritten and site.reason.startswith("verify failed: relative RMS 0.1")
    assert f"FP8 scheme {fp8.DEFAULT_SCHEME}: bound" in site.reason
    torch.testing.assert_close(out, causal_attention(q, k, v), atol=0, rtol=0)

    noise["level"] = 0.01
    with torch.no_grad():
        _, rep = _compile_verify(causal_attention, q, k, v)
    (site,) = [s for s in rep.sites if s.rewritten]
    assert site.flags["fp8"] is True and site.flags["verified"] is True
