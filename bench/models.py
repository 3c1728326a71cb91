"""Whole-model speed: a Llama-style transformers model, prefill and a training step, one table per run.

    python bench/models.py                  # ~1B: hidden 2048, 16 layers, 32/8 heads, 4k tokens, bf16 (GPU)
    python bench/models.py --layers 4       # the same layers, fewer of them (compiles 4x faster)
    python bench/models.py --quick          # 4 layers, fewer timed steps
    python bench/models.py --tiny           # CPU smoke size (the default without a GPU)

Built from a config (random weights, nothing downloaded). Methods:

- ``flashfuse``: ``attn_implementation="eager"`` (the naive attention code) + ``torch.compile(backend="flashfuse")``
- ``torch_compile``: the same eager attention code + plain ``torch.compile``
- ``sdpa_compile``: ``attn_implementation="sdpa"`` + ``torch.compile``
- ``eager``: the eager attention code, not compiled

Tasks: ``prefill`` (one forward over ``--seq`` tokens, no KV cache, last-token logits, no grad) and
``train`` (forward with labels + backward + AdamW step, or SGD with ``--optim sgd``). Each row gives the
median time of the timed steps, tokens/s, the peak memory of the timed steps (weights, optimizer state
and activations included), the time of the first call minus one step (the compile), and for flashfuse the
attention sites rewritten and the time of its own passes. Below the table: flashfuse's compile time
against plain ``torch.compile`` (issue 5: its passes add at most 10%). Inductor's caches are off unless
``--cache``: every compile is a cold one. flashfuse compiles before plain ``torch.compile`` so that kernels
both graphs share are compiled in flashfuse's time, not the other's (the comparison leans against flashfuse).

NOTE: generation (issue 8: tokens/s of ``generate`` at 4k context, batch 1 and 16, with the split-KV decode
kernel) is a third task here: same model, methods and table, a static cache if it helps compilation.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import inspect
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field

if __name__ == "__main__":
    # a checkout that is not installed: the package beside this folder
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

METHODS = ("flashfuse", "sdpa_compile", "torch_compile", "eager")
TASKS = ("prefill", "train")
ATTN = {"flashfuse": "eager", "torch_compile": "eager", "sdpa_compile": "sdpa", "eager": "eager"}
BACKEND = {"flashfuse": "flashfuse", "torch_compile": "inductor", "sdpa_compile": "inductor", "eager": None}

# ~1B Llama: 16 x (q, o: 2048^2; k, v: 2048 x 512; MLP 3 x 2048 x 8192) + 2 x 32000 x 2048 = 1.10B parameters
FULL = {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8}
TINY = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}


def build_model(config_kw: dict, seq: int, dtype: torch.dtype, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**config_kw, max_position_embeddings=max(seq, 128))
    config._attn_implementation = "eager"
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype)


def set_attention(model, impl: str) -> None:
    """Every layer reads ``config._attn_implementation`` at call time; switch it in place."""
    if getattr(model.config, "_attn_implementation", None) == impl:
        return
    try:
        model.set_attn_implementation(impl)
    except Exception:  # noqa: BLE001 -- older transformers: the config attribute is what the layers read
        model.config._attn_implementation = impl


@contextlib.contextmanager
def timed_flashfuse_analysis(totals: dict):
    """Time flashfuse's whole analysis of each graph (its passes, graph copy and report), not Inductor's part."""
    import importlib

    # `flashfuse.backend` as an attribute is the backend function; the module is in sys.modules
    backend = importlib.import_module("flashfuse.backend")
    original = getattr(backend, "analyse", None)
    if original is None:
        yield
        return

    def analyse(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals["analyse_s"] = totals.get("analyse_s", 0.0) + time.perf_counter() - start

    backend.analyse = analyse
    try:
        yield
    finally:
        backend.analyse = original


@dataclass
class Result:
    task: str
    method: str
    status: str = "ok"  # ok | OOM | error | skip
    ms: float | None = None
    tokens_per_s: float | None = None
    peak_gib: float | None = None
    compile_s: float | None = None
    passes_s: float | None = None  # flashfuse: sum of its passes' times (report.pass_times_ms)
    analyse_s: float | None = None  # flashfuse: its whole analysis (passes + graph copy + report)
    pass_times: dict = field(default_factory=dict)
    sites: str = ""  # flashfuse: rewritten/total attention sites
    check: str = ""  # prefill: max |logits - eager| ; train: the first step's loss
    note: str = ""


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _forward_kwargs(model) -> dict:
    kw = {"use_cache": False}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kw["logits_to_keep"] = 1  # what generate's prefill asks for: the next token's logits only
    return kw


def run_one(model, task: str, method: str, ids: torch.Tensor, *, device: str, reps: int, optim: str,
            eager_logits: torch.Tensor | None) -> tuple[Result, torch.Tensor | None]:
    import flashfuse
    from flashfuse import report as ff_report

    res = Result(task, method)
    torch._dynamo.reset()
    set_attention(model, ATTN[method])
    backend = BACKEND[method]
    fn = model if backend is None else torch.compile(model, backend=backend)
    kw = _forward_kwargs(model)
    totals: dict = {}
    mark = ff_report.collect()
    logits = None
    opt = None
    try:
        if task == "prefill":
            model.eval()

            def step():
                with torch.no_grad():
                    return fn(ids, **kw).logits
        else:
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            opt = (torch.optim.AdamW(params, lr=1e-6) if optim == "adamw" else torch.optim.SGD(params, lr=1e-6))

            def step():
                loss = fn(ids, labels=ids, use_cache=False).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss.detach()

        with timed_flashfuse_analysis(totals) if method == "flashfuse" else contextlib.nullcontext():
            start = time.perf_counter()
            first = step()
            _sync(device)
            first_s = time.perf_counter() - start
        if task == "prefill":
            logits = first.float()
            if eager_logits is not None:
                res.check = f"{(logits - eager_logits).abs().max().item():.3g}"
        else:
            res.check = f"loss {first.float().item():.4f}"
        del first
        step()  # a second warm step: optimizer state, lazy allocations
        _sync(device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            out = step()
            _sync(device)
            times.append((time.perf_counter() - start) * 1e3)
            del out
        res.ms = statistics.median(times)
        res.tokens_per_s = ids.numel() / (res.ms * 1e-3)
        if device == "cuda":
            res.peak_gib = torch.cuda.max_memory_allocated() / 2**30
        if backend is not None:
            res.compile_s = max(0.0, first_s - res.ms * 1e-3)
        if method == "flashfuse":
            report = flashfuse.last_report(since=mark)
            res.sites = f"{report.rewritten}/{report.total}"
            for g in report.graphs:
                for name, ms in g.pass_times_ms.items():
                    res.pass_times[name] = res.pass_times.get(name, 0.0) + ms / 1e3
            res.passes_s = sum(res.pass_times.values())
            res.analyse_s = totals.get("analyse_s")
            if report.fallbacks:
                res.note = "fallback: " + "; ".join(report.fallbacks)[:200]
    except torch.OutOfMemoryError as exc:
        res.status, res.note = "OOM", " ".join(str(exc).split())[:160]
    except Exception as exc:  # noqa: BLE001 -- one method failing is a row, not a crashed run
        text = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        res.status, res.note = ("OOM" if "out of memory" in text.lower() else "error"), text[:300]
    finally:
        opt = None
        model.zero_grad(set_to_none=True)
        fn = None
        step = None
        torch._dynamo.reset()
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return res, logits


def _fmt(x, spec: str) -> str:
    return "" if x is None else format(x, spec)


def format_table(results: list[Result]) -> str:
    lines = ["| task | method | ms | tokens/s | peak GiB | compile s | flashfuse speed-up | flashfuse sites | check |",
             "|---|---|---|---|---|---|---|---|---|"]
    for task in TASKS:
        rows = [r for r in results if r.task == task]
        ff = next((r for r in rows if r.method == "flashfuse" and r.ms), None)
        for r in rows:
            ms = _fmt(r.ms, ".1f") if r.status == "ok" else r.status
            speed = f"{r.ms / ff.ms:.2f}x" if ff is not None and r.ms else ""
            check = r.check if task == "train" or r.method == "eager" or not r.check else f"Δlogits {r.check}"
            lines.append(f"| {task} | {r.method} | {ms} | {_fmt(r.tokens_per_s, ',.0f')} | {_fmt(r.peak_gib, '.1f')} | "
                         f"{_fmt(r.compile_s, '.1f')} | {speed} | {r.sites} | {check} |")
    return "\n".join(lines)


def compile_summary(results: list[Result]) -> list[str]:
    lines = []
    for task in TASKS:
        ff = next((r for r in results if r.task == task and r.method == "flashfuse" and r.compile_s is not None), None)
        plain = next((r for r in results if r.task == task and r.method == "torch_compile" and r.compile_s), None)
        if ff is None:
            continue
        line = f"compile, {task}: flashfuse {ff.compile_s:.1f} s"
        if plain is not None:
            line += (f", plain torch.compile {plain.compile_s:.1f} s "
                     f"({(ff.compile_s - plain.compile_s) / plain.compile_s:+.0%})")
        if ff.passes_s is not None:
            own = ff.analyse_s if ff.analyse_s is not None else ff.passes_s
            line += f"; flashfuse's passes {ff.passes_s:.2f} s, its whole analysis {own:.2f} s"
            if plain is not None:
                verdict = "ok" if own <= 0.10 * plain.compile_s else "OVER the 10% target"
                line += f" = {own / plain.compile_s:.1%} of plain torch.compile's compile ({verdict})"
        lines.append(line)
        if ff.pass_times:
            top = sorted(ff.pass_times.items(), key=lambda kv: -kv[1])
            lines.append("  per pass: " + ", ".join(f"{name} {s * 1e3:.0f} ms" for name, s in top))
    return lines


def summary_line(results: list[Result]) -> str:
    """One line for logs and gpu_check.sh: flashfuse's speed-up over each other method, per task."""
    parts = []
    for task in TASKS:
        rows = {r.method: r for r in results if r.task == task and r.ms}
        ff = rows.get("flashfuse")
        if ff is None:
            continue
        others = ", ".join(f"{ff_speedup:.2f}x vs {m}" for m, ff_speedup in
                           ((m, r.ms / ff.ms) for m, r in rows.items() if m != "flashfuse"))
        parts.append(f"{task}: flashfuse {ff.ms:.1f} ms" + (f" ({others})" if others else ""))
        plain = rows.get("torch_compile")
        if ff.compile_s is not None and plain is not None and plain.compile_s:
            own = ff.analyse_s if ff.analyse_s is not None else (ff.passes_s or 0.0)
            parts[-1] += f", compile {ff.compile_s / plain.compile_s - 1:+.0%} (passes {own / plain.compile_s:.1%})"
    return "summary (models): " + ("; ".join(parts) if parts else "no flashfuse row measured")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/models.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 16; --quick 4; --tiny 2)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 4096; --tiny 64)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--optim", choices=("adamw", "sgd"), default="adamw")
    p.add_argument("--reps", type=int, default=None, help="timed steps (default 10 prefill / 5 train; --quick 3)")
    p.add_argument("--quick", action="store_true", help="4 layers, 3 timed steps")
    p.add_argument("--tiny", action="store_true", help="hidden 64, 2 layers, 4/2 heads, seq 64, float32 (CPU smoke)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="default bf16 (fp32 with --tiny)")
    p.add_argument("--device", default=None)
    p.add_argument("--budget-s", type=float, default=None, help="start no new (task, method) after this many seconds")
    p.add_argument("--cache", action="store_true", help="keep Inductor's caches on (compile times then lie)")
    p.add_argument("--csv", default=None)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tiny = args.tiny or device == "cpu"
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before flashfuse's kernels are imported
    methods = [m for m in args.methods.split(",") if m]
    tasks = [t for t in args.tasks.split(",") if t]
    for name, valid in ((methods, METHODS), (tasks, TASKS)):
        bad = [n for n in name if n not in valid]
        if bad:
            raise SystemExit(f"unknown: {', '.join(bad)} (valid: {', '.join(valid)})")
    config_kw = dict(TINY if tiny else FULL)
    if args.layers:
        config_kw["num_hidden_layers"] = args.layers
    elif args.quick and not tiny:
        config_kw["num_hidden_layers"] = 4
    seq = args.seq or (64 if tiny else 4096)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("fp32" if tiny else "bf16")]
    reps = args.reps or (3 if args.quick or tiny else None)
    if not args.cache:
        import torch._inductor.config as inductor_config

        inductor_config.force_disable_caches = True
        warnings.filterwarnings("ignore", message=".*force disabled by torch.compiler.config.force_disable_caches")

    import transformers

    model = build_model(config_kw, seq, dtype, device)
    n_params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"# {name} | torch {torch.__version__} | transformers {transformers.__version__} | "
          f"{time.strftime('%Y-%m-%d')}", flush=True)
    print(f"# Llama hidden {config_kw['hidden_size']}, {config_kw['num_hidden_layers']} layers, heads "
          f"{config_kw['num_attention_heads']}/{config_kw['num_key_value_heads']}, intermediate "
          f"{config_kw['intermediate_size']}, vocab {config_kw['vocab_size']} ({n_params / 1e9:.2f}B parameters), "
          f"{str(dtype).replace('torch.', '')}, batch {args.batch} x {seq} tokens, optimizer {args.optim}", flush=True)
    torch.manual_seed(0)
    ids = torch.randint(0, config_kw["vocab_size"], (args.batch, seq), device=device)

    # one throw-away compile: Inductor's imports and compile workers are not charged to the first method
    warm = torch.compile(lambda x: torch.relu(x) * 2)
    warm(torch.randn(64, device=device))
    torch._dynamo.reset()

    # prefill's eager first: its logits check the others. Training: flashfuse before plain torch.compile
    order = []
    for task in tasks:
        ranked = ["eager", "flashfuse", "torch_compile", "sdpa_compile"] if task == "prefill" else \
            ["flashfuse", "torch_compile", "sdpa_compile", "eager"]
        order += [(task, m) for m in ranked if m in methods]
    results: list[Result] = []
    eager_logits = None
    start = time.perf_counter()
    for task, method in order:
        elapsed = time.perf_counter() - start
        if args.budget_s is not None and elapsed > args.budget_s:
            left = order[len(results):]
            print(f"budget: {args.budget_s:.0f} s spent; not measured: "
                  + ", ".join(f"{t}/{m}" for t, m in left), flush=True)
            break
        reps_here = reps or (10 if task == "prefill" else 5)
        res, logits = run_one(model, task, method, ids, device=device, reps=reps_here, optim=args.optim,
                              eager_logits=eager_logits)
        if task == "prefill" and method == "eager" and logits is not None:
            eager_logits = logits
        results.append(res)
        if res.status == "ok":
            line = (f"{res.ms:.1f} ms, peak {_fmt(res.peak_gib, '.1f') or '-'} GiB, "
                    f"compile {_fmt(res.compile_s, '.1f') or '-'} s" + (f", sites {res.sites}" if res.sites else "")
                    + (f", {res.check}" if res.check else ""))
        else:
            line = f"{res.status}: {res.note}"
        print(f"[{elapsed:6.1f}s] {task} {method}: {line}", flush=True)
    print()
    print(format_table(results))
    for line in compile_summary(results):
        print(line)
    notes = [f"- {r.task} {r.method}: {r.status}: {r.note}" for r in results if r.note]
    if notes:
        print("notes:\n" + "\n".join(notes))
    print(summary_line(results))
    if args.csv:
        cols = ["task", "method", "status", "ms", "tokens_per_s", "peak_gib", "compile_s", "passes_s", "analyse_s",
                "sites", "check", "note"]
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=cols)
            writer.writeheader()
            for r in results:
                writer.writerow({c: getattr(r, c) for c in cols})
    broken = [r for r in results if r.status == "error"]
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
