"""8-bit attention for Hopper (issue 6): the quantization, and an exact torch model of the kernel's arithmetic.

``flashfuse/kernels/flash_fwd_fp8.py`` runs what this file describes; everything here is plain torch, so the
accuracy of each scheme can be measured (and tested) on any machine. ``bench/fp8_accuracy.py`` prints the table.

NOTE: where the error comes from, and why the scheme is what it is (measured: ``python bench/fp8_accuracy.py``,
B=2 H=4 S=512 D=128, N(0, 1) inputs in bf16; "relative RMS" is ``relative_rms_error``, ``||out - ref|| / ||ref||``
against float64; bf16 eager: 5.7e-3, a bf16 flash kernel: 2.2e-3). e4m3 keeps 3 mantissa bits: rounding a
Gaussian vector to it costs 2.4e-2 relative RMS whatever the scale (a float format's relative precision does not
depend on the scale, and an orthogonal rotation of a Gaussian is Gaussian). That error reaches the output
undiminished:

* V rounded alone: 2.65e-2. ``O = sum_j p_j v_j / l`` averages the independent rounding errors of the ``v_j``
  exactly as it averages the ``v_j`` themselves, so their ratio survives.
* P rounded alone: 2.42e-2 (the same argument over ``j``). Scaling P by 448 or by 256 first changes nothing
  (2.40e-2): only values below e4m3's normal range, 2^-6 of the scale, would gain, and they carry no weight.
  Scaling each key block's row maximum to 448 gives 2.08e-2 (the largest, heaviest values land where e4m3's
  relative spacing is finest) at the price of a per-row rescale of every block's PV product: still over.
* Q and K rounded: 3.70e-2 (K alone 2.65e-2): the score error ``dq.k + q.dk`` has 1.4x one operand's relative
  error, and ``exp`` turns an absolute score error into the same relative error of ``p``.

All three together (per-block Q/K scales, per-channel V, P x 448): 5.25e-2. Hadamard rotation, per-row scales,
K smoothing (subtracting K's mean over the keys) or per-head vs per-channel V scales move that by < 2% on
Gaussian inputs. Each of V, P and Q/K *alone* is at or above issue 6's bound of 2e-2, so no scheme that rounds
any operand to e4m3 can meet it; a hi+lo split (two e4m3 terms per operand, 3 products per dot) does (1.2e-3)
but costs 1.5x the bf16 kernel's tensor-core work. What meets it at less than bf16's cost (9.4e-3):

* **QK in int8** with one scale per row (token) of Q and K, after a **random Hadamard rotation** of Q and K
  along the head dim. A uniform 8-bit grid over a row's range beats e4m3's 3-bit mantissa for bell-shaped
  data (9.1e-3 for both operands, against 3.7e-2); the rotation (``QKᵀ = (QR)(KR)ᵀ / D`` for
  ``R = diag(±1) H``, ``R Rᵀ = D I``) spreads outlier channels over all channels, which int8 needs (4 key
  channels x20 + 5: 6.7e-2 without, 1.9e-2 with; 4 channels x100 in q, k and v: 9.5e-2 without, 4.5e-2 with,
  bf16 eager 1.1e-1) and e4m3 likes too (0.43 -> 0.20). Hopper runs int8 MMA at the FP8 rate.
* **PV in the input dtype** (P rounded to bf16/fp16 as the regular kernel does, V not quantized): the only
  way to keep V's and P's rounding under the bound. This halves what 8 bits save: the tensor-core work is
  1.5 bf16-dot units instead of 2 (all 8-bit: 1), a speedup bound of 1.33x before the softmax's own cost.

So the kernel has two switches, ``Fp8Scheme(qk="int8"|"e4m3", pv="input"|"e4m3")``; ``SCHEMES`` names the
combinations and ``DEFAULT_SCHEME`` (``"int8qk"``) is the one that meets the bound. ``"fp8"`` (e4m3 for Q, K,
P and V) is the issue's literal design, the fastest, and 5.1e-2.

The arithmetic (kernel and ``fp8_attention_emulated`` alike):

* Q, K: ``y = x @ R`` (``R`` the ±1 Hadamard with fixed random signs, ``hadamard_signs``; exact products,
  fp32 sums), then per row ``amax = max|y|``, ``scale = amax / QMAX``, ``y8 = round(y * (QMAX / amax))``
  with ``QMAX`` 127 (int8, ``floor(z + 0.5)``) or 448 (e4m3, round to nearest even); an all-zero row keeps
  ``amax = 1``.
* V (``pv="e4m3"``): one scale per (batch, head, channel) over the whole sequence, ``amax / 448``; stored
  transposed, ``[B, H, D, S]``, because Hopper's 8-bit MMA wants its B operand K-major.
* Scores in base 2: ``s = ((q8 · k8) * sk_j) * a_i`` with ``a_i = sq_i * fp32(scale * log2(e) / D)``
  (``/ D`` undoes ``R Rᵀ = D I``; without the rotation it is absent). Online softmax over key blocks of
  ``block_n`` (the kernel config's BLOCK_N): ``m = max(m, max_j s)``, ``p = exp2(s - (m - P_SHIFT))``,
  ``alpha = exp2(m_old - m)``, ``l = l * alpha + sum_j p`` (fp32, from the unrounded ``p``),
  ``acc = acc * alpha + round(p) @ v``. ``P_SHIFT = log2(448)`` for e4m3 P (``p`` lands in (0, 448]: the
  scale is free, folded into the exponent, and cancels in ``acc / l``), 0 for P in the input dtype.
* ``out = acc / l`` (times V's channel scale for e4m3 V), rounded to the input dtype.

Exact up to accumulation order and last-bit fp32 effects. Under the Triton interpreter the kernel gives these
values bit for bit (bf16) or within 2e-4 relative RMS (fp16: numpy and torch sum the rotation in different
orders). On the GPU the approximate ``exp2``, FMA contraction and the fp8 tensor cores' accumulation flip a
rounding of ``p`` now and then; estimated at 1e-4 (P in bf16) to 3e-3 (P and QK in e4m3) relative RMS, and the
GPU tests hold the kernel to a tenth (P in e4m3: a fifth) of the emulation's own error against float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "DEFAULT_SCHEME",
    "E4M3",
    "E4M3_MAX",
    "INT8_MAX",
    "SCHEMES",
    "SCHEME_BOUNDS",
    "Fp8Scheme",
    "dequantize",
    "fp8_attention_emulated",
    "hadamard_matrix",
    "hadamard_signs",
    "qk_scale_factor",
    "quantize_e4m3",
    "quantize_qk",
    "quantize_v",
    "relative_rms_error",
    "resolve_scheme",
    "round_e4m3",
]

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
INT8_MAX = 127  # symmetric: -127..127 (-128 unused, so negation is exact)
LOG2E = 1.4426950408889634
P_SHIFT_E4M3 = math.log2(E4M3_MAX)  # p = exp2(s - m + P_SHIFT) lands in (0, 448]
_TINY = 1e-12  # an all-zero group keeps scale 1 instead of 0 (no division by zero)
_HADAMARD_SEED = 20260601  # the rotation's random signs: fixed, the same for Q and K, every run and device


@dataclass(frozen=True)
class Fp8Scheme:
    """What each tensor-core product runs in.

    ``qk``: ``"int8"`` or ``"e4m3"`` (Q and K, per-row scales). ``pv``: ``"input"`` (P rounded to the input
    dtype, V as given: a 16-bit dot) or ``"e4m3"`` (P and V in e4m3, V per-channel scales).
    ``hadamard``: rotate Q and K by the random-sign Hadamard matrix before quantizing them.
    """

    qk: str = "int8"
    pv: str = "input"
    hadamard: bool = True

    def __post_init__(self):
        if self.qk not in ("int8", "e4m3"):
            raise ValueError(f"scheme: qk must be 'int8' or 'e4m3', got {self.qk!r}")
        if self.pv not in ("input", "e4m3"):
            raise ValueError(f"scheme: pv must be 'input' or 'e4m3', got {self.pv!r}")

    @property
    def name(self) -> str:
        for name, s in SCHEMES.items():
            if s == self:
                return name
        return f"qk={self.qk},pv={self.pv}{'' if self.hadamard else ',nohadamard'}"


SCHEMES: dict[str, Fp8Scheme] = {
    "int8qk": Fp8Scheme("int8", "input"),  # the one that meets 2e-2 (9.4e-3); 8-bit QK, 16-bit PV
    "int8qk_fp8pv": Fp8Scheme("int8", "e4m3"),  # all 8-bit, 3.7e-2
    "fp8": Fp8Scheme("e4m3", "e4m3"),  # all e4m3 (issue 6's literal design), 5.1e-2
    "fp8qk": Fp8Scheme("e4m3", "input"),  # e4m3 QK, 16-bit PV: 3.7e-2 (int8qk costs the same and is 4x better)
}
DEFAULT_SCHEME = "int8qk"
# The relative RMS error on N(0, 1) inputs each scheme is held to (tests, the benchmark's check): issue 6's 2e-2
# where the scheme meets it, else about 1.4x its measured level (so that a regression still fails).
SCHEME_BOUNDS: dict[str, float] = {"int8qk": 2e-2, "int8qk_fp8pv": 5e-2, "fp8": 7e-2, "fp8qk": 5e-2}


def resolve_scheme(scheme: str | Fp8Scheme | None) -> Fp8Scheme:
    """A name of ``SCHEMES``, an ``Fp8Scheme``, or None (``DEFAULT_SCHEME``)."""
    if scheme is None:
        return SCHEMES[DEFAULT_SCHEME]
    if isinstance(scheme, Fp8Scheme):
        return scheme
    if isinstance(scheme, str) and scheme in SCHEMES:
        return SCHEMES[scheme]
    raise ValueError(f"scheme: expected one of {sorted(SCHEMES)} or an Fp8Scheme, got {scheme!r}")


# ----------------------------------------------------------------------------------------------
# rounding and quantization
# ----------------------------------------------------------------------------------------------


def round_e4m3(x: torch.Tensor) -> torch.Tensor:
    """``x`` (float32, ``|x| <= 448``) to ``float8_e4m3fn``, round to nearest even (the GPU's ``cvt.rn``)."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def _round_int8(z: torch.Tensor) -> torch.Tensor:
    """``floor(z + 0.5)`` clamped to ±127, as int8: the kernel's rounding (ties up, the same on every device)."""
    return torch.floor(z + 0.5).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)


def hadamard_signs(d: int) -> torch.Tensor:
    """The rotation's fixed random signs (float32 ±1, ``[d]``, on the CPU)."""
    g = torch.Generator().manual_seed(_HADAMARD_SEED + d)
    return torch.randint(0, 2, (d,), generator=g).float() * 2 - 1


_HADAMARD_CACHE: dict[tuple, torch.Tensor] = {}


def hadamard_matrix(d: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """``R = diag(signs) @ H_d`` with entries ±1 (exact in every float dtype); ``R @ Rᵀ = d * I``.

    ``x @ R`` flips the signs of x's channels, then mixes them (Sylvester's Hadamard matrix, d a power of two).
    Cached per (d, dtype, device).
    """
    if d <= 0 or d & (d - 1):
        raise ValueError(f"d: the Hadamard rotation needs a power of two, got {d}")
    device = torch.device("cpu") if device is None else torch.device(device)
    key = (d, dtype, device)
    if key not in _HADAMARD_CACHE:
        h = torch.ones(1, 1)
        while h.shape[0] < d:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        r = hadamard_signs(d)[:, None] * h
        _HADAMARD_CACHE[key] = r.to(dtype=dtype, device=device)
    return _HADAMARD_CACHE[key]


def quantize_qk(x: torch.Tensor, kind: str = "int8", *, hadamard: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Q or K for the 8-bit QKᵀ product: ``(x8 [B, H, S, D] int8 | float8_e4m3fn, scale [B, H, S] float32)``.

    ``x8 * scale ≈ x @ R`` (with ``hadamard``; else ``≈ x``). One scale per row: ``max|row| / QMAX``. The torch
    model of the kernel's quantization pass (``flash_fwd_fp8._quant_qk``), value for value.
    """
    if x.dim() != 4:
        raise ValueError(f"x: expected [B, H, S, D], got shape {tuple(x.shape)}")
    if kind not in ("int8", "e4m3"):
        raise ValueError(f"kind: expected 'int8' or 'e4m3', got {kind!r}")
    y = x.float()
    if hadamard:
        y = y @ hadamard_matrix(x.shape[-1], torch.float32, x.device)
    qmax = float(INT8_MAX if kind == "int8" else E4M3_MAX)
    amax = y.abs().amax(dim=-1)
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    scale, inv = safe / qmax, qmax / safe
    z = y * inv[..., None]
    x8 = _round_int8(z) if kind == "int8" else round_e4m3(z)
    return x8, scale


def quantize_v(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """V for the e4m3 PV product: ``(v8 [B, H, S, D] float8_e4m3fn, scale [B, H, D] float32)``, ``v8 * scale ≈ v``.

    One scale per (batch, head, channel) over the whole sequence (applied once, in the epilogue). The kernel
    stores ``v8`` transposed (``[B, H, D, S]``); the values are these.
    """
    if v.dim() != 4:
        raise ValueError(f"v: expected [B, H, S, D], got shape {tuple(v.shape)}")
    amax = torch.linalg.vector_norm(v, ord=math.inf, dim=-2, dtype=torch.float32)
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    scale, inv = safe / E4M3_MAX, E4M3_MAX / safe
    return round_e4m3(v.float() * inv[..., None, :]), scale


def quantize_e4m3(x: torch.Tensor, *, dim: int, block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain e4m3 (the first measurement's baseline): ``(x8, scale)`` with ``x ≈ x8.float() * scale``.

    ``x`` is ``[B, H, S, D]``; scales are float32, computed on x's device. ``dim=-1``: one scale per group of
    ``block`` rows (all rows of a (batch, head) when ``block`` is None). ``dim=-2``: one scale per channel over
    the whole sequence.
    """
    if x.dim() != 4:
        raise ValueError(f"x: expected [B, H, S, D], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x: dtype {x.dtype} is not a float dtype")
    xf = x.float()
    B, H, S, D = xf.shape
    if dim in (-1, 3):
        if block is None:
            amax = xf.abs().amax(dim=(-2, -1), keepdim=True)  # [B, H, 1, 1]
        else:
            if block <= 0:
                raise ValueError(f"block: expected a positive int or None, got {block}")
            n = math.ceil(S / block)
            pad = n * block - S
            padded = torch.nn.functional.pad(xf.abs(), (0, 0, 0, pad))
            amax = padded.view(B, H, n, block, D).amax(dim=(-2, -1))  # [B, H, n]
            amax = amax.repeat_interleave(block, dim=-1)[..., :S, None]  # [B, H, S, 1]
    elif dim in (-2, 2):
        if block is not None:
            raise ValueError("block: only for dim=-1 (per-row-group scales)")
        amax = xf.abs().amax(dim=-2, keepdim=True)  # [B, H, 1, D]
    else:
        raise ValueError(f"dim: expected -1 (rows) or -2 (channels), got {dim}")
    scale = torch.where(amax > _TINY, amax / E4M3_MAX, torch.ones_like(amax))
    x8 = (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return x8, scale


def dequantize(x8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x8.float() * scale


# ----------------------------------------------------------------------------------------------
# the kernel's arithmetic
# ----------------------------------------------------------------------------------------------


def qk_scale_factor(scale: float, head_dim: int, scheme: Fp8Scheme) -> float:
    """The host-side constant of the scores: ``scale * log2(e)`` (``/ D`` for the rotation's ``R Rᵀ = D I``)."""
    return scale * LOG2E / (head_dim if scheme.hadamard else 1)


def fp8_attention_emulated(q, k, v, *, scale: float | None = None, causal: bool = False,
                           scheme: str | Fp8Scheme | None = None, block_n: int = 64) -> torch.Tensor:
    """Attention as ``flash_fwd_fp8`` computes it (module docstring), in float32 torch.

    ``q: [B, Hq, Sq, D]``, ``k, v: [B, Hkv, Sk, D]``, GQA by the head map ``h -> h // (Hq // Hkv)``. ``causal``:
    key ``j`` is kept for query ``i`` iff ``j <= i`` (the op's ``window_right = 0``). ``block_n``: the key block
    of the kernel's online softmax (its config's BLOCK_N), which decides the running max ``p`` is rounded
    against. Returns ``out`` in ``q.dtype``.
    """
    sch = resolve_scheme(scheme)
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    q8, sq = quantize_qk(q, sch.qk, hadamard=sch.hadamard)
    k8, sk = quantize_qk(k, sch.qk, hadamard=sch.hadamard)
    if sch.pv == "e4m3":
        v8, sv = quantize_v(v)
        vf = v8.float()
    else:
        vf, sv = v.float(), None
    if Hq != Hkv:
        g = Hq // Hkv
        k8, sk, vf = (t.repeat_interleave(g, dim=1) for t in (k8, sk, vf))
        sv = None if sv is None else sv.repeat_interleave(g, dim=1)
    qf, kf = q8.float(), k8.float()  # int8 products: exact integers (|q·k| <= 127² * 256 < 2^24)
    a = sq * torch.tensor(qk_scale_factor(scale, D, sch), dtype=torch.float32)  # [B, Hq, Sq]
    shift = P_SHIFT_E4M3 if sch.pv == "e4m3" else 0.0

    m = torch.full((B, Hq, Sq), -math.inf, device=q.device)
    l = torch.zeros((B, Hq, Sq), device=q.device)
    acc = torch.zeros((B, Hq, Sq, D), device=q.device)
    rows = torch.arange(Sq, device=q.device)[:, None]
    for start in range(0, Sk, block_n):
        end = min(start + block_n, Sk)
        t = (qf @ kf[..., start:end, :].transpose(-2, -1)) * sk[..., None, start:end]
        s = t * a[..., None]
        if causal:
            cols = torch.arange(start, end, device=q.device)[None, :]
            s = s.masked_fill(cols > rows, -math.inf)
        m_new = torch.maximum(m, s.amax(dim=-1))
        m_safe = torch.where(m_new == -math.inf, torch.zeros_like(m_new), m_new)  # a row with nothing kept yet
        p = torch.exp2(s - (m_safe - shift)[..., None])
        alpha = torch.exp2(m - m_safe)
        l = l * alpha + p.sum(dim=-1)
        p_low = round_e4m3(p).float() if sch.pv == "e4m3" else p.to(q.dtype).float()
        acc = acc * alpha[..., None] + p_low @ vf[..., start:end, :]
        m = m_new
    out = acc / l[..., None]
    if sv is not None:
        out = out * sv[..., None, :]
    return out.to(q.dtype)


def relative_rms_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref||₂ / ||ref||₂`` in float64."""
    o, r = out.double(), ref.double()
    return ((o - r).norm() / r.norm()).item()
