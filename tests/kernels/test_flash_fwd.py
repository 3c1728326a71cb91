"""Tests for ``flashfuse/kernels/flash_fwd.py`` against ``flashfuse.testing.attention_ref``.

The numerics rule (STYLE.md, habit 8): inputs are drawn in the target dtype; the reference runs in
float64 (``upcast=True``); the kernel's max and mean error may be at most 2x the error of the eager
"low precision" path (``upcast=False``) plus a small slack ``EPS``. NaN must appear exactly where the
reference has NaN. ``torch.empty`` is poisoned with NaN for the whole file, so an output element the
kernel forgets to write fails the NaN check.

Without CUDA, tests/conftest.py sets ``TRITON_INTERPRET=1`` and everything runs the real kernel under
the Triton interpreter on the CPU; the ``gpu`` tests add long sequences on a GPU.
"""

from __future__ import annotations

import math

import pytest
import torch

from flashfuse.kernels import flash_fwd
from flashfuse.kernels.flash_fwd import flash_attention_forward
from flashfuse.testing import attention_ref, expand_kv
from tests.kernels.numerics import (BF16, FP16, FP32, FP32_MIN, INTERPRETER_WARNINGS, WINDOWS, assert_forward_rule,
                                    qkv, seed_and_poison, shape_id)

pytestmark = INTERPRETER_WARNINGS


@pytest.fixture(autouse=True)
def _seed_and_poison(monkeypatch):
    seed_and_poison(monkeypatch)


_qkv = qkv


def _check(q, k, v, mask=None, *, scale=None, **kw):
    """Run kernel, float64 reference and eager low precision; assert the numerics rule. Returns both."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    out, lse = flash_attention_forward(q, k, v, mask, scale=scale, **kw)
    ref, ref_lse = attention_ref(q, k, v, mask, scale=scale, upcast=True, **kw)
    low, low_lse = attention_ref(q, k, v, mask, scale=scale, upcast=False, **kw)

    B, Hq, Sq, _ = q.shape
    assert out.shape == (B, Hq, Sq, v.shape[-1]) and out.dtype == q.dtype and out.is_contiguous()
    assert lse.shape == (B, Hq, Sq) and lse.dtype == torch.float32

    assert_forward_rule(out, lse, ref, ref_lse, low, low_lse, q.dtype)
    return out, lse, ref, ref_lse


# ----------------------------------------------------------------------------------------------
# shapes x dtypes x layouts x structure
# ----------------------------------------------------------------------------------------------

# A covering subset rather than the full product: every head dim, dtype, layout and GQA ratio appears,
# together with ragged lengths (1, 17, 97, 61, 33) and Sq != Sk both ways.
SHAPES = [
    # B, Hq, Hkv, Sq, Sk, D, dtype, layout
    (1, 2, 2, 1, 97, 64, FP16, "bhsd"),  # one query row (decode-like)
    (2, 4, 2, 17, 17, 80, BF16, "bshd"),  # D=80 padded to 128; GQA 2; BSHD strides
    (1, 4, 1, 97, 97, 128, FP32, "bshd"),  # MQA
    (1, 4, 4, 97, 61, 16, FP16, "bhsd"),  # smallest head dim; Sq > Sk
    (1, 8, 2, 61, 97, 256, BF16, "bhsd"),  # largest head dim; GQA 4
    (2, 2, 1, 33, 1, 96, FP32, "bhsd"),  # one key
    (1, 2, 1, 17, 97, 32, FP16, "bshd"),
    (1, 1, 1, 1025, 1025, 16, BF16, "bhsd"),  # one past a power of two: many blocks, ragged last one
]
_shape_id = shape_id


@pytest.mark.parametrize("window", list(WINDOWS.values()), ids=list(WINDOWS))
@pytest.mark.parametrize("shape", SHAPES, ids=[_shape_id(s) for s in SHAPES])
def test_matches_reference(shape, window, device):
    B, Hq, Hkv, Sq, Sk, D, dtype, layout = shape
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, D, dtype, device, layout)
    _check(q, k, v, window_left=window[0], window_right=window[1])


@pytest.mark.parametrize(
    "window",
    [(3, 5), (0, None), (None, -1), (5, -2), (-2, 4), (0, 0), (200, 200)],
    ids=["band3-5", "anticausal", "strict-causal", "left5-right-2", "left-2-right4", "diagonal", "wider-than-seq"],
)
@pytest.mark.parametrize("sq,sk", [(97, 61), (17, 97)])
def test_window_variants(window, sq, sk, device):
    # negative bounds leave some rows with no key at all: NaN with the default -inf fill
    q, k, v = _qkv(1, 2, 1, sq, sk, 64, FP16, device)
    _check(q, k, v, window_left=window[0], window_right=window[1])


@pytest.mark.parametrize("block_m,block_n", [(16, 16), (16, 32), (64, 16)], ids=["16x16", "16x32", "64x16"])
@pytest.mark.parametrize("window", [(None, 0), (7, 0), (3, 5)], ids=["causal", "window7", "band3-5"])
def test_block_shapes(block_m, block_n, window, device, monkeypatch):
    # The three loop phases (left edge, inside, right edge) depend on how blocks fall against the window;
    # other tile shapes must give the same answer.
    cfg = flash_fwd.FwdConfig(block_m=block_m, block_n=block_n, num_warps=4, num_stages=1)
    monkeypatch.setattr(flash_fwd, "_pick_config", lambda *args: cfg)
    q, k, v = _qkv(1, 2, 1, 97, 61, 32, FP32, device)
    mask = torch.rand(97, 61, device=device) > 0.2
    _check(q, k, v, mask, window_left=window[0], window_right=window[1])


def test_blocks_outside_the_window_are_never_read(device, monkeypatch):
    # NaN keys/values in blocks a row block should skip: any read would reach the output (0 * NaN = NaN).
    cfg = flash_fwd.FwdConfig(block_m=32, block_n=16, num_warps=4, num_stages=1)
    monkeypatch.setattr(flash_fwd, "_pick_config", lambda *args: cfg)
    q, k, v = _qkv(1, 2, 1, 97, 97, 32, FP32, device)

    def poisoned(keys):
        kp, vp = k.clone(), v.clone()
        kp[:, :, keys] = float("nan")
        vp[:, :, keys] = float("nan")
        return kp, vp

    # causal: rows 0..31 (the first row block) end at key 31, so keys 32.. are skipped (loop end)
    ref, _ = flash_attention_forward(q, k, v, scale=0.2, window_right=0)
    out, _ = flash_attention_forward(q, *poisoned(slice(32, None)), scale=0.2, window_right=0)
    assert torch.equal(out[:, :, :32], ref[:, :, :32])
    # window (7, 0): rows 64.. start at key block (64 - 7) // 16 * 16 = 48, so keys 0..47 are skipped
    ref, _ = flash_attention_forward(q, k, v, scale=0.2, window_left=7, window_right=0)
    out, _ = flash_attention_forward(q, *poisoned(slice(0, 48)), scale=0.2, window_left=7, window_right=0)
    assert torch.equal(out[:, :, 64:], ref[:, :, 64:])


# ----------------------------------------------------------------------------------------------
# masks
# ----------------------------------------------------------------------------------------------

MASK_SHAPES = {
    "B11K": lambda B, H, Sq, Sk: (B, 1, 1, Sk),  # padding mask
    "B1QK": lambda B, H, Sq, Sk: (B, 1, Sq, Sk),  # HF 4-D mask
    "QK": lambda B, H, Sq, Sk: (Sq, Sk),
    "BHQK": lambda B, H, Sq, Sk: (B, H, Sq, Sk),
    "H1K": lambda B, H, Sq, Sk: (H, 1, Sk),
}


def _random_mask(shape, kind, device):
    keep = torch.rand(shape, device=device) > 0.3
    if kind == "bool":
        return keep
    dtype = {"add-fp32": FP32, "add-fp16": FP16, "add-bf16": BF16}[kind]
    bias = torch.randn(shape, device=device).to(dtype)
    # masked positions as HF writes them: finfo(dtype).min, plus a few true -inf
    bias = bias.masked_fill(~keep, torch.finfo(dtype).min)
    return bias.masked_fill(torch.rand(shape, device=device) > 0.95, float("-inf"))


@pytest.mark.parametrize("causal", [False, True], ids=["nocausal", "causal"])
@pytest.mark.parametrize("kind", ["bool", "add-fp32"])
@pytest.mark.parametrize("mshape", list(MASK_SHAPES))
def test_masks(mshape, kind, causal, device):
    B, Hq, Hkv, Sq, Sk = 2, 4, 2, 33, 47
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, 64, FP16, device, "bshd")
    mask = _random_mask(MASK_SHAPES[mshape](B, Hq, Sq, Sk), kind, device)
    _check(q, k, v, mask, window_right=0 if causal else None)


@pytest.mark.parametrize("kind,dtype", [("add-fp16", FP16), ("add-bf16", BF16), ("add-fp32", BF16), ("bool", FP32)])
def test_mask_dtypes(kind, dtype, device):
    q, k, v = _qkv(1, 2, 1, 17, 97, 64, dtype, device)
    _check(q, k, v, _random_mask((1, 1, 17, 97), kind, device))


def test_mask_expanded_view_not_copied(device):
    # An expanded (stride-0) mask must be read in place: a mask whose rows differ only through the
    # broadcast view gives the same result as its dense copy.
    q, k, v = _qkv(2, 4, 2, 17, 33, 32, FP32, device)
    small = torch.rand(2, 1, 1, 33, device=device) > 0.3
    expanded = small.expand(2, 4, 17, 33)
    out_view, _ = flash_attention_forward(q, k, v, expanded, scale=0.2)
    out_dense, _ = flash_attention_forward(q, k, v, expanded.contiguous(), scale=0.2)
    assert torch.equal(out_view, out_dense)
    _check(q, k, v, expanded, scale=0.2)


# ----------------------------------------------------------------------------------------------
# fully masked rows (testing.py rule 6)
# ----------------------------------------------------------------------------------------------


def _mask_with_empty_rows(B, Sq, Sk, device):
    keep = torch.rand(B, 1, Sq, Sk, device=device) > 0.3
    keep[0, :, 0] = False
    keep[0, :, 5] = False
    keep[1, :, Sq - 1] = False
    return keep


@pytest.mark.parametrize("dtype", [FP32, BF16])
@pytest.mark.parametrize("kind", ["bool", "add-neg-inf"])
def test_empty_rows_neg_inf_fill_give_nan(kind, dtype, device):
    B, Sq, Sk = 2, 17, 33
    q, k, v = _qkv(B, 4, 2, Sq, Sk, 32, dtype, device)
    keep = _mask_with_empty_rows(B, Sq, Sk, device)
    mask = keep if kind == "bool" else torch.zeros(keep.shape, device=device).masked_fill(~keep, float("-inf"))
    out, lse, _ref, _ = _check(q, k, v, mask)
    for b, i in [(0, 0), (0, 5), (1, Sq - 1)]:
        assert out[b, :, i].isnan().all() and lse[b, :, i].isneginf().all()
    assert out[0, :, 1].isfinite().all()


def _assert_rows_are_v_mean(out, lse, v, rows, Hq, Sk, fill):
    vmean = expand_kv(v.double().mean(dim=-2, keepdim=True), Hq)  # [B, Hq, 1, Dv]
    tol = {FP32: 1e-6, FP16: 1e-3, BF16: 8e-3}[out.dtype]
    for b, i in rows:
        torch.testing.assert_close(out[b, :, i].double(), vmean[b, :, 0], atol=tol, rtol=0)
        expected_lse = torch.tensor(fill + math.log(Sk), dtype=torch.float32)
        assert torch.equal(lse[b, :, i].cpu(), expected_lse.expand(Hq))


@pytest.mark.parametrize("dtype", [FP32, FP16])
@pytest.mark.parametrize("fill", [FP32_MIN, -1e4], ids=["finfo-min", "-1e4"])
def test_empty_rows_finite_fill_give_v_mean(fill, dtype, device):
    B, Hq, Sq, Sk = 2, 4, 17, 33
    q, k, v = _qkv(B, Hq, 2, Sq, Sk, 32, dtype, device)
    keep = _mask_with_empty_rows(B, Sq, Sk, device)
    out, lse, _, _ = _check(q, k, v, keep, mask_fill=fill)
    assert not out.isnan().any()
    _assert_rows_are_v_mean(out, lse, v, [(0, 0), (0, 5), (1, Sq - 1)], Hq, Sk, fill)


def test_additive_fill_mask_with_finite_fill(device):
    # HF style: a float mask holding finfo.min, mask_fill = finfo.min. A row whose kept scores are all
    # about finfo.min is "all equal" in eager fp32, hence the mean of v (the max <= fill / 2 clause).
    # Times log2(e) such a bias overflows fp32: the kernel must clamp it, not turn it into -inf.
    B, Hq, Sq, Sk = 2, 4, 17, 33
    q, k, v = _qkv(B, Hq, 1, Sq, Sk, 32, FP32, device, "bshd")
    keep = _mask_with_empty_rows(B, Sq, Sk, device)
    bias = torch.zeros(keep.shape, device=device).masked_fill(~keep, FP32_MIN)
    for window_right in (None, 0):
        out, lse, _, _ = _check(q, k, v, bias, mask_fill=FP32_MIN, window_right=window_right)
        assert not out.isnan().any()
        _assert_rows_are_v_mean(out, lse, v, [(0, 0), (0, 5), (1, Sq - 1)], Hq, Sk, FP32_MIN)


def test_additive_fill_mask_with_neg_inf_fill(device):
    # Same bias, default -inf fill: eager fp32 sees equal scores too, so the rows are still the mean of v
    # (no rule-6 patching involved; the kernel gets there through the clamp alone).
    B, Hq, Sq, Sk = 1, 2, 17, 33
    q, k, v = _qkv(B, Hq, 1, Sq, Sk, 32, FP32, device)
    bias = torch.zeros(B, 1, Sq, Sk, device=device)
    bias[0, :, 3] = FP32_MIN
    out, _, _, _ = _check(q, k, v, bias)
    vmean = v.double().mean(dim=-2)[0, 0]
    torch.testing.assert_close(out[0, :, 3].double(), vmean.expand(Hq, -1), atol=1e-6, rtol=0)


def test_structure_empty_rows_finite_fill(device):
    # window_right = -1 leaves row 0 without keys; Sq > Sk + window_left leaves the last rows without keys
    B, Hq, Sq, Sk = 1, 2, 40, 21
    q, k, v = _qkv(B, Hq, 1, Sq, Sk, 64, BF16, device)
    out, lse, _, _ = _check(q, k, v, window_left=7, window_right=-1, mask_fill=FP32_MIN)
    rows = [(0, 0)] + [(0, i) for i in range(Sk + 7, Sq)]
    _assert_rows_are_v_mean(out, lse, v, rows, Hq, Sk, FP32_MIN)
    out, lse, _, _ = _check(q, k, v, window_left=7, window_right=-1)
    assert all(out[0, :, i].isnan().all() for _, i in rows)


# ----------------------------------------------------------------------------------------------
# softcap, strides, head dims, lse
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [FP32, BF16])
@pytest.mark.parametrize("causal", [False, True], ids=["nocausal", "causal"])
def test_softcap(dtype, causal, device):
    # scale 0.5 at D=64 makes |s| reach ~10-20, so tanh saturates on part of the scores
    q, k, v = _qkv(1, 4, 2, 97, 61, 64, dtype, device, "bshd")
    _check(q, k, v, scale=0.5, softcap=15.0, window_right=0 if causal else None)
    # softcap with a mask and a window together
    mask = torch.rand(97, 61, device=device) > 0.3
    _check(q, k, v, mask, scale=0.5, softcap=15.0, window_left=7, window_right=0)


@pytest.mark.parametrize("dtype", [FP16, FP32])
def test_arbitrary_strides(dtype, device):
    B, Hq, Hkv, Sq, Sk, D = 2, 4, 2, 33, 47, 64
    # q: a slice of a wider tensor (row stride 2 * D, storage offset); k: stride-0 batch (expanded);
    # v: head dim not innermost (stride_vd = Sk, stride_vn = 1)
    q = torch.randn(B, Hq, Sq, 2 * D, dtype=dtype, device=device)[..., D:]
    k = torch.randn(1, Hkv, Sk, D, dtype=dtype, device=device).expand(B, Hkv, Sk, D)
    v = torch.randn(B, Hkv, D, Sk, dtype=dtype, device=device).transpose(-1, -2)
    assert not q.is_contiguous() and k.stride(0) == 0 and v.stride(-1) == Sk
    _check(q, k, v, window_left=7, window_right=0)


@pytest.mark.parametrize("d,dv", [(32, 64), (128, 64), (80, 96)])
def test_value_head_dim_differs(d, dv, device):
    q, k, v = _qkv(1, 2, 1, 33, 47, d, FP16, device, Dv=dv)
    _check(q, k, v, window_right=0)


def test_lse_is_natural_log_sum_exp(device):
    q, k, v = _qkv(1, 2, 2, 17, 33, 32, FP32, device)
    scale = 0.3
    _, lse = flash_attention_forward(q, k, v, scale=scale)
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, dim=-1), atol=1e-5, rtol=0)


def test_empty_query(device):
    q, k, v = _qkv(1, 2, 1, 0, 17, 32, FP16, device)
    out, lse = flash_attention_forward(q, k, v, scale=0.1)
    assert out.shape == (1, 2, 0, 32) and lse.shape == (1, 2, 0)


# ----------------------------------------------------------------------------------------------
# sinks (testing.py rule 8)
# ----------------------------------------------------------------------------------------------


def _sinks(Hq, dtype, device):
    # around the scores' scale (|s| ~ 1..3 here) so that the sink takes a real share of some rows, not all
    return (torch.randn(Hq, device=device) * 2).to(dtype)


SINK_CASES = {
    # name: (B, Hq, Hkv, Sq, Sk, D, dtype, layout, window, mask kind or None)
    "plain": (1, 4, 4, 33, 47, 64, FP32, "bhsd", (None, None), None),
    "gqa-causal-bf16": (2, 4, 2, 61, 61, 32, BF16, "bshd", (None, 0), None),
    "mqa-window-fp16": (1, 4, 1, 97, 61, 64, FP16, "bhsd", (7, 0), None),
    "bool-mask-fp16": (2, 4, 2, 33, 47, 32, FP16, "bshd", (None, None), "bool"),
    "additive-mask-fp32": (2, 4, 2, 33, 47, 32, FP32, "bhsd", (None, 0), "add-fp32"),
    "additive-mask-bf16": (1, 2, 1, 17, 97, 64, BF16, "bhsd", (None, None), "add-bf16"),
}


@pytest.mark.parametrize("case", list(SINK_CASES.values()), ids=list(SINK_CASES))
def test_sinks(case, device):
    B, Hq, Hkv, Sq, Sk, D, dtype, layout, window, kind = case
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, D, dtype, device, layout)
    mask = None if kind is None else _random_mask((B, 1, Sq, Sk), kind, device)
    sinks = _sinks(Hq, dtype, device)
    out, lse, _, _ = _check(q, k, v, mask, window_left=window[0], window_right=window[1], sinks=sinks)
    assert not out.isnan().any() and lse.isfinite().all()
    # the sink really takes weight: without it the output differs
    plain, _ = flash_attention_forward(
        q, k, v, mask, scale=1.0 / math.sqrt(D), window_left=window[0], window_right=window[1]
    )
    assert not torch.allclose(out.float().nan_to_num(), plain.float().nan_to_num())


@pytest.mark.parametrize("fill", [-math.inf, FP32_MIN], ids=["neg-inf", "finfo-min"])
@pytest.mark.parametrize("kind", ["bool", "add-neg-inf", "add-finfo-min"])
def test_sinks_empty_rows_are_zero(kind, fill, device):
    # rule 8: a row with nothing kept is 0 (the sink takes all the weight) and its lse is the sink,
    # whatever the fill: rule 6 (mean of v) does not apply with sinks
    B, Hq, Sq, Sk = 2, 4, 17, 33
    q, k, v = _qkv(B, Hq, 2, Sq, Sk, 32, FP32, device)
    keep = _mask_with_empty_rows(B, Sq, Sk, device)
    if kind == "bool":
        mask = keep
    else:
        masked = float("-inf") if kind == "add-neg-inf" else FP32_MIN
        mask = torch.zeros(keep.shape, device=device).masked_fill(~keep, masked)
    sinks = torch.tensor([0.5, -1.0, 3.0, -20.0], device=device)
    out, lse, _, _ = _check(q, k, v, mask, mask_fill=fill, sinks=sinks)
    for b, i in [(0, 0), (0, 5), (1, Sq - 1)]:
        assert torch.equal(out[b, :, i], torch.zeros_like(out[b, :, i]))
        if kind != "add-finfo-min":  # finfo.min scores still add exp(finfo.min - sink) = 0 to the sum
            assert torch.equal(lse[b, :, i], sinks)
    assert not out.isnan().any()


def test_sinks_with_structure_empty_rows(device):
    # window_right = -1: row 0 has no key at all; the finite fill must not turn it into the mean of v
    q, k, v = _qkv(1, 2, 1, 40, 21, 64, BF16, device)
    sinks = torch.tensor([0.0, 1.0], device=device, dtype=BF16)
    out, lse, _, _ = _check(q, k, v, window_left=7, window_right=-1, mask_fill=FP32_MIN, sinks=sinks)
    assert torch.equal(out[0, :, 0].float(), torch.zeros(2, 64))
    torch.testing.assert_close(lse[0, :, 0], sinks.float(), atol=0, rtol=0)


@pytest.mark.parametrize("sink_dtype", [FP16, BF16, torch.float64], ids=["fp16", "bf16", "fp64"])
def test_sinks_dtype_and_strides(sink_dtype, device):
    # any float dtype; a strided view (every other element of a longer tensor)
    q, k, v = _qkv(1, 4, 2, 17, 33, 32, FP32, device)
    sinks = torch.randn(8, device=device).to(sink_dtype)[::2]
    assert sinks.stride(0) == 2
    _check(q, k, v, sinks=sinks, softcap=5.0, window_right=0)


def test_softcap_with_sinks_and_additive_mask(device):
    q, k, v = _qkv(1, 4, 2, 33, 47, 64, FP16, device)
    mask = _random_mask((33, 47), "add-fp16", device)
    _check(q, k, v, mask, scale=0.5, softcap=15.0, window_left=7, window_right=0, sinks=_sinks(4, FP32, device))


def test_neg_inf_sink_is_no_sink(device):
    q, k, v = _qkv(2, 2, 1, 17, 33, 32, FP32, device)
    keep = _mask_with_empty_rows(2, 17, 33, device)
    sinks = torch.full((2,), float("-inf"), device=device)
    out, lse = flash_attention_forward(q, k, v, keep, scale=0.2, sinks=sinks)
    ref, ref_lse = flash_attention_forward(q, k, v, keep, scale=0.2)
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.nan_to_num(), ref.nan_to_num())
    assert torch.equal(lse, ref_lse)


# ----------------------------------------------------------------------------------------------
# argument validation
# ----------------------------------------------------------------------------------------------


def _t(*shape, dtype=FP16):
    return torch.zeros(shape, dtype=dtype)


BAD_ARGS = {
    "q-3d": ({"q": _t(2, 3, 16)}, r"q: expected 4-D \[B, Hq, Sq, D\], got shape \(2, 3, 16\)"),
    "k-3d": ({"k": _t(2, 3, 16)}, r"k: expected 4-D \[B, Hkv, Sk, D\]"),
    "v-5d": ({"v": _t(1, 1, 2, 3, 16)}, r"v: expected 4-D"),
    "dtype-mix": ({"k": _t(1, 2, 3, 16, dtype=FP32)}, r"q/k/v dtype"),
    "dtype-fp64": (
        {
            "q": _t(1, 2, 3, 16, dtype=torch.float64),
            "k": _t(1, 2, 3, 16, dtype=torch.float64),
            "v": _t(1, 2, 3, 16, dtype=torch.float64),
        },
        r"q/k/v dtype",
    ),
    "gqa": (
        {"q": _t(1, 32, 3, 16), "k": _t(1, 5, 3, 16), "v": _t(1, 5, 3, 16)},
        r"Hq \(32\) must be a multiple of Hkv \(5\)",
    ),
    "head-dim-300": (
        {"q": _t(1, 2, 3, 300), "k": _t(1, 2, 3, 300), "v": _t(1, 2, 3, 300)},
        r"head dim 300 unsupported: 16\.\.256",
    ),
    "head-dim-8": ({"q": _t(1, 2, 3, 8), "k": _t(1, 2, 3, 8), "v": _t(1, 2, 3, 8)}, r"head dim 8 unsupported"),
    "v-head-dim-512": ({"v": _t(1, 2, 3, 512)}, r"v head dim 512 unsupported"),
    "k-head-dim": ({"k": _t(1, 2, 3, 32)}, r"k: head dim 32"),
    "k-batch": ({"k": _t(2, 2, 3, 16), "v": _t(2, 2, 3, 16)}, r"k: batch 2"),
    "v-seq": ({"v": _t(1, 2, 4, 16)}, r"v: expected \[B, Hkv, Sk, Dv\]"),
    "mask-shape": (
        {"mask": torch.ones(4, 3, dtype=torch.bool)},
        r"mask: shape \(4, 3\) not broadcastable to \[B,Hq,Sq,Sk\]",
    ),
    "mask-5d": ({"mask": torch.ones(1, 1, 2, 3, 3, dtype=torch.bool)}, r"mask: shape .* not broadcastable"),
    "mask-dtype": ({"mask": torch.ones(3, 3, dtype=torch.int32)}, r"mask dtype"),
    "mask-type": ({"mask": [[True]]}, r"mask: expected a torch.Tensor"),
    "scale-inf": ({"scale": math.inf}, r"scale: expected a finite float"),
    "scale-str": ({"scale": "0.1"}, r"scale: expected a float"),
    "window-float": ({"window_left": 1.5}, r"window_left: expected an int or None"),
    "window-bool": ({"window_right": True}, r"window_right: expected an int or None"),
    "mask-fill-nan": ({"mask_fill": math.nan}, r"mask_fill"),
    "mask-fill-pos-inf": ({"mask_fill": math.inf}, r"mask_fill"),
    "softcap-negative": ({"softcap": -1.0}, r"softcap: expected a finite float >= 0"),
    "q-not-tensor": ({"q": None}, r"q: expected a torch.Tensor"),
    "sinks-shape": ({"sinks": torch.zeros(3)}, r"sinks: expected shape \[Hq\] = \[2\], got \(3,\)"),
    "sinks-2d": ({"sinks": torch.zeros(1, 2)}, r"sinks: expected shape \[Hq\]"),
    "sinks-int": ({"sinks": torch.zeros(2, dtype=torch.int64)}, r"sinks dtype: expected a float dtype"),
    "sinks-list": ({"sinks": [0.0, 0.0]}, r"sinks: expected a torch.Tensor or None"),
}


@pytest.mark.parametrize("override,match", list(BAD_ARGS.values()), ids=list(BAD_ARGS))
def test_bad_arguments_raise_value_error(override, match, device):
    args = {"q": _t(1, 2, 3, 16), "k": _t(1, 2, 3, 16), "v": _t(1, 2, 3, 16), "mask": None, "scale": 0.25}
    args.update(override)
    args = {name: a.to(device) if isinstance(a, torch.Tensor) else a for name, a in args.items()}
    q, k, v, mask = args.pop("q"), args.pop("k"), args.pop("v"), args.pop("mask")
    with pytest.raises(ValueError, match=match):
        flash_attention_forward(q, k, v, mask, **args)


@pytest.mark.skipif(
    not torch.cuda.is_available() or flash_fwd._interpreting(), reason="needs CUDA without TRITON_INTERPRET"
)
def test_cpu_tensors_without_interpreter_raise():
    with pytest.raises(ValueError, match=r"q/k/v device: cpu tensors need a CUDA device or TRITON_INTERPRET=1"):
        flash_attention_forward(_t(1, 2, 3, 16), _t(1, 2, 3, 16), _t(1, 2, 3, 16), scale=0.25)


# ----------------------------------------------------------------------------------------------
# GPU: long sequences (the reference needs [B, H, S, S] float64: ~2 GB per head group at S = 8192)
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("seq", [1000, 8192])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True], ids=["nocausal", "causal"])
@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_gpu_long_sequences(dtype, causal, d, seq):
    q, k, v = _qkv(1, 4, 2, seq, seq, d, dtype, "cuda", "bshd")
    _check(q, k, v, window_right=0 if causal else None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_gpu_padding_mask_and_window(dtype):
    B, Hq, Hkv, Sq, Sk = 2, 8, 2, 2049, 3001
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, 128, dtype, "cuda")
    lengths = torch.tensor([Sk, 1500], device="cuda")
    pad = torch.arange(Sk, device="cuda")[None, None, None, :] < lengths[:, None, None, None]  # [B, 1, 1, Sk]
    _check(q, k, v, pad, window_left=511, window_right=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["bool", "add-fp32"])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_gpu_masks_every_head_dim(d, kind):
    # a mask tile is multi-buffered like K and V: these are the configs most likely to overflow shared memory
    q, k, v = _qkv(2, 4, 1, 1500, 1777, d, BF16, "cuda", "bshd")
    _check(q, k, v, _random_mask((2, 1, 1500, 1777), kind, "cuda"), window_right=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_config_falls_back_on_shared_memory_overflow(monkeypatch):
    # 128x128 tiles at D=128 with 4 stages want ~288 KB of shared memory (H100: 227 KB)
    too_big = flash_fwd.FwdConfig(128, 128, 8, 4)
    monkeypatch.setattr(flash_fwd, "_pick_config", lambda *args: too_big)
    monkeypatch.setattr(flash_fwd, "_FITTED", {})
    q, k, v = _qkv(1, 2, 2, 700, 900, 128, FP16, "cuda")
    _check(q, k, v, window_right=0)
    (cfg,) = flash_fwd._FITTED.values()
    assert cfg != too_big
