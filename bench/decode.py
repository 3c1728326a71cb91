"""Decode-step attention speed: the split-KV kernel (``flash_decode``) against the prefill kernel and SDPA.

    python bench/decode.py                 # GPU: B = 1, 16; Sq = 1, 4; Sk = 4k, 16k, 32k (about 40 s on an H100)
    python bench/decode.py --quick         # GPU: 4 cases, shorter timing
    python bench/decode.py --sweep-splits  # also time num_splits = 1, 2, 4, ..., 128 per case
    python bench/decode.py --config 64,64,4,3   # force BLOCK_M,BLOCK_N,num_warps,num_stages of the decode kernel
    python bench/decode.py --device cpu    # tiny shapes under the Triton interpreter (smoke test)
    python bench/decode.py --host          # host time of one op call, broken down (B=1, Sk=4k; ~10 s on a GPU)

Shapes are a Llama-style decode step: Hq = 32, Hkv = 8, D = 128, bf16, a bottom-right causal band
(``window_right = Sk - Sq``). A decode step reads the whole cache once, so the figure of merit is bandwidth:
bytes of K and V over the kernel time (``triton.testing.do_bench`` median, L2 flushed between calls), next
to the copy bandwidth measured in the same run (a device-to-device ``copy_`` of a 1 GiB tensor: bytes read
plus bytes written over its time). The issue's target is 70% of the copy bandwidth.

SDPA (``F.scaled_dot_product_attention(..., enable_gqa=True)``) runs without a mask: for Sq = 4 it attends to
up to 3 more keys than the causal band, which does not change its time (its ``is_causal`` is top-left, the
wrong band for a decode step). The ``check`` column compares the decode kernel with the prefill kernel.
``host us/call`` is the launcher's CPU time for a call whose shapes it has seen (key lookup, three
allocations, two launches through Triton's compiled handles; validation and planning run once per key):
do_bench's L2 flush (a 256 MB memset, ~85 us) runs ahead of each call and hides it, a model without CUDA
graphs does not. The first version spent 165-300 us here on an H100 host, more than the kernels at 4k keys;
``FLASHFUSE_DECODE_FAST_LAUNCH=0`` goes back to Triton's generic launch, for comparison.

``--host`` breaks one op call down instead (``torch.ops.flashfuse.attention`` as Inductor's code calls it, under
``no_grad``, a Llama decode step: B = 1, Sk = 4096, an additive ``[B, 1, 1, Sk]`` mask as transformers' static
cache passes it, its last 64 slots masked): the dispatcher, the op's checks, ``flash_decode_forward`` and each launch (Triton's generic
launch vs the compiled handle), and the op's body as it would be with its hot path (``flash_decode.forward_known``
first). Each figure is the median over batches of 100 calls with a device sync between batches (so the GPU's
launch queue never fills and the figure is host time, not GPU time). On the CPU the kernels are stubbed out.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton on the CPU; set before any triton.jit runs

import torch
import torch.nn.functional as F

HQ, HKV, D = 32, 8, 128


def _time_ms(fn, device: str, rep_ms: int) -> float:
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=max(rep_ms // 4, 5), rep=rep_ms, return_mode="median")
    start = time.perf_counter()  # the interpreter (smoke test): one call, nothing to compile
    fn()
    return (time.perf_counter() - start) * 1e3


def _host_us(fn, device: str, calls: int = 20) -> float:
    """CPU time of one call (validation, allocation, two launches): what a decode step pays without CUDA graphs."""
    if device != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls * 1e6
    torch.cuda.synchronize()
    return host


def copy_bandwidth(device: str, rep_ms: int) -> float:
    """GB/s of ``y.copy_(x)``: bytes read + bytes written over the time."""
    nbytes = (1 << 30) if device == "cuda" else (16 << 20)
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).fill_(1.0)
    y = torch.empty_like(x)
    ms = _time_ms(lambda: y.copy_(x), device, rep_ms)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def _set_config(spec: str | None):
    if not spec:
        return
    from flashfuse.kernels import flash_decode

    bm, bn, w, s = (int(x) for x in spec.split(","))
    cfg = flash_decode.DecodeConfig(bm, bn, w, s)
    flash_decode._pick_config = lambda *args: cfg
    flash_decode._FITTED.clear()
    flash_decode._LAUNCHES.clear()


def run_case(B, Sq, Sk, dtype, device, rep_ms, hq, hkv, d, splits=None, sweep=False):
    from flashfuse.kernels import flash_decode
    from flashfuse.kernels.flash_decode import flash_decode_forward
    from flashfuse.kernels.flash_fwd import flash_attention_forward

    q = torch.randn(B, hq, Sq, d, dtype=dtype, device=device)
    k = torch.randn(B, hkv, Sk, d, dtype=dtype, device=device)
    v = torch.randn(B, hkv, Sk, d, dtype=dtype, device=device)
    scale = 1.0 / math.sqrt(d)
    band = {"window_right": Sk - Sq}

    def decode(ns=splits):
        return flash_decode_forward(q, k, v, scale=scale, num_splits=ns, **band)

    def prefill():
        return flash_attention_forward(q, k, v, scale=scale, **band)

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)

    out, _ = decode()
    ref, _ = prefill()
    err = (out.float() - ref.float()).abs().max().item()
    check = "ok" if err <= (1e-5 if dtype == torch.float32 else 2e-2) else f"FAIL {err:.2e}"

    row = {"B": B, "Sq": Sq, "Sk": Sk, "err": err, "check": check}
    row["plan"] = flash_decode.plan(q, k, v, num_splits=splits, **band)
    row["splits"] = row["plan"].num_splits
    row["decode_ms"] = _time_ms(decode, device, rep_ms)
    row["host_us"] = _host_us(decode, device)
    row["prefill_ms"] = _time_ms(prefill, device, rep_ms)
    try:
        row["sdpa_ms"] = _time_ms(sdpa, device, rep_ms)
    except RuntimeError as e:  # no backend for these inputs
        row["sdpa_ms"], row["sdpa_note"] = None, str(e).splitlines()[0]
    row["kv_bytes"] = (k.numel() + v.numel()) * k.element_size()
    if sweep:
        row["sweep"] = {ns: _time_ms(lambda ns=ns: decode(ns), device, rep_ms) for ns in (1, 2, 4, 8, 16, 32, 64, 128)}
    return row


def _per_call_us(fn, device: str, calls: int = 100, batches: int = 7) -> float:
    """Median over ``batches`` of the host time of one call in a batch of ``calls`` (synced between batches)."""
    times = []
    for _ in range(batches):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    if device == "cuda":
        torch.cuda.synchronize()
    return sorted(times)[batches // 2]


def host_breakdown(device: str, B: int = 1, Sk: int = 4096) -> list[tuple[str, float]]:
    """Host time of one decode op call and its parts, in us (see the module docstring, ``--host``)."""
    from flashfuse import ops
    from flashfuse.kernels import flash_decode

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    hq, hkv, d = HQ, HKV, D
    q = torch.randn(B, 1, hq, d, dtype=dtype, device=device).transpose(1, 2)  # q from the projection: [B, S, H, D]
    k = torch.randn(B, hkv, Sk, d, dtype=dtype, device=device)
    v = torch.randn(B, hkv, Sk, d, dtype=dtype, device=device)
    mask = torch.zeros(B, 1, 1, Sk, dtype=dtype, device=device)
    mask[..., Sk - 64 :] = float("-inf")  # a static cache's mask: the slots past the current token are masked
    scale, fill = d**-0.5, float("-inf")
    kw = {"scale": scale, "mask_fill": fill}
    real_run = flash_decode._run
    captured = []

    def capture(*a):
        captured.append(a)
        if device == "cuda":  # the interpreter would run the kernels: on the CPU, time the host side only
            real_run(*a)

    flash_decode._run = capture
    try:
        flash_decode.flash_decode_forward(q, k, v, mask, **kw)
        if device != "cuda":
            flash_decode._run = lambda *a: None
        else:
            flash_decode._run = real_run
        return _host_rows(device, ops, flash_decode, captured, q, k, v, mask, scale, fill)
    finally:
        flash_decode._run = real_run


def _host_rows(device, ops, flash_decode, captured, q, k, v, mask, scale, fill) -> list[tuple[str, float]]:
    args = (q, k, v, mask, scale, None, None, fill, 0.0, None, 0.0)
    kw = {"scale": scale, "mask_fill": fill}
    launch = captured[0][1]
    op = torch.ops.flashfuse.attention.default
    body = getattr(ops._attention, "_init_fn", None)  # the op's own Python function (a torch.library.custom_op)
    key_args = (q, k, v, mask, None, scale, None, None, fill, 0.0, None)

    def allocations():
        torch.empty(launch.out_shape, dtype=launch.dtype, device=device)
        torch.empty(launch.lse_shape, dtype=torch.float32, device=device)
        torch.empty(launch.ws_numel, dtype=torch.float32, device=device)

    def hot_body():  # the op's body with its hot path first (the patch proposed for flashfuse/ops.py)
        if os.environ.get("FLASHFUSE_DECODE", "1") != "0":
            hit = flash_decode.forward_known(q, k, v, mask, scale, None, None, fill, 0.0, None)
            if hit is not None:
                return hit[0], hit[1], ops._draw_rng_state(q, 0.0)
        raise AssertionError("forward_known missed")

    cases = [("torch.ops.flashfuse.attention (the op as Inductor calls it)", lambda: op(*args))]
    if body is not None:
        cases.append(("  its Python body alone (the rest is the dispatcher)", lambda: body(*args)))
    cases.append(("    validate_attention_args", lambda: ops.validate_attention_args(q, k, v, mask, None, None)))
    if hasattr(ops, "_apply_probe"):
        cases.append(("    _apply_probe, the same mask object", lambda: ops._apply_probe(q, k, mask, None, None)))
        cases.append(("    _apply_probe, a new mask each call (each token's)",
                      lambda: ops._apply_probe(q, k, mask.clone(), None, None), 20))  # fmt: skip
        cases.append(("      mask.clone() alone (part of the line above)", mask.clone))
    cases.append(("    flash_decode.supports", lambda: flash_decode.supports(q, k, v, mask, **kw)))
    cases.append(("    flash_decode_forward", lambda: flash_decode.flash_decode_forward(q, k, v, mask, **kw)))
    cases.append(("      _call_key + _LAUNCHES.get", lambda: flash_decode._LAUNCHES[flash_decode._call_key(*key_args)]))
    cases.append(("      3 allocations (out, lse, workspace)", allocations))
    if device == "cuda":
        for kernel, _, which, grid, a, meta, _ in captured:
            name, h = kernel.fn.__name__, launch.handles[which]
            cases.append(
                (f"      {name}: Triton's generic launch", lambda k=kernel, g=grid, a=a, m=meta: k[g](*a, **m))
            )
            if h:
                cases.append(
                    (f"      {name}: compiled handle", lambda h=h, g=grid, a=a: flash_decode._launch_handle(h, g, a))
                )
            else:
                cases.append((f"      {name}: compiled handle (none made: {h})", None))
    if hasattr(flash_decode, "forward_known"):
        cases.append(("  the op's body with its hot path (forward_known first)", hot_body))
    rows = []
    with torch.no_grad():
        op(*args)
        flash_decode.flash_decode_forward(q, k, v, mask, op_checked=True, **kw)
        for label, fn, *calls in cases:
            rows.append((label, _per_call_us(fn, device, *calls) if fn is not None else float("nan")))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="4 cases, shorter timing")
    p.add_argument("--splits", type=int, default=None, help="force num_splits (default: choose_splits)")
    p.add_argument("--sweep-splits", action="store_true", help="also time num_splits = 1..128 per case")
    p.add_argument("--config", default=None, help="BLOCK_M,BLOCK_N,num_warps,num_stages for the decode kernel")
    p.add_argument("--rep", type=int, default=None, help="do_bench rep in ms (default 100, --quick 40)")
    p.add_argument("--host", action="store_true", help="host time of one op call, broken down (B=1, Sk=4k)")
    args = p.parse_args(argv)

    device = args.device
    if args.host:
        fast = "on" if os.environ.get("FLASHFUSE_DECODE_FAST_LAUNCH", "1") != "0" else "off"
        name = torch.cuda.get_device_name(device) if device == "cuda" else "cpu (kernels stubbed)"
        print(f"device: {name}; B=1, Hq={HQ}, Hkv={HKV}, D={D}, Sk=4096, additive mask; fast launch {fast}")
        print("| host time of | us/call |\n|---|---|")
        for label, us in host_breakdown(device):
            print(f"| {label} | {us:.1f} |")
        return 0
    _set_config(args.config)
    dtype = torch.bfloat16
    if device == "cuda":
        hq, hkv, d = HQ, HKV, D
        batches, sqs, sks = ((1, 16), (1, 4), (4096, 16384, 32768))
        if args.quick:
            sqs, sks = (1,), (4096, 32768)
        rep = args.rep or (40 if args.quick else 100)
        name = torch.cuda.get_device_name(device)
    else:
        hq, hkv, d = 4, 2, 32
        batches, sqs, sks = ((1,), (1, 4), (300,))
        rep = args.rep or 1
        name = "cpu (Triton interpreter)" if os.environ.get("TRITON_INTERPRET") == "1" else "cpu"

    start = time.perf_counter()
    copy_gbs = copy_bandwidth(device, rep)
    print(f"device: {name}; Hq={hq}, Hkv={hkv}, D={d}, bf16, causal (bottom-right)")
    print(f"copy bandwidth (read + write): {copy_gbs:.0f} GB/s")
    print()
    print(
        "| dtype | B | Sq | Sk | splits | decode us | decode GB/s | % of copy | flash_fwd us | sdpa us "
        "| vs best other | host us/call | check |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for B in batches:
        for Sq in sqs:
            for Sk in sks:
                r = run_case(B, Sq, Sk, dtype, device, rep, hq, hkv, d, args.splits, args.sweep_splits)
                rows.append(r)
                gbs = r["kv_bytes"] / (r["decode_ms"] * 1e-3) / 1e9
                others = [t for t in (r["prefill_ms"], r["sdpa_ms"]) if t is not None]
                speedup = min(others) / r["decode_ms"] if others else float("nan")
                sdpa = f"{r['sdpa_ms'] * 1e3:.1f}" if r["sdpa_ms"] is not None else "n/a"
                print(
                    f"| bf16 | {B} | {Sq} | {Sk} | {r['splits']} | {r['decode_ms'] * 1e3:.1f} | {gbs:.0f} "
                    f"| {100 * gbs / copy_gbs:.0f}% | {r['prefill_ms'] * 1e3:.1f} | {sdpa} | {speedup:.2f}x "
                    f"| {r['host_us']:.0f} | {r['check']} |",
                    flush=True,
                )
    print()
    for r in rows:
        print(f"  B={r['B']} Sq={r['Sq']} Sk={r['Sk']}: {r['plan'].describe()}")
    if args.sweep_splits:
        print()
        print("decode us by num_splits:")
        for r in rows:
            cells = ", ".join(f"{ns}: {ms * 1e3:.1f}" for ns, ms in r["sweep"].items())
            best = min(r["sweep"], key=r["sweep"].get)
            print(f"  B={r['B']} Sq={r['Sq']} Sk={r['Sk']} (chosen {r['splits']}, best {best}): {cells}")
    print(f"\nwall time {time.perf_counter() - start:.1f} s")
    return 0 if all(r["check"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
