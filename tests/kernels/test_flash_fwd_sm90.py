"""Tests for ``flashfuse/kernels/flash_fwd_sm90.py`` against ``flashfuse.testing.attention_ref``.

The numerics rule of test_flash_fwd.py (STYLE.md, habit 8): inputs drawn in the target dtype, a float64
reference, the kernel's max and mean error at most 2x the eager low-precision error plus a slack; NaN and
``-inf`` lse exactly where the reference has them. ``torch.empty`` is poisoned with NaN, so an output
element the kernel forgets to write fails.

On the CPU (tests/conftest.py sets ``TRITON_INTERPRET=1``) the real kernel runs under the interpreter,
tensor descriptors included: triton 3.9's interpreter implements ``tl.make_tensor_descriptor`` (bounds
zero-fill and clipped stores), so the TMA variant, the plain-pointer variant (``notma``) and the
persistent / warp-specialize code paths all run here. What the CPU cannot show -- that the TMA and WS
variants compile for sm90 and their speed -- is for the ``gpu`` tests and ``bench/tune_fwd.py``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

from flashfuse.kernels import flash_fwd_sm90 as sm90
from flashfuse.kernels.flash_fwd import flash_attention_forward
from flashfuse.kernels.flash_fwd_sm90 import Sm90Config, flash_attention_forward_sm90, supports
from flashfuse.testing import attention_ref
from tests.kernels.numerics import BF16, FP16, FP32_MIN, INTERPRETER_WARNINGS, assert_forward_rule, seed_and_poison

ON_SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9 and not sm90._interpreting()
needs_sm90 = pytest.mark.skipif(not ON_SM90, reason="needs an sm90 (Hopper) GPU")

pytestmark = INTERPRETER_WARNINGS


@pytest.fixture(autouse=True)
def _seed_poison_pin(monkeypatch, tmp_path):
    seed_and_poison(monkeypatch)
    # one pinned config per test (the default) unless a test asks; never touch the user's autotune cache
    monkeypatch.setenv("FLASHFUSE_SM90_AUTOTUNE", "0")
    monkeypatch.setenv("FLASHFUSE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FLASHFUSE_SM90_CONFIG", raising=False)
    with sm90._no_fitted_cache():
        yield


def _qkv(B, Hq, Hkv, Sq, Sk, D, dtype, device, layout="bhsd"):
    def make(H, S):
        if layout == "bshd":
            return torch.randn(B, S, H, D, dtype=dtype, device=device).transpose(1, 2)
        return torch.randn(B, H, S, D, dtype=dtype, device=device)

    return make(Hq, Sq), make(Hkv, Sk), make(Hkv, Sk)


def _check(q, k, v, *, scale=None, window_left=None, window_right=None, softcap=0.0, mask_fill=-math.inf, config=None):
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    kw = {"window_left": window_left, "window_right": window_right, "softcap": softcap, "mask_fill": mask_fill}
    assert supports(q, k, v, scale=scale, **kw) is None
    out, lse = flash_attention_forward_sm90(q, k, v, scale, config=config, **kw)
    ref, ref_lse = attention_ref(q, k, v, scale=scale, upcast=True, **kw)
    low, low_lse = attention_ref(q, k, v, scale=scale, upcast=False, **kw)

    B, Hq, Sq, D = q.shape
    assert out.shape == (B, Hq, Sq, D) and out.dtype == q.dtype and out.is_contiguous()
    assert lse.shape == (B, Hq, Sq) and lse.dtype == torch.float32
    assert_forward_rule(out, lse, ref, ref_lse, low, low_lse, q.dtype)
    return out, lse


# ----------------------------------------------------------------------------------------------
# CPU (interpreter) and GPU alike: shapes x dtypes x layouts x bands x kernel variants
# ----------------------------------------------------------------------------------------------

SHAPES = [
    # B, Hq, Hkv, Sq, Sk, D, dtype, layout
    (1, 2, 2, 1, 97, 64, FP16, "bhsd"),  # one query row (decode-like)
    (2, 4, 2, 17, 17, 32, BF16, "bshd"),  # GQA 2, BSHD strides
    (1, 4, 1, 97, 61, 16, FP16, "bshd"),  # MQA, smallest head dim, Sq > Sk
    (1, 4, 2, 61, 97, 128, BF16, "bhsd"),  # Sq < Sk
    (2, 2, 1, 33, 1, 64, FP16, "bhsd"),  # one key
    (1, 1, 1, 129, 129, 16, BF16, "bhsd"),  # one past a power of two: ragged last blocks
]
BANDS = {"full": (None, None), "causal": (None, 0), "window7": (7, 0), "bottom-right": "br"}


def _shape_id(s):
    B, Hq, Hkv, Sq, Sk, D, dtype, layout = s
    return f"B{B}-H{Hq}/{Hkv}-Sq{Sq}-Sk{Sk}-D{D}-{str(dtype)[6:]}-{layout}"


def _band(name, Sq, Sk):
    band = BANDS[name]
    return (None, Sk - Sq) if band == "br" else band  # bottom-right causal: the last query sees every key


@pytest.mark.parametrize("band", list(BANDS))
@pytest.mark.parametrize("shape", SHAPES, ids=[_shape_id(s) for s in SHAPES])
def test_matches_reference(shape, band, device):
    B, Hq, Hkv, Sq, Sk, D, dtype, layout = shape
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, D, dtype, device, layout)
    wl, wr = _band(band, Sq, Sk)
    _check(q, k, v, window_left=wl, window_right=wr)


# the interpreter's config (32x16) with each code path: plain pointer loads, the persistent loop with the
# warp_specialize annotation (the interpreter ignores the annotation; the GPU tests compile it), host-built 4-D
# descriptors
VARIANTS = [
    "32,16,4,1", "32,16,4,1,notma", "32,16,4,1,persistent,ws", "16,32,4,1,persistent,notma",
    "32,16,4,1,host", "16,32,4,1,host,persistent",
]  # fmt: skip


def _spy_host_descriptors(monkeypatch) -> list:
    """Records each host descriptor built: a `host` config must really take that path (a silent fallback to the
    device-built descriptors would pass every value check)."""
    built = []
    real = sm90._host_desc
    monkeypatch.setattr(sm90, "_host_desc", lambda t, rows: built.append(rows) or real(t, rows))
    return built


@pytest.mark.skipif(ON_SM90, reason="interpreter configs; the gpu tests sweep the real ones")
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("band", ["full", "causal", "bottom-right"])
def test_kernel_variants(variant, band, device, monkeypatch):
    built = _spy_host_descriptors(monkeypatch)
    q, k, v = _qkv(2, 4, 2, 75, 90, 32, BF16, device, "bshd")
    wl, wr = _band(band, 75, 90)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no compile fallback
        _check(q, k, v, window_left=wl, window_right=wr, config=variant)
    cfg = Sm90Config.parse(variant)
    assert len(built) == (4 if cfg.host and cfg.tma else 0)


@pytest.mark.parametrize(
    "window",
    [(3, 5), (0, None), (None, -1), (5, -2), (-2, 4), (0, 0), (200, 200)],
    ids=["band3-5", "anticausal", "strict-causal", "left5-right-2", "left-2-right4", "diagonal", "wider-than-seq"],
)
@pytest.mark.parametrize("sq,sk", [(97, 61), (17, 97)])
def test_window_variants(window, sq, sk, device):
    q, k, v = _qkv(1, 2, 1, sq, sk, 32, FP16, device)
    _check(q, k, v, window_left=window[0], window_right=window[1])


@pytest.mark.parametrize("fill", [FP32_MIN, -1e4, -math.inf], ids=["finfo-min", "-1e4", "-inf"])
def test_fully_masked_rows_match_general_kernel(fill, device):
    """Rows the band empties (strict causal: row 0; a negative right edge: the first rows) follow rule 6 and
    agree with flash_fwd.py's kernel: NaN / -inf for a -inf fill, the mean of v for a finite one."""
    q, k, v = _qkv(1, 4, 2, 40, 33, 64, FP16, device)
    for wl, wr in ((None, -1), (2, -5)):
        out, lse = _check(q, k, v, window_left=wl, window_right=wr, mask_fill=fill)
        g_out, g_lse = flash_attention_forward(
            q, k, v, None, scale=0.125, window_left=wl, window_right=wr, mask_fill=fill
        )
        assert torch.equal(out.isnan(), g_out.isnan())
        assert torch.equal(lse.isneginf(), g_lse.isneginf())
        if math.isfinite(fill):
            assert not out.isnan().any()
            torch.testing.assert_close(lse[..., 0], g_lse[..., 0])  # row 0 is empty: fill + log(Sk)
            torch.testing.assert_close(out[..., 0, :], g_out[..., 0, :], atol=1e-3, rtol=0)


@pytest.mark.parametrize("dtype", [FP16, BF16])
def test_softcap_and_scale(dtype, device):
    q, k, v = _qkv(1, 2, 2, 50, 70, 64, dtype, device)
    q = q * 4  # large logits, so the cap bites
    _check(q, k, v, softcap=5.0, window_right=0)
    _check(q, k, v, scale=0.3)


def test_softcap_cap50_lse_matches_float32(device):
    # Gemma 2's cap of 50 makes every tanh argument small. The fp16 output hides the tanh's rounding, the
    # float32 lse does not: with 1 - 2 / (exp(2x) + 1) (cancels for small x) the lse was 3.8e-6 off the float64
    # reference where eager float32 on the same values is 4.8e-7 (8x); with _common.tanh 6.0e-7 (1.25x, lse
    # errors come in ulps of ~4.8e-7, hence 2x allowed)
    q, k, v = _qkv(2, 4, 4, 64, 64, 64, FP16, device)
    kw = {"window_left": None, "window_right": 0, "softcap": 50.0, "mask_fill": -math.inf}
    _, lse = flash_attention_forward_sm90(q, k, v, 0.125, **kw)
    _, ref_lse = attention_ref(q, k, v, scale=0.125, upcast=True, **kw)
    _, low_lse = attention_ref(q.float(), k.float(), v.float(), scale=0.125, upcast=False, **kw)
    err = (lse.double() - ref_lse.double()).abs().max()
    eager = (low_lse.double() - ref_lse.double()).abs().max()
    assert err <= 2 * eager, f"lse error {err:.3e} vs eager float32 {eager:.3e}"


def test_odd_strides_and_offsets(device):
    """Views with padding between heads and rows (all 16-byte aligned) and a storage offset."""
    base = torch.randn(2, 70, 3, 80, dtype=FP16, device=device)  # [B, S, H, D+16]: rows padded
    q = base[:, 3:70, :, 8:72].transpose(1, 2)  # offset 3 rows and 8 elements (16 bytes)
    kv = torch.randn(2, 2, 50, 64, dtype=FP16, device=device)[:, :1]  # head stride of a 2-head tensor
    _check(q, kv, kv, window_right=4)


def test_matches_general_kernel(device):
    q, k, v = _qkv(2, 4, 2, 45, 45, 64, BF16, device, "bshd")
    out, lse = flash_attention_forward_sm90(q, k, v, 0.125, None, 0)
    g_out, g_lse = flash_attention_forward(q, k, v, None, scale=0.125, window_right=0)
    torch.testing.assert_close(lse, g_lse, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.float(), g_out.float(), atol=2**-7, rtol=0)


# ----------------------------------------------------------------------------------------------
# supports(), configs, fallback, cache
# ----------------------------------------------------------------------------------------------


def test_supports_reasons(device):
    q, k, v = _qkv(1, 4, 2, 32, 32, 64, FP16, device)
    assert supports(q, k, v, scale=0.125) is None
    assert "dtype" in supports(q.float(), k.float(), v.float())
    assert "mask" in supports(q, k, v, torch.ones(32, 32, dtype=torch.bool, device=device))
    assert "sinks" in supports(q, k, v, sinks=torch.zeros(4, device=device))
    q80, k80, v80 = _qkv(1, 4, 2, 32, 32, 80, FP16, device)
    assert "head dim" in supports(q80, k80, v80)
    assert "head dims" in supports(q, k, v[..., :32])
    assert "multiple" in supports(q[:, :3], k, v)
    assert "scale" in supports(q, k, v, scale=-1.0)
    assert "softcap" in supports(q, k, v, softcap=-1.0)
    assert "contiguous" in supports(q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v)
    odd = torch.randn(1, 4, 32, 65, dtype=FP16, device=device)[..., :64]  # row stride 65 * 2 bytes
    assert "stride" in supports(odd, k, v)
    shifted = torch.randn(4 * 32 * 64 + 1, dtype=FP16, device=device)[1:].view(1, 4, 32, 64)
    assert "aligned" in supports(shifted, k, v)
    with pytest.raises(ValueError, match="unsupported call"):
        flash_attention_forward_sm90(odd, k, v, 0.125)


def test_config_parsing_and_env(monkeypatch, device):
    cfg = Sm90Config.parse("128, 64, 8, 3, ws, persistent")
    assert cfg == Sm90Config(128, 64, 8, 3, ws=True, persistent=True)
    assert Sm90Config.parse("64,64,4,2,notma").tma is False
    assert Sm90Config.from_tuple(cfg.as_tuple()) == cfg
    knobs = Sm90Config.parse("64,64,4,2,host")
    assert (knobs.host, knobs.tma, knobs.ws) == (True, True, False)
    assert knobs.as_tuple() == (64, 64, 4, 2, False, False, True, True)
    assert Sm90Config(64, 64, 4, 2).as_tuple() == (64, 64, 4, 2, False, False)  # TUNED_CONFIGS' short form
    assert Sm90Config.from_tuple(knobs.as_tuple()) == knobs and str(knobs) == "64x64 w4 s2 host"
    with pytest.raises(ValueError):
        Sm90Config.parse("128,64,8,3,fast")
    for d in (16, 32, 64, 128, 256):
        assert all(c.block_m * c.block_n <= 128 * 128 for c in sm90.candidate_configs(d, ws=True))
    q, k, v = _qkv(1, 2, 2, 40, 40, 32, FP16, device)
    monkeypatch.setenv("FLASHFUSE_SM90_CONFIG", "16,16,4,1,notma")
    chosen, source = sm90._choose_config(q, False, 40, None, None)
    assert chosen == Sm90Config(16, 16, 4, 1, tma=False) and source == "FLASHFUSE_SM90_CONFIG"
    _check(q, k, v, window_right=0)  # runs the forced config


def test_host_descriptors_broadcast_and_unit_dims(device):
    """Host descriptors span [B, H, S, D]: K/V broadcast over the batch (stride 0) cannot be encoded, so that call
    uses the per-head device descriptors; a size-1 dim with an odd stride gets a valid one. Both stay exact."""
    q, k, v = _qkv(3, 4, 2, 45, 70, 32, BF16, device)
    kb, vb = k[:1].expand(3, -1, -1, -1), v[:1].expand(3, -1, -1, -1)
    assert not sm90._host_descriptors_ok(q, kb, vb, q) and sm90._host_descriptors_ok(q, k, v, q)
    _check(q, kb, vb, window_right=25, config="32,16,4,1,host")
    wide = torch.randn(1, 45, 3, 4, 32, dtype=BF16, device=device)
    q1 = wide[:, :, 1].transpose(1, 2)[:1]  # [1, 4, 45, 32], batch stride 3 * 4 * 32 (any: the batch is 1)
    desc = sm90._host_desc(q1, 32)
    assert list(desc.strides) == [8, 32, 3 * 4 * 32, 1] and list(desc.block_shape) == [1, 1, 32, 32]
    _check(q1, k[:1], v[:1], config="32,16,4,1,host")


def test_compile_failure_falls_back(monkeypatch, device):
    """A config whose fancy build raises while compiling drops WS, host descriptors, persistence, then TMA, with a
    warning, and still computes the right result; the fallback is remembered."""
    real_run = sm90._Launch.run
    tried = []

    def run(self, cfg):
        tried.append(cfg)
        if cfg.tma:
            raise RuntimeError("PassManager::run failed (simulated)")
        return real_run(self, cfg)

    monkeypatch.setattr(sm90._Launch, "run", run)
    q, k, v = _qkv(1, 2, 1, 40, 40, 32, FP16, device)
    with pytest.warns(RuntimeWarning, match="failed to compile"):
        _check(q, k, v, window_right=0, config="32,16,4,1,ws,persistent,host")
    assert [(c.ws, c.host, c.persistent, c.tma) for c in tried] == [
        (True, True, True, True),
        (False, True, True, True),
        (False, False, True, True),
        (False, False, False, True),
        (False, False, False, False),
    ]
    tried.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check(q, k, v, window_right=0, config="32,16,4,1,ws,persistent,host")
    assert tried == [Sm90Config(32, 16, 4, 1, tma=False)]


def test_autotune_cache_roundtrip(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHFUSE_CACHE_DIR", str(tmp_path))
    cfg = Sm90Config(128, 64, 4, 3, persistent=True)
    sm90._cache_store("key-a", cfg)
    sm90._cache_store("key-b", Sm90Config(64, 64, 4, 2))
    data = sm90._cache_load()
    assert data["key-a"] == [128, 64, 4, 3, False, True, True, False] and "key-b" in data
    assert sm90._sk_bucket(1) == 256 and sm90._sk_bucket(4097) == 8192 and sm90._sk_bucket(10**6) == 16384


# ----------------------------------------------------------------------------------------------
# GPU (sm90): the real configs, long sequences, autotune, warp specialization
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_gpu_every_candidate_config(d, causal, monkeypatch):
    built = _spy_host_descriptors(monkeypatch)
    q, k, v = _qkv(2, 4, 2, 1500, 1777, d, BF16, "cuda", "bshd")  # 21M scores: past _HOST_MIN_SCORES
    for cfg in sm90.candidate_configs(d, ws=False):
        built.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no compile fallback (a shrink is allowed: no warning)
            _check(q, k, v, window_right=(1777 - 1500) if causal else None, config=cfg)
        assert len(built) % 4 == 0 and bool(built) == cfg.host, cfg  # 4 per attempt (a shrink retries)


@pytest.mark.gpu
@needs_sm90
def test_gpu_small_calls_keep_device_descriptors(monkeypatch):
    """Below _HOST_MIN_SCORES a host config runs with the device-built descriptors (launch-bound: the host ones'
    ~20 us of Python would show), with the same result."""
    built = _spy_host_descriptors(monkeypatch)
    q, k, v = _qkv(1, 4, 2, 300, 300, 128, BF16, "cuda")
    assert 4 * 300 * 300 < sm90._HOST_MIN_SCORES
    _check(q, k, v, window_right=0, config="128,128,8,3,host")
    assert built == []


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("dtype", [FP16, BF16])
@pytest.mark.parametrize("band", ["full", "causal", "window7"])
def test_gpu_long_sequences(dtype, band):
    q, k, v = _qkv(1, 4, 2, 4096, 4096, 128, dtype, "cuda", "bshd")
    wl, wr = _band(band, 4096, 4096)
    if band == "window7":
        wl = 1000
    _check(q, k, v, window_left=wl, window_right=wr)


@pytest.mark.gpu
@needs_sm90
def test_gpu_softcap_fill_and_odd_lengths():
    q, k, v = _qkv(3, 8, 1, 1025, 1023, 64, FP16, "cuda")
    _check(q, k, v, softcap=30.0, window_right=-3, mask_fill=FP32_MIN)
    _check(q, k, v, window_left=100, window_right=-3)


@pytest.mark.gpu
@needs_sm90
def test_gpu_autotune_writes_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHFUSE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(sm90, "_MEMO", {})
    q, k, v = _qkv(2, 4, 4, 300, 300, 64, BF16, "cuda")  # a key TUNED_CONFIGS has no entry for (sk <= 512)
    assert (64, True, sm90._sk_bucket(300)) not in sm90.TUNED_CONFIGS
    _check(q, k, v, window_right=0)  # FLASHFUSE_SM90_AUTOTUNE=0: the default config
    out, _ = flash_attention_forward_sm90(q, k, v, 0.125, None, 0, autotune=True)
    data = sm90._cache_load()
    assert len(data) == 1 and "D=64|bfloat16|causal=1|sk<=512" in next(iter(data))
    ref, _ = attention_ref(q, k, v, scale=0.125, window_right=0)
    assert (out.double() - ref).abs().max() < 2e-2


_WS_SNIPPET = r"""
import sys, warnings, torch
from flashfuse.kernels import flash_fwd_sm90 as sm90
from flashfuse.testing import attention_ref
torch.manual_seed(0)
d = int(sys.argv[1])
q, k, v = (torch.randn(2, 8, 1500, d, dtype=torch.bfloat16, device="cuda") for _ in range(3))
failed = []
for cfg in sm90._CANDIDATES_WS[d]:
    for wr in (None, 0):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out, lse = sm90.flash_attention_forward_sm90(q, k, v, d**-0.5, None, wr, config=cfg)
        ref, _ = attention_ref(q, k, v, scale=d**-0.5, window_right=wr)
        err = (out.double() - ref).abs().max().item()
        fell_back = any("failed to compile" in str(w.message) for w in caught)
        print(f"{cfg} window_right={wr}: err {err:.2e}{' (fell back: WS did not compile)' if fell_back else ''}")
        if not err < 2e-2:
            failed.append(str(cfg))
sys.exit(1 if failed else 0)
"""


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("d", [64, 128, 256])
def test_gpu_warp_specialized_configs(d):
    """In a child process: a WS build that crashes the compiler must not take the test session with it. A WS
    config that does not compile falls back (the child prints it); a wrong result fails."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    r = subprocess.run(
        [sys.executable, "-c", _WS_SNIPPET, str(d)], check=False, capture_output=True, text=True, timeout=600, env=env
    )
    print(r.stdout[-3000:], r.stderr[-3000:])
    assert r.returncode == 0, f"WS configs wrong or crashed (rc {r.returncode}):\n{r.stdout[-2000:]}{r.stderr[-2000:]}"


def _store_many(cache_dir: str, prefix: str, n: int) -> None:
    os.environ["FLASHFUSE_CACHE_DIR"] = cache_dir
    from flashfuse.kernels import flash_fwd_sm90 as m

    for i in range(n):
        m._cache_store(f"{prefix}-{i}", m.Sm90Config(64, 64, 4, 2))


def test_autotune_cache_keeps_every_process_entry(tmp_path):
    """Two processes (two ranks) tuning at once: the file lock around read-merge-write keeps both's entries."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_store_many, args=(str(tmp_path), p, 25)) for p in ("rank0", "rank1")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    with open(tmp_path / "fwd_sm90_autotune.json") as f:
        data = json.load(f)
    assert {k for k in data} == {f"{p}-{i}" for p in ("rank0", "rank1") for i in range(25)}
