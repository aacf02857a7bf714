"""`python bench/loadgen.py ARGS` runs `python -m neoplasma.local.loadgen ARGS` (publisher load)."""

import sys

from neoplasma.local.loadgen import main

if __name__ == "__main__":
    sys.exit(main())
