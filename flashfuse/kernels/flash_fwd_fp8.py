"""8-bit flash-attention forward for Hopper (sm90), inference only (issue 6).

``flashfuse/fp8.py`` holds the scheme, why it is what it is, and ``fp8_attention_emulated``, a torch model of
this file's arithmetic (exact up to accumulation order). In short, ``Fp8Scheme(qk, pv)``:

* ``qk="int8"`` (default) or ``"e4m3"``: Q and K rotated by a ±1 random-sign Hadamard matrix along the head dim
  (``QKᵀ = (QR)(KR)ᵀ / D``) and quantized with one scale per row (token). QKᵀ runs on the 8-bit tensor cores
  (int8 and e4m3 run at the same rate on Hopper) with int32 / fp32 accumulation.
* ``pv="input"`` (default): P rounded to the input dtype and V as given, a 16-bit dot (what the regular kernel
  does). ``pv="e4m3"``: P and V in e4m3, V with one scale per (batch, head, channel).

The default (``"int8qk"``) is the scheme that meets issue 6's 2e-2 relative-RMS bound on Gaussian inputs
(9.4e-3); the all-e4m3 ``"fp8"`` is the fastest and 5.1e-2 (fp8.py's NOTE has the error budget).

Two passes:

1. **Quantization** (Triton, scales on the device, no host sync). ``_quant_qk``: a [BLOCK_R, D] row block of Q
   or K (any strides), ``y = x @ R`` as one 16-bit dot (``R``'s entries are ±1: exact products, fp32 sums),
   row amax, scale, round, written contiguous ``[B, H, S, D]`` plus ``[B, H, S]`` float32 scales. ``_quant_v``
   (``pv="e4m3"``): per-channel amax from one ``torch.linalg.vector_norm(inf)`` reduction, then the block is
   scaled, rounded and stored **transposed**, ``[B, H, D, S_pad]`` (S_pad: S rounded up to 16 so the rows are
   TMA-aligned): the B operand of an 8-bit wgmma must be K-major, and for ``P @ V`` K is the key axis, so the
   tile must have the keys contiguous. (Triton's tutorial 06 prepares fp8 V the same way, with a
   permute-contiguous-permute; here the transpose is part of the quantization pass, free.)
2. **Attention** (``_attn_fwd_fp8``), modelled on ``flash_fwd_sm90``: tensor descriptors (TMA) for Q8, K8, V
   (or V8ᵀ) and the output, built in each program or, with the config flag ``host``, once on the host over
   the whole 4-D tensors (V8ᵀ's descriptor ends at Sk, so its padding columns read as zeros); key blocks
   split by ``flash_fwd._key_blocks`` into the blocks fully inside the band (no index arithmetic) and the
   edge blocks (the causal diagonal, the ragged end of the keys); heavy query tiles first for causal; exp2
   with the constants folded in. Per key block:

   * ``qk = dot(q8, k8ᵀ)``: K8 tile ``[BLOCK_N, D]`` with D contiguous, so ``k8ᵀ`` is K-major as it must be.
     int32 becomes fp32 with the magic-number trick (``bitcast(i + 0x4B400000) - 2^23 - 2^22``, exact for
     ``|i| < 2^22``; ``|q8·k8| <= 127² · 256 < 2^22``): an integer add (64 per clock and SM on Hopper) instead
     of an I2F (16, the rate of ``exp2``, the softmax's bottleneck).
   * **Scales**: ``t = qk * sk_j`` (K's per-key scale: one multiply per score), then ``s = t * a_i`` where
     ``a_i = sq_i * scale * log2(e) / D`` is per row (Q's scale, the softmax scale, the rotation's ``1/D``):
     on the blocks inside the band this is the regular kernel's single FMA ``t * a_i - m_i``, with the max
     taken on ``t`` (``a_i > 0``: ``max(t) * a_i == max(t * a_i)``).
   * e4m3 P: ``p = exp2(s - m + log2(448))`` lands in (0, 448] with no multiply; ``l`` sums the unrounded p
     in fp32; the scale cancels in ``acc / l``. ``acc = dot(p8, (v8ᵀ)ᵀ, acc, max_num_imprecise_acc=BLOCK_N)``:
     Hopper's fp8 MMA accumulates with ~14 bits (DeepSeek-V3, section 3.3.2: ~2% at K = 4096); promoting
     each block's partial product into the fp32 accumulator keeps the long sum over the keys exact (config flag
     ``nopromote`` accumulates in place instead: for measuring what the promotion costs).
   * 16-bit P: ``p = exp2(s - m)`` rounded to the input dtype, ``acc = dot(p, v, acc)`` as flash_fwd_sm90.

   Epilogue: ``out = acc / l`` (times V's channel scales for e4m3 V), rounded to the input dtype.

Tiles: BLOCK_M x BLOCK_N with the whole head dim; shared memory per stage is ``BLOCK_N * D`` bytes of K8 plus
``BLOCK_N * D`` bytes (e4m3 V) or twice that (16-bit V), half of the bf16 kernel's K tile, so 3 stages fit at
D = 128 with 128x128 tiles. Config choice as flash_fwd_sm90: ``config=`` / ``FLASHFUSE_FP8_CONFIG``
(``"128,128,8,3[,ws][,notma][,host][,nopromote]"``), ``TUNED_CONFIGS``, an in-process autotune
(``FLASHFUSE_FP8_AUTOTUNE=0``: off), a default; a config that does not compile falls back (WS off, then
device-built descriptors, then plain loads), one that overflows shared memory shrinks.

Semantics: ``out = softmax(q kᵀ * scale) v`` with ``causal``: key ``j`` kept for query ``i`` iff ``j <= i``
(the op's ``window_right = 0``, top-left aligned; every row keeps key 0, so no row is empty). GQA by the head
map ``h -> h // (Hq // Hkv)``. No lse, no backward: inference only.

Credits: FlashAttention-3 (Shah et al., 2024: FP8 attention, block quantization and the Hadamard "incoherent
processing"); SageAttention (Zhang et al., 2024-25: 8-bit QK with fine-grained scales, 16-bit or FP8 PV);
QuaRot (Ashkboos et al., 2024: random Hadamard rotations against outlier channels); Philippe Tillet and the
Triton authors, ``python/tutorials/06-fused-attention.py``.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from flashfuse import fp8 as _fp8
from flashfuse.kernels.flash_fwd import _key_blocks

# _sk_bucket (autotune cache buckets) and the fallback launch loop (shrink after a shared-memory overflow, drop WS,
# then host descriptors, then TMA after a compile failure: it reads only fields the config has) are the Hopper
# kernel's
from flashfuse.kernels.flash_fwd_sm90 import _dot, _dot_acc, _downcast, _ensure_allocator, _sk_bucket
from flashfuse.kernels.flash_fwd_sm90 import _HOST_MIN_SCORES, _host_desc, _host_descriptors_ok
from flashfuse.kernels.flash_fwd_sm90 import _launch_with_fallback as _sm90_launch_with_fallback
from flashfuse.kernels.flash_fwd_sm90 import TensorDescriptor

__all__ = [
    "TUNED_CONFIGS",
    "Fp8Config",
    "QuantizedInputs",
    "candidate_configs",
    "flash_attention_forward_fp8",
    "quantize_inputs",
    "supports",
]

log = logging.getLogger(__name__)

_HEAD_DIMS = (64, 128, 256)
_DTYPES = (torch.float16, torch.bfloat16)
_TMA_ALIGN = 16  # bytes
_MAGIC = 0x4B400000  # the float 2^23 + 2^22: bitcast(i + _MAGIC) == 2^23 + 2^22 + i for |i| < 2^22
_MAGIC_F = 12582912.0


# ----------------------------------------------------------------------------------------------
# @triton.jit helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _to_e4m3(x, INTERPRET: tl.constexpr):
    """fp32 ``x`` (``|x| <= 448``) -> float8e4nv, round to nearest even.

    NOTE: on the GPU this is the hardware's ``cvt.rn.satfinite``. Triton 3.9's interpreter rounds half away
    from zero and drops the carry into the exponent (7.5 -> 7 is fine, 15.5 -> 8), so there the value is first
    rounded to an e4m3 number in fp32 bits (3 mantissa bits, ties to even; multiples of 2^-9 below the normal
    range, 2^-6, through the 1.5 * 2^14 magic add), and the interpreter's conversion of an exact value is exact.
    """
    if INTERPRET:
        ax = tl.abs(x)
        bits = ax.to(tl.uint32, bitcast=True)
        bits = ((bits + (0x7FFFF + ((bits >> 20) & 1))) >> 20) << 20
        r = tl.where(ax < 0.015625, (ax + 24576.0) - 24576.0, bits.to(tl.float32, bitcast=True))
        x = tl.where(x < 0, -r, r)
    return x.to(tl.float8e4nv)


@triton.jit
def _quant_qk(
    X, R, X8, Scale,
    stride_xb, stride_xh, stride_xs, stride_xd,
    H, S,
    HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, ROTATE: tl.constexpr, INT8: tl.constexpr,
    INTERPRET: tl.constexpr, INTERPRET_BF16: tl.constexpr,
):  # fmt: skip
    """One [BLOCK_R, D] row block of Q or K: rotate, one scale per row, round; X8 and Scale contiguous."""
    pid = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = rows < S
    base = tl.cast(off_b, tl.int64) * stride_xb + tl.cast(off_h, tl.int64) * stride_xh
    x = tl.load(X + base + rows.to(tl.int64)[:, None] * stride_xs + offs_d[None, :] * stride_xd,
                mask=row_ok[:, None], other=0.0)
    if ROTATE:
        r = tl.load(R + offs_d[:, None] * HEAD_DIM + offs_d[None, :])  # ±1 in x's dtype
        y = _dot(x, r, INTERPRET_BF16)
    else:
        y = x.to(tl.float32)
    amax = tl.max(tl.abs(y), 1)
    safe = tl.where(amax > 0, amax, 1.0)
    if INT8:
        inv = 127.0 / safe
        scale = safe / 127.0
        y8 = tl.clamp(tl.floor(y * inv[:, None] + 0.5), -127.0, 127.0).to(tl.int8)
    else:
        inv = 448.0 / safe
        scale = safe / 448.0
        y8 = _to_e4m3(tl.clamp(y * inv[:, None], -448.0, 448.0), INTERPRET)
    bh = tl.cast(off_b, tl.int64) * H + off_h
    out_rows = bh * S + rows.to(tl.int64)
    tl.store(X8 + out_rows[:, None] * HEAD_DIM + offs_d[None, :], y8, mask=row_ok[:, None])
    tl.store(Scale + out_rows, scale, mask=row_ok)


@triton.jit
def _quant_v(
    V, Inv, VT,
    stride_vb, stride_vh, stride_vs, stride_vd,
    H, S, S_PAD,
    HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """One [BLOCK_R, D] row block of V: per-channel scale, round, store transposed into VT [B, H, D, S_PAD]."""
    pid = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = rows < S
    base = tl.cast(off_b, tl.int64) * stride_vb + tl.cast(off_h, tl.int64) * stride_vh
    v = tl.load(V + base + rows.to(tl.int64)[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    bh = tl.cast(off_b, tl.int64) * H + off_h
    inv = tl.load(Inv + bh * HEAD_DIM + offs_d)
    v8 = _to_e4m3(tl.clamp(v * inv[None, :], -448.0, 448.0), INTERPRET)
    vt = tl.trans(v8)  # [D, BLOCK_R]: the keys contiguous
    dst = VT + bh * HEAD_DIM * S_PAD + offs_d.to(tl.int64)[:, None] * S_PAD + rows[None, :]
    tl.store(dst, vt, mask=row_ok[None, :])


@triton.jit
def _attn_blocks(
    acc, l_i, m_i, q, a_i,
    desc_k, desc_v, K_head, V_head, SK_head, stride_kn, stride_vn, stride_vd, off_b, off_hkv,
    start, end, offs_m, offs_n, offs_d, Sk, window_right,
    BLOCK_N: tl.constexpr, EDGE: tl.constexpr, QK_INT8: tl.constexpr, PV_FP8: tl.constexpr,
    P_SHIFT: tl.constexpr, PROMOTE: tl.constexpr, USE_TMA: tl.constexpr, HOST_DESC: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr, INTERPRET: tl.constexpr, INTERPRET_BF16: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """Online softmax over key blocks ``[start, end)``; EDGE blocks straddle the diagonal or the end of the keys.
    With ``HOST_DESC`` the descriptors span the whole 4-D tensors and are indexed by (batch, KV head, ...)."""
    for start_n in tl.range(start, end, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        # -- K8 block [BLOCK_N, D] and its per-key scales --
        if USE_TMA:
            if HOST_DESC:
                k = desc_k.load([off_b, off_hkv, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
            else:
                k = desc_k.load([start_n, 0])
        else:
            k_ptrs = K_head + tl.cast(start_n, tl.int64) * stride_kn + (offs_n[:, None] * stride_kn + offs_d[None, :])
            if EDGE:
                k = tl.load(k_ptrs, mask=cols[:, None] < Sk, other=0.0)
            else:
                k = tl.load(k_ptrs)
        sk = tl.load(SK_head + cols, mask=cols < Sk, other=0.0)
        qk = tl.dot(q, k.T)  # int32 (int8) or fp32 (e4m3)
        if QK_INT8:
            qk = (qk + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
        t = qk * sk[None, :]

        # -- scores in base 2 (s = t * a_i), online softmax --
        if EDGE:
            keep = ((cols[None, :] - offs_m[:, None]) <= window_right) & (cols < Sk)[None, :]
            s = tl.where(keep, t * a_i[:, None], float("-inf"))
            m_ij = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_ij == float("-inf"), 0.0, m_ij)
            p = tl.math.exp2(s - (m_safe - P_SHIFT)[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
        else:
            m_ij = tl.maximum(m_i, tl.max(t, 1) * a_i)
            p = tl.math.exp2(t * a_i[:, None] - (m_ij - P_SHIFT)[:, None])
            alpha = tl.math.exp2(m_i - m_ij)
        l_ij = tl.sum(p, 1)
        acc = acc * alpha[:, None]

        # -- P @ V --
        if PV_FP8:
            # V8ᵀ block [D, BLOCK_N], keys contiguous: its transpose is the K-major B operand
            if USE_TMA:
                if HOST_DESC:
                    vt = desc_v.load([off_b, off_hkv, 0, start_n]).reshape(HEAD_DIM, BLOCK_N)
                else:
                    vt = desc_v.load([0, start_n])
            else:
                vt_ptrs = V_head + offs_d[:, None] * stride_vd + cols[None, :]
                if EDGE:
                    vt = tl.load(vt_ptrs, mask=(cols < Sk)[None, :], other=0.0)
                else:
                    vt = tl.load(vt_ptrs)
            if PROMOTE:
                acc = tl.dot(_to_e4m3(p, INTERPRET), vt.T, acc, max_num_imprecise_acc=BLOCK_N)
            else:
                acc = tl.dot(_to_e4m3(p, INTERPRET), vt.T, acc)
        else:
            if USE_TMA:
                if HOST_DESC:
                    v = desc_v.load([off_b, off_hkv, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
                else:
                    v = desc_v.load([start_n, 0])
            else:
                v_ptrs = V_head + tl.cast(start_n, tl.int64) * stride_vn + (
                    offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd)
                if EDGE:
                    v = tl.load(v_ptrs, mask=cols[:, None] < Sk, other=0.0)
                else:
                    v = tl.load(v_ptrs)
            acc = _dot_acc(_downcast(p, v.dtype, INTERPRET_BF16), v, acc, INTERPRET_BF16)
        l_i = l_i * alpha + l_ij
        m_i = m_ij
    return acc, l_i, m_i


# the tile count and the order flag change per call: no recompile for each
@triton.jit(do_not_specialize=["num_m_blocks", "reverse_m", "window_right"])
def _attn_fwd_fp8(
    Q8, K8, V, Out, SQ, SK, SV,
    stride_vb, stride_vh, stride_vn, stride_vd,
    Hq, Hkv, GROUPS, Sq, Sk, num_m_blocks, reverse_m, qk_scale, window_right,
    DescQ, DescK, DescV, DescO,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    QK_INT8: tl.constexpr, PV_FP8: tl.constexpr, P_SHIFT: tl.constexpr, PROMOTE: tl.constexpr,
    USE_TMA: tl.constexpr, HOST_DESC: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, INTERPRET: tl.constexpr,
    INTERPRET_BF16: tl.constexpr,
):  # fmt: skip
    """One (query block, head, batch) tile. Q8/K8 ``[B, H, S, D]``, SQ/SK ``[B, H, S]``, Out ``[B, Hq, Sq, D]``
    contiguous; V is V8ᵀ ``[B, Hkv, D, S_pad]`` (PV_FP8, SV ``[B, Hkv, D]``) or the input V (any strides)."""
    qk_scale = tl.cast(qk_scale, tl.float32)
    pid = tl.program_id(0)
    pid_m = tl.where(reverse_m != 0, num_m_blocks - 1 - pid, pid)  # heavy tiles first for causal
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    off_hkv = off_h // GROUPS  # GQA: query head h reads key/value head h // (Hq // Hkv)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    # per-(batch, head) bases in 64 bits
    bh = tl.cast(off_b, tl.int64) * Hq + off_h
    bhkv = tl.cast(off_b, tl.int64) * Hkv + off_hkv
    Q_head = Q8 + bh * Sq * HEAD_DIM
    K_head = K8 + bhkv * Sk * HEAD_DIM
    V_head = V + tl.cast(off_b, tl.int64) * stride_vb + tl.cast(off_hkv, tl.int64) * stride_vh
    O_head = Out + bh * Sq * HEAD_DIM
    SK_head = SK + bhkv * Sk

    if USE_TMA:
        if HOST_DESC:  # built once on the host over the whole tensors (boxes [1, 1, rows, D] / [1, 1, D, keys])
            desc_k = DescK
            desc_v = DescV
            desc_o = DescO
            q = DescQ.load([off_b, off_h, start_m, 0]).reshape(BLOCK_M, HEAD_DIM)
        else:
            desc_q = tl.make_tensor_descriptor(Q_head, [Sq, HEAD_DIM], [HEAD_DIM, 1], [BLOCK_M, HEAD_DIM])
            desc_k = tl.make_tensor_descriptor(K_head, [Sk, HEAD_DIM], [HEAD_DIM, 1], [BLOCK_N, HEAD_DIM])
            if PV_FP8:
                desc_v = tl.make_tensor_descriptor(V_head, [HEAD_DIM, Sk], [stride_vd, 1], [HEAD_DIM, BLOCK_N])
            else:
                desc_v = tl.make_tensor_descriptor(V_head, [Sk, HEAD_DIM], [stride_vn, 1], [BLOCK_N, HEAD_DIM])
            desc_o = tl.make_tensor_descriptor(O_head, [Sq, HEAD_DIM], [HEAD_DIM, 1], [BLOCK_M, HEAD_DIM])
            q = desc_q.load([start_m, 0])
    else:
        desc_k = None
        desc_v = None
        desc_o = None
        q = tl.load(Q_head + offs_m.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=(offs_m < Sq)[:, None], other=0.0)
    sq = tl.load(SQ + bh * Sq + offs_m, mask=offs_m < Sq, other=0.0)
    a_i = sq * qk_scale  # Q's per-row scale, the softmax scale, log2(e), the rotation's 1/D

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # window_left unbounded (Sq): lo == full_lo == 0, so two phases: inside the band, then its right edge
    _lo, full_lo, full_hi, hi = _key_blocks(start_m, Sq, Sk, Sq, window_right, BLOCK_M, BLOCK_N)
    # fmt: off
    acc, l_i, m_i = _attn_blocks(
        acc, l_i, m_i, q, a_i, desc_k, desc_v, K_head, V_head, SK_head, HEAD_DIM, stride_vn, stride_vd,
        off_b, off_hkv, full_lo, full_hi, offs_m, offs_n, offs_d, Sk, window_right,
        BLOCK_N, False, QK_INT8, PV_FP8, P_SHIFT, PROMOTE, USE_TMA, HOST_DESC, WARP_SPECIALIZE, INTERPRET,
        INTERPRET_BF16, HEAD_DIM,
    )
    acc, l_i, m_i = _attn_blocks(
        acc, l_i, m_i, q, a_i, desc_k, desc_v, K_head, V_head, SK_head, HEAD_DIM, stride_vn, stride_vd,
        off_b, off_hkv, full_hi, hi, offs_m, offs_n, offs_d, Sk, window_right,
        BLOCK_N, True, QK_INT8, PV_FP8, P_SHIFT, PROMOTE, USE_TMA, HOST_DESC, False, INTERPRET, INTERPRET_BF16,
        HEAD_DIM,
    )
    # fmt: on

    out = acc / l_i[:, None]
    if PV_FP8:
        out = out * tl.load(SV + bhkv * HEAD_DIM + offs_d)[None, :]
    out = _downcast(out, Out.dtype.element_ty, INTERPRET_BF16)
    if USE_TMA:
        if HOST_DESC:
            desc_o.store([off_b, off_h, start_m, 0], out.reshape(1, 1, BLOCK_M, HEAD_DIM))
        else:
            desc_o.store([start_m, 0], out)
    else:
        tl.store(O_head + offs_m.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :], out,
                 mask=(offs_m < Sq)[:, None])


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fp8Config:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    ws: bool = False  # warp_specialize=True on the loop over the blocks inside the band
    tma: bool = True  # tensor descriptors (False: plain pointer loads)
    # with tma: descriptors built once on the host over the whole tensors (flash_fwd_sm90's ``host`` knob) instead
    # of in every program; only where the call is big enough (``_HOST_MIN_SCORES``) and the tensors allow it
    host: bool = False
    # e4m3 P @ V: each block's product is added to the fp32 accumulator (max_num_imprecise_acc=BLOCK_N); False
    # accumulates in place in the tensor cores (~14 bits: wrong by ~1e-2 at 4k keys; for speed comparisons only)
    promote: bool = True

    def __str__(self) -> str:
        return (f"{self.block_m}x{self.block_n} w{self.num_warps} s{self.num_stages}"
                f"{' ws' if self.ws else ''}{'' if self.tma else ' notma'}{' host' if self.host else ''}"
                f"{'' if self.promote else ' nopromote'}")

    @classmethod
    def parse(cls, text: str) -> Fp8Config:
        """``"128,128,8,3"`` plus any of ``ws``, ``notma``, ``host``, ``nopromote``, comma separated."""
        parts = [p.strip().lower() for p in str(text).split(",") if p.strip()]
        try:
            bm, bn, w, s = (int(p) for p in parts[:4])
        except ValueError:
            raise ValueError(
                f"config: {text!r}: expected 'BLOCK_M,BLOCK_N,num_warps,num_stages[,ws][,notma][,host][,nopromote]'"
            ) from None
        flags = set(parts[4:])
        unknown = flags - {"ws", "notma", "host", "nopromote"}
        if unknown:
            raise ValueError(f"config: {text!r}: unknown flags {sorted(unknown)}")
        return cls(bm, bn, w, s, ws="ws" in flags, tma="notma" not in flags, host="host" in flags,
                   promote="nopromote" not in flags)


def _C(bm, bn, w, s, **kw) -> Fp8Config:
    return Fp8Config(bm, bn, w, s, **kw)


# Shared memory (H100: 227 KB): Q8 tile + stages * (K8 + V tiles). D=128, 128x128, e4m3 V: 16 KB + s * 32 KB;
# 16-bit V: 16 KB + s * 48 KB. D=256 128x64: 32 KB + s * 32 (48) KB. BLOCK_N >= 32: one fp8 wgmma's K is 32.
_CANDIDATES: dict[int, list[Fp8Config]] = {
    64: [_C(128, 128, 8, 3), _C(128, 64, 4, 3), _C(128, 128, 4, 3), _C(64, 64, 4, 3)],
    128: [_C(128, 128, 8, 3), _C(128, 128, 8, 2), _C(128, 64, 8, 3), _C(128, 64, 4, 3), _C(64, 64, 4, 3)],
    256: [_C(128, 64, 8, 2), _C(128, 128, 8, 2), _C(64, 64, 4, 2), _C(128, 32, 8, 3)],
}
# D = 128's default: the fastest of the forced tiles at S = 4k (above); it runs as its non-host twin where host
# descriptors cannot be used (``_Launch.host_ok``)
_DEFAULT: dict[int, Fp8Config] = {64: _C(128, 128, 8, 3), 128: _C(128, 128, 8, 2, host=True), 256: _C(128, 64, 8, 2)}
_INTERPRETER_CONFIG = Fp8Config(32, 16, 4, 1)  # numpy per tl op: small tiles, several key blocks per row

# (head dim, causal, scheme name, key-length bucket) -> (block_m, block_n, num_warps, num_stages, ws, tma[, host]).
# Empty until measured on an H100/H200 (the autotune fills an in-process memo meanwhile).
TUNED_CONFIGS: dict[tuple[int, bool, str, int], tuple] = {}


# The host-descriptor copies of the first two candidates join the autotune (``FLASHFUSE_FP8_HOST=0`` leaves them
# out). H200, 2026-11-30 (session 6, bench/RESULTS.md), int8qk, D = 128, the same tiles forced with and without
# ``host``: full S = 4k 417 -> 430 (8 warps, 3 stages) and 423 -> 447 TFLOP/s (2 stages), causal S = 4k 332 -> 356
# and 334 -> 363, S = 16k within 1-3% either way; the GPU test of the host path passed.
def _host_candidates() -> bool:
    return os.environ.get("FLASHFUSE_FP8_HOST", "1") != "0"


def candidate_configs(head_dim: int, *, ws: bool = False, host: bool | None = None) -> list[Fp8Config]:
    """The list the autotune tries for one head dim: the tiles; ``host=True`` (default: unless ``FLASHFUSE_FP8_HOST=0``)
    adds host-descriptor copies of the first two; ``ws=True`` warp-specialized copies."""
    out = list(_CANDIDATES[head_dim])
    if _host_candidates() if host is None else host:
        out += [replace(c, host=True) for c in out[:2]]
    if ws:
        out += [replace(c, ws=True) for c in out[:2]]
    return out


# ----------------------------------------------------------------------------------------------
# support predicate
# ----------------------------------------------------------------------------------------------


def _interpreting() -> bool:
    return type(_attn_fwd_fp8).__name__ == "InterpretedFunction"


def _tma_ok(t: torch.Tensor) -> bool:
    """V in the input dtype through a descriptor: last dim contiguous, base and other strides 16-byte aligned."""
    if t.stride(-1) != 1 or t.data_ptr() % _TMA_ALIGN:
        return False
    return all(t.shape[d] <= 1 or (t.stride(d) * t.element_size()) % _TMA_ALIGN == 0 for d in range(t.dim() - 1))


def supports(
    q, k, v, mask=None, *, scale: float | None = None, causal: bool = False, window_left: int | None = None,
    window_right: int | None = None, softcap: float = 0.0, sinks=None, dropout_p: float = 0.0,
    mask_fill: float = float("-inf"),
) -> str | None:
    """None if ``flash_attention_forward_fp8`` computes this call, else the reason it does not.

    Takes the op's arguments (a mask, sinks, soft-capping, dropout or a band other than none / causal is
    refused, not ignored). The band: ``causal=True`` or ``window_right=0`` (``window_left`` None) is causal;
    both None and ``causal=False`` is full. ``mask_fill`` cannot matter (no row is empty). Cheap: no data read.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            return f"{name}: expected a 4-D tensor"
    if mask is not None:
        return "a mask tensor (the FP8 kernel takes none)"
    if sinks is not None:
        return "attention sinks"
    if softcap:
        return "soft-capping"
    if dropout_p:
        return "dropout"
    if window_left is not None or window_right not in (None, 0):
        return f"a band other than full or causal (window_left={window_left}, window_right={window_right})"
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return "needs grad: the FP8 kernel is forward-only (inference)"
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
        return f"dtype {q.dtype}/{k.dtype}/{v.dtype}: needs float16 or bfloat16 for all three"
    if not (q.device == k.device == v.device):
        return "q/k/v on different devices"
    if q.device.type == "cuda":
        if _interpreting():
            return "TRITON_INTERPRET=1 with CUDA tensors"
        major, minor = torch.cuda.get_device_capability(q.device)
        if major != 9:
            return f"compute capability {major}.{minor}: the FP8 kernel is for sm90 (Hopper)"
    elif q.device.type != "cpu" or not _interpreting():
        return f"device {q.device}: needs CUDA sm90 (or CPU tensors under TRITON_INTERPRET=1)"
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
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale) or scale <= 0):
        return f"scale {scale!r}: needs a finite float > 0"
    return None


# ----------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------


@dataclass
class QuantizedInputs:
    """What the quantization pass produces (all on the inputs' device)."""

    q8: torch.Tensor  # [B, Hq, Sq, D] int8 | float8_e4m3fn, contiguous
    sq: torch.Tensor  # [B, Hq, Sq] float32
    k8: torch.Tensor  # [B, Hkv, Sk, D]
    sk: torch.Tensor  # [B, Hkv, Sk] float32
    v: torch.Tensor  # V8ᵀ [B, Hkv, D, S_pad] float8_e4m3fn (pv="e4m3") or the input v
    sv: torch.Tensor | None  # [B, Hkv, D] float32 (pv="e4m3")


def _quant_rows(x: torch.Tensor, scheme: _fp8.Fp8Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, S, D = x.shape
    int8 = scheme.qk == "int8"
    x8 = torch.empty((B, H, S, D), dtype=torch.int8 if int8 else _fp8.E4M3, device=x.device)
    scale = torch.empty((B, H, S), dtype=torch.float32, device=x.device)
    if x8.numel() == 0:
        return x8, scale
    interp = _interpreting()
    block_r = 16 if interp else (32 if D == 256 else 64)
    r = _fp8.hadamard_matrix(D, x.dtype, x.device) if scheme.hadamard else x
    # fmt: off
    _quant_qk[(triton.cdiv(S, block_r), H, B)](
        x, r, x8, scale, *x.stride(), H, S,
        HEAD_DIM=D, BLOCK_R=block_r, ROTATE=scheme.hadamard, INT8=int8,
        INTERPRET=interp, INTERPRET_BF16=interp and x.dtype == torch.bfloat16, num_warps=4,
    )
    # fmt: on
    return x8, scale


def _quant_values(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, S, D = v.shape
    amax = torch.linalg.vector_norm(v, ord=math.inf, dim=-2, dtype=torch.float32)  # [B, H, D], one pass
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    sv, inv = safe / _fp8.E4M3_MAX, (_fp8.E4M3_MAX / safe).contiguous()
    s_pad = triton.cdiv(max(S, 1), _TMA_ALIGN) * _TMA_ALIGN  # V8ᵀ rows 16-byte aligned (TMA)
    vt = torch.empty((B, H, D, s_pad), dtype=_fp8.E4M3, device=v.device)
    if v.numel():
        interp = _interpreting()
        block_r = 16 if interp else 64
        _quant_v[(triton.cdiv(S, block_r), H, B)](
            v, inv, vt, *v.stride(), H, S, s_pad, HEAD_DIM=D, BLOCK_R=block_r, INTERPRET=interp, num_warps=4
        )
    return vt, sv.contiguous()


def quantize_inputs(q, k, v, scheme: str | _fp8.Fp8Scheme | None = None) -> QuantizedInputs:
    """The quantization pass: Q and K (rotated, one scale per row), V (per channel, transposed) for e4m3 PV."""
    sch = _resolve(scheme)
    q8, sq = _quant_rows(q, sch)
    k8, sk = _quant_rows(k, sch)
    if sch.pv == "e4m3":
        vt, sv = _quant_values(v)
        return QuantizedInputs(q8, sq, k8, sk, vt, sv)
    return QuantizedInputs(q8, sq, k8, sk, v, None)


def _resolve(scheme) -> _fp8.Fp8Scheme:
    if scheme is None:
        scheme = os.environ.get("FLASHFUSE_FP8_SCHEME") or None
    return _fp8.resolve_scheme(scheme)


@dataclass
class _Launch:
    args: tuple
    meta: dict
    Sq: int
    Hq: int
    B: int
    device: torch.device
    host_ok: bool = False  # host descriptors can carry q8, k8, v and out, and the call is big enough to pay them
    sk: int = 0

    def run(self, cfg: Fp8Config) -> None:
        num_m = triton.cdiv(self.Sq, cfg.block_m)
        args = list(self.args)
        args[_I_NUM_M] = num_m
        host = bool(cfg.tma and cfg.host and self.host_ok)
        args += self._host_descs(cfg) if host else [None] * 4
        kwargs = dict(self.meta, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, USE_TMA=cfg.tma, HOST_DESC=host,
                      WARP_SPECIALIZE=cfg.ws, PROMOTE=cfg.promote, num_warps=cfg.num_warps,
                      num_stages=cfg.num_stages)
        grid = (num_m, self.Hq, self.B)
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):
                _attn_fwd_fp8[grid](*args, **kwargs)
        else:
            _attn_fwd_fp8[grid](*args, **kwargs)

    def _host_descs(self, cfg: Fp8Config) -> list:
        q8, k8, v, out = self.args[:4]
        if self.meta["PV_FP8"]:
            # V8ᵀ [B, H, D, S_pad]: the descriptor's key extent is Sk, so the padding columns read as zeros (the
            # pass leaves them uninitialised), boxes of [1, 1, D, BLOCK_N]
            vdesc = _host_desc(v, cfg.block_n, shape=[*v.shape[:3], self.sk], box=[1, 1, v.shape[2], cfg.block_n])
        else:
            vdesc = _host_desc(v, cfg.block_n)
        return [_host_desc(q8, cfg.block_m), _host_desc(k8, cfg.block_n), vdesc, _host_desc(out, cfg.block_m)]


_I_NUM_M = 16  # position of num_m_blocks in _Launch.args


def _build(qi: QuantizedInputs, out, scale: float, causal: bool, sch: _fp8.Fp8Scheme, dtype) -> _Launch:
    B, Hq, Sq, D = qi.q8.shape
    _, Hkv, Sk, _ = qi.k8.shape
    pv_fp8 = sch.pv == "e4m3"
    if pv_fp8:
        v_strides = (qi.v.stride(0), qi.v.stride(1), 0, qi.v.stride(2))  # (b, h, -, d); keys contiguous
    else:
        v_strides = qi.v.stride()
    interp = _interpreting()
    # fmt: off
    args = (
        qi.q8, qi.k8, qi.v, out, qi.sq, qi.sk, qi.sv if pv_fp8 else qi.sq,
        *v_strides,
        Hq, Hkv, Hq // Hkv, Sq, Sk, 0,
        int(causal),  # heavy-first order for causal
        _fp8.qk_scale_factor(scale, D, sch),
        0 if causal else Sk,  # window_right: the causal band, or a bound no (i, j) pair crosses
    )
    # fmt: on
    assert args[_I_NUM_M] == 0
    meta = {
        "HEAD_DIM": D,
        "QK_INT8": sch.qk == "int8",
        "PV_FP8": pv_fp8,
        "P_SHIFT": _fp8.P_SHIFT_E4M3 if pv_fp8 else 0.0,
        "INTERPRET": interp,
        "INTERPRET_BF16": interp and dtype == torch.bfloat16,
    }
    # host descriptors: ~20 us of Python per call, so only past flash_fwd_sm90's threshold on CUDA (the interpreter,
    # i.e. the tests, always honours the knob); a broadcast V (stride 0) has no 4-D encoding
    host_ok = (TensorDescriptor is not None and (interp or B * Hq * Sq * Sk >= _HOST_MIN_SCORES)
               and (pv_fp8 or (_host_descriptors_ok(qi.v) and _tma_ok(qi.v))))
    return _Launch(args=args, meta=meta, Sq=Sq, Hq=Hq, B=B, device=out.device, host_ok=host_ok, sk=Sk)


_FITTED: dict[tuple, Fp8Config] = {}


def _launch_with_fallback(launch: _Launch, cfg: Fp8Config, fit_key: tuple) -> Fp8Config:
    """Launch ``cfg``; on a shared-memory overflow shrink it, on a compile failure make it plainer (WS, host, TMA):
    ``flash_fwd_sm90``'s loop, with this kernel's ``_FITTED``."""
    return _sm90_launch_with_fallback(launch, cfg, fit_key, fitted=_FITTED, name="flash_fwd_fp8")


_MEMO: dict[tuple, Fp8Config] = {}


def _autotune(launch: _Launch, key: tuple, fit_key: tuple, head_dim: int, tma: bool) -> Fp8Config:
    if key in _MEMO:
        return _MEMO[key]
    from triton.testing import do_bench

    best, best_ms = None, math.inf
    for cand in candidate_configs(head_dim):
        if cand.host and not (tma and launch.host_ok):
            continue  # it would run as its non-host twin, already in the list
        cand = cand if tma else replace(cand, tma=False)
        try:
            fitted = _launch_with_fallback(launch, cand, fit_key)
            ms = do_bench(lambda c=fitted: launch.run(c), warmup=5, rep=20, return_mode="median")
        except Exception as e:  # noqa: BLE001 -- a candidate that cannot run is just not a candidate
            log.info("flash_fwd_fp8 autotune: %s skipped (%s)", cand, e)
            continue
        if ms < best_ms:
            best, best_ms = fitted, ms
    if best is None:
        raise RuntimeError(f"flash_fwd_fp8: no candidate config runs for {key}")
    log.info("flash_fwd_fp8 autotune %s: %s (%.3f ms)", key, best, best_ms)
    _MEMO[key] = best
    return best


def _choose_config(q, causal: bool, sk: int, sch: _fp8.Fp8Scheme, config, autotune) -> tuple[Fp8Config | None, str]:
    """``(config, source)``; config None means "autotune"."""
    D = q.shape[-1]
    if config is not None:
        return config, "argument"
    forced = os.environ.get("FLASHFUSE_FP8_CONFIG")
    if forced:
        return Fp8Config.parse(forced), "FLASHFUSE_FP8_CONFIG"
    if _interpreting() or q.device.type != "cuda":
        return _INTERPRETER_CONFIG, "interpreter"
    tuned = TUNED_CONFIGS.get((D, causal, sch.name, _sk_bucket(sk)))
    if tuned is not None:
        host = len(tuned) > 6 and bool(tuned[6])
        return Fp8Config(*tuned[:4], ws=bool(tuned[4]), tma=bool(tuned[5]), host=host), "TUNED_CONFIGS"
    if autotune is None:
        autotune = os.environ.get("FLASHFUSE_FP8_AUTOTUNE", "1") != "0"
    if autotune:
        return None, "autotune"
    return _DEFAULT[D], "default"


def _check_config(config) -> Fp8Config | None:
    if config is None or isinstance(config, Fp8Config):
        cfg = config
    elif isinstance(config, str):
        cfg = Fp8Config.parse(config)
    else:
        raise ValueError(f"config: expected an Fp8Config, a string or None, got {type(config).__name__}")
    if cfg is not None:
        for name in ("block_m", "block_n"):
            val = getattr(cfg, name)
            if val < 16 or val & (val - 1):
                raise ValueError(f"config: {name} {val} is not a power of two >= 16")
    return cfg


def flash_attention_forward_fp8(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    causal: bool = False,
    *,
    scheme: str | _fp8.Fp8Scheme | None = None,
    config: Fp8Config | str | None = None,
    autotune: bool | None = None,
) -> torch.Tensor:
    """``out [B, Hq, Sq, D]`` in q's dtype (contiguous): ``softmax(q kᵀ * scale) v`` through 8-bit tensor cores.

    ``q: [B, Hq, Sq, D]``, ``k, v: [B, Hkv, Sk, D]`` (any strides, ``Hq % Hkv == 0``, D in 64/128/256, fp16/bf16),
    ``scale=None`` is ``1/sqrt(D)``; ``causal``: key ``j <= `` query ``i``. ``scheme``: a name of
    ``flashfuse.fp8.SCHEMES`` or an ``Fp8Scheme`` (None: ``FLASHFUSE_FP8_SCHEME``, else ``"int8qk"``).
    ``config`` forces a kernel config (an ``Fp8Config`` or ``"128,128,8,3[,ws][,notma][,host][,nopromote]"``);
    ``autotune`` overrides ``FLASHFUSE_FP8_AUTOTUNE``. Bad arguments raise ``ValueError`` naming the argument; a
    call the kernel cannot run raises ``ValueError`` with ``supports``' reason.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")  # noqa: TRY004
    if not isinstance(causal, bool):
        raise ValueError(f"causal: expected a bool, got {causal!r}")  # noqa: TRY004 -- the project's rule
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale) or scale <= 0):
        raise ValueError(f"scale: expected a finite float > 0 or None, got {scale!r}")
    sch = _resolve(scheme)
    cfg = _check_config(config)
    reason = supports(q, k, v, scale=scale, causal=causal)
    if reason is not None:
        raise ValueError(f"flash_attention_forward_fp8: unsupported call: {reason}")
    B, Hq, Sq, D = q.shape
    Sk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    out = torch.empty((B, Hq, Sq, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out

    _ensure_allocator(q.device)
    qi = quantize_inputs(q, k, v, sch)
    cfg, source = _choose_config(q, causal, Sk, sch, cfg, autotune)
    tma = sch.pv == "e4m3" or _tma_ok(qi.v)  # V in the input dtype with strides no descriptor takes: plain loads
    if cfg is not None and not tma:
        cfg = replace(cfg, tma=False)
    launch = _build(qi, out, scale, causal, sch, q.dtype)
    # host_ok in both keys: a config fitted or tuned where host descriptors could not be used is not reused unmeasured
    # where they can (and the other way round)
    fit_key = (D, q.dtype, sch, q.device, launch.host_ok)
    if cfg is None:
        key = (torch.cuda.get_device_name(q.device), D, str(q.dtype), causal, sch, _sk_bucket(Sk), tma,
               launch.host_ok)
        cfg = _autotune(launch, key, fit_key, D, tma)
        source = "autotune"
    used = _launch_with_fallback(launch, cfg, fit_key)
    log.debug("flash_fwd_fp8: %s %s (%s%s)", sch.name, used, source, "" if used == cfg else f", asked {cfg}")
    return out
