"""Pass 3: replace each accepted site by one ``flashfuse::attention`` call on the un-expanded K/V.

The call is inserted right before the ``p @ v`` matmul (every input is computed before it), its
output replaces that matmul's, and the nodes of the old subgraph that lost their last user are
erased. Ranks 2 and 3 (``[S, D]``, ``[B*H, S, D]``) are lifted to 4-D with ``unsqueeze`` and back.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

from flashfuse.passes.attention import AttentionSite
from flashfuse.passes.graph_utils import emit_sym_expr, insert_call, set_val, symbol_sources, tensor_val
from flashfuse.passes.canonicalize import to_dtype

__all__ = ["rewrite_site"]

# ops that give a view of their first argument (as Dynamo records them)
_VIEWS = {operator.getitem, torch.Tensor.view, torch.Tensor.expand, torch.Tensor.unsqueeze, torch.unsqueeze,
          torch.Tensor.narrow, torch.narrow, torch.Tensor.__getitem__}


def _is_input_view(node: fx.Node) -> bool:
    """``node`` is a graph input or a chain of basic-index views of one (``x[:, :, :S, :S]``, unsqueeze, ...).

    Such a mask may be probed by the op at run time (``ops._probe_mask``): its values live in a tensor the
    caller owns, which the compiled graph never overwrites, so a verdict cached on that tensor stays true while
    its version counter does."""
    while node.op == "call_function" and node.target in _VIEWS:
        if node.target in (operator.getitem, torch.Tensor.__getitem__):
            idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
            if any(isinstance(i, fx.Node) or not (i is None or i is Ellipsis or isinstance(i, (int, slice)))
                   for i in idx):
                return False  # advanced indexing copies (slices with symbolic bounds are still views)
        node = node.args[0]
        if not isinstance(node, fx.Node):
            return False
    return node.op == "placeholder"


def _lift(graph: fx.Graph, node: fx.Node, times: int, like: fx.Node) -> fx.Node:
    for _ in range(times):
        node = insert_call(graph, torch.unsqueeze, (node, 0), like=like)
    return node


def _size(graph: fx.Graph, node: fx.Node, dim: int, like: fx.Node):
    value = tensor_val(node).shape[dim]
    if isinstance(value, int):
        return value
    size = graph.call_method("size", (node, dim))
    set_val(size, value)
    return size


def _window(graph: fx.Graph, w, q: fx.Node, v: fx.Node, like: fx.Node):
    """An int window as is; ``(a, b, c)`` = ``a*Sk + b*Sq + c`` built from size nodes (a SymInt argument); a
    sympy expression rebuilt from the graph inputs that carry its sizes."""
    if w is None or isinstance(w, int):
        return w
    if not isinstance(w, tuple):
        return emit_sym_expr(graph, w, symbol_sources(graph), like=like)
    a, b, c = w
    total = c
    for coeff, node in ((a, v), (b, q)):
        if not coeff:
            continue
        size = _size(graph, node, -2, like)
        if isinstance(size, int):
            total = total + coeff * size if isinstance(total, int) else insert_call(
                graph, operator.add, (total, coeff * size), like=like)
            continue
        term = size if coeff == 1 else insert_call(graph, operator.mul, (size, coeff), like=like)
        total = term if isinstance(total, int) and total == 0 else insert_call(
            graph, operator.add, (total, term), like=like)
    return total


def _shape_args(graph: fx.Graph, node: fx.Node, like: fx.Node) -> tuple:
    return tuple(_size(graph, node, i, like) for i in range(tensor_val(node).dim()))


def _to_softmax_layout(graph: fx.Graph, t: fx.Node, site: AttentionSite, like: fx.Node) -> fx.Node:
    """View ``t`` (in q kᵀ's batch layout) with the softmax's leading dims; broadcast dims stay broadcast."""
    sm_val, t_val = tensor_val(site.softmax), tensor_val(t)
    n_lead = sm_val.dim() - 2
    if t_val.dim() <= 2:
        return t
    lead = t_val.shape[:-2]
    if all(not isinstance(d, torch.SymInt) and d == 1 for d in lead):
        new = (1,) * n_lead
    else:
        new = tuple(_size(graph, site.softmax, i, like) for i in range(n_lead))
    last = tuple(_size(graph, t, i, like) for i in (t_val.dim() - 2, t_val.dim() - 1))
    return insert_call(graph, torch.reshape, (t, new + last), like=like)


def rewrite_site(gm: fx.GraphModule, site: AttentionSite, *, replace: bool = True, fp8_check=None,
                 infer: bool = False) -> fx.Node:
    """Rewrite one site; returns the node that now stands for the old ``p @ v``.

    ``infer=True`` (the graph is compiled without autograd): a site without dropout calls
    ``flashfuse::attention_infer`` (``ops.py``: the same computation, the output alone, less host time).

    ``replace=False`` only adds the fused call beside the original subgraph (verify mode compares them).
    ``fp8_check(q, k, v)``: given (``options={"fp8": True}``), it is asked with the traced values of the op's own
    q, k, v (4-D, K untransposed, batch made explicit) and the site emits ``flashfuse::attention_fp8`` when it
    returns None; its answer is left in ``site.fp8_refused``.
    """
    graph = gm.graph
    pv = site.pv
    with graph.inserting_before(pv):
        q, k, v = site.q, site.k, site.v
        if not site.k_transposed:
            k = insert_call(graph, torch.transpose, (k, -2, -1), like=pv)
        if site.reshape_to_softmax:
            # q kᵀ ran in another batch layout ([B*H, S, D]) than the softmax ([B, H, Sq, Sk]): the op runs in
            # the softmax's layout, so q, k, v (and masks made in q kᵀ's layout) are viewed into it
            q, k = (_to_softmax_layout(graph, t, site, pv) for t in (q, k))
        if site.reshape_v:
            v = _to_softmax_layout(graph, v, site, pv)
        lift = 4 - site.score_rank
        q, k, v = (_lift(graph, t, lift, pv) for t in (q, k, v))

        # batch dims: q/k/v may broadcast over batch (k/v also over heads: MQA); make batch explicit (a view)
        batch = tensor_val(site.softmax).shape[0] if site.score_rank == 4 else 1
        lifted = []
        for t in (q, k, v):
            if tensor_val(t).shape[0] == 1 and batch != 1:
                size = _size(graph, site.softmax, 0, pv) if site.score_rank == 4 else batch
                t = insert_call(graph, torch.Tensor.expand, (t, size, -1, -1, -1), like=pv)
            lifted.append(t)
        q, k, v = lifted

        # one mask tensor for the op: boolean keep-masks AND-ed; with an additive bias as well, each boolean
        # mask joins the bias as where(keep, 0, fill) (what `masked_fill(~keep, fill)` adds, up to rounding)
        has_bias = any(term.kind == "additive" for term in site.masks)
        # one mask, used as it is, that views a graph input: the op may probe its values (ops._probe_mask)
        probe_mask = (len(site.masks) == 1 and not site.masks[0].negate and site.masks[0].scale == 1.0
                      and not (site.masks[0].in_mm_layout and site.reshape_to_softmax)
                      and _is_input_view(site.masks[0].node))
        mask = None
        for term in site.masks:
            m = term.node
            if term.negate:
                m = insert_call(graph, torch.logical_not, (m,), like=pv)
            if term.scale != 1.0:
                m = insert_call(graph, torch.mul, (m, float(term.scale)), like=pv)
            if term.in_mm_layout and site.reshape_to_softmax:
                m = _to_softmax_layout(graph, m, site, pv)
            if has_bias and term.kind == "bool":
                m = insert_call(graph, torch.where, (m, 0.0, float(site.mask_fill)), like=pv)
            if mask is None:
                mask = m
            elif tensor_val(mask).dtype == torch.bool and tensor_val(m).dtype == torch.bool:
                mask = insert_call(graph, torch.logical_and, (mask, m), like=pv)
            else:
                mask = insert_call(graph, torch.add, (mask, m), like=pv)
        if mask is not None:
            mv = tensor_val(mask)
            for _ in range(4 - mv.dim()):
                mask = insert_call(graph, torch.unsqueeze, (mask, 0), like=pv)

        band = site.band
        window_left = _window(graph, site.windows.get("window_left", None if band.lo is None else -band.lo), q, v, pv)
        window_right = _window(graph, site.windows.get("window_right", band.hi), q, v, pv)
        sinks = None
        if site.sinks is not None:
            sinks = insert_call(graph, torch.reshape, (site.sinks, (_size(graph, site.sinks, 1, pv),)), like=pv)
        fp8 = False
        if fp8_check is not None:
            site.fp8_refused = fp8_check(tensor_val(q), tensor_val(k), tensor_val(v))
            fp8 = site.fp8_refused is None
        if fp8:
            call = insert_call(graph, torch.ops.flashfuse.attention_fp8.default,
                               (q, k, v, None if site.scale is None else float(site.scale), window_right == 0),
                               like=pv)
            out = call
        elif infer and not site.dropout and _decode_inline_ok(site, q, k, v, mask, window_left, window_right, sinks):
            call = insert_call(
                graph,
                torch.ops.flashfuse.decode_inline.default,
                (q, k, v, mask, _scale_value(site, q), window_left, window_right, float(site.mask_fill),
                 float(site.softcap), sinks),
                like=pv,
            )
            out = call
            site.op_emitted = "decode_inline"
        elif infer and not site.dropout:
            site.op_emitted = "attention_infer"
            call = insert_call(
                graph,
                torch.ops.flashfuse.attention_infer.default,
                (q, k, v, mask, None if site.scale is None else float(site.scale), window_left, window_right,
                 float(site.mask_fill), float(site.softcap), sinks, bool(site.additive_fill), bool(probe_mask)),
                like=pv,
            )
            out = call
        else:
            call = insert_call(
                graph,
                torch.ops.flashfuse.attention.default,
                (q, k, v, mask, None if site.scale is None else float(site.scale), window_left, window_right,
                 float(site.mask_fill), float(site.softcap), sinks, float(site.dropout or 0.0),
                 bool(site.additive_fill), bool(probe_mask)),
                like=pv,
            )
            out = insert_call(graph, operator.getitem, (call, 0), like=pv)
        for _ in range(lift):
            out = insert_call(graph, torch.squeeze, (out, 0), like=pv)
        if site.reshape_v:
            out = insert_call(graph, torch.reshape, (out, _shape_args(graph, pv, pv)), like=pv)
        if tensor_val(out).dtype != tensor_val(pv).dtype:
            out = insert_call(graph, to_dtype, (out, tensor_val(pv).dtype), like=pv)
    call.meta["flashfuse_site"] = site.flags
    if not replace:
        return out
    pv.replace_all_uses_with(out)
    _erase_dead(graph, site.chain)
    return out


def _scale_value(site: AttentionSite, q: fx.Node) -> float:
    """The site's scale as a float; the op's ``1 / sqrt(D)`` (same expression) where the graph proved that."""
    return float(site.scale) if site.scale is not None else 1.0 / math.sqrt(tensor_val(q).shape[-1])


def _decode_inline_ok(site: AttentionSite, q, k, v, mask, window_left, window_right, sinks) -> bool:
    """The site may call ``flashfuse::decode_inline``; else ``site.inline_refused`` says why (the report shows it)."""
    from flashfuse.ops import _DECODE_MAX_Q, decode_inline_refusal

    vals = [None if n is None else tensor_val(n) for n in (q, k, v, mask, sinks)]
    sq = vals[0].shape[-2]
    if vals[0].device.type != "cuda" or (isinstance(sq, int) and sq > _DECODE_MAX_Q):
        return False  # not a decode site on the GPU: nothing to report
    try:  # a window still an fx.Node (symbolic) is refused there too
        scale = _scale_value(site, q)
        reason = decode_inline_refusal(vals[0], vals[1], vals[2], vals[3], scale, window_left, window_right,
                                       float(site.mask_fill), float(site.softcap), vals[4])
    except Exception as exc:  # noqa: BLE001 -- the decision must not break a compile: the opaque op, say why
        reason = f"not checkable ({type(exc).__name__}: {exc})"
    site.inline_refused = reason
    return reason is None


def _erase_dead(graph: fx.Graph, candidates: list[fx.Node]) -> None:
    """Erase nodes of the old subgraph (and their now-unused pure inputs) that have no users left."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    pending = sorted(set(candidates), key=lambda n: -order[n])
    changed = True
    while changed:
        changed = False
        for node in list(pending):
            if node.graph is not graph or node not in order:
                pending.remove(node)
                continue
            if not node.users and node.op in ("call_function", "call_method"):
                inputs = [a for a in node.all_input_nodes if a.op in ("call_function", "call_method")]
                graph.erase_node(node)
                pending.remove(node)
                del order[node]
                for a in inputs:
                    if a not in pending and a in order and _pure(a):
                        pending.append(a)
                changed = True


_PURE_METHODS = {"view", "reshape", "transpose", "expand", "unsqueeze", "contiguous", "size", "to", "float", "eq",
                 "masked_fill", "softmax", "repeat_interleave", "bool", "type_as", "permute", "__getitem__"}


def _pure(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _PURE_METHODS
    target = node.target
    if target in (operator.getitem, operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
                  operator.and_, operator.or_, operator.invert, operator.neg, operator.add, operator.sub,
                  operator.mul):
        return True
    module = getattr(target, "__module__", "") or ""
    name = getattr(target, "__name__", "")
    return module.startswith("torch") and not name.endswith("_") and name not in ("manual_seed", "seed")
