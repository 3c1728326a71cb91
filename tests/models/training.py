"""Whole-model training checks: a few optimizer steps through ``backend="flashfuse"`` against eager.

Three copies of one model start from identical weights and take the same optimizer steps on the same
batches: the model compiled with flashfuse (in the test dtype), the eager model (same dtype) and an eager
float64 copy (the reference). At every step the loss and every parameter's gradient are compared with the
numerics rule of ``tests/helpers.py``: flashfuse's error against float64 is at most twice eager's error in the
same dtype, plus a small slack (``SLACK``, ``FLOOR``). Each copy follows its own trajectory, so the errors of
earlier steps are carried into later ones for flashfuse and eager alike.

``count_attention_calls`` counts the forward and backward Triton kernel launches of the op (and the
reference fallbacks, which must stay at zero): every rewritten site must run the flashfuse backward.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from collections import Counter
from collections.abc import Callable, Iterator

import torch
from torch import nn

from flashfuse import report as _report
from tests.models.conformance import assert_all_rewritten, assert_triton_kernel

# NOTE: the slack, relative to the largest |value| of the float64 reference (a loss, or one parameter's
# gradient). float32: eager's own error is ~1e-7 relative, and the kernel sums in another order (blocked
# online softmax, exp2), which alone is a few 1e-7; 1e-5 leaves room for that without hiding a wrong
# gradient (a missing term or a wrong scale is >= 1e-2 relative). bfloat16: one rounding is 2**-8 = 3.9e-3;
# eager's error is already several of those, so the 2x rule dominates and 1.6e-2 (4 ulps) is the floor
# for a parameter whose eager error happens to be small.
SLACK = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
# the absolute floor, relative to the step's largest gradient of any parameter: a few ulps of that scale
FLOOR = {torch.float32: 1e-6, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -10}


class LossMismatch(AssertionError):
    """A step's loss breaks the numerics rule."""


class GradMismatch(AssertionError):
    """A parameter's gradient breaks the numerics rule (the losses matched)."""


@dataclasses.dataclass
class StepRecord:
    loss: float
    grads: dict[str, torch.Tensor | None]


@contextlib.contextmanager
def count_attention_calls() -> Iterator[Counter]:
    """Count kernel launches of the op: ``flash_fwd``, ``flash_fwd_sm90`` (the Hopper forward for mask-free
    fp16/bf16 calls), ``flash_bwd``, the SDPA-cuDNN dispatch (``cudnn_fwd``/``cudnn_bwd``, calls that returned
    gradients or outputs, not None); and the reference fallbacks ``ref_fwd``/``ref_bwd`` and backward-kernel
    failures (``bwd_kernel_failures``), which must stay at zero."""
    from flashfuse import ops, testing
    from flashfuse.kernels import flash_bwd, flash_fwd, flash_fwd_sm90

    counts: Counter = Counter()
    patched = [(flash_fwd, "flash_attention_forward", "flash_fwd"),
               (flash_fwd_sm90, "flash_attention_forward_sm90", "flash_fwd_sm90"),
               (flash_bwd, "flash_attention_backward", "flash_bwd"),
               (testing, "attention_ref", "ref_fwd"),
               (testing, "attention_backward_ref", "ref_bwd"),
               (ops, "_cudnn_forward", "cudnn_fwd"),
               (ops, "_cudnn_backward", "cudnn_bwd")]
    originals = [getattr(mod, attr) for mod, attr, _ in patched]

    def wrap(fn, key):
        def counted(*args, **kwargs):
            result = fn(*args, **kwargs)
            if result is not None:  # the cuDNN paths return None when cuDNN refused (our kernel runs then)
                counts[key] += 1
            return result
        return counted

    for (mod, attr, key), fn in zip(patched, originals):
        setattr(mod, attr, wrap(fn, key))
    failed_before = len(ops._BACKWARD_KERNEL_FAILED)
    try:
        yield counts
    finally:
        for (mod, attr, _), fn in zip(patched, originals):
            setattr(mod, attr, fn)
        counts["bwd_kernel_failures"] = len(ops._BACKWARD_KERNEL_FAILED) - failed_before


@contextlib.contextmanager
def float64_softmax() -> Iterator[None]:
    """``F.softmax(x, dtype=torch.float32)`` keeps a float64 ``x`` in float64 (for the reference copy only).

    NOTE: HF's eager attention computes ``softmax(scores, dtype=torch.float32)``. In a float64 copy that is a
    downcast: the padding fill ``finfo(float64).min`` becomes ``-inf`` in float32, a left-padded query row
    (every key masked) becomes NaN, and the next layer spreads it everywhere (``0 * NaN`` in ``p @ v``).
    The float64 reference is meant to be the exact math, so its softmax stays float64.
    """
    import torch.nn.functional as F

    original = F.softmax

    def softmax(input, dim=None, _stacklevel=3, dtype=None):
        if input.dtype == torch.float64 and dtype is not None and dtype != torch.float64:
            dtype = None
        return original(input, dim=dim, _stacklevel=_stacklevel, dtype=dtype)

    F.softmax = softmax
    try:
        yield
    finally:
        F.softmax = original


class Trainer:
    """One copy of the model and its optimizer: SGD with momentum 0.9.

    NOTE: SGD, not AdamW: Adam divides by sqrt(v), so in its first step a gradient of 1e-9 moves a weight as
    far as one of 1e-1 -- the sign of a gradient that is zero up to rounding decides a full step, and the
    three trajectories would part for reasons that have nothing to do with attention. SGD's update is linear
    in the gradient: an error stays the size it was.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, lr: float):
        self.model, self.loss_fn = model, loss_fn
        self.opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    def step(self, batch: tuple) -> StepRecord:
        """One step; returns the loss and every gradient (``_orig_mod.`` of a compiled module stripped)."""
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model, *batch)
        loss.backward()
        grads = {n.removeprefix("_orig_mod."): None if p.grad is None else p.grad.detach().clone()
                 for n, p in self.model.named_parameters()}
        self.opt.step()
        return StepRecord(loss.item(), grads)


def _err(a: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    d = (a.double() - ref).abs()
    return d.max().item(), d.mean().item()


def assert_rule(what: str, got, eager, ref, dtype: torch.dtype, *, floor: float = 0.0, slack: float = 1.0,
                exc: type = AssertionError) -> None:
    """max and mean error of ``got`` vs the float64 ``ref`` <= 2x eager's + slack * SLACK * max|ref| + floor."""
    got, eager, ref = (torch.as_tensor(x).double() for x in (got, eager, ref))
    assert torch.isfinite(ref).all(), f"{what}: the float64 reference is not finite"
    assert torch.isfinite(got).all(), f"{what}: flashfuse gives non-finite values"
    slack = slack * SLACK[dtype] * ref.abs().max().item() + floor
    err, mean_err = _err(got, ref)
    err_eager, mean_eager = _err(eager, ref)
    if err > 2 * err_eager + slack:
        raise exc(f"{what}: max error {err:.3g} vs eager's {err_eager:.3g} (slack {slack:.3g}, "
                  f"max|ref| {ref.abs().max():.3g})")
    if mean_err > 2 * mean_eager + slack:
        raise exc(f"{what}: mean error {mean_err:.3g} vs eager's {mean_eager:.3g} (slack {slack:.3g})")


def compare_step(step: int, ff: StepRecord, eager: StepRecord, ref: StepRecord, dtype: torch.dtype, *,
                 slack: float = 1.0) -> None:
    """The loss, then every parameter's gradient (the same set of parameters has one in all three copies)."""
    assert_rule(f"step {step} loss", ff.loss, eager.loss, ref.loss, dtype, slack=slack, exc=LossMismatch)
    assert ff.grads.keys() == eager.grads.keys() == ref.grads.keys()
    have = {n for n, g in ref.grads.items() if g is not None}
    for name, rec in (("flashfuse", ff), ("eager", eager)):
        assert {n for n, g in rec.grads.items() if g is not None} == have, f"step {step}: {name} grads differ in set"
    # a gradient that is zero up to rounding (BERT's key bias: softmax ignores a per-row shift) is judged
    # against the step's gradient scale: its rounding noise comes from terms of that size that cancel
    floor = FLOOR[dtype] * max(ref.grads[n].abs().max().item() for n in have)
    for name in sorted(have):
        g_ff, g_e = ff.grads[name], eager.grads[name]
        assert g_ff.dtype == g_e.dtype == dtype, (name, g_ff.dtype, g_e.dtype)
        assert_rule(f"step {step} grad {name}", g_ff, g_e, ref.grads[name], dtype, floor=floor, slack=slack,
                    exc=GradMismatch)


def train_and_compare(model: nn.Module, loss_fn: Callable, batches: list[tuple], *, dtype: torch.dtype,
                      device: str, expected_sites: int, lr: float = 0.05, inductor: bool = False,
                      slack: float = 1.0, cudnn: bool = False):
    """Train three copies (flashfuse / eager / float64 eager) on ``batches`` (integer tensors: the same data
    for all three) and check sites, kernel launches and numerics (``slack`` scales ``SLACK``).
    Returns ``(report, counts)``."""
    model = model.to(device=device, dtype=dtype).train()
    ref = Trainer(copy.deepcopy(model).double(), loss_fn, lr)
    eager = Trainer(copy.deepcopy(model), loss_fn, lr)
    torch._dynamo.reset()
    mark = _report.collect()
    ff = Trainer(torch.compile(copy.deepcopy(model), backend="flashfuse", options={"inductor": inductor}),
                 loss_fn, lr)
    first_loss = None
    with count_attention_calls() as counts:
        for step, batch in enumerate(batches):
            ff_rec = ff.step(batch)
            with float64_softmax():
                ref_rec = ref.step(batch)
            compare_step(step, ff_rec, eager.step(batch), ref_rec, dtype, slack=slack)
            first_loss = ref_rec.loss if first_loss is None else first_loss
    report = _report.last_report(since=mark)

    # every attention site of the forward graph(s) rewritten and running the Triton kernel (``cudnn``: SDPA's
    # cuDNN kernel, which the op dispatches to); every step launched the forward and backward once per site,
    # never the reference
    assert_all_rewritten(report, expected_sites)
    steps = len(batches)
    assert counts["ref_fwd"] == counts["ref_bwd"] == counts["bwd_kernel_failures"] == 0, dict(counts)
    if cudnn:
        assert counts["cudnn_fwd"] == counts["cudnn_bwd"] == steps * expected_sites, (dict(counts), str(report))
        assert counts["flash_fwd"] == counts["flash_fwd_sm90"] == counts["flash_bwd"] == 0, dict(counts)
    else:
        assert_triton_kernel(report)
        assert counts["cudnn_fwd"] == counts["cudnn_bwd"] == 0, dict(counts)
        assert counts["flash_fwd"] + counts["flash_fwd_sm90"] == steps * expected_sites, (dict(counts), str(report))
        assert counts["flash_bwd"] == steps * expected_sites, (dict(counts), str(report))
    # the steps did something: the loss moved
    assert ref_rec.loss != first_loss
    return report, counts


def assert_site_flags(report, expected: list[dict]) -> None:
    """Each expected flag set (a subset of a site's flags; floats to 1e-9) matches its own rewritten site."""
    left = [s for s in report.sites if s.rewritten]
    assert len(left) == len(expected), str(report)

    def same(a, b):
        if isinstance(a, float) and isinstance(b, float):
            return math.isclose(a, b, rel_tol=1e-9)
        return a == b

    for want in expected:
        match = next((s for s in left if all(k in s.flags and same(s.flags[k], v) for k, v in want.items())), None)
        assert match is not None, f"no rewritten site with flags {want}\n{report}"
        left.remove(match)


# -- models: random weights from configs, eager attention, every dropout 0 --------------------------------------


@dataclasses.dataclass(frozen=True)
class Size:
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    layers: int = 2
    vocab: int = 128
    seq: int = 16
    batch: int = 2
    window: int = 8   # Gemma 2's sliding window: smaller than ``seq``, so the band matters
    pad: int = 3      # padded positions of row 0 in the padded batches

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


CPU_SIZE = Size()
GPU_SIZE = Size(hidden=256, heads=4, kv_heads=2, vocab=512, seq=256, window=64, pad=37)


def _eager(config):
    config._attn_implementation = "eager"
    return config


def _decoder_kw(size: Size, **kw):
    base = {"vocab_size": size.vocab, "hidden_size": size.hidden, "intermediate_size": 2 * size.hidden,
            "num_hidden_layers": size.layers, "num_attention_heads": size.heads,
            "num_key_value_heads": size.kv_heads, "max_position_embeddings": 2 * size.seq,
            "attention_dropout": 0.0}
    base.update(kw)
    return base


def nanogpt(size: Size) -> nn.Module:
    """nanoGPT's slow-path attention (the ``tril`` buffer, ``masked_fill(-inf)``), every dropout set to p=0."""
    from tests.models.other_zoo import NanoGPT

    model = NanoGPT(n_layer=size.layers, n_embd=size.hidden, n_head=size.heads, block_size=size.seq,
                    vocab=size.vocab)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def llama(size: Size) -> nn.Module:
    """Llama with GQA (``repeat_kv``), RoPE, HF's 4-D causal (+ padding) mask."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(_eager(LlamaConfig(**_decoder_kw(size))))


def gemma2(size: Size) -> nn.Module:
    """Gemma 2: attention logit soft-capping, a sliding-window layer then a global one, final logit cap."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(**_decoder_kw(size, head_dim=size.head_dim, query_pre_attn_scalar=24,
                                     sliding_window=size.window, attn_logit_softcapping=50.0,
                                     final_logit_softcapping=30.0,
                                     layer_types=["sliding_attention", "full_attention"][:size.layers]))
    return Gemma2ForCausalLM(_eager(cfg))


def bert(size: Size) -> nn.Module:
    """BERT masked LM: bidirectional attention, the padding mask as an additive ``[B, 1, 1, S]`` tensor."""
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(vocab_size=size.vocab, hidden_size=size.hidden, intermediate_size=2 * size.hidden,
                     num_hidden_layers=size.layers, num_attention_heads=size.heads,
                     max_position_embeddings=2 * size.seq, attention_probs_dropout_prob=0.0,
                     hidden_dropout_prob=0.0)
    return BertForMaskedLM(_eager(cfg))


def t5(size: Size) -> nn.Module:
    """T5: the trainable relative position bias is an additive mask that requires grad (it gets dmask)."""
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=size.vocab, d_model=size.hidden, d_kv=size.head_dim, d_ff=2 * size.hidden,
                   num_layers=size.layers, num_heads=size.heads, relative_attention_num_buckets=8,
                   dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(_eager(cfg))


# -- batches and losses ---------------------------------------------------------------------------------------


def _ids(size: Size, g: torch.Generator, seq: int | None = None) -> torch.Tensor:
    return torch.randint(4, size.vocab, (size.batch, seq or size.seq), generator=g)


def _mask(size: Size, side: str) -> torch.Tensor:
    m = torch.ones(size.batch, size.seq, dtype=torch.long)
    if side.startswith("left"):
        m[0, :size.pad] = 0
    elif side == "right":
        m[0, size.seq - size.pad:] = 0
    return m


def batches(kind: str, size: Size, steps: int, device: str, *, padded: str | None = None) -> list[tuple]:
    """``steps`` batches for ``loss_fn(kind)``: integer inputs only, so every copy sees exactly the same data."""
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(steps):
        ids = _ids(size, g)
        if kind == "lm":         # nanoGPT: next-token targets
            b = (ids, torch.roll(ids, -1, 1))
        elif kind == "hf_lm":    # HF causal LM (shifts the labels itself); -100 where padded
            mask = _mask(size, padded) if padded else None
            labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
            if padded == "left_first_unlabelled":
                # the first real token unlabelled too: the last pad position predicts nothing, so no
                # gradient reaches a fully masked (pad) query row
                labels[0, size.pad] = -100
            b = (ids, mask, labels)
        elif kind == "mlm":      # BERT: predict the token at every non-padded position
            mask = _mask(size, padded)
            b = (ids, mask, _ids(size, g).masked_fill(mask == 0, -100))
        elif kind == "seq2seq":  # T5: padded encoder input, decoder of another length
            mask = _mask(size, padded)
            b = (ids, mask, _ids(size, g, seq=size.seq // 2 + 1))
        else:
            raise ValueError(kind)
        out.append(tuple(None if x is None else x.to(device) for x in b))
    return out


def loss_fn(kind: str) -> Callable:
    def lm(model, ids, targets):
        logits = model(ids)
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def hf(model, ids, mask, labels):
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss

    def seq2seq(model, ids, mask, labels):
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss

    return {"lm": lm, "hf_lm": hf, "mlm": hf, "seq2seq": seq2seq}[kind]
