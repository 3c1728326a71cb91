"""The ops for sites no gradient can flow through: ``flashfuse::attention_infer`` (ops.py's NOTE) and, for decode
steps on Hopper, ``flashfuse::decode_inline`` (flash_decode.py's NOTE).

They must compute exactly what ``flashfuse::attention`` computes, and the rewrite must emit them only where the
site's traced output does not require grad (grad mode off, or nothing upstream requiring grad); never for dropout.
"""

from __future__ import annotations

import math

import pytest
import torch

from flashfuse import ops, testing
from tests.helpers import compile_and_report, qkv

FP32_MIN = torch.finfo(torch.float32).min


def _infer(q, k, v, mask=None, scale=None, wl=None, wr=None, fill=-math.inf, softcap=0.0, sinks=None,
           additive_fill=False, probe_mask=False):
    return torch.ops.flashfuse.attention_infer.default(q, k, v, mask, scale, wl, wr, fill, softcap, sinks,
                                                        additive_fill, probe_mask)


def _full(q, k, v, mask=None, scale=None, wl=None, wr=None, fill=-math.inf, softcap=0.0, sinks=None,
          additive_fill=False, probe_mask=False):
    with torch.no_grad():
        return torch.ops.flashfuse.attention.default(q, k, v, mask, scale, wl, wr, fill, softcap, sinks, 0.0,
                                                     additive_fill, probe_mask)[0]


CASES = {
    # name: (B, Hq, Hkv, Sq, Sk, D, keyword arguments of the op)
    "decode GQA, padding mask": (2, 8, 2, 1, 300, 32, {"mask": "pad", "fill": FP32_MIN}),
    "decode Sq=4, causal, sinks": (1, 4, 4, 4, 272, 16, {"wr": 268, "sinks": True}),
    "prefill causal GQA": (2, 4, 2, 24, 24, 16, {"wr": 0}),
    "prefill window, softcap": (1, 2, 1, 33, 33, 32, {"wl": 7, "wr": 0, "softcap": 20.0}),
}


def _case(name, device):
    B, Hq, Hkv, Sq, Sk, D, kw = CASES[name]
    q, k, v = qkv(B, Hq, Sq, D, Hkv=Hkv, Sk=Sk, device=device, layout="bshd")
    kw = dict(kw)
    if kw.get("mask") == "pad":
        keep = torch.arange(Sk, device=device)[None, :] >= torch.tensor([0, 37], device=device)[:, None]
        kw["mask"] = torch.zeros(B, 1, 1, Sk, device=device).masked_fill(~keep[:, None, None, :], FP32_MIN)
    if kw.get("sinks"):
        kw["sinks"] = torch.randn(Hq, device=device)
    else:
        kw.pop("sinks", None)
    return q, k, v, kw


@pytest.mark.parametrize("name", list(CASES))
def test_infer_op_computes_what_attention_computes(name, device):
    q, k, v, kw = _case(name, device)
    out = _infer(q, k, v, **kw)
    assert torch.equal(out, _full(q, k, v, **kw))  # the same body: the same bits
    ref, _ = testing.attention_ref(
        q.double(), k.double(), v.double(), None if kw.get("mask") is None else kw["mask"].double(),
        scale=q.shape[-1] ** -0.5, window_left=kw.get("wl"), window_right=kw.get("wr"),
        mask_fill=kw.get("fill", -math.inf), softcap=kw.get("softcap", 0.0),
        sinks=None if kw.get("sinks") is None else kw["sinks"].double())
    assert out.shape == ref.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


def test_infer_op_decode_steps_take_the_hot_path_and_read_new_data(device, monkeypatch):
    # after the first call of a decode key, later calls skip the op's body (flash_decode.forward_known) and still
    # compute each call's own data
    pytest.importorskip("triton")
    if device == "cpu" and not ops._interpreting():
        pytest.skip("flash_decode runs on the GPU or under TRITON_INTERPRET=1")
    B, Hq, Hkv, Sq, Sk, D = 1, 8, 2, 1, 300, 32
    q, k, v = qkv(B, Hq, Sq, D, Hkv=Hkv, Sk=Sk, device=device)
    _infer(q, k, v)
    bodies = []
    real = ops._attention_impl
    monkeypatch.setattr(ops, "_attention_impl", lambda *a: bodies.append(a) or real(*a))
    for _ in range(2):
        q, k, v = qkv(B, Hq, Sq, D, Hkv=Hkv, Sk=Sk, device=device)
        out = _infer(q, k, v)
        ref, _ = testing.attention_ref(q.double(), k.double(), v.double(), scale=D**-0.5)
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    assert bodies == []
    monkeypatch.setenv("FLASHFUSE_DECODE", "0")  # the switch is still read on the hot path: the body runs
    _infer(q, k, v)
    assert len(bodies) == 1


def test_infer_op_rejects_bad_arguments_by_name():
    q, k, v = qkv(1, 2, 8, 16)
    with pytest.raises(ValueError, match="mask"):
        _infer(q, k, v, torch.zeros(1, 1, 8, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="^v: sequence length 5"):
        _infer(q, k, v[:, :, :5])
    with pytest.raises(ValueError, match="^q: dtype torch.int64"):
        _infer(q.long(), k, v)


def test_infer_op_fake_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        q, k, v = (mode.from_tensor(t) for t in qkv(2, 4, 5, 16, Hkv=2, Sk=9))
        out = _infer(q, k, v)
    assert out.shape == (2, 4, 5, 16) and out.dtype == torch.float32 and out.is_contiguous()


def _naive(q, k, v):
    return ((q @ k.transpose(-2, -1)) * 0.25).softmax(-1) @ v


def _dropout(q, k, v):
    return torch.nn.functional.dropout(((q @ k.transpose(-2, -1)) * 0.25).softmax(-1), 0.5, training=True) @ v


def _ops_called(rep):
    return [s.flags["op"] for s in rep.sites if s.rewritten]


def test_rewrite_uses_the_infer_op_only_without_autograd():
    q, k, v = qkv(S=12)
    _, rep = compile_and_report(_naive, q, k, v)  # grad on, no input requires grad
    assert _ops_called(rep) == ["attention_infer"]
    _, rep = compile_and_report(_naive, q, k, v, infer_op=False)
    assert _ops_called(rep) == ["attention"]
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    _, rep = compile_and_report(_naive, qg, kg, vg)
    assert _ops_called(rep) == ["attention"]
    with torch.no_grad():
        _, rep = compile_and_report(_naive, qg, kg, vg)
        assert _ops_called(rep) == ["attention_infer"]
        _, rep = compile_and_report(_dropout, q, k, v)  # dropout draws an rng_state: the full op
        assert _ops_called(rep) == ["attention"]


def test_the_choice_is_per_site():
    # one graph, grad on: the site whose q requires grad keeps the autograd op (its gradient is right), the site
    # fed only by tensors that need none calls the inference op
    q, k, v = qkv(S=12)
    qg = q.clone().requires_grad_()

    def two(qg, q, k, v):
        return _naive(qg, k, v), _naive(q, k, v)

    (out_g, out), rep = compile_and_report(two, qg, q, k, v)
    assert _ops_called(rep) == ["attention", "attention_infer"]
    assert out_g.requires_grad and not out.requires_grad
    grad, = torch.autograd.grad(out_g.sum(), qg)
    want, = torch.autograd.grad(_naive(qg, k, v).sum(), qg)
    torch.testing.assert_close(grad, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, _naive(q, k, v), atol=2e-5, rtol=2e-5)


def test_grad_mode_switch_recompiles_to_the_op_with_autograd():
    # one compiled function: first under no_grad (the infer op), then with grad (Dynamo's grad-mode guard fails,
    # the graph is recompiled with the autograd op): the gradients are the eager ones
    q, k, v = (t.requires_grad_() for t in qkv(S=12))
    f = torch.compile(_naive, backend="flashfuse", options={"inductor": False})
    with torch.no_grad():
        out = f(q, k, v)
    assert not out.requires_grad
    torch.testing.assert_close(out, _naive(q, k, v).detach())
    out = f(q, k, v)
    assert out.requires_grad
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    want = torch.autograd.grad(_naive(q, k, v).square().sum(), (q, k, v))
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_infer_op_through_inductor_matches_eager():
    q, k, v = qkv(S=20, Hkv=2, H=4)
    mask = torch.zeros(2, 1, 1, 20).masked_fill(torch.arange(20) < 3, FP32_MIN)

    def fn(q, k, v, mask):
        k2, v2 = (t.repeat_interleave(2, dim=1) for t in (k, v))
        return ((q @ k2.transpose(-2, -1)) / 4.0 + mask).softmax(-1) @ v2

    with torch.no_grad():
        out, rep = compile_and_report(fn, q, k, v, mask, inductor=True)
    assert _ops_called(rep) == ["attention_infer"]
    torch.testing.assert_close(out, fn(q, k, v, mask), atol=2e-5, rtol=2e-5)


def test_infer_op_from_inductors_cpp_wrapper():
    # the backend gives CUDA inference graphs Inductor's C++ wrapper (backend.own_patches); the opaque op is then
    # called through the dispatcher from C++. Here on the CPU, asked for explicitly, with symbolic lengths too.
    from torch._inductor.utils import run_and_get_code

    from flashfuse import report

    torch._dynamo.reset()
    mark = report.collect()
    f = torch.compile(_naive, backend="flashfuse", options={"cpp_wrapper": True}, dynamic=True)
    with torch.no_grad():
        q, k, v = qkv(S=12)
        out, code = run_and_get_code(f, q, k, v)
        torch.testing.assert_close(out, _naive(q, k, v), atol=2e-5, rtol=2e-5)
        q, k, v = qkv(S=19)
        torch.testing.assert_close(f(q, k, v), _naive(q, k, v), atol=2e-5, rtol=2e-5)
    rep = report.last_report(since=mark)
    assert _ops_called(rep) == ["attention_infer"] and len(rep.graphs) == 1  # one graph for both lengths
    assert rep.graphs[0].inductor_patches == {}  # the user's own option, not flashfuse's
    assert "flashfuse::attention_infer" in "\n".join(code)  # the C++ spelling (Python's: flashfuse.attention_infer)


def _hf_decode(q, k, v, mask):
    # transformers' eager attention for one new token: repeat_kv, scores + the static cache's additive mask,
    # softmax in float32, cast back
    B, Hkv, Sk, D = k.shape
    n_rep = q.shape[1] // Hkv
    k, v = (t[:, :, None].expand(B, Hkv, n_rep, Sk, D).reshape(B, Hkv * n_rep, Sk, D) for t in (k, v))
    w = q @ k.transpose(2, 3) * D**-0.5 + mask
    return torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype) @ v


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_compiled_decode_step_calls_the_infer_op_on_the_hot_path(monkeypatch):
    # with the inline decode op switched off, the opaque inference op and flash_decode's hot path
    from flashfuse.kernels import flash_decode
    from tests.helpers import assert_matches_eager

    monkeypatch.setenv("FLASHFUSE_DECODE_INLINE", "0")

    B, Hq, Hkv, Sk, D, dt = 2, 32, 8, 4096, 128, torch.bfloat16
    mask = torch.zeros(B, 1, 1, Sk, device="cuda", dtype=dt)
    mask[..., 3001:] = torch.finfo(dt).min  # the static cache's empty slots

    def inputs():
        q = torch.randn(B, 1, Hq, D, device="cuda", dtype=dt).transpose(1, 2)
        return q, *(torch.randn(B, Hkv, Sk, D, device="cuda", dtype=dt) for _ in range(2))

    from flashfuse import report

    torch._dynamo.reset()
    mark = report.collect()
    f = torch.compile(_hf_decode, backend="flashfuse")
    with torch.no_grad():
        for _ in range(3):  # the first call compiles and validates; the later ones take the hot path
            q, k, v = inputs()
            out = f(q, k, v, mask)
            assert_matches_eager(_hf_decode, (q, k, v, mask), out)
    rep = report.last_report(since=mark)
    assert _ops_called(rep) == ["attention_infer"]
    assert rep.sites[0].flags["decode_inline_refused"].startswith("switched off")  # the report says why
    hot = [launch for launch in flash_decode._LAUNCHES.values() if launch.op_checked and launch.out_shape[0] == B]
    assert hot, "the decode step never reached flash_decode's hot path"


# --- flashfuse::decode_inline (flash_decode.py's NOTE): the decode step as a triton_op Inductor launches itself ---

INLINE_CASES = {
    # name: (B, Hq, Hkv, Sq, Sk, D, keyword arguments)
    "GQA, additive finite fill (v-sum path)": (2, 8, 2, 1, 300, 32, {"mask": "pad", "fill": FP32_MIN}),
    "Sq=3, bool mask, sinks": (1, 4, 1, 3, 280, 16, {"mask": "bool", "sinks": True}),
    "window, finite fill (mean of v path), softcap": (1, 4, 2, 2, 300, 16, {"wl": 40, "wr": 298, "fill": FP32_MIN,
                                                                              "softcap": 10.0}),
}


def _inline_case(name, device):
    B, Hq, Hkv, Sq, Sk, D, kw = INLINE_CASES[name]
    q, k, v = qkv(B, Hq, Sq, D, Hkv=Hkv, Sk=Sk, device=device, layout="bshd")
    kw = dict(kw)
    keep = torch.arange(Sk, device=device)[None, :] >= torch.tensor([0, 37][:B], device=device)[:, None]
    if kw.get("mask") == "pad":
        kw["mask"] = torch.zeros(B, 1, 1, Sk, device=device).masked_fill(~keep[:, None, None, :], FP32_MIN)
    elif kw.get("mask") == "bool":
        kw["mask"] = keep[:, None, None, :] & (torch.rand(B, 1, Sq, Sk, device=device) > 0.2)
    if kw.pop("sinks", False):
        kw["sinks"] = torch.randn(Hq, device=device)
    return q, k, v, kw


@pytest.mark.parametrize("name", list(INLINE_CASES))
def test_decode_inline_runs_flash_decode_s_kernels(name, device):
    # called outside a graph, the triton_op runs the same two kernels with the same plan: the same bits as
    # flash_decode_forward; and the values are the float64 reference's
    fd = pytest.importorskip("flashfuse.kernels.flash_decode")
    if device == "cpu" and not ops._interpreting():
        pytest.skip("the kernels run on the GPU or under TRITON_INTERPRET=1")
    if fd.INLINE_OP is None:
        pytest.skip("this torch has no torch.library.triton_op")
    q, k, v, kw = _inline_case(name, device)
    fill, scale = kw.get("fill", -math.inf), q.shape[-1] ** -0.5
    out = fd.INLINE_OP(q, k, v, kw.get("mask"), scale, kw.get("wl"), kw.get("wr"), fill, kw.get("softcap", 0.0),
                       kw.get("sinks"))
    want, _ = fd.flash_decode_forward(q, k, v, kw.get("mask"), scale=scale, window_left=kw.get("wl"),
                                      window_right=kw.get("wr"), mask_fill=fill, softcap=kw.get("softcap", 0.0),
                                      sinks=kw.get("sinks"))
    assert torch.equal(out, want)
    m = kw.get("mask")
    ref, _ = testing.attention_ref(
        q.double(), k.double(), v.double(), None if m is None else (m if m.dtype == torch.bool else m.double()),
        scale=scale, window_left=kw.get("wl"), window_right=kw.get("wr"), mask_fill=fill,
        softcap=kw.get("softcap", 0.0), sinks=None if kw.get("sinks") is None else kw["sinks"].double())
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


def test_decode_inline_refusal_reasons(monkeypatch):
    # the rewrite's question, asked with traced (fake) CUDA values: None for a decode step, else a reason
    from torch._subclasses.fake_tensor import FakeTensorMode

    fd = pytest.importorskip("flashfuse.kernels.flash_decode")
    if fd.INLINE_OP is None:
        pytest.skip("this torch has no torch.library.triton_op")
    monkeypatch.setattr(ops, "_interpreting", lambda: False)  # CUDA values without a GPU: as on a GPU host
    monkeypatch.setattr(fd, "_interpreting", lambda: False)
    major = [9]
    monkeypatch.setattr(fd, "_capability_major", lambda device: major[0])
    fill = FP32_MIN
    with FakeTensorMode():
        q = torch.empty(2, 1, 32, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        k = torch.empty(2, 8, 4096, 128, device="cuda", dtype=torch.bfloat16)
        mask = torch.empty(2, 1, 1, 4096, device="cuda", dtype=torch.bfloat16)
        prefill = torch.empty(2, 32, 64, 128, device="cuda", dtype=torch.bfloat16)
        short = torch.empty(2, 8, 100, 128, device="cuda", dtype=torch.bfloat16)
        int_mask = torch.empty(2, 1, 1, 4096, device="cuda", dtype=torch.int32)

        def ask(q=q, k=k, v=k, mask=mask, wl=None, wr=None):
            return ops.decode_inline_refusal(q, k, v, mask, 128**-0.5, wl, wr, fill, 0.0, None)

        assert ask() is None
        assert ask(wl=100, wr=4095) is None
        assert "Sq = 64 > 16" in ask(q=prefill, mask=None)
        assert "Sk = 100 < 256" in ask(k=short, v=short, mask=None)
        assert ask(mask=int_mask).startswith("mask: dtype torch.int32")
        assert "boolean mask" in ask(mask=torch.empty(2, 1, 1, 4096, device="cuda", dtype=torch.bool))
        major[0] = 8
        assert "not a Hopper GPU" in ask()
        major[0] = 9
        monkeypatch.setenv("FLASHFUSE_DECODE_INLINE", "0")
        assert "switched off" in ask()
    monkeypatch.delenv("FLASHFUSE_DECODE_INLINE")
    cpu = torch.zeros(1, 4, 1, 16), torch.zeros(1, 4, 300, 16)
    assert "not a CUDA graph" in ops.decode_inline_refusal(cpu[0], cpu[1], cpu[1], None, 0.25, None, None, fill,
                                                           0.0, None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("sq", [1, 4])
@pytest.mark.parametrize("cpp_wrapper", [True, False])
def test_gpu_compiled_decode_step_launches_decode_inline_from_inductor(sq, cpp_wrapper):
    # the decode step's kernels in Inductor's own code (no opaque op call); ragged left padding per batch element
    # (a mask with a real batch stride) and Sq = 4 (row strides) check that the baked strides are the run's
    from torch._inductor.utils import run_and_get_code

    from flashfuse import report
    from tests.helpers import assert_matches_eager

    B, Hq, Hkv, Sk, D, dt = 3, 32, 8, 4096, 128, torch.bfloat16
    pos = torch.arange(Sk, device="cuda")
    keep = (pos[None, :] >= torch.tensor([0, 100, 2000], device="cuda")[:, None])[:, None, None, :]
    keep = keep & (pos <= 3000 + torch.arange(sq, device="cuda")[:, None])  # [B, 1, Sq, Sk]: causal in the cache
    mask = torch.zeros(B, 1, sq, Sk, device="cuda", dtype=dt).masked_fill(~keep, torch.finfo(dt).min)
    q = torch.randn(B, sq, Hq, D, device="cuda", dtype=dt).transpose(1, 2)
    k, v = (torch.randn(B, Hkv, Sk, D, device="cuda", dtype=dt) for _ in range(2))
    torch._dynamo.reset()
    mark = report.collect()
    f = torch.compile(_hf_decode, backend="flashfuse", options={"infer_cpp_wrapper": cpp_wrapper})
    with torch.no_grad():
        out, code = run_and_get_code(f, q, k, v, mask)
    rep = report.last_report(since=mark)
    assert _ops_called(rep) == ["decode_inline"]
    # an inference graph on CUDA: launched from Inductor's C++ wrapper unless switched off
    assert rep.graphs[0].inductor_patches == ({"cpp_wrapper": True} if cpp_wrapper else {})
    code = "\n".join(code)
    assert "_decode_split" in code and "_decode_merge" in code
    assert "flashfuse.attention" not in code and "flashfuse::attention" not in code  # Python / C++ wrapper spelling
    assert_matches_eager(_hf_decode, (q, k, v, mask), out)
    with torch.no_grad():
        q2 = torch.randn_like(q)
        assert_matches_eager(_hf_decode, (q2, k, v, mask), f(q2, k, v, mask))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_decode_inline_kernels_write_only_their_outputs():
    # Inductor's analysis of which kernel arguments a user-defined kernel writes: were it to fail, Inductor would
    # clone every tensor argument before each launch -- the whole K/V cache, every layer, every token
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx

    from flashfuse.kernels import flash_decode

    dt = torch.bfloat16
    q = torch.randn(2, 1, 32, 128, device="cuda", dtype=dt).transpose(1, 2)
    k, v = (torch.randn(2, 8, 4096, 128, device="cuda", dtype=dt) for _ in range(2))
    mask = torch.zeros(2, 1, 1, 4096, device="cuda", dtype=dt)

    def step(q, k, v, mask):
        return flash_decode.INLINE_OP(q, k, v, mask, 128**-0.5, None, None, torch.finfo(dt).min, 0.0, None)

    gm = make_fx(dispatch_functionalize(step), tracing_mode="fake")(q, k, v, mask)
    clones = [list(n.kwargs["tensors_to_clone"]) for n in gm.graph.nodes
              if n.target is torch.ops.higher_order.triton_kernel_wrapper_functional]
    assert clones == [["Part"], ["Out", "LSE"]], clones
