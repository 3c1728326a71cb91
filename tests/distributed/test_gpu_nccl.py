"""flashfuse under DDP and FSDP2 on GPUs: NCCL, bfloat16, Inductor (issue 9; ``-m gpu``).

The GPU twin of ``test_ddp_fsdp.py``: each rank (``workers.run_rank`` with ``Job(device="cuda")``, one GPU per
rank; the kernels compiled, not interpreted) compiles
nanoGPT at ``training.GPU_SIZE`` (hidden 256, 4 heads, head dim 64, seq 256) in bfloat16 with
``backend="flashfuse"`` through Inductor and takes 3 SGD steps on its share of each global batch. World size 1
runs on any GPU machine (FSDP2 and DDP with one rank: the wrappers' hooks, graph breaks and collectives are all
there); world size 2 needs two GPUs. Checked:

1. every rank's graphs rewritten, the Triton forward (``flash_fwd``/``flash_fwd_sm90``; SDPA dispatch is turned
   off with ``FLASHFUSE_SDPA=0`` so the test is about flashfuse's kernels) and backward once per site per step;
2. the ranks hold the same reduced gradients (bit-equal);
3. the mean loss and every gradient against single-process eager bfloat16 and float64 runs over the whole global
   batch, under the numerics rule of ``tests/models/training.py`` (error <= 2x eager's + slack). A bf16 reduction
   (NCCL's all-reduce / reduce-scatter average in the gradient dtype) adds one bf16 rounding to each gradient,
   which that slack (2^-8 relative) covers; a lost or doubled rank contribution is 50% off.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist

from tests.distributed import workers
from tests.distributed.test_ddp_fsdp import SITES, _free_port, check_ranks
from tests.distributed.workers import Job
from tests.models import training

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.distributed,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not dist.is_available() or not dist.is_nccl_available(), reason="needs NCCL"),
]


def _spawn(job: Job, world: int, tmp_path) -> list[dict]:
    import torch.multiprocessing as mp

    env = {"FLASHFUSE_SDPA": "0",
           # issue 9's machines: NVLink multicast must stay off (the device notes say why)
           "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # spawned children inherit the environment
    try:
        mp.spawn(workers.run_rank, args=(world, _free_port(), job, str(tmp_path)), nprocs=world, join=True)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _references(world: int) -> dict[str, list[training.StepRecord]]:
    """Single-process eager bfloat16 and float64 over the same global batches, from the same weights."""
    model = workers.build_model("cuda").to(device="cuda", dtype=torch.bfloat16).train()
    eager = training.Trainer(copy.deepcopy(model), workers.lm_loss, workers.LR)
    ref = training.Trainer(copy.deepcopy(model).double(), workers.lm_loss, workers.LR)
    records: dict[str, list[training.StepRecord]] = {"eager": [], "float64": []}
    for ids, targets in workers.global_batches(world=world, device="cuda"):
        batch = (ids.cuda(), targets.cuda())
        records["eager"].append(_cpu(eager.step(batch)))
        records["float64"].append(_cpu(ref.step(batch)))
    return records


def _cpu(rec: training.StepRecord) -> training.StepRecord:
    return training.StepRecord(rec.loss, {n: None if g is None else g.cpu() for n, g in rec.grads.items()})


JOBS = {
    "fsdp2": (Job("fsdp2", inductor=True, device="cuda", dtype="bfloat16"), 1),
    "fsdp2_compiled_blocks": (Job("fsdp2", inductor=True, compile_blocks=True, device="cuda", dtype="bfloat16"), 1),
    "ddp": (Job("ddp", inductor=True, device="cuda", dtype="bfloat16"), SITES),
}


@pytest.mark.parametrize("world", [pytest.param(1, id="world1"), pytest.param(2, id="world2")])
@pytest.mark.parametrize("name", list(JOBS))
def test_gpu_ranks_match_single_process(name, world, tmp_path):
    if world > torch.cuda.device_count():
        pytest.skip(f"needs {world} GPUs, this machine has {torch.cuda.device_count()}")
    job, report_sites = JOBS[name]
    ranks = _spawn(job, world, tmp_path)
    refs = _references(world)
    for step, got in enumerate(check_ranks(ranks, report_sites)):
        training.compare_step(step, got, refs["eager"][step], refs["float64"][step], torch.bfloat16)
