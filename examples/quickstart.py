"""flashfuse quickstart: a small GPT with hand-written causal attention, compiled with backend="flashfuse".

Runs on a machine without a GPU (the op computes on the CPU) and on a GPU (the Triton kernel),
prints the match report, the largest difference from eager and, on a GPU, the time against eager and
against plain ``torch.compile``.

    python examples/quickstart.py
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class CausalSelfAttention(nn.Module):
    """nanoGPT's attention: a tril buffer, masked_fill with -inf, softmax, dropout, @ v."""

    def __init__(self, n_embd: int, n_head: int, block_size: int, dropout: float = 0.1):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.attn_dropout = nn.Dropout(dropout)
        self.n_head = n_head
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, block_size: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, block_size)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int = 512, n_embd: int = 128, n_head: int = 4, n_layer: int = 2, block_size: int = 256):
        super().__init__()
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, block_size) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def _time(fn, *args, reps: int = 20) -> float:
    for _ in range(3):
        fn(*args)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn(*args)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default: 64 on CPU, 1024 on GPU)")
    parser.add_argument("--batch", type=int, default=None)
    args = parser.parse_args()

    import flashfuse  # only for the report; the backend itself needs no import

    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    seq = args.seq or (1024 if on_gpu else 64)
    batch = args.batch or (8 if on_gpu else 2)
    torch.manual_seed(0)
    if on_gpu:
        model = GPT(vocab=32000, n_embd=1024, n_head=16, n_layer=4, block_size=seq).to(device, dtype).eval()
    else:
        model = GPT(block_size=seq).eval()
    idx = torch.randint(0, model.wte.num_embeddings, (batch, seq), device=device)

    flashfuse.reset_report()
    compiled = torch.compile(model, backend="flashfuse")
    with torch.no_grad():
        eager_out = model(idx)
        out = compiled(idx)
    report = flashfuse.last_report()
    print(report)
    diff = (out.float() - eager_out.float()).abs().max().item()
    print(f"\nlargest difference from eager: {diff:.3g} ({dtype}, {device}, batch {batch}, seq {seq})")

    if on_gpu:
        plain = torch.compile(model)
        with torch.no_grad():
            t_eager = _time(model, idx)
            t_plain = _time(plain, idx)
            t_ff = _time(compiled, idx)
        print(f"eager {t_eager:.2f} ms | torch.compile {t_plain:.2f} ms | flashfuse {t_ff:.2f} ms "
              f"({t_eager / t_ff:.2f}x eager, {t_plain / t_ff:.2f}x torch.compile)")
    else:
        print("no GPU: the attention op ran on the CPU (timings are shown on a GPU)")


if __name__ == "__main__":
    main()
