"""Sweep flash_bwd's BwdConfig on the GPU, backward only, next to cuDNN's backward measured in the same run.

    python bench/tune_bwd.py                      # D=128, 64, 256 x S=4k, 8k x causal/full x MHA/GQA; <= ~4 min
    python bench/tune_bwd.py --dims 128 --seqs 4096 --budget-s 90
    python bench/tune_bwd.py --only "32,128,128,32,8,2;64,128,128,64,8,2"   # m1,n1,m2,n2,warps,stages
    python bench/tune_bwd.py --only "64,128,128,64,8,2,8,3,1,0"   # ...,dq_warps,dq_stages,dq_tma,dkdv_tma
    python bench/tune_bwd.py --cpu --tiny         # TRITON_INTERPRET=1 smoke run (tests/test_tune_bwd.py)

bf16, H=16 (GQA: 32 query heads on 8 KV heads), B = --tokens / S (16k tokens: B=4 at S=4096, the shape of
the fwd+bwd table). Each case computes one fixed ``(out, lse)`` (float32 torch, rounded like the forward's)
and times ONLY ``flash_attention_backward`` on it, with every BwdConfig field forced by replacing
``flash_bwd._pick_config`` (and emptying ``flash_bwd._FITTED``, which would otherwise pin the first config).
Timing is ``triton.testing.do_bench`` (median; it flushes the L2 between runs). Per config it prints:

* the whole backward (launcher included) in TFLOP/s, with 2.5x the forward's FLOPs (4 B H S^2 D, halved for
  causal), and the ratio to cuDNN's backward (``autograd.grad`` on a retained SDPA-cuDNN graph);
* the three launches separately (preprocess / dK-dV pass / dQ pass, ms): each recorded launch is replayed
  alone, so the next session sees which pass is slow; ``launcher`` is whole - sum of the three (Python);
* max abs error of dq/dk/dv against SDPA's float32 gradients; a config whose error exceeds
  ``2 x cuDNN's own error + 2^-7 x max(1, max|ref|)`` is flagged ``<< WRONG`` and never chosen. Gradient
  buffers are NaN-poisoned during this check, so an unwritten tile fails it.

The first case of each head dim sweeps the whole candidate list; the later cases of that D sweep the
``--top`` best so far plus the current default. When the dK/dV pass and the dQ pass are fastest in two
different configs of the same num_warps/num_stages, their combination is timed too (no new compile: each
kernel's compile key holds only its own tiles). The end prints the best config per case as a dict literal,
the best per head dim (what ``_pick_config``, which sees only D, can use), and a table.

Crash safety: on the GPU every (D, config) is first compiled and run on a tiny problem (both head layouts)
in a child process (``--probe``), up to ``--jobs`` at once from the start of the run, in priority order; the
Triton disk cache then makes the sweep's own first call a load, and a config that crashes or fails there is
reported and skipped. Python-level failures (compile errors, shared-memory overflows) in the sweep itself are
caught per config. A config that ``_launch`` had to shrink (OutOfResources) is reported "ran as".
``--budget-s`` stops before the next config and still prints the summary; cases run most important first
(D=128 S=4096 causal MHA, causal GQA, full MHA, full GQA, then S=8192, then D=64, then D=256).
"""

# ruff: noqa: B023 -- measure() is a closure over the current case, called only within its iteration

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

BWD_FLOPS = 2.5  # backward FLOPs / forward FLOPs (5 matmuls of the tile pair against 2)

# (block_m1, block_n1, block_m2, block_n2, num_warps, num_stages): dK/dV programs own n1 keys and step m1
# queries; dQ programs own m2 queries and step n2 keys. The default comes first; the list starts from the
# tutorial (32x128 / 128x32, 4 warps at D=64), FA2's hdim-128 tiles (64 queries x 128 keys, 8 warps), and
# shrinks n1 / m2 with D because the dK/dV program keeps 2 * n1 * D fp32 accumulators in registers.
CANDIDATES: dict[int, list[tuple[int, ...]]] = {
    64: [
        (32, 128, 128, 32, 4, 3),
        (32, 128, 128, 32, 4, 4),
        (32, 128, 128, 32, 8, 3),
        (64, 128, 128, 64, 8, 2),
        (64, 128, 128, 64, 4, 3),
        (64, 64, 64, 64, 4, 3),
        (32, 64, 64, 32, 4, 3),
        (16, 128, 128, 16, 4, 3),
        (64, 128, 128, 32, 8, 3),
        (32, 128, 64, 64, 4, 2),
        (64, 64, 64, 64, 4, 3, 0, 0, 1, 1),
    ],
    128: [
        (32, 64, 64, 32, 8, 2),
        (32, 128, 128, 32, 8, 2),
        (64, 128, 128, 64, 8, 2),
        (64, 128, 128, 64, 8, 1),
        (32, 128, 128, 32, 4, 3),
        (32, 64, 64, 32, 4, 3),
        (64, 64, 64, 64, 4, 2),
        (64, 64, 64, 64, 8, 3),
        (16, 128, 128, 16, 8, 3),
        (32, 128, 128, 64, 8, 3),
        (64, 128, 128, 32, 8, 2),
        (16, 64, 64, 16, 4, 3),
        # TMA (fields 9-10: dq_tma, dkdv_tma, written as _fields normalises them; session 5: the dQ pass gained,
        # the dK/dV pass lost at this D)
        (64, 128, 128, 64, 8, 3, 8, 3, 1, 1),
        (32, 128, 128, 64, 8, 2, 8, 3, 1),
    ],
    256: [
        (16, 32, 32, 16, 8, 1),
        (16, 32, 32, 16, 4, 1),
        (32, 32, 32, 32, 8, 1),
        (16, 64, 64, 16, 8, 1),
        (32, 64, 64, 32, 8, 1),
        (32, 64, 64, 32, 8, 2),
        (64, 64, 64, 64, 8, 1),
        (16, 64, 64, 32, 8, 2),
        (64, 64, 64, 64, 8, 2, 0, 0, 1),
        (64, 64, 64, 64, 8, 2, 8, 3, 1, 1),
    ],
}
# --tiny (interpreter): D=16, tiles that still give several blocks at S=64
CANDIDATES_TINY = [(16, 32, 32, 16, 1, 1), (16, 16, 16, 16, 1, 1), (32, 32, 32, 32, 1, 1)]


def say(*args) -> None:
    print(*args, flush=True)


def parse_config(spec: str) -> tuple[int, ...]:
    cfg = tuple(int(x) for x in spec.replace(" ", "").split(","))
    if len(cfg) not in (6, 8, 9, 10):
        raise ValueError(
            f"config {spec!r}: expected m1,n1,m2,n2,num_warps,num_stages[,dq_warps,dq_stages[,dq_tma[,dkdv_tma]]]"
        )
    return cfg


def spec_of(cfg) -> str:
    return ",".join(str(x) for x in _fields(cfg))


def _fields(cfg) -> tuple[int, ...]:
    if isinstance(cfg, tuple):
        return cfg
    fields = (cfg.block_m1, cfg.block_n1, cfg.block_m2, cfg.block_n2, cfg.num_warps, cfg.num_stages)
    dq = (getattr(cfg, "dq_warps", 0), getattr(cfg, "dq_stages", 0))
    tma = (int(getattr(cfg, "dq_tma", False)), int(getattr(cfg, "dkdv_tma", False)))
    if tma[1]:
        return fields + dq + tma
    if tma[0]:
        return fields + dq + tma[:1]
    return fields + dq if any(dq) else fields


# ----------------------------------------------------------------------------------------------
# inputs, references, peers
# ----------------------------------------------------------------------------------------------


class Case:
    def __init__(self, D: int, S: int, causal: bool, hq: int, hkv: int, tokens: int):
        self.D, self.S, self.causal, self.hq, self.hkv = D, S, causal, hq, hkv
        self.B = max(1, tokens // S)
        self.fwd_flops = 4.0 * self.B * hq * S * S * D / (2 if causal else 1)

    @property
    def key(self) -> tuple:
        return (self.D, self.S, self.causal, self.hq // self.hkv)

    @property
    def label(self) -> str:
        heads = "MHA" if self.hq == self.hkv else f"GQA{self.hq}/{self.hkv}"
        return f"D={self.D:<3} S={self.S:<5} {'causal' if self.causal else 'full  '} {heads:<9}"


def _inputs(case: Case, device: str, seed: int = 0):
    import torch

    g = torch.Generator(device=device).manual_seed(seed)

    def randn(h):
        return torch.randn(case.B, h, case.S, case.D, device=device, dtype=torch.bfloat16, generator=g)

    return randn(case.hq), randn(case.hkv), randn(case.hkv), randn(case.hq)  # q, k, v, grad_out


def _expand(t, hq: int):
    return t.repeat_interleave(hq // t.shape[1], dim=1)


def _forward_ref(q, k, v, causal: bool, scale: float):
    """``(out, lse)`` in float32, chunked over heads (S^2 scores per head): ``out`` rounded to q's dtype,
    as the forward stores it. Independent of any forward kernel, so the backward sees the same inputs
    whatever else changes."""
    import torch

    B, Hq, S, _ = q.shape
    qf = q.float().flatten(0, 1)
    kf = _expand(k, Hq).float().flatten(0, 1)
    vf = _expand(v, Hq).float().flatten(0, 1)
    out = torch.empty_like(q).flatten(0, 1)
    lse = torch.empty(B * Hq, S, device=q.device, dtype=torch.float32)
    chunk = max(1, (1 << 28) // (S * S))
    keep = torch.ones(S, S, dtype=torch.bool, device=q.device).tril() if causal else None
    for i in range(0, B * Hq, chunk):
        s = torch.matmul(qf[i : i + chunk], kf[i : i + chunk].transpose(-2, -1)) * scale
        if keep is not None:
            s = s.masked_fill(~keep, float("-inf"))
        lse[i : i + chunk] = torch.logsumexp(s, dim=-1)
        out[i : i + chunk] = torch.matmul(torch.softmax(s, dim=-1), vf[i : i + chunk]).to(q.dtype)
        del s
    return out.view(B, Hq, S, -1), lse.view(B, Hq, S)


def _sdpa_grads(q, k, v, do, causal: bool, dtype, backend=None):
    """SDPA's ``(dq, dk, dv)`` on inputs cast to ``dtype`` (k/v expanded to the query heads, the expansion's
    backward sums the groups); with ``backend`` the graph is kept and a re-runner of the backward returned."""
    import torch
    import torch.nn.functional as F

    Hq = q.shape[1]
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    if backend is None:
        out = F.scaled_dot_product_attention(
            leaves[0], _expand(leaves[1], Hq), _expand(leaves[2], Hq), is_causal=causal
        )
        return torch.autograd.grad(out, leaves, do.to(dtype)), None
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([backend]):
        try:  # cuDNN's own GQA; else the expanded heads
            out = F.scaled_dot_product_attention(*leaves, is_causal=causal, enable_gqa=Hq != k.shape[1])
        except RuntimeError:
            out = F.scaled_dot_product_attention(
                leaves[0], _expand(leaves[1], Hq), _expand(leaves[2], Hq), is_causal=causal
            )
    grad_out = do.to(dtype)

    def backward():
        return torch.autograd.grad(out, leaves, grad_out, retain_graph=True)

    return backward(), backward


def _ratio(tf: float, peer_tf: float) -> str:
    return "    -" if math.isnan(peer_tf) else f"{tf / peer_tf:5.2f}x"


def _max_err(a, ref) -> float:
    err = (a.float() - ref.float()).abs().max().item()
    return float("inf") if math.isnan(err) else err


# ----------------------------------------------------------------------------------------------
# forcing a config, recording the launches
# ----------------------------------------------------------------------------------------------


@contextmanager
def forced(flash_bwd, cfg, record: list | None = None, poison: bool = False):
    """Run ``flash_attention_backward`` with ``cfg``: ``_pick_config`` replaced, ``_FITTED`` empty; with
    ``record`` every launch is appended as ``(kernel name, config used, replay closure)``; with ``poison``
    ``torch.empty_like`` fills floating tensors with NaN (the gradient buffers)."""
    import torch

    saved_pick, saved_launch, saved_fitted = flash_bwd._pick_config, flash_bwd._launch, dict(flash_bwd._FITTED)
    saved_empty_like = torch.empty_like
    flash_bwd._FITTED.clear()
    flash_bwd._pick_config = lambda D, dtype, device: cfg
    if record is not None:

        def recording_launch(kernel, grid_of, args, meta_of, cfg_in, device, pass_="dkdv"):
            used = saved_launch(kernel, grid_of, args, meta_of, cfg_in, device, pass_)
            grid = grid_of(used)
            num_warps, num_stages = used.warps_stages(pass_)
            launch = dict(meta_of(used), num_warps=num_warps, num_stages=num_stages)
            name = getattr(kernel, "__name__", str(kernel))
            call_args = args(used) if callable(args) else args
            record.append((name, used, lambda: kernel[grid](*call_args, **launch)))
            return used

        flash_bwd._launch = recording_launch
    if poison:

        def poisoned(*a, **kw):
            t = saved_empty_like(*a, **kw)
            return t.fill_(float("nan")) if t.is_floating_point() else t

        torch.empty_like = poisoned
    try:
        yield
    finally:
        torch.empty_like = saved_empty_like
        flash_bwd._pick_config, flash_bwd._launch = saved_pick, saved_launch
        flash_bwd._FITTED.clear()
        flash_bwd._FITTED.update(saved_fitted)


PASS_NAMES = {"_attn_bwd_preprocess": "pre", "_attn_bwd_dkdv": "dkdv", "_attn_bwd_dq": "dq"}


# ----------------------------------------------------------------------------------------------
# child-process probe: compile and run one config on a tiny problem
# ----------------------------------------------------------------------------------------------


def probe_config(D: int, spec: str, layouts: list[tuple[int, int]], device: str = "cuda") -> int:
    """Child: one line ``OK`` or ``FAIL <why>``. Tiny shapes with the sweep's head layouts and S divisible
    by 16, so Triton's argument specialisation (and so the disk-cache key) matches the big run."""
    import torch

    from flashfuse.kernels import flash_bwd

    cfg = flash_bwd.BwdConfig(*parse_config(spec))
    for hq, hkv in layouts:
        S = 256 if device == "cuda" else 32
        q, k, v, do = _inputs(Case(D, S, True, hq, hkv, S), device, seed=1)
        for causal in (True, False):
            out, lse = _forward_ref(q, k, v, causal, D**-0.5)
            record: list = []
            with forced(flash_bwd, cfg, record, poison=True):
                dq, dk, dv, _, _ = flash_bwd.flash_attention_backward(
                    do, q, k, v, None, out, lse, scale=D**-0.5, window_right=0 if causal else None
                )
            if device == "cuda":
                torch.cuda.synchronize()
            ref, _ = _sdpa_grads(q, k, v, do, causal, torch.float32)
            for name, got, r in zip(("dq", "dk", "dv"), (dq, dk, dv), ref):
                err = _max_err(got, r)
                if not err <= 0.05 * max(1.0, r.abs().max().item()):
                    say(f"FAIL {name} err {err:.2e} (Hq/Hkv {hq}/{hkv}, causal={causal})")
                    return 0
            shrunk = {spec_of(used) for _, used, _ in record} - {spec}
            if shrunk:
                say(f"OK ran as {sorted(shrunk)}")
                return 0
    say("OK")
    return 0


class Probes:
    """``--probe`` children, ``jobs`` at once, one per (D, config), submitted in priority order."""

    def __init__(self, jobs: int, layouts: list[tuple[int, int]], enabled: bool, timeout_s: float):
        self.enabled = enabled
        self.layouts = ",".join(f"{a}/{b}" for a, b in layouts)
        self.timeout_s = timeout_s
        self.pool = ThreadPoolExecutor(max_workers=max(1, jobs)) if enabled else None
        self.futures: dict[tuple, Future] = {}
        self.lock = threading.Lock()

    def submit(self, D: int, cfg: tuple) -> None:
        if self.enabled and (D, cfg) not in self.futures:
            self.futures[(D, cfg)] = self.pool.submit(self._run, D, spec_of(cfg))

    def _run(self, D: int, spec: str) -> tuple[bool, str]:
        cmd = [sys.executable, os.path.abspath(__file__), "--probe", str(D), spec, "--layouts", self.layouts]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout_s, check=False)
        except subprocess.TimeoutExpired:
            return False, f"probe timed out after {self.timeout_s:.0f} s"
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith(("OK", "FAIL"))]
        if r.returncode == 0 and lines and lines[-1].startswith("OK"):
            return True, lines[-1]
        tail = (r.stderr.strip().splitlines() or [""])[-1][:200]
        return False, f"probe rc={r.returncode}: {(lines or [''])[-1]} {tail}".strip()

    def result(self, D: int, cfg: tuple, wait_s: float) -> tuple[bool | None, str]:
        """(True, note) passed; (False, why) failed; (None, why) not known in time (then try in-process)."""
        fut = self.futures.get((D, cfg))
        if fut is None:
            return None, "not probed"
        try:
            return fut.result(timeout=max(0.0, wait_s))
        except FutureTimeout:
            return None, "probe still running"

    def shutdown(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


# ----------------------------------------------------------------------------------------------
# the sweep
# ----------------------------------------------------------------------------------------------


def _timer(cpu: bool, rep_ms: float, cpu_reps: int):
    if not cpu:
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=10, rep=rep_ms, return_mode="median")

    def host_median(fn):
        times = []
        for _ in range(cpu_reps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return sorted(times)[len(times) // 2]

    return host_median


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", default="128,64,256")
    ap.add_argument("--seqs", default="4096,8192")
    ap.add_argument("--masks", default="causal,full")
    ap.add_argument("--heads", default="16/16,32/8", help="Hq/Hkv layouts, most important first")
    ap.add_argument("--tokens", type=int, default=16384, help="B = tokens / S")
    ap.add_argument("--budget-s", type=float, default=225.0, help="stop starting new configs after this many s")
    ap.add_argument("--rep-ms", type=float, default=40.0, help="do_bench rep per measurement (ms)")
    ap.add_argument("--top", type=int, default=4, help="configs carried from a D's earlier cases to its later ones")
    ap.add_argument("--only", default="", help='configs to sweep instead of the list, ";"-separated m1,n1,m2,n2,w,s')
    ap.add_argument("--jobs", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)), help="probe children")
    ap.add_argument("--no-probe", action="store_true", help="no child processes (try/except only)")
    ap.add_argument("--no-passes", action="store_true", help="do not time the three launches separately")
    ap.add_argument("--cpu", action="store_true", help="run under TRITON_INTERPRET=1 on the CPU")
    ap.add_argument("--tiny", action="store_true", help="D=16, S=64, 64 tokens, heads 2/2 and 4/2")
    ap.add_argument("--cpu-reps", type=int, default=1, help="host-timed repetitions per measurement (--cpu)")
    ap.add_argument("--probe", nargs=2, metavar=("D", "CONFIG"), help=argparse.SUPPRESS)
    ap.add_argument("--layouts", default="16/16", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    layouts_of = lambda s: [tuple(int(x) for x in h.split("/")) for h in s.split(",") if h.strip()]
    if a.cpu:
        # must precede the first @triton.jit definition, i.e. the import of flashfuse.kernels
        os.environ["TRITON_INTERPRET"] = "1"
    if a.probe:
        return probe_config(int(a.probe[0]), a.probe[1], layouts_of(a.layouts), "cpu" if a.cpu else "cuda")
    if a.tiny:
        a.dims, a.seqs, a.tokens, a.heads = "16", "64", 64, "2/2,4/2"

    import torch
    import triton

    device = "cpu" if a.cpu else "cuda"
    if not a.cpu and not torch.cuda.is_available():
        say("needs a CUDA GPU (or --cpu)")
        return 2
    from flashfuse.kernels import flash_bwd

    BwdConfig = flash_bwd.BwdConfig
    t0 = time.time()
    dims = [int(x) for x in a.dims.split(",")]
    seqs = [int(x) for x in a.seqs.split(",")]
    heads = layouts_of(a.heads)
    only = [parse_config(c) for c in a.only.split(";") if c.strip()]
    peer_name = "skip (needs CUDA)" if a.cpu else "cudnn"
    bench = _timer(a.cpu, a.rep_ms, a.cpu_reps)
    say(
        f"# {'CPU interpreter' if a.cpu else torch.cuda.get_device_name()} | torch {torch.__version__} | "
        f"triton {triton.__version__} | bf16 heads {a.heads} B*S={a.tokens} | budget {a.budget_s:.0f} s"
    )

    def candidates(D: int) -> list[tuple]:
        if only:
            return list(only)
        base = CANDIDATES_TINY if a.tiny else CANDIDATES.get(D) or CANDIDATES[128]
        default = _fields(flash_bwd._pick_config(D, torch.bfloat16, torch.device(device)))
        return [default] + [c for c in base if c != default]

    probes = Probes(a.jobs, heads, enabled=not (a.cpu or a.no_probe), timeout_s=240.0)
    for D in dims:
        for cfg in candidates(D):
            probes.submit(D, cfg)

    cases = [Case(D, S, m == "causal", hq, hkv, a.tokens)
             for D in dims for S in seqs for m in a.masks.split(",") for hq, hkv in heads]  # fmt: skip
    results: dict[tuple, list[dict]] = {}  # case key -> one dict per measured config
    peers: dict[tuple, tuple] = {}  # case key -> (name, ms)
    failed: dict[tuple, list[str]] = {}
    out_of_time = False
    for case in cases:
        if out_of_time:
            break
        if time.time() - t0 > a.budget_s:
            say(f"# budget of {a.budget_s:.0f} s reached: stopping before {case.label}")
            break
        scale = case.D**-0.5
        wr = 0 if case.causal else None
        q, k, v, do = _inputs(case, device)
        out, lse = _forward_ref(q, k, v, case.causal, scale)
        ref, _ = _sdpa_grads(q, k, v, do, case.causal, torch.float32)
        ref_max = [r.abs().max().item() for r in ref]
        if a.cpu:
            peer_grads, _ = _sdpa_grads(q, k, v, do, case.causal, torch.bfloat16)
            peer_ms = float("nan")
        else:
            from torch.nn.attention import SDPBackend

            try:
                peer_grads, peer_bwd = _sdpa_grads(q, k, v, do, case.causal, torch.bfloat16, SDPBackend.CUDNN_ATTENTION)
                peer_ms = bench(peer_bwd)
            except RuntimeError as e:
                say(f"  cudnn unavailable ({str(e)[:120]}); limits from bf16 SDPA, no peer time")
                peer_grads, _ = _sdpa_grads(q, k, v, do, case.causal, torch.bfloat16)
                peer_ms = float("nan")
            peer_bwd = None  # frees the retained graph
        peer_err = [_max_err(g, r) for g, r in zip(peer_grads, ref)]
        limits = [2 * e + 2.0**-7 * max(1.0, m) for e, m in zip(peer_err, ref_max)]
        del peer_grads
        peer_tf = BWD_FLOPS * case.fwd_flops / peer_ms * 1e-9
        peers[case.key] = (peer_name, peer_ms)
        peer_txt = "" if math.isnan(peer_ms) else f" bwd {peer_tf:6.1f} TFLOP/s ({peer_ms:.3f} ms)"
        say(
            f"{case.label} | B={case.B} | {peer_name}{peer_txt} | "
            f"its err dq/dk/dv {'/'.join(f'{e:.1e}' for e in peer_err)}"
        )

        # this D's earlier cases rank the configs; the first case of a D sweeps them all
        earlier = [r for key, rs in results.items() if key[0] == case.D for r in rs if r["ok"]]
        cfgs = candidates(case.D)
        if earlier and not only:
            score: dict[tuple, list[float]] = {}
            for key, rs in results.items():
                good = [r for r in rs if r["ok"] and key[0] == case.D]
                if good:
                    best_ms = min(r["ms"] for r in good)
                    for r in good:
                        score.setdefault(r["cfg"], []).append(r["ms"] / best_ms)
            ranked = sorted(score, key=lambda c: sum(score[c]) / len(score[c]))
            cfgs = list(dict.fromkeys([cfgs[0], *ranked[: a.top]]))
        rows: list[dict] = []
        measured: set[tuple] = set()

        def measure(cfg: tuple, note: str = "") -> None:
            nonlocal out_of_time
            if time.time() - t0 > a.budget_s:
                if not out_of_time:
                    say(f"# budget of {a.budget_s:.0f} s reached: stopping before {case.label} {spec_of(cfg)}")
                out_of_time = True
                return
            label = f"  {spec_of(cfg):<20}"
            ok_probe, why = probes.result(case.D, cfg, wait_s=a.budget_s - (time.time() - t0))
            if ok_probe is False:
                say(f"{label} FAILED in probe: {why}")
                failed.setdefault(case.key, []).append(spec_of(cfg))
                return
            record: list = []
            try:
                tc = time.time()
                with forced(flash_bwd, BwdConfig(*cfg), record, poison=True):
                    grads = flash_bwd.flash_attention_backward(
                        do, q, k, v, None, out, lse, scale=scale, window_right=wr
                    )[:3]
                if not a.cpu:
                    torch.cuda.synchronize()
                first_s = time.time() - tc
                errs = [_max_err(g, r) for g, r in zip(grads, ref)]
                del grads
                with forced(flash_bwd, BwdConfig(*cfg)):
                    ms = bench(
                        lambda: flash_bwd.flash_attention_backward(
                            do, q, k, v, None, out, lse, scale=scale, window_right=wr
                        )
                    )
                pass_ms = {}
                if not a.no_passes:
                    for name, _used, replay in record:
                        pass_ms[PASS_NAMES.get(name, name)] = bench(replay)
            except Exception as e:  # noqa: BLE001 -- report and go on with the next config
                say(f"{label} FAILED {type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e) else ''}")
                failed.setdefault(case.key, []).append(spec_of(cfg))
                return
            # _launch shrinks a config that does not fit and carries the smaller one to the next launch;
            # later calls (the timed ones) run the last launch's config for all three kernels
            eff = _fields(record[-1][1]) if record else cfg
            ok = all(e <= lim for e, lim in zip(errs, limits))
            tf = BWD_FLOPS * case.fwd_flops / ms * 1e-9
            passes = " ".join(f"{n} {t:.3f}" for n, t in pass_ms.items())
            if pass_ms:
                passes += f" launcher {ms - sum(pass_ms.values()):.3f}"
            say(
                f"{label} {tf:6.1f} TFLOP/s {_ratio(tf, peer_tf)} {peer_name}  [{ms:.3f} ms: {passes}]  "
                f"err {'/'.join(f'{e:.1e}' for e in errs)}  first call {first_s:.1f} s"
                + (f"  (ran as {spec_of(eff)})" if eff != cfg else "")
                + (f"  {note}" if note else "")
                + ("" if ok else "  << WRONG")
            )
            measured.update((cfg, eff))
            rows.append({"cfg": eff, "ms": ms, "tf": tf, "ok": ok, "pass": pass_ms, "errs": errs})

        for cfg in cfgs:
            if out_of_time:
                break
            if cfg not in measured:
                measure(cfg)
        # the fastest dK/dV pass with the fastest dQ pass of the same warps/stages: no new compile
        good = [r for r in rows if r["ok"] and "dkdv" in r["pass"] and "dq" in r["pass"]]
        combos = set()
        for ws in {r["cfg"][4:] for r in good}:
            same = [r for r in good if r["cfg"][4:] == ws]
            kv = min(same, key=lambda r: r["pass"]["dkdv"])["cfg"]
            dq = min(same, key=lambda r: r["pass"]["dq"])["cfg"]
            combos.add(kv[:2] + dq[2:4] + ws)
        for cfg in sorted(combos - measured):
            if out_of_time:
                break
            measure(cfg, note="(combined: best dK/dV + best dQ tiles)")
        results[case.key] = rows
        good = [r for r in rows if r["ok"]]
        if good:
            b = min(good, key=lambda r: r["ms"])
            say(f"  best: {spec_of(b['cfg'])}  {b['tf']:.1f} TFLOP/s = {_ratio(b['tf'], peer_tf)} {peer_name}")
        if rows and not a.no_passes:
            kv = min(rows, key=lambda r: r["pass"].get("dkdv", math.inf))
            dq = min(rows, key=lambda r: r["pass"].get("dq", math.inf))
            say(
                f"  fastest passes: dkdv {kv['pass'].get('dkdv', math.nan):.3f} ms in {spec_of(kv['cfg'])}, "
                f"dq {dq['pass'].get('dq', math.nan):.3f} ms in {spec_of(dq['cfg'])}"
            )
        q = k = v = do = out = lse = ref = rows = None  # free this case's tensors before the next
        if not a.cpu:
            torch.cuda.empty_cache()
    probes.shutdown()
    _summary(cases, results, peers, failed, time.time() - t0, BwdConfig)
    return 0


def _summary(cases, results, peers, failed, elapsed_s, BwdConfig) -> None:
    say(f"\n# done in {elapsed_s:.0f} s; best backward config per case (D, S, causal, Hq/Hkv): paste into")
    say("# flashfuse/kernels/flash_bwd.py")
    say("TUNED_BWD_CONFIGS = {")
    best = {}
    for case in cases:
        good = [r for r in results.get(case.key, []) if r["ok"]]
        if good:
            best[case.key] = min(good, key=lambda r: r["ms"])
            b = best[case.key]
            say(f"    {case.key!r}: {BwdConfig(*b['cfg'])!r},  # {b['tf']:.0f} TFLOP/s")
    say("}")
    # _pick_config sees only D: per D, the config with the best mean time ratio over the cases it ran in all of
    say("# per head dim (mean of time / that case's best, over the D's measured cases):")
    for D in dict.fromkeys(c.D for c in cases):
        keys = [c.key for c in cases if c.D == D and c.key in best]
        if not keys:
            continue
        common = set.intersection(*({r["cfg"] for r in results[k] if r["ok"]} for k in keys))
        if not common:
            continue
        ratio = {
            cfg: sum(next(r["ms"] for r in results[k] if r["cfg"] == cfg and r["ok"]) / best[k]["ms"] for k in keys)
            / len(keys)
            for cfg in common
        }
        cfg = min(ratio, key=ratio.get)
        say(f"#   D={D}: {BwdConfig(*cfg)!r}  # {ratio[cfg]:.2f}x the per-case best, over {len(keys)} cases")

    say("\n| case | best config (m1,n1,m2,n2,w,s) | bwd TFLOP/s | pre / dkdv / dq ms | cudnn bwd TFLOP/s | ratio |")
    say("|---|---|---|---|---|---|")
    for case in cases:
        if case.key not in peers:
            say(f"| {case.label.strip()} | not reached | | | | |")
            continue
        _name, peer_ms = peers[case.key]
        peer_tf = BWD_FLOPS * case.fwd_flops / peer_ms * 1e-9
        peer_txt = "skip" if math.isnan(peer_ms) else f"{peer_tf:.1f}"
        b = best.get(case.key)
        if b is None:
            n_fail = len(failed.get(case.key, []))
            say(f"| {case.label.strip()} | none passed ({n_fail} failed) | | | {peer_txt} | |")
            continue
        passes = " / ".join(f"{b['pass'][p]:.3f}" if p in b["pass"] else "-" for p in ("pre", "dkdv", "dq"))
        ratio = "-" if math.isnan(peer_ms) else f"{b['tf'] / peer_tf:.2f}"
        say(f"| {case.label.strip()} | {spec_of(b['cfg'])} | {b['tf']:.1f} | {passes} | {peer_txt} | {ratio} |")


if __name__ == "__main__":
    sys.exit(main())
