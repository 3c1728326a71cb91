"""Tests for ``flashfuse/kernels/flash_decode.py`` (split-KV decode) against ``attention_ref`` and ``flash_fwd``.

The numerics rule of test_flash_fwd.py (STYLE.md, habit 8): inputs in the target dtype, a float64 reference,
the kernel's max and mean error at most 2x eager's (``upcast=False``) plus ``EPS``. On top, the decode kernel
must agree with the prefill kernel ``flash_attention_forward`` on everything that is not rounding: shapes,
dtypes, contiguity, where the output is NaN and where ``lse`` is ``-inf`` (the op may pick either kernel).
``torch.empty`` is poisoned with NaN, so a partial state (or output row) that no program writes fails.

Shapes are decode shapes: ``Sq`` of 1..16 against ragged cache lengths, GQA groups packed into the rows of
one program (ratios 1, 2, 4, 8 and MQA), ``num_splits`` of 1 and several. Causal decode is the bottom-right
band ``window_right = Sk - Sq``; a sliding window of ``W`` keys adds ``window_left = W - 1 - (Sk - Sq)``.
On the CPU everything runs under the Triton interpreter (tests/conftest.py); the ``gpu`` tests take
Sk = 4096..32768.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import pathlib
from dataclasses import replace

import pytest
import torch
import triton
import triton.language as tl

from flashfuse.kernels import flash_decode
from flashfuse.kernels.flash_decode import choose_splits, flash_decode_forward, supports
from flashfuse.kernels.flash_fwd import flash_attention_forward
from flashfuse.testing import attention_ref, expand_kv
from tests.kernels.numerics import (BF16, FP16, FP32, FP32_MIN, INTERPRETER_WARNINGS, assert_forward_rule, qkv,
                                    seed_and_poison)

ROOT = pathlib.Path(__file__).resolve().parents[2]

pytestmark = INTERPRETER_WARNINGS


@pytest.fixture(autouse=True)
def _seed_and_poison(monkeypatch):
    seed_and_poison(monkeypatch)
    monkeypatch.setattr(flash_decode, "_LAUNCHES", {})  # every test plans its own calls


def _qkv(B, Hq, Hkv, Sq, Sk, D, dtype, device, layout="bhsd"):
    return qkv(B, Hq, Hkv, Sq, Sk, D, dtype, device, layout)


def _causal(Sq, Sk):
    return None, Sk - Sq  # bottom-right: query i sits at position Sk - Sq + i


def _sliding(Sq, Sk, W):
    return W - 1 - (Sk - Sq), Sk - Sq  # the last W positions up to and including the query's own


def _check(q, k, v, mask=None, *, scale=None, num_splits=None, **kw):
    """Decode kernel vs float64 reference (numerics rule) and vs flash_fwd (shape and NaN/-inf patterns)."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    out, lse = flash_decode_forward(q, k, v, mask, scale=scale, num_splits=num_splits, **kw)
    fwd, fwd_lse = flash_attention_forward(q, k, v, mask, scale=scale, **kw)
    ref, ref_lse = attention_ref(q, k, v, mask, scale=scale, upcast=True, **kw)
    low, low_lse = attention_ref(q, k, v, mask, scale=scale, upcast=False, **kw)

    assert out.shape == fwd.shape and out.dtype == fwd.dtype and out.is_contiguous()
    assert lse.shape == fwd_lse.shape and lse.dtype == torch.float32 and lse.is_contiguous()
    assert torch.equal(out.isnan(), fwd.isnan()), "NaN pattern differs from flash_fwd"
    assert torch.equal(lse.isneginf(), fwd_lse.isneginf()), "-inf lse pattern differs from flash_fwd"
    assert_forward_rule(out, lse, ref, ref_lse, low, low_lse, q.dtype)
    return out, lse


# ----------------------------------------------------------------------------------------------
# shapes x dtypes x GQA x band
# ----------------------------------------------------------------------------------------------

SHAPES = [
    # B, Hq, Hkv, Sq, Sk, D, dtype, layout, num_splits
    (1, 2, 2, 1, 257, 64, FP16, "bhsd", None),  # GQA 1; one past a multiple of the chunk
    (2, 4, 2, 2, 300, 32, BF16, "bshd", 3),  # GQA 2; BSHD strides
    (1, 8, 2, 4, 177, 80, FP32, "bhsd", 2),  # GQA 4; D=80 padded to 128
    (1, 16, 2, 3, 129, 128, BF16, "bhsd", 5),  # GQA 8: 24 packed rows
    (1, 8, 1, 16, 97, 16, FP16, "bshd", 4),  # MQA: 128 packed rows -> several row blocks
    (1, 4, 1, 7, 211, 256, FP16, "bhsd", 1),  # largest head dim; one split
    (1, 2, 1, 13, 61, 32, FP32, "bhsd", 16),  # more splits asked than blocks: capped
]
WINDOWS = ["full", "causal", "sliding"]


def _window(name, Sq, Sk):
    return {"full": (None, None), "causal": _causal(Sq, Sk), "sliding": _sliding(Sq, Sk, 50)}[name]


def _shape_id(s):
    B, Hq, Hkv, Sq, Sk, D, dtype, layout, ns = s
    return f"B{B}-H{Hq}/{Hkv}-Sq{Sq}-Sk{Sk}-D{D}-{str(dtype)[6:]}-{layout}-ns{ns}"


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("shape", SHAPES, ids=[_shape_id(s) for s in SHAPES])
def test_matches_reference(shape, window, device):
    B, Hq, Hkv, Sq, Sk, D, dtype, layout, ns = shape
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, D, dtype, device, layout)
    wl, wr = _window(window, Sq, Sk)
    _check(q, k, v, window_left=wl, window_right=wr, num_splits=ns)


@pytest.mark.parametrize("sq", range(1, 17))
def test_every_query_length(sq, device):
    # causal decode of 1..16 new tokens against a ragged cache, GQA 2, three splits
    q, k, v = _qkv(1, 4, 2, sq, 67, 16, FP32, device)
    _check(q, k, v, window_left=None, window_right=67 - sq, num_splits=3)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 7, 64])
def test_num_splits_agree(num_splits, device):
    # 203 keys in blocks of 16: 13 blocks, so 64 asked is capped at 13 splits of one block
    q, k, v = _qkv(2, 4, 1, 2, 203, 32, FP32, device)
    pad = torch.rand(2, 1, 1, 203, device=device) > 0.2
    out, lse = _check(q, k, v, pad, num_splits=num_splits)
    one, one_lse = flash_decode_forward(q, k, v, pad, scale=1 / math.sqrt(32), num_splits=1)
    torch.testing.assert_close(out, one, atol=1e-6, rtol=0)
    torch.testing.assert_close(lse, one_lse, atol=1e-6, rtol=0)
    # an all-False mask: every row empty in every split, NaN with the -inf fill
    none, none_lse = flash_decode_forward(q, k, v, torch.zeros_like(pad), scale=0.2, num_splits=num_splits)
    assert none.isnan().all() and none_lse.isneginf().all()


@pytest.mark.parametrize(
    "window",
    [(3, 5), (0, None), (None, -1), (5, -2), (-2, 4), (0, 0), (200, 200), (-60, 100)],
    ids=["band3-5", "anticausal", "strict-causal", "left5-right-2", "left-2-right4", "diagonal", "wide", "far-right"],
)
def test_window_variants(window, device):
    # top-left bands too (the op passes any band): negative bounds leave rows without keys (NaN)
    q, k, v = _qkv(1, 4, 2, 9, 83, 32, FP16, device)
    _check(q, k, v, window_left=window[0], window_right=window[1], num_splits=3)


def test_chunks_outside_the_band_are_never_read(device, monkeypatch):
    # NaN keys/values before the sliding window's first block: any read would reach the output (0 * NaN)
    cfg = flash_decode.DecodeConfig(block_m=32, block_n=16, num_warps=1, num_stages=1)
    monkeypatch.setattr(flash_decode, "_pick_config", lambda *args: cfg)
    monkeypatch.setattr(flash_decode, "_FITTED", {})
    Sq, Sk, W = 4, 300, 40
    q, k, v = _qkv(1, 4, 2, Sq, Sk, 32, FP32, device)
    wl, wr = _sliding(Sq, Sk, W)
    first = (Sk - Sq - W + 1) // 16 * 16  # the first key block the band touches
    kp, vp = k.clone(), v.clone()
    kp[:, :, :first] = float("nan")
    vp[:, :, :first] = float("nan")
    for ns in (1, 4):
        ref, _ = flash_decode_forward(q, k, v, scale=0.2, window_left=wl, window_right=wr, num_splits=ns)
        out, _ = flash_decode_forward(q, kp, vp, scale=0.2, window_left=wl, window_right=wr, num_splits=ns)
        assert torch.equal(out, ref)


# ----------------------------------------------------------------------------------------------
# masks: padding, HF 4-D, broadcast shapes; fully masked rows
# ----------------------------------------------------------------------------------------------


def _left_padding(lengths, Sk, device):
    """bool [B, 1, 1, Sk]: batch element b keeps its last lengths[b] keys (left-padded cache)."""
    pos = torch.arange(Sk, device=device)
    return (pos[None, :] >= Sk - torch.tensor(lengths, device=device)[:, None])[:, None, None, :]


@pytest.mark.parametrize("kind", ["bool", "add-fp32", "add-bf16"])
@pytest.mark.parametrize("window", ["causal", "sliding"])
def test_left_padding(kind, window, device):
    B, Hq, Hkv, Sq, Sk = 3, 4, 2, 3, 157
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, 32, BF16, device)
    keep = _left_padding([Sk, 100, 9], Sk, device)
    if kind == "bool":
        mask, fill = keep, -math.inf
    else:  # HF: an additive finfo.min bias and a finite fill
        mdtype = FP32 if kind == "add-fp32" else BF16
        mask = torch.zeros(keep.shape, dtype=mdtype, device=device).masked_fill(~keep, torch.finfo(mdtype).min)
        fill = torch.finfo(mdtype).min
    wl, wr = _window(window, Sq, Sk)
    _check(q, k, v, mask, window_left=wl, window_right=wr, mask_fill=fill, num_splits=4)


MASK_SHAPES = {
    "B1QK": lambda B, H, Sq, Sk: (B, 1, Sq, Sk),
    "QK": lambda B, H, Sq, Sk: (Sq, Sk),
    "BHQK": lambda B, H, Sq, Sk: (B, H, Sq, Sk),
    "H1K": lambda B, H, Sq, Sk: (H, 1, Sk),
}


@pytest.mark.parametrize("kind", ["bool", "add-fp32"])
@pytest.mark.parametrize("mshape", list(MASK_SHAPES))
def test_mask_shapes(mshape, kind, device):
    B, Hq, Hkv, Sq, Sk = 2, 4, 2, 5, 71
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, 32, FP16, device, "bshd")
    shape = MASK_SHAPES[mshape](B, Hq, Sq, Sk)
    keep = torch.rand(shape, device=device) > 0.3
    if kind == "bool":
        mask = keep
    else:
        mask = torch.randn(shape, device=device).masked_fill(~keep, FP32_MIN)
        mask = mask.masked_fill(torch.rand(shape, device=device) > 0.95, float("-inf"))
    _check(q, k, v, mask, window_right=Sk - Sq, num_splits=3)


def _empty_row_mask(B, Sq, Sk, device):
    keep = torch.rand(B, 1, Sq, Sk, device=device) > 0.3
    keep[0, :, 0] = False
    keep[1, :, Sq - 1] = False
    return keep


def _assert_rows_are_v_mean(out, lse, v, rows, Hq, Sk, fill):
    vmean = expand_kv(v.double().mean(dim=-2, keepdim=True), Hq)
    tol = {FP32: 1e-6, FP16: 1e-3, BF16: 8e-3}[out.dtype]
    for b, i in rows:
        torch.testing.assert_close(out[b, :, i].double(), vmean[b, :, 0], atol=tol, rtol=0)
        expected = torch.tensor(fill + math.log(Sk), dtype=torch.float32)
        assert torch.equal(lse[b, :, i].cpu(), expected.expand(Hq))


@pytest.mark.parametrize("fill", [-math.inf, FP32_MIN, -1e4], ids=["neg-inf", "finfo-min", "-1e4"])
@pytest.mark.parametrize("window", ["full", "sliding"])  # the mean of v from the splits / from torch.mean
def test_empty_rows(fill, window, device):
    B, Hq, Sq, Sk = 2, 4, 4, 133
    q, k, v = _qkv(B, Hq, 2, Sq, Sk, 32, FP32, device)
    keep = _empty_row_mask(B, Sq, Sk, device)
    wl, wr = _window(window, Sq, Sk)
    out, lse = _check(q, k, v, keep, mask_fill=fill, window_left=wl, window_right=wr, num_splits=3)
    rows = [(0, 0), (1, Sq - 1)]
    if math.isinf(fill):
        assert all(out[b, :, i].isnan().all() and lse[b, :, i].isneginf().all() for b, i in rows)
    else:
        assert not out.isnan().any()
        _assert_rows_are_v_mean(out, lse, v, rows, Hq, Sk, fill)


def test_additive_fill_mask_rows_are_v_mean(device):
    # HF: a finfo.min bias under a finfo.min fill; rows of only finfo.min scores are the mean of v (max <= fill/2)
    B, Hq, Sq, Sk = 2, 4, 3, 97
    q, k, v = _qkv(B, Hq, 1, Sq, Sk, 32, FP16, device)
    keep = _empty_row_mask(B, Sq, Sk, device)
    bias = torch.zeros(keep.shape, device=device).masked_fill(~keep, FP32_MIN)
    out, lse = _check(q, k, v, bias, mask_fill=FP32_MIN, window_right=Sk - Sq, num_splits=5)
    _assert_rows_are_v_mean(out, lse, v, [(0, 0), (1, Sq - 1)], Hq, Sk, FP32_MIN)


# ----------------------------------------------------------------------------------------------
# softcap, sinks, strides
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_softcap(dtype, device):
    q, k, v = _qkv(1, 8, 2, 4, 150, 64, dtype, device, "bshd")
    _check(q, k, v, scale=0.5, softcap=15.0, window_right=146, num_splits=3)
    mask = _left_padding([120], 150, device)
    _check(q, k, v, mask, scale=0.5, softcap=15.0, window_left=_sliding(4, 150, 30)[0], window_right=146, num_splits=2)


@triton.jit
def _tanh_kernel(X, Y, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    ok = offs < N
    tl.store(Y + offs, flash_decode._tanh(tl.load(X + offs, mask=ok, other=0.0)), mask=ok)


def test_tanh_is_accurate_for_small_arguments(device):
    # 1 - 2 / (exp(2x) + 1) is ~1.2e-7 off whatever x is: 1e-3 relative at x = 1e-4. Within 4 ulp here.
    x = torch.cat([torch.logspace(-8, 0, 200), torch.linspace(0.5, 20, 100), torch.tensor([0.0])])
    x = torch.cat([x, -x]).to(device)
    y = torch.empty_like(x)
    _tanh_kernel[(1,)](x, y, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    ref = torch.tanh(x.double())
    rel = ((y.double() - ref).abs() / ref.abs().clamp_min(1e-30))[ref != 0]
    assert rel.max() <= 4 * 2.0**-24, f"max relative error {rel.max():.3e}"
    assert torch.equal(y[x == 0], x[x == 0])


def test_softcap_50_with_small_scores(device):
    # Gemma 2's cap: every s / 50 is small, where the old tanh lost 2-3 digits; fp32 must stay within 2x eager
    q, k, v = _qkv(1, 8, 2, 2, 300, 64, FP32, device)
    kw = {"scale": 0.05, "softcap": 50.0, "window_right": 298}
    out, lse = flash_decode_forward(q, k, v, num_splits=3, **kw)
    ref, ref_lse = attention_ref(q, k, v, upcast=True, **kw)
    low, low_lse = attention_ref(q, k, v, upcast=False, **kw)
    err, eager = (out.double() - ref).abs().max(), (low.double() - ref).abs().max()
    assert err <= 2 * eager + 1e-7, f"out error {err:.3e} vs eager {eager:.3e}"
    lerr, leager = (lse.double() - ref_lse.double()).abs().max(), (low_lse.double() - ref_lse.double()).abs().max()
    assert lerr <= 2 * leager + 1e-7, f"lse error {lerr:.3e} vs eager {leager:.3e}"


@pytest.mark.parametrize("kind", [None, "bool", "add-bf16"])
def test_sinks(kind, device):
    B, Hq, Hkv, Sq, Sk = 2, 4, 2, 3, 131
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, 32, BF16, device)
    sinks = (torch.randn(Hq, device=device) * 2).to(BF16)
    mask = None
    if kind is not None:
        keep = _empty_row_mask(B, Sq, Sk, device)
        mask = keep if kind == "bool" else torch.zeros(keep.shape, device=device).masked_fill(~keep, FP32_MIN).to(BF16)
    out, lse = _check(q, k, v, mask, sinks=sinks, mask_fill=FP32_MIN, window_right=Sk - Sq, num_splits=3)
    assert not out.isnan().any() and lse.isfinite().all()
    if kind == "bool":  # rule 8: rows with nothing kept are 0, lse is the sink
        assert torch.equal(out[0, :, 0].float(), torch.zeros(Hq, 32))
        torch.testing.assert_close(lse[0, :, 0], sinks.float(), atol=1e-6, rtol=0)  # via base 2


def test_neg_inf_sink_is_no_sink(device):
    q, k, v = _qkv(2, 2, 1, 3, 77, 32, FP32, device)
    keep = _empty_row_mask(2, 3, 77, device)
    sinks = torch.full((2,), float("-inf"), device=device)
    out, lse = flash_decode_forward(q, k, v, keep, scale=0.2, sinks=sinks, num_splits=3)
    ref, ref_lse = flash_decode_forward(q, k, v, keep, scale=0.2, num_splits=3)
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.nan_to_num(), ref.nan_to_num())
    assert torch.equal(lse, ref_lse)


def test_arbitrary_strides(device):
    # q a slice of a wider tensor; k with a stride-0 batch; v with the head dim not innermost
    B, Hq, Hkv, Sq, Sk, D = 2, 4, 2, 3, 90, 32
    q = torch.randn(B, Hq, Sq, 2 * D, dtype=FP16, device=device)[..., D:]
    k = torch.randn(1, Hkv, Sk, D, dtype=FP16, device=device).expand(B, Hkv, Sk, D)
    v = torch.randn(B, Hkv, D, Sk, dtype=FP16, device=device).transpose(-1, -2)
    _check(q, k, v, window_left=_sliding(Sq, Sk, 33)[0], window_right=Sk - Sq, num_splits=2)


def test_value_head_dim_differs(device):
    q, k, _ = _qkv(1, 4, 2, 2, 70, 32, FP16, device)
    v = torch.randn(1, 2, 70, 96, dtype=FP16, device=device)
    _check(q, k, v, window_right=68, num_splits=2)


def test_empty_query(device):
    q, k, v = _qkv(1, 2, 1, 0, 300, 32, FP16, device)
    out, lse = flash_decode_forward(q, k, v, scale=0.1)
    assert out.shape == (1, 2, 0, 32) and lse.shape == (1, 2, 0)


# ----------------------------------------------------------------------------------------------
# choose_splits, supports, argument validation
# ----------------------------------------------------------------------------------------------


def test_choose_splits():
    # H100: 132 SMs; Hq=32/Hkv=8, Sq=1 -> 8 programs a batch element; the rule aims at 4 programs per SM with
    # at least 256 keys a split (the measured shapes of bench/decode.py --quick)
    assert choose_splits(8, 4096, 132) == 16  # B=1, 4k: 66 wanted, capped by 256-key chunks (not 32 of 128)
    assert choose_splits(8, 32768, 132) == 66  # B=1, 32k
    assert choose_splits(128, 4096, 132) == 5  # B=16, 4k: more than the 3 that left a half-empty tail wave
    assert choose_splits(128, 4096, 132) * 128 >= 4 * 132
    assert choose_splits(128, 32768, 132) == 5
    assert choose_splits(512, 32768, 132) == 2  # B=64
    assert choose_splits(1056, 32768, 132) == 1  # B=132: the batch fills the GPU alone
    assert choose_splits(8, 200, 132) == 1  # fewer keys than one chunk
    assert choose_splits(8, 0, 132) == 1
    assert choose_splits(1, 1 << 20, 132) == flash_decode.MAX_SPLITS
    for programs in (1, 8, 64, 128, 512):
        for kv_len in (256, 1000, 4096, 32768):
            ns = choose_splits(programs, kv_len, 132)
            assert 1 <= ns <= flash_decode.MAX_SPLITS and (ns == 1 or kv_len // ns >= flash_decode.MIN_CHUNK)


def test_plan_at_the_measured_shapes(monkeypatch):
    # the whole plan (chunks rounded to BLOCK_N = 64), as the launcher makes it on a 132-SM GPU
    monkeypatch.setattr(flash_decode, "_sm_count", lambda device: 132)
    cfg = flash_decode.DecodeConfig(64, 64, 4, 3)
    for B, Sk, splits, chunk in [(1, 4096, 16, 256), (16, 4096, 5, 832), (1, 32768, 64, 512), (16, 32768, 5, 6592)]:
        pl = flash_decode._plan(cfg, B, 8, 4, 1, Sk, 1, Sk - 1, None, torch.device("cpu"))
        assert (pl.num_splits, pl.chunk, pl.m_blocks, pl.block_m) == (splits, chunk, 1, 16), (B, Sk, pl)


def test_sm_count_is_cached(monkeypatch):
    calls = []

    class Props:
        multi_processor_count = 132

    def props(device):
        calls.append(device)
        return Props()

    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    flash_decode._sm_count.cache_clear()
    try:
        dev = torch.device("cuda", 0)
        assert [flash_decode._sm_count(dev) for _ in range(3)] == [132] * 3
        assert len(calls) == 1
    finally:
        flash_decode._sm_count.cache_clear()


# ----------------------------------------------------------------------------------------------
# host path: a known call key skips validation and planning, allocates three tensors
# ----------------------------------------------------------------------------------------------


def _counted(counts, name, fn):
    counts[name] = 0

    def wrapper(*args, **kwargs):
        counts[name] += 1
        return fn(*args, **kwargs)

    return wrapper


def _count_host_work(monkeypatch):
    counts = {}
    monkeypatch.setattr(flash_decode, "_validate", _counted(counts, "validate", flash_decode._validate))
    monkeypatch.setattr(flash_decode, "_plan", _counted(counts, "plan", flash_decode._plan))
    monkeypatch.setattr(torch, "empty", _counted(counts, "empty", torch.empty))
    return counts


@pytest.mark.parametrize("kind", [None, "bool", "add-fp32"])
def test_known_call_skips_validation_and_planning(kind, device, monkeypatch):
    B, Hq, Hkv, Sq, Sk = 2, 4, 2, 1, 300
    counts = _count_host_work(monkeypatch)
    mask = None
    if kind is not None:
        keep = _left_padding([300, 250], Sk, device)
        mask = keep if kind == "bool" else torch.zeros(keep.shape, device=device).masked_fill(~keep, FP32_MIN)
    kw = {"scale": 0.2, "window_right": Sk - Sq, "mask_fill": FP32_MIN, "num_splits": 3}
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, 32, FP32, device)
    flash_decode_forward(q, k, v, mask, **kw)
    assert counts["validate"] == 1 and counts["plan"] == 1
    counts.update(validate=0, plan=0, empty=0)
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, 32, FP32, device)  # same key, new data
    out, lse = flash_decode_forward(q, k, v, mask, **kw)
    assert counts == {"validate": 0, "plan": 0, "empty": 3}, counts  # out, lse, one workspace for the partials
    ref, ref_lse = attention_ref(q, k, v, mask, upcast=True, **{n: a for n, a in kw.items() if n != "num_splits"})
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse.double(), ref_lse.double(), atol=1e-5, rtol=0)
    # a new scalar is a new key: validated and planned again, and its value is used
    out2, _ = flash_decode_forward(q, k, v, mask, **{**kw, "scale": 0.4})
    assert counts["validate"] == 1 and counts["plan"] == 1
    ref2, _ = attention_ref(q, k, v, mask, upcast=True, scale=0.4, window_right=Sk - Sq, mask_fill=FP32_MIN)
    torch.testing.assert_close(out2.double(), ref2, atol=1e-5, rtol=0)


def test_known_call_host_time_is_a_fraction_of_the_first(device, monkeypatch):
    # the launcher's own CPU time, kernels stubbed out: a known key must cost well under a fresh one (which
    # validates, plans and builds the argument tuples). Medians over many calls; the ratio measured on the
    # CPU is ~0.1-0.2, so 0.5 leaves room for a loaded machine.
    import time

    monkeypatch.setattr(flash_decode, "_run", lambda *args: None)
    q, k, v = _qkv(1, 32, 8, 1, 4096, 128, BF16, device)
    mask = torch.ones(1, 1, 1, 4096, dtype=torch.bool, device=device)
    kw = {"scale": 0.088, "window_right": 4095, "mask_fill": FP32_MIN}

    def per_call(fresh: bool, calls: int) -> float:
        times = []
        for _ in range(calls):
            if fresh:
                flash_decode._LAUNCHES.clear()
            start = time.perf_counter()
            flash_decode_forward(q, k, v, mask, **kw)
            times.append(time.perf_counter() - start)
        return sorted(times)[calls // 2]

    flash_decode_forward(q, k, v, mask, **kw)
    first, known = per_call(True, 31), per_call(False, 201)
    assert known < 0.5 * first, f"known key {known * 1e6:.1f} us vs fresh {first * 1e6:.1f} us"


def test_forward_known_serves_only_keys_the_op_checked(device, monkeypatch):
    # the op's hot path: a key passed with op_checked=True is served without validation or planning; any other
    # key (unknown, planned without the op's check, or with num_splits) is a miss the op then handles as usual
    counts = _count_host_work(monkeypatch)
    B, Hq, Hkv, Sq, Sk = 1, 4, 2, 1, 300
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, 32, FP32, device)
    mask = torch.zeros(1, 1, 1, Sk, device=device).masked_fill(_left_padding([250], Sk, device), FP32_MIN)
    args = (q, k, v, mask, 0.2, None, Sk - Sq, FP32_MIN, 0.0, None)
    kw = {"scale": 0.2, "window_right": Sk - Sq, "mask_fill": FP32_MIN}
    assert flash_decode.forward_known(*args) is None  # unknown key
    flash_decode_forward(q, k, v, mask, **kw)
    assert flash_decode.forward_known(*args) is None  # planned, but not by the op
    flash_decode_forward(q, k, v, mask, num_splits=2, op_checked=True, **kw)
    assert flash_decode.forward_known(*args) is None  # num_splits is not the op's
    ref, ref_lse = flash_decode_forward(q, k, v, mask, op_checked=True, **kw)
    counts.update(validate=0, plan=0, empty=0)
    out, lse = flash_decode.forward_known(*args)
    assert counts == {"validate": 0, "plan": 0, "empty": 3}, counts
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
    # another scalar spelling or value is another key
    assert flash_decode.forward_known(q, k, v, mask, 0.2, None, float(Sk - Sq), FP32_MIN, 0.0, None) is None
    assert flash_decode.forward_known(q, k, v, mask, 0.3, None, Sk - Sq, FP32_MIN, 0.0, None) is None
    assert flash_decode.forward_known(None, k, v, mask, 0.2, None, Sk - Sq, FP32_MIN, 0.0, None) is None


def _op(q, k, v, mask, scale=None, window_left=None, fill=float("-inf"), dropout_p=0.0):
    """``torch.ops.flashfuse.attention`` as Inductor's code calls it (positional, under no_grad): ``(out, lse)``."""
    with torch.no_grad():
        out, lse, _ = torch.ops.flashfuse.attention.default(
            q, k, v, mask, scale, window_left, None, fill, 0.0, None, dropout_p
        )
    return out, lse


def test_op_decode_steps_read_their_new_data(device, monkeypatch):
    # the op on one decode key, call after call (the hot path where flashfuse/ops.py has it): each call computes
    # the decode kernel's result on its own data; arguments the op rejects are rejected however often the shapes
    # were seen; FLASHFUSE_DECODE=0 still sends the call elsewhere
    B, Hq, Hkv, Sq, Sk, D = 1, 8, 2, 1, 300, 32
    bf16_min = torch.finfo(BF16).min
    mask = torch.zeros(B, 1, 1, Sk, dtype=BF16, device=device).masked_fill(~_left_padding([280], Sk, device), bf16_min)
    for scale in (None, 0.3):
        for _ in range(3):
            q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, D, BF16, device, "bshd")
            out, lse = _op(q, k, v, mask, scale, fill=FP32_MIN)
            ref, ref_lse = flash_decode_forward(q, k, v, mask, scale=scale or D**-0.5, mask_fill=FP32_MIN)
            assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
    with pytest.raises(ValueError, match="dropout_p"):
        _op(q, k, v, mask, 0.3, fill=FP32_MIN, dropout_p=True)
    with pytest.raises(ValueError, match="dropout_p"):
        _op(q, k, v, mask, 0.3, fill=FP32_MIN, dropout_p=1.5)
    with pytest.raises(ValueError, match="mask"):
        _op(q, k, v, mask.to(torch.int32), 0.3, fill=FP32_MIN)
    calls = []
    monkeypatch.setattr(flash_decode, "_forward", lambda *a: calls.append(a))
    monkeypatch.setenv("FLASHFUSE_DECODE", "0")
    out, _ = _op(q, k, v, mask, 0.3, fill=FP32_MIN)
    assert not calls and out.shape == (B, Hq, Sq, D)


@pytest.mark.skipif(not hasattr(__import__("flashfuse.ops").ops, "_FLASH_DECODE"),
                    reason="flashfuse/ops.py has no decode hot path (flash_decode.forward_known) yet")  # fmt: skip
def test_op_hot_path_skips_the_checks(device, monkeypatch):
    # the second call of a key: no validation, no supports(), no planning -- the key, three allocations, launches
    from flashfuse import ops

    counts = _count_host_work(monkeypatch)
    for name in ("validate_attention_args", "_apply_probe"):
        monkeypatch.setattr(ops, name, _counted(counts, name, getattr(ops, name)))
    monkeypatch.setattr(flash_decode, "supports", _counted(counts, "supports", flash_decode.supports))
    q, k, v = _qkv(1, 8, 2, 1, 300, 32, FP16, device)
    mask = torch.zeros(1, 1, 1, 300, dtype=FP16, device=device)
    _op(q, k, v, mask, 0.2)
    assert counts["validate_attention_args"] == counts["supports"] == counts["plan"] == 1
    counts.update({name: 0 for name in counts})
    q2 = torch.randn_like(q)
    out, lse = _op(q2, k, v, mask, 0.2)
    # out, lse, the workspace, the op's empty rng_state; nothing else
    assert counts == dict.fromkeys(counts, 0) | {"empty": 4}, counts
    ref, ref_lse = flash_decode_forward(q2, k, v, mask, scale=0.2)
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse)


# ----------------------------------------------------------------------------------------------
# the fast launch: Triton's compiled handle, proven against Triton's own launch (any Triton, no GPU needed)
# ----------------------------------------------------------------------------------------------


class _FakeDriver:
    """Triton's active driver for the CPU: device 0, a made-up stream, an sm90 target (nothing is compiled)."""

    STREAM = 0xABC

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return self.STREAM

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)


class _FakeCompiled:
    """Stands in for Triton's ``CompiledKernel``: ``run`` (its launcher) records what it receives."""

    def __init__(self):
        self.calls = []
        self.function = 0x1234
        self.packed_metadata = (4, 1, 0)

    def run(self, *args):
        self.calls.append(args)

    def launch_metadata(self, grid, stream, *args):
        return {"grid": tuple(grid), "stream": stream, "args": args}


def _triton_kernels(monkeypatch):
    """``(jit, compiled)`` per decode kernel: a real ``JITFunction`` of the kernel's source whose compile step
    returns a ``_FakeCompiled``, under the fake driver. ``jit[grid](...)`` runs Triton's own launch path
    (``JITFunction.run``: binder, specialisation, cache key, ``kernel.run(...)``) up to the C launcher."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    monkeypatch.setattr(driver, "_active", _FakeDriver())
    kernels = {}
    for kernel in (flash_decode._decode_split, flash_decode._decode_merge):
        jit = JITFunction(kernel.fn)
        compiled = _FakeCompiled()

        def compile_(key, *args, jit=jit, compiled=compiled, **kwargs):
            return jit.device_caches[0][0].setdefault(key, compiled)  # what _do_compile caches and returns

        monkeypatch.setattr(jit, "_do_compile", compile_)
        kernels[kernel.fn.__name__] = (jit, compiled)
    return kernels


def _captured_launches(*call_args, **call_kw):
    """The (kernel, launch, which, grid, args, meta, aligned) of both launches of one flash_decode_forward call."""
    captured = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(flash_decode, "_run", lambda *a: captured.append(a))
        flash_decode_forward(*call_args, **call_kw)
    return captured


@pytest.mark.parametrize("kind", [None, "bool", "add-window", "sinks"])
def test_fast_launch_passes_what_triton_launch_passes(kind, device, monkeypatch):
    # For both kernels: what the handle gives CompiledKernel.run equals what Triton's JITFunction.run gives it
    # for the same call -- grid, stream, function, metadata, and every parameter (constexprs included), the same
    # objects in the same order. Launch hooks: none registered -> None (what Triton would call is an empty
    # chain); one registered -> exactly Triton's metadata and hooks.
    from triton import knobs

    B, Hq, Hkv, Sq, Sk = 2, 8, 2, 2, 300
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, 32, BF16, device, "bshd")
    mask, sinks, kw = None, None, {"scale": 0.2, "window_right": Sk - Sq}
    if kind == "bool":
        mask = _left_padding([300, 120], Sk, device)
    elif kind == "add-window":  # a window with a finite fill: the merge reads torch.mean(v) (vmean strides)
        mask = torch.zeros(B, 1, Sq, Sk, dtype=BF16, device=device)
        kw.update(window_left=_sliding(Sq, Sk, 64)[0], mask_fill=FP32_MIN)
    elif kind == "sinks":
        sinks = torch.randn(Hq, device=device)
    launches = _captured_launches(q, k, v, mask, sinks=sinks, **kw)
    kernels = _triton_kernels(monkeypatch)
    assert [c[0].fn.__name__ for c in launches] == ["_decode_split", "_decode_merge"]
    for kernel, _, _, grid, args, meta, aligned in launches:
        assert aligned or not flash_decode._FAST_LAUNCH or device == "cpu"
        jit, compiled = kernels[kernel.fn.__name__]
        assert jit[grid](*args, **meta) is compiled  # Triton's own launch
        handle = flash_decode._make_handle(jit, compiled, args, meta, 0)
        assert isinstance(handle, flash_decode._Handle), handle
        flash_decode._launch_handle(handle, grid, args)
        theirs, ours = compiled.calls
        assert len(ours) == len(theirs) == 9 + len(jit.arg_names)
        assert ours[:6] == theirs[:6] == (*grid, _FakeDriver.STREAM, 0x1234, (4, 1, 0))
        assert all(a is b for a, b in zip(ours[9:], theirs[9:])), kernel.fn.__name__
        assert ours[6:9] == (None, None, None)
        assert theirs[7] is knobs.runtime.launch_enter_hook and theirs[8] is knobs.runtime.launch_exit_hook

        def hook(metadata):
            return None

        knobs.runtime.launch_enter_hook.add(hook)
        try:
            flash_decode._launch_handle(handle, grid, args)
            jit[grid](*args, **meta)
        finally:
            knobs.runtime.launch_enter_hook.remove(hook)
        ours, theirs = compiled.calls[2:]
        assert ours[6] == theirs[6] and ours[7:9] == theirs[7:9] and theirs[7] is knobs.runtime.launch_enter_hook
        assert all(a is b for a, b in zip(ours[9:], theirs[9:]))


def test_fast_launch_specialisation_is_fixed_by_the_key(device, monkeypatch):
    # The handle serves every later call with its key: Triton's specialisation of those calls (what picks the
    # compiled kernel) must not change with the data. New tensors with the same key: the same specialisation;
    # a pointer that is not 16-byte aligned changes it, and _aligned says so (that call launches generically).
    kernels = _triton_kernels(monkeypatch)
    q, k, v = _qkv(1, 8, 2, 1, 300, 64, FP16, device)
    assert q.is_contiguous()
    first = _captured_launches(q, k, v, scale=0.125, window_right=299)
    base = torch.randn(q.numel() + 1, dtype=FP16, device=device)
    q2 = base[1:].view(q.shape)  # the same key, 2 bytes off alignment
    k2, v2 = torch.randn_like(k), torch.randn_like(v)
    again = _captured_launches(q2.clone(), k2, v2, scale=0.125, window_right=299)
    unaligned = _captured_launches(q2, k2, v2, scale=0.125, window_right=299)
    for (kernel, _, _, _, a1, meta, _), (_, _, _, _, a2, _, _), (_, _, which, _, a3, _, _) in zip(
        first, again, unaligned
    ):
        binder = kernels[kernel.fn.__name__][0].create_binder()[-1]  # Triton's binder for this kernel
        spec1, spec2, spec3 = (binder(*a, **meta)[1] for a in (a1, a2, a3))
        assert spec1 == spec2
        if which == flash_decode._SPLIT:  # q, and q again as the (absent) mask's pointer
            assert [i for i, (x, y) in enumerate(zip(spec1, spec3)) if x != y] == [0, 3]
            assert not flash_decode._aligned(*[t for t in a3 if isinstance(t, torch.Tensor)])
        else:  # the merge reads only fresh allocations
            assert spec3 == spec1


class _CurrentDevice:
    def __init__(self, index=0):
        self.index = index
        self.guards = 0

    def __call__(self):
        return self.index

    def guard(self, device):
        self.guards += 1
        return contextlib.nullcontext()


def test_run_uses_the_handle_and_falls_back(device, monkeypatch):
    # _run's decisions, with a launch marked CUDA and Triton's launch path faked (no GPU): the first call
    # launches generically and makes the handle, later aligned calls use it, an unaligned call or another
    # current device launches generically, a handle that raises is dropped for its key (generic from then on)
    q, k, v = _qkv(1, 4, 2, 1, 300, 32, FP32, device)
    split = _captured_launches(q, k, v, scale=0.2)[0]
    kernels = _triton_kernels(monkeypatch)
    _, launch, which, grid, args, meta, _ = split
    jit, compiled = kernels["_decode_split"]
    current = _CurrentDevice(0)
    monkeypatch.setattr(flash_decode, "_current_device", current)
    monkeypatch.setattr(torch.cuda, "device", current.guard)
    launch = replace(launch, device=torch.device("cuda", 0), fast=True, handles=[None, None])
    generic_calls = []
    real_run = jit.run

    def counted_run(*a, **kw):  # kernel[grid](...) is kernel.run(..., grid=grid, warmup=False)
        generic_calls.append(kw["grid"])
        return real_run(*a, **kw)

    monkeypatch.setattr(jit, "run", counted_run)

    flash_decode._run(jit, launch, which, grid, args, meta, True)
    assert len(generic_calls) == 1 and isinstance(launch.handles[which], flash_decode._Handle)
    flash_decode._run(jit, launch, which, grid, args, meta, True)
    assert len(generic_calls) == 1 and len(compiled.calls) == 2 and compiled.calls[1][6:9] == (None, None, None)
    flash_decode._run(jit, launch, which, grid, args, meta, False)  # unaligned: generic, the handle stays
    assert len(generic_calls) == 2 and isinstance(launch.handles[which], flash_decode._Handle)
    current.index = 1  # another device is current: generic under a guard
    flash_decode._run(jit, launch, which, grid, args, meta, True)
    assert len(generic_calls) == 3 and current.guards == 1 and len(compiled.calls) == 4
    current.index = 0

    def broken(*a):
        raise TypeError("function takes exactly 60 arguments")

    launch.handles[which] = replace(launch.handles[which], run=broken)
    flash_decode._run(jit, launch, which, grid, args, meta, True)
    assert len(generic_calls) == 4 and launch.handles[which] is False
    flash_decode._run(jit, launch, which, grid, args, meta, True)
    assert len(generic_calls) == 5 and len(compiled.calls) == 6  # generic from now on; every call launched once


@pytest.mark.parametrize("what", ["pre-run hook", "no device_caches", "other binder", "no function"])
def test_no_handle_where_triton_is_not_as_expected(what, device, monkeypatch):
    # any Triton that does not look like 3.6..3.9 inside, or a kernel with a pre-run hook: no handle (the generic
    # launch, which is always right), never an exception
    q, k, v = _qkv(1, 4, 2, 1, 300, 32, FP32, device)
    _, _, _, grid, args, meta, _ = _captured_launches(q, k, v, scale=0.2)[0]
    jit, compiled = _triton_kernels(monkeypatch)["_decode_split"]
    jit[grid](*args, **meta)
    if what == "pre-run hook":
        jit.add_pre_run_hook(lambda *a, **kw: None)
    elif what == "no device_caches":
        monkeypatch.delattr(jit, "device_caches")
    elif what == "other binder":  # a binder that binds the parameters in another order
        cache = jit.device_caches[0]
        binder = cache[-1]

        def reordered(*a, **kw):
            bound, spec, options = binder(*a, **kw)
            names = list(bound)
            names[5], names[6] = names[6], names[5]
            return {n: bound[n] for n in names}, spec, options

        monkeypatch.setitem(jit.device_caches, 0, (*cache[:-1], reordered))
    else:
        compiled.function = None
    assert flash_decode._make_handle(jit, compiled, args, meta, 0) is False


def test_known_shapes_still_reject_bad_scalars(device):
    q, k, v = _qkv(1, 4, 2, 1, 300, 16, FP16, device)
    flash_decode_forward(q, k, v, scale=0.25)
    with pytest.raises(ValueError, match="scale"):
        flash_decode_forward(q, k, v, scale=float("nan"))
    with pytest.raises(ValueError, match="num_splits"):
        flash_decode_forward(q, k, v, scale=0.25, num_splits=True)  # hashes like 1: the key holds the type
    with pytest.raises(ValueError, match="q: expected a torch.Tensor"):
        flash_decode_forward(None, k, v, scale=0.25)


def test_window_with_finite_fill_takes_the_mean_per_call(device):
    # the windowed rule-6 path computes torch.mean(v) per call: a cached launch must not keep an old v's mean
    Sq, Sk = 2, 300
    q, k, v = _qkv(1, 4, 2, Sq, Sk, 32, FP32, device)
    keep = torch.zeros(1, 1, Sq, Sk, dtype=torch.bool, device=device)  # every row empty -> mean of v
    kw = {"scale": 0.2, "window_left": _sliding(Sq, Sk, 40)[0], "window_right": Sk - Sq, "mask_fill": -1e4}
    flash_decode_forward(q, k, v, keep, num_splits=2, **kw)
    v2 = torch.randn_like(v)
    out, _ = flash_decode_forward(q, k, v2, keep, num_splits=2, **kw)
    ref, _ = attention_ref(q, k, v2, keep, upcast=True, **kw)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


def test_supports(device):
    q, k, v = _qkv(1, 8, 2, 4, 512, 64, BF16, device)
    assert supports(q, k, v) is None
    assert (
        supports(
            q,
            k,
            v,
            torch.ones(1, 1, 1, 512, dtype=torch.bool, device=device),
            sinks=torch.zeros(8),
            softcap=30.0,
            window_left=-100,
            window_right=508,
        )
        is None
    )
    assert "Sq = 17" in supports(torch.randn(1, 8, 17, 64, dtype=BF16), k, v)
    assert "Sk = 200" in supports(q, k[:, :, :200], v[:, :, :200])
    assert "dropout" in supports(q, k, v, dropout_p=0.1)
    assert "dtype" in supports(q.double(), k.double(), v.double())
    assert "4-D" in supports(q[0], k, v)


@pytest.mark.parametrize(
    "override,match",
    [
        ({"q": torch.zeros(2, 3, 16)}, r"q: expected 4-D"),
        (
            {"k": torch.zeros(1, 3, 300, 16, dtype=FP16), "v": torch.zeros(1, 3, 300, 16, dtype=FP16)},
            r"Hq \(4\) must be a multiple of Hkv \(3\)",
        ),
        ({"mask": torch.ones(4, 3, dtype=torch.bool)}, r"mask: shape"),
        ({"num_splits": 0}, r"num_splits"),
        ({"num_splits": 2.0}, r"num_splits"),
        ({"sinks": torch.zeros(3)}, r"sinks: expected shape"),
    ],
    ids=["q-3d", "gqa", "mask-shape", "splits-0", "splits-float", "sinks"],
)
def test_bad_arguments_raise_value_error(override, match, device):
    args = {
        "q": torch.zeros(1, 4, 2, 16, dtype=FP16),
        "k": torch.zeros(1, 2, 300, 16, dtype=FP16),
        "v": torch.zeros(1, 2, 300, 16, dtype=FP16),
        "mask": None,
        "scale": 0.25,
    }
    args.update(override)
    args = {name: a.to(device) if isinstance(a, torch.Tensor) else a for name, a in args.items()}
    q, k, v, mask = args.pop("q"), args.pop("k"), args.pop("v"), args.pop("mask")
    with pytest.raises(ValueError, match=match):
        flash_decode_forward(q, k, v, mask, **args)


# ----------------------------------------------------------------------------------------------
# the benchmark, at tiny sizes (CPU smoke test)
# ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU smoke test; on a GPU run bench/decode.py itself")
def test_bench_smoke(capsys):
    spec = importlib.util.spec_from_file_location("bench_decode", ROOT / "bench" / "decode.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "copy bandwidth" in out and "| decode GB/s |" in out and "| graph us | graph % |" in out
    rows = [line for line in out.splitlines() if line.startswith("| bf16 ")]
    assert len(rows) == 2 and all("ok" in r for r in rows), out


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU smoke test; on a GPU run bench/decode.py --host itself")
def test_bench_host_smoke(capsys):
    # the host-time breakdown on the CPU (kernels stubbed): every row has a number, and _run is restored after
    spec = importlib.util.spec_from_file_location("bench_decode", ROOT / "bench" / "decode.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    run = flash_decode._run
    assert bench.main(["--device", "cpu", "--host"]) == 0
    assert flash_decode._run is run
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in out.splitlines() if line.count("|") == 3}
    assert "torch.ops.flashfuse.attention (the op as Inductor calls it)" in rows, out
    assert "the op's body with its hot path (forward_known first)" in rows, out
    numbers = [v for k, v in rows.items() if k != "host time of" and not v.startswith("-")]
    assert len(numbers) >= 8 and all(float(v) > 0 for v in numbers), out


# ----------------------------------------------------------------------------------------------
# GPU: long caches (the float64 reference is [B, Hq, Sq, Sk]: 1 x 32 x 16 x 32768 x 8 B = 134 MB)
# ----------------------------------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("sk", [4096, 16384, 32768])
@pytest.mark.parametrize("sq", [1, 4, 16])
@pytest.mark.parametrize("dtype", [BF16, FP16])
@pytest.mark.parametrize("b", [1, 4])
def test_gpu_long_cache(b, dtype, sq, sk):
    q, k, v = _qkv(b, 32, 8, sq, sk + 3, 128, dtype, "cuda", "bshd")
    _check(q, k, v, window_right=sk + 3 - sq)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("num_splits", [None, 1, 7, 128])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_gpu_padding_and_window(d, num_splits):
    B, Sq, Sk = 3, 4, 8191
    q, k, v = _qkv(B, 16, 2, Sq, Sk, d, BF16, "cuda")
    keep = _left_padding([Sk, 5000, 17], Sk, "cuda")
    bias = torch.zeros(keep.shape, device="cuda").masked_fill(~keep, FP32_MIN)
    _check(q, k, v, bias, mask_fill=FP32_MIN, window_right=Sk - Sq, num_splits=num_splits)
    _check(q, k, v, keep, window_left=_sliding(Sq, Sk, 4096)[0], window_right=Sk - Sq, num_splits=num_splits)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [FP32, FP16])
def test_gpu_mqa_softcap_sinks(dtype):
    q, k, v = _qkv(2, 64, 1, 16, 5000, 64, dtype, "cuda")
    _check(q, k, v, softcap=30.0, sinks=torch.randn(64, device="cuda"), window_right=5000 - 16)


@pytest.mark.gpu
@needs_gpu
def test_gpu_fast_launch_is_on_and_matches_the_generic_launch(monkeypatch):
    # On this GPU's Triton: the handles are made for both kernels (_make_handle's proof held), later calls of the
    # key read their new data through them, and the results are bitwise those of Triton's generic launch (the
    # same compiled kernels). A q that is not 16-byte aligned launches generically (Triton specialises on
    # alignment) and is right too.
    assert flash_decode._FAST_LAUNCH, "FLASHFUSE_DECODE_FAST_LAUNCH=0 in the environment"
    B, Hq, Hkv, Sq, Sk, D = 2, 32, 8, 1, 4096, 128
    kw = {"scale": D**-0.5, "window_right": Sk - Sq}
    for offset in (0, 1):
        for _ in range(3):
            base = torch.randn(B * Hq * Sq * D + offset, dtype=BF16, device="cuda")
            q = base[offset:].view(B, Hq, Sq, D)
            k = torch.randn(B, Hkv, Sk, D, dtype=BF16, device="cuda")
            v = torch.randn(B, Hkv, Sk, D, dtype=BF16, device="cuda")
            out, lse = flash_decode_forward(q, k, v, **kw)
            (launch,) = flash_decode._LAUNCHES.values()
            assert launch.fast and all(isinstance(h, flash_decode._Handle) for h in launch.handles), launch.handles
            with pytest.MonkeyPatch.context() as mp:  # the same call through Triton's generic launch
                mp.setattr(flash_decode, "_LAUNCHES", {})
                mp.setattr(flash_decode, "_FAST_LAUNCH", False)
                gen, gen_lse = flash_decode_forward(q, k, v, **kw)
                assert not next(iter(flash_decode._LAUNCHES.values())).fast
            assert torch.equal(out, gen) and torch.equal(lse, gen_lse)
            ref, ref_lse = flash_attention_forward(q, k, v, **kw)
            torch.testing.assert_close(out, ref, atol=2e-2, rtol=0)
            torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=0)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.xfail(not hasattr(__import__("flashfuse.ops").ops, "_FLASH_DECODE"), strict=False,
                   reason="flashfuse/ops.py probes each new mask (a host sync) before choosing flash_decode")  # fmt: skip
def test_gpu_decode_steps_never_sync():
    # a decode step through the op, as generate runs it: a new mask tensor each step, the same key; after the
    # first step (which may plan and compile), no call may synchronize with the device
    q, k, v = _qkv(1, 32, 8, 1, 4096, 128, BF16, "cuda", "bshd")
    mask = torch.zeros(1, 1, 1, 4096, dtype=BF16, device="cuda")
    _op(q, k, v, mask.clone(), 0.088)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            _op(torch.randn_like(q), k, v, mask.clone(), 0.088)
            flash_decode_forward(q, k, v, mask, scale=0.088)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.gpu
@needs_gpu
def test_gpu_fast_launch_host_time(monkeypatch):
    # the launcher's host time for a known key, fast launch vs Triton's generic launch (both kernels launched;
    # printed, and the handles must be the cheaper: bench/decode.py --host has the full breakdown)
    import time

    monkeypatch.setattr(torch, "empty", torch._C._VariableFunctions.empty)  # no NaN poisoning: real allocations
    q, k, v = _qkv(1, 32, 8, 1, 4096, 128, BF16, "cuda")
    mask = torch.zeros(1, 1, 1, 4096, dtype=BF16, device="cuda")
    kw = {"scale": 0.088, "mask_fill": FP32_MIN}

    def per_call(calls=200):
        flash_decode_forward(q, k, v, mask, **kw)
        torch.cuda.synchronize()
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            flash_decode_forward(q, k, v, mask, **kw)
            times.append(time.perf_counter() - start)
        torch.cuda.synchronize()
        return sorted(times)[calls // 2] * 1e6

    fast = per_call()
    flash_decode._LAUNCHES.clear()
    monkeypatch.setattr(flash_decode, "_FAST_LAUNCH", False)
    generic = per_call()
    print(f"flash_decode_forward host time: fast launch {fast:.1f} us, generic launch {generic:.1f} us")
    assert fast < generic
