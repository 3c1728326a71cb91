"""transformers 5.17's mask construction, written out by hand (CI has a newer transformers).

transformers <= 5.17 turns its boolean keep-mask into the additive eager mask with
``torch.where(mask, torch.tensor(0.0, device=..., dtype=dtype), torch.finfo(dtype).min)``; 5.18+ writes the 0 as
``torch.zeros((), ...)``. Dynamo puts the 0-dim ``torch.tensor`` call into the graph as it is
(``call_function torch.tensor(0.0, dtype=...)``). The mask prover did not know that op, so the whole mask was a
dense additive tensor: every causal LM lost its causal / sliding-window flags under 5.17 (the GPU training tests
of Llama, left-padded Llama, Gemma 2 and T5 reported ``causal=False, mask=additive, dense_mask=True``). These
tests rebuild 5.17's ``sdpa_mask`` (non-vmap path: aranges plus offsets, index comparisons, ``and_masks`` starting
from ``q_idx.new_ones((), dtype=bool)``, ``padding_mask[batch_idx, kv_idx]``, ``expand``) and ``eager_mask``, and
check that the flags are the ones transformers 5.24's spelling gets.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import assert_matches_eager, compile_and_report, only_site, qkv
from tests.passes.test_patterns import check

FMIN = torch.finfo(torch.float32).min


def hf517_eager_mask(batch: int, q_len: int, kv_len: int, *, padding=None, window=None, q_offset=0, kv_offset=0,
                     dtype=torch.float32, zero=None):
    """transformers 5.17 ``masking_utils.sdpa_mask`` (``use_vmap=False``) then ``eager_mask``. ``zero``: another value
    in place of 5.17's ``torch.tensor(0.0, dtype=dtype)`` (negative tests).

    NOTE: 0.0 is a literal here, as in transformers: a float read from a variable (a default argument) becomes a
    graph input under ``dynamic=True``, and a value read from an input is data, never proven 0."""
    batch_arange = torch.arange(batch)
    q_arange = torch.arange(q_len) + q_offset
    kv_arange = torch.arange(kv_len) + kv_offset
    b_idx = batch_arange[:, None, None, None]
    q_idx = q_arange[None, None, :, None]
    kv_idx = kv_arange[None, None, None, :]
    # and_masks(causal_mask_function, sliding_window_overlay(window), padding_mask_function(padding))
    keep = q_idx.new_ones((), dtype=torch.bool)
    keep = keep & (kv_idx <= q_idx)
    if window is not None:
        keep = keep & (kv_idx > q_idx - window)
    if padding is not None:
        keep = keep & padding.to(torch.bool)[b_idx, kv_idx]
    keep = keep.expand(batch, -1, q_len, kv_len)
    return torch.where(keep, torch.tensor(0.0 if zero is None else zero, device=keep.device, dtype=dtype),
                       torch.finfo(dtype).min)


def llama_attention(q, k, v, padding=None, window=None):
    mask = hf517_eager_mask(q.shape[0], q.shape[-2], k.shape[-2], padding=padding, window=window)
    s = torch.matmul(q, k.transpose(2, 3)) * 0.25 + mask
    return torch.matmul(F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), v)


def test_llama_causal_mask_is_the_causal_flag():
    rep = check(llama_attention, *qkv(S=20),
                flags={"causal": True, "window_left": None, "window_right": 0, "mask": "none", "dense_mask": False})
    assert "constant_fill" in only_site(rep).flags["structure"]


def test_llama_left_padding_is_the_causal_flag_and_a_bool_key_mask():
    padding = torch.ones(2, 20, dtype=torch.long)
    padding[0, :5] = 0  # left padding: fully masked query rows (mean of v, as eager)
    rep = check(llama_attention, *qkv(S=20), padding,
                flags={"causal": True, "window_right": 0, "mask": "bool", "mask_fill": FMIN, "dense_mask": False})
    assert "data_atom" in only_site(rep).flags["structure"]


def test_gemma2_sliding_window_with_softcap_is_window_flags():
    W = 6

    def fn(q, k, v):
        mask = hf517_eager_mask(q.shape[0], q.shape[-2], k.shape[-2], window=W)
        s = torch.matmul(q, k.transpose(2, 3)) * 24 ** -0.5
        s = torch.tanh(s / 50.0) * 50.0
        s = s + mask
        return torch.matmul(F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), v)

    check(fn, *qkv(S=20), flags={"causal": False, "window_left": W - 1, "window_right": 0, "mask": "none",
                                 "softcap": 50.0})


def test_t5_decoder_trainable_bias_plus_causal_mask():
    """T5's decoder: scores + position_bias (trainable, [1, H, S, S]) + the causal mask: the band becomes the causal
    flag, the bias stays an additive mask and gets its gradient."""
    S, H = 12, 4
    bias = torch.randn(1, H, S, S, requires_grad=True)

    def fn(q, k, v):
        mask = hf517_eager_mask(q.shape[0], S, S)
        s = torch.matmul(q, k.transpose(3, 2))
        s = s + bias
        s = s + mask
        return torch.matmul(F.softmax(s.float(), dim=-1).type_as(s), v)

    q, k, v = (t.requires_grad_(True) for t in qkv(S=S, H=H))
    out, rep = compile_and_report(fn, q, k, v)
    flags = only_site(rep).flags
    assert rep.rewritten == 1, str(rep)
    assert (flags["causal"], flags["mask"], flags["bias_grad"]) == (True, "additive", True), flags
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, bias), g)
    want = torch.autograd.grad(fn(q, k, v), (q, k, v, bias), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_falcon_alibi_with_the_causal_mask_folded_in_keeps_the_band():
    """Falcon: ``masked_fill(alibi / sqrt(d), causal_mask < -1, min)`` on 5.17's additive causal mask."""
    B, H, S = 2, 4, 16

    def fn(q, k, v, slopes):
        causal_mask = hf517_eager_mask(B, S, S)
        alibi = (slopes[None, :, None, None] * torch.arange(S)[None, None, None, :]).expand(B, H, 1, S)
        bias = torch.masked_fill(alibi / 4.0, causal_mask < -1, FMIN)
        s = torch.matmul(q, k.transpose(-1, -2)) * 0.25
        return F.softmax(s + bias, dim=-1) @ v

    q, k, v = qkv(B=B, H=H, S=S)
    check(fn, q, k, v, -torch.rand(H), flags={"causal": True, "mask": "additive", "dense_mask": False})


def test_decode_step_offset_is_a_band_not_a_mask():
    """One query row at offset ``past`` against ``past + 1`` keys (a KV-cache decode step): no mask is read."""
    past = 9

    def fn(q, k, v):
        mask = hf517_eager_mask(q.shape[0], 1, k.shape[-2], q_offset=past)
        s = torch.matmul(q, k.transpose(2, 3)) * 0.25 + mask
        return torch.matmul(F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), v)

    rep = check(fn, *qkv(S=1, Sk=past + 1))
    assert only_site(rep).flags["mask"] == "none", str(rep)


def test_symbolic_lengths_keep_the_causal_flag():
    """``dynamic=True``: the aranges and the expand have symbolic sizes; ``torch.tensor(0.0)`` is still 0."""
    from flashfuse import report as _report

    torch._dynamo.reset()
    mark = _report.collect()
    compiled = torch.compile(llama_attention, backend="flashfuse", dynamic=True, options={"inductor": False})
    for S in (11, 19):
        args = qkv(S=S)
        assert_matches_eager(llama_attention, args, compiled(*args))
    rep = _report.last_report(since=mark)
    assert rep.rewritten == rep.total >= 1, str(rep)
    for site in rep.sites:
        assert site.flags["causal"] is True and site.flags["mask"] == "none", site.flags


# -- never a band without proof -------------------------------------------------------------------------
@pytest.mark.parametrize("zero", [0.5, -1e-30])
def test_a_nonzero_scalar_tensor_inside_the_band_stays_a_dense_mask(zero):
    """``where(keep, torch.tensor(z), min)`` with ``z != 0`` adds ``z`` inside the band: not a band, read as is."""
    def fn(q, k, v):
        mask = hf517_eager_mask(q.shape[0], q.shape[-2], k.shape[-2], zero=zero)
        return F.softmax(q @ k.transpose(-2, -1) * 0.25 + mask, dim=-1) @ v

    rep = check(fn, *qkv(S=16), flags={"causal": False, "window_right": None, "mask": "additive"})
    assert only_site(rep).flags["dense_mask"] is True


@pytest.mark.parametrize("dtype,band", [(torch.float16, True), (torch.float32, False)])
def test_scalar_tensor_value_is_the_one_its_dtype_holds(dtype, band):
    """``torch.tensor(1e-9, dtype=float16)`` holds exactly 0 (below fp16's smallest subnormal): a band; in float32
    it holds 1e-9, which is not 0: a dense mask."""
    def fn(q, k, v):
        mask = hf517_eager_mask(q.shape[0], q.shape[-2], k.shape[-2], dtype=dtype, zero=1e-9)
        return F.softmax(q @ k.transpose(-2, -1) * 0.25 + mask, dim=-1) @ v

    assert (torch.tensor(1e-9, dtype=dtype).item() == 0) is band
    rep = check(fn, *qkv(S=16, dtype=dtype))
    flags = only_site(rep).flags
    assert flags["causal"] is band and (flags["mask"] == "none") is band, flags
