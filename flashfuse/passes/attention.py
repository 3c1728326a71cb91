"""Pass 2: find attention sites. Start at every softmax, walk up to ``q kᵀ`` and down to ``p v``.

Runs on a canonicalized graph (see ``canonicalize.py``). For each softmax it builds either an
``AttentionSite`` (everything the rewrite needs) or a ``NearMiss`` (the first condition that failed,
in plain words). Every condition is checked against the nodes' fake values (shapes, dtypes, dims).

The chain it accepts, in forward order::

    s = matmul(q', kᵀ')            q' = q [* c] ...,  kᵀ' = transpose(k [* c], -2, -1) or any [.., D, Sk] tensor
    s = s * c                       scale: any number of multiplications by Python numbers
    s = cap * tanh(s / cap)         soft-capping (Gemma 2)
    s = masked_fill / where / + bias    masks: structure (band) -> kernel flags; data -> one mask tensor
    p = softmax(to_dtype(s), -1 [, dtype]) [-> to_dtype] [-> dropout(eval)]
    o = matmul(p, v')               v' = v, or v expanded for GQA (repeat_kv / repeat_interleave)
"""

from __future__ import annotations

import dataclasses
import logging
import math
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from flashfuse import ops
from flashfuse.config import Config
from flashfuse.passes.canonicalize import to_dtype
from flashfuse.passes.graph_utils import (emittable, get_arg, is_scalar, rank, shape, source_line, symbol_sources,
                                         tensor_val, val)
from flashfuse.passes.masks import Band, MaskAnalyzer, band_of_bias, band_of_keep

__all__ = ["AttentionSite", "NearMiss", "find_sites"]

log = logging.getLogger("flashfuse")

# a fill at or below this is "masked out" (exp underflows to exactly 0 against any real score)
FILL_THRESHOLD = -1e4


@dataclasses.dataclass
class MaskTerm:
    """One data mask in the chain: a bool keep-mask (``node``, possibly to be negated) or an additive bias."""

    kind: str  # "bool" or "additive"
    node: fx.Node
    negate: bool = False
    scale: float = 1.0  # an additive bias scaled after it was added: (s + b) * c = s * c + b * c
    in_mm_layout: bool = False  # applied to the scores in q kᵀ's layout, before a leading-dims view


@dataclasses.dataclass
class AttentionSite:
    softmax: fx.Node
    pv: fx.Node
    q: fx.Node
    k: fx.Node
    v: fx.Node
    k_transposed: bool  # False: `k` is the [.., D, Sk] operand and needs a transpose
    gqa_groups: int
    scale: float | None  # None: 1/sqrt(head_dim), for a symbolic head dim
    softcap: float
    band: Band
    mask_fill: float
    masks: list[MaskTerm]
    score_rank: int
    reshape_to_softmax: bool  # q kᵀ is [B*H, ...] and the softmax [B, H, ...] (or the reverse): views between
    reshape_v: bool  # p @ v runs in another batch layout than the softmax (views between them)
    chain: list[fx.Node]  # nodes that die with the rewrite (scores, probs, expansions)
    source: str
    dropout: float | None
    flags: dict[str, Any]
    sinks: fx.Node | None = None  # [1, Hq, 1, 1] per-head sink logits (GPT-OSS), reshaped to [Hq] for the op
    #: every fill was added to the scores (s + fill): a fully masked row's gradient reaches q and k (ops.py)
    additive_fill: bool = False
    #: window_left / window_right: None, an int, or (a, b, c) meaning a*Sk + b*Sq + c (symbolic sizes)
    windows: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class NearMiss:
    softmax: fx.Node
    reason: str
    source: str
    hint: str | None = None
    flags: dict[str, Any] = dataclasses.field(default_factory=dict)


class _Refuse(Exception):
    def __init__(self, reason: str, hint: str | None = None):
        super().__init__(reason)
        self.reason, self.hint = reason, hint


def _is(node: Any, target) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target


def _is_method(node: Any, name: str) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target == name


def _describe(node: fx.Node) -> str:
    if node.op == "output":
        return "the graph's output (returned to the caller)"
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{target} ({node.name})"


class _SiteFinder:
    def __init__(self, gm: fx.GraphModule, config: Config, constants: dict[fx.Node, torch.Tensor]):
        self.gm = gm
        self._sources = None
        self.config = config
        self.masks = MaskAnalyzer(gm, constants)

    def _symbolic_window(self, expr, sv, vv):
        """A symbolic band bound: ``(a, b, c)`` = ``a*Sk + b*Sq + c`` when it is that simple, else the sympy
        expression itself (sizes with +, *, max, min: a sliding-window KV cache's offset), rebuilt in the graph
        from the inputs that carry its sizes."""
        linear = _size_linear(expr, sv, vv)
        if linear is not None:
            return linear
        if self._sources is None:
            self._sources = symbol_sources(self.gm.graph)
        why = emittable(expr, self._sources)
        if why:
            raise _Refuse(f"a band bound {expr} that cannot be computed in the graph: {why}")
        return expr

    def analyse(self, sm: fx.Node) -> AttentionSite | NearMiss:
        source = source_line(sm)
        try:
            return self._analyse(sm, source)
        except _Refuse as refusal:
            return NearMiss(sm, refusal.reason, source, refusal.hint)
        except Exception as exc:  # a bug in the matcher leaves this site alone, not the whole graph
            log.debug("flashfuse: matcher error at %s", source, exc_info=True)
            return NearMiss(sm, f"flashfuse internal error while matching ({type(exc).__name__}: {exc})", source)

    # -- the walk -------------------------------------------------------------------------------
    def _analyse(self, sm: fx.Node, source: str) -> AttentionSite:
        x, dim = sm.args[0], sm.args[1]
        r = rank(x)
        if r is None or r < 2:
            raise _Refuse("the softmax input is not a tensor of rank >= 2")
        if dim != r - 1:
            raise _Refuse(f"the softmax is over dim {dim}, not the last (key) dim {r - 1}",
                          hint="flashfuse fuses attention whose softmax runs over the keys (dim=-1)")
        chain: list[fx.Node] = [sm]

        # down: softmax -> [cast] -> [dropout] -> [cast] -> matmul(p, v)
        cur, dropout_p = sm, None
        sink_slice = None
        while True:
            users = list(cur.users)
            if len(users) != 1:
                others = ", ".join(_describe(u) for u in users) or "none"
                raise _Refuse(
                    f"the attention weights have {len(users)} users ({others}): they are returned, stored or "
                    "reused, so the softmax cannot be fused away",
                    hint="do not return the attention weights (for transformers models: output_attentions=False)",
                )
            u = users[0]
            if _is(u, to_dtype):
                chain.append(u)
                cur = u
                continue
            if _is(u, F.dropout):
                p, training = u.args[1], u.args[2]
                if not isinstance(training, bool) or (training and not is_scalar(p)):
                    raise _Refuse("dropout whose probability or training flag is not a constant")
                if training and not 0 <= p < 1:
                    raise _Refuse(f"dropout with p={p} on the attention weights (the op takes 0 <= p < 1)")
                dropout_p = float(p) if training else 0.0  # in-kernel Philox dropout, regenerated in the backward
                chain.append(u)
                cur = u
                continue
            if _is(u, torch.matmul) and u.args[0] is cur:
                pv = u
                break
            if _is_leading_view(u):
                chain.append(u)  # e.g. Bloom: probs [B, H, Sq, Sk] viewed back to [B*H, Sq, Sk] for bmm
                cur = u
                continue
            if _is_drop_last_column(u) and sink_slice is None:
                sink_slice = u  # GPT-OSS: the sink column is dropped after the softmax
                chain.append(u)
                cur = u
                continue
            raise _Refuse(f"the softmax output feeds {_describe(u)}, not a matmul with V",
                         hint="the probabilities must go straight (casts and eval dropout aside) into p @ v")
        chain.append(pv)

        # up: scores chain to matmul(q, kᵀ)
        scale, softcap = 1.0, 0.0
        sym_factors: list = []  # symbolic scale factors (expr, SymFloat/SymInt, is_divisor)
        band = Band(None, None)
        fills: list[float] = []
        replaced = 0  # fills written over the scores (masked_fill / where) rather than added to them
        masks: list[MaskTerm] = []
        seen_softcap = False
        self._in_mm_layout = False
        sinks = None
        sq, sk = tensor_val(x).shape[-2:]
        if sink_slice is not None:
            sk = sk - 1
        # one query row (a decode step) or one key: the band is then a bound on j (or i) alone
        self._unit_lengths = (_static_one(sq), _static_one(sk))
        cur = x
        while True:
            if sink_slice is not None and sinks is None:
                # GPT-OSS: s = cat([scores, sinks], -1); s = s - s.max(-1, keepdim=True)[0]; softmax; [..., :-1]
                cat = _strip_max_subtraction(cur, chain)
                if not _is(cat, torch.cat) or len(cat.users) != (1 if cat is cur else 2):
                    raise _Refuse("the softmax output drops its last column, but the scores are not "
                                  "cat([scores, sinks], dim=-1)")
                parts, cat_dim = cat.args[0], get_arg(cat, 1, "dim", 0)
                if len(parts) != 2 or cat_dim not in (-1, r - 1) or shape(parts[1])[-1] != 1:
                    raise _Refuse("the sink column is not one extra logit concatenated after the keys")
                sinks = _per_head_source(parts[1], r)
                if sinks is None:
                    raise _Refuse("the sink logits vary over more than the heads (one learned logit per head)")
                chain.append(cat)
                cur = parts[0]
                continue
            if len(cur.users) != 1:
                raise _Refuse(f"the attention scores ({cur.name}) have another user besides the softmax",
                              hint="the raw scores are also used elsewhere (logged, returned, reused); drop that use")
            if _is(cur, to_dtype):
                chain.append(cur)
                cur = cur.args[0]
                continue
            if _is_leading_view(cur):
                # e.g. Bloom / GPT-2 upcast: scores made as [B*H, Sq, Sk] by bmm, viewed to [B, H, Sq, Sk]
                if not _same_shape(shape(cur), shape(cur.args[0])):
                    self._in_mm_layout = True
                chain.append(cur)
                cur = cur.args[0]
                continue
            if (_is(cur, torch.masked_fill) or _is(cur, torch.where) or _is(cur, torch.add)) and any(
                    isinstance(a, fx.Node) and self._is_chain(a) and shape(a) is not None
                    and not _same_shape(shape(a), shape(cur)) for a in cur.args):
                raise _Refuse(f"a mask broadcasts the scores {shape(cur)} larger than q kᵀ")
            if _is(cur, torch.matmul):
                qk = cur
                chain.append(qk)
                break
            if _is(cur, torch.mul) and is_scalar(cur.args[1]):
                inner = cur.args[0]
                if _is(inner, torch.tanh) and _is(inner.args[0], torch.mul) and is_scalar(inner.args[0].args[1]):
                    cap, inv = float(cur.args[1]), float(inner.args[0].args[1])
                    if seen_softcap or cap <= 0 or abs(cap * inv - 1.0) > 1e-6:
                        raise _Refuse("a tanh on the scores that is not soft-capping cap * tanh(s / cap)")
                    if scale != 1.0:
                        raise _Refuse("the scores are scaled after soft-capping")
                    softcap, seen_softcap = cap, True
                    chain.extend([cur, inner, inner.args[0]])
                    cur = inner.args[0].args[0]
                    continue
                scale *= float(cur.args[1])
                chain.append(cur)
                cur = cur.args[0]
                continue
            if (_is(cur, torch.mul) or _is(cur, torch.div)) and _symbolic_number(cur.args[1]) is not None:
                sym_factors.append((_symbolic_number(cur.args[1]), val(cur.args[1]), _is(cur, torch.div)))
                chain.append(cur)
                cur = cur.args[0]
                continue
            if (_is(cur, torch.mul) or _is(cur, torch.div)) and isinstance(cur.args[1], fx.Node):
                raise _Refuse("the scale is not a constant (it is computed at run time)",
                              hint="compute the scale from static sizes, e.g. head_dim ** -0.5 with a Python int")
            if _is(cur, torch.masked_fill):
                scores, m, fill = cur.args
                fill = self._fill_value(fill)
                self._check_mask_order(scale, seen_softcap, additive=False)
                self._mask(m, keep_is_true=False, fill=fill * scale, masks=masks, fills=fills)
                replaced += 1
                band = band.intersect(self._pending_band) if self._pending_band else band
                chain.append(cur)
                cur = scores
                continue
            if _is(cur, torch.where):
                cond, a, b = cur.args
                if self._is_chain(a) and not self._is_chain(b):
                    scores, fill, keep_true = a, b, True
                elif self._is_chain(b) and not self._is_chain(a):
                    scores, fill, keep_true = b, a, False
                else:
                    raise _Refuse("a torch.where on the scores whose branches are not scores and a fill value")
                fill = self._fill_value(fill)
                self._check_mask_order(scale, seen_softcap, additive=False)
                self._mask(cond, keep_is_true=keep_true, fill=fill * scale, masks=masks, fills=fills)
                replaced += 1
                band = band.intersect(self._pending_band) if self._pending_band else band
                chain.append(cur)
                cur = scores
                continue
            if _is(cur, torch.add):
                a, b = cur.args
                if isinstance(b, fx.Node) and self._is_chain(a) and not self._is_chain(b):
                    scores, bias = a, b
                elif isinstance(a, fx.Node) and self._is_chain(b) and not self._is_chain(a):
                    scores, bias = b, a
                else:
                    raise _Refuse("an addition to the scores whose other operand is not a mask or bias")
                self._check_mask_order(scale, seen_softcap, additive=True)
                self._bias(bias, shape(cur), masks, fills, scale)
                band = band.intersect(self._pending_band) if self._pending_band else band
                chain.append(cur)
                cur = scores
                continue
            raise _Refuse(f"the scores pass through {_describe(cur)} before the softmax, which flashfuse cannot fuse",
                          hint="between q kᵀ and softmax flashfuse fuses scaling, soft-capping, masks and biases")

        # q kᵀ
        a_op, b_op = qk.args[0], qk.args[1]
        q, q_scale, q_nodes = self._strip_scale(a_op, sym_factors)
        kt, k_scale, k_nodes = self._strip_scale(b_op, sym_factors)
        scale *= q_scale * k_scale
        if _is(kt, torch.transpose) and kt.args[1:] == (rank(kt) - 2, rank(kt) - 1):
            k_nodes.append(kt)
            k, k_scale2, more = self._strip_scale(kt.args[0], sym_factors)
            scale *= k_scale2
            k_nodes.extend(more)
            k_transposed = True
        else:
            k, k_transposed = kt, False
        chain.extend(q_nodes + k_nodes)

        v = pv.args[1]
        k_src, k_groups, k_exp = self._un_expand(k) if k_transposed else (k, 1, [])
        v_src, v_groups, v_exp = self._un_expand(v)
        if k_groups == v_groups and k_groups > 1:
            k, v, groups = k_src, v_src, k_groups
            chain.extend(k_exp + v_exp)
        else:
            groups = 1

        # verify shapes, dtypes, devices
        qv, kv_, vv, sv, ov = (tensor_val(n) for n in (q, k, v, qk, pv))
        if any(t is None for t in (qv, kv_, vv, sv, ov)):
            raise _Refuse("missing shape information on q, k or v")
        rq, r_mm = qv.dim(), sv.dim()
        if rq != r_mm or vv.dim() != ov.dim() or kv_.dim() != r_mm:
            raise _Refuse(f"q, k, v and the scores have different ranks ({rq}, {kv_.dim()}, {vv.dim()}, {r_mm})")
        if r > 4 or r_mm > 4:
            raise _Refuse(f"attention over rank-{max(r, r_mm)} tensors (flashfuse handles [B, H, S, D], "
                          "[B*H, S, D], [S, D])")
        sm_batch = tensor_val(x).shape[:-2]
        reshape_to_softmax = not _same_shape(sv.shape[:-2], sm_batch)
        reshape_v = not _same_shape(ov.shape[:-2], sm_batch)
        for name, lead in (("q kᵀ", sv.shape[:-2]), ("p @ v", ov.shape[:-2])):
            if not statically_known_true(math.prod(lead) == math.prod(sm_batch)):
                raise _Refuse(f"the views between {name} and the softmax change more than the batch/head dims")
        if qv.dtype not in ops.SUPPORTED_DTYPES:
            raise _Refuse(f"dtype {qv.dtype} unsupported (float16, bfloat16, float32)",
                          hint="run attention in float16, bfloat16 or float32")
        if not (qv.dtype == kv_.dtype == vv.dtype == ov.dtype):
            raise _Refuse(f"q, k, v and the output have different dtypes ({qv.dtype}, {kv_.dtype}, {vv.dtype}, "
                          f"{ov.dtype})")
        if qv.device.type not in ops.SUPPORTED_DEVICES:
            raise _Refuse(f"device {qv.device.type} unsupported (cuda, cpu)", hint="flashfuse runs on CUDA GPUs (and the CPU)")
        head_dim = qv.shape[-1]
        if isinstance(head_dim, torch.SymInt):
            hint = head_dim.node.hint
            if hint is None or not (ops.MIN_HEAD_DIM <= hint <= ops.MAX_HEAD_DIM):
                raise _Refuse(f"head dim {head_dim} unsupported ({ops.MIN_HEAD_DIM}..{ops.MAX_HEAD_DIM})")
        elif not (ops.MIN_HEAD_DIM <= head_dim <= ops.MAX_HEAD_DIM):
            raise _Refuse(f"head dim {head_dim} unsupported ({ops.MIN_HEAD_DIM}..{ops.MAX_HEAD_DIM})",
                          hint="the kernel supports head dims 16 to 256")
        if vv.shape[-1] != head_dim:
            raise _Refuse(f"the value head dim {vv.shape[-1]} differs from the query/key head dim {head_dim}")
        sk = sv.shape[-1]
        if isinstance(sk, int) and sk < self.config.min_seq_len:
            raise _Refuse(f"key length {sk} is below min_seq_len={self.config.min_seq_len}")
        scores_seen = tuple(tensor_val(x).shape)
        if sinks is not None:
            scores_seen = scores_seen[:-1] + (scores_seen[-1] - 1,)  # without the sink column
        if not reshape_to_softmax and not _same_shape(scores_seen, sv.shape):
            raise _Refuse(f"a mask broadcasts the scores {tuple(sv.shape)} to a larger shape {tuple(tensor_val(x).shape)}")
        for name, t in (("q", qv), ("k", kv_), ("v", vv)):
            batch_dims = ov.shape[:-2] if name == "v" else sv.shape[:-2]
            for i, (have, want) in enumerate(zip(t.shape[:-2], batch_dims)):
                if statically_known_true(have == want) or have == 1:
                    continue
                if name != "q" and r == 4 and i == 1 and groups > 1 and statically_known_true(have * groups == want):
                    continue  # GQA: k/v carry Hq / groups heads
                raise _Refuse(f"{name} has size {have} in dim {i}, the scores {want}: not a broadcast flashfuse maps")
        if r == 4 and qv.shape[1] == 1 and sv.shape[1] != 1:
            raise _Refuse("q is broadcast over heads")
        k_last = kv_.shape[-2] if k_transposed else kv_.shape[-1]
        if not statically_known_true(k_last == sk) or not statically_known_true(vv.shape[-2] == sk):
            raise _Refuse("the key and value lengths differ from the scores' key dim")
        if not math.isfinite(scale):
            raise _Refuse(f"the scale {scale} is not finite")
        if sym_factors:
            scale = _default_scale_or_refuse(sym_factors, scale, head_dim)
        mask_fill = -math.inf
        if fills:
            if any(f != fills[0] for f in fills):
                raise _Refuse(f"masks with different fill values {sorted(set(fills))}",
                              hint="use one fill value (-inf or finfo.min) for every mask")
            mask_fill = fills[0]
        if mask_fill > FILL_THRESHOLD:
            raise _Refuse(f"mask fill value {mask_fill} is not large and negative: masked positions would still "
                          "contribute to the softmax", hint="fill with float('-inf') or torch.finfo(dtype).min")

        windows = {}
        for name, value in (("window_left", None if band.lo is None else -band.lo), ("window_right", band.hi)):
            windows[name] = value if value is None or isinstance(value, int) else self._symbolic_window(value, sv, vv)
        flags = {
            "causal": band.hi == 0 and band.lo is None,
            "window_left": _describe_window(windows["window_left"]),
            "window_right": _describe_window(windows["window_right"]),
            "gqa_groups": groups,
            "mask": _mask_label(masks),
            "dense_mask": _dense(masks),
            "mask_fill": mask_fill,
            "additive_fill": bool(fills) and not replaced,
            "scale": "1/sqrt(head_dim)" if scale is None else scale,
            "softcap": softcap,
            "dropout": dropout_p,
            "sinks": sinks is not None,
            "bias_grad": any(getattr(tensor_val(m.node), "requires_grad", False) for m in masks),
            "dtype": str(qv.dtype).replace("torch.", ""),
            "rank": r,
        }
        if band.rules:
            flags["structure"] = "+".join(sorted(set(band.rules)))
        return AttentionSite(
            softmax=sm, pv=pv, q=q, k=k, v=v, k_transposed=k_transposed, gqa_groups=groups, scale=scale,
            softcap=softcap, band=band, mask_fill=mask_fill, masks=masks, score_rank=r, chain=chain,
            reshape_to_softmax=reshape_to_softmax, reshape_v=reshape_v, sinks=sinks, windows=windows,
            source=source, dropout=dropout_p, flags=flags, additive_fill=bool(fills) and not replaced,
        )

    # -- helpers --------------------------------------------------------------------------------
    _pending_band: Band | None = None

    def _fill_value(self, fill) -> float:
        if is_scalar(fill):
            return float(fill)
        sym = self.masks.evaluate(fill)
        if sym is not None and not sym.dims and getattr(sym.expr, "is_number", False):
            return float(sym.expr)
        raise _Refuse("a mask fill value that is not a constant")

    @staticmethod
    def _check_mask_order(scale_below: float, seen_softcap: bool, *, additive: bool) -> None:
        """Walking up, ``scale_below`` is the product of scales applied (in forward order) after this mask."""
        if seen_softcap:
            raise _Refuse("a mask applied before soft-capping (the cap would act on the fill value)")
        if scale_below <= 0:
            raise _Refuse("the scores are scaled by a negative number after a mask or bias was applied")

    def _mask(self, m, *, keep_is_true: bool, fill: float, masks, fills) -> None:
        """A boolean mask ``m`` (keep where ``m == keep_is_true``) filled with ``fill``."""
        self._pending_band = None
        mv = tensor_val(m)
        if mv is None or mv.dtype != torch.bool:
            raise _Refuse("a mask that is not a boolean tensor")
        sym = self.masks.evaluate(m)
        if sym is not None and sym.is_bool():
            import sympy

            keep = sym if keep_is_true else type(sym)(sympy.Not(sym.expr), sym.dims, sym.sizes, sym.rules)
            band = band_of_keep(keep, self._scores_rank, *self._unit_lengths)
            if band is not None:
                self._pending_band = band
                self._atoms_to_masks(band, masks)
                fills.append(fill)
                return
        masks.append(MaskTerm("bool", m, negate=not keep_is_true, in_mm_layout=self._in_mm_layout))
        fills.append(fill)

    def _atoms_to_masks(self, band: Band, masks: list) -> None:
        """Data atoms AND-ed with a band (HF's ``causal & padding[b, j]``) become boolean mask tensors."""
        for atom, negated in band.atoms:
            masks.append(MaskTerm("bool", self.masks.atom_nodes[atom], negate=negated,
                                  in_mm_layout=self._in_mm_layout))

    def _bias(self, bias: fx.Node, scores_shape, masks, fills, scale_below: float = 1.0) -> None:
        self._pending_band = None
        bv = tensor_val(bias)
        if bv is None or not bv.dtype.is_floating_point:
            raise _Refuse("an addition to the scores of a non-float tensor")
        if len(bv.shape) > len(scores_shape) or not all(
                b == 1 or statically_known_true(b == s) for b, s in zip(reversed(bv.shape), reversed(scores_shape))):
            raise _Refuse(f"a bias of shape {tuple(bv.shape)} that broadcasts the scores {tuple(scores_shape)} larger")
        if self._split_filled_bias(bias, scores_shape, masks, fills, scale_below):
            return
        sym = self.masks.evaluate(bias)
        if sym is not None:
            found = band_of_bias(sym, self._scores_rank, FILL_THRESHOLD, *self._unit_lengths)
            if found is not None:
                band, fill = found
                self._pending_band = band
                self._atoms_to_masks(band, masks)
                if fill is not None:
                    fills.append(fill * scale_below)
                return
        masks.append(MaskTerm("additive", bias, scale=scale_below, in_mm_layout=self._in_mm_layout))

    def _split_filled_bias(self, bias: fx.Node, scores_shape, masks, fills, scale_below: float) -> bool:
        """``masked_fill(x, cond, fill)`` or ``where(cond, x, fill)`` added to the scores, ``x`` a float tensor
        the prover cannot see into (Falcon folds its causal mask into the ALiBi bias this way): if ``cond`` is
        a band (with padding atoms), the band becomes flags and ``x`` alone stays an additive mask. Exact: the
        kernel never adds a mask at a position outside the band, where the original had ``scores + fill``."""
        if _is(bias, torch.masked_fill):
            x, cond, fill = bias.args[0], get_arg(bias, 1, "mask"), get_arg(bias, 2, "value")
            keep_true = False
        elif _is(bias, torch.where) and len(bias.args) == 3:
            cond, a, b = bias.args
            a_tensor = tensor_val(a) is not None and tensor_val(a).dim() > 0
            b_tensor = tensor_val(b) is not None and tensor_val(b).dim() > 0
            if a_tensor == b_tensor:
                return False
            x, fill, keep_true = (a, b, True) if a_tensor else (b, a, False)
        else:
            return False
        xv, cv = tensor_val(x), tensor_val(cond)
        if xv is None or not xv.dtype.is_floating_point or cv is None or cv.dtype != torch.bool:
            return False
        if len(xv.shape) > len(scores_shape) or not all(
                b == 1 or statically_known_true(b == s) for b, s in zip(reversed(xv.shape), reversed(scores_shape))):
            return False
        try:
            fill = self._fill_value(fill)
        except _Refuse:
            return False
        n_masks, n_fills = len(masks), len(fills)
        self._mask(cond, keep_is_true=keep_true, fill=fill * scale_below, masks=masks, fills=fills)
        if self._pending_band is None:  # not a band: the whole bias stays one dense additive mask
            del masks[n_masks:], fills[n_fills:]
            return False
        masks.append(MaskTerm("additive", x, scale=scale_below, in_mm_layout=self._in_mm_layout))
        return True

    def _is_chain(self, node) -> bool:
        """Does ``node`` lead up to the q kᵀ matmul through score ops (not a mask of its own)?"""
        for _ in range(16):
            if not isinstance(node, fx.Node):
                return False
            if _is(node, torch.matmul):
                return True
            if (_is(node, to_dtype) or _is(node, torch.mul) or _is(node, torch.div) or _is(node, torch.tanh)
                    or _is(node, torch.masked_fill) or _is_leading_view(node)):
                node = node.args[0]
                continue
            if _is(node, torch.add):
                return self._is_chain(node.args[0]) or self._is_chain(node.args[1])
            if _is(node, torch.where):
                return self._is_chain(node.args[1]) or self._is_chain(node.args[2])
            return False
        return False

    def _strip_scale(self, node, sym_factors: list):
        """Peel ``x * c`` (numbers, or symbolic numbers into ``sym_factors``) and ``.contiguous()`` off an operand."""
        scale, nodes = 1.0, []
        while True:
            if _is(node, torch.mul) and is_scalar(node.args[1]) and len(node.users) == 1:
                scale *= float(node.args[1])
                nodes.append(node)
                node = node.args[0]
            elif ((_is(node, torch.mul) or _is(node, torch.div)) and len(node.users) == 1
                  and _symbolic_number(node.args[1]) is not None):
                sym_factors.append((_symbolic_number(node.args[1]), val(node.args[1]), _is(node, torch.div)))
                nodes.append(node)
                node = node.args[0]
            elif _is_method(node, "contiguous") and len(node.users) == 1:
                nodes.append(node)
                node = node.args[0]
            else:
                return node, scale, nodes

    def _un_expand(self, node):
        """``(source, groups, nodes)`` for a GQA expansion of ``source`` over dim -3 (heads), else ``(node, 1, [])``."""
        r = rank(node)
        if r != 4 or len(node.users) != 1:
            return node, 1, []
        # repeat_kv: x[:, :, None, :, :].expand(B, Hkv, n, S, D).reshape(B, Hkv * n, S, D)
        if _is_method(node, "reshape") or _is_method(node, "view") or _is(node, torch.reshape):
            ex = node.args[0]
            if (_is_method(ex, "expand") and len(ex.users) == 1 and rank(ex) == 5):
                un = ex.args[0]
                src = un.args[0] if isinstance(un, fx.Node) and len(un.users) == 1 else None
                sv, ev = tensor_val(src), tensor_val(ex)
                if src is not None and sv is not None and sv.dim() == 4 and _is_unsqueeze_2(un):
                    groups = ev.shape[2]
                    B, H, S, Dh = tensor_val(node).shape
                    if (isinstance(groups, int) and statically_known_true(sv.shape[1] * groups == H)
                            and statically_known_true(sv.shape[2] == S)):
                        return src, groups, [node, ex, un]
        # repeat_interleave(x, n, dim=1)
        if _is_method(node, "repeat_interleave") or _is(node, torch.repeat_interleave):
            src = node.args[0]
            reps = get_arg(node, 1, "repeats", None)
            dim = get_arg(node, 2, "dim", None)
            if isinstance(reps, int) and dim in (1, -3) and rank(src) == 4:
                return src, reps, [node]
        return node, 1, []

    @property
    def _scores_rank(self) -> int:
        return self._current_rank

    def find(self, graph: fx.Graph) -> list[AttentionSite | NearMiss]:
        results = []
        for node in list(graph.nodes):
            if _is(node, torch.softmax):
                if not _looks_like_attention(node):
                    log.debug("flashfuse: %s: softmax with no matmul nearby (a router, a classifier head): "
                              "not an attention candidate", source_line(node))
                    continue
                self._current_rank = rank(node.args[0]) or 0
                results.append(self.analyse(node))
        return results


def _size_linear(expr, sv, vv):
    """``expr`` (sympy, of sizes) as ``a*Sk + b*Sq + c`` with small integer a, b; else None."""
    import sympy

    sq, sk = sv.shape[-2], vv.shape[-2]
    sq_e = sq.node.expr if isinstance(sq, torch.SymInt) else sympy.Integer(sq)
    sk_e = sk.node.expr if isinstance(sk, torch.SymInt) else sympy.Integer(sk)
    for a, b in ((1, -1), (1, 0), (0, 1), (-1, 1), (0, -1), (-1, 0), (0, 0)):
        rest = sympy.simplify(expr - (a * sk_e + b * sq_e))
        if rest.is_number and rest.is_integer:
            return (a, b, int(rest))
    return None


def _describe_window(w):
    if w is None or isinstance(w, int):
        return w
    if not isinstance(w, tuple):
        return str(w)  # a sympy expression of graph sizes (e.g. ``Min(7, s32)``)
    a, b, c = w
    terms = [f"{'' if a == 1 else '-' if a == -1 else a}Sk" if a else "",
             f"{'+' if b > 0 else '-'}{'' if abs(b) == 1 else abs(b)}Sq" if b else "",
             f"{c:+d}" if c else ""]
    return "".join(terms).lstrip("+") or "0"


def _static_one(n) -> bool:
    return not isinstance(n, torch.SymInt) and n == 1


def _looks_like_attention(sm: fx.Node) -> bool:
    """A softmax near a matmul, above (q kᵀ) or below (p v); a router's or a classifier's softmax is not."""
    node = sm.args[0]
    for _ in range(10):
        if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
            break
        if _is(node, torch.matmul):
            return True
        tensors = [a for a in node.args if isinstance(a, fx.Node) and isinstance(val(a), torch.Tensor)]
        if not tensors:
            break
        if _is(node, torch.cat):
            tensors = [a for a in node.args[0] if isinstance(a, fx.Node)]
        node = tensors[0]
    node = sm
    for _ in range(6):
        users = list(node.users)
        if len(users) != 1:
            return any(_is(u, torch.matmul) for u in users)
        node = users[0]
        if _is(node, torch.matmul):
            return True
    return False


def _is_drop_last_column(node) -> bool:
    """``p[..., :-1]``"""
    if not _is(node, operator.getitem):
        return False
    idx = node.args[1]
    if not isinstance(idx, tuple) or len(idx) != 2 or idx[0] is not Ellipsis:
        return False
    last = idx[1]
    return isinstance(last, slice) and last.start in (None, 0) and last.stop == -1 and last.step in (None, 1)


def _strip_max_subtraction(node, chain: list):
    """``x - x.max(-1, keepdim=True)[0]`` -> ``x`` (softmax is invariant to it), else ``node``."""
    if not _is(node, torch.sub) or len(node.users) != 1:
        return node
    x, mx = node.args
    if not (_is(mx, operator.getitem) and mx.args[1] == 0):
        return node
    red = mx.args[0]
    if not (_is_method(red, "max") or _is(red, torch.max)) or red.args[0] is not x:
        return node
    dim = get_arg(red, 1, "dim", None)
    if dim not in (-1, rank(x) - 1) or not red.kwargs.get("keepdim", len(red.args) > 2 and red.args[2]):
        return node
    chain.extend([node, mx, red])
    return x


def _per_head_source(node, r: int):
    """The tensor a [B, H, Sq, 1] sink column is expanded from, if it varies over the heads only."""
    while _is_method(node, "expand") or _is(node, torch.Tensor.expand) or _is_method(node, "contiguous"):
        node = node.args[0]
    s = shape(node)
    if s is None or len(s) != r or r != 4:
        return None
    if not all(not isinstance(d, torch.SymInt) and d == 1 for i, d in enumerate(s) if i != 1):
        return None
    return node


def _dense(masks: list) -> bool:
    """Does a mask tensor vary along the query dim (an Sq x Sk read per head)? Per-key masks (padding, ALiBi's
    [B, H, 1, Sk]) do not."""
    for m in masks:
        v = tensor_val(m.node)
        if v is not None and v.dim() >= 2 and not _static_one(v.shape[-2]):
            return True
    return False


def _mask_label(masks: list) -> str:
    """"none", "bool", "additive", "2xbool", "bool+additive", ... for the report."""
    if not masks:
        return "none"
    parts = []
    for kind in ("bool", "additive"):
        n = sum(m.kind == kind for m in masks)
        if n:
            parts.append(kind if n == 1 else f"{n}x{kind}")
    return "+".join(parts)


def _is_leading_view(node) -> bool:
    """A view/reshape that keeps the last two dims and only splits or merges the leading (batch, head) dims."""
    if not (_is_method(node, "view") or _is_method(node, "reshape") or _is(node, torch.reshape)):
        return False
    a, b = shape(node.args[0]), shape(node)
    if a is None or b is None or len(a) < 2 or len(b) < 2:
        return False
    return _same_shape(a[-2:], b[-2:]) and statically_known_true(math.prod(a[:-2]) == math.prod(b[:-2]))


def _same_shape(a, b) -> bool:
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


def _symbolic_number(node):
    """The sympy expression of a SymInt/SymFloat node (torch's float wrappers unwrapped), else None."""
    import sympy

    v = val(node) if isinstance(node, fx.Node) else None
    if not isinstance(v, (torch.SymInt, torch.SymFloat)):
        return None
    expr = v.node.expr
    unwrap = {
        "ToFloat": lambda e: e.args[0],
        "OpaqueUnaryFn_sqrt": lambda e: sympy.sqrt(e.args[0]),
        "FloatPow": lambda e: e.args[0] ** e.args[1],
        "FloatTrueDiv": lambda e: e.args[0] / e.args[1],
        "IntTrueDiv": lambda e: e.args[0] / e.args[1],
    }
    for name, fn in unwrap.items():
        expr = expr.replace(lambda e, name=name: type(e).__name__ == name, fn)
    return expr


def _default_scale_or_refuse(factors: list, scale: float, head_dim) -> float | None:
    """The scale from symbolic factors: ``None`` (the op's ``1/sqrt(head_dim)``) when they are proven to multiply
    to that; else each factor is specialised to its value at compile time (``float()`` on a SymFloat installs a
    guard, so Dynamo recompiles if it ever changes: ``dynamic=True`` lifts ``self.scaling`` to a graph input)."""
    import sympy

    product = sympy.Mul(*[1 / e if inv else e for e, _, inv in factors])
    d = head_dim.node.expr if isinstance(head_dim, torch.SymInt) else sympy.Integer(head_dim)
    try:
        if sympy.simplify(product * sympy.sqrt(d) - 1) == 0 and scale == 1.0:
            return None
    except Exception:  # sympy cannot decide: fall through to specialisation
        pass
    try:
        for _, value, inv in factors:
            number = float(value)  # guards on the value (a recompile if it changes)
            scale = scale / number if inv else scale * number
    except Exception:
        raise _Refuse("the scale is not a constant (it is computed at run time from data)",
                      hint="compute the scale from sizes or Python numbers, e.g. head_dim ** -0.5") from None
    return scale


def _is_unsqueeze_2(node) -> bool:
    """``x[:, :, None]`` / ``x[:, :, None, :, :]`` / ``x.unsqueeze(2)`` on a rank-4 ``x``."""
    if not isinstance(node, fx.Node):
        return False
    if _is_method(node, "unsqueeze") or _is(node, torch.unsqueeze):
        return node.args[1] in (2, -3)
    if _is(node, __import__("operator").getitem):
        idx = node.args[1]
        if not isinstance(idx, tuple):
            return False
        full = slice(None, None, None)
        trimmed = list(idx)
        while trimmed and (trimmed[-1] == full or trimmed[-1] is Ellipsis):
            trimmed.pop()
        return trimmed == [full, full, None]
    return False


def find_sites(gm: fx.GraphModule, config: Config, constants: dict[fx.Node, torch.Tensor] | None = None):
    return _SiteFinder(gm, config, constants or {}).find(gm.graph)
