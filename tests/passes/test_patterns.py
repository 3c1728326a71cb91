"""Every spelling of naive attention the vertical slice promises: the site is rewritten AND matches eager.

Each test compiles plain PyTorch code with ``backend="flashfuse"`` and checks the match report (count,
flags) and the output against eager and a float64 run of the same code.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from flashfuse import report as _report
from tests.helpers import assert_matches_eager, compile_and_report, only_site, qkv

NEG_INF = float("-inf")


def check(fn, *args, flags=None, rewritten=1, total=None, **options):
    out, rep = compile_and_report(fn, *args, **options)
    assert not rep.fallbacks, str(rep)
    assert rep.rewritten == rewritten, str(rep)
    if total is not None:
        assert rep.total == total, str(rep)
    for key, want in (flags or {}).items():
        got = only_site(rep).flags[key]
        if isinstance(want, float):
            assert got == pytest.approx(want, rel=1e-9), (key, got, want)
        else:
            assert got == want, (key, got, want)
    assert_matches_eager(fn, args, out)
    return rep


# -- a. matmul spellings and scales -------------------------------------------------------------------
def attn_div_sqrt(q, k, v):
    s = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    return torch.matmul(s.softmax(dim=-1), v)


def attn_mul_pow(q, k, v):
    s = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    return s.softmax(-1) @ v


def attn_scale_q_first(q, k, v):
    q = q * (q.shape[-1] ** -0.5)
    return torch.softmax(q @ k.transpose(2, 3), dim=3) @ v


def attn_split_scale(q, k, v):
    s = q.shape[-1] ** -0.25
    return F.softmax((q * s) @ (k * s).transpose(-1, -2), dim=-1) @ v


def attn_mT_and_t(q, k, v):
    return F.softmax(torch.matmul(q, k.mT) * 0.3, dim=-1).matmul(v)


def attn_einsum(q, k, v):
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * 0.25
    return torch.einsum("bhqk,bhkd->bhqd", s.softmax(-1), v)


def attn_einsum_bshd(q, k, v):
    # q, k, v in [B, S, H, D]; output [B, S, H, D]
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * 0.25
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


def attn_permute_k(q, k, v):
    # k in [B, S, H, D] permuted straight to [B, H, D, S]
    s = q @ k.permute(0, 2, 3, 1) * 0.25
    return s.softmax(-1) @ v


@pytest.mark.parametrize("fn,scale", [
    (attn_div_sqrt, 16 ** -0.5), (attn_mul_pow, 16 ** -0.5), (attn_scale_q_first, 16 ** -0.5),
    (attn_split_scale, 16 ** -0.5), (attn_mT_and_t, 0.3), (attn_einsum, 0.25),
])
def test_matmul_and_scale_spellings(fn, scale):
    check(fn, *qkv(S=19, D=16), flags={"scale": scale, "causal": False, "mask": "none"})


def test_mul_and_div_by_same_scale_match_alike():
    c = 8.0

    def by_div(q, k, v):
        return (q @ k.transpose(-2, -1) / c).softmax(-1) @ v

    def by_mul(q, k, v):
        return (q @ k.transpose(-2, -1) * (1 / c)).softmax(-1) @ v

    args = qkv(S=17)
    check(by_div, *args, flags={"scale": 1 / c})
    check(by_mul, *args, flags={"scale": 1 / c})


def test_einsum_bshd_layout():
    q, k, v = (t.transpose(1, 2) for t in qkv(S=21))  # [B, S, H, D] views
    check(attn_einsum_bshd, q, k, v, flags={"scale": 0.25})


def test_permuted_k():
    q, k, v = qkv(S=18)
    check(attn_permute_k, q, k.transpose(1, 2).contiguous(), v)


def test_bmm_on_flattened_heads():
    def fn(q, k, v):  # [B*H, S, D]
        s = torch.bmm(q, k.transpose(1, 2)) * 0.25
        return torch.bmm(F.softmax(s, dim=-1), v)

    q, k, v = (t.reshape(-1, t.shape[-2], t.shape[-1]) for t in qkv(S=23))
    check(fn, q, k, v, flags={"rank": 3, "scale": 0.25})


def test_baddbmm_with_zero_beta():
    def fn(q, k, v):
        empty = torch.empty(q.shape[0], q.shape[1], k.shape[1], dtype=q.dtype)
        s = torch.baddbmm(empty, q, k.transpose(-1, -2), beta=0, alpha=0.125)
        return torch.bmm(s.softmax(-1), v)

    q, k, v = (t.reshape(-1, t.shape[-2], t.shape[-1]) for t in qkv(S=20, D=32))
    check(fn, q, k, v, flags={"scale": 0.125})


def test_inplace_scale_and_mask():
    def fn(q, k, v, m):
        s = q @ k.transpose(-2, -1)
        s *= 0.25
        s.masked_fill_(~m, NEG_INF)
        return s.softmax(-1) @ v

    q, k, v = qkv(S=16)
    m = torch.rand(2, 1, 16, 16) > 0.3
    m[..., 0] = True
    check(fn, q, k, v, m, flags={"mask": "bool", "scale": 0.25})


# -- b. softmax spellings and float32 softmax with a cast back ------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cast", ["to", "type_as", "float_then_to"])
def test_fp32_softmax_with_cast_back(dtype, cast):
    def fn(q, k, v):
        s = q @ k.transpose(-2, -1) * 0.25
        if cast == "to":
            p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        elif cast == "type_as":
            p = torch.softmax(s, -1, dtype=torch.float32).type_as(q)
        else:
            p = s.float().softmax(-1).to(v.dtype)
        return p @ v

    check(fn, *qkv(S=33, D=32, dtype=dtype), flags={"dtype": str(dtype).replace("torch.", "")})


# -- c. additive and boolean masks -----------------------------------------------------------------
@pytest.mark.parametrize("mask_shape", ["b11k", "b1qk", "qk"])
def test_additive_masks_broadcast(mask_shape):
    B, S = 2, 22
    shape = {"b11k": (B, 1, 1, S), "b1qk": (B, 1, S, S), "qk": (S, S)}[mask_shape]
    mask = torch.zeros(shape)
    mask.masked_fill_(torch.rand(shape) > 0.7, torch.finfo(torch.float32).min)

    def fn(q, k, v, mask):
        return ((q @ k.transpose(-2, -1)) * 0.25 + mask).softmax(-1) @ v

    check(fn, *qkv(B=B, S=S), mask, flags={"mask": "additive"})


def test_bool_mask_masked_fill_neg_inf():
    def fn(q, k, v, m):
        s = (q @ k.transpose(-2, -1)) * 0.25
        return s.masked_fill(~m, float("-inf")).softmax(-1) @ v

    m = torch.rand(2, 1, 1, 20) > 0.4
    m[..., 0] = True
    check(fn, *qkv(S=20), m, flags={"mask": "bool", "mask_fill": NEG_INF})


def test_bool_mask_eq_zero_finfo_min_with_fully_masked_rows():
    def fn(q, k, v, m):
        s = (q @ k.transpose(-2, -1)) * 0.25
        s = s.masked_fill(m == 0, torch.finfo(s.dtype).min)
        return F.softmax(s, dim=-1) @ v

    m = (torch.rand(2, 1, 20, 20) > 0.5).long()
    m[0, 0, 3] = 0  # a fully masked row: the original gives the mean of v
    out, rep = compile_and_report(fn, *qkv(S=20), m)
    assert rep.rewritten == 1, str(rep)


def test_where_mask_finfo_min():
    def fn(q, k, v, m):
        s = (q @ k.transpose(-2, -1)) * 0.25
        s = torch.where(m, s, torch.finfo(s.dtype).min)
        return s.softmax(-1) @ v

    m = torch.rand(2, 4, 20, 20) > 0.5
    m[1, 2, 7] = False  # fully masked row -> mean of v, as the original
    check(fn, *qkv(S=20), m, flags={"mask": "bool"})


def test_fully_masked_row_neg_inf_is_nan_like_original():
    def fn(q, k, v, m):
        s = (q @ k.transpose(-2, -1)) * 0.25
        return s.masked_fill(~m, NEG_INF).softmax(-1) @ v

    m = torch.rand(1, 1, 12, 12) > 0.5
    m[0, 0, 5] = False
    m[0, 0, 6, 0] = True
    q, k, v = qkv(B=1, H=2, S=12)
    out, rep = compile_and_report(fn, q, k, v, m)
    assert rep.rewritten == 1
    assert torch.isnan(out[0, :, 5]).all() and not torch.isnan(out[0, :, 6]).any()
    assert_matches_eager(fn, (q, k, v, m), out)


# -- d. causal structure proven from the graph ------------------------------------------------------
class NanoGPTAttention(torch.nn.Module):
    def __init__(self, C=64, H=4, T=48):
        super().__init__()
        self.qkv = torch.nn.Linear(C, 3 * C)
        self.proj = torch.nn.Linear(C, C)
        self.H = H
        self.drop = torch.nn.Dropout(0.1)
        self.register_buffer("bias", torch.tril(torch.ones(T, T)).view(1, 1, T, T))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.qkv(x).split(C, dim=2)
        k = k.view(B, T, self.H, C // self.H).transpose(1, 2)
        q = q.view(B, T, self.H, C // self.H).transpose(1, 2)
        v = v.view(B, T, self.H, C // self.H).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.drop(att)
        y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.proj(y)


def test_nanogpt_tril_buffer_is_causal_flag():
    model = NanoGPTAttention().eval()
    x = torch.randn(2, 29, 64)
    rep = check(model, x, flags={"causal": True, "mask": "none", "window_right": 0, "dropout": 0.0})
    assert "causal_from_tril_buffer" in only_site(rep).flags["structure"]


def test_additive_triu_neg_inf_is_causal_flag():
    def fn(q, k, v):
        T = q.shape[-2]
        mask = torch.triu(torch.full((T, T), float("-inf")), diagonal=1)
        return ((q @ k.transpose(-2, -1)) * 0.25 + mask).softmax(-1) @ v

    check(fn, *qkv(S=27), flags={"causal": True, "mask": "none"})


def test_arange_comparison_is_causal_flag():
    def fn(q, k, v):
        T = q.shape[-2]
        keep = torch.arange(T)[:, None] >= torch.arange(T)[None, :]
        s = torch.where(keep, q @ k.transpose(-2, -1) * 0.25, float("-inf"))
        return s.softmax(-1) @ v

    check(fn, *qkv(S=31), flags={"causal": True, "mask": "none"})


def test_tril_of_ones_built_in_forward():
    def fn(q, k, v):
        T = q.shape[-2]
        m = torch.tril(torch.ones(T, T, dtype=torch.bool))
        return (q @ k.transpose(-2, -1)).masked_fill(~m, NEG_INF).softmax(-1) @ v

    check(fn, *qkv(S=13), flags={"causal": True, "scale": 1.0})


# -- e. sliding window ------------------------------------------------------------------------------
def test_sliding_window_from_index_difference():
    W = 5

    def fn(q, k, v):
        T = q.shape[-2]
        i = torch.arange(T).view(-1, 1)
        j = torch.arange(T).view(1, -1)
        keep = (j <= i) & (i - j < W)  # Mistral: causal and keys within W of the query
        s = (q @ k.transpose(-2, -1)) * 0.25
        s = s.masked_fill(~keep, torch.finfo(s.dtype).min)
        return s.softmax(-1) @ v

    check(fn, *qkv(S=26), flags={"window_left": W - 1, "window_right": 0, "causal": False, "mask": "none"})


def test_sliding_window_tril_triu_of_ones():
    W = 4

    def fn(q, k, v):
        T = q.shape[-2]
        ones = torch.ones(T, T, dtype=torch.bool)
        keep = torch.tril(ones) & torch.triu(ones, diagonal=-W)
        s = torch.where(keep, q @ k.transpose(-2, -1) * 0.25, NEG_INF)
        return s.softmax(-1) @ v

    check(fn, *qkv(S=18), flags={"window_left": W, "window_right": 0})


# -- f. GQA / MQA ------------------------------------------------------------------------------------
def repeat_kv(x, n_rep):
    b, h, s, d = x.shape
    if n_rep == 1:
        return x
    x = x[:, :, None, :, :].expand(b, h, n_rep, s, d)
    return x.reshape(b, h * n_rep, s, d)


@pytest.mark.parametrize("hq,hkv", [(8, 2), (4, 1)])
def test_gqa_repeat_kv(hq, hkv):
    def fn(q, k, v):
        k = repeat_kv(k, q.shape[1] // k.shape[1])
        v = repeat_kv(v, q.shape[1] // v.shape[1])
        return ((q @ k.transpose(2, 3)) * 0.25).softmax(-1) @ v

    check(fn, *qkv(H=hq, Hkv=hkv, S=19), flags={"gqa_groups": hq // hkv})


def test_gqa_repeat_interleave():
    def fn(q, k, v):
        k = k.repeat_interleave(4, dim=1)
        v = torch.repeat_interleave(v, 4, dim=1)
        return ((q @ k.transpose(-2, -1)) * 0.25).softmax(-1) @ v

    check(fn, *qkv(H=8, Hkv=2, S=15), flags={"gqa_groups": 4})


def test_gqa_expanded_copies_leave_the_graph(tmp_path):
    def fn(q, k, v):
        k = repeat_kv(k, 4)
        v = repeat_kv(v, 4)
        return ((q @ k.transpose(2, 3)) * 0.25).softmax(-1) @ v

    compile_and_report(fn, *qkv(H=8, Hkv=2, S=16), debug_dir=str(tmp_path))
    (after_file,) = tmp_path.glob("graph_*/03_rewrite.py")
    after = after_file.read_text()
    assert "flashfuse.attention" in after
    assert "expand" not in after and "reshape" not in after


# -- g. dropout --------------------------------------------------------------------------------------
@pytest.mark.parametrize("p,inductor", [(0.1, False), (0.5, False), (0.2, True)])
def test_training_dropout_becomes_the_ops_dropout(p, inductor):
    """Training-mode dropout on the probabilities is the op's in-kernel dropout: with the same seed the compiled
    graph gives exactly what the op gives (one draw from torch's generator each), forward and gradients; the
    op's own dropout is tested for keep rate, unbiasedness and its mask in tests/kernels/test_dropout.py."""
    import flashfuse

    def fn(q, k, v):
        s = (q @ k.transpose(-2, -1)) * 0.25
        s = s.masked_fill(torch.ones(s.shape[-2], s.shape[-1], dtype=torch.bool).tril().logical_not(), NEG_INF)
        return F.dropout(s.softmax(-1), p=p, training=True) @ v

    q, k, v = (t.requires_grad_() for t in qkv(S=20, H=4))
    torch.manual_seed(1234)
    out, rep = compile_and_report(fn, q, k, v, inductor=inductor)
    site = only_site(rep)
    assert site.rewritten and site.flags["dropout"] == p and site.flags["causal"], str(rep)
    torch.manual_seed(1234)
    want = flashfuse.attention(q, k, v, scale=0.25, causal=True, dropout_p=p)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    g = torch.randn_like(out)
    got_grads = torch.autograd.grad(out, (q, k, v), g)
    want_grads = torch.autograd.grad(want, (q, k, v), g)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # about a fraction p of the kept probabilities were dropped: the output differs from p = 0
    assert not torch.allclose(out, flashfuse.attention(q, k, v, scale=0.25, causal=True), atol=1e-3)


# -- dropout in eval mode
def test_eval_dropout_is_identity():
    def fn(q, k, v):
        p = F.dropout(((q @ k.transpose(-2, -1)) * 0.25).softmax(-1), p=0.2, training=False)
        return p @ v

    check(fn, *qkv(S=14), flags={"dropout": 0.0})


# -- h. layouts -------------------------------------------------------------------------------------
def test_noncontiguous_bshd_inputs_and_output_reshape():
    def fn(x_q, x_k, x_v):
        B, T, H, D = x_q.shape
        q, k, v = (t.transpose(1, 2) for t in (x_q, x_k, x_v))
        y = (q @ k.transpose(-2, -1) * D ** -0.5).softmax(-1) @ v
        return y.transpose(1, 2).reshape(B, T, H * D)

    x = torch.randn(2, 25, 3, 3, 16)[:, :, :, 1]  # non-contiguous [B, T, H, D]
    check(fn, x, torch.randn(2, 25, 3, 16), torch.randn(2, 25, 3, 16))


def test_cross_attention_sq_ne_sk():
    check(attn_div_sqrt, *qkv(S=9, Sk=30))


def test_two_sites_in_one_graph():
    def fn(q, k, v):
        a = (q @ k.transpose(-2, -1) * 0.25).softmax(-1) @ v
        return (a @ k.transpose(-2, -1) * 0.25).softmax(-1) @ v

    check(fn, *qkv(S=12), rewritten=2, total=2)


def test_softcap_gemma2_style():
    cap = 5.0

    def fn(q, k, v):
        s = (q @ k.transpose(-2, -1)) * 0.5
        s = s / cap
        s = torch.tanh(s)
        s = s * cap
        T = q.shape[-2]
        causal = torch.triu(torch.full((T, T), float("-inf")), diagonal=1)
        return (s + causal).softmax(-1) @ v

    check(fn, *qkv(S=21), flags={"softcap": cap, "scale": 0.5, "causal": True})


def test_kv_broadcast_over_batch_and_heads():
    def fn(q, k, v):  # k, v: [1, 1, S, D] shared by every batch and head (MQA by broadcasting)
        return ((q @ k.transpose(-2, -1)) * 0.25).softmax(-1) @ v

    q = torch.randn(3, 4, 15, 16)
    k, v = torch.randn(1, 1, 15, 16), torch.randn(1, 1, 15, 16)
    check(fn, q, k, v)


def test_mask_that_broadcasts_scores_larger_is_left_alone():
    def fn(q, k, v, m):  # q, k: batch 1, mask: batch 2 -> the where() output is larger than q kᵀ
        return torch.where(m, (q @ k.transpose(-2, -1)) * 0.25, float("-inf")).softmax(-1) @ v

    q, k, v = qkv(B=1, S=10)
    m = torch.ones(2, 1, 10, 10, dtype=torch.bool)
    out, rep = compile_and_report(fn, q, k, v, m)
    assert rep.rewritten == 0 and "broadcasts the scores" in rep.sites[0].reason


def hf_style_mask(padding, q_len, kv_len, dtype, window=None):
    """transformers' eager mask: (kv <= q [& q - kv < window]) & padding[b, kv], then where(m, 0, finfo.min)."""
    b = torch.arange(padding.shape[0])[:, None, None, None]
    q_idx = torch.arange(q_len)[None, None, :, None]
    kv_idx = torch.arange(kv_len)[None, None, None, :]
    keep = q_idx.new_ones((), dtype=torch.bool) & (kv_idx <= q_idx)
    if window is not None:
        keep = keep & (q_idx - kv_idx < window)
    keep = keep & padding.to(torch.bool)[b, kv_idx]
    keep = keep.expand(padding.shape[0], -1, q_len, kv_len)
    return torch.where(keep, torch.zeros((), dtype=dtype), torch.finfo(dtype).min)


@pytest.mark.parametrize("window", [None, 6])
def test_hf_padding_and_causal_decompose_into_flags_and_a_key_mask(window):
    def fn(q, k, v, padding):
        mask = hf_style_mask(padding, q.shape[-2], k.shape[-2], torch.float32, window)  # fp32 min, also in fp64 runs
        s = (q @ k.transpose(-2, -1)) * 0.25 + mask
        return F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype) @ v

    padding = torch.ones(2, 19, dtype=torch.long)
    padding[0, :5] = 0  # left padding: the first rows of batch 0 are fully masked (mean of v, as eager)
    flags = {"causal": window is None, "window_right": 0, "mask": "bool", "mask_fill": torch.finfo(torch.float32).min}
    if window is not None:
        flags["window_left"] = window - 1
    rep = check(fn, *qkv(S=19), padding, flags=flags)
    assert "data_atom" in only_site(rep).flags["structure"]


def test_trainable_bias_is_rewritten_and_gets_its_gradient():
    bias = torch.randn(1, 4, 12, 12, requires_grad=True)  # T5's learned relative position bias

    def fn(q, k, v):
        return ((q @ k.transpose(-2, -1)) + bias).softmax(-1) @ v

    q, k, v = (t.requires_grad_(True) for t in qkv(S=12))
    out, rep = compile_and_report(fn, q, k, v)
    assert rep.rewritten == 1 and only_site(rep).flags["bias_grad"] is True
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, bias), g)
    want = torch.autograd.grad(fn(q, k, v), (q, k, v, bias), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_bloom_style_bmm_layout_views_and_alibi():
    # Bloom: scores made as [B*H, Sq, Sk] by baddbmm (ALiBi bias in that layout), viewed to [B, H, Sq, Sk]
    # for the mask, and the probabilities viewed back to [B*H, Sq, Sk] for bmm with V
    B, H, S, D = 2, 4, 14, 16

    def fn(q, k, v, alibi, padding):
        s = torch.baddbmm(alibi, q, k.transpose(1, 2), beta=1.0, alpha=0.25)
        s = s.view(B, H, S, -1)
        mask = hf_style_mask(padding, S, S, torch.float32)
        p = F.softmax(s + mask, dim=-1, dtype=torch.float32).to(v.dtype)
        return torch.bmm(p.view(B * H, S, -1), v)

    q, k, v = (torch.randn(B * H, S, D) for _ in range(3))
    alibi = torch.randn(B * H, 1, S)
    padding = torch.ones(B, S, dtype=torch.long)
    padding[1, :4] = 0
    check(fn, q, k, v, alibi, padding, flags={"causal": True, "mask": "bool+additive", "scale": 0.25})


def test_gpt2_upcast_style_reshape_between_bmm_and_softmax():
    B, H, S, D = 2, 4, 13, 16

    def fn(q, k, v):  # q, k: [B*H, S, D]; v: [B, H, S, D]
        s = torch.matmul(q, k.transpose(-1, -2)) * 0.25
        s = s.reshape(B, H, S, S)
        causal = torch.tril(torch.ones(S, S, dtype=torch.bool))
        s = torch.where(causal, s, torch.finfo(torch.float32).min)
        return s.softmax(-1) @ v

    q, k = torch.randn(B * H, S, D), torch.randn(B * H, S, D)
    check(fn, q, k, torch.randn(B, H, S, D), flags={"causal": True})


def test_bias_added_before_the_scale():
    def fn(q, k, v, alibi):  # Falcon with ALiBi: (q kᵀ + alibi) * inv_norm
        s = (q @ k.transpose(-2, -1) + alibi) * 0.25
        return s.softmax(-1) @ v

    check(fn, *qkv(S=15), torch.randn(2, 4, 1, 15), flags={"mask": "additive", "scale": 0.25})


def test_attention_sinks_gpt_oss_style():
    sinks = torch.randn(4, requires_grad=True)  # one learned logit per head

    def fn(q, k, v):
        s = (q @ k.transpose(-2, -1)) * 0.25
        T = q.shape[-2]
        s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        column = sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, T, -1)
        combined = torch.cat([s, column], dim=-1)
        combined = combined - combined.max(dim=-1, keepdim=True).values
        p = F.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1]
        return p @ v

    q, k, v = qkv(S=17)
    out, rep = compile_and_report(fn, q, k, v)
    assert rep.rewritten == 1 and only_site(rep).flags["sinks"] is True and only_site(rep).flags["causal"] is True
    assert_matches_eager(fn, (q, k, v), out.detach())
    g = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, (sinks,), g)
    (want,) = torch.autograd.grad(fn(q, k, v), (sinks,), g)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_router_softmax_is_not_a_candidate():
    def fn(x, w):
        top = torch.topk(x @ w, 2, dim=-1).values
        return torch.softmax(top, dim=1)

    _, rep = compile_and_report(fn, torch.randn(8, 16), torch.randn(16, 4))
    assert rep.total == 0


def test_symbolic_kv_cache_offset_becomes_a_symbolic_window():
    def fn(q, k, v):  # a chunk of Sq queries against Sk cached keys: query i sits at position i + Sk - Sq
        Sq, Sk = q.shape[-2], k.shape[-2]
        q_pos = torch.arange(Sq)[:, None] + (Sk - Sq)
        keep = torch.arange(Sk)[None, :] <= q_pos
        s = (q @ k.transpose(-2, -1)) * 0.25
        return s.masked_fill(~keep, float("-inf")).softmax(-1) @ v

    torch._dynamo.reset()
    mark = _report.collect()
    compiled = torch.compile(fn, backend="flashfuse", dynamic=True, options={"inductor": False})
    for sq, sk in ((5, 12), (3, 20)):
        args = qkv(S=sq, Sk=sk)
        assert_matches_eager(fn, args, compiled(*args))
    rep = _report.last_report(since=mark)
    assert len(rep.graphs) == 1 and rep.rewritten == 1, str(rep)
    assert rep.sites[0].flags["window_right"] == "Sk-Sq" and rep.sites[0].flags["mask"] == "none"


def test_sliding_window_cache_offset_with_max_becomes_a_symbolic_window():
    """A sliding-window KV cache keeps its last W-1 keys: the key at column j sits at position
    j + max(past - W + 1, 0) (transformers' sliding cache). The bounds contain a max of sizes; they reach the op
    as SymInt windows computed in the graph, not as a dense mask, and stay right at every past length."""
    W = 6

    def fn(q, k, v, past):
        Sq, Sk = q.shape[-2], k.shape[-2]
        kv_offset = max(past - W + 1, 0)
        q_pos = torch.arange(Sq)[:, None] + past
        kv_pos = torch.arange(Sk)[None, :] + kv_offset
        keep = (kv_pos <= q_pos) & (kv_pos > q_pos - W)
        s = (q @ k.transpose(-2, -1)) * 0.25
        return s.masked_fill(~keep, torch.finfo(s.dtype).min).softmax(-1) @ v

    torch._dynamo.reset()
    mark = _report.collect()
    compiled = torch.compile(fn, backend="flashfuse", dynamic=True, options={"inductor": False})
    # (past, Sq, Sk): a full cache (W-1 keys + Sq new), a cache still filling up (bound = past), a long prompt
    for past, sq, sk in ((11, 1, W), (3, 1, 4), (20, 2, W + 1), (0, 7, 7)):
        q, k, v = qkv(S=sq, Sk=sk)
        assert_matches_eager(lambda q, k, v: fn(q, k, v, past), (q, k, v), compiled(q, k, v, past))
    rep = _report.last_report(since=mark)
    assert rep.rewritten == rep.total == len(rep.graphs) >= 1, str(rep)
    for site in rep.sites:
        assert site.flags["mask"] == "none", site.flags
        assert isinstance(site.flags["window_left"], str) and "Max" in site.flags["window_left"] + site.flags[
            "window_right"], site.flags


def test_bias_with_a_causal_mask_folded_in_keeps_the_band():
    """Falcon's spelling: the causal mask folded into an additive bias with masked_fill; the band becomes the
    causal flag and the bias alone stays a per-key additive mask (no Sq x Sk mask is read)."""
    B, H, S = 2, 4, 24

    def fn(q, k, v, slopes):
        pos = torch.arange(S)
        bias = (slopes[None, :, None, None] * pos[None, None, None, :]).expand(B, H, 1, S)  # ALiBi, [B, H, 1, S]
        causal = torch.triu(torch.full((S, S), float("-inf")), 1)[None, None]  # additive causal mask
        mask = torch.masked_fill(bias / 4.0, causal < -1, torch.finfo(q.dtype).min)
        s = (q @ k.transpose(-2, -1)) * 0.25
        return torch.softmax(s + mask, dim=-1) @ v

    q, k, v = qkv(B=B, H=H, S=S)
    rep = check(fn, q, k, v, -torch.rand(H), flags={"causal": True, "mask": "additive", "dense_mask": False})
    assert rep.rewritten == 1


def _packed_mask_attention(q, k, v, position_ids=None):
    """transformers' mask for possibly packed sequences (use_cache=False): causal on gathered position ids AND
    'same sequence' from diff/cumsum of the position ids, then where(keep, 0, min) added to the scores."""
    B, S = q.shape[0], q.shape[-2]
    pos = torch.arange(S)[None].expand(B, -1) if position_ids is None else position_ids
    seq = (torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1) != 1).cumsum(-1)
    b = torch.arange(B)[:, None, None, None]
    i = torch.arange(S)[None, None, :, None]
    j = torch.arange(S)[None, None, None, :]
    keep = (pos[b, j] <= pos[b, i]) & (seq[b, i] == seq[b, j])
    fill = torch.full((), torch.finfo(q.dtype).min, dtype=q.dtype)
    s = q @ k.transpose(-2, -1) * 0.25 + torch.where(keep, torch.zeros((), dtype=q.dtype), fill)
    return s.softmax(-1) @ v


def test_gathered_position_ids_from_an_arange_are_a_causal_band():
    rep = check(_packed_mask_attention, *qkv(S=20), flags={"causal": True, "mask": "none"})
    assert "gather" in only_site(rep).flags["structure"] and "cumsum" in only_site(rep).flags["structure"]


def test_packed_position_ids_from_the_caller_stay_a_mask():
    """Position ids that are data (two packed sequences per row): block-diagonal, not a band; read as a mask."""
    pos = torch.cat([torch.arange(12), torch.arange(8)])[None].expand(2, -1).contiguous()
    rep = check(_packed_mask_attention, *qkv(S=20), pos)
    assert only_site(rep).flags["mask"] != "none"


def test_where_with_python_scalar_zero_and_fill_is_a_band():
    """``torch.where(keep, 0.0, min)`` with Python floats (sympy >= 1.13 no longer equates 0.0 with 0)."""
    def fn(q, k, v):
        i = torch.arange(q.shape[-2])
        s = q @ k.transpose(-2, -1) * 0.25 + torch.where(i[None, :] <= i[:, None], 0.0, -1e30)
        return s.softmax(-1) @ v

    check(fn, *qkv(S=20), flags={"causal": True, "mask": "none"})
