"""``python -m flashfuse explain path/to/script.py [args...]``: run a script with dumps on, print the report.

The script compiles its model with ``backend="flashfuse"`` as usual; every graph it compiles is dumped
under ``FLASHFUSE_DEBUG_DIR`` (default: ``./flashfuse_debug``) and the summary table of every attention
site is printed when the script ends.

``python -m flashfuse bench [options]`` is ``python -m flashfuse.bench``: the attention benchmark table.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys


def _explain(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m flashfuse explain",
                                     description="run a script with flashfuse dumps on and print the match report")
    parser.add_argument("--debug-dir", default=None, help="where to write the dumps (default: ./flashfuse_debug)")
    parser.add_argument("script", help="the Python script to run")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script")
    opts = parser.parse_args(argv)

    debug_dir = os.path.abspath(opts.debug_dir or os.environ.get("FLASHFUSE_DEBUG_DIR") or "flashfuse_debug")
    os.environ["FLASHFUSE_DEBUG_DIR"] = debug_dir
    import flashfuse

    flashfuse.reset_report()
    sys.argv = [opts.script, *opts.args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(opts.script)))
    code = 0
    try:
        runpy.run_path(opts.script, run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        report = flashfuse.last_report()
        print("\n" + str(report))
        if not report.graphs:
            print("no graph was compiled with backend='flashfuse' (does the script call torch.compile(model, "
                  "backend='flashfuse') and run the compiled model?)")
        print(f"dumps: {debug_dir}")
    return code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    command, rest = argv[0], argv[1:]
    if command == "explain":
        return _explain(rest)
    if command == "bench":
        from flashfuse.bench import main as bench_main

        return bench_main(rest)
    print(f"unknown command {command!r}; commands: explain, bench", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
