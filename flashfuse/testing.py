"""The eager oracle for ``flashfuse::attention``: the semantics every kernel must reproduce.

``attention_ref`` is plain PyTorch, readable top to bottom. Tests compare kernels against it in
float64 (``upcast=True``); the op's CPU path without the Triton interpreter runs it in float32
(``upcast=False``: float32 math, the output rounded to the input dtype -- more accurate than eager
fp16/bf16 attention, so "2x the error of upcast=False" is a stricter rule than "2x eager's error").

Semantics (``q: [B, Hq, Sq, D]``, ``k: [B, Hkv, Sk, D]``, ``v: [B, Hkv, Sk, Dv]``, ``Hq % Hkv == 0``):

1. query head ``h`` reads key/value head ``h // (Hq // Hkv)`` (GQA/MQA without copies);
2. ``s = (q @ kᵀ) * scale``; if ``softcap > 0``: ``s = softcap * tanh(s / softcap)``;
3. a float ``mask`` is added to ``s`` (broadcast to ``[B, Hq, Sq, Sk]``); a bool ``mask`` keeps the
   positions where it is True;
4. structure: with ``d = j - i`` (key index minus query index) a position is kept only if
   ``-window_left <= d <= window_right`` (``None`` = unbounded; causal is ``window_right = 0``);
5. positions not kept (by 3's bool mask or 4) are out of the softmax: probability exactly 0;
6. a row whose positions are all out: NaN when ``mask_fill`` is ``-inf`` (what ``softmax`` of an
   all ``-inf`` row gives); for a finite ``mask_fill`` (``finfo.min``, ``-1e4`` ...) the original
   code saw every score equal to the fill, so the row is the mean of ``v`` over all ``Sk`` keys.
   The same holds when the kept positions' scores are themselves at or below ``mask_fill / 2``
   (an additive ``finfo.min`` bias on top of a boolean ``finfo.min`` fill: all equal in fp32).
7. ``lse`` is the natural log-sum-exp of the kept scores of each row, float32 ``[B, Hq, Sq]``.
8. ``sinks`` (``[Hq]``, GPT-OSS's attention sinks): one extra logit per head joins every row's softmax
   denominator and is dropped after it: ``p_j = exp(s_j) / (sum_k exp(s_k) + exp(sink_h))``. ``lse``
   includes it. A row with nothing kept is then 0 (the sink takes all the weight), never NaN, and rule 6
   does not apply.
9. dropout (``dropout_p > 0``, training): after the softmax, ``p_ij`` becomes ``p_ij * keep_ij / (1 - dropout_p)``
   with a boolean keep-mask ``[B, Hq, Sq, Sk]`` (True with probability ``1 - dropout_p``); ``lse`` stays the
   undropped softmax's (as FlashAttention's). Rule-6 rows (the mean of ``v``) are not dropped: a deliberate
   departure from eager ``F.dropout(softmax(...))`` on rows that only padding reaches, which keeps the
   kernels from visiting every key of such rows; the expected value is the same. The mask is an argument
   here (``dropout_mask``) so that tests can give the kernels' own mask (``dropout_keep_mask``).
"""

from __future__ import annotations

import math

import torch

__all__ = ["attention_backward_ref", "attention_ref", "dropout_keep_mask", "expand_kv", "structure_keep"]


def expand_kv(x: torch.Tensor, hq: int) -> torch.Tensor:
    """``[B, Hkv, S, D] -> [B, Hq, S, D]`` by the head map ``h -> h // (Hq // Hkv)``."""
    groups = hq // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def structure_keep(sq: int, sk: int, window_left, window_right, device=None) -> torch.Tensor | None:
    """Bool ``[Sq, Sk]``: True where ``-window_left <= j - i <= window_right``; None if unbounded."""
    if window_left is None and window_right is None:
        return None
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    keep = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if window_right is not None:
        keep &= (j - i) <= window_right
    if window_left is not None:
        keep &= (j - i) >= -window_left
    return keep


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    window_left: int | None = None,
    window_right: int | None = None,
    mask_fill: float = -math.inf,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    upcast: bool = True,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(out, lse)``; ``out`` in ``q.dtype`` (float64 if ``upcast``), ``lse`` float32.

    With ``dropout_p > 0``, ``dropout_mask`` (bool, broadcastable to ``[B, Hq, Sq, Sk]``) is the keep-mask
    of rule 9; it is required then, and ignored when ``dropout_p == 0``.
    """
    out_dtype = torch.float64 if upcast else q.dtype
    work = torch.float64 if upcast else torch.float32
    Hq, D = q.shape[1], q.shape[-1]
    Sk = k.shape[-2]
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    vf = expand_kv(v.to(work), Hq)
    e, l, m, m_safe, _, _ = _exp_scores(q, k, mask, scale, window_left, window_right, softcap, sinks, work)
    keep = _dropout_factor(dropout_p, dropout_mask, work)
    out = torch.matmul(e if keep is None else e * keep, vf) / l  # 0/0 = NaN for rows with nothing kept
    lse = (torch.log(l) + m_safe).squeeze(-1)

    if math.isfinite(mask_fill) and sinks is None:
        # rule 6: rows that the original saw as all-fill are the plain mean of v
        empty = (l.squeeze(-1) == 0) | (m.squeeze(-1) <= mask_fill / 2)
        if empty.any():
            out = torch.where(empty[..., None], vf.mean(dim=-2, keepdim=True).expand_as(out), out)
            lse = torch.where(empty, torch.full_like(lse, mask_fill + math.log(max(Sk, 1))), lse)
    return out.to(out_dtype), lse.to(torch.float32)


def _dropout_factor(dropout_p, dropout_mask, work) -> torch.Tensor | None:
    """``keep / (1 - dropout_p)`` in ``work`` precision (rule 9), or None without dropout."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {dropout_p}")
    if dropout_p == 0:
        return None
    if dropout_mask is None or dropout_mask.dtype != torch.bool:
        raise ValueError("dropout_mask: a bool keep-mask is required when dropout_p > 0")
    return dropout_mask.to(work) / (1.0 - dropout_p)


def dropout_keep_mask(rng_state: torch.Tensor, B: int, H: int, Sq: int, Sk: int, dropout_p: float,
                      device=None, *, kernel: bool | None = None) -> torch.Tensor:
    """The keep-mask (bool ``[B, H, Sq, Sk]``) that ``flashfuse::attention`` drew for ``rng_state``.

    ``rng_state`` is the op's third output (int64 ``[seed, offset]``). Where the op runs the Triton kernels
    (CUDA, or the CPU under ``TRITON_INTERPRET=1``; ``kernel=None`` asks the op which), the mask is the
    kernels' in-kernel Philox, regenerated by the same ``_dropout_keep`` helper with the same counters:
    exact. Where the op runs this module's reference (the CPU without the interpreter), it is
    ``torch.rand(..., generator=torch.Generator().manual_seed(seed)) >= dropout_p``: torch's RNG, the same
    keep rate, but a different mask from the kernels' for the same ``rng_state``.
    """
    device = rng_state.device if device is None else torch.device(device)
    rng_state = rng_state.to(device)
    if kernel is None:
        from flashfuse.ops import _use_kernel

        kernel = _use_kernel(rng_state)
    if kernel:
        from flashfuse.kernels.flash_fwd import dropout_keep_mask as kernel_mask

        return kernel_mask(rng_state, B, H, Sq, Sk, dropout_p)
    if dropout_p == 0:
        return torch.ones((B, H, Sq, Sk), dtype=torch.bool, device=device)
    seed, offset = (int(x) for x in rng_state.tolist())
    gen = torch.Generator(device=device)
    gen.manual_seed((seed + offset) & 0xFFFF_FFFF_FFFF_FFFF)
    return torch.rand((B, H, Sq, Sk), generator=gen, device=device) >= dropout_p


def _exp_scores(q, k, mask, scale, window_left, window_right, softcap, sinks, work):
    """The forward's shared steps 1-5 and 8: ``(e, l, m, m_safe, tanh_term, e_sink)``.

    ``e = exp(s - m_safe)`` with masked positions at 0, ``l`` its row sum (the sink's term included), ``m`` the
    row max of the kept scores (and the sink), ``m_safe`` the same with non-finite maxima replaced by 0.
    """
    B, Hq, Sq, D = q.shape
    Sk = k.shape[-2]
    qf, kf = q.to(work), expand_kv(k.to(work), Hq)
    s = torch.matmul(qf, kf.transpose(-2, -1)) * scale
    t = None
    if softcap > 0:
        t = torch.tanh(s / softcap)
        s = softcap * t
    keep = torch.ones(B, Hq, Sq, Sk, dtype=torch.bool, device=q.device)
    if mask is not None:
        if mask.dtype == torch.bool:
            keep = keep & mask
        else:
            s = s + mask.to(work)
    struct = structure_keep(Sq, Sk, window_left, window_right, device=q.device)
    if struct is not None:
        keep = keep & struct
    s = s.masked_fill(~keep, -math.inf)
    m = s.amax(dim=-1, keepdim=True)
    if sinks is not None:
        sink = sinks.to(work).view(1, Hq, 1, 1)
        m = torch.maximum(m, sink)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m_safe)
    l = e.sum(dim=-1, keepdim=True)
    e_sink = None
    if sinks is not None:
        e_sink = torch.exp(sink - m_safe)
        l = l + e_sink
    return e, l, m, m_safe, t, e_sink


def _probabilities(q, k, v, mask, scale, window_left, window_right, mask_fill, softcap, work, sinks=None):
    """``(p, tanh_term, empty_rows, p_sink)`` as the forward computes them, in ``work`` precision."""
    B, Hq, Sq, _ = q.shape
    Sk = k.shape[-2]
    e, l, m, _, t, e_sink = _exp_scores(q, k, mask, scale, window_left, window_right, softcap, sinks, work)
    p_sink = None if e_sink is None else (e_sink / l).squeeze(-1)
    p = e / l
    empty = torch.zeros(B, Hq, Sq, dtype=torch.bool, device=q.device)
    if math.isfinite(mask_fill) and sinks is None:
        empty = (l.squeeze(-1) == 0) | (m.squeeze(-1) <= mask_fill / 2)
        p = torch.where(empty[..., None], torch.full_like(p, 1.0 / Sk), p)
    return p, t, empty, p_sink


def _sum_groups(x: torch.Tensor, hkv: int) -> torch.Tensor:
    """``[B, Hq, ...] -> [B, Hkv, ...]``: the adjoint of ``expand_kv``."""
    B, Hq = x.shape[:2]
    return x.reshape(B, hkv, Hq // hkv, *x.shape[2:]).sum(dim=2)


def attention_backward_ref(grad_out, q, k, v, mask=None, *, scale, window_left=None, window_right=None,
                           mask_fill=-math.inf, softcap=0.0, sinks=None, upcast=True, dropout_p=0.0,
                           dropout_mask=None):
    """``(dq, dk, dv, dmask, dsinks)`` of ``attention_ref``'s output, by the standard identities.

    ``dS = P * (dP - rowsum(dO * O))``; with dropout (rule 9, same ``dropout_mask`` as the forward) ``O``
    and ``dV`` use the dropped ``P * keep / (1 - p)`` and ``dP = keep / (1 - p) * dO Vᵀ``; an additive
    mask's gradient is ``dS`` summed over the dims it broadcasts (None for a bool mask); soft-capping
    multiplies by ``1 - tanh²`` (after the bias gradient, which sees the capped scores); rows that are the
    plain mean of ``v`` (rule 6) pass no gradient to ``q``, ``k`` or the mask; a sink's gradient is
    ``-sum(p_sink * rowsum(dO * O))``; GQA sums over each group. No autograd: it runs inside a custom op,
    below the autograd dispatch key.
    """
    work = torch.float64 if upcast else torch.float32
    Hq, Hkv = q.shape[1], k.shape[1]
    p, t, empty, p_sink = _probabilities(q, k, v, mask, scale, window_left, window_right, mask_fill, softcap,
                                         work, sinks)
    do = grad_out.to(work)
    kf, vf = expand_kv(k.to(work), Hq), expand_kv(v.to(work), Hq)
    keep = _dropout_factor(dropout_p, dropout_mask, work)
    if keep is not None:  # rule-6 rows are not dropped
        keep = torch.where(empty[..., None], torch.ones_like(keep), keep)
    pd = p if keep is None else p * keep
    dv = torch.matmul(pd.transpose(-2, -1), do)
    dp = torch.matmul(do, vf.transpose(-2, -1))
    if keep is not None:
        dp = dp * keep
    o = torch.matmul(pd, vf)
    delta = (do * o).sum(dim=-1, keepdim=True)  # rowsum(dO * O); equals rowsum(dP * P)
    ds = p * (dp - delta)
    ds = torch.where(empty[..., None], torch.zeros_like(ds), ds)
    dmask = None
    if mask is not None and mask.dtype != torch.bool:
        dmask = _reduce_to(ds, mask.shape).to(mask.dtype)
    dsinks = None
    if sinks is not None:
        dsinks = (-(p_sink * delta.squeeze(-1))).sum(dim=(0, 2)).to(sinks.dtype)
    if t is not None:
        ds = ds * (1 - t * t)
    dq = torch.matmul(ds, kf) * scale
    dk = torch.matmul(ds.transpose(-2, -1), q.to(work)) * scale
    return (dq.to(q.dtype), _sum_groups(dk, Hkv).to(k.dtype), _sum_groups(dv, Hkv).to(v.dtype), dmask, dsinks)


def _reduce_to(x: torch.Tensor, shape) -> torch.Tensor:
    """Sum ``x`` over the dims that ``shape`` broadcasts (the adjoint of broadcasting)."""
    shape = tuple(shape)
    lead = x.dim() - len(shape)
    if lead:
        x = x.sum(dim=tuple(range(lead)))
    dims = tuple(i for i, s in enumerate(shape) if s == 1 and x.shape[i] != 1)
    return x.sum(dim=dims, keepdim=True) if dims else x
