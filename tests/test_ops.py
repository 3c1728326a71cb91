"""Direct calls of the op: results, and a ValueError naming the argument for bad input."""

from __future__ import annotations

import pytest
import torch

import flashfuse
from flashfuse.testing import attention_ref


def _qkv(B=1, H=4, Hkv=2, S=17, D=32, dtype=torch.float32):
    return (torch.randn(B, H, S, D, dtype=dtype), torch.randn(B, Hkv, S, D, dtype=dtype),
            torch.randn(B, Hkv, S, D, dtype=dtype))


def test_direct_call_matches_reference():
    q, k, v = _qkv()
    out = flashfuse.attention(q, k, v, causal=True)
    ref, _ = attention_ref(q, k, v, window_right=0)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("change,match", [
    (lambda q, k, v: (q[0], k, v), "q: expected a 4-D"),
    (lambda q, k, v: (q, k[:, :, :5], v), "v: sequence length"),
    (lambda q, k, v: (q, torch.randn(1, 3, 17, 32), torch.randn(1, 3, 17, 32)), r"Hq \(4\) must be a multiple of Hkv \(3\)"),
    (lambda q, k, v: (q.double(), k.double(), v.double()), "q: dtype torch.float64 unsupported"),
    (lambda q, k, v: (q, k.half(), v), "q/k/v: dtypes differ"),
    (lambda q, k, v: (q[..., :8], k[..., :8], v[..., :8]), "q: head dim 8 unsupported"),
    (lambda q, k, v: (q, k[..., :16], v), "k: head dim 16 differs"),
])
def test_bad_arguments_raise_value_error(change, match):
    with pytest.raises(ValueError, match=match):
        flashfuse.attention(*change(*_qkv()))


def test_bad_mask():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="mask: shape"):
        flashfuse.attention(q, k, v, torch.zeros(3, 17))
    with pytest.raises(ValueError, match="mask: dtype torch.int64"):
        flashfuse.attention(q, k, v, torch.zeros(17, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="window_right"):
        flashfuse.attention(q, k, v, causal=True, window_right=3)


def test_fake_impl_under_symbolic_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    mode = FakeTensorMode(shape_env=ShapeEnv())
    q, k, v = _qkv()
    with mode:
        fq, fk, fv = (mode.from_tensor(t, static_shapes=False) for t in (q, k, v))
        out, lse = torch.ops.flashfuse.attention(fq, fk, fv, None, 0.1, None, 0, float("-inf"), 0.0)
    assert out.shape == fq.shape and lse.shape == fq.shape[:-1] and lse.dtype == torch.float32


@pytest.mark.parametrize("case", ["plain", "gqa_causal_softcap", "bool_mask_window", "additive", "finite_fill_empty"])
def test_backward_reference_matches_autograd(case):
    from flashfuse.testing import attention_backward_ref

    q, k, v = (t.double().requires_grad_(True) for t in _qkv(S=13, D=16))
    kw = dict(scale=0.3)
    mask = None
    if case == "gqa_causal_softcap":
        kw.update(window_right=0, softcap=2.0)
    elif case == "bool_mask_window":
        mask = torch.rand(1, 1, 13, 13) > 0.3
        mask[..., range(13), range(13)] = True  # no fully masked row: autograd of the oracle is NaN there
        kw.update(window_left=4, window_right=1)
    elif case == "additive":
        mask = torch.randn(13, 13).double()
    elif case == "finite_fill_empty":
        mask = torch.rand(1, 4, 13, 13) > 0.5
        mask[0, 1, 3] = False
        kw.update(mask_fill=-1e30)
    out, _ = attention_ref(q, k, v, mask, **kw)
    if case == "finite_fill_empty":  # the original code: every masked score is the fill
        s = (q @ k.transpose(-2, -1).repeat_interleave(2, dim=1)) * kw["scale"]
        out = s.masked_fill(~mask, kw["mask_fill"]).softmax(-1) @ v.repeat_interleave(2, dim=1)
    g = torch.randn_like(out)
    want = torch.autograd.grad(out, (q, k, v), g)
    got = attention_backward_ref(g, q.detach(), k.detach(), v.detach(), mask, **kw)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_trainable_bias_and_sinks_get_gradients():
    q, k, v = (t.double().requires_grad_(True) for t in _qkv(S=11, D=16))
    q32, k32, v32 = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    bias = torch.randn(1, 4, 11, 11, dtype=torch.float64, requires_grad=True)
    sinks = torch.randn(4, dtype=torch.float64, requires_grad=True)
    bias32 = bias.detach().float().requires_grad_(True)
    sinks32 = sinks.detach().float().requires_grad_(True)
    out = flashfuse.attention(q32, k32, v32, bias32, scale=0.3, causal=True, sinks=sinks32)
    g = torch.randn_like(out)
    out.backward(g)

    def naive(q, k, v, bias, sinks):  # GPT-OSS: sinks join the softmax, then are dropped
        kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        s = (q @ kk.transpose(-2, -1)) * 0.3 + bias
        s = s.masked_fill(~torch.ones(11, 11, dtype=torch.bool).tril(), float("-inf"))
        s = torch.cat([s, sinks.view(1, 4, 1, 1).expand(1, 4, 11, 1)], dim=-1)
        return s.softmax(-1)[..., :-1] @ vv

    ref = naive(q, k, v, bias, sinks)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    ref.backward(g.double())
    for got, want in ((q32, q), (k32, k), (v32, v), (bias32, bias), (sinks32, sinks)):
        torch.testing.assert_close(got.grad.double(), want.grad, atol=5e-5, rtol=1e-3)
