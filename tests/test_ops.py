"""Direct calls of the op: results, and a ValueError naming the argument for bad input."""

from __future__ import annotations

import math

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
        out, lse, rng = torch.ops.flashfuse.attention(fq, fk, fv, None, 0.1, None, 0, float("-inf"), 0.0)
        _, _, rng_drop = torch.ops.flashfuse.attention(fq, fk, fv, None, 0.1, None, 0, float("-inf"), 0.0, None, 0.1)
    assert out.shape == fq.shape and lse.shape == fq.shape[:-1] and lse.dtype == torch.float32
    assert rng.shape == (0,) and rng_drop.shape == (2,) and rng.dtype == rng_drop.dtype == torch.int64


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


# ----------------------------------------------------------------------------------------------
# dropout (testing.py rule 9)
# ----------------------------------------------------------------------------------------------


def _dropout_op(q, k, v, p, **kw):
    """The op with ``dropout_p=p``, causal; returns ``(out, rng_state)``."""
    out, _, rng = torch.ops.flashfuse.attention(q, k, v, None, 0.3, kw.get("window_left"), 0, float("-inf"), 0.0,
                                                None, p)
    return out, rng


@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_dropout_forward_and_gradients_match_the_reference_with_the_op_mask(path, monkeypatch):
    from flashfuse import ops
    from flashfuse.testing import attention_backward_ref, dropout_keep_mask

    if path == "reference":  # the CPU without the interpreter: the float32 reference with torch's RNG
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    elif not ops._use_kernel(torch.empty(0)):
        pytest.skip("the kernel path needs TRITON_INTERPRET=1 on the CPU")
    q, k, v = (t.requires_grad_(True) for t in _qkv(B=2, S=19, D=16))
    out, rng = _dropout_op(q, k, v, 0.3)
    keep = dropout_keep_mask(rng, 2, 4, 19, 19, 0.3)
    assert keep.shape == (2, 4, 19, 19) and 0.5 < keep.float().mean() < 0.9
    ref, _ = attention_ref(q.detach(), k.detach(), v.detach(), scale=0.3, window_right=0, dropout_p=0.3,
                           dropout_mask=keep)
    torch.testing.assert_close(out.detach().double(), ref, atol=2e-5, rtol=1e-4)
    g = torch.randn_like(out)
    out.backward(g)
    want = attention_backward_ref(g.double(), q.detach().double(), k.detach().double(), v.detach().double(),
                                  scale=0.3, window_right=0, dropout_p=0.3, dropout_mask=keep)
    for got, w in zip((q.grad, k.grad, v.grad), want):
        torch.testing.assert_close(got.double(), w, atol=5e-5, rtol=1e-3)
    # the reference path's mask is torch's RNG, not the kernels' Philox: documented, and true
    other = dropout_keep_mask(rng, 2, 4, 19, 19, 0.3, kernel=path == "reference")
    assert not torch.equal(other, keep)


def test_dropout_same_seed_same_output_and_p0_draws_nothing():
    q, k, v = _qkv(S=23, D=16)
    torch.manual_seed(3)
    a, rng_a = _dropout_op(q, k, v, 0.2)
    torch.manual_seed(3)
    b, rng_b = _dropout_op(q, k, v, 0.2)
    c, rng_c = _dropout_op(q, k, v, 0.2)  # the generator moved on
    assert torch.equal(a, b) and torch.equal(rng_a, rng_b)
    assert not torch.equal(rng_a, rng_c) and not torch.equal(a, c)
    state = torch.get_rng_state()
    out0, rng0 = _dropout_op(q, k, v, 0.0)
    assert torch.equal(torch.get_rng_state(), state), "p = 0 must not advance the generator"
    assert rng0.shape == (0,)
    assert torch.equal(out0, flashfuse.attention(q, k, v, scale=0.3, causal=True))


def test_dropout_public_wrapper_is_unbiased():
    # E[out] = out without dropout: 64 draws, each element's mean within 5 standard deviations of the mean
    q, k, v = _qkv(B=1, H=2, Hkv=2, S=9, D=16)
    p, n = 0.5, 64
    outs = torch.stack([flashfuse.attention(q, k, v, scale=0.3, causal=True, dropout_p=p) for _ in range(n)])
    plain, _ = attention_ref(q, k, v, scale=0.3, window_right=0)
    from flashfuse.testing import _probabilities

    probs = _probabilities(q, k, v, None, 0.3, None, 0, float("-inf"), 0.0, torch.float64)[0]
    sd = (p / (1 - p) * torch.matmul(probs**2, v.double() ** 2) / n).sqrt()
    z = (outs.double().mean(0) - plain) / sd.clamp_min(1e-12)
    assert z.abs().max() <= 5, f"max |z| = {z.abs().max():.2f}"


@pytest.mark.parametrize("p", [-0.5, 1.0, 2, "0.1", None, True, float("nan")], ids=str)
def test_bad_dropout_p_raises_value_error(p):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="dropout_p"):
        flashfuse.attention(q, k, v, dropout_p=p)


def test_dropout_under_torch_compile_autograd():
    # AOTAutograd traces the op's fake (three outputs) and its autograd; same seed, same gradients as eager
    q, k, v = _qkv(S=13, D=16)

    def f(q, k, v):
        return flashfuse.attention(q, k, v, scale=0.3, causal=True, dropout_p=0.25).sum()

    grads = []
    for fn in (f, torch.compile(f, backend="aot_eager", fullgraph=True)):
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
        torch.manual_seed(11)
        fn(qq, kk, vv).backward()
        grads.append((qq.grad, kk.grad, vv.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                    reason="needs a Hopper GPU")
@pytest.mark.parametrize("causal", [False, True])
def test_op_dispatches_to_the_hopper_kernel_and_matches(monkeypatch, causal):
    """On sm90 the op runs flash_fwd_sm90 for mask-free fp16/bf16 calls, flash_fwd otherwise; both agree with
    the float64 reference. (The SDPA-cuDNN dispatch, which would take these GQA calls first, is off.)"""
    import flashfuse.kernels.flash_fwd_sm90 as sm90

    monkeypatch.setenv("FLASHFUSE_SDPA", "0")

    calls = []
    orig = sm90.flash_attention_forward_sm90
    monkeypatch.setattr(sm90, "flash_attention_forward_sm90", lambda *a, **kw: calls.append(1) or orig(*a, **kw))
    q = torch.randn(2, 8, 1000, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 2, 1000, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    out = flashfuse.attention(q, k, v, causal=causal)
    assert len(calls) == 1
    ref, _ = attention_ref(q.double(), k.double(), v.double(), window_right=0 if causal else None)
    assert (out.double() - ref).abs().max().item() < 2e-2
    pad = torch.rand(2, 1, 1, 1000, device="cuda") > 0.1
    out_masked = flashfuse.attention(q, k, v, pad, causal=causal)
    assert len(calls) == 1  # a mask tensor goes to flash_fwd
    ref_m, _ = attention_ref(q.double(), k.double(), v.double(), pad, window_right=0 if causal else None)
    assert (out_masked.double() - ref_m).nan_to_num().abs().max().item() < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("d", [128, 256])
@pytest.mark.parametrize("backward", ["cudnn", "triton"])
@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("causal", [False, True])
def test_op_hands_plain_and_causal_attention_to_cudnn_with_the_same_lse_and_grads(causal, groups, backward, d,
                                                                                   monkeypatch):
    """The cuDNN path (MHA and GQA) returns the reference (out, lse) (natural-log lse), ``out`` contiguous as the
    fake promises also when q is a transposed [B, S, H, D] view; the backward is cuDNN's (no Triton backward
    launch) and gives the reference gradients; with cuDNN's backward off, the Triton backward run on cuDNN's lse
    gives them too."""
    from flashfuse import ops
    from flashfuse.kernels import flash_bwd
    from flashfuse.testing import attention_backward_ref

    if d not in ops._cudnn_head_dims(torch.device("cuda")):
        pytest.skip(f"the cuDNN path does not take head dim {d} on this GPU / cuDNN (sm90 and cuDNN >= 9.1 only)")
    if backward == "triton":
        monkeypatch.setattr(ops, "_CUDNN_BWD_BROKEN", ["turned off by the test"])
    launches = []
    orig = flash_bwd.flash_attention_backward
    monkeypatch.setattr(flash_bwd, "flash_attention_backward", lambda *a, **kw: launches.append(1) or orig(*a, **kw))
    H, S = 8, 777
    # q as nanoGPT / HF make it: a [B, S, H, D] tensor viewed as [B, H, S, D]
    q = torch.randn(2, S, H, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_(True)
    k, v = (torch.randn(2, H // groups, S, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    band = 0 if causal else None
    assert ops._cudnn_path_refusal(q, k, v, None, None, band, 0.0, None, 0.0) is None
    out, lse, _ = torch.ops.flashfuse.attention(q, k, v, None, None, None, band, -math.inf, 0.0)
    assert not ops._CUDNN_BROKEN and not ops._CUDNN_GQA_BROKEN, (ops._CUDNN_BROKEN, ops._CUDNN_GQA_BROKEN)
    assert out.is_contiguous() and out.shape == (2, H, S, d)
    ref, ref_lse = attention_ref(q.double(), k.double(), v.double(), window_right=band)
    assert (out.double() - ref).abs().max().item() < 2e-2
    assert (lse.double() - ref_lse).abs().max().item() < 1e-2
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    assert len(launches) == (1 if backward == "triton" else 0)
    if backward == "cudnn":
        assert not ops._CUDNN_BWD_BROKEN and not ops._CUDNN_GQA_BWD_BROKEN, (ops._CUDNN_BWD_BROKEN,
                                                                             ops._CUDNN_GQA_BWD_BROKEN)
    want = attention_backward_ref(g.double(), q.double(), k.double(), v.double(), None, scale=d ** -0.5,
                                  window_right=band)[:3]
    for name, a, b in zip("qkv", got, want):
        assert a.shape == b.shape, name
        err = (a.double() - b).abs().max().item()
        assert err < 5e-2 * max(1.0, b.abs().max().item()), (name, err)


@pytest.mark.parametrize("softcap,groups,trainable", [(0.0, 1, False), (0.0, 2, False), (20.0, 2, False),
                                                      (0.0, 1, True)])
def test_fully_masked_rows_with_an_added_fill_get_eagers_gradient(softcap, groups, trainable):
    """``additive_fill=True`` (the original added the fill to the scores): rows with nothing kept are uniform and
    autograd still sends (dP - mean dP) / Sk to q, k and an additive mask, as eager does; with the fill written
    over the scores (``additive_fill=False``, masked_fill) those rows send nothing to q and k."""
    B, H, S, D = 2, 4, 9, 16
    fill = torch.finfo(torch.float32).min
    q = torch.randn(B, H, S, D, requires_grad=True)
    k, v = (torch.randn(B, H // groups, S, D, requires_grad=True) for _ in range(2))
    pad = torch.ones(B, S, dtype=torch.bool)
    pad[0, :4] = False  # left padding: rows 0..3 of batch 0 keep nothing under the causal band
    i = torch.arange(S)
    keep = (i[None, None, None, :] <= i[None, None, :, None]) & pad[:, None, None, :]
    bias = (torch.randn(1, H, S, S) * 0.1).requires_grad_(trainable)
    mask = (bias if trainable else torch.zeros(())) + torch.where(keep, 0.0, fill)
    g = torch.randn(B, H, S, D)

    def eager(q, k, v, mask, added: bool):
        ke, ve = (t.repeat_interleave(groups, 1) for t in (k, v))
        s = q @ ke.transpose(-2, -1) * 0.25
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        s = s + mask if added else s.masked_fill(~keep, fill)
        return torch.softmax(s, -1) @ ve

    for added in (True, False):
        inputs = (q, k, v) + ((bias,) if trainable and added else ())
        want = torch.autograd.grad(eager(q, k, v, mask, added), inputs, g)
        op_mask = mask if added else keep
        out = torch.ops.flashfuse.attention(q, k, v, op_mask, 0.25, None, None, fill, softcap, None, 0.0, added)[0]
        got = torch.autograd.grad(out, inputs, g)
        for name, a, b in zip("q k v bias".split(), got, want):
            assert (a - b).abs().max().item() <= 2e-5 * max(1.0, b.abs().max().item()), (added, name)
        if not added:  # the fill written over the scores: the empty rows send nothing to q
            assert got[0][0, :, :4].abs().max().item() == 0.0
        else:
            assert got[0][0, :, :4].abs().max().item() > 1e-3


def test_cudnn_takes_head_dim_256_only_on_sm90_with_cudnn_9_1(monkeypatch):
    """The wide head dim goes to cuDNN where PyTorch's own SDPA check allows it (sm90, cuDNN >= 9.1, CUDA not
    ROCm) and while no wide call has failed; 64 and 128 everywhere cuDNN runs."""
    from flashfuse import ops

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(ops, "_CUDNN_WIDE_BROKEN", [])
    for cap, cudnn, want in (((9, 0), 90100, (64, 128, 256)), ((9, 0), 90000, (64, 128)),
                             ((10, 0), 91000, (64, 128)), ((8, 0), 91000, (64, 128))):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, cap=cap: cap)
        monkeypatch.setattr(torch.backends.cudnn, "version", lambda cudnn=cudnn: cudnn)
        assert ops._cudnn_head_dims(cuda) == want, (cap, cudnn)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 90100)
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert ops._cudnn_head_dims(cuda) == (64, 128)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(ops, "_CUDNN_WIDE_BROKEN", ["an earlier failure"])
    assert ops._cudnn_head_dims(cuda) == (64, 128)
    assert ops._cudnn_head_dims(torch.device("cpu")) == (64, 128)


@pytest.mark.parametrize("d, wide", [(256, True), (128, False)])
def test_a_failed_wide_cudnn_call_turns_off_only_the_wide_calls(monkeypatch, d, wide):
    """cuDNN refusing a head-dim-256 call (forward or backward) must not take cuDNN away from D = 64/128 calls:
    the failure is recorded in ``_CUDNN_WIDE_BROKEN`` only."""
    from flashfuse import ops

    def fresh():
        for name in ("_CUDNN_BROKEN", "_CUDNN_GQA_BROKEN", "_CUDNN_BWD_BROKEN", "_CUDNN_GQA_BWD_BROKEN",
                     "_CUDNN_WIDE_BROKEN"):
            monkeypatch.setattr(ops, name, [])

    def refuse(*args, **kwargs):
        raise RuntimeError("cuDNN refused (test)")

    for op in ("_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward"):
        monkeypatch.setattr(torch.ops.aten, op, refuse)
    q = torch.randn(1, 2, 8, d, dtype=torch.bfloat16)
    lse = torch.zeros(1, 2, 8)
    for direction in ("forward", "backward"):
        fresh()
        if direction == "forward":
            with pytest.warns(RuntimeWarning, match="cuDNN path failed"):
                assert ops._cudnn_forward(q, q, q, 0.1, causal=False) is None
        else:
            with pytest.warns(RuntimeWarning, match="cuDNN backward failed"):
                assert ops._cudnn_backward(q, q, q, q, q, lse, 0.1, causal=False) is None
        narrow = ops._CUDNN_BROKEN if direction == "forward" else ops._CUDNN_BWD_BROKEN
        assert (len(ops._CUDNN_WIDE_BROKEN), len(narrow)) == ((1, 0) if wide else (0, 1)), direction
    if wide:  # once a wide call failed, the wide backward is not tried again
        assert ops._cudnn_backward(q, q, q, q, q, lse, 0.1, causal=False) is None


def test_cudnn_hot_path_serves_a_known_call_key_and_nothing_else(monkeypatch):
    """A call key the op's checks sent to cuDNN before goes straight to ``_cudnn_forward`` (no validation again);
    a key differing in any checked input, a mask, a switch in the environment or a recorded cuDNN failure takes
    the full path. (CPU: the key is remembered by hand, as the GPU path does after a successful cuDNN call.)"""
    from flashfuse import ops

    monkeypatch.setattr(ops, "_CUDNN_CALLS", {})
    for name in ("_CUDNN_BROKEN", "_CUDNN_GQA_BROKEN", "_CUDNN_WIDE_BROKEN"):
        monkeypatch.setattr(ops, name, [])
    monkeypatch.delenv("FLASHFUSE_SDPA", raising=False)
    served = []

    def fake_cudnn(q, k, v, scale, *, causal):
        served.append((scale, causal))
        out, lse = attention_ref(q, k, v, scale=scale, window_right=0 if causal else None, upcast=False)
        return out.contiguous(), lse.contiguous()

    validated = []
    orig_validate = ops.validate_attention_args
    monkeypatch.setattr(ops, "_cudnn_forward", fake_cudnn)
    monkeypatch.setattr(ops, "validate_attention_args", lambda *a: validated.append(1) or orig_validate(*a))
    q, k, v = _qkv(H=4, Hkv=2, S=24, D=64)
    args = (None, None, None, 0, -math.inf, 0.0)  # mask, scale, window_left, window_right, mask_fill, softcap
    ops._remember_cudnn(ops._cudnn_call_key(q, k, v, None, None, 0, 0.0, 0.0, False), True)

    out, lse, rng = torch.ops.flashfuse.attention(q, k, v, *args)
    assert served == [(1.0 / math.sqrt(64), True)] and not validated and rng.numel() == 0
    ref, ref_lse = attention_ref(q.double(), k.double(), v.double(), window_right=0)
    assert (out.double() - ref).abs().max().item() < 1e-4 and (lse.double() - ref_lse).abs().max().item() < 1e-4

    # every one of these differs from the remembered key in something the checks read: the full path runs
    misses = [
        (q.transpose(1, 2).contiguous().transpose(1, 2), k, v, None, None, None, 0),  # strides
        (q, k, v, None, 0.5, None, 0),  # scale
        (q, k, v, None, None, None, None),  # band
        (q[:, :, :20], k[:, :, :20], v[:, :, :20], None, None, None, 0),  # shape
        (q, k, v, torch.zeros(24, 24), None, None, 0),  # a mask
    ]
    for qq, kk, vv, mask, scale, wl, wr in misses:
        served.clear(), validated.clear()
        torch.ops.flashfuse.attention(qq, kk, vv, mask, scale, wl, wr, -math.inf, 0.0)
        assert not served and validated, (scale, wl, wr, mask is None)
    monkeypatch.setenv("FLASHFUSE_SDPA", "0")
    served.clear(), validated.clear()
    torch.ops.flashfuse.attention(q, k, v, *args)
    assert not served and validated
    monkeypatch.delenv("FLASHFUSE_SDPA")
    monkeypatch.setattr(ops, "_CUDNN_GQA_BROKEN", ["an earlier failure"])
    served.clear(), validated.clear()
    torch.ops.flashfuse.attention(q, k, v, *args)
    assert not served and validated
    monkeypatch.setattr(ops, "_CUDNN_GQA_BROKEN", [])
    served.clear(), validated.clear()
    torch.ops.flashfuse.attention(q, k, v, *args)  # the same key again: the hot path
    assert len(served) == 1 and not validated


def test_a_cudnn_failure_forgets_the_known_calls(monkeypatch):
    from flashfuse import ops

    monkeypatch.setattr(ops, "_CUDNN_CALLS", {("a key",): True})
    for name in ("_CUDNN_BROKEN", "_CUDNN_GQA_BROKEN", "_CUDNN_WIDE_BROKEN"):
        monkeypatch.setattr(ops, name, [])

    def refuse(*args, **kwargs):
        raise RuntimeError("cuDNN refused (test)")

    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention", refuse)
    q = torch.randn(1, 2, 8, 64, dtype=torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="cuDNN path failed"):
        assert ops._cudnn_forward(q, q, q, 0.1, causal=False) is None
    assert ops._CUDNN_CALLS == {} and ops._CUDNN_BROKEN


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_cudnn_hot_path_remembers_and_matches():
    """On the GPU the first cuDNN call remembers its key; the second call (the hot path) gives the same result."""
    from flashfuse import ops

    if 64 not in ops._cudnn_head_dims(torch.device("cuda")):
        pytest.skip("no cuDNN path for head dim 64 here")
    ops._CUDNN_CALLS.clear()
    q, k, v = (torch.randn(2, 8, 300, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    first = torch.ops.flashfuse.attention(q, k, v, None, None, None, 0, -math.inf, 0.0)
    assert ops._cudnn_known(ops._cudnn_call_key(q, k, v, None, None, 0, 0.0, 0.0, False)) is True
    second = torch.ops.flashfuse.attention(q, k, v, None, None, None, 0, -math.inf, 0.0)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    ref, _ = attention_ref(q.double(), k.double(), v.double(), window_right=0)
    assert (second[0].double() - ref).abs().max().item() < 2e-2


def test_decode_shaped_calls_build_no_cudnn_key(monkeypatch):
    """Sq <= 16 is flash_decode's: those calls skip the cuDNN hot path's key (host time a decode step would pay for
    nothing); the bound is flash_decode's own."""
    from flashfuse import ops
    from flashfuse.kernels import flash_decode

    assert ops._DECODE_MAX_Q == flash_decode.MAX_QUERY_LEN
    built = []
    real = ops._cudnn_call_key
    monkeypatch.setattr(ops, "_cudnn_call_key", lambda *a: built.append(a[0].shape[-2]) or real(*a))
    for sq in (1, 16, 17):
        q = torch.randn(1, 4, sq, 32)
        k, v = torch.randn(1, 2, 40, 32), torch.randn(1, 2, 40, 32)
        out, _, _ = torch.ops.flashfuse.attention(q, k, v, None, None, None, None, -math.inf, 0.0)
        ref, _ = attention_ref(q.double(), k.double(), v.double())
        assert (out.double() - ref).abs().max().item() < 1e-4
    assert built == [17]


def test_bad_rank_still_raises_value_error_past_the_hot_path():
    """The hot path's key looks at q's shape first: a q of the wrong rank must still reach validation's ValueError."""
    for q in (torch.randn(32), torch.randn(4, 32)):
        with pytest.raises(ValueError, match="q: expected a 4-D"):
            torch.ops.flashfuse.attention(q, torch.randn(1, 2, 8, 32), torch.randn(1, 2, 8, 32), None, None, None,
                                          None, -math.inf, 0.0)
