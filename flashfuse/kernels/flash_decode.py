"""Flash-decoding: split-KV attention for short queries (``Sq <= 16``) against a long key/value cache.

Algorithm (Dao, Haziza, Massa, Sizov, "Flash-Decoding for long-context inference", 2023; the GQA packing is
FlashAttention-2's and FlashInfer's): in token-by-token generation a query has 1 to 16 rows, so a prefill
kernel (``flash_fwd``: one program per 128 query rows of one head) starts ``B * Hq`` programs that each
walk the whole cache alone, and reads every K/V head ``Hq / Hkv`` times. This file does two things instead:

* **GQA packing**: one program owns one key/value head and ALL its query heads. The ``Hq / Hkv`` heads x
  ``Sq`` rows are stacked as the M dimension of the dot (row ``r`` is head ``hkv * G + r // Sq``, query
  ``r % Sq``; padded to at least 16, the smallest ``tl.dot`` M), so K and V are loaded once per group.
  Large groups (MQA with 64 heads x 16 rows) are cut into several row blocks.
* **split-KV**: the keys the band can reach are cut into ``num_splits`` chunks of whole blocks, and the
  grid is ``(num_splits, row blocks, B * Hkv)``. Each program runs FlashAttention-2's online softmax over
  its chunk and writes its unnormalised partial state ``(acc, m, l)`` in float32. A second small kernel
  merges the partials of each row by their maxima: ``M = max_s m_s``, ``L = sum_s l_s exp(m_s - M)``,
  ``out = sum_s acc_s exp(m_s - M) / L``, ``lse = M + log L`` -- exactly the state one sequential pass would
  have reached, up to float32 rounding of the order of the sums.

Semantics are ``flash_fwd.flash_attention_forward``'s (and so ``flashfuse.testing.attention_ref``'s), with
its conventions: scores in base 2 with ``log2(e)`` folded into the scale, natural units with an additive
mask; softcap through exp2; bool or additive masks read through four strides; the band
``-window_left <= j - i <= window_right`` (keys no row can reach are not split at all, so a sliding window
puts every program on the window; blocks inside the band skip the elementwise test); a fully masked row is
NaN with a ``-inf`` fill, the mean of ``v`` with a finite one (rule 6); ``sinks`` are the merge's starting
state ``(m, l) = (sink, 1)``. ``lse`` is the natural log-sum-exp, float32 ``[B, Hq, Sq]``.

NOTE: the mean of ``v`` for rule 6 needs all ``Sk`` keys. When the band reaches every key (no window; a
bottom-right causal mask), the split programs add up their V tiles as they go (V is in registers anyway)
and the merge divides by ``Sk``: no second pass over the cache, which for an HF-style call (finite fill)
would be half again the bytes of the kernel. With a window the launcher takes ``torch.mean(v)``, as
``flash_fwd`` always does.

Credits: Tri Dao, Daniel Haziza, Francisco Massa, Grigory Sizov, "Flash-Decoding for long-context
inference" (PyTorch blog, 2023); Tri Dao, "FlashAttention-2" (2023); Triton's ``06-fused-attention.py``.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import warnings
from dataclasses import dataclass, field, replace
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

try:  # triton >= 3.4: the launch hooks live here (the fast launch needs them; without, the generic launch)
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover
    _knobs = None

try:  # triton >= 3.3: griddepcontrol (programmatic dependent launch, DecodeConfig.pdl)
    from triton.language.extra.cuda import gdc_launch_dependents as _gdc_launch_dependents
    from triton.language.extra.cuda import gdc_wait as _gdc_wait
except ImportError:  # pragma: no cover -- the kernels use them only under PDL, which then fails to compile
    _gdc_launch_dependents = _gdc_wait = None

from flashfuse.kernels._common import tanh as _tanh  # the shared accurate float32 tanh
from flashfuse.kernels.flash_fwd import (
    _DTYPES,
    _LOG2E,
    _MASK_ADD,
    _MASK_BOOL,
    _MASK_NONE,
    _MAX_HEAD_DIM,
    _MIN_HEAD_DIM,
    _downcast,
    _exp,
    _mma,
    _validate,
    _validate_sinks,
)

__all__ = [
    "TUNED",
    "DecodeConfig",
    "DecodePlan",
    "choose_splits",
    "flash_decode_forward",
    "parse_config",
    "plan",
    "supports",
    "tuned_key",
]

log = logging.getLogger(__name__)

# The decode kernel applies up to this many query rows; beyond, a prefill tile (128 rows) is full anyway.
MAX_QUERY_LEN = 16
# Below this many keys one prefill program per (head, row block) is already short; splitting buys nothing.
MIN_KV_LEN = 256
# Splits never hold fewer keys than this: each program's fixed cost (Q load, partial store, its share of the
# merge) must stay small next to its K/V bytes (256 keys x D=128 x bf16 x (K + V) = 128 KB), and its loop must
# be long enough to fill the load pipeline (256 keys = 4 blocks of 64 at num_stages = 3; 128 keys = 2 blocks
# never reach steady state).
MIN_CHUNK = 256
# Programs per SM the split count aims at. Two resident programs per SM (96 KB of K/V stages each) and a
# short, uneven tail: with 4 per SM the last partial wave is at most a quarter of the time, not a half.
PROGRAMS_PER_SM = 4
MAX_SPLITS = 128
# float32 partial state per (row, split): the merge reads it in chunks of this many splits
_MERGE_BLOCK_S = 16
# DecodeConfig.merge_wide: all splits in one chunk, up to this many (then chunks of it)
_MERGE_BLOCK_S_WIDE = 128


# ----------------------------------------------------------------------------------------------
# @triton.jit helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _decode_inner(
    acc, l_i, m_i, vsum, q,
    K_head, V_head, Mask_rows,
    start, end,
    offs_i, offs_n, offs_d, offs_dv, row_ok,
    Sk, stride_kn, stride_kd, stride_vn, stride_vd, stride_mask_n,
    qk_scale, softcap_in, softcap_out, window_left, window_right,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_SOFTCAP: tl.constexpr, EDGE: tl.constexpr, VSUM: tl.constexpr,
    K_ROWS: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr,
):  # fmt: skip
    """Visit key blocks ``[start, end)``: flash_fwd's ``_attn_fwd_inner`` with per-row query indices.

    ``offs_i`` is each packed row's query index (rows of several heads share indices); ``Mask_rows`` holds
    one pointer per row (its head's and query's mask row). ``EDGE`` blocks get the band and bounds test.
    ``K_ROWS`` loads the K tile as it lies in memory, ``[BLOCK_N, BLOCK_D]`` (rows of D contiguous elements),
    and transposes it for the dot with ``tl.trans``; otherwise it is loaded as ``[BLOCK_D, BLOCK_N]`` through
    its strides (see `DecodeConfig.k_rows`).
    """
    if K_ROWS:
        k_mask = offs_d[None, :] < HEAD_DIM
    else:
        k_mask = offs_d[:, None] < HEAD_DIM
    v_mask = offs_dv[None, :] < HEAD_DIM_V
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        n64 = tl.cast(start_n, tl.int64)
        if K_ROWS:
            k_ptrs = K_head + n64 * stride_kn + (offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd)
        else:
            k_ptrs = K_head + n64 * stride_kn + (offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn)
        v_ptrs = V_head + n64 * stride_vn + (offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd)
        if EDGE:
            col_ok = cols < Sk
            if K_ROWS:
                k = tl.load(k_ptrs, mask=col_ok[:, None] & k_mask, other=0.0)
            else:
                k = tl.load(k_ptrs, mask=k_mask & col_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=col_ok[:, None] & v_mask, other=0.0)
        else:
            k = tl.load(k_ptrs, mask=k_mask, other=0.0)
            v = tl.load(v_ptrs, mask=v_mask, other=0.0)

        if K_ROWS:
            qk = _mma(q, tl.trans(k), DOT_PRECISION, INTERPRET_BF16)
        else:
            qk = _mma(q, k, DOT_PRECISION, INTERPRET_BF16)
        if HAS_SOFTCAP:
            s = _tanh(qk * softcap_in) * softcap_out
        else:
            s = qk * qk_scale

        if MASK_KIND != 0:
            m_ptrs = Mask_rows[:, None] + (n64 * stride_mask_n + offs_n[None, :] * stride_mask_n)
            if EDGE:
                mvals = tl.load(m_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0)
            else:
                mvals = tl.load(m_ptrs, mask=row_ok[:, None], other=0)
            if MASK_KIND == 1:
                s = tl.where(mvals != 0, s, float("-inf"))
            else:
                s = s + mvals.to(tl.float32)

        if EDGE:
            diff = cols[None, :] - offs_i[:, None]
            keep = (diff >= -window_left) & (diff <= window_right) & col_ok[None, :]
            s = tl.where(keep, s, float("-inf"))

        m_ij = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_ij == float("-inf"), 0.0, m_ij)
        p = _exp(s - m_safe[:, None], MASK_KIND == 2)
        alpha = _exp(m_i - m_safe, MASK_KIND == 2)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc += _mma(_downcast(p, v.dtype, INTERPRET_BF16), v, DOT_PRECISION, INTERPRET_BF16)
        m_i = m_ij
        if VSUM:
            vsum += tl.sum(v.to(tl.float32), 0)
    return acc, l_i, m_i, vsum


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeConfig:
    """Tiles and launch options of the split kernel; ``k_rows`` and ``pdl`` are knobs for the tuner (default off).

    ``k_rows``: load the K tile as ``[BLOCK_N, D]`` (the layout in memory) and transpose it in registers for the
    dot, as Triton's fused-attention tutorial does, instead of loading ``[D, BLOCK_N]`` through the strides.
    Same bytes; what may change is the load's vector width and how the tile reaches the MMA operand layout.
    ``pdl``: programmatic dependent launch (Hopper+): the split kernel lets the merge be scheduled as soon as
    every split program has started, and the merge waits on ``griddepcontrol.wait`` before reading the partial
    state; saves part of the second launch's latency (~1-3 us a step, all of which counts at B = 1, 4k keys).
    ``merge_wide``: the merge reads all of a row's splits in one chunk (up to 128) instead of chunks of 16. Its
    two passes are loops of dependent loads, one memory round trip (~1 us) per chunk: 64 splits are 4 + 4 round
    trips one after the other, ~10% of a 63 us step at B = 1, 32k keys; wide, 1 + 1 (more warps hold the tile).
    Identical below 17 splits. All three are measured by ``bench/decode.py --tune`` before a table entry turns
    them on.

    NOTE: what the sm_90 compile shows (Triton 3.9 with a stand-in driver, no GPU; test_knobs_compile_for_sm90):
    K loaded ``[D, N]`` through its strides is already 16-byte ``cp.async`` (Triton finds D contiguous), 144 of
    them per program at 64 x 128 tiles either way, so ``k_rows`` changes no load (only how the tile reaches the
    MMA); shared memory is (num_stages - 1) x the K + V tile (70 KB at 64, 3 stages: three programs an SM); the
    split kernel holds 100 registers a thread at 4 warps, 160 with VSUM (rule 6's running sum of V), no spills;
    the wide merge 71-80 at 4-8 warps.
    """

    block_m: int  # the most packed (head, query) rows per program; fewer when the group is smaller
    block_n: int
    num_warps: int
    num_stages: int
    k_rows: bool = False
    pdl: bool = False
    merge_wide: bool = False

    def spec(self) -> str:
        """The config as ``FLASHFUSE_DECODE_CONFIG`` spells it: ``bm,bn,w,s`` then the knobs that are set."""
        flags = [name for name in _KNOBS if getattr(self, name)]
        return ",".join([str(self.block_m), str(self.block_n), str(self.num_warps), str(self.num_stages), *flags])


_KNOBS = ("k_rows", "pdl", "merge_wide")  # DecodeConfig's boolean fields, in spec order


def parse_config(spec: str) -> DecodeConfig:
    """``"bm,bn,w,s[,k_rows][,pdl][,merge_wide]"`` -> DecodeConfig (``FLASHFUSE_DECODE_CONFIG``, ``--config``)."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    flags = parts[4:]
    try:
        bm, bn, w, st = (int(x) for x in parts[:4])
    except ValueError:
        bm = None
    if bm is None or len(parts) < 4 or any(f not in _KNOBS for f in flags):
        knobs = "".join(f"[,{name}]" for name in _KNOBS)
        raise ValueError(f"decode config {spec!r}: expected 'BLOCK_M,BLOCK_N,num_warps,num_stages{knobs}'")
    for name, x in (("BLOCK_M", bm), ("BLOCK_N", bn)):
        if x < 16 or x & (x - 1):
            raise ValueError(f"decode config {spec!r}: {name} must be a power of two >= 16")
    if w < 1 or w & (w - 1) or st < 1:
        raise ValueError(f"decode config {spec!r}: num_warps a power of two, num_stages >= 1")
    return DecodeConfig(bm, bn, w, st, **{name: name in flags for name in _KNOBS})


def _interpreting() -> bool:
    return type(_decode_split).__name__ == "InterpretedFunction"


def _pick_config(D: int, dtype: torch.dtype, device: torch.device) -> DecodeConfig:
    """One config per (padded head dim, dtype): the fallback for keys `TUNED` has no entry for (see `_select`).

    A guess for a memory-bound loop, to be tuned on the GPU (``bench/decode.py --tune``).

    Decode is a stream of K/V bytes: the tile only needs to keep enough loads in flight (num_stages x
    (K + V tile) = 3 x 32 KB at BLOCK_N = 64, D = 128, bf16) while the tiny M = 16 dot hides under them.
    """
    if _interpreting() or device.type != "cuda":
        # every tl op is a numpy call: small tiles, several blocks per chunk at the tests' lengths
        return DecodeConfig(block_m=32, block_n=16, num_warps=1, num_stages=1)
    block_d = max(16, triton.next_power_of_2(D))
    if dtype == torch.float32:
        return DecodeConfig(32, 32, 4, 2)  # FMA dots (ieee): compile time grows with the tile
    if block_d <= 128:
        return DecodeConfig(64, 64, 4, 3)
    return DecodeConfig(64, 32, 4, 3)


def _smaller(cfg: DecodeConfig) -> DecodeConfig | None:
    """The next config to try after a shared-memory overflow: fewer stages, then smaller tiles."""
    if cfg.num_stages > 2:
        return replace(cfg, num_stages=cfg.num_stages - 1)
    if cfg.block_n > 16:
        return replace(cfg, block_n=cfg.block_n // 2)
    if cfg.block_m > 16:
        return replace(cfg, block_m=cfg.block_m // 2)
    if cfg.num_stages > 1:
        return replace(cfg, num_stages=1)
    return None


# (D, Dv, dtype, mask dtype, device, the config asked for) -> the smaller config that compiled in its place
_FITTED: dict[tuple, DecodeConfig] = {}


@functools.cache
def _sm_count(device: torch.device) -> int:
    """SMs of ``device`` (cached: ``get_device_properties`` is a few us, paid once per device, not per call)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a handful of splits, so tests see several without a long run


def choose_splits(programs: int, kv_len: int, sm_count: int, *, min_chunk: int = MIN_CHUNK,
                  max_splits: int = MAX_SPLITS, programs_per_sm: int = PROGRAMS_PER_SM) -> int:  # fmt: skip
    """How many chunks to cut ``kv_len`` keys into when ``programs`` (B x Hkv x row blocks) share them.

    NOTE: the rule. Aim at ``programs_per_sm`` (4) programs per SM, never cut below ``min_chunk`` (256) keys a
    split, never more than ``max_splits``. The merge is no reason to split less: it reads
    ``rows x splits x (Dv + 2)`` float32, at B = 1, Hq = 32, 16 splits 266 KB next to 16.8 MB of K/V at 4k keys
    (1.6%); what a split costs is its fixed work (Q load, a pipeline that must fill, the partial store), so the
    floor is on keys per split, not on the merge. H100 (132 SMs), Hkv = 8, Hq = 32, Sq = 1 (one row block):
      B = 1,  Sk = 4096:  528 / 8 = 66 wanted, 4096 / 256 = 16 allowed -> 16 splits of 256 keys (128 programs);
      B = 1,  Sk = 32768: 66 splits of ~512 keys (528 programs);
      B = 16, Sk = 4096:  528 / 128 -> 5 splits of ~832 keys (640 programs; the first rule gave 3: 384 programs,
                          2.9 per SM, a tail wave ~half empty);
      B = 64: 2 splits; B >= 132: 1 (the batch fills the GPU alone).
    """
    if kv_len <= 0 or programs <= 0:
        return 1
    want = triton.cdiv(programs_per_sm * sm_count, programs)
    return max(1, min(want, kv_len // max(min_chunk, 1), max_splits))


# ----------------------------------------------------------------------------------------------
# the tuned table
# ----------------------------------------------------------------------------------------------

# NOTE: the tuned table. ``bench/decode.py --tune`` times configs x split counts per decode shape on a GPU (the
# kernel alone with do_bench, and under a CUDA graph) and prints entries for this dict. Key: `tuned_key` --
# (padded head dim, element size, packed-row bucket, B x Hkv bucket, band-length bucket), the buckets powers of
# two rounded up; value: (the config, num_splits). An entry was measured at its bucket's upper end (Sk = 4096
# for lengths 2049..4096); the split count is used as a request (`_plan` still cuts no empty split). Keys
# with no entry fall back to `_pick_config` and `choose_splits`. Split counts are for the GPU the table was
# tuned on (132 SMs: H100, H200); the SM count is not in the key but gates it. FLASHFUSE_DECODE_CONFIG overrides the
# config (not the split count) of every key. Looked up once per call key (planning), never per call, and only
# on the GPU it was measured on (compute capability 9.x with 132 SMs: `_tuned_device`) or under the interpreter.
# Tuned on an NVIDIA H200 (torch 2.11, triton 3.6), 2026-11-30, `bench/decode.py --tune --budget-s 220`, by
# CUDA-graph time (K/V sets rotated past the L2); Hq 32 / Hkv 8, D 128, bf16; "current" is the heuristic's time.
TUNED: dict[tuple, tuple[DecodeConfig, int]] = {
    # B=1 Sq=1 Sk=4096: 11.4 us, 35% of copy; current 12.0 us (B=1 Sq=4 shares the key: 12.0 us vs 12.8)
    (128, 2, 16, 8, 4096): (DecodeConfig(64, 32, 4, 3, k_rows=True, pdl=True, merge_wide=True), 32),
    # B=1 Sq=1 Sk=8192: 15.3 us, 52% of copy; current 18.7 us
    (128, 2, 16, 8, 8192): (DecodeConfig(64, 32, 4, 3, pdl=True, merge_wide=True), 32),
    # B=1 Sq=1 Sk=32768: 39.0 us, 81% of copy; current 51.4 us
    (128, 2, 16, 8, 32768): (DecodeConfig(64, 64, 4, 4, pdl=True), 16),
    # B=16 Sq=1 Sk=4096: 68.0 us, 93% of copy; current 74.3 us
    (128, 2, 16, 128, 4096): (DecodeConfig(64, 64, 4, 3, k_rows=True, pdl=True), 2),
    # B=16 Sq=1 Sk=8192: 127.6 us, 99% of copy; current 135.3 us
    (128, 2, 16, 128, 8192): (DecodeConfig(64, 64, 4, 3, pdl=True), 2),
    # B=16 Sq=1 Sk=32768: 482.6 us, 105% of copy (the copy figure is read + write of one 1 GiB copy); current 509.0 us
    (128, 2, 16, 128, 32768): (DecodeConfig(64, 128, 4, 2, k_rows=True, pdl=True), 2),
}


# the GPU the table was measured on: compute capability 9.x (where `pdl` compiles) with 132 SMs (H100 SXM, H200)
_TUNED_SMS = 132


@functools.cache
def _capability_major(device: torch.device) -> int:
    return torch.cuda.get_device_capability(device)[0]


@functools.cache
def _tuned_device(device: torch.device) -> bool:
    """`TUNED` applies where it was measured (Hopper, 132 SMs: its split counts are per SM count) and under the
    interpreter (tests)."""
    if device.type == "cuda" and not _interpreting():
        return _capability_major(device) == 9 and _sm_count(device) == _TUNED_SMS
    return True


def _bucket(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def tuned_key(head_dim: int, itemsize: int, rows: int, programs: int, kv_len: int) -> tuple:
    """The key of `TUNED` for ``head_dim = max(D, Dv)``, ``rows = Hq / Hkv * Sq`` (packed query rows),
    ``programs = B * Hkv`` and ``kv_len`` keys the band reaches."""
    return (
        max(16, triton.next_power_of_2(head_dim)),
        int(itemsize),
        max(16, _bucket(rows)),  # BLOCK_M is at least 16: 1..16 rows run the same tile
        _bucket(programs),
        _bucket(kv_len),
    )


@functools.cache
def _env_config(spec: str) -> DecodeConfig:
    return parse_config(spec)


def _select(D, Dv, dtype, mask_dtype, device, B, Hkv, groups, Sq, kv_len):
    """``(config, tuned num_splits or None, source, fit key)`` for one call key; planning only, never per call.

    Order: FLASHFUSE_DECODE_CONFIG (the config only), then `TUNED`, then `_pick_config`. The config asked for
    is then replaced by the smaller one that fitted it before, if any (`_FITTED`).
    """
    env = os.environ.get("FLASHFUSE_DECODE_CONFIG")
    key = tuned_key(max(D, Dv), dtype.itemsize, groups * Sq, B * Hkv, kv_len)
    tuned = TUNED.get(key) if _tuned_device(device) else None
    splits = None
    if env:
        cfg, source = _env_config(env), "env"
    elif tuned is not None:
        (cfg, splits), source = tuned, "tuned"
    else:
        cfg, source = _pick_config(max(D, Dv), dtype, device), "heuristic"
    fit_key = (D, Dv, dtype, mask_dtype, device, cfg)
    fitted = _FITTED.get(fit_key)
    if fitted is not None:
        cfg, source = fitted, source + " (fitted)"
    return cfg, splits, source, fit_key


def supports(
    q,
    k,
    v,
    mask=None,
    *,
    scale: float | None = None,
    window_left: int | None = None,
    window_right: int | None = None,
    mask_fill: float = float("-inf"),
    softcap: float = 0.0,
    sinks=None,
    dropout_p: float = 0.0,
    min_kv_len: int = MIN_KV_LEN,
) -> str | None:
    """None if the decode kernel should compute this call, else the reason it should not.

    Cheap (shapes, dtypes, devices). Takes the op's arguments; every mask, window, fill, softcap and sink
    the prefill kernel supports is supported here, so only the shape, dropout and the device decide.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            return f"{name}: expected a 4-D tensor"
    if dropout_p:
        return "dropout (the backward regenerates flash_fwd's Philox mask)"
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
        return f"dtype {q.dtype}/{k.dtype}/{v.dtype}: needs float16, bfloat16 or float32 for all three"
    if not (q.device == k.device == v.device):
        return "q/k/v on different devices"
    if q.device.type != "cuda" and not _interpreting():
        return f"device {q.device}: needs CUDA (or TRITON_INTERPRET=1)"
    if q.device.type == "cuda" and _interpreting():
        return "TRITON_INTERPRET=1 with CUDA tensors"
    _, Hq, Sq, D = q.shape
    Sk, Dv = v.shape[2], v.shape[3]
    if Sq > MAX_QUERY_LEN:
        return f"Sq = {Sq} > {MAX_QUERY_LEN}: a prefill, not a decode step"
    if Sk < min_kv_len:
        return f"Sk = {Sk} < {min_kv_len}: too short to split"
    if k.shape[1] == 0 or Hq % k.shape[1] != 0:
        return f"Hq ({Hq}) not a multiple of Hkv ({k.shape[1]})"
    if not (_MIN_HEAD_DIM <= D <= _MAX_HEAD_DIM and _MIN_HEAD_DIM <= Dv <= _MAX_HEAD_DIM):
        return f"head dims {D}/{Dv}: needs {_MIN_HEAD_DIM}..{_MAX_HEAD_DIM}"
    return None


@dataclass(frozen=True)
class DecodePlan:
    """How one call is cut: the grid is ``(num_splits, m_blocks, B * Hkv)``."""

    config: DecodeConfig
    block_m: int  # packed rows per program (the config's block_m, or less for a small group)
    m_blocks: int  # row blocks per (b, hkv): cdiv(Hq / Hkv * Sq, block_m)
    num_splits: int
    chunk: int  # keys per split, a multiple of BLOCK_N
    kv_lo: int  # first key any row can reach, aligned down to BLOCK_N
    kv_hi: int  # one past the last such key
    source: str = "heuristic"  # where the config came from: "heuristic", "tuned" (TUNED), "env"; "given"

    def describe(self) -> str:
        c = self.config
        flags = "".join(f" {name}" for name in _KNOBS if getattr(c, name))
        return (
            f"num_splits={self.num_splits} chunk={self.chunk} keys={self.kv_lo}..{self.kv_hi} "
            f"BLOCK_M={self.block_m}x{self.m_blocks} BLOCK_N={c.block_n} num_warps={c.num_warps} "
            f"num_stages={c.num_stages}{flags} ({self.source})"
        )


def _clamp_band(Sq: int, Sk: int, window_left, window_right) -> tuple[int, int]:
    # unbounded windows become bounds no (i, j) pair can cross; clamping keeps the arithmetic inside int32
    wl = Sq if window_left is None else max(min(window_left, Sq), -Sk)
    wr = Sk if window_right is None else max(min(window_right, Sk), -Sq)
    return wl, wr


def _band_len(Sq: int, Sk: int, wl: int, wr: int) -> int:
    """Keys some query row can reach (before `_plan` aligns the start to a block): the tuned table's length."""
    return max(min(Sk, Sq + wr) - max(0, -wl), 0)


def _plan(cfg, B, Hkv, groups, Sq, Sk, wl, wr, num_splits, device, source="heuristic") -> DecodePlan:
    rows = groups * Sq
    block_m = min(cfg.block_m, max(16, triton.next_power_of_2(rows)))
    m_blocks = triton.cdiv(rows, block_m)
    # keys some query row can reach: j in [0 - wl, Sq - 1 + wr], cut to [0, Sk); the start aligned down to
    # BLOCK_N so that every block of every chunk is aligned (chunks are whole blocks). A sliding window thus
    # puts all splits on the window; keys before it are never read.
    band_lo, band_hi = max(0, -wl), min(Sk, Sq + wr)
    kv_lo = band_lo // cfg.block_n * cfg.block_n
    kv_len = max(band_hi - kv_lo, 0)
    if num_splits is None:
        num_splits = choose_splits(B * Hkv * m_blocks, kv_len, _sm_count(device))
    chunk = max(triton.cdiv(triton.cdiv(kv_len, num_splits), cfg.block_n), 1) * cfg.block_n
    splits = max(triton.cdiv(kv_len, chunk), 1)  # no empty split
    return DecodePlan(cfg, block_m, m_blocks, splits, chunk, kv_lo, kv_lo + kv_len, source)


def _plan_call(cfg, D, Dv, dtype, mask_dtype, device, B, Hkv, groups, Sq, Sk, wl, wr, num_splits):
    """``(plan, fit key)``: the config (given, or `_select`'s) and the cut; a requested num_splits wins."""
    if cfg is None:
        cfg, tuned_splits, source, fit_key = _select(
            D, Dv, dtype, mask_dtype, device, B, Hkv, groups, Sq, _band_len(Sq, Sk, wl, wr)
        )
    else:
        tuned_splits, source, fit_key = None, "given", (D, Dv, dtype, mask_dtype, device, cfg)
    if num_splits is None:
        num_splits = tuned_splits
    return _plan(cfg, B, Hkv, groups, Sq, Sk, wl, wr, num_splits, device, source), fit_key


def plan(q, k, v, mask=None, *, window_left=None, window_right=None, num_splits=None) -> DecodePlan:
    """The cut ``flash_decode_forward`` makes for these inputs (for reports and benchmarks; shapes only)."""
    B, Hq, Sq, D = q.shape
    _, Hkv, Sk, Dv = v.shape
    mask_dtype = None if mask is None else (torch.uint8 if mask.dtype == torch.bool else mask.dtype)
    wl, wr = _clamp_band(Sq, Sk, window_left, window_right)
    pl, _ = _plan_call(None, D, Dv, q.dtype, mask_dtype, q.device, B, Hkv, Hq // Hkv, Sq, Sk, wl, wr, num_splits)
    return pl


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _decode_split(
    Q, K, V, Mask, Part, m_off, l_off, vs_off,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n,
    Hkv, GROUPS, Sq, Sk, kv_lo, kv_hi, chunk, num_splits, in_lo, in_hi,
    qk_scale, softcap_in, softcap_out, window_left, window_right,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_SOFTCAP: tl.constexpr, VSUM: tl.constexpr, K_ROWS: tl.constexpr,
    PDL: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr,
):  # fmt: skip
    if PDL:  # the merge (launched with launch_pdl) may be scheduled once every split program has started
        _gdc_launch_dependents()
    # the partial state lives in one float32 workspace: acc at 0, m at m_off, l at l_off, the v sums at vs_off
    PartAcc = Part
    PartM = Part + m_off
    PartL = Part + l_off
    PartVSum = Part + vs_off
    pid_s = tl.program_id(0)
    pid_m = tl.program_id(1)
    off_bh = tl.program_id(2)  # b * Hkv + hkv
    off_b = off_bh // Hkv
    off_hkv = off_bh % Hkv

    qk_scale = tl.cast(qk_scale, tl.float32)
    softcap_in = tl.cast(softcap_in, tl.float32)
    softcap_out = tl.cast(softcap_out, tl.float32)

    # packed rows: r = g * Sq + i for query head hkv * GROUPS + g and query i
    R = GROUPS * Sq
    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_r < R
    offs_i = offs_r % Sq
    offs_h = off_hkv * GROUPS + offs_r // Sq
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    b64 = tl.cast(off_b, tl.int64)
    hkv64 = tl.cast(off_hkv, tl.int64)
    h64 = offs_h.to(tl.int64)
    i64 = offs_i.to(tl.int64)
    q_rows = Q + b64 * stride_qb + h64 * stride_qh + i64 * stride_qm
    q = tl.load(
        q_rows[:, None] + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0
    )
    K_head = K + b64 * stride_kb + hkv64 * stride_kh
    V_head = V + b64 * stride_vb + hkv64 * stride_vh
    Mask_rows = Mask + b64 * stride_mask_b + h64 * stride_mask_h + i64 * stride_mask_m

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    vsum = tl.zeros([BLOCK_DV], dtype=tl.float32)

    # this program's keys [c_lo, c_hi): kv_lo and chunk are multiples of BLOCK_N, so every block is aligned
    c_lo = kv_lo + pid_s * chunk
    c_hi = tl.minimum(c_lo + chunk, kv_hi)
    # keys in [in_lo, in_hi) are inside the band for every query 0..Sq-1 (launcher: in_lo rounded up to a block):
    # whole blocks of them skip the elementwise test; everything else in the chunk is an EDGE block
    full_lo = tl.maximum(c_lo, in_lo)
    full_hi = (tl.maximum(tl.minimum(c_hi, in_hi), 0) // BLOCK_N) * BLOCK_N
    has_full = full_hi >= full_lo
    full_lo = tl.where(has_full, full_lo, c_lo)
    full_hi = tl.where(has_full, full_hi, c_lo)

    # fmt: off
    acc, l_i, m_i, vsum = _decode_inner(
        acc, l_i, m_i, vsum, q, K_head, V_head, Mask_rows, c_lo, full_lo,
        offs_i, offs_n, offs_d, offs_dv, row_ok,
        Sk, stride_kn, stride_kd, stride_vn, stride_vd, stride_mask_n,
        qk_scale, softcap_in, softcap_out, window_left, window_right,
        HEAD_DIM, HEAD_DIM_V, BLOCK_N, MASK_KIND, HAS_SOFTCAP, True, VSUM, K_ROWS, DOT_PRECISION, INTERPRET_BF16,
    )
    acc, l_i, m_i, vsum = _decode_inner(
        acc, l_i, m_i, vsum, q, K_head, V_head, Mask_rows, full_lo, full_hi,
        offs_i, offs_n, offs_d, offs_dv, row_ok,
        Sk, stride_kn, stride_kd, stride_vn, stride_vd, stride_mask_n,
        qk_scale, softcap_in, softcap_out, window_left, window_right,
        HEAD_DIM, HEAD_DIM_V, BLOCK_N, MASK_KIND, HAS_SOFTCAP, False, VSUM, K_ROWS, DOT_PRECISION, INTERPRET_BF16,
    )
    acc, l_i, m_i, vsum = _decode_inner(
        acc, l_i, m_i, vsum, q, K_head, V_head, Mask_rows, full_hi, c_hi,
        offs_i, offs_n, offs_d, offs_dv, row_ok,
        Sk, stride_kn, stride_kd, stride_vn, stride_vd, stride_mask_n,
        qk_scale, softcap_in, softcap_out, window_left, window_right,
        HEAD_DIM, HEAD_DIM_V, BLOCK_N, MASK_KIND, HAS_SOFTCAP, True, VSUM, K_ROWS, DOT_PRECISION, INTERPRET_BF16,
    )
    # fmt: on

    # partial state, float32, rows of all heads flat: (b * Hq + h) * Sq + i = off_bh * R + r
    flat = tl.cast(off_bh, tl.int64) * R + offs_r
    part = flat * num_splits + pid_s
    tl.store(
        PartAcc + part[:, None] * HEAD_DIM_V + offs_dv[None, :],
        acc,
        mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V),
    )
    tl.store(PartM + part, m_i, mask=row_ok)
    tl.store(PartL + part, l_i, mask=row_ok)
    if VSUM:  # noqa: SIM102 (a constexpr test, then a runtime one: not one `and`)
        if pid_m == 0:
            vs = (tl.cast(off_bh, tl.int64) * num_splits + pid_s) * HEAD_DIM_V
            tl.store(PartVSum + vs + offs_dv, vsum, mask=offs_dv < HEAD_DIM_V)


@triton.jit
def _decode_merge(
    Part, m_off, l_off, vs_off, VMean, Sinks, Out, LSE,
    stride_vmb, stride_vmh, stride_vmd, stride_sink,
    Hq, Hkv, GROUPS, Sq, Sk, num_splits,
    fill_thr, fill_lse, sink_unit, inv_sk,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr,
    NATURAL: tl.constexpr, FINITE_FILL: tl.constexpr, HAS_SINKS: tl.constexpr, VSUM: tl.constexpr,
    PDL: tl.constexpr, INTERPRET_BF16: tl.constexpr,
):  # fmt: skip
    """One program per output row ``(b, h, i)``: merge the row's ``num_splits`` partial states.

    ``PDL``: launched with programmatic dependent launch, so the split kernel may still run; wait until it
    has finished and its stores are visible before reading anything it wrote.
    """
    if PDL:
        _gdc_wait()
    row = tl.cast(tl.program_id(0), tl.int64)  # (b * Hq + h) * Sq + i; out and lse are contiguous
    PartAcc = Part
    PartM = Part + m_off
    PartL = Part + l_off
    PartVSum = Part + vs_off
    fill_thr = tl.cast(fill_thr, tl.float32)
    fill_lse = tl.cast(fill_lse, tl.float32)
    sink_unit = tl.cast(sink_unit, tl.float32)
    inv_sk = tl.cast(inv_sk, tl.float32)
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < HEAD_DIM_V
    base = row * num_splits

    # pass 1: the row max over all splits (and the sink: flash_fwd's starting state m_i = sink)
    if HAS_SINKS:
        h = (row // Sq) % Hq
        sink = tl.load(Sinks + h * stride_sink).to(tl.float32) * sink_unit
        m_max = sink
    else:
        m_max = tl.full([], float("-inf"), dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        m_s = tl.load(PartM + base + s0 + offs_s, mask=s0 + offs_s < num_splits, other=float("-inf"))
        m_max = tl.maximum(m_max, tl.max(m_s, 0))
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)

    # pass 2: rescale and add; a split that kept nothing has m = -inf, l = 0, acc = 0 and adds 0
    if HAS_SINKS:
        l_sum = _exp(sink - m_safe, NATURAL)
    else:
        l_sum = tl.zeros([], dtype=tl.float32)
    acc = tl.zeros([BLOCK_DV], dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        s_ok = s0 + offs_s < num_splits
        m_s = tl.load(PartM + base + s0 + offs_s, mask=s_ok, other=float("-inf"))
        l_s = tl.load(PartL + base + s0 + offs_s, mask=s_ok, other=0.0)
        w = _exp(m_s - m_safe, NATURAL)
        l_sum += tl.sum(l_s * w, 0)
        a_ptrs = PartAcc + (base + s0 + offs_s)[:, None] * HEAD_DIM_V + offs_dv[None, :]
        a_s = tl.load(a_ptrs, mask=s_ok[:, None] & dv_ok[None, :], other=0.0)
        acc += tl.sum(a_s * w[:, None], 0)

    # epilogue: flash_fwd's, on the merged state
    out = acc / l_sum
    if NATURAL:
        lse = m_max + tl.log2(l_sum) * 0.6931471805599453
    else:
        lse = (m_max + tl.log2(l_sum)) * 0.6931471805599453
    if FINITE_FILL:
        empty = (l_sum == 0.0) | (m_max <= fill_thr)
        bhkv = row // (GROUPS * Sq)  # b * Hkv + hkv
        if VSUM:
            vmean = tl.zeros([BLOCK_DV], dtype=tl.float32)
            for s0 in range(0, num_splits, BLOCK_S):
                s_ok = s0 + offs_s < num_splits
                v_ptrs = PartVSum + (bhkv * num_splits + s0 + offs_s)[:, None] * HEAD_DIM_V + offs_dv[None, :]
                vmean += tl.sum(tl.load(v_ptrs, mask=s_ok[:, None] & dv_ok[None, :], other=0.0), 0)
            vmean = vmean * inv_sk
        else:
            vmean = tl.load(
                VMean + (bhkv // Hkv) * stride_vmb + (bhkv % Hkv) * stride_vmh + offs_dv * stride_vmd,
                mask=dv_ok,
                other=0.0,
            )
        out = tl.where(empty, vmean, out)
        lse = tl.where(empty, fill_lse, lse)
    tl.store(Out + row * HEAD_DIM_V + offs_dv, _downcast(out, Out.dtype.element_ty, INTERPRET_BF16), mask=dv_ok)
    tl.store(LSE + row, lse)


# ----------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------


# NOTE: host time. A decode step is ~20-120 us of GPU time, and without CUDA graphs the launcher's Python runs
# in series with it: the first version validated every argument, built the plan, allocated five tensors,
# entered a device guard twice and went through Triton's generic launch twice -- 165-300 us a call on the H100
# host, more than the kernels. Everything that depends only on shapes, strides, dtypes, devices and the scalar
# arguments is computed once per such key (`_Launch`, in `_LAUNCHES`): validation, the plan, the argument
# tuples, the grids, and each kernel's compiled handle (`_Handle`). A call with a known key builds the key,
# allocates out, lse and ONE float32 workspace for the partial state, and launches the two kernels through
# their handles. Nothing reads a tensor's values on the host; nothing synchronizes.
# Measured on this CPU (2 shared cores; triton 3.9's JITFunction.run with a stand-in driver, up to the C launcher,
# which both paths share; bench/decode.py --host measures the real thing on a GPU host): Triton's generic launch
# spends 26 us (split kernel, 50 parameters) and 17 us (merge, 30) in Python, mostly binding the parameters and
# keying their specialisation; the handle 0.9 and 0.8 us. A known key's flash_decode_forward: 61 -> 15.5 us
# (key 3.4, three allocations 6, the two launches 1.7).
#
# NOTE: the fast launch and Triton's versions. What `JITFunction.run` does for `kernel[grid](*args, **meta)` is
# the same in triton 3.6.0 and 3.9 (python/triton/runtime/jit.py):
#     device = driver.active.get_current_device(); stream = driver.active.get_current_stream(device)
#     bound_args, specialization, options = binder(*args, **kwargs)            # every parameter, in order
#     kernel = kernel_cache[compute_cache_key(kernel_key_cache, specialization, options)]
#     launch_metadata = kernel.launch_metadata(grid, stream, *bound_args.values())
#     kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata, launch_metadata,
#                knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *bound_args.values())
# (3.6 adds `kernel = kernel.result()` for an async-compile future; 3.9 adds a pipeline-hook specialisation and
# the fpsan option.) `CompiledKernel.run` is `driver.active.launcher_cls(src, metadata)`, and BELOW it the two
# differ (third_party/nvidia/backend/driver.py): 3.6's `CudaLauncher.__call__(gridX, gridY, gridZ, stream,
# function, *args)` calls a C module generated and compiled per signature (`make_launcher`: format
# "iiiKKppOOOOOO" + one code per parameter, constexprs parsed as "O" and dropped) as `launch(gridX, gridY, gridZ,
# stream, function, coop, pdl, global_scratch, profile_scratch, *args)`; 3.9's `__call__(gridX, gridY, gridZ,
# stream, function, kernel_metadata, launch_metadata, launch_enter_hook, launch_exit_hook, *args)` calls one
# generic `cuda_utils.launch(gridX, gridY, gridZ, stream, function, coop, pdl, kernel_metadata, launch_metadata,
# enter, exit, global_scratch, profile_scratch, arg_annotations, kernel_signature, args)` (scratch after the
# hooks, the arguments as ONE tuple, constexprs dropped through `PyKernelArg` annotations; GSan arguments
# appended). So the handle calls `CompiledKernel.run` -- the level both versions share -- never the C launch.
# Every value the binder specialises on is fixed by the call key (ints: == 1 and % 16, dtypes, strides) except
# the pointers' 16-byte alignment: the handle serves calls whose tensors are all 16-byte aligned (fresh
# allocations always are), any other call takes the generic launch. A handle is made from the first generic
# launch of its key only when this Triton looks as expected (`_make_handle`: the kernel's `device_caches` binder,
# `arg_names`, the compiled kernel's `run`/`function`/`packed_metadata`, `knobs`) AND Triton's own binder,
# given the same arguments, returns exactly the tuple the handle will pass (same objects, same order): the
# proof is taken on the Triton that runs, per key. Anything else -- another Triton, a pre-run hook, a
# launch that raises -- is the generic launch, never a guess. (What the handle skips of `JITFunction.run` besides
# binding: the pre-run hooks -- none, or no handle -- and the check that globals the kernel read at compile time
# still hold their values: these kernels read none that change.) A registered launch hook gets what Triton would
# pass it (`launch_metadata`); with none registered (the hook chains empty) the handle passes None, as the C
# launchers of both versions accept. FLASHFUSE_DECODE_FAST_LAUNCH=0 turns the handles off.
_FAST_LAUNCH = os.environ.get("FLASHFUSE_DECODE_FAST_LAUNCH", "1") != "0"
_MAX_LAUNCHES = 512  # distinct call keys kept; a model has a handful (one per cache length without a static cache)
_SPLIT, _MERGE = 0, 1  # the kernels' slots in _Launch.handles


@dataclass(frozen=True)
class _Handle:
    """One kernel's compiled handle for one call key: ``run(*grid, stream, function, packed_metadata, ...)``."""

    run: object  # CompiledKernel.run: Triton's CudaLauncher for this kernel
    function: int
    packed_metadata: object
    compiled: object  # the CompiledKernel, for launch_metadata when a launch hook is registered
    consts: tuple  # the constexpr values, in parameter order after the runtime arguments
    device_index: int
    get_stream: object  # driver.active.get_current_stream, as Triton's own launch reads the stream


@dataclass
class _Launch:
    """Everything a call with one key needs except the tensors themselves."""

    cfg_key: tuple  # `_FITTED`'s key: (D, Dv, dtype, mask dtype, device, the config asked for)
    plan: DecodePlan
    out_shape: tuple
    lse_shape: tuple
    dtype: torch.dtype
    device: torch.device
    empty: bool  # no output row: nothing to launch
    ws_numel: int  # float32 elements of the workspace: acc, then m, l, then the v sums
    part_offsets: tuple  # (m_off, l_off, vs_off) in elements
    mask_bool: bool  # pass the mask as uint8
    vmean: bool  # rule 6 with a window: the launcher takes torch.mean(v)
    split_grid: tuple
    split_tail: tuple  # the split kernel's runtime arguments after the 8 pointers/offsets
    split_meta: dict
    merge_grid: tuple
    merge_tail: tuple  # the merge kernel's runtime arguments after the vmean strides
    merge_meta: dict
    fast: bool  # CUDA with FLASHFUSE_DECODE_FAST_LAUNCH on: try the handles
    # per kernel (_SPLIT, _MERGE): its _Handle, None (not made yet) or False (this key launches generically)
    handles: list = field(default_factory=lambda: [None, None])
    op_checked: bool = False  # the op validated a call with this key and chose this kernel (`forward_known`)


_LAUNCHES: dict[tuple, _Launch] = {}


def _call_key(q, k, v, mask, sinks, scale, window_left, window_right, mask_fill, softcap, num_splits) -> tuple:
    """Everything the launch depends on but the data. Raises AttributeError for a non-tensor argument.

    Scalars carry their type: ``True == 1 == 1.0`` hash alike, and validation must see each spelling once.
    """
    mk = None if mask is None else (mask.shape, mask.stride(), mask.dtype, mask.device)
    sk = None if sinks is None else (sinks.shape, sinks.stride(), sinks.dtype, sinks.device)
    return (
        q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(),
        q.dtype, k.dtype, v.dtype, q.device, k.device, v.device, mk, sk,
        type(scale), scale, type(window_left), window_left, type(window_right), window_right,
        type(mask_fill), mask_fill, type(softcap), softcap, type(num_splits), num_splits,
    )  # fmt: skip


def _broadcast_strides(shape, stride, target) -> tuple:
    """Strides of ``torch.broadcast_to(t, target)`` from ``t``'s shape and strides (0 on broadcast dims)."""
    pad = len(target) - len(shape)
    return tuple(0 if j < 0 or shape[j] == 1 else stride[j] for j in range(-pad, len(shape)))


def _build(q, k, v, mask, sinks, scale, window_left, window_right, mask_fill, softcap, num_splits, cfg) -> _Launch:
    B, Hq, Sq, D = q.shape
    _, Hkv, Sk, Dv = v.shape
    groups = Hq // Hkv
    device = q.device
    if mask is None:
        mask_kind, mask_dtype, mask_strides = _MASK_NONE, None, (0, 0, 0, 0)
    else:
        mask_kind = _MASK_BOOL if mask.dtype == torch.bool else _MASK_ADD
        mask_dtype = torch.uint8 if mask.dtype == torch.bool else mask.dtype
        mask_strides = _broadcast_strides(tuple(mask.shape), mask.stride(), (B, Hq, Sq, Sk))
    score_unit = 1.0 if mask_kind == _MASK_ADD else _LOG2E

    wl, wr = _clamp_band(Sq, Sk, window_left, window_right)
    mask_fill = float(mask_fill)
    finite_fill = math.isfinite(mask_fill) and sinks is None  # rule 6 (not with sinks: rule 8)
    softcap = float(softcap)
    has_softcap = softcap > 0
    interpreted_bf16 = _interpreting() and q.dtype == torch.bfloat16
    pl, cfg_key = _plan_call(cfg, D, Dv, q.dtype, mask_dtype, device, B, Hkv, groups, Sq, Sk, wl, wr, num_splits)
    cfg = pl.config
    splits, chunk, kv_lo, kv_hi = pl.num_splits, pl.chunk, pl.kv_lo, pl.kv_hi
    # programmatic dependent launch: sm90+ only (griddepcontrol; an env-forced `pdl` elsewhere is ignored), not
    # under the interpreter
    pdl = (cfg.pdl and device.type == "cuda" and not _interpreting() and _gdc_wait is not None
           and _capability_major(device) >= 9)  # fmt: skip
    # keys inside the band for every row: j >= Sq - 1 - wl and j <= wr (and j < Sk)
    in_lo = triton.cdiv(max(Sq - 1 - wl, 0), cfg.block_n) * cfg.block_n
    in_hi = max(min(wr + 1, Sk), 0)
    # rule 6 needs the mean of v over all Sk keys: from the split programs when their chunks cover them all
    vsum = finite_fill and kv_lo == 0 and kv_hi == Sk
    fill_thr = mask_fill / 2 * score_unit if finite_fill else 0.0
    fill_lse = mask_fill + (math.log(Sk) if Sk > 0 else -math.inf) if finite_fill else 0.0

    n_rows = B * Hq * Sq
    m_off = n_rows * splits * Dv
    l_off = m_off + n_rows * splits
    vs_off = l_off + n_rows * splits
    ws_numel = vs_off + (B * Hkv * splits * Dv if vsum else 0)
    block_dv = max(16, triton.next_power_of_2(Dv))
    # the merge: chunks of 16 splits on 1-2 warps; merge_wide, one chunk of all splits (<= 128) on enough warps
    # that the [BLOCK_S, BLOCK_DV] float32 tile is <= 64 registers a thread
    merge_s, merge_warps = _MERGE_BLOCK_S, 1 if Dv <= 64 else 2
    if cfg.merge_wide:
        merge_s = min(max(_MERGE_BLOCK_S, triton.next_power_of_2(splits)), _MERGE_BLOCK_S_WIDE)
        merge_warps = min(max(merge_warps, triton.next_power_of_2(merge_s * block_dv // 2048)), 8)

    # fmt: off
    split_tail = (
        m_off, l_off, vs_off,
        *q.stride(), *k.stride(), *v.stride(), *mask_strides,
        Hkv, groups, Sq, Sk, kv_lo, kv_hi, chunk, splits, in_lo, in_hi,
        float(scale) * score_unit,
        float(scale) / softcap if has_softcap else 0.0,
        softcap * score_unit,
        wl, wr,
    )
    merge_tail = (
        0 if sinks is None else sinks.stride(0),
        Hq, Hkv, groups, Sq, Sk, splits,
        fill_thr, fill_lse, score_unit, 1.0 / Sk if Sk > 0 else math.nan,
    )
    # fmt: on
    split_meta = {
        "HEAD_DIM": D,
        "HEAD_DIM_V": Dv,
        "BLOCK_D": max(16, triton.next_power_of_2(D)),
        "BLOCK_DV": block_dv,
        "BLOCK_M": pl.block_m,
        "BLOCK_N": cfg.block_n,
        "MASK_KIND": mask_kind,
        "HAS_SOFTCAP": has_softcap,
        "VSUM": vsum,
        "K_ROWS": cfg.k_rows,
        "PDL": pdl,
        "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
        "INTERPRET_BF16": interpreted_bf16,
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
    }
    merge_meta = {
        "HEAD_DIM_V": Dv,
        "BLOCK_DV": block_dv,
        "BLOCK_S": merge_s,
        "NATURAL": mask_kind == _MASK_ADD,
        "FINITE_FILL": finite_fill,
        "HAS_SINKS": sinks is not None,
        "VSUM": vsum,
        "PDL": pdl,
        "INTERPRET_BF16": interpreted_bf16,
        "num_warps": merge_warps,
    }
    if pdl:
        merge_meta["launch_pdl"] = True  # a launch option, not a parameter: the handle's packed metadata has it
    return _Launch(
        cfg_key=cfg_key,
        plan=pl,
        out_shape=(B, Hq, Sq, Dv),
        lse_shape=(B, Hq, Sq),
        dtype=q.dtype,
        device=device,
        empty=n_rows * Dv == 0,
        ws_numel=ws_numel,
        part_offsets=(m_off, l_off, vs_off),
        mask_bool=mask_kind == _MASK_BOOL,
        vmean=finite_fill and not vsum,
        split_grid=(splits, pl.m_blocks, B * Hkv),
        split_tail=split_tail,
        split_meta=split_meta,
        merge_grid=(n_rows, 1, 1),  # three entries: the compiled handle indexes all of them
        merge_tail=merge_tail,
        merge_meta=merge_meta,
        fast=_FAST_LAUNCH and device.type == "cuda" and not _interpreting(),
    )


def _check_num_splits(num_splits) -> None:
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits: expected an int >= 1 or None, got {num_splits!r}")


def _aligned(*tensors) -> bool:
    """All data pointers 16-byte aligned: the only specialisation of a call that its key does not fix."""
    bits = 0
    for t in tensors:
        bits |= t.data_ptr()
    return not bits & 15


def _aligned5(a, b, c, d, e) -> bool:  # _aligned for the two launches' five tensors, without the loop
    return not (a.data_ptr() | b.data_ptr() | c.data_ptr() | d.data_ptr() | e.data_ptr()) & 15


def _current_device() -> int:
    return torch.cuda.current_device()  # what Triton's launch reads (driver.active.get_current_device)


_HOOK_CHAIN = getattr(_knobs, "HookChain", None)  # triton 3.6 and 3.9: knobs.runtime's launch hooks are chains


def _hooks_idle(enter, leave) -> bool:
    """No launch hook registered: both of Triton's hook chains are empty (a hook of any other kind is registered)."""
    return enter.__class__ is _HOOK_CHAIN and leave.__class__ is _HOOK_CHAIN and not enter.calls and not leave.calls


def _make_handle(kernel, compiled, args: tuple, meta: dict, device_index: int) -> _Handle | bool:
    """The handle for launching ``compiled`` with arguments like ``args``/``meta``, or False where it is not proven.

    ``compiled`` is what ``kernel[grid](*args, **meta)`` just returned on ``device_index``. The handle passes
    ``(*args, *consts)``; Triton's own launch passes ``binder(*args, **meta)``'s values: the handle exists only
    where the two are the same objects in the same order, asked of the binder Triton itself uses. Any attribute
    missing or any exception (another Triton's internals): False, the generic launch.
    """
    try:
        if getattr(kernel, "pre_run_hooks", None) or _knobs is None:
            return False  # hooks Triton runs before every launch; the handle would skip them
        names = tuple(kernel.arg_names)
        consts = tuple(meta[name] for name in names[len(args) :])
        binder = kernel.device_caches.get(device_index)[-1]  # (kernel_cache, key_cache, target, backend, binder)
        bound, _, _ = binder(*args, **meta)
        packed = (*args, *consts)
        if tuple(bound) != names or len(bound) != len(packed):
            return False
        if any(a is not b for a, b in zip(bound.values(), packed)):
            return False
        run, function, packed_metadata = compiled.run, compiled.function, compiled.packed_metadata
        get_stream = triton.runtime.driver.active.get_current_stream
        if not callable(run) or function is None or not callable(compiled.launch_metadata):
            return False
        return _Handle(run, function, packed_metadata, compiled, consts, device_index, get_stream)
    except Exception as e:  # noqa: BLE001 -- another Triton's internals: the generic launch
        log.info("flash_decode: no fast launch for %s (%s: %s)", kernel, type(e).__name__, e)
        return False


def _launch_handle(h: _Handle, grid, args: tuple) -> None:
    """``CompiledKernel.run`` with what ``JITFunction.run`` would pass it (see the NOTE on Triton's versions)."""
    stream = h.get_stream(h.device_index)
    enter, leave = _knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook
    if _hooks_idle(enter, leave):
        h.run(grid[0], grid[1], grid[2], stream, h.function, h.packed_metadata, None, None, None, *args, *h.consts)
        return
    packed = (*args, *h.consts)
    metadata = h.compiled.launch_metadata(grid, stream, *packed)
    h.run(grid[0], grid[1], grid[2], stream, h.function, h.packed_metadata, metadata, enter, leave, *packed)


def _run(kernel, launch: _Launch, which: int, grid, args: tuple, meta: dict, aligned: bool) -> None:
    """Launch ``kernel``: through its handle for this key when there is one and the call suits it, else Triton's
    generic launch (which makes the handle the first time). ``grid`` has three entries."""
    if not launch.fast:  # the interpreter, the CPU, or handles turned off
        if launch.device.type == "cuda":
            with torch.cuda.device(launch.device):
                kernel[grid](*args, **meta)
        else:
            kernel[grid](*args, **meta)
        return
    h = launch.handles[which]
    current = _current_device()
    if h and aligned and current == h.device_index:
        try:
            _launch_handle(h, grid, args)
            return
        except Exception as e:  # noqa: BLE001 -- the generic launch below raises whatever is really wrong
            launch.handles[which] = False
            log.warning("flash_decode: the fast launch failed (%s: %s); this key launches generically", type(e).__name__, e)
    if current == launch.device.index:
        compiled = kernel[grid](*args, **meta)
    else:
        with torch.cuda.device(launch.device):
            compiled = kernel[grid](*args, **meta)
    if h is None and aligned and current == launch.device.index:
        launch.handles[which] = _make_handle(kernel, compiled, args, meta, current)


def flash_decode_forward(
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
    num_splits: int | None = None,
    op_checked: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """returns (out [B,Hq,Sq,Dv] in q.dtype, contiguous; lse [B,Hq,Sq] float32), as ``flash_attention_forward``

    Same arguments and semantics as ``flash_fwd.flash_attention_forward`` without dropout; meant for
    ``Sq <= 16`` (``supports``) but correct for any ``Sq``. ``num_splits`` (None: ``choose_splits``) is a
    request: it is capped so that no split is empty. Bad arguments raise ``ValueError`` naming the argument.
    Validation and planning run once per call key (shapes, strides, dtypes, devices, scalars): see `_Launch`.
    ``op_checked=True`` (the op, after its own validation chose this kernel): `forward_known` serves later calls
    with the same key without either.
    """
    try:
        key = _call_key(q, k, v, mask, sinks, scale, window_left, window_right, mask_fill, softcap, num_splits)
        launch = _LAUNCHES.get(key)
    except (AttributeError, TypeError):  # a non-tensor (or unhashable) argument: validation names it
        key, launch = None, None
    if launch is None:
        _validate(q, k, v, mask, scale, window_left, window_right, mask_fill, softcap)
        _validate_sinks(q, sinks)
        _check_num_splits(num_splits)
        launch = _build(q, k, v, mask, sinks, scale, window_left, window_right, mask_fill, softcap, num_splits, None)
        if key is not None:
            if len(_LAUNCHES) >= _MAX_LAUNCHES:
                _LAUNCHES.clear()
            _LAUNCHES[key] = launch
    if op_checked and key is not None and num_splits is None:
        launch.op_checked = True
    scalars = (scale, window_left, window_right, mask_fill, softcap, num_splits)
    return _forward(launch, key, scalars, q, k, v, mask, sinks)


def forward_known(q, k, v, mask, scale, window_left, window_right, mask_fill, softcap, sinks):
    """The op's hot path: ``(out, lse)`` for a call whose key the op has passed to ``flash_decode_forward`` with
    ``op_checked=True`` before, else None (the op then validates and dispatches as usual).

    A key fixes everything the op's validation and its choice of this kernel (``supports``) look at: shapes,
    strides, dtypes, devices, the scalars and their types -- so a known key proves both again (dropout is the
    caller's to exclude). ``scale=None`` is the op's ``1 / sqrt(D)``. Cost: the key and one dict look-up; a miss
    costs nothing else.
    """
    if scale is None:
        if not isinstance(q, torch.Tensor) or q.dim() != 4:
            return None
        scale = 1.0 / math.sqrt(q.shape[-1])  # as the op computes it: the same float, the same key
    try:
        key = _call_key(q, k, v, mask, sinks, scale, window_left, window_right, mask_fill, softcap, None)
        launch = _LAUNCHES.get(key)
    except (AttributeError, TypeError):
        return None
    if launch is None or not launch.op_checked:
        return None
    return _forward(launch, key, (scale, window_left, window_right, mask_fill, softcap, None), q, k, v, mask, sinks)


# NOTE: one split still runs the merge. Skipping it would need the merge's epilogue (rule 6's mean of v, rule 8's
# sinks, the lse) in the split kernel as well, for a case the split rule reaches only when the batch alone
# fills the GPU (B x Hkv x row blocks >= 4 x SMs, e.g. B >= 66 at Hkv = 8 on an H100) or the band is under
# 512 keys. There the merge reads rows x (Dv + 2) float32 -- B = 132, Hq = 32: 2.2 MB next to 2.2 GB of K/V at
# 4k keys (0.1%) -- so what it costs is one launch: ~3-5 us of GPU time and, with the compiled handle, a few
# us of host time. Not worth a second epilogue until a trace shows it.
def _forward(launch: _Launch, key, scalars, q, k, v, mask, sinks):
    device = launch.device
    out = torch.empty(launch.out_shape, dtype=launch.dtype, device=device)
    lse = torch.empty(launch.lse_shape, dtype=torch.float32, device=device)
    if launch.empty:
        return out, lse
    ws = torch.empty(launch.ws_numel, dtype=torch.float32, device=device)
    if mask is None:
        mask_arg = q
    else:
        mask_arg = mask.view(torch.uint8) if launch.mask_bool else mask
    while True:
        aligned = launch.fast and _aligned5(q, k, v, mask_arg, ws)
        try:
            _run(_decode_split, launch, _SPLIT, launch.split_grid, (q, k, v, mask_arg, ws, *launch.split_tail),
                 launch.split_meta, aligned)  # fmt: skip
            break
        except Exception as e:  # noqa: BLE001 -- re-raised unless a smaller or plainer config is left to try
            cfg = launch.plan.config
            if isinstance(e, OutOfResources):
                nxt = _smaller(cfg)
                if nxt is None:
                    raise
                log.info("flash_decode: %s does not fit (%s); trying %s", cfg, e, nxt)
            else:
                # a knob this GPU or this Triton cannot compile (a table entry or FLASHFUSE_DECODE_CONFIG): the
                # same tiles without knobs
                nxt = replace(cfg, **dict.fromkeys(_KNOBS, False))
                if nxt == cfg:
                    raise
                warnings.warn(f"flash_decode: {cfg.spec()} failed to compile ({type(e).__name__}: {str(e)[:200]}); "
                              f"using {nxt.spec()}", RuntimeWarning, stacklevel=3)  # fmt: skip
            _FITTED[launch.cfg_key] = nxt  # for every key that asks for this config (tuned or not)
            op_checked = launch.op_checked
            _LAUNCHES.clear()  # other keys with this (D, Dv, dtype) and config replan with the new one
            given = None if launch.plan.source != "given" else nxt
            launch = _build(q, k, v, mask, sinks, *scalars, given)
            launch.op_checked = op_checked
            if key is not None:
                _LAUNCHES[key] = launch
            ws = torch.empty(launch.ws_numel, dtype=torch.float32, device=device)

    if launch.vmean:
        vm = torch.mean(v, dim=-2, dtype=torch.float32)
        vm_arg, vm_strides = vm, vm.stride()
    else:
        vm_arg, vm_strides = lse, (0, 0, 0)
    stat = lse if sinks is None else sinks
    # fmt: off
    merge_args = (ws, *launch.part_offsets, vm_arg, stat, out, lse, *vm_strides, *launch.merge_tail)
    # fmt: on
    aligned = launch.fast and _aligned5(ws, vm_arg, stat, out, lse)
    _run(_decode_merge, launch, _MERGE, launch.merge_grid, merge_args, launch.merge_meta, aligned)
    return out, lse


# NOTE: flashfuse::decode_inline -- a decode step whose two kernels Inductor launches from its own generated code.
# The opaque ops (`flashfuse::attention`, `flashfuse::attention_infer`) cost a dispatcher round trip into Python,
# the op's body (call key, look-up, three allocations) and two launches through Triton's launcher on every call:
# bench/decode.py --host measured 67 us a call on an H200 host where the kernels take 11 us, and batch-1 generation
# is host-bound. A `torch.library.triton_op` instead is traced once, at compile time, into
# `triton_kernel_wrapper_functional` calls (`wrap_triton`): the plan, the split count, the argument values are
# computed then from the traced shapes and strides (static: the rewrite emits this op only when every size and
# stride is an int, and only on sm90, whose configs are measured: `ops.decode_inline_refusal`), and Inductor
# allocates the buffers and launches the kernels like its own (from C++ under the C++ wrapper, which the backend
# sets for CUDA inference graphs: `backend.own_patches`). Inductor gives every input of a user-defined Triton
# kernel exactly the strides it was traced with (`constrain_to_fake_tensors`, `require_exact_strides`), so the
# strides baked into the arguments hold at run time. What it gives up: programmatic dependent launch (a launch
# option, not a kernel argument: the merge waits for the split kernel to finish), the op's run-time fallbacks (a
# config that fails to compile fails the compile, which flashfuse's backend then redoes without rewrites -- but
# under the C++ wrapper Inductor compiles Triton kernels lazily at the first call, where such a failure raises,
# uncaught: one more reason the rewrite takes this op only on sm90, where its configs were measured), and the
# Triton interpreter (DESIGN.md: a triton_op cannot be traced under TRITON_INTERPRET=1, so CPU graphs keep the opaque
# op). Called outside a compiled graph it runs the same kernels through Triton's own launch.
def _decode_inline(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor],
    scale: float,
    window_left: Optional[int],
    window_right: Optional[int],
    mask_fill: float,
    softcap: float,
    sinks: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    from torch.library import wrap_triton

    launch = _build(q, k, v, mask, sinks, scale, window_left, window_right, mask_fill, softcap, None, None)
    device = launch.device
    out = torch.empty(launch.out_shape, dtype=launch.dtype, device=device)
    if launch.empty:
        return out
    lse = torch.empty(launch.lse_shape, dtype=torch.float32, device=device)
    ws = torch.empty(launch.ws_numel, dtype=torch.float32, device=device)
    mask_arg = q if mask is None else (mask.view(torch.uint8) if launch.mask_bool else mask)
    split_meta = {**launch.split_meta, "PDL": False}
    wrap_triton(_decode_split)[launch.split_grid](q, k, v, mask_arg, ws, *launch.split_tail, **split_meta)
    if launch.vmean:
        vm = torch.mean(v, dim=-2, dtype=torch.float32)
        vm_arg, vm_strides = vm, vm.stride()
    else:  # not read (a constexpr branch): any read-only tensor
        vm_arg, vm_strides = q, (0, 0, 0)
    stat = q if sinks is None else sinks  # read only with HAS_SINKS
    merge_meta = {name: val for name, val in launch.merge_meta.items() if name != "launch_pdl"}
    merge_meta["PDL"] = False
    wrap_triton(_decode_merge)[launch.merge_grid](
        ws, *launch.part_offsets, vm_arg, stat, out, lse, *vm_strides, *launch.merge_tail, **merge_meta)
    return out


INLINE_OP = None  # torch.ops.flashfuse.decode_inline.default where this torch has torch.library.triton_op
if hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton"):
    try:
        torch.library.triton_op("flashfuse::decode_inline", _decode_inline, mutates_args=())
        INLINE_OP = torch.ops.flashfuse.decode_inline.default
    except Exception as _exc:  # noqa: BLE001 -- another torch: the opaque ops remain
        log.info("flash_decode: no flashfuse::decode_inline (%s: %s)", type(_exc).__name__, _exc)
