"""Mask structure: prove from the graph that a mask keeps exactly ``lo <= j - i <= hi``.

Each node of a mask's subgraph is evaluated symbolically: its value at tensor index
``(s0, s1, ...)`` is a sympy expression of per-dimension index symbols. ``arange`` gives its index,
``tril``/``triu`` a ``Piecewise`` on ``s1 - s0``, comparisons give relations, broadcasting unifies
the symbols of the dimensions it lines up. Once the mask is lined up with the scores ``[..., Sq, Sk]``
(query index ``i``, key index ``j``), the keep-predicate is rewritten in ``d = j - i``; if it is a
conjunction of bounds on ``d`` alone, it is a band (causal: ``d <= 0``; sliding window of ``W``:
``-(W-1) <= d <= 0``) and becomes kernel flags. Anything else (it reads data, depends on ``i`` alone,
has holes) is not structure; the caller then passes the mask as a tensor.

Rules (each named by what it matches, the math beside it)::

    arange_index           arange(a, b, s)[t]       = a + s*t
    constant_fill          ones/zeros/full(...)[..] = c, tensor(c)[()] = c (c as the dtype holds it)
    tril_band / triu_band  tril(x, k)[.., r, c]     = x if c - r <= k else 0   (triu: c - r >= k)
    slice_shift            x[a:][t]                 = x[t + a]
    causal_from_tril_buffer   a module buffer whose contents are tril(ones) (checked at compile time)
    compare / logic / where / masked_fill / casts  elementwise on the expressions
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import operator
from typing import Any

import sympy
import torch
import torch.fx as fx

from flashfuse.passes.canonicalize import to_dtype
from flashfuse.passes.graph_utils import get_arg, is_max, is_min, tensor_val as tensor_val_of, val

__all__ = ["Sym", "MaskAnalyzer", "Band", "band_of_keep", "band_of_bias"]

I, J, D = sympy.symbols("i j d", integer=True)
_fresh = itertools.count()


def _new_sym() -> sympy.Symbol:
    return sympy.Symbol(f"_ix{next(_fresh)}", integer=True)  # never a ShapeEnv name (s0, s1, ...)


@dataclasses.dataclass
class Sym:
    """Symbolic value of a tensor: ``expr`` over ``dims`` (one index symbol per dimension)."""

    expr: Any
    dims: tuple
    sizes: tuple
    rules: tuple = ()
    atoms: frozenset = frozenset()  # data atoms (see _Atom) inside expr

    def is_bool(self) -> bool:
        return _is_boolexpr(self.expr)


class _Atom(sympy.Symbol):
    """A boolean tensor the analyzer cannot see into (a padding mask gathered by batch and key index).

    It may still take part in a structured mask (``band & padding[b, j]``): the band becomes kernel flags
    and the atom's own tensor is passed as a (broadcast) boolean mask. Atoms only travel through ops that
    keep dims aligned from the right (elementwise ops, casts, expand), so the atom's tensor broadcasts
    against the scores exactly as the mask it is part of does.
    """


def _is_boolexpr(e: Any) -> bool:
    """A boolean sympy expression (sympy's Symbol is also a Boolean; ours are integer indices)."""
    if isinstance(e, _Atom):
        return True
    return isinstance(e, sympy.logic.boolalg.Boolean) and not isinstance(e, sympy.Symbol)


def _size_expr(s: Any) -> Any:
    if isinstance(s, torch.SymInt):
        return s.node.expr
    return sympy.Integer(int(s))


def _is_one(size: Any) -> bool:
    return not isinstance(size, torch.SymInt) and int(size) == 1


def _make(expr, sizes, dims=None, rules=(), atoms=frozenset()) -> Sym:
    sizes = tuple(sizes)
    if dims is None:
        dims = tuple(_new_sym() for _ in sizes)
    subs = {d: 0 for d, s in zip(dims, sizes) if _is_one(s)}
    if subs and hasattr(expr, "subs"):
        expr = expr.subs(subs)
    return Sym(expr, tuple(dims), sizes, tuple(rules), frozenset(atoms))


def _scalar(x: Any) -> Any:
    if isinstance(x, bool):
        return sympy.true if x else sympy.false
    if isinstance(x, int):
        return sympy.Integer(x)
    if isinstance(x, float):
        if math.isinf(x):
            return sympy.oo if x > 0 else -sympy.oo
        return sympy.Float(x)
    if isinstance(x, torch.SymInt):
        return x.node.expr
    return None


def _typed(x: Any, dtype: torch.dtype) -> Any:
    """A Python number as a tensor of ``dtype`` holds it (``torch.tensor(1e-9, dtype=float16)`` is 0,
    ``torch.tensor(0.5, dtype=int64)`` is 0); an integral value as an int (sympy's ``Float(0.0) == 0`` is False).
    None for anything else but a SymInt (kept as is), for NaN (no order to prove with), and for a value the dtype
    cannot hold (the op raises)."""
    if isinstance(x, torch.SymInt):
        return x
    if not isinstance(x, (bool, int, float)):
        return None
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    try:
        with unset_fake_temporarily():  # a real one-element tensor, whatever mode the pass runs under
            y = torch.tensor(x, dtype=dtype).item()
    except (RuntimeError, OverflowError):
        return None
    if isinstance(y, float) and math.isnan(y):
        return None
    if isinstance(y, float) and y.is_integer() and abs(y) < 2 ** 53:
        return int(y)
    return y


def _to_bool(e):
    if _is_boolexpr(e):
        return e
    return _compare(operator.ne, e, sympy.Integer(0))


def _to_num(e):
    if _is_boolexpr(e):
        return sympy.Piecewise((sympy.Integer(1), e), (sympy.Integer(0), True))
    return e


_REL = {operator.lt: sympy.Lt, operator.le: sympy.Le, operator.gt: sympy.Gt, operator.ge: sympy.Ge,
        operator.eq: sympy.Eq, operator.ne: sympy.Ne}


def _compare(op, a, b):
    """``op(a, b)`` elementwise; a ``Piecewise`` side is distributed over its branches."""
    if isinstance(a, sympy.Piecewise):
        return sympy.Or(*[sympy.And(_compare(op, value, b), cond) for value, cond in _exclusive(a)])
    if isinstance(b, sympy.Piecewise):
        return sympy.Or(*[sympy.And(_compare(op, a, value), cond) for value, cond in _exclusive(b)])
    if _is_boolexpr(a) or _is_boolexpr(b):
        a, b = _to_num(a), _to_num(b)
        return _compare(op, a, b)
    return _REL[op](a, b)


def _exclusive(pw: sympy.Piecewise):
    """Branches of a Piecewise with mutually exclusive conditions."""
    seen = sympy.false
    for value, cond in pw.args:
        yield value, sympy.And(cond, sympy.Not(seen))
        seen = sympy.Or(seen, cond)


class NotStructure(Exception):
    pass


_COMPARE_TARGETS = {
    operator.lt: operator.lt, operator.le: operator.le, operator.gt: operator.gt, operator.ge: operator.ge,
    operator.eq: operator.eq, operator.ne: operator.ne,
    torch.lt: operator.lt, torch.le: operator.le, torch.gt: operator.gt, torch.ge: operator.ge,
    torch.eq: operator.eq, torch.ne: operator.ne,
    "lt": operator.lt, "le": operator.le, "gt": operator.gt, "ge": operator.ge, "eq": operator.eq, "ne": operator.ne,
    "__lt__": operator.lt, "__le__": operator.le, "__gt__": operator.gt, "__ge__": operator.ge,
    "__eq__": operator.eq, "__ne__": operator.ne,
}
_AND = {operator.and_, torch.logical_and, torch.bitwise_and, "logical_and", "bitwise_and", "__and__"}
_OR = {operator.or_, torch.logical_or, torch.bitwise_or, "logical_or", "bitwise_or", "__or__"}
_NOT = {operator.invert, torch.logical_not, torch.bitwise_not, "logical_not", "bitwise_not", "__invert__"}
_ARITH = {torch.add: operator.add, torch.sub: operator.sub, torch.mul: operator.mul,
          operator.add: operator.add, operator.sub: operator.sub, operator.mul: operator.mul,
          "add": operator.add, "sub": operator.sub, "mul": operator.mul}
_SHAPE_METHODS = {"view", "reshape", "unsqueeze", "squeeze", "expand", "expand_as", "contiguous", "clone",
                  "detach", "view_as", "reshape_as", "flatten"}
_ALIGNED_METHODS = {"expand", "expand_as", "contiguous", "clone", "detach"}
_SHAPE_FUNCTIONS = {torch.reshape, torch.unsqueeze, torch.squeeze, torch.flatten, torch.clone, torch.broadcast_to}
# a 0-dim tensor of a Python number: torch.tensor(c, dtype=...), torch.as_tensor(c), torch.scalar_tensor(c)
_SCALAR_TENSOR = {torch.tensor, torch.as_tensor, torch.scalar_tensor}
_CAST_METHODS = {"bool", "float", "half", "bfloat16", "long", "int", "double", "to", "type", "type_as"}


class MaskAnalyzer:
    """Evaluates mask subgraphs symbolically. ``constants`` maps placeholder nodes to trusted values."""

    def __init__(self, gm: fx.GraphModule, constants: dict[fx.Node, torch.Tensor] | None = None):
        self.gm = gm
        self.constants = constants or {}
        self.memo: dict[fx.Node, Sym | None] = {}
        self.atom_nodes: dict[_Atom, fx.Node] = {}

    def evaluate(self, x: Any) -> Sym | None:
        s = _scalar(x)
        if s is not None:
            return Sym(s, (), ())
        if not isinstance(x, fx.Node):
            return None
        if x not in self.memo:
            try:
                self.memo[x] = self._eval(x)
            except (NotStructure, TypeError, ValueError, KeyError, IndexError, AttributeError):
                self.memo[x] = None
            v = val(x)
            if self.memo[x] is None and isinstance(v, torch.Tensor) and v.dtype == torch.bool:
                atom = _Atom(f"data{len(self.atom_nodes)}")
                self.atom_nodes[atom] = x
                self.memo[x] = _make(atom, tuple(v.shape), rules=("data_atom",), atoms={atom})
        return self.memo[x]

    # ---------------------------------------------------------------------------------------------
    def _eval(self, n: fx.Node) -> Sym | None:
        v = val(n)
        if isinstance(v, torch.SymInt):
            return Sym(v.node.expr, (), ())
        if not isinstance(v, torch.Tensor):
            return None
        sizes = tuple(v.shape)
        t = n.target
        if n.op in ("placeholder", "get_attr"):
            return self._constant_tensor(n, sizes)
        if n.op not in ("call_function", "call_method"):
            return None
        args = n.args
        if t is torch.arange:
            nums = [a for a in args]
            if len(nums) == 1:
                start, step = 0, 1
            else:
                start, step = nums[0], (nums[2] if len(nums) > 2 else n.kwargs.get("step", 1))
            start = n.kwargs.get("start", start)
            s = _new_sym()
            return _make(_scalar(start) + _scalar(step) * s, sizes, (s,), ("arange_index",))
        if t in (torch.ones, torch.zeros, "new_ones", "new_zeros", torch.ones_like, torch.zeros_like):
            c = 1 if t in (torch.ones, "new_ones", torch.ones_like) else 0
            expr = (sympy.true if c else sympy.false) if v.dtype == torch.bool else sympy.Integer(c)
            return _make(expr, sizes, rules=("constant_fill",))
        if t in _SCALAR_TENSOR and v.dim() == 0:
            # torch.tensor(0.0, dtype=...): transformers <= 5.17 spells the 0 of its additive mask this way
            # (``where(keep, torch.tensor(0.0), finfo.min)``; 5.18+ uses ``torch.zeros(())``)
            data = args[0] if args else n.kwargs.get("data", n.kwargs.get("s"))
            e = _scalar(_typed(data, v.dtype))
            if e is None:
                return None
            return _make(_to_bool(e) if v.dtype == torch.bool else e, sizes, rules=("constant_fill",))
        if t in (torch.full, "new_full", torch.full_like):
            fill = get_arg(n, 1, "fill_value")
            if t == "new_full" or t is torch.full_like:
                fill = get_arg(n, 2 if t == "new_full" else 1, "fill_value")
            e = _scalar(_typed(fill, v.dtype))
            if e is None:
                return None
            if v.dtype == torch.bool:
                e = _to_bool(e)
            return _make(e, sizes, rules=("constant_fill",))
        if t in (torch.tril, torch.triu, "tril", "triu"):
            x = self.evaluate(args[0])
            diag = _scalar(get_arg(n, 1, "diagonal", 0))
            if x is None or diag is None or len(x.dims) < 2 or x.atoms:
                return None
            r, c = x.dims[-2], x.dims[-1]
            lower = t in (torch.tril, "tril")
            cond = (c - r <= diag) if lower else (c - r >= diag)
            zero = sympy.false if x.is_bool() else sympy.Integer(0)
            expr = sympy.Piecewise((x.expr, cond), (zero, True)) if not x.is_bool() else sympy.And(x.expr, cond)
            return _make(expr, sizes, x.dims, x.rules + ("tril_band" if lower else "triu_band",))
        if t is operator.getitem:
            return self._getitem(n, sizes)
        if t in (torch.diff, "diff"):
            return self._diff(n, sizes)
        if t in (torch.cumsum, "cumsum"):
            return self._cumsum(n, sizes)
        if t in _COMPARE_TARGETS:
            return self._binary(n, lambda a, b: _compare(_COMPARE_TARGETS[t], a, b), sizes, "compare")
        if t in _AND:
            return self._binary(n, lambda a, b: sympy.And(_to_bool(a), _to_bool(b)), sizes, "logic")
        if t in _OR:
            return self._binary(n, lambda a, b: sympy.Or(_to_bool(a), _to_bool(b)), sizes, "logic")
        if t in _NOT:
            x = self.evaluate(args[0])
            if x is None:
                return None
            return _make(sympy.Not(_to_bool(x.expr)), sizes, x.dims, x.rules, x.atoms)
        if t in (operator.neg, torch.neg, "neg", "__neg__"):
            x = self.evaluate(args[0])
            return None if x is None else _make(-_to_num(x.expr), sizes, x.dims, x.rules, x.atoms)
        if t in _ARITH:
            op = _ARITH[t]
            return self._binary(n, lambda a, b: op(_to_num(a), _to_num(b)), sizes, "arith")
        if t is torch.where or t == "where":
            cond, a, b = (args[0], args[1], args[2]) if t is torch.where else (args[1], args[0], args[2])
            return self._nary(n, (cond, a, b), self._where, sizes)
        if t is torch.masked_fill or t == "masked_fill":
            return self._nary(n, (args[1], get_arg(n, 2, "value"), args[0]), self._where, sizes)
        if t is to_dtype or (n.op == "call_method" and t in _CAST_METHODS):
            x = self.evaluate(args[0])
            if x is None:
                return None
            expr = _to_bool(x.expr) if v.dtype == torch.bool else _to_num(x.expr)
            return _make(expr, sizes, x.dims, x.rules, x.atoms)
        if (n.op == "call_method" and t in _SHAPE_METHODS) or t in _SHAPE_FUNCTIONS:
            x = self.evaluate(args[0])
            if x is None:
                return None
            if x.atoms and not (t in _ALIGNED_METHODS or t is torch.broadcast_to):
                return None  # a data atom must stay aligned from the right with the scores
            dims = _map_dims(x.sizes, x.dims, sizes)
            return None if dims is None else _make(x.expr, sizes, dims, x.rules, x.atoms)
        return None

    def _where(self, c, a, b):
        c = _to_bool(c)
        if _is_boolexpr(a) and _is_boolexpr(b):
            return sympy.Or(sympy.And(c, a), sympy.And(sympy.Not(c), b))
        return sympy.Piecewise((_to_num(a), c), (_to_num(b), True))

    def _binary(self, n, fn, sizes, rule):
        return self._nary(n, (n.args[0], n.args[1]), fn, sizes, rule)

    def _nary(self, n, operands, fn, sizes, rule=None):
        vals = [self.evaluate(o) for o in operands]
        if any(x is None for x in vals):
            return None
        dims_out, exprs = _broadcast(vals, sizes)
        rules = tuple(r for x in vals for r in x.rules) + ((rule,) if rule else ())
        atoms = frozenset().union(*(x.atoms for x in vals))
        return _make(fn(*exprs), sizes, dims_out, rules, atoms)

    def _getitem(self, n: fx.Node, sizes) -> Sym | None:
        x = self.evaluate(n.args[0])
        idx = n.args[1]
        if x is None or x.atoms:
            return None
        if not isinstance(idx, tuple):
            idx = (idx,)
        if idx and all(isinstance(i, fx.Node) for i in idx):
            return self._gather(x, idx, sizes)
        n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
        expanded = []
        for i in idx:
            if i is Ellipsis:
                expanded.extend([slice(None)] * (len(x.dims) - n_real))
            else:
                expanded.append(i)
        expanded.extend([slice(None)] * (len(x.dims) - sum(1 for i in expanded if i is not None)))
        expr, dims, pos = x.expr, [], 0
        for i in expanded:
            if i is None:
                dims.append(_new_sym())
                continue
            sym = x.dims[pos]
            pos += 1
            if isinstance(i, slice):
                if i.step not in (None, 1):
                    return None
                start = i.start or 0
                if not isinstance(start, int):
                    return None
                if start < 0:
                    size = x.sizes[pos - 1]
                    if isinstance(size, torch.SymInt):
                        return None
                    start += int(size)
                new = _new_sym()
                expr = expr.subs(sym, new + start) if hasattr(expr, "subs") else expr
                dims.append(new)
            elif isinstance(i, int):
                expr = expr.subs(sym, i) if hasattr(expr, "subs") else expr
            else:
                return None  # tensor indexing: data
        if len(dims) != len(sizes):
            return None
        return _make(expr, sizes, tuple(dims), x.rules + ("slice_shift",))

    def _gather(self, x: Sym, idx: tuple, sizes) -> Sym | None:
        """``x[i0, i1, ...]`` with integer index tensors (transformers' ``position_ids[batch_idx, q_idx]``): the
        index tensors broadcast to the result's leading dims and take the place of the dims they index."""
        k = len(idx)
        if k > len(x.dims):
            return None
        index_syms = []
        for i in idx:
            iv = tensor_val_of(i)
            if iv is None or iv.dtype not in (torch.int64, torch.int32):
                return None
            sym = self.evaluate(i)
            if sym is None or sym.atoms:
                return None
            index_syms.append(sym)
        lead = sizes[: len(sizes) - (len(x.dims) - k)]
        dims_lead, exprs = _broadcast(index_syms, lead)
        expr = x.expr
        if hasattr(expr, "subs"):
            expr = expr.subs({d: e for d, e in zip(x.dims[:k], exprs)}, simultaneous=True)
        rules = x.rules + tuple(r for sym in index_syms for r in sym.rules) + ("gather",)
        return _make(expr, sizes, tuple(dims_lead) + tuple(x.dims[k:]), rules)

    def _diff(self, n: fx.Node, sizes) -> Sym | None:
        """``torch.diff(x, dim=-1, prepend=p)``: ``out[t] = x[t] - x[t-1]`` with ``x[-1] = p`` (one column)."""
        x = self.evaluate(n.args[0])
        dim = get_arg(n, 2, "dim", -1)
        prepend = n.kwargs.get("prepend")
        if x is None or x.atoms or get_arg(n, 1, "n", 1) != 1 or n.kwargs.get("append") is not None:
            return None
        if dim not in (-1, len(x.dims) - 1) or prepend is None:
            return None
        p = self.evaluate(prepend)
        pv = tensor_val_of(prepend)
        if p is None or p.atoms or pv is None or pv.dim() != len(x.dims) or not _is_one(pv.shape[-1]):
            return None
        # p lines up with x on every dim but the last (size 1 there): their symbols unify
        dims, (x_expr, p_expr) = _broadcast([x, p], tuple(x.sizes))
        t = dims[-1]
        prev = sympy.Piecewise((p_expr, sympy.Eq(t, 0)), (x_expr.subs(t, t - 1), True))
        return _make(sympy.simplify(x_expr - prev), sizes, dims, x.rules + p.rules + ("diff",))

    def _cumsum(self, n: fx.Node, sizes) -> Sym | None:
        """``cumsum`` along the last dim of a value that does not depend on that dim: ``c * (t + 1)``."""
        x = self.evaluate(n.args[0])
        dim = get_arg(n, 1, "dim")
        if x is None or x.atoms or dim not in (-1, len(x.dims) - 1):
            return None
        t = x.dims[-1]
        c = _to_num(x.expr)
        if not hasattr(c, "free_symbols") or t in c.free_symbols:
            return None
        return _make(sympy.simplify(c * (t + 1)), sizes, x.dims, x.rules + ("cumsum",))

    def _constant_tensor(self, n: fx.Node, sizes) -> Sym | None:
        if n.op == "get_attr":
            value = getattr(self.gm, n.target, None)
        else:
            value = self.constants.get(n)
        if not isinstance(value, torch.Tensor) or value.dim() < 2:
            return None
        if any(s != 1 for s in value.shape[:-2]):
            return None
        if value.numel() > 1 << 24:
            return None
        band = _two_valued_band(value.reshape(value.shape[-2:]))
        if band is None:
            return None
        diag, inside, outside = band
        dims = tuple(_new_sym() for _ in sizes)
        r, c = dims[-2], dims[-1]
        cond = c - r <= diag
        if value.dtype == torch.bool:
            expr = cond if inside else sympy.Not(cond)
        else:
            expr = sympy.Piecewise((_scalar(inside), cond), (_scalar(outside), True))
        return _make(expr, sizes, dims, ("causal_from_tril_buffer",))


def _two_valued_band(t: torch.Tensor):
    """``(k, a, b)`` if ``t[r, c] == (a if c - r <= k else b)`` for all entries, else None."""
    t = t.detach().cpu()
    rows, cols = t.shape
    if rows == 0 or cols == 0:
        return None
    a, b = t[-1, 0], t[0, -1]
    if _equal(a, b):
        return (cols - 1, a.item(), b.item()) if _equal(t, a.expand_as(t)) else None
    # row 0 holds a for c <= k; if it starts with b, column 0 holds a from row -k on
    row0 = _eq_elementwise(t[0], a)
    if bool(row0[0]):
        k = int(row0.int().cumprod(0).sum().item()) - 1
    else:
        col0 = _eq_elementwise(t[:, 0], a)
        k = -int(col0.int().argmax().item())
    idx = torch.arange(cols)[None, :] - torch.arange(rows)[:, None]
    expect = torch.where(idx <= k, a, b)
    return (k, a.item(), b.item()) if _equal(expect, t) else None


def _eq_elementwise(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x == y) | (x.isnan() & y.isnan()) if x.is_floating_point() else x == y


def _equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    return bool(_eq_elementwise(x, y).all())


def _map_dims(old_sizes, old_dims, new_sizes):
    """Index symbols of a reshaped/expanded tensor: non-1 dims must keep their order and sizes."""
    old = [(s, d) for s, d in zip(old_sizes, old_dims) if not _is_one(s)]
    if len(new_sizes) >= len(old_sizes):
        # expand-like alignment from the right first
        aligned = []
        offset = len(new_sizes) - len(old_sizes)
        ok = True
        for k, ns in enumerate(new_sizes):
            if k < offset:
                aligned.append(_new_sym())
                continue
            os_, od = old_sizes[k - offset], old_dims[k - offset]
            if _is_one(os_):
                aligned.append(_new_sym())
            elif _same(os_, ns):
                aligned.append(od)
            else:
                ok = False
                break
        if ok:
            return tuple(aligned)
    dims, pos = [], 0
    for ns in new_sizes:
        if _is_one(ns):
            dims.append(_new_sym())
        elif pos < len(old) and _same(old[pos][0], ns):
            dims.append(old[pos][1])
            pos += 1
        else:
            return None
    return tuple(dims) if pos == len(old) else None


def _same(a, b) -> bool:
    try:
        return bool(sympy.simplify(_size_expr(a) - _size_expr(b)) == 0)
    except Exception:
        return False


def _broadcast(vals: list[Sym], out_sizes):
    """Line up operands from the right; dims that meet are the same index, so their symbols unify."""
    r = len(out_sizes)
    out_dims = [None] * r
    exprs = []
    for x in vals:
        expr = x.expr
        off = r - len(x.dims)
        for k, (sym, size) in enumerate(zip(x.dims, x.sizes)):
            if _is_one(size):
                continue
            pos = off + k
            if out_dims[pos] is None:
                out_dims[pos] = sym
            elif hasattr(expr, "subs"):
                expr = expr.subs(sym, out_dims[pos])
        exprs.append(expr)
    out_dims = [d if d is not None else _new_sym() for d in out_dims]
    return tuple(out_dims), exprs


# -- from a symbolic mask to a band ----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Band:
    """Kept positions: ``lo <= j - i <= hi`` (None = unbounded)."""

    lo: int | None
    hi: int | None
    rules: tuple = ()
    #: data atoms AND-ed with the band: ((atom, negated), ...); their tensors become a boolean mask
    atoms: tuple = ()

    def intersect(self, other: "Band") -> "Band":
        lo = _max_opt(self.lo, other.lo)
        hi = _min_opt(self.hi, other.hi)
        return Band(lo, hi, self.rules + other.rules, self.atoms + other.atoms)


def _max_opt(a, b):
    return b if a is None else a if b is None else _pick(a, b, larger=True)


def _min_opt(a, b):
    return b if a is None else a if b is None else _pick(a, b, larger=False)


def _pick(a, b, *, larger: bool):
    """max/min of two bounds that may be symbolic (sizes): decided by the sign of ``a - b``, else NotStructure."""
    if isinstance(a, int) and isinstance(b, int):
        return max(a, b) if larger else min(a, b)
    diff = sympy.simplify(sympy.sympify(a) - sympy.sympify(b))
    if diff.is_nonnegative:
        return a if larger else b
    if diff.is_nonpositive:
        return b if larger else a
    if not (_symbolic_offset(sympy.sympify(a)) and _symbolic_offset(sympy.sympify(b))):
        raise NotStructure(f"cannot order the band bounds {a} and {b}")
    # decided at run time: the op's window argument is then a SymInt expression with max/min
    return sympy.Max(a, b) if larger else sympy.Min(a, b)


def _linear_in_sizes(expr) -> bool:
    """``a*s0 + b*s1 + c`` with integer coefficients over plain size symbols (no Max/Min/floor, no data)."""
    if expr.atoms(sympy.Function) or any(isinstance(a, _Atom) or a in (I, J, D) for a in expr.free_symbols):
        return False
    try:
        poly = sympy.Poly(expr, *sorted(expr.free_symbols, key=str))
    except sympy.PolynomialError:
        return False
    return poly.total_degree() <= 1 and all(c.is_integer for c in poly.coeffs())


def _symbolic_offset(expr) -> bool:
    """An integer expression of sizes built from +, integer *, max and min (a KV cache's offsets, e.g.
    ``max(past - W + 1, 0)``): it can be rebuilt in the graph as the op's SymInt window. Whether every size in
    it can be read from a graph input is checked by the finder (``graph_utils.emittable``)."""
    if expr.is_Integer or _linear_in_sizes(expr):
        return True
    if any(isinstance(a, _Atom) or a in (I, J, D) for a in expr.free_symbols):
        return False
    if isinstance(expr, sympy.Symbol):
        return True
    if isinstance(expr, sympy.Add) or is_max(expr) or is_min(expr):
        return all(_symbolic_offset(a) for a in expr.args)
    if isinstance(expr, sympy.Mul):
        rest = [a for a in expr.args if not a.is_number]
        return len(rest) == 1 and all(a.is_Integer for a in expr.args if a.is_number) and _symbolic_offset(rest[0])
    return False


def _as_bound(x):
    """A bound as an int when it is a number, else the sympy expression (of sizes)."""
    return int(x) if getattr(x, "is_number", False) else x


def _align(sym: Sym, scores_rank: int):
    """The expression in terms of I (query index) and J (key index), or None if it reads other dims."""
    expr = sym.expr
    if len(sym.dims) > scores_rank:
        return None
    subs = {}
    for k, (d, size) in enumerate(zip(sym.dims, sym.sizes)):
        pos = scores_rank - len(sym.dims) + k
        if pos == scores_rank - 1:
            subs[d] = J
        elif pos == scores_rank - 2:
            subs[d] = I
        elif not _is_one(size) and hasattr(expr, "free_symbols") and d in expr.free_symbols:
            return None  # varies over batch or heads: not a band
    return expr.subs(subs) if hasattr(expr, "subs") else expr


def _in_d(expr, q_one: bool, k_one: bool):
    """Rewrite in ``d = j - i``. With one query row (a decode step) ``i = 0``; with one key ``j = 0``."""
    expr = expr.subs(J, I + D)
    if q_one:
        expr = expr.subs(I, 0)
    elif k_one:
        expr = expr.subs(I, -D)
    return expr


def band_of_keep(keep: Sym, scores_rank: int, q_one: bool = False, k_one: bool = False) -> Band | None:
    """The band of a boolean keep-predicate, or None if it is not a band."""
    expr = _align(keep, scores_rank)
    if expr is None:
        return None
    expr = _in_d(expr, q_one, k_one)
    expr = sympy.simplify_logic(expr) if expr not in (sympy.true, sympy.false) else expr
    bounds = _bounds(expr)
    if bounds is None:
        return None
    return Band(bounds[0], bounds[1], keep.rules, bounds[2])


def _is_zero(e) -> bool:
    """0 or 0.0 (sympy >= 1.13: ``Float(0.0) == 0`` is False, so a ``where(keep, 0.0, fill)`` needs this)."""
    return getattr(e, "is_zero", None) is True or (isinstance(e, (int, float)) and e == 0)


def band_of_bias(bias: Sym, scores_rank: int, fill_threshold: float, q_one: bool = False, k_one: bool = False):
    """``(Band, fill)`` if an additive bias is 0 inside a band and one fill value (<= threshold) outside."""
    expr = _align(bias, scores_rank)
    if expr is None:
        return None
    if _is_zero(expr):
        return Band(None, None, bias.rules), None
    if not isinstance(expr, sympy.Piecewise):
        return None
    branches = list(_exclusive(expr))
    zero = [cond for value, cond in branches if _is_zero(value)]
    other = {value for value, cond in branches if not _is_zero(value)}
    if len(zero) != 1 or len(other) != 1:
        return None
    fill = other.pop()
    if not fill.is_number:
        return None
    fill = float(fill)
    if not fill <= fill_threshold:
        return None
    keep_expr = _in_d(zero[0], q_one, k_one)
    if keep_expr not in (sympy.true, sympy.false):
        keep_expr = sympy.simplify_logic(keep_expr)
    bounds = _bounds(keep_expr)
    if bounds is None:
        return None
    return Band(bounds[0], bounds[1], bias.rules, bounds[2]), fill


def _bounds(expr):
    """``(lo, hi, data_atoms)``: a conjunction of linear relations in D alone and data atoms, or None."""
    if expr is sympy.true:
        return None, None, ()
    if expr is sympy.false:
        return None
    atoms = expr.args if isinstance(expr, sympy.And) else (expr,)
    lo = hi = None
    data = []
    for atom in atoms:
        if isinstance(atom, _Atom):
            data.append((atom, False))
            continue
        if isinstance(atom, sympy.Not) and isinstance(atom.args[0], _Atom):
            data.append((atom.args[0], True))
            continue
        if isinstance(atom, sympy.Not):
            atom = atom.args[0]
            if not isinstance(atom, sympy.core.relational.Relational):
                return None
            atom = atom.negated
        if not isinstance(atom, sympy.core.relational.Relational) or isinstance(atom, sympy.Ne):
            return None
        e = sympy.expand(atom.lhs - atom.rhs)
        if I in e.free_symbols:
            return None
        coeff = e.coeff(D)
        rest = sympy.expand(e - coeff * D)
        if coeff not in (1, -1) or D in rest.free_symbols:
            return None
        if not rest.is_number and not _symbolic_offset(rest):
            return None  # a symbolic offset: sizes with +, integer *, max, min (a KV cache's length and offset)
        # coeff*D + rest (rel) 0  ->  bounds on D
        bound = -rest / coeff
        rel = type(atom)
        if coeff == -1:
            rel = {sympy.Lt: sympy.Gt, sympy.Le: sympy.Ge, sympy.Gt: sympy.Lt, sympy.Ge: sympy.Le,
                   sympy.Eq: sympy.Eq}[rel]
        if rel is sympy.Lt:
            new_hi, new_lo = sympy.ceiling(bound) - 1, None
        elif rel is sympy.Le:
            new_hi, new_lo = sympy.floor(bound), None
        elif rel is sympy.Gt:
            new_hi, new_lo = None, sympy.floor(bound) + 1
        elif rel is sympy.Ge:
            new_hi, new_lo = None, sympy.ceiling(bound)
        elif rel is sympy.Eq:
            if not bound.is_integer:
                return None
            new_hi = new_lo = bound
        else:
            return None
        try:
            if new_hi is not None:
                hi = _min_opt(hi, _as_bound(new_hi))
            if new_lo is not None:
                lo = _max_opt(lo, _as_bound(new_lo))
        except NotStructure:
            return None
    return lo, hi, tuple(data)
