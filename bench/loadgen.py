"""`python bench/loadgen.py ARGS` runs `python -m neoplasma.local.loadgen ARGS` (publisher load)."""

import sys

from neoplasma.local.loadgen import generate, main

__all__ = ["generate", "main"]  # tests/test_operator_autoscale.py imports `generate` from here

if __name__ == "__main__":
    sys.exit(main())
