"""Tiny random-weight models for the conformance suite: configs only, nothing downloaded.

``build(name)`` returns ``(model, kind)``: the model in eval mode, float32, eager attention, 2 layers, hidden 64,
4 heads of 16; ``kind`` says how to feed it (``forward``, ``prefill``/``step_fn`` below). Shapes are tiny on
purpose: on the CPU the fused kernel runs under the Triton interpreter.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

B = 2          # batch
S = 16         # prompt length (Mistral/Gemma windows are 8: smaller than the sequence)
VOCAB = 128
PAD = 3        # left padding of row 0 in the padded batch
WINDOW = 8


def _common(**kw):
    base = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 64}
    base.update(kw)
    return base


def _eager(config):
    config._attn_implementation = "eager"
    return config


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(_eager(LlamaConfig(**_common(num_key_value_heads=4))))


def mistral():
    from transformers import MistralConfig, MistralForCausalLM
    return MistralForCausalLM(_eager(MistralConfig(**_common(num_key_value_heads=2, sliding_window=WINDOW))))


def qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    return Qwen2ForCausalLM(_eager(Qwen2Config(**_common(num_key_value_heads=2))))


def qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM
    return Qwen3ForCausalLM(_eager(Qwen3Config(**_common(num_key_value_heads=2, head_dim=16))))


def gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM
    cfg = Gemma2Config(**_common(num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
                                 sliding_window=WINDOW, attn_logit_softcapping=50.0,
                                 final_logit_softcapping=30.0,
                                 layer_types=["sliding_attention", "full_attention"]))
    return Gemma2ForCausalLM(_eager(cfg))


def gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    cfg = Gemma3TextConfig(**_common(num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
                                     sliding_window=WINDOW,
                                     layer_types=["sliding_attention", "full_attention"]))
    return Gemma3ForCausalLM(_eager(cfg))


def phi3():
    from transformers import Phi3Config, Phi3ForCausalLM
    return Phi3ForCausalLM(_eager(Phi3Config(**_common(num_key_value_heads=4, pad_token_id=0,
                                                       bos_token_id=1, eos_token_id=2))))


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(_eager(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                             scale_attn_by_inverse_layer_idx=True, bos_token_id=1,
                                             eos_token_id=2)))


def gpt_neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    return GPTNeoXForCausalLM(_eager(GPTNeoXConfig(**_common(rotary_pct=0.25))))


def gpt_bigcode():
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM
    return GPTBigCodeForCausalLM(_eager(GPTBigCodeConfig(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                                         n_positions=64, multi_query=True, bos_token_id=1,
                                                         eos_token_id=2)))


def opt():
    from transformers import OPTConfig, OPTForCausalLM
    return OPTForCausalLM(_eager(OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                           num_attention_heads=4, word_embed_proj_dim=64,
                                           max_position_embeddings=64, pad_token_id=1)))


def falcon():
    from transformers import FalconConfig, FalconForCausalLM
    return FalconForCausalLM(_eager(FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                                 num_attention_heads=4)))


def bloom():
    from transformers import BloomConfig, BloomForCausalLM
    return BloomForCausalLM(_eager(BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4)))


def gpt_oss():
    from transformers import GptOssConfig, GptOssForCausalLM
    cfg = GptOssConfig(**_common(num_key_value_heads=2, head_dim=16, intermediate_size=64, num_local_experts=4,
                                 num_experts_per_tok=2, sliding_window=WINDOW,
                                 layer_types=["sliding_attention", "full_attention"]))
    return GptOssForCausalLM(_eager(cfg))


def bert():
    from transformers import BertConfig, BertForMaskedLM
    return BertForMaskedLM(_eager(BertConfig(**_common())))


def roberta():
    from transformers import RobertaConfig, RobertaForMaskedLM
    return RobertaForMaskedLM(_eager(RobertaConfig(**_common(max_position_embeddings=66, pad_token_id=1))))


def t5():
    from transformers import T5Config, T5ForConditionalGeneration
    cfg = T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(_eager(cfg))


def whisper():
    from transformers import WhisperConfig, WhisperForConditionalGeneration
    cfg = WhisperConfig(vocab_size=VOCAB, num_mel_bins=8, d_model=64, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                        decoder_ffn_dim=128, max_source_positions=16, max_target_positions=32,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                        suppress_tokens=None, begin_suppress_tokens=None)
    return WhisperForConditionalGeneration(_eager(cfg))


def vit():
    from transformers import ViTConfig, ViTForImageClassification
    return ViTForImageClassification(_eager(ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                      intermediate_size=128, image_size=16, patch_size=4)))


def clip():
    from transformers import CLIPConfig, CLIPModel
    cfg = CLIPConfig(
        text_config={"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": 32, "pad_token_id": 0, "bos_token_id": 1,
                     "eos_token_id": 2},
        vision_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 16, "patch_size": 4},
        projection_dim=32)
    return CLIPModel(_eager(cfg))


def gpt2_upcast():
    """GPT-2 with ``reorder_and_upcast_attn``: scores through ``torch.baddbmm`` on ``[B*H, Sq, Sk]`` in float32."""
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(_eager(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                             scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True,
                                             bos_token_id=1, eos_token_id=2)))


def falcon_new():
    """Falcon-40B style: ``new_decoder_architecture`` with grouped KV heads."""
    from transformers import FalconConfig, FalconForCausalLM
    return FalconForCausalLM(_eager(FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                                 num_attention_heads=4, num_kv_heads=2,
                                                 new_decoder_architecture=True)))


def falcon_alibi():
    """Falcon with ALiBi (falcon-rw): scores + alibi, then scaled, then + mask."""
    from transformers import FalconConfig, FalconForCausalLM
    return FalconForCausalLM(_eager(FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                                 num_attention_heads=4, alibi=True, multi_query=False)))


BUILDERS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "llama": (llama, "causal_lm"),
    "mistral": (mistral, "causal_lm"),
    "qwen2": (qwen2, "causal_lm"),
    "qwen3": (qwen3, "causal_lm"),
    "gemma2": (gemma2, "causal_lm"),
    "gemma3": (gemma3, "causal_lm"),
    "phi3": (phi3, "causal_lm"),
    "gpt2": (gpt2, "causal_lm"),
    "gpt2_upcast": (gpt2_upcast, "causal_lm"),
    "gpt_neox": (gpt_neox, "causal_lm"),
    "gpt_bigcode": (gpt_bigcode, "causal_lm"),
    "opt": (opt, "causal_lm"),
    "falcon": (falcon, "causal_lm"),
    "falcon_new": (falcon_new, "causal_lm"),
    "falcon_alibi": (falcon_alibi, "causal_lm"),
    "bloom": (bloom, "causal_lm"),
    "gpt_oss": (gpt_oss, "causal_lm"),
    "bert": (bert, "encoder"),
    "roberta": (roberta, "encoder"),
    "t5": (t5, "seq2seq"),
    "whisper": (whisper, "whisper"),
    "vit": (vit, "vision"),
    "clip": (clip, "clip"),
}


def build(name: str) -> tuple[nn.Module, str]:
    fn, kind = BUILDERS[name]
    torch.manual_seed(0)
    return fn().float().eval(), kind


# -- inputs ------------------------------------------------------------------------------------------

def input_ids(seq: int = S, batch: int = B, lo: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(lo, VOCAB, (batch, seq), generator=g)


def left_padded_mask(seq: int = S, batch: int = B, pad: int = PAD) -> torch.Tensor:
    m = torch.ones(batch, seq, dtype=torch.long)
    m[0, :pad] = 0
    return m


def right_padded_mask(seq: int = S, batch: int = B, pad: int = PAD) -> torch.Tensor:
    m = torch.ones(batch, seq, dtype=torch.long)
    m[0, seq - pad:] = 0
    return m


def pixels(size: int = 16, batch: int = B) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return torch.randn(batch, 3, size, size, generator=g)


def mel(bins: int = 8, frames: int = 32, batch: int = B) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randn(batch, bins, frames, generator=g)


# -- scenarios: (fn, args) pairs whose fn returns one tensor -------------------------------------------

def forward(model, kind: str, *, padded: bool):
    """``(fn, args)`` for one full forward pass (padded: a padding mask, left for decoders, right for encoders)."""
    if kind == "causal_lm":
        ids = input_ids()
        if padded:
            return (lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits), (ids, left_padded_mask())
        return (lambda ids: model(input_ids=ids).logits), (ids,)
    if kind == "encoder":
        ids = input_ids()
        if padded:
            return (lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits), (ids, right_padded_mask())
        return (lambda ids: model(input_ids=ids).logits), (ids,)
    if kind == "vision":
        return (lambda px: model(pixel_values=px).logits), (pixels(),)
    if kind == "clip":
        ids = input_ids()
        if padded:
            return ((lambda ids, px, mask: model(input_ids=ids, pixel_values=px, attention_mask=mask).logits_per_image),
                    (ids, pixels(), right_padded_mask()))
        return (lambda ids, px: model(input_ids=ids, pixel_values=px).logits_per_image), (ids, pixels())
    if kind == "seq2seq":
        ids, dec = input_ids(), input_ids(seq=12)
        if padded:
            return ((lambda ids, dec, mask: model(input_ids=ids, decoder_input_ids=dec, attention_mask=mask).logits),
                    (ids, dec, right_padded_mask()))
        return (lambda ids, dec: model(input_ids=ids, decoder_input_ids=dec).logits), (ids, dec)
    if kind == "whisper":
        dec = input_ids(seq=12)
        if padded:
            return ((lambda feats, dec, dmask: model(input_features=feats, decoder_input_ids=dec,
                                                     decoder_attention_mask=dmask).logits),
                    (mel(), dec, left_padded_mask(seq=12)))
        return (lambda feats, dec: model(input_features=feats, decoder_input_ids=dec).logits), (mel(), dec)
    raise ValueError(kind)


def _cache_of(out):
    """The KV cache of a model output: ``out.cache`` (transformers >= 5.2x) or ``out.past_key_values`` (5.17)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _cache_kw(model, cache) -> dict:
    """The cache argument under its name in this transformers: ``cache=`` (newer) or ``past_key_values=``."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


def prefill(model, kind: str, *, padded: bool):
    """Run the prompt eagerly. Returns ``(cache, next_ids, mask, enc)`` for q_len=1 decode steps.

    ``mask`` is the mask the decode step takes (None without padding): the growing left-padded mask for
    decoder-only models and Whisper's decoder, the fixed encoder padding mask for T5. ``enc`` is the
    encoder's last hidden state (seq2seq) or None.
    """
    with torch.no_grad():
        if kind == "causal_lm":
            mask = left_padded_mask() if padded else None
            out = model(input_ids=input_ids(), attention_mask=mask, use_cache=True)
            return _cache_of(out), out.logits[:, -1:].argmax(-1), grow(kind, mask), None
        if kind == "seq2seq":
            mask = right_padded_mask() if padded else None
            enc = model.get_encoder()(input_ids=input_ids(), attention_mask=mask).last_hidden_state
            out = model(encoder_outputs=(enc,), attention_mask=mask, decoder_input_ids=input_ids(seq=12),
                        use_cache=True)
            return _cache_of(out), out.logits[:, -1:].argmax(-1), mask, enc
        if kind == "whisper":
            dmask = left_padded_mask(seq=12) if padded else None
            enc = model.get_encoder()(input_features=mel()).last_hidden_state
            out = model(encoder_outputs=(enc,), decoder_input_ids=input_ids(seq=12), decoder_attention_mask=dmask,
                        use_cache=True)
            return _cache_of(out), out.logits[:, -1:].argmax(-1), grow(kind, dmask), enc
    raise ValueError(kind)


def grow(kind: str, mask):
    """The decode-step mask after one more token (T5's encoder mask does not grow)."""
    if mask is None or kind == "seq2seq":
        return mask
    return torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=mask.dtype)], 1)


def step_fn(model, kind: str):
    """``fn(ids, mask, cache, enc) -> logits`` for one decode step; mutates ``cache`` (pass a copy)."""
    if kind == "causal_lm":
        return lambda ids, mask, cache, enc: model(input_ids=ids, attention_mask=mask, **_cache_kw(model, cache),
                                                   use_cache=True).logits
    if kind == "seq2seq":
        return lambda ids, mask, cache, enc: model(encoder_outputs=(enc,), attention_mask=mask,
                                                   decoder_input_ids=ids, **_cache_kw(model, cache),
                                                   use_cache=True).logits
    if kind == "whisper":
        return lambda ids, mask, cache, enc: model(encoder_outputs=(enc,), decoder_input_ids=ids,
                                                   decoder_attention_mask=mask, **_cache_kw(model, cache),
                                                   use_cache=True).logits
    raise ValueError(kind)


def decode_step(model, kind: str, *, padded: bool):
    """``(fn, args)`` for one decode step (q_len=1) against a prefilled KV cache (the survey's form)."""
    cache, nxt, mask, enc = prefill(model, kind, padded=padded)
    return step_fn(model, kind), (nxt, mask, cache, enc)
