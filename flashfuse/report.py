"""The match report: one entry per candidate softmax, across every graph Dynamo produced.

Stable names (users and tools read them): ``Report.sites``, ``Report.total``, ``Report.rewritten``;
``SiteReport.rewritten``, ``.reason``, ``.source``, ``.flags``, ``.graph``.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from typing import Any

__all__ = ["SiteReport", "GraphReport", "Report", "collect", "last_report", "reset_report"]


@dataclasses.dataclass
class SiteReport:
    rewritten: bool
    reason: str | None
    source: str
    flags: dict[str, Any] = dataclasses.field(default_factory=dict)
    graph: int = 0
    hint: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "graph": self.graph,
            "rewritten": self.rewritten,
            "reason": self.reason,
            "hint": self.hint,
            "source": self.source,
            "flags": {k: _jsonable(v) for k, v in self.flags.items()},
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)


@dataclasses.dataclass
class GraphReport:
    graph: int
    sites: list[SiteReport] = dataclasses.field(default_factory=list)
    pass_times_ms: dict[str, float] = dataclasses.field(default_factory=dict)
    fallback: str | None = None
    #: Inductor options flashfuse set itself for this graph (``backend.own_patches``), e.g. ``cpp_wrapper``
    inductor_patches: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: why Inductor failed with those options (the rewritten graph was then compiled without them)
    inductor_patches_failed: str | None = None

    @property
    def total(self) -> int:
        return len(self.sites)

    @property
    def rewritten(self) -> int:
        return sum(site.rewritten for site in self.sites)


class Report:
    """Every candidate site of every graph compiled while this report was collecting."""

    def __init__(self, graphs: list[GraphReport] | None = None):
        self.graphs: list[GraphReport] = list(graphs or [])

    @property
    def sites(self) -> list[SiteReport]:
        return [site for graph in self.graphs for site in graph.sites]

    @property
    def total(self) -> int:
        return len(self.sites)

    @property
    def rewritten(self) -> int:
        return sum(site.rewritten for site in self.sites)

    @property
    def fallbacks(self) -> list[str]:
        return [g.fallback for g in self.graphs if g.fallback]

    def to_json(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "rewritten": self.rewritten,
            "graphs": [
                {"graph": g.graph, "total": g.total, "rewritten": g.rewritten, "fallback": g.fallback,
                 "pass_times_ms": g.pass_times_ms, "inductor_patches": g.inductor_patches,
                 "inductor_patches_failed": g.inductor_patches_failed}
                for g in self.graphs
            ],
            "sites": [site.to_json() for site in self.sites],
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2)

    def __str__(self) -> str:
        lines = [f"flashfuse: {self.rewritten}/{self.total} attention sites rewritten in {len(self.graphs)} graph(s)"]
        if self.sites:
            rows = [("graph", "site", "rewritten", "flags / reason")]
            for site in self.sites:
                if site.rewritten:
                    detail = ", ".join(f"{k}={_short(v)}" for k, v in site.flags.items())
                else:
                    detail = site.reason or ""
                    if site.hint:
                        detail += f" (hint: {site.hint})"
                rows.append((str(site.graph), site.source, "yes" if site.rewritten else "no", detail))
            widths = [max(len(r[i]) for r in rows) for i in range(3)]
            for r in rows:
                lines.append("  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3])
        for g in self.graphs:
            if g.inductor_patches:
                lines.append(f"graph {g.graph}: Inductor options set by flashfuse: "
                             + ", ".join(f"{k}={v}" for k, v in g.inductor_patches.items()))
            if g.inductor_patches_failed:
                lines.append(f"graph {g.graph}: {g.inductor_patches_failed}")
        for fb in self.fallbacks:
            lines.append(f"fallback: {fb}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<flashfuse.Report {self.rewritten}/{self.total} rewritten>"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


# Reports of graphs compiled by the backend, in order; `flashfuse.explain` and `last_report` read them.
_lock = threading.Lock()
_graphs: list[GraphReport] = []
_counter = 0


def new_graph_report() -> GraphReport:
    global _counter
    with _lock:
        report = GraphReport(graph=_counter)
        _counter += 1
        _graphs.append(report)
    return report


def collect() -> int:
    """A mark: ``last_report(since=mark)`` returns the graphs compiled after it."""
    with _lock:
        return len(_graphs)


def last_report(since: int = 0) -> Report:
    """The report of every graph compiled by the flashfuse backend (since ``since``)."""
    with _lock:
        return Report(_graphs[since:])


def reset_report() -> None:
    with _lock:
        _graphs.clear()
