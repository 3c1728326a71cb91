"""Verify mode (``options={"verify": True}`` or ``FLASHFUSE_VERIFY=1``): proof on the user's own model.

On the first call of a compiled graph, a side-by-side graph runs once, eagerly: the original graph with,
beside every rewritten site, the fused call on the same inputs (the FP8 op where ``fp8`` put one there); both
results of each site come out as extra outputs and are compared with the dtype's tolerance (an FP8 site: with
its scheme's relative RMS bound, ``fp8.SCHEME_BOUNDS``, since 8-bit rounding is not elementwise-small). If any
site differs, its report entry says so with the numbers, and the graph falls back to the unrewritten version
for this and every later call.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Callable

import torch
import torch.fx as fx

from flashfuse.config import Config
from flashfuse.report import GraphReport

log = logging.getLogger("flashfuse")

__all__ = ["build_side_by_side", "VerifyingFunction", "TOLERANCE"]

#: (atol, rtol) by dtype: a few times the error of eager attention in that dtype
TOLERANCE = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (6e-2, 6e-2),
    torch.float64: (1e-8, 1e-8),
}


def build_side_by_side(gm: fx.GraphModule, example_inputs, config: Config) -> tuple[fx.GraphModule, list[str]]:
    """The original graph plus, per rewritten site, ``(original p @ v, fused call)`` as extra outputs."""
    from flashfuse.passes import _fp8_check, _trusted_constants, copy_graph_module, inference_site
    from flashfuse.passes.attention import AttentionSite, find_sites
    from flashfuse.passes.canonicalize import canonicalize
    from flashfuse.passes.rewrite import rewrite_site

    work, val_map = copy_graph_module(gm)
    constants = {val_map[n]: v for n, v in _trusted_constants(gm, example_inputs).items()}
    canonicalize(work)
    pairs, sources = [], []
    for site in find_sites(work, config, constants):
        if isinstance(site, AttentionSite):
            # the same decision as the real rewrite (run_pipeline): an FP8 site is checked as the FP8 op
            fp8_check = _fp8_check(site) if config.fp8 else None
            fused = rewrite_site(work, site, replace=False, fp8_check=fp8_check, infer=inference_site(site, config))
            pairs.extend([site.pv, fused])
            sources.append(site.source)
    output = next(n for n in work.graph.nodes if n.op == "output")
    original = output.args[0]
    if not isinstance(original, (tuple, list)):
        original = (original,)
    output.args = (tuple(original) + tuple(pairs),)
    work.graph.lint()
    work.recompile()
    return work, sources


def _finite_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``a`` and ``b`` in float64 with their NaNs zeroed, or None when the NaNs are not in the same places."""
    a64, b64 = a.detach().double(), b.detach().double()
    if not torch.equal(torch.isnan(a64), torch.isnan(b64)):
        return None
    return a64.nan_to_num(), b64.nan_to_num()


def _compare(a: torch.Tensor, b: torch.Tensor) -> tuple[bool, str]:
    atol, rtol = TOLERANCE.get(a.dtype, (1e-4, 1e-4))
    pair = _finite_pair(a, b)
    if pair is None:
        return False, "NaN positions differ"
    a64, b64 = pair
    diff = (a64 - b64).abs()
    bound = atol + rtol * b64.abs()
    worst = diff.max().item() if diff.numel() else 0.0
    ok = bool((diff <= bound).all())
    return ok, f"max abs diff {worst:.3g} (tolerance {atol:g} + {rtol:g}*|x|, {a.dtype})"


def _compare_fp8(fused: torch.Tensor, original: torch.Tensor) -> tuple[bool, str]:
    """An FP8 site against the original: NaN in the same places, relative RMS within the scheme's bound."""
    from flashfuse import fp8
    from flashfuse.passes import fp8_scheme_name

    scheme = fp8_scheme_name()
    bound = fp8.SCHEME_BOUNDS.get(scheme, max(fp8.SCHEME_BOUNDS.values()))
    pair = _finite_pair(fused, original)
    if pair is None:
        return False, "NaN positions differ"
    a, b = pair
    err = fp8.relative_rms_error(a, b) if bool(b.norm() > 0) else (a - b).abs().max().item()
    return err <= bound, f"relative RMS {err:.3g} (FP8 scheme {scheme}: bound {bound:g})"


class VerifyingFunction:
    """Calls the compiled rewritten graph, after checking it once against the original on real inputs."""

    def __init__(self, compiled: Callable, side_by_side: fx.GraphModule, n_outputs: int, sources: list[str],
                 compile_original: Callable[[], Callable], report: GraphReport):
        self.compiled = compiled
        self.side_by_side = side_by_side
        self.n_outputs = n_outputs
        self.sources = sources
        self.compile_original = compile_original
        self.report = report
        self.checked = False

    def __call__(self, *args):
        if not self.checked:
            self.checked = True
            self._check(list(args))
        return self.compiled(*args)

    def _check(self, args) -> None:
        with torch.no_grad():
            outs = self.side_by_side(*args)
        extra = list(outs)[self.n_outputs:]
        failed = []
        rewritten = [s for s in self.report.sites if s.rewritten]
        for i, source in enumerate(self.sources):
            site = rewritten[i] if i < len(rewritten) else None
            if site is not None and site.flags.get("dropout"):
                # both sides draw their own random dropout masks: nothing to compare
                site.flags["verified"] = "skipped (dropout in training mode is random)"
                continue
            compare = _compare_fp8 if site is not None and site.flags.get("fp8") else _compare
            ok, detail = compare(extra[2 * i + 1], extra[2 * i])
            if site is not None:
                site.flags["verified"] = ok
            if not ok:
                failed.append((source, detail, site))
        if not failed:
            log.info("flashfuse: graph %d: verify passed for %d site(s)", self.report.graph, len(self.sources))
            return
        for source, detail, site in failed:
            log.warning("flashfuse: graph %d: verify failed at %s: %s", self.report.graph, source, detail)
        for site in rewritten:
            site.rewritten = False
            bad = [d for s, d, st in failed if st is site]
            site.reason = (f"verify failed: {bad[0]}" if bad else
                           "verify failed at another site of this graph; the graph runs unrewritten")
        self.report.fallback = "verify failed: " + "; ".join(f"{s}: {d}" for s, d, _ in failed)
        self.report.inductor_patches = {}  # the original is compiled with the user's options only
        warnings.warn(f"flashfuse: verify failed in graph {self.report.graph} ({failed[0][0]}: {failed[0][1]}); "
                      "this graph now runs without the rewrite", RuntimeWarning, stacklevel=3)
        self.compiled = self.compile_original()


def tolerance_note(dtype: torch.dtype) -> str:
    atol, rtol = TOLERANCE.get(dtype, (math.nan, math.nan))
    return f"atol={atol:g}, rtol={rtol:g}"
