"""The pass pipeline: an explicit, ordered list, each pass run through one helper that logs, times and dumps.

See ``README.md`` in this folder for the invariants every pass keeps.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
from typing import Any, Callable

import torch
import torch.fx as fx

from flashfuse.config import Config
from flashfuse.passes.attention import AttentionSite, NearMiss, find_sites
from flashfuse.passes.canonicalize import canonicalize
from flashfuse.passes.rewrite import rewrite_site
from flashfuse.report import GraphReport, SiteReport

log = logging.getLogger("flashfuse")

__all__ = ["PassContext", "run_pipeline", "PIPELINE"]


@dataclasses.dataclass
class PassContext:
    config: Config
    report: GraphReport
    constants: dict[fx.Node, torch.Tensor] = dataclasses.field(default_factory=dict)
    sites: list[AttentionSite | NearMiss] = dataclasses.field(default_factory=list)
    dumper: Any = None


def inference_site(site: AttentionSite, config: Config) -> bool:
    """True when the site's output can never need a gradient, so it may call an op without autograd
    (``flashfuse::attention_infer`` / ``decode_inline``): its traced value (Dynamo's fake ``p @ v``) does not
    require grad. Dynamo traced it under the grad mode and the inputs' ``requires_grad`` that its guards check, so
    a call where either differs recompiles. Per site, not per graph: a parameter held as a graph attribute, or a
    learned bias on one site, needs no graph input to require grad. No traced value: not provable, False."""
    if not config.infer_op:
        return False
    from flashfuse.passes.graph_utils import tensor_val

    value = tensor_val(site.pv)
    return value is not None and not value.requires_grad


def _find(gm: fx.GraphModule, ctx: PassContext) -> dict[str, int]:
    ctx.sites = find_sites(gm, ctx.config, ctx.constants)
    for site in ctx.sites:
        if isinstance(site, NearMiss):
            log.debug("flashfuse: graph %d: %s left alone: %s", ctx.report.graph, site.source, site.reason)
        else:
            log.debug("flashfuse: graph %d: %s matched %s", ctx.report.graph, site.source, site.flags)
    return {"sites": len(ctx.sites), "matched": sum(isinstance(s, AttentionSite) for s in ctx.sites)}


def _rewrite(gm: fx.GraphModule, ctx: PassContext) -> dict[str, int]:
    done = 0
    replaced: dict[fx.Node, fx.Node] = {}  # an earlier site's output may be a later site's q, k, v or mask
    for site in ctx.sites:
        if isinstance(site, NearMiss):
            ctx.report.sites.append(SiteReport(False, site.reason, site.source, dict(site.flags), ctx.report.graph,
                                               site.hint))
            continue
        if not ctx.config.rewrite:
            ctx.report.sites.append(SiteReport(False, "rewriting is off (options={'rewrite': False})", site.source,
                                               dict(site.flags), ctx.report.graph))
            continue
        site.q, site.k, site.v = (replaced.get(n, n) for n in (site.q, site.k, site.v))
        for term in site.masks:
            term.node = replaced.get(term.node, term.node)
        replaced[site.pv] = rewrite_site(gm, site, fp8_check=_fp8_check(site) if ctx.config.fp8 else None,
                                         infer=inference_site(site, ctx.config))
        fp8_reason = getattr(site, "fp8_refused", None)
        use_fp8 = ctx.config.fp8 and fp8_reason is None
        flags = dict(site.flags)
        flags["kernel"] = _fp8_kernel_name() if use_fp8 else _kernel_choice(site)
        flags["op"] = "attention_fp8" if use_fp8 else getattr(site, "op_emitted", "attention")
        if flags["op"] == "attention_infer" and getattr(site, "inline_refused", None):
            flags["decode_inline_refused"] = site.inline_refused  # a decode site on the GPU kept the opaque op
        if ctx.config.fp8:
            flags["fp8"] = use_fp8
            if fp8_reason is not None:
                flags["fp8_refused"] = fp8_reason
        ctx.report.sites.append(SiteReport(True, None, site.source, flags, ctx.report.graph))
        done += 1
    gm.graph.lint()
    gm.recompile()
    return {"rewritten": done}


def _fp8_check(site: AttentionSite):
    """``check(q, k, v)`` -> why an ``options={"fp8": True}`` site keeps the regular kernel (None: it runs the FP8
    kernel); ``rewrite_site`` asks it with the op's own q, k, v."""
    from flashfuse.ops import fp8_refusal

    band = site.band
    wl = site.windows.get("window_left", None if band.lo is None else -band.lo)
    wr = site.windows.get("window_right", band.hi)
    symbolic = any(not (w is None or isinstance(w, int)) for w in (wl, wr))

    def check(q, k, v) -> str | None:
        try:
            return fp8_refusal(
                q, k, v, has_mask=bool(site.masks), has_sinks=site.sinks is not None, softcap=float(site.softcap),
                dropout_p=float(site.dropout or 0.0), window_left=None if symbolic else wl,
                window_right=None if symbolic else wr, symbolic_band=symbolic)
        except Exception as exc:  # the decision must not break a compile: no FP8, say why
            return f"not checkable ({type(exc).__name__}: {exc})"

    return check


def fp8_scheme_name() -> str:
    """The FP8 scheme the kernel runs (``FLASHFUSE_FP8_SCHEME``, else ``fp8.DEFAULT_SCHEME``)."""
    from flashfuse.fp8 import DEFAULT_SCHEME

    return os.environ.get("FLASHFUSE_FP8_SCHEME") or DEFAULT_SCHEME


def _fp8_kernel_name() -> str:
    return f"flash_fwd_fp8 ({fp8_scheme_name()})"


def _kernel_has_sinks() -> bool:
    from flashfuse import ops

    return getattr(ops, "KERNEL_HAS_SINKS", False)


def _static_len(n):
    return n if isinstance(n, int) else None


def _kernel_choice(site: AttentionSite) -> str:
    from flashfuse.ops import describe_kernel
    from flashfuse.passes.graph_utils import tensor_val

    q = tensor_val(site.q)
    if site.sinks is not None and not _kernel_has_sinks():
        return "reference (attention sinks are not in the Triton kernel yet)"
    head_dim = q.shape[-1]
    if isinstance(head_dim, torch.SymInt):
        head_dim = head_dim.node.hint
    masks = [tensor_val(m.node) for m in site.masks]
    mask_dtype = None if not masks else (torch.bool if site.masks[0].kind == "bool" else masks[0].dtype)
    try:
        return describe_kernel(q.device, head_dim, q.dtype, mask_dtype, sinks=site.sinks is not None,
                               dropout_p=site.dropout or 0.0, q_len=_static_len(q.shape[-2]))
    except Exception as exc:  # the report must not break a compile
        return f"unknown ({type(exc).__name__})"


#: (name, pass): each pass is ``fn(gm, ctx) -> stats`` and mutates ``gm`` in place
PIPELINE: list[tuple[str, Callable[[fx.GraphModule, PassContext], dict[str, int]]]] = [
    ("canonicalize", lambda gm, ctx: canonicalize(gm)),
    ("find_sites", _find),
    ("rewrite", _rewrite),
]


def copy_graph_module(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[fx.Node, fx.Node]]:
    """A copy of ``gm`` with its own graph (nodes and meta copied shallowly), sharing parameters."""
    graph = fx.Graph()
    val_map: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, val_map)
    graph.output(out)
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    new = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    new.meta = dict(getattr(gm, "meta", {}))
    return new, val_map


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor) or t.device.type == "meta"


def _trusted_constants(gm: fx.GraphModule, example_inputs) -> dict[fx.Node, torch.Tensor]:
    """Placeholders that hold module buffers, with their values at compile time (mask structure reads them)."""
    found = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs):
        if not isinstance(value, torch.Tensor) or value.requires_grad or _is_fake(value):
            continue  # fake inputs (DDP's bucket split compiles submodules on fakes): no value to read
        source = node.meta.get("grapharg")
        name = str(getattr(getattr(source, "source", None), "name", "") or "")
        if callable(name):
            name = name()
        if "buffers" in node.name or "_buffers" in name:
            found[node] = value
    return found


def run_pipeline(gm: fx.GraphModule, example_inputs, config: Config, report: GraphReport,
                 dumper=None) -> fx.GraphModule:
    work, val_map = copy_graph_module(gm)
    constants = {val_map[n]: v for n, v in _trusted_constants(gm, example_inputs).items()}
    ctx = PassContext(config=config, report=report, constants=constants, dumper=dumper)
    if dumper is not None:
        dumper.graph(0, "input", work)
    for index, (name, fn) in enumerate(PIPELINE, start=1):
        start = time.perf_counter()
        stats = fn(work, ctx)
        elapsed = (time.perf_counter() - start) * 1e3
        report.pass_times_ms[name] = round(elapsed, 3)
        log.debug("flashfuse: graph %d: pass %s %s (%.1f ms)", report.graph, name, stats, elapsed)
        if dumper is not None:
            dumper.graph(index, name, work)
    return work
