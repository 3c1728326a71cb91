"""flashfuse: a ``torch.compile`` backend that rewrites naive attention into fused Triton flash attention.

    model = torch.compile(model, backend="flashfuse")

Public API: ``backend`` (the Dynamo backend), ``explain`` (the match report, no GPU needed),
``attention`` (the fused op, callable directly), ``Config``, ``last_report``.
"""

from __future__ import annotations

from typing import Any, Callable

from flashfuse import ops as _ops  # registers torch.ops.flashfuse.*
from flashfuse.backend import flashfuse_backend as backend
from flashfuse.config import Config
from flashfuse.ops import attention
from flashfuse.report import Report, SiteReport, last_report, reset_report

__all__ = ["backend", "explain", "attention", "Config", "Report", "SiteReport", "last_report", "reset_report"]
__version__ = "0.1.0"

del _ops


def explain(fn: Callable[..., Any], *args: Any, **options: Any) -> Report:
    """Run ``fn(*args)`` under Dynamo with flashfuse's analysis and return the match report.

    Runs the passes on every graph Dynamo captures, then executes the original graphs eagerly: no GPU
    and no Inductor compile are needed. ``options`` are flashfuse options (``debug_dir=...``, ...).
    """
    import torch

    from flashfuse import report as _report
    from flashfuse.backend import analyse
    from flashfuse.config import split_options

    config, _ = split_options(options)

    def _explain_backend(gm, example_inputs):
        analyse(gm, example_inputs, config)
        return gm.forward

    mark = _report.collect()
    compiled = torch.compile(fn, backend=_explain_backend)
    compiled(*args)
    return _report.last_report(since=mark)
