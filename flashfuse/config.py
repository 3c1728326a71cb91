"""flashfuse's options: one frozen dataclass, built in one place from ``options=`` and ``FLASHFUSE_*``.

Precedence: explicit ``options={...}`` > environment variables > defaults. Any key of
``torch._inductor.config`` is also accepted in ``options`` and handed to Inductor untouched.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

__all__ = ["Config", "split_options"]


def _env_bool(name: str) -> bool | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    return raw.strip().lower() not in ("0", "false", "no", "off")


@dataclasses.dataclass(frozen=True)
class Config:
    #: rewrite attention sites (False: analyse and report only; the graph goes to Inductor unchanged)
    rewrite: bool = True
    #: write pass-by-pass dumps and reports of every compiled graph under this folder
    debug_dir: str | None = None
    #: sites whose key length is known and shorter than this are left alone
    min_seq_len: int = 0
    #: run an FP8 kernel on sm90 for inference sites (accepted everywhere; see the report for what ran)
    fp8: bool = False
    #: compile the rewritten graph with Inductor (False: run it eagerly, for debugging and fast tests)
    inductor: bool = True
    #: check each rewritten site against the original subgraph on the first call
    verify: bool = False
    #: sites whose output cannot need a gradient (grad mode off, or nothing upstream requires grad) call the
    #: lighter ops ``flashfuse::attention_infer`` / ``decode_inline`` (same kernels, output only, less host time)
    infer_op: bool = True
    #: a CUDA graph whose rewritten sites all call the inference ops gets Inductor's C++ wrapper
    #: (``cpp_wrapper``), unless the user set ``cpp_wrapper`` or CUDA graphs; see ``backend.own_patches``
    infer_cpp_wrapper: bool = True

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_env(cls) -> dict[str, Any]:
        found: dict[str, Any] = {}
        if os.environ.get("FLASHFUSE_DEBUG_DIR"):
            found["debug_dir"] = os.environ["FLASHFUSE_DEBUG_DIR"]
        for key in ("rewrite", "fp8", "verify", "inductor", "infer_op", "infer_cpp_wrapper"):
            val = _env_bool(f"FLASHFUSE_{key.upper()}")
            if val is not None:
                found[key] = val
        if os.environ.get("FLASHFUSE_MIN_SEQ_LEN"):
            found["min_seq_len"] = int(os.environ["FLASHFUSE_MIN_SEQ_LEN"])
        return found


def _inductor_keys() -> set[str]:
    try:
        import torch._inductor.config as inductor_config

        return set(inductor_config.get_config_copy().keys())
    except Exception:  # pragma: no cover - depends on the torch build
        return set()


def split_options(options: Mapping[str, Any] | None) -> tuple[Config, dict[str, Any]]:
    """``options`` -> (flashfuse Config, Inductor config patches). Unknown keys raise ``ValueError``."""
    options = dict(options or {})
    ours = set(Config.keys())
    inductor_keys = _inductor_keys()
    unknown = sorted(key for key in options if key not in ours and key not in inductor_keys)
    if unknown:
        raise ValueError(
            f"flashfuse: unknown option(s) {unknown}; valid flashfuse options are {sorted(ours)}, "
            "and any key of torch._inductor.config is passed to Inductor"
        )
    values = Config.from_env()
    values.update({key: options.pop(key) for key in list(options) if key in ours})
    for key, val in values.items():
        expected = {f.name: f.type for f in dataclasses.fields(Config)}[key]
        if "bool" in str(expected) and not isinstance(val, bool):
            raise ValueError(f"flashfuse: option {key!r} expects a bool, got {val!r}")
        if key == "min_seq_len" and (not isinstance(val, int) or val < 0):
            raise ValueError(f"flashfuse: option 'min_seq_len' expects an int >= 0, got {val!r}")
        if key == "debug_dir" and val is not None and not isinstance(val, (str, os.PathLike)):
            raise ValueError(f"flashfuse: option 'debug_dir' expects a path, got {val!r}")
    if values.get("debug_dir") is not None:
        values["debug_dir"] = os.fspath(values["debug_dir"])
    return Config(**values), options
