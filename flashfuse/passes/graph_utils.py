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
