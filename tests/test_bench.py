"""The benchmarks run end to end at tiny sizes on the CPU (CI smoke test; the GPU runs bench/gpu_check.sh).

``flashfuse.bench`` (attention table, both modes) and ``bench/models.py`` (whole model) are called in-process
with tiny shapes: every expected row is there, its numbers parse, the GPU-only peers say ``skip``, the
flashfuse rows pass their correctness check, and a wrong output does fail it.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import pathlib
import sys

import pytest
import torch

from flashfuse import bench

ROOT = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="CPU smoke test (on a GPU: python -m flashfuse.bench, bench/gpu_check.sh)")

TINY = ["--dims", "16", "--seqs", "64", "--tokens", "64", "--heads", "2", "--gqa", "4/2", "--window", "16",
        "--dtypes", "bf16", "--device", "cpu", "--warmup", "1", "--rep", "1"]


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _positive(text: str) -> bool:
    value = float(text)
    return math.isfinite(value) and value > 0


def test_forward_table_and_csv(tmp_path, capsys):
    path = tmp_path / "fwd.csv"
    code = bench.main([*TINY, "--cases", "full,causal,window,gqa_causal", "--methods", "flashfuse,sdpa_cudnn,eager",
                       "--csv", str(path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "forward TFLOP/s" in out
    assert "| case | flashfuse | sdpa_cudnn | eager | max abs err vs fp32 SDPA |" in out
    rows = _rows(path)
    assert sorted(r["family"] for r in rows) == ["causal", "full", "gqa_causal", "window"]
    for r in rows:
        assert r["mode"] == "fwd" and r["dtype"] == "bf16" and r["S"] == "64" and r["D"] == "16"
        assert _positive(r["flashfuse_tflops"]) and _positive(r["flashfuse_ms"]), r
        assert _positive(r["eager_tflops"]), r
        assert r["sdpa_cudnn_status"] == "skip" and r["sdpa_cudnn_tflops"] == ""
        assert r["check"] == "ok" and 0 < float(r["max_err"]) < 0.05, r
    window = next(r for r in rows if r["family"] == "window")
    assert (window["Hq"], window["Hkv"], window["window"], window["causal"]) == ("4", "2", "16", "1")
    # one table row per case, in the printed table too
    assert sum(line.startswith("| bf16 ") for line in out.splitlines()) == 4


def test_forward_backward_table(tmp_path, capsys):
    path = tmp_path / "fwdbwd.csv"
    code = bench.main([*TINY, "--mode", "fwdbwd", "--cases", "gqa_causal", "--methods", "flashfuse,eager,flashfuse_op",
                       "--csv", str(path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "forward+backward TFLOP/s" in out
    (row,) = _rows(path)
    assert row["mode"] == "fwdbwd"
    assert all(_positive(row[f"{m}_tflops"]) for m in ("flashfuse", "eager", "flashfuse_op")), row
    assert row["check"] == "ok" and row["worst_tensor"], row
    # 3.5x the forward's FLOPs: 4 * B * Hq * D * (S * S / 2) for causal
    assert float(row["gflop"]) == pytest.approx(3.5 * 4 * 1 * 4 * 16 * 64 * 64 / 2 / 1e9, rel=1e-3)


def test_check_fails_on_a_wrong_output():
    case = bench.Case(torch.bfloat16, "causal", 1, 2, 2, 64, 16)
    t = bench._make_inputs(case, "cpu", "fwd")
    good = bench.naive_attention(t.q, t.k, t.v, causal=True)
    assert bench.check_against_sdpa(case, t, "fwd", good).ok is True
    bad = good.clone()
    bad[:, :, 40:] += 0.05  # a few wrong rows, small values: what a skipped key block looks like
    check = bench.check_against_sdpa(case, t, "fwd", bad)
    assert check.ok is False and check.err >= 0.04


def test_cases_priority_flops_and_budget(capsys):
    cases = bench.build_cases([torch.bfloat16, torch.float16], [64, 128, 256], [512, 1024, 2048, 4096, 8192, 16384],
                              bench.FAMILIES)
    assert len(cases) == 2 * 3 * (4 * 6 + 1)
    first = cases[0]
    assert (first.dtype, first.D, first.S in (4096, 16384), first.family in ("full", "causal")) == \
           (torch.bfloat16, 128, True, True)
    assert all(c.dtype == torch.bfloat16 for c in cases[: len(cases) // 2])
    window = next(c for c in cases if c.family == "window" and c.D == 128 and c.dtype == torch.bfloat16)
    assert (window.S, window.window, window.Hq, window.Hkv, window.B) == (16384, 4096, 32, 8, 1)
    # visited pairs of a causal window of W: W(W+1)/2 + (S - W) W
    assert window.pairs == 4096 * 4097 / 2 + (16384 - 4096) * 4096
    causal = bench.Case(torch.bfloat16, "causal", 4, 16, 16, 4096, 128)
    assert causal.flops == 4 * 4 * 16 * 4096 * 4096 * 128 / 2
    assert causal.window_right == 0 and causal.window_left is None
    # a budget of 0 s measures nothing and says which rows it left
    rows = bench.run(cases[:3], ["eager"], device="cpu", budget_s=0.0)
    assert rows == []
    assert "3 rows not measured" in capsys.readouterr().out


def test_plot_or_says_why(tmp_path, capsys, monkeypatch):
    path = tmp_path / "p.csv"
    assert bench.main([*TINY, "--cases", "full", "--methods", "eager", "--csv", str(path)]) == 0
    capsys.readouterr()
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "matplotlib", None)  # as on a machine without it
        assert bench.plot(str(path)) is None
    assert "matplotlib is not installed" in capsys.readouterr().out
    pytest.importorskip("matplotlib")
    png = bench.plot(str(path))
    assert png is not None and pathlib.Path(png).stat().st_size > 0


def test_models_tiny(tmp_path, capsys, monkeypatch):
    # the op's CPU reference path: the interpreter would spend ~10 s on steps that only need to run
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    spec = importlib.util.spec_from_file_location("bench_models", ROOT / "bench" / "models.py")
    models = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_models", models)  # dataclasses look their module up
    spec.loader.exec_module(models)
    path = tmp_path / "models.csv"
    code = models.main(["--tiny", "--layers", "1", "--reps", "1", "--methods", "flashfuse,eager", "--cache",
                        "--device", "cpu", "--csv", str(path)])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = _rows(path)
    assert [(r["task"], r["method"]) for r in rows] == [("prefill", "eager"), ("prefill", "flashfuse"),
                                                       ("train", "flashfuse"), ("train", "eager")]
    for r in rows:
        assert r["status"] == "ok" and _positive(r["ms"]) and _positive(r["tokens_per_s"]), r
    ff = [r for r in rows if r["method"] == "flashfuse"]
    assert all(r["sites"] == "1/1" and _positive(r["compile_s"]) and float(r["passes_s"]) > 0 for r in ff), ff
    assert float(next(r for r in ff if r["task"] == "prefill")["check"]) < 1e-3  # logits vs eager
    assert "| task | method | ms |" in out and "compile, prefill: flashfuse" in out


def test_hopper_kernel_row(tmp_path, monkeypatch):
    # as on an H100: the flashfuse row runs flash_fwd_sm90 (here in the interpreter), portable stays flash_fwd
    monkeypatch.setattr(bench, "_hopper_kernel_applies", lambda q: True)
    path = tmp_path / "sm90.csv"
    code = bench.main([*TINY, "--cases", "window", "--methods", "flashfuse,flashfuse_portable", "--csv", str(path)])
    assert code == 0
    (row,) = _rows(path)
    assert row["flashfuse_note"] == "flash_fwd_sm90" and row["flashfuse_portable_note"] == "flash_fwd", row
    assert row["check"] == "ok" and _positive(row["flashfuse_tflops"]), row
