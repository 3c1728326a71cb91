"""Tests for the decode kernel's tuned table, its config override and knobs, and ``bench/decode.py --tune``.

``flash_decode.TUNED`` maps `tuned_key` (head dim, element size, packed-row, B x Hkv and band-length buckets) to
a config and a split count; planning consults it (after ``FLASHFUSE_DECODE_CONFIG``, before the heuristics) once
per call key. Here, on the CPU under the Triton interpreter: an entry is picked for a matching key and only
then, what it picks computes the reference's result (the numerics rule of test_flash_decode.py, knobs included),
an overflowing entry falls back to a smaller config for its own key only, and the benchmark's tuner runs and
prints a table that pastes back in.
"""

from __future__ import annotations

import importlib.util
import math
import pathlib
import warnings

import pytest
import torch
import triton
from triton.runtime.errors import OutOfResources

from flashfuse.kernels import flash_decode
from flashfuse.kernels.flash_decode import DecodeConfig, choose_splits, flash_decode_forward, parse_config, tuned_key
from tests.kernels.numerics import BF16, FP16, FP32, FP32_MIN, INTERPRETER_WARNINGS, seed_and_poison
from tests.kernels.test_flash_decode import _check, _left_padding, _qkv, _sliding

ROOT = pathlib.Path(__file__).resolve().parents[2]
ENV = "FLASHFUSE_DECODE_CONFIG"

pytestmark = INTERPRETER_WARNINGS


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    seed_and_poison(monkeypatch)
    monkeypatch.setattr(flash_decode, "_LAUNCHES", {})
    monkeypatch.setattr(flash_decode, "_FITTED", {})
    monkeypatch.setattr(flash_decode, "TUNED", {})
    monkeypatch.delenv(ENV, raising=False)


def _key_of(q, v, Hkv=None, kv_len=None):
    B, Hq, Sq, D = q.shape
    _, Hkv_, Sk, Dv = v.shape
    Hkv = Hkv or Hkv_
    return tuned_key(max(D, Dv), q.element_size(), Hq // Hkv * Sq, B * Hkv, Sk if kv_len is None else kv_len)


# ----------------------------------------------------------------------------------------------
# the key, the spec
# ----------------------------------------------------------------------------------------------


def test_tuned_key_buckets():
    # powers of two rounded up; the packed rows at least 16 (the smallest tile); the head dim padded as BLOCK_D
    assert tuned_key(128, 2, 4, 8, 4096) == (128, 2, 16, 8, 4096)
    assert tuned_key(128, 2, 16, 8, 4096) == tuned_key(128, 2, 4, 8, 4096)  # Sq = 4 and Sq = 1 at GQA 4
    assert tuned_key(128, 2, 4, 8, 4097) == (128, 2, 16, 8, 8192)
    assert tuned_key(128, 2, 4, 128, 2049) == (128, 2, 16, 128, 4096)
    assert tuned_key(80, 4, 24, 9, 300) == (128, 4, 32, 16, 512)
    assert tuned_key(16, 2, 128, 1, 1) == (16, 2, 128, 1, 1)


def test_parse_config_and_spec():
    assert parse_config("64,64,4,3") == DecodeConfig(64, 64, 4, 3)
    cfg = parse_config(" 16, 32 ,8,2,pdl,k_rows")
    assert cfg == DecodeConfig(16, 32, 8, 2, k_rows=True, pdl=True)
    assert parse_config(cfg.spec()) == cfg and cfg.spec() == "16,32,8,2,k_rows,pdl"
    wide = DecodeConfig(64, 64, 4, 3, merge_wide=True)
    assert wide.spec() == "64,64,4,3,merge_wide" and parse_config(wide.spec()) == wide
    for bad in ("64,64,4", "64,64,4,x", "64,48,4,3", "8,64,4,3", "64,64,3,3", "64,64,4,0", "64,64,4,3,fast"):
        with pytest.raises(ValueError, match="decode config"):
            parse_config(bad)


# ----------------------------------------------------------------------------------------------
# planning: env, then TUNED, then the heuristics
# ----------------------------------------------------------------------------------------------


def test_table_entry_for_a_matching_key_only(device):
    q, k, v = _qkv(1, 4, 2, 1, 300, 32, FP32, device)
    heuristic = flash_decode.plan(q, k, v, window_right=299)
    assert heuristic.source == "heuristic"
    assert heuristic.config == flash_decode._pick_config(32, FP32, q.device)
    tuned = DecodeConfig(16, 32, 1, 1, k_rows=True)
    flash_decode.TUNED[_key_of(q, v)] = (tuned, 3)
    pl = flash_decode.plan(q, k, v, window_right=299)
    assert (pl.config, pl.num_splits, pl.source) == (tuned, 3, "tuned")
    assert flash_decode.plan(q, k, v, window_right=299, num_splits=2).num_splits == 2  # a request wins
    assert flash_decode.plan(q, k, v, window_right=299, num_splits=2).config == tuned
    # the band's length is what is keyed: 300 keys bucket to 512, so Sk = 500 hits, Sk = 600 and a 200-key
    # sliding window of Sk = 300 do not; nor do another dtype, head dim, batch or group
    q5, k5, v5 = _qkv(1, 4, 2, 1, 500, 32, FP32, device)
    assert flash_decode.plan(q5, k5, v5).source == "tuned"
    misses = [
        _qkv(1, 4, 2, 1, 600, 32, FP32, device),
        _qkv(1, 4, 2, 1, 300, 32, FP16, device),
        _qkv(1, 4, 2, 1, 300, 64, FP32, device),
        _qkv(2, 4, 2, 1, 300, 32, FP32, device),
        _qkv(1, 8, 1, 1, 300, 32, FP32, device),
    ]
    for qm, km, vm in misses:
        pl = flash_decode.plan(qm, km, vm)
        B, _, _, D = qm.shape
        Hkv, Sk = vm.shape[1], vm.shape[2]
        assert pl.source == "heuristic" and pl.config == flash_decode._pick_config(D, qm.dtype, qm.device), qm.shape
        assert pl.num_splits == choose_splits(B * Hkv * pl.m_blocks, Sk, flash_decode._sm_count(qm.device))
    wl, wr = _sliding(1, 300, 200)
    assert flash_decode.plan(q, k, v, window_left=wl, window_right=wr).source == "heuristic"  # 200 keys: 256


def test_env_config_overrides_table_and_heuristics(device, monkeypatch):
    q, k, v = _qkv(1, 4, 2, 1, 300, 32, FP32, device)
    flash_decode.TUNED[_key_of(q, v)] = (DecodeConfig(16, 32, 1, 1), 3)
    monkeypatch.setenv(ENV, "16,16,1,1,k_rows")
    pl = flash_decode.plan(q, k, v)
    assert pl.config == DecodeConfig(16, 16, 1, 1, k_rows=True) and pl.source == "env"
    assert pl.num_splits == choose_splits(2, 300, flash_decode._sm_count(q.device))  # the config only
    _check(q, k, v, window_right=299, num_splits=4)
    monkeypatch.setenv(ENV, "16,16,1")
    flash_decode._LAUNCHES.clear()
    with pytest.raises(ValueError, match="decode config"):
        flash_decode_forward(q, k, v, scale=0.2)


def test_known_key_does_not_reread_the_table(device, monkeypatch):
    # the table is read when a key is planned; a known key's calls skip it (and may keep the old plan)
    q, k, v = _qkv(1, 4, 2, 1, 300, 32, FP32, device)
    flash_decode_forward(q, k, v, scale=0.2)
    lookups = []
    real = flash_decode._select
    monkeypatch.setattr(flash_decode, "_select", lambda *a: lookups.append(a) or real(*a))
    for _ in range(3):
        flash_decode_forward(q, k, v, scale=0.2)
    assert lookups == []
    flash_decode_forward(q, k, v, scale=0.3)  # a new key: planned, the table read once
    assert len(lookups) == 1


# ----------------------------------------------------------------------------------------------
# what a table entry picks computes the reference's result (knobs included)
# ----------------------------------------------------------------------------------------------

TUNED_CASES = [
    # B, Hq, Hkv, Sq, Sk, D, dtype, layout, config, splits
    (1, 4, 2, 1, 300, 32, FP32, "bhsd", DecodeConfig(16, 32, 1, 1), 3),
    (2, 8, 2, 4, 203, 80, BF16, "bshd", DecodeConfig(16, 32, 2, 2, k_rows=True), 4),  # D padded: K_ROWS masks
    (1, 16, 2, 3, 157, 64, FP16, "bhsd", DecodeConfig(16, 16, 1, 1, k_rows=True, pdl=True), 5),  # 2 row blocks
    (1, 2, 1, 1, 129, 256, FP16, "bhsd", DecodeConfig(32, 64, 4, 1, k_rows=True), 2),  # chunks end mid-block
    (1, 4, 2, 2, 300, 32, FP32, "bhsd", DecodeConfig(16, 16, 1, 1, merge_wide=True), 19),  # the merge: 1 chunk of 32
]


@pytest.mark.parametrize("window", ["causal", "sliding"])
@pytest.mark.parametrize("case", TUNED_CASES, ids=lambda c: f"B{c[0]}-H{c[1]}/{c[2]}-Sq{c[3]}-D{c[5]}-{c[8].spec()}")
def test_tuned_entry_matches_reference(case, window, device):
    B, Hq, Hkv, Sq, Sk, D, dtype, layout, cfg, splits = case
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, D, dtype, device, layout)
    wl, wr = (None, Sk - Sq) if window == "causal" else _sliding(Sq, Sk, 70)
    kv_len = flash_decode._band_len(Sq, Sk, *flash_decode._clamp_band(Sq, Sk, wl, wr))
    flash_decode.TUNED[_key_of(q, v, kv_len=kv_len)] = (cfg, splits)
    pl = flash_decode.plan(q, k, v, window_left=wl, window_right=wr)
    assert pl.source == "tuned" and pl.config == cfg
    assert pl == flash_decode.plan(q, k, v, window_left=wl, window_right=wr, num_splits=splits)  # as if asked
    mask = _left_padding([Sk - 20 * b for b in range(B)], Sk, device)
    out, lse = _check(q, k, v, mask, window_left=wl, window_right=wr)
    (launch,) = flash_decode._LAUNCHES.values()
    assert launch.plan.config == cfg and launch.split_meta["K_ROWS"] == cfg.k_rows
    assert launch.split_meta["PDL"] is False and "launch_pdl" not in launch.merge_meta  # CPU: pdl ignored
    wide = cfg.merge_wide and launch.plan.num_splits > 16
    assert launch.merge_meta["BLOCK_S"] == (triton.next_power_of_2(launch.plan.num_splits) if wide else 16)
    # and the same numbers as the heuristic plan, up to the order of the float32 sums
    flash_decode.TUNED.clear()
    flash_decode._LAUNCHES.clear()
    ref, ref_lse = flash_decode_forward(q, k, v, mask, scale=1 / math.sqrt(D), window_left=wl, window_right=wr)
    tol = {FP32: 1e-5, FP16: 4e-3, BF16: 2e-2}[dtype]  # an output ulp or two: the splits' sums differ
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=0)


def test_tuned_entry_with_finite_fill_sums_v_in_the_splits(device):
    # rule 6 through a k_rows entry: fully masked rows are the mean of v, which the split programs add up
    B, Hq, Hkv, Sq, Sk = 2, 4, 2, 2, 140
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, 32, FP32, device)
    flash_decode.TUNED[_key_of(q, v)] = (DecodeConfig(16, 32, 1, 1, k_rows=True), 3)
    keep = _left_padding([Sk, 60], Sk, device)
    keep[0, :, 0] = False
    bias = torch.zeros(keep.shape, device=device).masked_fill(~keep, FP32_MIN)
    out, _ = _check(q, k, v, bias, mask_fill=FP32_MIN)
    (launch,) = flash_decode._LAUNCHES.values()
    assert launch.plan.source == "tuned" and launch.split_meta["VSUM"]
    assert not out.isnan().any()


def test_overflowing_entry_falls_back_for_its_own_config(device, monkeypatch):
    # a table config that does not fit is replaced by _smaller's, for every key that asks for it and no other
    q, k, v = _qkv(1, 4, 2, 1, 300, 32, FP32, device)
    big = DecodeConfig(16, 32, 1, 1)
    flash_decode.TUNED[_key_of(q, v)] = (big, 3)
    real_run = flash_decode._run

    def run(kernel, launch, which, grid, args, meta, aligned):
        if which == flash_decode._SPLIT and meta["BLOCK_N"] > 16:
            raise OutOfResources(300000, 232448, "shared memory")
        return real_run(kernel, launch, which, grid, args, meta, aligned)

    monkeypatch.setattr(flash_decode, "_run", run)
    _check(q, k, v, window_right=299)
    (launch,) = flash_decode._LAUNCHES.values()
    assert launch.plan.config == DecodeConfig(16, 16, 1, 1) and launch.plan.source == "tuned (fitted)"
    assert launch.plan.num_splits == 3  # the entry's split count still applies
    assert list(flash_decode._FITTED) == [(32, 32, FP32, None, q.device, big)]
    # another key (no entry): the heuristic config, untouched by the fallback
    q2, k2, v2 = _qkv(1, 4, 2, 1, 600, 32, FP32, device)
    pl = flash_decode.plan(q2, k2, v2)
    assert pl.source == "heuristic" and pl.config == flash_decode._pick_config(32, FP32, q.device)


def test_a_knob_that_fails_to_compile_falls_back_to_the_plain_tiles(device, monkeypatch):
    # a table entry (or FLASHFUSE_DECODE_CONFIG) whose knob this GPU cannot compile (pdl before sm90): one warning,
    # the same tiles without knobs, remembered for that config
    q, k, v = _qkv(1, 4, 2, 1, 300, 32, FP32, device)
    knobby = DecodeConfig(16, 16, 1, 1, k_rows=True, merge_wide=True)
    flash_decode.TUNED[_key_of(q, v)] = (knobby, 3)
    real_run = flash_decode._run

    def run(kernel, launch, which, grid, args, meta, aligned):
        if which == flash_decode._SPLIT and meta["K_ROWS"]:
            raise RuntimeError("PTXASError: Instruction 'griddepcontrol' requires .target sm_90 (simulated)")
        return real_run(kernel, launch, which, grid, args, meta, aligned)

    monkeypatch.setattr(flash_decode, "_run", run)
    with pytest.warns(RuntimeWarning, match="failed to compile"):
        _check(q, k, v, window_right=299)
    (launch,) = flash_decode._LAUNCHES.values()
    assert launch.plan.config == DecodeConfig(16, 16, 1, 1) and launch.plan.source == "tuned (fitted)"
    assert flash_decode._FITTED[(32, 32, FP32, None, q.device, knobby)] == DecodeConfig(16, 16, 1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check(q, k, v, window_right=299)  # the fallback is remembered: no second warning


def test_a_plain_config_that_fails_to_compile_raises(device, monkeypatch):
    q, k, v = _qkv(1, 4, 2, 1, 300, 32, FP32, device)
    flash_decode.TUNED[_key_of(q, v)] = (DecodeConfig(16, 16, 1, 1), 3)

    def run(*a, **kw):
        raise RuntimeError("compiler crashed (simulated)")

    monkeypatch.setattr(flash_decode, "_run", run)
    with pytest.raises(RuntimeError, match="compiler crashed"):
        flash_decode.flash_decode_forward(q, k, v, scale=0.125, window_right=299)


# ----------------------------------------------------------------------------------------------
# bench/decode.py --tune on the CPU: runs, prints a table that pastes back in
# ----------------------------------------------------------------------------------------------


def _bench():
    spec = importlib.util.spec_from_file_location("bench_decode", ROOT / "bench" / "decode.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU smoke test; on a GPU run bench/decode.py --tune itself")
def test_bench_tune_smoke(capsys, monkeypatch):
    bench = _bench()
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--tune", "--budget-s", "0"])
    monkeypatch.setenv(ENV, "16,16,1,1")  # the tuner sets its own, then puts this one back
    assert bench.main(["--device", "cpu", "--tune", "--budget-s", "90"]) == 0
    assert flash_decode.os.environ[ENV] == "16,16,1,1"
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines[-1].startswith("| 1 | 1 | 300 |"), out  # the summary table is last
    assert lines[-3].startswith("| B | Sq | Sk | current graph |"), out
    assert "best per case, do_bench" in out and "best per case, CUDA graph" in out and "knobs" in out
    # the TUNED block is Python: exec it where DecodeConfig is defined, and it is a table planning uses
    start = next(i for i, line in enumerate(lines) if line.startswith("TUNED: dict"))
    end = next(i for i in range(start, len(lines)) if lines[i] == "}")
    scope = {"DecodeConfig": DecodeConfig}
    exec("\n".join(lines[start : end + 1]), scope)  # noqa: S102 -- the benchmark's own output
    table = scope["TUNED"]
    q, k, v = _qkv(1, 4, 2, 1, 300, 32, BF16, "cpu")
    assert list(table) == [_key_of(q, v)], table
    ((cfg, splits),) = table.values()
    assert isinstance(cfg, DecodeConfig) and isinstance(splits, int) and splits >= 1
    monkeypatch.delenv(ENV)
    monkeypatch.setattr(flash_decode, "TUNED", table)
    pl = flash_decode.plan(q, k, v, window_right=299)
    assert pl.source == "tuned" and pl.config == cfg and pl.num_splits == splits


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU smoke test; on a GPU run bench/decode.py --tune itself")
def test_bench_tune_reports_when_stopped(capsys, monkeypatch):
    # a sweep stopped part-way (here Ctrl-C at the third point; SIGTERM is turned into the same) still prints
    # what it timed, summary table last, and leaves no config forced
    bench = _bench()
    real, calls = bench._tune_point, []

    def point(*args, **kwargs):
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt("stop")
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "_tune_point", point)
    assert bench.main(["--device", "cpu", "--tune"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.strip()]
    assert "stopped (KeyboardInterrupt: stop)" in out and lines[-1].startswith("| 1 | 1 | 300 |"), out
    assert len(calls) == 3 and ENV not in flash_decode.os.environ


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU smoke test; on a GPU run bench/decode.py itself")
def test_bench_config_goes_through_the_env(capsys, monkeypatch):
    monkeypatch.setenv(ENV, "")  # restored after the test: --config sets it for the process
    assert _bench().main(["--device", "cpu", "--config", "16,32,1,1,k_rows"]) == 0
    out = capsys.readouterr().out
    assert "| graph us | graph % |" in out
    plans = [line for line in out.splitlines() if line.startswith("  B=1 Sq=")]
    assert len(plans) == 2 and all("BLOCK_N=32" in p and "k_rows (env)" in p for p in plans), out


def test_pdl_launch_keeps_the_fast_launch(device, monkeypatch):
    # DecodeConfig.pdl on a GPU: PDL=True for both kernels and launch_pdl=True for the merge. Through Triton's own
    # launch path (compile faked, as in test_flash_decode.py) the option is accepted and the compiled handle is
    # still proven for both kernels (launch_pdl is an option, not a parameter: the handle's consts do not hold it)
    from tests.kernels.test_flash_decode import _captured_launches, _triton_kernels

    q, k, v = _qkv(1, 4, 2, 1, 300, 32, FP32, device)
    launches = _captured_launches(q, k, v, scale=0.2)
    kernels = _triton_kernels(monkeypatch)
    for kernel, _, which, grid, args, meta, _ in launches:
        meta = dict(meta, PDL=True)
        if which == flash_decode._MERGE:
            meta["launch_pdl"] = True
        jit, compiled = kernels[kernel.fn.__name__]
        assert jit[grid](*args, **meta) is compiled
        handle = flash_decode._make_handle(jit, compiled, args, meta, 0)
        assert isinstance(handle, flash_decode._Handle), handle
        assert len(handle.consts) == len(jit.arg_names) - len(args)


# ----------------------------------------------------------------------------------------------
# the knobs compile for sm_90 (Triton's real compiler, no GPU: a stand-in driver, warmup only)
# ----------------------------------------------------------------------------------------------

_SM90_COMPILE = r"""
import os, re, sys
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
for spec, pdl, ns, fill in [("64,64,4,3", False, 16, -1e30), ("64,64,4,3,k_rows,merge_wide", True, 64, float("-inf"))]:
    os.environ["FLASHFUSE_DECODE_CONFIG"] = spec
    q = torch.randn(1, 32, 1, 128, dtype=torch.bfloat16)
    k = torch.randn(1, 8, 4096, 128, dtype=torch.bfloat16)
    captured = []
    fd._run = lambda *a: captured.append(a)
    fd._LAUNCHES.clear()
    fd.flash_decode_forward(q, k, torch.randn_like(k), scale=0.088, window_right=4095, num_splits=ns, mask_fill=fill)
    for kernel, launch, which, grid, args, meta, _ in captured:
        meta = dict(meta, PDL=pdl)  # the launcher sets PDL on CUDA only
        if pdl and which == fd._MERGE:
            meta["launch_pdl"] = True
        ck = kernel.warmup(*args, grid=grid, **meta)
        ptx = ck.asm["ptx"]
        counts = [len(re.findall(pattern, ptx)) for pattern in ("griddepcontrol", r"cp\.async")]
        launch_pdl = getattr(ck.metadata, "launch_pdl", None)
        print(spec, kernel.fn.__name__, meta.get("BLOCK_S"), meta["VSUM"], ck.metadata.shared, *counts, launch_pdl)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile and run the kernels")
def test_knobs_compile_for_sm90(tmp_path):
    # What the tuner turns on must compile for Hopper: K_ROWS, PDL (griddepcontrol in both kernels, launch_pdl in
    # the merge's metadata), the wide merge (one chunk of 64 splits) and VSUM -- caught here, not in a GPU call
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
    rows = [line.split() for line in run.stdout.splitlines()]
    assert len(rows) == 4, run.stdout
    plain_split, plain_merge, knob_split, knob_merge = rows
    assert plain_split[1] == "_decode_split" and plain_split[3] == "True"  # a finite fill: VSUM
    assert int(plain_split[5]) == 0 and int(plain_split[6]) > 0  # no griddepcontrol; K/V through cp.async
    assert int(plain_split[4]) <= 227 * 1024 and plain_merge[7] == "False"
    assert knob_split[1] == "_decode_split" and int(knob_split[5]) >= 1 and int(knob_merge[5]) >= 1
    assert knob_merge[2] == "64" and knob_merge[7] == "True"  # merge_wide: one chunk; launch_pdl on the merge
