"""Decode-step attention speed: the split-KV kernel (``flash_decode``) against the prefill kernel and SDPA.

    python bench/decode.py                 # GPU: B = 1, 16; Sq = 1, 4; Sk = 4k, 16k, 32k (about 40 s on an H100)
    python bench/decode.py --quick         # GPU: 4 cases, shorter timing
    python bench/decode.py --sweep-splits  # also time num_splits = 1, 2, 4, ..., 128 per case
    python bench/decode.py --config 64,64,4,3   # force BLOCK_M,BLOCK_N,num_warps,num_stages of the decode kernel
                                                # (FLASHFUSE_DECODE_CONFIG; add ",k_rows" / ",pdl" for the knobs)
    python bench/decode.py --device cpu    # tiny shapes under the Triton interpreter (smoke test)
    python bench/decode.py --host          # host time of one op call, broken down (B=1, Sk=4k; ~10 s on a GPU)
    python bench/decode.py --tune [--budget-s 150]   # configs x num_splits per shape -> flash_decode.TUNED entries

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

``graph us`` / ``graph %`` time the decode call replayed from a CUDA graph (`_graph_ms`): no host time at all,
the two kernels and the gap between them, as a generation loop under CUDA graphs runs them. Consecutive calls
in the graph read different K/V sets, together at least 4x the L2 (at B = 1, 4k keys K + V is 16.8 MB, which
the H200's 60 MB L2 would otherwise keep between calls; a model has one cache per layer).

``--tune`` times, for B in (1, 16) x Sk in (4k, 8k, 32k) at Sq = 1 and B = 1, Sk = 4k at Sq = 4, each config of
a pruned list (`_tune_configs`) at a few split counts (`_tune_splits`: powers of two that fill the GPU, and the
current choice), with do_bench and with the CUDA graph; each point's output is checked against the prefill
kernel first. Phase 1 (configs, the current ones first, until 75% of ``--budget-s``; a config that fails to
compile or fit is skipped with one line) is config-major, so a short budget drops the least plausible configs,
never a shape; past 16 splits each point is also timed with ``merge_wide`` (the same split kernel, the merge
in one chunk). Phase 2 adds the other knobs (``pdl``, ``k_rows``, both: see `flash_decode.DecodeConfig`) to
each shape's best point, then its second best, then times each shape's best point with a finite ``mask_fill``
(HF's finfo.min: VSUM, the split programs also add up V for rule 6), until the budget. The budget counts
compiles (each config compiles for Sq = 1 and Sq = 4; ~1-3 s each). It prints the knobs' effect, the best
point per shape by either timing, a ``TUNED`` dict to paste into ``flashfuse/kernels/flash_decode.py`` (best by
graph time) and, last, a summary table: current vs best graph time and % of copy bandwidth per shape.

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
import signal
import sys
import threading
import time
from dataclasses import replace

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton on the CPU; set before any triton.jit runs

import torch
import torch.nn.functional as F

HQ, HKV, D = 32, 8, 128
CONFIG_ENV = "FLASHFUSE_DECODE_CONFIG"


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


def _l2_bytes(device: str) -> int:
    return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20) if device == "cuda" else 0


def _n_sets(kv_bytes: int, device: str) -> int:
    """How many K/V sets a CUDA-graph timing rotates through: together at least 4x the L2 (2..16 sets)."""
    if device != "cuda":
        return 1
    return max(2, min(16, math.ceil(4 * _l2_bytes(device) / max(kv_bytes, 1))))


def capture(fns, n: int) -> torch.cuda.CUDAGraph:
    """One CUDA graph of ``n`` calls of ``fns`` in turn, replayed once (warm) before it is returned."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(n):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    return graph


def _graph_ms(fns, device: str, target_ms: float = 2.0, replays: int = 5) -> float:
    """ms per call of ``fns`` (one per K/V set, called in turn) replayed from one CUDA graph; NaN off the GPU.

    What a generation loop under CUDA graphs sees: no host time, only the kernels and the gaps between them.
    NOTE: not ``triton.testing.do_bench_cudagraph``, which replays one call on the same inputs with no L2 flush:
    at B = 1, 4k keys K + V are 16.8 MB and stay in the H200's 60 MB L2 from one call to the next, which a
    model (a cache per layer) never sees. Here consecutive calls read different sets, together >= 4x the L2
    (`_n_sets`). The graph holds ``n`` calls (>= 20, about ``target_ms`` of work); the figure is the median of
    ``replays`` replays over ``n``.
    """
    if device != "cuda":
        return float("nan")
    for fn in fns:  # compiled, planned, handles made: nothing but launches is captured
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for fn in fns:
        fn()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end) / len(fns), 1e-3)  # eager: an over-estimate where host-bound (fewer calls)
    n = min(max(round(target_ms / est), 20), 1000)
    n = math.ceil(n / len(fns)) * len(fns)
    graph = capture(fns, n)
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / n)
    del graph
    torch.cuda.empty_cache()  # the graph's private pool: hundreds of graphs in a --tune run
    return sorted(times)[len(times) // 2]


def _decode_qkv(B, Sq, Sk, dtype, device, hq, hkv, d) -> tuple:
    """A decode step's inputs: q ``[B, hq, Sq, d]``, k and v ``[B, hkv, Sk, d]``, N(0, 1)."""
    return (
        torch.randn(B, hq, Sq, d, dtype=dtype, device=device),
        torch.randn(B, hkv, Sk, d, dtype=dtype, device=device),
        torch.randn(B, hkv, Sk, d, dtype=dtype, device=device),
    )


def _graph_sets(first: tuple, device: str) -> list:
    """``first`` and enough fresh copies of it that graph replays read K/V from HBM, not L2 (see `_graph_ms`)."""
    kv_bytes = (first[1].numel() + first[2].numel()) * first[1].element_size()
    return [first] + [tuple(torch.randn_like(t) for t in first) for _ in range(_n_sets(kv_bytes, device) - 1)]


def _set_config(spec: str | None):
    """``--config``: force the decode kernel's config through FLASHFUSE_DECODE_CONFIG (what `_select` reads)."""
    if not spec:
        return
    from flashfuse.kernels import flash_decode

    flash_decode.parse_config(spec)  # a bad spec fails here, not at the first call
    os.environ[CONFIG_ENV] = spec
    flash_decode._FITTED.clear()
    flash_decode._LAUNCHES.clear()


def run_case(B, Sq, Sk, dtype, device, rep_ms, hq, hkv, d, splits=None, sweep=False):
    from flashfuse.kernels import flash_decode
    from flashfuse.kernels.flash_decode import flash_decode_forward
    from flashfuse.kernels.flash_fwd import flash_attention_forward

    q, k, v = _decode_qkv(B, Sq, Sk, dtype, device, hq, hkv, d)
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
    row["kv_bytes"] = (k.numel() + v.numel()) * k.element_size()
    if device == "cuda":  # more K/V sets, so that graph replays read from HBM (see _graph_ms)
        sets = _graph_sets((q, k, v), device)
        fns = [lambda s=s: flash_decode_forward(*s, scale=scale, num_splits=splits, **band) for s in sets]
        try:
            row["graph_ms"] = _graph_ms(fns, device)
        except Exception as e:  # noqa: BLE001 -- capture refused: keep the row, say why under the table
            row["graph_ms"], row["graph_note"] = float("nan"), _why(e)
        del sets, fns
    else:
        row["graph_ms"] = float("nan")
    row["host_us"] = _host_us(decode, device)
    row["prefill_ms"] = _time_ms(prefill, device, rep_ms)
    try:
        row["sdpa_ms"] = _time_ms(sdpa, device, rep_ms)
    except RuntimeError as e:  # no backend for these inputs
        row["sdpa_ms"], row["sdpa_note"] = None, str(e).splitlines()[0]
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
    if hasattr(torch.ops.flashfuse, "attention_infer"):  # what a graph compiled without autograd calls
        infer = torch.ops.flashfuse.attention_infer.default
        cases.append(("torch.ops.flashfuse.attention_infer (the op of graphs without autograd)",
                      lambda: infer(*args[:10])))  # fmt: skip
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


# ----------------------------------------------------------------------------------------------
# --tune: configs x split counts per decode shape, for flash_decode.TUNED
# ----------------------------------------------------------------------------------------------

# (B, Sq, Sk): the issue's shapes; Sq = 4 last (its tuned_key is Sq = 1's: one tile of 16 packed rows)
TUNE_CASES = ((1, 1, 4096), (1, 1, 8192), (1, 1, 32768), (16, 1, 4096), (16, 1, 8192), (16, 1, 32768), (1, 4, 4096))


def _tune_configs(device: str, current: list):
    """Phase 1's configs: the cases' current ones first, then by how plausible they are (the budget cuts the tail).

    NOTE: the pruning, for D = 128 bf16. K + V of one stage is BLOCK_N x 128 x 2 B x 2 = 16/32/64 KB at
    BLOCK_N = 32/64/128; Hopper has 227 KB of shared memory a block, so 128 x 4 stages (256 KB) cannot fit and
    64 x 2 stages leaves few loads in flight. Decode is a stream: what should matter is bytes in flight per SM
    (stages x tile x resident programs) and the number of programs at B = 1, so the list walks BLOCK_N against
    stages at 4 warps, then 8 warps where the tile is large enough to give every warp rows of its own. BLOCK_M is
    64 everywhere: with Hq / Hkv = 4 and Sq <= 4 the packed rows are <= 16 and the tile is 16 rows whatever it
    says (_plan), so sweeping it would time the same kernel twice.
    """
    from flashfuse.kernels.flash_decode import DecodeConfig as C

    if device != "cuda":  # the interpreter: two small tiles
        rest = [C(32, 16, 1, 1), C(16, 32, 1, 1)]
    else:
        rest = [
            C(64, 64, 4, 3), C(64, 32, 4, 4), C(64, 128, 4, 2), C(64, 64, 4, 4), C(64, 32, 4, 3),
            C(64, 128, 8, 2), C(64, 64, 8, 3), C(64, 128, 8, 3), C(64, 64, 8, 4), C(64, 32, 8, 4), C(64, 64, 4, 2),
        ]  # fmt: skip
    return list(dict.fromkeys([*current, *rest]))


def _tune_splits(programs: int, sm_count: int, current: int, device: str) -> list[int]:
    """Split counts to time: powers of two from 2 to 128 that put between SMs / 4 and 8 x SMs programs on the
    GPU, and the current choice (the interpreter: 1, 2, 4).

    NOTE: not 1 (unless current): Triton specialises an int argument equal to 1, so one split is another compile
    of every config (~1-2 s each), for a cut that leaves B x Hkv <= 128 programs on 132 SMs at the shapes here.
    """
    if device != "cuda":
        return sorted({1, 2, 4, current})
    pows = [p for p in (2, 4, 8, 16, 32, 64, 128) if sm_count / 4 <= programs * p <= 8 * sm_count]
    return sorted(set(pows) | {current})


def _ms(t, which: int) -> float:
    """A point's time by ``which`` (0: do_bench, 1: graph), the do_bench time where no graph time was taken."""
    return t[which] if math.isfinite(t[which]) else t[0]


def _cfg_src(cfg) -> str:
    """The config as Python source for the TUNED table."""
    from flashfuse.kernels.flash_decode import _KNOBS

    flags = "".join(f", {name}=True" for name in _KNOBS if getattr(cfg, name))
    return f"DecodeConfig({cfg.block_m}, {cfg.block_n}, {cfg.num_warps}, {cfg.num_stages}{flags})"


class _Case:
    """One tuned shape: its K/V sets, the reference output, the current plan and every timed point."""

    def __init__(self, B, Sq, Sk, dtype, device, hq, hkv, d):
        from flashfuse.kernels import flash_decode
        from flashfuse.kernels.flash_fwd import flash_attention_forward

        self.B, self.Sq, self.Sk, self.device = B, Sq, Sk, device
        self.scale, self.band = 1.0 / math.sqrt(d), {"window_right": Sk - Sq}
        first = _decode_qkv(B, Sq, Sk, dtype, device, hq, hkv, d)
        self.kv_bytes = (first[1].numel() + first[2].numel()) * first[1].element_size()
        self.sets = _graph_sets(first, device)
        self.ref = flash_attention_forward(*first, scale=self.scale, **self.band)[0].float()
        self.tol = 1e-5 if dtype == torch.float32 else 2e-2
        self.plan = flash_decode.plan(*first, **self.band)  # what the library does now (TUNED or heuristics)
        self.current = (self.plan.config, self.plan.num_splits)
        self.programs = B * hkv * self.plan.m_blocks
        self.key = flash_decode.tuned_key(d, first[0].element_size(), hq // hkv * Sq, B * hkv, Sk)
        self.points = {}  # (config, effective splits) -> (do_bench ms, graph ms)
        self.vsum = {}  # the same, with a finite mask_fill (rule 6: the split programs add up V): VSUM's cost

    def name(self) -> str:
        return f"B={self.B} Sq={self.Sq} Sk={self.Sk}"

    def call(self, i: int, ns, fill: float = float("-inf")):
        from flashfuse.kernels.flash_decode import flash_decode_forward

        return flash_decode_forward(*self.sets[i], scale=self.scale, num_splits=ns, mask_fill=fill, **self.band)[0]

    def best(self, which: int):
        """``(config, splits, (do_bench ms, graph ms))`` of the fastest point by ``_ms(t, which)``, or None."""
        if not self.points:
            return None
        (cfg, ns), t = min(self.points.items(), key=lambda item: _ms(item[1], which))
        return cfg, ns, t


def _tune_point(case: _Case, cfg, ns: int, device: str, rep: int, failed: dict, vsum: bool = False):
    """Time ``cfg`` at ``ns`` splits on ``case`` (do_bench and CUDA graph) into ``case.points`` (``case.vsum``
    with ``vsum``: a finite mask_fill). Returns ``(effective splits, None or why the point was not timed)``.

    The config goes through FLASHFUSE_DECODE_CONFIG, the path the library itself reads; a config that did not
    fit (the launcher fell back to a smaller one) or fails to compile is put in ``failed`` and not tried again.
    Every point's output is checked against the prefill kernel's, before and after the timings.
    """
    from flashfuse.kernels import flash_decode

    os.environ[CONFIG_ENV] = cfg.spec()
    flash_decode._LAUNCHES.clear()
    eff = flash_decode.plan(*case.sets[0], num_splits=ns, **case.band).num_splits
    store = case.vsum if vsum else case.points
    fill = torch.finfo(torch.float32).min if vsum else float("-inf")  # no row is empty: the same outputs
    if (cfg, eff) in store:
        return eff, None  # the same cut as a split count already timed
    try:
        out = case.call(0, ns, fill)
    except Exception as e:  # noqa: BLE001 -- any compile or launch failure: one line, the next config
        failed[cfg] = _why(e)
        return eff, failed[cfg]
    if any(key[-1] == cfg for key in flash_decode._FITTED):
        failed[cfg] = f"does not fit (the launcher shrank it to {next(iter(flash_decode._FITTED.values())).spec()})"
        flash_decode._FITTED.clear()
        return eff, failed[cfg]
    err = (out.float() - case.ref).abs().max().item()
    if not err <= case.tol:
        return eff, f"x{eff}: wrong result (max error {err:.2e}); not timed"
    try:
        bench_ms = _time_ms(lambda: case.call(0, ns, fill), device, rep)
    except Exception as e:  # noqa: BLE001
        failed[cfg] = _why(e)
        return eff, failed[cfg]
    try:
        graph_ms = _graph_ms([lambda i=i: case.call(i, ns, fill) for i in range(len(case.sets))], device)
    except Exception as e:  # noqa: BLE001 -- capture refused: keep the do_bench time
        graph_ms = float("nan")
        print(f"    {case.name()} {cfg.spec()} x{eff}: no CUDA-graph timing ({_why(e)})")
    if device == "cuda":  # once more after the timings: a race (pdl) could show as a wrong result here
        err = (case.call(0, ns, fill).float() - case.ref).abs().max().item()
        if not err <= case.tol:
            return eff, f"x{eff}: wrong result after timing (max error {err:.2e}); dropped"
    store[(cfg, eff)] = (bench_ms, graph_ms)
    return eff, None


def _why(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160] if text else ''}"


def _pct(ms: float, kv_bytes: int, copy_gbs: float) -> tuple[float, float]:
    gbs = kv_bytes / (ms * 1e-3) / 1e9
    return gbs, 100 * gbs / copy_gbs


def tune(device: str, budget_s: float, copy_gbs: float, start: float, hq: int, hkv: int, d: int) -> int:
    """``--tune``: see the module docstring. Returns 0 when every case got at least one timed point.

    Whatever stops the sweep early -- the budget, an exception, Ctrl-C or SIGTERM (``timeout``) -- the report of
    what was timed is still printed, summary table last.
    """
    from flashfuse.kernels import flash_decode

    cases, bases = [], {}  # bases: (case index, config, splits) -> one cell per knob tried on that point
    saved_env = os.environ.pop(CONFIG_ENV, None)
    saved_term = None
    if threading.current_thread() is threading.main_thread():
        saved_term = signal.signal(signal.SIGTERM, _interrupt)
    try:
        _tune_sweep(device, budget_s, start, hq, hkv, d, cases, bases)
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 -- report what was timed
        print(f"  stopped ({_why(e)}); reporting what was timed", flush=True)
    finally:
        os.environ.pop(CONFIG_ENV, None)
        if saved_env is not None:
            os.environ[CONFIG_ENV] = saved_env
        if saved_term is not None:
            signal.signal(signal.SIGTERM, saved_term)
        flash_decode._LAUNCHES.clear()
    knob_lines = [
        f"  {cases[ci].name()} {cfg.spec()} x{ns}: {_fmt_times(cases[ci].points[(cfg, ns)])}; " + "; ".join(cells)
        for (ci, cfg, ns), cells in sorted(bases.items(), key=lambda item: item[0][0])
    ]
    _tune_report(cases, knob_lines, copy_gbs, device, start)
    return 0 if cases and all(case.points for case in cases) else 1


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _tune_sweep(device, budget_s, start, hq, hkv, d, cases: list, bases: dict) -> None:
    """Phases 1 and 2 of ``--tune``, into ``cases`` (their points) and ``bases`` (the knob cells)."""
    from flashfuse.kernels import flash_decode

    dtype = torch.bfloat16
    cases_spec = TUNE_CASES if device == "cuda" else ((1, 1, 300),)
    rep = 10 if device == "cuda" else 1
    sms = flash_decode._sm_count(torch.device(device))
    deadline = start + budget_s
    phase1_end = start + 0.75 * budget_s
    failed: dict = {}
    for B, Sq, Sk in cases_spec:
        cases.append(_Case(B, Sq, Sk, dtype, device, hq, hkv, d))
    configs = _tune_configs(device, [case.current[0] for case in cases])
    print(f"tune: budget {budget_s:.0f} s; {len(cases)} cases; phase 1: up to {len(configs)} configs x split "
          f"counts (the current config first; merge_wide too past 16 splits), until {0.75 * budget_s:.0f} s; "
          "phase 2: pdl / k_rows on each case's best point, then its second best, then VSUM's cost",
          flush=True)  # fmt: skip
    for case in cases:
        case.splits = _tune_splits(case.programs, sms, case.current[1], device)
        print(f"  {case.name()}: current {case.current[0].spec()} x{case.current[1]} ({case.plan.source}); "
              f"splits {case.splits}; {len(case.sets)} K/V sets for the graph timing", flush=True)  # fmt: skip

    # phase 1: config-major, so that the budget drops the least plausible configs, never a case
    untimed = []
    for cfg in configs:
        if time.perf_counter() > phase1_end:
            untimed.append(cfg.spec())
            continue
        t0, n = time.perf_counter(), 0
        wide = replace(cfg, merge_wide=True)
        for case in cases:
            for ns in case.splits:
                if cfg in failed or time.perf_counter() > phase1_end:
                    break
                eff, why = _tune_point(case, cfg, ns, device, rep, failed)
                if why is not None and cfg not in failed:
                    print(f"    {case.name()} {cfg.spec()}: {why}", flush=True)
                n += why is None
                # merge_wide changes the merge only past 16 splits: there, time it too (same split kernel)
                if why is None and eff > flash_decode._MERGE_BLOCK_S and wide not in failed:
                    _, why = _tune_point(case, wide, ns, device, rep, failed)
                    if why is not None:
                        print(f"    {case.name()} {wide.spec()}: {why}", flush=True)
                    n += why is None
        if cfg in failed:
            print(f"  skip {cfg.spec()}: {failed[cfg]}", flush=True)
            continue
        print(f"  phase 1 {cfg.spec()}: {n} points in {time.perf_counter() - t0:.1f} s "
              f"(at {time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
    if untimed:
        print(f"  budget: phase 1 stopped before {', '.join(untimed)}", flush=True)

    # phase 2: the knobs on each case's best point (by graph time), then on its second best, until the budget
    knobs = [{"pdl": True}, {"k_rows": True}, {"k_rows": True, "pdl": True}]
    if device != "cuda":
        knobs = [{"k_rows": True}]  # pdl is CUDA-only (the launcher ignores it elsewhere)
    for rank in (0, 1):
        for ci, case in enumerate(cases):
            ranked = sorted(case.points.items(), key=lambda item: _ms(item[1], 1))
            plain = [cfg_ns for cfg_ns, _ in ranked if not (cfg_ns[0].k_rows or cfg_ns[0].pdl)]
            if len(plain) <= rank:
                continue
            cfg, ns = plain[rank]
            cells = bases.setdefault((ci, cfg, ns), [])
            for knob in knobs:
                variant = replace(cfg, **knob)
                if time.perf_counter() > deadline:
                    cells.append(f"{'+'.join(knob)}: (budget)")
                    continue
                if variant not in failed:
                    _, why = _tune_point(case, variant, ns, device, rep, failed)
                    if why is not None and variant in failed:
                        print(f"  skip {variant.spec()}: {why}", flush=True)
                    elif why is not None:
                        print(f"    {case.name()} {variant.spec()}: {why}", flush=True)
                t = case.points.get((variant, ns))
                cells.append(f"{'+'.join(knob)}: " + (_fmt_times(t) if t else "failed"))
    # VSUM's cost: each case's best point again with a finite mask_fill (HF's finfo.min), where the split
    # programs also add up V for rule 6's mean
    for ci, case in enumerate(cases):
        best = case.best(1)
        if best is None or time.perf_counter() > deadline:
            continue
        cfg, ns, _ = best
        _, why = _tune_point(case, cfg, ns, device, rep, failed, vsum=True)
        t = case.vsum.get((cfg, ns))
        bases.setdefault((ci, cfg, ns), []).append("vsum: " + (_fmt_times(t) if t else f"failed ({why})"))


def _fmt_times(t) -> str:
    bench_ms, graph_ms = t
    graph = f"{graph_ms * 1e3:.1f}" if math.isfinite(graph_ms) else "n/a"
    return f"{bench_ms * 1e3:.1f} / {graph} us"


def _tune_report(cases, knob_lines, copy_gbs: float, device: str, start: float) -> None:
    """The tables, the TUNED entries and, last, the summary."""
    print()
    print("knobs (do_bench / graph us): a base point, then the same with each knob; vsum: with a finite mask_fill")
    for line in knob_lines:
        print(line)
    titles = (
        "do_bench (median, L2 flushed before each call)",
        "CUDA graph (K/V sets rotated past the L2; what a graph-captured generation loop sees)",
    )
    for which, title in enumerate(titles):
        print()
        print(f"best per case, {title}:")
        print("| B | Sq | Sk | config | splits | us | GB/s | % of copy | current us | current splits | speedup |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for case in cases:
            best = case.best(which)
            cur = case.points.get(case.current)
            if best is None:
                print(f"| {case.B} | {case.Sq} | {case.Sk} | (nothing timed) |||||||| ")
                continue
            cfg, ns, t = best
            ms = _ms(t, which)
            gbs, pct = _pct(ms, case.kv_bytes, copy_gbs)
            cur_ms = _ms(cur, which) if cur else float("nan")
            print(f"| {case.B} | {case.Sq} | {case.Sk} | {cfg.spec()} | {ns} | {ms * 1e3:.1f} | {gbs:.0f} | {pct:.0f}% "
                  f"| {cur_ms * 1e3:.1f} | {case.current[1]} | {cur_ms / ms:.2f}x |")  # fmt: skip
    print()
    name = torch.cuda.get_device_name(device) if device == "cuda" else "cpu (Triton interpreter)"
    print(f"# paste into flashfuse/kernels/flash_decode.py (tuned on {name}, {time.strftime('%Y-%m-%d')}; "
          "best by CUDA-graph time)")  # fmt: skip
    print("TUNED: dict[tuple, tuple[DecodeConfig, int]] = {")
    print("    # tuned_key(head dim, itemsize, packed rows, B * Hkv, band keys): (config, num_splits)")
    seen = {}
    for case in cases:
        best = case.best(1)
        if best is None:
            continue
        cfg, ns, t = best
        ms = _ms(t, 1)
        cur = case.points.get(case.current)
        cur_txt = f"current {_ms(cur, 1) * 1e3:.1f} us" if cur else "current not timed"
        note = f"{case.name()}: {ms * 1e3:.1f} us, {_pct(ms, case.kv_bytes, copy_gbs)[1]:.0f}% of copy; {cur_txt}"
        if case.key in seen:
            print(f"    # {case.key!r}: {_cfg_src(cfg)}, {ns}  -- {note} (same key as {seen[case.key]}: not kept)")
            continue
        seen[case.key] = case.name()
        print(f"    {case.key!r}: ({_cfg_src(cfg)}, {ns}),  # {note}")
    print("}")
    print()
    print(f"summary (wall time {time.perf_counter() - start:.0f} s; copy bandwidth {copy_gbs:.0f} GB/s; graph = "
          "CUDA-graph us per call, bench = do_bench us):")  # fmt: skip
    print("| B | Sq | Sk | current graph | % | best graph | % | speedup | best config x splits | best bench | % |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for case in cases:
        g, b = case.best(1), case.best(0)
        cur = case.points.get(case.current)
        if g is None:
            print(f"| {case.B} | {case.Sq} | {case.Sk} | n/a | | n/a | | | | n/a | |")
            continue
        g_ms = _ms(g[2], 1)
        cur_ms = _ms(cur, 1) if cur else float("nan")
        b_ms = b[2][0]
        cells = [f"{case.B} | {case.Sq} | {case.Sk}"]
        for ms in (cur_ms, g_ms):
            cells.append(f"{ms * 1e3:.1f} | {_pct(ms, case.kv_bytes, copy_gbs)[1]:.0f}%")
        cells.append(f"{cur_ms / g_ms:.2f}x | {g[0].spec()} x{g[1]}")
        cells.append(f"{b_ms * 1e3:.1f} | {_pct(b_ms, case.kv_bytes, copy_gbs)[1]:.0f}%")
        print("| " + " | ".join(cells) + " |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="4 cases, shorter timing")
    p.add_argument("--splits", type=int, default=None, help="force num_splits (default: choose_splits)")
    p.add_argument("--sweep-splits", action="store_true", help="also time num_splits = 1..128 per case")
    p.add_argument("--config", default=None, help="BLOCK_M,BLOCK_N,num_warps,num_stages for the decode kernel")
    p.add_argument("--rep", type=int, default=None, help="do_bench rep in ms (default 100, --quick 40)")
    p.add_argument("--host", action="store_true", help="host time of one op call, broken down (B=1, Sk=4k)")
    p.add_argument("--tune", action="store_true", help="sweep configs x num_splits; print flash_decode.TUNED entries")
    p.add_argument("--budget-s", type=float, default=150.0, help="--tune: wall-time budget in s, compiles included")
    args = p.parse_args(argv)
    if args.budget_s <= 0:
        p.error("--budget-s must be > 0")

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
    if args.tune:  # its own shapes and configs (--config, --splits, --quick do not apply)
        return tune(device, args.budget_s, copy_gbs, start, hq, hkv, d)
    print(
        "| dtype | B | Sq | Sk | splits | decode us | decode GB/s | % of copy | graph us | graph % | flash_fwd us "
        "| sdpa us | vs best other | host us/call | check |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
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
                graph = "n/a | n/a"
                if math.isfinite(r["graph_ms"]):
                    graph_gbs = r["kv_bytes"] / (r["graph_ms"] * 1e-3) / 1e9
                    graph = f"{r['graph_ms'] * 1e3:.1f} | {100 * graph_gbs / copy_gbs:.0f}%"
                print(
                    f"| bf16 | {B} | {Sq} | {Sk} | {r['splits']} | {r['decode_ms'] * 1e3:.1f} | {gbs:.0f} "
                    f"| {100 * gbs / copy_gbs:.0f}% | {graph} | {r['prefill_ms'] * 1e3:.1f} | {sdpa} | {speedup:.2f}x "
                    f"| {r['host_us']:.0f} | {r['check']} |",
                    flush=True,
                )
    print()
    for r in rows:
        note = f"; no CUDA-graph timing: {r['graph_note']}" if "graph_note" in r else ""
        print(f"  B={r['B']} Sq={r['Sq']} Sk={r['Sk']}: {r['plan'].describe()}{note}")
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
