"""The backend's contract: entry point, options, mode, fallback, explain, Inductor end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import flashfuse
from flashfuse import report as _report
from tests.helpers import assert_matches_eager, compile_and_report, qkv
from tests.passes.test_patterns import NanoGPTAttention


def naive(q, k, v):
    return ((q @ k.transpose(-2, -1)) * 0.25).softmax(-1) @ v


def test_entry_point_without_import():
    code = textwrap.dedent("""
        import sys, torch
        def f(q, k, v):
            return ((q @ k.transpose(-2, -1)) * 0.25).softmax(-1) @ v
        q, k, v = (torch.randn(1, 2, 16, 16) for _ in range(3))
        out = torch.compile(f, backend="flashfuse", options={"inductor": False})(q, k, v)
        assert torch.allclose(out, f(q, k, v), atol=1e-5)
        rep = sys.modules["flashfuse"].last_report()
        print("REWRITTEN", rep.rewritten, rep.total)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "REWRITTEN 1 1" in res.stdout


def test_unknown_option_lists_valid_keys():
    with pytest.raises(Exception) as info:
        torch.compile(naive, backend="flashfuse", options={"fp9": True})(*qkv(S=8))
    err = info.value
    chain = [err, err.__cause__, getattr(err, "inner_exception", None)]
    assert any(isinstance(e, ValueError) for e in chain), repr(err)
    assert "unknown option(s) ['fp9']" in str(err) and "debug_dir" in str(err) and "min_seq_len" in str(err)


def test_option_types_are_checked():
    from flashfuse.config import split_options

    with pytest.raises(ValueError, match="'verify' expects a bool"):
        split_options({"verify": "yes"})
    config, inductor = split_options({"min_seq_len": 64, "max_autotune": True})
    assert config.min_seq_len == 64 and inductor == {"max_autotune": True}


def test_env_options(monkeypatch, tmp_path):
    from flashfuse.config import split_options

    monkeypatch.setenv("FLASHFUSE_DEBUG_DIR", str(tmp_path))
    monkeypatch.setenv("FLASHFUSE_VERIFY", "1")
    config, _ = split_options({"verify": False})
    assert config.debug_dir == str(tmp_path) and config.verify is False


def test_mode_and_inductor_options_reach_compile_fx(monkeypatch):
    import torch._inductor.compile_fx as cfx

    seen = {}
    real = cfx.compile_fx

    def spy(gm, example_inputs, config_patches=None, **kw):
        seen.update(config_patches or {})
        return real(gm, example_inputs, config_patches=config_patches, **kw)

    monkeypatch.setattr(cfx, "compile_fx", spy)
    from flashfuse.backend import flashfuse_backend

    gm = torch.fx.symbolic_trace(lambda x: x + 1)
    flashfuse_backend(gm, [torch.randn(3)], mode="max-autotune-no-cudagraphs")
    assert seen.get("max_autotune") is True
    seen.clear()
    flashfuse_backend(gm, [torch.randn(3)], options={"epilogue_fusion": False})
    assert seen == {"epilogue_fusion": False}


def test_min_seq_len_option():
    _, rep = compile_and_report(naive, *qkv(S=16), min_seq_len=32)
    assert rep.rewritten == 0 and "below min_seq_len=32" in rep.sites[0].reason


def test_rewrite_off_reports_without_rewriting():
    _, rep = compile_and_report(naive, *qkv(S=16), rewrite=False)
    assert rep.total == 1 and rep.rewritten == 0 and "rewriting is off" in rep.sites[0].reason


def test_failure_in_passes_falls_back_to_inductor(monkeypatch):
    import flashfuse.passes as passes

    def broken(gm, ctx):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(passes, "PIPELINE", [passes.PIPELINE[0], ("broken", broken)])
    args = qkv(S=12)
    with pytest.warns(RuntimeWarning, match="injected failure"):
        out, rep = compile_and_report(naive, *args, inductor=True)
    assert rep.fallbacks == ["RuntimeError: injected failure"]
    assert rep.rewritten == 0
    assert torch.allclose(out, naive(*args), atol=1e-5)


def test_inductor_failure_on_rewritten_graph_falls_back(monkeypatch):
    import torch._inductor.compile_fx as cfx

    real = cfx.compile_fx

    def picky(gm, example_inputs, **kw):
        if "flashfuse" in gm.code:
            raise RuntimeError("inductor says no")
        return real(gm, example_inputs, **kw)

    monkeypatch.setattr(cfx, "compile_fx", picky)
    args = qkv(S=12)
    with pytest.warns(RuntimeWarning, match="inductor says no"):
        out, rep = compile_and_report(naive, *args, inductor=True)
    assert rep.rewritten == 0 and "failed to compile" in rep.sites[0].reason
    assert torch.allclose(out, naive(*args), atol=1e-5)


def test_inductor_end_to_end_nanogpt():
    model = NanoGPTAttention().eval()
    x = torch.randn(2, 40, 64)
    with torch.no_grad():
        out, rep = compile_and_report(model, x, inductor=True)
    assert rep.rewritten == 1 and rep.sites[0].flags["causal"] is True
    with torch.no_grad():
        assert_matches_eager(model, (x,), out)


def test_explain_report_shape():
    rep = flashfuse.explain(NanoGPTAttention().eval(), torch.randn(1, 20, 64))
    assert rep.total == 1 and rep.rewritten == 1
    site = rep.sites[0]
    assert site.rewritten is True and site.reason is None
    assert site.source.startswith(os.path.join(os.path.dirname(__file__), "passes", "test_patterns.py"))
    assert site.flags["causal"] is True and site.flags["gqa_groups"] == 1 and site.flags["mask"] == "none"
    assert "1/1 attention sites rewritten" in str(rep) and "causal=True" in str(rep)


def test_last_report_accumulates_across_graphs():
    _report.reset_report()

    def two_graphs(q, k, v):
        a = naive(q, k, v)
        torch._dynamo.graph_break()
        return naive(a, k, v)

    torch.compile(two_graphs, backend="flashfuse", options={"inductor": False})(*qkv(S=8))
    rep = flashfuse.last_report()
    assert len(rep.graphs) == 2 and rep.total == 2 and rep.rewritten == 2


def test_training_backward_through_the_op():
    q, k, v = (t.requires_grad_(True) for t in qkv(S=14))
    out, rep = compile_and_report(naive, q, k, v, inductor=True)
    assert rep.rewritten == 1
    out.sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    naive(q, k, v).sum().backward()
    for g, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(g, t.grad, atol=1e-5, rtol=1e-4)


def test_dynamic_shapes_stay_rewritten_and_compile_at_most_twice():
    import math as _math

    def fn(q, k, v, pad):
        T = q.shape[-2]
        keep = torch.arange(T)[:, None] >= torch.arange(T)[None, :]
        s = (q @ k.repeat_interleave(2, dim=1).transpose(-2, -1)) / _math.sqrt(q.shape[-1])
        s = s.masked_fill(~keep, float("-inf")) + pad
        return s.softmax(-1) @ v.repeat_interleave(2, dim=1)

    _report.reset_report()
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="flashfuse", options={"inductor": False})
    for S in (9, 17, 24, 33, 40):
        q, k, v = torch.randn(1, 4, S, 16), torch.randn(1, 2, S, 16), torch.randn(1, 2, S, 16)
        pad = torch.zeros(1, 1, 1, S)
        pad[..., : S // 4] = torch.finfo(torch.float32).min
        assert_matches_eager(fn, (q, k, v, pad), compiled(q, k, v, pad))
    rep = flashfuse.last_report()
    assert len(rep.graphs) <= 2, str(rep)
    assert rep.total == rep.rewritten == len(rep.graphs)
    assert rep.sites[-1].flags["causal"] is True and rep.sites[-1].flags["gqa_groups"] == 2


def test_symbolic_head_dim_scale_is_proven():
    torch._dynamo.reset()
    mark = _report.collect()

    def fn(q, k, v):
        return ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(-1) @ v

    args = qkv(S=12, D=32)
    out = torch.compile(fn, backend="flashfuse", dynamic=True, options={"inductor": False})(*args)
    rep = _report.last_report(since=mark)
    assert rep.rewritten == 1 and rep.sites[0].flags["scale"] == "1/sqrt(head_dim)", str(rep)
    assert_matches_eager(fn, args, out)


def _report_with_ops(*ops):
    graph_report = _report.GraphReport(graph=0)
    for op in ops:
        rewritten = op is not None
        graph_report.sites.append(_report.SiteReport(rewritten=rewritten, reason=None if rewritten else "no",
                                                     source="x", flags={"op": op} if rewritten else {}))
    return graph_report


def test_cpp_wrapper_only_for_cuda_inference_graphs(monkeypatch):
    import importlib
    import operator

    import torch._inductor.config as inductor_config
    from torch._subclasses.fake_tensor import FakeTensorMode

    from flashfuse.backend import inductor_patches, own_patches
    from flashfuse.config import split_options

    monkeypatch.setattr(importlib.import_module("flashfuse.backend"), "_FAILED_OWN", set())
    on, _ = split_options({})
    off, _ = split_options({"infer_cpp_wrapper": False})
    with FakeTensorMode():
        cuda = [torch.empty(2, 8, device="cuda"), 3]
        weight = torch.empty(8, 8, device="cuda", requires_grad=True)
        cpu = [torch.empty(2, 8)]

    def graph(value_requires_grad=False, enable_grad_inside=False):
        # x + 1, its traced value requiring grad or not (under no_grad a view of a parameter still does);
        # optionally inside `with torch.enable_grad():` as Dynamo records it
        g = torch.fx.Graph()
        x = g.placeholder("x")
        if enable_grad_inside:
            g.call_function(torch._C._set_grad_enabled, (True,))
        y = g.call_function(operator.add, (x, 1))
        y.meta["example_value"] = torch.empty(2, requires_grad=value_requires_grad)
        if enable_grad_inside:
            g.call_function(torch._C._set_grad_enabled, (False,))
        g.output(y)
        return torch.fx.GraphModule(torch.nn.Module(), g)

    def ask(inputs, *ops, config=on, extra=None, grad=False, mode=None, **graph_kw):
        extra = extra or {}
        with torch.set_grad_enabled(grad):
            return own_patches(config, extra, inductor_patches(mode, extra), graph(**graph_kw), inputs,
                               _report_with_ops(*ops))

    assert ask(cuda, "decode_inline", "attention_infer", None) == {"cpp_wrapper": True}
    assert ask(cuda + [weight], "attention_infer") == {"cpp_wrapper": True}  # no_grad: parameters need no gradient
    # no_grad, a view of a parameter in the graph (requires_grad=True on its value): still nothing needs a gradient
    assert ask(cuda + [weight], "attention_infer", value_requires_grad=True) == {"cpp_wrapper": True}
    assert ask(cuda, "attention_infer", grad=True) == {"cpp_wrapper": True}  # grad on, nothing requires it
    assert ask(cuda + [weight], "attention_infer", grad=True) == {}  # a training graph
    assert ask(cuda + [weight], "attention_infer", enable_grad_inside=True) == {}  # grad switched on inside
    assert ask(cuda, "attention_infer", grad=True, value_requires_grad=True) == {}  # made to require grad inside
    assert ask(cuda, "attention_infer", "attention") == {}  # one site keeps autograd
    assert ask(cuda, "attention_fp8") == {}
    assert ask(cuda, None) == {}  # nothing rewritten: plain Inductor
    assert ask(cpu, "attention_infer") == {}
    assert ask(cuda, "attention_infer", config=off) == {}
    assert ask(cuda, "attention_infer", extra={"cpp_wrapper": False}) == {}  # the user's choice wins
    assert ask(cuda, "attention_infer", mode="reduce-overhead") == {}  # CUDA graphs: Inductor drops them under it
    assert ask(cuda, "attention_infer", extra={"triton.cudagraphs": True}) == {}
    with inductor_config.patch(cpp_wrapper=True):  # already on globally: not flashfuse's doing
        assert ask(cuda, "attention_infer") == {}
    assert ask(cuda, "attention_infer") == {"cpp_wrapper": True}


def test_cpp_wrapper_failure_recompiles_without_it(monkeypatch, tmp_path):
    import importlib

    import torch._inductor.compile_fx as cfx
    from torch._inductor.exc import CppCompileError
    from torch._subclasses.fake_tensor import FakeTensorMode

    backend = importlib.import_module("flashfuse.backend")  # the package's `backend` attribute is the function
    monkeypatch.setattr(backend, "_FAILED_OWN", set())
    calls = []
    error = [None]

    def fake_compile_fx(gm, example_inputs, config_patches=None, **kw):
        calls.append((gm, gm.code, dict(config_patches or {})))
        if (config_patches or {}).get("cpp_wrapper") and error[0] is not None:
            raise error[0]
        return "compiled"

    gm = torch.fx.symbolic_trace(lambda x: x + 1)
    rewritten = torch.fx.symbolic_trace(lambda x: x + 2)
    reports = []

    def fake_analyse(gm, example_inputs, config):
        reports.append(_report_with_ops("decode_inline"))
        return rewritten, reports[-1]

    def compile_once(**options):
        calls.clear()
        with torch.no_grad():
            assert backend.flashfuse_backend(gm, inputs, options=options) == "compiled"
        return [(c[1], c[2]) for c in calls], reports[-1]

    monkeypatch.setattr(cfx, "compile_fx", fake_compile_fx)
    monkeypatch.setattr(backend, "analyse", fake_analyse)
    with FakeTensorMode():
        inputs = [torch.empty(4, device="cuda")]
    seen, rep = compile_once(epilogue_fusion=False, debug_dir=str(tmp_path))
    assert seen == [(rewritten.code, {"epilogue_fusion": False, "cpp_wrapper": True})]
    assert rep.inductor_patches == {"cpp_wrapper": True}
    assert "Inductor options set by flashfuse: cpp_wrapper=True" in str(_report.Report([rep]))
    dumped = json.loads((tmp_path / "graph_000" / "report.json").read_text())  # the dump is written again
    assert dumped["graphs"][0]["inductor_patches"] == {"cpp_wrapper": True}

    error[0] = RuntimeError("this graph says no")  # a failure of one graph: retried without, tried again next graph
    with pytest.warns(RuntimeWarning, match="this graph says no.*compiling it without"):
        seen, rep = compile_once()
    # the rewritten graph again, as a copy (Inductor may have consumed the first), without the option; the rewrites
    # stay and no graph fallback is recorded
    assert seen == [(rewritten.code, {"cpp_wrapper": True}), (rewritten.code, {})]
    assert calls[1][0] is not calls[0][0]
    assert rep.inductor_patches == {} and "this graph says no" in rep.inductor_patches_failed
    assert rep.fallback is None and rep.rewritten == 1
    assert "this graph says no" in str(_report.Report([rep]))

    error[0] = CppCompileError(["g++"], "Python.h: No such file")  # the toolchain: not tried again in the process
    with pytest.warns(RuntimeWarning, match="not tried again"):
        seen, rep = compile_once()
    assert seen == [(rewritten.code, {"cpp_wrapper": True}), (rewritten.code, {})]
    seen, rep = compile_once()
    assert seen == [(rewritten.code, {})] and rep.inductor_patches == {}
