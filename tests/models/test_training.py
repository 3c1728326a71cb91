"""Whole-model training through ``backend="flashfuse"``: a few optimizer steps against eager (issue 4).

nanoGPT (the ``tril`` buffer), Llama (GQA, RoPE; unpadded and left-padded), Gemma 2 (soft-capping, a
sliding-window layer), BERT (right-padded, additive padding mask) and T5 (a trainable relative position
bias: the op's mask gradient) are built from configs with random weights, every dropout at 0 and eager
attention. Three copies take the same SGD steps on the same batches (``tests/models/training.py``): compiled
with flashfuse, eager in the same dtype, eager in float64. Each test checks

1. every attention site of the forward graph is rewritten, with the flags the model calls for (band, window,
   softcap, GQA, mask kind, bias gradient), and runs the Triton kernel; each step launches the Triton forward
   and backward kernels once per site, never the reference fallback;
2. the loss of every step, and
3. every parameter's gradient at every step, against float64: at most twice eager's error in the same dtype
   plus a small slack (``training.SLACK``, ``training.FLOOR``).

CPU: float32, the kernels under the Triton interpreter, tiny shapes (2 layers, hidden 64, seq 16, batch 2),
the rewritten graph run eagerly (``inductor=False``) except one nanoGPT run through Inductor (AOTAutograd
traces the op and its registered backward into the joint graph).
GPU (``-m gpu``): bfloat16, Inductor, seq 256, hidden 256, head dim 64.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import pytest
import torch

pytest.importorskip("transformers")

from tests.models import training
from tests.models.training import Size

STEPS = 3


@dataclasses.dataclass(frozen=True)
class Case:
    build: Callable[[Size], torch.nn.Module]
    batch: str                 # training.batches kind
    padded: str | None         # padding side (and label variant)
    sites: int                 # attention sites per forward
    flags: Callable[[Size, torch.dtype], list[dict]]  # the flags each site must carry (a subset of its flags)
    slack: float = 1.0         # factor on training.SLACK


def _fill(dtype):
    return torch.finfo(dtype).min


def _same(n, **flags):
    return lambda size, dtype: [flags] * n


def _gemma2_flags(size, dtype):
    common = {"softcap": 50.0, "scale": 24 ** -0.5, "gqa_groups": size.heads // size.kv_heads, "mask": "none"}
    return [{**common, "window_left": size.window - 1, "window_right": 0},   # sliding_attention layer
            {**common, "window_left": None, "window_right": 0}]              # full_attention layer


def _t5_flags(size, dtype):
    enc = {"causal": False, "mask": "2xadditive", "bias_grad": True}      # position bias + padding mask
    dec = {"causal": True, "mask": "additive", "bias_grad": True}         # position bias (band as flags)
    cross = {"causal": False, "mask": "additive", "bias_grad": False}     # encoder padding mask only
    return [enc, enc, dec, dec, cross, cross]


def _llama_padded_flags(size, dtype):
    return [{"causal": True, "gqa_groups": size.heads // size.kv_heads, "mask": "bool",
             "mask_fill": _fill(dtype)}] * 2


CASES = {
    "nanogpt": Case(training.nanogpt, "lm", None, 2, _same(2, causal=True, mask="none")),
    "llama": Case(training.llama, "hf_lm", None, 2,
                  lambda size, dtype: [{"causal": True, "gqa_groups": size.heads // size.kv_heads,
                                        "mask": "none"}] * 2),
    "llama_leftpad": Case(training.llama, "hf_lm", "left", 2, _llama_padded_flags),
    "llama_leftpad_first_unlabelled": Case(training.llama, "hf_lm", "left_first_unlabelled", 2,
                                           _llama_padded_flags),
    "gemma2": Case(training.gemma2, "hf_lm", None, 2, _gemma2_flags),
    "bert_rightpad": Case(training.bert, "mlm", "right", 2,
                          _same(2, causal=False, window_left=None, window_right=None, mask="additive")),
    "t5_rightpad": Case(training.t5, "seq2seq", "right", 6, _t5_flags),
}

# NOTE: fully masked query rows (left padding) under a finite fill. HF's eager code adds
# where(keep, 0, finfo.min) to the scores: every score of such a row rounds to finfo.min, softmax is uniform
# (out = mean of V, which flashfuse reproduces), and autograd still passes dS = P (dP - rowsum(dP * P)) with
# P = 1/Sk to q and to every key, because d(s + mask)/ds = 1. With HF's labels the last pad position predicts
# the first real token, so that row's dO is not zero. The site's report flag `additive_fill` tells the op the
# fill was added, and its backward adds those terms (flashfuse/ops.py `_empty_row_grads`); "llama_leftpad"
# checks it (it failed before: embed_tokens max error 6.7e-4 vs eager's 4.7e-8), the "first_unlabelled"
# variant checks the rows with no gradient. In bfloat16 the difference hides under the noise, so the GPU run
# leaves "llama_leftpad" out (it would pass without the fix too).
CPU_XFAIL: dict = {}
GPU_CASES = [name for name in CASES if name != "llama_leftpad"]

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def _train(name: str, *, size: Size, dtype: torch.dtype, device: str, inductor: bool, cudnn: bool = False):
    case = CASES[name]
    torch.manual_seed(0)
    model = case.build(size)
    data = training.batches(case.batch, size, STEPS, device, padded=case.padded)
    report, _ = training.train_and_compare(model, training.loss_fn(case.batch), data, dtype=dtype, device=device,
                                           expected_sites=case.sites, inductor=inductor, slack=case.slack,
                                           cudnn=cudnn)
    training.assert_site_flags(report, case.flags(size, dtype))
    return report


@pytest.mark.skipif(not INTERPRETING, reason="CPU tests run the kernels under TRITON_INTERPRET=1 (conftest sets it "
                                             "without a GPU); on a GPU machine run -m gpu")
@pytest.mark.parametrize("name", [pytest.param(n, marks=[CPU_XFAIL[n]] if n in CPU_XFAIL else [], id=n)
                                  for n in CASES])
def test_train_cpu_fp32(name):
    _train(name, size=training.CPU_SIZE, dtype=torch.float32, device="cpu", inductor=False)


@pytest.mark.skipif(not INTERPRETING, reason="the interpreter run; see test_train_cpu_fp32")
def test_train_cpu_fp32_inductor_nanogpt():
    """Through Inductor: AOTAutograd traces the op (fake impl + registered autograd) into a joint graph and
    Inductor's backward calls ``flashfuse::attention_backward`` (the launch counts prove it ran)."""
    _train("nanogpt", size=training.CPU_SIZE, dtype=torch.float32, device="cpu", inductor=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", GPU_CASES)
def test_train_gpu_bf16(name, monkeypatch):
    """flashfuse's own Triton kernels (the SDPA-cuDNN dispatch off: nanoGPT's causal MHA would go there)."""
    monkeypatch.setenv("FLASHFUSE_SDPA", "0")
    _train(name, size=training.GPU_SIZE, dtype=torch.bfloat16, device="cuda", inductor=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_train_gpu_bf16_nanogpt_cudnn_dispatch():
    """The default dispatch: nanoGPT's causal MHA (no mask tensor, Sq == Sk, D = 64) runs SDPA's cuDNN forward and
    backward through Inductor (q is a transposed view: the op's output must still be contiguous, as its fake
    says) and trains like eager."""
    _train("nanogpt", size=training.GPU_SIZE, dtype=torch.bfloat16, device="cuda", inductor=True, cudnn=True)
