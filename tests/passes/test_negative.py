"""Sites flashfuse must leave alone, each reported with its reason; the output still matches eager."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.helpers import assert_matches_eager, compile_and_report, only_site, qkv


def left_alone(fn, *args, reason: str):
    out, rep = compile_and_report(fn, *args)
    assert not rep.fallbacks, str(rep)
    site = only_site(rep)
    assert rep.rewritten == 0 and not site.rewritten, str(rep)
    assert reason in site.reason, site.reason
    assert site.source.endswith(".py:" + site.source.rsplit(":", 1)[1]) and "test_negative.py" in site.source
    assert_matches_eager(fn, args, out)
    return site


def test_softmax_over_another_dim():
    def fn(q, k, v):
        return ((q @ k.transpose(-2, -1)) * 0.25).softmax(dim=-2) @ v

    left_alone(fn, *qkv(S=12), reason="softmax is over dim 2")


def test_attention_weights_returned():
    def fn(q, k, v):
        p = ((q @ k.transpose(-2, -1)) * 0.25).softmax(-1)
        return p @ v, p

    out, rep = compile_and_report(fn, *qkv(S=12))
    site = only_site(rep)
    assert not site.rewritten and "attention weights have 2 users" in site.reason
    assert "output_attentions=False" in site.hint


def test_attention_weights_stored():
    store = []

    def fn(q, k, v):
        p = ((q @ k.transpose(-2, -1)) * 0.25).softmax(-1)
        store.append(p.sum())
        return p @ v

    site = left_alone(fn, *qkv(S=12), reason="attention weights have 2 users")
    assert site.hint


def test_scores_reused():
    def fn(q, k, v):
        s = (q @ k.transpose(-2, -1)) * 0.25
        return s.softmax(-1) @ v + s.mean()

    left_alone(fn, *qkv(S=10), reason="have another user")


def test_unsupported_dtype_float64():
    left_alone(lambda q, k, v: ((q @ k.transpose(-2, -1)) * 0.25).softmax(-1) @ v,
               *qkv(S=10, dtype=torch.float64), reason="dtype torch.float64 unsupported")


def test_unsupported_head_dim():
    left_alone(lambda q, k, v: ((q @ k.transpose(-2, -1)) * 0.25).softmax(-1) @ v,
               *qkv(S=10, D=8), reason="head dim 8 unsupported")


def test_unsupported_device_meta():
    def fn(q, k, v):
        return ((q @ k.transpose(-2, -1)) * 0.25).softmax(-1) @ v

    q, k, v = (t.to("meta") for t in qkv(S=10))
    _, rep = compile_and_report(fn, q, k, v)
    site = only_site(rep)
    assert not site.rewritten and "device meta unsupported" in site.reason


def test_scale_not_constant():
    def fn(q, k, v, t):
        return ((q @ k.transpose(-2, -1)) * t.item()).softmax(-1) @ v

    torch._dynamo.config.capture_scalar_outputs = True
    try:
        out, rep = compile_and_report(fn, *qkv(S=10), torch.tensor(0.3))
    finally:
        torch._dynamo.config.capture_scalar_outputs = False
    site = only_site(rep)
    assert not site.rewritten and "scale is not a constant" in site.reason


def test_scale_is_a_tensor():
    def fn(q, k, v, t):
        return ((q @ k.transpose(-2, -1)) * t).softmax(-1) @ v

    left_alone(fn, *qkv(S=10), torch.tensor(0.3), reason="")


def test_dropout_that_drops_everything():
    def fn(q, k, v):
        return F.dropout(((q @ k.transpose(-2, -1)) * 0.25).softmax(-1), p=1.0, training=True) @ v

    _, rep = compile_and_report(fn, *qkv(S=10))
    site = only_site(rep)
    assert not site.rewritten and "dropout with p=1.0" in site.reason


def test_soft_fill_value_is_left_alone():
    def fn(q, k, v, m):
        return ((q @ k.transpose(-2, -1)) * 0.25).masked_fill(~m, -5.0).softmax(-1) @ v

    left_alone(fn, *qkv(S=10), torch.rand(10, 10) > 0.5, reason="not large and negative")
