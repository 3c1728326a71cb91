"""bench/tune_bwd.py runs end to end on the CPU (``--cpu --tiny``, Triton interpreter) in a subprocess.

The summary has a row with a config for every case, the cuDNN peer says ``skip``, and configs that fail
(one made to raise by a monkeypatched ``flash_bwd._launch``, one with a non-power-of-2 tile that Triton
rejects) are reported as FAILED while the sweep goes on to the configs after them.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]

# the default tiny config first, then: made to raise, rejected by Triton (tl.arange of 24), another good one
DRIVER = textwrap.dedent(
    """
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, {root!r})
    sys.path.insert(0, os.path.join({root!r}, "bench"))
    import tune_bwd
    from flashfuse.kernels import flash_bwd

    real_launch = flash_bwd._launch

    def broken_launch(kernel, grid_of, args, meta_of, cfg, device, pass_="dkdv"):
        if cfg.num_warps == 2:
            raise RuntimeError("deliberately broken config")
        return real_launch(kernel, grid_of, args, meta_of, cfg, device, pass_)

    flash_bwd._launch = broken_launch
    tune_bwd.CANDIDATES_TINY = [(16, 32, 32, 16, 2, 1), (24, 32, 32, 16, 1, 1), (32, 32, 32, 32, 1, 1)]
    sys.exit(tune_bwd.main(["--cpu", "--tiny", "--top", "1"]))
    """
)


def test_tune_bwd_cpu_tiny():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", DRIVER.format(root=str(ROOT))], capture_output=True, text=True,
                       timeout=120, env=env, cwd=ROOT, check=False)  # fmt: skip
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    lines = out.splitlines()

    # the first case tries every candidate: both broken ones fail and the sweep measures the one after them
    first = lines[lines.index(next(ln for ln in lines if ln.startswith("D=16  S=64    causal MHA"))) :]
    assert any("16,32,32,16,2,1" in ln and "FAILED" in ln and "deliberately broken" in ln for ln in first), out
    assert any("24,32,32,16,1,1" in ln and "FAILED" in ln and "power of 2" in ln for ln in first), out
    assert any(ln.strip().startswith("32,32,32,32,1,1") and "TFLOP/s" in ln and "err" in ln for ln in first), out
    # the three launches are timed separately
    assert any("pre " in ln and "dkdv " in ln and "dq " in ln for ln in first), out

    # one summary row per case (2 masks x 2 head layouts), each with a config, the peer skipped on the CPU
    table = [ln for ln in lines if ln.startswith("| D=16")]
    assert len(table) == 4, out
    for row in table:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells[1].split(",")) == 6 and all(x.isdigit() for x in cells[1].split(",")), row
        assert float(cells[2]) >= 0 and cells[4] == "skip", row
        assert len(cells[3].split(" / ")) == 3, row
    assert "TUNED_BWD_CONFIGS = {" in out
    assert sum("BwdConfig(block_m1=" in ln for ln in lines if ln.startswith("    (16, 64,")) == 4, out


def test_candidate_lists_are_written_as_the_sweep_reports_them():
    """Every candidate tuple is a valid BwdConfig and already in ``_fields``' normal form (the 9th/10th TMA fields
    only when set), so the sweep's "measured" bookkeeping, which holds normal forms, never times one twice."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import tune_bwd
    finally:
        sys.path.remove(str(ROOT / "bench"))
    from flashfuse.kernels.flash_bwd import BwdConfig

    lists = [*tune_bwd.CANDIDATES.values(), tune_bwd.CANDIDATES_TINY]
    assert any(len(c) > 8 for cands in lists for c in cands)  # the TMA variants are in the sweep
    for cands in lists:
        for c in cands:
            assert tune_bwd._fields(BwdConfig(*c)) == tuple(c), c
            assert tune_bwd.parse_config(",".join(map(str, c))) == tuple(c)
