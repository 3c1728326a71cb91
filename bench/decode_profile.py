"""Where a decode step's time goes inside a CUDA graph: per-call graph time, each kernel's profiled duration,
and a plain copy of K in the same kind of graph (the floor a single bandwidth-bound kernel reaches at that size).

    python bench/decode_profile.py      # GPU only; Hq 32 / Hkv 8, D 128, bf16, B1 Sk4k / B1 Sk8k / B16 Sk4k

With PDL (``DecodeConfig.pdl``) the merge kernel starts while the split kernel drains, so its profiled
duration overlaps the split's. Results: bench/RESULTS.md (2026-11-30, session 5).
"""

import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import decode as D  # noqa: E402 -- bench/decode.py's input and graph helpers

from flashfuse.kernels.flash_decode import flash_decode_forward, plan  # noqa: E402


def main() -> None:
    dev = "cuda"
    copy_tbs = D.copy_bandwidth(dev, 100) / 1e3
    print(f"# {torch.cuda.get_device_name()}: copy bandwidth {copy_tbs:.2f} TB/s (1 GiB copy_)")
    for B, Sk in ((1, 4096), (1, 8192), (16, 4096)):
        q, k, v = D._decode_qkv(B, 1, Sk, torch.bfloat16, dev, 32, 8, 128)
        scale = 128**-0.5
        band = {"window_right": Sk - 1}
        sets = D._graph_sets((q, k, v), dev)
        fns = [lambda s=s: flash_decode_forward(*s, scale=scale, **band) for s in sets]
        per = D._graph_ms(fns, dev) * 1e3  # us per call, median of replays (compiles and plans first)
        g = D.capture(fns, 40 * len(sets))
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            g.replay()
            torch.cuda.synchronize()
        by: dict[str, list[float]] = {}
        for x in prof.events():
            if x.device_type == torch.autograd.DeviceType.CUDA:
                us = x.device_time_total if hasattr(x, "device_time_total") else x.cuda_time_total
                by.setdefault(x.name[:40], []).append(us)
        kv_bytes = (k.numel() + v.numel()) * k.element_size()
        print(f"B={B} Sk={Sk} {plan(q, k, v, **band)}")
        tbs = kv_bytes / per / 1e6
        print(f"   graph {per:.2f} us/call = {tbs:.2f} TB/s ({tbs / copy_tbs:.0%} of copy)")
        for name, ts in by.items():
            ts = sorted(ts)
            print(f"   {name:40s} n={len(ts)} median {ts[len(ts) // 2]:.2f} us")
        # the floor of one bandwidth-bound kernel at this size: a copy of K (reads and writes kv_bytes / 2 each)
        ys = [torch.empty_like(st[1]) for st in sets]
        cper = D._graph_ms([lambda st=st, y=y: y.copy_(st[1]) for st, y in zip(sets, ys)], dev) * 1e3
        print(f"   copy of K in a graph: {cper:.2f} us = {kv_bytes / cper / 1e6:.2f} TB/s of traffic")
        del g, sets, fns, ys
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
