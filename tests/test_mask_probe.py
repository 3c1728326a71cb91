"""The op's runtime mask probe (``ops._probe_mask``): a dense mask tensor whose values are exactly the causal band
(or keep everything) runs the mask-free computation, with the same result; anything else keeps the mask.

On the CPU the probe is off by default (``_PROBE_DEVICES``: the fast paths it unlocks are CUDA's); these tests turn
it on for the CPU and watch which arguments reach the Triton kernels (under the interpreter).
"""

from __future__ import annotations

import math

import pytest
import torch

from flashfuse import ops
from flashfuse.kernels import flash_bwd, flash_fwd
from flashfuse.testing import attention_ref

S, D = 37, 16  # S > 16: shorter query blocks are decode steps, never probed


@pytest.fixture
def probe_on_cpu(monkeypatch):
    monkeypatch.setattr(ops, "_PROBE_DEVICES", ("cuda", "cpu"))
    calls = {"fwd": [], "bwd": []}
    fwd, bwd = flash_fwd.flash_attention_forward, flash_bwd.flash_attention_backward

    def spy_fwd(q, k, v, mask, **kw):
        calls["fwd"].append((mask, kw.get("window_left"), kw.get("window_right")))
        return fwd(q, k, v, mask, **kw)

    def spy_bwd(grad_out, q, k, v, mask, *a, **kw):
        calls["bwd"].append((mask, kw.get("window_left"), kw.get("window_right")))
        return bwd(grad_out, q, k, v, mask, *a, **kw)

    monkeypatch.setattr(flash_fwd, "flash_attention_forward", spy_fwd)
    monkeypatch.setattr(flash_bwd, "flash_attention_backward", spy_bwd)
    return calls


def _qkv(groups=1, seq_k=S):
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 4, S, D, generator=g).requires_grad_(True)
    k, v = (torch.randn(2, 4 // groups, seq_k, D, generator=g).requires_grad_(True) for _ in range(2))
    return q, k, v


def _causal(seq_k=S):
    return torch.arange(seq_k)[None, :] <= torch.arange(S)[:, None]


def _run(q, k, v, mask, fill=-math.inf, probe=True):
    # probe_mask=True: what the rewrite passes for a mask that is a graph input (or views one)
    out = torch.ops.flashfuse.attention(q, k, v, mask, 0.25, None, None, fill, 0.0, None, 0.0, False, probe)[0]
    g = torch.randn_like(out)
    return out, torch.autograd.grad(out, (q, k, v), g), g


MIN32 = torch.finfo(torch.float32).min
CAUSAL_MASKS = {
    "bool": lambda c: c[None, None].expand(2, 1, S, S),
    "additive_-inf": lambda c: torch.zeros(2, 1, S, S).masked_fill(~c, -math.inf),
    "additive_min": lambda c: torch.zeros(1, 1, S, S).masked_fill(~c, MIN32),  # HF's eager mask
    "additive_min_bf16": lambda c: torch.zeros(2, 1, S, S, dtype=torch.bfloat16).masked_fill(
        ~c, torch.finfo(torch.bfloat16).min),
}


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("kind", list(CAUSAL_MASKS))
def test_a_causal_mask_tensor_runs_as_the_causal_band(kind, groups, probe_on_cpu):
    q, k, v = _qkv(groups)
    mask = CAUSAL_MASKS[kind](_causal())
    if mask.dtype == torch.bfloat16:
        q, k, v = (t.detach().bfloat16().requires_grad_(True) for t in (q, k, v))
    fill = -math.inf if kind != "additive_min" else MIN32
    out, _, _ = _run(q, k, v, mask, fill)
    # the kernels saw no mask and the causal band, forward and backward
    assert probe_on_cpu["fwd"] == [(None, None, 0)] and probe_on_cpu["bwd"] == [(None, None, 0)]
    assert list(ops._MASK_PROBES[id(ops._probe_root(mask))][2].values()) == ["causal"]
    # the same result as the mask computed the long way (reference with the mask, float64)
    ref, _ = attention_ref(*(t.detach().double() for t in (q, k, v)), mask.double() if mask.dtype != torch.bool
                           else mask, scale=0.25)
    tol = 1e-5 if q.dtype == torch.float32 else 2e-2
    assert (out.double() - ref).abs().max().item() < tol
    # and bit-equal to asking for the causal band directly
    out_band = torch.ops.flashfuse.attention(q, k, v, None, 0.25, None, 0, fill, 0.0)[0]
    assert torch.equal(out, out_band)


def test_probed_gradients_equal_the_mask_path(probe_on_cpu, monkeypatch):
    """Gradients through the probe (band kernels) = gradients with the probe off (mask kernels), same g."""
    q, k, v = _qkv(2)
    mask = torch.zeros(2, 1, S, S).masked_fill(~_causal(), MIN32)
    out = torch.ops.flashfuse.attention(q, k, v, mask, 0.25, None, None, MIN32, 0.0, None, 0.0, True, True)[0]
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    assert probe_on_cpu["bwd"][-1] == (None, None, 0)
    monkeypatch.setenv("FLASHFUSE_MASK_PROBE", "0")
    out2 = torch.ops.flashfuse.attention(q, k, v, mask, 0.25, None, None, MIN32, 0.0, None, 0.0, True, True)[0]
    want = torch.autograd.grad(out2, (q, k, v), g)
    assert probe_on_cpu["bwd"][-1][0] is mask
    assert (out - out2).abs().max().item() < 1e-6
    for a, b in zip(got, want):
        assert (a - b).abs().max().item() < 1e-5 * max(1.0, b.abs().max().item())


def test_a_mask_that_keeps_everything_runs_unmasked(probe_on_cpu):
    q, k, v = _qkv()
    mask = torch.zeros(1, 4, S, S)
    _run(q, k, v, mask)
    assert probe_on_cpu["fwd"] == [(None, None, None)] and probe_on_cpu["bwd"] == [(None, None, None)]


def _almost_causal_one_more_masked():
    c = _causal().clone()
    c[5, 2] = False
    return c[None, None]


def _causal_rectangular():
    return _causal(S + 3)[None, None]


NOT_BANDS = {
    # one key masked inside the band
    "one_more_masked": (_almost_causal_one_more_masked, S),
    # masked values not far enough below (-1e20 > -1e30): the weights are not provably 0
    "weak_fill": (lambda: torch.zeros(1, 1, S, S).masked_fill(~_causal(), -1e20), S),
    # kept values not exactly 0
    "bias": (lambda: torch.full((1, 1, S, S), 0.5).masked_fill(~_causal(), -math.inf), S),
    # broadcast along the queries: a padding mask, not probed
    "padding": (lambda: torch.ones(2, 1, 1, S, dtype=torch.bool), S),
    # causal in the top-left sense over Sk = S + 3 keys: probed (dense) and is the band j <= i
    "rectangular": (_causal_rectangular, S + 3),
}


@pytest.mark.parametrize("name", list(NOT_BANDS))
def test_other_masks_stay_masks(name, probe_on_cpu):
    make, seq_k = NOT_BANDS[name]
    q, k, v = _qkv(seq_k=seq_k)
    mask = make()
    out, _, _ = _run(q, k, v, mask)
    seen_mask, wl, wr = probe_on_cpu["fwd"][0]
    if name == "rectangular":
        assert (seen_mask, wl, wr) == (None, None, 0)
    else:
        assert seen_mask is mask and (wl, wr) == (None, None)
        assert probe_on_cpu["bwd"][0][0] is mask
    m = mask if mask.dtype == torch.bool else mask.double()
    ref, _ = attention_ref(*(t.detach().double() for t in (q, k, v)), m, scale=0.25)
    assert (out.double() - ref).abs().max().item() < 1e-5


def test_the_verdict_is_cached_per_tensor_and_version(probe_on_cpu, monkeypatch):
    q, k, v = _qkv()
    mask = _causal()[None, None].clone()
    syncs = []
    original = ops._probe_mask.__globals__["torch"].stack

    def counting_stack(*a, **kw):
        syncs.append(1)
        return original(*a, **kw)

    monkeypatch.setattr(torch, "stack", counting_stack)
    _run(q, k, v, mask)
    _run(q, k, v, mask)
    assert len(syncs) == 1  # two forwards and two backwards, one look at the values
    mask[0, 0, 5, 2] = False  # in place: a new version, probed again, no longer causal
    out, _, _ = _run(q, k, v, mask)
    assert len(syncs) == 2 and probe_on_cpu["fwd"][-1][0] is mask
    ref, _ = attention_ref(*(t.detach().double() for t in (q, k, v)), mask, scale=0.25)
    assert (out.double() - ref).abs().max().item() < 1e-5


def test_a_mask_that_needs_its_gradient_is_not_probed(probe_on_cpu):
    q, k, v = _qkv()
    mask = torch.zeros(1, 1, S, S).masked_fill(~_causal(), -math.inf).requires_grad_(True)
    out = torch.ops.flashfuse.attention(q, k, v, mask, 0.25, None, None, -math.inf, 0.0, None, 0.0, False, True)[0]
    out.sum().backward()
    assert probe_on_cpu["fwd"][0][0] is mask and probe_on_cpu["bwd"][0][0] is mask
    assert mask.grad is not None and torch.isfinite(mask.grad[_causal()[None, None]]).all()


def test_off_on_the_cpu_by_default():
    q, k, v = _qkv()
    assert ops._probe_mask(q, k, _causal()[None, None]) is None


def test_not_asked_not_probed(probe_on_cpu):
    """Without ``probe_mask`` (a mask computed inside the graph, or a direct call) the mask is used as given."""
    q, k, v = _qkv()
    mask = _causal()[None, None]
    _run(q, k, v, mask, probe=False)
    assert probe_on_cpu["fwd"][0][0] is mask and probe_on_cpu["bwd"][0][0] is mask


def test_inference_tensors_and_decode_steps_are_not_probed(probe_on_cpu):
    q, k, v = _qkv()
    with torch.inference_mode():
        mask = _causal()[None, None].clone()
        out = torch.ops.flashfuse.attention(q.detach(), k.detach(), v.detach(), mask, 0.25, None, None, -math.inf,
                                            0.0, None, 0.0, False, True)[0]
    assert probe_on_cpu["fwd"][-1][0] is mask  # no version counter to cache on: used as given
    assert torch.isfinite(out).all()
    q1 = q[:, :, :1].detach()
    assert ops._probe_mask(q1, k, torch.ones(1, 1, 1, S, dtype=torch.bool)) is None


def test_a_broadcast_mask_is_probed_on_its_one_copy(probe_on_cpu):
    q, k, v = _qkv()
    mask = _causal()[None, None].expand(2, 4, S, S)  # stride 0 on batch and heads
    _run(q, k, v, mask)
    assert probe_on_cpu["fwd"] == [(None, None, 0)]


def _sdpa_like(q, k, v, m):
    s = q @ k.transpose(-2, -1) * 0.25 + m[:, :, : q.shape[-2], : k.shape[-2]]
    return torch.softmax(s, dim=-1) @ v


def test_the_rewrite_asks_for_a_probe_only_for_graph_inputs(probe_on_cpu):
    """A mask argument of the compiled function (sliced: a view) is probed: the kernels see the band. The same
    mask computed inside the graph is not (Inductor may reuse an intermediate's buffer for another mask without
    a version bump, which a cached verdict would not see)."""
    q, k, v = (t.detach() for t in _qkv())
    big = torch.zeros(1, 1, S + 5, S + 5).masked_fill(~(torch.arange(S + 5)[None, :] <= torch.arange(S + 5)[:, None]),
                                                   MIN32)
    torch._dynamo.reset()
    out = torch.compile(_sdpa_like, backend="flashfuse", options={"inductor": False})(q, k, v, big)
    assert probe_on_cpu["fwd"] == [(None, None, 0)]
    assert (out - _sdpa_like(q, k, v, big)).abs().max().item() < 1e-5

    def inner(q, k, v, n):
        i = torch.arange(n.shape[0])
        m = torch.where(i[None, :] <= i[:, None], 0.0, MIN32) * (n.sum() * 0 + 1)  # data-dependent: a dense mask
        return _sdpa_like(q, k, v, m[None, None])

    probe_on_cpu["fwd"].clear()
    torch._dynamo.reset()
    out = torch.compile(inner, backend="flashfuse", options={"inductor": False})(q, k, v, torch.ones(S))
    assert len(probe_on_cpu["fwd"]) == 1 and probe_on_cpu["fwd"][0][0] is not None
    assert (out - inner(q, k, v, torch.ones(S))).abs().max().item() < 1e-5
