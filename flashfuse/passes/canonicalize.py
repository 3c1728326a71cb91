"""Pass 1: one spelling for each op the attention matcher looks at.

After this pass the matcher sees only these forms (all ``call_function``)::

    torch.matmul(a, b)                  # @, matmul, bmm, einsum (batched matmul), baddbmm
    torch.transpose(x, d0, d1)          # d0 < d1, both >= 0; .transpose/.mT/.t()/.T/swapaxes/permute(one swap)
    torch.permute(x, dims)              # any other permutation
    torch.mul(x, c) / torch.add / torch.sub / torch.div     # operators, methods, in-place forms
    torch.softmax(x, dim, dtype)        # dim >= 0; F.softmax / Tensor.softmax
    to_dtype(x, dtype)                  # .to(dtype) / .type(dtype) / .type_as(t) / .float() / .half() ...
    torch.masked_fill(x, m, v), torch.where(c, a, b), torch.tanh(x)
    F.dropout(x, p, training, False)

Division by a Python number becomes multiplication by its reciprocal, so ``/ sqrt(d)`` and
``* d ** -0.5`` meet as one form. In-place ops on fresh intermediates (``att *= s``,
``att.masked_fill_(m, v)``) become their functional forms when nothing aliases the tensor.

Invariants kept: every node's fake value (``meta['val']``/``['example_value']``) stays valid, the graph
stays topologically ordered and computes the same values.
"""

from __future__ import annotations

import operator
import string

import torch
import torch.fx as fx
import torch.nn.functional as F

from flashfuse.passes.graph_utils import (
    copy_meta,
    get_arg,
    insert_call,
    is_scalar,
    normalize_dim,
    rank,
    tensor_val,
    val,
)

__all__ = ["canonicalize", "to_dtype", "MATMUL", "TRANSPOSE", "SOFTMAX", "CAST"]


def to_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The canonical cast (``.to(dtype)``)."""
    return x.to(dtype)


MATMUL, TRANSPOSE, SOFTMAX, CAST = torch.matmul, torch.transpose, torch.softmax, to_dtype

_MATMULS_F = {operator.matmul, torch.matmul, torch.bmm, torch.mm}
_MATMULS_M = {"matmul", "bmm", "mm", "__matmul__"}
_TRANSPOSES_F = {torch.transpose, torch.swapaxes, torch.swapdims}
_TRANSPOSES_M = {"transpose", "swapaxes", "swapdims"}
_SOFTMAX_F = {F.softmax, torch.softmax, torch.nn.functional.softmax}
_CAST_METHODS = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16, "double": torch.float64}
_BINARY = {
    # target -> (canonical function, is_inplace)
    operator.mul: (torch.mul, False), operator.imul: (torch.mul, True), torch.mul: (torch.mul, False),
    operator.truediv: (torch.div, False), operator.itruediv: (torch.div, True), torch.div: (torch.div, False),
    operator.add: (torch.add, False), operator.iadd: (torch.add, True), torch.add: (torch.add, False),
    operator.sub: (torch.sub, False), operator.isub: (torch.sub, True), torch.sub: (torch.sub, False),
    "mul": (torch.mul, False), "mul_": (torch.mul, True), "multiply": (torch.mul, False),
    "div": (torch.div, False), "div_": (torch.div, True), "divide": (torch.div, False),
    "add": (torch.add, False), "add_": (torch.add, True),
    "sub": (torch.sub, False), "sub_": (torch.sub, True),
    "__mul__": (torch.mul, False), "__truediv__": (torch.div, False), "__add__": (torch.add, False),
    "__sub__": (torch.sub, False),
}
# ops whose output may alias their input: an in-place op on a tensor with such users is left alone
_VIEW_METHODS = {
    "view", "reshape", "transpose", "permute", "expand", "expand_as", "unsqueeze", "squeeze", "t", "narrow",
    "select", "split", "chunk", "unbind", "as_strided", "contiguous", "detach", "view_as", "flatten",
    "unflatten", "diagonal", "to", "type_as", "float", "half", "bfloat16", "swapaxes", "swapdims", "__getitem__",
    "type", "movedim", "unfold", "reshape_as",
}
_VIEW_FUNCTIONS = {operator.getitem, torch.transpose, torch.permute, torch.reshape, torch.unsqueeze, torch.squeeze,
                   torch.narrow, torch.select, torch.split, torch.chunk, torch.unbind, torch.flatten, torch.t,
                   torch.swapaxes, torch.swapdims, torch.movedim, torch.diagonal, getattr}


def _key(node: fx.Node):
    if node.op == "call_function":
        return node.target
    if node.op == "call_method":
        return node.target
    return None


class _Canonicalizer:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.graph = gm.graph
        self.stats: dict[str, int] = {}

    def count(self, what: str) -> None:
        self.stats[what] = self.stats.get(what, 0) + 1

    def replace(self, old: fx.Node, new: fx.Node, what: str) -> None:
        copy_meta(old, new)
        old.replace_all_uses_with(new)
        self.graph.erase_node(old)
        self.count(what)

    def run(self) -> dict[str, int]:
        for node in list(self.graph.nodes):
            if node.op not in ("call_function", "call_method"):
                continue
            if tensor_val(node) is None and node.target is not getattr:
                continue
            with self.graph.inserting_before(node):
                self.visit(node)
        return self.stats

    # -- dispatch -------------------------------------------------------------------------------
    def visit(self, node: fx.Node) -> None:
        key = _key(node)
        if key in _MATMULS_F or (node.op == "call_method" and key in _MATMULS_M):
            return self.matmul(node)
        if key is torch.einsum or key is getattr(torch.functional, "einsum", None):
            return self.einsum(node)
        if key is torch.baddbmm or key == "baddbmm":
            return self.baddbmm(node)
        if key in _TRANSPOSES_F or (node.op == "call_method" and key in _TRANSPOSES_M):
            return self.transpose(node)
        if key is torch.permute or key == "permute":
            return self.permute(node)
        if key in (torch.t, "t") or (key is getattr and node.args[1] in ("mT", "T")):
            return self.swap_last(node)
        if key in _SOFTMAX_F or key == "softmax":
            return self.softmax(node)
        if node.op == "call_method" and key in ("to", "type", "type_as") or key in _CAST_METHODS:
            return self.cast(node)
        if key in _BINARY and (node.op == "call_function" or isinstance(key, str)):
            return self.binary(node)
        if key in ("masked_fill", "masked_fill_"):
            return self.masked_fill(node)
        if key == "tanh":
            return self.replace(node, self.call(torch.tanh, (node.args[0],), like=node), "tanh")
        if key in (F.dropout, torch.dropout, "dropout"):
            return self.dropout(node)
        if key == "where" and node.op == "call_method":
            cond, other = node.args[1], node.args[2]
            return self.replace(node, self.call(torch.where, (cond, node.args[0], other), like=node), "where")

    def call(self, target, args, kwargs=None, *, like: fx.Node, value=None) -> fx.Node:
        if value is None:
            return insert_call(self.graph, target, args, kwargs, like=like)
        return insert_call(self.graph, target, args, kwargs, like=like, value=value)

    # -- matmuls --------------------------------------------------------------------------------
    def matmul(self, node: fx.Node) -> None:
        if node.op == "call_function" and node.target is torch.matmul and not node.kwargs:
            return
        a, b = node.args[0], node.args[1]
        self.replace(node, self.call(torch.matmul, (a, b), like=node, value=val(node)), "matmul")

    def baddbmm(self, node: fx.Node) -> None:
        inp, a, b = node.args[0], get_arg(node, 1, "batch1"), get_arg(node, 2, "batch2")
        beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
        if not (is_scalar(beta) and is_scalar(alpha)):
            return
        out = self.call(torch.matmul, (a, b), like=node)
        if alpha != 1:
            out = self.call(torch.mul, (out, float(alpha)), like=node)
        if beta != 0:
            term = inp if beta == 1 else self.call(torch.mul, (inp, float(beta)), like=node)
            out = self.call(torch.add, (out, term), like=node)
        if tensor_val(out).dtype != tensor_val(node).dtype or tuple(tensor_val(out).shape) != tuple(
                tensor_val(node).shape):
            return  # broadcasting of `inp` changed the result's shape: leave it
        self.replace(node, out, "baddbmm")

    def einsum(self, node: fx.Node) -> None:
        """A two-operand einsum that is a batched matmul -> permutes + matmul (+ permute of the output)."""
        equation, operands = node.args[0], node.args[1:]
        if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
            operands = tuple(operands[0])
        if not isinstance(equation, str) or len(operands) != 2 or "->" not in equation:
            return
        ranks = [rank(op) for op in operands]
        if None in ranks:
            return
        plan = _einsum_as_matmul(equation.replace(" ", ""), ranks)
        if plan is None:
            return
        perm_a, perm_b, perm_out = plan
        a = self._permuted(operands[0], perm_a, node)
        b = self._permuted(operands[1], perm_b, node)
        out = self.call(torch.matmul, (a, b), like=node)
        out = self._permuted(out, perm_out, node)
        if tuple(tensor_val(out).shape) != tuple(tensor_val(node).shape):
            return
        self.replace(node, out, "einsum")

    def _permuted(self, x: fx.Node, perm: list[int], like: fx.Node) -> fx.Node:
        if perm == sorted(perm):
            return x
        swapped = [i for i, p in enumerate(perm) if p != i]
        if len(swapped) == 2:
            return self.call(torch.transpose, (x, swapped[0], swapped[1]), like=like)
        return self.call(torch.permute, (x, tuple(perm)), like=like)

    # -- layout ---------------------------------------------------------------------------------
    def transpose(self, node: fx.Node) -> None:
        x = node.args[0]
        r = rank(x)
        d0, d1 = get_arg(node, 1, "dim0"), get_arg(node, 2, "dim1")
        if r is None or not (isinstance(d0, int) and isinstance(d1, int)):
            return
        d0, d1 = sorted((normalize_dim(d0, r), normalize_dim(d1, r)))
        if node.op == "call_function" and node.target is torch.transpose and node.args[1:] == (d0, d1):
            return
        self.replace(node, self.call(torch.transpose, (x, d0, d1), like=node, value=val(node)), "transpose")

    def permute(self, node: fx.Node) -> None:
        x = node.args[0]
        dims = node.args[1:] if node.op == "call_method" else (get_arg(node, 1, "dims"),)
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = tuple(dims[0])
        r = rank(x)
        if r is None or not all(isinstance(d, int) for d in dims) or len(dims) != r:
            return
        dims = [normalize_dim(d, r) for d in dims]
        swapped = [i for i, d in enumerate(dims) if d != i]
        if len(swapped) == 2:
            new = self.call(torch.transpose, (x, swapped[0], swapped[1]), like=node, value=val(node))
        elif node.op == "call_function" and list(get_arg(node, 1, "dims")) == dims:
            return
        else:
            new = self.call(torch.permute, (x, tuple(dims)), like=node, value=val(node))
        self.replace(node, new, "permute")

    def swap_last(self, node: fx.Node) -> None:
        x = node.args[0]
        r = rank(x)
        if r is None or r < 2:
            return
        if node.target in (torch.t, "t") or (node.target is getattr and node.args[1] == "T"):
            if r != 2:
                return
        self.replace(node, self.call(torch.transpose, (x, r - 2, r - 1), like=node, value=val(node)), "transpose")

    # -- softmax and casts ----------------------------------------------------------------------
    def softmax(self, node: fx.Node) -> None:
        x = node.args[0]
        dim = get_arg(node, 1, "dim", None)
        dtype = node.kwargs.get("dtype")
        if node.target in (F.softmax, torch.nn.functional.softmax) and len(node.args) > 3:
            dtype = node.args[3]
        elif node.target is torch.softmax and len(node.args) > 2:
            dtype = node.args[2]
        elif node.op == "call_method" and len(node.args) > 2:
            dtype = node.args[2]
        r = rank(x)
        if not isinstance(dim, int) or r is None:
            return
        new = self.call(torch.softmax, (x, normalize_dim(dim, r), dtype), like=node, value=val(node))
        if node.target is torch.softmax and node.args == new.args and not node.kwargs:
            self.graph.erase_node(new)
            return
        self.replace(node, new, "softmax")

    def cast(self, node: fx.Node) -> None:
        x = node.args[0]
        out, inp = tensor_val(node), tensor_val(x)
        if out is None or inp is None or out.device != inp.device:
            return
        # only a pure dtype change is a cast; `.to(device)`, `.type()` (no args), copies are left alone
        if node.target in ("to", "type") and len(node.args) + len(node.kwargs) == 1:
            return
        if node.target == "to" and (node.kwargs.get("copy") or node.kwargs.get("memory_format") is not None):
            return
        self.replace(node, self.call(to_dtype, (x, out.dtype), like=node, value=out), "cast")

    # -- arithmetic -----------------------------------------------------------------------------
    def binary(self, node: fx.Node) -> None:
        fn, inplace = _BINARY[node.target]
        a = node.args[0]
        b = get_arg(node, 1, "other")
        alpha = node.kwargs.get("alpha", 1)
        rounding = node.kwargs.get("rounding_mode")
        if rounding is not None or alpha != 1:
            return
        if inplace and not self.functionalize(node, a):
            return
        if fn is torch.div and is_scalar(b) and b != 0:
            fn, b = torch.mul, 1.0 / b
        if fn is torch.mul and tensor_val(a) is None and tensor_val(b) is not None:
            a, b = b, a  # the tensor first: `c * x` -> `mul(x, c)`
        new = self.call(fn, (a, b), like=node, value=val(node))
        self.replace(node, new, "inplace" if inplace else fn.__name__)

    def masked_fill(self, node: fx.Node) -> None:
        x, m, v = node.args[0], get_arg(node, 1, "mask"), get_arg(node, 2, "value")
        if node.target == "masked_fill_" and not self.functionalize(node, x):
            return
        self.replace(node, self.call(torch.masked_fill, (x, m, v), like=node, value=val(node)), "masked_fill")

    def dropout(self, node: fx.Node) -> None:
        x = node.args[0]
        p = get_arg(node, 1, "p", 0.5)
        training = get_arg(node, 2, "training" if node.target is not torch.dropout else "train", True)
        inplace = get_arg(node, 3, "inplace", False) if node.target is F.dropout else False
        if inplace:
            return
        if node.target is F.dropout and node.args == (x, p, training, False) and not node.kwargs:
            return
        self.replace(node, self.call(F.dropout, (x, p, training, False), like=node, value=val(node)), "dropout")

    def functionalize(self, node: fx.Node, x) -> bool:
        """Can the in-place ``node`` on ``x`` become functional? Then later readers of ``x`` read the new node."""
        if not isinstance(x, fx.Node) or x.op in ("placeholder", "get_attr"):
            return False
        if x.op == "call_method" and x.target in _VIEW_METHODS:
            return False
        if x.op == "call_function" and (x.target in _VIEW_FUNCTIONS or x.target in (torch.transpose, torch.permute)):
            return False
        order = {n: i for i, n in enumerate(self.graph.nodes)}
        later = [u for u in x.users if u is not node and order[u] > order[node]]
        earlier = [u for u in x.users if u is not node and order[u] < order[node]]
        for u in earlier:
            if (u.op == "call_method" and u.target in _VIEW_METHODS) or (
                    u.op == "call_function" and u.target in _VIEW_FUNCTIONS):
                return False
            if u.op == "output":
                return False
        # readers after the mutation see the mutated value, which is `node`'s result
        for u in later:
            u.replace_input_with(x, node)
        return True


def _einsum_as_matmul(equation: str, ranks: list[int]):
    """Permutations (a, b, out) turning a two-operand einsum into ``matmul``, or None."""
    lhs, out = equation.split("->")
    ins = lhs.split(",")
    if len(ins) != 2:
        return None
    if any("..." in s for s in ins + [out]):
        spare = [c for c in string.ascii_letters if c not in equation]
        n_ell = max(r - len(s.replace("...", "")) for s, r in zip(ins, ranks) if "..." in s)
        ell = "".join(spare[:n_ell])
        ins = [s.replace("...", ell[len(ell) - (r - len(s.replace("...", ""))):]) for s, r in zip(ins, ranks)]
        out = out.replace("...", ell)
    a, b = ins
    if any(len(set(s)) != len(s) for s in (a, b, out)) or len(a) != ranks[0] or len(b) != ranks[1]:
        return None
    batch = [c for c in out if c in a and c in b]
    m = [c for c in a if c in out and c not in b]
    n = [c for c in b if c in out and c not in a]
    k = [c for c in a if c in b and c not in out]
    if len(m) != 1 or len(n) != 1 or len(k) != 1 or len(a) != len(batch) + 2 or len(b) != len(batch) + 2:
        return None
    if set(out) != set(batch + m + n):
        return None
    want_a, want_b, mm_out = batch + m + k, batch + k + n, batch + m + n
    perm_a = [a.index(c) for c in want_a]
    perm_b = [b.index(c) for c in want_b]
    perm_out = [mm_out.index(c) for c in out]
    return perm_a, perm_b, perm_out


def canonicalize(gm: fx.GraphModule) -> dict[str, int]:
    stats = _Canonicalizer(gm).run()
    gm.graph.lint()
    return stats
