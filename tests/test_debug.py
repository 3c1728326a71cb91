"""Pass debugging: dumps, report files, the explain CLI, logging, verify mode."""

from __future__ import annotations

import inspect
import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.helpers import compile_and_report, qkv


def naive(q, k, v):
    return ((q @ k.transpose(-2, -1)) * 0.25).softmax(-1) @ v


def returns_weights(q, k, v):
    p = ((q @ k.transpose(-2, -1)) * 0.25).softmax(-1)
    return p @ v, p


def test_debug_dir_dumps_every_pass_and_the_report(tmp_path):
    def fn(q, k, v):
        out, weights = returns_weights(q, k, v)
        return naive(q, k, v) + out, weights

    _, rep = compile_and_report(fn, *qkv(S=12), debug_dir=str(tmp_path))
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["00_input.py", "01_canonicalize.py", "02_find_sites.py", "03_rewrite.py", "report.json",
                     "report.md"]
    before = (folder / "00_input.py").read_text()
    after = (folder / "03_rewrite.py").read_text()
    assert "flashfuse.attention" not in before and "softmax" in before
    # one site rewritten, one left alone; no input requires grad: the inference op
    assert after.count("torch.ops.flashfuse.attention_infer.default(") == 1
    assert "torch.ops.flashfuse.attention.default(" not in after
    assert "f32[2, 4, 12, 16]" in after  # dtypes and shapes are shown
    data = json.loads((folder / "report.json").read_text())
    assert data["total"] == 2 and data["rewritten"] == 1
    (done,) = [s for s in data["sites"] if s["rewritten"]]
    assert done["flags"]["kernel"].startswith("flash_fwd (triton interpreter) BLOCK_M=32 BLOCK_N=16")
    assert done["flags"]["op"] == "attention_infer"
    missed = [s for s in data["sites"] if not s["rewritten"]]
    assert "attention weights have 2 users" in missed[0]["reason"]
    assert "output_attentions=False" in missed[0]["hint"]
    line = inspect.getsourcelines(returns_weights)[1] + 1
    assert missed[0]["source"].endswith(f"test_debug.py:{line}")
    index = (tmp_path / "index.md").read_text()
    assert f"| {rep.graphs[0].graph} | 2 | 1 | {folder.name} |" in index


def test_env_var_turns_dumps_on(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHFUSE_DEBUG_DIR", str(tmp_path / "dumps"))
    compile_and_report(naive, *qkv(S=8))
    assert list((tmp_path / "dumps").glob("graph_*/report.md"))


def test_info_log_line_per_graph(caplog):
    with caplog.at_level(logging.INFO, logger="flashfuse"):
        _, rep = compile_and_report(naive, *qkv(S=8))
    lines = [r.getMessage() for r in caplog.records if r.name == "flashfuse" and r.levelno == logging.INFO]
    assert any(f"1/1 attention sites rewritten in graph {rep.graphs[0].graph}" in line for line in lines), lines


def test_debug_log_has_each_decision(caplog):
    with caplog.at_level(logging.DEBUG, logger="flashfuse"):
        compile_and_report(returns_weights, *qkv(S=8))
    assert any("left alone: the attention weights have 2 users" in r.getMessage() for r in caplog.records)


def test_explain_cli_runs_a_script(tmp_path):
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent("""
        import sys, torch
        def attn(q, k, v):
            p = ((q @ k.transpose(-2, -1)) * 0.25).softmax(-1)
            return p @ v, p
        q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
        torch.compile(attn, backend="flashfuse")(q, k, v)
        print("script args", sys.argv[1:])
    """))
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FLASHFUSE_DEBUG_DIR")}
    res = subprocess.run([sys.executable, "-m", "flashfuse", "explain", "--debug-dir", str(tmp_path / "d"),
                          str(script), "--alpha", "1"], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "script args ['--alpha', '1']" in res.stdout
    assert "0/1 attention sites rewritten" in res.stdout
    assert "user_script.py:4" in res.stdout and "output_attentions=False" in res.stdout
    assert list((tmp_path / "d").glob("graph_*/03_rewrite.py"))


def test_verify_passes_and_marks_sites(tmp_path):
    _, rep = compile_and_report(naive, *qkv(S=10), verify=True, inductor=True)
    assert rep.rewritten == 1 and rep.sites[0].flags["verified"] is True


def test_verify_catches_a_wrong_kernel_and_falls_back(monkeypatch, tmp_path):
    import flashfuse.ops as ops

    real = ops.testing.attention_ref

    def wrong(*args, **kwargs):
        out, lse = real(*args, **kwargs)
        return out + 0.5, lse

    monkeypatch.setattr(ops, "_use_kernel", lambda q: False)
    monkeypatch.setattr(ops.testing, "attention_ref", wrong)
    args = qkv(S=10)
    with pytest.warns(RuntimeWarning, match="verify failed"):
        out, rep = compile_and_report(naive, *args, verify=True, inductor=True, debug_dir=str(tmp_path))
    assert rep.rewritten == 0 and rep.sites[0].reason.startswith("verify failed: max abs diff 0.5")
    torch.testing.assert_close(out, naive(*args), atol=1e-5, rtol=1e-5)
    (dumped,) = [json.loads(p.read_text()) for p in tmp_path.glob("graph_*/report.json")]  # rewritten after the check
    assert dumped["rewritten"] == 0 and dumped["graphs"][0]["fallback"].startswith("verify failed")


def test_verify_skips_training_dropout_sites():
    """Both sides of a dropout site draw their own random masks: verify says so instead of failing the site."""
    import torch.nn.functional as F

    def fn(q, k, v):
        return F.dropout(((q @ k.transpose(-2, -1)) * 0.25).softmax(-1), p=0.3, training=True) @ v

    _, rep = compile_and_report(fn, *qkv(S=10), verify=True, inductor=True)
    site = rep.sites[0]
    assert site.rewritten and site.flags["verified"].startswith("skipped"), str(rep)


def test_each_rank_dumps_into_its_own_folder(tmp_path, monkeypatch):
    """Several ranks number their graphs alike: under torch.distributed each gets debug_dir/rank<r>/."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    compile_and_report(naive, *qkv(S=10), debug_dir=str(tmp_path))
    assert (tmp_path / "rank1" / "index.md").exists() and list((tmp_path / "rank1").glob("graph_*/report.json"))
    assert not list(tmp_path.glob("graph_*")) and not (tmp_path / "index.md").exists()
