"""Tests for ``DecodeConfig.fused``: one launch, the last split program of each (b, hkv, row block) merges.

Every fused call here is checked twice: against the float64 reference (the numerics rule of test_flash_decode.py,
through its ``_check``: also flash_fwd's NaN / -inf patterns) and against the two-launch path on the same tiles
(the same partial states merged by `_decode_merge`: equal up to the order of float32 sums, an output ulp). After
every call the counter buffers must be all zero again (the next call, and a CUDA graph's replay, start from
that), and the call must have been one launch. The interpreter runs the programs one after another, so the
race itself (which program is last) is exercised by the ``gpu`` tests only; here the counting, the merge of
each row block, rule 6 (v sums per row block / the launcher's mean), sinks and the units are.
"""

from __future__ import annotations

import math
import pathlib
import warnings
from dataclasses import replace

import pytest
import torch

from flashfuse.kernels import flash_decode
from flashfuse.kernels.flash_decode import DecodeConfig, flash_decode_forward, parse_config
from flashfuse.testing import attention_ref
from tests.kernels.numerics import BF16, FP16, FP32, FP32_MIN, INTERPRETER_WARNINGS, seed_and_poison
from tests.kernels.test_flash_decode import (
    _assert_rows_are_v_mean,
    _captured_launches,
    _check,
    _CurrentDevice,
    _empty_row_mask,
    _left_padding,
    _qkv,
    _sliding,
    _triton_kernels,
)

ROOT = pathlib.Path(__file__).resolve().parents[2]
ENV = "FLASHFUSE_DECODE_CONFIG"

pytestmark = INTERPRETER_WARNINGS


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    seed_and_poison(monkeypatch)
    monkeypatch.setattr(flash_decode, "_LAUNCHES", {})
    monkeypatch.setattr(flash_decode, "_FITTED", {})
    monkeypatch.setattr(flash_decode, "TUNED", {})
    monkeypatch.setattr(flash_decode, "_COUNTERS", {})
    monkeypatch.setattr(flash_decode, "_KEPT_COUNTERS", [])
    monkeypatch.delenv(ENV, raising=False)


def _launched(monkeypatch) -> list:
    """Names of the kernels launched from now on (through flash_decode._run, which still launches them)."""
    names, real = [], flash_decode._run

    def run(kernel, *args):
        names.append(kernel.fn.__name__)
        return real(kernel, *args)

    monkeypatch.setattr(flash_decode, "_run", run)
    return names


def _assert_counters_zero():
    assert flash_decode._KEPT_COUNTERS, "no counter buffer was made"
    for buf in flash_decode._KEPT_COUNTERS:
        assert buf.dtype == torch.int32 and not buf.any(), buf.nonzero()


# an output ulp or two (the merge's float32 sums in another order), in q's dtype; lse in float32
_TOL = {FP32: 1e-5, FP16: 1e-3, BF16: 8e-3}


def _assert_same(fused, plain):
    (out, lse), (ref, ref_lse) = fused, plain
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(lse.isneginf(), ref_lse.isneginf())
    tol = _TOL[out.dtype]
    torch.testing.assert_close(out.nan_to_num(), ref.nan_to_num(), atol=tol, rtol=tol)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-6)


def _fused_vs_plain(monkeypatch, tiles, q, k, v, mask=None, *, scale=None, **kw):
    """The call fused (checked against the reference) and on the same tiles with two launches: both results."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    monkeypatch.setenv(ENV, tiles)
    flash_decode._LAUNCHES.clear()
    plain = flash_decode_forward(q, k, v, mask, scale=scale, **kw)
    monkeypatch.setenv(ENV, tiles + ",fused")
    flash_decode._LAUNCHES.clear()
    names = _launched(monkeypatch)
    fused = _check(q, k, v, mask, scale=scale, **kw)
    assert names == ["_decode_split"], names  # one launch: the merge is in it
    (launch,) = flash_decode._LAUNCHES.values()
    assert launch.fused and launch.plan.config.fused and launch.split_meta["FUSED"]
    assert launch.counter is not None and launch.counter.numel() >= launch.counter_numel
    _assert_counters_zero()
    _assert_same(fused, plain)
    return fused, plain, launch


# ----------------------------------------------------------------------------------------------
# shapes x GQA x band, two calls each
# ----------------------------------------------------------------------------------------------

CASES = [
    # B, Hq, Hkv, Sq, Sk, D, dtype, layout, num_splits, tiles
    (1, 2, 2, 1, 257, 64, FP16, "bhsd", 2, "32,16,1,1"),  # GQA 1, one query; a key past a multiple of the chunk
    (2, 4, 2, 3, 131, 32, BF16, "bshd", 5, "16,16,1,1"),  # GQA 2, odd Sk: the merge's chunks of 2 splits, masked
    (1, 8, 2, 4, 177, 80, FP32, "bhsd", 1, "32,16,1,1"),  # GQA 4, D = 80 padded; one split merges itself
    (1, 8, 1, 16, 97, 16, FP16, "bshd", 3, "16,16,1,1"),  # MQA: 128 packed rows -> 8 row blocks, 8 counters each
    (1, 4, 1, 7, 333, 32, FP32, "bhsd", 21, "16,16,1,1"),  # many splits: two chunks of 16 maxima
    (2, 6, 3, 13, 61, 32, FP16, "bhsd", 64, "32,16,1,1"),  # GQA 2 of 13 rows in two row blocks; 64 -> 4 splits
]


@pytest.mark.parametrize("window", ["causal", "sliding"])
@pytest.mark.parametrize(
    "case", CASES, ids=[f"B{c[0]}-H{c[1]}/{c[2]}-Sq{c[3]}-Sk{c[4]}-D{c[5]}-{str(c[6])[6:]}-ns{c[8]}" for c in CASES]
)
def test_fused_matches_reference_and_two_launches(case, window, device, monkeypatch):
    B, Hq, Hkv, Sq, Sk, D, dtype, layout, ns, tiles = case
    wl, wr = (None, Sk - Sq) if window == "causal" else _sliding(Sq, Sk, 40)
    for _ in range(2):  # the same key twice with new data: the counters start from zero again
        q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, D, dtype, device, layout)
        mask = _left_padding([Sk - 30 * b for b in range(B)], Sk, device)
        _, _, launch = _fused_vs_plain(monkeypatch, tiles, q, k, v, mask, window_left=wl, window_right=wr,
                                       num_splits=ns)  # fmt: skip
    assert launch.counter_numel == B * Hkv * launch.plan.m_blocks


@pytest.mark.parametrize("sq", range(1, 17))
def test_fused_every_query_length(sq, device, monkeypatch):
    # causal decode of 1..16 tokens, GQA 2 (2..32 packed rows: one or two row blocks of 16), three splits
    q, k, v = _qkv(1, 4, 2, sq, 67, 16, FP32, device)
    _fused_vs_plain(monkeypatch, "16,16,1,1", q, k, v, window_right=67 - sq, num_splits=3)


@pytest.mark.parametrize("num_splits", [1, 2, 7, 64])
def test_fused_num_splits_agree(num_splits, device, monkeypatch):
    # 203 keys in blocks of 16: 64 asked is 13 splits of one block; all agree with one split
    q, k, v = _qkv(2, 4, 1, 2, 203, 32, FP32, device)
    pad = torch.rand(2, 1, 1, 203, device=device) > 0.2
    (out, lse), _, _ = _fused_vs_plain(monkeypatch, "32,16,1,1", q, k, v, pad, scale=0.2, num_splits=num_splits)
    one, one_lse = flash_decode_forward(q, k, v, pad, scale=0.2, num_splits=1)
    torch.testing.assert_close(out, one, atol=1e-6, rtol=0)
    torch.testing.assert_close(lse, one_lse, atol=1e-6, rtol=0)
    # an all-False mask: every row empty in every split, NaN with the -inf fill
    none, none_lse = flash_decode_forward(q, k, v, torch.zeros_like(pad), scale=0.2, num_splits=num_splits)
    assert none.isnan().all() and none_lse.isneginf().all()
    _assert_counters_zero()


# ----------------------------------------------------------------------------------------------
# masks, rule 6, sinks, softcap
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bool", "add-fp32", "add-bf16"])
@pytest.mark.parametrize("fill", [-math.inf, FP32_MIN], ids=["neg-inf", "finfo-min"])
@pytest.mark.parametrize("window", ["full", "sliding"])  # rule 6's mean of v: the v sums / the launcher's mean
def test_fused_masks_and_empty_rows(kind, fill, window, device, monkeypatch):
    # GQA 8 of 3 rows at BLOCK_M = 16: 24 rows in two row blocks, so the v sums must be complete for both
    B, Hq, Hkv, Sq, Sk = 2, 16, 2, 3, 77
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, 16, FP32 if kind == "add-fp32" else BF16, device)
    keep = _empty_row_mask(B, Sq, Sk, device)
    if kind == "bool":
        mask = keep
    else:
        mdtype = FP32 if kind == "add-fp32" else BF16
        drop = -math.inf if math.isinf(fill) else torch.finfo(mdtype).min  # HF: finfo.min under a finfo.min fill
        mask = torch.randn(keep.shape, device=device).masked_fill(~keep, drop).to(mdtype)
    wl, wr = (None, Sk - Sq) if window == "full" else _sliding(Sq, Sk, 30)
    (out, lse), _, launch = _fused_vs_plain(monkeypatch, "16,16,1,1", q, k, v, mask, mask_fill=fill,
                                            window_left=wl, window_right=wr, num_splits=3)  # fmt: skip
    assert launch.plan.m_blocks == 2
    assert launch.split_meta["VSUM"] == (window == "full" and math.isfinite(fill))
    assert launch.vmean == (window == "sliding" and math.isfinite(fill))
    rows = [(0, 0), (1, Sq - 1)]
    if math.isinf(fill):
        assert all(out[b, :, i].isnan().all() and lse[b, :, i].isneginf().all() for b, i in rows)
    else:
        assert not out.isnan().any()
        _assert_rows_are_v_mean(out, lse, v, rows, Hq, Sk, fill)


def test_fused_vmean_is_taken_per_call(device, monkeypatch):
    # the windowed rule-6 path: the fused kernel reads this call's torch.mean(v), not a cached one
    Sq, Sk = 2, 300
    q, k, v = _qkv(1, 4, 2, Sq, Sk, 32, FP32, device)
    keep = torch.zeros(1, 1, Sq, Sk, dtype=torch.bool, device=device)  # every row empty -> mean of v
    kw = {"scale": 0.2, "window_left": _sliding(Sq, Sk, 40)[0], "window_right": Sk - Sq, "mask_fill": -1e4}
    monkeypatch.setenv(ENV, "16,16,1,1,fused")
    flash_decode_forward(q, k, v, keep, num_splits=2, **kw)
    v2 = torch.randn_like(v)
    out, lse = flash_decode_forward(q, k, v2, keep, num_splits=2, **kw)
    _assert_rows_are_v_mean(out, lse, v2, [(0, 0), (0, 1)], 4, Sk, -1e4)
    _assert_counters_zero()


@pytest.mark.parametrize("kind", [None, "bool", "add-bf16"])
def test_fused_sinks(kind, device, monkeypatch):
    B, Hq, Hkv, Sq, Sk = 2, 4, 2, 3, 131
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, 32, BF16, device)
    sinks = (torch.randn(Hq, device=device) * 2).to(BF16)
    mask = None
    if kind is not None:
        keep = _empty_row_mask(B, Sq, Sk, device)
        mask = keep if kind == "bool" else torch.zeros(keep.shape, device=device).masked_fill(~keep, FP32_MIN).to(BF16)
    (out, lse), _, _ = _fused_vs_plain(monkeypatch, "32,16,1,1", q, k, v, mask, sinks=sinks, mask_fill=FP32_MIN,
                                       window_right=Sk - Sq, num_splits=3)  # fmt: skip
    assert not out.isnan().any() and lse.isfinite().all()
    if kind == "bool":  # rule 8: rows with nothing kept are 0, lse is the sink
        assert torch.equal(out[0, :, 0].float(), torch.zeros(Hq, 32))
        torch.testing.assert_close(lse[0, :, 0], sinks.float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_fused_softcap(dtype, device, monkeypatch):
    q, k, v = _qkv(1, 8, 2, 4, 150, 64, dtype, device, "bshd")
    mask = _left_padding([120], 150, device)
    _fused_vs_plain(monkeypatch, "32,16,1,1", q, k, v, mask, scale=0.5, softcap=15.0, window_right=146,
                    num_splits=3)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# the counter buffer
# ----------------------------------------------------------------------------------------------


def test_counter_buffer_is_shared_grown_and_kept(device, monkeypatch):
    # one zeroed buffer per device, shared by the fused keys; a key that needs more entries gets a new, larger one
    # and the old one stays referenced (a CUDA graph may hold its address) and zero; no allocation per call
    monkeypatch.setattr(flash_decode, "_MIN_COUNTERS", 4)
    monkeypatch.setenv(ENV, "16,16,1,1,fused")
    kw = {"scale": 0.3, "window_right": 99, "num_splits": 3}
    shapes = [(1, 4, 2), (3, 8, 4), (1, 2, 1)]  # (B, Hq, Hkv), Sq = 1: 2, 12 and 1 counters
    args = [_qkv(B, Hq, Hkv, 1, 100, 16, FP32, device) for B, Hq, Hkv in shapes]
    flash_decode_forward(*args[0], **kw)
    (small,) = flash_decode._KEPT_COUNTERS
    assert small.numel() == 4 and flash_decode._COUNTERS[small.device] is small
    zeros, real_zeros = [], torch.zeros
    monkeypatch.setattr(torch, "zeros", lambda *a, **k: zeros.append(a) or real_zeros(*a, **k))
    flash_decode_forward(*args[1], **kw)
    big = flash_decode._COUNTERS[small.device]
    assert len(zeros) == 1 and big.numel() == 16
    assert [id(t) for t in flash_decode._KEPT_COUNTERS] == [id(small), id(big)]
    for _ in range(2):  # every key again with new data: no allocation, right results, all counters zero
        for i, (q, k, v) in enumerate(args):
            args[i] = q, k, v = torch.randn_like(q), torch.randn_like(k), torch.randn_like(v)
            out, lse = flash_decode_forward(q, k, v, **kw)
            ref, ref_lse = attention_ref(q, k, v, upcast=True, scale=0.3, window_right=99)
            torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
            torch.testing.assert_close(lse.double(), ref_lse.double(), atol=1e-5, rtol=0)
            _assert_counters_zero()
    assert len(zeros) == 1 and len(flash_decode._KEPT_COUNTERS) == 2
    counters = [launch.counter for launch in flash_decode._LAUNCHES.values()]
    assert [id(c) for c in counters] == [id(small), id(big), id(big)]  # a key keeps the buffer it started with


# ----------------------------------------------------------------------------------------------
# the config flag; the compile-failure fallback; the fast launch
# ----------------------------------------------------------------------------------------------


def test_parse_config_fused():
    cfg = parse_config("64,64,4,3,fused")
    assert cfg == DecodeConfig(64, 64, 4, 3, fused=True) and cfg.spec() == "64,64,4,3,fused"
    both = parse_config(" 16,32,8,2, fused ,k_rows")
    assert both == DecodeConfig(16, 32, 8, 2, k_rows=True, fused=True) and both.spec() == "16,32,8,2,k_rows,fused"
    assert parse_config(both.spec()) == both
    assert not parse_config("64,64,4,3").fused
    assert "fused" in flash_decode._KNOBS
    # no merge launch: its knobs make no sense with fused and are refused, in a spec and in the dataclass
    for bad in ("64,64,4,3,fused,pdl", "64,64,4,3,pdl,fused", "64,64,4,3,merge_wide,fused"):
        with pytest.raises(ValueError, match="fused has no merge launch"):
            parse_config(bad)
    for knob in ("pdl", "merge_wide"):
        with pytest.raises(ValueError, match="fused has no merge launch"):
            DecodeConfig(64, 64, 4, 3, fused=True, **{knob: True})
    with pytest.raises(ValueError, match="decode config"):
        parse_config("64,64,4,3,fusd")


def test_fused_plan_describes_the_flag(device, monkeypatch):
    monkeypatch.setenv(ENV, "16,16,1,1,k_rows,fused")
    q, k, v = _qkv(1, 4, 2, 1, 300, 32, FP32, device)
    pl = flash_decode.plan(q, k, v)
    assert pl.config.fused and pl.describe().endswith("k_rows fused (env)")


def test_fused_that_fails_to_compile_falls_back_to_two_launches(device, monkeypatch):
    # a fused entry this GPU or Triton cannot compile: one warning, the same tiles without knobs (two launches),
    # remembered for that config; the counters were never touched
    q, k, v = _qkv(1, 4, 2, 1, 300, 32, FP32, device)
    fused = DecodeConfig(16, 16, 1, 1, k_rows=True, fused=True)
    key = flash_decode.tuned_key(32, 4, 2, 2, 300)
    flash_decode.TUNED[key] = (fused, 3)
    names, real_run = [], flash_decode._run

    def run(kernel, launch, which, grid, args, meta, aligned):
        names.append(kernel.fn.__name__)
        if meta.get("FUSED"):
            raise RuntimeError("atom.acq_rel needs sm_70 (simulated)")
        return real_run(kernel, launch, which, grid, args, meta, aligned)

    monkeypatch.setattr(flash_decode, "_run", run)
    with pytest.warns(RuntimeWarning, match="16,16,1,1,k_rows,fused failed to compile"):
        _check(q, k, v, window_right=299)
    assert names == ["_decode_split", "_decode_split", "_decode_merge"]
    (launch,) = flash_decode._LAUNCHES.values()
    assert launch.plan.config == DecodeConfig(16, 16, 1, 1) and not launch.fused
    assert flash_decode._FITTED[(32, 32, FP32, None, q.device, fused)] == DecodeConfig(16, 16, 1, 1)
    assert all(not buf.any() for buf in flash_decode._KEPT_COUNTERS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check(q, k, v, window_right=299)  # remembered: no second warning


def test_fused_keeps_the_fast_launch(device, monkeypatch):
    # The one fused launch through Triton's own launch path (compile faked, as in test_flash_decode.py): the
    # compiled handle is proven for it (slot _SPLIT; no _MERGE launch), passes Triton's exact arguments, and
    # _run uses it for the next aligned call of the key
    monkeypatch.setenv(ENV, "16,16,1,1,fused")
    q, k, v = _qkv(1, 4, 2, 1, 300, 32, BF16, device)
    mask = torch.zeros(1, 1, 1, 300, dtype=BF16, device=device)
    launches = _captured_launches(q, k, v, mask, scale=0.2, window_left=_sliding(1, 300, 64)[0],
                                  window_right=299, mask_fill=FP32_MIN)  # fmt: skip
    ((kernel, launch, which, grid, args, meta, _),) = launches
    assert kernel.fn.__name__ == "_decode_split" and which == flash_decode._SPLIT and meta["FUSED"]
    assert launch.vmean and meta["FINITE_FILL"] and meta["NATURAL"]  # the launcher's mean of v and its strides
    jit, compiled = _triton_kernels(monkeypatch)["_decode_split"]
    assert jit[grid](*args, **meta) is compiled
    handle = flash_decode._make_handle(jit, compiled, args, meta, 0)
    assert isinstance(handle, flash_decode._Handle), handle
    assert len(handle.consts) == len(jit.arg_names) - len(args)
    flash_decode._launch_handle(handle, grid, args)
    theirs, ours = compiled.calls
    assert ours[:6] == theirs[:6] and all(a is b for a, b in zip(ours[9:], theirs[9:]))
    names = [n for n in jit.arg_names[: len(args)] if n in ("Counter", "VMean", "Sinks", "Out", "LSE")]
    assert names == ["Counter", "VMean", "Sinks", "Out", "LSE"]
    counter = args[jit.arg_names.index("Counter")]
    assert counter.dtype == torch.int32 and counter is launch.counter
    # _run on a launch marked CUDA: the first call launches generically and makes the handle in the split's slot,
    # the next one launches through it; the merge's slot is never used
    current = _CurrentDevice(0)
    monkeypatch.setattr(flash_decode, "_current_device", current)
    monkeypatch.setattr(torch.cuda, "device", current.guard)
    launch = replace(launch, device=torch.device("cuda", 0), fast=True, handles=[None, None])
    calls = len(compiled.calls)
    flash_decode._run(jit, launch, which, grid, args, meta, True)
    assert isinstance(launch.handles[flash_decode._SPLIT], flash_decode._Handle)
    flash_decode._run(jit, launch, which, grid, args, meta, True)
    assert len(compiled.calls) == calls + 2 and compiled.calls[-1][6:9] == (None, None, None)  # the handle's
    assert launch.handles[flash_decode._MERGE] is None and current.guards == 0


# ----------------------------------------------------------------------------------------------
# sm_90: what Triton makes of the semaphore (its real compiler with a stand-in driver, no GPU)
# ----------------------------------------------------------------------------------------------

_SM90_COMPILE = r"""
import os, re
os.environ.pop("TRITON_INTERPRET", None)
import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver


class Sm90:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


driver._active = Sm90()
from flashfuse.kernels import flash_decode as fd

fd._validate = lambda *a, **kw: None  # CPU tensors stand in for CUDA ones: only shapes and strides matter here
os.environ["FLASHFUSE_DECODE_CONFIG"] = "64,64,4,3,fused"
q = torch.randn(1, 32, 1, 128, dtype=torch.bfloat16)
k = torch.randn(1, 8, 4096, 128, dtype=torch.bfloat16)
captured = []
fd._run = lambda *a: captured.append(a)
fd.flash_decode_forward(q, k, torch.randn_like(k), scale=0.088, window_right=4095, num_splits=32, mask_fill=-1e30)
print(len(captured))
kernel, launch, which, grid, args, meta, _ = captured[0]
ptx = kernel.warmup(*args, grid=grid, **meta).asm["ptx"]
atom = ptx.index("atom.global")
after = ptx[atom:]
print(len(re.findall(r"atom\.global", ptx)), re.search(r"@%p\d+ atom\.global\.gpu\.acq_rel\.add\.u32", ptx) is not None)
print(ptx.rfind("bar.sync", 0, atom) > ptx.rfind("st.global", 0, atom))  # the barrier after the partial stores
print(len(re.findall(r"ld\.global\.cg", after)), len(re.findall(r"ld\.global(?!\.cg)", after)))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile and run the kernel")
def test_fused_semaphore_compiles_for_sm90(tmp_path):
    # One launch; ONE atom.global.gpu.acq_rel.add, predicated (Triton lowers a scalar atomic to one thread and
    # broadcasts its result), after a bar.sync that follows the partial stores; every global load of the merge
    # branch after it is ld.global.cg (through L2), none through L1
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run(
        [sys.executable, "-c", _SM90_COMPILE], capture_output=True, text=True, env=env, timeout=600, check=False
    )
    if run.returncode != 0 and "ptxas" in run.stderr and "not found" in run.stderr.lower():
        pytest.skip("no ptxas for this Triton")
    assert run.returncode == 0, run.stderr[-3000:]
    launches, atoms, barrier, loads = (line.split() for line in run.stdout.splitlines())
    assert launches == ["1"] and atoms == ["1", "True"] and barrier == ["True"], run.stdout
    assert int(loads[0]) > 0 and loads[1] == "0", run.stdout


# ----------------------------------------------------------------------------------------------
# GPU: the race itself (which program comes last), CUDA graphs
# ----------------------------------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU_CASES = [
    # B, Hq, Hkv, Sq, Sk, D, num_splits, mask_fill, sinks + softcap
    (1, 32, 8, 1, 4099, 128, None, -math.inf, False),  # the heuristic's 16 splits
    (1, 32, 8, 1, 32771, 128, 128, -math.inf, False),  # 128 programs race for each counter
    (4, 32, 8, 4, 8191, 128, 7, FP32_MIN, False),  # rule 6 from the v sums
    (2, 64, 1, 16, 5000, 64, None, FP32_MIN, False),  # MQA: 1024 packed rows, 16 row blocks with their own v sums
    (2, 64, 1, 16, 5000, 64, 32, -math.inf, True),
]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=[f"B{c[0]}-H{c[1]}/{c[2]}-Sq{c[3]}-ns{c[6]}" for c in GPU_CASES])
def test_gpu_fused_matches_two_launches(case, monkeypatch):
    # 12 calls back to back (no sync between them: each starts from the counters the last one left) on new data,
    # each equal to the two-launch result of the same tiles up to an output ulp; the first also against the
    # float64 reference; the counters all zero at the end; the one launch goes through the compiled handle
    B, Hq, Hkv, Sq, Sk, D, ns, fill, extra = case
    kw = {"scale": D**-0.5, "window_right": Sk - Sq, "mask_fill": fill, "num_splits": ns}
    if extra:
        kw.update(softcap=30.0, sinks=torch.randn(Hq, device="cuda"))
    mask = _left_padding([Sk - 1000 * b for b in range(B)], Sk, "cuda")
    inputs = [_qkv(B, Hq, Hkv, Sq, Sk, D, BF16, "cuda", "bshd") for _ in range(3)]
    inputs = [(torch.randn_like(inputs[i % 3][0]), *inputs[i % 3][1:]) for i in range(12)]
    monkeypatch.setenv(ENV, "64,64,4,3")
    plain = [flash_decode_forward(q, k, v, mask, **kw) for q, k, v in inputs]
    monkeypatch.setenv(ENV, "64,64,4,3,fused")
    flash_decode._LAUNCHES.clear()
    _check(*inputs[0], mask, **kw)
    fused = [flash_decode_forward(q, k, v, mask, **kw) for q, k, v in inputs]
    torch.cuda.synchronize()
    _assert_counters_zero()
    for f, p in zip(fused, plain):
        _assert_same(f, p)
    (launch,) = flash_decode._LAUNCHES.values()
    assert launch.fused and launch.plan.num_splits > 1 and launch.handles[flash_decode._MERGE] is None
    assert not flash_decode._FAST_LAUNCH or isinstance(launch.handles[flash_decode._SPLIT], flash_decode._Handle)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("d", [64, 128, 256])
def test_gpu_fused_compiles_for_every_cut(d, monkeypatch):
    # This GPU's Triton compiles the fused kernel for every merge shape (one split, a partial chunk, many chunks;
    # 16 and 64 packed rows; the -inf fill, rule 6 from the v sums, sinks): a compile failure would fall back to
    # two launches with a warning, so each call must still be fused -- and equal to the two-launch result
    tiles = "64,64,4,3" if d <= 128 else "64,32,4,3"
    Sk = 2500
    for sq in (1, 16):
        q, k, v = _qkv(2, 32, 8, sq, Sk, d, BF16, "cuda", "bshd")
        for ns in (1, 3, 128):
            for fill, sinks in ((-math.inf, None), (FP32_MIN, None), (-math.inf, torch.randn(32, device="cuda"))):
                kw = {"scale": d**-0.5, "window_right": Sk - sq, "mask_fill": fill, "sinks": sinks, "num_splits": ns}
                monkeypatch.setenv(ENV, tiles)
                flash_decode._LAUNCHES.clear()
                plain = flash_decode_forward(q, k, v, **kw)
                monkeypatch.setenv(ENV, tiles + ",fused")
                flash_decode._LAUNCHES.clear()
                fused = flash_decode_forward(q, k, v, **kw)
                (launch,) = flash_decode._LAUNCHES.values()
                assert launch.fused, (sq, ns, fill, sinks is not None)
                _assert_same(fused, plain)
    torch.cuda.synchronize()
    _assert_counters_zero()


@pytest.mark.gpu
@needs_gpu
def test_gpu_fused_under_cuda_graphs(monkeypatch):
    # A warmed-up key captured three times in one graph (one counter buffer, its address captured), replayed on
    # new data: each replay right, the counters zero after each. A key first seen inside the capture needs more
    # counters than the buffer holds: it gets a buffer zeroed by the graph itself, the device's buffer is left
    # alone, and the same key called eagerly afterwards makes its own
    monkeypatch.setattr(flash_decode, "_MIN_COUNTERS", 8)
    monkeypatch.setenv(ENV, "64,64,4,3,fused")
    Hq, Hkv, Sq, Sk, D = 32, 8, 1, 4096, 128
    kw = {"scale": D**-0.5, "window_right": Sk - Sq, "num_splits": 16}
    static = [_qkv(1, Hq, Hkv, Sq, Sk, D, BF16, "cuda") for _ in range(3)] + [_qkv(2, Hq, Hkv, Sq, Sk, D, BF16, "cuda")]
    flash_decode_forward(*static[0], **kw)  # warm-up: compiled, planned, the 8-entry buffer made
    torch.cuda.synchronize()
    (warm,) = flash_decode._KEPT_COUNTERS
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [flash_decode_forward(*s, **kw) for s in static]
    assert len(flash_decode._KEPT_COUNTERS) == 2 and flash_decode._COUNTERS[torch.device("cuda", 0)] is warm
    for _ in range(3):
        for s in static:
            for t in s:
                t.copy_(torch.randn_like(t))
        graph.replay()
        torch.cuda.synchronize()
        _assert_counters_zero()
        monkeypatch.setenv(ENV, "64,64,4,3")
        with monkeypatch.context() as m:
            m.setattr(flash_decode, "_LAUNCHES", {})
            plain = [flash_decode_forward(*s, **kw) for s in static]
        monkeypatch.setenv(ENV, "64,64,4,3,fused")
        for f, p in zip(outs, plain):
            _assert_same(f, p)
    out = flash_decode_forward(*static[3], **kw)  # eager, the key first seen in the capture: a buffer of its own
    torch.cuda.synchronize()
    assert len(flash_decode._KEPT_COUNTERS) == 3 and flash_decode._COUNTERS[torch.device("cuda", 0)].numel() == 16
    _assert_same(out, plain[3])
    _assert_counters_zero()
