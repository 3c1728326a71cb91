"""8-bit attention (issue 6), the CPU-testable part: quantization, the Hadamard rotation, the torch model of
``flash_fwd_fp8`` and the accuracy claims of ``flashfuse/fp8.py``'s NOTE (``bench/fp8_accuracy.py`` prints them)."""

from __future__ import annotations

import importlib.util
import math
import pathlib

import pytest
import torch

from flashfuse import fp8
from flashfuse.fp8 import (
    E4M3_MAX,
    SCHEME_BOUNDS,
    SCHEMES,
    Fp8Scheme,
    dequantize,
    fp8_attention_emulated,
    hadamard_matrix,
    quantize_e4m3,
    quantize_qk,
    quantize_v,
    relative_rms_error,
    resolve_scheme,
)
from flashfuse.testing import attention_ref

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _ref(q, k, v, causal=False, scale=None):
    return attention_ref(q.double(), k.double(), v.double(), scale=scale, window_right=0 if causal else None)[0]


# ----------------------------------------------------------------------------------------------
# the rotation and the quantizers
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [16, 64, 128, 256])
def test_hadamard_is_a_signed_orthogonal_matrix_and_preserves_qk(d):
    r = hadamard_matrix(d)
    assert set(r.unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(r @ r.T, d * torch.eye(d))
    assert torch.equal(r, hadamard_matrix(d, torch.bfloat16).float())  # ±1 is exact in every float dtype
    q, k = torch.randn(2, 5, d, dtype=torch.float64), torch.randn(2, 7, d, dtype=torch.float64)
    rd = r.double()
    torch.testing.assert_close((q @ rd) @ (k @ rd).transpose(-2, -1) / d, q @ k.transpose(-2, -1))
    assert set(r[:, 0].tolist()) == {-1.0, 1.0}  # the random signs (column 0 of plain H is all ones)


def test_hadamard_needs_a_power_of_two():
    with pytest.raises(ValueError, match="d: "):
        hadamard_matrix(80)


@pytest.mark.parametrize("hadamard", [True, False])
def test_int8_rows_round_to_the_nearest_step_of_their_own_scale(hadamard):
    x = torch.randn(2, 3, 50, 64) * torch.rand(2, 3, 50, 1) * 10
    x8, scale = quantize_qk(x, "int8", hadamard=hadamard)
    assert x8.dtype == torch.int8 and scale.shape == (2, 3, 50) and scale.dtype == torch.float32
    y = x @ hadamard_matrix(64) if hadamard else x
    torch.testing.assert_close(scale, y.abs().amax(-1) / 127)
    assert x8.abs().amax(-1).eq(127).all()  # each row's largest value lands on the grid's end
    err = (x8.float() * scale[..., None] - y).abs()
    assert (err <= scale[..., None] / 2 * (1 + 1e-5)).all()  # half a step


def test_e4m3_rows_round_to_half_an_ulp():
    x = torch.randn(1, 2, 64, 128)
    x8, scale = quantize_qk(x, "e4m3")
    assert x8.dtype == torch.float8_e4m3fn
    y = x @ hadamard_matrix(128)
    back = x8.float() * scale[..., None]
    normal = (y / scale[..., None]).abs() >= 2.0**-6
    assert ((back - y).abs() / y.abs())[normal].max() <= 2.0**-4 + 1e-6
    assert x8.float().abs().amax(-1).eq(E4M3_MAX).all()


def test_zero_rows_and_channels_count_as_amax_1():
    """No division by zero: an all-zero row (channel) quantizes to zeros with the scale of amax = 1."""
    x = torch.zeros(1, 1, 8, 64)
    for kind, qmax in (("int8", 127), ("e4m3", E4M3_MAX)):
        x8, scale = quantize_qk(x, kind)
        assert torch.equal(scale, torch.full_like(scale, 1 / qmax)) and x8.float().abs().max() == 0
    v8, sv = quantize_v(x)
    assert torch.equal(sv, torch.full_like(sv, 1 / E4M3_MAX)) and v8.float().abs().max() == 0


def test_v_has_one_scale_per_channel():
    v = torch.randn(2, 3, 40, 64)
    v[..., 5] *= 1000
    v8, sv = quantize_v(v.bfloat16())
    assert v8.dtype == torch.float8_e4m3fn and sv.shape == (2, 3, 64)
    torch.testing.assert_close(sv, v.bfloat16().float().abs().amax(-2) / E4M3_MAX)
    back = v8.float() * sv[..., None, :]
    rel = ((back - v.bfloat16().float()).norm(dim=-2) / v.bfloat16().float().norm(dim=-2))
    assert rel.max() < 0.04  # every channel, the 1000x one and the others, at e4m3's ~2.4e-2


def test_plain_e4m3_round_trip_is_half_an_ulp():
    """The first measurement's quantizer (per-block / per-head / per-channel scales) kept for the table."""
    x = torch.randn(1, 2, 256, 64)
    for kw in ({"dim": -1, "block": 64}, {"dim": -1, "block": None}, {"dim": -2}):
        x8, scale = quantize_e4m3(x, **kw)
        back = dequantize(x8, scale)
        normal = (x / scale).abs() >= 2.0**-6
        assert ((back - x).abs() / x.abs())[normal].max().item() <= 2.0**-4 + 1e-6, kw


def test_round_e4m3_is_round_to_nearest_even_and_saturates():
    grid = torch.tensor([1.0, 1.125, 1.25, 240.0, 256.0, 448.0])
    mid = torch.tensor([1.0625, 1.1875, 248.0, 1000.0, -1000.0])  # ties go to the even mantissa
    assert fp8.round_e4m3(mid).float().tolist() == [1.0, 1.25, 256.0, 448.0, -448.0]
    assert torch.equal(fp8.round_e4m3(grid).float(), grid)


# ----------------------------------------------------------------------------------------------
# schemes
# ----------------------------------------------------------------------------------------------


def test_schemes_and_their_names():
    assert resolve_scheme(None) == SCHEMES[fp8.DEFAULT_SCHEME] == Fp8Scheme("int8", "input")
    assert resolve_scheme("fp8") == Fp8Scheme("e4m3", "e4m3") and SCHEMES["fp8"].name == "fp8"
    assert Fp8Scheme("int8", "input", hadamard=False).name == "qk=int8,pv=input,nohadamard"
    assert set(SCHEME_BOUNDS) == set(SCHEMES) and SCHEME_BOUNDS[fp8.DEFAULT_SCHEME] == 2e-2


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="scheme: expected one of"):
        resolve_scheme("fp4")
    with pytest.raises(ValueError, match="scheme: qk"):
        Fp8Scheme("int4", "input")
    with pytest.raises(ValueError, match="scheme: pv"):
        Fp8Scheme("int8", "bf16")
    with pytest.raises(ValueError, match="x: expected"):
        quantize_qk(torch.randn(3, 4), "int8")
    with pytest.raises(ValueError, match="kind"):
        quantize_qk(torch.randn(1, 1, 4, 16), "int4")
    with pytest.raises(ValueError, match="v: expected"):
        quantize_v(torch.randn(3, 4))
    with pytest.raises(ValueError, match="x: expected"):
        quantize_e4m3(torch.randn(3, 4), dim=-1)
    with pytest.raises(ValueError, match="dim"):
        quantize_e4m3(torch.randn(1, 1, 4, 4), dim=0)
    with pytest.raises(ValueError, match="block"):
        quantize_e4m3(torch.randn(1, 1, 4, 4), dim=-1, block=0)


# ----------------------------------------------------------------------------------------------
# the model of the kernel: accuracy
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal,groups", [(False, 1), (True, 4)], ids=["full", "causal-gqa"])
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_each_scheme_on_gaussian_inputs(scheme, causal, groups):
    """Measured, not assumed (fp8.py's NOTE): the default scheme is under issue 6's 2e-2; the e4m3 ones are not
    and cannot be (each e4m3 rounding alone costs ~2.4e-2); all stay within their documented level; bf16 eager
    is better than all of them."""
    torch.manual_seed(0)
    B, H, S, D = 1, 4, 256, 128
    q = torch.randn(B, H, S, D, dtype=torch.bfloat16)
    k, v = (torch.randn(B, H // groups, S, D, dtype=torch.bfloat16) for _ in range(2))
    out = fp8_attention_emulated(q, k, v, causal=causal, scheme=scheme)
    ref = _ref(q, k, v, causal)
    low, _ = attention_ref(q, k, v, window_right=0 if causal else None, upcast=False)
    err, err_bf16 = relative_rms_error(out, ref), relative_rms_error(low, ref)
    assert out.dtype == q.dtype and out.shape == (B, H, S, D)
    assert err_bf16 < err <= SCHEME_BOUNDS[scheme], (err, err_bf16)
    if SCHEMES[scheme].qk == "e4m3" or SCHEMES[scheme].pv == "e4m3":
        assert err > 2e-2, err  # the NOTE's claim: an e4m3 operand alone exceeds the bound


def test_the_rotation_is_what_tames_outlier_channels():
    """4 key channels x20 + 5 (a shared offset, as LLM keys have): int8 needs the rotation; with it the default
    scheme stays under 2e-2."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 256, 128, dtype=torch.bfloat16) for _ in range(3))
    k[..., :4] = k[..., :4] * 20 + 5
    ref = _ref(q, k, v)
    with_h = relative_rms_error(fp8_attention_emulated(q, k, v, scheme="int8qk"), ref)
    without = relative_rms_error(fp8_attention_emulated(q, k, v, scheme=Fp8Scheme("int8", "input", False)), ref)
    assert with_h < 2e-2 < without / 2, (with_h, without)


def test_block_size_only_moves_which_max_p_is_rounded_against():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 200, 64, dtype=torch.float16) for _ in range(3))
    ref = _ref(q, k, v, causal=True)
    a = fp8_attention_emulated(q, k, v, causal=True, scheme="fp8", block_n=16)
    b = fp8_attention_emulated(q, k, v, causal=True, scheme="fp8", block_n=128)
    assert not torch.equal(a, b)
    assert relative_rms_error(a, b) < 0.5 * relative_rms_error(b, ref)
    for out in (a, b):
        assert relative_rms_error(out, ref) <= SCHEME_BOUNDS["fp8"]


def test_scale_argument_and_empty_rows_of_keys():
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 1, 33, 64, dtype=torch.bfloat16) for _ in range(3))
    out = fp8_attention_emulated(q, k, v, scale=0.05, causal=True)
    assert relative_rms_error(out, _ref(q, k, v, causal=True, scale=0.05)) < 2e-2
    assert not out.isnan().any()  # causal (j <= i): every row keeps key 0


def test_accuracy_table_runs_and_backs_the_note():
    """``bench/fp8_accuracy.py --quick``: the rows the NOTE quotes."""
    spec = importlib.util.spec_from_file_location("fp8_accuracy", ROOT / "bench" / "fp8_accuracy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = {label: errs for _, label, errs, _ in mod.measure(S=128, B=1, H=4, D=128)}
    assert "| part | scheme | gauss | outlier | k-outlier |" in mod.format_table(mod.measure(S=32, B=1, H=1, D=64),
                                                                             32, 1, 1, 64)
    for label in ("V e4m3 (per-channel scales)", "P e4m3 (p x 448)", "P e4m3 (p x 256)", "Q, K e4m3 (per-row scales)",
                  "K e4m3 only (Q exact)"):
        assert rows[label]["gauss"] > 2e-2, (label, rows[label])
    assert rows["P bf16"]["gauss"] < 3e-3
    assert rows["Q, K int8 (per-row) + Hadamard"]["gauss"] < 1.2e-2
    assert rows["int8qk (non-causal)"]["gauss"] < 2e-2 and rows["int8qk (causal, GQA 4/2)"]["gauss"] < 2e-2
    assert all(math.isfinite(e) for errs in rows.values() for e in errs.values())
