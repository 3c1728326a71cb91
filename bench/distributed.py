"""Training under DDP or FSDP2 on several GPUs: flashfuse against plain ``torch.compile`` and SDPA (issue 9).

    torchrun --nproc-per-node 2 bench/distributed.py            # FSDP2, ~1B Llama, bf16, seq 2048 x batch 2 per rank
    torchrun --nproc-per-node 2 bench/distributed.py --ddp      # DDP instead of FSDP2
    torchrun --nproc-per-node 2 bench/distributed.py --quick    # 4 layers, 5 timed steps
    torchrun --nproc-per-node 2 bench/distributed.py --cpu --tiny   # CPU smoke run: gloo, interpreter, tiny model

The model is ``bench/models.py``'s Llama built from a config (random weights, nothing downloaded; the same
seed on every rank). Methods, each a fresh model wrapped and compiled the same way:

- ``flashfuse``: ``attn_implementation="eager"`` (the naive attention code) + ``torch.compile(backend="flashfuse")``
- ``torch_compile``: the same eager attention code + plain ``torch.compile``
- ``sdpa_compile``: ``attn_implementation="sdpa"`` + ``torch.compile``

DDP wraps the whole model and compiles the wrapper (Dynamo's DDPOptimizer splits the graph at bucket
boundaries, ``--bucket-cap-mb``); FSDP2 shards every decoder layer and the root with ``fully_shard`` and
compiles the root (FSDP2's hooks break the graph at each layer). A train step is forward with labels, backward
and an AdamW step (``--optim sgd`` for SGD). Each rank draws its own batch (seed 1234 + rank).

Per method, rank 0 prints one table row: the median step time over the timed steps (the slowest rank's
median), each rank's median, tokens/s over all ranks, each rank's peak memory (``max_memory_allocated`` over
the timed steps: weights, gradients, optimizer state and activations), the compile time (first step minus one
step), flashfuse's rewritten/total attention sites, and the first step's loss and gradient norm (before the
optimizer step, over the full unsharded gradient). Below the table: the loss and grad-norm differences of each
method against the first one that ran (the same weights and batches: they differ by rounding only).

NOTE: what reaches flashfuse depends on the wrapper (seen on the CPU with transformers 5.24, tiny Llama):
DDP with the model in one bucket gives Dynamo one graph, and HF's causal mask is proven from its ``arange``
comparisons (report ``mask none``, causal flags: tiles above the diagonal skipped). FSDP2 breaks the graph at
every ``fully_shard`` layer, and DDP's DDPOptimizer at every bucket (25 MB by default: a 1B model is split
into dozens of pieces): the mask is built in one graph and enters the layers' graphs as an input tensor, so
flashfuse gets a dense additive ``[B, 1, S, S]`` mask (``masks additive`` in the note column). The rewrite is
right but reads the mask and cannot skip by structure. Passing ``use_cache=False`` also changes HF's mask
code (two boolean masks, ``2xbool``, causal not proven), so the step below does not pass it.

``--cpu`` runs on gloo with the kernels under the Triton interpreter and, unless ``--inductor``, without
Inductor (``torch_compile``/``sdpa_compile`` use ``aot_eager``, flashfuse ``options={"inductor": False}``): a
smoke run of the code path, not a timing.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
if __name__ == "__main__":
    # a checkout that is not installed: the package beside this folder; bench/models.py beside this file
    sys.path.insert(0, os.path.dirname(HERE))
    sys.path.insert(0, HERE)
    if "--cpu" in sys.argv:
        # before anything imports triton: @triton.jit reads it when a kernel is defined
        os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

METHODS = ("flashfuse", "torch_compile", "sdpa_compile")
ATTN = {"flashfuse": "eager", "torch_compile": "eager", "sdpa_compile": "sdpa", "eager": "eager"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Row:
    method: str
    status: str = "ok"              # ok | OOM | error
    ms: list[float] | None = None   # per rank: median step time
    peak_gib: list[float] | None = None
    compile_s: float | None = None
    sites: str = ""
    loss: float | None = None       # first step, mean over ranks
    grad_norm: float | None = None  # first step, before the optimizer step
    note: str = ""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="torchrun --nproc-per-node 2 bench/distributed.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    wrap = p.add_mutually_exclusive_group()
    wrap.add_argument("--fsdp", dest="wrap", action="store_const", const="fsdp2", help="FSDP2 fully_shard (default)")
    wrap.add_argument("--ddp", dest="wrap", action="store_const", const="ddp", help="DistributedDataParallel")
    p.set_defaults(wrap="fsdp2")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 16; --quick 4; --tiny 2)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 2048; --tiny 16)")
    p.add_argument("--batch", type=int, default=None, help="sequences per rank (default 2)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; --quick 5; --tiny 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps, compile included (default 2; --tiny 1)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--optim", choices=("adamw", "sgd"), default="adamw")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default bf16 (fp32 with --cpu)")
    p.add_argument("--bucket-cap-mb", type=float, default=None, help="DDP bucket size (Dynamo splits the graph there)")
    p.add_argument("--quick", action="store_true", help="4 layers, 5 timed steps")
    p.add_argument("--tiny", action="store_true", help="hidden 64, 2 layers, 4/2 heads, seq 16")
    p.add_argument("--cpu", action="store_true", help="gloo on the CPU, kernels under TRITON_INTERPRET=1")
    p.add_argument("--inductor", action="store_true", help="--cpu: compile with Inductor all the same")
    args = p.parse_args(argv)
    args.dtype = DTYPES[args.dtype or ("fp32" if args.cpu else "bf16")]
    args.layers = args.layers or (2 if args.tiny else 4 if args.quick else None)
    args.seq = args.seq or (16 if args.tiny else 2048)
    args.batch = args.batch or 2
    args.steps = args.steps or (2 if args.tiny else 5 if args.quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 2)
    args.methods = [m for m in args.methods.split(",") if m]
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(args, method: str, device: torch.device):
    from models import FULL, TINY, build_model, set_attention  # bench/models.py

    config = dict(TINY if args.tiny else FULL)
    if args.layers:
        config["num_hidden_layers"] = args.layers
    model = build_model(config, args.seq, args.dtype, str(device))
    set_attention(model, ATTN[method])
    return model.train()


def wrap_and_compile(model, args, method: str, device: torch.device):
    """DDP: compile the wrapper. FSDP2: ``fully_shard`` each decoder layer and the root, compile the root."""
    if args.cpu and not args.inductor:
        backend, options = ("flashfuse", {"inductor": False}) if method == "flashfuse" else ("aot_eager", None)
    else:
        backend, options = ("flashfuse", None) if method == "flashfuse" else ("inductor", None)
    if args.wrap == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        kw = {"device_ids": [device.index]} if device.type == "cuda" else {}
        if args.bucket_cap_mb is not None:
            kw["bucket_cap_mb"] = args.bucket_cap_mb
            # Dynamo's DDPOptimizer refuses a bucket cap below c10d's first bucket (1 MiB)
            dist._DEFAULT_FIRST_BUCKET_BYTES = min(dist._DEFAULT_FIRST_BUCKET_BYTES, int(args.bucket_cap_mb * 2**20))
        wrapped = DDP(model, **kw)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        wrapped = fully_shard(model)
    return torch.compile(wrapped, backend=backend, options=options)


def grad_norm(model) -> float:
    """The 2-norm of the full gradient: DDP's are replicated; FSDP2's shards are summed over the ranks."""
    local = torch.zeros((), dtype=torch.float64, device=next(model.parameters()).device)
    sharded = False
    for p in model.parameters():
        if p.grad is None:
            continue
        g = p.grad
        if hasattr(g, "to_local"):
            g, sharded = g.to_local(), True
        local += g.double().pow(2).sum()
    if sharded:
        dist.all_reduce(local)
    return math.sqrt(local.item())


def run_method(args, method: str, device: torch.device, rank: int, world: int) -> Row:
    import flashfuse

    row = Row(method)
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    model = build(args, method, device)
    fn = wrap_and_compile(model, args, method, device)
    params = [p for p in fn.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5) if args.optim == "adamw" else torch.optim.SGD(params, lr=1e-5)
    g = torch.Generator().manual_seed(1234 + rank)
    vocab = model.config.vocab_size
    mark = flashfuse.report.collect()

    def step(first: bool = False):
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(device)
        loss = fn(input_ids=ids, labels=ids).loss  # no use_cache=False: see the NOTE at the top
        loss.backward()
        if first:
            mean = loss.detach().double().clone()
            dist.all_reduce(mean)
            row.loss, row.grad_norm = mean.item() / world, grad_norm(fn)
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        start = time.perf_counter()
        step(first=True)
        _sync(device)
        first_s = time.perf_counter() - start
        for _ in range(max(args.warmup - 1, 0)):
            step()
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        dist.barrier()
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            step()
            _sync(device)
            times.append((time.perf_counter() - start) * 1e3)
        median = statistics.median(times)
        row.compile_s = max(0.0, first_s - median * 1e-3)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        row.ms, row.peak_gib = _gather(median), _gather(peak)
        if method == "flashfuse":
            report = flashfuse.last_report(since=mark)
            row.sites = f"{report.rewritten}/{report.total}"
            masks = sorted({str(s.flags.get("mask")) for s in report.sites if s.rewritten})
            row.note = "masks " + ",".join(masks) if masks else ""
    except torch.OutOfMemoryError:
        row.status, row.note = "OOM", ""
    except Exception as e:  # noqa: BLE001 -- one method failing must not hide the others' rows
        row.status, row.note = "error", f"{type(e).__name__}: {str(e)[:200]}"
    torch._dynamo.reset()
    return row


def _gather(x: float) -> list[float]:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, x)
    return out


def _fmt(x, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def format_table(rows: list[Row], args, world: int) -> str:
    tokens = args.batch * args.seq * world
    lines = [("| method | status | ms/step | ms per rank | tokens/s | peak GiB per rank | compile s | flashfuse sites | "
              "loss (step 0) | grad norm (step 0) | note |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = max(r.ms) if r.ms else None
        per_rank = " / ".join(_fmt(m, ".1f") for m in r.ms) if r.ms else "-"
        peak = " / ".join(_fmt(m, ".2f") for m in r.peak_gib) if r.peak_gib else "-"
        tps = tokens / (ms * 1e-3) if ms else None
        lines.append(f"| {r.method} | {r.status} | {_fmt(ms, '.1f')} | {per_rank} | {_fmt(tps, '.0f')} | {peak} | "
                     f"{_fmt(r.compile_s, '.1f')} | {r.sites or '-'} | {_fmt(r.loss, '.5f')} | "
                     f"{_fmt(r.grad_norm, '.5g')} | {r.note} |")
    return "\n".join(lines)


def consistency_line(rows: list[Row]) -> str:
    ok = [r for r in rows if r.status == "ok" and r.loss is not None]
    if len(ok) < 2:
        return "consistency: fewer than two methods ran"
    base = ok[0]
    parts = [f"{r.method} loss {r.loss - base.loss:+.2e}, grad norm {(r.grad_norm - base.grad_norm) / base.grad_norm:+.2e} rel"
             for r in ok[1:]]
    return f"consistency vs {base.method} (step 0, same weights and batches): " + "; ".join(parts)


def main(argv=None) -> int:
    args = parse_args(argv)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.cpu or not torch.cuda.is_available():
        args.cpu = True
        device = torch.device("cpu")
        backend = "gloo"
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    else:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    # a cold Inductor compile of a 1B model takes minutes: well past NCCL's default 10-minute watchdog
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        rows = [run_method(args, m, device, rank, world) for m in args.methods]
        if rank == 0:
            name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (gloo, interpreter)"
            layers = args.layers or 16
            print(f"{args.wrap}, {world} ranks on {name}; Llama {'tiny' if args.tiny else '~1B'} "
                  f"({layers} layers), {str(args.dtype).replace('torch.', '')}, batch {args.batch} x seq {args.seq} "
                  f"per rank, {args.optim}, median of {args.steps} steps after {args.warmup}; "
                  f"torch {torch.__version__}")
            print(format_table(rows, args, world))
            print(consistency_line(rows))
            for r in rows:
                if r.status != "ok":
                    print(f"{r.method}: {r.status} {r.note}")
        return 0 if all(r.status == "ok" for r in rows) else 1
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # NOTE: skip interpreter teardown: a background C++ thread (seen on torch 2.13 CPU, fresh venv) is still
    # joinable at exit and aborts the process ("terminate called without an active exception", exit -6)
    # after the results are printed, which torchrun then reports as a failure.
    os._exit(code)
