"""Shared checks of the real-model conformance suite (tests/models).

Each check raises its own ``AssertionError`` subclass so that an ``xfail(strict=True, raises=...)`` mark
expects exactly one known gap and nothing else: numerics failures are plain ``AssertionError`` and always
fail, and a gap that closes turns the test into XPASS, i.e. a failure that asks for the mark to go.
Order of the checks: numerics, then every site rewritten, then the Triton kernel, then mask structure.
"""

from __future__ import annotations

import copy
import linecache

import torch

from flashfuse import report as _report
from tests.helpers import compile_and_report

# softmaxes that are not attention (MoE routers): never counted as attention sites
NOT_ATTENTION = ("router",)


class NotAllRewritten(AssertionError):
    """Some attention site was left alone (near-miss) or a graph fell back."""


class ReferenceKernel(AssertionError):
    """A rewritten site runs the float32 reference instead of the Triton kernel."""


class DenseMask(AssertionError):
    """A rewritten site reads a dense float mask where the structure is a band (+ per-key padding)."""


def _code_line(source: str) -> str:
    path, _, line = source.rpartition(":")
    return linecache.getline(path, int(line)) if line.isdigit() else ""


def attention_sites(report):
    return [s for s in report.sites if not any(w in _code_line(s.source) for w in NOT_ATTENTION)]


def assert_all_rewritten(report, expected: int):
    """Every attention site of every graph was rewritten, and there are ``expected`` of them."""
    sites = attention_sites(report)
    left = [s for s in sites if not s.rewritten]
    if left or report.fallbacks:
        raise NotAllRewritten(f"{len(sites) - len(left)}/{len(sites)} attention sites rewritten; first reason: "
                              f"{left[0].reason if left else report.fallbacks[0]}\n{report}")
    assert len(sites) == expected, f"{len(sites)} attention sites, expected {expected}\n{report}"


def assert_triton_kernel(report):
    """Every rewritten site runs the Triton kernel (under the interpreter on the CPU), not the reference."""
    for s in attention_sites(report):
        kernel = str(s.flags.get("kernel", "flash_fwd"))
        if not kernel.startswith("flash_fwd"):
            raise ReferenceKernel(f"{s.source}: kernel {kernel!r}")


def mask_terms(flags) -> list[str]:
    """``"none"`` -> [], ``"2xadditive"`` -> ["additive", "additive"], ``"bool+additive"`` -> ["bool", "additive"]."""
    mask = str(flags.get("mask", "none"))
    if mask == "none":
        return []
    terms = []
    for part in mask.split("+"):
        n, _, kind = part.rpartition("x") if part[:1].isdigit() else ("1", "", part)
        terms += [kind] * int(n)
    return terms


def assert_structure(report, *, band: bool, biases: int = 0):
    """Causal self-attention: the band is recognized (``band``: causal or window flags) and no dense float
    mask is read beyond ``biases`` genuine additive biases (ALiBi), and no mask varies along the query dim (a
    dense Sq x Sk read); padding may come as a boolean per-key mask."""
    for s in attention_sites(report):
        f = s.flags
        has_band = bool(f.get("causal")) or f.get("window_left") is not None or f.get("window_right") is not None
        additive = mask_terms(f).count("additive")
        if (band and not has_band) or additive > biases or f.get("dense_mask"):
            raise DenseMask(f"{s.source}: causal={f.get('causal')} window=({f.get('window_left')}, "
                            f"{f.get('window_right')}) mask={f.get('mask')} dense={f.get('dense_mask')} (expected {'a band, ' if band else ''}"
                            f"at most {biases} additive bias)")


def assert_close(out: torch.Tensor, ref: torch.Tensor, what: str = "logits"):
    """float32: max |out - ref| <= 1e-4 * max(1, max |ref|), same shape, same NaN positions."""
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.equal(out.isnan(), ref.isnan()), f"{what}: NaN positions differ"
    scale = max(1.0, ref.nan_to_num().abs().max().item())
    err = (out - ref).nan_to_num().abs().max().item()
    assert err <= 1e-4 * scale, f"{what}: max error {err:.3g} (logit scale {scale:.3g})"


def _compile_and_report(fn, args, dynamic):
    if dynamic is None:
        return compile_and_report(fn, *args)
    torch._dynamo.reset()
    mark = _report.collect()
    out = torch.compile(fn, backend="flashfuse", dynamic=dynamic, options={"inductor": False})(*args)
    return out, _report.last_report(since=mark)


def check_forward(fn, args, expected_sites: int, *, grad: bool = False, structure: dict | None = None,
                  dynamic: bool | None = None):
    with torch.set_grad_enabled(grad):
        out, report = _compile_and_report(fn, args, dynamic)
        ref = fn(*args)
    assert_close(out.detach(), ref.detach())
    assert_all_rewritten(report, expected_sites)
    assert_triton_kernel(report)
    if structure is not None:
        assert_structure(report, **structure)
    return report


def check_decode(model, kind, *, padded: bool, expected_sites: int, steps: int = 2, dynamic: bool | None = None,
                 structure: dict | None = None):
    """Greedy decode, q_len=1 per step, from an eagerly prefilled KV cache: compiled vs eager, step by step.

    With ``dynamic=None`` step 2 has a longer cache than step 1, so Dynamo recompiles with dynamic shapes, as
    in real generation: every graph counts. ``dynamic=True`` gets the symbolic graph in one compile.
    """
    from tests.models import zoo

    cache, ids, mask, enc = zoo.prefill(model, kind, padded=padded)
    fn = zoo.step_fn(model, kind)
    cache_c, cache_e = copy.deepcopy(cache), cache
    torch._dynamo.reset()
    mark = _report.collect()
    compiled = torch.compile(fn, backend="flashfuse", dynamic=dynamic, options={"inductor": False})
    with torch.no_grad():
        for step in range(steps):
            out = compiled(ids, mask, cache_c, enc)
            ref = fn(ids, mask, cache_e, enc)
            assert_close(out, ref, f"decode step {step}")
            ids, mask = ref[:, -1:].argmax(-1), zoo.grow(kind, mask)
    report = _report.last_report(since=mark)
    assert_all_rewritten(report, expected_sites * len(report.graphs))
    assert_triton_kernel(report)
    if structure is not None:
        assert_structure(report, **structure)
    return report
