"""Tests for ``flashfuse/kernels/flash_bwd.py`` against ``flashfuse.testing.attention_backward_ref``.

The numerics rule (STYLE.md, habit 8), for every gradient: inputs drawn in the target dtype; the
reference in float64; the kernel's max and mean error at most 2x the error of the float32 reference
rounded to the target dtype (``upcast=False``) plus a slack ``EPS`` relative to the gradient's size.
NaN must appear exactly where the reference has NaN.

NOTE: the float64 reference is ``attention_backward_ref`` called on float64 copies of the inputs.
``upcast=True`` alone computes in float64 but casts the gradients back to the input dtypes, so in
fp16/bf16 it is itself rounded, and the kernel would be compared with the rounding error of the
``upcast=False`` path (0 or 1 ulp): no kernel that rounds P or dS to 16 bits for its matmuls can pass.

The backward consumes the forward's ``out`` and ``lse``: every test runs ``flash_attention_forward``
first. ``torch.empty``/``torch.empty_like`` are poisoned with NaN, so an element that a kernel forgets
to write fails the NaN check. Without CUDA everything runs under the Triton interpreter
(tests/conftest.py); the ``gpu`` tests add long sequences on a GPU.
"""

from __future__ import annotations

import math

from dataclasses import replace

import pytest
import torch

from flashfuse.kernels import flash_bwd
from flashfuse.kernels.flash_bwd import flash_attention_backward
from flashfuse.kernels.flash_fwd import flash_attention_forward
from flashfuse.testing import attention_backward_ref
from tests.kernels.numerics import (BF16, FP16, FP32, FP32_MIN, INTERPRETER_WARNINGS, WINDOWS, qkv,
                                    seed_and_poison, shape_id)

# Slack on top of 2x the low-precision error, times max(1, max |reference gradient|): 1e-5 in fp32, about
# half an ulp at 1.0 for the 16-bit types. The mean error gets EPS / 8 (a bias shows up in the mean first).
EPS = {FP32: 1e-5, FP16: 2.0**-11, BF16: 2.0**-8}
# NOTE: delta = rowsum(dO * O) is formed from the forward's 16-bit ``out`` (as in FA2; the references
# recompute O in float32), so it carries a rounding of about ulp * rowsum|dO * O|. The mask and sink
# gradients are sums in which the rest cancels: a bias broadcast over the keys has gradient
# sum_j dS_ij = rowsum(P dP) - delta = 0 exactly, and the kernel returns just that rounding (9.5e-4 for
# fp16, D=32, against 1e-6 for the float32 reference). Their slack is therefore scaled by rowsum|dO * O|
# times sqrt(rows summed into one element) (independent roundings add like a random walk); dq/dk/dv keep
# the plain one.
NAMES = ("dq", "dk", "dv", "dmask", "dsinks")

pytestmark = INTERPRETER_WARNINGS


@pytest.fixture(autouse=True)
def _seed_and_poison(monkeypatch):
    seed_and_poison(monkeypatch, empty_like=True)


_qkv = qkv


def _f64(t):
    return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def _backward(q, k, v, mask=None, *, scale=None, grad_out=None, need_dmask=True, **kw):
    """Forward, then the backward kernel; returns ``(grads, grad_out, out)``."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    out, lse = flash_attention_forward(q, k, v, mask, scale=scale, **kw)
    if grad_out is None:
        grad_out = torch.randn_like(out)
    grads = flash_attention_backward(grad_out, q, k, v, mask, out, lse, scale=scale, need_dmask=need_dmask, **kw)
    return grads, grad_out, out


def _rows_per_element(name, q, mask):
    """How many query rows (b, h, i) are summed into one element of the mask or sink gradient."""
    B, Hq, Sq, _ = q.shape
    if name == "dsinks":
        return B * Sq
    shape = (1,) * (4 - mask.dim()) + tuple(mask.shape)
    return math.prod(n for n, m in zip((B, Hq, Sq), shape) if m == 1)


def _check(q, k, v, mask=None, *, scale=None, sinks=None, grad_out=None, **kw):
    """Kernel, float64 reference and float32 low precision; assert the numerics rule on every gradient."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    grads, do, out = _backward(q, k, v, mask, scale=scale, sinks=sinks, grad_out=grad_out, **kw)
    delta_scale = (do.double() * out.double()).abs().sum(-1).nan_to_num().max().item()
    ref = attention_backward_ref(
        _f64(do), _f64(q), _f64(k), _f64(v), _f64(mask), scale=scale, sinks=_f64(sinks), upcast=True, **kw
    )
    low = attention_backward_ref(do, q, k, v, mask, scale=scale, sinks=sinks, upcast=False, **kw)

    like = (q, k, v, mask, sinks)
    for name, g, r, lo, x in zip(NAMES, grads, ref, low, like):
        if r is None:
            assert g is None, f"{name}: expected None"
            continue
        assert g.shape == x.shape and g.dtype == x.dtype, f"{name}: {g.dtype} {tuple(g.shape)}"
        assert torch.equal(g.isnan(), r.isnan()), f"{name}: NaN pattern differs from the reference"
        keep = ~r.isnan()
        if not keep.any():
            continue
        err = (g.double() - r)[keep].abs()
        eager = (lo.double() - r)[keep].abs()
        size = max(1.0, r[keep].abs().max().item())
        if name in ("dmask", "dsinks") and q.dtype != FP32:
            size = max(size, delta_scale * math.sqrt(_rows_per_element(name, q, mask)))
        eps = EPS[q.dtype] * size
        assert err.max() <= 2 * eager.max() + eps, f"{name}: max error {err.max():.3e} vs {eager.max():.3e}"
        assert err.mean() <= 2 * eager.mean() + eps / 8, f"{name}: mean error {err.mean():.3e} vs {eager.mean():.3e}"
    return grads, ref


# ----------------------------------------------------------------------------------------------
# shapes x dtypes x layouts x structure
# ----------------------------------------------------------------------------------------------

# A covering subset: every dtype, layout and GQA ratio, head dims 16..256, ragged lengths, Sq != Sk both ways.
SHAPES = [
    # B, Hq, Hkv, Sq, Sk, D, dtype, layout
    (1, 2, 2, 1, 97, 64, FP16, "bhsd"),  # one query row (decode-like)
    (2, 4, 2, 17, 17, 80, BF16, "bshd"),  # D=80 padded to 128; GQA 2; BSHD strides
    (1, 4, 1, 61, 97, 128, FP32, "bshd"),  # MQA: dK/dV sum 4 query heads
    (1, 4, 4, 97, 61, 16, FP16, "bhsd"),  # smallest head dim; Sq > Sk
    (1, 8, 2, 33, 47, 256, BF16, "bhsd"),  # largest head dim; GQA 4
    (2, 2, 1, 33, 1, 96, FP32, "bhsd"),  # one key
]
_shape_id = shape_id


@pytest.mark.parametrize("window", list(WINDOWS.values()), ids=list(WINDOWS))
@pytest.mark.parametrize("shape", SHAPES, ids=[_shape_id(s) for s in SHAPES])
def test_matches_reference(shape, window, device):
    B, Hq, Hkv, Sq, Sk, D, dtype, layout = shape
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, D, dtype, device, layout)
    _check(q, k, v, window_left=window[0], window_right=window[1])


def test_many_blocks(device):
    # one past a power of two: many blocks both ways, a ragged last one, all three loop phases in use
    q, k, v = _qkv(1, 2, 1, 257, 257, 16, BF16, device)
    _check(q, k, v, window_left=100, window_right=0)


@pytest.mark.parametrize(
    "window",
    [(3, 5), (0, None), (None, -1), (5, -2), (-2, 4), (0, 0), (200, 200)],
    ids=["band3-5", "anticausal", "strict-causal", "left5-right-2", "left-2-right4", "diagonal", "wider-than-seq"],
)
@pytest.mark.parametrize("sq,sk", [(97, 61), (17, 97)])
def test_window_variants(window, sq, sk, device):
    # negative bounds leave rows without keys (NaN rows with the -inf fill: NaN dQ rows and NaN dK/dV of the
    # whole KV head, as eager autograd) and keys without queries (zero dK/dV)
    q, k, v = _qkv(1, 2, 1, sq, sk, 32, FP32, device)
    _check(q, k, v, window_left=window[0], window_right=window[1])


@pytest.mark.parametrize(
    "tiles", [(16, 16, 16, 16), (32, 16, 16, 32), (16, 64, 64, 16)], ids=["16x16", "32x16-16x32", "16x64-64x16"]
)
@pytest.mark.parametrize("window", [(None, 0), (7, 0), (3, 5)], ids=["causal", "window7", "band3-5"])
def test_block_shapes(tiles, window, device, monkeypatch):
    # The loop phases (edge, inside, edge) of both passes depend on how blocks fall against the window
    cfg = flash_bwd.BwdConfig(*tiles, num_warps=4, num_stages=1)
    monkeypatch.setattr(flash_bwd, "_pick_config", lambda *args: cfg)
    monkeypatch.setattr(flash_bwd, "_FITTED", {})
    q, k, v = _qkv(1, 2, 1, 97, 61, 32, FP32, device)
    mask = torch.rand(97, 61, device=device) > 0.2
    _check(q, k, v, mask, window_left=window[0], window_right=window[1])


def test_blocks_outside_the_window_are_never_read(device, monkeypatch):
    # NaN in rows/keys a program should skip: any read would reach its gradients (0 * NaN = NaN)
    cfg = flash_bwd.BwdConfig(block_m1=16, block_n1=32, block_m2=32, block_n2=16, num_warps=4, num_stages=1)
    monkeypatch.setattr(flash_bwd, "_pick_config", lambda *args: cfg)
    monkeypatch.setattr(flash_bwd, "_FITTED", {})
    q, k, v = _qkv(1, 2, 1, 97, 97, 32, FP32, device)
    out, lse = flash_attention_forward(q, k, v, scale=0.2, window_left=7, window_right=0)
    do = torch.randn_like(out)

    def grads(q, k, v, do):
        return flash_attention_backward(do, q, k, v, None, out, lse, scale=0.2, window_left=7, window_right=0)

    dq, dk, dv, _, _ = grads(q, k, v, do)
    # dK/dV of keys 0..31 (one dK/dV program) see rows up to 31 + 7 = 38, i.e. row blocks up to 32..47
    qp, dop = q.clone(), do.clone()
    qp[:, :, 48:] = float("nan")
    dop[:, :, 48:] = float("nan")
    _, dk2, dv2, _, _ = grads(qp, k, v, dop)
    assert torch.equal(dk2[:, :, :32], dk[:, :, :32]) and torch.equal(dv2[:, :, :32], dv[:, :, :32])
    # dQ of rows 64.. starts at key block (64 - 7) // 16 * 16 = 48, so keys 0..47 are skipped
    kp, vp = k.clone(), v.clone()
    kp[:, :, :48] = float("nan")
    vp[:, :, :48] = float("nan")
    dq2, _, _, _, _ = grads(q, kp, vp, do)
    assert torch.equal(dq2[:, :, 64:], dq[:, :, 64:])


def test_deterministic(device):
    # no atomics in dQ/dK/dV: two runs agree bit for bit
    q, k, v = _qkv(1, 4, 2, 61, 47, 32, BF16, device)
    first, do, _ = _backward(q, k, v, window_right=0)
    second, _, _ = _backward(q, k, v, grad_out=do, window_right=0)
    for a, b in zip(first[:3], second[:3]):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# masks (bool; additive with its gradient summed over the broadcast dims)
# ----------------------------------------------------------------------------------------------

MASK_SHAPES = {
    "B11K": lambda B, H, Sq, Sk: (B, 1, 1, Sk),  # padding mask: summed over heads and rows
    "B1QK": lambda B, H, Sq, Sk: (B, 1, Sq, Sk),  # HF 4-D mask: summed over heads
    "QK": lambda B, H, Sq, Sk: (Sq, Sk),  # summed over batch and heads
    "BHQK": lambda B, H, Sq, Sk: (B, H, Sq, Sk),  # no broadcast
    "H1K": lambda B, H, Sq, Sk: (H, 1, Sk),  # summed over batch and rows
    "BHQ1": lambda B, H, Sq, Sk: (B, H, Sq, 1),  # summed over keys
    "1111": lambda B, H, Sq, Sk: (1, 1, 1, 1),  # one scalar bias
}


def _random_mask(shape, kind, device):
    keep = torch.rand(shape, device=device) > 0.3
    if kind == "bool":
        return keep
    dtype = {"add-fp32": FP32, "add-fp16": FP16, "add-bf16": BF16}[kind]
    bias = torch.randn(shape, device=device).to(dtype)
    if shape[-1] == 1:  # a mask broadcast over the keys masks whole rows: keep it a plain bias
        return bias
    # masked positions as HF writes them: finfo(dtype).min, plus a few true -inf
    bias = bias.masked_fill(~keep, torch.finfo(dtype).min)
    return bias.masked_fill(torch.rand(shape, device=device) > 0.95, float("-inf"))


@pytest.mark.parametrize("kind", ["bool", "add-fp32"])
@pytest.mark.parametrize("mshape", list(MASK_SHAPES))
def test_masks(mshape, kind, device):
    if kind == "bool" and mshape in ("BHQ1", "1111"):
        pytest.skip("a bool mask broadcast over the keys only empties whole rows (covered below)")
    B, Hq, Hkv, Sq, Sk = 2, 4, 2, 33, 47
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, 32, FP16, device, "bshd")
    mask = _random_mask(MASK_SHAPES[mshape](B, Hq, Sq, Sk), kind, device)
    _check(q, k, v, mask, window_right=0 if mshape in ("B1QK", "H1K") else None)


@pytest.mark.parametrize("kind,dtype", [("add-fp16", FP16), ("add-bf16", BF16), ("add-fp32", BF16), ("bool", FP32)])
def test_mask_dtypes(kind, dtype, device):
    # the mask gradient comes back in the mask's dtype, whatever q's
    q, k, v = _qkv(1, 2, 1, 17, 97, 64, dtype, device)
    _check(q, k, v, _random_mask((1, 1, 17, 97), kind, device))


def test_mask_expanded_view(device):
    # an expanded (stride-0) mask of the full shape is read in place; its gradient is per element
    q, k, v = _qkv(2, 4, 2, 17, 33, 32, FP32, device)
    small = torch.randn(2, 1, 1, 33, device=device)
    expanded = small.expand(2, 4, 17, 33)
    do = torch.randn(2, 4, 17, 32, device=device)
    (dq, dk, _, dmask, _), _ = _check(q, k, v, expanded, scale=0.2, grad_out=do)
    assert dmask.shape == (2, 4, 17, 33)
    dense, _, _ = _backward(q, k, v, expanded.contiguous(), scale=0.2, grad_out=do)
    assert torch.equal(dq, dense[0]) and torch.equal(dk, dense[1]) and torch.equal(dmask, dense[3])


def test_need_dmask_false(device):
    q, k, v = _qkv(1, 4, 2, 33, 47, 32, FP32, device)
    mask = torch.randn(1, 1, 33, 47, device=device)
    with_dmask, do, _ = _backward(q, k, v, mask, window_right=0)
    without, _, _ = _backward(q, k, v, mask, grad_out=do, need_dmask=False, window_right=0)
    assert without[3] is None and with_dmask[3] is not None
    for a, b in zip(with_dmask[:3], without[:3]):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# fully masked rows: NaN (-inf fill), mean of v (rule 6), saturated lse (finfo.min bias)
# ----------------------------------------------------------------------------------------------


def _mask_with_empty_rows(B, Sq, Sk, device):
    keep = torch.rand(B, 1, Sq, Sk, device=device) > 0.3
    keep[0, :, 0] = False
    keep[0, :, 5] = False
    keep[1, :, Sq - 1] = False
    return keep


@pytest.mark.parametrize("kind", ["bool", "add-neg-inf"])
def test_empty_rows_neg_inf_fill_give_nan(kind, device):
    # eager autograd: NaN dQ for the row, NaN dK/dV for every key of its KV head, NaN mask gradient where
    # the row reaches it. Batch 1 has no empty row with heads 0-1 (KV head 0): those stay finite.
    B, Sq, Sk = 2, 17, 33
    q, k, v = _qkv(B, 4, 2, Sq, Sk, 32, FP32, device)
    keep = _mask_with_empty_rows(B, Sq, Sk, device)
    keep = keep.expand(B, 4, Sq, Sk).clone()
    keep[1, :2, Sq - 1, 3] = True
    mask = keep if kind == "bool" else torch.zeros(keep.shape, device=device).masked_fill(~keep, float("-inf"))
    (dq, dk, dv, _, _), _ = _check(q, k, v, mask)
    assert dq[0, :, 0].isnan().all() and dq[0, :, 1].isfinite().all()
    assert dk[0].isnan().all() and dv[1, 1].isnan().all() and dk[1, 0].isfinite().all()


def test_empty_rows_neg_inf_fill_broadcast_dmask(device):
    # a [B, 1, 1, Sk] bias that is -inf on every key of batch 0: each row of batch 0 is NaN, so its whole
    # mask gradient is NaN; the band never visits keys 48.. (written by the launcher); batch 1 is finite
    q, k, v = _qkv(2, 2, 1, 33, 97, 32, FP32, device)
    bias = torch.randn(2, 1, 1, 97, device=device)
    bias[0] = float("-inf")
    (_, _, _, dmask, _), _ = _check(q, k, v, bias, window_left=3, window_right=0)
    assert dmask[0].isnan().all() and dmask[1].isfinite().all()


@pytest.mark.parametrize("dtype", [FP32, FP16])
@pytest.mark.parametrize("fill", [FP32_MIN, -1e4], ids=["finfo-min", "-1e4"])
def test_empty_rows_finite_fill(fill, dtype, device):
    # rule 6: such rows are the mean of v: dO / Sk to every key's dV, nothing to dQ or dK
    B, Hq, Sq, Sk = 2, 4, 17, 33
    q, k, v = _qkv(B, Hq, 2, Sq, Sk, 32, dtype, device)
    keep = _mask_with_empty_rows(B, Sq, Sk, device)
    (dq, _, _, _, _), _ = _check(q, k, v, keep, mask_fill=fill, window_right=0)
    assert torch.equal(dq[0, :, 5], torch.zeros_like(dq[0, :, 5]))


def test_structure_empty_rows_finite_fill(device):
    # window_right = -1: row 0 has no key; rows past Sk + 7 neither. Their dO / Sk reaches every key's dV,
    # also the keys that the band skips for them.
    q, k, v = _qkv(1, 2, 1, 40, 21, 64, BF16, device)
    _check(q, k, v, window_left=7, window_right=-1, mask_fill=FP32_MIN)


def test_additive_fill_mask_with_finite_fill(device):
    # HF style: a float mask holding finfo.min and mask_fill = finfo.min: the all-finfo.min rows are rule 6
    B, Hq, Sq, Sk = 2, 4, 17, 33
    q, k, v = _qkv(B, Hq, 1, Sq, Sk, 32, FP32, device, "bshd")
    bias = torch.zeros(B, 1, Sq, Sk, device=device).masked_fill(~_mask_with_empty_rows(B, Sq, Sk, device), FP32_MIN)
    (_, _, _, dmask, _), _ = _check(q, k, v, bias, mask_fill=FP32_MIN, window_right=0)
    assert torch.equal(dmask[0, 0, 5], torch.zeros_like(dmask[0, 0, 5]))


@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_saturated_lse_rows(dtype, device):
    # Same bias, default -inf fill: eager sees equal scores, p = 1 / Sk, and the gradient is not zero. The
    # row's lse = finfo.min + log(Sk) rounds to finfo.min: the kernel must put the lost log(Sk) back.
    B, Hq, Sq, Sk = 1, 2, 17, 33
    q, k, v = _qkv(B, Hq, 1, Sq, Sk, 32, dtype, device)
    bias = torch.randn(B, 1, Sq, Sk, device=device)
    bias[0, :, 3] = FP32_MIN
    bias[0, :, 7, :20] = FP32_MIN  # also ties among part of a row: p = 1/13 on the other keys
    bias[0, :, 7, 20:] = -2e9  # ulp(2e9) = 128: these scores are all equal too
    (dq, _, _, _, _), _ = _check(q, k, v, bias)
    assert dq[0, :, 3].abs().max() > 0


# ----------------------------------------------------------------------------------------------
# softcap, sinks, strides, head dims
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_softcap(dtype, device):
    # scale 0.5 at D=64 makes |s| reach ~10-20, so tanh saturates on part of the scores
    q, k, v = _qkv(1, 4, 2, 61, 47, 64, dtype, device, "bshd")
    _check(q, k, v, scale=0.5, softcap=15.0, window_right=0)


def test_softcap_with_trainable_bias(device):
    # the bias is added after the cap: its gradient is dS, q and k get dS * (1 - tanh^2)
    q, k, v = _qkv(1, 4, 2, 33, 47, 32, FP32, device)
    bias = torch.randn(4, 33, 47, device=device)
    _check(q, k, v, bias, scale=0.5, softcap=5.0, window_left=7, window_right=0)


SINK_CASES = {
    # name: (B, Hq, Hkv, Sq, Sk, D, dtype, window, mask kind or None, sink dtype)
    "gqa-causal-bf16": (2, 4, 2, 61, 61, 32, BF16, (None, 0), None, BF16),
    "mqa-window-fp16": (1, 4, 1, 97, 61, 64, FP16, (7, 0), None, FP32),
    "bool-mask-fp32": (2, 4, 2, 33, 47, 32, FP32, (None, None), "bool", FP16),
    "additive-mask-fp32": (2, 4, 2, 33, 47, 32, FP32, (None, 0), "add-fp32", FP32),
}


@pytest.mark.parametrize("case", list(SINK_CASES.values()), ids=list(SINK_CASES))
def test_sinks(case, device):
    B, Hq, Hkv, Sq, Sk, D, dtype, window, kind, sink_dtype = case
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, D, dtype, device)
    mask = None if kind is None else _random_mask((B, 1, Sq, Sk), kind, device)
    sinks = (torch.randn(Hq, device=device) * 2).to(sink_dtype)
    (_, _, _, _, dsinks), _ = _check(q, k, v, mask, window_left=window[0], window_right=window[1], sinks=sinks)
    assert dsinks.abs().min() > 0


@pytest.mark.parametrize("fill", [-math.inf, FP32_MIN], ids=["neg-inf", "finfo-min"])
def test_sinks_with_empty_rows(fill, device):
    # rule 8: rows with nothing kept are 0, with no gradient at all (p_sink = 1 but delta = 0), never NaN
    B, Sq, Sk = 2, 17, 33
    q, k, v = _qkv(B, 4, 2, Sq, Sk, 32, FP32, device)
    mask = torch.zeros(B, 1, Sq, Sk, device=device).masked_fill(~_mask_with_empty_rows(B, Sq, Sk, device), FP32_MIN)
    sinks = torch.tensor([0.5, -1.0, 3.0, -20.0], device=device)
    (dq, dk, dv, dmask, dsinks), _ = _check(q, k, v, mask, mask_fill=fill, sinks=sinks)
    assert all(g.isfinite().all() for g in (dq, dk, dv, dmask, dsinks))


@pytest.mark.parametrize("dtype", [FP16, FP32])
def test_arbitrary_strides(dtype, device):
    B, Hq, Hkv, Sq, Sk, D = 2, 4, 2, 33, 47, 64
    # q: a slice of a wider tensor; k: stride-0 batch (expanded); v: head dim not innermost; grad_out
    # transposed, lse a slice of a wider tensor
    q = torch.randn(B, Hq, Sq, 2 * D, dtype=dtype, device=device)[..., D:]
    k = torch.randn(1, Hkv, Sk, D, dtype=dtype, device=device).expand(B, Hkv, Sk, D)
    v = torch.randn(B, Hkv, D, Sk, dtype=dtype, device=device).transpose(-1, -2)
    grad_out = torch.randn(B, Sq, Hq, D, dtype=dtype, device=device).transpose(1, 2)
    assert not q.is_contiguous() and k.stride(0) == 0 and v.stride(-1) == Sk
    _check(q, k, v, window_left=7, window_right=0, grad_out=grad_out)

    out, lse = flash_attention_forward(q, k, v, scale=0.125, window_right=0)
    wide = torch.zeros(B, Hq, Sq, 3, device=device)
    wide[..., 1] = lse
    a = flash_attention_backward(grad_out, q, k, v, None, out, lse, scale=0.125, window_right=0)
    b = flash_attention_backward(grad_out, q, k, v, None, out.transpose(1, 2).contiguous().transpose(1, 2),
                                 wide[..., 1], scale=0.125, window_right=0)  # fmt: skip
    for x, y in zip(a[:3], b[:3]):
        assert torch.equal(x, y)


@pytest.mark.parametrize("d,dv", [(32, 64), (128, 64), (80, 96)])
def test_value_head_dim_differs(d, dv, device):
    q, k, v = _qkv(1, 2, 1, 33, 47, d, FP16, device, Dv=dv)
    _check(q, k, v, window_right=0)


def test_gradient_layout_follows_inputs(device):
    # dq/dk/dv are empty_like(q/k/v): BSHD inputs get BSHD gradients
    q, k, v = _qkv(1, 4, 2, 17, 33, 32, FP16, device, "bshd")
    (dq, dk, dv, _, _), _, _ = _backward(q, k, v)
    assert dq.stride() == q.stride() and dk.stride() == k.stride() and dv.stride() == v.stride()


@pytest.mark.parametrize("sq,sk", [(0, 17), (17, 0)])
def test_empty_sequences(sq, sk, device):
    # every gradient is an empty sum: zeros (the reference cannot run Sk = 0: amax over an empty dim)
    q, k, v = _qkv(1, 2, 1, sq, sk, 32, FP32, device)
    mask = torch.randn(sq, sk, device=device)
    sinks = torch.zeros(2, device=device)
    out = torch.zeros(1, 2, sq, 32, device=device)
    lse = torch.zeros(1, 2, sq, device=device)
    grads = flash_attention_backward(torch.ones_like(out), q, k, v, mask, out, lse, scale=0.1, sinks=sinks)
    for name, g, x in zip(NAMES, grads, (q, k, v, mask, sinks)):
        assert g.shape == x.shape and torch.equal(g, torch.zeros_like(x)), name


# ----------------------------------------------------------------------------------------------
# argument validation
# ----------------------------------------------------------------------------------------------


def _t(*shape, dtype=FP16):
    return torch.zeros(shape, dtype=dtype)


BAD_ARGS = {
    "grad-out-shape": ({"grad_out": _t(1, 2, 3, 8)}, r"grad_out: expected shape \[B, Hq, Sq, Dv\] = \[1, 2, 3, 16\]"),
    "grad-out-dtype": ({"grad_out": _t(1, 2, 3, 16, dtype=FP32)}, r"grad_out dtype: expected q's dtype"),
    "out-shape": ({"out": _t(1, 2, 4, 16)}, r"out: expected shape"),
    "lse-dtype": ({"lse": _t(1, 2, 3)}, r"lse: expected float32 \[B, Hq, Sq\]"),
    "lse-shape": ({"lse": _t(1, 2, dtype=FP32)}, r"lse: expected float32"),
    "lse-list": ({"lse": [0.0]}, r"lse: expected a torch.Tensor"),
    "q-3d": ({"q": _t(2, 3, 16)}, r"q: expected 4-D"),
    "mask-shape": ({"mask": torch.ones(4, 3, dtype=torch.bool)}, r"mask: shape \(4, 3\) not broadcastable"),
    "sinks-shape": ({"sinks": torch.zeros(3)}, r"sinks: expected shape \[Hq\]"),
    "softcap-negative": ({"softcap": -1.0}, r"softcap: expected a finite float >= 0"),
}


@pytest.mark.parametrize("override,match", list(BAD_ARGS.values()), ids=list(BAD_ARGS))
def test_bad_arguments_raise_value_error(override, match, device):
    args = {"q": _t(1, 2, 3, 16), "k": _t(1, 2, 3, 16), "v": _t(1, 2, 3, 16), "mask": None, "scale": 0.25}
    args.update(grad_out=_t(1, 2, 3, 16), out=_t(1, 2, 3, 16), lse=_t(1, 2, 3, dtype=FP32))
    args.update(override)
    args = {name: a.to(device) if isinstance(a, torch.Tensor) else a for name, a in args.items()}
    pos = [args.pop(name) for name in ("grad_out", "q", "k", "v", "mask", "out", "lse")]
    with pytest.raises(ValueError, match=match):
        flash_attention_backward(*pos, **args)


# ----------------------------------------------------------------------------------------------
# GPU: long sequences, real configs (the float64 reference needs [B, H, S, S] float64 several times)
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("seq", [1000, 4096])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True], ids=["nocausal", "causal"])
@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_gpu_long_sequences(dtype, causal, d, seq):
    q, k, v = _qkv(1, 4, 2, seq, seq, d, dtype, "cuda", "bshd")
    _check(q, k, v, window_right=0 if causal else None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_fp32(d):
    q, k, v = _qkv(1, 4, 1, 1000, 1000, d, FP32, "cuda")
    _check(q, k, v, window_left=255, window_right=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["bool", "add-fp32"])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_gpu_masks_sinks_softcap(d, kind):
    B, Hq, Hkv, Sq, Sk = 2, 8, 2, 1500, 1777
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, d, BF16, "cuda", "bshd")
    mask = _random_mask((B, 1, 1, Sk), kind, "cuda")
    _check(q, k, v, mask, window_right=Sk - Sq, softcap=30.0, sinks=torch.randn(Hq, device="cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_config_falls_back_on_shared_memory_overflow(monkeypatch):
    too_big = flash_bwd.BwdConfig(128, 256, 256, 128, 8, 4)
    monkeypatch.setattr(flash_bwd, "_pick_config", lambda *args: too_big)
    monkeypatch.setattr(flash_bwd, "_FITTED", {})
    q, k, v = _qkv(1, 2, 2, 700, 900, 128, FP16, "cuda")
    _check(q, k, v, window_right=0)
    (cfg,) = flash_bwd._FITTED.values()
    assert cfg != too_big


def test_the_dq_pass_launches_with_its_own_warps_and_stages():
    """``BwdConfig.dq_warps/dq_stages`` reach the dQ pass and the preprocess; 0 means the dK/dV pass's."""
    seen = []

    class FakeKernel:
        __name__ = "fake"

        def __getitem__(self, grid):
            return lambda *args, **kw: seen.append((kw["num_warps"], kw["num_stages"]))

    cfg = flash_bwd.BwdConfig(64, 128, 128, 64, 8, 2, dq_warps=4, dq_stages=3)
    for pass_ in ("dkdv", "dq"):
        used = flash_bwd._launch(FakeKernel(), lambda c: (1,), (), lambda c: {}, cfg, torch.device("cpu"), pass_)
        assert used == cfg
    assert seen == [(8, 2), (4, 3)]
    assert flash_bwd.BwdConfig(64, 128, 128, 64, 8, 2).warps_stages("dq") == (8, 2)
    # a shrink first takes a stage from the pass that overflowed, never adds any, and reaches one stage for both
    assert flash_bwd._smaller(cfg, "dq") == flash_bwd.BwdConfig(64, 128, 128, 64, 8, 2, dq_warps=4, dq_stages=2)
    assert flash_bwd._smaller(replace(cfg, num_stages=3), "dkdv").num_stages == 2
    for pass_ in ("dkdv", "dq"):
        cfg_small = cfg
        while (nxt := flash_bwd._smaller(cfg_small, pass_)) is not None:
            assert nxt.dq_stages <= cfg_small.dq_stages and nxt.num_stages <= cfg_small.num_stages
            assert nxt != cfg_small
            cfg_small = nxt
        assert cfg_small.warps_stages("dq")[1] == cfg_small.warps_stages("dkdv")[1] == 1


# ----------------------------------------------------------------------------------------------
# host TMA descriptors for the loop tiles (BwdConfig.dq_tma, BwdConfig.dkdv_tma)
# ----------------------------------------------------------------------------------------------


def _count_host_descs(monkeypatch) -> list:
    from flashfuse.kernels import flash_fwd_sm90

    made = []
    real = flash_fwd_sm90._host_desc
    monkeypatch.setattr(flash_fwd_sm90, "_host_desc", lambda t, rows: made.append(rows) or real(t, rows))
    return made


def _force(monkeypatch, cfg) -> None:
    monkeypatch.setattr(flash_bwd, "_pick_config", lambda *args: cfg)
    monkeypatch.setattr(flash_bwd, "_FITTED", {})


@pytest.mark.parametrize(
    "shape, kw",
    [
        ((1, 4, 2, 37, 53, 32, BF16, "bshd"), {"window_right": 16}),  # GQA, ragged ends, bottom-right band
        ((2, 2, 2, 48, 33, 16, FP16, "bhsd"), {"softcap": 20.0, "window_left": 7, "window_right": 0}),
    ],
    ids=["gqa-band", "softcap-window"],
)
def test_tma_descriptors_carry_the_loop_tiles(monkeypatch, shape, kw):
    """With ``dkdv_tma`` the dK/dV pass reads Q and dO, with ``dq_tma`` the dQ pass K and V, through host
    descriptors (two each, with the boxes of the tiles that step through them); rows past the ends read as zeros,
    as the masked loads give."""
    B, Hq, Hkv, Sq, Sk, D, dtype, layout = shape
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, D, dtype, "cpu", layout)
    for dq_tma, dkdv_tma, boxes in ((True, True, [16, 16, 32, 32]), (True, False, [32, 32]), (False, True, [16, 16])):
        _force(monkeypatch, flash_bwd.BwdConfig(16, 32, 32, 32, 1, 1, dq_tma=dq_tma, dkdv_tma=dkdv_tma))
        made = _count_host_descs(monkeypatch)
        _check(q, k, v, **kw)
        assert made == boxes, made  # Q and dO in boxes of block_m1 rows, K and V of block_n2 rows


def test_tma_is_skipped_where_descriptors_cannot_carry_the_call(monkeypatch):
    """A head dim that is not its own padded size (boxes span whole rows) keeps pointer loads in both passes; a
    broadcast K/V (stride 0 over the heads) keeps them in the dQ pass only (the dK/dV pass reads Q and dO, which
    TMA can carry). Either way the gradients are right."""
    _force(monkeypatch, flash_bwd.BwdConfig(16, 32, 32, 16, 1, 1, dq_tma=True, dkdv_tma=True))
    made = _count_host_descs(monkeypatch)
    q, k, v = _qkv(1, 2, 2, 20, 20, 24, FP32, "cpu")
    _check(q, k, v, window_right=0)
    assert made == []
    q, k, v = _qkv(1, 2, 1, 20, 20, 16, FP32, "cpu")
    kb, vb = k.expand(1, 2, 20, 16), v.expand(1, 2, 20, 16)
    assert not flash_bwd._tma_ok(kb, vb, 800)
    assert flash_bwd._tma_ok(k, v, 800) and flash_bwd._tma_ok(q, q, 800)
    _check(q, kb, vb, window_right=0)
    assert made == [16, 16]  # Q and dO of the dK/dV pass (block_m1 rows); no K/V descriptors


def test_launch_rebuilds_the_arguments_for_a_shrunk_config():
    """The TMA boxes follow the tiles: when a config overflows shared memory, ``_launch`` builds the arguments
    (descriptors included) again from the smaller config, which keeps the TMA flags."""
    from triton.runtime.errors import OutOfResources

    built, launched = [], []

    class FakeKernel:
        __name__ = "fake"

        def __getitem__(self, grid):
            def run(*args, **kw):
                if len(launched) == 0 and args[0] == 64:
                    launched.append(("overflow", args[0]))
                    raise OutOfResources(300000, 232448, "shared memory")
                launched.append(("ran", args[0]))

            return run

    cfg = flash_bwd.BwdConfig(64, 128, 128, 64, 8, 2, dq_tma=True, dkdv_tma=True)
    used = flash_bwd._launch(FakeKernel(), lambda c: (1,), lambda c: built.append(c) or (c.block_m1,),
                             lambda c: {}, cfg, torch.device("cpu"))
    assert launched == [("overflow", 64), ("ran", used.block_m1)]
    assert built == [cfg, used] and used != cfg
    assert used.dq_tma and used.dkdv_tma
    small = cfg
    while (nxt := flash_bwd._smaller(small)) is not None:
        assert nxt.dq_tma and nxt.dkdv_tma, nxt
        small = nxt


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("d", [64, 128, 256])
def test_gpu_tma_backward(monkeypatch, d):
    """Each head dim's default tiles with TMA in both passes on the GPU (big enough for host descriptors), GQA
    and a ragged causal band; it must not fall back to smaller tiles silently either."""
    base = flash_bwd._pick_config(d, BF16, torch.device("cuda"))
    cfg = replace(base, dq_tma=True, dkdv_tma=True)
    _force(monkeypatch, cfg)
    made = _count_host_descs(monkeypatch)
    q, k, v = _qkv(1, 8, 2, 2000, 2000, d, BF16, "cuda", "bshd")
    _check(q, k, v, window_right=0)
    if torch.cuda.get_device_capability()[0] >= 9:
        assert len(made) == 4
    assert list(flash_bwd._FITTED.values()) == [cfg]
