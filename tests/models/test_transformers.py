"""Real-model conformance: transformers models built from configs (random weights, nothing downloaded).

For each model, compiled with ``backend="flashfuse"`` (``inductor=False``: the rewritten graph runs eagerly,
the fused kernel under the Triton interpreter on the CPU), for a forward pass, a padded batch, and q_len=1
decode steps with a KV cache (with and without left padding):

1. the logits match eager (float32: ``1e-4 * max(1, |logits|)``);
2. every attention site is rewritten (``NotAllRewritten``), with the expected number of sites;
3. every site runs the Triton kernel, not the reference (``ReferenceKernel``);
4. decoder-only models: the causal/window band is recognized and no dense float mask is read beyond a genuine
   ALiBi bias (``DenseMask``).

Known gaps are ``xfail(strict=True, raises=<that check's exception>)`` with the reason (see SURVEY.md): a
numerics failure still fails, and a gap that closes turns into XPASS, a failure asking for the mark to go.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from tests.models import zoo
from tests.models.conformance import check_decode, check_forward

# attention sites per model in one forward / one decode-step graph (2 layers each)
SITES = {"t5": (6, 4), "whisper": (6, 4), "clip": (4, None)}
DEFAULT_SITES = (2, 2)
# genuine additive ALiBi biases per site ([B, H, 1, Sk], never Sq x Sk): Falcon adds its ALiBi twice (to the
# logits, and folded into the mask as masked_fill(alibi / sqrt(d), causal_mask < -1, min)) -- transformers' code
ALIBI = {"bloom": 1, "falcon_alibi": 2}

CAUSAL_LMS = [m for m, (_, kind) in zoo.BUILDERS.items() if kind == "causal_lm"]

# (model, scenario) -> [(exception, reason)]; scenario "*" covers every scenario. Gaps closed since the first
# survey (now passing): NotAllRewritten for bloom, falcon_alibi, gpt2_upcast (leading-dim views, bias before
# the scale), gpt_oss (attention sinks, router softmax no longer a candidate), t5 with autograd on (bias grad);
# ReferenceKernel for gpt_oss (sinks now in the Triton forward kernel); DenseMask for falcon_alibi (the causal
# band inside masked_fill(alibi, causal_mask < -1, min) is split from the bias) and for the sliding-window
# models' decode after the recompile (bounds with max(past - W + 1, 0) become SymInt windows).
GAPS: dict[tuple[str, str], list[tuple[type, str]]] = {}


def _marks(model: str, scenario: str):
    gaps = GAPS.get((model, "*"), []) + GAPS.get((model, scenario), [])
    if not gaps:
        return []
    return [pytest.mark.xfail(strict=True, raises=tuple(e for e, _ in gaps), reason="; ".join(r for _, r in gaps))]


def _params(models, scenario):
    return [pytest.param(m, marks=_marks(m, scenario), id=m) for m in models]


def _structure(name, kind, *, band: bool):
    """What the mask flags must show for a causal LM (None: not checked for other kinds)."""
    if kind != "causal_lm":
        return None
    return {"band": band, "biases": ALIBI.get(name, 0)}


ALL = list(zoo.BUILDERS)
PADDED = [m for m, (_, kind) in zoo.BUILDERS.items() if kind != "vision"]
DECODE = [m for m, (_, kind) in zoo.BUILDERS.items() if kind in ("causal_lm", "seq2seq", "whisper")]
DECODE_NOPAD_ONLY = {"falcon_new", "gpt2_upcast"}  # padding path identical to falcon / gpt2 (time budget)

_models: dict[str, tuple[torch.nn.Module, str]] = {}


def _model(name):
    if name not in _models:
        _models[name] = zoo.build(name)
    return _models[name]


@pytest.mark.parametrize("name", _params(ALL, "forward"))
def test_forward(name):
    model, kind = _model(name)
    fn, args = zoo.forward(model, kind, padded=False)
    with torch.no_grad():
        check_forward(fn, args, SITES.get(name, DEFAULT_SITES)[0], structure=_structure(name, kind, band=True))


@pytest.mark.parametrize("name", _params(PADDED, "padded"))
def test_padded(name):
    """Left padding for decoders (Whisper: its decoder), right padding for encoders (BERT, RoBERTa, T5, CLIP text).

    Left padding leaves fully masked query rows (the pad tokens): the fill decides their value (mean of V)."""
    model, kind = _model(name)
    fn, args = zoo.forward(model, kind, padded=True)
    with torch.no_grad():
        check_forward(fn, args, SITES.get(name, DEFAULT_SITES)[0], structure=_structure(name, kind, band=True))


@pytest.mark.parametrize("name,padded", [
    pytest.param(m, padded, marks=_marks(m, "decode_padded" if padded else "decode"),
                 id=f"{m}-{'leftpad' if padded else 'nopad'}")
    for padded in (False, True) for m in DECODE if m not in DECODE_NOPAD_ONLY
])
def test_decode(name, padded):
    """Unpadded: 2 steps (static graph, then the automatic-dynamic recompile, as in generation); left-padded:
    1 step (one trace: the suite's time budget)."""
    model, kind = _model(name)
    check_decode(model, kind, padded=padded, expected_sites=SITES.get(name, DEFAULT_SITES)[1],
                 steps=1 if padded else 2, structure=_structure(name, kind, band=False))


@pytest.mark.parametrize("name", _params(["falcon_new", "gpt2_upcast"], "decode"))
def test_decode_nopad_only(name):
    model, kind = _model(name)
    check_decode(model, kind, padded=False, expected_sites=DEFAULT_SITES[1], structure=_structure(name, kind, band=False))


@pytest.mark.parametrize("name", _params(["t5", "llama"], "grad"))
def test_forward_grad_enabled(name):
    """Inference without ``torch.no_grad()``: parameters require grad, so a bias built from them does too (T5)."""
    model, kind = _model(name)
    fn, args = zoo.forward(model, kind, padded=False)
    check_forward(fn, args, SITES.get(name, DEFAULT_SITES)[0], grad=True)


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_forward_dynamic_true(name):
    """``torch.compile(..., dynamic=True)``: every size symbolic from the first compile."""
    model, kind = _model(name)
    fn, args = zoo.forward(model, kind, padded=False)
    with torch.no_grad():
        check_forward(fn, args, DEFAULT_SITES[0], dynamic=True)


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_chunked_prefill_against_a_kv_cache(name):
    """A prompt fed in two chunks: the second chunk (Sq = 8) attends to a cache of Sk = 16 (bottom-right causal)."""
    import copy

    from transformers import DynamicCache

    from flashfuse import report as _report
    from tests.models.conformance import assert_all_rewritten, assert_close

    model, _ = _model(name)
    ids = torch.randint(1, model.config.vocab_size, (2, 16))
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids[:, :8], past_key_values=cache, use_cache=True)
    cache_c = copy.deepcopy(cache)

    def chunk(x, c):
        return model(input_ids=x, past_key_values=c, use_cache=True).logits

    torch._dynamo.reset()
    mark = _report.collect()
    with torch.no_grad():
        out = torch.compile(chunk, backend="flashfuse", options={"inductor": False})(ids[:, 8:], cache_c)
        ref = chunk(ids[:, 8:], cache)
    assert_close(out, ref, "second chunk")
    report = _report.last_report(since=mark)
    assert_all_rewritten(report, DEFAULT_SITES[0] * len(report.graphs))


def test_five_lengths_compile_at_most_twice_and_stay_rewritten():
    from flashfuse import report as _report
    from tests.models.conformance import assert_close

    model, _ = _model("llama")

    def fwd(ids):
        return model(input_ids=ids).logits

    torch._dynamo.reset()
    mark = _report.collect()
    compiled = torch.compile(fwd, backend="flashfuse", options={"inductor": False})
    with torch.no_grad():
        for length in (9, 13, 17, 24, 31):
            ids = torch.randint(1, model.config.vocab_size, (2, length))
            assert_close(compiled(ids), fwd(ids), f"length {length}")
    report = _report.last_report(since=mark)
    assert len(report.graphs) <= 2, str(report)
    assert report.total == report.rewritten == DEFAULT_SITES[0] * len(report.graphs), str(report)
    assert all(site.flags["causal"] for site in report.sites)


def test_forward_without_a_cache_keeps_the_band():
    """``use_cache=False`` (training): transformers then builds its mask for possibly packed sequences, gathering
    position ids (``position_ids[b, kv] <= position_ids[b, q]``, same-sequence ids by diff/cumsum). With the
    position ids made in the graph from an arange, that is still the causal band: no mask is read."""
    model, kind = _model("llama")
    ids = torch.randint(1, model.config.vocab_size, (2, 16))

    def fn(x):
        return model(input_ids=x, use_cache=False).logits

    with torch.no_grad():
        report = check_forward(fn, (ids,), DEFAULT_SITES[0], structure=_structure("llama", kind, band=True))
    assert all(site.flags["mask"] == "none" and site.flags["causal"] for site in report.sites), str(report)
