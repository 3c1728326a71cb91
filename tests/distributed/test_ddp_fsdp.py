"""flashfuse under PyTorch's distributed engines: DDP and FSDP2 (``fully_shard``), 2 ranks on gloo (issue 9).

Each rank (``workers.run_rank``, started by ``torch.multiprocessing.spawn``) compiles the tiny nanoGPT with
``backend="flashfuse"`` and takes 3 SGD steps on its half of each global batch, the kernels under the Triton
interpreter. Checked here, from the files the ranks leave:

1. each rank's graphs were rewritten: both attention sites of every graph, the Triton kernel (not the
   reference), and each step launched the forward and backward kernels once per site on every rank;
2. the ranks agree: after the collective (DDP's all-reduce, FSDP2's reduce-scatter gathered back with
   ``full_tensor()``) every gradient is the same on both ranks;
3. the distributed run is the single-process run over the whole global batch: the mean of the ranks' losses
   and every gradient against (a) the single-process flashfuse run, to float32 rounding of a different
   reduction order, and (b) eager float32 / float64 with the numerics rule of ``tests/models/training.py``.

Variants: DDP (one graph); DDP with 10 kB buckets (Dynamo's DDPOptimizer splits the graph and compiles the
pieces on fake inputs: the buffer mask then reaches the kernel as a tensor); FSDP2 with the root compiled; FSDP2 with each block compiled (torchtitan's
recipe); DDP through Inductor (``slow``: ~60 s with cold Inductor caches, ~12 s warm). The whole file: ~105 s on
2 shared cores with warm caches.

``-m "not distributed"`` deselects the file. ``test_bench_cpu_tiny`` is the smoke run of
``bench/distributed.py`` (torchrun, 2 processes, ``--cpu --tiny``).
"""

from __future__ import annotations

import copy
import os
import re
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from tests.distributed import workers
from tests.distributed.workers import Job
from tests.models import training
from tests.models.conformance import assert_all_rewritten, assert_triton_kernel

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed + gloo"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                       reason="CPU ranks run the kernels under TRITON_INTERPRET=1 (conftest sets it without a GPU)"),
]

WORLD = 2
SITES = 2  # nanoGPT, 2 layers: one causal attention per block
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# NOTE: the distributed run and the single-process flashfuse run compute the same math on the same weights;
# only the order of the batch reduction differs (per rank then averaged, vs all rows at once). Measured here
# (float32, 3 steps): every gradient within 1.6e-7 of the step's largest gradient; relative to its own largest
# value within 1.5e-6, except a gradient that nearly cancels (ln_f.bias at step 0, max 8.5e-4 where the step's
# largest is 0.12: 8.7e-6 of its own scale under Inductor, 6e-9 of the step's). Hence REL of each tensor's scale
# plus training.FLOOR of the step's scale; a lost or doubled rank contribution is >= 1e-2 relative.
REL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(job: Job, tmp_path) -> list[dict]:
    import torch.multiprocessing as mp

    mp.spawn(workers.run_rank, args=(WORLD, _free_port(), job, str(tmp_path)), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single_process():
    """The single-process runs over the global batches: flashfuse (eager-run graph), eager float32, float64."""
    batches = workers.global_batches(world=WORLD)
    model = workers.build_model().train()
    torch._dynamo.reset()
    ff = training.Trainer(torch.compile(copy.deepcopy(model), backend="flashfuse", options={"inductor": False}),
                          workers.lm_loss, workers.LR)
    eager = training.Trainer(copy.deepcopy(model), workers.lm_loss, workers.LR)
    ref = training.Trainer(copy.deepcopy(model).double(), workers.lm_loss, workers.LR)
    records = {"flashfuse": [], "eager": [], "float64": []}
    for batch in batches:
        records["flashfuse"].append(ff.step(batch))
        records["eager"].append(eager.step(batch))
        records["float64"].append(ref.step(batch))
    torch._dynamo.reset()
    return records


def _close(what: str, got: torch.Tensor, want: torch.Tensor, floor: float = 0.0) -> None:
    scale = want.abs().max().item()
    err = (got.double() - want.double()).abs().max().item()
    assert err <= REL * scale + floor, f"{what}: max error {err:.3g} vs max|ref| {scale:.3g} (floor {floor:.3g})"


def check_ranks(ranks: list[dict], report_sites: int) -> list[training.StepRecord]:
    """Checks 1 and 2 (also for the GPU twin, test_gpu_nccl.py); returns each step's distributed record: the
    global loss (mean of equal-sized local means) and the reduced gradients."""
    for r in ranks:
        # 1. every graph of this rank rewritten; the Triton forward and backward once per site per step
        assert_all_rewritten(r["report"], report_sites)
        assert_triton_kernel(r["report"])
        c = r["counts"]
        assert c.get("ref_fwd", 0) == c.get("ref_bwd", 0) == c.get("bwd_kernel_failures", 0) == 0, (r["rank"], c)
        assert c.get("flash_fwd", 0) + c.get("flash_fwd_sm90", 0) == workers.STEPS * SITES, (r["rank"], c)
        assert c.get("flash_bwd", 0) == workers.STEPS * SITES, (r["rank"], c)
    records = []
    for step in range(workers.STEPS):
        # 2. the ranks hold the same (reduced) gradients
        g0 = ranks[0]["grads"][step]
        for r in ranks[1:]:
            assert r["grads"][step].keys() == g0.keys()
            for name, g in g0.items():
                assert torch.equal(r["grads"][step][name], g), f"step {step} {name}: ranks 0 and {r['rank']} differ"
        records.append(training.StepRecord(sum(r["losses"][step] for r in ranks) / len(ranks), g0))
    return records


def _check(ranks: list[dict], single_process, report_sites: int) -> None:
    for step, dist_rec in enumerate(check_ranks(ranks, report_sites)):
        # 3. the global loss and the gradients = the single-process run
        sp = single_process["flashfuse"][step]
        assert dist_rec.grads.keys() == sp.grads.keys(), (sorted(dist_rec.grads), sorted(sp.grads))
        _close(f"step {step} loss", torch.tensor(dist_rec.loss), torch.tensor(sp.loss))
        floor = training.FLOOR[torch.float32] * max(g.abs().max().item() for g in sp.grads.values())
        for name in sorted(sp.grads):
            _close(f"step {step} grad {name}", dist_rec.grads[name], sp.grads[name], floor)
        training.compare_step(step, dist_rec, single_process["eager"][step], single_process["float64"][step],
                              torch.float32)


# name -> (job, attention sites in the rank's report). FSDP2: its hooks break the graph at every
# ``fully_shard`` block, and the two blocks run one code object, so Dynamo compiles one block graph (one site)
# and runs it for both blocks; the launch counts (once per site per block per step) show both ran the kernel.
JOBS = {
    "ddp": (Job("ddp"), SITES),
    # bucket_cap_mb=0.01 (10 kB: a bucket per 2-3 parameters): Dynamo's DDPOptimizer splits the graph at
    # bucket boundaries and hands each piece to flashfuse; every site must still be found whole
    "ddp_small_buckets": (Job("ddp", bucket_cap_mb=0.01), SITES),
    "fsdp2": (Job("fsdp2"), 1),
    "fsdp2_compiled_blocks": (Job("fsdp2", compile_blocks=True), 1),
    "ddp_inductor": (Job("ddp", inductor=True), SITES),
}


# NOTE: Dynamo's DDPOptimizer compiles each bucket's piece of the graph with *fake* example inputs, so the
# placeholder holding nanoGPT's ``tril`` buffer reaches flashfuse as a FakeTensor. ``_trusted_constants`` skips
# fake values (it used to read them: DataDependentOutputException, both sites left alone); the mask then goes to
# the kernel as a boolean tensor (correct, blocks not skipped by structure).
MARKS = {
    # Inductor's C++ compile on both ranks at once: ~60 s of the 2-core machine
    "ddp_inductor": [pytest.mark.slow],
}


@pytest.mark.parametrize("name", [pytest.param(n, marks=MARKS.get(n, []), id=n) for n in JOBS])
def test_two_ranks_match_single_process(name, tmp_path, single_process):
    job, report_sites = JOBS[name]
    _check(_spawn(job, tmp_path), single_process, report_sites)


# -- bench/distributed.py smoke run ---------------------------------------------------------------------------


# a row of bench/distributed.py's table: | method | ok | ms/step | ...
ROW = re.compile(r"^\| (\w+) \| (\w+) \| ([0-9.]+|-) \|", re.MULTILINE)


def _bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_distributed", os.path.join(ROOT, "bench", "distributed.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bench_cpu_tiny():
    """``torchrun --nproc-per-node 2 bench/distributed.py --cpu --tiny`` (FSDP2): a row per method with a numeric
    step time, flashfuse's sites rewritten, the consistency line."""
    pytest.importorskip("transformers")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           os.path.join(ROOT, "bench", "distributed.py"), "--cpu", "--tiny"]
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {m: (status, ms) for m, status, ms in ROW.findall(proc.stdout)}
    assert set(rows) == set(_bench_module().METHODS), proc.stdout
    for method, (status, ms) in rows.items():
        assert status == "ok" and float(ms) > 0, (method, proc.stdout)
    sites = re.search(r"^\| flashfuse \|.*?\| (\d+)/(\d+) \|", proc.stdout, re.MULTILINE)
    assert sites and sites.group(1) == sites.group(2) != "0", proc.stdout
    assert "consistency vs flashfuse" in proc.stdout, proc.stdout
