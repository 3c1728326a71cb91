"""The Dynamo backend: options -> pass pipeline -> Inductor.

``torch.compile(model, backend="flashfuse")`` finds this function through the
``torch_dynamo_backends`` entry point (no ``import flashfuse`` needed). Any exception in flashfuse's
passes sends the user's graph to Inductor unchanged, with a warning naming the cause.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any

import torch
import torch.fx as fx

from flashfuse import report as _report
from flashfuse.config import Config, split_options

log = logging.getLogger("flashfuse")

__all__ = ["flashfuse_backend", "inductor_patches", "own_patches"]


def inductor_patches(mode: str | None, extra: dict[str, Any]) -> dict[str, Any]:
    patches: dict[str, Any] = {}
    if mode not in (None, "default"):
        from torch._inductor import list_mode_options

        patches.update(list_mode_options(mode))
    patches.update(extra)
    return patches


def _passes(gm: fx.GraphModule, example_inputs, config: Config, graph_report) -> fx.GraphModule:
    # the debug dumper and the pipeline are imported lazily: importing flashfuse stays cheap
    from flashfuse.debug import Dumper
    from flashfuse.passes import run_pipeline

    dumper = Dumper.for_graph(config.debug_dir, graph_report) if config.debug_dir else None
    out = run_pipeline(gm, example_inputs, config, graph_report, dumper)
    if dumper is not None:
        dumper.finish(graph_report)
    return out


def analyse(gm: fx.GraphModule, example_inputs, config: Config) -> tuple[fx.GraphModule, Any]:
    """Run the passes with the fallback rule; returns (graph to compile, graph report)."""
    graph_report = _report.new_graph_report()
    start = time.perf_counter()
    try:
        new_gm = _passes(gm, example_inputs, config, graph_report)
    except Exception as exc:  # never break a compile
        graph_report.fallback = f"{type(exc).__name__}: {exc}"
        for site in graph_report.sites:
            site.rewritten = False
            site.reason = f"flashfuse's passes failed on this graph ({type(exc).__name__}); it went to Inductor unchanged"
        log.debug("flashfuse: graph %d: passes failed", graph_report.graph, exc_info=True)
        warnings.warn(
            f"flashfuse: an internal error in its passes ({type(exc).__name__}: {exc}); graph {graph_report.graph} "
            "is compiled by plain Inductor without attention rewrites",
            RuntimeWarning,
            stacklevel=2,
        )
        return gm, graph_report
    elapsed = (time.perf_counter() - start) * 1e3
    log.info(
        "flashfuse: %d/%d attention sites rewritten in graph %d (%.0f ms)",
        graph_report.rewritten, graph_report.total, graph_report.graph, elapsed,
    )
    return (new_gm if config.rewrite else gm), graph_report


# the ops a rewritten site calls when its output cannot need a gradient (flags["op"])
_INFER_OPS = ("attention_infer", "decode_inline")
# Inductor options whose C++ build failed once in this process (no toolchain, no Python headers): not tried again
_FAILED_OWN: set[str] = set()


def own_patches(config: Config, extra: dict[str, Any], patches: dict[str, Any], gm: fx.GraphModule, example_inputs,
                graph_report) -> dict[str, Any]:
    """Inductor options flashfuse sets itself for one graph; the user's ``options`` and ``mode`` always win.

    ``cpp_wrapper``: a CUDA graph whose rewritten sites all call the inference ops and in which nothing needs a
    gradient gets Inductor's C++ wrapper (the graph's kernels, ``decode_inline``'s included, launched from C++):
    generation is host-bound, and on the H200 this took flashfuse's 16-layer Llama from 168 to 248 tokens/s at
    batch 1 and from 2238 to 3697 at batch 16 (``bench/RESULTS.md``, session 8). Not when the user chose
    ``cpp_wrapper`` or CUDA graphs (``mode="reduce-overhead"``: Inductor turns CUDA graphs off under the C++
    wrapper with graph partitioning), not for CPU graphs, training graphs or graphs without a rewritten site.
    """
    if not config.infer_cpp_wrapper or "cpp_wrapper" in extra or "cpp_wrapper" in _FAILED_OWN:
        return {}
    import torch._inductor.config as inductor_config

    if inductor_config.cpp_wrapper or patches.get("triton.cudagraphs", inductor_config.triton.cudagraphs):
        return {}
    ops = [site.flags.get("op") for site in graph_report.sites if site.rewritten]
    if not ops or any(op not in _INFER_OPS for op in ops):
        return {}
    tensors = [x for x in example_inputs if isinstance(x, torch.Tensor)]
    if not any(x.device.type == "cuda" for x in tensors):
        return {}
    # grad mode at the graph's entry (Dynamo restores it for the backend call) and wherever the graph switches it
    # (`with torch.enable_grad():` inside an outer no_grad becomes `_set_grad_enabled(True)` nodes); with grad off
    # throughout nothing can need a gradient (views of parameters still say requires_grad=True there)
    grad_on = torch.is_grad_enabled() or any(
        node.op == "call_function" and node.target is torch._C._set_grad_enabled and bool(node.args and node.args[0])
        for node in gm.graph.nodes)
    if grad_on:
        if any(x.requires_grad for x in tensors):
            return {}
        for node in gm.graph.nodes:  # a tensor made to require grad inside the graph
            if node.op in ("call_function", "call_method", "call_module"):
                vals = node.meta.get("example_value", node.meta.get("val"))
                vals = vals if isinstance(vals, (tuple, list)) else [vals]
                if any(getattr(x, "requires_grad", False) for x in vals):
                    return {}
    return {"cpp_wrapper": True}


def _refresh_dump(config: Config, graph_report) -> None:
    """Write the debug folder's report of this graph again (the backend changed it after the passes)."""
    if config.debug_dir:
        from flashfuse.debug import Dumper

        Dumper.for_graph(config.debug_dir, graph_report).write_report(graph_report)


def _dynamo_signal(exc: BaseException) -> bool:
    """Dynamo's own signals (graph break, restart the analysis, skip the frame): raised through, never a fallback."""
    from torch._dynamo import exc as dynamo_exc

    return isinstance(exc, (dynamo_exc.Unsupported, dynamo_exc.RestartAnalysis, dynamo_exc.SkipFrame))


def _is_cpp_build_error(exc: BaseException) -> bool:
    try:
        from torch._inductor.exc import CppCompileError
    except ImportError:  # pragma: no cover - depends on the torch build
        return False
    for _ in range(8):  # Inductor may wrap it
        if exc is None:
            return False
        if isinstance(exc, CppCompileError):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def flashfuse_backend(gm: fx.GraphModule, example_inputs, *, mode: str | None = None,
                      options: dict[str, Any] | None = None):
    """``torch.compile`` backend: rewrite attention sites, then compile with Inductor's ``compile_fx``."""
    config, extra = split_options(options)
    patches = inductor_patches(mode, extra)
    new_gm, graph_report = analyse(gm, example_inputs, config)
    if not config.inductor:
        if config.verify and new_gm is not gm:
            return _with_verify(new_gm.forward, gm, example_inputs, config, None, graph_report)
        return new_gm.forward

    from torch._inductor.compile_fx import compile_fx

    if new_gm is gm:
        return compile_fx(gm, example_inputs, config_patches=patches)
    own = own_patches(config, extra, patches, new_gm, example_inputs, graph_report)
    compiled = None
    if own:
        from flashfuse.passes import copy_graph_module

        spare, _ = copy_graph_module(new_gm)  # Inductor may consume the graph it failed on
        graph_report.inductor_patches = dict(own)
        try:
            compiled = compile_fx(new_gm, example_inputs, config_patches={**patches, **own})
        except Exception as exc:
            if _dynamo_signal(exc):
                raise
            toolchain = _is_cpp_build_error(exc)
            if toolchain:
                _FAILED_OWN.update(own)
            later = " (not tried again in this process: the C++ build failed)" if toolchain else ""
            graph_report.inductor_patches = {}
            graph_report.inductor_patches_failed = (f"Inductor failed with {own} ({type(exc).__name__}: {exc}); "
                                                    f"retried without{later}")
            warnings.warn(
                f"flashfuse: Inductor failed on graph {graph_report.graph} with {own} ({type(exc).__name__}: {exc}); "
                f"compiling it without{later}",
                RuntimeWarning,
                stacklevel=2,
            )
            new_gm = spare
        _refresh_dump(config, graph_report)
    if compiled is None:
        try:
            compiled = compile_fx(new_gm, example_inputs, config_patches=patches)
        except Exception as exc:
            if _dynamo_signal(exc):
                raise
            graph_report.fallback = f"Inductor failed on the rewritten graph: {type(exc).__name__}: {exc}"
            warnings.warn(
                f"flashfuse: Inductor failed on the rewritten graph {graph_report.graph} ({type(exc).__name__}: "
                f"{exc}); compiling the original graph instead",
                RuntimeWarning,
                stacklevel=2,
            )
            for site in graph_report.sites:
                if site.rewritten:
                    site.rewritten = False
                    site.reason = "the rewritten graph failed to compile; the original was compiled instead"
            return compile_fx(gm, example_inputs, config_patches=patches)
    if config.verify:
        return _with_verify(compiled, gm, example_inputs, config, patches, graph_report)
    return compiled


def _with_verify(compiled, gm, example_inputs, config, patches, graph_report):
    """``compiled`` checked once against the original; a failed check swaps in the original (compiled by
    Inductor, or run as the FX graph it is when ``inductor`` is off)."""
    from torch._inductor.compile_fx import compile_fx

    from flashfuse.verify import VerifyingFunction, build_side_by_side

    try:
        side_by_side, sources = build_side_by_side(gm, example_inputs, config)
    except Exception as exc:  # verification is best effort; it never breaks the compile
        warnings.warn(f"flashfuse: verify could not build its check ({type(exc).__name__}: {exc})", RuntimeWarning,
                      stacklevel=3)
        return compiled
    output = next(n for n in gm.graph.nodes if n.op == "output")
    n_outputs = len(output.args[0]) if isinstance(output.args[0], (tuple, list)) else 1
    # the fallback is compiled from a fresh copy: Inductor may have consumed `gm` already
    from flashfuse.passes import copy_graph_module

    original, _ = copy_graph_module(gm)

    def compile_original():  # called after a failed check has marked the report
        _refresh_dump(config, graph_report)  # the dump's report said "rewritten"
        return compile_fx(original, example_inputs, config_patches=patches) if config.inductor else original.forward

    return VerifyingFunction(compiled, side_by_side, n_outputs, sources, compile_original, graph_report)
