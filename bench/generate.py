"""Generation speed: tokens/s of transformers ``generate`` on a Llama-style model, flashfuse against its peers.

    python bench/generate.py                 # GPU: ~1B (hidden 2048, 16 layers, 32/8 heads), bf16, 4k context,
                                             #      batch 1 and 16, 64 new tokens, greedy
    python bench/generate.py --layers 4      # the same layers, fewer of them (compiles 4x faster)
    python bench/generate.py --batch 1 --new-tokens 128
    python bench/generate.py --cpu --tiny    # smoke test: a 1-layer model, fp32, CPU (Triton interpreter), batch 1
    python bench/generate.py --interleave    # every model built first, then timed in rotating rounds (less drift)

Random weights from a config (nothing downloaded). Methods:

- ``eager``: ``attn_implementation="eager"`` (the naive attention code), not compiled
- ``sdpa``: ``attn_implementation="sdpa"``, not compiled
- ``torch_compile``: the eager attention code + plain ``torch.compile`` (Inductor)
- ``flashfuse``: the eager attention code + ``torch.compile(backend="flashfuse")``: the decode steps (one query
  against the cache) run the split-KV kernel ``flash_decode``, the prefill the prefill kernel; ``generate`` runs
  under no_grad, so the graphs call the inference ops (``flashfuse::decode_inline`` for decode steps on Hopper,
  launched by Inductor; else ``flashfuse::attention_infer``)
- ``flashfuse_autograd_op`` (only when named in ``--methods``): flashfuse with ``options={"infer_op": False}``,
  the op with autograd (more host time a call), to measure what the inference op saves

Compilation: ``model.forward = torch.compile(model.forward, ...)`` (``torch.compile(model)`` would return a
wrapper whose ``generate`` still calls the uncompiled module). Every method, compiled or not, uses a STATIC
cache (``cache_implementation="static"``, ``--cache dynamic`` to change): its fixed shapes give the compiled
methods one prefill graph and one decode graph instead of a recompile per cache length, and the same cache
for all methods keeps the work equal (each decode step attends to the whole ``context + new tokens`` buffer
with a mask). ``disable_compile=True``: transformers' own auto-compile of static-cache decoding stays off, so
``eager`` and ``sdpa`` are really eager.

Timing: after a warm-up ``generate`` (compiles), ``generate(max_new_tokens=1)`` is the prefill (its time is
the prefill plus one sampling step), ``generate(max_new_tokens=N)`` the whole run; decode tokens/s is
``batch x (N - 1) / (t_N - t_1)``. ``speedup`` is a method's tokens/s over the best of the OTHER methods.
``same`` says whether the generated tokens equal eager's (greedy; with bf16 random weights near-ties may flip
a token, so this is information on the GPU and an assertion in the fp32 CPU smoke test).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import warnings

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if "--cpu" in sys.argv:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton on the CPU; set before any triton.jit runs

import torch

METHODS = ("eager", "sdpa", "torch_compile", "flashfuse")
# not run unless named: flashfuse with options={"infer_op": False}, its graphs calling the op with autograd even
# under no_grad (sessions <= 6's decode path), to measure what the inference op saves; torch.compile with Inductor's
# C++ wrapper (options={"cpp_wrapper": True}: the graph's kernels launched from C++), which flashfuse turns on itself
# for CUDA inference graphs since session 8; and flashfuse without it (options={"infer_cpp_wrapper": False})
EXTRA = ("flashfuse_autograd_op", "torch_compile_cpp_wrapper", "flashfuse_no_cpp_wrapper")
ATTN = {"eager": "eager", "sdpa": "sdpa", "torch_compile": "eager", "flashfuse": "eager",
        "flashfuse_autograd_op": "eager", "torch_compile_cpp_wrapper": "eager",
        "flashfuse_no_cpp_wrapper": "eager"}  # fmt: skip
BACKEND = {"eager": None, "sdpa": None, "torch_compile": "inductor", "flashfuse": "flashfuse",
           "flashfuse_autograd_op": "flashfuse", "torch_compile_cpp_wrapper": "inductor",
           "flashfuse_no_cpp_wrapper": "flashfuse"}  # fmt: skip
OPTIONS = {"flashfuse_autograd_op": {"infer_op": False}, "torch_compile_cpp_wrapper": {"cpp_wrapper": True},
           "flashfuse_no_cpp_wrapper": {"infer_cpp_wrapper": False}}  # fmt: skip

# Llama 3.2 1B's shape with a 32k vocabulary: 16 x (q, o: 2048^2; k, v: 2048 x 512; MLP 3 x 2048 x 8192)
# + 2 x 32000 x 2048 = 1.10B parameters
FULL = {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8}  # fmt: skip
TINY = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip


def build_model(config_kw: dict, max_len: int, dtype: torch.dtype, device: str, attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # the same weights for every method
    config = LlamaConfig(**config_kw, max_position_embeddings=max(max_len, 128))
    config._attn_implementation = attn
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _generate(model, ids, new_tokens: int, cache: str):
    kw = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "num_beams": 1,
          "disable_compile": True, "pad_token_id": 0}  # fmt: skip
    if cache == "static":
        kw["cache_implementation"] = "static"
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), **kw)


def _one_time(fn, device: str) -> tuple[float, object]:
    """(seconds, result) of one call of ``fn``, the device synchronized before and after."""
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def _timed(fn, device: str, reps: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(reps):
        seconds, out = _one_time(fn, device)
        times.append(seconds)
    return statistics.median(times), out


def _decode_rate(batch: int, new_tokens: int, t1: float, tn: float) -> float | None:
    """Tokens/s of the decode steps: ``new_tokens - 1`` steps take ``tn - t1`` (None if timing noise hid them)."""
    return batch * (new_tokens - 1) / (tn - t1) if tn > t1 else None


def _method_model(method: str, config_kw: dict, ids: torch.Tensor, args):
    """The method's model, its forward compiled with the method's backend and options (if any)."""
    model = build_model(config_kw, ids.shape[1] + args.new_tokens, args.dtype, args.device, ATTN[method])
    if BACKEND[method] is not None:
        model.forward = torch.compile(model.forward, backend=BACKEND[method], dynamic=False,
                                      options=OPTIONS.get(method))
    return model


def run_method(method: str, config_kw: dict, ids: torch.Tensor, args) -> dict:
    device = args.device
    from flashfuse import report

    row = {"method": method, "batch": ids.shape[0], "status": "ok", "note": ""}
    mark = report.collect()
    # every method compiles the same function (transformers' forward wrapper): without a reset their graphs pile
    # up in one code object's cache until Dynamo's recompile limit (8) sends a later method to eager
    torch._dynamo.reset()
    try:
        model = _method_model(method, config_kw, ids, args)
        # warm-up: compiles the prefill and decode graphs
        row["warmup_s"], _ = _one_time(lambda: _generate(model, ids, args.new_tokens, args.cache), device)
        t1, _ = _timed(lambda: _generate(model, ids, 1, args.cache), device, args.reps)
        tn, out = _timed(lambda: _generate(model, ids, args.new_tokens, args.cache), device, args.reps)
        row["prefill_ms"] = t1 * 1e3
        row["tokens_per_s"] = _decode_rate(ids.shape[0], args.new_tokens, t1, tn)
        if row["tokens_per_s"] is None:  # timing noise larger than the decode steps (a loaded CPU): the whole
            # run's rate, flagged
            row["tokens_per_s"] = ids.shape[0] * args.new_tokens / tn
            row["note"] = "tokens/s over the whole run (t_N <= t_1)"
        row["tokens"] = out[:, ids.shape[1] :].cpu()
        if BACKEND[method] == "flashfuse":
            row["note"] = _sites_note(report.last_report(mark)) + "; " + _decode_launch_note()
    except torch.cuda.OutOfMemoryError:
        row["status"] = "OOM"
    except Exception as e:  # noqa: BLE001 -- one failing method must not hide the others' numbers
        row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
    finally:
        model = None
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return row


def _sites_note(rep) -> str:
    """How many sites flashfuse rewrote, and which ops they call (the report's ``op`` flag)."""
    called = sorted({s.flags.get("op", "?") for s in rep.sites if s.rewritten})
    return (f"{rep.rewritten}/{rep.total} attention sites rewritten in {len(rep.graphs)} graphs "
            f"(op: {', '.join(called) or 'none'})")


def _decode_launch_note() -> str:
    """How the decode steps launched: flash_decode's call keys, and how many launch through compiled handles."""
    from flashfuse.kernels import flash_decode

    launches = list(flash_decode._LAUNCHES.values())
    handles = sum(all(isinstance(h, flash_decode._Handle) for h in launch.handles) for launch in launches)
    hot = sum(launch.op_checked for launch in launches)
    return (f"flash_decode: {len(launches)} call keys, {handles} launching through compiled handles (fast launch "
            f"{'on' if flash_decode._FAST_LAUNCH else 'off'}), {hot} on the op's hot path")  # fmt: skip


def format_table(rows: list[dict]) -> str:
    lines = ["| method | batch | prefill ms | tokens/s | speedup vs best peer | same tokens as eager | status |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        # the best of the others; flashfuse's variants are not peers of one another
        peers = [p["tokens_per_s"] for p in rows
                 if p["batch"] == r["batch"] and p["method"] != r["method"] and "tokens_per_s" in p
                 and not (BACKEND[p["method"]] == BACKEND[r["method"]] == "flashfuse")]  # fmt: skip
        ok = "tokens_per_s" in r
        speedup = f"{r['tokens_per_s'] / max(peers):.2f}x" if ok and peers else "n/a"
        prefill = f"{r['prefill_ms']:.1f}" if ok else "n/a"
        tps = f"{r['tokens_per_s']:.1f}" if ok else "n/a"
        same = r.get("same", "n/a")
        lines.append(f"| {r['method']} | {r['batch']} | {prefill} | {tps} | {speedup} | {same} | {r['status']} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="run on the CPU (fp32; the Triton interpreter)")
    p.add_argument("--tiny", action="store_true", help="1 layer, hidden 64, 32-token context, 4 new tokens")
    p.add_argument("--layers", type=int, default=None, help="number of decoder layers (default 16)")
    p.add_argument("--context", type=int, default=None, help="prompt tokens (default 4096)")
    p.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default 1 16)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens to generate (default 64)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS + EXTRA)
    p.add_argument("--cache", choices=("static", "dynamic"), default="static")
    p.add_argument("--reps", type=int, default=None, help="timed generate calls per measurement (median)")
    p.add_argument("--interleave", action="store_true",
                   help="build and warm up every method first, then time them in rotating rounds (--reps rounds)")
    args = p.parse_args(argv)
    args.device = "cpu" if args.cpu or not torch.cuda.is_available() else "cuda"
    args.dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    tiny = args.tiny or args.device == "cpu"
    args.context = args.context or (32 if tiny else 4096)
    args.batch = args.batch or ([1] if tiny else [1, 16])
    args.new_tokens = args.new_tokens or (4 if tiny else 64)
    args.reps = args.reps or (1 if tiny else 3)
    args.config = dict(TINY if tiny else FULL)
    if args.layers:
        args.config["num_hidden_layers"] = args.layers
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (tokens/s is measured past the first token)")
    return args


def run_interleaved(methods: list[str], config_kw: dict, ids: torch.Tensor, args) -> list[dict]:
    """``--interleave``: every method's model built and warmed up first, then ``reps`` rounds that time each method
    once (the order rotating each round), so that a drift of the machine over the run (clocks, other tenants)
    falls on every method alike; medians per method."""
    from flashfuse import report

    device = args.device
    for name in ("recompile_limit", "cache_size_limit"):  # all models' graphs stay in one code object's cache
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
    torch._dynamo.reset()
    rows, models = [], {}
    for method in methods:
        row = {"method": method, "batch": ids.shape[0], "status": "ok", "note": "", "t1": [], "tn": []}
        mark = report.collect()
        try:
            model = _method_model(method, config_kw, ids, args)
            row["warmup_s"], _ = _one_time(lambda: _generate(model, ids, args.new_tokens, args.cache), device)
            row["tokens"] = _generate(model, ids, args.new_tokens, args.cache)[:, ids.shape[1]:].cpu()
            models[method] = model
            if BACKEND[method] == "flashfuse":
                row["note"] = _sites_note(report.last_report(mark))
        except Exception as e:  # noqa: BLE001 -- one failing method must not hide the others' numbers
            row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
        rows.append(row)
        print(f"#   {method} batch {ids.shape[0]}: {row['status']}, warm-up {row.get('warmup_s', float('nan')):.1f} s",
              flush=True)  # fmt: skip
    live = [r for r in rows if r["method"] in models]
    for rnd in range(args.reps):
        for r in live[rnd % len(live):] + live[: rnd % len(live)]:
            model = models[r["method"]]
            r["t1"].append(_one_time(lambda: _generate(model, ids, 1, args.cache), device)[0])
            r["tn"].append(_one_time(lambda: _generate(model, ids, args.new_tokens, args.cache), device)[0])
    for r in live:
        t1, tn = statistics.median(r["t1"]), statistics.median(r["tn"])
        r["prefill_ms"] = t1 * 1e3
        rate = _decode_rate(ids.shape[0], args.new_tokens, t1, tn)
        r["tokens_per_s"] = float("nan") if rate is None else rate
        per_round = [x for x in (_decode_rate(ids.shape[0], args.new_tokens, a, b) for a, b in zip(r["t1"], r["tn"]))
                     if x is not None]
        if per_round:
            r["note"] += (("; " if r["note"] else "") + f"tokens/s per round: min {min(per_round):.1f}, "
                          f"max {max(per_round):.1f} ({len(per_round)} rounds)")
    models.clear()
    gc.collect()
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import flashfuse  # noqa: F401 -- registers the "flashfuse" backend

    warnings.filterwarnings("ignore", message=".*generation flags.*")
    c = args.config
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"# device: {name}; Llama hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, heads "
          f"{c['num_attention_heads']}/{c['num_key_value_heads']}, {str(args.dtype)[6:]}; context {args.context}, "
          f"{args.new_tokens} new tokens, greedy, {args.cache} cache")  # fmt: skip
    rows = []
    for batch in args.batch:
        torch.manual_seed(1)
        ids = torch.randint(1, c["vocab_size"], (batch, args.context), device=args.device)
        eager_tokens = None
        if args.interleave:
            batch_rows = run_interleaved(args.methods, c, ids, args)
        else:
            batch_rows = []
            for method in args.methods:
                batch_rows.append(run_method(method, c, ids, args))
                row = batch_rows[-1]
                print(f"#   {method} batch {batch}: {row['status']}, warm-up {row.get('warmup_s', float('nan')):.1f} "
                      "s", flush=True)  # fmt: skip
        for row in batch_rows:
            if row["method"] == "eager" and "tokens" in row:
                eager_tokens = row["tokens"]
            if "tokens" in row and eager_tokens is not None:
                row["same"] = "yes" if torch.equal(row["tokens"], eager_tokens) else "no"
            rows.append(row)
    print()
    print(format_table(rows))
    for r in rows:
        if r["note"]:
            print(f"# {r['method']} batch {r['batch']}: {r['note']}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
