"""Flash-attention forward for Hopper (sm90): tensor descriptors (TMA), causal staging, tuned configs.

The fast common case of ``flash_fwd.flash_attention_forward`` -- fp16/bf16, a power-of-two head dim
16..256 (``Dv == D``), no mask tensor, no sinks -- written for what Triton 3.6 does well on an H100:

* **TMA.** Q, K, V and the output move through tensor descriptors: with the ``host`` knob (``HOST_DESC``;
  the tuned configs have it) four descriptors built on the host over the whole ``[B, H, S, D]`` tensors,
  loaded in ``[1, 1, rows, D]`` boxes at ``(b, h, row, 0)``; without it, built on the device in every program,
  one per (batch, head): ``shape = [S, D]``, ``strides = [stride_s, 1]``. The host ones saved 5-28% on the
  H200 (most at short sequences); they cost ~20 us of Python per call, so calls under ``_HOST_MIN_SCORES``
  and tensors with a broadcast (stride-0) dim keep the device ones. Either way the descriptor's bounds do the
  ragged ends (loads past ``S`` read zeros, stores past ``Sq`` are clipped), so any strides work as long as
  TMA accepts them: last dim contiguous, the other strides and the base 16-byte aligned (``supports``
  checks). ``USE_TMA=False`` is the same kernel with plain pointer loads: the fallback if the TMA build
  fails to compile, and a second path the CPU tests exercise.
* **Causal staging.** Key blocks are visited in three phases (``flash_fwd._key_blocks``): the left edge of the
  band, the blocks fully inside the band for every row of the tile (no index arithmetic, no ``-inf``
  bookkeeping: the tutorial's ``max(qk) * scale`` then one FMA ``qk * scale - m``), and the right edge
  (the causal diagonal and the ragged end of the keys). Blocks outside the band are never visited.
* **exp2** with ``log2(e) * scale`` folded into the score multiply; ``lse`` is converted back to the
  natural log at the end.
* **Heavy tiles first** for right-bounded bands (causal): query blocks are launched from the last to the
  first, so the short tiles fill the tail of the grid.
* **Knobs** (constexpr, picked per config): ``WARP_SPECIALIZE`` puts ``warp_specialize=True`` on the
  full-block loop (Triton 3.6's Hopper auto-WS; needs on-device descriptors, which is what we build),
  ``PERSISTENT`` runs one program per SM walking the tiles.

Semantics are ``flash_fwd.flash_attention_forward``'s (and ``flashfuse.testing.attention_ref``'s) for
this subset: GQA by the head map ``h -> h // (Hq // Hkv)``; ``-window_left <= j - i <= window_right``
(None = unbounded); optional ``softcap`` (``_common.tanh``, as flash_fwd.py); ``lse`` natural,
float32; a row with nothing kept is NaN with ``lse = -inf`` for a ``-inf`` ``mask_fill``, and the mean
of ``v`` with ``lse = mask_fill + log(Sk)`` for a finite one (rule 6, epilogue only).

Config choice (``_choose_config``): an explicit ``config=`` argument or ``FLASHFUSE_SM90_CONFIG``
(``"128,128,8,2[,ws][,persistent][,notma][,host]"``) wins; then ``TUNED_CONFIGS`` (paste
``bench/tune_fwd.py``'s output there); then an autotune over ``candidate_configs`` (cached across
processes in ``~/.cache/flashfuse/fwd_sm90_autotune.json``; ``FLASHFUSE_SM90_AUTOTUNE=0`` turns it
off); then a fixed default. A config that does not compile falls back (WS off, then persistent off,
then plain loads) with a warning; one that overflows shared memory shrinks.

Credits: Tri Dao, FlashAttention-2 (2023) and FlashAttention-3 (Shah et al., 2024: heavy-first causal
ordering, producer/consumer warp specialization); Philippe Tillet and the Triton authors,
``python/tutorials/06-fused-attention.py`` (descriptor loads, staging, the scaled-max trick).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import threading
import warnings
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

try:  # triton >= 3.4 (the GPU image's 3.6 and CI's 3.9 both have it)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton: the host-descriptor knob falls back to on-device ones
    TensorDescriptor = None

from flashfuse.kernels._common import tanh as _tanh
from flashfuse.kernels.flash_fwd import _key_blocks  # the same three-phase key-block split as flash_fwd

__all__ = [
    "TUNED_CONFIGS",
    "Sm90Config",
    "candidate_configs",
    "flash_attention_forward_sm90",
    "supports",
]

log = logging.getLogger(__name__)

_LOG2E = 1.4426950408889634  # exp(x) == exp2(x * log2(e))
_HEAD_DIMS = (16, 32, 64, 128, 256)
_DTYPES = (torch.float16, torch.bfloat16)
_TMA_ALIGN = 16  # bytes: TMA wants the base address and every non-unit stride aligned to 16 bytes


# ----------------------------------------------------------------------------------------------
# @triton.jit helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, INTERPRET_BF16: tl.constexpr):
    """``a @ b`` in fp32.

    NOTE: under triton 3.9's interpreter bf16 tensors are raw uint16 and ``tl.dot`` multiplies the bit
    patterns as integers (flash_fwd.py's ``_mma`` has the numbers); upcasting first is exact, as the GPU's
    bf16 MMA forms exact products too.
    """
    if INTERPRET_BF16:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


@triton.jit
def _dot_acc(a, b, acc, INTERPRET_BF16: tl.constexpr):
    """``acc + a @ b``: on the GPU the accumulator goes into the MMA (wgmma accumulates in place)."""
    if INTERPRET_BF16:
        c = acc + tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, acc)
    return c


@triton.jit
def _downcast(x, dtype: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    """``x.to(dtype)``, round-to-nearest-even also under the interpreter (which truncates to bf16)."""
    if INTERPRET_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (((bits >> 16) & 1) + 0x7FFF)
        x = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _load_tile(desc, base, stride_row, start, rows, off_b, off_h, S,
               BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, EDGE: tl.constexpr,
               USE_TMA: tl.constexpr, HOST_DESC: tl.constexpr):  # fmt: skip
    """Rows ``[start, start + BLOCK)`` of one head, ``[BLOCK, HEAD_DIM]``; rows past ``S`` read as zeros.

    Three ways in: a host descriptor over the whole 4-D tensor (indexed by batch, head, row; its bounds
    zero-fill), an on-device descriptor over this head's ``[S, D]`` (built in ``_attn_tile``), or plain pointer
    loads (masked on EDGE blocks only: a full block never crosses ``S``).
    """
    if USE_TMA:
        if HOST_DESC:
            t = desc.load([off_b, off_h, start, 0]).reshape(BLOCK, HEAD_DIM)
        else:
            t = desc.load([start, 0])
    else:
        offs = rows[:, None] * stride_row + tl.arange(0, HEAD_DIM)[None, :]
        ptrs = base + tl.cast(start, tl.int64) * stride_row + offs
        if EDGE:
            t = tl.load(ptrs, mask=(start + rows)[:, None] < S, other=0.0)
        else:
            t = tl.load(ptrs)
    return t


@triton.jit
def _attn_blocks(
    acc, l_i, m_i, q,
    desc_k, desc_v, K_head, V_head, stride_kn, stride_vn, off_b, off_hkv,
    start, end, offs_m, offs_n,
    Sk, qk_scale, softcap_in, softcap_out, window_left, window_right,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, EDGE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    USE_TMA: tl.constexpr, HOST_DESC: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, INTERPRET_BF16: tl.constexpr,
):  # fmt: skip
    """Online softmax over key blocks ``[start, end)`` (``start`` a multiple of BLOCK_N).

    ``EDGE`` blocks straddle a band edge or the end of the keys: scores outside are ``-inf`` and a row with
    nothing kept yet needs the "safe max". Non-EDGE blocks are inside the band for every row of the tile:
    every score is finite, so ``m`` is finite after the block and no ``-inf`` handling is needed.
    """
    for start_n in tl.range(start, end, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        # -- K block [BLOCK_N, D] --
        k = _load_tile(desc_k, K_head, stride_kn, start_n, offs_n, off_b, off_hkv, Sk,
                       BLOCK_N, HEAD_DIM, EDGE, USE_TMA, HOST_DESC)  # fmt: skip
        qk = _dot(q, k.T, INTERPRET_BF16)

        # -- scores in base 2, online softmax --
        if HAS_SOFTCAP:
            s = _tanh(qk * softcap_in) * softcap_out
        else:
            s = qk
        if EDGE:
            diff = cols[None, :] - offs_m[:, None]
            keep = (diff >= -window_left) & (diff <= window_right) & (cols < Sk)[None, :]
            if HAS_SOFTCAP:
                s = tl.where(keep, s, float("-inf"))
            else:
                s = tl.where(keep, s * qk_scale, float("-inf"))
            m_ij = tl.maximum(m_i, tl.max(s, 1))
            # safe max: a row with nothing kept so far keeps m = -inf; exp2(-inf - 0) = 0 for all its scores
            m_safe = tl.where(m_ij == float("-inf"), 0.0, m_ij)
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
        else:
            if HAS_SOFTCAP:
                m_ij = tl.maximum(m_i, tl.max(s, 1))
                p = tl.math.exp2(s - m_ij[:, None])
            else:
                # scale > 0 (supports() checks), so max(qk) * scale == max(qk * scale): BLOCK_M multiplies
                # instead of BLOCK_M * BLOCK_N, and the exponent is one FMA per score
                m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
                p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
            alpha = tl.math.exp2(m_i - m_ij)
        l_ij = tl.sum(p, 1)
        acc = acc * alpha[:, None]

        # -- V block [BLOCK_N, D] --
        v = _load_tile(desc_v, V_head, stride_vn, start_n, offs_n, off_b, off_hkv, Sk,
                       BLOCK_N, HEAD_DIM, EDGE, USE_TMA, HOST_DESC)  # fmt: skip
        acc = _dot_acc(_downcast(p, v.dtype, INTERPRET_BF16), v, acc, INTERPRET_BF16)
        # l and m last: fewer registers live across the two dots (as the tutorial orders it)
        l_i = l_i * alpha + l_ij
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def _attn_tile(
    Q, K, V, Out, LSE, VMean, DescQ, DescK, DescV, DescO,
    pid_m, off_h, off_b,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om, stride_lb, stride_lh, stride_vmb, stride_vmh,
    GROUPS, Sq, Sk, qk_scale, softcap_in, softcap_out, window_left, window_right, fill_thr, fill_lse,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, FINITE_FILL: tl.constexpr, USE_TMA: tl.constexpr, HOST_DESC: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr, INTERPRET_BF16: tl.constexpr,
):  # fmt: skip
    """One (query block, head, batch) tile: load Q once, walk its band of key blocks, write out and lse."""
    off_hkv = off_h // GROUPS  # GQA: query head h reads key/value head h // (Hq // Hkv)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    # per-(batch, head) bases in 64 bits: B * H * S * D passes 2^31 elements at long contexts
    b64 = tl.cast(off_b, tl.int64)
    h64 = tl.cast(off_h, tl.int64)
    hkv64 = tl.cast(off_hkv, tl.int64)
    Q_head = Q + b64 * stride_qb + h64 * stride_qh
    K_head = K + b64 * stride_kb + hkv64 * stride_kh
    V_head = V + b64 * stride_vb + hkv64 * stride_vh
    O_head = Out + b64 * stride_ob + h64 * stride_oh

    if USE_TMA:
        if HOST_DESC:
            # descriptors built on the host over the whole [B, H, S, D] tensors: nothing to build here
            desc_q = DescQ
            desc_k = DescK
            desc_v = DescV
            desc_o = DescO
        else:
            # on-device descriptors: the bounds [Sq | Sk, D] zero-fill ragged loads and clip ragged stores
            desc_q = tl.make_tensor_descriptor(Q_head, [Sq, HEAD_DIM], [stride_qm, 1], [BLOCK_M, HEAD_DIM])
            desc_k = tl.make_tensor_descriptor(K_head, [Sk, HEAD_DIM], [stride_kn, 1], [BLOCK_N, HEAD_DIM])
            desc_v = tl.make_tensor_descriptor(V_head, [Sk, HEAD_DIM], [stride_vn, 1], [BLOCK_N, HEAD_DIM])
            desc_o = tl.make_tensor_descriptor(O_head, [Sq, HEAD_DIM], [stride_om, 1], [BLOCK_M, HEAD_DIM])
    else:
        desc_q = None
        desc_k = None
        desc_v = None
        desc_o = None
    q = _load_tile(desc_q, Q_head, stride_qm, start_m, tl.arange(0, BLOCK_M), off_b, off_h, Sq,
                   BLOCK_M, HEAD_DIM, True, USE_TMA, HOST_DESC)  # fmt: skip

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    lo, full_lo, full_hi, hi = _key_blocks(start_m, Sq, Sk, window_left, window_right, BLOCK_M, BLOCK_N)
    # fmt: off
    acc, l_i, m_i = _attn_blocks(
        acc, l_i, m_i, q, desc_k, desc_v, K_head, V_head, stride_kn, stride_vn, off_b, off_hkv,
        lo, full_lo, offs_m, offs_n, Sk, qk_scale, softcap_in, softcap_out, window_left, window_right,
        HEAD_DIM, BLOCK_N, True, HAS_SOFTCAP, USE_TMA, HOST_DESC, False, INTERPRET_BF16,
    )
    # the bulk of the work: warp specialization (when asked) goes on this loop only
    acc, l_i, m_i = _attn_blocks(
        acc, l_i, m_i, q, desc_k, desc_v, K_head, V_head, stride_kn, stride_vn, off_b, off_hkv,
        full_lo, full_hi, offs_m, offs_n, Sk, qk_scale, softcap_in, softcap_out, window_left, window_right,
        HEAD_DIM, BLOCK_N, False, HAS_SOFTCAP, USE_TMA, HOST_DESC, WARP_SPECIALIZE, INTERPRET_BF16,
    )
    acc, l_i, m_i = _attn_blocks(
        acc, l_i, m_i, q, desc_k, desc_v, K_head, V_head, stride_kn, stride_vn, off_b, off_hkv,
        full_hi, hi, offs_m, offs_n, Sk, qk_scale, softcap_in, softcap_out, window_left, window_right,
        HEAD_DIM, BLOCK_N, True, HAS_SOFTCAP, USE_TMA, HOST_DESC, False, INTERPRET_BF16,
    )
    # fmt: on

    # -- epilogue: rows with nothing kept have l = 0, acc = 0: out = 0 / 0 = NaN, lse = -inf (rule 6, -inf fill)
    out = acc / l_i[:, None]
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # base 2 -> natural log
    if FINITE_FILL:
        # a finite fill made eager see a row of equal scores: the mean of v over all keys (flash_fwd.py's rule)
        empty = (l_i == 0.0) | (m_i <= fill_thr)
        vmean = tl.load(VMean + b64 * stride_vmb + hkv64 * stride_vmh + offs_d)
        out = tl.where(empty[:, None], vmean[None, :], out)
        lse = tl.where(empty, fill_lse, lse)
    out = _downcast(out, Out.dtype.element_ty, INTERPRET_BF16)
    if USE_TMA:
        if HOST_DESC:
            desc_o.store([off_b, off_h, start_m, 0], out.reshape(1, 1, BLOCK_M, HEAD_DIM))
        else:
            desc_o.store([start_m, 0], out)
    else:
        o_ptrs = O_head + offs_m.to(tl.int64)[:, None] * stride_om + offs_d[None, :]
        tl.store(o_ptrs, out, mask=(offs_m < Sq)[:, None])
    tl.store(LSE + b64 * stride_lb + h64 * stride_lh + offs_m, lse, mask=offs_m < Sq)


# window bounds, the tile count and the order flag change per call: no recompile for each (ints equal to 1
# or divisible by 16 are otherwise specialized into the kernel's cache key)
@triton.jit(do_not_specialize=["window_left", "window_right", "num_m_blocks", "num_tiles", "reverse_m"])
def _attn_fwd_sm90(
    Q, K, V, Out, LSE, VMean,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om, stride_lb, stride_lh, stride_vmb, stride_vmh,
    Hq, GROUPS, Sq, Sk, num_m_blocks, num_tiles, reverse_m,
    qk_scale, softcap_in, softcap_out, window_left, window_right, fill_thr, fill_lse,
    DescQ, DescK, DescV, DescO,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, FINITE_FILL: tl.constexpr, USE_TMA: tl.constexpr, HOST_DESC: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr, PERSISTENT: tl.constexpr, INTERPRET_BF16: tl.constexpr,
):  # fmt: skip
    # Scalars may arrive as fp64 from Inductor-generated launchers; keep all score math in fp32.
    qk_scale = tl.cast(qk_scale, tl.float32)
    softcap_in = tl.cast(softcap_in, tl.float32)
    softcap_out = tl.cast(softcap_out, tl.float32)
    fill_thr = tl.cast(fill_thr, tl.float32)
    fill_lse = tl.cast(fill_lse, tl.float32)
    if PERSISTENT:
        # one program per SM walks tiles t = pid, pid + P, ...; the query block varies fastest, so programs
        # running side by side share a head's K/V in L2 (as the non-persistent grid's order does)
        for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=False):
            pid = tile % num_m_blocks
            bh = tile // num_m_blocks
            pid_m = tl.where(reverse_m != 0, num_m_blocks - 1 - pid, pid)
            # fmt: off
            _attn_tile(
                Q, K, V, Out, LSE, VMean, DescQ, DescK, DescV, DescO, pid_m, bh % Hq, bh // Hq,
                stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                stride_ob, stride_oh, stride_om, stride_lb, stride_lh, stride_vmb, stride_vmh,
                GROUPS, Sq, Sk, qk_scale, softcap_in, softcap_out, window_left, window_right, fill_thr, fill_lse,
                HEAD_DIM, BLOCK_M, BLOCK_N, HAS_SOFTCAP, FINITE_FILL, USE_TMA, HOST_DESC, WARP_SPECIALIZE,
                INTERPRET_BF16,
            )
            # fmt: on
    else:
        pid = tl.program_id(0)
        # heavy tiles first for a right-bounded band (causal): the last query block has the most keys
        pid_m = tl.where(reverse_m != 0, num_m_blocks - 1 - pid, pid)
        # fmt: off
        _attn_tile(
            Q, K, V, Out, LSE, VMean, DescQ, DescK, DescV, DescO, pid_m, tl.program_id(1), tl.program_id(2),
            stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
            stride_ob, stride_oh, stride_om, stride_lb, stride_lh, stride_vmb, stride_vmh,
            GROUPS, Sq, Sk, qk_scale, softcap_in, softcap_out, window_left, window_right, fill_thr, fill_lse,
            HEAD_DIM, BLOCK_M, BLOCK_N, HAS_SOFTCAP, FINITE_FILL, USE_TMA, HOST_DESC, WARP_SPECIALIZE,
            INTERPRET_BF16,
        )
        # fmt: on


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------


# the boolean knobs in TUNED_CONFIGS' / the cache's tuple order, with their defaults and their parse() flags
_FLAGS = (("ws", False, "ws"), ("persistent", False, "persistent"), ("tma", True, "notma"),
          ("host", False, "host"))  # fmt: skip


@dataclass(frozen=True)
class Sm90Config:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    ws: bool = False  # warp_specialize=True on the full-block loop
    persistent: bool = False  # one program per SM walking the tiles
    tma: bool = True  # tensor descriptors (False: plain pointer loads)
    host: bool = False  # TMA through host-built 4-D descriptors (False: built on the device per program)

    def __str__(self) -> str:
        flags = "".join(f" {text}" for name, default, text in _FLAGS if getattr(self, name) != default)
        return f"{self.block_m}x{self.block_n} w{self.num_warps} s{self.num_stages}{flags}"

    def as_tuple(self) -> tuple:
        """``(block_m, block_n, num_warps, num_stages, ws, persistent[, tma[, host]])``: ``TUNED_CONFIGS``' format
        (trailing knobs at their defaults are left out)."""
        flags = [getattr(self, name) for name, _, _ in _FLAGS]
        while len(flags) > 2 and flags[-1] == _FLAGS[len(flags) - 1][1]:
            flags.pop()
        return (self.block_m, self.block_n, self.num_warps, self.num_stages, *flags)

    @classmethod
    def from_tuple(cls, t) -> Sm90Config:
        flags = {name: bool(t[4 + i]) if 4 + i < len(t) else default for i, (name, default, _) in enumerate(_FLAGS)}
        return cls(*t[:4], **flags)

    @classmethod
    def parse(cls, text: str) -> Sm90Config:
        """``"128,128,8,2"`` plus any of ``ws``, ``persistent``, ``notma``, ``host``, comma separated."""
        parts = [p.strip().lower() for p in text.split(",") if p.strip()]
        try:
            bm, bn, w, s = (int(p) for p in parts[:4])
        except ValueError:
            raise ValueError(f"config {text!r}: expected 'BLOCK_M,BLOCK_N,num_warps,num_stages[,ws][,persistent]'")
        flags = set(parts[4:])
        unknown = flags - {text for _, _, text in _FLAGS}
        if unknown:
            raise ValueError(f"config {text!r}: unknown flags {sorted(unknown)}")
        return cls(bm, bn, w, s, **{name: (text in flags) != default for name, default, text in _FLAGS})


def _C(bm, bn, w, s, **kw) -> Sm90Config:
    return Sm90Config(bm, bn, w, s, **kw)


# The pruned candidate lists, per head dim. Shared memory (H100: 227 KB per block) bounds the stages:
# Q tile + stages * (K + V tiles), e.g. D=128 128x128: 32 KB + s * 64 KB, so s <= 3 (s=3 is tight, the
# launcher shrinks it if Triton's own buffers push it over); D=256 128x64: 64 KB + s * 64 KB, s <= 2.
# Eight warps only pay with a 128x128-sized tile (the tutorial prunes w8 below that on Hopper).
_CANDIDATES: dict[int, list[Sm90Config]] = {
    16: [_C(128, 64, 4, 3), _C(128, 128, 8, 3), _C(64, 64, 4, 3)],
    32: [_C(128, 64, 4, 3), _C(128, 128, 8, 3), _C(64, 64, 4, 3)],
    64: [_C(128, 64, 4, 3), _C(128, 128, 8, 3), _C(128, 128, 8, 2), _C(128, 64, 4, 4), _C(64, 64, 4, 3)],
    128: [_C(128, 128, 8, 2), _C(128, 128, 8, 3), _C(128, 64, 8, 3), _C(128, 64, 4, 3), _C(64, 64, 4, 3)],
    256: [_C(128, 64, 8, 2), _C(128, 32, 8, 2), _C(64, 64, 4, 2), _C(128, 128, 8, 1), _C(64, 32, 4, 3)],
}
# Warp-specialized variants (Triton 3.6's Hopper auto-WS: one producer group feeding the consumers).
_CANDIDATES_WS: dict[int, list[Sm90Config]] = {
    64: [_C(128, 128, 4, 2, ws=True), _C(128, 64, 4, 3, ws=True)],
    128: [_C(128, 128, 4, 2, ws=True), _C(128, 128, 8, 2, ws=True), _C(128, 64, 4, 3, ws=True)],
    256: [_C(128, 64, 4, 2, ws=True), _C(128, 64, 8, 2, ws=True)],
}
_DEFAULT: dict[int, Sm90Config] = {
    16: _C(128, 64, 4, 3),
    32: _C(128, 64, 4, 3),
    64: _C(128, 64, 4, 3, host=True),  # the H200 sweep's winners (TUNED_CONFIGS)
    128: _C(128, 128, 8, 3, host=True),
    256: _C(128, 64, 8, 2, host=True),
}

# (head dim, right-bounded band (causal), key-length bucket) -> (block_m, block_n, num_warps, num_stages, ws,
# persistent[, tma[, host]]). Paste `python bench/tune_fwd.py`'s dict here; measured entries beat autotuning and the
# default. Measured by bench/tune_fwd.py on an NVIDIA H200 (torch 2.11, triton 3.6), 2026-11-30, bf16, H=16,
# B*S=32k (bench/results/2026-11-30-h200/); buckets without a comment were not measured and take the winner of a
# measured neighbour. Host descriptors won every measured case but D=128 causal at 16k.
_H = (False, False, True, True)  # ws, persistent, tma, host
TUNED_CONFIGS: dict[tuple[int, bool, int], tuple] = {
    (64, False, 1024): (128, 64, 4, 3, *_H),  # 382 TFLOP/s, cudnn 431 (0.89x)
    (64, False, 2048): (128, 64, 4, 3, *_H),
    (64, False, 4096): (128, 64, 4, 3, *_H),  # 434 TFLOP/s, cudnn 481 (0.90x)
    (64, False, 8192): (128, 64, 4, 3, *_H),
    (64, True, 1024): (128, 64, 4, 3, *_H),  # 276 TFLOP/s, cudnn 335 (0.82x)
    (64, True, 2048): (128, 64, 4, 3, *_H),
    (64, True, 4096): (128, 64, 4, 3, *_H),  # 384 TFLOP/s, cudnn 434 (0.89x)
    (64, True, 8192): (128, 64, 4, 3, *_H),
    (128, False, 1024): (128, 128, 8, 3, *_H),  # 419 TFLOP/s, cudnn 611 (0.69x)
    (128, False, 2048): (128, 128, 8, 3, *_H),
    (128, False, 4096): (128, 128, 8, 3, *_H),  # 502 TFLOP/s, cudnn 674 (0.75x)
    (128, False, 8192): (128, 128, 8, 3, *_H),
    (128, False, 16384): (128, 128, 8, 3, *_H),  # 510 TFLOP/s, cudnn 604 (0.84x)
    (128, True, 1024): (128, 64, 8, 3, *_H),  # 294 TFLOP/s, cudnn 442 (0.66x)
    (128, True, 2048): (128, 128, 8, 3, *_H),
    (128, True, 4096): (128, 128, 8, 3, *_H),  # 437 TFLOP/s, cudnn 588 (0.74x)
    (128, True, 8192): (128, 128, 8, 3, *_H),
    (128, True, 16384): (128, 128, 8, 3, False, False),  # 493 TFLOP/s, cudnn 573 (0.86x)
    (256, False, 1024): (128, 64, 8, 2, *_H),  # 449 TFLOP/s, cudnn 598 (0.75x)
    (256, False, 2048): (128, 64, 8, 2, *_H),
    (256, False, 4096): (128, 64, 8, 2, *_H),  # 551 TFLOP/s, cudnn 660 (0.83x)
    (256, False, 8192): (128, 64, 8, 2, *_H),
    (256, True, 1024): (128, 64, 8, 2, *_H),  # 347 TFLOP/s, cudnn 506 (0.69x)
    (256, True, 2048): (128, 64, 8, 2, *_H),
    (256, True, 4096): (128, 64, 8, 2, *_H),  # 475 TFLOP/s, cudnn 599 (0.79x)
    (256, True, 8192): (128, 64, 8, 2, *_H),
}


def candidate_configs(head_dim: int, *, ws: bool | None = None, persistent: bool = True) -> list[Sm90Config]:
    """The pruned list the autotuner and ``bench/tune_fwd.py`` try for one head dim.

    ``ws=None`` adds the warp-specialized variants only when ``FLASHFUSE_SM90_WS=1`` (they are experimental
    on Hopper in Triton 3.6: the sweep measures them, the default autotune does not risk their compile).
    ``persistent`` adds one persistent variant of the first config. The first three configs come twice: with
    descriptors built on the device and with host-built ones (``host``; on the H200 they won every measured case
    but one, D = 128 by 5-28%, most at short sequences).
    """
    if ws is None:
        ws = os.environ.get("FLASHFUSE_SM90_WS", "0") == "1"
    out = list(_CANDIDATES[head_dim])
    if persistent:
        out.append(replace(out[0], persistent=True))
    out += [replace(base, host=True) for base in _CANDIDATES[head_dim][:3]]
    if ws:
        out += _CANDIDATES_WS.get(head_dim, [])
    return out


def _sk_bucket(sk: int) -> int:
    """Key lengths by powers of two, 256..16384 (timings barely move inside a bucket)."""
    return min(max(triton.next_power_of_2(max(sk, 1)), 256), 16384)


def _smaller(cfg):
    """The next config after a shared-memory overflow: fewer stages, then smaller tiles."""
    if cfg.num_stages > 2:
        return replace(cfg, num_stages=cfg.num_stages - 1)
    if cfg.block_n > 32:
        return replace(cfg, block_n=cfg.block_n // 2)
    if cfg.block_m > 64:
        return replace(cfg, block_m=cfg.block_m // 2)
    if cfg.num_stages > 1:
        return replace(cfg, num_stages=1)
    return None


def _plainer(cfg: Sm90Config) -> Sm90Config | None:
    """The next config after a compile failure: drop WS, host descriptors, the persistent loop, then TMA (of the
    knobs ``cfg`` has: ``flash_fwd_fp8``'s configs have WS, host and TMA, no persistent)."""
    for name in ("ws", "host", "persistent", "tma"):
        if getattr(cfg, name, False):
            return replace(cfg, **{name: False})
    return None


# ----------------------------------------------------------------------------------------------
# support predicate
# ----------------------------------------------------------------------------------------------


def _interpreting() -> bool:
    return type(_attn_fwd_sm90).__name__ == "InterpretedFunction"


def _tma_reason(name: str, t: torch.Tensor) -> str | None:
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        return f"{name}: last dim not contiguous (stride {t.stride(-1)}); TMA needs stride 1"
    if t.data_ptr() % _TMA_ALIGN:
        return f"{name}: data pointer not {_TMA_ALIGN}-byte aligned"
    for dim in range(t.dim() - 1):
        if t.shape[dim] > 1 and (t.stride(dim) * t.element_size()) % _TMA_ALIGN:
            return f"{name}: stride {t.stride(dim)} of dim {dim} is not a multiple of {_TMA_ALIGN} bytes"
    return None


def supports(
    q,
    k,
    v,
    mask=None,
    *,
    scale: float | None = None,
    window_left: int | None = None,
    window_right: int | None = None,
    softcap: float = 0.0,
    mask_fill: float = float("-inf"),
    sinks=None,
) -> str | None:
    """None if ``flash_attention_forward_sm90`` computes this call, else the reason it does not.

    Takes the op's arguments (a ``mask`` or ``sinks`` is refused, not ignored), so a dispatcher can ask
    with what it has. Cheap: shapes, dtypes, strides and the device only.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            return f"{name}: expected a 4-D tensor"
    if mask is not None:
        return "a mask tensor (only band structure is supported)"
    if sinks is not None:
        return "attention sinks"
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
        return f"dtype {q.dtype}/{k.dtype}/{v.dtype}: needs float16 or bfloat16 for all three"
    if not (q.device == k.device == v.device):
        return "q/k/v on different devices"
    if q.device.type == "cuda":
        if _interpreting():
            return "TRITON_INTERPRET=1 with CUDA tensors"
        major, _ = torch.cuda.get_device_capability(q.device)
        if major != 9:
            return f"compute capability {major}.x: tuned for sm90 (Hopper) only"
    elif not _interpreting():
        return f"device {q.device}: needs CUDA (or TRITON_INTERPRET=1)"
    B, Hq, Sq, D = q.shape
    Bk, Hkv, Sk, Dk = k.shape
    if Bk != B or tuple(v.shape[:3]) != (B, Hkv, Sk):
        return "k/v shapes do not match q"
    if Dk != D or v.shape[3] != D:
        return f"head dims q {D}, k {Dk}, v {v.shape[3]}: needs one head dim for all three"
    if D not in _HEAD_DIMS:
        return f"head dim {D}: needs one of {_HEAD_DIMS}"
    if Hkv == 0 or Hq % Hkv:
        return f"Hq ({Hq}) is not a multiple of Hkv ({Hkv})"
    if Sk == 0:
        return "no keys (Sk = 0)"
    if max(Sq, Sk) >= 2**31 - 2**20 or B >= 65536 or Hq >= 65536:
        return "a dimension past the grid / int32 limits"
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        return f"scale {scale!r}: needs a finite float > 0"
    if not (isinstance(softcap, (int, float)) and math.isfinite(softcap) and softcap >= 0):
        return f"softcap {softcap!r}: needs a finite float >= 0"
    if isinstance(mask_fill, bool) or not isinstance(mask_fill, (int, float)) or math.isnan(mask_fill):
        return f"mask_fill {mask_fill!r}"
    for name, w in (("window_left", window_left), ("window_right", window_right)):
        if w is not None and (isinstance(w, bool) or not isinstance(w, int)):
            return f"{name} {w!r}: needs an int or None"
    for name, t in (("q", q), ("k", k), ("v", v)):
        reason = _tma_reason(name, t)
        if reason:
            return reason
    return None


# ----------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------

_ALLOCATOR_LOCK = threading.Lock()


def _ensure_allocator(device: torch.device) -> None:
    """On-device descriptors need a global scratch buffer from ``triton.set_allocator``.

    Set only when nothing is set in this context (a user's allocator wins); the allocator is a ContextVar,
    so a thread launching for the first time gets one here too.
    """
    try:
        from triton.runtime import _allocation
    except ImportError:  # pragma: no cover - layout of another triton version
        triton.set_allocator(_torch_alloc)
        return
    current = _allocation._allocator.get()
    if isinstance(current, _allocation.NullAllocator):
        with _ALLOCATOR_LOCK:
            triton.set_allocator(_torch_alloc)


def _torch_alloc(size: int, alignment: int, stream):
    # launches run inside ``torch.cuda.device(q.device)``, so the current device is the tensors' device
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() and not _interpreting() \
        else torch.device("cpu")
    return torch.empty(size, dtype=torch.int8, device=device)


@dataclass
class _Launch:
    """Everything but the config: built once per call, launched once (or per autotune candidate)."""

    args: tuple
    meta: dict
    Sq: int
    Hq: int
    B: int
    device: torch.device
    host_ok: bool = False  # host descriptors can encode q, k, v, out and the call is big enough to pay for them

    def run(self, cfg: Sm90Config) -> None:
        num_m = triton.cdiv(self.Sq, cfg.block_m)
        num_tiles = num_m * self.B * self.Hq
        if cfg.persistent:
            grid = (min(num_tiles, _num_sms(self.device)),)
        else:
            grid = (num_m, self.Hq, self.B)
        args = list(self.args)
        args[_I_NUM_M], args[_I_NUM_TILES] = num_m, num_tiles
        host = cfg.tma and cfg.host and self.host_ok
        if host:
            q, k, v, out = args[:4]
            args += [_host_desc(q, cfg.block_m), _host_desc(k, cfg.block_n), _host_desc(v, cfg.block_n),
                     _host_desc(out, cfg.block_m)]  # fmt: skip
        else:
            args += [None] * 4
        kwargs = dict(
            self.meta,
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            USE_TMA=cfg.tma,
            HOST_DESC=host,
            WARP_SPECIALIZE=cfg.ws,
            PERSISTENT=cfg.persistent,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):
                _attn_fwd_sm90[grid](*args, **kwargs)
        else:
            _attn_fwd_sm90[grid](*args, **kwargs)


# NOTE: host descriptors cost ~20 us of Python per call (four TensorDescriptor objects, then Triton's launcher
# encodes four TMA maps); the device-built ones cost GPU time in every program instead. Below this many scores
# (B * Hq * Sq * Sk; 8 GFLOP at D = 128, ~16 us of kernel) a CUDA call is launch-bound and keeps the device-built
# descriptors; above it the host ones won every measured case (5-28%). The interpreter (tests) always honours the
# config.
_HOST_MIN_SCORES = 1 << 24


def _host_descriptors_ok(*tensors: torch.Tensor) -> bool:
    """Host descriptors span the whole 4-D tensor: a broadcast (stride-0) dim of size > 1 has no TMA encoding
    (the on-device descriptors, one per head, never see it)."""
    return TensorDescriptor is not None and all(
        t.stride(d) != 0 or t.shape[d] == 1 for t in tensors for d in range(t.dim() - 1)
    )


def _host_desc(t: torch.Tensor, block_rows: int, *, shape=None, box=None):
    """A TMA descriptor over ``t`` ``[B, H, S, D]`` with ``[1, 1, block_rows, D]`` boxes (zero fill past S).

    A size-1 dim is only ever indexed at 0, so its stride is free: it gets a valid one (a multiple of 16 bytes,
    as TMA wants for every stride but the last) whatever the tensor's view says. ``shape`` (the extents the
    descriptor reads, zero fill past them; default ``t.shape``) and ``box`` (default ``[1, 1, block_rows, D]``)
    serve other layouts: ``flash_fwd_fp8``'s V8ᵀ ``[B, H, D, S_pad]`` read up to Sk in ``[1, 1, D, BLOCK_N]`` boxes.
    """
    shape = list(t.shape if shape is None else shape)
    strides = list(t.stride())
    for d in range(t.dim() - 1):
        if shape[d] == 1:
            strides[d] = _TMA_ALIGN // t.element_size()
    return TensorDescriptor(t, shape, strides, [1, 1, block_rows, shape[-1]] if box is None else list(box))


# positions of the per-config scalars in the argument tuple (see _build)
_I_NUM_M, _I_NUM_TILES = 26, 27

_SMS: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: a few programs, so the persistent loop runs several tiles each
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


def _build(q, k, v, out, lse, scale, window_left, window_right, softcap, mask_fill) -> _Launch:
    B, Hq, Sq, D = q.shape
    _, Hkv, Sk, _ = k.shape
    finite_fill = math.isfinite(mask_fill)
    if finite_fill:
        vmean = torch.mean(v, dim=-2, dtype=torch.float32)  # [B, Hkv, D], contiguous
        fill_thr = mask_fill / 2 * _LOG2E  # rule 6's "max score <= fill / 2", in the kernel's base-2 units
        fill_lse = mask_fill + math.log(Sk)
        vm_strides = vmean.stride()[:2]
    else:
        vmean, fill_thr, fill_lse, vm_strides = lse, 0.0, 0.0, (0, 0)
    # unbounded windows become bounds no (i, j) pair can cross; clamping keeps the tile arithmetic in int32
    wl = Sq if window_left is None else max(min(window_left, Sq), -Sk)
    wr = Sk if window_right is None else max(min(window_right, Sk), -Sq)
    has_softcap = softcap > 0
    # fmt: off
    args = (
        q, k, v, out, lse, vmean,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1), *vm_strides,
        Hq, Hq // Hkv, Sq, Sk, 0, 0,
        # heavy-first order whenever the band has a right edge inside the keys (causal and friends)
        int(window_right is not None and wr < Sk),
        scale * _LOG2E,
        scale / softcap if has_softcap else 0.0,
        softcap * _LOG2E,
        wl, wr, fill_thr, fill_lse,
    )
    # fmt: on
    assert args[_I_NUM_M] == 0 and args[_I_NUM_TILES] == 0
    meta = {
        "HEAD_DIM": D,
        "HAS_SOFTCAP": has_softcap,
        "FINITE_FILL": finite_fill,
        "INTERPRET_BF16": _interpreting() and q.dtype == torch.bfloat16,
    }
    big = q.device.type != "cuda" or B * Hq * Sq * Sk >= _HOST_MIN_SCORES
    host_ok = big and _host_descriptors_ok(q, k, v, out)
    return _Launch(args=args, meta=meta, Sq=Sq, Hq=Hq, B=B, device=q.device, host_ok=host_ok)


# (requested config, D, dtype, device) -> the config that compiled: the fallbacks are found once per process
_FITTED: dict[tuple, Sm90Config] = {}


def _launch_with_fallback(launch, cfg, fit_key: tuple, *, fitted: dict | None = None, name: str = "flash_fwd_sm90"):
    """Launch ``cfg``; on a shared-memory overflow shrink it, on a compile failure make it plainer.

    Returns the config that ran, remembered in ``fitted`` (default ``_FITTED``) under ``(cfg, *fit_key)``. Shared
    with ``flash_fwd_fp8`` (its own ``_Launch``, configs and ``fitted`` dict; ``_smaller``/``_plainer`` read only
    the fields both config classes have).
    """
    fitted = _FITTED if fitted is None else fitted
    requested = cfg
    cfg = fitted.get((requested, *fit_key), cfg)
    while True:
        try:
            launch.run(cfg)
            break
        except OutOfResources as e:
            smaller = _smaller(cfg)
            if smaller is None:
                raise
            log.info("%s: %s does not fit (%s); trying %s", name, cfg, e, smaller)
            cfg = smaller
        except Exception as e:  # a compiler error of any type: retry with a plainer kernel
            plainer = _plainer(cfg)
            if plainer is None:
                raise
            warnings.warn(
                f"{name}: {cfg} failed to compile ({type(e).__name__}: {str(e)[:300]}); using {plainer}",
                RuntimeWarning,
                stacklevel=3,
            )
            cfg = plainer
    fitted[(requested, *fit_key)] = cfg
    return cfg


# ----------------------------------------------------------------------------------------------
# autotuning (cached across processes)
# ----------------------------------------------------------------------------------------------

_CACHE_LOCK = threading.Lock()
_MEMO: dict[str, Sm90Config] = {}


def _cache_path() -> str:
    root = os.environ.get("FLASHFUSE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "flashfuse")
    return os.path.join(root, "fwd_sm90_autotune.json")


def _cache_key(q: torch.Tensor, causal: bool, sk: int) -> str:
    name = torch.cuda.get_device_name(q.device) if q.device.type == "cuda" else "cpu"
    dtype = str(q.dtype).replace("torch.", "")
    # v2: the candidate list with host descriptors (an entry tuned over the old list would hide them)
    return (f"v2|{name}|triton {triton.__version__}|D={q.shape[-1]}|{dtype}|causal={int(causal)}|"
            f"sk<={_sk_bucket(sk)}")


def _cache_load() -> dict:
    try:
        with open(_cache_path()) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _cache_store(key: str, cfg: Sm90Config) -> None:
    path = _cache_path()
    with _CACHE_LOCK:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with _file_lock(path + ".lock"):  # other processes (ranks) merging their own entries
                _merge_store(path, key, cfg)
        except OSError as e:
            log.warning("flash_fwd_sm90: cannot write the autotune cache %s: %s", path, e)


@contextlib.contextmanager
def _file_lock(path: str):
    """An exclusive lock across processes (fcntl where it exists; elsewhere only the atomic replace protects)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _merge_store(path: str, key: str, cfg: Sm90Config) -> None:
    """Read the file, add this entry, write it back through a temp file (the caller holds the file lock)."""
    data = _cache_load()
    data[key] = [cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages, *(getattr(cfg, n) for n, _, _ in _FLAGS)]
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)  # atomic: concurrent processes never read half a file


def _autotune(launch: _Launch, q: torch.Tensor, causal: bool, sk: int, fit_key: tuple) -> Sm90Config:
    key = _cache_key(q, causal, sk)
    if key in _MEMO:
        return _MEMO[key]
    hit = _cache_load().get(key)
    if isinstance(hit, list) and 6 <= len(hit) <= 4 + len(_FLAGS):  # entries of older versions have fewer knobs
        cfg = Sm90Config.from_tuple(hit)
        _MEMO[key] = cfg
        return cfg
    from triton.testing import do_bench

    best, best_ms = None, math.inf
    for cand in candidate_configs(q.shape[-1]):
        try:
            fitted = _launch_with_fallback(launch, cand, fit_key)
            ms = do_bench(lambda c=fitted: launch.run(c), warmup=5, rep=20, return_mode="median")
        except Exception as e:  # noqa: BLE001 -- a candidate that cannot run is just not a candidate
            log.info("flash_fwd_sm90 autotune: %s skipped (%s)", cand, e)
            continue
        log.debug("flash_fwd_sm90 autotune %s: %s %.3f ms", key, fitted, ms)
        if ms < best_ms:
            best, best_ms = fitted, ms
    if best is None:
        raise RuntimeError(f"flash_fwd_sm90: no candidate config runs for {key}")
    log.info("flash_fwd_sm90 autotune %s: %s (%.3f ms)", key, best, best_ms)
    _MEMO[key] = best
    _cache_store(key, best)
    return best


def _choose_config(q, causal: bool, sk: int, config, autotune) -> tuple[Sm90Config | None, str]:
    """``(config, source)``; config None means "autotune"."""
    D = q.shape[-1]
    if config is not None:
        return (Sm90Config.parse(config) if isinstance(config, str) else config), "argument"
    forced = os.environ.get("FLASHFUSE_SM90_CONFIG")
    if forced:
        return Sm90Config.parse(forced), "FLASHFUSE_SM90_CONFIG"
    if _interpreting() or q.device.type != "cuda":
        # interpreter: every tl op is a numpy call; 32x16 tiles keep the CPU tests fast and still give
        # several key blocks per row (and BLOCK_M != BLOCK_N) at S ~ 100
        return Sm90Config(32, 16, 4, 1), "interpreter"
    tuned = TUNED_CONFIGS.get((D, causal, _sk_bucket(sk)))
    if tuned is not None:
        return Sm90Config.from_tuple(tuned), "TUNED_CONFIGS"
    if autotune is None:
        autotune = os.environ.get("FLASHFUSE_SM90_AUTOTUNE", "1") != "0"
    if autotune:
        return None, "autotune"
    return _DEFAULT[D], "default"


def flash_attention_forward_sm90(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    window_left: int | None = None,
    window_right: int | None = None,
    softcap: float = 0.0,
    *,
    mask_fill: float = float("-inf"),
    config: Sm90Config | str | None = None,
    autotune: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, Hq, Sq, D] in q.dtype, contiguous; lse [B, Hq, Sq] float32, natural log)``.

    Same semantics as ``flash_fwd.flash_attention_forward(q, k, v, None, scale=..., window_left=...,
    window_right=..., mask_fill=..., softcap=...)`` for the calls ``supports`` accepts; anything else
    raises ``ValueError`` with ``supports``' reason. ``scale=None`` is ``1/sqrt(D)``. ``config`` (or a
    ``"128,128,8,2[,ws][,persistent][,notma][,host]"`` string) forces one config; ``autotune`` overrides
    ``FLASHFUSE_SM90_AUTOTUNE`` for keys missing from ``TUNED_CONFIGS``.
    """
    if scale is None and isinstance(q, torch.Tensor) and q.dim() == 4:
        scale = 1.0 / math.sqrt(q.shape[-1])
    reason = supports(
        q, k, v, scale=scale, window_left=window_left, window_right=window_right, softcap=softcap, mask_fill=mask_fill
    )
    if reason is not None:
        raise ValueError(f"flash_attention_forward_sm90: unsupported call: {reason}")
    scale, softcap, mask_fill = float(scale), float(softcap), float(mask_fill)
    B, Hq, Sq, D = q.shape
    Sk = k.shape[2]
    out = torch.empty((B, Hq, Sq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse

    _ensure_allocator(q.device)
    launch = _build(q, k, v, out, lse, scale, window_left, window_right, softcap, mask_fill)
    causal = window_right is not None and window_right < Sk
    fit_key = (D, q.dtype, q.device)
    cfg, source = _choose_config(q, causal, Sk, config, autotune)
    if cfg is None:
        cfg = _autotune(launch, q, causal, Sk, fit_key)
        source = "autotune"
    used = _launch_with_fallback(launch, cfg, fit_key)
    log.debug("flash_fwd_sm90: %s (%s%s)", used, source, "" if used == cfg else f", asked {cfg}")
    return out, lse


@contextlib.contextmanager
def _no_fitted_cache():
    """Tests and sweeps: forget which fallbacks were found (so a forced config really is tried)."""
    saved = dict(_FITTED)
    _FITTED.clear()
    try:
        yield
    finally:
        _FITTED.clear()
        _FITTED.update(saved)
