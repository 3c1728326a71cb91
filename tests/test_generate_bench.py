"""Smoke test of ``bench/generate.py`` at tiny sizes on the CPU (fp32, the Triton interpreter).

One ``generate`` per method on a 1-layer Llama: a row per method with numbers in it, and flashfuse's greedy
tokens equal eager's. The context is 256 tokens so that the decode steps (one query against a static cache of
256 + 4 keys) go through the split-KV kernel, and the prefill through the prefill kernel.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.skipif(torch.cuda.is_available(), reason="CPU smoke test; on a GPU run bench/generate.py itself"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


def test_generate_bench_tiny(capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_generate", ROOT / "bench" / "generate.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    from flashfuse.kernels import flash_decode

    decode_calls = []
    real = flash_decode.flash_decode_forward

    def counted(*args, **kwargs):
        decode_calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(flash_decode, "flash_decode_forward", counted)
    monkeypatch.setattr(flash_decode, "_LAUNCHES", {})  # the bench's note counts the call keys: only its own
    assert bench.main(["--cpu", "--tiny", "--context", "256", "--new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0] in bench.METHODS:
            rows[cells[0]] = cells
    assert set(rows) == set(bench.METHODS), out
    number = re.compile(r"^\d+(\.\d+)?$")
    for method, (_, batch, prefill, tps, speedup, same, status) in rows.items():
        assert batch == "1" and status == "ok", (method, out)
        assert number.match(prefill) and float(prefill) > 0, (method, out)
        assert number.match(tps) and float(tps) > 0, (method, out)
        assert re.match(r"^\d+\.\d+x$", speedup), (method, out)
    assert rows["flashfuse"][5] == "yes", out  # greedy tokens equal eager's (fp32)
    # the decode steps ran the split-KV kernel: one query row against the 256 + 3 key static cache
    assert any(shape[2] == 1 for shape in decode_calls), decode_calls
    assert "flash_decode: 1 call keys" in out and "(fast launch on)" in out, out  # one static-cache decode key
