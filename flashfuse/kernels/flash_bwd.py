"""Flash-attention backward: three Triton kernels and their launcher.

Algorithm (FlashAttention-2, Dao 2023; loop structure and naming follow Triton's tutorial
``06-fused-attention.py``). The forward saved only ``out`` and the log-sum-exp ``lse``; every tile of
``P = exp(S - lse)`` is recomputed from Q and K, and with ``dP = dO Vᵀ`` and ``delta = rowsum(dO * O)``
(``= rowsum(dP * P)``) the softmax gradient is ``dS = P * (dP - delta)``. Then ``dV = Pᵀ dO``,
``dK = scale * dSᵀ Q``, ``dQ = scale * dS K``.

1. ``_attn_bwd_preprocess`` (one program per query block and head): ``delta``; the row statistics the
   other kernels read (``lse`` in their units, see below); the sinks' gradient; the bookkeeping of rows
   that rule 6 or NaN make special.
2. ``_attn_bwd_dkdv`` (one program per key block and KV head): walks the query blocks that see its keys,
   for every query head of its GQA group in turn, accumulating dK and dV of the KV head in fp32
   registers: the group's sum happens in place, K and V are never expanded and dK/dV never exist per
   query head.
3. ``_attn_bwd_dq`` (one program per query block and query head): walks the key blocks like the forward
   and accumulates dQ; it also accumulates the additive mask's gradient when asked.

NOTE: why dQ is a separate pass and not atomics. With dQ inside the key-block kernel (FA2's CUDA code),
every program adds its partial dQ into an fp32 ``[B, Hq, Sq, D]`` buffer with atomics, which then needs
a conversion pass; the sum order changes from run to run (dQ is not deterministic), and with GQA there
are ``Hq / Hkv`` times more programs adding to the same rows. The separate pass costs recomputing
``Q Kᵀ`` and ``dO Vᵀ`` (7 matmuls per tile pair instead of 5, ~1.4x the FLOPs) but is deterministic,
needs no extra buffer, and keeps per-row fixes (NaN rows, below) local. Triton's tutorial recomputes
too (its one launch runs a dK/dV loop and then a dQ loop).

Semantics are ``flashfuse.testing.attention_backward_ref`` exactly; the cases that need care:

* units: as in the forward, scores are base 2 (``log2(e) * scale`` folded into ``q kᵀ``) and the
  kernels read ``lse * log2(e)``; with an additive mask (``NATURAL``) scores stay natural and
  ``log2(e)`` multiplies ``s - lse``. ``dS`` is always the gradient w.r.t. the natural score.
* softcap: ``s = c * tanh(x / c)`` with ``x = q kᵀ * scale``, so ``dx = dS * (1 - tanh²)`` (the tanh of
  ``_common.tanh``, as the forward: eager's tanh backward forms ``1 - y²`` from its output too); the
  additive mask's gradient is ``dS`` itself (the bias is added after the cap).
* rule-6 rows (finite ``mask_fill``, no sinks: the row's output is the mean of V): no gradient to q, k
  or the mask, and ``dO / Sk`` to every key's dV. They are recognised by ``lse <= mask_fill / 2`` (the
  forward writes ``mask_fill + log(Sk)`` there, and any other row has ``lse >= max score > fill / 2``;
  this holds for ``mask_fill <= -2 log(Sk)``, i.e. every fill the op accepts). The preprocess gives them
  ``lse = +inf`` (so ``P = 0`` and ``dS = 0`` wherever they are visited) and sums their ``dO / Sk`` per
  KV head into ``vbar``, which the dK/dV kernel adds to every key, also keys that the band skips.
* NaN rows (``lse = -inf``: nothing kept under a ``-inf`` fill): the reference (and eager autograd)
  gives NaN for dQ of the row, for dK and dV of every key of the KV head, and for the mask gradient of
  the whole row. Block skipping would confine the NaN to visited blocks, so the NaN is written
  explicitly: dQ per row, dK/dV through a per-KV-head flag set by the preprocess, the mask gradient in
  the launcher.
* saturated rows (additive masks only): with a bias such as ``finfo(float32).min`` on every kept key,
  ``lse = m + log(l)`` rounds to ``m`` (ulp 2e31), so ``exp(S - lse)`` would forget the ``1 / l`` and
  give every tied key weight 1 instead of ``1 / l``. For rows with ``|lse| >= 2**14`` the preprocess
  recomputes ``lo = log2(sum_j exp(s_j - lse))`` (one extra pass over that row block's keys, rare:
  such rows are fully masked padding rows) and the kernels use ``P = exp2((S - lse) log2(e) - lo)``.
* sinks: ``p_sink = exp(sink - lse)`` per row; ``dsinks[h] = -sum(p_sink * delta)`` over batch and rows.
* dropout (rule 9): the forward's ``O = (P * keep / (1 - p)) V`` with ``lse`` of the undropped P. Each tile
  regenerates ``keep`` from the same Philox counters as the forward (``_dropout_keep``: a function of
  (b, h, i, j) only, so the transposed dK/dV tiles and other tile sizes get the same mask). Then
  ``dP = keep / (1 - p) * dO Vᵀ`` and ``dS = P * (dP - delta)`` with the undropped P; ``delta =
  rowsum(dO * O)`` still equals ``rowsum(P * dP)``; ``dV = sum (P * keep)ᵀ dO``, times ``1 / (1 - p)`` once
  at the end (before the rule-6 rows' ``vbar``, which are not dropped).
* the additive mask's gradient ``dS`` summed over the broadcast dims of the mask: tiles are summed over
  the rows (columns) first where the mask is broadcast over rows (columns), then added with fp32 atomics
  into a zeroed buffer of the mask's shape, read through the same broadcast strides as the mask.

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
from flashfuse.kernels.flash_fwd import (
    _LOG2E,
    _MASK_ADD,
    _MASK_BOOL,
    _MASK_NONE,
    _downcast,
    _dropout_keep,
    _key_blocks,
    _mma,
    _validate,
    _validate_dropout,
    _validate_sinks,
)

__all__ = ["flash_attention_backward"]

log = logging.getLogger(__name__)

# |lse| from which a row's lse may have lost its log(l) to rounding (ulp(2^14) = 2^-9): rows with an
# additive mask at or beyond it get their normaliser recomputed (module docstring, "saturated rows").
# Below it the rounding of lse (<= 2^-10 relative on P) is no larger than the rounding of the scores
# themselves, which eager float32 has too.
_LSE_EXACT = 2.0**14


# ----------------------------------------------------------------------------------------------
# @triton.jit helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _scores(
    qk, ii, jj, Mask_tile, li, lj,
    Sq, Sk, stride_mask_m, stride_mask_n,
    qk_scale, softcap_in, softcap_out, window_left, window_right,
    MASK_KIND: tl.constexpr, HAS_SOFTCAP: tl.constexpr, EDGE: tl.constexpr,
):  # fmt: skip
    """Scores of a tile from ``qk = q·k`` exactly as the forward forms them; ``(s, tanh term)``.

    The tile may be ``[queries, keys]`` or transposed: ``ii``/``jj`` are the absolute query/key indices
    and ``li``/``lj`` the ones relative to ``Mask_tile``, all broadcast to the tile's orientation.
    """
    if HAS_SOFTCAP:
        t = _tanh(qk * softcap_in)
        s = t * softcap_out
    else:
        t = qk
        s = qk * qk_scale
    if MASK_KIND != 0:
        mvals = tl.load(Mask_tile + li * stride_mask_m + lj * stride_mask_n, mask=(ii < Sq) & (jj < Sk), other=0)
        if MASK_KIND == 1:
            s = tl.where(mvals != 0, s, float("-inf"))
        else:
            s = s + mvals.to(tl.float32)
    if EDGE:
        diff = jj - ii
        keep = (diff >= -window_left) & (diff <= window_right) & (jj < Sk)
        s = tl.where(keep, s, float("-inf"))
    return s, t


@triton.jit
def _tile_grads(
    qk, dp, lse, lo, delta, ii, jj, Mask_tile, li, lj,
    Sq, Sk, stride_mask_m, stride_mask_n,
    qk_scale, softcap_in, softcap_out, window_left, window_right,
    MASK_KIND: tl.constexpr, HAS_SOFTCAP: tl.constexpr, EDGE: tl.constexpr,
):  # fmt: skip
    """``(p, dS, dX)`` of a tile: probabilities, the gradient w.r.t. the (biased) score, and w.r.t.
    ``q·k * scale`` (``dS`` through the softcap). ``lse``, ``lo`` and ``delta`` are per query row,
    broadcast to the tile; ``lse`` is in the scores' units, ``lo`` in base 2."""
    s, t = _scores(
        qk, ii, jj, Mask_tile, li, lj, Sq, Sk, stride_mask_m, stride_mask_n,
        qk_scale, softcap_in, softcap_out, window_left, window_right, MASK_KIND, HAS_SOFTCAP, EDGE,
    )  # fmt: skip
    if MASK_KIND == 2:
        p = tl.exp2((s - lse) * 1.4426950408889634 - lo)
    else:
        p = tl.exp2(s - lse)
    ds = p * (dp - delta)
    if HAS_SOFTCAP:
        dx = ds * (1.0 - t * t)
    else:
        dx = ds
    return p, ds, dx


@triton.jit
def _query_blocks(start_n, Sq, Sk, window_left, window_right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query blocks that see the keys ``[start_n, start_n + BLOCK_N)``: ``(lo, full_lo, full_hi, hi)``.

    The transpose of the forward's ``_key_blocks``: query i sees key j iff j - window_right <= i <=
    j + window_left. Ascending in i, the first EDGE blocks straddle the right window edge (the causal
    diagonal), ``full_lo .. full_hi`` are inside for every (i, j) and have every row < Sq (no test at
    all), the last EDGE blocks straddle the left window edge or the ragged end of the queries. Keys at
    or past Sk need no test here: they only reach dK/dV rows that are never stored.
    """
    n_last = tl.minimum(start_n + BLOCK_N, Sk) - 1
    lo = (tl.maximum(start_n - window_right, 0) // BLOCK_M) * BLOCK_M
    hi = tl.minimum(Sq, n_last + window_left + 1)
    # inside: n_last - m <= window_right (first row) and start_n - (m + BLOCK_M - 1) >= -window_left (last)
    full_lo = tl.maximum(lo, ((tl.maximum(n_last - window_right, 0) + BLOCK_M - 1) // BLOCK_M) * BLOCK_M)
    full_hi = (tl.maximum(tl.minimum(start_n + window_left + 1, Sq), 0) // BLOCK_M) * BLOCK_M
    has_full = full_hi >= full_lo
    full_lo = tl.where(has_full, full_lo, lo)
    full_hi = tl.where(has_full, full_hi, lo)
    return lo, full_lo, full_hi, hi


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BwdConfig:
    """Tiles of both passes: dK/dV programs own ``block_n1`` keys and step ``block_m1`` queries; dQ
    programs own ``block_m2`` queries and step ``block_n2`` keys (the preprocess uses the dQ tiles)."""

    block_m1: int
    block_n1: int
    block_m2: int
    block_n2: int
    num_warps: int
    num_stages: int
    # the dQ pass's (and the preprocess's) own warps and stages; 0: the same as the dK/dV pass's
    dq_warps: int = 0
    dq_stages: int = 0
    # the loop tiles through host TMA descriptors, per pass (K and V of the dQ pass; Q and dO of the dK/dV pass),
    # where the call allows them (``_tma_ok``): Hopper or later, power-of-two head dims, 16-byte aligned strides
    dq_tma: bool = False
    dkdv_tma: bool = False

    def tma(self, pass_: str) -> bool:
        """Whether ``pass_`` (``"dkdv"`` or ``"dq"``) asks for TMA descriptors."""
        return bool(self.dq_tma if pass_ == "dq" else self.dkdv_tma)

    def warps_stages(self, pass_: str) -> tuple[int, int]:
        """``(num_warps, num_stages)`` of the ``"dkdv"`` pass or the ``"dq"`` pass (and preprocess)."""
        if pass_ == "dq":
            return self.dq_warps or self.num_warps, self.dq_stages or self.num_stages
        return self.num_warps, self.num_stages


def _interpreting() -> bool:
    return type(_attn_bwd_dq).__name__ == "InterpretedFunction"


def _pick_config(D: int, dtype: torch.dtype, device: torch.device) -> BwdConfig:
    """One config per (padded head dim, dtype).

    The fp16/bf16 configs for D = 64, 128, 256 are the sweep's best per head dim (``bench/tune_bwd.py``,
    NVIDIA H200, triton 3.6, bf16, S = 4k and 8k x causal/full x MHA/GQA 32/8, 2026-11-29; bench/RESULTS.md):
    D = 64 (and, until the TMA paragraph below, 256) take the single config within 4% of the best of every one of
    their 8 cases. D = 128 combines
    the dK/dV pass's best tiles and stages (64 x 128, 2 stages) with the dQ pass's (128 x 64, 3 stages): the
    sweep's per-pass times add up to 8-9% less than its best single config; timed as a whole in the session-3
    fwd+bwd table (causal S = 4k): 326 TFLOP/s of fwd+bwd against 307 with the best single config
    (32, 128, 128, 64, 8, 3). Against the untuned configs they are 3.0-3.5x faster
    (D = 128 causal S = 4k: 96 -> 276-293 TFLOP/s of backward). Other head dims (16, 32) keep the unmeasured
    tutorial-derived tiles. Whatever does not compile is shrunk at launch (``_smaller``).

    TMA (2026-11-30, same card and sweep tool, S = 4k, B = 4): host descriptors for the dQ pass's K and V tiles
    made that pass 20-25% faster at D = 128 (causal MHA 0.93 -> 0.73 ms, GQA 32/8 1.79 -> 1.38, full MHA
    1.67 -> 1.25) and 6-8% at D = 64; for the dK/dV pass's Q and dO tiles they were slower at D = 64 and 128
    (GQA causal 2.38 -> 2.86 ms) and faster at D = 256, where two stages with TMA in both passes took the
    backward from 119 to 178 TFLOP/s (GQA 147 -> 213; two stages without TMA: 157 / 163). Backward TFLOP/s at
    D = 128 with dq_tma: causal 323 (MHA) / 359 (GQA), full 350 / 398.
    """
    if _interpreting() or device.type != "cuda":
        # Interpreter: cost ~ number of tl ops; 16x32 / 32x16 tiles still give several blocks at S = 97.
        return BwdConfig(block_m1=16, block_n1=32, block_m2=32, block_n2=16, num_warps=1, num_stages=1)
    block_d = max(16, triton.next_power_of_2(D))
    if dtype == torch.float32:
        # exact fp32 dots unroll into FMAs: keep the tiles (and the compile time) small, as the forward does;
        # at D=256 the fp32 K/V tiles alone are 2 * 32 * 256 * 4 = 64 KB of registers: 8 warps
        return BwdConfig(16, 32, 32, 16, 4 if block_d <= 128 else 8, 1)
    if block_d <= 32:
        return BwdConfig(32, 128, 128, 32, 4, 3)
    if block_d <= 64:
        return BwdConfig(64, 64, 64, 64, 4, 3, dq_tma=True)
    if block_d <= 128:
        return BwdConfig(64, 128, 128, 64, 8, 2, dq_warps=8, dq_stages=3, dq_tma=True)
    return BwdConfig(64, 64, 64, 64, 8, 2, dq_tma=True, dkdv_tma=True)


def _tma_ok(a: torch.Tensor, b: torch.Tensor, scores: int) -> bool:
    """Whether host TMA descriptors can carry one pass's loop tiles: ``a`` and ``b`` are Q and dO (the dK/dV
    pass, ``BwdConfig.dkdv_tma``) or K and V (the dQ pass, ``dq_tma``).

    Boxes are whole head dims (``[1, 1, rows, D]``), so each head dim must be its own padded size; both tensors
    need TMA's layout (``flash_fwd_sm90._tma_reason``) and no broadcast dim. On CUDA the call (``scores`` =
    B * Hq * Sq * Sk) must be big enough to pay the descriptors' host time (``flash_fwd_sm90._HOST_MIN_SCORES``)
    and the GPU an NVIDIA Hopper or later; the interpreter (tests) always honours the flags.
    """
    from flashfuse.kernels import flash_fwd_sm90 as sm90

    if any(t.shape[-1] != max(16, triton.next_power_of_2(t.shape[-1])) for t in (a, b)):
        return False
    if not sm90._host_descriptors_ok(a, b) or sm90._tma_reason("a", a) or sm90._tma_reason("b", b):
        return False
    if _interpreting():
        return True
    return (
        a.device.type == "cuda"
        and torch.version.hip is None
        and torch.cuda.get_device_capability(a.device)[0] >= 9
        and scores >= sm90._HOST_MIN_SCORES
    )


def _smaller(cfg: BwdConfig, pass_: str = "dkdv") -> BwdConfig | None:
    """The next config to try after a shared-memory overflow of ``pass_``: fewer stages of that pass, then smaller
    tiles (of both passes)."""
    if pass_ == "dq" and cfg.dq_stages > 2:
        return replace(cfg, dq_stages=cfg.dq_stages - 1)
    if pass_ != "dq" and cfg.num_stages > 2:
        return replace(cfg, num_stages=cfg.num_stages - 1)
    if max(cfg.block_n1, cfg.block_m2) > 32:
        return replace(cfg, block_n1=max(32, cfg.block_n1 // 2), block_m2=max(32, cfg.block_m2 // 2))
    if max(cfg.block_m1, cfg.block_n2, cfg.block_n1, cfg.block_m2) > 16:
        return BwdConfig(16, max(16, cfg.block_n1 // 2), max(16, cfg.block_m2 // 2), 16, cfg.num_warps, 1,
                         cfg.dq_warps, min(cfg.dq_stages, 1), dq_tma=cfg.dq_tma, dkdv_tma=cfg.dkdv_tma)
    if cfg.num_stages > 1 or cfg.dq_stages > 1:
        return replace(cfg, num_stages=1, dq_stages=min(cfg.dq_stages, 1))
    return None


# (D, Dv, dtype, mask dtype, device, TMA possible in the dK/dV pass, in the dQ pass) -> the config that compiled;
# filled on first launch
_FITTED: dict[tuple, BwdConfig] = {}


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_preprocess(
    O, DO, LSE, Sinks, Q, K, Mask,
    Delta, LseK, Lo, VBar, NanFlag, DSinks,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lb, stride_lh, stride_lm,
    stride_sink,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n,
    stride_rb, stride_rh,
    Hkv, GROUPS, Sq, Sk,
    qk_scale, softcap_in, softcap_out, window_left, window_right, fill_half, inv_sk, lse_exact,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_SOFTCAP: tl.constexpr, RULE6: tl.constexpr, HAS_SINKS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    off_hkv = off_h // GROUPS
    qk_scale = tl.cast(qk_scale, tl.float32)
    softcap_in = tl.cast(softcap_in, tl.float32)
    softcap_out = tl.cast(softcap_out, tl.float32)
    fill_half = tl.cast(fill_half, tl.float32)
    inv_sk = tl.cast(inv_sk, tl.float32)
    lse_exact = tl.cast(lse_exact, tl.float32)

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < Sq
    b64 = tl.cast(off_b, tl.int64)
    h64 = tl.cast(off_h, tl.int64)
    hkv64 = tl.cast(off_hkv, tl.int64)
    m64 = tl.cast(start_m, tl.int64)
    local_m = tl.arange(0, BLOCK_M)

    # -- delta = rowsum(dO * O), fp32 --
    tile_ok = row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V)
    o = tl.load(
        O + b64 * stride_ob + h64 * stride_oh + m64 * stride_om
        + local_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
        mask=tile_ok, other=0.0,
    ).to(tl.float32)  # fmt: skip
    do = tl.load(
        DO + b64 * stride_dob + h64 * stride_doh + m64 * stride_dom
        + local_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
        mask=tile_ok, other=0.0,
    ).to(tl.float32)  # fmt: skip
    delta = tl.sum(o * do, 1)
    lse = tl.load(LSE + b64 * stride_lb + h64 * stride_lh + offs_m * stride_lm, mask=row_ok, other=0.0)

    # -- NaN rows (nothing kept under a -inf fill): flag the KV head, whose dK/dV are then NaN --
    any_nan = tl.max((row_ok & (lse == float("-inf"))).to(tl.int32), 0)
    tl.atomic_max(NanFlag + b64 * Hkv + hkv64, any_nan)

    # -- rule 6: rows that are the mean of V pass dO / Sk to every key of the KV head, nothing else --
    lse_k = lse
    if RULE6:
        empty = row_ok & (lse <= fill_half)
        if tl.max(empty.to(tl.int32), 0) > 0:
            part = tl.sum(tl.where(empty[:, None], do, 0.0), 0) * inv_sk
            tl.atomic_add(VBar + (b64 * Hkv + hkv64) * HEAD_DIM_V + offs_dv, part, mask=offs_dv < HEAD_DIM_V)
        lse_k = tl.where(empty, float("inf"), lse)

    # -- saturated rows (additive mask): recompute the normaliser that rounding took out of lse --
    lo = tl.zeros([BLOCK_M], dtype=tl.float32)
    if MASK_KIND == 2:
        sat = row_ok & (tl.abs(lse) >= lse_exact) & (lse_k < float("inf")) & (lse > float("-inf"))
        if tl.max(sat.to(tl.int32), 0) > 0:
            offs_d = tl.arange(0, BLOCK_D)
            offs_n = tl.arange(0, BLOCK_N)
            q = tl.load(
                Q + b64 * stride_qb + h64 * stride_qh + m64 * stride_qm
                + local_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0,
            )  # fmt: skip
            K_head = K + b64 * stride_kb + hkv64 * stride_kh
            Mask_rows = Mask + b64 * stride_mask_b + h64 * stride_mask_h + m64 * stride_mask_m
            lo_n, _mid_lo, _mid_hi, hi_n = _key_blocks(start_m, Sq, Sk, window_left, window_right, BLOCK_M, BLOCK_N)
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
            for start_n in range(lo_n, hi_n, BLOCK_N):
                n64 = tl.cast(start_n, tl.int64)
                cols = start_n + offs_n
                kT = tl.load(
                    K_head + n64 * stride_kn + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn,
                    mask=(offs_d[:, None] < HEAD_DIM) & (cols[None, :] < Sk), other=0.0,
                )  # fmt: skip
                qk = _mma(q, kT, DOT_PRECISION, INTERPRET_BF16)
                s, _unused_t = _scores(
                    qk, offs_m[:, None], cols[None, :], Mask_rows + n64 * stride_mask_n,
                    local_m[:, None], offs_n[None, :], Sq, Sk, stride_mask_m, stride_mask_n,
                    qk_scale, softcap_in, softcap_out, window_left, window_right, MASK_KIND, HAS_SOFTCAP, True,
                )  # fmt: skip
                l_i += tl.sum(tl.exp2((s - lse[:, None]) * 1.4426950408889634), 1)
            if HAS_SINKS:
                sink = tl.load(Sinks + h64 * stride_sink).to(tl.float32)
                l_i += tl.exp2((sink - lse) * 1.4426950408889634)
            lo = tl.where(sat, tl.log2(l_i), 0.0)
        tl.store(Lo + b64 * stride_rb + h64 * stride_rh + offs_m, lo, mask=row_ok)
    else:
        lse_k = lse_k * 1.4426950408889634  # base 2, like the scores

    # -- sinks: dsinks[h] = -sum over rows of p_sink * delta --
    if HAS_SINKS:
        sink = tl.load(Sinks + h64 * stride_sink).to(tl.float32)
        p_sink = tl.exp2((sink - lse) * 1.4426950408889634 - lo)
        tl.atomic_add(DSinks + h64, -tl.sum(tl.where(row_ok, p_sink * delta, 0.0), 0))

    tl.store(Delta + b64 * stride_rb + h64 * stride_rh + offs_m, delta, mask=row_ok)
    tl.store(LseK + b64 * stride_rb + h64 * stride_rh + offs_m, lse_k, mask=row_ok)


@triton.jit
def _attn_bwd_dkdv_inner(
    dk, dv, k, v,
    Q_head, DO_head, Mask_head, LseK_head, Lo_head, Delta_head,
    start, end, offs_n, offs_d, offs_dv,
    Sq, Sk, stride_qm, stride_qd, stride_dom, stride_dod, stride_mask_m, stride_mask_n,
    qk_scale, softcap_in, softcap_out, window_left, window_right, seed, rng_off, rng_head, dropout_p, keep_scale,
    DescQ, DescDO, off_b, off_h,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_SOFTCAP: tl.constexpr, EDGE: tl.constexpr, DROPOUT: tl.constexpr,
    USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr,
):  # fmt: skip
    """Visit query blocks ``[start, end)`` of one query head; tiles are transposed (``[keys, queries]``)
    so that ``Pᵀ`` and ``dSᵀ`` come out of the dots as the left operands of ``dV += Pᵀ dO`` and
    ``dK += dSᵀ Q``, as in the tutorial. With ``USE_TMA`` the Q and dO tiles come through host TMA
    descriptors over ``[B, Hq, Sq, D]`` (rows past ``Sq`` read as zeros, as the masked loads give)."""
    local_m = tl.arange(0, BLOCK_M)
    local_n = tl.arange(0, BLOCK_N)
    for start_m in range(start, end, BLOCK_M):
        offs_m = start_m + local_m
        m64 = tl.cast(start_m, tl.int64)
        qT_ptrs = Q_head + m64 * stride_qm + (offs_d[:, None] * stride_qd + local_m[None, :] * stride_qm)
        do_ptrs = DO_head + m64 * stride_dom + (local_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod)
        if USE_TMA:
            q = DescQ.load([off_b, off_h, start_m, 0]).reshape(BLOCK_M, HEAD_DIM)
            qT = tl.trans(q)
            do = DescDO.load([off_b, off_h, start_m, 0]).reshape(BLOCK_M, HEAD_DIM_V)
        if EDGE:
            row_ok = offs_m < Sq
            if not USE_TMA:
                qT = tl.load(qT_ptrs, mask=(offs_d[:, None] < HEAD_DIM) & row_ok[None, :], other=0.0)
                do = tl.load(do_ptrs, mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
            # rows past Sq: lse = +inf makes P = 0 and dS = 0
            lse = tl.load(LseK_head + offs_m, mask=row_ok, other=float("inf"))
            delta = tl.load(Delta_head + offs_m, mask=row_ok, other=0.0)
            if MASK_KIND == 2:
                lo = tl.load(Lo_head + offs_m, mask=row_ok, other=0.0)
            else:
                lo = lse
        else:
            if not USE_TMA:
                qT = tl.load(qT_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
                do = tl.load(do_ptrs, mask=offs_dv[None, :] < HEAD_DIM_V, other=0.0)
            lse = tl.load(LseK_head + offs_m)
            delta = tl.load(Delta_head + offs_m)
            if MASK_KIND == 2:
                lo = tl.load(Lo_head + offs_m)
            else:
                lo = lse

        qkT = _mma(k, qT, DOT_PRECISION, INTERPRET_BF16)
        dpT = _mma(v, tl.trans(do), DOT_PRECISION, INTERPRET_BF16)
        if DROPOUT:
            # rng_head = (b * Hq + h) * Sq: the forward's counter of (i, j) is offset + (rng_head + i) * Sk + j
            keepT = _dropout_keep(seed, (rng_off + (rng_head + offs_m) * Sk)[None, :], offs_n[:, None], dropout_p)
            dpT = tl.where(keepT, dpT * keep_scale, 0.0)
        pT, _, dxT = _tile_grads(
            qkT, dpT, lse[None, :], lo[None, :], delta[None, :],
            offs_m[None, :], offs_n[:, None], Mask_head + m64 * stride_mask_m, local_m[None, :], local_n[:, None],
            Sq, Sk, stride_mask_m, stride_mask_n,
            qk_scale, softcap_in, softcap_out, window_left, window_right, MASK_KIND, HAS_SOFTCAP, EDGE,
        )  # fmt: skip
        if DROPOUT:
            pT = tl.where(keepT, pT, 0.0)  # times 1 / (1 - p) once, at the end
        dv += _mma(_downcast(pT, do.dtype, INTERPRET_BF16), do, DOT_PRECISION, INTERPRET_BF16)
        if USE_TMA:
            dk += _mma(_downcast(dxT, q.dtype, INTERPRET_BF16), q, DOT_PRECISION, INTERPRET_BF16)
        else:
            dk += _mma(_downcast(dxT, qT.dtype, INTERPRET_BF16), tl.trans(qT), DOT_PRECISION, INTERPRET_BF16)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, Mask, LseK, Lo, Delta, VBar, NanFlag, Rng, DK, DV, DescQ, DescDO,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n,
    stride_rb, stride_rh,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    Hkv, GROUPS, Sq, Sk,
    scale, qk_scale, softcap_in, softcap_out, window_left, window_right, dropout_p, keep_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_SOFTCAP: tl.constexpr, RULE6: tl.constexpr, DROPOUT: tl.constexpr,
    USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    off_hkv = tl.program_id(1)
    off_b = tl.program_id(2)
    scale = tl.cast(scale, tl.float32)
    qk_scale = tl.cast(qk_scale, tl.float32)
    softcap_in = tl.cast(softcap_in, tl.float32)
    softcap_out = tl.cast(softcap_out, tl.float32)

    start_n = pid_n * BLOCK_N
    local_n = tl.arange(0, BLOCK_N)
    offs_n = start_n + local_n
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = offs_n < Sk
    b64 = tl.cast(off_b, tl.int64)
    hkv64 = tl.cast(off_hkv, tl.int64)
    n64 = tl.cast(start_n, tl.int64)

    k = tl.load(
        K + b64 * stride_kb + hkv64 * stride_kh + n64 * stride_kn
        + local_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
        mask=col_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0,
    )  # fmt: skip
    v = tl.load(
        V + b64 * stride_vb + hkv64 * stride_vh + n64 * stride_vn
        + local_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
        mask=col_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0,
    )  # fmt: skip
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    if DROPOUT:
        seed = tl.load(Rng)
        rng_off = tl.load(Rng + 1)
        dropout_p = tl.cast(dropout_p, tl.float32)
        keep_scale = tl.cast(keep_scale, tl.float32)
    else:
        seed = 0
        rng_off = b64
        dropout_p = 0.0
        keep_scale = 1.0

    lo, full_lo, full_hi, hi = _query_blocks(start_n, Sq, Sk, window_left, window_right, BLOCK_M, BLOCK_N)
    # GQA: the query heads of this KV head one after the other, summing into the same accumulators
    for g in range(GROUPS):
        h64 = hkv64 * GROUPS + g
        Q_head = Q + b64 * stride_qb + h64 * stride_qh
        DO_head = DO + b64 * stride_dob + h64 * stride_doh
        Mask_head = Mask + b64 * stride_mask_b + h64 * stride_mask_h + n64 * stride_mask_n
        row_stats = b64 * stride_rb + h64 * stride_rh
        rng_head = (b64 * Hkv * GROUPS + h64) * Sq
        # fmt: off
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, Q_head, DO_head, Mask_head, LseK + row_stats, Lo + row_stats, Delta + row_stats,
            lo, full_lo, offs_n, offs_d, offs_dv,
            Sq, Sk, stride_qm, stride_qd, stride_dom, stride_dod, stride_mask_m, stride_mask_n,
            qk_scale, softcap_in, softcap_out, window_left, window_right,
            seed, rng_off, rng_head, dropout_p, keep_scale,
            DescQ, DescDO, off_b, tl.cast(h64, tl.int32),
            HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, MASK_KIND, HAS_SOFTCAP, True, DROPOUT,
            USE_TMA, DOT_PRECISION, INTERPRET_BF16,
        )
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, Q_head, DO_head, Mask_head, LseK + row_stats, Lo + row_stats, Delta + row_stats,
            full_lo, full_hi, offs_n, offs_d, offs_dv,
            Sq, Sk, stride_qm, stride_qd, stride_dom, stride_dod, stride_mask_m, stride_mask_n,
            qk_scale, softcap_in, softcap_out, window_left, window_right,
            seed, rng_off, rng_head, dropout_p, keep_scale,
            DescQ, DescDO, off_b, tl.cast(h64, tl.int32),
            HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, MASK_KIND, HAS_SOFTCAP, False, DROPOUT,
            USE_TMA, DOT_PRECISION, INTERPRET_BF16,
        )
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, Q_head, DO_head, Mask_head, LseK + row_stats, Lo + row_stats, Delta + row_stats,
            full_hi, hi, offs_n, offs_d, offs_dv,
            Sq, Sk, stride_qm, stride_qd, stride_dom, stride_dod, stride_mask_m, stride_mask_n,
            qk_scale, softcap_in, softcap_out, window_left, window_right,
            seed, rng_off, rng_head, dropout_p, keep_scale,
            DescQ, DescDO, off_b, tl.cast(h64, tl.int32),
            HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, MASK_KIND, HAS_SOFTCAP, True, DROPOUT,
            USE_TMA, DOT_PRECISION, INTERPRET_BF16,
        )
        # fmt: on

    dk = dk * scale
    if DROPOUT:
        dv = dv * keep_scale
    if RULE6:
        # rule-6 rows of the group: dO / Sk to every key, also the keys the band skipped
        vbar = tl.load(VBar + (b64 * Hkv + hkv64) * HEAD_DIM_V + offs_dv, mask=offs_dv < HEAD_DIM_V, other=0.0)
        dv += vbar[None, :]
    is_nan = tl.load(NanFlag + b64 * Hkv + hkv64) != 0
    dk = tl.where(is_nan, float("nan"), dk)
    dv = tl.where(is_nan, float("nan"), dv)

    tl.store(
        DK + b64 * stride_dkb + hkv64 * stride_dkh + n64 * stride_dkn
        + local_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
        _downcast(dk, DK.dtype.element_ty, INTERPRET_BF16),
        mask=col_ok[:, None] & (offs_d[None, :] < HEAD_DIM),
    )  # fmt: skip
    tl.store(
        DV + b64 * stride_dvb + hkv64 * stride_dvh + n64 * stride_dvn
        + local_n[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd,
        _downcast(dv, DV.dtype.element_ty, INTERPRET_BF16),
        mask=col_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V),
    )  # fmt: skip


@triton.jit
def _accumulate_dmask(
    DMask_tile, ds, li, lj, row_ok, col_ok, stride_dm_m, stride_dm_n,
    BCAST_M: tl.constexpr, BCAST_N: tl.constexpr,
):  # fmt: skip
    """``DMask += dS`` through the mask's broadcast strides: summed in the tile first along a broadcast
    dimension (so that no two lanes add to one address), then fp32 atomics across programs."""
    if BCAST_M:
        if BCAST_N:
            tl.atomic_add(DMask_tile, tl.sum(tl.sum(ds, 1), 0))
        else:
            tl.atomic_add(DMask_tile + lj * stride_dm_n, tl.sum(ds, 0), mask=col_ok)
    else:
        if BCAST_N:
            tl.atomic_add(DMask_tile + li * stride_dm_m, tl.sum(ds, 1), mask=row_ok)
        else:
            tl.atomic_add(
                DMask_tile + li[:, None] * stride_dm_m + lj[None, :] * stride_dm_n,
                ds,
                mask=row_ok[:, None] & col_ok[None, :],
            )


@triton.jit
def _attn_bwd_dq_inner(
    dq, q, do, lse, lo, delta,
    K_head, V_head, Mask_rows, DMask_rows,
    start, end, offs_m, offs_n, offs_d, offs_dv, row_ok,
    Sq, Sk, stride_kn, stride_kd, stride_vn, stride_vd, stride_mask_m, stride_mask_n, stride_dm_m, stride_dm_n,
    qk_scale, softcap_in, softcap_out, window_left, window_right, seed, rng_rows, dropout_p, keep_scale,
    DescK, DescV, off_b, off_hkv,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_SOFTCAP: tl.constexpr, EDGE: tl.constexpr, DROPOUT: tl.constexpr,
    NEED_DMASK: tl.constexpr, DMASK_BCAST_M: tl.constexpr, DMASK_BCAST_N: tl.constexpr,
    USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr,
):  # fmt: skip
    """Visit key blocks ``[start, end)`` (the forward's phases) and accumulate ``dQ`` (and ``dMask``).
    With ``USE_TMA`` the K and V tiles come through host TMA descriptors (keys past ``Sk`` read as zeros)."""
    local_m = tl.arange(0, BLOCK_M)
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        n64 = tl.cast(start_n, tl.int64)
        kT_ptrs = K_head + n64 * stride_kn + (offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn)
        vT_ptrs = V_head + n64 * stride_vn + (offs_dv[:, None] * stride_vd + offs_n[None, :] * stride_vn)
        col_ok = cols < Sk
        if USE_TMA:
            k = DescK.load([off_b, off_hkv, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
            kT = tl.trans(k)
            vT = tl.trans(DescV.load([off_b, off_hkv, start_n, 0]).reshape(BLOCK_N, HEAD_DIM_V))
        elif EDGE:
            kT = tl.load(kT_ptrs, mask=(offs_d[:, None] < HEAD_DIM) & col_ok[None, :], other=0.0)
            vT = tl.load(vT_ptrs, mask=(offs_dv[:, None] < HEAD_DIM_V) & col_ok[None, :], other=0.0)
        else:
            kT = tl.load(kT_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
            vT = tl.load(vT_ptrs, mask=offs_dv[:, None] < HEAD_DIM_V, other=0.0)
        qk = _mma(q, kT, DOT_PRECISION, INTERPRET_BF16)
        dp = _mma(do, vT, DOT_PRECISION, INTERPRET_BF16)
        if DROPOUT:
            dp = tl.where(_dropout_keep(seed, rng_rows[:, None], cols[None, :], dropout_p), dp * keep_scale, 0.0)
        _, ds, dx = _tile_grads(
            qk, dp, lse[:, None], lo[:, None], delta[:, None],
            offs_m[:, None], cols[None, :], Mask_rows + n64 * stride_mask_n, local_m[:, None], offs_n[None, :],
            Sq, Sk, stride_mask_m, stride_mask_n,
            qk_scale, softcap_in, softcap_out, window_left, window_right, MASK_KIND, HAS_SOFTCAP, EDGE,
        )  # fmt: skip
        if NEED_DMASK:
            _accumulate_dmask(
                DMask_rows + n64 * stride_dm_n, ds, local_m, offs_n, row_ok, col_ok, stride_dm_m, stride_dm_n,
                DMASK_BCAST_M, DMASK_BCAST_N,
            )  # fmt: skip
        if USE_TMA:
            dq += _mma(_downcast(dx, k.dtype, INTERPRET_BF16), k, DOT_PRECISION, INTERPRET_BF16)
        else:
            dq += _mma(_downcast(dx, kT.dtype, INTERPRET_BF16), tl.trans(kT), DOT_PRECISION, INTERPRET_BF16)
    return dq


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, Mask, LseK, Lo, Delta, Rng, DQ, DMask, DescK, DescV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n,
    stride_rb, stride_rh,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_dm_b, stride_dm_h, stride_dm_m, stride_dm_n,
    Hq, GROUPS, Sq, Sk,
    scale, qk_scale, softcap_in, softcap_out, window_left, window_right, dropout_p, keep_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
    NEED_DMASK: tl.constexpr, DMASK_BCAST_M: tl.constexpr, DMASK_BCAST_N: tl.constexpr,
    USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr,
):  # fmt: skip
    # the last query blocks first: under a causal band they visit the most key blocks, and the longest
    # programs should not be the last ones the GPU starts (the tail of the launch)
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    off_hkv = off_h // GROUPS
    scale = tl.cast(scale, tl.float32)
    qk_scale = tl.cast(qk_scale, tl.float32)
    softcap_in = tl.cast(softcap_in, tl.float32)
    softcap_out = tl.cast(softcap_out, tl.float32)

    start_m = pid_m * BLOCK_M
    local_m = tl.arange(0, BLOCK_M)
    offs_m = start_m + local_m
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < Sq
    b64 = tl.cast(off_b, tl.int64)
    h64 = tl.cast(off_h, tl.int64)
    hkv64 = tl.cast(off_hkv, tl.int64)
    m64 = tl.cast(start_m, tl.int64)

    q = tl.load(
        Q + b64 * stride_qb + h64 * stride_qh + m64 * stride_qm
        + local_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0,
    )  # fmt: skip
    do = tl.load(
        DO + b64 * stride_dob + h64 * stride_doh + m64 * stride_dom
        + local_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
        mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0,
    )  # fmt: skip
    row_stats = b64 * stride_rb + h64 * stride_rh
    # rows past Sq: lse = +inf makes P = 0 and dS = 0
    lse = tl.load(LseK + row_stats + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + row_stats + offs_m, mask=row_ok, other=0.0)
    if MASK_KIND == 2:
        lo = tl.load(Lo + row_stats + offs_m, mask=row_ok, other=0.0)
    else:
        lo = lse

    K_head = K + b64 * stride_kb + hkv64 * stride_kh
    V_head = V + b64 * stride_vb + hkv64 * stride_vh
    Mask_rows = Mask + b64 * stride_mask_b + h64 * stride_mask_h + m64 * stride_mask_m
    DMask_rows = DMask + b64 * stride_dm_b + h64 * stride_dm_h + m64 * stride_dm_m
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if DROPOUT:
        seed = tl.load(Rng)
        rng_rows = tl.load(Rng + 1) + ((b64 * Hq + h64) * Sq + offs_m) * Sk
        dropout_p = tl.cast(dropout_p, tl.float32)
        keep_scale = tl.cast(keep_scale, tl.float32)
    else:
        seed = 0
        rng_rows = offs_m
        dropout_p = 0.0
        keep_scale = 1.0

    lo_n, full_lo, full_hi, hi_n = _key_blocks(start_m, Sq, Sk, window_left, window_right, BLOCK_M, BLOCK_N)
    # fmt: off
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, lo, delta, K_head, V_head, Mask_rows, DMask_rows,
        lo_n, full_lo, offs_m, offs_n, offs_d, offs_dv, row_ok,
        Sq, Sk, stride_kn, stride_kd, stride_vn, stride_vd, stride_mask_m, stride_mask_n, stride_dm_m, stride_dm_n,
        qk_scale, softcap_in, softcap_out, window_left, window_right, seed, rng_rows, dropout_p, keep_scale,
        DescK, DescV, off_b, off_hkv,
        HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, MASK_KIND, HAS_SOFTCAP, True, DROPOUT,
        NEED_DMASK, DMASK_BCAST_M, DMASK_BCAST_N, USE_TMA, DOT_PRECISION, INTERPRET_BF16,
    )
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, lo, delta, K_head, V_head, Mask_rows, DMask_rows,
        full_lo, full_hi, offs_m, offs_n, offs_d, offs_dv, row_ok,
        Sq, Sk, stride_kn, stride_kd, stride_vn, stride_vd, stride_mask_m, stride_mask_n, stride_dm_m, stride_dm_n,
        qk_scale, softcap_in, softcap_out, window_left, window_right, seed, rng_rows, dropout_p, keep_scale,
        DescK, DescV, off_b, off_hkv,
        HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, MASK_KIND, HAS_SOFTCAP, False, DROPOUT,
        NEED_DMASK, DMASK_BCAST_M, DMASK_BCAST_N, USE_TMA, DOT_PRECISION, INTERPRET_BF16,
    )
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, lo, delta, K_head, V_head, Mask_rows, DMask_rows,
        full_hi, hi_n, offs_m, offs_n, offs_d, offs_dv, row_ok,
        Sq, Sk, stride_kn, stride_kd, stride_vn, stride_vd, stride_mask_m, stride_mask_n, stride_dm_m, stride_dm_n,
        qk_scale, softcap_in, softcap_out, window_left, window_right, seed, rng_rows, dropout_p, keep_scale,
        DescK, DescV, off_b, off_hkv,
        HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, MASK_KIND, HAS_SOFTCAP, True, DROPOUT,
        NEED_DMASK, DMASK_BCAST_M, DMASK_BCAST_N, USE_TMA, DOT_PRECISION, INTERPRET_BF16,
    )
    # fmt: on

    # NaN rows (lse = -inf) are NaN also when the band left them no key block to visit
    dq = tl.where((lse == float("-inf"))[:, None], float("nan"), dq * scale)
    tl.store(
        DQ + b64 * stride_dqb + h64 * stride_dqh + m64 * stride_dqm
        + local_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
        _downcast(dq, DQ.dtype.element_ty, INTERPRET_BF16),
        mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM),
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------


def _validate_saved(grad_out, q, v, out, lse) -> None:
    B, Hq, Sq, _ = q.shape
    want = (B, Hq, Sq, v.shape[-1])
    for name, t in (("grad_out", grad_out), ("out", out)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")  # noqa: TRY004
        if tuple(t.shape) != want:
            raise ValueError(f"{name}: expected shape [B, Hq, Sq, Dv] = {list(want)}, got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} dtype: expected q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: device {t.device} differs from q's device {q.device}")
    if not isinstance(lse, torch.Tensor):
        raise ValueError(f"lse: expected a torch.Tensor, got {type(lse).__name__}")  # noqa: TRY004
    if tuple(lse.shape) != (B, Hq, Sq) or lse.dtype != torch.float32 or lse.device != q.device:
        raise ValueError(
            f"lse: expected float32 [B, Hq, Sq] = {[B, Hq, Sq]} on {q.device}, got {lse.dtype} "
            f"{tuple(lse.shape)} on {lse.device}"
        )


def _launch(kernel, grid_of, args, meta_of, cfg: BwdConfig, device: torch.device, pass_: str = "dkdv") -> BwdConfig:
    """Launch ``kernel`` with ``cfg`` (warps and stages of ``pass_``), or the first smaller config that compiles;
    returns the one used.

    ``OutOfResources`` is raised while compiling, before the kernel ran: relaunching is safe, also for
    the kernels that accumulate with atomics. ``grid_of`` and ``meta_of`` (and ``args``, when it is callable: the
    TMA descriptors' boxes follow the tiles) map a config to the launch.
    """
    while True:
        num_warps, num_stages = cfg.warps_stages(pass_)
        launch = dict(meta_of(cfg), num_warps=num_warps, num_stages=num_stages)
        call_args = args(cfg) if callable(args) else args
        try:
            if device.type == "cuda":
                with torch.cuda.device(device):
                    kernel[grid_of(cfg)](*call_args, **launch)
            else:
                kernel[grid_of(cfg)](*call_args, **launch)
            return cfg
        except OutOfResources as e:
            smaller = _smaller(cfg, pass_)
            if smaller is None:
                raise
            log.info("flash_bwd: %s does not fit %s (%s); trying %s", cfg, kernel.__name__, e, smaller)
            cfg = smaller


def _nan_rows_in_dmask(dmask4: torch.Tensor, lse: torch.Tensor) -> None:
    """Make NaN (in place) every mask-gradient element that a NaN row (``lse = -inf``) reaches: the
    reference's dS is NaN on the whole row, also where the kernel's band skipped the keys."""
    r = torch.where(lse.isneginf(), float("nan"), 0.0)  # [B, Hq, Sq]
    dims = tuple(d for d in range(3) if dmask4.shape[d] == 1 and r.shape[d] != 1)
    if dims:
        r = r.sum(dim=dims, keepdim=True)
    dmask4.add_(r[..., None])


def flash_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    scale: float,
    window_left: int | None = None,
    window_right: int | None = None,
    mask_fill: float = float("-inf"),
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    need_dmask: bool = True,
    dropout_p: float = 0.0,
    rng_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """returns (dq, dk, dv, dmask or None, dsinks or None): ``flashfuse.testing.attention_backward_ref``

    ``out`` and ``lse`` are the forward's (``flash_attention_forward``) for the same arguments; every
    tensor may have any strides. ``dq``/``dk``/``dv`` have the dtype and layout of ``q``/``k``/``v``
    (``torch.empty_like``); ``dmask`` (an additive mask only) is ``mask.shape`` in ``mask.dtype``, summed
    over the dims the mask broadcasts; ``dsinks`` is ``[Hq]`` in ``sinks.dtype``. ``need_dmask=False``
    skips the mask gradient (returns None): it is the one expensive extra, fp32 atomics per score.
    ``dropout_p`` and ``rng_state`` are the forward's: the kernels regenerate its keep-mask.
    Bad arguments raise ``ValueError`` naming the argument.
    """
    _validate(q, k, v, mask, scale, window_left, window_right, mask_fill, softcap)
    _validate_sinks(q, sinks)
    _validate_saved(grad_out, q, v, out, lse)
    dropout_p = _validate_dropout(q, dropout_p, rng_state)
    dropout = dropout_p > 0
    rng_arg = rng_state if dropout else lse
    drop = (dropout_p, 1.0 / (1.0 - dropout_p))
    B, Hq, Sq, D = q.shape
    _, Hkv, Sk, Dv = v.shape
    device = q.device
    has_dmask = bool(need_dmask) and mask is not None and mask.dtype != torch.bool

    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dmask32 = torch.zeros(mask.shape, dtype=torch.float32, device=device) if has_dmask else None
    dsinks32 = torch.zeros(Hq, dtype=torch.float32, device=device) if sinks is not None else None
    if q.numel() == 0 or k.numel() == 0:
        # no query rows or no keys: every gradient is an empty sum
        for grad in (dq, dk, dv):
            grad.zero_()
        return dq, dk, dv, _cast(dmask32, mask), _cast(dsinks32, sinks)

    if mask is None:
        mask_kind, mask_arg, mask_strides = _MASK_NONE, q, (0, 0, 0, 0)
    else:
        mask_arg = torch.broadcast_to(mask, (B, Hq, Sq, Sk))
        if mask.dtype == torch.bool:
            mask_kind, mask_arg = _MASK_BOOL, mask_arg.view(torch.uint8)
        else:
            mask_kind = _MASK_ADD
        mask_strides = mask_arg.stride()
    score_unit = 1.0 if mask_kind == _MASK_ADD else _LOG2E
    mask_fill = float(mask_fill)
    rule6 = math.isfinite(mask_fill) and sinks is None
    wl = Sq if window_left is None else max(min(window_left, Sq), -Sk)
    wr = Sk if window_right is None else max(min(window_right, Sk), -Sq)
    softcap = float(softcap)
    has_softcap = softcap > 0
    scale = float(scale)
    scores = (scale * score_unit, scale / softcap if has_softcap else 0.0, softcap * score_unit, wl, wr)

    # per-row statistics written by the preprocess (contiguous [B, Hq, Sq] fp32)
    delta = torch.empty((B, Hq, Sq), dtype=torch.float32, device=device)
    lse_k = torch.empty_like(delta)
    lo = torch.empty_like(delta) if mask_kind == _MASK_ADD else delta
    vbar = torch.zeros((B, Hkv, Dv), dtype=torch.float32, device=device) if rule6 else delta
    nan_flag = torch.zeros((B, Hkv), dtype=torch.int32, device=device)
    if has_dmask:
        dmask_arg = torch.broadcast_to(dmask32, (B, Hq, Sq, Sk))
        dmask_strides = dmask_arg.stride()
    else:
        dmask_arg, dmask_strides = delta, (0, 0, 0, 0)

    interpreted = _interpreting()
    meta = {
        "HEAD_DIM": D,
        "HEAD_DIM_V": Dv,
        "BLOCK_D": max(16, triton.next_power_of_2(D)),
        "BLOCK_DV": max(16, triton.next_power_of_2(Dv)),
        "MASK_KIND": mask_kind,
        "HAS_SOFTCAP": has_softcap,
        # fp32 inputs: "ieee" keeps tl.dot from rounding operands to tf32 (10-bit mantissa)
        "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
        "INTERPRET_BF16": interpreted and q.dtype == torch.bfloat16,
    }

    # per pass: can host descriptors carry its loop tiles (what a config's dq_tma / dkdv_tma can turn on)
    tma_kv, tma_dq = _tma_ok(q, grad_out, B * Hq * Sq * Sk), _tma_ok(k, v, B * Hq * Sq * Sk)
    # a config shrunk with or without TMA must not be reused for calls in the other state
    key = (D, Dv, q.dtype, None if mask is None else mask_arg.dtype, device, tma_kv, tma_dq)
    cfg = _FITTED.get(key) or _pick_config(max(D, Dv), q.dtype, device)
    # fmt: off
    cfg = _launch(
        _attn_bwd_preprocess, lambda c: (triton.cdiv(Sq, c.block_m2), Hq, B),
        (
            out, grad_out, lse, lse if sinks is None else sinks, q, k, mask_arg,
            delta, lse_k, lo, vbar, nan_flag, delta if dsinks32 is None else dsinks32,
            *out.stride(), *grad_out.stride(), *lse.stride(), 0 if sinks is None else sinks.stride(0),
            *q.stride(), *k.stride(), *mask_strides, delta.stride(0), delta.stride(1),
            Hkv, Hq // Hkv, Sq, Sk, *scores, mask_fill / 2 if rule6 else 0.0, 1.0 / Sk, _LSE_EXACT,
        ),
        lambda c: dict(meta, BLOCK_M=c.block_m2, BLOCK_N=c.block_n2, RULE6=rule6, HAS_SINKS=sinks is not None),
        cfg, device, "dq",
    )
    tma_ok = {"dkdv": tma_kv, "dq": tma_dq}

    def descs(c: BwdConfig, pass_: str, a: torch.Tensor, b: torch.Tensor, rows: int) -> tuple:
        if not (c.tma(pass_) and tma_ok[pass_]):
            return None, None
        from flashfuse.kernels.flash_fwd_sm90 import _host_desc

        return _host_desc(a, rows), _host_desc(b, rows)

    cfg = _launch(
        _attn_bwd_dkdv, lambda c: (triton.cdiv(Sk, c.block_n1), Hkv, B),
        lambda c: (
            q, k, v, grad_out, mask_arg, lse_k, lo, delta, vbar, nan_flag, rng_arg, dk, dv,
            *descs(c, "dkdv", q, grad_out, c.block_m1),
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *mask_strides,
            delta.stride(0), delta.stride(1), *dk.stride(), *dv.stride(),
            Hkv, Hq // Hkv, Sq, Sk, scale, *scores, *drop,
        ),
        lambda c: dict(
            meta, BLOCK_M=c.block_m1, BLOCK_N=c.block_n1, RULE6=rule6, DROPOUT=dropout,
            USE_TMA=c.tma("dkdv") and tma_kv,
        ),
        cfg, device,
    )
    cfg = _launch(
        _attn_bwd_dq, lambda c: (triton.cdiv(Sq, c.block_m2), Hq, B),
        lambda c: (
            q, k, v, grad_out, mask_arg, lse_k, lo, delta, rng_arg, dq, dmask_arg,
            *descs(c, "dq", k, v, c.block_n2),
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *mask_strides,
            delta.stride(0), delta.stride(1), *dq.stride(), *dmask_strides,
            Hq, Hq // Hkv, Sq, Sk, scale, *scores, *drop,
        ),
        lambda c: dict(
            meta, BLOCK_M=c.block_m2, BLOCK_N=c.block_n2, NEED_DMASK=has_dmask, DROPOUT=dropout,
            DMASK_BCAST_M=dmask_strides[2] == 0, DMASK_BCAST_N=dmask_strides[3] == 0,
            USE_TMA=c.tma("dq") and tma_dq,
        ),
        cfg, device, "dq",
    )
    # fmt: on
    _FITTED[key] = cfg

    if has_dmask:
        _nan_rows_in_dmask(dmask32.view((1,) * (4 - dmask32.dim()) + tuple(dmask32.shape)), lse)
    return dq, dk, dv, _cast(dmask32, mask), _cast(dsinks32, sinks)


def _cast(grad32: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    return None if grad32 is None else grad32.to(like.dtype)
