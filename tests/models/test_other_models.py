"""Real-model conformance outside transformers: nanoGPT-style GPT, einsum attention, timm-style ViT.

timm is not installed (``pip install timm`` would pull another torch); ``TimmStyleViT`` copies timm's
``Attention.forward`` with ``fused_attn=False``. See other_zoo.py.
"""

from __future__ import annotations

import pytest
import torch

from tests.models import other_zoo, zoo
from tests.models.conformance import check_forward


def _case(name):
    model = other_zoo.build("einsum" if name == "einsum_padded" else name)
    if name == "nanogpt":
        return (lambda ids: model(ids)), (zoo.input_ids(),)
    if name == "einsum":
        return (lambda ids: model(ids)), (zoo.input_ids(),)
    if name == "einsum_padded":
        return (lambda ids, mask: model(ids, mask)), (zoo.input_ids(), zoo.right_padded_mask().bool())
    return (lambda px: model(px)), (zoo.pixels(),)


@pytest.mark.parametrize("name", ["nanogpt", "einsum", "einsum_padded", "timm_style_vit"])
def test_forward(name):
    fn, args = _case(name)
    with torch.no_grad():
        check_forward(fn, args, 2)


def test_nanogpt_dynamic_true():
    fn, args = _case("nanogpt")
    with torch.no_grad():
        check_forward(fn, args, 2, dynamic=True)


def test_timm_itself():
    timm = pytest.importorskip("timm", reason="timm not installed (pip install timm would replace torch)")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              num_classes=10).eval()
    for block in model.blocks:
        block.attn.fused_attn = False
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        check_forward(lambda x: model(x), (px,), 2)
