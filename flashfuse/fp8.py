"""FP8 (e4m3) quantization for attention, and an exact emulation of the FP8 kernel's arithmetic (issue 6).

What the Hopper FP8 kernel will compute, written in torch so that its accuracy can be measured (and tested)
on any machine, before and independently of the kernel:

* Q and K are quantized to ``float8_e4m3fn`` with one float32 scale per ``block`` rows of one (batch, head)
  (``block=None``: one scale per (batch, head)); ``scale = amax / 448`` so the largest magnitude lands on
  e4m3's largest finite value. V is quantized with one scale per (batch, head, channel): its channels are
  what the P @ V product sums over rows, and per-channel scales keep an outlier channel from flattening the
  others (FlashAttention-3 and the FP8 literature use per-block Q/K and per-channel V for the same reason).
* ``S = (Q8 K8ᵀ) * sq * sk`` in float32 (FP8 tensor cores accumulate in float32); the unnormalized
  ``P = exp(S - rowmax)`` (in (0, 1]) is quantized to e4m3 with the fixed scale ``1/448``, the row sum ``l``
  stays float32, ``O = (P8 V8) * sv / (448 l)``: the online softmax's order of operations.
* The output comes back in the input dtype.

``relative_rms_error`` is the accuracy measure the issue asks for: ``||out - ref||₂ / ||ref||₂`` against a
float64 reference of plain attention.
"""

from __future__ import annotations

import math

import torch

__all__ = ["E4M3", "E4M3_MAX", "quantize_e4m3", "dequantize", "fp8_attention_emulated", "relative_rms_error"]

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
_TINY = 1e-12  # an all-zero group keeps scale 1 instead of 0 (no division by zero)


def quantize_e4m3(x: torch.Tensor, *, dim: int, block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x8, scale)`` with ``x ≈ x8.float() * scale``.

    ``x`` is ``[B, H, S, D]``; scales are float32, computed on x's device. ``dim=-1``: one scale per group of
    ``block`` rows (all rows of a (batch, head) when ``block`` is None), the layout for Q and K. ``dim=-2``:
    one scale per channel over the whole sequence, the layout for V.
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


def fp8_attention_emulated(q, k, v, *, scale: float | None = None, causal: bool = False,
                           qk_block: int | None = 128, v_per_channel: bool = True) -> torch.Tensor:
    """Attention as the FP8 kernel computes it (see the module docstring), in float32 torch; GQA by head map.

    ``qk_block=None``: one scale per (batch, head) for Q and K; ``v_per_channel=False``: one for V too.
    """
    B, Hq, Sq, D = q.shape
    Hkv = k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    q8, sq = quantize_e4m3(q, dim=-1, block=qk_block)
    k8, sk = quantize_e4m3(k, dim=-1, block=qk_block)
    if v_per_channel:
        v8, sv = quantize_e4m3(v, dim=-2)
    else:
        v8, sv = quantize_e4m3(v, dim=-1, block=None)
    if Hq != Hkv:
        g = Hq // Hkv
        k8, sk, v8, sv = (t.repeat_interleave(g, dim=1) for t in (k8, sk, v8, sv))
    s = (q8.float() @ k8.float().transpose(-2, -1)) * sq * sk.transpose(-2, -1) * scale
    if causal:
        i = torch.arange(Sq, device=q.device)[:, None]
        j = torch.arange(k.shape[2], device=q.device)[None, :]
        s = s.masked_fill(j > i + (k.shape[2] - Sq), float("-inf"))
    # as the kernel does: unnormalized P = exp(s - rowmax) in (0, 1] goes through the FP8 product, the row sum
    # l stays float32 (from P before quantization) and divides the output at the end
    p = torch.exp(s - s.amax(dim=-1, keepdim=True))
    l = p.sum(dim=-1, keepdim=True)
    p8 = (p * E4M3_MAX).to(E4M3)  # 0 < p <= 1: a fixed scale of 1/448
    out = (p8.float() @ v8.float()) * sv / (E4M3_MAX * l)  # sv: [.., 1, D] per channel or [.., 1, 1] per head
    return out.to(q.dtype)


def relative_rms_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref||₂ / ||ref||₂`` in float64."""
    o, r = out.double(), ref.double()
    return ((o - r).norm() / r.norm()).item()
