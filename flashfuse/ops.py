"""The custom ops: ``flashfuse::attention`` (forward, returns ``(out, lse)``) and its backward, and
``flashfuse::attention_infer`` (the same forward where no gradient can flow, output only; NOTE below).

The first two are opaque ``torch.library.custom_op``s with fake implementations, so Dynamo, AOTAutograd and
Inductor trace them with symbolic shapes and Inductor calls them as extern kernels.

NOTE: why not ``triton_op`` + ``wrap_triton``: under ``TRITON_INTERPRET=1`` (CPU CI), ``torch.compile``
cannot trace into a ``triton_op`` -- it runs the interpreter on fake tensors and fails with "Cannot
access data pointer of Tensor" (torch 2.13, triton 3.9). The opaque op compiles and runs there. On the
GPU, inference decode steps call ``flashfuse::decode_inline`` (a ``triton_op`` in kernels/flash_decode.py,
chosen by the rewrite through `decode_inline_refusal`): measured on the H200 (session 7), batch-1 generation
went from 0.83-1.04x (five runs on four hosts) plain torch.compile with the opaque ops to 1.18x.

Dispatch inside the op: CUDA tensors -> the Triton kernel; CPU tensors -> the same Triton kernel under
the interpreter when ``TRITON_INTERPRET=1``, else the float32 reference (``flashfuse.testing``), so a
CPU user still gets correct output.

NOTE: dropout. ``dropout_p > 0`` makes the forward draw ``rng_state = [seed, offset]`` (int64, on q's
device, one ``torch.randint`` from torch's default generator there: ``torch.manual_seed`` reproduces it, and
eager ``torch.utils.checkpoint``, which restores the generator before recomputing, redraws the same) and
return it as a third output; autograd saves it, and the backward regenerates the same keep-mask from it
(in-kernel Philox; see ``flash_fwd._dropout_keep``). ``dropout_p == 0`` draws nothing (the generator does
not advance, no launch) and returns an empty ``rng_state``. The op is tagged ``nondeterministic_seeded``
so that AOTAutograd/Inductor neither CSE two calls nor reorder it against other random ops. The reference
path (CPU without the interpreter) draws its mask with torch's RNG seeded from ``rng_state``
(``testing.dropout_keep_mask``): same keep rate, a different mask from the kernels'.
"""

from __future__ import annotations

import math
import os
import warnings
import weakref
from typing import Optional

import torch

from flashfuse import testing

__all__ = ["attention", "validate_attention_args", "SUPPORTED_DTYPES", "MIN_HEAD_DIM", "MAX_HEAD_DIM"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
SUPPORTED_DEVICES = ("cuda", "cpu")
KERNEL_HAS_SINKS = True  # the forward kernel takes `sinks` (the report says which path a site runs)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def validate_attention_args(q, k, v, mask, window_left, window_right) -> None:
    """Raise ``ValueError`` naming the offending argument."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor [B, H, S, D], got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name}: dtype {t.dtype} unsupported (float16, bfloat16, float32)")
        if t.device.type not in SUPPORTED_DEVICES:
            raise ValueError(f"{name}: device {t.device} unsupported (cuda, cpu)")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q/k/v: dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q/k/v: devices differ ({q.device}, {k.device}, {v.device})")
    B, Hq, Sq, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"k/v: batch size {k.shape[0]}/{v.shape[0]} differs from q's {B}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"v: {v.shape[1]} heads, k has {k.shape[1]}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"v: sequence length {v.shape[2]} differs from k's {k.shape[2]}")
    if k.shape[3] != D:
        raise ValueError(f"k: head dim {k.shape[3]} differs from q's {D}")
    if v.shape[3] != D:
        raise ValueError(f"v: head dim {v.shape[3]} differs from q's {D} (not supported)")
    if not (MIN_HEAD_DIM <= D <= MAX_HEAD_DIM):
        raise ValueError(f"q: head dim {D} unsupported ({MIN_HEAD_DIM}..{MAX_HEAD_DIM})")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"k: Hq ({Hq}) must be a multiple of Hkv ({Hkv})")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise ValueError(f"mask: expected a tensor or None, got {type(mask).__name__}")
        if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
            raise ValueError(f"mask: dtype {mask.dtype} unsupported (bool keep-mask or additive float)")
        if mask.dim() > 4:
            raise ValueError(f"mask: shape {tuple(mask.shape)} not broadcastable to [B, Hq, Sq, Sk]")
        target = (B, Hq, Sq, k.shape[2])
        for have, want in zip(reversed(mask.shape), reversed(target)):
            if have != 1 and have != want:
                raise ValueError(f"mask: shape {tuple(mask.shape)} not broadcastable to {list(target)}")
        if mask.device != q.device:
            raise ValueError(f"mask: device {mask.device} differs from q's {q.device}")
    for name, w in (("window_left", window_left), ("window_right", window_right)):
        if w is not None and not isinstance(w, (int, torch.SymInt)):
            raise ValueError(f"{name}: expected an int or None, got {type(w).__name__}")


def _use_kernel(q: torch.Tensor) -> bool:
    if q.device.type == "cuda":
        return True
    return _interpreting() and _triton_available()


def describe_kernel(device: torch.device, head_dim: int, dtype: torch.dtype, mask_dtype: torch.dtype | None, *,
                    sinks: bool = False, dropout_p: float = 0.0, q_len: int | None = None,
                    _no_cudnn: bool = False) -> str:
    """What the op will run for such inputs (shown in the report and the dumps)."""
    if (q_len is not None and q_len <= 16 and not dropout_p and os.environ.get("FLASHFUSE_DECODE", "1") != "0"
            and (device.type == "cuda" or (_interpreting() and _triton_available()))):
        return describe_kernel(device, head_dim, dtype, mask_dtype, sinks=sinks, dropout_p=dropout_p) + (
            "; flash_decode (split-KV) when the KV length is >= 256")
    if (device.type == "cuda" and not _interpreting() and mask_dtype is None and not sinks and not dropout_p
            and dtype in (torch.float16, torch.bfloat16) and head_dim in _cudnn_head_dims(device)
            and os.environ.get("FLASHFUSE_SDPA", "1") != "0" and not _CUDNN_BROKEN and not _no_cudnn):
        return ("SDPA cuDNN forward and backward (faster there) if no soft-capping and no band or causal with "
                "Sq == Sk; "
                "else " + describe_kernel(device, head_dim, dtype, mask_dtype, sinks=sinks, dropout_p=dropout_p,
                                          _no_cudnn=True))
    if (device.type == "cuda" and not _interpreting() and mask_dtype is None and not sinks and not dropout_p
            and dtype in (torch.float16, torch.bfloat16) and head_dim in (16, 32, 64, 128, 256)
            and os.environ.get("FLASHFUSE_SM90", "1") != "0"
            and torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] == 9):
        return "flash_fwd_sm90 (triton, TMA; tuned or autotuned config) if the strides suit TMA, else flash_fwd"
    if device.type == "cuda" or (_interpreting() and _triton_available()):
        from flashfuse.kernels.flash_fwd import _interpreting as kernel_interpreting
        from flashfuse.kernels.flash_fwd import _pick_config

        itemsize = 0 if mask_dtype is None else torch.empty((), dtype=mask_dtype).element_size()
        cfg = _pick_config(int(head_dim), dtype, device, itemsize)
        where = "triton interpreter" if kernel_interpreting() else "triton"
        return (f"flash_fwd ({where}) BLOCK_M={cfg.block_m} BLOCK_N={cfg.block_n} "
                f"num_warps={cfg.num_warps} num_stages={cfg.num_stages}")
    return "reference (CPU, float32)"


def _cudnn_head_dims(device: torch.device) -> tuple[int, ...]:
    """Head dims the cuDNN path takes: 64 and 128; on sm90 (Hopper) with cuDNN >= 9.1 also 256, where cuDNN's
    forward was 1.25x and its forward+backward 1.5-1.8x flashfuse's Triton kernels (H200, bench/RESULTS.md,
    2026-11-30). sm90 and 9.1 are where PyTorch's own SDPA check (``check_cudnn_tensor_shapes``) allows head dims
    above 128; other GPUs (and ROCm) were not measured. A failure of a wide call turns off only the wide calls
    (``_CUDNN_WIDE_BROKEN``)."""
    if (device.type == "cuda" and torch.version.hip is None and not _CUDNN_WIDE_BROKEN
            and torch.cuda.is_available() and torch.cuda.get_device_capability(device) == (9, 0)
            and (torch.backends.cudnn.version() or 0) >= 90100):
        return (64, 128, 256)
    return (64, 128)


_CUDNN_BROKEN: list[str] = []  # the first failure of the cuDNN path in this process (then it is not tried again)
_CUDNN_GQA_BROKEN: list[str] = []  # the same for GQA/MQA calls (Hq != Hkv) only: plain MHA keeps the path
_CUDNN_BWD_BROKEN: list[str] = []  # the same for the cuDNN backward (our backward kernel then runs)
_CUDNN_GQA_BWD_BROKEN: list[str] = []  # ... for its GQA/MQA calls only
_CUDNN_WIDE_BROKEN: list[str] = []  # a failure (forward or backward) of a head dim > 128 call: those calls only


def _cudnn_path_refusal(q, k, v, mask, window_left, window_right, softcap, sinks, dropout_p) -> str | None:
    """None when SDPA's cuDNN kernel computes exactly this call (and is faster than ours there), else why not.

    Measured on the H100 and H200 (bench/RESULTS.md): cuDNN is ahead of flashfuse's Triton kernels for plain and
    causal attention without masks, forward and backward, MHA and GQA, so the op hands it exactly those cases -- a
    user must not lose speed by choosing flashfuse. Exactly the same case: no mask tensor, no sinks, no
    soft-capping, no dropout, Hq a multiple of Hkv (cuDNN reads the shared K/V heads itself, as SDPA's
    ``enable_gqa``), fp16/bf16, head dim 64 or 128 (and 256 on Hopper: ``_cudnn_head_dims``), and either no band
    or the causal band with Sq == Sk (cuDNN's is_causal is then the same mask; no row is ever empty, so
    ``mask_fill`` cannot matter). The backward takes the same decision from the same arguments
    (``_cudnn_backward``). ``FLASHFUSE_SDPA=0`` turns the path off.
    """
    if os.environ.get("FLASHFUSE_SDPA", "1") == "0":
        return "turned off (FLASHFUSE_SDPA=0)"
    if _CUDNN_BROKEN:
        return f"cuDNN failed earlier in this process ({_CUDNN_BROKEN[0]})"
    if mask is not None or sinks is not None or softcap or dropout_p:
        return "a mask, sinks, soft-capping or dropout"
    if q.dtype not in (torch.float16, torch.bfloat16) or not (q.dtype == k.dtype == v.dtype):
        return f"dtype {q.dtype}"
    if q.shape[1] != k.shape[1] and _CUDNN_GQA_BROKEN:
        return f"GQA/MQA: cuDNN refused it earlier in this process ({_CUDNN_GQA_BROKEN[0]})"
    if q.shape[-1] not in _cudnn_head_dims(q.device) or v.shape[-1] != q.shape[-1]:
        return f"head dim {q.shape[-1]}"
    if window_left is not None or window_right not in (None, 0) or (window_right == 0 and q.shape[2] != k.shape[2]):
        return "a band other than none or causal with Sq == Sk"
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        return "a head dim that is not contiguous"
    return None


def _cudnn_forward(q, k, v, scale, *, causal: bool):
    """``(out, lse)`` from ``aten._scaled_dot_product_cudnn_attention`` (natural-log lse, float32, [B, H, Sq]);
    None (and the path switched off for the process, with a warning) if cuDNN refuses."""
    try:
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)
        out, lse = res[0], res[1]
        B, H, Sq = q.shape[:3]
        lse = lse.reshape(B, H, Sq).float().contiguous()
        # cuDNN writes ``out`` in q's layout (e.g. [B, S, H, D] strides when q is a transposed view); the fake
        # implementation promises a contiguous [B, H, Sq, Dv] (Inductor checks the strides)
        return out.contiguous(), lse
    except Exception as exc:  # noqa: BLE001 -- any refusal: our own kernel runs instead
        if q.shape[-1] > 128:
            broken = _CUDNN_WIDE_BROKEN
        else:
            broken = _CUDNN_GQA_BROKEN if q.shape[1] != k.shape[1] else _CUDNN_BROKEN
        broken.append(f"{type(exc).__name__}: {str(exc)[:120]}")
        _CUDNN_CALLS.clear()
        warnings.warn(f"flashfuse: the cuDNN path failed ({broken[0]}); using flashfuse's Triton kernels",
                      RuntimeWarning, stacklevel=2)
        return None


def _cudnn_backward(grad_out, q, k, v, out, lse, scale, *, causal: bool):
    """``(dq, dk, dv)`` from ``aten._scaled_dot_product_cudnn_attention_backward``, for a call that
    ``_cudnn_path_refusal`` accepts; None (and the cuDNN backward switched off for the process, with a warning)
    if cuDNN refuses. ``lse`` is the forward's (natural log, [B, Hq, Sq]): cuDNN's own, or our kernel's (the same
    quantity), so either forward pairs with this backward."""
    gqa = q.shape[1] != k.shape[1]
    if _CUDNN_BWD_BROKEN or (gqa and _CUDNN_GQA_BWD_BROKEN) or (q.shape[-1] > 128 and _CUDNN_WIDE_BROKEN):
        return None
    try:
        B, H, Sq = q.shape[:3]
        Sk = k.shape[2]
        # None (an undefined tensor) for what a dense, dropout-free forward leaves undefined: a defined
        # ``cum_seq_q`` would select cuDNN's ragged (nested-tensor) backward
        dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            grad_out.contiguous(), q, k, v, out.contiguous(), lse.reshape(B, H, Sq, 1).contiguous(), None, None,
            None, None, None, Sq, Sk, 0.0, causal, scale=scale)
        return dq, dk, dv
    except Exception as exc:  # noqa: BLE001 -- any refusal: our own backward kernel runs instead
        if q.shape[-1] > 128:
            broken = _CUDNN_WIDE_BROKEN
        else:
            broken = _CUDNN_GQA_BWD_BROKEN if gqa else _CUDNN_BWD_BROKEN
        broken.append(f"{type(exc).__name__}: {str(exc)[:160]}")
        warnings.warn(f"flashfuse: the cuDNN backward failed ({broken[0]}); using flashfuse's Triton "
                      "backward kernels", RuntimeWarning, stacklevel=2)
        return None


# NOTE: the cuDNN path's hot path. A call the checks of ``_attention`` sent to cuDNN's forward is remembered by
# its key: everything those checks read (shapes, strides, dtypes, devices, the scalars, the two switches in the
# environment) -- so the same key proves them all again, and a repeated call (every layer of a model, every step)
# skips the validation, the decode kernel's test and the path refusals: 94 -> 52 us of host time a call on the H200's
# host (bench/op_host.py; SDPA's own call: 34 us), which took a short, host-bound call (causal S = 512) from 0.83x
# to 1.02x of SDPA cuDNN's rate. Keys with a mask or sinks are never kept (those calls never take the path). Any
# cuDNN failure empties the table (``_cudnn_forward``), and the hot path is skipped while a failure is recorded.
_CUDNN_CALLS: dict[tuple, bool] = {}  # call key -> causal
_DECODE_MAX_Q = 16  # flash_decode.MAX_QUERY_LEN (not imported here: that module imports triton)
_CUDNN_CALLS_MAX = 512


def _cudnn_call_key(q, k, v, scale, window_left, window_right, softcap, dropout_p, probe_mask) -> tuple:
    env = os.environ
    return (q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), q.dtype, k.dtype, v.dtype,
            q.device, k.device, v.device, scale, window_left, window_right, softcap, dropout_p, probe_mask,
            env.get("FLASHFUSE_SDPA"), env.get("FLASHFUSE_DECODE"))


def _cudnn_known(key: tuple) -> bool | None:
    """The ``causal`` flag of a call key the checks sent to cuDNN before; None if unknown or cuDNN failed since."""
    if _CUDNN_BROKEN or _CUDNN_GQA_BROKEN or _CUDNN_WIDE_BROKEN:
        return None
    return _CUDNN_CALLS.get(key)


def _remember_cudnn(key: tuple, causal: bool) -> None:
    if len(_CUDNN_CALLS) >= _CUDNN_CALLS_MAX:
        _CUDNN_CALLS.clear()
    _CUDNN_CALLS[key] = causal


def _hopper_path_refusal(q, k, v, mask, scale, window_left, window_right, mask_fill, softcap, sinks,
                         dropout_p) -> str | None:
    """None when the Hopper kernel (``kernels/flash_fwd_sm90.py``: TMA, tuned) computes this call, else why not.

    Same semantics as ``flash_fwd`` for what it supports (no mask tensor, no sinks, fp16/bf16, a power-of-two
    head dim, sm90); dropout stays on ``flash_fwd`` because the backward regenerates that kernel's Philox mask.
    ``FLASHFUSE_SM90=0`` turns the path off.
    """
    if os.environ.get("FLASHFUSE_SM90", "1") == "0":
        return "turned off (FLASHFUSE_SM90=0)"
    if dropout_p:
        return "dropout"
    from flashfuse.kernels.flash_fwd_sm90 import supports

    return supports(q, k, v, mask, scale=scale, window_left=window_left, window_right=window_right,
                    softcap=softcap, mask_fill=mask_fill, sinks=sinks)


# id(root) -> (weakref to the root tensor, its _version when probed, {view geometry: "causal" | "full" | None});
# the root is the mask or the tensor it views; an entry leaves with its tensor. (Not a WeakKeyDictionary: its
# lookups compare tensors with ==, which is elementwise.)
_MASK_PROBES: dict[int, tuple[weakref.ref, int, dict]] = {}


def _forget_probe(key: int, ref: weakref.ref) -> None:
    entry = _MASK_PROBES.get(key)
    if entry is not None and entry[0] is ref:
        del _MASK_PROBES[key]
_PROBE_DEVICES = ("cuda",)
# an additive mask value at or below this is "masked": with the row's diagonal key kept (value 0), such a key's
# weight exp(s + value - max) is exactly 0 in float32 for any scores |s| < 1e29 (ulp(1e30) alone is 7e22)
_MASKED_AT = -1e30


def _probe_root(mask: torch.Tensor) -> torch.Tensor:
    """The tensor whose storage ``mask`` views (Inductor hands a graph input's slice over as a fresh view)."""
    base = mask._base
    return mask if base is None else base


def _probe_mask(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> str | None:
    """What a dense mask tensor that the graph could not prove is, found from its values: ``"causal"`` (it keeps
    exactly ``j <= i``, masks the rest), ``"full"`` (it keeps everything), or None (anything else, or not probed).

    NOTE: why. Where the mask is built in another graph -- FSDP2's per-layer graph breaks, DDP's bucket split,
    a mask passed in by the caller -- the pass sees only a ``[B, 1, Sq, Sk]`` input tensor and must keep it
    (``dense_mask``), which costs the mask's reads and every tile above the diagonal, and rules out the
    mask-free fast paths. Most such masks are plain causal. The op checks the values once per mask tensor (one
    host sync, cached on the tensor object and its version counter: FSDP2 passes the same mask object to every
    layer, forward and backward), and runs the mask-free causal (or unmasked) computation when the values say
    so. Exactly equal: kept entries are exactly ``True`` / ``0.0`` (``s + 0 == s``), masked ones ``False`` or
    ``<= -1e30`` (weight exactly 0 next to the kept diagonal), so no row is empty and ``mask_fill`` cannot
    matter. Only dense masks ([..., Sq, Sk], not broadcast along either) with Sq > 16 (not a decode step), on
    ``_PROBE_DEVICES`` (CUDA: where the fast paths are), never while a CUDA graph is being captured (no sync
    allowed), never for a mask that needs a gradient or an inference tensor (no version counter).
    ``FLASHFUSE_MASK_PROBE=0`` turns it off.

    NOTE: only for masks the rewrite marked ``probe_mask``: a graph input, or views of one. The cache trusts
    (the input tensor object, its version counter, the view's geometry) to name the same values; that holds
    for a graph's inputs, which Inductor never overwrites, but not for its intermediate buffers, which it
    reuses under the same Python object with no version bump (a second mask computed into the first one's
    buffer would get the first one's verdict).
    """
    if (mask is None or q.device.type not in _PROBE_DEVICES or mask.requires_grad or mask.dim() < 2
            or mask.is_inference() or os.environ.get("FLASHFUSE_MASK_PROBE", "1") == "0"):
        return None
    Sq, Sk = q.shape[-2], k.shape[-2]
    if (tuple(mask.shape[-2:]) != (Sq, Sk) or mask.stride(-1) == 0 or mask.stride(-2) == 0 or Sq <= 16
            or Sk == 0):
        return None
    if not (mask.dtype == torch.bool or mask.dtype.is_floating_point):
        return None
    if q.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    root = _probe_root(mask)
    geometry = (mask.storage_offset(), tuple(mask.shape), mask.stride(), mask.dtype)
    hit = _MASK_PROBES.get(id(root))
    if hit is not None and hit[0]() is root and hit[1] == root._version and geometry in hit[2]:
        return hit[2][geometry]
    try:
        with torch.no_grad():
            # broadcast (stride-0) leading dims hold one copy of the values: look at that copy only
            m = mask
            for d in range(m.dim() - 2):
                if m.stride(d) == 0 and m.shape[d] > 1:
                    m = m.narrow(d, 0, 1)
            if m.dtype == torch.bool:
                kept, masked = m, ~m
            else:
                kept, masked = m == 0, m <= _MASKED_AT
            i = torch.arange(Sq, device=m.device)
            causal = torch.arange(Sk, device=m.device)[None, :] <= i[:, None]
            is_causal = (kept == causal).all() & (kept | masked).all()
            verdict = torch.stack([is_causal, kept.all()]).tolist()  # the one host sync
    except Exception:  # noqa: BLE001 -- out of memory etc.: keep the mask (always right)
        return None
    kind = "causal" if verdict[0] else "full" if verdict[1] else None
    if hit is not None and hit[0]() is root and hit[1] == root._version:
        hit[2][geometry] = kind
    else:
        key = id(root)
        ref = weakref.ref(root, lambda r, key=key: _forget_probe(key, r))
        _MASK_PROBES[key] = (ref, root._version, {geometry: kind})
    return kind


def _apply_probe(q, k, mask, window_left, window_right):
    """``(mask, window_left, window_right)`` to compute with: the mask replaced by its band when ``_probe_mask``
    proves it (and the call has no band of its own), else unchanged."""
    if mask is None or window_left is not None or window_right is not None:
        return mask, window_left, window_right
    kind = _probe_mask(q, k, mask)
    if kind == "causal":
        return None, None, 0
    if kind == "full":
        return None, None, None
    return mask, window_left, window_right


def _check_dropout_p(dropout_p) -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {dropout_p!r}")  # noqa: TRY004
    if not 0.0 <= float(dropout_p) < 1.0:  # also NaN
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {dropout_p!r}")
    return float(dropout_p)


def _draw_rng_state(q: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """``[seed, offset]`` for the kernels' Philox, both drawn in [0, 2^62) from the default generator of q's
    device (one launch; offset + any counter stays below 2^63); empty without dropout (no launch at all)."""
    if dropout_p == 0:
        return torch.empty(0, dtype=torch.int64, device=q.device)
    return torch.randint(0, 2**62, (2,), dtype=torch.int64, device=q.device)


_FLASH_DECODE = None  # flashfuse.kernels.flash_decode, once a call has imported it (it imports triton)


def _attention_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor],
    scale: Optional[float],
    window_left: Optional[int],
    window_right: Optional[int],
    mask_fill: float,
    softcap: float,
    sinks: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    additive_fill: bool = False,
    probe_mask: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    global _FLASH_DECODE
    cudnn_key = None
    # Sq <= 16 is flash_decode's (its own hot path below): no key to build there, a decode step pays nothing here
    if mask is None and sinks is None and q.dim() == 4 and q.shape[2] > _DECODE_MAX_Q:
        try:
            cudnn_key = _cudnn_call_key(q, k, v, scale, window_left, window_right, softcap, dropout_p, probe_mask)
            causal = _cudnn_known(cudnn_key)
        except (AttributeError, TypeError):  # a non-tensor or an unhashable argument: the checks below name it
            cudnn_key, causal = None, None
        if causal is not None:
            result = _cudnn_forward(q, k, v, 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale, causal=causal)
            if result is not None:
                return result[0], result[1], _draw_rng_state(q, 0.0)
    decode = os.environ.get("FLASHFUSE_DECODE", "1") != "0"
    if decode and _FLASH_DECODE is not None and dropout_p.__class__ is float and dropout_p == 0.0:
        # a decode step's hot path: a call key (shapes, strides, dtypes, devices, scalars) this op validated and
        # sent to flash_decode before proves every check below again; ~1/3 of the op's host time
        hit = _FLASH_DECODE.forward_known(q, k, v, mask, scale, window_left, window_right, mask_fill, softcap, sinks)
        if hit is not None:
            return hit[0], hit[1], _draw_rng_state(q, 0.0)
    validate_attention_args(q, k, v, mask, window_left, window_right)
    _validate_sinks(q, sinks)
    dropout_p = _check_dropout_p(dropout_p)
    if scale is None:  # the graph proved the scale is 1/sqrt(head_dim) for a symbolic head dim
        scale = 1.0 / math.sqrt(q.shape[-1])
    rng_state = _draw_rng_state(q, dropout_p)
    if decode and _use_kernel(q):
        from flashfuse.kernels import flash_decode

        _FLASH_DECODE = flash_decode
        if flash_decode.supports(q, k, v, mask, scale=scale, window_left=window_left, window_right=window_right,
                                 mask_fill=mask_fill, softcap=softcap, sinks=sinks, dropout_p=dropout_p) is None:
            # a few query rows against a long KV cache: split-KV (flash-decoding), merged by log-sum-exp. Before
            # the mask probe: its host sync per new mask (each token's) buys nothing here, where the mask is
            # 1 / (2 D) of the bytes the kernel reads
            out, lse = flash_decode.flash_decode_forward(
                q, k, v, mask, scale=scale, window_left=window_left, window_right=window_right,
                mask_fill=mask_fill, softcap=softcap, sinks=sinks, op_checked=True)
            return out, lse, rng_state
    if probe_mask:
        mask, window_left, window_right = _apply_probe(q, k, mask, window_left, window_right)
    if q.device.type == "cuda" and _cudnn_path_refusal(q, k, v, mask, window_left, window_right, softcap, sinks,
                                                       dropout_p) is None:
        result = _cudnn_forward(q, k, v, scale, causal=window_right == 0)
        if result is not None:
            if cudnn_key is not None:
                _remember_cudnn(cudnn_key, window_right == 0)
            return result[0], result[1], rng_state
    if q.device.type == "cuda" and _hopper_path_refusal(q, k, v, mask, scale, window_left, window_right, mask_fill,
                                                        softcap, sinks, dropout_p) is None:
        from flashfuse.kernels.flash_fwd_sm90 import flash_attention_forward_sm90

        out, lse = flash_attention_forward_sm90(q, k, v, scale, window_left, window_right, softcap,
                                                mask_fill=mask_fill)
        return out, lse, rng_state
    if _use_kernel(q):
        from flashfuse.kernels.flash_fwd import flash_attention_forward

        out, lse = flash_attention_forward(
            q, k, v, mask, scale=scale, window_left=window_left, window_right=window_right,
            mask_fill=mask_fill, softcap=softcap, sinks=sinks, dropout_p=dropout_p, rng_state=rng_state,
        )
        return out, lse, rng_state
    out, lse = testing.attention_ref(
        q, k, v, mask, scale=scale, window_left=window_left, window_right=window_right,
        mask_fill=mask_fill, softcap=softcap, sinks=sinks, upcast=False,
        dropout_p=dropout_p, dropout_mask=_reference_keep_mask(q, k, rng_state, dropout_p),
    )
    return out.contiguous(), lse.contiguous(), rng_state


_attention = torch.library.custom_op("flashfuse::attention", _attention_impl, mutates_args=(),
                                     tags=(torch.Tag.nondeterministic_seeded,))


# NOTE: flashfuse::attention_infer is the op that sites whose traced output cannot need a gradient call (grad mode
# off, as under `generate`'s torch.no_grad(), or nothing upstream requiring grad; `passes.inference_site`) when
# `decode_inline` does not take them: `attention`'s body and semantics without dropout, its output alone (no lse,
# no rng_state). It is defined with `torch.library.Library` rather than
# `custom_op` for host time: a custom_op call runs custom_op's Python layers (its autograd kernel, even under
# no_grad, and the wrapper around the device kernel) before the body; a Library op goes from the dispatcher
# straight to the body. Measured with a trivial body (CPU box, torch 2.13): custom_op 17-19 us over the body,
# with or without an autograd formula; Library 5-6 us. A decode step is host-bound at batch 1 (bench/generate.py),
# and this is one call per layer and token. No autograd kernel: the rewrite never emits it where a gradient can
# flow (passes/__init__.py), and it is not a public entry point.
_LIB = torch.library.Library("flashfuse", "FRAGMENT")
_LIB.define(
    "attention_infer(Tensor q, Tensor k, Tensor v, Tensor? mask, float? scale, SymInt? window_left, "
    "SymInt? window_right, float mask_fill, float softcap, Tensor? sinks=None, bool additive_fill=False, "
    "bool probe_mask=False) -> Tensor"
)


def _attention_infer(q, k, v, mask, scale, window_left, window_right, mask_fill, softcap, sinks=None,
                     additive_fill=False, probe_mask=False):
    fd = _FLASH_DECODE
    if fd is not None and os.environ.get("FLASHFUSE_DECODE", "1") != "0":
        hit = fd.forward_known(q, k, v, mask, scale, window_left, window_right, mask_fill, softcap, sinks)
        if hit is not None:  # the decode hot path, as in `_attention_impl`, without its rng_state allocation
            return hit[0]
    return _attention_impl(q, k, v, mask, scale, window_left, window_right, mask_fill, softcap, sinks, 0.0,
                           additive_fill, probe_mask)[0]


for _key in ("CPU", "CUDA"):
    _LIB.impl("attention_infer", _attention_infer, _key)


@torch.library.register_fake("flashfuse::attention_infer", lib=_LIB)
def _attention_infer_fake(q, k, v, mask, scale, window_left, window_right, mask_fill, softcap, sinks=None,
                          additive_fill=False, probe_mask=False):
    B, Hq, Sq, _ = q.shape
    return q.new_empty((B, Hq, Sq, v.shape[-1]))


def _static(t) -> bool:
    return t is None or all(isinstance(n, int) for n in (*t.shape, *t.stride()))


def decode_inline_refusal(q, k, v, mask, scale, window_left, window_right, mask_fill, softcap, sinks) -> str | None:
    """None if a site may call ``flashfuse::decode_inline`` (flash_decode.py's NOTE) with these traced values, else
    why not. Asked by the rewrite for graphs without autograd; the op's own checks, at compile time."""
    if os.environ.get("FLASHFUSE_DECODE", "1") == "0" or os.environ.get("FLASHFUSE_DECODE_INLINE", "1") == "0":
        return "switched off (FLASHFUSE_DECODE / FLASHFUSE_DECODE_INLINE)"
    if q.device.type != "cuda" or _interpreting():
        return "not a CUDA graph (the Triton interpreter needs the opaque op)"
    if not all(_static(t) for t in (q, k, v, mask, sinks)):
        return "symbolic sizes or strides (the launch arguments are fixed at compile time)"
    if not all(w is None or isinstance(w, int) for w in (window_left, window_right)):
        return "a symbolic window"
    if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
        # the op views a bool mask as uint8 for the kernel; that view under Inductor is not tested on a GPU yet
        return "a boolean mask (not tested through Inductor yet)"
    try:
        validate_attention_args(q, k, v, mask, window_left, window_right)
        _validate_sinks(q, sinks)
    except ValueError as exc:
        return str(exc)
    from flashfuse.kernels import flash_decode

    if flash_decode.INLINE_OP is None:
        return "this torch has no torch.library.triton_op"
    if flash_decode._capability_major(q.device) != 9:
        # elsewhere a heuristic config that does not fit would fail the compile (the opaque op retries smaller
        # tiles at run time); Hopper's are measured
        return "not a Hopper GPU (decode_inline's configs are measured on sm90 only)"
    return flash_decode.supports(q, k, v, mask, scale=scale, window_left=window_left, window_right=window_right,
                                 mask_fill=mask_fill, softcap=softcap, sinks=sinks)


def _reference_keep_mask(q, k, rng_state, dropout_p, *, kernel: bool = False):
    """The keep-mask for the reference path (torch RNG), or the kernels' (``kernel=True``); None for p = 0."""
    if dropout_p == 0:
        return None
    B, Hq, Sq, _ = q.shape
    return testing.dropout_keep_mask(rng_state, B, Hq, Sq, k.shape[-2], dropout_p, kernel=kernel)


def _validate_sinks(q: torch.Tensor, sinks) -> None:
    if sinks is None:
        return
    if not isinstance(sinks, torch.Tensor) or sinks.dim() != 1 or sinks.shape[0] != q.shape[1]:
        shape = tuple(sinks.shape) if isinstance(sinks, torch.Tensor) else type(sinks).__name__
        raise ValueError(f"sinks: expected a [Hq] = [{q.shape[1]}] tensor, got {shape}")
    if not sinks.dtype.is_floating_point:
        raise ValueError(f"sinks: dtype {sinks.dtype} is not a float dtype")


@_attention.register_fake
def _attention_fake(q, k, v, mask, scale, window_left, window_right, mask_fill, softcap, sinks=None, dropout_p=0.0,
                    additive_fill=False, probe_mask=False):
    _check_dropout_p(dropout_p)
    B, Hq, Sq, _ = q.shape
    out = q.new_empty((B, Hq, Sq, v.shape[-1]))
    lse = q.new_empty((B, Hq, Sq), dtype=torch.float32)
    return out, lse, q.new_empty((2 if dropout_p > 0 else 0,), dtype=torch.int64)


# NOTE: the backward runs the Triton backward kernels (flashfuse/kernels/flash_bwd.py) where the forward
# runs the kernel, else the float32 reference (the dS = P * (dP - rowsum(dO * O)) identity). If the kernel
# fails to compile or launch (an untested GPU/Triton combination), the reference takes over with one warning:
# training must never break because of the fast path. It returns a gradient for an additive mask (a
# trainable bias, T5's position bias) when `need_dmask`, and for sinks; an empty tensor stands for "no
# gradient" (custom ops cannot return None). Gradients keep the strides of q, k, v (as the fake says).
@torch.library.custom_op("flashfuse::attention_backward", mutates_args=())
def _attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor],
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: Optional[float],
    window_left: Optional[int],
    window_right: Optional[int],
    mask_fill: float,
    softcap: float,
    sinks: Optional[torch.Tensor] = None,
    need_dmask: bool = True,
    dropout_p: float = 0.0,
    rng_state: Optional[torch.Tensor] = None,
    additive_fill: bool = False,
    probe_mask: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # NOTE: no autograd here: a custom op's body runs below the autograd dispatch key
    dropout_p = _check_dropout_p(dropout_p)
    if dropout_p > 0 and rng_state is None:
        raise ValueError("rng_state: the forward's rng_state (third output) is required when dropout_p > 0")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if probe_mask and not (need_dmask and mask is not None and mask.dtype != torch.bool):
        # the forward's choice (cached per mask, normally no second sync; no row is empty under what it finds,
        # so the empty-row terms below are skipped too); a mask that needs its gradient stays
        mask, window_left, window_right = _apply_probe(q, k, mask, window_left, window_right)
    grads = None
    kernel = _use_kernel(q)
    if q.device.type == "cuda" and _cudnn_path_refusal(q, k, v, mask, window_left, window_right, softcap, sinks,
                                                       dropout_p) is None:
        dqkv = _cudnn_backward(grad_out, q, k, v, out, lse, scale, causal=window_right == 0)
        if dqkv is not None:
            grads = (*dqkv, None, None)
    if kernel and grads is None:
        grads = _backward_kernel(grad_out, q, k, v, mask, out, lse, scale, window_left, window_right, mask_fill,
                                 softcap, sinks, need_dmask, dropout_p, rng_state)
    if grads is None:
        # after a kernel forward, the reference must drop with the kernels' mask (regenerated from rng_state)
        grads = testing.attention_backward_ref(
            grad_out, q, k, v, mask, scale=scale, window_left=window_left, window_right=window_right,
            mask_fill=mask_fill, softcap=softcap, sinks=sinks, upcast=False,
            dropout_p=dropout_p, dropout_mask=_reference_keep_mask(q, k, rng_state, dropout_p, kernel=kernel),
        )
    dq, dk, dv, dmask, dsinks = grads
    if additive_fill and sinks is None and math.isfinite(mask_fill) and _rows_can_be_empty(
            q, k, mask, window_left, window_right):
        dq, dk, dmask = _empty_row_grads(grad_out, q, k, v, mask, lse, scale, mask_fill, softcap, dq, dk, dmask,
                                         need_dmask)
    dq, dk, dv = (_like(g, t) for g, t in ((dq, q), (dk, k), (dv, v)))
    dmask = _like(dmask, mask) if dmask is not None and need_dmask else q.new_empty(0)
    dsinks = _like(dsinks, sinks) if dsinks is not None else q.new_empty(0)
    return dq, dk, dv, dmask, dsinks


def _rows_can_be_empty(q, k, mask, window_left, window_right) -> bool:
    """Can some query row have no key kept? Always possible with a mask tensor; with the band alone, only if the
    band misses all of ``0 <= j < Sk`` for some ``0 <= i < Sq`` (host arithmetic, no sync)."""
    if mask is not None:
        return True
    Sq, Sk = q.shape[-2], k.shape[-2]
    if Sq == 0 or Sk == 0:
        return False
    wl = math.inf if window_left is None else window_left
    wr = math.inf if window_right is None else window_right
    if wl + wr < 0:
        return True
    # row i keeps [i - wl, i + wr] ∩ [0, Sk - 1]: empty for some i iff the first row ends before 0 or the last
    # row starts after Sk - 1 (the band is a diagonal strip, so the extreme rows are the worst)
    return 0 + wr < 0 or (Sq - 1) - wl > Sk - 1


def _empty_row_grads(grad_out, q, k, v, mask, lse, scale, mask_fill, softcap, dq, dk, dmask, need_dmask):
    """Eager autograd's gradient at fully masked rows when the fill was ADDED to the scores (``s + fill``).

    There every score rounds to the fill, the softmax is uniform (``P = 1/Sk``: rule 6, the forward's mean of V),
    and autograd still passes ``dz = P * (dP - rowsum(P * dP)) = (dP - mean(dP)) / Sk`` to every score of the row
    (d(s + fill)/ds = 1), so q, k (and a trainable additive mask) get gradient from rows that look empty. The
    kernels and the reference give those rows none (right when the fill is written over the scores, as
    ``masked_fill`` does). This adds the difference for the rows the forward marked empty (``lse <= fill / 2``):
    dense per (batch, head) over those rows only; a host sync to find them, only for sites that can have them.
    """
    empty = lse <= mask_fill / 2
    idx = empty.nonzero()
    if idx.numel() == 0:
        return dq, dk, dmask
    B, Hq, Sq, D = q.shape
    groups = Hq // k.shape[1]
    Sk = k.shape[-2]
    dq, dk = dq.clone(), dk.clone()
    if dmask is not None and need_dmask:
        dmask = dmask.clone()
    for b, h in {(int(b), int(h)) for b, h, _ in idx.tolist()}:
        rows = empty[b, h].nonzero().squeeze(-1)
        hk = h // groups
        kf, vf = k[b, hk].float(), v[b, hk].float()
        qr, dor = q[b, h, rows].float(), grad_out[b, h, rows].float()
        dp = dor @ vf.T  # [r, Sk]
        dz = (dp - dp.mean(-1, keepdim=True)) / Sk
        ds = dz
        if softcap:
            t = torch.tanh(qr @ kf.T * (scale / softcap))
            ds = dz * (1 - t * t)
        dq[b, h, rows] += (scale * ds @ kf).to(dq.dtype)
        dk[b, hk] += (scale * ds.T @ qr).to(dk.dtype)
        if dmask is not None and need_dmask and mask is not None and mask.dtype != torch.bool:
            mb = b if mask.shape[0] > 1 else 0
            mh = h if mask.shape[1] > 1 else 0
            if mask.shape[2] > 1:
                dmask[mb, mh, rows] += dz.to(dmask.dtype)
            else:
                dmask[mb, mh, 0] += dz.sum(0).to(dmask.dtype)
    return dq, dk, dmask


def _like(grad: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``grad`` with ``t``'s dtype and strides (what the fake implementation promises)."""
    if grad.dtype == t.dtype and grad.stride() == t.stride():
        return grad
    return torch.empty_like(t).copy_(grad)


_BACKWARD_KERNEL_FAILED: list[str] = []


def _backward_kernel(grad_out, q, k, v, mask, out, lse, scale, window_left, window_right, mask_fill, softcap, sinks,
                     need_dmask, dropout_p=0.0, rng_state=None):
    if _BACKWARD_KERNEL_FAILED:
        return None
    try:
        from flashfuse.kernels.flash_bwd import flash_attention_backward

        return flash_attention_backward(
            grad_out, q, k, v, mask, out, lse, scale=scale, window_left=window_left, window_right=window_right,
            mask_fill=mask_fill, softcap=softcap, sinks=sinks, need_dmask=need_dmask,
            dropout_p=dropout_p, rng_state=rng_state,
        )
    except ValueError:
        raise
    except Exception as exc:  # compile/launch failure: the reference is slower but right
        _BACKWARD_KERNEL_FAILED.append(f"{type(exc).__name__}: {exc}")
        warnings.warn(f"flashfuse: the Triton backward kernel failed ({type(exc).__name__}: {exc}); "
                      "using the reference backward from now on", RuntimeWarning, stacklevel=2)
        return None


@_attention_backward.register_fake
def _attention_backward_fake(grad_out, q, k, v, mask, out, lse, scale, window_left, window_right, mask_fill,
                             softcap, sinks=None, need_dmask=True, dropout_p=0.0, rng_state=None,
                             additive_fill=False, probe_mask=False):
    has_dmask = mask is not None and mask.dtype != torch.bool and need_dmask
    dmask = torch.empty_like(mask) if has_dmask else q.new_empty(0)
    dsinks = torch.empty_like(sinks) if sinks is not None else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dmask, dsinks


_FP8_FALLBACK: list[str] = []  # the first runtime refusal of the FP8 kernel in this process (warned once)
_FP8_BROKEN: list[str] = []  # the first compile/launch failure of the FP8 kernel (then it is not tried again)


@torch.library.custom_op("flashfuse::attention_fp8", mutates_args=())
def _attention_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float],
                   causal: bool) -> torch.Tensor:
    """Inference-only attention through 8-bit tensor cores (``kernels/flash_fwd_fp8.py``, scheme from
    ``FLASHFUSE_FP8_SCHEME``, default ``fp8.DEFAULT_SCHEME``): what the rewrite emits for ``options={"fp8": True}``
    sites it checked at compile time. If the kernel refuses the actual call (``supports``: a device or dtype
    that differs from the traced one), the regular op computes it, with one warning saying why."""
    from flashfuse.kernels import flash_fwd_fp8

    reason = flash_fwd_fp8.supports(q, k, v, scale=scale, causal=causal)
    if reason is None and not _FP8_BROKEN:
        try:
            return flash_fwd_fp8.flash_attention_forward_fp8(q, k, v, scale, causal)
        except ValueError:
            raise
        except Exception as exc:  # noqa: BLE001 -- a compile/launch failure: the regular kernel, from now on
            _FP8_BROKEN.append(f"{type(exc).__name__}: {str(exc)[:160]}")
            reason = f"the FP8 kernel failed ({_FP8_BROKEN[0]})"
    elif reason is None:
        reason = f"the FP8 kernel failed earlier in this process ({_FP8_BROKEN[0]})"
    if not _FP8_FALLBACK:
        _FP8_FALLBACK.append(reason)
        warnings.warn(f"flashfuse: the FP8 kernel cannot run this call ({reason}); using the regular kernel",
                      RuntimeWarning, stacklevel=2)
    return _attention(q, k, v, None, scale, None, 0 if causal else None, -math.inf, 0.0)[0]


@_attention_fp8.register_fake
def _attention_fp8_fake(q, k, v, scale, causal):
    B, Hq, Sq, _ = q.shape
    return q.new_empty((B, Hq, Sq, v.shape[-1]))


_FP8_DEVICES = ("cuda",)  # where the rewrite picks the FP8 kernel (tests add "cpu": the interpreter runs it)


def fp8_refusal(q, k, v, *, has_mask: bool, has_sinks: bool, softcap: float, dropout_p: float,
                window_left, window_right, symbolic_band: bool) -> str | None:
    """None when an ``options={"fp8": True}`` site can run the FP8 kernel, else why not (the report shows it).

    Decided at compile time on the site's traced (fake) tensors: the kernel is forward-only, takes no mask
    tensor, sinks, soft-capping or dropout, and only the full or causal band; decode steps keep the split-KV
    kernel; CUDA sm90 only (``_FP8_DEVICES``); then ``flash_fwd_fp8.supports`` (dtype, head dim, ...)."""
    if any(t.requires_grad for t in (q, k, v)):
        return "needs grad: the FP8 kernel is forward-only (inference: torch.no_grad / inference_mode)"
    if has_mask:
        return "a mask tensor (the FP8 kernel takes none)"
    if has_sinks or softcap or dropout_p:
        return "sinks, soft-capping or dropout"
    if symbolic_band or window_left is not None or window_right not in (None, 0):
        return "a band other than full or causal"
    if q.device.type not in _FP8_DEVICES:
        return f"device {q.device.type}: the FP8 kernel runs on CUDA sm90"
    sq, sk = q.shape[-2], k.shape[-2]
    if isinstance(sq, int) and isinstance(sk, int) and sq <= 16 and sk >= 256:
        return "a decode step (the split-KV decode kernel runs)"
    from flashfuse.kernels import flash_fwd_fp8

    try:
        return flash_fwd_fp8.supports(q, k, v, causal=window_right == 0)
    except Exception as exc:  # noqa: BLE001 -- symbolic sizes etc.: not provable here, so no FP8
        return f"not checkable at compile time ({type(exc).__name__})"


def _setup_context(ctx, inputs, output):
    q, k, v, mask, scale, window_left, window_right, mask_fill, softcap, *rest = inputs
    sinks = rest[0] if rest else None
    dropout_p = rest[1] if len(rest) > 1 else 0.0
    ctx.additive_fill = rest[2] if len(rest) > 2 else False
    ctx.probe_mask = rest[3] if len(rest) > 3 else False
    out, lse, rng_state = output
    ctx.save_for_backward(q, k, v, mask, out, lse, sinks, rng_state)  # no [Sq, Sk] tensor: the mask is rng_state
    ctx.params = (scale, window_left, window_right, mask_fill, softcap)
    ctx.dropout_p = dropout_p
    ctx.need_dmask = mask is not None and mask.dtype != torch.bool and mask.requires_grad


def _backward(ctx, grad_out, grad_lse, grad_rng_state):
    q, k, v, mask, out, lse, sinks, rng_state = ctx.saved_tensors
    dq, dk, dv, dmask, dsinks = torch.ops.flashfuse.attention_backward(
        grad_out, q, k, v, mask, out, lse, *ctx.params, sinks, ctx.need_dmask, ctx.dropout_p, rng_state,
        ctx.additive_fill, ctx.probe_mask)
    dmask = dmask if ctx.need_dmask else None
    dsinks = dsinks if sinks is not None else None
    return dq, dk, dv, dmask, None, None, None, None, None, dsinks, None, None, None


_attention.register_autograd(_backward, setup_context=_setup_context)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    causal: bool = False,
    window_left: int | None = None,
    window_right: int | None = None,
    mask_fill: float = -math.inf,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Fused attention, ``softmax(q kᵀ * scale + mask) v`` with GQA by head map; see ``flashfuse.testing``.

    ``causal=True`` is ``window_right=0`` (key index <= query index). An additive ``mask`` and ``sinks``
    may require grad. ``dropout_p`` drops attention probabilities (always, when > 0: pass
    ``p if self.training else 0.0``), with ``1 / (1 - p)`` scaling. Returns ``[B, Hq, Sq, D]``.
    """
    validate_attention_args(q, k, v, mask, window_left, window_right)
    _validate_sinks(q, sinks)
    dropout_p = _check_dropout_p(dropout_p)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if causal:
        if window_right is not None and window_right != 0:
            raise ValueError(f"window_right: {window_right} contradicts causal=True")
        window_right = 0
    out, _, _ = torch.ops.flashfuse.attention(
        q, k, v, mask, float(scale), window_left, window_right, float(mask_fill), float(softcap), sinks, dropout_p
    )
    return out
