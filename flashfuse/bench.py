"""Attention speed: flashfuse's kernel against its peers, side by side, one table per run.

    python -m flashfuse.bench                      # the full table, most important rows first
    python -m flashfuse.bench --quick              # a few rows (bf16, D=128, S=1k/4k)
    python -m flashfuse.bench --mode fwdbwd        # forward + backward
    python -m flashfuse.bench --budget-s 240 --csv out.csv    # stop starting rows after 240 s; CSV + PNG
    python -m flashfuse.bench --plot out.csv       # the PNG from an earlier CSV (no GPU needed)
    python bench/attention.py ...                  # the same command

What is measured (one row per case, one column per method):

- forward TFLOP/s = 4·B·Hq·Sq·Sk·D / time, halved for causal; for a sliding window the visited (i, j)
  pairs replace Sq·Sk. ``--mode fwdbwd``: 3.5x the forward FLOPs (backward = 2.5x) / time of forward +
  backward. Times are ``triton.testing.do_bench`` means (L2 flushed between calls).
- peak memory: the most memory one call allocates on top of what was allocated before it (its outputs,
  workspaces, saved activations; the inputs are not counted), MiB.
- methods: ``flashfuse`` (flashfuse's Triton kernels called directly, the one the op would pick:
  ``flash_fwd_sm90`` on Hopper where it supports the call, else ``flash_fwd``; ``flash_bwd`` for the
  backward; the CSV's ``flashfuse_note`` names it), ``sdpa_cudnn`` and ``sdpa_flash``
  (``F.scaled_dot_product_attention`` held to one backend), ``flex`` (compiled ``flex_attention`` with a
  block mask), ``torch_compile`` (plain ``torch.compile`` on the naive code), ``eager`` (the naive code).
  Optional: ``flashfuse_portable`` (always ``flash_fwd``), ``flashfuse_op`` (``flashfuse.attention``, the
  op a compiled model runs, dispatch included) and ``flashfuse_compile`` (``torch.compile(naive,
  backend="flashfuse")``), ``flashfuse_fp8`` (``flash_fwd_fp8``, the 8-bit forward of issue 6, its quantization
  pass included; the scheme is ``FLASHFUSE_FP8_SCHEME``'s, default ``int8qk``; forward only, full or causal, sm90;
  checked by its relative RMS error against SDPA's result in the case's dtype, within ``fp8.SCHEME_BOUNDS``).
  A peer that cannot run a case (a backend that refuses a head dim, GQA or a mask; out of memory) gets
  ``n/a`` or ``OOM`` and its reason in the notes under the table; the run goes on.
- correctness: every flashfuse row is compared, in the same run, with SDPA in float32 (memory-efficient
  or math backend, K/V expanded per query head). The rule is the project's (STYLE.md, 8): flashfuse's max
  abs error is at most 2x that of SDPA's own low-precision result (same inputs, same reference) plus
  ``EPS[dtype] * max(1, max|ref|)``; gradients too in ``fwdbwd``. A failure is printed loudly and the
  command exits with status 1.

Cases: families ``full``, ``causal`` (H=16), ``gqa``, ``gqa_causal`` (32 query heads, 8 KV heads),
``window`` (a causal sliding window of 4k inside the longest sequence, GQA 32/8); dtypes bf16, fp16;
D = 64, 128, 256; S = 512 .. 16k with B = 16k / S. Rows run in order of importance (bf16, D = 128, the
long sequences of issue 5's targets first), each printed as soon as it is measured; ``--budget-s``
stops starting new rows after that many seconds (compiles of the peers are most of the time). The
final table lists the measured rows in natural order.

NOTE: the decode benchmark (issue 8: a split-KV kernel for Sq <= 16 against a long KV cache) will
measure bandwidth, not FLOPs: bytes of K and V read / time against the card's copy bandwidth. It fits
here as another ``--mode`` (``decode``) with its own case builder (Sq in 1..16, Sk in 1k..128k, batch 1
and 16) and a ``Case.bytes_read``; ``measure_method``/``run_row``, the CSV and the table are reused.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = ["FAMILIES", "METHODS", "Case", "build_cases", "main", "naive_attention", "plot", "run"]

METHODS = ("flashfuse", "sdpa_cudnn", "sdpa_flash", "flex", "torch_compile", "eager")
EXTRA_METHODS = ("flashfuse_portable", "flashfuse_op", "flashfuse_compile", "flashfuse_fp8")
GPU_ONLY = ("sdpa_cudnn", "sdpa_flash", "flex")
FAMILIES = ("full", "causal", "gqa", "gqa_causal", "window")
MODES = {"fwd": 1.0, "fwdbwd": 3.5}  # FLOPs as a multiple of the forward's

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# slack of the correctness rule, times max(1, max|ref|): a few units in the last place of the output dtype
EPS = {torch.bfloat16: 8e-3, torch.float16: 1e-3, torch.float32: 1e-5}

# NOTE: priority of a case (lower runs first). The whole table (2 dtypes x 3 head dims x 6 lengths x 5
# families) takes far longer than a GPU session allows, almost all of it in the peers' compiles (~3-10 s
# per shape for flex and torch.compile). So the rows issue 5's targets name come first: bf16, D=128,
# S = 4k and 16k, causal or not, then the sliding window, the short sequences, GQA, the other head dims.
_PRIORITY_S = {4096: 0, 16384: 0, 1024: 2, 512: 3, 8192: 4, 2048: 5}
_PRIORITY_D = {128: 0, 64: 4, 256: 5}
_PRIORITY_FAMILY = {"full": 0, "causal": 0, "window": 1, "gqa_causal": 3, "gqa": 6}
_PRIORITY_DTYPE = {torch.bfloat16: 0, torch.float16: 100}


@dataclass(frozen=True)
class Case:
    dtype: torch.dtype
    family: str  # one of FAMILIES
    B: int
    Hq: int
    Hkv: int
    S: int
    D: int
    window: int | None = None  # sliding window: query i reads keys i - window < j <= i

    @property
    def causal(self) -> bool:
        return self.family in ("causal", "gqa_causal", "window")

    @property
    def gqa(self) -> bool:
        return self.Hq != self.Hkv

    @property
    def scale(self) -> float:
        return self.D ** -0.5

    # flashfuse's band: key j is kept when -window_left <= j - i <= window_right
    @property
    def window_left(self) -> int | None:
        return None if self.window is None else self.window - 1

    @property
    def window_right(self) -> int | None:
        return 0 if self.causal else None

    @property
    def pairs(self) -> float:
        """(i, j) pairs computed: S*S, S*S/2 for causal, the visited pairs of a window."""
        S = self.S
        if self.window is not None:
            W = min(self.window, S)
            return W * (W + 1) / 2 + (S - W) * W
        return S * S / 2 if self.causal else float(S * S)

    @property
    def flops(self) -> float:
        return 4.0 * self.B * self.Hq * self.D * self.pairs

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]

    def label(self) -> str:
        heads = f"H{self.Hq}/{self.Hkv}" if self.gqa else f"H{self.Hq}"
        win = f" W{self.window}" if self.window is not None else ""
        return f"{self.dtype_name} {self.family}{win} D{self.D} S{self.S} B{self.B} {heads}"

    def priority(self) -> tuple:
        score = (_PRIORITY_DTYPE.get(self.dtype, 200) + _PRIORITY_FAMILY[self.family]
                 + _PRIORITY_D.get(self.D, 6) + _PRIORITY_S.get(self.S, 6))
        return (score, self.D != 128, -self.S, FAMILIES.index(self.family))

    def natural(self) -> tuple:
        return (_PRIORITY_DTYPE.get(self.dtype, 200), FAMILIES.index(self.family), self.D, self.S)


def build_cases(dtypes, dims, seqs, families, *, tokens: int = 16384, heads: int = 16, gqa=(32, 8),
                window: int = 4096) -> list[Case]:
    """Every case of the grid, in priority order. ``B = tokens // S``; the window case uses the longest S."""
    cases = []
    for dtype in dtypes:
        for D in dims:
            for family in families:
                if family == "window":
                    S = max(seqs)
                    W = max(1, min(window, S // 4))
                    cases.append(Case(dtype, family, max(1, tokens // S), gqa[0], gqa[1], S, D, W))
                    continue
                hq, hkv = gqa if family.startswith("gqa") else (heads, heads)
                cases.extend(Case(dtype, family, max(1, tokens // S), hq, hkv, S, D) for S in seqs)
    return sorted(cases, key=Case.priority)


# --------------------------------------------------------------------------------------------- peers


def naive_attention(q, k, v, causal: bool = False, window: int | None = None):
    """Attention the way users write it: repeat_kv for GQA, q @ kᵀ * scale, a mask from aranges, softmax, @ v."""
    B, Hkv, S, D = k.shape
    Hq = q.shape[1]
    if Hq != Hkv:  # Llama's repeat_kv
        n_rep = Hq // Hkv
        k = k[:, :, None, :, :].expand(B, Hkv, n_rep, S, D).reshape(B, Hq, S, D)
        v = v[:, :, None, :, :].expand(B, Hkv, n_rep, S, v.shape[-1]).reshape(B, Hq, S, v.shape[-1])
    scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
    if causal or window is not None:
        i = torch.arange(q.shape[-2], device=q.device)[:, None]
        j = torch.arange(S, device=q.device)[None, :]
        keep = j <= i
        if window is not None:
            keep = keep & (i - j < window)
        scores = scores.masked_fill(~keep, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


class Unavailable(Exception):
    """A method that cannot run a case; the message says why."""


@dataclass
class Method:
    fn: Callable[[], object]  # one call: the forward, or forward + backward
    context: Callable[[], contextlib.AbstractContextManager] | None = None  # entered around every call of fn
    kernel: str = ""  # flashfuse rows: which kernel ran


@dataclass
class Inputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor | None
    keep: torch.Tensor | None  # bool [S, S] keep-mask of a sliding window (SDPA peers and the reference)


def _make_inputs(case: Case, device: str, mode: str) -> Inputs:
    torch.manual_seed(0)
    grad = mode == "fwdbwd"

    def rand(h):
        return torch.randn(case.B, h, case.S, case.D, device=device, dtype=case.dtype).requires_grad_(grad)

    q, k, v = rand(case.Hq), rand(case.Hkv), rand(case.Hkv)
    dout = torch.randn(case.B, case.Hq, case.S, case.D, device=device, dtype=case.dtype) if grad else None
    keep = None
    if case.window is not None:
        from flashfuse.testing import structure_keep

        keep = structure_keep(case.S, case.S, case.window_left, case.window_right, device=device)
    return Inputs(q, k, v, dout, keep)


def _autograd(f: Callable, t: Inputs, mode: str) -> Callable[[], object]:
    """``fwd``: f(q, k, v); ``fwdbwd``: (out, dq, dk, dv) through autograd."""
    if mode == "fwd":
        return lambda: f(t.q, t.k, t.v)

    def step():
        out = f(t.q, t.k, t.v)
        return (out.detach(), *torch.autograd.grad(out, (t.q, t.k, t.v), t.dout))

    return step


def _sdpa_reason(caught: list, exc: BaseException) -> str:
    """SDPA says why a backend refused in warnings ("... not used because ..."); keep the first that does."""
    for w in caught:
        msg = str(w.message)
        if "because" in msg or "requires" in msg or "not supported" in msg:
            return " ".join(msg.split())
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def _sdpa(case: Case, t: Inputs, mode: str, backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"sdpa_cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa_flash": SDPBackend.FLASH_ATTENTION}[backend_name]
    if t.keep is not None and backend_name == "sdpa_flash":
        raise Unavailable("SDPA's flash backend takes no attn_mask (no sliding window)")

    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=t.keep, is_causal=case.causal and t.keep is None,
                                              enable_gqa=case.gqa)

    fn = _autograd(f, t, mode)
    with warnings.catch_warnings(record=True) as caught, sdpa_kernel([backend]):
        warnings.simplefilter("always")
        try:
            fn()  # probe: a refused case raises here ("No available kernel"), with the reason in a warning
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 -- any refusal: the case is n/a for this backend
            raise Unavailable(_sdpa_reason(caught, exc)) from None
    # the backend context is entered once around the whole measurement (measure_method), not per call:
    # ~10 us of Python per call would be 10% of a 100 us kernel at S=512
    return Method(fn, lambda: sdpa_kernel([backend]))


# torch.compile's `dynamic` for the compiled peers: False (one compile per shape, the fair default) or None
# (`--dynamic`: automatic dynamic shapes, one recompile per family: more rows per budget, maybe slower kernels)
_PEER_DYNAMIC: dict[str, bool | None] = {"dynamic": False}


def _flex(case: Case, t: Inputs, mode: str):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    block_mask = None
    if case.window is not None:
        W = case.window

        def sliding(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < W)

        block_mask = create_block_mask(sliding, None, None, case.S, case.S, device=t.q.device)
    elif case.causal:
        def causal(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

        block_mask = create_block_mask(causal, None, None, case.S, case.S, device=t.q.device)
    flex = torch.compile(flex_attention, dynamic=_PEER_DYNAMIC["dynamic"])
    return _autograd(lambda q, k, v: flex(q, k, v, block_mask=block_mask, enable_gqa=case.gqa), t, mode)


def _naive(case: Case, t: Inputs, mode: str, backend: str | None):
    if backend is None:
        fn = naive_attention
    else:
        fn = torch.compile(naive_attention, backend=backend, dynamic=_PEER_DYNAMIC["dynamic"])
    return _autograd(lambda q, k, v: fn(q, k, v, case.causal, case.window), t, mode)


def _hopper_kernel_applies(q: torch.Tensor) -> bool:
    """The op's rule: on a CUDA device, the Hopper kernel is tried first (``FLASHFUSE_SM90=0`` turns it off)."""
    return q.device.type == "cuda" and os.environ.get("FLASHFUSE_SM90", "1") != "0"


def _flashfuse_forward(case: Case, q, k, v, portable: bool):
    """``(kernel name, forward)``: the forward the op runs for these inputs -- ``flash_fwd_sm90`` (TMA, tuned)
    where it supports the call on Hopper, else ``flash_fwd`` -- or always ``flash_fwd`` when ``portable``."""
    kw = {"scale": case.scale, "window_left": case.window_left, "window_right": case.window_right}
    if not portable and _hopper_kernel_applies(q):
        try:
            from flashfuse.kernels.flash_fwd_sm90 import flash_attention_forward_sm90, supports
        except ImportError:
            supports = None
        if supports is not None and supports(q, k, v, **kw) is None:
            return "flash_fwd_sm90", lambda: flash_attention_forward_sm90(q, k, v, **kw)
    from flashfuse.kernels.flash_fwd import flash_attention_forward

    return "flash_fwd", lambda: flash_attention_forward(q, k, v, **kw)


def _flashfuse_kernel(case: Case, t: Inputs, mode: str, portable: bool = False) -> Method:
    if t.q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise Unavailable("no GPU (TRITON_INTERPRET=1 runs the kernel in the interpreter)")
    q, k, v = t.q.detach(), t.k.detach(), t.v.detach()
    kernel, forward = _flashfuse_forward(case, q, k, v, portable)
    if mode == "fwd":
        return Method(lambda: forward()[0], kernel=kernel)
    from flashfuse.kernels.flash_bwd import flash_attention_backward

    kw = {"scale": case.scale, "window_left": case.window_left, "window_right": case.window_right}

    def step():  # what the op's autograd runs: the forward above, then the Triton backward on its (out, lse)
        out, lse = forward()
        dq, dk, dv = flash_attention_backward(t.dout, q, k, v, None, out, lse, **kw)[:3]
        return out, dq, dk, dv

    return Method(step, kernel=f"{kernel} + flash_bwd")


def _flashfuse_op(case: Case, t: Inputs, mode: str):
    import flashfuse

    return _autograd(lambda q, k, v: flashfuse.attention(q, k, v, scale=case.scale, causal=case.causal,
                                                         window_left=case.window_left), t, mode)


def _flashfuse_fp8(case: Case, t: Inputs, mode: str) -> Method:
    """The 8-bit forward (issue 6): quantization pass and kernel, as ``flash_attention_forward_fp8`` runs them."""
    if mode != "fwd":
        raise Unavailable("forward only (the FP8 kernel is for inference)")
    from flashfuse.kernels.flash_fwd_fp8 import _resolve, flash_attention_forward_fp8, supports

    q, k, v = t.q.detach(), t.k.detach(), t.v.detach()
    reason = supports(q, k, v, scale=case.scale, window_left=case.window_left, window_right=case.window_right)
    if reason is not None:
        raise Unavailable(reason)
    causal = case.window_right is not None
    return Method(lambda: flash_attention_forward_fp8(q, k, v, case.scale, causal),
                  kernel=f"flash_fwd_fp8 ({_resolve(None).name})")


def check_fp8(case: Case, t: Inputs, result) -> Check:
    """``flashfuse_fp8`` rows: relative RMS error against SDPA's result in the case's dtype, within the scheme's
    bound (``flashfuse.fp8.SCHEME_BOUNDS``: issue 6's 2e-2 for the default scheme)."""
    from torch.nn.attention import SDPBackend

    from flashfuse import fp8
    from flashfuse.kernels.flash_fwd_fp8 import _resolve

    name = _resolve(None).name
    bound = fp8.SCHEME_BOUNDS.get(name, 2e-2)
    try:
        low = _reference(case, t, "fwd", case.dtype, [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                                                       SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])[0]
        ref = _reference(case, t, "fwd", torch.float32, [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])[0]
    except Exception as exc:  # noqa: BLE001 -- e.g. out of memory at 16k: the row says "unchecked"
        return Check(None, note=f"not checked: the SDPA reference failed ({type(exc).__name__})")
    err = fp8.relative_rms_error(result, low)
    return Check(err <= bound, err=err, peer_err=fp8.relative_rms_error(low, ref), vs_sdpa=err,
                 worst="out rel RMS", note=f"bound {bound:g} ({name})")


def make_method(name: str, case: Case, t: Inputs, mode: str) -> Method:
    made = _make_fn(name, case, t, mode)
    return made if isinstance(made, Method) else Method(made)


def _make_fn(name: str, case: Case, t: Inputs, mode: str):
    if t.q.device.type != "cuda" and name in GPU_ONLY:
        raise Unavailable("GPU only (skipped on the CPU)")
    if name == "flashfuse":
        return _flashfuse_kernel(case, t, mode)
    if name == "flashfuse_portable":
        return _flashfuse_kernel(case, t, mode, portable=True)
    if name == "flashfuse_op":
        return _flashfuse_op(case, t, mode)
    if name == "flashfuse_fp8":
        return _flashfuse_fp8(case, t, mode)
    if name in ("sdpa_cudnn", "sdpa_flash"):
        return _sdpa(case, t, mode, name)
    if name == "flex":
        return _flex(case, t, mode)
    if name == "torch_compile":
        return _naive(case, t, mode, "inductor")
    if name == "flashfuse_compile":
        return _naive(case, t, mode, "flashfuse")
    if name == "eager":
        return _naive(case, t, mode, None)
    raise ValueError(f"unknown method {name!r}; methods: {', '.join(METHODS + EXTRA_METHODS)}")


# ------------------------------------------------------------------------------------------ measuring


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time_ms(fn: Callable, device: str, warmup: int, rep: int) -> float:
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=warmup, rep=rep)
    # the CPU (smoke tests): a few calls, no cache flush
    times: list[float] = []
    deadline = time.perf_counter() + rep / 1000
    while not times or (time.perf_counter() < deadline and len(times) < 20):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sum(times) / len(times)


@dataclass
class Measured:
    ms: float | None = None
    mem_mib: float | None = None
    first_s: float | None = None  # the first call: compiles, autotuning
    status: str = "ok"  # ok | n/a | OOM | error | skip
    note: str = ""
    result: object = None  # flashfuse rows keep their output for the check


def _measure(name: str, fn: Callable, device: str, warmup: int, rep: int, start: float):
    """(first call s, ms per call, peak MiB of one call, the first call's result for flashfuse rows)"""
    result = fn()
    _sync(device)
    first_s = time.perf_counter() - start
    keep = result if name.startswith("flashfuse") else None
    del result
    mem_mib = None
    if device == "cuda":  # memory on a second call: the first may compile or autotune
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        again = fn()
        torch.cuda.synchronize()
        mem_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
        del again
    return first_s, _time_ms(fn, device, warmup, rep), mem_mib, keep


def measure_method(name: str, case: Case, t: Inputs, mode: str, device: str, warmup: int, rep: int) -> Measured:
    m = Measured()
    method = fn = None
    try:
        with contextlib.ExitStack() as stack:
            start = time.perf_counter()
            method = make_method(name, case, t, mode)
            if method.context is not None:
                stack.enter_context(method.context())
            fn = method.fn
            m.note = method.kernel
            m.first_s, m.ms, m.mem_mib, m.result = _measure(name, fn, device, warmup, rep, start)
    except Unavailable as exc:
        m.status, m.note = ("skip" if "GPU only" in str(exc) else "n/a"), str(exc)
    except torch.OutOfMemoryError as exc:
        m.status, m.note = "OOM", " ".join(str(exc).split())[:160]
    except Exception as exc:  # noqa: BLE001 -- a peer that breaks on a case gets a note, not a crashed run
        text = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        # OOM inside a compile (autotuning) arrives wrapped in the backend's exception
        m.status, m.note = ("OOM" if "out of memory" in text.lower() else "error"), text[:300]
    finally:
        method = fn = None  # the compiled peers and their buffers go before the next method
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return m


def _reference(case: Case, t: Inputs, mode: str, dtype: torch.dtype, backends) -> list[torch.Tensor]:
    """SDPA on K/V expanded per query head: [out] or [out, dq, dk, dv] (float32 for the reference)."""
    from torch.nn.attention import sdpa_kernel

    from flashfuse.testing import expand_kv

    leaves = [x.detach().to(dtype).requires_grad_(mode == "fwdbwd") for x in (t.q, t.k, t.v)]
    q, k, v = leaves
    mask = t.keep
    with sdpa_kernel(backends):
        out = F.scaled_dot_product_attention(q, expand_kv(k, case.Hq), expand_kv(v, case.Hq), attn_mask=mask,
                                             is_causal=case.causal and mask is None)
    if mode == "fwd":
        return [out.detach()]
    return [out.detach(), *torch.autograd.grad(out, leaves, t.dout.to(dtype))]


@dataclass
class Check:
    ok: bool | None  # None: not checked (the reference could not run)
    err: float = math.nan  # flashfuse's max abs error vs float32 SDPA (worst tensor, see `worst`)
    peer_err: float = math.nan  # SDPA's own low-precision error on the same tensor
    vs_sdpa: float = math.nan  # max |flashfuse - SDPA low precision| on the output
    worst: str = "out"
    note: str = ""


def check_against_sdpa(case: Case, t: Inputs, mode: str, result) -> Check:
    from torch.nn.attention import SDPBackend

    names = ["out"] if mode == "fwd" else ["out", "dq", "dk", "dv"]
    got = [result] if mode == "fwd" else list(result)
    try:
        ref = _reference(case, t, mode, torch.float32, [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
        low_backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH]
        low = _reference(case, t, mode, case.dtype, low_backends)
    except Exception as exc:  # noqa: BLE001 -- e.g. out of memory at 16k: the row says "unchecked"
        return Check(None, note=f"not checked: the SDPA reference failed ({type(exc).__name__})")
    check = Check(True)
    worst_margin = -math.inf
    for name, g, r, lo in zip(names, got, ref, low):
        g, lo = g.float(), lo.float()
        if g.shape != r.shape:
            return Check(False, note=f"{name}: shape {tuple(g.shape)} != {tuple(r.shape)}")
        err = (g - r).abs().max().item()
        peer = (lo - r).abs().max().item()
        bound = 2 * peer + EPS[case.dtype] * max(1.0, r.abs().max().item())
        if name == "out":
            check.vs_sdpa = (g - lo).abs().max().item()
        margin = err - bound if math.isfinite(err) else math.inf
        if margin > worst_margin:
            worst_margin, check.err, check.peer_err, check.worst = margin, err, peer, name
        if not margin <= 0:
            check.ok = False
    del ref, low
    return check


# ------------------------------------------------------------------------------------------- one run


@dataclass
class Row:
    case: Case
    cells: dict[str, Measured] = field(default_factory=dict)
    checks: dict[str, Check] = field(default_factory=dict)  # one per flashfuse method

    @property
    def check(self) -> Check | None:
        """The kernel's check, or the first failing one of any flashfuse method."""
        failing = [c for c in self.checks.values() if c.ok is False]
        if failing:
            return failing[0]
        return self.checks.get("flashfuse") or next(iter(self.checks.values()), None)

    def tflops(self, method: str, factor: float) -> float | None:
        m = self.cells.get(method)
        if m is None or m.ms is None:
            return None
        return factor * self.case.flops / (m.ms * 1e-3) / 1e12


def _fmt_mem(mib: float | None) -> str:
    if mib is None:
        return ""
    return f"{mib / 1024:.1f}G" if mib >= 1024 else f"{mib:.0f}M"


def _cell(row: Row, method: str, factor: float) -> str:
    m = row.cells.get(method)
    if m is None:
        return ""
    if m.ms is None:
        return m.status
    mem = _fmt_mem(m.mem_mib)
    tf = row.tflops(method, factor)
    return (f"{tf:.1f}" if tf >= 10 else f"{tf:.3g}") + (f" ({mem})" if mem else "")


def _check_cell(check: Check | None) -> str:
    if check is None:
        return ""
    if check.ok is None:
        return "unchecked"
    what = "" if check.worst == "out" else f"{check.worst} "
    verdict = "ok" if check.ok else "FAIL"
    return f"{what}{check.err:.1e} {verdict}"


CSV_FIXED = ["mode", "device", "torch", "triton", "dtype", "family", "B", "Hq", "Hkv", "S", "D", "causal", "window",
             "gflop"]


def csv_header(methods) -> list[str]:
    cols = list(CSV_FIXED)
    for m in methods:
        cols += [f"{m}_tflops", f"{m}_ms", f"{m}_mem_mib", f"{m}_first_s", f"{m}_status", f"{m}_note"]
    return cols + ["check", "max_err", "sdpa_err", "err_vs_sdpa", "worst_tensor"]


def csv_row(row: Row, methods, mode: str, env: dict[str, str]) -> dict[str, object]:
    c = row.case
    factor = MODES[mode]
    out: dict[str, object] = {"mode": mode, **env, "dtype": c.dtype_name, "family": c.family, "B": c.B, "Hq": c.Hq,
                              "Hkv": c.Hkv, "S": c.S, "D": c.D, "causal": int(c.causal), "window": c.window or "",
                              "gflop": float(f"{factor * c.flops / 1e9:.6g}")}
    for m in methods:
        cell = row.cells.get(m, Measured(status="skip"))
        tf = row.tflops(m, factor)
        out.update({f"{m}_tflops": "" if tf is None else float(f"{tf:.5g}"),
                    f"{m}_ms": "" if cell.ms is None else float(f"{cell.ms:.5g}"),
                    f"{m}_mem_mib": "" if cell.mem_mib is None else round(cell.mem_mib, 1),
                    f"{m}_first_s": "" if cell.first_s is None else round(cell.first_s, 2),
                    f"{m}_status": cell.status, f"{m}_note": cell.note})
    ch = row.check
    out.update({"check": "" if ch is None else {True: "ok", False: "FAIL", None: "unchecked"}[ch.ok],
                "max_err": "" if ch is None else f"{ch.err:.3e}",
                "sdpa_err": "" if ch is None else f"{ch.peer_err:.3e}",
                "err_vs_sdpa": "" if ch is None else f"{ch.vs_sdpa:.3e}",
                "worst_tensor": "" if ch is None else ch.worst})
    return out


def _fatal(m: Measured) -> bool:
    # an illegal address poisons the CUDA context: every later row would fail the same way
    return m.status == "error" and ("illegal memory access" in m.note or "CUDA error: unspecified launch" in m.note)


def run_row(case: Case, methods, mode: str, device: str, warmup: int, rep: int, progress=print) -> Row:
    row = Row(case)
    if _PEER_DYNAMIC["dynamic"] is False:
        torch._dynamo.reset()  # each row compiles its own shapes; no guard chains from earlier rows
    t = _make_inputs(case, device, mode)
    factor = MODES[mode]
    for name in methods:
        m = measure_method(name, case, t, mode, device, warmup, rep)
        row.cells[name] = m
        if name.startswith("flashfuse") and m.result is not None:
            check = check_fp8(case, t, m.result) if name == "flashfuse_fp8" else check_against_sdpa(case, t, mode,
                                                                                                 m.result)
            if name != "flashfuse":
                check.worst = f"{name} {check.worst}"
            row.checks[name] = check
            m.result = None
        kernel = f" [{m.note}]" if name.startswith("flashfuse") and m.status == "ok" and m.note else ""
        progress(f" | {name}{kernel} {_cell(row, name, factor) if m.ms is not None else m.status}", end="")
        if _fatal(m):
            break
    del t
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def environment(device: str) -> dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "-"
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = "cpu" + (" (triton interpreter)" if os.environ.get("TRITON_INTERPRET") == "1" else "")
    return {"device": name, "torch": torch.__version__, "triton": triton_version}


def format_table(rows: list[Row], methods, mode: str) -> str:
    factor = MODES[mode]
    what = "forward" if mode == "fwd" else "forward+backward"
    header = ["case", *methods, "max abs err vs fp32 SDPA"]
    lines = [f"{what} TFLOP/s (peak MiB/GiB above the inputs)", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in sorted(rows, key=lambda r: r.case.natural()):
        cells = [row.case.label(), *(_cell(row, m, factor) for m in methods), _check_cell(row.check)]
        lines.append("| " + " | ".join(cells) + " |")
    kernels: dict[str, int] = {}
    for row in rows:
        cell = row.cells.get("flashfuse")
        if cell is not None and cell.status == "ok" and cell.note:
            kernels[cell.note] = kernels.get(cell.note, 0) + 1
    if kernels:
        lines += ["", "flashfuse ran " + ", ".join(f"{k} ({n} rows)" for k, n in kernels.items())]
    # the reasons, once per (method, reason)
    notes: dict[tuple[str, str], list[str]] = {}
    for row in rows:
        for m in methods:
            cell = row.cells.get(m)
            if cell is not None and cell.status not in ("ok", "skip") and cell.note:
                notes.setdefault((m, f"{cell.status}: {cell.note}"), []).append(row.case.label())
        if row.check is not None and row.check.note:
            notes.setdefault(("check", row.check.note), []).append(row.case.label())
    if notes:
        lines += ["", "notes:"]
        for (m, note), labels in notes.items():
            where = labels[0] if len(labels) == 1 else f"{labels[0]} and {len(labels) - 1} more"
            lines.append(f"- {m}, {where}: {note}")
    return "\n".join(lines)


def summary_line(rows: list[Row], methods, mode: str) -> str:
    """One line for logs and gpu_check.sh: flashfuse's kernel against the best peer of each row, and the checks."""
    factor = MODES[mode]
    ratios = []
    for row in rows:
        ours = row.tflops("flashfuse", factor)
        peers = [row.tflops(m, factor) for m in methods if not m.startswith("flashfuse")]
        peers = [p for p in peers if p]
        if ours and peers:
            ratios.append((ours / max(peers), row.case.label()))
    checks = [r.check.ok for r in rows if r.check is not None]
    text = f"summary ({mode}): {len(rows)} rows"
    if ratios:
        ratios.sort()
        median = ratios[len(ratios) // 2][0]
        text += (f"; flashfuse / best peer: median {median:.2f}x, worst {ratios[0][0]:.2f}x ({ratios[0][1]}), "
                 f"best {ratios[-1][0]:.2f}x ({ratios[-1][1]})")
    text += (f"; checks {checks.count(True)} ok, {checks.count(False)} FAIL, {checks.count(None)} unchecked")
    return text


def run(cases: list[Case], methods, *, mode: str = "fwd", device: str | None = None, warmup: int = 25,
        rep: int = 100, budget_s: float | None = None, csv_path: str | None = None, out=None) -> list[Row]:
    """Measure ``cases`` in order; each row printed (and written to the CSV) as soon as it is measured."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = out or sys.stdout
    env = environment(device)

    def progress(text: str, end: str = "\n") -> None:
        print(text, end=end, file=out, flush=True)

    compiled = "with dynamic shapes" if _PEER_DYNAMIC["dynamic"] is None else "per shape"
    progress(f"# {env['device']} | torch {env['torch']} | triton {env['triton']} | python "
             f"{platform.python_version()} | {time.strftime('%Y-%m-%d')} | mode {mode} | {len(cases)} cases | "
             f"peers compiled {compiled}")
    start = time.perf_counter()
    rows: list[Row] = []
    with contextlib.ExitStack() as stack:
        writer, csv_file = None, None
        if csv_path:
            csv_file = stack.enter_context(open(csv_path, "w", newline=""))
            writer = csv.DictWriter(csv_file, fieldnames=csv_header(methods))
            writer.writeheader()
            csv_file.flush()
        for index, case in enumerate(cases):
            elapsed = time.perf_counter() - start
            if budget_s is not None and elapsed > budget_s:
                left = cases[index:]
                progress(f"budget: {budget_s:.0f} s spent after {len(rows)} rows; {len(left)} rows not measured: "
                         + ", ".join(c.label() for c in left[:8]) + (" ..." if len(left) > 8 else ""))
                break
            progress(f"[{elapsed:6.1f}s] {case.label()}", end="")
            row = run_row(case, methods, mode, device, warmup, rep, progress)
            rows.append(row)
            progress(f" | check {_check_cell(row.check) or '-'}")
            if writer is not None:
                writer.writerow(csv_row(row, methods, mode, env))
                csv_file.flush()
            if any(_fatal(m) for m in row.cells.values()):
                progress("FATAL: a CUDA error poisoned the context; the remaining rows are not measured")
                break
    progress("")
    progress(format_table(rows, methods, mode))
    progress(summary_line(rows, methods, mode))
    return rows


# ----------------------------------------------------------------------------------------------- plot


def plot(csv_path: str, png_path: str | None = None) -> str | None:
    """TFLOP/s against S, one panel per (dtype, D, family), from a CSV this module wrote."""
    png_path = png_path or os.path.splitext(csv_path)[0] + ".png"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot (later: python -m flashfuse.bench --plot {csv_path})")
        return None
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        print(f"{csv_path} has no rows: no plot")
        return None
    methods = [c[: -len("_tflops")] for c in rows[0] if c.endswith("_tflops")]
    panels = sorted({(r["dtype"], int(r["D"])) for r in rows}, key=lambda p: (p[0] != "bf16", p[1]))
    families = [f for f in FAMILIES if any(r["family"] == f for r in rows)]
    fig, axes = plt.subplots(len(panels), len(families), squeeze=False,
                             figsize=(3.6 * len(families), 2.8 * len(panels)))
    for pi, (dtype, D) in enumerate(panels):
        for fi, family in enumerate(families):
            ax = axes[pi][fi]
            sel = sorted((r for r in rows if r["dtype"] == dtype and int(r["D"]) == D and r["family"] == family),
                         key=lambda r: int(r["S"]))
            for mi, m in enumerate(methods):
                pts = [(int(r["S"]), float(r[f"{m}_tflops"])) for r in sel if r[f"{m}_tflops"] not in ("", None)]
                if pts:
                    ax.plot(*zip(*pts), marker="o", color=f"C{mi}", label=m,
                            linewidth=2.2 if m == "flashfuse" else 1.2)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{dtype} D={D} {family}", fontsize=9)
            ax.grid(True, alpha=0.3)
            if fi == 0:
                ax.set_ylabel("TFLOP/s")
            if pi == len(panels) - 1:
                ax.set_xlabel("S")
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="upper right", fontsize=8)
    first = rows[0]
    fig.suptitle(f"{'forward' if first['mode'] == 'fwd' else 'forward+backward'} TFLOP/s, {first['device']}, "
                 f"torch {first['torch']}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.9, 0.96))
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    print(f"plot: {png_path}")
    return png_path


# ------------------------------------------------------------------------------------------------ CLI


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _names(text: str, valid, what: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in valid]
    if bad:
        raise SystemExit(f"unknown {what}: {', '.join(bad)} (valid: {', '.join(valid)})")
    return names


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m flashfuse.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=sorted(MODES), default="fwd")
    p.add_argument("--quick", action="store_true", help="bf16, D=128, S=1k,4k: full, causal, gqa_causal, window")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated, in column order (also: {', '.join(EXTRA_METHODS)})")
    p.add_argument("--dtypes", default=None, help="comma-separated: bf16, fp16 (fp32 too)")
    p.add_argument("--dims", default=None, help="head dims, comma-separated (default 64,128,256)")
    p.add_argument("--seqs", default=None, help="sequence lengths (default 512,...,16384)")
    p.add_argument("--cases", default=None, help=f"families, comma-separated: {', '.join(FAMILIES)}")
    p.add_argument("--tokens", type=int, default=16384, help="B = tokens // S (default 16384)")
    p.add_argument("--heads", type=int, default=16, help="heads of the non-GQA cases")
    p.add_argument("--gqa", default="32/8", help="query/KV heads of the GQA and window cases")
    p.add_argument("--window", type=int, default=4096, help="sliding window (at most a quarter of the longest S)")
    p.add_argument("--order", choices=("priority", "natural"), default="priority")
    p.add_argument("--budget-s", type=float, default=None, help="start no new row after this many seconds")
    p.add_argument("--dynamic", action="store_true",
                   help="compile flex/torch.compile with dynamic shapes: fewer compiles, peers maybe slower")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetitions, ms")
    p.add_argument("--csv", default=None, help="write the rows here (each as it is measured)")
    p.add_argument("--png", default=None, help="the plot (default: beside the CSV)")
    p.add_argument("--plot", default=None, metavar="CSV", help="only draw the plot of an earlier CSV")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot:
        return 0 if plot(args.plot, args.png) else 1
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        # before flashfuse's kernels are imported: without a GPU they run in the Triton interpreter
        os.environ.setdefault("TRITON_INTERPRET", "1")
    methods = _names(args.methods, METHODS + EXTRA_METHODS, "method")
    if args.quick:
        dtypes, dims, seqs = ["bf16"], [128], [1024, 4096]
        families = ["full", "causal", "gqa_causal", "window"]
    else:
        dtypes, dims, seqs, families = ["bf16", "fp16"], [64, 128, 256], [512, 1024, 2048, 4096, 8192, 16384], FAMILIES
    dtypes = _names(args.dtypes, DTYPES, "dtype") if args.dtypes else dtypes
    dims = _ints(args.dims) if args.dims else dims
    seqs = _ints(args.seqs) if args.seqs else seqs
    families = _names(args.cases, FAMILIES, "case family") if args.cases else list(families)
    hq, hkv = (int(x) for x in args.gqa.split("/"))
    cases = build_cases([DTYPES[d] for d in dtypes], dims, seqs, families, tokens=args.tokens, heads=args.heads,
                        gqa=(hq, hkv), window=args.window)
    if args.order == "natural":
        cases.sort(key=Case.natural)
    # each row compiles new shapes for flex and torch.compile; the default limit (8) would send later rows
    # to eager code
    for name in ("recompile_limit", "cache_size_limit"):
        try:
            setattr(torch._dynamo.config, name, 1 << 12)
            break
        except AttributeError:
            continue
    _PEER_DYNAMIC["dynamic"] = None if args.dynamic else False
    rows = run(cases, methods, mode=args.mode, device=device, warmup=args.warmup, rep=args.rep,
               budget_s=args.budget_s, csv_path=args.csv)
    if args.csv or args.png:
        if args.csv:
            plot(args.csv, args.png)
        else:
            print("--png needs --csv (the plot is drawn from the CSV)")
    failed = [r for r in rows if r.check is not None and r.check.ok is False]
    fatal = any(_fatal(m) for r in rows for m in r.cells.values())
    for r in failed:
        c = r.check
        print(f"CORRECTNESS FAILURE: {r.case.label()}: flashfuse {c.worst} max abs error {c.err:.3e} > 2 x SDPA's "
              f"{c.peer_err:.3e} + {EPS[r.case.dtype]:.0e} x max|ref| {c.note}", file=sys.stderr)
    # flashfuse itself raising is a failure too (a peer raising is a note)
    broken = [(r, m) for r in rows for m in methods if m.startswith("flashfuse") and r.cells.get(m) is not None
              and r.cells[m].status == "error"]
    for r, m in broken:
        print(f"FLASHFUSE ERROR: {r.case.label()}: {m}: {r.cells[m].note}", file=sys.stderr)
    return 1 if failed or fatal or broken else 0


if __name__ == "__main__":
    sys.exit(main())
