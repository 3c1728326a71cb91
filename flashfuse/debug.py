"""Pass-by-pass dumps: one folder per compiled graph under ``debug_dir`` (``FLASHFUSE_DEBUG_DIR``).

    debug_dir/index.md                   every graph with its counts
    debug_dir/graph_000/00_input.py      the graph as Dynamo gave it, readable Python with shapes/strides
    debug_dir/graph_000/01_canonicalize.py ... one file per pass, after it ran
    debug_dir/graph_000/report.json, report.md
    (under torch.distributed with several ranks: debug_dir/rank<r>/... per rank)
"""

from __future__ import annotations

import json
import os
import threading

import torch.fx as fx

from flashfuse.report import GraphReport, Report

__all__ = ["Dumper"]

_index_lock = threading.Lock()


def _rank_root(root: str) -> str:
    """``root/rank<r>`` under torch.distributed with several ranks: each rank numbers its graphs from 0."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return os.path.join(root, f"rank{dist.get_rank()}")
    return root


def _readable(gm: fx.GraphModule) -> str:
    try:
        return gm.print_readable(print_output=False, include_stride=True, include_device=True)
    except TypeError:  # older signatures
        return gm.print_readable(print_output=False)


class Dumper:
    def __init__(self, root: str, folder: str):
        self.root = root
        self.folder = folder
        os.makedirs(folder, exist_ok=True)

    @classmethod
    def for_graph(cls, root: str, report: GraphReport) -> "Dumper":
        root = _rank_root(root)
        return cls(root, os.path.join(root, f"graph_{report.graph:03d}"))

    def graph(self, index: int, name: str, gm: fx.GraphModule) -> None:
        with open(os.path.join(self.folder, f"{index:02d}_{name}.py"), "w") as f:
            f.write(_readable(gm))

    def write_report(self, report: GraphReport) -> None:
        """report.json and report.md of this graph (again after the backend set Inductor options for it)."""
        rep = Report([report])
        with open(os.path.join(self.folder, "report.json"), "w") as f:
            json.dump(rep.to_json(), f, indent=2)
        with open(os.path.join(self.folder, "report.md"), "w") as f:
            f.write(f"# graph {report.graph}\n\n```\n{rep}\n```\n")

    def finish(self, report: GraphReport) -> None:
        self.write_report(report)
        with _index_lock:
            index = os.path.join(self.root, "index.md")
            new = not os.path.exists(index)
            with open(index, "a") as f:
                if new:
                    f.write("# flashfuse graphs\n\n| graph | sites | rewritten | folder |\n|---|---|---|---|\n")
                f.write(f"| {report.graph} | {report.total} | {report.rewritten} | {os.path.basename(self.folder)} |\n")
