"""Small helpers shared by the passes: node metadata, arguments, source lines."""

from __future__ import annotations

import os
import re
from typing import Any

import torch
import torch.fx as fx

_MISSING = object()


def val(node: Any) -> Any:
    """The fake value of a node (Dynamo stores ``example_value``, AOT/Inductor ``val``)."""
    if not isinstance(node, fx.Node):
        return node
    if "val" in node.meta:
        return node.meta["val"]
    return node.meta.get("example_value")


def set_val(node: fx.Node, value: Any) -> None:
    node.meta["val"] = value
    node.meta["example_value"] = value


def tensor_val(node: Any) -> torch.Tensor | None:
    v = val(node)
    return v if isinstance(v, torch.Tensor) else None


def shape(node: Any) -> tuple | None:
    t = tensor_val(node)
    return tuple(t.shape) if t is not None else None


def rank(node: Any) -> int | None:
    t = tensor_val(node)
    return t.dim() if t is not None else None


def get_arg(node: fx.Node, index: int, name: str, default: Any = _MISSING) -> Any:
    """Argument ``index`` (positional) or ``name`` (keyword) of a call node."""
    if len(node.args) > index:
        return node.args[index]
    if name in node.kwargs:
        return node.kwargs[name]
    if default is _MISSING:
        raise KeyError(f"{node.format_node()} has no argument {name!r}")
    return default


def normalize_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def is_scalar(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


def source_line(node: fx.Node) -> str:
    """``file:line`` of the user's code that produced ``node`` (the innermost frame of its stack trace)."""
    trace = node.meta.get("stack_trace") or ""
    frames = _FRAME.findall(trace)
    if not frames:
        return f"<graph node {node.name}>"
    # the innermost frame outside torch itself (a TorchFunctionMode such as set_default_device adds one)
    user = [f for f in frames if not os.path.abspath(f[0]).startswith(_TORCH_DIR)]
    path, line = (user or frames)[-1]
    return f"{path}:{line}"


def source_text(node: fx.Node) -> str | None:
    """The user's line of code, when the stack trace carries it."""
    trace = (node.meta.get("stack_trace") or "").rstrip().splitlines()
    for text in reversed(trace):
        text = text.strip()
        if text and not text.startswith("File ") and set(text) != {"^"} and set(text) != {"~", "^"}:
            return text
    return None


def users_in_order(node: fx.Node) -> list[fx.Node]:
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return sorted(node.users, key=lambda n: order[n])


def copy_meta(src: fx.Node, dst: fx.Node) -> None:
    for key in ("stack_trace", "nn_module_stack", "source_fn_stack", "seq_nr"):
        if key in src.meta:
            dst.meta[key] = src.meta[key]


def fake_mode_of(graph: fx.Graph):
    from torch._guards import detect_fake_mode

    # the mode of the graph's own fake values (Dynamo hands backends a different, fresh mode)
    for n in graph.nodes:
        v = val(n)
        if isinstance(v, torch._subclasses.FakeTensor):
            return v.fake_mode
    return detect_fake_mode()


def fake_eval(graph: fx.Graph, fn, *args, **kwargs) -> Any:
    """Run ``fn`` on the fake values of node arguments, under the graph's fake mode."""
    import contextlib

    args, kwargs = fx.node.map_arg((args, kwargs), val)
    mode = fake_mode_of(graph)
    with mode if mode is not None else contextlib.nullcontext():
        return fn(*args, **kwargs)


def insert_call(graph: fx.Graph, target, args: tuple, kwargs: dict | None = None, *, like: fx.Node | None = None,
                value: Any = _MISSING) -> fx.Node:
    """Insert ``target(*args, **kwargs)`` at the graph's current insert point, with meta set."""
    kwargs = kwargs or {}
    node = graph.call_function(target, args, kwargs)
    if value is _MISSING:
        value = fake_eval(graph, target, *args, **kwargs)
    set_val(node, value)
    if like is not None:
        copy_meta(like, node)
    return node


# -- symbolic integers back into the graph ----------------------------------------------------------
def symbol_sources(graph: fx.Graph) -> dict:
    """``{sympy symbol: node or (node, dim)}``: where each plain size symbol can be read in the graph.

    A SymInt placeholder gives its symbol directly; a tensor placeholder gives ``tensor.size(dim)`` for each
    dim whose size is a plain symbol. Placeholders dominate every other node, so any insertion point works.
    """
    import sympy

    sources: dict = {}
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        v = val(node)
        if isinstance(v, torch.SymInt) and isinstance(v.node.expr, sympy.Symbol):
            sources.setdefault(v.node.expr, node)
        elif isinstance(v, torch.Tensor):
            for dim, size in enumerate(v.shape):
                if isinstance(size, torch.SymInt) and isinstance(size.node.expr, sympy.Symbol):
                    sources.setdefault(size.node.expr, (node, dim))
    return sources


def emittable(expr, sources: dict) -> str | None:
    """None if ``expr`` (sympy integer expression) can be rebuilt from ``sources`` with +, *int, max, min;
    else what stops it."""
    import sympy

    if expr.is_Integer:
        return None
    if isinstance(expr, sympy.Symbol):
        return None if expr in sources else f"the size {expr} is not read from any graph input"
    if isinstance(expr, sympy.Add) or is_max(expr) or is_min(expr):
        return next((r for r in (emittable(a, sources) for a in expr.args) if r), None)
    if isinstance(expr, sympy.Mul):
        numbers = [a for a in expr.args if a.is_number]
        rest = [a for a in expr.args if not a.is_number]
        if len(rest) != 1 or not all(n.is_Integer for n in numbers):
            return f"{expr} is not an integer multiple of one term"
        return emittable(rest[0], sources)
    return f"{type(expr).__name__} ({expr}) cannot be rebuilt in the graph"


def emit_sym_expr(graph: fx.Graph, expr, sources: dict, like: fx.Node | None = None):
    """Insert nodes computing ``expr`` (checked by :func:`emittable`) at the graph's insert point: an int or a
    node whose value is a SymInt."""
    import operator

    import sympy

    def node_of(e):
        if e.is_Integer:
            return int(e)
        if isinstance(e, sympy.Symbol):
            src = sources[e]
            if isinstance(src, fx.Node):
                return src
            tensor, dim = src
            size = graph.call_method("size", (tensor, dim))
            set_val(size, val(tensor).shape[dim])
            return size
        if isinstance(e, sympy.Mul):
            coeff = int(sympy.Mul(*[a for a in e.args if a.is_number]))
            (term,) = [a for a in e.args if not a.is_number]
            return combine(operator.mul, node_of(term), coeff)
        if isinstance(e, sympy.Add):
            total = None
            for a in e.args:
                total = node_of(a) if total is None else combine(operator.add, total, node_of(a))
            return total
        fn = torch.sym_max if is_max(e) else torch.sym_min
        total = None
        for a in e.args:
            total = node_of(a) if total is None else combine(fn, total, node_of(a))
        return total

    def combine(fn, a, b):
        if not isinstance(a, fx.Node) and not isinstance(b, fx.Node):
            return fn(a, b)
        return insert_call(graph, fn, (a, b), like=like)

    return node_of(expr)


def is_max(e) -> bool:
    """sympy's Max or torch's own (``torch.utils._sympy.functions.Max``, what ShapeEnv expressions use)."""
    import sympy
    return isinstance(e, sympy.Max) or type(e).__name__ == "Max"


def is_min(e) -> bool:
    import sympy
    return isinstance(e, sympy.Min) or type(e).__name__ == "Min"
