"""Flash-attention forward: one Triton kernel and its launcher.

Algorithm (FlashAttention-2, Dao 2023; the loop structure and naming follow Triton's tutorial
``06-fused-attention.py``): each program owns ``BLOCK_M`` query rows of one (batch, query head). It
walks the key/value blocks of that row block once, keeping in registers the running row max ``m_i``,
the running softmax denominator ``l_i`` and the unnormalised output ``acc``; every new block rescales
them by ``exp(m_old - m_new)`` ("online softmax"). ``acc / l_i`` is the output and ``m_i + log(l_i)``
the log-sum-exp that the backward pass needs. Nothing of size ``Sq x Sk`` ever reaches memory.

Semantics are ``flashfuse.testing.attention_ref`` exactly (read its docstring first):

* GQA/MQA is the head map ``h -> h // (Hq // Hkv)`` applied to K/V pointers; K and V are never copied.
* Scores live in base 2: ``log2(e) * scale`` is folded into one multiply of ``q @ kᵀ`` and the
  softmax uses ``exp2`` (a single MUFU instruction on NVIDIA GPUs), as the tutorial does. ``lse``
  is converted back to the natural log at the end. With an additive mask the scores stay in natural
  units and ``log2(e)`` multiplies ``s - max`` instead (``NATURAL``, see ``_exp``): an HF mask holds
  ``finfo(float32).min``, which times ``log2(e)`` overflows to ``-inf`` and would turn a row of equal
  scores (eager: uniform weights) into an empty one (NaN).
* ``softcap``: ``s = softcap * tanh(s / softcap)``, with ``_common.tanh`` (a polynomial for small
  arguments, ``exp2`` above: float32-accurate, and the same code runs under ``TRITON_INTERPRET=1``).
* masks: a boolean keep-mask (read as uint8) or an additive float bias, read through four strides so
  that broadcast dimensions (stride 0) are never materialised.
* structure ``-window_left <= j - i <= window_right`` (causal is ``window_right = 0``): key blocks
  entirely outside the window are never visited, and the elementwise test runs only on the blocks
  that straddle a window edge or the ragged end of the keys (three loop phases, below).
* fully masked rows: ``0 / 0 = NaN`` for a ``-inf`` fill (what eager softmax gives); for a finite
  ``mask_fill`` the mean of ``v`` over all keys, precomputed by the launcher (rule 6 of testing.py).
* ``sinks`` (rule 8): one extra logit per head in every row's denominator. It is the online softmax's
  starting state: ``m_i = sink`` (in the scores' units) and ``l_i = exp(sink - m_i) = 1`` with
  ``acc = 0``, so a row with nothing kept ends as ``0 / 1 = 0`` and its ``lse`` is the sink's.
* dropout (rule 9): after the softmax, as FlashAttention does. ``l_i`` and ``lse`` sum the undropped
  ``p``; only the ``p @ v`` update sees the dropped tile, and the epilogue multiplies by ``1 / (1 - p)``
  once per row instead of once per element. The keep decision of ``(b, h, i, j)`` is Triton's Philox
  (``tl.rand``) with the key ``seed`` and the 64-bit counter ``offset + ((b * Hq + h) * Sq + i) * Sk + j``
  (``rng_state = [seed, offset]``): a function of the indices only, so the backward (other tile sizes, the
  transposed dK/dV tiles) and ``dropout_keep_mask`` regenerate the same mask. Rule-6 rows (the mean of
  ``v``) are not dropped.

Credits: Tri Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning"
(2023); Philippe Tillet and the Triton authors, ``python/tutorials/06-fused-attention.py``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from flashfuse.kernels._common import tanh as _tanh

__all__ = ["dropout_keep_mask", "flash_attention_forward"]

log = logging.getLogger(__name__)

_LOG2E = 1.4426950408889634  # log2(e): exp(x) == exp2(x * log2(e))

# Head dims below 16 cannot feed tl.dot (its K dimension must be >= 16); above 256 the Q tile and
# one K/V stage no longer fit in shared memory at any useful BLOCK_M.
_MIN_HEAD_DIM, _MAX_HEAD_DIM = 16, 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# mask kinds (constexpr): what the kernel reads from the mask pointer
_MASK_NONE, _MASK_BOOL, _MASK_ADD = 0, 1, 2


# ----------------------------------------------------------------------------------------------
# @triton.jit helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _mma(a, b, DOT_PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    """``a @ b`` with a float32 accumulator.

    NOTE: INTERPRET_BF16 is set only under the interpreter with bf16 inputs: triton 3.9's interpreter
    keeps bf16 as raw uint16 and its ``create_dot`` multiplies those bit patterns as integers (a 16x16
    bf16 dot was off by 2.5e10 here). Upcasting first is exact: a GPU bf16 MMA also forms exact products
    and accumulates them in fp32.
    """
    if INTERPRET_BF16:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=DOT_PRECISION)
    return c


@triton.jit
def _downcast(x, dtype: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    """``x.to(dtype)`` with round-to-nearest-even, also under the interpreter.

    NOTE: triton 3.9's interpreter converts fp32 -> bf16 by truncating the mantissa (round toward zero),
    a bias of half a bf16 ulp on average; on p and on the output it doubled the kernel's error vs eager
    (4.1e-3 vs 1.9e-3 at S=97, D=64). Rounding the fp32 bits first (add 0x7FFF plus the lowest kept bit,
    then drop 16 bits) makes the truncation exact. The GPU path is a plain cast (cvt.rn.bf16.f32).
    """
    if INTERPRET_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (((bits >> 16) & 1) + 0x7FFF)
        x = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _exp(z, NATURAL: tl.constexpr):
    """``exp`` of a score difference: scores are in base 2 unless NATURAL (additive mask present)."""
    if NATURAL:
        z = z * 1.4426950408889634
    return tl.exp2(z)


@triton.jit
def _dropout_keep(seed, rng_rows, cols, dropout_p):
    """Keep-mask of a tile (True with probability ``1 - dropout_p``): one Philox draw per (b, h, i, j).

    ``rng_rows = offset + ((b * Hq + h) * Sq + i) * Sk`` (int64) and ``cols = j``, already broadcast to the
    tile's orientation (``[queries, keys]`` or transposed). ``tl.rand`` maps the first 32-bit Philox-4x32-10
    output to a float in [0, 1) with 31 bits; the comparison is the same in every kernel, in fp32.
    """
    return tl.rand(seed, rng_rows + cols) >= dropout_p


@triton.jit
def _key_blocks(start_m, Sq, Sk, window_left, window_right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key blocks of the query rows ``[start_m, start_m + BLOCK_M)``: ``(lo, full_lo, full_hi, hi)``.

    NOTE: all bounds are multiples of BLOCK_N (except ``hi``), and every integer division has non-negative
    operands: Triton's // truncates on the GPU but floors in the interpreter. Rows i in [start_m, m_last]
    keep keys j with -window_left <= j - i <= window_right.
      lo .. hi       blocks touching the window of some row (everything else is skipped);
      lo .. full_lo  EDGE: left window edge; full_lo .. full_hi  inside for every row: no test;
      full_hi .. hi  EDGE: right window edge (the causal diagonal) and the ragged end of the keys.
    Unbounded windows arrive as window_left = Sq, window_right = Sk (the launcher clamps).
    """
    m_last = tl.minimum(start_m + BLOCK_M, Sq) - 1
    lo = (tl.maximum(start_m - window_left, 0) // BLOCK_N) * BLOCK_N
    hi = tl.minimum(Sk, m_last + window_right + 1)
    full_lo = tl.maximum(lo, ((tl.maximum(m_last - window_left, 0) + BLOCK_N - 1) // BLOCK_N) * BLOCK_N)
    full_hi = (tl.maximum(tl.minimum(start_m + window_right + 1, Sk), 0) // BLOCK_N) * BLOCK_N
    has_full = full_hi >= full_lo
    full_lo = tl.where(has_full, full_lo, lo)
    full_hi = tl.where(has_full, full_hi, lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q,
    K_head, V_head, Mask_rows,
    start, end,
    offs_m, offs_n, offs_d, offs_dv, row_ok,
    Sk, stride_kn, stride_kd, stride_vn, stride_vd, stride_mask_m, stride_mask_n,
    qk_scale, softcap_in, softcap_out, window_left, window_right, seed, rng_rows, dropout_p,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_SOFTCAP: tl.constexpr, EDGE: tl.constexpr, DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr,
):  # fmt: skip
    """Visit key blocks ``[start, end)`` and update the online-softmax state ``(acc, l_i, m_i)``.

    ``EDGE`` blocks straddle a window edge or the end of the keys: they get the elementwise structure
    and bounds test. Non-EDGE blocks are full blocks entirely inside the window: no index arithmetic.
    """
    k_mask = offs_d[:, None] < HEAD_DIM
    v_mask = offs_dv[None, :] < HEAD_DIM_V
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        # 64-bit block offset: Sk * stride_kn passes 2^31 for long BSHD-strided keys
        n64 = tl.cast(start_n, tl.int64)
        k_ptrs = K_head + n64 * stride_kn + (offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn)
        v_ptrs = V_head + n64 * stride_vn + (offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd)
        if EDGE:
            col_ok = cols < Sk
            k = tl.load(k_ptrs, mask=k_mask & col_ok[None, :], other=0.0)
        else:
            k = tl.load(k_ptrs, mask=k_mask, other=0.0)

        # -- scores: base 2 (log2(e) folded into qk_scale / softcap_out), natural with an additive mask --
        qk = _mma(q, k, DOT_PRECISION, INTERPRET_BF16)
        if HAS_SOFTCAP:
            s = _tanh(qk * softcap_in) * softcap_out
        else:
            s = qk * qk_scale

        # -- data mask --
        if MASK_KIND != 0:
            local_m = tl.arange(0, BLOCK_M)
            m_offs = local_m[:, None] * stride_mask_m + offs_n[None, :] * stride_mask_n
            m_ptrs = Mask_rows + n64 * stride_mask_n + m_offs
            if EDGE:
                mvals = tl.load(m_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0)
            else:
                mvals = tl.load(m_ptrs, mask=row_ok[:, None], other=0)
            if MASK_KIND == 1:
                s = tl.where(mvals != 0, s, float("-inf"))
            else:
                # natural units here (qk_scale has no log2(e) in it): finfo.min + s stays finite, and
                # a row of only such scores gets equal weights, as in eager
                s = s + mvals.to(tl.float32)

        # -- structure and ragged end of the keys --
        if EDGE:
            diff = cols[None, :] - offs_m[:, None]
            keep = (diff >= -window_left) & (diff <= window_right) & col_ok[None, :]
            s = tl.where(keep, s, float("-inf"))

        # -- online softmax --
        m_ij = tl.maximum(m_i, tl.max(s, 1))
        # "safe max": a row with nothing kept so far has m_ij = -inf; subtracting it would give
        # -inf - -inf = NaN. Using 0 instead leaves exp2(-inf - 0) = 0 for every masked position.
        m_safe = tl.where(m_ij == float("-inf"), 0.0, m_ij)
        p = _exp(s - m_safe[:, None], MASK_KIND == 2)
        alpha = _exp(m_i - m_safe, MASK_KIND == 2)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            # after l_i: the normaliser (and lse) is the undropped softmax's; 1 / (1 - p) in the epilogue
            p = tl.where(_dropout_keep(seed, rng_rows[:, None], cols[None, :], dropout_p), p, 0.0)
        if EDGE:
            v = tl.load(v_ptrs, mask=col_ok[:, None] & v_mask, other=0.0)
        else:
            v = tl.load(v_ptrs, mask=v_mask, other=0.0)
        acc = acc * alpha[:, None]
        acc += _mma(_downcast(p, v.dtype, INTERPRET_BF16), v, DOT_PRECISION, INTERPRET_BF16)
        m_i = m_ij
    return acc, l_i, m_i


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FwdConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def _interpreting() -> bool:
    # triton.jit picks InterpretedFunction when TRITON_INTERPRET=1 at decoration time; asking the kernel
    # itself is right even if the variable changed after import.
    return type(_attn_fwd).__name__ == "InterpretedFunction"


def _pick_config(D: int, dtype: torch.dtype, device: torch.device, mask_itemsize: int = 0) -> FwdConfig:
    """One config per (padded head dim, dtype); speed tuning comes later (a short autotune list).

    ``mask_itemsize`` (0: no mask) only lowers the pipelining depth: Triton multi-buffers the mask tile
    like K and V, and at D=128 a 128x128 uint8 mask tile x 3 stages asked for 256 KB of shared memory
    (H100: 227 KB). Whatever still does not fit is shrunk at launch (``_smaller``).
    """
    if _interpreting() or device.type != "cuda":
        # Interpreter: every tl op is a numpy call, so cost ~ number of ops; 32x16 tiles keep the CPU
        # tests fast and still give several key blocks (and BLOCK_M != BLOCK_N) at S = 97.
        return FwdConfig(block_m=32, block_n=16, num_warps=1, num_stages=1)
    block_d = max(16, triton.next_power_of_2(D))
    if dtype == torch.float32:
        # No tensor cores for exact fp32 (input_precision="ieee"): tl.dot unrolls into FMAs, so compile
        # time grows with BLOCK_M * BLOCK_N * D. H100, B=2, H=8, S=4096 (TFLOP/s, compile + first call):
        # D=64 32x32 11.5 (3.8 s), 64x64 12.7 (7.9 s); D=128 32x32 9.3 (4.3 s), 64x32 6.5 (12.2 s);
        # D=256 32x16 6.2 (5.1 s), 32x32 3.6 (11.9 s).
        if block_d <= 128:
            return FwdConfig(32, 32, 4, 2)
        return FwdConfig(32, 16, 4, 1)
    # Measured on an H100 (bf16, B=4, H=16, S=8192, TFLOP/s non-causal/causal; SDPA/cuDNN 471/448 at
    # D=64, 606/586 at D=128, 679/623 at D=256):
    #   D=64:  128x64 w8 s3 408/370;  64x64 w4 s3 405/371;  128x64 w4 s3 345/307;  128x128 w8 s3 351/316
    #   D=128: 128x128 w8 s3 464/436; 128x128 w8 s2 430/406; 128x64 w8 s3 394/374; 128x64 w4 s3 255/245
    #   D=256: 128x64 w8 s2 394/426;  64x32 w4 s2 290/313;   128x32 w8 s2 283/323
    # With a [B, 1, 1, S] mask tensor at D=128 (128x128 w8 s2): bool 291/266, additive fp32 193/160; the
    # per-element mask load is the cost, which the tile classification pre-pass of DESIGN.md should remove.
    if block_d <= 64:
        cfg = FwdConfig(128, 64, 8, 3)
    elif block_d <= 128:
        cfg = FwdConfig(128, 128, 8, 3)
    else:
        cfg = FwdConfig(128, 64, 8, 2)
    if mask_itemsize:
        cfg = replace(cfg, num_stages=min(cfg.num_stages, 2))
    return cfg


def _smaller(cfg: FwdConfig) -> FwdConfig | None:
    """The next config to try after a shared-memory overflow: fewer stages, then smaller tiles."""
    if cfg.num_stages > 2:
        return replace(cfg, num_stages=cfg.num_stages - 1)
    if cfg.block_n > 32:
        return replace(cfg, block_n=cfg.block_n // 2)
    if cfg.block_m > 32:
        return replace(cfg, block_m=cfg.block_m // 2)
    if cfg.num_stages > 1:
        return replace(cfg, num_stages=1)
    return None


# (D, Dv, dtype, mask dtype, device) -> the config that compiled; filled on first launch
_FITTED: dict[tuple, FwdConfig] = {}


# ----------------------------------------------------------------------------------------------
# kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _attn_fwd(
    Q, K, V, Mask, VMean, Sinks, Rng, Out, LSE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n,
    stride_vmb, stride_vmh, stride_vmd, stride_sink,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    Hq, GROUPS, Sq, Sk,
    qk_scale, softcap_in, softcap_out, window_left, window_right, fill_thr, fill_lse, sink_unit,
    dropout_p, keep_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_SOFTCAP: tl.constexpr, FINITE_FILL: tl.constexpr, HAS_SINKS: tl.constexpr,
    DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    off_hkv = off_h // GROUPS  # GQA: query head h reads key/value head h // (Hq // Hkv)

    # Scalars may arrive as fp64 from Inductor-generated launchers; keep all score math in fp32.
    qk_scale = tl.cast(qk_scale, tl.float32)
    softcap_in = tl.cast(softcap_in, tl.float32)
    softcap_out = tl.cast(softcap_out, tl.float32)
    fill_thr = tl.cast(fill_thr, tl.float32)
    fill_lse = tl.cast(fill_lse, tl.float32)
    sink_unit = tl.cast(sink_unit, tl.float32)

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < Sq

    # Per-(batch, head) base pointers in 64-bit: B * H * S * D passes 2^31 elements at long contexts.
    b64 = tl.cast(off_b, tl.int64)
    h64 = tl.cast(off_h, tl.int64)
    hkv64 = tl.cast(off_hkv, tl.int64)
    m64 = tl.cast(start_m, tl.int64)
    Q_rows = Q + b64 * stride_qb + h64 * stride_qh + m64 * stride_qm
    K_head = K + b64 * stride_kb + hkv64 * stride_kh
    V_head = V + b64 * stride_vb + hkv64 * stride_vh
    Mask_rows = Mask + b64 * stride_mask_b + h64 * stride_mask_h + m64 * stride_mask_m

    local_m = tl.arange(0, BLOCK_M)
    q = tl.load(
        Q_rows + local_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM),
        other=0.0,
    )

    if HAS_SINKS:
        # the sink is a key with score `sink` (natural units, times sink_unit = the scores' units) and value 0:
        # m_i = sink, l_i = exp(sink - m_i) = 1 (0 for a -inf sink, which then is no sink at all)
        sink = tl.load(Sinks + h64 * stride_sink).to(tl.float32) * sink_unit
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + sink
        l_i = _exp(m_i - tl.where(m_i == float("-inf"), 0.0, m_i), MASK_KIND == 2)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    if DROPOUT:
        # rng_state = [seed, offset] on the device: read here, so launching never waits for the host
        seed = tl.load(Rng)
        rng_rows = tl.load(Rng + 1) + ((b64 * Hq + h64) * Sq + offs_m) * Sk
        dropout_p = tl.cast(dropout_p, tl.float32)
        keep_scale = tl.cast(keep_scale, tl.float32)
    else:
        seed = 0
        rng_rows = offs_m
        dropout_p = 0.0

    # key blocks of this row block in three phases: left edge, inside (no elementwise test), right edge
    lo, full_lo, full_hi, hi = _key_blocks(start_m, Sq, Sk, window_left, window_right, BLOCK_M, BLOCK_N)

    # fmt: off
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, K_head, V_head, Mask_rows, lo, full_lo,
        offs_m, offs_n, offs_d, offs_dv, row_ok,
        Sk, stride_kn, stride_kd, stride_vn, stride_vd, stride_mask_m, stride_mask_n,
        qk_scale, softcap_in, softcap_out, window_left, window_right, seed, rng_rows, dropout_p,
        HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N,
        MASK_KIND, HAS_SOFTCAP, True, DROPOUT, DOT_PRECISION, INTERPRET_BF16,
    )
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, K_head, V_head, Mask_rows, full_lo, full_hi,
        offs_m, offs_n, offs_d, offs_dv, row_ok,
        Sk, stride_kn, stride_kd, stride_vn, stride_vd, stride_mask_m, stride_mask_n,
        qk_scale, softcap_in, softcap_out, window_left, window_right, seed, rng_rows, dropout_p,
        HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N,
        MASK_KIND, HAS_SOFTCAP, False, DROPOUT, DOT_PRECISION, INTERPRET_BF16,
    )
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, K_head, V_head, Mask_rows, full_hi, hi,
        offs_m, offs_n, offs_d, offs_dv, row_ok,
        Sk, stride_kn, stride_kd, stride_vn, stride_vd, stride_mask_m, stride_mask_n,
        qk_scale, softcap_in, softcap_out, window_left, window_right, seed, rng_rows, dropout_p,
        HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N,
        MASK_KIND, HAS_SOFTCAP, True, DROPOUT, DOT_PRECISION, INTERPRET_BF16,
    )
    # fmt: on

    # -- epilogue --
    # Rows with nothing kept have l_i = 0 and acc = 0: 0 / 0 = NaN and lse = -inf + log2(0) = -inf,
    # which is what eager softmax gives with a -inf fill (rule 6). With a sink, l_i >= 1 there: out = 0.
    out = acc / l_i[:, None]
    if DROPOUT:
        out = out * keep_scale
    if MASK_KIND == 2:
        lse = m_i + tl.log2(l_i) * 0.6931471805599453  # m_i is already natural
    else:
        lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # base 2 -> natural log
    if FINITE_FILL:
        # A finite fill (finfo.min, -1e4 ...) made eager see a row of equal scores: the mean of v over
        # all keys. Same when the best kept score is itself at or below fill / 2 (fill_thr, in m_i's units).
        empty = (l_i == 0.0) | (m_i <= fill_thr)
        vmean = tl.load(
            VMean + b64 * stride_vmb + hkv64 * stride_vmh + offs_dv * stride_vmd,
            mask=offs_dv < HEAD_DIM_V,
            other=0.0,
        )
        out = tl.where(empty[:, None], vmean[None, :], out)
        lse = tl.where(empty, fill_lse, lse)

    O_rows = Out + b64 * stride_ob + h64 * stride_oh + m64 * stride_om
    tl.store(
        O_rows + local_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
        _downcast(out, Out.dtype.element_ty, INTERPRET_BF16),
        mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V),
    )
    L_rows = LSE + b64 * stride_lb + h64 * stride_lh
    tl.store(L_rows + offs_m * stride_lm, lse, mask=row_ok)


# ----------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------


def _check_int_or_none(name: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{name}: expected an int or None, got {value!r}")


def _check_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}: expected a float, got {value!r}")  # noqa: TRY004 (the op's contract: ValueError)
    return float(value)


def _validate(q, k, v, mask, scale, window_left, window_right, mask_fill, softcap) -> None:
    layouts = (("q", q, "[B, Hq, Sq, D]"), ("k", k, "[B, Hkv, Sk, D]"), ("v", v, "[B, Hkv, Sk, Dv]"))
    for name, t, dims in layouts:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")  # noqa: TRY004
        if t.dim() != 4:
            raise ValueError(f"{name}: expected 4-D {dims}, got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
        raise ValueError(
            f"q/k/v dtype: expected one of float16, bfloat16, float32, the same for all three; "
            f"got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"q/k/v device: expected one device, got {q.device}, {k.device}, {v.device}")
    if q.device.type != "cuda" and not _interpreting():
        raise ValueError(f"q/k/v device: {q.device} tensors need a CUDA device or TRITON_INTERPRET=1 set before import")
    B, Hq, Sq, D = q.shape
    _, Hkv, Sk, Dv = v.shape
    if k.shape[0] != B:
        raise ValueError(f"k: batch {k.shape[0]} differs from q's batch {B}")
    if k.shape[3] != D:
        raise ValueError(f"k: head dim {k.shape[3]} differs from q's head dim {D}")
    if tuple(v.shape[:3]) != tuple(k.shape[:3]):
        raise ValueError(
            f"v: expected [B, Hkv, Sk, Dv] with B, Hkv, Sk of k {tuple(k.shape[:3])}, got {tuple(v.shape)}"
        )
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"Hq ({Hq}) must be a multiple of Hkv ({Hkv})")
    for name, d in (("head dim", D), ("v head dim", Dv)):
        if not _MIN_HEAD_DIM <= d <= _MAX_HEAD_DIM:
            raise ValueError(f"{name} {d} unsupported: {_MIN_HEAD_DIM}..{_MAX_HEAD_DIM}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise ValueError(f"mask: expected a torch.Tensor or None, got {type(mask).__name__}")
        if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
            raise ValueError(f"mask dtype: expected bool (keep-mask) or a float dtype (additive), got {mask.dtype}")
        if mask.device != q.device:
            raise ValueError(f"mask: device {mask.device} differs from q's device {q.device}")
        target = (B, Hq, Sq, Sk)
        try:
            ok = mask.dim() <= 4 and tuple(torch.broadcast_shapes(mask.shape, target)) == target
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"mask: shape {tuple(mask.shape)} not broadcastable to [B,Hq,Sq,Sk] = {list(target)}")
    scale = _check_float("scale", scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite float, got {scale}")
    _check_int_or_none("window_left", window_left)
    _check_int_or_none("window_right", window_right)
    mask_fill = _check_float("mask_fill", mask_fill)
    if math.isnan(mask_fill) or mask_fill == math.inf:
        raise ValueError(f"mask_fill: expected -inf or a finite float, got {mask_fill}")
    softcap = _check_float("softcap", softcap)
    if not (math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"softcap: expected a finite float >= 0 (0 = off), got {softcap}")


def _validate_sinks(q: torch.Tensor, sinks) -> None:
    if sinks is None:
        return
    if not isinstance(sinks, torch.Tensor):
        raise ValueError(f"sinks: expected a torch.Tensor or None, got {type(sinks).__name__}")  # noqa: TRY004
    if sinks.dim() != 1 or sinks.shape[0] != q.shape[1]:
        raise ValueError(f"sinks: expected shape [Hq] = [{q.shape[1]}], got {tuple(sinks.shape)}")
    if not sinks.dtype.is_floating_point:
        raise ValueError(f"sinks dtype: expected a float dtype, got {sinks.dtype}")
    if sinks.device != q.device:
        raise ValueError(f"sinks: device {sinks.device} differs from q's device {q.device}")


def _validate_dropout(q: torch.Tensor, dropout_p, rng_state) -> float:
    """``dropout_p`` in [0, 1) and, when it is > 0, ``rng_state`` an int64 ``[2]`` tensor on q's device."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {dropout_p!r}")  # noqa: TRY004
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p < 1.0:  # also NaN
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {dropout_p}")
    if dropout_p > 0:
        if not isinstance(rng_state, torch.Tensor):
            raise ValueError(f"rng_state: expected an int64 [2] tensor (seed, offset), got {type(rng_state).__name__}")
        if rng_state.dtype != torch.int64 or tuple(rng_state.shape) != (2,) or rng_state.device != q.device:
            raise ValueError(
                f"rng_state: expected an int64 [2] tensor (seed, offset) on {q.device}, got {rng_state.dtype} "
                f"{tuple(rng_state.shape)} on {rng_state.device}"
            )
    return dropout_p


def flash_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    scale: float,
    window_left: int | None = None,
    window_right: int | None = None,
    mask_fill: float = float("-inf"),
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    rng_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """returns (out [B,Hq,Sq,Dv] in q.dtype, contiguous; lse [B,Hq,Sq] float32)

    ``q: [B, Hq, Sq, D]``, ``k: [B, Hkv, Sk, D]``, ``v: [B, Hkv, Sk, Dv]`` with any strides; ``mask`` is
    None, a bool keep-mask or an additive float mask broadcastable to ``[B, Hq, Sq, Sk]``; ``sinks`` is
    None or ``[Hq]`` in any float dtype. ``dropout_p > 0`` drops probabilities with the keep-mask
    ``dropout_keep_mask(rng_state, ...)`` (``rng_state``: int64 ``[2]``, seed and offset, on q's device).
    Semantics: ``flashfuse.testing.attention_ref``. Bad arguments raise ``ValueError`` naming the argument.
    """
    _validate(q, k, v, mask, scale, window_left, window_right, mask_fill, softcap)
    _validate_sinks(q, sinks)
    dropout_p = _validate_dropout(q, dropout_p, rng_state)
    dropout = dropout_p > 0
    B, Hq, Sq, D = q.shape
    _, Hkv, Sk, Dv = v.shape
    out = torch.empty((B, Hq, Sq, Dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse

    if mask is None:
        mask_kind, mask_arg, mask_strides = _MASK_NONE, q, (0, 0, 0, 0)
    else:
        # stride-0 views of the broadcast dims: a [B, 1, 1, Sk] padding mask stays B * Sk bytes
        mask_arg = torch.broadcast_to(mask, (B, Hq, Sq, Sk))
        if mask.dtype == torch.bool:
            mask_kind, mask_arg = _MASK_BOOL, mask_arg.view(torch.uint8)
        else:
            mask_kind = _MASK_ADD
        mask_strides = mask_arg.stride()

    # scores (and m_i, fill_thr) in base 2 = natural * log2(e), except with an additive mask (kernel's _exp)
    score_unit = 1.0 if mask_kind == _MASK_ADD else _LOG2E
    mask_fill = float(mask_fill)
    # rule 6 (a finite fill makes empty rows the mean of v) does not apply with sinks: they are 0 there
    finite_fill = math.isfinite(mask_fill) and sinks is None
    if finite_fill:
        # fp32 accumulation without an fp32 copy of v; [B, Hkv, Dv] is tiny next to v itself
        vmean = torch.mean(v, dim=-2, dtype=torch.float32)
        # rule 6 threshold "max score <= fill / 2", in the kernel's base-2 units; clamped to the fp32 range
        fill_thr = mask_fill / 2 * score_unit
        fill_lse = mask_fill + (math.log(Sk) if Sk > 0 else -math.inf)
    else:
        vmean, fill_thr, fill_lse = lse, 0.0, 0.0
    vmean_strides = vmean.stride() if finite_fill else (0, 0, 0)

    # Unbounded windows become bounds no (i, j) pair can cross; clamping also keeps start_m - window_left
    # and m_last + window_right + 1 inside int32.
    wl = Sq if window_left is None else max(min(window_left, Sq), -Sk)
    wr = Sk if window_right is None else max(min(window_right, Sk), -Sq)

    softcap = float(softcap)
    has_softcap = softcap > 0
    interpreted = _interpreting()
    # fmt: off
    args = (
        q, k, v, mask_arg, vmean, lse if sinks is None else sinks, rng_state if dropout else lse, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *mask_strides, *vmean_strides,
        0 if sinks is None else sinks.stride(0), *out.stride(), *lse.stride(),
        Hq, Hq // Hkv, Sq, Sk,
        float(scale) * score_unit,
        float(scale) / softcap if has_softcap else 0.0,
        softcap * score_unit,
        wl, wr, fill_thr, fill_lse, score_unit,
        dropout_p, 1.0 / (1.0 - dropout_p),
    )
    # fmt: on
    meta = {
        "HEAD_DIM": D,
        "HEAD_DIM_V": Dv,
        "BLOCK_D": max(16, triton.next_power_of_2(D)),
        "BLOCK_DV": max(16, triton.next_power_of_2(Dv)),
        "MASK_KIND": mask_kind,
        "HAS_SOFTCAP": has_softcap,
        "FINITE_FILL": finite_fill,
        "HAS_SINKS": sinks is not None,
        "DROPOUT": dropout,
        # fp32 inputs: "ieee" keeps tl.dot from rounding operands to tf32 (10-bit mantissa)
        "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
        "INTERPRET_BF16": interpreted and q.dtype == torch.bfloat16,
    }

    mask_dtype = None if mask is None else mask_arg.dtype
    key = (D, Dv, q.dtype, mask_dtype, q.device)
    cfg = _FITTED.get(key)
    if cfg is None:
        cfg = _pick_config(max(D, Dv), q.dtype, q.device, 0 if mask is None else mask_arg.element_size())
    while True:
        grid = (triton.cdiv(Sq, cfg.block_m), Hq, B)
        launch = dict(
            meta, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages
        )
        try:
            if q.device.type == "cuda":
                with torch.cuda.device(q.device):
                    _attn_fwd[grid](*args, **launch)
            else:
                _attn_fwd[grid](*args, **launch)
            break
        except OutOfResources as e:
            # raised while compiling, before anything runs: retry smaller (the autotuner's pruning, by hand)
            smaller = _smaller(cfg)
            if smaller is None:
                raise
            log.info("flash_fwd: %s does not fit (%s); trying %s", cfg, e, smaller)
            cfg = smaller
    _FITTED[key] = cfg
    return out, lse


# ----------------------------------------------------------------------------------------------
# the dropout keep-mask, for tests and for the reference backward after a kernel forward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _dropout_mask_kernel(Rng, Keep, Sq, Sk, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    off_bh = tl.cast(tl.program_id(0), tl.int64)  # b * Hq + h
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = off_bh * Sq + offs_m
    rng_rows = tl.load(Rng + 1) + rows * Sk
    keep = _dropout_keep(tl.load(Rng), rng_rows[:, None], offs_n[None, :], tl.cast(dropout_p, tl.float32))
    tl.store(Keep + rows[:, None] * Sk + offs_n[None, :], keep.to(tl.int8),
             mask=(offs_m[:, None] < Sq) & (offs_n[None, :] < Sk))


def dropout_keep_mask(rng_state: torch.Tensor, B: int, Hq: int, Sq: int, Sk: int, dropout_p: float) -> torch.Tensor:
    """The kernels' keep-mask for ``rng_state``: bool ``[B, Hq, Sq, Sk]`` on ``rng_state``'s device.

    The same ``_dropout_keep`` with the same counters as the forward and backward kernels, so a reference
    given this mask reproduces the kernels' dropout exactly. It materialises ``B * Hq * Sq * Sk`` bytes:
    for tests and for the reference backward, never for the fast path.
    """
    dropout_p = _validate_dropout(rng_state, dropout_p, rng_state)
    keep = torch.ones((B, Hq, Sq, Sk), dtype=torch.int8, device=rng_state.device)
    if dropout_p == 0 or keep.numel() == 0:
        return keep.bool()
    block_m, block_n = (16, 16) if _interpreting() else (64, 64)
    grid = (B * Hq, triton.cdiv(Sq, block_m), triton.cdiv(Sk, block_n))
    if rng_state.device.type == "cuda":
        with torch.cuda.device(rng_state.device):
            _dropout_mask_kernel[grid](rng_state, keep, Sq, Sk, dropout_p, BLOCK_M=block_m, BLOCK_N=block_n)
    else:
        _dropout_mask_kernel[grid](rng_state, keep, Sq, Sk, dropout_p, BLOCK_M=block_m, BLOCK_N=block_n)
    return keep.bool()
