"""Attention speed, flashfuse against its peers: ``python bench/attention.py`` is ``python -m flashfuse.bench``.

    python bench/attention.py --quick
    python bench/attention.py --mode fwdbwd --budget-s 240 --csv out.csv
    python bench/attention.py --help

The benchmark lives in the package (``flashfuse/bench.py``) so that an installed flashfuse can run it; this
file only forwards its arguments.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # a checkout that is not installed: the package beside this folder
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from flashfuse.bench import main

    sys.exit(main())
