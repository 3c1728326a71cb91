"""Rank bodies for ``test_ddp_fsdp.py``: one process per rank, gloo, the kernels under the Triton interpreter.

``run_rank`` is the target of ``torch.multiprocessing.spawn``: it builds the tiny nanoGPT from a fixed seed
(every rank and the single-process reference start from the same weights), wraps it in DDP or FSDP2
(``fully_shard`` on each block, then the root), compiles it with ``backend="flashfuse"`` and takes ``STEPS``
SGD steps on its half of each global batch. It saves, per step, its local loss and every parameter's gradient
as the optimizer sees it after the collective (DDP: the all-reduced mean; FSDP2: the reduce-scattered shard,
gathered back with ``full_tensor()``), plus the flashfuse report and the kernel launch counts, to
``<out>/rank<r>.pt``; ``test_ddp_fsdp.py`` checks them.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

STEPS = 3
LR = 0.05
PER_RANK_BATCH = 2


@dataclasses.dataclass(frozen=True)
class Job:
    wrap: str               # "ddp" | "fsdp2"
    inductor: bool = False
    bucket_cap_mb: float | None = None   # DDP: small buckets make Dynamo's DDPOptimizer split the graph
    compile_blocks: bool = False         # FSDP2: compile each block (torchtitan's recipe) instead of the root
    device: str = "cpu"                  # "cuda": one GPU per rank, NCCL; "cpu": gloo, the Triton interpreter
    dtype: str = "float32"               # "bfloat16" on the GPU


def _size(device: str):
    from tests.models import training

    return training.CPU_SIZE if device == "cpu" else training.GPU_SIZE


def build_model(device: str = "cpu"):
    """nanoGPT, every dropout at 0: on the CPU 2 layers, hidden 64, 4 heads, seq 16 (tests/models/training.py's
    CPU_SIZE); on a GPU its GPU_SIZE (hidden 256, seq 256). Float32 on the CPU; the caller casts."""
    from tests.models import training

    torch.manual_seed(0)
    return training.nanogpt(_size(device))


def global_batches(steps: int = STEPS, world: int = 2, device: str = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` global batches of ``world * PER_RANK_BATCH`` rows: (ids, next-token targets), on the CPU."""
    size = _size(device)
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(steps):
        ids = torch.randint(4, size.vocab, (world * PER_RANK_BATCH, size.seq), generator=g)
        out.append((ids, torch.roll(ids, -1, 1)))
    return out


def lm_loss(model, ids, targets):
    logits = model(ids)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def clean_name(name: str) -> str:
    """The parameter's name in the bare model: no ``module.`` (DDP) or ``_orig_mod.`` (torch.compile)."""
    for prefix in ("module.", "_orig_mod."):
        name = name.replace(prefix, "")
    return name


def full_grad(p: torch.nn.Parameter) -> torch.Tensor | None:
    if p.grad is None:
        return None
    g = p.grad
    if hasattr(g, "full_tensor"):  # FSDP2: a DTensor sharded on dim 0
        g = g.full_tensor()
    return g.detach().clone()


def wrap_and_compile(model, job: Job):
    options = {"inductor": job.inductor}
    if job.wrap == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        kw = {}
        if job.bucket_cap_mb is not None:
            kw["bucket_cap_mb"] = job.bucket_cap_mb
            # Dynamo's DDPOptimizer takes c10d's 1 MiB first bucket and refuses a bucket cap below it
            dist._DEFAULT_FIRST_BUCKET_BYTES = int(job.bucket_cap_mb * 2**20)
        return torch.compile(DDP(model, **kw), backend="flashfuse", options=options)
    if job.wrap == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        if job.compile_blocks:
            for block in model.h:
                block.compile(backend="flashfuse", options=options)
        for block in model.h:
            fully_shard(block)
        fully_shard(model)
        return model if job.compile_blocks else torch.compile(model, backend="flashfuse", options=options)
    raise ValueError(job.wrap)


def run_rank(rank: int, world: int, port: int, job: Job, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if job.device == "cpu":
        # CPU ranks run the kernels under the interpreter. Set here, in the rank, before flashfuse (and so its
        # @triton.jit kernels, which read it when defined) is imported -- not at this module's import, which
        # also happens in the parent pytest process (test_gpu_nccl.py imports it there: the GPU ranks it
        # spawns would inherit the variable and interpret their kernels).
        os.environ["TRITON_INTERPRET"] = "1"
        torch.set_num_threads(1)  # two ranks on a 2-core machine
        device = torch.device("cpu")
        dist.init_process_group("gloo", rank=rank, world_size=world)
    else:
        device = torch.device(job.device, rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
    try:
        from flashfuse import report as ff_report
        from tests.models.training import count_attention_calls

        dtype = getattr(torch, job.dtype)
        model = wrap_and_compile(build_model(job.device).to(device=device, dtype=dtype), job)
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
        torch._dynamo.reset()
        mark = ff_report.collect()
        rows = slice(rank * PER_RANK_BATCH, (rank + 1) * PER_RANK_BATCH)
        losses, grads = [], []
        with count_attention_calls() as counts:
            for ids, targets in global_batches(world=world, device=job.device):
                opt.zero_grad(set_to_none=True)
                loss = lm_loss(model, ids[rows].to(device), targets[rows].to(device))
                loss.backward()
                losses.append(loss.item())
                grads.append({clean_name(n): None if (g := full_grad(p)) is None else g.cpu()
                              for n, p in model.named_parameters()})
                opt.step()
        report = ff_report.last_report(since=mark)
        torch.save({"losses": losses, "grads": grads, "counts": dict(counts), "report": report,
                    "rank": rank}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
