"""Survey: ``flashfuse.explain`` on every model of the zoo (forward, padded, decode); writes JSON lines.

    python -m tests.models.survey [name ...] > /tmp/survey.jsonl
"""

from __future__ import annotations

import collections
import json
import os
import sys
import time
import traceback

import torch

# as in tests/conftest.py: on the CPU the kernel runs under the Triton interpreter (the report's "kernel" flag)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import flashfuse
from tests.models import zoo

SCENARIOS = ("forward", "padded", "decode", "decode_padded")
GRAD = bool(int(os.environ.get("SURVEY_GRAD", "0")))  # 1: trace with autograd on (parameters require grad)


def scenario(model, kind, which):
    if which == "forward":
        return zoo.forward(model, kind, padded=False)
    if which == "padded":
        return zoo.forward(model, kind, padded=True)
    if which == "decode":
        return zoo.decode_step(model, kind, padded=False)
    if which == "decode_padded":
        return zoo.decode_step(model, kind, padded=True)
    raise ValueError(which)


def applicable(kind, which):
    if which.startswith("decode"):
        return kind in ("causal_lm", "seq2seq", "whisper")
    if which == "padded":
        return kind != "vision"
    return True


def _other(name):
    from tests.models import other_zoo

    model = other_zoo.build(name)
    ids, mask = zoo.input_ids(), zoo.right_padded_mask().bool()
    if name == "nanogpt":
        return model, {"forward": ((lambda ids: model(ids)), (ids,))}
    if name == "einsum":
        return model, {"forward": ((lambda ids: model(ids)), (ids,)),
                       "padded": ((lambda ids, mask: model(ids, mask)), (ids, mask))}
    return model, {"forward": ((lambda px: model(px)), (zoo.pixels(),))}


def survey_one(name, debug_root=None):
    from tests.models import other_zoo

    if name in other_zoo.OTHER:
        model, fixed = _other(name)
        kind = "other"
    else:
        model, kind = zoo.build(name)
    rows = []
    for which in SCENARIOS:
        if kind == "other" and which not in fixed:
            continue
        if kind != "other" and not applicable(kind, which):
            continue
        row = {"model": name, "scenario": which}
        t0 = time.time()
        try:
            fn, args = fixed[which] if kind == "other" else scenario(model, kind, which)
            torch._dynamo.reset()
            opts = {}
            if debug_root:
                opts["debug_dir"] = os.path.join(debug_root, name, which)
            with torch.set_grad_enabled(GRAD):
                rep = flashfuse.explain(fn, *args, **opts)
            row.update(total=rep.total, rewritten=rep.rewritten, graphs=len(rep.graphs),
                       fallbacks=rep.fallbacks,
                       reasons=collections.Counter(s.reason for s in rep.sites if not s.rewritten),
                       sources=sorted({s.source for s in rep.sites if not s.rewritten}),
                       flags=[s.flags for s in rep.sites if s.rewritten],
                       table=str(rep))
        except Exception as exc:  # noqa: BLE001
            row.update(error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:400],
                       tb=traceback.format_exc()[-3000:])
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        print(json.dumps(row, default=str), flush=True)
    return rows


def main():
    from tests.models import other_zoo

    if sys.argv[1:2] == ["--render"]:
        print(render(sys.argv[2], sys.argv[3]))
        return

    names = sys.argv[1:] or [*zoo.BUILDERS, *other_zoo.OTHER]
    for n in names:
        try:
            survey_one(n, debug_root=os.environ.get("SURVEY_DEBUG_ROOT"))
        except Exception as exc:  # noqa: BLE001
            print(json.dumps({"model": n, "scenario": "build", "error": f"{type(exc).__name__}: {exc}"[:400],
                              "tb": traceback.format_exc()[-3000:]}), flush=True)


# -- markdown -------------------------------------------------------------------------------------------

def _cell(r):
    if r is None:
        return "n/a"
    if "error" in r:
        return "ERROR"
    mark = "" if r["total"] == r["rewritten"] else " ✗"
    return f"{r['rewritten']}/{r['total']}{mark}"


def render(no_grad_path, grad_path):
    """The SURVEY.md table from two survey runs (autograd off / on)."""
    from tests.models import other_zoo

    order = [*zoo.BUILDERS, *other_zoo.OTHER]
    runs = {}
    for grad, path in (("nograd", no_grad_path), ("grad", grad_path)):
        with open(path) as lines:
            for line in lines:
                r = json.loads(line)
                runs[(grad, r["model"], r["scenario"])] = r
    out = ["| model | forward | padded | decode (q_len=1) | decode + padded | sites left alone: reason (verbatim) |",
           "|---|---|---|---|---|---|"]
    for m in order:
        cells, reasons = [], collections.OrderedDict()
        for sc in SCENARIOS:
            a, b = runs.get(("nograd", m, sc)), runs.get(("grad", m, sc))
            ca, cb = _cell(a), _cell(b)
            cells.append(ca if ca == cb else f"{ca} (grad on: {cb})")
            for grad, r in (("", a), (" [grad on only]", b)):
                if r is None:
                    continue
                if "error" in r:
                    reasons.setdefault(f"{sc}: exception `{r['error']}`", None)
                for reason in r.get("reasons", {}):
                    if grad and a is not None and reason in a.get("reasons", {}):
                        continue
                    import re

                    generic = re.sub(r"\((\w+?)(_\d+)?\)", r"(\1)", reason)
                    reasons.setdefault(f"\"{generic}\"{grad}", None)
        out.append(f"| {m} | " + " | ".join(cells) + " | " + "<br>".join(reasons) + " |")
    out += ["", "How the rewritten sites were rewritten (autograd off; one entry per distinct flag set, x count):", "",
            "| model | forward | padded | decode (q_len=1) | decode + padded |", "|---|---|---|---|---|"]
    for m in order:
        cells = []
        for sc in SCENARIOS:
            r = runs.get(("nograd", m, sc))
            if r is None or "error" in r:
                cells.append("n/a")
                continue
            c = collections.Counter(_short_flags(f) for f in r.get("flags", []))
            cells.append("<br>".join(f"{k} x{n}" for k, n in c.items()) or "-")
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def _short_flags(f):
    parts = []
    if f.get("causal"):
        parts.append("causal")
    elif f.get("window_left") is not None or f.get("window_right") is not None:
        parts.append(f"band[{f.get('window_left')},{f.get('window_right')}]")
    if f.get("mask") not in (None, "none"):
        parts.append(f"mask={f['mask']}")
    if f.get("gqa_groups", 1) != 1:
        parts.append(f"gqa={f['gqa_groups']}")
    if f.get("softcap"):
        parts.append(f"softcap={f['softcap']:g}")
    if f.get("sinks"):
        parts.append("sinks")
    if f.get("bias_grad"):
        parts.append("bias_grad")
    if f.get("kernel") and not str(f["kernel"]).startswith("flash_fwd"):
        parts.append(f"kernel: {f['kernel']}")
    sc = f.get("scale")
    parts.append(f"scale={sc:.4g}" if isinstance(sc, float) else f"scale={sc}")
    return " ".join(parts)


if __name__ == "__main__":
    main()
